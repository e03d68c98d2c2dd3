//! The local chunk store: sealed chunks in a sharded directory tree.
//!
//! Layout under the node's data directory:
//!
//! ```text
//! chunks/ab/cd/abcd<36 more hex>   one file per chunk, sealed (`crypto::seal`)
//! tmp/                             writes in progress; emptied at start
//! quarantine/                      chunks that failed verification, kept for inspection
//! ```
//!
//! Durability guarantee: when [`ChunkStore::put`] returns `Ok`, the chunk's
//! bytes and its directory entry are on stable storage (file fsynced, then
//! renamed into place, then the parent directory fsynced). A crash at any
//! point leaves either no file under the chunk's id or the complete file;
//! a partial write can only ever exist under `tmp/`, which start-up empties.

use std::{
    fs::{self, File},
    io::{self, Read},
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use crate::crypto::ChunkId;

pub(crate) mod direct;

pub use direct::READ_SLACK;

/// Lock stripes that order a dedup hit's "exists, refresh mtime" against the
/// collector's "stale, delete" for the same chunk. 64 keeps contention
/// negligible at any realistic number of concurrent writers.
const LOCK_STRIPES: usize = 64;

/// Errors from the chunk store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("no space left for chunk data ({0})")]
    DiskFull(String),
    #[error("chunk {0} is not stored on this node")]
    NotFound(ChunkId),
    #[error("chunk {id} on disk is unusable: {reason}")]
    Corrupt { id: ChunkId, reason: String },
}

impl StoreError {
    fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        if is_disk_full(&source) {
            return Self::DiskFull(format!("{op} {}: {source}", path.display()));
        }
        Self::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }
}

fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || e.kind() == io::ErrorKind::StorageFull
}

/// What [`ChunkStore::put`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The chunk was new and is now durable.
    Stored,
    /// A chunk with this id was already stored (dedup); its age was reset so
    /// the collector keeps it while the caller's object is being committed.
    AlreadyPresent,
}

/// The chunk store of one node.
pub struct ChunkStore {
    chunks: PathBuf,
    tmp: PathBuf,
    quarantine: PathBuf,
    stripes: Vec<Mutex<()>>,
    chunk_count: AtomicU64,
    bytes_stored: AtomicU64,
    /// Bytes of chunk data this store may hold; `None` means the disk's size.
    capacity: Option<u64>,
    tmp_seq: AtomicU64,
}

impl ChunkStore {
    /// Opens (creating if needed) the store under `data_dir`, empties `tmp/`
    /// of writes a previous run left unfinished, and counts what is stored.
    pub fn open(data_dir: &Path, capacity: Option<u64>) -> Result<Self, StoreError> {
        let store = Self {
            chunks: data_dir.join("chunks"),
            tmp: data_dir.join("tmp"),
            quarantine: data_dir.join("quarantine"),
            stripes: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            chunk_count: AtomicU64::new(0),
            bytes_stored: AtomicU64::new(0),
            capacity,
            tmp_seq: AtomicU64::new(0),
        };
        for dir in [&store.chunks, &store.tmp, &store.quarantine] {
            fs::create_dir_all(dir).map_err(|e| StoreError::io("create directory", dir, e))?;
        }
        let mut leftovers = 0;
        for entry in fs::read_dir(&store.tmp).map_err(|e| StoreError::io("read", &store.tmp, e))? {
            let entry = entry.map_err(|e| StoreError::io("read", &store.tmp, e))?;
            let path = entry.path();
            let removed = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            removed.map_err(|e| StoreError::io("remove", &path, e))?;
            leftovers += 1;
        }
        if leftovers > 0 {
            tracing::info!(files = leftovers, "removed unfinished writes from tmp/");
        }
        let (mut count, mut bytes) = (0, 0);
        store.for_each_chunk(|_, len, _| {
            count += 1;
            bytes += len;
        })?;
        store.chunk_count.store(count, Ordering::Relaxed);
        store.bytes_stored.store(bytes, Ordering::Relaxed);
        Ok(store)
    }

    /// Where a chunk lives: `chunks/ab/cd/<40 hex>`.
    pub fn path_of(&self, id: &ChunkId) -> PathBuf {
        self.chunks.join(shard_path(id))
    }

