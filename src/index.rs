//! The object index: which keys exist and which chunks make them up.
//!
//! Stored in an embedded redb database (`index.redb` in the data directory).
//! Every change is one redb write transaction committed with
//! `Durability::Immediate`: when [`Index::apply`] returns, the change survives
//! a crash, and a crash before that leaves the previous state whole.
//!
//! Tables:
//! * `objects`: key -> encoded [`ObjectRecord`] (live objects and tombstones);
//! * `by_sha1`: raw SHA-1 -> keys of live objects with that content;
//! * `chunk_refs`: raw chunk id -> number of live-object references, which
//!   the garbage collector reads to find chunks nothing uses;
//! * `meta`: counters and the hybrid logical clock's high-water mark.

use std::{
    cmp::Ordering,
    path::Path,
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use prost::Message;
use redb::{
    Database, MultimapTableDefinition, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};

use crate::{
    crypto::{CHUNK_ID_LEN, ChunkId},
    proto::{ObjectRecord, Version},
};

const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
const BY_SHA1: MultimapTableDefinition<&[u8], &str> = MultimapTableDefinition::new("by_sha1");
const CHUNK_REFS: TableDefinition<&[u8], u64> = TableDefinition::new("chunk_refs");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Chunks whose repair failed: raw chunk id -> (attempts, next try in Unix ms).
const REPAIR_QUEUE: TableDefinition<&[u8], (u32, u64)> = TableDefinition::new("repair_queue");
const META_HLC: &str = "hlc";
const META_LIVE: &str = "live_objects";
const META_KEY_FINGERPRINT: &str = "key_fingerprint";

/// Bits of a clock reading that hold the logical counter; the rest are
/// milliseconds since the Unix epoch.
const HLC_LOGICAL_BITS: u32 = 16;

/// Errors from the index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index database: {0}")]
    Db(#[from] redb::Error),
    #[error("index record for key {key:?} is unreadable: {source}")]
    Decode {
        key: String,
        source: prost::DecodeError,
    },
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for IndexError {
            fn from(e: $t) -> Self { IndexError::Db(e.into()) }
        }
    )*};
}
db_err!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Orders two versions: the hybrid clock first, the origin node id on ties.
pub fn compare_versions(a: Option<&Version>, b: Option<&Version>) -> Ordering {
    let key = |v: Option<&Version>| v.map(|v| (v.hlc, v.node_id.clone())).unwrap_or_default();
    key(a).cmp(&key(b))
}

impl ObjectRecord {
    /// The record's chunk ids, in file order.
    pub fn chunk_id_list(&self) -> impl Iterator<Item = ChunkId> + '_ {
        self.chunk_ids
            .chunks_exact(CHUNK_ID_LEN)
            .filter_map(ChunkId::from_slice)
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> usize {
        self.chunk_ids.len() / CHUNK_ID_LEN
    }
}

/// What one page of a listing returned.
pub struct ListPage {
    pub records: Vec<ObjectRecord>,
    /// Whether more live records follow the last one returned.
    pub more: bool,
}

/// The index of one node.
pub struct Index {
    db: Database,
    /// Highest clock reading issued or seen; guards version monotonicity.
    hlc: Mutex<u64>,
}

impl Index {
    /// Opens or creates the index database at `path`.
    pub fn open(path: &Path) -> Result<Self, IndexError> {
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        let hlc = {
            // Create every table up front so readers never meet a missing one.
            txn.open_table(OBJECTS)?;
            txn.open_multimap_table(BY_SHA1)?;
            txn.open_table(CHUNK_REFS)?;
            txn.open_table(REPAIR_QUEUE)?;
            let meta = txn.open_table(META)?;
            meta.get(META_HLC)?.map(|v| v.value()).unwrap_or(0)
        };
        txn.commit()?;
        Ok(Self {
            db,
            hlc: Mutex::new(hlc),
        })
    }

    /// A new version for a write originating on `node_id`: later than every
    /// version this index has issued or applied, and close to wall time.
    pub fn next_version(&self, node_id: &str) -> Version {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut last = self.hlc.lock().unwrap_or_else(|p| p.into_inner());
        let next = (now_ms << HLC_LOGICAL_BITS).max(*last + 1);
        *last = next;
        Version {
            hlc: next,
            node_id: node_id.to_owned(),
        }
    }

