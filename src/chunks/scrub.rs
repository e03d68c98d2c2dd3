//! The scrubber: re-reads and verifies every chunk on this node, slowly, so
//! that rot in data nobody reads is found while good copies still exist
//! elsewhere.
//!
//! One pass walks the store one shard directory at a time (memory does not
//! grow with the number of chunks) and is spread over `interval`: it reads
//! at the rate that finishes the pass in time, never faster than `rate`
//! bytes per second. A copy that fails verification is quarantined and
//! handed to the caller, which has repair restore a good copy.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::watch;

use super::{ChunkError, Chunks};
use crate::crypto::ChunkId;

/// How the scrubber paces itself.
#[derive(Debug, Clone, Copy)]
pub struct ScrubConfig {
    /// Target duration of one full pass.
    pub interval: Duration,
    /// Most bytes per second the scrubber reads.
    pub rate: u64,
}

/// What the scrubber has done, for `dfs status` and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScrubProgress {
    /// Full passes completed since the node started.
    pub passes: u64,
    /// Chunks verified in the current pass.
    pub checked_this_pass: u64,
    /// Chunks verified since the node started.
    pub checked_total: u64,
    /// Copies found bad since the node started (by the scrubber or by any
    /// other read).
    pub corrupt_found: u64,
    /// Unix ms when the last full pass ended; 0 if none has.
    pub last_pass_end_unix_ms: u64,
}

#[derive(Default)]
pub(super) struct ScrubState {
    passes: AtomicU64,
    checked_this_pass: AtomicU64,
    checked_total: AtomicU64,
    corrupt_found: AtomicU64,
    last_pass_end: AtomicU64,
}

impl ScrubState {
    pub(super) fn corrupt_found(&self) {
        self.corrupt_found.fetch_add(1, Ordering::Relaxed);
        crate::metrics::scrub_found_corrupt();
    }

    fn checked(&self) {
        self.checked_this_pass.fetch_add(1, Ordering::Relaxed);
        self.checked_total.fetch_add(1, Ordering::Relaxed);
        crate::metrics::scrub_checked();
    }

    fn pass_done(&self) {
        self.passes.fetch_add(1, Ordering::Relaxed);
        self.checked_this_pass.store(0, Ordering::Relaxed);
        self.last_pass_end
            .store(crate::units::unix_ms(), Ordering::Relaxed);
    }

    pub(super) fn progress(&self) -> ScrubProgress {
        ScrubProgress {
            passes: self.passes.load(Ordering::Relaxed),
            checked_this_pass: self.checked_this_pass.load(Ordering::Relaxed),
            checked_total: self.checked_total.load(Ordering::Relaxed),
            corrupt_found: self.corrupt_found.load(Ordering::Relaxed),
            last_pass_end_unix_ms: self.last_pass_end.load(Ordering::Relaxed),
        }
    }
}

/// Runs scrub passes until `shutdown` turns true. `on_bad` is told of every
/// chunk the scrubber quarantined.
pub async fn run(
    chunks: Arc<Chunks>,
    cfg: ScrubConfig,
    on_bad: impl Fn(ChunkId) + Send + Sync + 'static,
    mut shutdown: watch::Receiver<bool>,
) {
    let on_bad = Arc::new(on_bad);
    loop {
        let started = Instant::now();
        if !pass(&chunks, cfg, on_bad.clone(), &mut shutdown).await {
            return;
        }
        chunks.scrub.pass_done();
        // A small store finishes early: the next pass starts one interval
        // after this one did.
        let rest = cfg.interval.saturating_sub(started.elapsed());
        if !sleep_or_stop(rest.max(Duration::from_secs(1)), &mut shutdown).await {
            return;
        }
    }
}

/// One pass; false when shutdown interrupted it.
async fn pass(
    chunks: &Arc<Chunks>,
    cfg: ScrubConfig,
    on_bad: Arc<dyn Fn(ChunkId) + Send + Sync>,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let (_, total_bytes) = chunks.store.usage();
    // The rate that spreads this pass over the interval, within the cap.
    let needed = total_bytes as f64 / cfg.interval.as_secs_f64().max(1.0);
    let rate = needed.clamp(64.0 * 1024.0, cfg.rate.max(1) as f64);
    let pacer = Mutex::new(Instant::now());
    let c = chunks.clone();
    let shards = match tokio::task::spawn_blocking(move || c.store.shard_dirs()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "scrub cannot list the store");
            return sleep_or_stop(Duration::from_secs(60), shutdown).await;
        }
        Err(_) => return false,
    };
    for shard in shards {
        let c = chunks.clone();
        let listed = tokio::task::spawn_blocking(move || c.store.list_shard(&shard)).await;
        let Ok(Ok(listed)) = listed else { continue };
        for (id, len, _) in listed {
            let wait = {
                let mut next = pacer.lock().unwrap_or_else(|p| p.into_inner());
                let start = (*next).max(Instant::now());
                *next = start + Duration::from_secs_f64(len as f64 / rate);
                start.saturating_duration_since(Instant::now())
            };
            if !sleep_or_stop(wait, shutdown).await {
                return false;
            }
            let c = chunks.clone();
            let result = tokio::task::spawn_blocking(move || c.read_verified(&id)).await;
            match result {
                Ok(Ok(_)) => chunks.scrub.checked(),
                Ok(Err(ChunkError::Corrupt { .. })) => {
                    chunks.scrub.checked();
                    on_bad(id);
                }
                // Deleted meanwhile (collected, or dropped by repair).
                Ok(Err(ChunkError::NotFound(_))) => {}
                Ok(Err(e)) => tracing::warn!(chunk = %id, error = %e, "scrub cannot read a chunk"),
                Err(_) => return false,
            }
        }
    }
    true
}

async fn sleep_or_stop(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    if *shutdown.borrow() {
        return false;
    }
    if d.is_zero() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => !*shutdown.borrow(),
        _ = shutdown.changed() => false,
    }
}
