//! The orchestrator: the upload and download pipelines that tie the chunk
//! store, the crypto and the index together.
//!
//! Memory is bounded node-wide by a byte budget ([`BufferBudget`]): every
//! chunk buffer a transfer holds is paid for from it, so the number and the
//! size of transfers change how long they wait, never how much memory the
//! node uses.

mod download;
mod gc;
mod upload;

use std::{
    collections::HashMap,
    fs,
    path::Path,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use download::{ByteRange, Download, chunk_span};
pub use gc::GcReport;
pub use upload::UploadMeta;

use crate::{
    cluster::{Cluster, ClusterError},
    config::NodeConfig,
    crypto::{ChunkId, ClusterSecret, Keys},
    index::{Index, IndexError},
    proto::{ObjectInfo, ObjectRecord, Version, get_record},
    store::{ChunkStore, StoreError},
};

/// Longest key, in bytes of UTF-8.
pub const MAX_KEY_LEN: usize = 1024;

/// Why an operation failed, in terms a client can act on. The gRPC layer
/// maps each kind to one status code.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    DataLoss(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Cancelled(String),
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for NodeError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::DiskFull(_) => Self::ResourceExhausted(e.to_string()),
            StoreError::NotFound(_) | StoreError::Corrupt { .. } => Self::DataLoss(e.to_string()),
            StoreError::Io { .. } => Self::Internal(e.to_string()),
        }
    }
}

impl From<ClusterError> for NodeError {
    fn from(e: ClusterError) -> Self {
        match e {
            ClusterError::TooFewCopies { .. } => Self::Unavailable(e.to_string()),
            ClusterError::ChunkUnavailable { .. } => Self::DataLoss(e.to_string()),
            ClusterError::DiskFull(_) => Self::ResourceExhausted(e.to_string()),
            ClusterError::Unreachable(_) => Self::Unavailable(e.to_string()),
            ClusterError::Internal(_) => Self::Internal(e.to_string()),
        }
    }
}

impl From<IndexError> for NodeError {
    fn from(e: IndexError) -> Self {
        Self::Internal(e.to_string())
    }
}

/// What a read asks for: a key or a whole-file SHA-1 (40 hex characters).
#[derive(Debug, Clone)]
pub enum Target {
    Key(String),
    Sha1(String),
}

/// The node-wide budget for chunk buffers, in bytes.
#[derive(Clone)]
pub struct BufferBudget {
    sem: Arc<Semaphore>,
    total: usize,
}

impl BufferBudget {
    fn new(total: usize) -> Self {
        Self {
            sem: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// An empty buffer with room for `capacity` bytes, reused when possible.
    pub fn take_buffer(&self, capacity: usize) -> Vec<u8> {
        crate::bufpool::take(capacity)
    }

    /// Shares `data` as [`Bytes`] holding `permit`; both return (to the
    /// budget and the buffer pool) when the last reference is dropped.
    pub fn lend(&self, data: Vec<u8>, permit: OwnedSemaphorePermit) -> Bytes {
        crate::bufpool::lend(data, permit)
    }

    /// Waits until `bytes` of budget are free and takes them. A request larger
    /// than the whole budget takes the whole budget rather than waiting forever.
    pub async fn acquire(&self, bytes: usize) -> OwnedSemaphorePermit {
        let n = bytes.clamp(1, self.total) as u32;
        // The semaphore is never closed, so acquiring cannot fail.
        self.sem
            .clone()
            .acquire_many_owned(n)
            .await
            .expect("budget semaphore is never closed")
    }

    /// Bytes of budget not held by any transfer right now.
    pub fn available(&self) -> usize {
        self.sem.available_permits()
    }
}

/// Chunks that in-progress uploads have written but not yet committed; the
/// collector must not delete them whatever their age.
#[derive(Default)]
struct Pins(Mutex<HashMap<ChunkId, usize>>);

impl Pins {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ChunkId, usize>> {
        // Counters stay consistent under panic: each update is one statement.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pin(&self, id: ChunkId) {
        *self.lock().entry(id).or_insert(0) += 1;
    }

    fn unpin(&self, ids: &[ChunkId]) {
        let mut map = self.lock();
        for id in ids {
            if let Some(n) = map.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    map.remove(id);
                }
            }
        }
    }

