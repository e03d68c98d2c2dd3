//! Garbage collection of chunks that no live object references.
//!
//! A chunk is deleted only when all of these hold: no live record references
//! it, it was neither written nor re-used (a dedup hit refreshes its mtime)
//! for longer than the grace period, and no upload that still holds a lease
//! (on this node, for any gateway) began before it was last written. The
//! grace period covers index propagation delays; leases cover uploads whose
//! chunks exist before their record does, however long they pause.

use super::{GcReport, Node, NodeError};

impl Node {
    /// Runs one collection pass. Blocking: call from a blocking thread.
    pub fn collect_garbage(&self) -> Result<GcReport, NodeError> {
        let index = &self.index;
        self.chunks
            .collect_garbage(self.cfg.gc_grace, |id| index.chunk_refs(id).map(|n| n > 0))
            .map_err(NodeError::from)
    }
}
