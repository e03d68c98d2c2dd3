//! A cluster of real `dfs node` processes on loopback sharing one key.

use std::{path::PathBuf, time::Duration};

use dfs::crypto::ChunkId;

use super::{TestNode, chunk_ids, chunk_path, download, key_request, upload, write_key_file};

/// Liveness and repair timings short enough for tests.
pub const FAST: &[&str] = &[
    "--dead-after",
    "2s",
    "--repair-interval",
    "1s",
    "--sync-interval",
    "2s",
];

/// A cluster of `n` nodes sharing one key, each knowing the first node.
pub struct TestCluster {
    pub nodes: Vec<TestNode>,
    pub key_file: PathBuf,
    _key_dir: tempfile::TempDir,
}

impl TestCluster {
    /// Starts `n` nodes with `--replicas replicas`, [`FAST`] timings (unless
    /// `extra` sets the same flag) and `extra`, and waits until every node
    /// sees every other one up.
    pub async fn start(n: usize, replicas: usize, extra: &[&str]) -> Self {
        let key_dir = tempfile::tempdir().expect("temp dir");
        let key_file = write_key_file(&key_dir.path().join("cluster.key"), 42);
        let r = replicas.to_string();
        let mut base: Vec<&str> = vec![
            "--cluster-key-file",
            key_file.to_str().expect("utf-8 temp path"),
            "--replicas",
            &r,
        ];
        for pair in FAST.chunks(2) {
            if !extra.contains(&pair[0]) {
                base.extend_from_slice(pair);
            }
        }
        base.extend_from_slice(extra);
        let first = TestNode::start(&base).await;
        let seed = first.p2p_addr().await;
        let mut nodes = vec![first];
        for _ in 1..n {
            let mut args = base.clone();
            args.extend_from_slice(&["--peer", &seed]);
            nodes.push(TestNode::start(&args).await);
        }
        let cluster = Self {
            nodes,
            key_file,
            _key_dir: key_dir,
        };
        cluster.wait_members_up(n).await;
        cluster
    }

    /// Waits until every running node sees `n - 1` peers up.
    pub async fn wait_members_up(&self, n: usize) {
        for _ in 0..300 {
            let mut all = true;
            for node in self.nodes.iter().filter(|n| n.is_running()) {
                all &= members_up(node).await == n - 1;
            }
            if all {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "members did not all come up; log of node 0:\n{}",
            self.nodes[0].log()
        );
    }

    /// Copies of each chunk of `data` on the running nodes' disks (a dead
    /// node's disk does not count).
    pub fn copies(&self, data: &[u8]) -> Vec<usize> {
        chunk_ids(&self.key_file, data)
            .iter()
            .map(|id| self.holders(id).len())
            .collect()
    }

    /// Indexes of the running nodes that hold a file for `id`.
    pub fn holders(&self, id: &ChunkId) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].is_running())
            .filter(|i| chunk_path(&self.nodes[*i].data_dir(), id).is_file())
            .collect()
    }

    /// Where node `i` keeps chunk `id`.
    pub fn chunk_file(&self, i: usize, id: &ChunkId) -> PathBuf {
        chunk_path(&self.nodes[i].data_dir(), id)
    }

    /// Waits until every chunk of `data` has exactly `want` copies.
    pub async fn wait_copies(&self, data: &[u8], want: usize, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let copies = self.copies(data);
            if copies.iter().all(|c| *c == want) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "copies per chunk {copies:?}, wanted {want} each; log of node 0:\n{}",
                    self.nodes[0].log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// How many peers `node` sees up.
pub async fn members_up(node: &TestNode) -> usize {
    node.status()
        .await
        .members
        .iter()
        .filter(|m| m.state == "up")
        .count()
}

/// Uploads `data` under `key` through `node`; panics on failure.
pub async fn put(node: &TestNode, key: &str, data: &[u8]) {
    upload(&mut node.storage().await, key, data, 100_000)
        .await
        .unwrap_or_else(|e| panic!("upload {key}: {e}"));
}

/// Downloads the whole object under `key` through `node`.
pub async fn get(node: &TestNode, key: &str) -> Result<Vec<u8>, tonic::Status> {
    download(&mut node.storage().await, key_request(key, 0, 0))
        .await
        .map(|(_, b)| b)
}
