//! Walking a record's chunk ids in file order, in bounded memory.

use std::sync::Arc;

use super::NodeError;
use crate::{
    crypto::{CHUNK_ID_LEN, ChunkId},
    index::{Index, IndexError, LIST_PAGE_IDS},
    proto::ObjectRecord,
};

/// A reader's view of one record's chunk list: an inline list is read from
/// the record, an out-of-line one from the index a page
/// ([`LIST_PAGE_IDS`] ids) at a time, so a reader holds at most one page
/// whatever the object's size.
pub struct ChunkIdPages {
    index: Arc<Index>,
    record: ObjectRecord,
    /// Position of the first id of `page` in the list.
    page_start: u64,
    page: Vec<ChunkId>,
}

impl ChunkIdPages {
    pub fn new(index: Arc<Index>, record: ObjectRecord) -> Self {
        Self {
            index,
            record,
            page_start: 0,
            page: Vec::new(),
        }
    }

    /// The id of chunk `i`.
    pub async fn get(&mut self, i: u64) -> Result<ChunkId, NodeError> {
        if i >= self.record.chunk_count() as u64 {
            return Err(NodeError::DataLoss(format!(
                "record for {:?} lists {} chunks but needs chunk {i}",
                self.record.key,
                self.record.chunk_count()
            )));
        }
        if self.record.list_digest().is_none() {
            let at = i as usize * CHUNK_ID_LEN;
            return self
                .record
                .chunk_ids
                .get(at..at + CHUNK_ID_LEN)
                .and_then(ChunkId::from_slice)
                .ok_or_else(|| NodeError::Internal("chunk id out of the record".into()));
        }
        if i < self.page_start || i >= self.page_start + self.page.len() as u64 {
            self.load(i - i % LIST_PAGE_IDS as u64).await?;
        }
        self.page
            .get((i - self.page_start) as usize)
            .copied()
            .ok_or_else(|| {
                NodeError::DataLoss(format!(
                    "the chunk list of {:?} ends before chunk {i}",
                    self.record.key
                ))
            })
    }

    async fn load(&mut self, first: u64) -> Result<(), NodeError> {
        let (index, record) = (self.index.clone(), self.record.clone());
        let read =
            tokio::task::spawn_blocking(move || index.chunk_ids(&record, first, LIST_PAGE_IDS))
                .await
                .map_err(|e| NodeError::Internal(format!("chunk list read stopped: {e}")))?;
        self.page = read.map_err(|e| match e {
            IndexError::MissingList(_) => NodeError::NotFound(format!(
                "object {:?} was replaced or deleted during the read",
                self.record.key
            )),
            other => NodeError::from(other),
        })?;
        self.page_start = first;
        Ok(())
    }
}
