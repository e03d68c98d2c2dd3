//! The download pipeline.
//!
//! A producer task reads the chunks a range touches, a bounded window ahead
//! of the client, on blocking threads: read, decrypt, recompute the id. Only
//! a chunk that verifies is sliced into messages and queued; a chunk that
//! does not is moved to quarantine and the stream ends with `DATA_LOSS`.

use std::collections::VecDeque;

use bytes::Bytes;
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;

use super::{Node, NodeError, Target};
use crate::{
    crypto::{ChunkId, IV_LEN},
    proto::ObjectRecord,
    store::StoreError,
};

/// Chunks read and verified ahead of the one being sent. Two keep the disk
/// and the CPU busy while the network drains the current chunk.
const READ_AHEAD: usize = 2;
/// Largest data message sent to a client. Well under every gRPC client's
/// default 4 MiB receive limit.
pub const MESSAGE_BYTES: usize = 1 << 20;
/// Messages queued between the producer and the gRPC encoder.
const QUEUE_MESSAGES: usize = 4;

/// A byte range within an object, already checked against its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
}

impl ByteRange {
    /// Checks `offset`/`length` (0 = to the end) against an object's size.
    pub fn resolve(size: u64, offset: u64, length: u64) -> Result<Self, NodeError> {
        if offset > size {
            return Err(NodeError::OutOfRange(format!(
                "offset {offset} is beyond the end of the object ({size} bytes)"
            )));
        }
        let len = if length == 0 { size - offset } else { length };
        if len > size - offset {
            return Err(NodeError::OutOfRange(format!(
                "range {offset}+{length} is beyond the end of the object ({size} bytes)"
            )));
        }
        Ok(Self { offset, len })
    }
}

/// The part of each chunk a range covers: `(chunk index, start, end)` with
/// `start..end` relative to the chunk. Chunks outside the range are not
/// listed, so a range read touches only the chunks it needs.
pub fn chunk_span(
    chunk_size: u64,
    range: ByteRange,
) -> impl Iterator<Item = (usize, usize, usize)> {
    let end = range.offset + range.len;
    let (first, last) = if range.len == 0 {
        (1, 0) // empty
    } else {
        (range.offset / chunk_size, (end - 1) / chunk_size)
    };
    (first..=last).map(move |i| {
        let chunk_start = i * chunk_size;
        let from = range.offset.max(chunk_start) - chunk_start;
        let to = end.min(chunk_start + chunk_size) - chunk_start;
        (i as usize, from as usize, to as usize)
    })
}

/// An object being downloaded: its record and a stream of verified bytes.
pub struct Download {
    pub record: ObjectRecord,
    pub range: ByteRange,
    pub data: ReceiverStream<Result<Bytes, NodeError>>,
}

type ReadResult = Result<Bytes, StoreError>;

impl Node {
    /// Starts streaming `target`'s bytes in `offset..offset+length` (length 0
    /// = to the end). Fails before any data if the object or range is bad.
    pub fn download(
        self: &std::sync::Arc<Self>,
        target: &Target,
        offset: u64,
        length: u64,
    ) -> Result<Download, NodeError> {
        let record = self.resolve(target)?;
        let range = ByteRange::resolve(record.size, offset, length)?;
        let (tx, rx) = mpsc::channel(QUEUE_MESSAGES);
        let node = self.clone();
        let producer_record = record.clone();
        tokio::spawn(async move { node.produce(producer_record, range, tx).await });
        Ok(Download {
            record,
            range,
            data: ReceiverStream::new(rx),
        })
    }

    async fn produce(
        &self,
        record: ObjectRecord,
        range: ByteRange,
        tx: mpsc::Sender<Result<Bytes, NodeError>>,
    ) {
        let ids: Vec<ChunkId> = record.chunk_id_list().collect();
        let max_len = record.chunk_size as usize + IV_LEN;
        let mut window: VecDeque<(ChunkId, usize, usize, JoinHandle<ReadResult>, _)> =
            VecDeque::new();
        let mut span = chunk_span(record.chunk_size.max(1) as u64, range);
        loop {
            while window.len() < READ_AHEAD {
                let Some((i, from, to)) = span.next() else {
                    break;
                };
                let Some(id) = ids.get(i).copied() else {
                    let _ = tx
                        .send(Err(NodeError::DataLoss(format!(
                            "record for {:?} lists {} chunks but needs chunk {i}",
                            record.key,
                            ids.len()
                        ))))
                        .await;
                    return;
                };
                let permit = self.budget.acquire(max_len).await;
                let (store, keys) = (self.store.clone(), self.keys.clone());
                let read = tokio::task::spawn_blocking(move || {
                    let mut sealed = store.read(&id, max_len)?;
                    let corrupt = |reason: String| StoreError::Corrupt { id, reason };
                    keys.open_in_place(&mut sealed, &id)
                        .map_err(|e| corrupt(e.to_string()))?;
                    if sealed.len() - IV_LEN < to {
                        let held = sealed.len() - IV_LEN;
                        return Err(corrupt(format!(
                            "holds {held} bytes, the record needs {to}"
                        )));
                    }
                    Ok(Bytes::from(sealed).slice(IV_LEN..))
                });
                window.push_back((id, from, to, read, permit));
            }
            let Some((id, from, to, read, permit)) = window.pop_front() else {
                return;
            };
            let plain = match read.await {
                Ok(Ok(plain)) => plain,
                Ok(Err(e)) => {
                    let err = self.chunk_failed(&id, e);
                    let _ = tx.send(Err(err)).await;
                    return;
                }
                Err(e) => {
                    let err = NodeError::Internal(format!("chunk read stopped: {e}"));
                    let _ = tx.send(Err(err)).await;
                    return;
                }
            };
            let mut part = plain.slice(from..to);
            while !part.is_empty() {
                let message = part.split_to(part.len().min(MESSAGE_BYTES));
                if tx.send(Ok(message)).await.is_err() {
                    return; // the client went away
                }
            }
            drop(permit);
        }
    }

    /// Handles a chunk that could not be served: a corrupt one is moved aside
    /// for inspection (never deleted) and logged; either way the client gets
    /// `DATA_LOSS`.
    fn chunk_failed(&self, id: &ChunkId, e: StoreError) -> NodeError {
        if let StoreError::Corrupt { .. } = e {
            match self.store.quarantine(id) {
                Ok(path) => tracing::error!(chunk = %id, error = %e, moved_to = %path.display(),
                    "chunk failed verification; moved to quarantine"),
                Err(qe) => tracing::error!(chunk = %id, error = %e, quarantine_error = %qe,
                    "chunk failed verification and could not be moved aside"),
            }
        } else {
            tracing::error!(chunk = %id, error = %e, "chunk could not be read");
        }
        NodeError::from(e)
    }
}
