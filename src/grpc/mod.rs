//! The gRPC front door: `dfs.v1.Storage`, `dfs.v1.Cluster`, standard health
//! checking and server reflection (v1 and v1alpha, for grpcurl).
//!
//! Handlers are thin: they translate protobuf to the node's types and the
//! node's errors to status codes, nothing else.

mod auth;
mod cluster;
pub mod codec;
pub mod conn;
mod download;
pub mod limits;
mod storage;
pub mod tls;
pub mod tokens;

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tonic::{Code, Status};

pub use auth::AuthLayer;
pub use cluster::{ClusterService, peak_rss_bytes, peak_rss_of};
pub use storage::StorageService;

use crate::{
    node::{Node, NodeError},
    proto::{cluster_server::ClusterServer, storage_server::StorageServer},
};

/// Largest gRPC message the node decodes. An upload's data messages must fit;
/// clients send far smaller ones (the dfs CLI sends 1 MiB).
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// A dfs client's HTTP/2 receive window per stream. The 64 KiB protocol
/// default caps a single download at a few hundred window updates per
/// second; 2 MiB lets one stream run at disk speed.
pub const STREAM_WINDOW_BYTES: u32 = 2 << 20;
/// A dfs client's HTTP/2 receive window per connection.
pub const CONNECTION_WINDOW_BYTES: u32 = 4 << 20;
/// The node's HTTP/2 receive window per stream: what a client may send on
/// one call before the node reads it. Large enough for one upload to run at
/// disk speed; small, because a call that is not reading (waiting for
/// buffer budget, or for its own pipeline) keeps that much buffered.
pub const SERVER_STREAM_WINDOW_BYTES: u32 = 512 << 10;

/// Largest HTTP/2 frame the node accepts (what an upload's data arrives
/// in). HTTP/2 reads each frame into one buffer; at 1 MiB every frame took a
/// fresh mapping that the kernel zero-filled as the socket data was copied
/// in (a fifth of an upload's CPU); 64 KiB buffers are reused, and an upload
/// cost the node 25% less CPU than with 1 MiB or 16 KiB frames.
pub const SERVER_MAX_FRAME_BYTES: u32 = 64 << 10;

/// The node's HTTP/2 receive window per connection: room for every stream
/// it allows at once. A smaller one would let streams that wait for buffer
/// budget, their data unread, use up the connection's window, so that a
/// call already holding budget on the same connection could never receive
/// the rest of its chunk: the two would wait on each other.
pub fn server_connection_window(max_streams: u32) -> u32 {
    max_streams
        .max(1)
        .saturating_mul(SERVER_STREAM_WINDOW_BYTES)
        .min(i32::MAX as u32)
}

/// The status code for each kind of node error.
pub fn node_status(e: NodeError) -> Status {
    let code = match &e {
        NodeError::InvalidArgument(_) => Code::InvalidArgument,
        NodeError::NotFound(_) => Code::NotFound,
        NodeError::OutOfRange(_) => Code::OutOfRange,
        NodeError::DataLoss(_) => Code::DataLoss,
        NodeError::ResourceExhausted(_) => Code::ResourceExhausted,
        NodeError::Unavailable(_) => Code::Unavailable,
        NodeError::Cancelled(_) => Code::Cancelled,
        NodeError::TimedOut(_) => Code::DeadlineExceeded,
        NodeError::Internal(_) => Code::Internal,
    };
    Status::new(code, e.to_string())
}

/// A status that arrived on a request stream, as a node error.
pub fn status_error(status: Status) -> NodeError {
    let msg = status.message().to_owned();
    match status.code() {
        Code::InvalidArgument => NodeError::InvalidArgument(msg),
        Code::ResourceExhausted => NodeError::ResourceExhausted(msg),
        // tonic's decoder reports a message over the size limit as
        // OUT_OF_RANGE; gRPC's convention for that is RESOURCE_EXHAUSTED.
        Code::OutOfRange => NodeError::ResourceExhausted(msg),
        Code::Cancelled => NodeError::Cancelled(format!("client cancelled: {msg}")),
        Code::DeadlineExceeded => NodeError::Cancelled(format!("deadline exceeded: {msg}")),
        _ => NodeError::Cancelled(format!("request stream failed: {status}")),
    }
}

