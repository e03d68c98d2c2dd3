//! The nemesis: applies the planned faults at their planned times and undoes
//! them, logging what it did. Faults that destroy data never take the last
//! copy of a chunk an object needs: that would be a loss beyond what dfs
//! promises (R-1 nodes), not a bug.

use std::{
    collections::{HashMap, HashSet},
    os::unix::fs::FileExt,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{task::JoinSet, time::Instant};

use crate::{
    caps::Caps,
    check::Violations,
    config::Config,
    history::{History, Outcome, now_ms},
    net::Firewall,
    plan::{FaultKind, Partition, PlannedFault},
    procs::{Procs, chunk_files},
    workload::Workload,
};

/// What happened to one planned fault.
#[derive(Debug, Clone)]
pub struct FaultRecord {
    pub id: u64,
    pub kind: &'static str,
    pub node: Option<usize>,
    pub start_ms: u64,
    pub end_ms: u64,
    pub executed: bool,
    pub note: String,
}

impl FaultRecord {
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id, "kind": self.kind, "node": self.node, "start_ms": self.start_ms,
            "end_ms": self.end_ms, "executed": self.executed, "note": self.note,
        })
    }

    /// Whether the fault stops or restarts a node process.
    pub fn is_process_fault(&self) -> bool {
        matches!(
            self.kind,
            "kill" | "stop" | "replace" | "forget" | "skew" | "full"
        )
    }
}

pub struct Nemesis {
    pub cfg: Config,
    pub caps: Caps,
    pub procs: Arc<Procs>,
    pub firewall: Option<Arc<Mutex<Firewall>>>,
    pub history: Arc<History>,
    pub workload: Arc<Workload>,
    pub violations: Arc<Violations>,
    pub log: Mutex<Vec<FaultRecord>>,
    partitions: Mutex<HashMap<u64, Partition>>,
    /// Copies the harness corrupted: (node, generation, chunk id).
    flipped: Mutex<HashSet<(usize, u32, [u8; 20])>>,
    /// Held by the process fault acting on each node: a fault that overran
    /// its plan (waiting for a safe moment to destroy data) makes the next
    /// one on that node give way instead of interleaving with it.
    node_locks: Vec<Arc<tokio::sync::Mutex<()>>>,
    run_start_ms: u64,
}

type FaultResult = Result<String, String>;

