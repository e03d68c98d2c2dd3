//! Prometheus metrics: the names, the helpers the pipelines call, the
//! scrape endpoint (`dfs node --metrics-addr`), and a tower layer that
//! counts and times every gRPC call.
//!
//! Everything goes through the `metrics` facade; the text exposition is
//! rendered by `metrics-exporter-prometheus`. Until [`MetricsServer::start`]
//! installs the recorder, every helper here is a no-op, so unit tests and
//! nodes without `--metrics-addr` pay nothing.
//!
//! This module is a leaf: lower modules (store, cluster, node) call its
//! helpers and it imports none of them. State-derived gauges (chunks stored,
//! members up, repair backlog...) are sampled by a caller-supplied function
//! at scrape time, so they are exact when read and nothing polls in between.
//!
//! The exporter's own HTTP listener binds inside the builder and cannot say
//! which port it got, so `--metrics-addr 127.0.0.1:0` could not be used by
//! tests or scripts. The node binds the listener itself, writes the bound
//! address where asked, and serves the exporter's rendering over hyper's
//! HTTP/1 server (already in the build through tonic).

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use ::metrics::{SharedString, Unit, counter, gauge, histogram};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use prost::Message;
use tokio::net::TcpListener;
use tonic::Code;

/// gRPC calls finished, by service, method and status code.
pub const GRPC_REQUESTS: &str = "dfs_grpc_requests_total";
/// gRPC calls running now, by service and method.
pub const GRPC_IN_FLIGHT: &str = "dfs_grpc_requests_in_flight";
/// Seconds from a call's arrival to its final status (for a streaming
/// response: to the last message and the trailers), by service and method.
pub const GRPC_DURATION: &str = "dfs_grpc_request_duration_seconds";
/// Object bytes received from clients in Upload streams.
pub const UPLOAD_BYTES: &str = "dfs_upload_bytes_total";
/// Object bytes sent to clients in Download streams.
pub const DOWNLOAD_BYTES: &str = "dfs_download_bytes_total";
/// Chunks in this node's store.
pub const STORE_CHUNKS: &str = "dfs_store_chunks";
/// Bytes of (sealed) chunk data in this node's store.
pub const STORE_BYTES: &str = "dfs_store_bytes";
/// Live objects in this node's index.
pub const OBJECTS: &str = "dfs_objects_live";
/// Other cluster members by state (`up`, `down`); this node is not counted.
pub const MEMBERS: &str = "dfs_cluster_members";
/// Chunks the scrubber re-read and verified.
pub const SCRUB_CHECKED: &str = "dfs_scrub_chunks_checked_total";
/// Bad copies found on this node's disk and quarantined.
pub const SCRUB_CORRUPT: &str = "dfs_scrub_corrupt_found_total";
/// Chunk copies an upload wrote to a peer (the local copy is not counted).
pub const REPLICATED: &str = "dfs_chunks_replicated_total";
/// Replica writes during uploads that failed (a member was skipped).
pub const REPLICA_FAILURES: &str = "dfs_replica_write_failures_total";
/// Chunks waiting for repair on this node.
pub const REPAIR_BACKLOG: &str = "dfs_repair_backlog_chunks";
/// Repair work done, by action (`push`, `pull`, `drop`).
pub const REPAIRED: &str = "dfs_repair_chunks_total";
/// Chunks that failed verification, by where the bad copy was found.
pub const VERIFY_FAILURES: &str = "dfs_chunk_verification_failures_total";
/// Peak resident set size of the node process.
pub const PEAK_RSS: &str = "dfs_process_peak_rss_bytes";
/// Seconds each request for buffer budget waited (most are served at once).
pub const BUDGET_WAIT: &str = "dfs_budget_wait_seconds";
/// Requests for buffer budget refused: the wait limit passed, or too many
/// calls were already waiting.
pub const BUDGET_EXHAUSTED: &str = "dfs_budget_exhausted_total";
/// Bytes of buffer budget held by transfers now.
pub const BUDGET_IN_USE: &str = "dfs_budget_in_use_bytes";
/// Calls waiting for buffer budget now.
pub const BUDGET_WAITERS: &str = "dfs_budget_waiters";
/// Calls refused at once because the node was saturated, by reason
/// (`calls`: `--max-calls` in flight; `budget`: no budget even for small
/// transfers).
pub const CALLS_SHED: &str = "dfs_grpc_calls_shed_total";
/// Calls the node cut off, by method and reason (`idle`: no progress for
/// `--idle-timeout`; `deadline`: past the client's `grpc-timeout`).
pub const CALLS_TIMED_OUT: &str = "dfs_grpc_calls_timed_out_total";
/// Client connections open now.
pub const CONNECTIONS: &str = "dfs_grpc_connections";
/// Client connections accepted.
pub const CONNECTIONS_ACCEPTED: &str = "dfs_grpc_connections_accepted_total";
/// Client connections the node closed, by reason (`refused`: over
/// `--max-connections` with none idle; `evicted`: idle, closed for a new
/// one; `idle`: no call for `--idle-timeout`; `stalled`: its only call was
/// cut off).
pub const CONNECTIONS_CLOSED: &str = "dfs_grpc_connections_closed_total";

