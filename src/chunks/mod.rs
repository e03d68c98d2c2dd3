//! The one owner of chunk bytes on a node: it alone stores, reads,
//! verifies, quarantines, scrubs and collects them.
//!
//! Everything above it (the upload and download pipelines, the peer
//! handler, repair) asks this module for a *verified* thing: a stored copy
//! counts only if it is known good (a dedup hit re-reads and checks the
//! existing file), a read returns only bytes whose id matches, and a copy
//! that fails is moved to quarantine, counted and logged in one place, with
//! one policy, whoever found it.
//!
//! It knows nothing of object records or peers: the collector asks its
//! caller whether a chunk is referenced, and the scrubber reports what it
//! quarantined so that the caller can have it repaired.

pub mod lease;
mod scrub;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use crate::{
    crypto::{ChunkId, CryptoError, Keys},
    metrics::BadCopy,
    store::{ChunkStore, PutOutcome, StoreError},
};

pub use lease::{LeaseId, Leases};
pub use scrub::{ScrubConfig, ScrubProgress, run as run_scrubber};

/// Why a chunk operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// No copy of the chunk is stored here.
    #[error("chunk {0} is not stored on this node")]
    NotFound(ChunkId),
    /// The copy here (or the one offered) does not match its id.
    #[error("chunk {id} failed verification: {reason}")]
    Corrupt { id: ChunkId, reason: String },
    /// No room to store it.
    #[error("no space left for chunk data ({0})")]
    DiskFull(String),
    /// The disk failed otherwise.
    #[error("{0}")]
    Io(String),
}

impl From<StoreError> for ChunkError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(id) => Self::NotFound(id),
            StoreError::Corrupt { id, reason } => Self::Corrupt { id, reason },
            StoreError::DiskFull(m) => Self::DiskFull(m),
            other @ StoreError::Io { .. } => Self::Io(other.to_string()),
        }
    }
}

/// What one collection pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GcReport {
    pub scanned: u64,
    pub deleted: u64,
    pub bytes_freed: u64,
    /// Whether the pass ran at all (not during the start-up quiet period).
    pub ran: bool,
}

/// A node's chunks: its store, the keys that verify them, the leases of
/// uploads in progress and the scrubber's progress.
pub struct Chunks {
    store: Arc<ChunkStore>,
    keys: Keys,
    /// Largest sealed chunk this node accepts or reads.
    max_sealed: usize,
    leases: Leases,
    scrub: scrub::ScrubState,
}

impl Chunks {
    /// Wraps `store`; chunks are verified with `keys`, leases last `lease_ttl`.
    pub fn new(store: Arc<ChunkStore>, keys: Keys, max_sealed: usize, lease_ttl: Duration) -> Self {
        Self {
            store,
            keys,
            max_sealed,
            leases: Leases::new(lease_ttl),
            scrub: scrub::ScrubState::default(),
        }
    }

    /// The chunk store underneath (for usage figures and listings).
    pub fn store(&self) -> &ChunkStore {
        &self.store
    }

    /// The leases of uploads in progress.
    pub fn leases(&self) -> &Leases {
        &self.leases
    }

    /// Largest sealed chunk accepted.
    pub fn max_sealed(&self) -> usize {
        self.max_sealed
    }

    /// Stores a chunk this node sealed itself. An existing copy counts as
    /// stored only if it verifies; a bad one is quarantined and replaced.
    /// Blocking.
    pub fn put_sealed(&self, id: &ChunkId, sealed: &[u8]) -> Result<PutOutcome, ChunkError> {
        let keys = &self.keys;
        let is_good = |existing: &[u8]| match keys.verify_sealed(existing, id) {
            Ok(()) => true,
            Err(_) => {
                crate::metrics::verification_failed(BadCopy::Local);
                false
            }
        };
        Ok(self.store.put(id, sealed, &is_good)?)
    }

    /// Stores a chunk that came from elsewhere (a peer): it is verified
    /// before it can become durable, so a bad copy never counts as a replica.
    /// Blocking.
    pub fn put_received(&self, id: &ChunkId, sealed: &[u8]) -> Result<PutOutcome, ChunkError> {
        if sealed.len() > self.max_sealed {
            crate::metrics::verification_failed(BadCopy::Incoming);
            return Err(ChunkError::Corrupt {
                id: *id,
                reason: format!("{} bytes, more than the largest chunk", sealed.len()),
            });
        }
        self.keys.verify_sealed(sealed, id).map_err(|e| {
            crate::metrics::verification_failed(BadCopy::Incoming);
            ChunkError::Corrupt {
                id: *id,
                reason: e.to_string(),
            }
        })?;
        self.put_sealed(id, sealed)
    }

    /// The sealed bytes of a local chunk, verified. A copy that fails is
    /// quarantined. Blocking.
    pub fn read_verified(&self, id: &ChunkId) -> Result<Vec<u8>, ChunkError> {
        let sealed = self
            .store
            .read(id, self.max_sealed)
            .map_err(|e| self.failed(id, e))?;
        if let Err(e) = self.keys.verify_sealed(&sealed, id) {
            return Err(self.failed(id, corrupt(id, e)));
        }
        Ok(sealed)
    }

