//! Settings of a running node, already validated.

use std::{path::PathBuf, time::Duration};

/// Smallest chunk size a node accepts: below it, per-chunk costs (an fsync,
/// a file, an index entry of 20 bytes) dominate.
pub const MIN_CHUNK_SIZE: usize = 64 << 10;
/// Largest chunk size: a chunk is buffered whole while it is sealed or
/// verified, so this bounds per-transfer memory.
pub const MAX_CHUNK_SIZE: usize = 16 << 20;
/// Default chunk size.
pub const DEFAULT_CHUNK_SIZE: usize = 4 << 20;

/// How a node stores data. Built by the CLI from flags and environment.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Root of everything the node persists.
    pub data_dir: PathBuf,
    /// Chunk size for new uploads (existing objects keep theirs).
    pub chunk_size: usize,
    /// How long an unreferenced chunk is kept before the collector deletes it.
    /// Must exceed index propagation delays; uploads longer than it keep
    /// their chunks by pinning them locally and refreshing them on peers.
    pub gc_grace: Duration,
    /// How often the collector scans for unreferenced chunks.
    pub gc_interval: Duration,
    /// Upper bound on bytes of chunk files; `None` means "until the disk is full".
    pub capacity: Option<u64>,
    /// Node-wide bound on bytes of chunk buffers held by transfers at once.
    pub buffer_budget: usize,
    /// Bytes of index pages the node may keep cached.
    pub index_cache: usize,
    /// Longest a transfer waits for buffer budget before it fails with
    /// `RESOURCE_EXHAUSTED`.
    pub budget_wait: Duration,
    /// File holding the cluster secret; `None` means `<data_dir>/cluster.key`,
    /// created on first start.
    pub cluster_key_file: Option<PathBuf>,
    /// Peers, replication and repair.
    pub cluster: crate::cluster::ClusterConfig,
    /// How the scrubber re-verifies stored chunks.
    pub scrub: crate::chunks::ScrubConfig,
    /// Longest chunk list stored inline in a record; longer lists are stored
    /// and sent out of line. `index::MAX_INLINE_CHUNK_IDS` but in tests
    /// (the hidden `--inline-chunk-ids` knob), so small uploads can take the
    /// out-of-line path.
    pub inline_chunk_ids: usize,
}

impl NodeConfig {
    /// A configuration with defaults for everything but the data directory.
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            chunk_size: DEFAULT_CHUNK_SIZE,
            gc_grace: Duration::from_secs(3600),
            gc_interval: Duration::from_secs(600),
            capacity: None,
            buffer_budget: 32 << 20,
            index_cache: crate::index::INDEX_CACHE_BYTES,
            budget_wait: crate::budget::DEFAULT_WAIT,
            cluster_key_file: None,
            cluster: crate::cluster::ClusterConfig::new("127.0.0.1:4040".into()),
            scrub: crate::chunks::ScrubConfig {
                interval: Duration::from_secs(30 * 86_400),
                rate: 32 << 20,
            },
            inline_chunk_ids: crate::index::MAX_INLINE_CHUNK_IDS,
        }
    }

    /// Checks the settings that can be wrong on their own.
    pub fn validate(&self) -> Result<(), String> {
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size) {
            return Err(format!(
                "chunk size {} is out of range: use {} to {} bytes",
                self.chunk_size, MIN_CHUNK_SIZE, MAX_CHUNK_SIZE
            ));
        }
        // One upload must always be able to hold at least one whole chunk.
        if self.buffer_budget < 2 * (self.chunk_size + crate::crypto::HEADER_LEN) {
            return Err(format!(
                "buffer budget {} is too small for chunk size {}: needs at least two chunks",
                self.buffer_budget, self.chunk_size
            ));
        }
        if self.budget_wait.is_zero() {
            return Err("budget wait must be positive".into());
        }
        if self.gc_interval.is_zero() {
            return Err("gc interval must be positive".into());
        }
        if self.scrub.interval.is_zero() || self.scrub.rate == 0 {
            return Err("scrub interval and scrub rate must be positive".into());
        }
        if !(1..=crate::index::MAX_INLINE_CHUNK_IDS).contains(&self.inline_chunk_ids) {
            return Err(format!(
                "inline chunk ids {} is out of range: use 1 to {}",
                self.inline_chunk_ids,
                crate::index::MAX_INLINE_CHUNK_IDS
            ));
        }
        Ok(())
    }
}
