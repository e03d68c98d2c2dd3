//! The schedule: every operation and every fault of a run, drawn from the
//! seed before anything starts. Same seed and config, same plan; what the
//! cluster answers may differ from run to run, what the harness asks does not.

use serde_json::{Value, json};

use crate::{config::Config, rng::Rng};

/// Time from the start of the run before the first fault: the cluster
/// forms and the first objects exist.
const WARMUP_MS: u64 = 3_000;
/// Number of hot keys that every client overwrites, deletes and reads.
const HOT_KEYS: u64 = 4;

/// What an operation does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpKind {
    Put {
        size: u64,
    },
    /// An upload that stops sending after `pause_after` bytes for `pause_ms`,
    /// longer than the GC grace, then sends the rest.
    PausedPut {
        size: u64,
        pause_after: u64,
        pause_ms: u64,
    },
    /// An upload that the client abandons after `cancel_after` bytes.
    CancelledPut {
        size: u64,
        cancel_after: u64,
    },
    Delete,
    Get,
    /// A ranged read; the range is drawn from `a` and `b` against the size
    /// the harness last saw acknowledged for the key.
    GetRange {
        a: u64,
        b: u64,
    },
    Stat,
    List {
        prefix: String,
    },
}

impl OpKind {
    pub fn name(&self) -> &'static str {
        match self {
            OpKind::Put { .. } => "put",
            OpKind::PausedPut { .. } => "pause",
            OpKind::CancelledPut { .. } => "cancel",
            OpKind::Delete => "delete",
            OpKind::Get => "get",
            OpKind::GetRange { .. } => "range",
            OpKind::Stat => "stat",
            OpKind::List { .. } => "list",
        }
    }
}

/// One client operation at a planned time through a planned node.
#[derive(Debug, Clone)]
pub struct PlannedOp {
    pub id: u64,
    pub client: usize,
    /// Milliseconds after the start of the run.
    pub at_ms: u64,
    pub node: usize,
    pub key: String,
    pub kind: OpKind,
}

/// Which packets a partition drops: `(from, to)` means node `from` cannot
/// send to node `to`'s peer port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub shape: &'static str,
    pub blocked: Vec<(usize, usize)>,
}

/// What a fault does.
#[derive(Debug, Clone, PartialEq)]
pub enum FaultKind {
    Kill { node: usize },
    Stop { node: usize },
    Partition(Partition),
    Replace { node: usize },
    Forget { node: usize },
    Skew { node: usize, offset_ms: i64 },
    Full { node: usize },
    Flip { node: usize, pick: u64 },
}

impl FaultKind {
    pub fn name(&self) -> &'static str {
        match self {
            FaultKind::Kill { .. } => "kill",
            FaultKind::Stop { .. } => "stop",
            FaultKind::Partition(_) => "partition",
            FaultKind::Replace { .. } => "replace",
            FaultKind::Forget { .. } => "forget",
            FaultKind::Skew { .. } => "skew",
            FaultKind::Full { .. } => "full",
            FaultKind::Flip { .. } => "flip",
        }
    }

    /// The node a process-level fault acts on.
    pub fn node(&self) -> Option<usize> {
        match self {
            FaultKind::Kill { node }
            | FaultKind::Stop { node }
            | FaultKind::Replace { node }
            | FaultKind::Forget { node }
            | FaultKind::Skew { node, .. }
            | FaultKind::Full { node }
            | FaultKind::Flip { node, .. } => Some(*node),
            FaultKind::Partition(_) => None,
        }
    }

    /// Faults that destroy stored data: spaced out, and never allowed to
    /// take the last copy of a chunk (see `nemesis`).
    pub fn destroys_data(&self) -> bool {
        matches!(
            self,
            FaultKind::Replace { .. } | FaultKind::Forget { .. } | FaultKind::Flip { .. }
        )
    }
}

/// One fault: starts at `at_ms`, is undone `dur_ms` later (0 for instant ones).
#[derive(Debug, Clone)]
pub struct PlannedFault {
    pub id: u64,
    pub at_ms: u64,
    pub dur_ms: u64,
    pub kind: FaultKind,
}

