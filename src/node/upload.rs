//! The upload pipeline.
//!
//! ```text
//! client stream -> [fill chunk] -> [SHA-1 of file] -> [HMAC id, encrypt, replicate] x3
//!   async task       budget-paid     one blocking thread   blocking pool + owners
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
use crate::{
    cluster::ClusterError,
    crypto::{ChunkId, IV_LEN},
    proto::ObjectRecord,
};

/// Chunks one upload seals and writes at once. The whole-file SHA-1 must run
/// in order on one thread; sealing does not, so three in flight spread it
/// over the cores and overlap one chunk's fsync with the next one's work.
const WRITE_PARALLELISM: usize = 3;
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
    permit: tokio::sync::OwnedSemaphorePermit,
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
        let (hashed_tx, hashed_rx) = mpsc::channel::<ChunkBuf>(1);
        let hasher = tokio::task::spawn_blocking(move || hash_file(fill_rx, hashed_tx));
        let mut pins = PinGuard {
            pins: &self.pins,
            ids: Vec::new(),
        };
        let (received, written) = tokio::join!(
            self.fill_chunks(stream, fill_tx),
            self.write_chunks(hashed_rx, &mut pins)
        );
        let sha1 = hasher
            .await
            .map_err(|e| NodeError::Internal(format!("hasher stopped: {e}")))?;
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
        ChunkBuf { data, permit }
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
        chunk.permit.merge(more);
        chunk.data.reserve_exact(target - chunk.data.len());
    }

    /// Seals and writes chunks, `WRITE_PARALLELISM` at a time (sealing is
    /// independent per chunk, so it spreads over cores), and pins each id
    /// before it is written so the collector leaves it alone until the
    /// upload ends.
    async fn write_chunks(
        &self,
        mut hashed: mpsc::Receiver<ChunkBuf>,
        pins: &mut PinGuard<'_>,
    ) -> Result<(), NodeError> {
        let mut writes = JoinSet::new();
        let mut ids: Vec<Option<ChunkId>> = Vec::new();
        let record = |done, ids: &mut Vec<Option<ChunkId>>, pins: &mut PinGuard<'_>| {
            if let Some((index, pin)) = join_write(done)? {
                let id = pin.hand_over();
                pins.ids.push(id);
                ids[index] = Some(id);
            }
            Ok::<(), NodeError>(())
        };
        // Written chunks have no record until the upload ends; peers keep
        // them only while they look young, so an upload longer than the GC
        // grace refreshes its remote copies every third of it.
        let refresh_every = self.cfg.gc_grace / 3;
        let mut refreshed = std::time::Instant::now();
        while let Some(mut chunk) = hashed.recv().await {
            while writes.len() >= WRITE_PARALLELISM {
                record(writes.join_next().await, &mut ids, pins)?;
            }
            if refreshed.elapsed() >= refresh_every {
                self.cluster.keep_alive(&pins.ids).await;
                refreshed = std::time::Instant::now();
            }
            let index = ids.len();
            ids.push(None);
            let (keys, cluster, budget, task_pins) = (
                self.keys.clone(),
                self.cluster.clone(),
                self.budget.clone(),
                self.pins.clone(),
            );
            writes.spawn(async move {
                let (id, chunk) = tokio::task::spawn_blocking(move || {
                    let id = keys.seal_in_place(&mut chunk.data);
                    (id, chunk)
                })
                .await
                .map_err(|e| ClusterError::Internal(format!("sealing stopped: {e}")))?;
                // Pinned before it is written: a paused upload may not
                // collect this result for longer than the GC grace.
                let pin = TaskPin::new(id, task_pins);
                // The budget and the buffer stay held until every copy is written.
                let sealed = budget.lend(chunk.data, chunk.permit);
                cluster.replicate(id, sealed).await.map(|_| (index, pin))
            });
        }
        while let Some(done) = writes.join_next().await {
            record(Some(done), &mut ids, pins)?;
        }
        if refreshed.elapsed() >= refresh_every {
            self.cluster.keep_alive(&pins.ids).await;
        }
        // Record order is file order, whatever order the writes finished in.
        pins.ids = ids
            .into_iter()
            .map(|id| id.expect("every chunk was written"))
            .collect();
        Ok(())
    }
}

/// A write task's pin on its chunk, taken before the chunk is written: an
/// upload joins its write tasks only when it needs room for more or at its
/// end, so a paused upload leaves finished writes uncollected, and their
/// chunks must not look like garbage meanwhile. Dropped (a failed write, an
/// abandoned upload), it unpins; handed over, the upload's [`PinGuard`]
/// owns the pin.
struct TaskPin {
    id: ChunkId,
    pins: Option<std::sync::Arc<Pins>>,
}

impl TaskPin {
    fn new(id: ChunkId, pins: std::sync::Arc<Pins>) -> Self {
        pins.pin(id);
        Self {
            id,
            pins: Some(pins),
        }
    }

    fn hand_over(mut self) -> ChunkId {
        self.pins = None;
        self.id
    }
}

impl Drop for TaskPin {
    fn drop(&mut self) {
        if let Some(pins) = &self.pins {
            pins.unpin(&[self.id]);
        }
    }
}

type WriteResult = Result<(usize, TaskPin), ClusterError>;

fn join_write(
    done: Option<Result<WriteResult, tokio::task::JoinError>>,
) -> Result<Option<(usize, TaskPin)>, NodeError> {
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
        file_sha1.update(&chunk.data[IV_LEN..]);
        if output.blocking_send(chunk).is_err() {
            break;
        }
    }
    file_sha1.finalize().into()
}
