//! The client commands: put, get, ls, stat, rm, status.

use std::{io::IsTerminal, path::PathBuf};

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::ClientArgs;
use crate::{
    client::Client,
    proto::{ObjectInfo, UploadHeader},
};

#[derive(Args)]
pub struct PutArgs {
    /// File to upload
    file: PathBuf,
    /// Key to store it under (default: the file's name)
    #[arg(long)]
    key: Option<String>,
    /// Content type to record
    #[arg(long, default_value = "")]
    content_type: String,
    /// Print the result as JSON
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args)]
pub struct GetArgs {
    /// Key to download
    key: String,
    /// Where to write it: a path, or - for stdout (default: the key's last path segment)
    #[arg(short, long, value_name = "PATH")]
    output: Option<PathBuf>,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args)]
pub struct LsArgs {
    /// Only keys starting with this prefix
    #[arg(default_value = "")]
    prefix: String,
    /// Print the result as JSON
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args)]
pub struct StatArgs {
    /// Key to describe
    key: String,
    /// Print the result as JSON
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args)]
pub struct RmArgs {
    /// Key to delete
    key: String,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args)]
pub struct MembersArgs {
    #[command(subcommand)]
    command: Option<MembersCommand>,
    /// Print JSON
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(clap::Subcommand)]
pub enum MembersCommand {
    /// Remove a dead member for good: it stops counting at once on every
    /// node, repair re-replicates what it held, and it is refused if it ever
    /// comes back (a node needs a fresh data dir to rejoin). Refused while
    /// the member is up.
    Forget(ForgetArgs),
}

#[derive(Args)]
pub struct ForgetArgs {
    /// The member's node id (see `dfs members`)
    node_id: String,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args)]
pub struct StatusArgs {
    /// Print the result as JSON
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    client: ClientArgs,
}