/// The whole schedule of a run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub ops: Vec<PlannedOp>,
    pub faults: Vec<PlannedFault>,
}

impl Plan {
    /// Draws the schedule for `cfg` from `cfg.seed`.
    pub fn generate(cfg: &Config) -> Self {
        Self {
            ops: crate::plan_ops::generate_ops(cfg, &mut Rng::stream(cfg.seed, 1)),
            faults: generate_faults(cfg, &mut Rng::stream(cfg.seed, 2)),
        }
    }

    /// The plan as JSON, written next to the history.
    pub fn to_json(&self) -> Value {
        json!({
            "ops": self.ops.iter().map(op_json).collect::<Vec<_>>(),
            "faults": self.faults.iter().map(fault_json).collect::<Vec<_>>(),
        })
    }

    /// A short fingerprint of the plan: equal fingerprints, equal schedules.
    pub fn digest(&self) -> String {
        let text = self.to_json().to_string();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in text.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        format!("{h:016x}")
    }
}

pub fn op_json(op: &PlannedOp) -> Value {
    let mut v = json!({
        "id": op.id, "client": op.client, "at_ms": op.at_ms, "node": op.node,
        "key": op.key, "kind": op.kind.name(),
    });
    match &op.kind {
        OpKind::Put { size } => v["size"] = json!(size),
        OpKind::PausedPut {
            size,
            pause_after,
            pause_ms,
        } => {
            v["size"] = json!(size);
            v["pause_after"] = json!(pause_after);
            v["pause_ms"] = json!(pause_ms);
        }
        OpKind::CancelledPut { size, cancel_after } => {
            v["size"] = json!(size);
            v["cancel_after"] = json!(cancel_after);
        }
        OpKind::GetRange { a, b } => v["range_draw"] = json!([a, b]),
        OpKind::List { prefix } => v["prefix"] = json!(prefix),
        OpKind::Delete | OpKind::Get | OpKind::Stat => {}
    }
    v
}

pub fn fault_json(f: &PlannedFault) -> Value {
    let mut v = json!({"id": f.id, "at_ms": f.at_ms, "dur_ms": f.dur_ms, "kind": f.kind.name()});
    if let Some(n) = f.kind.node() {
        v["node"] = json!(n);
    }
    match &f.kind {
        FaultKind::Partition(p) => {
            v["shape"] = json!(p.shape);
            v["blocked"] = json!(p.blocked);
        }
        FaultKind::Skew { offset_ms, .. } => v["offset_ms"] = json!(offset_ms),
        FaultKind::Flip { pick, .. } => v["pick"] = json!(pick),
        _ => {}
    }
    v
}

/// The hot keys.
pub fn hot_key(i: u64) -> String {
    format!("h/{i}")
}

pub fn hot_key_count() -> u64 {
    HOT_KEYS
}

/// What the faults drawn so far occupy.
#[derive(Default)]
struct Occupancy {
    /// Per node: when it is free for its next process fault.
    node_free: Vec<u64>,
    /// Intervals of process faults (with their settle time), any node.
    busy: Vec<(u64, u64)>,
    partition_free: u64,
    last_destroy: Option<u64>,
}

impl Occupancy {
    /// Books `kind` from `t` for `dur` ms.
    fn reserve(&mut self, kind: &FaultKind, t: u64, dur: u64) {
        if kind.destroys_data() {
            self.last_destroy = Some(t);
        }
        match kind {
            FaultKind::Partition(_) => self.partition_free = t + dur + 500,
            FaultKind::Flip { .. } => {}
            other => {
                let n = other.node().expect("process faults have a node");
                // A restarted node needs a moment before its next fault;
                // faults that restart it gracefully twice need more (each
                // SIGTERM may wait out in-flight calls).
                let settle = match other {
                    FaultKind::Skew { .. } | FaultKind::Full { .. } => 8_000,
                    _ => 1_500,
                };
                self.node_free[n] = t + dur + settle;
                self.busy.push((t, t + dur + settle));
            }
        }
    }
}