    /// Directory of in-progress writes.
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    fn stripe(&self, id: &ChunkId) -> std::sync::MutexGuard<'_, ()> {
        let lock = &self.stripes[id.0[0] as usize % LOCK_STRIPES];
        // The guarded data is `()`: a poisoned lock carries no broken state.
        lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the chunk is stored here (without reading or verifying it).
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.path_of(id).is_file()
    }

    /// Whether the chunk is stored here; if it is, its age is reset so the
    /// collector keeps it (same ordering against deletion as a dedup hit).
    pub fn touch(&self, id: &ChunkId) -> bool {
        let _guard = self.stripe(id);
        match File::options().write(true).open(self.path_of(id)) {
            Ok(file) => file.set_modified(SystemTime::now()).is_ok(),
            Err(_) => false,
        }
    }

    /// Stores a sealed chunk durably under `id`, unless a good copy is already
    /// there. The caller vouches that `sealed` is the sealing of the plaintext
    /// whose id is `id`; `is_good` judges an existing copy (the store cannot:
    /// it holds no keys). An existing copy that is not good is moved to
    /// quarantine and replaced, so a rotten file never passes for a stored
    /// chunk. Blocking: call from a blocking thread.
    pub fn put(
        &self,
        id: &ChunkId,
        sealed: &[u8],
        is_good: &dyn Fn(&[u8]) -> bool,
    ) -> Result<PutOutcome, StoreError> {
        let path = self.path_of(id);
        {
            let _guard = self.stripe(id);
            if let Some((existing, start)) = self.read_existing(&path, sealed.len())? {
                let good = is_good(&existing[start..]);
                crate::bufpool::give(existing);
                if good {
                    // Refreshing the mtime tells the collector this chunk is
                    // in use again; the stripe lock orders it against a
                    // deletion.
                    touch_file(&path)?;
                    return Ok(PutOutcome::AlreadyPresent);
                }
                tracing::error!(chunk = %id, "a stored copy failed verification on a write of the same chunk; replacing it");
                self.quarantine_locked(id)?;
            }
        }
        // The bytes are counted (reserved) before the write, in one atomic
        // step with the capacity check, so concurrent writes cannot all pass
        // the check and overshoot the capacity together.
        let len = sealed.len() as u64;
        self.bytes_stored
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                match self.capacity {
                    Some(cap) if used + len > cap => None,
                    _ => Some(used + len),
                }
            })
            .map_err(|used| {
                let cap = self.capacity.unwrap_or(u64::MAX);
                StoreError::DiskFull(format!(
                    "store capacity of {cap} bytes reached ({used} bytes used)"
                ))
            })?;
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp_path = self
            .tmp
            .join(format!("{}.{}.{seq}", id.to_hex(), std::process::id()));
        let result = self.write_atomically(id, &tmp_path, &path, sealed);
        match result {
            Ok(true) => self.chunk_count.fetch_add(1, Ordering::Relaxed),
            Ok(false) => self.bytes_stored.fetch_sub(len, Ordering::Relaxed),
            Err(_) => {
                let _ = fs::remove_file(&tmp_path);
                self.bytes_stored.fetch_sub(len, Ordering::Relaxed)
            }
        };
        result.map(|stored| {
            if stored {
                PutOutcome::Stored
            } else {
                PutOutcome::AlreadyPresent
            }
        })
    }

    /// The bytes of an existing chunk file, if there is one, from the
    /// returned offset on (a pooled buffer, read around the page cache as
    /// the chunk was written); a file whose length differs from
    /// `expected_len` (every sealing of one plaintext has the same length)
    /// comes back empty so that it is judged bad unread.
    fn read_existing(
        &self,
        path: &Path,
        expected_len: usize,
    ) -> Result<Option<(Vec<u8>, usize)>, StoreError> {
        let mut file = match direct::open_read(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io("open", path, e)),
        };
        let len = file
            .metadata()
            .map_err(|e| StoreError::io("stat", path, e))?
            .len();
        if len != expected_len as u64 {
            return Ok(Some((Vec::new(), 0)));
        }
        let mut buf = crate::bufpool::take(expected_len + READ_SLACK);
        let start = direct::read_all(&mut file, expected_len, &mut buf)
            .map_err(|e| StoreError::io("read", path, e))?;
        Ok(Some((buf, start)))
    }

    /// Writes `bytes` to `tmp`, fsyncs, and renames it to `dest`. Returns
    /// `false` (and drops the temporary file) when a concurrent put of the
    /// same id got there first: the check and the rename happen under the
    /// id's stripe lock, so a chunk is counted once however many uploads
    /// write it at the same moment.
    fn write_atomically(
        &self,
        id: &ChunkId,
        tmp: &Path,
        dest: &Path,
        bytes: &[u8],
    ) -> Result<bool, StoreError> {
        // Large chunks bypass the page cache (see `direct`).
        let file =
            direct::create_new(tmp, bytes.len()).map_err(|e| StoreError::io("create", tmp, e))?;
        direct::write_all(&file, bytes).map_err(|e| StoreError::io("write", tmp, e))?;
        failpoint::hit(failpoint::Stage::BeforeSync)
            .map_err(|e| StoreError::io("write", tmp, e))?;
        file.sync_data()
            .map_err(|e| StoreError::io("fsync", tmp, e))?;
        drop(file);
        let shard = dest.parent().expect("chunk paths have a parent");
        if !shard.is_dir() {
            fs::create_dir_all(shard).map_err(|e| StoreError::io("create directory", shard, e))?;
            // New directory entries must be durable before the file in them is.
            let top = shard.parent().expect("shard has a parent");
            sync_dir(top)?;
            sync_dir(&self.chunks)?;
        }
        failpoint::hit(failpoint::Stage::BeforeRename)
            .map_err(|e| StoreError::io("rename", tmp, e))?;
        let stored = {
            let _guard = self.stripe(id);
            if dest.exists() {
                // A concurrent put of the same id renamed its (good) copy
                // in first; ours is the same chunk.
                touch_file(dest)?;
                let _ = fs::remove_file(tmp);
                false
            } else {
                fs::rename(tmp, dest).map_err(|e| StoreError::io("rename", tmp, e))?;
                true
            }
        };
        // Also when another put won: its directory fsync may not have
        // happened yet, and this put must not return before it is durable.
        sync_dir(shard)?;
        Ok(stored)
    }

    /// Reads a sealed chunk. Files larger than `max_len` are reported corrupt
    /// without being read, so a foreign file cannot make the node allocate
    /// more than one chunk's worth. Blocking.
    pub fn read(&self, id: &ChunkId, max_len: usize) -> Result<Vec<u8>, StoreError> {
        let (path, file, len) = self.open_chunk(id, max_len, |p| File::open(p))?;
        let mut buf = Vec::with_capacity(len);
        file.take(len as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(|e| StoreError::io("read", &path, e))?;
        Ok(buf)
    }

    /// Like [`ChunkStore::read`], into a caller's (reused) buffer, which is
    /// cleared first, and bypassing the page cache where it can (see
    /// `direct`): the bytes start at the returned offset, `buf[start..]`.
    /// With [`READ_SLACK`] bytes of capacity beyond `max_len`, `buf` never
    /// grows.
    pub fn read_into(
        &self,
        id: &ChunkId,
        max_len: usize,
        buf: &mut Vec<u8>,
    ) -> Result<usize, StoreError> {
        let (path, mut file, len) = self.open_chunk(id, max_len, direct::open_read)?;
        direct::read_all(&mut file, len, buf).map_err(|e| StoreError::io("read", &path, e))
    }

    /// Opens a chunk file with `open` and checks its length against
    /// `max_len`: its path, the file and its length.
    fn open_chunk(
        &self,
        id: &ChunkId,
        max_len: usize,
        open: impl Fn(&Path) -> io::Result<File>,
    ) -> Result<(PathBuf, File, usize), StoreError> {
        let path = self.path_of(id);
        let file = match open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::NotFound(*id)),
            Err(e) => return Err(StoreError::io("open", &path, e)),
        };
        let len = file
            .metadata()
            .map_err(|e| StoreError::io("stat", &path, e))?
            .len();
        if len > max_len as u64 {
            return Err(StoreError::Corrupt {
                id: *id,
                reason: format!("file is {len} bytes, more than the largest chunk ({max_len})"),
            });
        }
        Ok((path, file, len as usize))
    }

    /// Moves a chunk that failed verification out of the way, keeping it for
    /// inspection. A later write of the same id stores a fresh, good copy.
    pub fn quarantine(&self, id: &ChunkId) -> Result<PathBuf, StoreError> {
        let _guard = self.stripe(id);
        self.quarantine_locked(id)
    }

    /// [`ChunkStore::quarantine`] with the id's stripe lock already held.
    fn quarantine_locked(&self, id: &ChunkId) -> Result<PathBuf, StoreError> {
        let from = self.path_of(id);
        let stamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let to = self.quarantine.join(format!("{}.{stamp}", id.to_hex()));
        let len = fs::metadata(&from).map(|m| m.len()).unwrap_or(0);
        fs::rename(&from, &to).map_err(|e| StoreError::io("quarantine", &from, e))?;
        self.forget(len);
        Ok(to)
    }

    /// Deletes a chunk if it was last written or refreshed before `cutoff`.
    /// Returns whether it was deleted. Used by the garbage collector; the
    /// stripe lock makes "check age, delete" atomic against a dedup refresh.
    pub fn remove_if_older(&self, id: &ChunkId, cutoff: SystemTime) -> Result<bool, StoreError> {
        let _guard = self.stripe(id);
        let path = self.path_of(id);
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(StoreError::io("stat", &path, e)),
        };
        let modified = meta
            .modified()
            .map_err(|e| StoreError::io("stat", &path, e))?;
        if modified >= cutoff {
            return Ok(false);
        }
        fs::remove_file(&path).map_err(|e| StoreError::io("remove", &path, e))?;
        self.forget(meta.len());
        Ok(true)
    }

    fn forget(&self, len: u64) {
        self.chunk_count.fetch_sub(1, Ordering::Relaxed);
        self.bytes_stored.fetch_sub(len, Ordering::Relaxed);
    }

    /// Calls `f(id, length, mtime)` for every chunk file. Files whose names are
    /// not chunk ids are skipped with a warning: they are not ours to delete.
    pub fn for_each_chunk(
        &self,
        mut f: impl FnMut(ChunkId, u64, SystemTime),
    ) -> Result<(), StoreError> {
        for shard in self.shard_dirs()? {
            for (id, len, mtime) in self.list_shard(&shard)? {
                f(id, len, mtime);
            }
        }
        Ok(())
    }

    /// The shard directories (`chunks/ab/cd`), in order: a walk can go one
    /// small directory at a time instead of listing every chunk at once.
    pub fn shard_dirs(&self) -> Result<Vec<PathBuf>, StoreError> {
        let mut out = Vec::new();
        for top in sorted_subdirs(&self.chunks)? {
            out.extend(sorted_subdirs(&top)?);
        }
        Ok(out)
    }

    /// The chunks in one shard directory: `(id, length, mtime)`. A shard that
    /// vanished meanwhile is empty.
    pub fn list_shard(&self, shard: &Path) -> Result<Vec<(ChunkId, u64, SystemTime)>, StoreError> {
        let entries = match fs::read_dir(shard) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StoreError::io("read", shard, e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io("read", shard, e))?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.parse::<ChunkId>().ok()) else {
                tracing::warn!(path = %entry.path().display(), "ignoring a file that is not a chunk");
                continue;
            };
            let Ok(meta) = entry.metadata() else { continue };
            let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            out.push((id, meta.len(), mtime));
        }
        Ok(out)
    }

    /// Number of chunks and bytes of chunk files held.
    pub fn usage(&self) -> (u64, u64) {
        (
            self.chunk_count.load(Ordering::Relaxed),
            self.bytes_stored.load(Ordering::Relaxed),
        )
    }
}

