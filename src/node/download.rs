//! The download pipeline.
//!
//! A producer task reads the chunks a range touches, a bounded window ahead
//! of the client, on blocking threads: read, decrypt, recompute the id. Only
//! a chunk that verifies is sliced into messages and queued; a chunk that
//! does not is moved to quarantine and the stream ends with `DATA_LOSS`.

use std::{collections::VecDeque, sync::Arc};

use bytes::Bytes;
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;

use super::{Node, NodeError, Target};
use crate::{
    budget::DOWNLOAD_BUFFERS,
    crypto::{ChunkId, HEADER_LEN},
    proto::ObjectRecord,
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

type ReadResult = Result<Bytes, NodeError>;

/// A read-ahead task that is cancelled when the download ends early (the
/// client went away, or an error ended the stream), so a cancelled download
/// stops its disk reads and peer fetches instead of finishing them unseen.
struct AbortOnDrop(JoinHandle<ReadResult>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Node {
    /// Starts streaming `target`'s bytes in `offset..offset+length` (length 0
    /// = to the end). Fails before any data if the object or range is bad.
    pub async fn download(
        self: &Arc<Self>,
        target: &Target,
        offset: u64,
        length: u64,
    ) -> Result<Download, NodeError> {
        let record = self.resolve(target).await?;
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
        self: Arc<Self>,
        record: ObjectRecord,
        range: ByteRange,
        tx: mpsc::Sender<Result<Bytes, NodeError>>,
    ) {
        let mut ids = super::chunk_ids::ChunkIdPages::new(self.index.clone(), record.clone());
        let max_len = record.chunk_size as usize + HEADER_LEN;
        let mut window: VecDeque<(ChunkId, usize, usize, AbortOnDrop)> = VecDeque::new();
        let mut span = chunk_span(record.chunk_size.max(1) as u64, range).peekable();
        // What this download holds at once is capped (see `crate::budget`).
        let call = self.budget.call(DOWNLOAD_BUFFERS, max_len);
        loop {
            while window.len() < READ_AHEAD {
                let Some(&(i, from, to)) = span.peek() else {
                    break;
                };
                let id = match ids.get(i as u64).await {
                    Ok(id) => id,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                // Paid at the chunk's own length: a small object's chunk is a
                // small request, never queued behind whole chunks. Reading
                // ahead takes only budget that is free now: waiting for it
                // while holding chunks read but not yet sent, downloads could
                // wait on each other for good. With none held, waiting is safe.
                let len = sealed_len(&record, i, max_len);
                let permit = if window.is_empty() {
                    match call.acquire(len).await {
                        Ok(permit) => permit,
                        Err(e) => {
                            let _ = tx.send(Err(e.into())).await;
                            return;
                        }
                    }
                } else {
                    match call.try_acquire(len) {
                        Some(permit) => permit,
                        None => break,
                    }
                };
                span.next();
                let node = self.clone();
                let read =
                    tokio::spawn(
                        async move { node.chunk_plaintext(id, max_len, to, permit).await },
                    );
                window.push_back((id, from, to, AbortOnDrop(read)));
            }
            let Some((_id, from, to, mut read)) = window.pop_front() else {
                return;
            };
            let plain = match (&mut read.0).await {
                Ok(Ok(plain)) => plain,
                Ok(Err(err)) => {
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
                let sent = message.len() as u64;
                if tx.send(Ok(message)).await.is_err() {
                    return; // the client went away
                }
                crate::metrics::downloaded(sent);
            }
        }
    }

    /// A chunk's plaintext, verified, holding at least `needed` bytes: from
    /// the local store, or, when the local copy is missing or bad, from a
    /// peer (and then also put back locally if this node owns the chunk).
    ///
    /// `permit` pays for the buffer; it is released when the last message
    /// cut from the chunk has been sent.
    async fn chunk_plaintext(
        &self,
        id: ChunkId,
        max_len: usize,
        needed: usize,
        permit: crate::budget::BudgetPermit,
    ) -> ReadResult {
        let chunks = self.chunks.clone();
        let mut buf = self.budget.take_buffer(max_len + crate::store::READ_SLACK);
        let local = tokio::task::spawn_blocking(move || {
            chunks
                .open_local(&id, max_len, &mut buf)
                .map(|offset| (buf, offset))
        })
        .await
        .map_err(|e| NodeError::Internal(format!("chunk read stopped: {e}")))?;
        let local_error = match local {
            Ok((opened, offset)) => {
                check_len(id, &opened[offset..], needed)?;
                return Ok(self.budget.lend(opened, permit).slice(offset..));
            }
            Err(e) => e,
        };
        // One decrypt serves both the verification and the reply.
        let chunks = self.chunks.clone();
        let opened = self
            .cluster
            .fetch_checked(id, move |sealed: Bytes| {
                let opened = chunks.open_fetched(&id, &sealed)?;
                Ok((sealed, opened))
            })
            .await;
        let (sealed, (opened, offset)) = match opened {
            Ok(pair) => pair,
            Err(remote) => {
                let text = format!("{local_error}; {remote}");
                return Err(match remote {
                    crate::cluster::ClusterError::ChunkUnavailable { unreached: 0, .. } => {
                        NodeError::DataLoss(text)
                    }
                    crate::cluster::ClusterError::ChunkUnavailable { .. } => {
                        NodeError::Unavailable(text)
                    }
                    other => other.into(),
                });
            }
        };
        check_len(id, &opened[offset..], needed)?;
        if self.cluster.owners(&id).iter().any(|o| o == &self.id) {
            // Restore the missing or bad local copy off the read path: the
            // client need not wait for a write and an fsync.
            let chunks = self.chunks.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = chunks.put_sealed(&id, &sealed) {
                    tracing::warn!(chunk = %id, error = %e, "cannot restore the local copy");
                }
            });
        }
        Ok(self.budget.lend(opened, permit).slice(offset..))
    }
}

/// The sealed length of chunk `i` of `record` (at most `max_len`): an upper
/// bound, as format 1 chunks have a shorter header.
fn sealed_len(record: &ObjectRecord, i: usize, max_len: usize) -> usize {
    let chunk = u64::from(record.chunk_size.max(1));
    let plain = record.size.saturating_sub(i as u64 * chunk).min(chunk);
    (plain as usize + HEADER_LEN).min(max_len)
}

/// Checks that an opened chunk's plaintext holds the `needed` bytes.
fn check_len(id: ChunkId, plain: &[u8], needed: usize) -> Result<(), NodeError> {
    let held = plain.len();
    if held < needed {
        return Err(NodeError::DataLoss(format!(
            "chunk {id} holds {held} bytes, the record needs {needed}"
        )));
    }
    Ok(())
}
