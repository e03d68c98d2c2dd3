//! Garbage collection of chunks that no live object references.
//!
//! A chunk is deleted only when all of these hold: no live record references
//! it, no upload in progress has pinned it, and it was neither written nor
//! re-used (a dedup hit refreshes its mtime) for longer than the grace
//! period. The grace period covers index propagation delays and uploads
//! whose chunks exist before their record does.

use std::time::SystemTime;

use super::{Node, NodeError};

/// What one collection pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GcReport {
    pub scanned: u64,
    pub deleted: u64,
    pub bytes_freed: u64,
}

impl Node {
    /// Runs one collection pass. Blocking: call from a blocking thread.
    pub fn collect_garbage(&self) -> Result<GcReport, NodeError> {
        let cutoff = SystemTime::now()
            .checked_sub(self.cfg.gc_grace)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut report = GcReport::default();
        let mut first_error = None;
        self.store.for_each_chunk(|id, len, mtime| {
            report.scanned += 1;
            if mtime >= cutoff || self.pins.is_pinned(&id) {
                return;
            }
            let unused = match self.index.chunk_refs(&id) {
                Ok(n) => n == 0,
                Err(e) => {
                    first_error.get_or_insert(NodeError::from(e));
                    return;
                }
            };
            if !unused {
                return;
            }
            match self.store.remove_if_older(&id, cutoff) {
                Ok(true) => {
                    report.deleted += 1;
                    report.bytes_freed += len;
                }
                Ok(false) => {}
                Err(e) => {
                    first_error.get_or_insert(NodeError::from(e));
                }
            }
        })?;
        match first_error {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }
}