/// How long a scrape connection may take in all; keeps a stuck client from
/// holding one of the few connection slots.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(30);
/// Scrape connections served at once. Prometheus uses one; a few spare let
/// an operator's curl through during a scrape.
const MAX_SCRAPE_CONNECTIONS: usize = 8;
/// Histogram buckets for call durations, in seconds: from a millisecond
/// `Stat` to a multi-minute multi-GiB transfer.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 900.0,
];
/// Histogram buckets for budget waits, in seconds: from served at once to
/// the longest `--budget-wait` anyone would set.
const BUDGET_WAIT_BUCKETS: &[f64] = &[
    0.0001, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Where a chunk that failed verification came from.
#[derive(Clone, Copy, Debug)]
pub enum BadCopy {
    /// A copy on this node's disk (read for a client, a peer or repair).
    Local,
    /// A copy a peer pushed to this node (refused, never stored).
    Incoming,
    /// A copy a peer sent back when this node fetched it.
    Fetched,
}

impl BadCopy {
    fn label(self) -> &'static str {
        match self {
            BadCopy::Local => "local",
            BadCopy::Incoming => "incoming",
            BadCopy::Fetched => "fetched",
        }
    }
}

/// A repair action.
#[derive(Clone, Copy, Debug)]
pub enum RepairAction {
    /// A copy sent to an owner that lacked it.
    Push,
    /// A copy this node owns fetched from a peer.
    Pull,
    /// A copy this node no longer owns, dropped once every owner held one.
    Drop,
}

impl RepairAction {
    fn label(self) -> &'static str {
        match self {
            RepairAction::Push => "push",
            RepairAction::Pull => "pull",
            RepairAction::Drop => "drop",
        }
    }
}

/// Counts object bytes received from a client.
pub fn uploaded(bytes: u64) {
    counter!(UPLOAD_BYTES).increment(bytes);
}

/// Counts object bytes sent to a client.
pub fn downloaded(bytes: u64) {
    counter!(DOWNLOAD_BYTES).increment(bytes);
}

/// Counts a chunk copy an upload wrote to a peer.
pub fn replicated() {
    counter!(REPLICATED).increment(1);
}

/// Counts a replica write that failed during an upload.
pub fn replica_failed() {
    counter!(REPLICA_FAILURES).increment(1);
}

/// Counts one chunk moved (or dropped) by repair.
pub fn repaired(action: RepairAction) {
    counter!(REPAIRED, "action" => action.label()).increment(1);
}

/// Counts a chunk the scrubber verified.
pub fn scrub_checked() {
    counter!(SCRUB_CHECKED).increment(1);
}

/// Counts a bad copy found on this node's disk (by the scrubber or a read).
pub fn scrub_found_corrupt() {
    counter!(SCRUB_CORRUPT).increment(1);
}

/// Counts a chunk that failed verification.
pub fn verification_failed(copy: BadCopy) {
    counter!(VERIFY_FAILURES, "source" => copy.label()).increment(1);
}

/// Records one request for buffer budget: how long it waited and whether
/// it was granted.
pub fn budget_waited(waited: Duration, granted: bool) {
    histogram!(BUDGET_WAIT).record(waited.as_secs_f64());
    if !granted {
        counter!(BUDGET_EXHAUSTED).increment(1);
    }
}

/// Why a call was refused at once.
#[derive(Clone, Copy, Debug)]
pub enum Shed {
    /// `--max-calls` calls were in flight.
    Calls,
    /// Not even small transfers could get buffer budget.
    Budget,
}