    /// Reads a local chunk into `buf` and decrypts it in place. On success
    /// returns where the plaintext starts in `buf` (the file is read to an
    /// aligned offset, and the header before the plaintext differs by
    /// format); it is verified against `id`. A copy that fails is
    /// quarantined. `max_len` bounds the file read (the record's chunk size
    /// plus the header); `buf` needs `store::READ_SLACK` bytes of capacity
    /// beyond it. Blocking.
    pub fn open_local(
        &self,
        id: &ChunkId,
        max_len: usize,
        buf: &mut Vec<u8>,
    ) -> Result<usize, ChunkError> {
        let max_len = max_len.min(self.max_sealed);
        let start = self
            .store
            .read_into(id, max_len, buf)
            .map_err(|e| self.failed(id, e))?;
        match self.keys.open_in_place(&mut buf[start..], id) {
            Ok(offset) => Ok(start + offset),
            Err(e) => Err(self.failed(id, corrupt(id, e))),
        }
    }

    /// Checks sealed bytes that arrived from a peer against their id and
    /// decrypts them into a pooled buffer. Returns the buffer and where its
    /// plaintext starts.
    pub fn open_fetched(
        &self,
        id: &ChunkId,
        sealed: &[u8],
    ) -> Result<(Vec<u8>, usize), CryptoError> {
        let mut buf = crate::bufpool::take(sealed.len());
        buf.extend_from_slice(sealed);
        let offset = self.keys.open_in_place(&mut buf, id)?;
        Ok((buf, offset))
    }

    /// Verifies sealed bytes that arrived from a peer, without keeping the
    /// plaintext.
    pub fn verify_fetched(&self, id: &ChunkId, sealed: &[u8]) -> Result<(), CryptoError> {
        self.keys.verify_sealed(sealed, id)
    }

    /// Whether a copy is held here; with `verify`, only a copy that reads
    /// back good counts (a bad one is quarantined). Blocking.
    pub fn holds(&self, id: &ChunkId, verify: bool) -> bool {
        if !verify {
            return self.store.contains(id);
        }
        self.read_verified(id).is_ok()
    }

    /// Reports a chunk that could not be served: a corrupt copy is moved
    /// aside for inspection (never deleted), counted and logged.
    fn failed(&self, id: &ChunkId, e: StoreError) -> ChunkError {
        if let StoreError::Corrupt { reason, .. } = &e {
            crate::metrics::verification_failed(BadCopy::Local);
            self.scrub.corrupt_found();
            match self.store.quarantine(id) {
                Ok(path) => {
                    tracing::error!(chunk = %id, reason = %reason, moved_to = %path.display(),
                    "chunk failed verification; moved to quarantine")
                }
                Err(qe) => tracing::error!(chunk = %id, reason = %reason, error = %qe,
                    "chunk failed verification and could not be moved aside"),
            }
        }
        ChunkError::from(e)
    }

    /// Deletes chunks nothing references: unreferenced (`is_referenced`
    /// says no), untouched for longer than `grace`, and not written since an
    /// upload that still holds a lease began. Nothing runs until the
    /// start-up quiet period is over. Blocking.
    pub fn collect_garbage<E>(
        &self,
        grace: Duration,
        mut is_referenced: impl FnMut(&ChunkId) -> Result<bool, E>,
    ) -> Result<GcReport, E> {
        let mut report = GcReport::default();
        if !self.leases.collection_allowed() {
            return Ok(report);
        }
        report.ran = true;
        let base = SystemTime::now()
            .checked_sub(grace)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        // A first filter; each deletion checks the leases again (below).
        let mut cutoff = base;
        if let Some(since) = self.leases.protected_since() {
            cutoff = cutoff.min(since);
        }
        let mut first_error = None;
        let walked = self.store.for_each_chunk(|id, len, mtime| {
            report.scanned += 1;
            if mtime >= cutoff {
                return;
            }
            match is_referenced(&id) {
                Ok(false) => {}
                Ok(true) => return,
                Err(e) => {
                    first_error.get_or_insert(e);
                    return;
                }
            }
            match self.leases.with_cutoff(base, |now_cutoff| {
                self.store.remove_if_older(&id, now_cutoff)
            }) {
                Ok(true) => {
                    report.deleted += 1;
                    report.bytes_freed += len;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(chunk = %id, error = %e, "cannot delete an unreferenced chunk")
                }
            }
        });
        if let Err(e) = walked {
            tracing::warn!(error = %e, "garbage collection could not list the store");
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    /// The scrubber's progress, for status and metrics.
    pub fn scrub_progress(&self) -> ScrubProgress {
        self.scrub.progress()
    }
}

fn corrupt(id: &ChunkId, e: CryptoError) -> StoreError {
    StoreError::Corrupt {
        id: *id,
        reason: e.to_string(),
    }
}
