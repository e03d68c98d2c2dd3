//! What one run does: cluster shape, timers, workload and fault mix.

use std::{path::PathBuf, time::Duration};

/// The fault kinds the harness knows, by the name used on the command line.
pub const FAULT_KINDS: &[&str] = &[
    "kill",
    "stop",
    "partition",
    "replace",
    "forget",
    "skew",
    "full",
    "flip",
];

/// The operation kinds the workload knows, by the name used on the command line.
pub const OP_KINDS: &[&str] = &[
    "put", "pause", "cancel", "delete", "get", "range", "stat", "list",
];

/// Timers every node runs with: seconds instead of minutes, so that
/// failure detection, sync, repair and garbage collection all happen many
/// times in a short run.
#[derive(Debug, Clone)]
pub struct Timers {
    pub dead_after: Duration,
    pub sync_interval: Duration,
    pub repair_interval: Duration,
    pub gc_grace: Duration,
    pub gc_interval: Duration,
    pub shutdown_grace: Duration,
}

impl Default for Timers {
    fn default() -> Self {
        Self {
            dead_after: Duration::from_secs(3),
            sync_interval: Duration::from_secs(2),
            repair_interval: Duration::from_secs(2),
            gc_grace: Duration::from_secs(6),
            gc_interval: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

impl Timers {
    /// How long after the last fault the cluster is given before a read is
    /// held to "any node serves any object": failure detection both ways,
    /// two sync rounds and a repair pass.
    pub fn settle(&self) -> Duration {
        self.dead_after * 2 + self.sync_interval * 2 + self.repair_interval + Duration::from_secs(2)
    }
}

/// Everything that decides a run. Same config and same seed: same schedule.
#[derive(Debug, Clone)]
pub struct Config {
    pub seed: u64,
    /// How long operations and faults are issued; healing and checking follow.
    pub duration: Duration,
    pub nodes: usize,
    pub replicas: usize,
    pub clients: usize,
    /// Enabled fault kinds (names from [`FAULT_KINDS`]).
    pub faults: Vec<String>,
    /// Enabled operation kinds (names from [`OP_KINDS`]).
    pub ops: Vec<String>,
    pub chunk_size: u64,
    /// Largest upload the workload makes.
    pub max_size: u64,
    pub timers: Timers,
    /// Largest difference between two nodes' clocks the harness creates;
    /// offsets are drawn within plus or minus half of it.
    pub max_skew: Duration,
    /// Most nodes under a process fault (killed, stopped, restarting) at once.
    pub max_down: usize,
    /// Least time between two faults that destroy data (replace, forget, flip).
    pub destroy_gap: Duration,
    /// How long the healed cluster may take to converge and repair.
    pub heal_timeout: Duration,
    /// Peak resident memory a node may reach (check 6).
    pub rss_bound: u64,
    /// How long the harness waits for one operation before giving up.
    pub op_timeout: Duration,
    pub dfs_bin: PathBuf,
    pub out_dir: PathBuf,
    /// First three octets of the node addresses: node i is `<net>.<i+1>`.
    pub net: String,
    /// Node i runs as uid `uid_base + i + 1`, so partitions can match its
    /// packets by owner (its outgoing connections leave from 127.0.0.1).
    pub uid_base: u32,
    pub grpc_port: u16,
    pub p2p_port: u16,
}

impl Config {
    pub fn fault_enabled(&self, kind: &str) -> bool {
        self.faults.iter().any(|f| f == kind)
    }

    pub fn op_enabled(&self, kind: &str) -> bool {
        self.ops.iter().any(|o| o == kind)
    }

    /// The replication factor in effect: R is capped at the cluster size.
    pub fn effective_replicas(&self) -> usize {
        self.replicas.min(self.nodes)
    }
}

/// Parses a comma-separated list of kinds against the known names; `all`
/// means every kind.
pub fn parse_kinds(text: &str, known: &[&str]) -> Result<Vec<String>, String> {
    if text.trim() == "all" {
        return Ok(known.iter().map(|s| s.to_string()).collect());
    }
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if part == "none" {
            continue;
        }
        if !known.contains(&part) {
            return Err(format!("unknown kind {part:?}; known: {}", known.join(",")));
        }
        if !out.iter().any(|o| o == part) {
            out.push(part.to_owned());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_all_none_and_lists() {
        assert_eq!(parse_kinds("all", FAULT_KINDS).unwrap().len(), 8);
        assert!(parse_kinds("none", FAULT_KINDS).unwrap().is_empty());
        assert_eq!(
            parse_kinds("kill, stop,kill", FAULT_KINDS).unwrap(),
            ["kill", "stop"]
        );
        assert!(parse_kinds("kil", FAULT_KINDS).is_err());
    }
}