/// Counts a call refused at once.
pub fn shed(reason: Shed) {
    let label = match reason {
        Shed::Calls => "calls",
        Shed::Budget => "budget",
    };
    counter!(CALLS_SHED, "reason" => label).increment(1);
}

/// Why the node cut a call off.
#[derive(Clone, Copy, Debug)]
pub enum TimedOut {
    /// No progress for `--idle-timeout`.
    Idle,
    /// Past the client's deadline.
    Deadline,
}

/// Counts a call the node cut off.
pub fn timed_out(method: SharedString, reason: TimedOut) {
    let label = match reason {
        TimedOut::Idle => "idle",
        TimedOut::Deadline => "deadline",
    };
    counter!(CALLS_TIMED_OUT, "method" => method, "reason" => label).increment(1);
}

/// Why the node closed a client connection.
#[derive(Clone, Copy, Debug)]
pub enum ConnClosed {
    Refused,
    Evicted,
    Idle,
    Stalled,
}

/// Counts a client connection accepted (`true`) or closed (`false`) and
/// keeps the open-connections gauge.
pub fn connection(opened: bool) {
    if opened {
        counter!(CONNECTIONS_ACCEPTED).increment(1);
        gauge!(CONNECTIONS).increment(1.0);
    } else {
        gauge!(CONNECTIONS).decrement(1.0);
    }
}

/// Counts a client connection the node closed on purpose.
pub fn connection_closed(reason: ConnClosed) {
    let label = match reason {
        ConnClosed::Refused => "refused",
        ConnClosed::Evicted => "evicted",
        ConnClosed::Idle => "idle",
        ConnClosed::Stalled => "stalled",
    };
    counter!(CONNECTIONS_CLOSED, "reason" => label).increment(1);
}

/// State-derived gauges, sampled at every scrape. `None` leaves a gauge at
/// its last value (its source could not be read this time).
#[derive(Debug, Clone, Default)]
pub struct NodeGauges {
    pub chunks: u64,
    pub bytes: u64,
    pub objects: Option<u64>,
    pub members_up: u64,
    pub members_down: u64,
    pub repair_backlog: u64,
    pub peak_rss: Option<u64>,
    pub budget_in_use: u64,
    pub budget_waiters: u64,
}

impl NodeGauges {
    fn record(&self) {
        gauge!(STORE_CHUNKS).set(self.chunks as f64);
        gauge!(STORE_BYTES).set(self.bytes as f64);
        if let Some(n) = self.objects {
            gauge!(OBJECTS).set(n as f64);
        }
        gauge!(MEMBERS, "state" => "up").set(self.members_up as f64);
        gauge!(MEMBERS, "state" => "down").set(self.members_down as f64);
        gauge!(REPAIR_BACKLOG).set(self.repair_backlog as f64);
        if let Some(n) = self.peak_rss {
            gauge!(PEAK_RSS).set(n as f64);
        }
        gauge!(BUDGET_IN_USE).set(self.budget_in_use as f64);
        gauge!(BUDGET_WAITERS).set(self.budget_waiters as f64);
    }
}

/// Errors starting the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot write the metrics address to {path}: {source}")]
    AddrFile {
        path: String,
        source: std::io::Error,
    },
    #[error("metrics recorder: {0}")]
    Recorder(String),
}

/// The running scrape endpoint.
pub struct MetricsServer {
    local: SocketAddr,
}

/// What a scrape runs before rendering: samples node state into gauges. It
/// runs on a blocking thread (it may read the index).
pub type Sampler = Arc<dyn Fn() -> NodeGauges + Send + Sync>;