    fn is_pinned(&self, id: &ChunkId) -> bool {
        self.lock().contains_key(id)
    }
}

/// A storage node's data plane.
pub struct Node {
    cfg: NodeConfig,
    id: String,
    keys: Keys,
    store: Arc<ChunkStore>,
    index: Arc<Index>,
    budget: BufferBudget,
    cluster: Arc<Cluster>,
    pins: Arc<Pins>,
}

impl Node {
    /// Opens the node's data directory, creating it on first start.
    pub fn open(cfg: NodeConfig) -> Result<Self, NodeError> {
        cfg.validate().map_err(NodeError::InvalidArgument)?;
        let dir = &cfg.data_dir;
        create_dir_durably(dir)
            .map_err(|e| NodeError::Internal(format!("create {}: {e}", dir.display())))?;
        let id = load_or_create_node_id(dir)?;
        let secret = load_or_create_secret(&cfg)?;
        let store = Arc::new(ChunkStore::open(dir, cfg.capacity)?);
        let index = Arc::new(Index::open(&dir.join("index.redb"))?);
        let keys = Keys::derive(&secret);
        if let Some(stored) = index.check_key_fingerprint(keys.fingerprint())? {
            return Err(NodeError::InvalidArgument(format!(
                "{} was written with a different cluster key (fingerprint {stored:016x}, this \
                 key's is {:016x}); refusing to start: every chunk would fail verification. \
                 Start with the cluster key this data directory was written with.",
                dir.display(),
                keys.fingerprint()
            )));
        }
        // The entries made above (node.id, cluster.key, chunks/, index.redb)
        // must be durable before any acknowledgement depends on them.
        sync_dir(dir).map_err(|e| NodeError::Internal(format!("sync {}: {e}", dir.display())))?;
        let cluster = Arc::new(Cluster::new(
            id.clone(),
            cfg.cluster.clone(),
            keys.clone(),
            store.clone(),
            index.clone(),
            Some(dir.join("members")),
        ));
        Ok(Self {
            keys,
            budget: BufferBudget::new(cfg.buffer_budget),
            store,
            index,
            cluster,
            pins: Arc::default(),
            id,
            cfg,
        })
    }

    /// This node's persistent random id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The node's chunk store.
    pub fn store(&self) -> &ChunkStore {
        &self.store
    }

    /// The node's object index.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The node's view of its cluster.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// The node-wide chunk buffer budget.
    pub fn budget(&self) -> &BufferBudget {
        &self.budget
    }

    /// The settings this node runs with.
    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// Finds the live record a read is aimed at. A target this node does not
    /// know is asked of its peers first, so an object is readable through
    /// any node as soon as its upload returned.
    pub async fn resolve(&self, target: &Target) -> Result<ObjectRecord, NodeError> {
        if let Some(found) = self.resolve_local(target)? {
            return Ok(found);
        }
        let ask = match target {
            Target::Key(k) => get_record::Target::Key(k.clone()),
            Target::Sha1(s) => get_record::Target::Sha1(parse_sha1(s)?.to_vec().into()),
        };
        if self.cluster.lookup(ask).await
            && let Some(found) = self.resolve_local(target)?
        {
            return Ok(found);
        }
        Err(match target {
            Target::Key(k) => NodeError::NotFound(format!("no object with key {k:?}")),
            Target::Sha1(s) => NodeError::NotFound(format!("no object with sha1 {s}")),
        })
    }

    fn resolve_local(&self, target: &Target) -> Result<Option<ObjectRecord>, NodeError> {
        Ok(match target {
            Target::Key(key) => {
                validate_key(key)?;
                self.index.get_live(key)?
            }
            Target::Sha1(hex) => {
                let sha1 = parse_sha1(hex)?;
                self.index.get_by_sha1(&sha1)?
            }
        })
    }

    /// Replaces the object under `key` with a tombstone. Its chunks are
    /// freed by the collector once the grace period has passed.
    pub async fn delete(&self, key: &str) -> Result<Version, NodeError> {
        let old = self.resolve(&Target::Key(key.to_owned())).await?;
        let version = self.index.next_version(&self.id);
        let tombstone = ObjectRecord {
            key: old.key,
            created_unix_ms: now_ms(),
            version: Some(version.clone()),
            deleted: true,
            ..Default::default()
        };
        self.index.apply(&tombstone)?;
        self.cluster.publish(&tombstone).await;
        Ok(version)
    }
}

