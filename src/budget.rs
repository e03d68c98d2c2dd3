//! The node-wide budget for chunk buffers, and the per-call share of it.
//!
//! Every chunk buffer a transfer holds is paid for from one byte budget
//! (`--buffer-budget`), so the number and size of transfers change how long
//! they wait, never how much memory the node uses. Three rules keep one
//! slow or hostile client from stopping everyone else:
//!
//! - **A call holds at most a fixed share.** Each transfer pays through a
//!   [`CallBudget`] capped at a few chunk buffers ([`UPLOAD_BUFFERS`],
//!   [`DOWNLOAD_BUFFERS`]). A call that asks for more waits for its *own*
//!   buffers to be released; it never takes more from the node.
//! - **Small requests are never queued behind large ones.** A quarter of the
//!   budget is a reserve for small requests (at most
//!   [`BufferBudget::small_limit`], a sixteenth of a chunk: the first buffer
//!   of every upload, a small object's chunk); large requests (whole chunks)
//!   share the rest. Each part grants in arrival order. So calls that stall
//!   holding whole chunks can fill the bulk part, but small objects keep
//!   flowing.
//! - **No call waits while holding bulk budget it cannot use.** Bulk budget
//!   is only ever held by whole chunk buffers that move on without needing
//!   more (an upload's first buffer grows from its small size to a whole
//!   chunk in one step). Were small requests or partly grown buffers to hold
//!   slices of the bulk part while waiting for more, enough of them at once
//!   would wait on each other until their waits timed out.
//! - **Waiting is bounded.** A request that cannot be granted within the
//!   wait limit (`--budget-wait`) fails with [`BudgetError::Exhausted`]
//!   (`RESOURCE_EXHAUSTED` to a client), and when [`MAX_WAITERS`] calls are
//!   already waiting a new one fails at once instead of queueing: a call
//!   waiting for budget does not read its request stream, so its HTTP/2
//!   window stays pinned until it gives up.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Chunk buffers one upload may hold at once: one being filled from the
/// client and three being hashed, sealed and written (the pipeline writes
/// three chunks at a time to spread sealing over cores).
pub const UPLOAD_BUFFERS: usize = 4;
/// Chunk buffers one download may hold at once: one being sent and two read
/// and verified ahead.
pub const DOWNLOAD_BUFFERS: usize = 3;
/// Calls that may wait for budget at once; more are refused at once. Each
/// waiting call pins at most one HTTP/2 stream window of unread data.
pub const MAX_WAITERS: usize = 32;
/// How long the reserve for small requests may have a waiter before the
/// node counts as saturated (health NOT_SERVING, new transfers shed).
pub const SATURATED_AFTER: Duration = Duration::from_secs(1);
/// Default bound on one wait for budget.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(10);

/// Why a request for budget was refused.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    /// No budget came free within the wait limit, or too many calls were
    /// already waiting.
    #[error(
        "node is out of buffer memory: {reason} ({requested} bytes of the {total}-byte budget \
         requested); retry later"
    )]
    Exhausted {
        reason: String,
        requested: usize,
        total: usize,
    },
}

/// Budget held by one buffer: permits from the call's cap and from the
/// node's pools. Released when dropped.
#[derive(Debug, Default)]
pub struct BudgetPermit {
    call: Option<OwnedSemaphorePermit>,
    reserve: Option<OwnedSemaphorePermit>,
    bulk: Option<OwnedSemaphorePermit>,
}

impl BudgetPermit {
    /// Adds `other`'s budget to this permit (a buffer that grew).
    pub fn merge(&mut self, other: BudgetPermit) {
        fn join(a: &mut Option<OwnedSemaphorePermit>, b: Option<OwnedSemaphorePermit>) {
            match (a.as_mut(), b) {
                (Some(a), Some(b)) => a.merge(b),
                (None, Some(b)) => *a = Some(b),
                (_, None) => {}
            }
        }
        join(&mut self.call, other.call);
        join(&mut self.reserve, other.reserve);
        join(&mut self.bulk, other.bulk);
    }

    /// Bytes of node budget this permit holds.
    pub fn bytes(&self) -> usize {
        let n = |p: &Option<OwnedSemaphorePermit>| p.as_ref().map_or(0, |p| p.num_permits());
        n(&self.reserve) + n(&self.bulk)
    }
}

/// The node-wide budget for chunk buffers, in bytes. Cheap to clone.
#[derive(Clone)]
pub struct BufferBudget {
    inner: Arc<Inner>,
}

