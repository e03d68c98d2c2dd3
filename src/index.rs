//! The object index: which keys exist and which chunks make them up.
//!
//! Stored in an embedded redb database (`index.redb` in the data directory).
//! Every change is one redb write transaction committed with
//! `Durability::Immediate`: when [`Index::apply`] returns, the change survives
//! a crash, and a crash before that leaves the previous state whole.
//!
//! Tables:
//! * `objects`: key -> encoded [`ObjectRecord`] (live objects and tombstones),
//!   at most [`MAX_RECORD_LEN`] bytes each: a chunk list longer than the
//!   inline limit lives in `chunk_lists` instead;
//! * `by_sha1`: raw SHA-1 -> keys of live objects with that content;
//! * `chunk_refs`: raw chunk id -> number of live-object references, which
//!   the garbage collector reads to find chunks nothing uses;
//! * `chunk_lists`, `chunk_list_refs`, `chunk_list_staging`: out-of-line
//!   chunk lists in pages (see [`chunk_lists`]);
//! * `repair_queue`: chunks whose repair failed, with back-off;
//! * `meta`: counters and the hybrid logical clock's high-water mark.

mod apply;
pub mod chunk_lists;
mod record;
mod repair_queue;

use std::{
    cmp::Ordering,
    path::Path,
    sync::{Mutex, atomic::AtomicU64},
    time::{SystemTime, UNIX_EPOCH},
};

use prost::Message;
use redb::{Database, MultimapTableDefinition, ReadableDatabase, ReadableTable, TableDefinition};

pub use chunk_lists::{LIST_PAGE_IDS, ListStager, StagedList};
pub use record::{
    LIST_DIGEST_LEN, ListDigest, MAX_CHUNK_COUNT, MAX_CONTENT_TYPE_LEN, MAX_INLINE_CHUNK_IDS,
    MAX_KEY_LEN, MAX_METADATA_BYTES, MAX_METADATA_ENTRIES, MAX_NODE_ID_LEN, MAX_RECORD_LEN,
    RecordError, check_description, check_key, list_digest,
};

use crate::{
    crypto::ChunkId,
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

/// Most bytes of records one listing page or one sync page holds (plus one
/// record): far below the 4 MiB gRPC and peer message limits, whatever the
/// records hold, since one record is at most [`MAX_RECORD_LEN`].
pub const PAGE_BYTES: usize = 1 << 20;

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
    /// The record breaks the record rules; nothing was stored.
    #[error("invalid record for key {key:?}: {source}")]
    Invalid { key: String, source: RecordError },
    /// The record's out-of-line chunk list is not in this index (never
    /// fetched, or removed since: the object was replaced or deleted).
    #[error("chunk list {} is not stored here", hex::encode(.0))]
    MissingList(ListDigest),
    /// A chunk list being staged does not match the record's count or digest.
    #[error("chunk list does not match its record: {0}")]
    ListMismatch(String),
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

/// What one page of a listing returned.
pub struct ListPage {
    /// Live records in key order, without their inline chunk ids (see
    /// [`ObjectRecord::without_ids`]): a listing needs only the count.
    pub records: Vec<ObjectRecord>,
    /// Whether more live records follow the last one returned.
    pub more: bool,
}

/// The index of one node.
pub struct Index {
    db: Database,
    /// Highest clock reading issued or seen; guards version monotonicity.
    hlc: Mutex<u64>,
    /// Longest chunk list this index stores inline; longer ones go to
    /// `chunk_lists`. [`MAX_INLINE_CHUNK_IDS`] but for tests.
    inline_limit: usize,
    /// Source of staging ids for chunk lists being fetched.
    next_staging: AtomicU64,
}

/// Memory the index database may use to cache its pages, by default
/// (`--index-cache`). redb's own default, 1 GiB, let a node that walked a
/// large index (a listing, an index sync, a repair pass) keep every page it
/// read resident. 16 MiB holds the interior pages of an index of many
/// millions of records, which is what lookups re-read.
pub const INDEX_CACHE_BYTES: usize = 16 << 20;

impl Index {
    /// Opens or creates the index database at `path`, with the default
    /// cache ([`INDEX_CACHE_BYTES`]).
    pub fn open(path: &Path) -> Result<Self, IndexError> {
        Self::open_with(path, INDEX_CACHE_BYTES, MAX_INLINE_CHUNK_IDS)
    }

    /// Like [`Index::open`], caching at most `cache_bytes` of its pages and
    /// storing chunk lists longer than `inline_limit` ids (clamped to
    /// 1..=[`MAX_INLINE_CHUNK_IDS`]; a test knob that lets small uploads
    /// take the out-of-line path) out of line.
    pub fn open_with(
        path: &Path,
        cache_bytes: usize,
        inline_limit: usize,
    ) -> Result<Self, IndexError> {
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(path)?;
        let txn = db.begin_write()?;
        let hlc = {
            // Create every table up front so readers never meet a missing one.
            txn.open_table(OBJECTS)?;
            txn.open_multimap_table(BY_SHA1)?;
            txn.open_table(CHUNK_REFS)?;
            txn.open_table(REPAIR_QUEUE)?;
            chunk_lists::create_tables(&txn)?;
            let meta = txn.open_table(META)?;
            meta.get(META_HLC)?.map(|v| v.value()).unwrap_or(0)
        };
        txn.commit()?;
        let index = Self {
            db,
            hlc: Mutex::new(hlc),
            inline_limit: inline_limit.clamp(1, MAX_INLINE_CHUNK_IDS),
            next_staging: AtomicU64::new(0),
        };
        index.bound_inline_lists()?;
        Ok(index)
    }

    /// Longest chunk list this index keeps inline.
    pub fn inline_limit(&self) -> usize {
        self.inline_limit
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
    /// after `after` (exclusive): at most `limit` of them, and no more than
    /// [`PAGE_BYTES`] of records (always at least one), so a page fits any
    /// message limit whatever the records hold. Returned without their
    /// inline chunk ids.
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
        let mut bytes = 0;
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
            let record = record.without_ids();
            let len = record.encoded_len();
            if records.len() == limit || (!records.is_empty() && bytes + len > PAGE_BYTES) {
                more = true;
                break;
            }
            bytes += len;
            records.push(record);
        }
        Ok(ListPage { records, more })
    }

    /// Every record (tombstones included) in key order after `after`: what
    /// a peer pulls to reconcile its index with this one. At most `limit`
    /// records and no more than `max_bytes` of them (always at least one).
    /// Records are in their stored form (long chunk lists out of line); one
    /// that breaks the record rules (stored before a cap existed) is left
    /// out, since every peer would refuse it. Returns whether more follow.
    pub fn records_after(
        &self,
        after: Option<&str>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<(Vec<ObjectRecord>, bool), IndexError> {
        let txn = self.db.begin_read()?;
        let objects = txn.open_table(OBJECTS)?;
        let mut out = Vec::new();
        let mut bytes = 0;
        let range = match after {
            Some(a) => {
                objects.range::<&str>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))?
            }
            None => objects.range::<&str>(..)?,
        };
        for entry in range {
            let (k, v) = entry?;
            let len = v.value().len();
            if out.len() == limit || (!out.is_empty() && bytes + len > max_bytes) {
                return Ok((out, true));
            }
            let record = decode(k.value(), v.value())?;
            if let Err(e) = record.validate() {
                tracing::debug!(key = %record.key, error = %e, "not offering a record that breaks the rules");
                continue;
            }
            bytes += len;
            out.push(record);
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
mod tests;
