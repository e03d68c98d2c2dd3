//! The index merge, as a state machine under proptest: records (objects and
//! tombstones) applied to any number of replicas, in any order, any number
//! of times, with replicas pulling from each other the way IndexSync does
//! and being closed and reopened in between, must leave every replica with
//! the same records, the same chunk reference counts and the same live
//! chunk ids as a model that simply keeps the largest version of each key.
//!
//! One precondition, which the nodes guarantee: a version (hybrid clock
//! reading, origin node id) names one write. Two different records with the
//! same key and the same version would be a broken clock, not a merge case.

use std::collections::{BTreeMap, HashMap};

use dfs::{
    crypto::ChunkId,
    index::{Index, compare_versions},
    proto::{ObjectRecord, Version},
};
use proptest::prelude::*;

/// Chunk ids are drawn from a small pool so that objects share chunks.
const CHUNK_POOL: u8 = 12;
/// The smallest chunk size a record may name.
const CHUNK_SIZE: u32 = dfs::config::MIN_CHUNK_SIZE as u32;
const KEYS: &[&str] = &["a", "a/b", "b", "c", "k"];
const NODES: &[&str] = &["n1", "n2", "n3"];

fn record(key: usize, hlc: u64, node: usize, deleted: bool, chunks: &[u8]) -> ObjectRecord {
    let chunk_ids: Vec<u8> = if deleted {
        Vec::new()
    } else {
        chunks.iter().flat_map(|c| [*c; 20]).collect()
    };
    ObjectRecord {
        key: KEYS[key].into(),
        size: if deleted {
            0
        } else {
            chunks.len() as u64 * CHUNK_SIZE as u64
        },
        // The content's hash: equal chunk lists, equal sha1.
        sha1: {
            let mut s = [0u8; 20];
            for (i, c) in chunks.iter().enumerate() {
                s[i % 20] = s[i % 20].wrapping_mul(31).wrapping_add(*c + 1);
            }
            s.to_vec().into()
        },
        chunk_size: CHUNK_SIZE,
        chunk_ids: chunk_ids.into(),
        version: Some(Version {
            hlc,
            node_id: NODES[node].into(),
        }),
        deleted,
        ..Default::default()
    }
}

/// A set of records with distinct (key, version) pairs.
fn records() -> impl Strategy<Value = Vec<ObjectRecord>> {
    prop::collection::vec(
        (
            0..KEYS.len(),
            1u64..40,
            0..NODES.len(),
            prop::bool::weighted(0.25),
            prop::collection::vec(0..CHUNK_POOL, 0..5),
        ),
        1..14,
    )
    .prop_map(|raw| {
        let mut seen = std::collections::HashSet::new();
        raw.into_iter()
            .filter(|(k, hlc, n, _, _)| seen.insert((*k, *hlc, *n)))
            .map(|(k, hlc, n, del, chunks)| record(k, hlc, n, del, &chunks))
            .collect()
    })
}

/// One step of the machine.
#[derive(Debug, Clone)]
enum Step {
    /// Replica applies record (index into the set), as from a client or a push.
    Apply { replica: usize, record: usize },
    /// Replica `to` pulls everything `from` holds, page by page (IndexSync).
    Sync { from: usize, to: usize, page: usize },
    /// Replica is closed and opened again from disk.
    Reopen { replica: usize },
}

fn steps(replicas: usize, records: usize) -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        6 => (0..replicas, 0..records).prop_map(|(replica, record)| Step::Apply { replica, record }),
        2 => (0..replicas, 0..replicas, 1usize..4).prop_map(|(from, to, page)| Step::Sync { from, to, page }),
        1 => (0..replicas).prop_map(|replica| Step::Reopen { replica }),
    ];
    prop::collection::vec(step, 0..40)
}

/// A replica: its index on disk, and the model of what it should hold.
struct Replica {
    dir: tempfile::TempDir,
    index: Index,
    model: BTreeMap<String, ObjectRecord>,
}