    /// Applies a record if it is newer than what the index holds for its key
    /// (last writer wins). Returns whether it was applied. Chunk reference
    /// counts and the SHA-1 map change in the same transaction.
    pub fn apply(&self, record: &ObjectRecord) -> Result<bool, IndexError> {
        let txn = self.db.begin_write()?;
        {
            let mut objects = txn.open_table(OBJECTS)?;
            let old = match objects.get(record.key.as_str())? {
                Some(bytes) => Some(decode(&record.key, bytes.value())?),
                None => None,
            };
            if let Some(old) = &old
                && compare_versions(record.version.as_ref(), old.version.as_ref())
                    != Ordering::Greater
            {
                return Ok(false);
            }
            let mut by_sha1 = txn.open_multimap_table(BY_SHA1)?;
            let mut refs = txn.open_table(CHUNK_REFS)?;
            let mut meta = txn.open_table(META)?;
            let mut live = meta.get(META_LIVE)?.map(|v| v.value()).unwrap_or(0);
            if let Some(old) = old.as_ref().filter(|o| !o.deleted) {
                by_sha1.remove(old.sha1.as_ref(), old.key.as_str())?;
                for id in old.chunk_id_list() {
                    let n = refs.get(id.0.as_slice())?.map(|v| v.value()).unwrap_or(0);
                    if n <= 1 {
                        refs.remove(id.0.as_slice())?;
                    } else {
                        refs.insert(id.0.as_slice(), n - 1)?;
                    }
                }
                live = live.saturating_sub(1);
            }
            if !record.deleted {
                by_sha1.insert(record.sha1.as_ref(), record.key.as_str())?;
                for id in record.chunk_id_list() {
                    let n = refs.get(id.0.as_slice())?.map(|v| v.value()).unwrap_or(0);
                    refs.insert(id.0.as_slice(), n + 1)?;
                }
                live += 1;
            }
            objects.insert(record.key.as_str(), record.encode_to_vec().as_slice())?;
            meta.insert(META_LIVE, live)?;
            let hlc = record.version.as_ref().map(|v| v.hlc).unwrap_or(0);
            let mut last = self.hlc.lock().unwrap_or_else(|p| p.into_inner());
            *last = (*last).max(hlc);
            meta.insert(META_HLC, *last)?;
        }
        txn.commit()?;
        Ok(true)
    }

    /// The record for `key`, tombstones included.
    pub fn get(&self, key: &str) -> Result<Option<ObjectRecord>, IndexError> {
        let txn = self.db.begin_read()?;
        let objects = txn.open_table(OBJECTS)?;
        match objects.get(key)? {
            Some(bytes) => Ok(Some(decode(key, bytes.value())?)),
            None => Ok(None),
        }
    }

    /// The live object stored under `key`, if any.
    pub fn get_live(&self, key: &str) -> Result<Option<ObjectRecord>, IndexError> {
        Ok(self.get(key)?.filter(|r| !r.deleted))
    }

    /// A live object whose whole-file SHA-1 is `sha1` (the first by key).
    pub fn get_by_sha1(&self, sha1: &[u8; 20]) -> Result<Option<ObjectRecord>, IndexError> {
        let key = {
            let txn = self.db.begin_read()?;
            let by_sha1 = txn.open_multimap_table(BY_SHA1)?;
            let mut keys = by_sha1.get(sha1.as_slice())?;
            match keys.next() {
                Some(k) => k?.value().to_owned(),
                None => return Ok(None),
            }
        };
        self.get_live(&key)
    }

    /// Live objects whose key starts with `prefix`, in key order, starting
    /// after `after` (exclusive), at most `limit` of them.
    pub fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<ListPage, IndexError> {
        let txn = self.db.begin_read()?;
        let objects = txn.open_table(OBJECTS)?;
        let start = match after {
            Some(a) if a >= prefix => a,
            _ => prefix,
        };
        let mut records = Vec::new();
        let mut more = false;
        for entry in objects.range(start..)? {
            let (k, v) = entry?;
            let key = k.value();
            if !key.starts_with(prefix) {
                break;
            }
            if Some(key) == after {
                continue;
            }
            let record = decode(key, v.value())?;
            if record.deleted {
                continue;
            }
            if records.len() == limit {
                more = true;
                break;
            }
            records.push(record);
        }
        Ok(ListPage { records, more })
    }

