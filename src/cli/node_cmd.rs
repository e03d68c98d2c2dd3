//! `dfs node`: run a storage node until SIGINT or SIGTERM.

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use clap::{Args, ValueEnum};

use super::{duration_arg, size_arg};
use crate::{cluster::MemberState, config::NodeConfig, grpc, metrics, node::Node};

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
    /// Peer-protocol listen address; loopback unless you say otherwise (port 0: any free port)
    #[arg(long, env = "DFS_P2P_ADDR", default_value = "127.0.0.1:4040")]
    pub p2p_addr: String,
    /// Address peers should dial to reach this node (default: the bound --p2p-addr)
    #[arg(long, env = "DFS_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
    /// A peer to join (host:port; repeatable; a name resolving to several addresses counts as several)
    #[arg(
        long = "peer",
        env = "DFS_PEERS",
        value_delimiter = ',',
        value_name = "ADDR"
    )]
    pub peers: Vec<String>,
    /// Copies of every chunk (capped at the cluster size)
    #[arg(long, env = "DFS_REPLICAS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub replicas: u32,
    /// Copies an upload waits for (default: all R while R members are up, else a majority of R)
    #[arg(long, env = "DFS_WRITE_QUORUM", value_parser = clap::value_parser!(u32).range(1..=16))]
    pub write_quorum: Option<u32>,
    /// A member silent this long is considered down
    #[arg(long, env = "DFS_DEAD_AFTER", default_value = "30s", value_parser = duration_arg)]
    pub dead_after: Duration,
    /// How often every peer's index is reconciled with this one
    #[arg(long, env = "DFS_SYNC_INTERVAL", default_value = "60s", value_parser = duration_arg)]
    pub sync_interval: Duration,
    /// How often the repair pass runs (it also runs when membership changes)
    #[arg(long, env = "DFS_REPAIR_INTERVAL", default_value = "60s", value_parser = duration_arg)]
    pub repair_interval: Duration,
    /// Longest a request to a peer may take before that peer counts as failed for it (a replica write then moves on to the next owner)
    #[arg(long, env = "DFS_PEER_TIMEOUT", default_value = "10s", value_parser = duration_arg)]
    pub peer_timeout: Duration,
    /// Largest clock difference between nodes tolerated: records stamped further ahead are refused, and a node whose clock is further from its peers' refuses writes
    #[arg(long, env = "DFS_MAX_CLOCK_SKEW", default_value = "1m", value_parser = duration_arg)]
    pub max_clock_skew: Duration,
    /// Target duration of one scrub pass (every stored chunk re-read and verified)
    #[arg(long, env = "DFS_SCRUB_INTERVAL", default_value = "30d", value_parser = duration_arg)]
    pub scrub_interval: Duration,
    /// Most bytes per second the scrubber reads
    #[arg(long, env = "DFS_SCRUB_RATE", default_value = "32MiB", value_parser = size_arg)]
    pub scrub_rate: u64,
    /// Repair transfer budget per second on this node (lower it to leave more to clients)
    #[arg(long, env = "DFS_REPAIR_RATE", default_value = "256MiB", value_parser = size_arg)]
    pub repair_rate: u64,
    /// File holding the cluster secret (64 hex chars); default: `<data>/cluster.key`, created if absent
    #[arg(long, env = "DFS_CLUSTER_KEY_FILE", value_name = "PATH")]
    pub cluster_key_file: Option<PathBuf>,
    /// Chunk size for new uploads (64KiB..=16MiB)
    #[arg(long, env = "DFS_CHUNK_SIZE", default_value = "4MiB", value_parser = size_arg)]
    pub chunk_size: u64,
    /// Bearer tokens that Storage and Cluster calls must carry, one `ROLE TOKEN` a line (roles: read, write, admin; re-read on SIGHUP)
    #[arg(long, env = "DFS_AUTH_TOKEN_FILE", value_name = "PATH")]
    pub auth_token_file: Option<PathBuf>,
    #[command(flatten)]
    pub tls: super::ServerTlsArgs,
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
    /// Memory for cached index pages (object records); more helps lookups in an index of many millions of objects
    #[arg(long, env = "DFS_INDEX_CACHE", default_value = "16MiB", value_parser = size_arg)]
    pub index_cache: u64,
    /// Write the bound gRPC address to this file once serving
    #[arg(long, env = "DFS_ADDR_FILE", value_name = "PATH")]
    pub addr_file: Option<PathBuf>,
    /// Boxed: keeps `dfs node`'s arguments from dwarfing the other commands'.
    #[command(flatten)]
    pub metrics: Box<MetricsArgs>,
    #[command(flatten)]
    pub limits: Box<LimitArgs>,
    /// How long in-flight requests may run after SIGTERM
    #[arg(long, env = "DFS_SHUTDOWN_GRACE", default_value = "30s", value_parser = duration_arg)]
    pub shutdown_grace: Duration,
    /// Test knob, hidden: chunk lists longer than this many ids are stored
    /// out of line (default and maximum 4096), so tests exercise that path
    /// with uploads of a few MiB.
    #[arg(long, env = "DFS_INLINE_CHUNK_IDS", hide = true, default_value_t = crate::index::MAX_INLINE_CHUNK_IDS)]
    pub inline_chunk_ids: usize,
}