/// A progress bar on stderr when it is a terminal, nothing otherwise.
fn progress_bar(len: Option<u64>) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match len {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::no_length(),
    };
    bar.set_style(
        ProgressStyle::with_template("{bytes}/{total_bytes} {wide_bar} {bytes_per_sec} {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// An object's info as JSON.
pub fn info_json(info: &ObjectInfo) -> serde_json::Value {
    json!({
        "key": info.key,
        "size": info.size,
        "sha1": info.sha1,
        "chunk_count": info.chunk_count,
        "chunk_size": info.chunk_size,
        "content_type": info.content_type,
        "metadata": info.metadata,
        "created_unix_ms": info.created_unix_ms,
        "version": info.version.as_ref().map(|v| json!({"hlc": v.hlc, "node_id": v.node_id})),
    })
}

pub async fn put(args: PutArgs) -> anyhow::Result<()> {
    let key = match args.key {
        Some(k) => k,
        None => args
            .file
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_owned)
            .context("cannot derive a key from the file name: pass --key")?,
    };
    let len = std::fs::metadata(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?
        .len();
    let mut client = args.client.connect().await?;
    let bar = progress_bar(Some(len));
    let tick = bar.clone();
    let header = UploadHeader {
        key,
        content_type: args.content_type,
        ..Default::default()
    };
    let info = client
        .upload_file(header, &args.file, move |n| tick.inc(n))
        .await;
    bar.finish_and_clear();
    let info = info?;
    if args.json {
        println!("{}", info_json(&info));
    } else {
        println!("{}\t{}\t{}", info.key, info.size, info.sha1);
    }
    Ok(())
}

pub async fn get(args: GetArgs) -> anyhow::Result<()> {
    let mut client = args.client.connect().await?;
    let request = Client::key_request(&args.key);
    let target = match &args.output {
        Some(p) if p.as_os_str() == "-" => None,
        Some(p) => Some(p.clone()),
        None => Some(PathBuf::from(default_file_name(&args.key)?)),
    };
    let Some(target) = target else {
        // Standard output as a plain file (a duplicate of descriptor 1):
        // unbuffered, with none of `Stdout`'s line handling.
        use std::os::fd::AsFd;
        let stdout = std::io::stdout().as_fd().try_clone_to_owned()?;
        let (info, sha1, _, _) = client
            .download(request, std::fs::File::from(stdout), |_| {})
            .await?;
        return check_sha1(&info, &sha1);
    };
    // A device, FIFO or socket (`-o /dev/null`, a named pipe) is written in
    // place: renaming a file over it would replace the device itself.
    if std::fs::metadata(&target).is_ok_and(|m| !m.is_file() && !m.is_dir()) {
        let out = std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .with_context(|| format!("cannot open {}", target.display()))?;
        let (info, sha1, _, _) = client.download(request, out, |_| {}).await?;
        return check_sha1(&info, &sha1);
    }
    // Write next to the target and rename at the end, so a failed download
    // never leaves a partial file at the target path.
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let partial = tempfile::Builder::new()
        .prefix(".dfs-partial-")
        .tempfile_in(&dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    let (file, partial_path) = partial.into_parts();
    let bar = progress_bar(None);
    let tick = bar.clone();
    let result = client.download(request, file, move |n| tick.inc(n)).await;
    bar.finish_and_clear();
    let (info, sha1, _, file) = result?;
    check_sha1(&info, &sha1)?;
    tokio::task::spawn_blocking(move || file.sync_all())
        .await?
        .context("cannot flush the downloaded file")?;
    partial_path
        .persist(&target)
        .with_context(|| format!("cannot write {}", target.display()))?;
    eprintln!("{}\t{}\t{}", target.display(), info.size, info.sha1);
    Ok(())
}

fn default_file_name(key: &str) -> anyhow::Result<String> {
    let name = key.rsplit('/').next().unwrap_or(key);
    anyhow::ensure!(
        !name.is_empty() && name != "." && name != "..",
        "key {key:?} does not end in a usable file name: pass -o PATH"
    );
    Ok(name.to_owned())
}

fn check_sha1(info: &ObjectInfo, got: &[u8; 20]) -> anyhow::Result<()> {
    let got = hex::encode(got);
    anyhow::ensure!(
        got == info.sha1,
        "DATA_LOSS: downloaded bytes have sha1 {got}, the object's is {}",
        info.sha1
    );
    Ok(())
}

pub async fn ls(args: LsArgs) -> anyhow::Result<()> {
    let mut client = args.client.connect().await?;
    let objects = client.list_all(&args.prefix).await?;
    if args.json {
        let all: Vec<_> = objects.iter().map(info_json).collect();
        println!("{}", serde_json::Value::Array(all));
    } else {
        for o in objects {
            println!("{}\t{}\t{}", o.size, o.sha1, o.key);
        }
    }
    Ok(())
}

pub async fn stat(args: StatArgs) -> anyhow::Result<()> {
    let mut client = args.client.connect().await?;
    let info = client.stat(&args.key).await?;
    if args.json {
        println!("{}", info_json(&info));
        return Ok(());
    }
    println!("key:          {}", info.key);
    println!(
        "size:         {} ({})",
        info.size,
        crate::units::format_size(info.size)
    );
    println!("sha1:         {}", info.sha1);
    println!(
        "chunks:       {} x {}",
        info.chunk_count,
        crate::units::format_size(info.chunk_size as u64)
    );
    println!("content type: {}", info.content_type);
    println!("created:      {} ms since epoch", info.created_unix_ms);
    if let Some(v) = &info.version {
        println!("version:      {}@{}", v.hlc, v.node_id);
    }
    let mut meta: Vec<_> = info.metadata.iter().collect();
    meta.sort();
    for (k, v) in meta {
        println!("meta:         {k}={v}");
    }
    Ok(())
}

pub async fn rm(args: RmArgs) -> anyhow::Result<()> {
    let mut client = args.client.connect().await?;
    client.delete(&args.key).await?;
    println!("deleted {}", args.key);
    Ok(())
}

fn members_json(s: &crate::proto::StatusResponse) -> Vec<serde_json::Value> {
    s.members
        .iter()
        .map(|m| {
            json!({"node_id": m.node_id, "address": m.address, "state": m.state,
            "last_seen_unix_ms": m.last_seen_unix_ms, "chunk_count": m.chunk_count,
            "bytes_stored": m.bytes_stored})
        })
        .collect()
}

pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let mut client = args.client.connect().await?;
    let s = client.status().await?;
    let scrub = s.scrub.unwrap_or_default();
    if args.json {
        println!(
            "{}",
            json!({"node_id": s.node_id, "grpc_address": s.grpc_address,
                "p2p_address": s.p2p_address, "object_count": s.object_count,
                "chunk_count": s.chunk_count, "bytes_stored": s.bytes_stored,
                "repair_backlog": s.repair_backlog, "peak_rss_bytes": s.peak_rss_bytes,
                "version": s.version, "writable": s.writable,
                "not_ready_reason": s.not_ready_reason,
                "scrub": {"passes": scrub.passes, "checked_this_pass": scrub.checked_this_pass,
                    "checked_total": scrub.checked_total, "corrupt_found": scrub.corrupt_found,
                    "last_pass_end_unix_ms": scrub.last_pass_end_unix_ms},
                "members": members_json(&s)})
        );
        return Ok(());
    }
    println!("node:      {} (dfs {})", s.node_id, s.version);
    println!("grpc:      {}", s.grpc_address);
    println!("p2p:       {}", s.p2p_address);
    println!("objects:   {}", s.object_count);
    println!(
        "chunks:    {} ({})",
        s.chunk_count,
        crate::units::format_size(s.bytes_stored)
    );
    println!("peak rss:  {}", crate::units::format_size(s.peak_rss_bytes));
    println!("repair:    {} chunks waiting", s.repair_backlog);
    println!(
        "scrub:     {} passes, {} checked this pass, {} bad copies found",
        scrub.passes, scrub.checked_this_pass, scrub.corrupt_found
    );
    if s.writable {
        println!("writes:    accepted");
    } else {
        println!("writes:    REFUSED: {}", s.not_ready_reason);
    }
    print_members(&s);
    Ok(())
}

pub async fn members(args: MembersArgs) -> anyhow::Result<()> {
    if let Some(MembersCommand::Forget(forget)) = &args.command {
        let mut client = forget.client.connect().await?;
        client.forget_member(&forget.node_id).await?;
        println!(
            "forgot member {}: it no longer counts anywhere, and repair re-replicates what it held",
            forget.node_id
        );
        return Ok(());
    }
    let mut client = args.client.connect().await?;
    let s = client.status().await?;
    if args.json {
        println!("{}", serde_json::Value::Array(members_json(&s)));
        return Ok(());
    }
    print_members(&s);
    Ok(())
}

fn print_members(s: &crate::proto::StatusResponse) {
    println!("members:");
    let now = crate::units::unix_ms();
    for m in &s.members {
        let seen = match m.last_seen_unix_ms {
            0 => "never seen".to_owned(),
            t => format!("seen {:.1}s ago", now.saturating_sub(t) as f64 / 1000.0),
        };
        println!(
            "  {}  {:<21}  {:<7}  {:<16}  {} chunks  {}",
            m.node_id,
            m.address,
            m.state,
            seen,
            m.chunk_count,
            crate::units::format_size(m.bytes_stored)
        );
    }
}
