//! The upload pipeline.
//!
//! ```text
//! client stream -> [fill chunk] -> [SHA-1 file, HMAC id, encrypt] -> [write + fsync] x2
//!   async task       budget-paid       one blocking thread            blocking pool
//! ```
//!
//! Stages are joined by channels of capacity one, so at most a few chunks of
//! one upload are in memory at once, each paid for from the node's buffer
//! budget. The object record is committed only after every chunk is durable;
//! any failure or cancellation before that leaves no object (its chunks
//! become garbage for the collector).

use std::collections::HashMap;

use bytes::Bytes;
use sha1::{Digest, Sha1};
use tokio::{sync::mpsc, task::JoinSet};
use tokio_stream::{Stream, StreamExt};

use super::{Node, NodeError, Pins, now_ms, parse_sha1, validate_key};
use crate::{crypto::ChunkId, crypto::IV_LEN, proto::ObjectRecord};

/// Chunk writes (write + fsync) one upload keeps in flight. Two overlap one
/// chunk's fsync with the next chunk's write; more buys nothing on one disk.
const WRITE_PARALLELISM: usize = 2;
/// First allocation for a chunk buffer of an upload whose size is not yet
/// known, so a 4 KiB object does not take a whole chunk of budget.
const FIRST_BUFFER: usize = 256 << 10;

/// What the client says about the object before its data.
#[derive(Debug, Clone, Default)]
pub struct UploadMeta {
    pub key: String,
    pub content_type: String,
    /// Lowercase hex SHA-1 the data must have; empty for none.
    pub expected_sha1: String,
    pub metadata: HashMap<String, String>,
}

/// A chunk buffer: `IV_LEN` bytes of headroom then plaintext, and the budget
/// it holds until it is dropped.
struct ChunkBuf {
    data: Vec<u8>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// Unpins an upload's chunks when the upload ends, however it ends.
struct PinGuard<'a> {
    pins: &'a Pins,
    ids: Vec<ChunkId>,
}

impl Drop for PinGuard<'_> {
    fn drop(&mut self) {
        self.pins.unpin(&self.ids);
    }
}

impl Node {
    /// Stores the data of `stream` under `meta.key`. Returns the committed
    /// record once every chunk is durable and the record is in the index.
    pub async fn upload<S>(&self, meta: UploadMeta, stream: S) -> Result<ObjectRecord, NodeError>
    where
        S: Stream<Item = Result<Bytes, NodeError>> + Unpin,
    {
        validate_key(&meta.key)?;
        let expected = match meta.expected_sha1.as_str() {
            "" => None,
            hex => Some(parse_sha1(hex)?),
        };
        let (fill_tx, fill_rx) = mpsc::channel::<ChunkBuf>(1);
        let (sealed_tx, sealed_rx) = mpsc::channel::<(ChunkId, ChunkBuf)>(1);
        let keys = self.keys.clone();
        let sealer = tokio::task::spawn_blocking(move || seal_chunks(&keys, fill_rx, sealed_tx));
        let mut pins = PinGuard {
            pins: &self.pins,
            ids: Vec::new(),
        };
        let (received, written) = tokio::join!(
            self.fill_chunks(stream, fill_tx),
            self.write_chunks(sealed_rx, &mut pins)
        );
        let sha1 = sealer
            .await
            .map_err(|e| NodeError::Internal(format!("sealer stopped: {e}")))?;
        // A writer error is the cause of a receiver's "pipeline closed", so it
        // is reported first.
        written?;
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
        let record = ObjectRecord {
            key: meta.key,
            size,
            sha1: Bytes::copy_from_slice(&sha1),
            chunk_size: self.cfg.chunk_size as u32,
            chunk_ids: pins
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
        };
        let index = self.index.clone();
        let committed = record.clone();
        tokio::task::spawn_blocking(move || index.apply(&committed))
            .await
            .map_err(|e| NodeError::Internal(format!("index commit stopped: {e}")))??;
        self.cluster.publish(&record).await;
        Ok(record)
    }

