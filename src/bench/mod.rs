//! `dfs bench`: how fast a node stores and serves data, how much memory it
//! needs doing so, and, measured in the same run, what this machine's CPU
//! and disk allow, so every figure comes with the limit it is bounded by.

use std::{
    path::{Path, PathBuf},
    pin::Pin,
    process::Stdio,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use clap::Args;
use tokio::io::{AsyncRead, ReadBuf};

use crate::{
    client::Client,
    proto::UploadHeader,
    units::{format_size, parse_size},
};

/// Flags of `dfs bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Bytes to upload and download (e.g. 256MiB, 2GiB)
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub size: u64,
    /// Benchmark this node instead of starting one (peak RSS then comes from its Status)
    #[arg(long, env = "DFS_NODE")]
    pub node: Option<String>,
    /// Directory for the bench node's data and the disk test (default: a temporary directory under .)
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Number of 4 KiB objects for the small-object test (0 skips it)
    #[arg(long, default_value_t = 2000)]
    pub small_objects: usize,
    /// Concurrent clients for the small-object test
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Bytes written by the disk test
    #[arg(long, default_value = "512MiB", value_parser = parse_size)]
    pub disk_test_size: u64,
    /// Nodes to start: 1 benchmarks a single node; more start a local cluster
    /// and add CPU per GiB, every node's peak RSS and a repair measurement
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// Replicas (R) for a multi-node bench
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    /// Bytes stored before one node is killed to measure repair (multi-node; 0 skips it)
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub repair_size: u64,
    /// Extra flags for the bench node (e.g. "--chunk-size 8MiB")
    #[arg(long, allow_hyphen_values = true, default_value = "")]
    pub node_args: String,
    /// Run the 4 KiB put/get mix (--mix-ops operations, 16 clients) quiet,
    /// under hostile load, and quiet again: 8 downloads that never read, 8
    /// uploads stalled after one chunk, 500 idle gRPC and 200 idle peer
    /// connections; report both and the node's peak RSS
    #[arg(long)]
    pub hostile: bool,
    /// Operations (puts and gets) per run of the --hostile mix
    #[arg(long, default_value_t = 8000)]
    pub mix_ops: usize,
}

mod cluster;
mod hostile;
mod machine;

use machine::MachineLimits;

const MB: f64 = 1_000_000.0;

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let scratch = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            tempfile::Builder::new()
                .prefix("dfs-bench-")
                .tempdir_in(d)?
        }
        None => tempfile::Builder::new()
            .prefix("dfs-bench-")
            .tempdir_in(".")?,
    };
    if args.hostile {
        return run_hostile(&args, scratch.path()).await;
    }
    println!(
        "dfs bench: {} object, {} small objects x {} clients",
        format_size(args.size),
        args.small_objects,
        args.concurrency
    );
    let limits =
        tokio::task::block_in_place(|| machine::measure(scratch.path(), args.disk_test_size))?;
    limits.print(args.disk_test_size);

    if args.nodes > 1 {
        return cluster::run(&args, &limits, scratch.path()).await;
    }
    let mut child = None;
    let addr = match &args.node {
        Some(a) => a.clone(),
        None => {
            let (c, a) = start_node(&scratch.path().join("node"), &args.node_args).await?;
            child = Some(c);
            a
        }
    };
    let pid = child.as_ref().and_then(|c| c.id());
    let result = run_against(&addr, pid, &args, &limits).await;
    if let Some(mut c) = child {
        let _ = c.start_kill();
        let _ = c.wait().await;
    }
    result
}

/// `--hostile` on one node: the bench's own, or `--node`'s.
async fn run_hostile(args: &BenchArgs, dir: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(args.nodes <= 1, "--hostile runs against a single node");
    let ops = args.mix_ops.max(2 * hostile::CLIENTS);
    let Some(addr) = &args.node else {
        let (mut child, addr) = start_node(&dir.join("node"), &args.node_args).await?;
        let pid = child.id().unwrap_or(0).to_string();
        let result = hostile::run(&addr, ops, || crate::grpc::peak_rss_of(&pid)).await;
        let _ = child.start_kill();
        let _ = child.wait().await;
        return result;
    };
    let status_addr = addr.clone();
    let peak = move || {
        // The node's own figure, through its status.
        let handle = tokio::runtime::Handle::current();
        tokio::task::block_in_place(|| {
            handle.block_on(async {
                let mut c = Client::connect(&status_addr, std::env::var("DFS_TOKEN").ok())
                    .await
                    .ok()?;
                c.status().await.ok().map(|s| s.peak_rss_bytes)
            })
        })
    };
    hostile::run(addr, ops, peak).await
}