/// Draws the faults: a fault every few seconds, several overlapping, each
/// on a target that is free (one process fault per node, at most
/// `max_down` at once, one partition at a time, destroying faults spaced by
/// `destroy_gap`). All faults end before `duration`.
fn generate_faults(cfg: &Config, rng: &mut Rng) -> Vec<PlannedFault> {
    let kinds: Vec<&str> = crate::config::FAULT_KINDS.to_vec();
    let weights: Vec<u64> = kinds
        .iter()
        .map(|k| match *k {
            _ if !cfg.fault_enabled(k) => 0,
            "kill" | "partition" => 3,
            "stop" => 2,
            _ => 1,
        })
        .collect();
    let end = cfg.duration.as_millis() as u64;
    let gap = cfg.destroy_gap.as_millis() as u64;
    let mut occ = Occupancy {
        node_free: vec![0; cfg.nodes],
        ..Default::default()
    };
    let mut faults = Vec::new();
    let mut t = WARMUP_MS;
    let mean_gap = 2_500u64;
    loop {
        t += rng.range(mean_gap / 3, mean_gap * 5 / 3);
        let dur = rng.range(1_000, 9_000);
        if t + 1_000 >= end || weights.iter().all(|w| *w == 0) {
            break;
        }
        let destroy_ok = occ.last_destroy.is_none_or(|d| t >= d + gap);
        // A few draws, so a busy target or a too-early destroying fault
        // gives way to another kind instead of leaving a hole.
        let drawn = (0..4).find_map(|_| {
            let k = rng.weighted(&weights)?;
            draw_fault(cfg, rng, kinds[k], t, &occ)
                .filter(|kind| destroy_ok || !kind.destroys_data())
        });
        let Some(kind) = drawn else { continue };
        let dur = match kind {
            FaultKind::Flip { .. } => 0,
            _ => dur.min(end - 500 - t),
        };
        occ.reserve(&kind, t, dur);
        faults.push(PlannedFault {
            id: faults.len() as u64,
            at_ms: t,
            dur_ms: dur,
            kind,
        });
    }
    faults
}

/// Draws one fault of kind `kind` at time `t`, or `None` when no target is
/// free for it.
fn draw_fault(
    cfg: &Config,
    rng: &mut Rng,
    kind: &str,
    t: u64,
    occ: &Occupancy,
) -> Option<FaultKind> {
    if kind == "partition" {
        if t < occ.partition_free || cfg.nodes < 2 {
            return None;
        }
        return Some(FaultKind::Partition(draw_partition(cfg.nodes, rng)));
    }
    let free: Vec<usize> = (0..cfg.nodes).filter(|n| occ.node_free[*n] <= t).collect();
    let down_now = occ.busy.iter().filter(|(s, e)| *s <= t && t < *e).count();
    if free.is_empty() || (kind != "flip" && down_now >= cfg.max_down) {
        return None;
    }
    let node = free[rng.below(free.len() as u64) as usize];
    Some(match kind {
        "kill" => FaultKind::Kill { node },
        "stop" => FaultKind::Stop { node },
        "replace" => FaultKind::Replace { node },
        "forget" => FaultKind::Forget { node },
        "full" => FaultKind::Full { node },
        "flip" => FaultKind::Flip {
            node,
            pick: rng.next_u64(),
        },
        "skew" => {
            let half = (cfg.max_skew.as_millis() / 2) as i64;
            let offset_ms = rng.range(0, 2 * half as u64) as i64 - half;
            FaultKind::Skew { node, offset_ms }
        }
        other => unreachable!("unknown fault kind {other}"),
    })
}

