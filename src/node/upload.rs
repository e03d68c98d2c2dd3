//! The upload pipeline.
//!
//! ```text
//! client stream -> [fill chunk] -> [SHA-1 of file] -> [id, encrypt, tag, replicate] x3
//!   async task       budget-paid     one blocking thread   blocking pool + owners
//! ```
//!
//! Stages are joined by channels of capacity one, so at most a few chunks of
//! one upload are in memory at once, each paid for from the node's buffer
//! budget. The object record is committed only after every chunk is durable
//! on W nodes, and the upload is acknowledged only once the record is durable
//! on W nodes too; any failure or cancellation before the commit leaves no
//! object (its chunks become garbage for the collector).
//!
//! From its first chunk to its commit an upload holds a lease on every node
//! that holds its chunks (`cluster::lease`), renewed on a timer, so no
//! collector anywhere takes them however long the client pauses.

use std::collections::HashMap;

use bytes::Bytes;
use sha1::{Digest, Sha1};
use tokio::{sync::mpsc, task::JoinSet};
use tokio_stream::{Stream, StreamExt};

use super::{Node, NodeError, now_ms, parse_sha1, validate_key};
use crate::{
    budget::{CallBudget, UPLOAD_BUFFERS},
    cluster::{ClusterError, Copies, UploadLease},
    crypto::{ChunkId, HEADER_LEN},
    proto::ObjectRecord,
};

/// Chunks one upload seals and writes at once. The whole-file SHA-1 must run
/// in order on one thread; sealing does not, so three in flight spread it
/// over the cores and overlap one chunk's fsync with the next one's work.
const WRITE_PARALLELISM: usize = 3;

/// What the client says about the object before its data.
#[derive(Debug, Clone, Default)]
pub struct UploadMeta {
    pub key: String,
    pub content_type: String,
    /// Lowercase hex SHA-1 the data must have; empty for none.
    pub expected_sha1: String,
    pub metadata: HashMap<String, String>,
}

/// A chunk buffer: `HEADER_LEN` bytes of headroom then plaintext, and the budget
/// it holds until it is dropped.
struct ChunkBuf {
    data: Vec<u8>,
    permit: crate::budget::BudgetPermit,
}

/// The chunks an upload has written, in file order, and which of the
/// lease's holders took each one.
#[derive(Default)]
struct Written {
    ids: Vec<ChunkId>,
    copies: Vec<Copies>,
}

impl Node {
    /// Stores the data of `stream` under `meta.key`. Returns the committed
    /// record once every chunk is durable and the record is in the index.
    pub async fn upload<S>(&self, meta: UploadMeta, stream: S) -> Result<ObjectRecord, NodeError>
    where
        S: Stream<Item = Result<Bytes, NodeError>> + Unpin,
    {
        validate_key(&meta.key)?;
        crate::index::check_description(&meta.content_type, &meta.metadata)
            .map_err(|e| NodeError::InvalidArgument(e.to_string()))?;
        let expected = match meta.expected_sha1.as_str() {
            "" => None,
            hex => Some(parse_sha1(hex)?),
        };
        // Refused before anything is stored: an upload that cannot be
        // committed must not leave chunks behind on a partial cluster.
        self.cluster.writable().map_err(NodeError::Unavailable)?;
        let lease = self.cluster.lease_upload();
        let (fill_tx, fill_rx) = mpsc::channel::<ChunkBuf>(1);
        let (hashed_tx, hashed_rx) = mpsc::channel::<ChunkBuf>(1);
        let hasher = tokio::task::spawn_blocking(move || hash_file(fill_rx, hashed_tx));
        // Everything this upload holds at once is capped, however its
        // stages are arranged (see `crate::budget`).
        let call = self
            .budget
            .call(UPLOAD_BUFFERS, HEADER_LEN + self.cfg.chunk_size);
        let (received, written) = tokio::join!(
            self.fill_chunks(&call, stream, fill_tx),
            self.write_chunks(hashed_rx, &lease)
        );
        let sha1 = hasher
            .await
            .map_err(|e| NodeError::Internal(format!("hasher stopped: {e}")))?;
        // A writer error is the cause of a receiver's "pipeline closed", so it
        // is reported first.
        let mut written = written?;
        let size = received?;
        if let Some(expected) = expected
            && expected != sha1
        {
            return Err(NodeError::DataLoss(format!(
                "data has sha1 {}, not the expected {}; nothing was stored",
                hex::encode(sha1),
                hex::encode(expected)
            )));
        }
        // Every chunk must still be on W good copies before the record
        // makes it part of an object.
        self.cluster
            .confirm_copies(&lease, &written.ids, &mut written.copies)
            .await
            .map_err(|e| match e {
                // Nothing acknowledged is lost: this upload is not stored.
                ClusterError::ChunkUnavailable { .. } => NodeError::Unavailable(format!(
                    "{e}; the upload lost chunks while it ran and is not stored: send it again"
                )),
                other => other.into(),
            })?;
        let record = ObjectRecord {
            key: meta.key,
            size,
            sha1: Bytes::copy_from_slice(&sha1),
            chunk_size: self.cfg.chunk_size as u32,
            chunk_ids: written
                .ids
                .iter()
                .flat_map(|id| id.0)
                .collect::<Vec<u8>>()
                .into(),
            content_type: meta.content_type,
            metadata: meta.metadata,
            created_unix_ms: now_ms(),
            version: Some(self.index.next_version(&self.id)),
            deleted: false,
            ..Default::default()
        };
        self.cluster.commit_record(record.clone()).await?;
        // A gateway frozen between the check and the commit may have let the
        // lease lapse: now that the record protects the chunks, check again
        // (free unless a renewal is overdue or a holder became a suspect).
        self.cluster
            .confirm_copies(&lease, &written.ids, &mut written.copies)
            .await?;
        Ok(record)
    }