async fn run_against(
    addr: &str,
    pid: Option<u32>,
    args: &BenchArgs,
    limits: &MachineLimits,
) -> anyhow::Result<()> {
    let mut client = Client::connect(addr, std::env::var("DFS_TOKEN").ok()).await?;
    let rss_before = client.status().await?.peak_rss_bytes;
    // The node's CPU seconds (user + system), when the bench started it.
    let node_cpu = || pid.and_then(proc_cpu_seconds);

    let key = format!("bench/{}", std::process::id());
    let header = UploadHeader {
        key: key.clone(),
        ..Default::default()
    };
    let up = Measured::start(node_cpu());
    let info = client
        .upload(header, RandomReader::new(args.size, 0x5eed_1234), |_| {})
        .await?;
    let up = up.stop(args.size, node_cpu());
    let rss_after_upload = client.status().await?.peak_rss_bytes;

    let down = Measured::start(node_cpu());
    let (_, got) = client.download_discard(Client::key_request(&key)).await?;
    let down = down.stop(args.size, node_cpu());
    anyhow::ensure!(got == info.size, "downloaded {got} bytes of {}", info.size);
    let (get, get_client_cpu) = dfs_get_to_null(addr, &key, args.size, node_cpu).await?;
    let status = client.status().await?;
    client.delete(&key).await?;

    println!("node {addr}:");
    println!(
        "  upload    {:>8.0} MB/s  ({:.2} s)  = {:.2} x disk write+fdatasync",
        up.rate / MB,
        up.secs,
        up.rate / limits.disk_write_fdatasync
    );
    println!(
        "  download  {:>8.0} MB/s  ({:.2} s)  = {:.2} x decrypt + verify (one core)",
        down.rate / MB,
        down.secs,
        down.rate / limits.open
    );
    println!(
        "  dfs get -o /dev/null  {:>8.0} MB/s  ({:.2} s)  = {:.2} x decrypt + verify (one core); \
         client CPU {:.2} s per GiB (it checks the whole-file SHA-1, which alone caps it \
         at {:.2} x)",
        get.rate / MB,
        get.secs,
        get.rate / limits.open,
        get_client_cpu / up.gib,
        limits.sha1 / limits.open
    );
    if let (Some(u), Some(d), Some(g)) = (up.cpu_per_gib, down.cpu_per_gib, get.cpu_per_gib) {
        let read = MachineLimits::secs_per_gib(limits.open);
        let read_v1 = MachineLimits::secs_per_gib(limits.open_v1);
        let seal = MachineLimits::secs_per_gib(limits.seal);
        println!(
            "  node CPU per GiB downloaded: {d:.2} s ({g:.2} s under dfs get) = {:.2} x the crypto \
             a verified read needs ({read:.2} s; format 1 needed {read_v1:.2} s)",
            d / read
        );
        let read_floor = limits.floor(read, 1.0, 0.0);
        println!(
            "    floor over loopback (that crypto + one socket send): {read_floor:.2} s = {:.2} x",
            read_floor / read
        );
        println!(
            "  node CPU per GiB uploaded:   {u:.2} s = {:.2} x its crypto (file SHA-1 + seal, {seal:.2} s)",
            u / seal
        );
        let seal_floor = limits.floor(seal, 0.0, 1.0);
        println!(
            "    floor over loopback (that crypto + one socket receive): {seal_floor:.2} s = {:.2} x",
            seal_floor / seal
        );
    }
    println!(
        "  node peak RSS (VmHWM): {} at start, {} after upload, {} after download",
        format_size(rss_before),
        format_size(rss_after_upload),
        format_size(status.peak_rss_bytes)
    );

    if args.small_objects > 0 {
        small_objects(client, args.small_objects, args.concurrency).await?;
    }
    Ok(())
}

/// One timed transfer: wall time, rate and (when known) the node's CPU.
struct Measured {
    secs: f64,
    rate: f64,
    gib: f64,
    cpu_per_gib: Option<f64>,
}

