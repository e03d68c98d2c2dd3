//! The cluster's processes: real `dfs node`s, each on its own loopback
//! address, in its own process group, as its own uid, started, killed,
//! stopped, skewed and replaced for real.

use std::{
    fs,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use crate::{caps::Caps, config::Config};

/// Whether a node process is meant to be running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcState {
    Running,
    /// SIGSTOPped by the harness.
    Stopped,
    /// Not running: killed, stopped for good, or not started.
    Down,
}

/// One node position: its addresses and uid stay, its data directory and
/// process come and go.
#[derive(Debug)]
pub struct NodeSlot {
    pub idx: usize,
    pub ip: String,
    pub grpc: String,
    pub p2p: String,
    pub uid: Option<u32>,
    /// `<run>/n<i>`: the log and every data directory this slot had.
    pub dir: PathBuf,
    pub generation: u32,
    pub child: Option<Child>,
    pub state: ProcState,
    pub skew_ms: i64,
    pub capacity: Option<u64>,
    /// The node id the running process reported, once it did.
    pub node_id: String,
    /// Highest VmHWM seen for this slot, any generation.
    pub peak_rss: u64,
}

impl NodeSlot {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("node.log")
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// Sends `sig` to the node's whole process group (a wrapper such as
    /// faketime may fork; the group holds every process of the node).
    pub fn signal_group(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on a process group we created and have not reaped.
            unsafe {
                libc::kill(-pid, sig);
            }
        }
    }
}

/// The cluster: every slot and what starting a node needs.
pub struct Procs {
    pub slots: Vec<Mutex<NodeSlot>>,
    cfg: Config,
    caps: Caps,
    key_file: PathBuf,
}

impl Procs {
    /// Lays out `<run>/n<i>` for every node; starts nothing.
    pub fn new(cfg: &Config, caps: &Caps, run_dir: &Path) -> anyhow::Result<Arc<Self>> {
        let key_file = run_dir.join("cluster.key");
        // The cluster key is derived from the seed: a replay has the same
        // chunk ids, so files named in a report can be found again.
        let key = hex::encode(crate::rng::DataGen::new(cfg.seed, u64::MAX).bytes(0, 32));
        fs::write(&key_file, format!("{key}\n"))?;
        fs::set_permissions(&key_file, fs::Permissions::from_mode(0o644))?;
        let mut slots = Vec::new();
        for idx in 0..cfg.nodes {
            let ip = format!("{}.{}", cfg.net, idx + 1);
            let dir = run_dir.join(format!("n{}", idx + 1));
            fs::create_dir_all(&dir)?;
            slots.push(Mutex::new(NodeSlot {
                idx,
                grpc: format!("{ip}:{}", cfg.grpc_port),
                p2p: format!("{ip}:{}", cfg.p2p_port),
                ip,
                uid: caps.root.then_some(cfg.uid_base + idx as u32 + 1),
                dir,
                generation: 0,
                child: None,
                state: ProcState::Down,
                skew_ms: 0,
                capacity: None,
                node_id: String::new(),
                peak_rss: 0,
            }));
        }
        Ok(Arc::new(Self {
            slots,
            cfg: cfg.clone(),
            caps: caps.clone(),
            key_file,
        }))
    }

    pub fn key_file(&self) -> &Path {
        &self.key_file
    }

