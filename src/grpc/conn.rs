//! Client connections on the gRPC port: how many may be open, when an idle
//! one is closed, and a way to close one from outside (hyper owns it).
//!
//! Every accepted socket is wrapped in a [`ManagedIo`] registered here. Its
//! [`ConnInfo`] travels with each request (tonic puts it in the request
//! extensions), so the call layer counts the calls running on each
//! connection. That is what lets the node:
//! - cap connections (`--max-connections`): at the cap, the connection idle
//!   the longest (no call running) is closed for the newcomer; with none
//!   idle, the newcomer is refused at once;
//! - close a connection that had no call for `--idle-timeout` (including
//!   one that never sent an HTTP/2 preface), so idle sockets do not pin
//!   memory and file descriptors forever;
//! - close a connection whose only call was cut off for making no progress:
//!   the data HTTP/2 still buffers for it is freed with the connection.
//!
//! Closing makes the socket read as end-of-file and fail writes, and wakes
//! hyper's connection task, which then drops the connection and everything
//! its streams held.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures_util::task::AtomicWaker;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tokio_stream::Stream;
use tonic::transport::server::Connected;

use crate::metrics::{self, ConnClosed};

/// How often idle connections are looked for.
const REAP_EVERY: Duration = Duration::from_secs(1);

/// The state of one client connection, shared by its socket wrapper and
/// the calls running on it.
pub struct ConnState {
    epoch: Instant,
    remote: Option<SocketAddr>,
    active: AtomicUsize,
    /// Milliseconds since `epoch` at which the last call ended (or the
    /// connection opened).
    idle_since_ms: AtomicU64,
    closed: AtomicBool,
    waker: AtomicWaker,
}

