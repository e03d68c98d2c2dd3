//! Check 5: every chunk of every live object has R verified copies on
//! distinct live nodes.
//!
//! The harness knows each object's chunk ids without asking the cluster:
//! it generated the data and holds the cluster key, so it cuts the data at
//! the chunk size and computes each id as the nodes do. It then looks in
//! every node's data directory (one per node: distinct directories are
//! distinct nodes, whatever ids they answer to) and counts a copy only if
//! the file decrypts and hashes back to its id. What this proves: the bytes
//! are on disk, verified, on R different machines. What it cannot see: a
//! copy that a node's index or memory believes in but the disk lacks is
//! simply not counted, which is the point.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, SystemTime},
};

use dfs::crypto::{ChunkId, Keys};
use tokio::time::Instant;

use super::{
    Violations,
    model::{Identity, Model},
};
use crate::{history::Seen, procs::Procs};

/// A chunk file's identity for the verification cache: re-verified only
/// when it changed.
type FileStamp = (usize, u32, [u8; 20], u64, Option<SystemTime>);

/// A chunk short of copies: id, object key, index in the object, where its copies are.
type Short = ([u8; 20], String, usize, Vec<String>);

/// Chunks of live objects: id -> (key, index in the object).
fn needed(model: &Model, listing: &[Seen]) -> BTreeMap<[u8; 20], (String, usize)> {
    let mut out = BTreeMap::new();
    for s in listing {
        if let Identity::Upload(w) = model.identify(s, None)
            && let Some(p) = w.put()
        {
            for (i, c) in p.chunks.iter().enumerate() {
                out.entry(*c).or_insert_with(|| (s.key.clone(), i));
            }
        }
    }
    out
}

/// Polls until every needed chunk has `r` verified copies or `deadline`
/// passes; then reports what is short, one violation per object.
pub async fn check(
    model: &Model<'_>,
    listing: &[Seen],
    procs: &Arc<Procs>,
    keys: &Keys,
    r: usize,
    deadline: Instant,
    violations: &Violations,
) -> usize {
    let need = needed(model, listing);
    let mut cache: HashMap<FileStamp, bool> = HashMap::new();
    loop {
        let short = count_short(&need, procs, keys, r, &mut cache).await;
        if short.is_empty() {
            return need.len();
        }
        if Instant::now() >= deadline {
            report(&short, r, violations);
            return need.len();
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Chunks with fewer than `r` good copies, with where their copies are
/// ("n1" good, "n3!" present but failing verification).
async fn count_short(
    need: &BTreeMap<[u8; 20], (String, usize)>,
    procs: &Arc<Procs>,
    keys: &Keys,
    r: usize,
    cache: &mut HashMap<FileStamp, bool>,
) -> Vec<Short> {
    // Live nodes only: a node that did not come back holds no copy that counts.
    let dirs: Vec<(usize, u32, std::path::PathBuf)> = (0..procs.slots.len())
        .filter_map(|i| {
            let s = procs.slot(i);
            s.child
                .is_some()
                .then(|| (i, s.generation, s.data_dir().join("chunks")))
        })
        .collect();
    let mut short = Vec::new();
    for (id, (key, index)) in need {
        let chunk = ChunkId(*id);
        let mut copies = Vec::new();
        let mut good = 0;
        for (i, generation, dir) in &dirs {
            let path = dir.join(dfs::store::shard_path(&chunk));
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let stamp = (*i, *generation, *id, meta.len(), meta.modified().ok());
            let ok = match cache.get(&stamp) {
                Some(ok) => *ok,
                None => {
                    let ok = verify(keys, &path, chunk).await;
                    cache.insert(stamp, ok);
                    ok
                }
            };
            good += usize::from(ok);
            copies.push(format!("n{}{}", i + 1, if ok { "" } else { "!" }));
        }
        if good < r {
            short.push((*id, key.clone(), *index, copies));
        }
    }
    short
}

async fn verify(keys: &Keys, path: &std::path::Path, id: ChunkId) -> bool {
    let keys = keys.clone();
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        std::fs::read(&path).is_ok_and(|bytes| keys.verify_sealed(&bytes, &id).is_ok())
    })
    .await
    .unwrap_or(false)
}

fn report(short: &[Short], r: usize, violations: &Violations) {
    let mut by_key: BTreeMap<&str, Vec<&Short>> = BTreeMap::new();
    for s in short {
        by_key.entry(s.1.as_str()).or_default().push(s);
    }
    for (key, chunks) in by_key {
        let (id, _, index, copies) = chunks[0];
        violations.add(5, format!(
            "{key:?}: {} chunk(s) with fewer than {r} verified copies after healing, e.g. chunk #{index} {} on [{}] (\"!\" = present but fails verification)",
            chunks.len(),
            hex::encode(id),
            copies.join(", ")
        ));
    }
}