/// The Prometheus endpoint's flags.
#[derive(Args, Debug)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics on http://ADDR/metrics (default: off; port 0: any free port)
    #[arg(long, env = "DFS_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<String>,
    /// Write the bound metrics address to this file once serving
    #[arg(long, env = "DFS_METRICS_ADDR_FILE", value_name = "PATH")]
    pub metrics_addr_file: Option<PathBuf>,
}

/// What keeps slow or hostile clients from stalling the node.
#[derive(Args, Debug)]
pub struct LimitArgs {
    /// A transfer that makes no progress this long is cancelled (an upload then stores nothing); a connection with no call this long is closed
    #[arg(long, env = "DFS_IDLE_TIMEOUT", default_value = "5m", value_parser = duration_arg)]
    pub idle_timeout: Duration,
    /// Longest a transfer waits for buffer memory before it fails RESOURCE_EXHAUSTED
    #[arg(long, env = "DFS_BUDGET_WAIT", default_value = "10s", value_parser = duration_arg)]
    pub budget_wait: Duration,
    /// Client connections open at once; at the cap the longest-idle one is closed for a new one
    #[arg(long, env = "DFS_MAX_CONNECTIONS", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Concurrent calls (HTTP/2 streams) per client connection (1..=256)
    #[arg(long, env = "DFS_MAX_STREAMS_PER_CONNECTION", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub max_streams_per_connection: u32,
    /// dfs calls in flight at once, node-wide; more are refused RESOURCE_EXHAUSTED at once
    #[arg(long, env = "DFS_MAX_CALLS", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_calls: u32,
    /// HTTP/2 PING interval on client connections
    #[arg(long, env = "DFS_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = duration_arg)]
    pub keepalive_interval: Duration,
    /// A client connection whose PING goes unanswered this long is closed
    #[arg(long, env = "DFS_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = duration_arg)]
    pub keepalive_timeout: Duration,
}

impl LimitArgs {
    fn serve_limits(&self) -> anyhow::Result<grpc::ServeLimits> {
        for (flag, d) in [
            ("--idle-timeout", self.idle_timeout),
            ("--keepalive-interval", self.keepalive_interval),
            ("--keepalive-timeout", self.keepalive_timeout),
        ] {
            anyhow::ensure!(!d.is_zero(), "{flag} must be positive");
        }
        Ok(grpc::ServeLimits {
            idle_timeout: self.idle_timeout,
            max_connections: self.max_connections as usize,
            max_streams_per_connection: self.max_streams_per_connection,
            max_calls: self.max_calls as usize,
            keepalive_interval: self.keepalive_interval,
            keepalive_timeout: self.keepalive_timeout,
        })
    }
}