/// Resets a file's mtime to now (what the collector reads as "in use").
fn touch_file(path: &Path) -> Result<(), StoreError> {
    File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(SystemTime::now()))
        .map_err(|e| StoreError::io("touch", path, e))
}

/// A chunk's path below `chunks/`: `ab/cd/<40 hex>`.
pub fn shard_path(id: &ChunkId) -> PathBuf {
    let hex = id.to_hex();
    PathBuf::from(&hex[0..2]).join(&hex[2..4]).join(hex)
}

fn sorted_subdirs(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| StoreError::io("read", dir, e))? {
        let path = entry.map_err(|e| StoreError::io("read", dir, e))?.path();
        if path.is_dir() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    crate::fsutil::sync_dir(dir).map_err(|e| StoreError::io("fsync directory", dir, e))
}

/// Test-only fault injection for the atomic write path. Compiled to nothing
/// outside tests.
mod failpoint {
    use std::io;

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub enum Stage {
        BeforeSync,
        BeforeRename,
    }

    #[cfg(test)]
    thread_local! {
        pub static ARMED: std::cell::Cell<Option<Stage>> = const { std::cell::Cell::new(None) };
    }

    #[cfg(test)]
    pub fn hit(stage: Stage) -> io::Result<()> {
        if ARMED.with(|a| a.get()) == Some(stage) {
            return Err(io::Error::other(format!("injected failure at {stage:?}")));
        }
        Ok(())
    }

