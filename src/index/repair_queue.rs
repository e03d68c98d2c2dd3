//! The persistent queue of chunks whose repair failed, retried with back-off.

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};

use super::{Index, IndexError, REPAIR_QUEUE};
use crate::crypto::ChunkId;

impl Index {
    /// Puts a chunk on the persistent repair queue, to be retried at
    /// `next_try_ms`; returns the number of attempts so far.
    pub fn queue_repair(
        &self,
        id: &ChunkId,
        backoff: impl Fn(u32) -> u64,
    ) -> Result<u32, IndexError> {
        let txn = self.db.begin_write()?;
        let attempts;
        {
            let mut queue = txn.open_table(REPAIR_QUEUE)?;
            let prev = queue
                .get(id.0.as_slice())?
                .map(|v| v.value().0)
                .unwrap_or(0);
            attempts = prev + 1;
            queue.insert(id.0.as_slice(), (attempts, backoff(attempts)))?;
        }
        txn.commit()?;
        Ok(attempts)
    }

    /// Chunks on the repair queue whose next try is due, at most `limit`.
    pub fn due_repairs(&self, now_ms: u64, limit: usize) -> Result<Vec<ChunkId>, IndexError> {
        let txn = self.db.begin_read()?;
        let queue = txn.open_table(REPAIR_QUEUE)?;
        let mut out = Vec::new();
        for entry in queue.iter()? {
            let (k, v) = entry?;
            if v.value().1 <= now_ms
                && let Some(id) = ChunkId::from_slice(k.value())
            {
                out.push(id);
                if out.len() == limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Removes a chunk from the repair queue (repaired, or no longer needed).
    pub fn repair_done(&self, ids: &[ChunkId]) -> Result<(), IndexError> {
        let txn = self.db.begin_write()?;
        {
            let mut queue = txn.open_table(REPAIR_QUEUE)?;
            for id in ids {
                queue.remove(id.0.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Number of chunks waiting on the repair queue.
    pub fn repair_queue_len(&self) -> Result<u64, IndexError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(REPAIR_QUEUE)?.len()?)
    }
}
