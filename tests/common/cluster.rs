//! A cluster of real node processes on loopback sharing one key, for the
//! multi-node tests.

use std::{path::PathBuf, time::Duration};

use dfs::crypto::ChunkId;

use super::*;

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
    _key_dir: Option<tempfile::TempDir>,
}

impl TestCluster {
    pub async fn start(n: usize, replicas: usize, extra: &[&str]) -> Self {
        Self::launch(n, replicas, extra, None).await
    }

    /// Like [`TestCluster::start`], with fixed peer addresses (returned), so
    /// a node can come back on the same address.
    pub async fn start_fixed(n: usize, replicas: usize, extra: &[&str]) -> (Self, Vec<String>) {
        let addrs: Vec<String> = (0..n)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        (Self::launch(n, replicas, extra, Some(&addrs)).await, addrs)
    }

    async fn launch(n: usize, replicas: usize, extra: &[&str], p2p: Option<&[String]>) -> Self {
        let key_dir = tempfile::tempdir().unwrap();
        let key_file = write_key_file(&key_dir.path().join("cluster.key"), 42);
        let r = replicas.to_string();
        let mut base: Vec<&str> = vec![
            "--cluster-key-file",
            key_file.to_str().unwrap(),
            "--replicas",
            &r,
        ];
        // FAST's timings, unless `extra` sets the same flag.
        for pair in FAST.chunks(2) {
            if !extra.contains(&pair[0]) {
                base.extend_from_slice(pair);
            }
        }
        base.extend_from_slice(extra);
        let mut nodes: Vec<TestNode> = Vec::new();
        let mut seed = String::new();
        for i in 0..n {
            let mut args = base.clone();
            if let Some(addrs) = p2p {
                args.extend_from_slice(&["--p2p-addr", &addrs[i]]);
            }
            if i > 0 {
                args.extend_from_slice(&["--peer", &seed]);
            }
            let node = TestNode::start(&args).await;
            if i == 0 {
                seed = node.p2p_addr().await;
            }
            nodes.push(node);
        }
        let cluster = Self {
            nodes,
            key_file,
            _key_dir: Some(key_dir),
        };
        cluster.wait_members_up(n).await;
        cluster
    }

    /// A "cluster" of nodes started some other way; chunk ids are computed
    /// with the first node's own `cluster.key`.
    pub fn from_nodes(nodes: Vec<TestNode>) -> Self {
        let key_file = nodes[0].data_dir().join("cluster.key");
        Self {
            nodes,
            key_file,
            _key_dir: None,
        }
    }

    /// Waits until every running node sees `n - 1` peers up.
    pub async fn wait_members_up(&self, n: usize) {
        for _ in 0..200 {
            let mut all = true;
            for node in self.nodes.iter().filter(|n| n.is_running()) {
                let up = node
                    .status()
                    .await
                    .members
                    .iter()
                    .filter(|m| m.state == "up")
                    .count();
                all &= up == n - 1;
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

    /// Copies of each chunk on the running nodes' disks (a dead node's disk
    /// does not count).
    pub fn copies(&self, data: &[u8]) -> Vec<usize> {
        chunk_ids(&self.key_file, data)
            .iter()
            .map(|id| self.holders(id).len())
            .collect()
    }

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
            tokio::time::sleep(Duration::from_millis(200)).await;
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

pub async fn put(node: &TestNode, key: &str, data: &[u8]) {
    upload(&mut node.storage().await, key, data, 100_000)
        .await
        .unwrap_or_else(|e| panic!("upload {key}: {e}"));
}

pub async fn get(node: &TestNode, key: &str) -> Result<Vec<u8>, tonic::Status> {
    download(&mut node.storage().await, key_request(key, 0, 0))
        .await
        .map(|(_, b)| b)
}