    /// Cuts the incoming stream into chunk buffers. Returns the total size.
    async fn fill_chunks<S>(
        &self,
        call: &CallBudget,
        mut stream: S,
        out: mpsc::Sender<ChunkBuf>,
    ) -> Result<u64, NodeError>
    where
        S: Stream<Item = Result<Bytes, NodeError>> + Unpin,
    {
        let chunk_size = self.cfg.chunk_size;
        let mut total: u64 = 0;
        // A chunk buffer starts small unless the data in hand is already
        // larger: a 4 KiB object, or an upload that stalls one byte into a
        // chunk, holds a small request's worth of budget (never queued
        // behind large ones), not a whole chunk.
        let small = (call.node().small_limit() - HEADER_LEN).min(chunk_size);
        let mut buf: Option<ChunkBuf> = None;
        loop {
            let piece = tokio::select! {
                biased;
                _ = out.closed() => return Err(NodeError::Internal("upload pipeline stopped".into())),
                piece = stream.next() => piece,
            };
            let Some(piece) = piece else { break };
            let mut piece = piece?;
            total += piece.len() as u64;
            crate::metrics::uploaded(piece.len() as u64);
            while !piece.is_empty() {
                let chunk = match buf.as_mut() {
                    Some(c) => c,
                    None => {
                        let capacity = if piece.len() > small {
                            chunk_size
                        } else {
                            small
                        };
                        buf.insert(self.new_chunk_buf(call, capacity).await?)
                    }
                };
                let room = chunk_size - (chunk.data.len() - HEADER_LEN);
                let take = room.min(piece.len());
                self.grow(call, chunk, take).await?;
                chunk.data.extend_from_slice(&piece.split_to(take));
                if chunk.data.len() - HEADER_LEN == chunk_size {
                    let full = buf.take().expect("buffer was just filled");
                    if out.send(full).await.is_err() {
                        return Err(NodeError::Internal("upload pipeline stopped".into()));
                    }
                }
            }
        }
        if let Some(last) = buf.take()
            && last.data.len() > HEADER_LEN
            && out.send(last).await.is_err()
        {
            return Err(NodeError::Internal("upload pipeline stopped".into()));
        }
        Ok(total)
    }

    async fn new_chunk_buf(
        &self,
        call: &CallBudget,
        capacity: usize,
    ) -> Result<ChunkBuf, NodeError> {
        let permit = call.acquire(HEADER_LEN + capacity).await?;
        let mut data = call.take_buffer(HEADER_LEN + capacity);
        data.resize(HEADER_LEN, 0);
        Ok(ChunkBuf { data, permit })
    }

