//! The orchestrator: the upload and download pipelines that tie the chunk
//! store, the crypto and the index together.
//!
//! Memory is bounded node-wide by a byte budget ([`BufferBudget`]): every
//! chunk buffer a transfer holds is paid for from it, so the number and the
//! size of transfers change how long they wait, never how much memory the
//! node uses.

mod body_budget;
mod chunk_ids;
mod data_dir;
mod download;
mod gc;
mod upload;

use std::{fs, sync::Arc};

pub use crate::budget::{BudgetError, BudgetPermit, BufferBudget, CallBudget};
pub use crate::chunks::GcReport;
pub use download::{ByteRange, Download, MESSAGE_BYTES, chunk_span};
pub use upload::UploadMeta;

use crate::{
    chunks::{ChunkError, Chunks},
    cluster::{Cluster, ClusterError},
    config::NodeConfig,
    crypto::{ClusterSecret, Keys},
    identity::NodeKey,
    index::{Index, IndexError},
    proto::{ObjectInfo, ObjectRecord, Version, get_record},
    store::{ChunkStore, StoreError},
};

/// Longest key, in bytes of UTF-8.
pub use crate::index::MAX_KEY_LEN;

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
    /// A call ran out of time: no progress for the idle timeout, or past
    /// its deadline.
    #[error("{0}")]
    TimedOut(String),
    #[error("{0}")]
    Internal(String),
}

