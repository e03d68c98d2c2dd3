//! Leases: what keeps the chunks of an upload in progress away from the
//! collector, on every node that holds them, however long the client pauses.
//!
//! A chunk has no object record until its upload commits, so the collector
//! would see it as garbage once it is older than the grace period. An upload
//! therefore holds a lease on every node it writes to: the lease names the
//! upload (a random id), says how long the upload has run (`age`) and for how
//! long the lease holds (`ttl`). The gateway renews it on a timer, not on
//! data arrival, so a client that sends nothing for an hour keeps its chunks.
//!
//! A lease protects by time, not by chunk list: while it holds, the collector
//! spares every chunk written or refreshed since the upload began (its
//! `since`, on this node's clock, computed from the age the gateway reports).
//! Every chunk an upload writes or deduplicates gets a fresh mtime, so it is
//! covered; memory is one entry per upload, whatever its size. A renewal is a
//! full grant, so a node that restarted (and lost its leases) has them back
//! at the next renewal, and the collector does not run until the node has been
//! up for one lease period.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

/// Identifies one upload's lease on every node.
pub type LeaseId = [u8; 16];

/// Clock and mtime slack: file times have coarse granularity on some file
/// systems, and the age a gateway reports was measured a moment ago.
const SLACK: Duration = Duration::from_secs(2);

/// The lease period for a collector grace of `gc_grace`: short enough that an
/// abandoned upload stops protecting garbage soon, long enough that renewals
/// (a third of it apart) survive a slow peer.
pub fn ttl_for(gc_grace: Duration) -> Duration {
    gc_grace.clamp(Duration::from_millis(100), Duration::from_secs(60))
}

struct Lease {
    since: SystemTime,
    expires: Instant,
}

/// The leases held on this node (its own uploads' and its peers').
pub struct Leases {
    held: Mutex<HashMap<LeaseId, Lease>>,
    opened: Instant,
    quiet: Duration,
    /// Set for a node that ran alone before this start: no other node can
    /// have had uploads in progress on it, so nothing needs to wait.
    no_quiet: AtomicBool,
}