pub fn run(args: NodeArgs) -> anyhow::Result<ExitCode> {
    init_logging(args.log_format);
    crate::alloc::tune_for_node();
    let tokens = match &args.auth_token_file {
        Some(path) => Some(Arc::new(grpc::tokens::TokenFile::load(path)?)),
        None => None,
    };
    let tls = args.tls.files().map(|f| f.load()).transpose()?;
    let mut cfg = NodeConfig::new(args.data.clone());
    cfg.chunk_size = usize::try_from(args.chunk_size).unwrap_or(usize::MAX);
    cfg.gc_grace = args.gc_grace;
    cfg.gc_interval = args.gc_interval;
    cfg.capacity = args.capacity;
    cfg.buffer_budget = usize::try_from(args.buffer_budget).unwrap_or(usize::MAX);
    cfg.index_cache = usize::try_from(args.index_cache).unwrap_or(usize::MAX);
    cfg.budget_wait = args.limits.budget_wait;
    let limits = args.limits.serve_limits()?;
    cfg.cluster_key_file = args.cluster_key_file.clone();
    cfg.inline_chunk_ids = args.inline_chunk_ids;
    cfg.cluster.listen_addr = args.p2p_addr.clone();
    cfg.cluster.advertise_addr = args.advertise_addr.clone();
    cfg.cluster.peers = args
        .peers
        .iter()
        .filter(|p| !p.trim().is_empty())
        .cloned()
        .collect();
    cfg.cluster.replicas = args.replicas as usize;
    cfg.cluster.write_quorum = args.write_quorum.map(|w| w as usize);
    cfg.cluster.dead_after = args.dead_after;
    cfg.cluster.sync_interval = args.sync_interval;
    cfg.cluster.repair_interval = args.repair_interval;
    cfg.cluster.repair_rate = args.repair_rate;
    cfg.cluster.max_clock_skew = args.max_clock_skew;
    cfg.cluster.peer_timeout = args.peer_timeout;
    cfg.scrub = crate::chunks::ScrubConfig {
        interval: args.scrub_interval,
        rate: args.scrub_rate,
    };
    anyhow::ensure!(
        args.write_quorum.is_none_or(|w| w <= args.replicas),
        "--write-quorum ({}) cannot exceed --replicas ({})",
        args.write_quorum.unwrap_or(0),
        args.replicas
    );
    cfg.validate().map_err(anyhow::Error::msg)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let node = Arc::new(Node::open(cfg)?);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        node.cluster().start(stop_rx.clone()).await?;
        tokio::spawn(gc_loop(node.clone()));
        let cluster = node.cluster().clone();
        tokio::spawn(crate::chunks::run_scrubber(
            node.chunks().clone(),
            node.config().scrub,
            move |id| cluster.chunk_lost(id),
            stop_rx.clone(),
        ));
        if let Some(addr) = &args.metrics.metrics_addr {
            let sampler = node_gauges(node.clone());
            let file = args.metrics.metrics_addr_file.as_deref();
            let server = metrics::MetricsServer::start(addr, file, sampler).await?;
            tracing::info!(metrics = %server.local_addr(), "serving Prometheus metrics at /metrics");
        }
        let opts = grpc::ServeOptions {
            grpc_addr: args.grpc_addr,
            p2p_addr: node.cluster().advertised_addr().to_owned(),
            auth: tokens.clone(),
            tls,
            addr_file: args.addr_file,
            shutdown_grace: args.shutdown_grace,
            limits,
        };
        if let Some(file) = &tokens {
            grpc::tokens::log_loaded(&file.tokens(), file.path(), "auth tokens loaded");
        }
        grpc::tokens::reload_on_sighup(tokens);
        let shutdown = async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
        };
        grpc::serve(node, opts, shutdown).await?;
        tracing::info!("node stopped");
        Ok(ExitCode::SUCCESS)
    })
}

/// Samples the node's state for the metrics gauges at each scrape.
fn node_gauges(node: Arc<Node>) -> metrics::Sampler {
    Arc::new(move || {
        let (chunks, bytes) = node.store().usage();
        let peers = node.cluster().peers();
        let up = peers.iter().filter(|m| m.state == MemberState::Up).count() as u64;
        metrics::NodeGauges {
            chunks,
            bytes,
            objects: node.index().live_objects().ok(),
            members_up: up,
            members_down: peers.len() as u64 - up,
            repair_backlog: node.cluster().repair_backlog(),
            peak_rss: grpc::peak_rss_bytes(),
            budget_in_use: node.budget().in_use() as u64,
            budget_waiters: node.budget().waiters() as u64,
        }
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