impl MetricsServer {
    /// Binds `addr` (port 0: any free port), installs the global recorder
    /// and serves `GET /metrics` until the process ends. Writes the bound
    /// address to `addr_file` if given. Call once per process.
    pub async fn start(
        addr: &str,
        addr_file: Option<&Path>,
        sampler: Sampler,
    ) -> Result<Self, MetricsError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind {
                addr: addr.to_owned(),
                source,
            })?;
        let local = listener.local_addr().map_err(|source| MetricsError::Bind {
            addr: addr.to_owned(),
            source,
        })?;
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(GRPC_DURATION.into()),
                DURATION_BUCKETS,
            )
            .map_err(|e| MetricsError::Recorder(e.to_string()))?
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(BUDGET_WAIT.into()),
                BUDGET_WAIT_BUCKETS,
            )
            .map_err(|e| MetricsError::Recorder(e.to_string()))?
            .build_recorder();
        let handle = recorder.handle();
        ::metrics::set_global_recorder(recorder)
            .map_err(|e| MetricsError::Recorder(e.to_string()))?;
        describe();
        if let Some(path) = addr_file {
            write_addr_file(path, &local.to_string()).map_err(|source| MetricsError::AddrFile {
                path: path.display().to_string(),
                source,
            })?;
        }
        tokio::spawn(serve_scrapes(listener, handle, sampler));
        Ok(Self { local })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

fn write_addr_file(path: &Path, addr: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{addr}\n"))?;
    std::fs::rename(&tmp, path)
}

/// Help text for every metric, and zeroes for the counters alerts look at,
/// so `increase(...) > 0` works from the first scrape.
fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        GRPC_REQUESTS,
        "gRPC calls finished, by service, method and status code"
    );
    describe_gauge!(GRPC_IN_FLIGHT, "gRPC calls running now");
    describe_histogram!(
        GRPC_DURATION,
        Unit::Seconds,
        "gRPC call duration, from arrival to final status (streaming responses: to the last message)"
    );
    describe_counter!(
        UPLOAD_BYTES,
        Unit::Bytes,
        "Object bytes received from clients in uploads"
    );
    describe_counter!(
        DOWNLOAD_BYTES,
        Unit::Bytes,
        "Object bytes sent to clients in downloads"
    );
    describe_gauge!(STORE_CHUNKS, "Chunks in this node's store");
    describe_gauge!(
        STORE_BYTES,
        Unit::Bytes,
        "Bytes of encrypted chunk data in this node's store"
    );
    describe_gauge!(OBJECTS, "Live objects in this node's index");
    describe_gauge!(
        MEMBERS,
        "Other cluster members as this node sees them, by state (up, down)"
    );
    describe_counter!(REPLICATED, "Chunk copies uploads wrote to peers");
    describe_counter!(
        REPLICA_FAILURES,
        "Replica writes during uploads that failed (the next member in rank was tried)"
    );
    describe_gauge!(REPAIR_BACKLOG, "Chunks waiting for repair on this node");
    describe_counter!(
        REPAIRED,
        "Chunks repair pushed to owners, pulled from peers, or dropped here once every owner held one"
    );
    describe_counter!(
        VERIFY_FAILURES,
        "Chunks that failed verification, by source (local disk, incoming replica, fetched from a peer)"
    );
    describe_gauge!(
        PEAK_RSS,
        Unit::Bytes,
        "Peak resident set size of the node process"
    );
    describe_counter!(SCRUB_CHECKED, "Chunks the scrubber re-read and verified");
    describe_counter!(
        SCRUB_CORRUPT,
        "Bad copies found on this node's disk and quarantined (scrubber or any read)"
    );
    describe_histogram!(
        BUDGET_WAIT,
        Unit::Seconds,
        "How long each request for buffer budget waited (most are served at once)"
    );
    describe_counter!(
        BUDGET_EXHAUSTED,
        "Requests for buffer budget refused with RESOURCE_EXHAUSTED (waited --budget-wait, or too many waiting)"
    );
    describe_gauge!(
        BUDGET_IN_USE,
        Unit::Bytes,
        "Bytes of the buffer budget held by transfers"
    );
    describe_gauge!(BUDGET_WAITERS, "Calls waiting for buffer budget");
    describe_counter!(
        CALLS_SHED,
        "Calls refused at once because the node was saturated, by reason (calls, budget)"
    );
    describe_counter!(
        CALLS_TIMED_OUT,
        "Calls the node cut off, by method and reason (idle: no progress for --idle-timeout; deadline: past grpc-timeout)"
    );
    describe_gauge!(CONNECTIONS, "Client connections open on the gRPC port");
    describe_counter!(CONNECTIONS_ACCEPTED, "Client connections accepted");
    describe_counter!(
        CONNECTIONS_CLOSED,
        "Client connections the node closed, by reason (refused, evicted, idle, stalled)"
    );
    for reason in ["calls", "budget"] {
        counter!(CALLS_SHED, "reason" => reason).absolute(0);
    }
    for reason in ["refused", "evicted", "idle", "stalled"] {
        counter!(CONNECTIONS_CLOSED, "reason" => reason).absolute(0);
    }
    counter!(BUDGET_EXHAUSTED).absolute(0);
    counter!(CONNECTIONS_ACCEPTED).absolute(0);
    for copy in [BadCopy::Local, BadCopy::Incoming, BadCopy::Fetched] {
        counter!(VERIFY_FAILURES, "source" => copy.label()).absolute(0);
    }
    for action in [RepairAction::Push, RepairAction::Pull, RepairAction::Drop] {
        counter!(REPAIRED, "action" => action.label()).absolute(0);
    }
    for name in [
        UPLOAD_BYTES,
        DOWNLOAD_BYTES,
        REPLICATED,
        REPLICA_FAILURES,
        SCRUB_CHECKED,
        SCRUB_CORRUPT,
    ] {
        counter!(name).absolute(0);
    }
}

