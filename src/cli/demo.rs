//! `dfs demo`: a local node stores every file of a folder, survives a crash
//! (kill -9) and a restart, and gives every file back byte-exact.

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
    /// The demo node's data directory (emptied first)
    #[arg(long, default_value = "demo-data")]
    data: PathBuf,
}

/// A node process started by the demo.
struct DemoNode {
    child: tokio::process::Child,
    addr: String,
}

impl DemoNode {
    async fn start(data: &Path) -> anyhow::Result<Self> {
        let addr_file = data.join("grpc.addr");
        let _ = std::fs::remove_file(&addr_file);
        let child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("node")
            .arg("--data")
            .arg(data)
            .args(["--grpc-addr", "127.0.0.1:0", "--chunk-size", "1MiB"])
            .arg("--addr-file")
            .arg(&addr_file)
            .env("DFS_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a node process")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(text) = std::fs::read_to_string(&addr_file) {
                return Ok(Self {
                    child,
                    addr: text.trim().to_owned(),
                });
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the demo node did not start within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
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
    std::fs::create_dir_all(&args.out)?;

    println!("== starting a node in {}", args.data.display());
    let node = DemoNode::start(&args.data).await?;
    let mut client = Client::connect(&node.addr, None).await?;
    println!("   listening on {} (loopback only)", node.addr);

    println!(
        "== storing {} files from {}",
        files.len(),
        args.files.display()
    );
    let mut rows = Vec::new();
    let mut known = chunk_files(&args.data);
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
        let now = chunk_files(&args.data);
        let new: Vec<_> = now.difference(&known).cloned().collect();
        println!(
            "   {key}: {} bytes, sha1 {}, {} chunk(s), {} new on disk",
            info.size,
            info.sha1,
            info.chunk_count,
            new.len()
        );
        for p in new.iter().take(3) {
            println!("      {}", p.display());
        }
        if new.len() > 3 {
            println!("      ... and {} more", new.len() - 3);
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
    let leaked = plaintext_on_disk(&files, &known);
    println!(
        "   plaintext found in chunk files: {}",
        if leaked {
            "YES (bug!)"
        } else {
            "none (encrypted at rest)"
        }
    );

    println!("== crashing the node (kill -9) and restarting it from the same data directory");
    let DemoNode { mut child, .. } = node;
    child.start_kill()?;
    child.wait().await?;
    let node = DemoNode::start(&args.data).await?;
    let mut client = Client::connect(&node.addr, None).await?;

    println!("== recovering every file into {}", args.out.display());
    for (row, path) in rows.iter_mut().zip(&files) {
        let target = args.out.join(&row.key);
        let mut out = tokio::fs::File::create(&target).await?;
        let (_, got, _) = client
            .download(Client::key_request(&row.key), &mut out, |_| {})
            .await?;
        let original = sha1_file(path)?;
        row.recovered =
            hex::encode(got) == row.sha1 && original == row.sha1 && sha1_file(&target)? == original;
    }

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
        "\n{ok}/{} files recovered byte-exact after a crash and restart",
        rows.len()
    );

    let DemoNode { mut child, .. } = node;
    if let Some(pid) = child.id() {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    anyhow::ensure!(ok == rows.len() && !leaked, "the demo failed");
    Ok(())
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