struct Started(Instant, Option<f64>);

impl Measured {
    fn start(cpu: Option<f64>) -> Started {
        Started(Instant::now(), cpu)
    }
}

impl Started {
    fn stop(self, bytes: u64, cpu: Option<f64>) -> Measured {
        let secs = self.0.elapsed().as_secs_f64();
        let gib = bytes as f64 / (1u64 << 30) as f64;
        Measured {
            secs,
            rate: bytes as f64 / secs,
            gib,
            cpu_per_gib: self.1.zip(cpu).map(|(a, b)| (b - a) / gib),
        }
    }
}

/// Runs `dfs get KEY -o /dev/null` (which checks the whole-file SHA-1 as a
/// user's download does). Returns the measurement and the command's CPU
/// seconds.
async fn dfs_get_to_null(
    addr: &str,
    key: &str,
    size: u64,
    node_cpu: impl Fn() -> Option<f64>,
) -> anyhow::Result<(Measured, f64)> {
    let children_before = children_cpu_seconds();
    let started = Measured::start(node_cpu());
    let out = tokio::process::Command::new(std::env::current_exe()?)
        .args(["get", "--node", addr, key, "-o", "/dev/null"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await?;
    let measured = started.stop(size, node_cpu());
    anyhow::ensure!(
        out.status.success(),
        "dfs get failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok((measured, children_cpu_seconds() - children_before))
}

/// CPU seconds (user + system) of this process's children that have ended.
fn children_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes only into the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// A process's CPU seconds (user + system) so far, from `/proc/<pid>/stat`.
fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / ticks)
}

/// Many 4 KiB uploads from concurrent clients: objects/s and latency.
pub(super) async fn small_objects(
    client: Client,
    count: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (mut client, next) = (client.clone(), next.clone());
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    return Ok::<_, anyhow::Error>(latencies);
                }
                let header = UploadHeader {
                    key: format!("bench-small/{i}"),
                    ..Default::default()
                };
                let t = Instant::now();
                client
                    .upload(header, RandomReader::new(4096, i as u64 + 1), |_| {})
                    .await?;
                latencies.push(t.elapsed());
            }
        });
    }
    let mut all: Vec<Duration> = Vec::with_capacity(count);
    while let Some(done) = tasks.join_next().await {
        all.extend(done??);
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    println!(
        "  4 KiB objects, {concurrency} clients: {:.0} objects/s, p50 {:.1} ms, p99 {:.1} ms",
        count as f64 / secs,
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3
    );
    let mut cleanup = client;
    for i in 0..count {
        let _ = cleanup.delete(&format!("bench-small/{i}")).await;
    }
    Ok(())
}

async fn start_node(dir: &Path, extra: &str) -> anyhow::Result<(tokio::process::Child, String)> {
    std::fs::create_dir_all(dir)?;
    let addr_file = dir.join("addr");
    let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
    cmd.arg("node")
        .arg("--data")
        .arg(dir)
        .args(["--p2p-addr", "127.0.0.1:0"])
        .arg("--grpc-addr")
        .arg("127.0.0.1:0")
        .arg("--addr-file")
        .arg(&addr_file)
        .args(extra.split_whitespace())
        .env("DFS_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let child = cmd.spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(text) = std::fs::read_to_string(&addr_file) {
            return Ok((child, text.trim().to_owned()));
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "bench node did not start within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An endless-looking stream of pseudo-random bytes of a set length. Every
/// chunk differs, so dedup cannot flatter the figures. xorshift64*: fast
/// enough that the generator is never what is measured.
struct RandomReader {
    remaining: u64,
    state: u64,
}

impl RandomReader {
    fn new(len: u64, seed: u64) -> Self {
        Self {
            remaining: len,
            state: seed | 1,
        }
    }

    fn fill(&mut self, out: &mut [u8]) {
        for word in out.chunks_mut(8) {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            let v = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            word.copy_from_slice(&v[..word.len()]);
        }
    }
}

impl AsyncRead for RandomReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = (buf.remaining() as u64).min(self.remaining) as usize;
        let dst = buf.initialize_unfilled_to(n);
        self.fill(dst);
        buf.advance(n);
        self.remaining -= n as u64;
        Poll::Ready(Ok(()))
    }
}
