//! `dfs demo`: a local three-node cluster (R=2) stores every file of a folder,
//! loses a node to kill -9, gives every file back byte-exact through another
//! node, and repairs the lost copies by itself.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Args;
use sha1::{Digest, Sha1};

use crate::{client::Client, proto::UploadHeader, units::format_size};

#[derive(Args)]
pub struct DemoArgs {
    /// Folder whose files are stored
    #[arg(long, default_value = "test_files")]
    files: PathBuf,
    /// Where the recovered copies are written
    #[arg(long, default_value = "recovered_files")]
    out: PathBuf,
    /// The demo cluster's data directory (emptied first)
    #[arg(long, default_value = "demo-data")]
    data: PathBuf,
}

/// Nodes in the demo cluster, and the copies each chunk gets.
const NODES: usize = 3;
const REPLICAS: &str = "2";

/// A node process started by the demo.
struct DemoNode {
    child: Option<tokio::process::Child>,
    data: PathBuf,
    addr: String,
    p2p: String,
}

impl DemoNode {
    async fn start(data: &Path, key: &Path, peer: Option<&str>) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data)?;
        let addr_file = data.join("grpc.addr");
        let _ = std::fs::remove_file(&addr_file);
        let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
        cmd.arg("node")
            .arg("--data")
            .arg(data)
            .arg("--cluster-key-file")
            .arg(key)
            .args(["--grpc-addr", "127.0.0.1:0", "--p2p-addr", "127.0.0.1:0"])
            .args(["--chunk-size", "1MiB", "--replicas", REPLICAS])
            .args([
                "--dead-after",
                "2s",
                "--repair-interval",
                "1s",
                "--sync-interval",
                "2s",
            ])
            .arg("--addr-file")
            .arg(&addr_file)
            .env("DFS_LOG", "error")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(p) = peer {
            cmd.args(["--peer", p]);
        }
        let child = cmd.spawn().context("cannot start a node process")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr = loop {
            if let Ok(text) = std::fs::read_to_string(&addr_file) {
                break text.trim().to_owned();
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "a demo node did not start within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let p2p = Client::connect(&addr, None)
            .await?
            .status()
            .await?
            .p2p_address;
        Ok(Self {
            child: Some(child),
            data: data.to_owned(),
            addr,
            p2p,
        })
    }

    async fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = c.id() {
                // SAFETY: plain kill(2) on our own child's pid.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
            let _ = tokio::time::timeout(Duration::from_secs(10), c.wait()).await;
        }
    }
}

