//! Drawing the workload: which client does what, to which key, through
//! which node, when.

use crate::{
    config::Config,
    plan::{OpKind, PlannedOp, hot_key, hot_key_count},
    rng::Rng,
};

/// Mean time between two operations of one client, in milliseconds.
const MEAN_THINK_MS: u64 = 400;
/// Keys of its own a client cycles through: bounds the live data (and the
/// final read of every object through every node) in long runs; in short
/// ones every upload of this kind gets a new key.
const OWN_KEYS_PER_CLIENT: usize = 48;

/// Relative frequency of each operation kind (see `config::OP_KINDS`).
fn op_weight(kind: &str) -> u64 {
    match kind {
        "put" => 28,
        "get" => 22,
        "range" => 10,
        "stat" => 10,
        "delete" => 9,
        "list" => 6,
        "pause" => 3,
        "cancel" => 3,
        _ => 0,
    }
}

/// Draws every client's operations, merged in time order so that a read can
/// name a key that an earlier-planned upload of any client created.
pub fn generate_ops(cfg: &Config, rng: &mut Rng) -> Vec<PlannedOp> {
    let kinds = crate::config::OP_KINDS;
    let weights: Vec<u64> = kinds
        .iter()
        .map(|k| if cfg.op_enabled(k) { op_weight(k) } else { 0 })
        .collect();
    let end = cfg.duration.as_millis() as u64;
    let mut next_at: Vec<u64> = (0..cfg.clients).map(|_| rng.range(200, 800)).collect();
    let mut fresh = OwnKeys {
        names: Vec::new(),
        mine: vec![Vec::new(); cfg.clients],
        next: vec![0; cfg.clients],
    };
    let mut ops = Vec::new();
    loop {
        let (client, at) = next_at
            .iter()
            .copied()
            .enumerate()
            .min_by_key(|(c, t)| (*t, *c))
            .expect("at least one client");
        if at >= end {
            break;
        }
        next_at[client] = at + rng.range(MEAN_THINK_MS / 4, MEAN_THINK_MS * 7 / 4);
        let Some(k) = rng.weighted(&weights) else {
            break;
        };
        let node = rng.below(cfg.nodes as u64) as usize;
        let (key, kind) = draw_op(cfg, rng, kinds[k], client, &mut fresh);
        ops.push(PlannedOp {
            id: ops.len() as u64,
            client,
            at_ms: at,
            node,
            key,
            kind,
        });
    }
    ops
}

/// The clients' own keys planned so far.
struct OwnKeys {
    /// Every distinct own key uploaded before, in order of first use.
    names: Vec<String>,
    /// Per client, its own keys in order of first use.
    mine: Vec<Vec<String>>,
    /// Per client, how many own-key uploads it planned.
    next: Vec<usize>,
}

/// A key for an upload: a hot key, or a key of this client's own: a new one
/// (numbered across all clients) until it has `OWN_KEYS_PER_CLIENT`, then
/// its old ones again in turn.
fn upload_key(rng: &mut Rng, client: usize, fresh: &mut OwnKeys) -> String {
    if rng.chance(0.45) {
        return hot_key(rng.below(hot_key_count()));
    }
    let n = fresh.next[client];
    fresh.next[client] += 1;
    if n >= OWN_KEYS_PER_CLIENT {
        return fresh.mine[client][n % OWN_KEYS_PER_CLIENT].clone();
    }
    let key = format!("f/c{client}/{}", fresh.names.len());
    fresh.names.push(key.clone());
    fresh.mine[client].push(key.clone());
    key
}

/// A key to read or delete: a hot key or any key uploaded before.
fn existing_key(rng: &mut Rng, fresh: &OwnKeys) -> String {
    let names = &fresh.names;
    if names.is_empty() || rng.chance(0.5) {
        hot_key(rng.below(hot_key_count()))
    } else {
        names[rng.below(names.len() as u64) as usize].clone()
    }
}