    /// Every record (tombstones included) in key order after `after`, at most
    /// `limit`: what a peer pulls to reconcile its index with this one.
    pub fn records_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<ObjectRecord>, bool), IndexError> {
        let txn = self.db.begin_read()?;
        let objects = txn.open_table(OBJECTS)?;
        let mut out = Vec::new();
        let range = match after {
            Some(a) => {
                objects.range::<&str>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))?
            }
            None => objects.range::<&str>(..)?,
        };
        for entry in range {
            let (k, v) = entry?;
            if out.len() == limit {
                return Ok((out, true));
            }
            out.push(decode(k.value(), v.value())?);
        }
        Ok((out, false))
    }

    /// Chunk ids referenced by live objects, in id order after `after`, at
    /// most `limit`: what repair walks to find chunks this node should hold.
    pub fn referenced_chunks(
        &self,
        after: Option<&ChunkId>,
        limit: usize,
    ) -> Result<Vec<ChunkId>, IndexError> {
        let txn = self.db.begin_read()?;
        let refs = txn.open_table(CHUNK_REFS)?;
        let range = match after {
            Some(a) => refs.range::<&[u8]>((
                std::ops::Bound::Excluded(a.0.as_slice()),
                std::ops::Bound::Unbounded,
            ))?,
            None => refs.range::<&[u8]>(..)?,
        };
        let mut out = Vec::new();
        for entry in range.take(limit) {
            let (k, _) = entry?;
            if let Some(id) = ChunkId::from_slice(k.value()) {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Puts a chunk on the persistent repair queue, to be retried at
    /// `next_try_ms`; returns the number of attempts so far.
    pub fn queue_repair(
        &self,
        id: &ChunkId,
        backoff: impl Fn(u32) -> u64,
    ) -> Result<u32, IndexError> {
        let txn = self.db.begin_write()?;
        let attempts;
        {
            let mut queue = txn.open_table(REPAIR_QUEUE)?;
            let prev = queue
                .get(id.0.as_slice())?
                .map(|v| v.value().0)
                .unwrap_or(0);
            attempts = prev + 1;
            queue.insert(id.0.as_slice(), (attempts, backoff(attempts)))?;
        }
        txn.commit()?;
        Ok(attempts)
    }

    /// Chunks on the repair queue whose next try is due, at most `limit`.
    pub fn due_repairs(&self, now_ms: u64, limit: usize) -> Result<Vec<ChunkId>, IndexError> {
        let txn = self.db.begin_read()?;
        let queue = txn.open_table(REPAIR_QUEUE)?;
        let mut out = Vec::new();
        for entry in queue.iter()? {
            let (k, v) = entry?;
            if v.value().1 <= now_ms
                && let Some(id) = ChunkId::from_slice(k.value())
            {
                out.push(id);
                if out.len() == limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Removes a chunk from the repair queue (repaired, or no longer needed).
    pub fn repair_done(&self, ids: &[ChunkId]) -> Result<(), IndexError> {
        let txn = self.db.begin_write()?;
        {
            let mut queue = txn.open_table(REPAIR_QUEUE)?;
            for id in ids {
                queue.remove(id.0.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Number of chunks waiting on the repair queue.
    pub fn repair_queue_len(&self) -> Result<u64, IndexError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(REPAIR_QUEUE)?.len()?)
    }

    /// How many live objects reference the chunk.
    pub fn chunk_refs(&self, id: &ChunkId) -> Result<u64, IndexError> {
        let txn = self.db.begin_read()?;
        let refs = txn.open_table(CHUNK_REFS)?;
        Ok(refs.get(id.0.as_slice())?.map(|v| v.value()).unwrap_or(0))
    }

    /// Records the cluster key's fingerprint on first use; afterwards checks
    /// it. Returns the stored fingerprint when it differs.
    pub fn check_key_fingerprint(&self, fingerprint: u64) -> Result<Option<u64>, IndexError> {
        let txn = self.db.begin_write()?;
        let stored = {
            let mut meta = txn.open_table(META)?;
            let stored = meta.get(META_KEY_FINGERPRINT)?.map(|v| v.value());
            if stored.is_none() {
                meta.insert(META_KEY_FINGERPRINT, fingerprint)?;
            }
            stored
        };
        txn.commit()?;
        Ok(stored.filter(|s| *s != fingerprint))
    }

    /// Number of live objects.
    pub fn live_objects(&self) -> Result<u64, IndexError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(meta.get(META_LIVE)?.map(|v| v.value()).unwrap_or(0))
    }
}

fn decode(key: &str, bytes: &[u8]) -> Result<ObjectRecord, IndexError> {
    ObjectRecord::decode(bytes).map_err(|source| IndexError::Decode {
        key: key.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, hlc: u64, node: &str, chunks: &[u8], deleted: bool) -> ObjectRecord {
        ObjectRecord {
            key: key.into(),
            size: chunks.len() as u64,
            sha1: vec![hlc as u8; 20].into(),
            chunk_size: 1,
            chunk_ids: chunks
                .iter()
                .flat_map(|b| [*b; 20])
                .collect::<Vec<u8>>()
                .into(),
            version: Some(Version {
                hlc,
                node_id: node.into(),
            }),
            deleted,
            ..Default::default()
        }
    }

    fn open() -> (tempfile::TempDir, Index) {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(&dir.path().join("index.redb")).unwrap();
        (dir, index)
    }

    #[test]
    fn last_writer_wins_by_clock_then_node_id() {
        let (_d, index) = open();
        assert!(index.apply(&record("k", 10, "a", &[1], false)).unwrap());
        assert!(
            !index.apply(&record("k", 9, "z", &[2], false)).unwrap(),
            "older loses"
        );
        assert!(
            !index.apply(&record("k", 10, "a", &[2], false)).unwrap(),
            "equal is a no-op"
        );
        assert!(
            index.apply(&record("k", 10, "b", &[3], false)).unwrap(),
            "tie: larger id wins"
        );
        let got = index.get_live("k").unwrap().unwrap();
        assert_eq!(got.chunk_id_list().next().unwrap().0, [3; 20]);
        assert_eq!(index.chunk_refs(&ChunkId([1; 20])).unwrap(), 0);
        assert_eq!(index.chunk_refs(&ChunkId([3; 20])).unwrap(), 1);
        assert_eq!(index.live_objects().unwrap(), 1);
    }

    #[test]
    fn tombstones_hide_objects_free_refs_and_lose_to_newer_writes() {
        let (_d, index) = open();
        index
            .apply(&record("k", 10, "a", &[1, 1, 2], false))
            .unwrap();
        assert_eq!(index.chunk_refs(&ChunkId([1; 20])).unwrap(), 2);
        assert!(index.get_by_sha1(&[10; 20]).unwrap().is_some());
        assert!(index.apply(&record("k", 11, "a", &[], true)).unwrap());
        assert!(index.get_live("k").unwrap().is_none());
        assert!(
            index.get("k").unwrap().unwrap().deleted,
            "tombstone is kept"
        );
        assert!(index.get_by_sha1(&[10; 20]).unwrap().is_none());
        assert_eq!(index.chunk_refs(&ChunkId([1; 20])).unwrap(), 0);
        assert_eq!(index.live_objects().unwrap(), 0);
        // A write older than the tombstone stays deleted; a newer one revives.
        assert!(!index.apply(&record("k", 5, "a", &[4], false)).unwrap());
        assert!(index.apply(&record("k", 12, "a", &[4], false)).unwrap());
        assert_eq!(index.live_objects().unwrap(), 1);
    }

    #[test]
    fn shared_chunks_are_counted_per_object() {
        let (_d, index) = open();
        index.apply(&record("a", 1, "n", &[7], false)).unwrap();
        index.apply(&record("b", 2, "n", &[7], false)).unwrap();
        assert_eq!(index.chunk_refs(&ChunkId([7; 20])).unwrap(), 2);
        index.apply(&record("a", 3, "n", &[], true)).unwrap();
        assert_eq!(index.chunk_refs(&ChunkId([7; 20])).unwrap(), 1);
    }

    #[test]
    fn list_pages_by_prefix_and_skips_tombstones() {
        let (_d, index) = open();
        for (i, k) in ["a/1", "a/2", "a/3", "b/1", "a/0"].iter().enumerate() {
            index
                .apply(&record(k, i as u64 + 1, "n", &[], false))
                .unwrap();
        }
        index.apply(&record("a/2", 99, "n", &[], true)).unwrap();
        let page = index.list("a/", None, 2).unwrap();
        let keys: Vec<_> = page.records.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["a/0", "a/1"]);
        assert!(page.more);
        let page = index.list("a/", Some("a/1"), 2).unwrap();
        let keys: Vec<_> = page.records.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["a/3"]);
        assert!(!page.more);
        assert_eq!(index.list("", None, 10).unwrap().records.len(), 4);
    }

    #[test]
    fn sync_pages_include_tombstones_and_refs_list_live_chunks() {
        let (_d, index) = open();
        index.apply(&record("a", 1, "n", &[1], false)).unwrap();
        index.apply(&record("b", 2, "n", &[2], false)).unwrap();
        index.apply(&record("b", 3, "n", &[], true)).unwrap();
        index.apply(&record("c", 4, "n", &[3], false)).unwrap();
        let (page, more) = index.records_after(None, 2).unwrap();
        assert_eq!(
            page.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert!(more && page[1].deleted);
        let (page, more) = index.records_after(Some("b"), 2).unwrap();
        assert_eq!(page.len(), 1);
        assert!(!more);
        let refs = index.referenced_chunks(None, 10).unwrap();
        assert_eq!(refs, vec![ChunkId([1; 20]), ChunkId([3; 20])]);
        assert_eq!(
            index
                .referenced_chunks(Some(&ChunkId([1; 20])), 10)
                .unwrap(),
            vec![ChunkId([3; 20])]
        );
    }

    #[test]
    fn repair_queue_persists_attempts_and_due_times() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        let (id, other) = (ChunkId([9; 20]), ChunkId([8; 20]));
        {
            let index = Index::open(&path).unwrap();
            assert_eq!(index.queue_repair(&id, |_| 100).unwrap(), 1);
            assert_eq!(index.queue_repair(&id, |n| 100 * n as u64).unwrap(), 2);
            assert_eq!(index.queue_repair(&other, |_| 50).unwrap(), 1);
        }
        // Attempts and due times survive a restart.
        let index = Index::open(&path).unwrap();
        assert_eq!(index.repair_queue_len().unwrap(), 2);
        assert_eq!(index.due_repairs(49, 10).unwrap(), vec![]);
        assert_eq!(index.due_repairs(199, 10).unwrap(), vec![other]);
        assert_eq!(index.due_repairs(200, 10).unwrap(), vec![other, id]);
        assert_eq!(index.due_repairs(200, 1).unwrap().len(), 1, "limit");
        assert_eq!(
            index.queue_repair(&id, |n| 1000 * n as u64).unwrap(),
            3,
            "the attempt count continues after the restart"
        );
        assert_eq!(index.due_repairs(2999, 10).unwrap(), vec![other]);
        index.repair_done(&[id]).unwrap();
        drop(index);
        let index = Index::open(&path).unwrap();
        assert_eq!(index.repair_queue_len().unwrap(), 1, "done survives too");
        assert_eq!(index.due_repairs(u64::MAX, 10).unwrap(), vec![other]);
    }

    #[test]
    fn versions_are_monotonic_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        let far_future = u64::MAX >> 2;
        {
            let index = Index::open(&path).unwrap();
            let a = index.next_version("n");
            let b = index.next_version("n");
            assert!(b.hlc > a.hlc);
            index
                .apply(&record("k", far_future, "n", &[], false))
                .unwrap();
        }
        let index = Index::open(&path).unwrap();
        assert!(index.next_version("n").hlc > far_future);
    }
}