struct Row {
    key: String,
    size: u64,
    sha1: String,
    chunks: u32,
    recovered: bool,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(&args.files)
        .with_context(|| format!("cannot read {}", args.files.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    anyhow::ensure!(!files.is_empty(), "no files in {}", args.files.display());
    if args.data.exists() {
        std::fs::remove_dir_all(&args.data)
            .with_context(|| format!("cannot empty {}", args.data.display()))?;
    }
    std::fs::create_dir_all(&args.data)?;
    std::fs::create_dir_all(&args.out)?;
    let key = args.data.join("cluster.key");
    crate::crypto::ClusterSecret::generate().write_new_file(&key)?;

    println!(
        "== starting {NODES} nodes (R={REPLICAS}) on loopback, data in {}",
        args.data.display()
    );
    let mut nodes: Vec<DemoNode> = Vec::new();
    for i in 1..=NODES {
        let peer = nodes.first().map(|n| n.p2p.clone());
        let node =
            DemoNode::start(&args.data.join(format!("node{i}")), &key, peer.as_deref()).await?;
        println!("   node{i}: gRPC {}  peer port {}", node.addr, node.p2p);
        nodes.push(node);
    }
    wait_for_members(&nodes).await?;

    println!(
        "== storing {} files from {} through node1",
        files.len(),
        args.files.display()
    );
    let mut client = Client::connect(&nodes[0].addr, None).await?;
    let mut rows = Vec::new();
    let mut known = chunk_locations(&nodes);
    for path in &files {
        let key = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let header = UploadHeader {
            key: key.clone(),
            ..Default::default()
        };
        let info = client.upload_file(header, path, |_| {}).await?;
        let now = chunk_locations(&nodes);
        println!(
            "   {key}: {} bytes, sha1 {}, {} chunk(s)",
            info.size, info.sha1, info.chunk_count
        );
        for (chunk, holders) in now.iter().filter(|(c, _)| !known.contains_key(*c)) {
            let names: Vec<String> = holders.iter().map(|i| format!("node{}", i + 1)).collect();
            println!("      chunk {}… on {}", &chunk[..12], names.join(", "));
        }
        known = now;
        rows.push(Row {
            key,
            size: info.size,
            sha1: info.sha1,
            chunks: info.chunk_count,
            recovered: false,
        });
    }
    let all_chunks: BTreeSet<PathBuf> = nodes.iter().flat_map(|n| chunk_files(&n.data)).collect();
    let leaked = plaintext_on_disk(&files, &all_chunks);
    println!(
        "   plaintext found in chunk files: {}",
        if leaked {
            "YES (bug!)"
        } else {
            "none (encrypted at rest)"
        }
    );

    println!("== killing node2 (kill -9)");
    nodes[1].kill9().await;

    println!(
        "== recovering every file through node3 into {}",
        args.out.display()
    );
    let mut client = Client::connect(&nodes[2].addr, None).await?;
    for (row, path) in rows.iter_mut().zip(&files) {
        let target = args.out.join(&row.key);
        let out = std::fs::File::create(&target)?;
        let (_, got, _, _) = client
            .download(Client::key_request(&row.key), out, |_| {})
            .await?;
        let original = sha1_file(path)?;
        row.recovered =
            hex::encode(got) == row.sha1 && original == row.sha1 && sha1_file(&target)? == original;
    }

    println!(
        "== waiting for repair to bring every chunk back to {REPLICAS} copies on the survivors"
    );
    let started = Instant::now();
    let repaired = loop {
        let locations = chunk_locations(&nodes);
        let live: Vec<usize> = vec![0, 2];
        let min = locations
            .values()
            .map(|h| h.iter().filter(|i| live.contains(i)).count())
            .min()
            .unwrap_or(0);
        if min >= 2 {
            break true;
        }
        if started.elapsed() > Duration::from_secs(30) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "   {}",
        if repaired {
            format!(
                "done in {:.1} s, no operator action",
                started.elapsed().as_secs_f64()
            )
        } else {
            "NOT repaired within 30 s".into()
        }
    );

    println!();
    println!(
        "{:<24} {:>10} {:>7}  {:<40}  result",
        "file", "size", "chunks", "sha1"
    );
    for r in &rows {
        println!(
            "{:<24} {:>10} {:>7}  {:<40}  {}",
            r.key,
            format_size(r.size),
            r.chunks,
            r.sha1,
            if r.recovered {
                "recovered, sha1 verified"
            } else {
                "MISMATCH"
            }
        );
    }
    let ok = rows.iter().filter(|r| r.recovered).count();
    println!(
        "\n{ok}/{} files recovered byte-exact with node2 dead; chunks repaired: {}",
        rows.len(),
        if repaired { "yes" } else { "no" }
    );
    for n in &mut nodes {
        n.stop().await;
    }
    anyhow::ensure!(ok == rows.len() && !leaked && repaired, "the demo failed");
    Ok(())
}

async fn wait_for_members(nodes: &[DemoNode]) -> anyhow::Result<()> {
    for n in nodes {
        let mut client = Client::connect(&n.addr, None).await?;
        client
            .wait_for_peers_up(nodes.len() - 1, Duration::from_secs(20))
            .await?;
    }
    Ok(())
}

/// Chunk file name -> indexes of the nodes holding it.
fn chunk_locations(nodes: &[DemoNode]) -> std::collections::BTreeMap<String, Vec<usize>> {
    let mut map: std::collections::BTreeMap<String, Vec<usize>> = Default::default();
    for (i, n) in nodes.iter().enumerate() {
        for p in chunk_files(&n.data) {
            if let Some(name) = p.file_name().and_then(|s| s.to_str()) {
                map.entry(name.to_owned()).or_default().push(i);
            }
        }
    }
    map
}

fn chunk_files(data: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![data.join("chunks")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p)
            } else {
                out.insert(p);
            }
        }
    }
    out
}

/// Whether any 64-byte window of an input file's start appears in a chunk file.
fn plaintext_on_disk(inputs: &[PathBuf], chunks: &BTreeSet<PathBuf>) -> bool {
    let needles: Vec<Vec<u8>> = inputs
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .filter(|b| b.len() >= 64)
        .map(|b| b[..64].to_vec())
        .collect();
    chunks
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .any(|hay| {
            needles
                .iter()
                .any(|n| hay.windows(n.len()).any(|w| w == n.as_slice()))
        })
}

fn sha1_file(path: &Path) -> anyhow::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha1::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}