impl From<BudgetError> for NodeError {
    fn from(e: BudgetError) -> Self {
        Self::ResourceExhausted(e.to_string())
    }
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

impl From<ChunkError> for NodeError {
    fn from(e: ChunkError) -> Self {
        match e {
            ChunkError::DiskFull(_) => Self::ResourceExhausted(e.to_string()),
            ChunkError::NotFound(_) | ChunkError::Corrupt { .. } => Self::DataLoss(e.to_string()),
            ChunkError::Io(_) => Self::Internal(e.to_string()),
        }
    }
}

impl From<ClusterError> for NodeError {
    fn from(e: ClusterError) -> Self {
        match e {
            ClusterError::TooFewCopies { .. } => Self::Unavailable(e.to_string()),
            ClusterError::ChunkUnavailable { unreached: 0, .. } => Self::DataLoss(e.to_string()),
            ClusterError::ChunkUnavailable { .. } => Self::Unavailable(e.to_string()),
            ClusterError::DiskFull(_) => Self::ResourceExhausted(e.to_string()),
            ClusterError::Unreachable(_)
            | ClusterError::WrongNode { .. }
            | ClusterError::NotWritable(_) => Self::Unavailable(e.to_string()),
            ClusterError::RecordNotDurable { .. } => Self::Unavailable(format!(
                "{e}; the write is not acknowledged: it may still take effect, whole, once the \
                 nodes reconcile"
            )),
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

/// A storage node's data plane.
pub struct Node {
    cfg: NodeConfig,
    id: String,
    keys: Keys,
    chunks: Arc<Chunks>,
    index: Arc<Index>,
    budget: BufferBudget,
    cluster: Arc<Cluster>,
    /// Held for the node's lifetime: one node per data directory.
    _lock: fs::File,
}

impl Node {
    /// Opens the node's data directory, creating it on first start.
    pub fn open(cfg: NodeConfig) -> Result<Self, NodeError> {
        cfg.validate().map_err(NodeError::InvalidArgument)?;
        let dir = &cfg.data_dir;
        // Before anything in the directory is touched: a second node on a
        // live data dir must not empty the first one's tmp/.
        let lock = data_dir::open_locked(dir)?;
        let key = NodeKey::load_or_create(dir).map_err(|e| NodeError::Internal(e.to_string()))?;
        let id = key.node_id().to_owned();
        let secret = load_or_create_secret(&cfg)?;
        let store = Arc::new(ChunkStore::open(dir, cfg.capacity)?);
        let index = Arc::new(Index::open_with(
            &dir.join("index.redb"),
            cfg.index_cache,
            cfg.inline_chunk_ids,
        )?);
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
        // The entries made above (node.key, cluster.key, chunks/,
        // index.redb) must be durable before any acknowledgement depends
        // on them.
        crate::fsutil::sync_dir(dir)
            .map_err(|e| NodeError::Internal(format!("sync {}: {e}", dir.display())))?;
        let lease_ttl = crate::chunks::lease::ttl_for(cfg.gc_grace);
        let chunks = Arc::new(Chunks::new(
            store,
            keys.clone(),
            cfg.cluster.max_chunk,
            lease_ttl,
        ));
        let mut cluster_cfg = cfg.cluster.clone();
        cluster_cfg.lease_ttl = lease_ttl;
        let cluster = Arc::new(Cluster::new(
            key,
            cluster_cfg,
            keys.clone(),
            chunks.clone(),
            index.clone(),
            Some(dir.join("members")),
        ));
        if cluster.standalone() {
            chunks.leases().skip_quiet_period();
        }
        let budget = BufferBudget::new(cfg.buffer_budget, cfg.chunk_size, cfg.budget_wait);
        let reserve = cfg.chunk_size + crate::crypto::HEADER_LEN;
        let peer_bodies = body_budget::PeerBodyBudget::new(budget.clone(), reserve);
        cluster.set_body_budget(Arc::new(peer_bodies));
        Ok(Self {
            keys,
            budget,
            chunks,
            index,
            cluster,
            _lock: lock,
            id,
            cfg,
        })
    }

    /// This node's id, derived from its static key (see `crate::identity`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The node's chunk store.
    pub fn store(&self) -> &ChunkStore {
        self.chunks.store()
    }

    /// The node's chunks (verified access, leases, scrub progress).
    pub fn chunks(&self) -> &Arc<Chunks> {
        &self.chunks
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
        if let Some(found) = self.resolve_local(target).await? {
            return Ok(found);
        }
        let ask = match target {
            Target::Key(k) => get_record::Target::Key(k.clone()),
            Target::Sha1(s) => get_record::Target::Sha1(parse_sha1(s)?.to_vec().into()),
        };
        if self.cluster.lookup(ask).await
            && let Some(found) = self.resolve_local(target).await?
        {
            return Ok(found);
        }
        Err(match target {
            Target::Key(k) => NodeError::NotFound(format!("no object with key {k:?}")),
            Target::Sha1(s) => NodeError::NotFound(format!("no object with sha1 {s}")),
        })
    }

    /// Looks `target` up in the local index, on a blocking thread: a redb
    /// read may wait for the disk.
    async fn resolve_local(&self, target: &Target) -> Result<Option<ObjectRecord>, NodeError> {
        let index = self.index.clone();
        let lookup = match target {
            Target::Key(key) => {
                validate_key(key)?;
                let key = key.clone();
                tokio::task::spawn_blocking(move || index.get_live(&key)).await
            }
            Target::Sha1(hex) => {
                let sha1 = parse_sha1(hex)?;
                tokio::task::spawn_blocking(move || index.get_by_sha1(&sha1)).await
            }
        };
        Ok(lookup.map_err(|e| NodeError::Internal(format!("index lookup stopped: {e}")))??)
    }

    /// Replaces the object under `key` with a tombstone. Its chunks are
    /// freed by the collector once the grace period has passed.
    /// Acknowledged, like an upload, only once the tombstone is durable on W
    /// nodes.
    pub async fn delete(&self, key: &str) -> Result<Version, NodeError> {
        let old = self.resolve(&Target::Key(key.to_owned())).await?;
        self.cluster.writable().map_err(NodeError::Unavailable)?;
        let version = self.index.next_version(&self.id);
        let tombstone = ObjectRecord {
            key: old.key,
            created_unix_ms: now_ms(),
            version: Some(version.clone()),
            deleted: true,
            ..Default::default()
        };
        self.cluster.commit_record(tombstone).await?;
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
    crate::index::check_key(key).map_err(|e| NodeError::InvalidArgument(e.to_string()))
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