/// A partition shape: one node cut off, two halves, a one-way cut, or a
/// bridge (two halves that only one node still connects).
fn draw_partition(nodes: usize, rng: &mut Rng) -> Partition {
    let mut order: Vec<usize> = (0..nodes).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let shapes: &[&'static str] = if nodes >= 3 {
        &["isolate", "halves", "one-way", "bridge"]
    } else {
        &["isolate", "one-way"]
    };
    let shape = shapes[rng.below(shapes.len() as u64) as usize];
    let cut = |a: &[usize], b: &[usize], both: bool| {
        let mut out = Vec::new();
        for &x in a {
            for &y in b {
                out.push((x, y));
                if both {
                    out.push((y, x));
                }
            }
        }
        out
    };
    let blocked = match shape {
        "isolate" => cut(&order[..1], &order[1..], true),
        "halves" => {
            let k = rng.range(1, nodes as u64 - 1) as usize;
            cut(&order[..k], &order[k..], true)
        }
        "one-way" => {
            let k = rng.range(1, nodes as u64 - 1) as usize;
            cut(&order[..k], &order[k..], false)
        }
        _ => {
            // order[0] is the bridge; the rest split in two that cannot talk.
            let rest = &order[1..];
            let k = rng.range(1, rest.len() as u64 - 1) as usize;
            cut(&rest[..k], &rest[k..], true)
        }
    };
    let mut blocked = blocked;
    blocked.sort_unstable();
    Partition { shape, blocked }
}

#[cfg(test)]
pub mod tests_support {
    use super::*;
    use crate::config::{FAULT_KINDS, OP_KINDS, Timers};
    use std::time::Duration;

    pub fn config(seed: u64) -> Config {
        Config {
            seed,
            duration: Duration::from_secs(60),
            nodes: 5,
            replicas: 3,
            clients: 4,
            faults: FAULT_KINDS.iter().map(|s| s.to_string()).collect(),
            ops: OP_KINDS.iter().map(|s| s.to_string()).collect(),
            chunk_size: 64 << 10,
            max_size: 2 << 20,
            timers: Timers::default(),
            max_skew: Duration::from_secs(4),
            max_down: 2,
            destroy_gap: Duration::from_secs(20),
            heal_timeout: Duration::from_secs(60),
            rss_bound: 512 << 20,
            op_timeout: Duration::from_secs(20),
            dfs_bin: "dfs".into(),
            out_dir: "out".into(),
            net: "127.77.0".into(),
            uid_base: 47700,
            grpc_port: 7100,
            p2p_port: 7200,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::config as test_config;
    use super::*;

    #[test]
    fn same_seed_same_plan_other_seed_other_plan() {
        let a = Plan::generate(&test_config(11));
        let b = Plan::generate(&test_config(11));
        let c = Plan::generate(&test_config(12));
        assert_eq!(a.digest(), b.digest());
        assert_ne!(a.digest(), c.digest());
        assert!(!a.faults.is_empty() && !a.ops.is_empty());
    }

    #[test]
    fn faults_respect_their_limits() {
        for seed in 0..50 {
            let cfg = test_config(seed);
            let plan = Plan::generate(&cfg);
            let end = cfg.duration.as_millis() as u64;
            let mut destroys = Vec::new();
            for f in &plan.faults {
                assert!(f.at_ms + f.dur_ms < end, "fault {f:?} ends after the run");
                if f.kind.destroys_data() {
                    destroys.push(f.at_ms);
                }
            }
            for w in destroys.windows(2) {
                assert!(w[1] - w[0] >= cfg.destroy_gap.as_millis() as u64);
            }
            for f in &plan.faults {
                let overlapping = plan
                    .faults
                    .iter()
                    .filter(|g| !matches!(g.kind, FaultKind::Partition(_) | FaultKind::Flip { .. }))
                    .filter(|g| g.at_ms <= f.at_ms && f.at_ms < g.at_ms + g.dur_ms)
                    .count();
                assert!(
                    overlapping <= cfg.max_down,
                    "seed {seed}: too many down at {f:?}"
                );
            }
        }
    }

    #[test]
    fn partitions_never_block_a_node_from_itself() {
        let mut rng = Rng::new(5);
        for _ in 0..200 {
            let p = draw_partition(5, &mut rng);
            assert!(!p.blocked.is_empty());
            assert!(p.blocked.iter().all(|(a, b)| a != b));
        }
    }
}