/// Where and how the gRPC server listens.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to bind; port 0 picks a free one.
    pub grpc_addr: String,
    /// Shown in Cluster.Status as this node's peer address.
    pub p2p_addr: String,
    /// Bearer tokens and their roles (none: every call is allowed).
    pub auth: Option<Arc<tokens::TokenFile>>,
    /// TLS on the API port (none: plaintext).
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// File to write the bound gRPC address to once listening.
    pub addr_file: Option<PathBuf>,
    /// How long in-flight requests may run after shutdown begins.
    pub shutdown_grace: Duration,
    /// Limits that keep slow or hostile clients from stalling the node.
    pub limits: ServeLimits,
}

/// The gRPC port's limits (see `conn` and `limits`).
#[derive(Debug, Clone)]
pub struct ServeLimits {
    /// A transfer that makes no progress this long is cut off; a connection
    /// with no call this long is closed.
    pub idle_timeout: Duration,
    /// Client connections open at once.
    pub max_connections: usize,
    /// Concurrent streams (calls) per connection.
    pub max_streams_per_connection: u32,
    /// dfs calls in flight at once, node-wide; more are shed.
    pub max_calls: usize,
    /// HTTP/2 PING interval on idle connections.
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(300),
            max_connections: 256,
            max_streams_per_connection: 64,
            max_calls: 512,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// Binds the gRPC address (refusing nothing: the caller chose it).
pub async fn bind(addr: &str) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for gRPC on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Serves until `shutdown` resolves, then drains: health turns NOT_SERVING,
/// new connections and streams are refused, and in-flight requests get up to
/// `shutdown_grace` to finish.
pub async fn serve(
    node: Arc<Node>,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (listener, local) = bind(&opts.grpc_addr).await?;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<StorageServer<StorageService>>()
        .await;
    health_reporter
        .set_serving::<ClusterServer<ClusterService>>()
        .await;

    let (reflection_v1, reflection_v1alpha) = reflection()?;
    let lim = &opts.limits;
    let storage = StorageServer::new(StorageService::new(node.clone(), lim.idle_timeout))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let storage = download::ZeroCopyDownload::new(storage, node.clone());
    let cluster = ClusterServer::new(ClusterService::new(
        node.clone(),
        local.to_string(),
        opts.p2p_addr.clone(),
    ));

    let call_limits =
        limits::CallLimits::new(lim.max_calls, lim.idle_timeout, node.budget().clone());
    let connections = conn::Connections::new(lim.max_connections);
    connections.spawn_reaper(lim.idle_timeout);
    // Liveness is separate from readiness: a node cut off from its cluster
    // is alive and must not be restarted for it.
    health_reporter
        .set_service_status(LIVENESS_SERVICE, tonic_health::ServingStatus::Serving)
        .await;
    // Health follows whether the node can serve until shutdown, which turns
    // it off for good.
    let shutting_down = Arc::new(tokio::sync::Mutex::new(false));
    tokio::spawn(health_follows_state(
        node.clone(),
        health_reporter.clone(),
        call_limits.clone(),
        shutting_down.clone(),
    ));

    // Shutdown: stop advertising health first, then stop the server; the
    // drain is bounded so one stuck client cannot hold the process forever.
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        shutdown.await;
        stop_serving(health_reporter, shutting_down).await;
        let _ = drain_tx.send(());
    });
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tls::apply(tonic::transport::Server::builder(), opts.tls.clone())?
        .initial_stream_window_size(SERVER_STREAM_WINDOW_BYTES)
        .initial_connection_window_size(server_connection_window(lim.max_streams_per_connection))
        .max_concurrent_streams(lim.max_streams_per_connection)
        .max_frame_size(SERVER_MAX_FRAME_BYTES)
        .http2_keepalive_interval(Some(lim.keepalive_interval))
        .http2_keepalive_timeout(Some(lim.keepalive_timeout))
        // Outermost, so calls the auth layer refuses (and shed calls) are
        // counted too. A refused call holds its call slot only while the
        // token is checked.
        .layer(crate::metrics::GrpcMetricsLayer::new(known_methods()))
        .layer(limits::CallLimitsLayer::new(call_limits))
        .layer(AuthLayer::new(opts.auth.clone()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(storage)
        .add_service(cluster)
        .serve_with_incoming_shutdown(connections.incoming(listener), async move {
            let _ = drain_rx.await;
            let _ = drained_tx.send(());
        });

    if let Some(path) = &opts.addr_file {
        write_addr_file(path, &local.to_string())?;
    }
    if let Some(warning) = tls::exposure_warning(local, opts.tls.is_some()) {
        tracing::warn!("{warning}");
    }
    tracing::info!(grpc = %local, node_id = %node.id(), tls = opts.tls.is_some(), "dfs node serving");

    let grace = opts.shutdown_grace;
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result?,
        _ = async { let _ = drained_rx.await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace = ?grace, "in-flight requests outlived the shutdown grace; exiting anyway");
        }
    }
    Ok(())
}