    pub fn slot(&self, i: usize) -> MutexGuard<'_, NodeSlot> {
        self.slots[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn grpc_addr(&self, i: usize) -> String {
        self.slot(i).grpc.clone()
    }

    /// Starts slot `i`'s node on its current data directory (creating it)
    /// and waits until it answers Cluster.Status.
    pub async fn start(&self, i: usize, why: &str) -> anyhow::Result<()> {
        let addr = {
            let mut slot = self.slot(i);
            anyhow::ensure!(slot.child.is_none(), "node {} is already running", i + 1);
            self.spawn(&mut slot, why)?;
            slot.grpc.clone()
        };
        let id = wait_ready(&addr, Duration::from_secs(30))
            .await
            .map_err(|e| anyhow::anyhow!("node {} did not come up: {e}", i + 1))?;
        self.slot(i).node_id = id;
        Ok(())
    }

    fn spawn(&self, slot: &mut NodeSlot, why: &str) -> anyhow::Result<()> {
        let data = slot.data_dir();
        if !data.exists() {
            fs::create_dir_all(&data)?;
            fs::set_permissions(&data, fs::Permissions::from_mode(0o700))?;
            if let Some(uid) = slot.uid {
                chown(&data, uid)?;
            }
        }
        slot.generation += 1;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(slot.log_path())?;
        {
            use std::io::Write;
            let mut l = &log;
            writeln!(
                l,
                "==== dfs-chaos: start #{} at {} ms ({why}; skew {} ms, capacity {:?})",
                slot.generation,
                crate::history::now_ms(),
                slot.skew_ms,
                slot.capacity
            )?;
        }
        let mut cmd = Command::new(&self.cfg.dfs_bin);
        cmd.args(self.node_args(slot))
            .env("DFS_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        if slot.skew_ms != 0 {
            cmd.env("LD_PRELOAD", crate::caps::LIBFAKETIME)
                .env("FAKETIME", format!("{:+.3}", slot.skew_ms as f64 / 1000.0))
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
                .env("FAKETIME_NO_CACHE", "1");
        }
        if let Some(uid) = slot.uid {
            cmd.uid(uid).gid(uid);
        }
        slot.child =
            Some(cmd.spawn().map_err(|e| {
                anyhow::anyhow!("cannot start {}: {e}", self.cfg.dfs_bin.display())
            })?);
        slot.state = ProcState::Running;
        slot.node_id.clear();
        Ok(())
    }

    fn node_args(&self, slot: &NodeSlot) -> Vec<String> {
        let t = &self.cfg.timers;
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        let mut a: Vec<String> = vec!["node".into(), "--data".into()];
        a.push(slot.data_dir().display().to_string());
        for (flag, value) in [
            ("--grpc-addr", slot.grpc.clone()),
            ("--p2p-addr", slot.p2p.clone()),
            ("--replicas", self.cfg.replicas.to_string()),
            ("--chunk-size", self.cfg.chunk_size.to_string()),
            ("--dead-after", ms(t.dead_after)),
            ("--sync-interval", ms(t.sync_interval)),
            ("--repair-interval", ms(t.repair_interval)),
            ("--gc-grace", ms(t.gc_grace)),
            ("--gc-interval", ms(t.gc_interval)),
            ("--shutdown-grace", ms(t.shutdown_grace)),
            ("--cluster-key-file", self.key_file.display().to_string()),
        ] {
            a.push(flag.into());
            a.push(value);
        }
        for other in 0..self.cfg.nodes {
            if other != slot.idx {
                a.push("--peer".into());
                a.push(format!(
                    "{}.{}:{}",
                    self.cfg.net,
                    other + 1,
                    self.cfg.p2p_port
                ));
            }
        }
        if let Some(c) = slot.capacity {
            a.extend(["--capacity".into(), c.to_string()]);
        }
        a.extend(self.optional_args());
        a
    }

    /// Flags of features the binary may not have yet (see `caps`).
    fn optional_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if self.caps.max_clock_skew {
            a.push("--max-clock-skew".into());
            a.push(format!("{}ms", self.cfg.max_skew.as_millis()));
        }
        if self.caps.scrub {
            // A full pass every few seconds: a flipped byte is found and
            // repaired well within the heal period.
            a.push("--scrub-interval".into());
            a.push("10s".into());
        }
        if self.caps.scrub_rate {
            a.push("--scrub-rate".into());
            a.push("64MiB".into());
        }
        if self.caps.idle_timeout {
            a.push("--idle-timeout".into());
            a.push(format!("{}ms", self.idle_timeout().as_millis()));
        }
        a
    }

    /// The idle timeout given to nodes that have one: longer than every
    /// planned pause, so paused uploads test the GC lease, not the timeout.
    pub fn idle_timeout(&self) -> Duration {
        self.cfg.timers.gc_grace * 3 + Duration::from_secs(10)
    }

    /// SIGKILL to the node's process group, and reap it.
    pub async fn kill9(&self, i: usize) {
        let child = {
            let mut slot = self.slot(i);
            slot.signal_group(libc::SIGCONT);
            slot.signal_group(libc::SIGKILL);
            slot.state = ProcState::Down;
            slot.child.take()
        };
        if let Some(mut child) = child {
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        }
    }