struct Inner {
    total: usize,
    /// For small requests only.
    reserve: Arc<Semaphore>,
    /// For everything; large requests are granted in arrival order.
    bulk: Arc<Semaphore>,
    bulk_size: usize,
    small_limit: usize,
    wait_limit: Duration,
    /// Calls waiting now: id -> (since, small).
    waiters: Mutex<BTreeMap<u64, (Instant, bool)>>,
    next_waiter: AtomicU64,
}

/// Removes a waiter from the table however its wait ends.
struct Waiting<'a> {
    inner: &'a Inner,
    id: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.inner.lock_waiters().remove(&self.id);
    }
}

impl Inner {
    fn lock_waiters(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, (Instant, bool)>> {
        // The map is only inserted into and removed from: a panic cannot
        // leave it half-updated.
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn exhausted(&self, reason: String, requested: usize) -> BudgetError {
        BudgetError::Exhausted {
            reason,
            requested,
            total: self.total,
        }
    }
}

impl BufferBudget {
    /// A budget of `total` bytes for a node whose chunks are `chunk_size`
    /// bytes; one wait lasts at most `wait_limit`.
    pub fn new(total: usize, chunk_size: usize, wait_limit: Duration) -> Self {
        let total = total.max(2);
        let reserve_size = (total / 4).max(1);
        let bulk_size = total - reserve_size;
        let small_limit =
            ((chunk_size / 16).max(4096) + crate::crypto::HEADER_LEN).min(reserve_size);
        Self {
            inner: Arc::new(Inner {
                total,
                reserve: Arc::new(Semaphore::new(reserve_size)),
                bulk: Arc::new(Semaphore::new(bulk_size)),
                bulk_size,
                small_limit,
                wait_limit,
                waiters: Mutex::new(BTreeMap::new()),
                next_waiter: AtomicU64::new(0),
            }),
        }
    }

    /// The whole budget, in bytes.
    pub fn total(&self) -> usize {
        self.inner.total
    }

    /// Bytes of budget not held by any transfer right now.
    pub fn available(&self) -> usize {
        self.inner.reserve.available_permits() + self.inner.bulk.available_permits()
    }

    /// Bytes held by transfers right now.
    pub fn in_use(&self) -> usize {
        self.inner.total.saturating_sub(self.available())
    }

    /// The largest request that counts as small (may use the reserve).
    pub fn small_limit(&self) -> usize {
        self.inner.small_limit
    }

    /// Calls waiting for budget right now.
    pub fn waiters(&self) -> usize {
        self.inner.lock_waiters().len()
    }

    /// Whether the node cannot serve even small transfers: a small request
    /// has waited longer than [`SATURATED_AFTER`], or [`MAX_WAITERS`] calls
    /// wait. Large requests waiting alone are ordinary back-pressure.
    pub fn saturated(&self) -> bool {
        let waiters = self.inner.lock_waiters();
        waiters.len() >= MAX_WAITERS
            || waiters
                .values()
                .any(|(since, small)| *small && since.elapsed() >= SATURATED_AFTER)
    }

    /// A per-call share of this budget, capped at `buffers` chunk buffers of
    /// `chunk_len` bytes each.
    pub fn call(&self, buffers: usize, chunk_len: usize) -> CallBudget {
        let cap = buffers.max(1) * chunk_len.max(1);
        CallBudget {
            node: self.clone(),
            cap: Arc::new(Semaphore::new(cap)),
            cap_bytes: cap,
        }
    }

    /// An empty buffer with room for `capacity` bytes, reused when possible.
    pub fn take_buffer(&self, capacity: usize) -> Vec<u8> {
        crate::bufpool::take(capacity)
    }

    /// Shares `data` as [`Bytes`] holding `permit`; both return (to the
    /// budget and the buffer pool) when the last reference is dropped.
    pub fn lend(&self, data: Vec<u8>, permit: BudgetPermit) -> Bytes {
        crate::bufpool::lend(data, permit)
    }

    /// Takes `bytes` of node budget, waiting at most the wait limit: a small
    /// request from the reserve, a large one from the bulk part. A request
    /// larger than the bulk part takes all of it rather than waiting forever.
    pub async fn acquire(&self, bytes: usize) -> Result<BudgetPermit, BudgetError> {
        let started = Instant::now();
        let result = self.acquire_inner(bytes).await;
        crate::metrics::budget_waited(started.elapsed(), result.is_ok());
        result
    }

    /// Takes `bytes` of node budget if it is free now (never ahead of a
    /// waiting request).
    pub fn try_acquire(&self, bytes: usize) -> Option<BudgetPermit> {
        let (pool, n, permit) = self.pool_for(bytes);
        let granted = pool.clone().try_acquire_many_owned(n).ok().map(permit);
        if granted.is_some() {
            crate::metrics::budget_waited(Duration::ZERO, true);
        }
        granted
    }

    /// The pool a request of `bytes` draws from, how many permits it takes,
    /// and how to wrap them.
    fn pool_for(
        &self,
        bytes: usize,
    ) -> (
        &Arc<Semaphore>,
        u32,
        impl Fn(OwnedSemaphorePermit) -> BudgetPermit + use<>,
    ) {
        let inner = &*self.inner;
        let small = bytes <= inner.small_limit;
        let (pool, n) = if small {
            (&inner.reserve, bytes.max(1) as u32)
        } else {
            (&inner.bulk, bytes.min(inner.bulk_size) as u32)
        };
        let permit = move |p: OwnedSemaphorePermit| {
            if small {
                BudgetPermit {
                    reserve: Some(p),
                    ..Default::default()
                }
            } else {
                BudgetPermit {
                    bulk: Some(p),
                    ..Default::default()
                }
            }
        };
        (pool, n, permit)
    }

    async fn acquire_inner(&self, bytes: usize) -> Result<BudgetPermit, BudgetError> {
        let inner = &*self.inner;
        let small = bytes <= inner.small_limit;
        let (pool, n, permit) = self.pool_for(bytes);
        // Fast path: no waiting, so no bookkeeping.
        if let Ok(p) = pool.clone().try_acquire_many_owned(n) {
            return Ok(permit(p));
        }
        let _waiting = {
            let mut waiters = inner.lock_waiters();
            if waiters.len() >= MAX_WAITERS {
                return Err(inner.exhausted(
                    format!("{MAX_WAITERS} calls are already waiting for buffer memory"),
                    bytes,
                ));
            }
            let id = inner.next_waiter.fetch_add(1, Ordering::Relaxed);
            waiters.insert(id, (Instant::now(), small));
            Waiting { inner, id }
        };
        // The semaphores are never closed, so an acquire never fails; a
        // failure would only end this wait early with an error.
        match tokio::time::timeout(inner.wait_limit, pool.clone().acquire_many_owned(n)).await {
            Ok(Ok(p)) => Ok(permit(p)),
            Ok(Err(_)) => Err(inner.exhausted("the budget was closed".into(), bytes)),
            Err(_) => Err(inner.exhausted(
                format!(
                    "waited {:?} (--budget-wait) without any coming free",
                    inner.wait_limit
                ),
                bytes,
            )),
        }
    }
}

/// One call's share of the node budget: what it holds never exceeds its cap,
/// however its pipeline is arranged.
#[derive(Clone)]
pub struct CallBudget {
    node: BufferBudget,
    cap: Arc<Semaphore>,
    cap_bytes: usize,
}

impl CallBudget {
    /// The node budget this share draws from.
    pub fn node(&self) -> &BufferBudget {
        &self.node
    }

    /// Most bytes this call may hold at once.
    pub fn cap(&self) -> usize {
        self.cap_bytes
    }

    /// Takes `bytes` for this call: first from its own cap (waiting, if
    /// need be, for its own buffers to be released as its transfer moves
    /// on), then from the node (a bounded wait).
    pub async fn acquire(&self, bytes: usize) -> Result<BudgetPermit, BudgetError> {
        let n = bytes.clamp(1, self.cap_bytes) as u32;
        // Never closed: this call owns the semaphore.
        let Ok(own) = self.cap.clone().acquire_many_owned(n).await else {
            return Err(self
                .node
                .inner
                .exhausted("the call's budget was closed".into(), bytes));
        };
        let mut permit = self.node.acquire(bytes).await?;
        permit.call = Some(own);
        Ok(permit)
    }

    /// Takes `bytes` for this call only if its cap and the node have them
    /// free now.
    pub fn try_acquire(&self, bytes: usize) -> Option<BudgetPermit> {
        let n = bytes.clamp(1, self.cap_bytes) as u32;
        let own = self.cap.clone().try_acquire_many_owned(n).ok()?;
        let mut permit = self.node.try_acquire(bytes)?;
        permit.call = Some(own);
        Some(permit)
    }

    /// An empty buffer with room for `capacity` bytes, reused when possible.
    pub fn take_buffer(&self, capacity: usize) -> Vec<u8> {
        self.node.take_buffer(capacity)
    }

    /// See [`BufferBudget::lend`].
    pub fn lend(&self, data: Vec<u8>, permit: BudgetPermit) -> Bytes {
        self.node.lend(data, permit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: usize = 64 << 10;

    fn budget(total: usize, wait: Duration) -> BufferBudget {
        BufferBudget::new(total, CHUNK, wait)
    }

    #[tokio::test]
    async fn small_requests_pass_a_large_one_waiting() {
        let b = budget(8 * CHUNK, Duration::from_secs(30));
        // Fill the bulk part (6 chunks) and leave a large request waiting.
        let held = b.acquire(6 * CHUNK).await.unwrap();
        let waiting = tokio::spawn({
            let b = b.clone();
            async move { b.acquire(CHUNK).await.map(|p| p.bytes()) }
        });
        tokio::time::timeout(Duration::from_secs(5), async {
            while b.waiters() == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the large request waits");
        // Small requests are served at once from the reserve.
        let mut small = Vec::new();
        for _ in 0..8 {
            let p = tokio::time::timeout(Duration::from_secs(1), b.acquire(b.small_limit()))
                .await
                .expect("a small request is not queued behind a large one")
                .unwrap();
            small.push(p);
        }
        assert!(!waiting.is_finished());
        drop(held);
        let got = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the large request is served once budget is free")
            .unwrap()
            .unwrap();
        assert_eq!(got, CHUNK);
    }

    #[tokio::test]
    async fn a_wait_is_bounded() {
        let b = budget(8 * CHUNK, Duration::from_millis(200));
        let _held = b.acquire(6 * CHUNK).await.unwrap();
        let started = Instant::now();
        let err = b.acquire(CHUNK).await.unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(err.to_string().contains("out of buffer memory"), "{err}");
        assert_eq!(b.waiters(), 0, "a wait that gave up leaves no waiter");
        assert_eq!(b.available(), 2 * CHUNK, "and holds nothing");
    }

    #[tokio::test]
    async fn a_call_never_holds_more_than_its_cap() {
        let b = budget(16 * CHUNK, Duration::from_secs(30));
        let call = b.call(2, CHUNK);
        let one = call.acquire(CHUNK).await.unwrap();
        let two = call.acquire(CHUNK).await.unwrap();
        assert_eq!(b.in_use(), 2 * CHUNK);
        let third = tokio::spawn({
            let call = call.clone();
            async move { call.acquire(CHUNK).await.map(|p| p.bytes()) }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !third.is_finished(),
            "the third buffer waits for the call's own"
        );
        assert_eq!(b.in_use(), 2 * CHUNK, "and takes nothing from the node");
        drop(one);
        assert_eq!(third.await.unwrap().unwrap(), CHUNK);
        drop(two);
    }

    #[tokio::test]
    async fn too_many_waiters_are_refused_at_once() {
        let b = budget(8 * CHUNK, Duration::from_secs(30));
        let _held = b.acquire(6 * CHUNK).await.unwrap();
        let mut waiting = Vec::new();
        for _ in 0..MAX_WAITERS {
            let b = b.clone();
            waiting.push(tokio::spawn(async move { b.acquire(CHUNK).await.is_ok() }));
        }
        tokio::time::timeout(Duration::from_secs(5), async {
            while b.waiters() < MAX_WAITERS {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("every request waits");
        assert!(b.saturated());
        let started = Instant::now();
        assert!(b.acquire(CHUNK).await.is_err());
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "refused at once"
        );
        for w in waiting {
            w.abort();
        }
    }

    #[tokio::test]
    async fn a_small_waiter_marks_the_node_saturated() {
        let b = budget(8 * CHUNK, Duration::from_secs(30));
        let _bulk = b.acquire(6 * CHUNK).await.unwrap();
        let mut reserve = Vec::new();
        while b.available() > 0 {
            reserve.push(b.acquire(b.available().min(b.small_limit())).await.unwrap());
        }
        assert!(!b.saturated());
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.acquire(1).await.is_ok() }
        });
        tokio::time::sleep(SATURATED_AFTER + Duration::from_millis(200)).await;
        assert!(b.saturated(), "a small request waiting over a second");
        waiter.abort();
    }
}