/// Turns health NOT_SERVING for good: shutdown has begun.
async fn stop_serving(
    reporter: tonic_health::server::HealthReporter,
    shutting_down: Arc<tokio::sync::Mutex<bool>>,
) {
    tracing::info!("shutting down: health NOT_SERVING, draining in-flight requests");
    let mut down = shutting_down.lock().await;
    *down = true;
    reporter
        .set_not_serving::<StorageServer<StorageService>>()
        .await;
    reporter
        .set_not_serving::<ClusterServer<ClusterService>>()
        .await;
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
}

/// The health "service" that answers SERVING while the process runs,
/// whatever the cluster's state: for liveness and startup probes.
pub const LIVENESS_SERVICE: &str = "liveness";

/// How often health is brought in line with the node's state.
const HEALTH_EVERY: Duration = Duration::from_millis(250);

/// Keeps health (`""` and `dfs.v1.Storage`) SERVING only while the node can
/// serve: it can take writes (it reaches enough members for the write rule
/// and its clock agrees with theirs, see
/// [`crate::cluster::Cluster::writable`]) and it is not saturated (see
/// [`limits::CallLimits::saturated`]). A mesh or load balancer then sends
/// traffic elsewhere. Stops at shutdown.
async fn health_follows_state(
    node: Arc<Node>,
    reporter: tonic_health::server::HealthReporter,
    limits: Arc<limits::CallLimits>,
    shutting_down: Arc<tokio::sync::Mutex<bool>>,
) {
    let mut last: Option<Result<(), String>> = None;
    loop {
        let state = node.cluster().writable().and_then(|()| {
            if limits.saturated() {
                Err(format!(
                    "saturated ({} calls, or buffer memory)",
                    limits.in_flight()
                ))
            } else {
                Ok(())
            }
        });
        if last.as_ref() != Some(&state) {
            let down = shutting_down.lock().await;
            if *down {
                return;
            }
            let status = match &state {
                Ok(()) => {
                    if last.is_some() {
                        tracing::info!("health: SERVING");
                    }
                    tonic_health::ServingStatus::Serving
                }
                Err(why) => {
                    tracing::warn!(reason = %why, "health: NOT_SERVING");
                    tonic_health::ServingStatus::NotServing
                }
            };
            reporter.set_service_status("", status).await;
            reporter
                .set_service_status(
                    <StorageServer<StorageService> as tonic::server::NamedService>::NAME,
                    status,
                )
                .await;
            last = Some(state);
        }
        tokio::time::sleep(HEALTH_EVERY).await;
    }
}

/// Server reflection, v1 and v1alpha (grpcurl 1.8 speaks only v1alpha),
/// with the health service's descriptors too.
#[allow(clippy::type_complexity)]
fn reflection() -> anyhow::Result<(
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
)> {
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    Ok((v1, v1alpha))
}

/// Every method this server answers, for the metrics layer's labels.
fn known_methods() -> crate::metrics::KnownMethods {
    crate::metrics::KnownMethods::from_descriptor_sets(&[
        crate::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ])
    .with(
        "grpc.reflection.v1.ServerReflection",
        "ServerReflectionInfo",
    )
    .with(
        "grpc.reflection.v1alpha.ServerReflection",
        "ServerReflectionInfo",
    )
}

fn write_addr_file(path: &std::path::Path, addr: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{addr}\n"))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
