//! Per-call limits on the gRPC port, as a tower layer around every service:
//!
//! - **Load shedding.** With `--max-calls` dfs calls in flight, or with the
//!   buffer budget saturated (not even a small transfer can get memory, see
//!   [`BufferBudget::saturated`]), a new call is answered at once with
//!   `RESOURCE_EXHAUSTED` instead of queueing. Health and reflection are
//!   never shed, so probes see the node's real state.
//! - **Whole-call deadlines for downloads.** tonic applies a client's
//!   `grpc-timeout` to the handler's future, which for a server-streaming
//!   call ends at the first message. A Download's body is cut off at the
//!   deadline too.
//! - **Idle downloads.** A Download whose client takes no data for
//!   `--idle-timeout` is cut off.
//!
//! Cutting a call off drops its body at once, which stops the download's
//! producer and releases every buffer it held, whether or not the client
//! ever reads again. The client gets `DEADLINE_EXCEEDED` in the trailers if
//! it resumes reading; if it does not within a second and nothing else runs
//! on its connection, the connection is closed, freeing what HTTP/2 still
//! buffers for it.
//!
//! Every call also counts itself on its connection (see [`super::conn`]).

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::Notify;
use tonic::Status;

use super::conn::{ConnInfo, ConnState};
use crate::{
    budget::BufferBudget,
    metrics::{self, ConnClosed, Shed, TimedOut},
};

/// How long a cut-off call's trailers may wait for the client to read them
/// before its connection (if idle otherwise) is closed.
const TRAILER_GRACE: Duration = Duration::from_secs(1);
const DOWNLOAD_PATH: &str = "/dfs.v1.Storage/Download";
const UPLOAD_PATH: &str = "/dfs.v1.Storage/Upload";

/// Settings and counters shared by every call of one server.
pub struct CallLimits {
    max_calls: usize,
    idle: Duration,
    budget: BufferBudget,
    in_flight: AtomicUsize,
}

impl CallLimits {
    pub fn new(max_calls: usize, idle: Duration, budget: BufferBudget) -> Arc<Self> {
        Arc::new(Self {
            max_calls: max_calls.max(1),
            idle,
            budget,
            in_flight: AtomicUsize::new(0),
        })
    }

    /// dfs calls (not health, not reflection) running now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Whether the node cannot take more work: every call slot is taken, or
    /// not even a small transfer can get buffer memory.
    pub fn saturated(&self) -> bool {
        self.in_flight() >= self.max_calls || self.budget.saturated()
    }

    /// Why a new call on `path` must be refused at once, if it must.
    fn shed(&self, path: &str) -> Option<(Shed, String)> {
        if self.in_flight() >= self.max_calls {
            return Some((
                Shed::Calls,
                format!(
                    "node is saturated: {} calls in flight (--max-calls); retry later",
                    self.max_calls
                ),
            ));
        }
        if (path == UPLOAD_PATH || path == DOWNLOAD_PATH) && self.budget.saturated() {
            return Some((
                Shed::Budget,
                "node is saturated: no buffer memory free even for small transfers; retry later"
                    .into(),
            ));
        }
        None
    }
}

/// The tower layer; see the module documentation.
#[derive(Clone)]
pub struct CallLimitsLayer {
    limits: Arc<CallLimits>,
}

impl CallLimitsLayer {
    pub fn new(limits: Arc<CallLimits>) -> Self {
        Self { limits }
    }
}

impl<S> tower_layer::Layer<S> for CallLimitsLayer {
    type Service = CallLimitsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallLimitsService {
            inner,
            limits: self.limits.clone(),
        }
    }
}

/// The service [`CallLimitsLayer`] wraps around the server's routes.
#[derive(Clone)]
pub struct CallLimitsService<S> {
    inner: S,
    limits: Arc<CallLimits>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for CallLimitsService<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body<Data = Bytes> + Unpin + Send + 'static,
{
    type Response = http::Response<LimitedBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let path = req.uri().path();
        let exempt = path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.");
        if !exempt && let Some((reason, message)) = self.limits.shed(path) {
            metrics::shed(reason);
            tracing::debug!(path, message, "shedding a call");
            let response = Status::resource_exhausted(message).into_http::<()>();
            return Box::pin(async move { Ok(response.map(|()| LimitedBody::empty())) });
        }
        let download = path == DOWNLOAD_PATH;
        let deadline = download
            .then(|| grpc_timeout(req.headers()))
            .flatten()
            .map(|d| Instant::now() + d);
        let conn = req.extensions().get::<ConnInfo>().map(|c| c.0.clone());
        let guard = Arc::new(CallGuard::begin(
            conn,
            (!exempt).then(|| self.limits.clone()),
        ));
        let idle = self.limits.idle;
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| {
                if download {
                    LimitedBody::watched(body, guard, idle, deadline)
                } else {
                    LimitedBody::plain(body, guard)
                }
            }))
        })
    }
}

