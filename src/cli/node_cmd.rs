//! `dfs node`: run a storage node until SIGINT or SIGTERM.

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use clap::{Args, ValueEnum};

use super::{duration_arg, size_arg};
use crate::{config::NodeConfig, grpc, node::Node};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Flags of `dfs node`. Each has an environment twin.
#[derive(Args, Debug)]
pub struct NodeArgs {
    /// Data directory (chunks, index, node id)
    #[arg(
        long,
        env = "DFS_DATA",
        default_value = "./dfs-data",
        value_name = "DIR"
    )]
    pub data: PathBuf,
    /// gRPC listen address; loopback unless you say otherwise (port 0: any free port)
    #[arg(long, env = "DFS_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: String,
    /// Peer-protocol address this node announces (the peer protocol is not served yet)
    #[arg(long, env = "DFS_P2P_ADDR", default_value = "127.0.0.1:4040")]
    pub p2p_addr: String,
    /// File holding the cluster secret (64 hex chars); default: <data>/cluster.key, created if absent
    #[arg(long, env = "DFS_CLUSTER_KEY_FILE", value_name = "PATH")]
    pub cluster_key_file: Option<PathBuf>,
    /// Chunk size for new uploads (64KiB..=16MiB)
    #[arg(long, env = "DFS_CHUNK_SIZE", default_value = "4MiB", value_parser = size_arg)]
    pub chunk_size: u64,
    /// File holding a bearer token that Storage and Cluster calls must carry
    #[arg(long, env = "DFS_AUTH_TOKEN_FILE", value_name = "PATH")]
    pub auth_token_file: Option<PathBuf>,
    /// Log format on stderr
    #[arg(long, env = "DFS_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// How long an unreferenced chunk is kept before it is deleted
    #[arg(long, env = "DFS_GC_GRACE", default_value = "1h", value_parser = duration_arg)]
    pub gc_grace: Duration,
    /// How often to look for unreferenced chunks
    #[arg(long, env = "DFS_GC_INTERVAL", default_value = "10m", value_parser = duration_arg)]
    pub gc_interval: Duration,
    /// Most bytes of chunk data this node stores (default: until the disk is full)
    #[arg(long, env = "DFS_CAPACITY", value_parser = size_arg)]
    pub capacity: Option<u64>,
    /// Node-wide memory for chunk buffers in flight (at least two chunks)
    #[arg(long, env = "DFS_BUFFER_BUDGET", default_value = "32MiB", value_parser = size_arg)]
    pub buffer_budget: u64,
    /// Write the bound gRPC address to this file once serving
    #[arg(long, env = "DFS_ADDR_FILE", value_name = "PATH")]
    pub addr_file: Option<PathBuf>,
    /// How long in-flight requests may run after SIGTERM
    #[arg(long, env = "DFS_SHUTDOWN_GRACE", default_value = "30s", value_parser = duration_arg)]
    pub shutdown_grace: Duration,
}

pub fn run(args: NodeArgs) -> anyhow::Result<ExitCode> {
    init_logging(args.log_format);
    limit_allocator_caching();
    let token = match &args.auth_token_file {
        Some(path) => {
            let t = std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!("cannot read auth token file {}: {e}", path.display())
            })?;
            let t = t.trim().to_owned();
            anyhow::ensure!(!t.is_empty(), "auth token file {} is empty", path.display());
            Some(t)
        }
        None => None,
    };
    let mut cfg = NodeConfig::new(args.data.clone());
    cfg.chunk_size = usize::try_from(args.chunk_size).unwrap_or(usize::MAX);
    cfg.gc_grace = args.gc_grace;
    cfg.gc_interval = args.gc_interval;
    cfg.capacity = args.capacity;
    cfg.buffer_budget = usize::try_from(args.buffer_budget).unwrap_or(usize::MAX);
    cfg.cluster_key_file = args.cluster_key_file.clone();
    cfg.validate().map_err(anyhow::Error::msg)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let node = Arc::new(Node::open(cfg)?);
        tokio::spawn(gc_loop(node.clone()));
        let opts = grpc::ServeOptions {
            grpc_addr: args.grpc_addr,
            p2p_addr: args.p2p_addr,
            auth_token: token,
            addr_file: args.addr_file,
            shutdown_grace: args.shutdown_grace,
        };
        grpc::serve(node, opts, shutdown_signal()).await?;
        tracing::info!("node stopped");
        Ok(ExitCode::SUCCESS)
    })
}

async fn gc_loop(node: Arc<Node>) {
    let mut tick = tokio::time::interval(node.config().gc_interval);
    tick.tick().await; // the first tick is immediate: let start-up finish first
    loop {
        tick.tick().await;
        let n = node.clone();
        match tokio::task::spawn_blocking(move || n.collect_garbage()).await {
            Ok(Ok(r)) if r.deleted > 0 => tracing::info!(
                scanned = r.scanned,
                deleted = r.deleted,
                bytes_freed = r.bytes_freed,
                "garbage collection freed unreferenced chunks"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "garbage collection failed"),
            Err(e) => tracing::warn!(error = %e, "garbage collection stopped"),
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("received SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("received SIGINT"),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Chunk buffers are megabytes each and short-lived. A fixed mmap threshold
/// makes glibc hand every one of them back to the kernel when freed, instead
/// of growing the threshold and caching them in arenas, which would let the
/// resident size creep up with the number of threads that ever held one.
fn limit_allocator_caching() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator tuning; called before any threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
    }
}