    /// SIGSTOP or SIGCONT to the node's process group.
    pub fn pause(&self, i: usize, stop: bool) {
        let mut slot = self.slot(i);
        if slot.child.is_none() {
            return;
        }
        if stop {
            slot.signal_group(libc::SIGSTOP);
            slot.state = ProcState::Stopped;
        } else {
            slot.signal_group(libc::SIGCONT);
            slot.state = ProcState::Running;
        }
    }

    /// SIGTERM to the node, which must exit 0 within its shutdown grace
    /// (plus slack for a loaded machine). Returns how it exited, or an error
    /// after killing it when it did not exit in time.
    pub async fn terminate(&self, i: usize) -> Result<ExitStatus, String> {
        let child = {
            let mut slot = self.slot(i);
            slot.signal_group(libc::SIGCONT);
            if let Some(pid) = slot.pid() {
                // SAFETY: kill(2) on our own unreaped child.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
            slot.state = ProcState::Down;
            slot.child.take()
        };
        let Some(mut child) = child else {
            return Err("not running".into());
        };
        let limit = self.cfg.timers.shutdown_grace + Duration::from_secs(15);
        let start = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if start.elapsed() < limit => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                _ => {
                    // SAFETY: as above; the whole group goes.
                    unsafe {
                        libc::kill(-(child.id() as i32), libc::SIGKILL);
                    }
                    let _ = child.wait();
                    return Err(format!("did not exit within {limit:?} of SIGTERM"));
                }
            }
        }
    }

    /// Moves the slot's data directory aside (kept for the report) so the
    /// next start is a fresh node with a new id on the same address.
    pub fn wipe(&self, i: usize) -> anyhow::Result<PathBuf> {
        let slot = self.slot(i);
        let aside = slot.dir.join(format!("data.replaced-{}", slot.generation));
        fs::rename(slot.data_dir(), &aside)?;
        Ok(aside)
    }

    /// Bytes of chunk files in slot `i`'s data directory.
    pub fn chunk_bytes(&self, i: usize) -> u64 {
        let dir = self.slot(i).data_dir().join("chunks");
        chunk_files(&dir)
            .iter()
            .filter_map(|p| fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Samples every running node's peak RSS (VmHWM) and returns the slots
    /// whose process exited without the harness asking, with the status.
    pub fn poll(&self) -> Vec<(usize, String)> {
        let mut exited = Vec::new();
        for i in 0..self.slots.len() {
            let mut slot = self.slot(i);
            if let Some(pid) = slot.pid()
                && let Some(hwm) = vm_hwm(pid)
            {
                slot.peak_rss = slot.peak_rss.max(hwm);
            }
            let status = match slot.child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(status))) => status,
                _ => continue,
            };
            slot.child = None;
            slot.state = ProcState::Down;
            exited.push((i, status.to_string()));
        }
        exited
    }

    /// Kills every node still running (end of run, error or Ctrl-C).
    pub fn kill_all(&self) {
        for i in 0..self.slots.len() {
            let mut slot = self.slot(i);
            slot.signal_group(libc::SIGCONT);
            slot.signal_group(libc::SIGKILL);
            if let Some(mut c) = slot.child.take() {
                let _ = c.wait();
            }
            slot.state = ProcState::Down;
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Every chunk file under `dir` (`<data>/chunks`), sorted.
pub fn chunk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(t) if t.is_file() => out.push(p),
                _ => {}
            }
        }
    }
    out.sort();
    out
}

fn chown(path: &Path, uid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(uid))
        .map_err(|e| anyhow::anyhow!("cannot chown {}: {e}", path.display()))
}

/// Peak resident set size of a process, from `/proc/<pid>/status`.
fn vm_hwm(pid: i32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Polls Cluster.Status until the node answers; returns its id.
pub async fn wait_ready(addr: &str, timeout: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(2), status(addr)).await {
            Ok(Ok(s)) => return Ok(s.node_id),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "status call timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("no answer at {addr} within {timeout:?}: {last}")
}

/// One Cluster.Status call.
pub async fn status(addr: &str) -> anyhow::Result<dfs::proto::StatusResponse> {
    let mut client = dfs::client::Client::connect(addr, None).await?;
    Ok(client.status().await?)
}