/// Counts a call on its connection and in the node's in-flight total, and
/// uncounts it exactly once: when it ends, or when it is cut off.
struct CallGuard {
    conn: Option<Arc<ConnState>>,
    limits: Option<Arc<CallLimits>>,
    ended: AtomicBool,
}

impl CallGuard {
    fn begin(conn: Option<Arc<ConnState>>, limits: Option<Arc<CallLimits>>) -> Self {
        if let Some(c) = &conn {
            c.call_started();
        }
        if let Some(l) = &limits {
            l.in_flight.fetch_add(1, Ordering::AcqRel);
        }
        Self {
            conn,
            limits,
            ended: AtomicBool::new(false),
        }
    }

    fn end(&self) {
        if self.ended.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(c) = &self.conn {
            c.call_ended();
        }
        if let Some(l) = &self.limits {
            l.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.end();
    }
}

/// A response body under the call limits.
pub struct LimitedBody<B> {
    kind: Kind<B>,
}

enum Kind<B> {
    /// A shed call: headers only.
    Empty,
    /// A body that only needs its call counted.
    Plain { body: B, guard: Arc<CallGuard> },
    /// A body a watchdog may cut off.
    Watched(Arc<Watched<B>>),
}

/// What a watched body and its watchdog share.
struct Watched<B> {
    state: Mutex<State<B>>,
    guard: Arc<CallGuard>,
    started: Instant,
    /// Milliseconds after `started` of the last data frame taken.
    progress_ms: AtomicU64,
    /// The task polling the body, woken when it is cut off.
    waker: AtomicWaker,
    /// Signalled when the body ends or is dropped.
    finished: Notify,
    trailers_sent: AtomicBool,
}

enum State<B> {
    Running(B),
    /// Cut off: these trailers are what is left to send.
    Cut(Option<http::HeaderMap>),
    Done,
}

impl<B> Watched<B> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State<B>> {
        // Each update is one assignment: a panic cannot leave it half-done.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn progressed(&self) {
        self.progress_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Release);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.progress_ms.load(Ordering::Acquire));
        self.started.elapsed().saturating_sub(last)
    }

    /// Ends the call with `status`: drops the body (and everything it holds)
    /// now, leaving only the trailers to send. False if it had already ended.
    fn cut(&self, status: &Status) -> bool {
        let mut trailers = http::HeaderMap::new();
        let _ = status.add_header(&mut trailers);
        let body = {
            let mut state = self.lock();
            match std::mem::replace(&mut *state, State::Cut(Some(trailers))) {
                State::Running(body) => body,
                other => {
                    *state = other;
                    return false;
                }
            }
        };
        drop(body);
        self.guard.end();
        self.waker.wake();
        true
    }
}

impl<B> LimitedBody<B> {
    fn empty() -> Self {
        Self { kind: Kind::Empty }
    }

    fn plain(body: B, guard: Arc<CallGuard>) -> Self {
        Self {
            kind: Kind::Plain { body, guard },
        }
    }

    fn watched(body: B, guard: Arc<CallGuard>, idle: Duration, deadline: Option<Instant>) -> Self
    where
        B: Send + 'static,
    {
        let watched = Arc::new(Watched {
            state: Mutex::new(State::Running(body)),
            guard,
            started: Instant::now(),
            progress_ms: AtomicU64::new(0),
            waker: AtomicWaker::new(),
            finished: Notify::new(),
            trailers_sent: AtomicBool::new(false),
        });
        tokio::spawn(watchdog(Arc::downgrade(&watched), idle, deadline));
        Self {
            kind: Kind::Watched(watched),
        }
    }
}