impl Replica {
    fn new() -> Self {
        // redb fsyncs every commit: tmpfs keeps a few thousand commits fast.
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            tempfile::Builder::new()
                .prefix("dfs-merge-")
                .tempdir_in("/dev/shm")
        } else {
            tempfile::tempdir()
        }
        .expect("temp dir");
        let index = Index::open(&dir.path().join("index.redb")).expect("open index");
        Self {
            dir,
            index,
            model: BTreeMap::new(),
        }
    }

    fn apply(&mut self, r: &ObjectRecord) {
        let applied = self.index.apply(r).expect("apply");
        let newer = self.model.get(&r.key).is_none_or(|old| {
            compare_versions(r.version.as_ref(), old.version.as_ref())
                == std::cmp::Ordering::Greater
        });
        assert_eq!(applied, newer, "apply of {:?} {:?}", r.key, r.version);
        if newer {
            self.model.insert(r.key.clone(), r.clone());
        }
    }

    fn reopen(&mut self) {
        let path = self.dir.path().join("index.redb");
        // Drop the open database before opening it again.
        self.index = Index::open(&self.dir.path().join("other.redb")).expect("open spare");
        self.index = Index::open(&path).expect("reopen index");
    }

    /// Every record the index holds, through the paged sync call.
    fn all_records(&self, page: usize) -> Vec<ObjectRecord> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let (batch, more) = self
                .index
                .records_after(after.as_deref(), page, dfs::index::PAGE_BYTES)
                .expect("records_after");
            after = batch.last().map(|r| r.key.clone()).or(after);
            out.extend(batch);
            if !more {
                return out;
            }
        }
    }

    /// Checks the index against this replica's model: records, live
    /// listing, reference counts, live chunk ids, SHA-1 lookups.
    fn check(&self) {
        let held = self.all_records(1000);
        let expected: Vec<&ObjectRecord> = self.model.values().collect();
        assert_eq!(
            held.iter().collect::<Vec<_>>(),
            expected,
            "records differ from the model"
        );
        let live: Vec<&ObjectRecord> = expected.iter().copied().filter(|r| !r.deleted).collect();
        // A listing describes objects without their chunk lists (it keeps
        // the count): compare it with the model's records in that form.
        let listed = self.index.list("", None, 1000).expect("list").records;
        let described: Vec<ObjectRecord> = live
            .iter()
            .map(|r| ObjectRecord {
                chunk_count: r.chunk_count() as u64,
                chunk_ids: Default::default(),
                ..(*r).clone()
            })
            .collect();
        assert_eq!(listed, described, "live listing");
        assert_eq!(self.index.live_objects().unwrap(), live.len() as u64);
        let mut refs: HashMap<u8, u64> = HashMap::new();
        for r in &live {
            for id in r.chunk_id_list() {
                *refs.entry(id.0[0]).or_default() += 1;
            }
        }
        for c in 0..CHUNK_POOL {
            let want = refs.get(&c).copied().unwrap_or(0);
            assert_eq!(
                self.index.chunk_refs(&ChunkId([c; 20])).unwrap(),
                want,
                "refs of chunk {c}"
            );
        }
        let mut live_ids: Vec<u8> = refs.keys().copied().collect();
        live_ids.sort_unstable();
        let indexed: Vec<u8> = self
            .index
            .referenced_chunks(None, 1000)
            .unwrap()
            .iter()
            .map(|id| id.0[0])
            .collect();
        assert_eq!(indexed, live_ids, "live chunk ids");
        for r in &live {
            let sha1: [u8; 20] = r.sha1.as_ref().try_into().unwrap();
            let found = self
                .index
                .get_by_sha1(&sha1)
                .unwrap()
                .expect("a live object is found by its sha1");
            assert_eq!(found.sha1, r.sha1);
        }
    }
}

fn run(records: &[ObjectRecord], replicas: usize, steps: &[Step]) {
    let mut nodes: Vec<Replica> = (0..replicas).map(|_| Replica::new()).collect();
    for step in steps {
        match step {
            Step::Apply { replica, record } => {
                let r = &records[record % records.len()];
                nodes[*replica].apply(r);
                nodes[*replica].check();
            }
            Step::Sync { from, to, page } => {
                let pulled = nodes[*from].all_records(*page);
                for r in &pulled {
                    nodes[*to].apply(r);
                }
                nodes[*to].check();
            }
            Step::Reopen { replica } => {
                nodes[*replica].reopen();
                nodes[*replica].check();
            }
        }
    }
    // Every replica then gets every record (again, in reverse order for
    // good measure) and one full exchange: all must be equal and equal to
    // the model of the whole set.
    for node in nodes.iter_mut() {
        for r in records.iter().rev() {
            node.apply(r);
        }
    }
    for i in 0..replicas {
        for j in 0..replicas {
            let pulled = nodes[j].all_records(2);
            for r in &pulled {
                nodes[i].apply(r);
            }
        }
    }
    let mut global = Replica::new();
    for r in records {
        global.apply(r);
    }
    for node in &nodes {
        node.check();
        assert_eq!(
            node.model, global.model,
            "replicas did not converge to the last writer of each key"
        );
        assert_eq!(node.all_records(3), global.all_records(1000));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn any_order_any_repetition_any_replicas_converge(
        (records, replicas, steps) in records().prop_flat_map(|records| {
            let n = records.len();
            (Just(records), 1usize..5).prop_flat_map(move |(records, replicas)| {
                (Just(records), Just(replicas), steps(replicas, n))
            })
        })
    ) {
        run(&records, replicas, &steps);
    }
}

#[test]
fn a_tombstone_and_a_newer_write_converge_in_either_order() {
    let older = record(0, 5, 0, false, &[1, 2, 2]);
    let tomb = record(0, 6, 1, true, &[]);
    let newer = record(0, 7, 0, false, &[3]);
    let orders = [
        vec![older.clone(), tomb.clone(), newer.clone()],
        vec![newer.clone(), tomb.clone(), older.clone()],
        vec![tomb.clone(), newer.clone(), older.clone(), tomb.clone()],
    ];
    for order in orders {
        let mut r = Replica::new();
        for rec in &order {
            r.apply(rec);
        }
        r.check();
        assert_eq!(r.index.chunk_refs(&ChunkId([2; 20])).unwrap(), 0);
        assert_eq!(r.index.chunk_refs(&ChunkId([3; 20])).unwrap(), 1);
    }
}