async fn serve_scrapes(listener: TcpListener, handle: PrometheusHandle, sampler: Sampler) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPE_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, usually: wait rather than spin.
                tracing::warn!(error = %e, "metrics endpoint cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // too many scrapers at once: drop this connection
        };
        let (handle, sampler) = (handle.clone(), sampler.clone());
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req| scrape(req, handle.clone(), sampler.clone()));
            let mut http = hyper::server::conn::http1::Builder::new();
            // One request per connection: nothing idles on a slot.
            http.keep_alive(false)
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10));
            let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Ok(Err(e)) = tokio::time::timeout(SCRAPE_TIMEOUT, conn).await {
                tracing::debug!(error = %e, "metrics connection failed");
            }
            drop(slot);
        });
    }
}

async fn scrape(
    req: http::Request<hyper::body::Incoming>,
    handle: PrometheusHandle,
    sampler: Sampler,
) -> Result<http::Response<http_body_util::Full<Bytes>>, Infallible> {
    let respond = |status: http::StatusCode, body: String| {
        let mut response = http::Response::new(http_body_util::Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        response
    };
    if req.uri().path() != "/metrics" {
        return Ok(respond(
            http::StatusCode::NOT_FOUND,
            "metrics are at /metrics\n".into(),
        ));
    }
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        return Ok(respond(
            http::StatusCode::METHOD_NOT_ALLOWED,
            "GET /metrics\n".into(),
        ));
    }
    let text = tokio::task::spawn_blocking(move || {
        sampler().record();
        handle.run_upkeep();
        handle.render()
    })
    .await;
    Ok(match text {
        Ok(text) => respond(http::StatusCode::OK, text),
        Err(e) => respond(
            http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("rendering metrics failed: {e}\n"),
        ),
    })
}

/// Service and method labels for each gRPC path the server answers.
/// Paths outside this set share the label `unknown`, so a client sending
/// made-up paths cannot grow the number of time series.
#[derive(Debug, Default)]
pub struct KnownMethods {
    by_path: HashMap<String, (SharedString, SharedString)>,
}

impl KnownMethods {
    /// The methods of every service in these encoded `FileDescriptorSet`s.
    pub fn from_descriptor_sets(sets: &[&[u8]]) -> Self {
        let mut by_path = HashMap::new();
        for set in sets {
            let Ok(set) = prost_types::FileDescriptorSet::decode(*set) else {
                continue;
            };
            for file in set.file {
                for service in &file.service {
                    let full = match file.package() {
                        "" => service.name().to_owned(),
                        pkg => format!("{pkg}.{}", service.name()),
                    };
                    let service_label = SharedString::from(Arc::<str>::from(full.as_str()));
                    for method in &service.method {
                        by_path.insert(
                            format!("/{full}/{}", method.name()),
                            (
                                service_label.clone(),
                                SharedString::from(Arc::<str>::from(method.name())),
                            ),
                        );
                    }
                }
            }
        }
        Self { by_path }
    }

    /// Adds one method by its full service name.
    pub fn with(mut self, service: &str, method: &str) -> Self {
        self.by_path.insert(
            format!("/{service}/{method}"),
            (
                SharedString::from(Arc::<str>::from(service)),
                SharedString::from(Arc::<str>::from(method)),
            ),
        );
        self
    }

