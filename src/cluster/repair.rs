//! Repair: keep every referenced chunk on its R current owners.
//!
//! A pass runs every `repair_interval`, and soon after membership changes.
//! It walks this node's chunks in batches: for each chunk some live object
//! references, it asks the owners (one `HasChunks` per owner per batch)
//! and pushes the chunk to owners that lack it; a node that is not an owner
//! drops its copy once all R owners confirmed theirs. It then walks the
//! index's referenced chunks and pulls the ones this node owns but lacks.
//! Work that fails goes on a persistent queue (in the index database) with
//! exponential back-off. Transfers are paced to `repair_rate` bytes/s so
//! repair never starves client traffic.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use tokio::sync::{Notify, watch};

use super::{Cluster, sync::sleep_or_stop};
use crate::{crypto::ChunkId, index::Index};

/// Chunks examined per step; one HasChunks per owner per batch.
const BATCH: usize = 256;
/// First retry delay of a failed repair, doubled per attempt up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(600);

/// Repair progress shared with status reporting.
pub struct RepairState {
    kick: Notify,
    /// Chunks found needing work in the current pass and not yet done.
    pending: AtomicU64,
    /// When the next repair transfer may start (rate limiting).
    next_slot: std::sync::Mutex<tokio::time::Instant>,
}

impl Default for RepairState {
    fn default() -> Self {
        Self {
            kick: Notify::new(),
            pending: AtomicU64::new(0),
            next_slot: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }
}

impl RepairState {
    /// Asks for a pass soon (membership changed).
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    /// Chunks waiting for repair: the current pass's remainder plus the queue.
    pub fn backlog(&self, index: &Index) -> u64 {
        self.pending.load(Ordering::Relaxed) + index.repair_queue_len().unwrap_or(0)
    }
}

/// Transfers one pass made, counted from concurrent tasks.
#[derive(Default)]
struct Totals {
    pushed: AtomicU64,
    pulled: AtomicU64,
    dropped: AtomicU64,
}

impl Totals {
    fn get(&self) -> (u64, u64, u64) {
        (
            self.pushed.load(Ordering::Relaxed),
            self.pulled.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
        )
    }
}

/// Runs a blocking index or store call off the async worker threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("blocking task stopped: {e}"))
}

/// Chunks one node repairs at once: enough to overlap one transfer's disk
/// and network waits with another's, few enough to leave room for clients.
const CONCURRENT_REPAIRS: usize = 4;

/// What a chunk needs, decided from the owners' answers.
struct Plan {
    id: ChunkId,
    push_to: Vec<String>,
    drop_after: bool,
}