impl ConnState {
    fn new(remote: Option<SocketAddr>) -> Self {
        Self {
            epoch: Instant::now(),
            remote,
            active: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The client's address.
    pub fn remote(&self) -> Option<SocketAddr> {
        self.remote
    }

    /// A call started on this connection.
    pub fn call_started(&self) {
        self.active.fetch_add(1, Ordering::AcqRel);
    }

    /// A call on this connection ended.
    pub fn call_ended(&self) {
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle_since_ms.store(self.now_ms(), Ordering::Release);
        }
    }

    /// Calls running on this connection now.
    pub fn active_calls(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// How long the connection has had no call running (zero while one runs).
    fn idle_for(&self) -> Duration {
        if self.active_calls() > 0 {
            return Duration::ZERO;
        }
        let since = self.idle_since_ms.load(Ordering::Acquire);
        Duration::from_millis(self.now_ms().saturating_sub(since))
    }

    /// Whether the node has closed this connection.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Closes the connection: its socket reads as end-of-file from now on.
    /// Returns false if it was already closed.
    pub fn close(&self, reason: ConnClosed) -> bool {
        if self.closed.swap(true, Ordering::AcqRel) {
            return false;
        }
        metrics::connection_closed(reason);
        tracing::debug!(remote = ?self.remote, ?reason, "closing a client connection");
        self.waker.wake();
        true
    }
}

/// What tonic attaches to every request of a connection.
#[derive(Clone)]
pub struct ConnInfo(pub Arc<ConnState>);

/// The open connections of one server.
#[derive(Clone)]
pub struct Connections {
    inner: Arc<Registry>,
}

struct Registry {
    max: usize,
    conns: Mutex<HashMap<u64, Arc<ConnState>>>,
    next_id: AtomicU64,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ConnState>>> {
        // Inserts and removes only: a panic cannot leave the map half-changed.
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Connections {
    /// Room for `max` connections.
    pub fn new(max: usize) -> Self {
        Self {
            inner: Arc::new(Registry {
                max: max.max(1),
                conns: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    /// Connections open now (not counting ones being closed).
    pub fn open(&self) -> usize {
        self.inner
            .lock()
            .values()
            .filter(|c| !c.is_closed())
            .count()
    }

    /// Registers a new socket, closing the longest-idle connection when at
    /// the cap. `None`: at the cap with every connection busy.
    fn admit(&self, remote: Option<SocketAddr>) -> Option<(u64, Arc<ConnState>)> {
        let mut conns = self.inner.lock();
        let open: Vec<&Arc<ConnState>> = conns.values().filter(|c| !c.is_closed()).collect();
        if open.len() >= self.inner.max {
            let victim = open
                .into_iter()
                .filter(|c| c.active_calls() == 0)
                .max_by_key(|c| c.idle_for())?;
            victim.close(ConnClosed::Evicted);
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState::new(remote));
        conns.insert(id, state.clone());
        Some((id, state))
    }

    /// Closes every connection that has had no call for `idle`.
    pub fn close_idle(&self, idle: Duration) {
        for conn in self.inner.lock().values() {
            if !conn.is_closed() && conn.idle_for() >= idle {
                conn.close(ConnClosed::Idle);
            }
        }
    }

    /// Accepts connections from `listener` until the stream is dropped.
    /// Refused connections are closed at once and never reach the server.
    pub fn incoming(
        &self,
        listener: TcpListener,
    ) -> impl Stream<Item = Result<ManagedIo, io::Error>> + use<> {
        let registry = self.clone();
        futures_util::stream::unfold((listener, registry), |(listener, registry)| async move {
            loop {
                let (socket, remote) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors, usually: wait, do not spin.
                        tracing::warn!(error = %e, "cannot accept a gRPC connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // Without TCP_NODELAY, HTTP/2 window updates sit behind
                // Nagle's algorithm for a delayed-ACK period and stall uploads.
                let _ = socket.set_nodelay(true);
                let Some((id, state)) = registry.admit(Some(remote)) else {
                    metrics::connection_closed(ConnClosed::Refused);
                    tracing::debug!(remote = %remote, "refusing a gRPC connection: at --max-connections, none idle");
                    drop(socket);
                    continue;
                };
                metrics::connection(true);
                let io = ManagedIo {
                    io: socket,
                    id,
                    state,
                    registry: registry.inner.clone(),
                };
                return Some((Ok(io), (listener, registry)));
            }
        })
    }

    /// Closes connections idle for `idle`, every second, until the process ends.
    pub fn spawn_reaper(&self, idle: Duration) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REAP_EVERY.min(idle));
            loop {
                tick.tick().await;
                this.close_idle(idle);
            }
        });
    }
}

/// A client socket the node can close from outside.
pub struct ManagedIo {
    io: TcpStream,
    id: u64,
    state: Arc<ConnState>,
    registry: Arc<Registry>,
}

impl Drop for ManagedIo {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
        metrics::connection(false);
    }
}

impl Connected for ManagedIo {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo(self.state.clone())
    }
}

impl AsyncRead for ManagedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.state.waker.register(cx.waker());
        if self.state.is_closed() {
            return Poll::Ready(Ok(())); // end of file
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for ManagedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.state.is_closed() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.state.is_closed() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_cap_the_longest_idle_connection_makes_room() {
        let conns = Connections::new(2);
        let (_, busy) = conns.admit(None).unwrap();
        busy.call_started();
        let (_, idle) = conns.admit(None).unwrap();
        let (_, newcomer) = conns.admit(None).expect("an idle one makes room");
        assert!(idle.is_closed(), "the idle connection was closed");
        assert!(!busy.is_closed(), "a connection with a call running stays");
        newcomer.call_started();
        assert!(
            conns.admit(None).is_none(),
            "every connection busy: refused"
        );
        newcomer.call_ended();
        assert_eq!(newcomer.active_calls(), 0);
    }

    #[test]
    fn idle_connections_are_closed_after_the_idle_timeout() {
        let conns = Connections::new(8);
        let (_, a) = conns.admit(None).unwrap();
        let (_, b) = conns.admit(None).unwrap();
        b.call_started();
        std::thread::sleep(Duration::from_millis(30));
        conns.close_idle(Duration::from_millis(20));
        assert!(a.is_closed());
        assert!(!b.is_closed());
        assert_eq!(conns.open(), 1);
    }
}