    fn labels(&self, path: &str) -> (SharedString, SharedString) {
        self.by_path.get(path).cloned().unwrap_or_else(|| {
            (
                SharedString::const_str("unknown"),
                SharedString::const_str("unknown"),
            )
        })
    }
}

/// A tower layer for the tonic server: counts every call by its final
/// `grpc-status` and times it.
///
/// The status is read where gRPC puts it, not guessed from the handler: from
/// the response headers for a trailers-only response (every error before
/// the first message, including the auth interceptor's UNAUTHENTICATED),
/// otherwise from the trailers that end the response body. So a Download
/// that fails with DATA_LOSS after sending data counts as DATA_LOSS, and is
/// timed to its last message. A response dropped before its status was sent
/// (client cancelled, connection lost, shutdown) counts as CANCELLED.
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    known: Arc<KnownMethods>,
}

impl GrpcMetricsLayer {
    pub fn new(known: KnownMethods) -> Self {
        Self {
            known: Arc::new(known),
        }
    }
}

impl<S> tower_layer::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            known: self.known.clone(),
        }
    }
}

/// The service [`GrpcMetricsLayer`] wraps around the server's routes.
#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    known: Arc<KnownMethods>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for GrpcMetrics<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body<Data = Bytes> + Unpin,
{
    type Response = http::Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let (service, method) = self.known.labels(req.uri().path());
        let mut call = Call::begin(service, method);
        let response = self.inner.call(req);
        Box::pin(async move {
            match response.await {
                Ok(response) => {
                    call.header_code = grpc_status(response.headers());
                    Ok(response.map(|inner| MeteredBody { inner, call }))
                }
                Err(e) => {
                    call.finish(Code::Unknown);
                    Err(e)
                }
            }
        })
    }
}

/// One call being measured; records itself exactly once.
struct Call {
    service: SharedString,
    method: SharedString,
    started: Instant,
    /// `grpc-status` of a trailers-only response.
    header_code: Option<Code>,
    done: bool,
}

impl Call {
    fn begin(service: SharedString, method: SharedString) -> Self {
        gauge!(GRPC_IN_FLIGHT, "service" => service.clone(), "method" => method.clone())
            .increment(1.0);
        Self {
            service,
            method,
            started: Instant::now(),
            header_code: None,
            done: false,
        }
    }

    fn finish(&mut self, code: Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let (service, method) = (self.service.clone(), self.method.clone());
        gauge!(GRPC_IN_FLIGHT, "service" => service.clone(), "method" => method.clone())
            .decrement(1.0);
        histogram!(GRPC_DURATION, "service" => service.clone(), "method" => method.clone())
            .record(self.started.elapsed().as_secs_f64());
        counter!(GRPC_REQUESTS, "service" => service, "method" => method, "code" => code_name(code))
            .increment(1);
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // A trailers-only response may be sent without its (empty) body ever
        // being polled; otherwise the status never reached the client.
        let code = self.header_code.unwrap_or(Code::Cancelled);
        self.finish(code);
    }
}

/// A response body that records its call when the trailers pass through.
pub struct MeteredBody<B> {
    inner: B,
    call: Call,
}

impl<B> Body for MeteredBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let code = grpc_status(trailers).unwrap_or(Code::Unknown);
                    this.call.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => this.call.finish(Code::Unknown),
            Poll::Ready(None) => {
                let code = this.call.header_code.unwrap_or(Code::Unknown);
                this.call.finish(code);
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .map(|v| Code::from_bytes(v.as_bytes()))
}

/// The canonical upper-case name of a status code, as gRPC documents it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_methods_come_from_the_descriptors() {
        let known = KnownMethods::from_descriptor_sets(&[crate::proto::FILE_DESCRIPTOR_SET]);
        let (service, method) = known.labels("/dfs.v1.Storage/Upload");
        assert_eq!((&*service, &*method), ("dfs.v1.Storage", "Upload"));
        let (service, method) = known.labels("/dfs.v1.Storage/NoSuchMethod");
        assert_eq!((&*service, &*method), ("unknown", "unknown"));
    }

    #[test]
    fn every_code_has_its_canonical_name() {
        assert_eq!(code_name(Code::from_i32(5)), "NOT_FOUND");
        assert_eq!(code_name(Code::from_i32(15)), "DATA_LOSS");
        assert_eq!(code_name(Code::from_i32(16)), "UNAUTHENTICATED");
    }
}
