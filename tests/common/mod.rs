//! Shared harness for the integration tests: a real `dfs node` process on a
//! loopback port, in its own temporary directory, killed (SIGKILL) and
//! cleaned up when the test ends however it ends.
//!
//! Every test binary includes this module and uses part of it.
#![allow(dead_code)]

pub mod cluster;
pub mod damage;
pub mod metrics;
pub mod peer;
pub mod rpc;
pub mod slow;
pub mod strace;

#[allow(unused_imports)]
pub use cluster::{FAST, TestCluster, get, put};
#[allow(unused_imports)]
pub use damage::{Damage, damage_file};
#[allow(unused_imports)]
pub use rpc::*;
#[allow(unused_imports)]
pub use slow::SlowUpload;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use dfs::proto::{cluster_client::ClusterClient, storage_client::StorageClient};
use sha1::{Digest, Sha1};
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;

/// The chunk size every test node runs with: small, so a few hundred KiB
/// make many chunks.
pub const CHUNK: usize = 64 * 1024;
/// How long a node may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Path of the `dfs` binary under test: the one cargo built, unless
/// `DFS_TEST_BIN` names another (to show that a regression test fails on an
/// older build).
pub fn dfs_bin() -> String {
    std::env::var("DFS_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_dfs").to_owned())
}

/// One node process and its directory (`<root>/data`, `<root>/addr`,
/// `<root>/node.log`).
pub struct TestNode {
    root: tempfile::TempDir,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    /// A command the node runs under (`strace ... --`), if any.
    wrapper: Vec<String>,
    child: Option<Child>,
    addr: Option<String>,
}

impl TestNode {
    /// A node that is not started yet: lets a test prepare the data
    /// directory (or key files) first, then call [`TestNode::launch`].
    pub fn new(extra: &[&str]) -> Self {
        let root = tempfile::Builder::new()
            .prefix("dfs-it-")
            .tempdir()
            .expect("create temp dir");
        Self {
            root,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            wrapper: Vec::new(),
            child: None,
            addr: None,
        }
    }

    /// Adds flags for the next launch (e.g. ones naming files in [`TestNode::root`]).
    pub fn add_args(&mut self, args: &[&str]) {
        self.extra.extend(args.iter().map(|s| s.to_string()));
    }