    #[cfg(not(test))]
    #[inline(always)]
    pub fn hit(_stage: Stage) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(byte: u8) -> ChunkId {
        let mut raw = [byte; 20];
        raw[1] = 0xcd;
        ChunkId(raw)
    }

    #[test]
    fn paths_are_sharded_two_levels_by_hex_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), None).unwrap();
        let id: ChunkId = "abcd0123456789abcdef0123456789abcdef0123".parse().unwrap();
        assert_eq!(
            store.path_of(&id),
            dir.path()
                .join("chunks/ab/cd/abcd0123456789abcdef0123456789abcdef0123")
        );
    }

    #[test]
    fn put_is_durable_readable_and_deduplicated() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), None).unwrap();
        assert_eq!(
            store.put(&id(1), b"sealed", &|_| true).unwrap(),
            PutOutcome::Stored
        );
        assert_eq!(
            store.put(&id(1), b"sealed", &|_| true).unwrap(),
            PutOutcome::AlreadyPresent
        );
        assert_eq!(store.read(&id(1), 100).unwrap(), b"sealed");
        assert_eq!(store.usage(), (1, 6));
        assert!(matches!(
            store.read(&id(2), 100),
            Err(StoreError::NotFound(_))
        ));
        assert_eq!(fs::read_dir(store.tmp_dir()).unwrap().count(), 0);
    }

    #[test]
    fn a_bad_existing_copy_is_quarantined_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), None).unwrap();
        store.put(&id(2), b"rotten", &|_| true).unwrap();
        let good = |bytes: &[u8]| bytes == b"sealed";
        assert_eq!(
            store.put(&id(2), b"sealed", &good).unwrap(),
            PutOutcome::Stored
        );
        assert_eq!(store.read(&id(2), 100).unwrap(), b"sealed");
        assert_eq!(
            fs::read_dir(dir.path().join("quarantine")).unwrap().count(),
            1
        );
        assert_eq!(store.usage(), (1, 6));
        // A good copy is a dedup hit.
        assert_eq!(
            store.put(&id(2), b"sealed", &good).unwrap(),
            PutOutcome::AlreadyPresent
        );
    }

    #[test]
    fn injected_failure_leaves_no_chunk_and_no_temp_file() {
        for stage in [failpoint::Stage::BeforeSync, failpoint::Stage::BeforeRename] {
            let dir = tempfile::tempdir().unwrap();
            let store = ChunkStore::open(dir.path(), None).unwrap();
            failpoint::ARMED.with(|a| a.set(Some(stage)));
            let err = store.put(&id(3), b"half", &|_| true).unwrap_err();
            failpoint::ARMED.with(|a| a.set(None));
            assert!(err.to_string().contains("injected"), "{err}");
            assert!(
                !store.contains(&id(3)),
                "no file under the real id after {stage:?}"
            );
            assert_eq!(fs::read_dir(store.tmp_dir()).unwrap().count(), 0);
            assert_eq!(store.usage(), (0, 0));
            // The next attempt succeeds.
            assert_eq!(
                store.put(&id(3), b"whole", &|_| true).unwrap(),
                PutOutcome::Stored
            );
            assert_eq!(store.read(&id(3), 100).unwrap(), b"whole");
        }
    }

    #[test]
    fn open_empties_tmp_and_counts_existing_chunks() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = ChunkStore::open(dir.path(), None).unwrap();
            store.put(&id(4), b"abc", &|_| true).unwrap();
            fs::write(store.tmp_dir().join("leftover"), b"partial").unwrap();
        }
        let store = ChunkStore::open(dir.path(), None).unwrap();
        assert_eq!(fs::read_dir(store.tmp_dir()).unwrap().count(), 0);
        assert_eq!(store.usage(), (1, 3));
    }

    #[test]
    fn capacity_limit_reports_disk_full_and_keeps_existing_data() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), Some(10)).unwrap();
        store.put(&id(5), b"12345678", &|_| true).unwrap();
        assert!(matches!(
            store.put(&id(6), b"123", &|_| true),
            Err(StoreError::DiskFull(_))
        ));
        assert_eq!(store.read(&id(5), 100).unwrap(), b"12345678");
    }

    #[test]
    fn oversized_file_is_corrupt_and_quarantine_moves_it_aside() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), None).unwrap();
        store.put(&id(7), &[0u8; 64], &|_| true).unwrap();
        assert!(matches!(
            store.read(&id(7), 32),
            Err(StoreError::Corrupt { .. })
        ));
        let moved = store.quarantine(&id(7)).unwrap();
        assert!(moved.is_file());
        assert!(!store.contains(&id(7)));
        assert_eq!(store.usage(), (0, 0));
    }

    #[test]
    fn remove_if_older_respects_the_cutoff() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), None).unwrap();
        store.put(&id(8), b"x", &|_| true).unwrap();
        let past = SystemTime::now() - std::time::Duration::from_secs(60);
        assert!(!store.remove_if_older(&id(8), past).unwrap());
        let future = SystemTime::now() + std::time::Duration::from_secs(60);
        assert!(store.remove_if_older(&id(8), future).unwrap());
        assert!(!store.contains(&id(8)));
        let mut seen = 0;
        store.for_each_chunk(|_, _, _| seen += 1).unwrap();
        assert_eq!(seen, 0);
    }
}
