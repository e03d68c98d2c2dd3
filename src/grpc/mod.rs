//! The gRPC front door: `dfs.v1.Storage`, `dfs.v1.Cluster`, standard health
//! checking and server reflection (v1 and v1alpha, for grpcurl).
//!
//! Handlers are thin: they translate protobuf to the node's types and the
//! node's errors to status codes, nothing else.

mod auth;
mod cluster;
pub mod codec;
mod storage;
pub mod tls;
pub mod tokens;

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tonic::{Code, Status, transport::server::TcpIncoming};

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
/// HTTP/2 flow-control window per stream. The 64 KiB protocol default caps a
/// single upload at a few hundred window updates per second; 2 MiB lets one
/// stream run at disk speed while bounding what one stream can buffer.
pub const STREAM_WINDOW_BYTES: u32 = 2 << 20;
/// HTTP/2 flow-control window per connection (shared by its streams).
pub const CONNECTION_WINDOW_BYTES: u32 = 4 << 20;
/// Concurrent streams per client connection; bounds per-connection work.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;

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

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let storage = StorageServer::new(StorageService::new(node.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let cluster = ClusterServer::new(ClusterService::new(
        node.clone(),
        local.to_string(),
        opts.p2p_addr.clone(),
    ));

    // Health follows whether the node can take writes: a node that has not
    // reached its cluster (or whose clock disagrees with it) is NOT_SERVING,
    // so a mesh routes to nodes that can. Liveness is separate: a node cut
    // off from its cluster is alive and must not be restarted for it.
    health_reporter
        .set_service_status(LIVENESS_SERVICE, tonic_health::ServingStatus::Serving)
        .await;
    let readiness = tokio::spawn(report_readiness(node.clone(), health_reporter.clone()));

    // Shutdown: stop advertising health first, then stop the server; the
    // drain is bounded so one stuck client cannot hold the process forever.
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let reporter = health_reporter.clone();
    tokio::spawn(async move {
        shutdown.await;
        readiness.abort();
        tracing::info!("shutting down: health NOT_SERVING, draining in-flight requests");
        reporter
            .set_not_serving::<StorageServer<StorageService>>()
            .await;
        reporter
            .set_not_serving::<ClusterServer<ClusterService>>()
            .await;
        reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        let _ = drain_tx.send(());
    });
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tls::apply(tonic::transport::Server::builder(), opts.tls.clone())?
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .max_frame_size(1 << 20)
        // Outermost, so calls the auth layer refuses are counted too.
        .layer(crate::metrics::GrpcMetricsLayer::new(known_methods()))
        .layer(AuthLayer::new(opts.auth.clone()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(storage)
        .add_service(cluster)
        // Without TCP_NODELAY, HTTP/2 window updates sit behind Nagle's
        // algorithm for a delayed-ACK period (40 ms) and stall uploads.
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            async move {
                let _ = drain_rx.await;
                let _ = drained_tx.send(());
            },
        );

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

/// The health "service" that answers SERVING while the process runs,
/// whatever the cluster's state: for liveness and startup probes.
pub const LIVENESS_SERVICE: &str = "liveness";

/// Keeps the health status in step with [`crate::cluster::Cluster::writable`].
async fn report_readiness(node: Arc<Node>, reporter: tonic_health::server::HealthReporter) {
    let mut last = None;
    loop {
        let ready = node.cluster().writable();
        if last.as_ref() != Some(&ready) {
            let status = match &ready {
                Ok(()) => tonic_health::ServingStatus::Serving,
                Err(why) => {
                    tracing::warn!(reason = %why, "health: NOT_SERVING until the node can take writes");
                    tonic_health::ServingStatus::NotServing
                }
            };
            if last.is_some() && ready.is_ok() {
                tracing::info!("health: SERVING");
            }
            reporter.set_service_status("", status).await;
            reporter.set_service_status("dfs.v1.Storage", status).await;
            last = Some(ready);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
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