    /// Makes room for `extra` more bytes, paying the call's budget for the growth.
    async fn grow(
        &self,
        call: &CallBudget,
        chunk: &mut ChunkBuf,
        extra: usize,
    ) -> Result<(), NodeError> {
        let needed = chunk.data.len() + extra;
        if needed <= chunk.data.capacity() {
            return Ok(());
        }
        // From the small buffer straight to a whole chunk, paid anew, the
        // small one's budget given back: a buffer growing by steps would
        // hold part of the budget while waiting for more (enough uploads
        // doing that at once wait on each other), and a whole chunk must not
        // keep the reserve that small requests need.
        let whole = HEADER_LEN + self.cfg.chunk_size;
        let permit = call.acquire(whole).await?;
        let mut data = call.take_buffer(whole);
        data.extend_from_slice(&chunk.data);
        *chunk = ChunkBuf { data, permit };
        Ok(())
    }

    /// Seals and writes chunks, `WRITE_PARALLELISM` at a time (sealing is
    /// independent per chunk, so it spreads over cores). Every copy is
    /// written under the upload's lease. Returns the ids in file order with
    /// the holders of each.
    async fn write_chunks(
        &self,
        mut hashed: mpsc::Receiver<ChunkBuf>,
        lease: &std::sync::Arc<UploadLease>,
    ) -> Result<Written, NodeError> {
        let mut writes = JoinSet::new();
        let mut slots: Vec<Option<(ChunkId, Copies)>> = Vec::new();
        let record = |done, slots: &mut Vec<Option<(ChunkId, Copies)>>| {
            if let Some((index, id, holders)) = join_write(done)? {
                slots[index] = Some((id, lease.copies(&holders)));
            }
            Ok::<(), NodeError>(())
        };
        while let Some(mut chunk) = hashed.recv().await {
            while writes.len() >= WRITE_PARALLELISM {
                record(writes.join_next().await, &mut slots)?;
            }
            let index = slots.len();
            slots.push(None);
            let (keys, cluster, budget, lease) = (
                self.keys.clone(),
                self.cluster.clone(),
                self.budget.clone(),
                lease.clone(),
            );
            writes.spawn(async move {
                let (id, chunk) = tokio::task::spawn_blocking(move || {
                    let id = keys.seal_in_place(&mut chunk.data);
                    (id, chunk)
                })
                .await
                .map_err(|e| ClusterError::Internal(format!("sealing stopped: {e}")))?;
                // The budget and the buffer stay held until every copy is written.
                let sealed = budget.lend(chunk.data, chunk.permit);
                let holders = cluster.replicate(id, sealed, Some(&lease)).await?;
                Ok((index, id, holders))
            });
        }
        while let Some(done) = writes.join_next().await {
            record(Some(done), &mut slots)?;
        }
        // Record order is file order, whatever order the writes finished in.
        let mut written = Written::default();
        for (id, copies) in slots
            .into_iter()
            .map(|s| s.expect("every chunk was written"))
        {
            written.ids.push(id);
            written.copies.push(copies);
        }
        Ok(written)
    }
}

type WriteResult = Result<(usize, ChunkId, Vec<String>), ClusterError>;

fn join_write(
    done: Option<Result<WriteResult, tokio::task::JoinError>>,
) -> Result<Option<(usize, ChunkId, Vec<String>)>, NodeError> {
    match done {
        None => Ok(None),
        Some(Ok(result)) => result.map(Some).map_err(NodeError::from),
        Some(Err(e)) => Err(NodeError::Internal(format!("chunk write stopped: {e}"))),
    }
}

/// The hashing stage, on a blocking thread: the whole-file SHA-1, which
/// must see the chunks in order. Returns it.
fn hash_file(mut input: mpsc::Receiver<ChunkBuf>, output: mpsc::Sender<ChunkBuf>) -> [u8; 20] {
    let mut file_sha1 = Sha1::new();
    while let Some(chunk) = input.blocking_recv() {
        file_sha1.update(&chunk.data[HEADER_LEN..]);
        if output.blocking_send(chunk).is_err() {
            break;
        }
    }
    file_sha1.finalize().into()
}