/// The public description of a record.
pub fn object_info(record: &ObjectRecord) -> ObjectInfo {
    ObjectInfo {
        key: record.key.clone(),
        size: record.size,
        sha1: hex::encode(&record.sha1),
        chunk_count: record.chunk_count() as u32,
        chunk_size: record.chunk_size,
        content_type: record.content_type.clone(),
        metadata: record.metadata.clone(),
        created_unix_ms: record.created_unix_ms,
        version: record.version.clone(),
    }
}

/// Checks a key: 1..=1024 bytes of UTF-8 (guaranteed by the type), no NUL.
pub fn validate_key(key: &str) -> Result<(), NodeError> {
    if key.is_empty() {
        return Err(NodeError::InvalidArgument("key must not be empty".into()));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(NodeError::InvalidArgument(format!(
            "key is {} bytes, longer than the limit of {MAX_KEY_LEN}",
            key.len()
        )));
    }
    if key.contains('\0') {
        return Err(NodeError::InvalidArgument(
            "key must not contain NUL characters".into(),
        ));
    }
    Ok(())
}

/// Parses a whole-file SHA-1 written as 40 hex characters.
pub fn parse_sha1(hex_text: &str) -> Result<[u8; 20], NodeError> {
    let mut out = [0u8; 20];
    hex::decode_to_slice(hex_text.trim(), &mut out).map_err(|_| {
        NodeError::InvalidArgument(format!(
            "sha1 {hex_text:?} is not 40 hexadecimal characters"
        ))
    })?;
    Ok(out)
}

pub(crate) fn now_ms() -> u64 {
    crate::units::unix_ms()
}

/// Creates `dir` and its missing parents, and syncs the parent of each one
/// created, so that a crash cannot lose the data directory itself.
fn create_dir_durably(dir: &Path) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut next = Some(dir);
    while let Some(d) = next.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        missing.push(d.to_owned());
        next = d.parent();
    }
    fs::create_dir_all(dir)?;
    for created in missing {
        match created.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent)?,
            _ => sync_dir(Path::new("."))?,
        }
    }
    Ok(())
}

/// Makes a directory's entries durable (fsync on the directory).
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

fn load_or_create_node_id(dir: &Path) -> Result<String, NodeError> {
    let path = dir.join("node.id");
    match fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(NodeError::Internal(format!("read {}: {e}", path.display()))),
    }
    let mut raw = [0u8; 8];
    rand::Rng::fill_bytes(&mut rand::rng(), &mut raw);
    let id = hex::encode(raw);
    let tmp = dir.join("node.id.tmp");
    fs::write(&tmp, format!("{id}\n"))
        .and_then(|()| fs::File::open(&tmp)?.sync_all())
        .and_then(|()| fs::rename(&tmp, &path))
        .map_err(|e| NodeError::Internal(format!("write {}: {e}", path.display())))?;
    tracing::info!(node_id = %id, "created a new node id");
    Ok(id)
}

fn load_or_create_secret(cfg: &NodeConfig) -> Result<ClusterSecret, NodeError> {
    let bad = |e: crate::crypto::CryptoError| NodeError::InvalidArgument(e.to_string());
    if let Some(path) = &cfg.cluster_key_file {
        return ClusterSecret::read_file(path).map_err(bad);
    }
    let path = cfg.data_dir.join("cluster.key");
    if path.exists() {
        return ClusterSecret::read_file(&path).map_err(bad);
    }
    // A data dir that already holds an index was written under some key. A
    // new key could read none of its chunks (and every read would move one
    // to quarantine), so a missing key there is an error, not a first start.
    if cfg.data_dir.join("index.redb").exists() {
        return Err(NodeError::InvalidArgument(format!(
            "data directory {} already holds data but no cluster key: pass the \
             --cluster-key-file it was written with (or restore {})",
            cfg.data_dir.display(),
            path.display()
        )));
    }
    let secret = ClusterSecret::generate();
    secret.write_new_file(&path).map_err(bad)?;
    tracing::warn!(
        path = %path.display(),
        "no cluster key given: created a new one; back it up, data cannot be read without it"
    );
    Ok(secret)
}

#[cfg(test)]
mod tests;