impl Cluster {
    pub(super) async fn repair_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = self.repair.kick.notified() => {
                    // Let a burst of membership changes settle into one pass.
                    if !sleep_or_stop(Duration::from_millis(200), &mut shutdown).await { return; }
                }
                keep = sleep_or_stop(self.cfg.repair_interval, &mut shutdown) => {
                    if !keep { return; }
                }
            }
            let started = Instant::now();
            match self.repair_pass().await {
                Ok((pushed, pulled, dropped)) if pushed + pulled + dropped > 0 => tracing::info!(
                    pushed, pulled, dropped, took = ?started.elapsed(), "repair pass moved copies"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "repair pass failed"),
            }
        }
    }

    /// One repair pass. Returns (copies pushed, chunks pulled, copies dropped).
    pub async fn repair_pass(&self) -> Result<(u64, u64, u64), String> {
        if self.pool().is_none() {
            return Ok((0, 0, 0));
        }
        let totals = Totals::default();
        // Retry what failed before, when due.
        let index = self.index.clone();
        let due = blocking(move || index.due_repairs(crate::units::unix_ms(), BATCH))
            .await?
            .map_err(|e| e.to_string())?;
        let mut done = Vec::new();
        for id in due {
            if self.repair_one(id, &totals).await {
                done.push(id);
            }
        }
        let index = self.index.clone();
        blocking(move || index.repair_done(&done))
            .await?
            .map_err(|e| e.to_string())?;

        // Push what this node holds to owners that lack it.
        let chunks = self.chunks.clone();
        let local = tokio::task::spawn_blocking(move || {
            let mut ids = Vec::new();
            chunks
                .store()
                .for_each_chunk(|id, _, _| ids.push(id))
                .map(|()| ids)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        for batch in local.chunks(BATCH) {
            let plans = self.plan_batch(batch).await;
            self.repair
                .pending
                .store(plans.len() as u64, Ordering::Relaxed);
            futures_util::stream::iter(plans)
                .for_each_concurrent(CONCURRENT_REPAIRS, |plan| {
                    let totals = &totals;
                    async move {
                        if !self.execute(&plan, totals).await {
                            self.enqueue(&plan.id).await;
                        }
                        self.repair.pending.fetch_sub(1, Ordering::Relaxed);
                    }
                })
                .await;
        }

        // Pull what this node owns but lacks.
        let mut after = None;
        loop {
            let index = self.index.clone();
            let ids = blocking(move || index.referenced_chunks(after.as_ref(), BATCH))
                .await?
                .map_err(|e| e.to_string())?;
            let Some(last) = ids.last().copied() else {
                break;
            };
            let mine: Vec<ChunkId> = ids
                .into_iter()
                .filter(|id| self.owners(id).contains(&self.node_id))
                .collect();
            let chunks = self.chunks.clone();
            let lacking = blocking(move || {
                mine.into_iter()
                    .filter(|id| !chunks.store().contains(id))
                    .collect::<Vec<_>>()
            })
            .await?;
            for id in lacking {
                if !self.pull(id, &totals).await {
                    self.enqueue(&id).await;
                }
            }
            after = Some(last);
        }
        self.repair.pending.store(0, Ordering::Relaxed);
        Ok(totals.get())
    }

    /// Repairs one chunk from the queue; true when nothing is left to do.
    async fn repair_one(&self, id: ChunkId, totals: &Totals) -> bool {
        let (index, chunks) = (self.index.clone(), self.chunks.clone());
        let Ok((refs, held)) = blocking(move || {
            (
                index.chunk_refs(&id).unwrap_or(0),
                chunks.store().contains(&id),
            )
        })
        .await
        else {
            return false;
        };
        if refs == 0 {
            return true; // nothing references it any more
        }
        if held {
            let mut ok = true;
            for plan in self.plan_batch(&[id]).await {
                ok &= self.execute(&plan, totals).await;
            }
            return ok;
        }
        if self.owners(&id).contains(&self.node_id) {
            return self.pull(id, totals).await;
        }
        true
    }

    /// Asks each owner which of `batch` it holds; returns the chunks that need
    /// a push or a drop.
    async fn plan_batch(&self, batch: &[ChunkId]) -> Vec<Plan> {
        let r = self.replicas();
        let mut by_owner: HashMap<String, Vec<ChunkId>> = HashMap::new();
        let mut owners_of = Vec::new();
        let (index, ids) = (self.index.clone(), batch.to_vec());
        let referenced = blocking(move || {
            ids.into_iter()
                .filter(|id| index.chunk_refs(id).unwrap_or(0) > 0)
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        // Unreferenced chunks are garbage: the collector's business.
        for id in &referenced {
            let owners = self.owners(id);
            for o in owners.iter().filter(|o| **o != self.node_id) {
                by_owner.entry(o.clone()).or_default().push(*id);
            }
            owners_of.push((*id, owners));
        }
        let mut present: HashMap<(String, ChunkId), bool> = HashMap::new();
        for (owner, ids) in by_owner {
            let answers = self.has_chunks_on(&owner, &ids, false).await;
            for (id, has) in ids
                .iter()
                .zip(answers.unwrap_or_else(|| vec![false; ids.len()]))
            {
                present.insert((owner.clone(), *id), has);
            }
        }
        owners_of
            .into_iter()
            .filter_map(|(id, owners)| {
                let push_to: Vec<String> = owners
                    .iter()
                    .filter(|o| {
                        **o != self.node_id
                            && !present.get(&((*o).clone(), id)).copied().unwrap_or(false)
                    })
                    .cloned()
                    .collect();
                let drop_after = !owners.contains(&self.node_id) && owners.len() >= r;
                (!push_to.is_empty() || drop_after).then_some(Plan {
                    id,
                    push_to,
                    drop_after,
                })
            })
            .collect()
    }

    /// Pushes a chunk to the owners that lack it, then drops the local copy
    /// if this node is not an owner and every owner now holds one.
    async fn execute(&self, plan: &Plan, totals: &Totals) -> bool {
        let mut ok = true;
        if !plan.push_to.is_empty() {
            let Some(sealed) = self.read_verified(plan.id).await else {
                return false;
            };
            for owner in &plan.push_to {
                self.pace(sealed.len()).await;
                match self
                    .clone_for_task()
                    .put_on(owner, plan.id, sealed.clone(), None)
                    .await
                {
                    Ok(()) => {
                        totals.pushed.fetch_add(1, Ordering::Relaxed);
                        crate::metrics::repaired(crate::metrics::RepairAction::Push);
                    }
                    Err(e) => {
                        tracing::debug!(chunk = %plan.id, owner = %owner, error = %e, "repair push failed");
                        ok = false;
                    }
                }
            }
        }
        if ok && plan.drop_after && self.owners_hold_good_copies(plan.id).await {
            let chunks = self.chunks.clone();
            let id = plan.id;
            // Dropping only after every owner confirmed a verified copy:
            // never below R good copies.
            let removed = tokio::task::spawn_blocking(move || {
                chunks
                    .store()
                    .remove_if_older(&id, std::time::SystemTime::now() + Duration::from_secs(1))
            })
            .await;
            if matches!(removed, Ok(Ok(true))) {
                totals.dropped.fetch_add(1, Ordering::Relaxed);
                crate::metrics::repaired(crate::metrics::RepairAction::Drop);
            }
        }
        ok
    }

    /// Whether every owner of `id` reads back a good copy (asked just before
    /// this node drops its own).
    async fn owners_hold_good_copies(&self, id: ChunkId) -> bool {
        let owners = self.owners(&id);
        if owners.len() < self.replicas() {
            return false;
        }
        for owner in owners.iter().filter(|o| **o != self.node_id) {
            if self.has_verified(owner, &[id]).await != [true] {
                return false;
            }
        }
        true
    }

    async fn pull(&self, id: ChunkId, totals: &Totals) -> bool {
        match self.fetch(id).await {
            Ok(sealed) => {
                self.pace(sealed.len()).await;
                let chunks = self.chunks.clone();
                let stored =
                    tokio::task::spawn_blocking(move || chunks.put_sealed(&id, &sealed)).await;
                let ok = matches!(stored, Ok(Ok(_)));
                if ok {
                    totals.pulled.fetch_add(1, Ordering::Relaxed);
                    crate::metrics::repaired(crate::metrics::RepairAction::Pull);
                }
                ok
            }
            Err(e) => {
                tracing::debug!(chunk = %id, error = %e, "repair pull failed");
                false
            }
        }
    }

    /// A copy on this node was found bad and quarantined: restore it soon.
    pub fn chunk_lost(self: &Arc<Self>, id: ChunkId) {
        let this = self.clone();
        tokio::spawn(async move {
            this.enqueue(&id).await;
            this.repair.kick();
        });
    }

    async fn enqueue(&self, id: &ChunkId) {
        let now = crate::units::unix_ms();
        let backoff = move |attempts: u32| {
            let delay = FIRST_BACKOFF
                .saturating_mul(1 << attempts.min(10))
                .min(MAX_BACKOFF);
            now + delay.as_millis() as u64
        };
        // The queue is in the index: a commit with an fsync.
        let (index, chunk) = (self.index.clone(), *id);
        match blocking(move || index.queue_repair(&chunk, backoff)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(chunk = %id, error = %e, "cannot queue a repair"),
            Err(e) => tracing::warn!(chunk = %id, error = %e, "cannot queue a repair"),
        }
    }

    /// Sleeps long enough that repair transfers average `repair_rate`.
    /// Transfers reserve consecutive time slots, so concurrent repairs
    /// together stay within the rate.
    async fn pace(&self, bytes: usize) {
        let rate = self.cfg.repair_rate.max(1) as f64;
        let slot = Duration::from_secs_f64(bytes as f64 / rate);
        let start = {
            let mut next = self
                .repair
                .next_slot
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let now = tokio::time::Instant::now();
            let start = (*next).max(now);
            *next = start + slot;
            start
        };
        tokio::time::sleep_until(start).await;
    }
}