    /// Cuts the incoming stream into chunk buffers. Returns the total size.
    async fn fill_chunks<S>(
        &self,
        mut stream: S,
        out: mpsc::Sender<ChunkBuf>,
    ) -> Result<u64, NodeError>
    where
        S: Stream<Item = Result<Bytes, NodeError>> + Unpin,
    {
        let chunk_size = self.cfg.chunk_size;
        let mut total: u64 = 0;
        let mut next_capacity = FIRST_BUFFER.min(chunk_size);
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
                    None => buf.insert(self.new_chunk_buf(next_capacity).await),
                };
                let room = chunk_size - (chunk.data.len() - IV_LEN);
                let take = room.min(piece.len());
                self.grow(chunk, take).await;
                chunk.data.extend_from_slice(&piece.split_to(take));
                if chunk.data.len() - IV_LEN == chunk_size {
                    let full = buf.take().expect("buffer was just filled");
                    // Later chunks of a large upload are allocated whole at once.
                    next_capacity = chunk_size;
                    if out.send(full).await.is_err() {
                        return Err(NodeError::Internal("upload pipeline stopped".into()));
                    }
                }
            }
        }
        if let Some(last) = buf.take()
            && last.data.len() > IV_LEN
            && out.send(last).await.is_err()
        {
            return Err(NodeError::Internal("upload pipeline stopped".into()));
        }
        Ok(total)
    }

    async fn new_chunk_buf(&self, capacity: usize) -> ChunkBuf {
        let permit = self.budget.acquire(IV_LEN + capacity).await;
        let mut data = self.budget.take_buffer(IV_LEN + capacity);
        data.resize(IV_LEN, 0);
        ChunkBuf {
            data,
            _permit: permit,
        }
    }

    /// Makes room for `extra` more bytes, paying the budget for the growth.
    async fn grow(&self, chunk: &mut ChunkBuf, extra: usize) {
        let needed = chunk.data.len() + extra;
        if needed <= chunk.data.capacity() {
            return;
        }
        let target = (chunk.data.capacity() * 2)
            .max(needed)
            .min(IV_LEN + self.cfg.chunk_size);
        let more = self.budget.acquire(target - chunk.data.capacity()).await;
        chunk._permit.merge(more);
        chunk.data.reserve_exact(target - chunk.data.len());
    }

    /// Writes sealed chunks with bounded parallelism, pinning each id so the
    /// collector leaves it alone until the upload ends.
    async fn write_chunks(
        &self,
        mut sealed: mpsc::Receiver<(ChunkId, ChunkBuf)>,
        pins: &mut PinGuard<'_>,
    ) -> Result<(), NodeError> {
        let mut writes = JoinSet::new();
        while let Some((id, chunk)) = sealed.recv().await {
            self.pins.pin(id);
            pins.ids.push(id);
            while writes.len() >= WRITE_PARALLELISM {
                join_write(writes.join_next().await)?;
            }
            let cluster = self.cluster.clone();
            // The budget and the buffer stay held until every copy is written.
            let sealed = self.budget.lend(chunk.data, chunk._permit);
            writes.spawn(async move { cluster.replicate(id, sealed).await.map(|_| ()) });
        }
        while let Some(done) = writes.join_next().await {
            join_write(Some(done))?;
        }
        Ok(())
    }
}

fn join_write(
    done: Option<Result<Result<(), crate::cluster::ClusterError>, tokio::task::JoinError>>,
) -> Result<(), NodeError> {
    match done {
        None => Ok(()),
        Some(Ok(result)) => result.map_err(NodeError::from),
        Some(Err(e)) => Err(NodeError::Internal(format!("chunk write stopped: {e}"))),
    }
}

/// The sealing stage, on a blocking thread: whole-file SHA-1 in order, then
/// each chunk's id and encryption in place. Returns the file's SHA-1.
fn seal_chunks(
    keys: &crate::crypto::Keys,
    mut input: mpsc::Receiver<ChunkBuf>,
    output: mpsc::Sender<(ChunkId, ChunkBuf)>,
) -> [u8; 20] {
    let mut file_sha1 = Sha1::new();
    while let Some(mut chunk) = input.blocking_recv() {
        file_sha1.update(&chunk.data[IV_LEN..]);
        let id = keys.seal_in_place(&mut chunk.data);
        if output.blocking_send((id, chunk)).is_err() {
            break;
        }
    }
    file_sha1.finalize().into()
}