    /// Sets an environment variable for the next launches.
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.env.retain(|(n, _)| n != name);
        self.env.push((name.to_owned(), value.to_owned()));
    }

    /// Runs the node's clock `offset` (e.g. "+1h") away from the machine's,
    /// with libfaketime preloaded into the node process itself (no wrapper
    /// process, so signals reach the node).
    pub fn set_clock_offset(&mut self, offset: &str) {
        let lib = faketime_lib();
        self.set_env("LD_PRELOAD", &lib);
        self.set_env("FAKETIME", offset);
        self.set_env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    }

    /// Writes a cluster key file (made from `seed`) next to the data
    /// directory and passes it with `--cluster-key-file`. Returns its path.
    pub fn use_key_file(&mut self, seed: u64) -> PathBuf {
        let path = write_key_file(&self.root.path().join("cluster.key"), seed);
        self.add_args(&[
            "--cluster-key-file",
            path.to_str().expect("utf-8 temp path"),
        ]);
        path
    }

    /// Writes `token` to a file next to the data directory and passes it with
    /// `--auth-token-file`. Returns its path.
    pub fn use_token(&mut self, token: &str) -> PathBuf {
        let path = self.root.path().join("token");
        fs::write(&path, format!("{token}\n")).expect("write token file");
        self.add_args(&["--auth-token-file", path.to_str().expect("utf-8 temp path")]);
        path
    }

    /// Runs the node under `wrapper` (a command ending in `--`, such as
    /// `strace -o FILE --`) from the next launch on. The wrapper must run the
    /// node as its only child and exit when the node does.
    pub fn set_wrapper(&mut self, wrapper: &[&str]) {
        self.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
    }

    /// Replaces the extra flags for the next launch.
    pub fn set_args(&mut self, args: &[&str]) {
        self.extra = args.iter().map(|s| s.to_string()).collect();
    }

    /// Starts a node with the default test flags plus `extra`
    /// (`--chunk-size 64KiB` unless `extra` sets a chunk size).
    pub async fn start(extra: &[&str]) -> Self {
        let mut node = Self::new(extra);
        node.launch().await;
        node
    }

    /// The temp directory everything of this node lives in.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// The node's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    /// The `host:port` the node's gRPC server listens on.
    pub fn addr(&self) -> &str {
        self.addr.as_deref().expect("node is not running")
    }

    /// The process id of the running node (under a wrapper: the wrapper's
    /// child, once it has started it).
    pub fn pid(&self) -> i32 {
        let child = self.child.as_ref().expect("node is not running").id();
        if self.wrapper.is_empty() {
            return child as i32;
        }
        self.wrapped_pid()
            .unwrap_or_else(|| panic!("the wrapper {:?} has no child process", self.wrapper))
    }

    /// The wrapper's child, if there is a wrapper and it has one.
    fn wrapped_pid(&self) -> Option<i32> {
        let child = self.child.as_ref()?.id();
        if self.wrapper.is_empty() {
            return None;
        }
        let children = fs::read_to_string(format!("/proc/{child}/task/{child}/children")).ok()?;
        children.split_whitespace().next()?.parse().ok()
    }

    /// Kills the node process itself with SIGKILL (under a wrapper, which
    /// would otherwise leave it running when killed itself).
    fn kill_node_process(&mut self) {
        if let Some(pid) = self.wrapped_pid() {
            // SAFETY: kill(2) on the wrapper's child, which it has not reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill(); // SIGKILL on Unix
            let _ = child.wait();
        }
        self.child = None;
    }

    /// Everything the node processes of this test wrote to stderr.
    pub fn log(&self) -> String {
        fs::read_to_string(self.root.path().join("node.log")).unwrap_or_default()
    }

    /// Spawns the node (reusing the data directory) on a fresh ephemeral
    /// port and waits until it has written its address file.
    pub async fn launch(&mut self) {
        assert!(self.child.is_none(), "node is already running");
        let addr_file = self.root.path().join("addr");
        let _ = fs::remove_file(&addr_file);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.path().join("node.log"))
            .expect("open node log");
        let chunk_size_default: &[&str] = if self.extra.iter().any(|a| a == "--chunk-size") {
            &[]
        } else {
            &["--chunk-size", "64KiB"]
        };
        // Every test node takes an ephemeral peer port: tests run in parallel.
        let p2p_default: &[&str] = if self.extra.iter().any(|a| a == "--p2p-addr") {
            &[]
        } else {
            &["--p2p-addr", "127.0.0.1:0"]
        };
        let mut command = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(dfs_bin());
                c
            }
            None => Command::new(dfs_bin()),
        };
        let child = command
            .arg("node")
            .arg("--data")
            .arg(self.data_dir())
            .args(["--grpc-addr", "127.0.0.1:0"])
            .args(chunk_size_default)
            .args(p2p_default)
            .arg("--addr-file")
            .arg(&addr_file)
            .args(&self.extra)
            .env("DFS_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn dfs node");
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(text) = fs::read_to_string(&addr_file)
                && let Some(line) = text.lines().next()
                && !line.trim().is_empty()
            {
                self.addr = Some(line.trim().to_owned());
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().expect("try_wait") {
                self.child = None;
                panic!(
                    "dfs node exited during start-up with {status}; log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "dfs node did not write its address file within {START_TIMEOUT:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The node's peer-protocol address, as its Cluster.Status reports it.
    pub async fn p2p_addr(&self) -> String {
        self.status().await.p2p_address
    }

    /// The node's Cluster.Status.
    pub async fn status(&self) -> dfs::proto::StatusResponse {
        self.cluster()
            .await
            .status(dfs::proto::StatusRequest {})
            .await
            .expect("cluster status")
            .into_inner()
    }

    /// Whether the node is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the node with SIGKILL (no chance to clean up) and reaps it.
    pub fn kill9(&mut self) {
        self.kill_node_process();
        self.addr = None;
    }

    /// Sends SIGTERM and waits (up to `timeout`) for the process to exit.
    /// Panics if it does not exit in time (after killing it).
    pub async fn sigterm_within(&mut self, timeout: Duration) -> ExitStatus {
        let pid = self.pid();
        let mut child = self.child.take().expect("node is not running");
        self.addr = None;
        // SAFETY: kill(2) with a pid we (or our wrapper) spawned and have not
        // reaped yet.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM) failed");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= deadline {
                // SAFETY: as above; the node may be a wrapper's child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "dfs node did not exit within {timeout:?} of SIGTERM; log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the node process is still running (not exited).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Sends `signal` to the node without waiting for anything.
    pub fn signal(&self, signal: i32) {
        let pid = self.pid();
        // SAFETY: kill(2) on a process we (or our wrapper) spawned and have
        // not reaped.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
    }

    /// Waits (up to `timeout`) for the node to exit on its own; returns its
    /// status. Panics (after killing it) if it does not.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().expect("node is not running");
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                self.addr = None;
                return status;
            }
            if Instant::now() >= deadline {
                self.kill_node_process();
                panic!(
                    "dfs node did not exit within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Graceful stop: SIGTERM, and the node must exit 0 within 10 s.
    pub async fn sigterm(&mut self) -> ExitStatus {
        self.sigterm_within(Duration::from_secs(10)).await
    }

    /// Stops the node gracefully if it runs, then starts it again on the
    /// same data directory and a new port.
    pub async fn restart(&mut self) {
        if self.child.is_some() {
            let status = self.sigterm().await;
            assert!(status.success(), "node exited with {status} on SIGTERM");
        }
        self.launch().await;
    }

    /// A gRPC channel to the node.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr()))
            .expect("valid uri")
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect to node")
    }

    /// The raw generated Storage client (no token).
    pub async fn storage(&self) -> StorageClient<Channel> {
        StorageClient::new(self.channel().await)
    }

    /// The raw generated Cluster client (no token).
    pub async fn cluster(&self) -> ClusterClient<Channel> {
        ClusterClient::new(self.channel().await)
    }

    /// The standard health client.
    pub async fn health(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel().await)
    }

    /// The crate's own client.
    pub async fn client(&self, token: Option<&str>) -> dfs::client::Client {
        dfs::client::Client::connect(self.addr(), token.map(str::to_owned))
            .await
            .expect("connect dfs client")
    }

    /// Files under `<data>/chunks/`.
    pub fn chunk_files(&self) -> Vec<PathBuf> {
        files_under(&self.data_dir().join("chunks"))
    }

    /// Files under `<data>/tmp/`.
    pub fn tmp_files(&self) -> Vec<PathBuf> {
        files_under(&self.data_dir().join("tmp"))
    }

    /// Files under `<data>/quarantine/`.
    pub fn quarantine_files(&self) -> Vec<PathBuf> {
        files_under(&self.data_dir().join("quarantine"))
    }

    /// Whether the node answers health checks with SERVING.
    pub async fn is_serving(&self) -> bool {
        let mut health = self.health().await;
        let resp = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await;
        matches!(resp, Ok(r) if r.get_ref().status
            == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
    }

    /// Asserts the node still works end to end: health SERVING and a small
    /// upload and download round trip, under a key and with bytes no earlier
    /// probe in this process used (a probe that re-uploads the same key and
    /// bytes could be served by a dedup hit and an old record).
    pub async fn assert_healthy(&self) {
        assert!(self.is_serving().await, "health is not SERVING");
        let mut storage = self.storage().await;
        let n = unique_number();
        let key = format!("health-probe-{}-{n}", std::process::id());
        let data = pseudo_random(n, 1000);
        upload(&mut storage, &key, &data, 333)
            .await
            .expect("probe upload");
        let (_, got) = download(&mut storage, key_request(&key, 0, 0))
            .await
            .expect("probe download");
        assert_eq!(got, data, "probe round trip");
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill_node_process();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("---- last lines of the node log ----");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Where Debian's libfaketime lives (`apt-get install faketime`).
pub fn faketime_lib() -> String {
    let candidates = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ];
    candidates
        .iter()
        .find(|p| Path::new(p).is_file())
        .map(|p| p.to_string())
        .expect("libfaketime is not installed (apt-get install faketime; make test installs it)")
}

/// Every regular file below `dir`, sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Copies a directory tree.
pub fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("create copy target");
    for e in fs::read_dir(from).expect("read dir").flatten() {
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            fs::copy(e.path(), &target).expect("copy file");
        }
    }
}

/// A number no earlier call in this test process returned.
pub fn unique_number() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        + 1_000_000
            * std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
}

/// Deterministic test data (splitmix64), different for each seed.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Lowercase hex SHA-1.
pub fn sha1_hex(data: &[u8]) -> String {
    hex::encode(Sha1::digest(data))
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls the async `cond` every 100 ms until it holds or `timeout` passes.
pub async fn wait_until_async<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls the async condition `cond` every 50 ms until it holds; panics with
/// `what` if `timeout` passes first.
pub async fn poll_until(timeout: Duration, what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `dfs node` with `args`, which must make it refuse to start: asserts
/// that it exits non-zero within 20 s, and returns what it wrote to stderr.
/// Both listen addresses are loopback port 0 unless `args` set them, so a
/// node that starts after all never takes a default port another test or
/// program might be using (and is killed when the wait gives up).
pub async fn refuse_to_start(args: &[&str]) -> String {
    let mut full = vec!["node"];
    for (flag, default) in [
        ("--grpc-addr", "127.0.0.1:0"),
        ("--p2p-addr", "127.0.0.1:0"),
    ] {
        if !args.contains(&flag) {
            full.extend_from_slice(&[flag, default]);
        }
    }
    full.extend_from_slice(args);
    let out = tokio::time::timeout(Duration::from_secs(20), run_dfs(&full))
        .await
        .unwrap_or_else(|_| panic!("dfs {full:?} did not exit: it started instead of refusing"));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "dfs {full:?} exited successfully; stderr: {stderr}"
    );
    stderr
}

/// The node's chunk count as Cluster.Status reports it.
pub async fn status_chunk_count(node: &TestNode) -> u64 {
    node.cluster()
        .await
        .status(dfs::proto::StatusRequest {})
        .await
        .expect("cluster status")
        .into_inner()
        .chunk_count
}

/// Runs the `dfs` binary with `args` and returns its output.
pub async fn run_dfs(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(dfs_bin())
        .args(args)
        .stdin(Stdio::null())
        // A test that gives up on the command (a timeout) must not leave
        // the process behind.
        .kill_on_drop(true)
        .output()
        .await
        .expect("run dfs")
}

/// Writes a fresh cluster key file (64 hex characters) and returns its path.
pub fn write_key_file(path: &Path, seed: u64) -> PathBuf {
    let key = hex::encode(pseudo_random(seed, 32));
    fs::write(path, format!("{key}\n")).expect("write key file");
    path.to_owned()
}

/// The chunk ids of `data` cut at [`CHUNK`], under the cluster key in `key_file`.
pub fn chunk_ids(key_file: &Path, data: &[u8]) -> Vec<dfs::crypto::ChunkId> {
    let secret = dfs::crypto::ClusterSecret::read_file(key_file).expect("read key file");
    let keys = dfs::crypto::Keys::derive(&secret);
    data.chunks(CHUNK).map(|c| keys.chunk_id(c)).collect()
}

/// Where a node keeps a chunk: `<data>/chunks/ab/cd/<hex>`.
pub fn chunk_path(data_dir: &Path, id: &dfs::crypto::ChunkId) -> PathBuf {
    data_dir.join("chunks").join(dfs::store::shard_path(id))
}

/// A free loopback port (bound, then released), for a node that must come
/// back on the same peer address.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}