/// Cuts a Download off when it passes its deadline or makes no progress
/// for `idle`; then, if the client does not take the trailers and nothing
/// else runs on its connection, closes the connection.
async fn watchdog<B>(
    watched: std::sync::Weak<Watched<B>>,
    idle: Duration,
    deadline: Option<Instant>,
) {
    loop {
        let Some(w) = watched.upgrade() else { return };
        let idle_at = Instant::now() + idle.saturating_sub(w.idle_for());
        let wake_at = deadline.map_or(idle_at, |d| d.min(idle_at));
        tokio::select! {
            () = w.finished.notified() => return,
            () = tokio::time::sleep_until(wake_at.into()) => {}
        }
        let (reason, status) = if deadline.is_some_and(|d| Instant::now() >= d) {
            (
                TimedOut::Deadline,
                Status::deadline_exceeded("the call's deadline (grpc-timeout) passed"),
            )
        } else if w.idle_for() >= idle {
            (
                TimedOut::Idle,
                Status::deadline_exceeded(format!(
                    "the client took no data for {idle:?} (--idle-timeout); download cancelled"
                )),
            )
        } else {
            continue;
        };
        if !w.cut(&status) {
            return;
        }
        metrics::timed_out("Download".into(), reason);
        let conn = w.guard.conn.clone();
        tracing::info!(remote = ?conn.as_ref().and_then(|c| c.remote()), ?reason, "cut off a download");
        drop(w);
        tokio::time::sleep(TRAILER_GRACE).await;
        let sent = watched
            .upgrade()
            .is_none_or(|w| w.trailers_sent.load(Ordering::Acquire));
        if let Some(conn) = conn
            && !sent
            && conn.active_calls() == 0
        {
            conn.close(ConnClosed::Stalled);
        }
        return;
    }
}

impl<B> Drop for LimitedBody<B> {
    fn drop(&mut self) {
        if let Kind::Watched(w) = &self.kind {
            w.finished.notify_one();
        }
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match &mut self.kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Plain { body, guard } => {
                let polled = Pin::new(body).poll_frame(cx);
                if let Poll::Ready(None) = polled {
                    guard.end();
                }
                polled
            }
            Kind::Watched(w) => {
                w.waker.register(cx.waker());
                let mut state = w.lock();
                match &mut *state {
                    State::Running(body) => {
                        let polled = Pin::new(body).poll_frame(cx);
                        match &polled {
                            Poll::Ready(Some(Ok(frame))) if frame.is_data() => w.progressed(),
                            Poll::Ready(Some(Ok(_))) | Poll::Ready(None) => {
                                *state = State::Done;
                                drop(state);
                                w.guard.end();
                                w.finished.notify_one();
                            }
                            _ => {}
                        }
                        polled
                    }
                    State::Cut(trailers) => {
                        let trailers = trailers.take();
                        *state = State::Done;
                        w.trailers_sent.store(true, Ordering::Release);
                        Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))))
                    }
                    State::Done => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Plain { body, .. } => body.is_end_stream(),
            Kind::Watched(w) => match &*w.lock() {
                State::Running(body) => body.is_end_stream(),
                State::Cut(_) => false,
                State::Done => true,
            },
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Plain { body, .. } => body.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

/// The client's deadline from a `grpc-timeout` header (at most 8 digits and
/// a unit: H, M, S, m, u, n), if it has a valid one.
pub fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let text = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A stream of upload data that ends with `DEADLINE_EXCEEDED` when the
/// client sends nothing for `idle`. Only time spent waiting for the client
/// counts: while the node itself is busy (waiting for budget, writing), the
/// stream is not polled and its clock does not run.
pub struct IdleLimited<S> {
    inner: S,
    idle: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    ended: bool,
}

impl<S> IdleLimited<S> {
    pub fn new(inner: S, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            timer: None,
            ended: false,
        }
    }
}

impl<S> tokio_stream::Stream for IdleLimited<S>
where
    S: tokio_stream::Stream<Item = Result<Bytes, crate::node::NodeError>> + Unpin,
{
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if let Poll::Ready(item) = Pin::new(&mut self.inner).poll_next(cx) {
            self.timer = None;
            return Poll::Ready(item);
        }
        let idle = self.idle;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.ended = true;
        metrics::timed_out("Upload".into(), TimedOut::Idle);
        Poll::Ready(Some(Err(crate::node::NodeError::TimedOut(format!(
            "the client sent nothing for {idle:?} (--idle-timeout); upload cancelled, nothing stored"
        )))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_headers_parse() {
        let parse = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&h)
        };
        assert_eq!(parse("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("123456789S"), None, "more than 8 digits");
        assert_eq!(parse("5x"), None);
        assert_eq!(parse("S"), None);
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
    }

    #[tokio::test]
    async fn an_upload_stream_ends_when_the_client_goes_quiet() {
        use tokio_stream::StreamExt;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, crate::node::NodeError>>(4);
        let mut stream = IdleLimited::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            Duration::from_millis(100),
        );
        tx.send(Ok(Bytes::from_static(b"a"))).await.unwrap();
        assert!(stream.next().await.unwrap().is_ok());
        let started = Instant::now();
        let end = stream.next().await.unwrap();
        assert!(matches!(end, Err(crate::node::NodeError::TimedOut(_))));
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert!(stream.next().await.is_none());
        drop(tx);
    }
}