fn draw_op(
    cfg: &Config,
    rng: &mut Rng,
    kind: &str,
    client: usize,
    fresh: &mut OwnKeys,
) -> (String, OpKind) {
    let chunk = cfg.chunk_size;
    match kind {
        "put" => (
            upload_key(rng, client, fresh),
            OpKind::Put {
                size: draw_size(cfg, rng),
            },
        ),
        "pause" => {
            // Past at least one whole chunk, so written chunks wait for their
            // record through the pause.
            let size = rng
                .range(2 * chunk, 12 * chunk)
                .min(cfg.max_size.max(2 * chunk));
            let pause_after = rng.range(chunk, size - 1);
            let grace = cfg.timers.gc_grace.as_millis() as u64;
            let tick = cfg.timers.gc_interval.as_millis() as u64;
            let pause_ms = grace + 2 * tick + rng.range(500, grace);
            (
                upload_key(rng, client, fresh),
                OpKind::PausedPut {
                    size,
                    pause_after,
                    pause_ms,
                },
            )
        }
        "cancel" => {
            let size = rng.range(2 * chunk, 8 * chunk);
            let cancel_after = rng.range(1, size - 1);
            (
                upload_key(rng, client, fresh),
                OpKind::CancelledPut { size, cancel_after },
            )
        }
        "delete" => (existing_key(rng, fresh), OpKind::Delete),
        "get" => (existing_key(rng, fresh), OpKind::Get),
        "range" => (
            existing_key(rng, fresh),
            OpKind::GetRange {
                a: rng.next_u64(),
                b: rng.next_u64(),
            },
        ),
        "stat" => (existing_key(rng, fresh), OpKind::Stat),
        "list" => {
            let prefix = match rng.below(3) {
                0 => String::new(),
                1 => "h/".to_owned(),
                _ => format!("f/c{}/", rng.below(cfg.clients as u64)),
            };
            (prefix.clone(), OpKind::List { prefix })
        }
        other => unreachable!("unknown op kind {other}"),
    }
}

/// Upload sizes: empty, under one chunk, a few chunks (exact multiples
/// included), many chunks.
fn draw_size(cfg: &Config, rng: &mut Rng) -> u64 {
    let chunk = cfg.chunk_size;
    match rng.below(100) {
        0..=6 => 0,
        7..=36 => rng.range(1, chunk - 1),
        37..=44 => chunk * rng.range(1, 4),
        45..=74 => rng.range(chunk + 1, 4 * chunk),
        _ => rng.range(4 * chunk, cfg.max_size.max(4 * chunk)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_are_time_ordered_and_name_known_keys() {
        let cfg = crate::plan::tests_support::config(3);
        let ops = generate_ops(&cfg, &mut Rng::new(3));
        assert!(ops.len() > 100);
        assert!(ops.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
        let mut seen = std::collections::HashSet::new();
        for op in &ops {
            match &op.kind {
                OpKind::Put { .. } | OpKind::PausedPut { .. } | OpKind::CancelledPut { .. } => {
                    seen.insert(op.key.clone());
                }
                OpKind::List { .. } => {}
                _ => assert!(
                    op.key.starts_with("h/") || seen.contains(&op.key),
                    "{op:?} names a key no earlier upload used"
                ),
            }
        }
        for kind in crate::config::OP_KINDS {
            assert!(ops.iter().any(|o| o.kind.name() == *kind), "no {kind} op");
        }
    }
}

#[cfg(test)]
mod long_run_tests {
    use super::*;

    #[test]
    fn long_runs_cycle_through_a_bounded_set_of_keys() {
        let mut cfg = crate::plan::tests_support::config(9);
        cfg.duration = std::time::Duration::from_secs(1800);
        let ops = generate_ops(&cfg, &mut Rng::new(9));
        let keys: std::collections::HashSet<&str> = ops.iter().map(|o| o.key.as_str()).collect();
        assert!(ops.len() > 10_000);
        // Own keys, hot keys, and the list prefixes.
        assert!(
            keys.len() <= cfg.clients * OWN_KEYS_PER_CLIENT + 4 + cfg.clients + 2,
            "{} keys",
            keys.len()
        );
    }
}