impl Leases {
    /// A table for a node whose leases last up to `ttl`: the collector waits
    /// that long after start-up for the renewals of uploads already running.
    pub fn new(ttl: Duration) -> Self {
        Self {
            held: Mutex::new(HashMap::new()),
            opened: Instant::now(),
            quiet: ttl,
            no_quiet: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<LeaseId, Lease>> {
        // Each update is one map operation: a panic cannot leave it torn.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Grants or renews a lease for an upload that began `age` ago, for `ttl`
    /// from now. A renewal never moves `since` later. Returns whether the
    /// lease was already in force: `false` means it is new here, or it had
    /// lapsed (the gateway was silent for longer than the period, or this
    /// node restarted), and the collector may have taken the upload's chunks
    /// in between.
    pub fn hold(&self, id: LeaseId, age: Duration, ttl: Duration) -> bool {
        let since = SystemTime::now()
            .checked_sub(age + SLACK)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let now = Instant::now();
        let expires = now + ttl;
        let mut held = self.lock();
        let in_force = held.get(&id).is_some_and(|l| l.expires > now);
        let lease = held.entry(id).or_insert(Lease { since, expires });
        if !in_force {
            // A lapsed lease starts again: its old expiry says nothing.
            lease.expires = expires;
        }
        lease.since = lease.since.min(since);
        lease.expires = lease.expires.max(expires);
        in_force
    }

    /// Ends a lease early (its upload finished or failed on this node).
    pub fn release(&self, id: &LeaseId) {
        self.lock().remove(id);
    }

    /// Chunks written or refreshed at or after this time belong, for all
    /// this node knows, to an upload in progress. `None`: no lease holds.
    pub fn protected_since(&self) -> Option<SystemTime> {
        oldest_in_force(&mut self.lock())
    }

    /// Runs `f` with the time the collector may delete below: `base`, or
    /// earlier where a lease in force protects more. The table stays locked
    /// while `f` runs (one chunk's stat and unlink), so a renewal lands
    /// either before it (and the chunk is spared) or after it (and reports
    /// a lapsed lease, so the gateway re-checks what was deleted): a check
    /// that takes the lease from a pass's start would let a pass delete a
    /// chunk after its lease was renewed, unseen by that renewal.
    pub fn with_cutoff<R>(&self, base: SystemTime, f: impl FnOnce(SystemTime) -> R) -> R {
        let mut held = self.lock();
        let cutoff = oldest_in_force(&mut held).map_or(base, |since| since.min(base));
        f(cutoff)
    }

    /// Whether the collector may run: not before every upload that was in
    /// progress when this node started had its chance to renew its lease.
    pub fn collection_allowed(&self) -> bool {
        self.no_quiet.load(Ordering::Relaxed) || self.opened.elapsed() >= self.quiet
    }

    /// Drops the start-up quiet period: this node had no peers (none
    /// configured, none remembered), so no lease of another node's upload
    /// can have been lost by its restart.
    pub fn skip_quiet_period(&self) {
        self.no_quiet.store(true, Ordering::Relaxed);
    }

    /// Leases in force.
    pub fn count(&self) -> usize {
        let now = Instant::now();
        self.lock().values().filter(|l| l.expires > now).count()
    }
}

/// Drops the leases that have expired and returns the start of the oldest
/// upload still holding one.
fn oldest_in_force(held: &mut HashMap<LeaseId, Lease>) -> Option<SystemTime> {
    let now = Instant::now();
    held.retain(|_, l| l.expires > now);
    held.values().map(|l| l.since).min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_protects_what_was_written_since_its_upload_began() {
        let leases = Leases::new(Duration::from_secs(5));
        assert!(leases.protected_since().is_none());
        leases.hold([1; 16], Duration::from_secs(100), Duration::from_secs(5));
        let since = leases.protected_since().unwrap();
        let age = SystemTime::now().duration_since(since).unwrap();
        assert!(age >= Duration::from_secs(100) && age < Duration::from_secs(110));
        // A renewal reporting a shorter age keeps the earlier start.
        leases.hold([1; 16], Duration::from_secs(1), Duration::from_secs(5));
        assert_eq!(leases.protected_since(), Some(since));
        leases.release(&[1; 16]);
        assert!(leases.protected_since().is_none());
    }

    #[test]
    fn expired_leases_protect_nothing_and_collection_waits_after_start() {
        let leases = Leases::new(Duration::from_millis(30));
        assert!(!leases.collection_allowed());
        leases.hold([2; 16], Duration::ZERO, Duration::from_millis(20));
        assert_eq!(leases.count(), 1);
        std::thread::sleep(Duration::from_millis(40));
        assert!(leases.protected_since().is_none());
        assert_eq!(leases.count(), 0);
        assert!(leases.collection_allowed());
    }

    #[test]
    fn a_renewal_says_whether_the_lease_lapsed() {
        let leases = Leases::new(Duration::from_millis(30));
        let ttl = Duration::from_millis(50);
        assert!(!leases.hold([3; 16], Duration::ZERO, ttl), "a new lease");
        assert!(leases.hold([3; 16], Duration::ZERO, ttl), "renewed in time");
        std::thread::sleep(Duration::from_millis(70));
        // Lapsed, still in the table (no collector pass pruned it).
        assert!(!leases.hold([3; 16], Duration::ZERO, ttl));
        assert!(leases.hold([3; 16], Duration::ZERO, ttl));
        std::thread::sleep(Duration::from_millis(70));
        // Lapsed and pruned by the collector's look at the table.
        assert!(leases.protected_since().is_none());
        assert!(!leases.hold([3; 16], Duration::ZERO, ttl));
        leases.release(&[3; 16]);
        assert!(!leases.hold([3; 16], Duration::ZERO, ttl), "released");
    }

    #[test]
    fn a_renewal_waits_for_a_deletion_in_progress_and_then_reports_the_lapse() {
        let leases = std::sync::Arc::new(Leases::new(Duration::from_millis(10)));
        let ttl = Duration::from_millis(20);
        leases.hold([4; 16], Duration::ZERO, ttl);
        std::thread::sleep(Duration::from_millis(30));
        let base = SystemTime::now();
        let (renewed_at, deleted_at) = std::thread::scope(|s| {
            let l = leases.clone();
            let deletion = s.spawn(move || {
                l.with_cutoff(base, |cutoff| {
                    // The lapsed lease protects nothing.
                    assert_eq!(cutoff, base);
                    std::thread::sleep(Duration::from_millis(50));
                    Instant::now()
                })
            });
            std::thread::sleep(Duration::from_millis(10));
            let held = leases.hold([4; 16], Duration::ZERO, Duration::from_secs(5));
            assert!(!held, "the renewal says the lease had lapsed");
            (Instant::now(), deletion.join().unwrap())
        });
        assert!(
            renewed_at >= deleted_at,
            "the renewal waited for the deletion"
        );
        // Once renewed, the lease protects again.
        leases.with_cutoff(base, |cutoff| assert!(cutoff < base));
    }
}