impl Nemesis {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: &Config,
        caps: &Caps,
        procs: Arc<Procs>,
        firewall: Option<Arc<Mutex<Firewall>>>,
        history: Arc<History>,
        workload: Arc<Workload>,
        violations: Arc<Violations>,
        run_start_ms: u64,
    ) -> Self {
        Self {
            cfg: cfg.clone(),
            caps: caps.clone(),
            procs,
            firewall,
            history,
            workload,
            violations,
            log: Mutex::new(Vec::new()),
            partitions: Mutex::new(HashMap::new()),
            flipped: Mutex::new(HashSet::new()),
            node_locks: (0..cfg.nodes)
                .map(|_| Arc::new(tokio::sync::Mutex::new(())))
                .collect(),
            run_start_ms,
        }
    }

    /// Runs every fault at its time; returns when the last one is undone.
    pub async fn run(self: Arc<Self>, faults: Vec<PlannedFault>, start: Instant) {
        let mut tasks = JoinSet::new();
        for f in faults {
            let me = self.clone();
            tasks.spawn(async move {
                tokio::time::sleep_until(start + Duration::from_millis(f.at_ms)).await;
                me.apply(f).await;
            });
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn apply(&self, f: PlannedFault) {
        let start_ms = now_ms();
        let node = f.kind.node();
        let lock = match node {
            Some(n) if !matches!(f.kind, FaultKind::Flip { .. }) => {
                Some(self.node_locks[n].clone().try_lock_owned())
            }
            _ => None,
        };
        let result = match (self.caps.missing_for_fault(f.kind.name()), &lock) {
            (Some(reason), _) => Err(format!("skipped: {reason}")),
            (None, Some(Err(_))) => {
                Err("skipped: the node is still under an earlier fault that overran".into())
            }
            (None, _) => {
                self.say(&f, "starts");
                self.execute(&f).await
            }
        };
        drop(lock);
        let (executed, note) = match result {
            Ok(note) => (true, note),
            Err(note) => (false, note),
        };
        if !executed {
            self.say(&f, &note);
        }
        let rec = FaultRecord {
            id: f.id,
            kind: f.kind.name(),
            node,
            start_ms,
            end_ms: now_ms(),
            executed,
            note,
        };
        self.log.lock().unwrap_or_else(|p| p.into_inner()).push(rec);
    }

    fn say(&self, f: &PlannedFault, what: &str) {
        let at = now_ms().saturating_sub(self.run_start_ms) as f64 / 1000.0;
        let target = match &f.kind {
            FaultKind::Partition(p) => format!("{} {:?}", p.shape, one_based(&p.blocked)),
            FaultKind::Skew { node, offset_ms } => format!("n{} by {offset_ms:+} ms", node + 1),
            other => format!("n{}", other.node().map_or(0, |n| n + 1)),
        };
        println!(
            "chaos: +{at:.1}s fault {} {} {target} for {:.1}s: {what}",
            f.id,
            f.kind.name(),
            f.dur_ms as f64 / 1000.0
        );
    }

    async fn execute(&self, f: &PlannedFault) -> FaultResult {
        let dur = Duration::from_millis(f.dur_ms);
        match &f.kind {
            FaultKind::Kill { node } => {
                self.procs.kill9(*node).await;
                tokio::time::sleep(dur).await;
                self.start(*node, "after kill -9").await
            }
            FaultKind::Stop { node } => {
                self.procs.pause(*node, true);
                tokio::time::sleep(dur).await;
                self.procs.pause(*node, false);
                Ok("SIGSTOP, then SIGCONT".into())
            }
            FaultKind::Partition(p) => self.partition(f.id, p, dur).await,
            FaultKind::Replace { node } => self.replace(*node, dur, false).await,
            FaultKind::Forget { node } => self.replace(*node, dur, true).await,
            FaultKind::Skew { node, offset_ms } => {
                let offset = *offset_ms;
                self.restart_with(*node, |s| s.skew_ms = offset).await?;
                tokio::time::sleep(dur).await;
                self.restart_with(*node, |s| s.skew_ms = 0).await?;
                Ok(format!("clock offset {offset:+} ms via libfaketime"))
            }
            FaultKind::Full { node } => {
                let cap = self.procs.chunk_bytes(*node) + 2 * self.cfg.chunk_size;
                self.restart_with(*node, |s| s.capacity = Some(cap)).await?;
                tokio::time::sleep(dur).await;
                self.restart_with(*node, |s| s.capacity = None).await?;
                Ok(format!("--capacity {cap}"))
            }
            FaultKind::Flip { node, pick } => self.flip(*node, *pick),
        }
    }

    async fn start(&self, node: usize, why: &str) -> FaultResult {
        if self.procs.slot(node).child.is_some() {
            return Ok(format!(
                "{why}: already running (restarted after an unexpected exit)"
            ));
        }
        match self.procs.start(node, why).await {
            Ok(()) => Ok(why.to_owned()),
            Err(e) => {
                self.violations
                    .add(6, format!("node n{} did not start ({why}): {e}", node + 1));
                Err(format!("start failed: {e}"))
            }
        }
    }

    /// SIGTERM (which must end in exit 0), a change of flags, a start.
    async fn restart_with(
        &self,
        node: usize,
        change: impl FnOnce(&mut crate::procs::NodeSlot),
    ) -> FaultResult {
        match self.procs.terminate(node).await {
            Ok(status) if status.success() => {}
            Ok(status) => self.violations.add(
                6,
                format!(
                    "node n{} exited with {status} after SIGTERM (expected 0)",
                    node + 1
                ),
            ),
            Err(e) => self.violations.add(6, format!("node n{}: {e}", node + 1)),
        }
        change(&mut self.procs.slot(node));
        self.start(node, "restarted with new flags").await
    }

    async fn partition(&self, id: u64, p: &Partition, dur: Duration) -> FaultResult {
        let Some(fw) = &self.firewall else {
            return Err("skipped: no firewall".into());
        };
        self.partitions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, p.clone());
        self.apply_rules(fw)?;
        tokio::time::sleep(dur).await;
        self.partitions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        self.apply_rules(fw)?;
        Ok(format!("{} {:?}", p.shape, one_based(&p.blocked)))
    }

    fn apply_rules(&self, fw: &Mutex<Firewall>) -> Result<(), String> {
        let parts = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        let mut rules = Vec::new();
        for p in parts.values() {
            for (from, to) in &p.blocked {
                let uid = self
                    .procs
                    .slot(*from)
                    .uid
                    .ok_or("nodes do not run as their own uids")?;
                let ip = self.procs.slot(*to).ip.clone();
                rules.push((uid, ip, self.cfg.p2p_port));
            }
        }
        rules.sort();
        rules.dedup();
        let fw = fw.lock().unwrap_or_else(|e| e.into_inner());
        fw.set(&rules).map_err(|e| {
            self.violations
                .add(0, format!("harness: cannot set iptables rules: {e}"));
            e.to_string()
        })
    }

    /// Kill -9, move the data directory aside, optionally tell the cluster
    /// to forget the old id, and start a fresh node on the same address.
    async fn replace(&self, node: usize, dur: Duration, forget: bool) -> FaultResult {
        self.wait_safe(node, None, dur.max(Duration::from_secs(5)))
            .await?;
        let old_id = self.procs.slot(node).node_id.clone();
        self.procs.kill9(node).await;
        let aside = self
            .procs
            .wipe(node)
            .map_err(|e| format!("cannot move data aside: {e}"))?;
        let mut note = format!("old id {old_id}, data moved to {}", aside.display());
        if forget {
            tokio::time::sleep(self.cfg.timers.dead_after + Duration::from_secs(1)).await;
            note.push_str(&format!("; {}", self.forget(node, &old_id).await));
        }
        tokio::time::sleep(dur).await;
        self.start(node, "fresh data directory").await?;
        Ok(note)
    }

    /// `dfs members forget OLD_ID` through another running node.
    async fn forget(&self, node: usize, old_id: &str) -> String {
        let Some(via) = (0..self.cfg.nodes)
            .filter(|i| *i != node)
            .find(|i| self.procs.slot(*i).child.is_some())
        else {
            return "no running node to send `members forget` to".into();
        };
        let addr = self.procs.grpc_addr(via);
        let out = tokio::time::timeout(
            Duration::from_secs(20),
            tokio::process::Command::new(&self.cfg.dfs_bin)
                .args(["members", "forget", old_id, "--node", &addr])
                .kill_on_drop(true)
                .output(),
        )
        .await;
        match out {
            Ok(Ok(o)) => format!(
                "`dfs members forget {old_id}` via n{}: exit {}, {}{}",
                via + 1,
                o.status,
                String::from_utf8_lossy(&o.stdout).trim(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Ok(Err(e)) => format!("cannot run `dfs members forget`: {e}"),
            Err(_) => "`dfs members forget` did not finish within 20 s".into(),
        }
    }

    /// Flips one bit of one chunk file on `node`.
    fn flip(&self, node: usize, pick: u64) -> FaultResult {
        let (dir, generation) = {
            let slot = self.procs.slot(node);
            (slot.data_dir().join("chunks"), slot.generation)
        };
        // Prefer copies some object needs: flipping garbage tests nothing.
        let needed = self.needed_chunks();
        let all = chunk_files(&dir);
        let wanted: Vec<std::path::PathBuf> = all
            .iter()
            .filter(|p| chunk_id_of(p).is_some_and(|id| needed.contains_key(&id)))
            .cloned()
            .collect();
        let files = if wanted.is_empty() { all } else { wanted };
        if files.is_empty() {
            return Err("skipped: no chunk files on that node yet".into());
        }
        for k in 0..8u64 {
            let path = &files[((pick.wrapping_add(k * 7919)) % files.len() as u64) as usize];
            let Some(id) = chunk_id_of(path) else {
                continue;
            };
            if self.safe_to_destroy(node, Some(id)).is_err() {
                continue;
            }
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            if len == 0 {
                continue;
            }
            let pos = (pick >> 16) % len;
            let mut byte = [0u8];
            file.read_exact_at(&mut byte, pos)
                .map_err(|e| e.to_string())?;
            byte[0] ^= 1 << ((pick >> 8) % 8);
            file.write_at(&byte, pos).map_err(|e| e.to_string())?;
            self.flipped
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((node, generation, id));
            return Ok(format!("flipped a bit at byte {pos} of {}", path.display()));
        }
        Err("skipped: every chunk tried was the last good copy of something".into())
    }

    /// Waits (up to `patience`) until destroying `node`'s data (or one chunk
    /// of it) loses no chunk's last copy.
    async fn wait_safe(
        &self,
        node: usize,
        only: Option<[u8; 20]>,
        patience: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + patience;
        loop {
            match self.safe_to_destroy(node, only) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(format!("skipped: {e}")),
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
    }

    /// Whether every chunk on `node` that an object may need has a good
    /// copy on another node.
    fn safe_to_destroy(&self, node: usize, only: Option<[u8; 20]>) -> Result<(), String> {
        let needed = self.needed_chunks();
        let ids: Vec<[u8; 20]> = match only {
            Some(id) => vec![id],
            None => {
                let dir = self.procs.slot(node).data_dir().join("chunks");
                chunk_files(&dir)
                    .iter()
                    .filter_map(|p| chunk_id_of(p))
                    .collect()
            }
        };
        let flipped = self
            .flipped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let others: Vec<(usize, u32, std::path::PathBuf)> = (0..self.cfg.nodes)
            .filter(|i| *i != node)
            .map(|i| {
                let s = self.procs.slot(i);
                (i, s.generation, s.data_dir().join("chunks"))
            })
            .collect();
        for id in ids {
            let Some(key) = needed.get(&id) else { continue };
            let chunk = dfs::crypto::ChunkId(id);
            let good = others.iter().any(|(i, generation, dir)| {
                !flipped.contains(&(*i, *generation, id))
                    && dir.join(dfs::store::shard_path(&chunk)).exists()
            });
            if !good {
                return Err(format!(
                    "n{} holds the only copy of chunk {} of {key:?}",
                    node + 1,
                    chunk.to_hex()
                ));
            }
        }
        Ok(())
    }

    /// Chunks of every upload that is, or may yet turn out to be, an object:
    /// acknowledged or ended without an answer, and not certainly replaced
    /// by a later acknowledged write; plus uploads in progress.
    fn needed_chunks(&self) -> HashMap<[u8; 20], String> {
        let events = self.history.snapshot();
        let slack = self.cfg.max_skew.as_millis() as u64 + 5;
        let mut last_acked: HashMap<&str, u64> = HashMap::new();
        for e in events.iter().filter(|e| e.outcome.is_ok()) {
            if e.put.is_some() || e.op.kind.name() == "delete" {
                let t = last_acked.entry(e.op.key.as_str()).or_default();
                *t = (*t).max(e.invoke_ms);
            }
        }
        let mut out = HashMap::new();
        for e in &events {
            let Some(p) = &e.put else { continue };
            let may_exist = e.outcome == Outcome::Ok || p.sent_all;
            let replaced = last_acked
                .get(e.op.key.as_str())
                .is_some_and(|t| *t > e.complete_ms + slack);
            if may_exist && !replaced {
                for c in &p.chunks {
                    out.insert(*c, e.op.key.clone());
                }
            }
        }
        let inflight = self
            .workload
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for chunks in inflight.values() {
            for c in chunks {
                out.entry(*c)
                    .or_insert_with(|| "an upload in progress".into());
            }
        }
        out
    }

    pub fn records(&self) -> Vec<FaultRecord> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The chunk id a chunk file is named after.
pub fn chunk_id_of(path: &std::path::Path) -> Option<[u8; 20]> {
    let name = path.file_name()?.to_str()?;
    let raw = hex::decode(name).ok()?;
    raw.try_into().ok()
}

fn one_based(pairs: &[(usize, usize)]) -> Vec<(usize, usize)> {
    pairs.iter().map(|(a, b)| (a + 1, b + 1)).collect()
}
