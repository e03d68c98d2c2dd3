//! The dialing side: a pool of authenticated connections per peer address.
//!
//! Each address has a semaphore of `per_peer_connections` permits, one per
//! request in flight. A request holding a permit takes an idle connection if
//! there is one and dials a new one only if there is none, so at most
//! `per_peer_connections` connections to an address are ever open (in use
//! plus idle). A connection goes back to the idle list only after a clean
//! exchange; any error drops it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::connection::Connection;
use super::{Identity, Limits, P2pError, PeerInfo, Reply, handshake};
use crate::crypto::Keys;
use crate::proto::PeerMessage;

/// A pool of connections to peers, shared by cloning.
#[derive(Clone)]
pub struct PeerPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    identity: Identity,
    keys: Keys,
    limits: Limits,
    /// One entry per address ever asked for: a cluster's member count.
    peers: Mutex<HashMap<String, Arc<PeerSlots>>>,
}

/// The connections to one address.
struct PeerSlots {
    /// One permit per request in flight to this address.
    in_flight: Arc<Semaphore>,
    /// Authenticated connections waiting for a request, most recent last.
    idle: Mutex<Vec<IdleConnection>>,
}

struct IdleConnection {
    conn: Connection<TcpStream>,
    peer: PeerInfo,
    since: Instant,
}

impl PeerPool {
    /// A pool that introduces itself as `identity` and proves the cluster
    /// secret with `keys`. Connections are opened on first use.
    pub fn new(identity: Identity, keys: Keys, limits: Limits) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                identity,
                keys,
                limits,
                peers: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Sends one request (has_body set from `body`) on an idle pooled
    /// connection to `addr`, or a new one (at most `per_peer_connections`
    /// open per address; waits for one otherwise). The whole exchange,
    /// waiting included, is bounded by `request_timeout`. A connection that
    /// saw any error is dropped, never reused; if that connection was a
    /// reused idle one the peer had closed, the request is sent once more
    /// on a new connection (peer requests are idempotent).
    pub async fn request(
        &self,
        addr: &str,
        msg: PeerMessage,
        body: Option<Bytes>,
    ) -> Result<Reply, P2pError> {
        let exchange = self.exchange(addr, msg, body);
        tokio::time::timeout(self.inner.limits.request_timeout, exchange)
            .await
            .map_err(|_| P2pError::Timeout("waiting for a peer's reply"))?
    }

    /// Drops idle connections to `addr` (the peer was found dead).
    /// Connections in use are dropped when their request ends in an error.
    pub fn forget(&self, addr: &str) {
        let slots = lock(&self.inner.peers).get(addr).cloned();
        if let Some(slots) = slots {
            lock(&slots.idle).clear();
        }
    }

    /// How many idle connections to `addr` the pool holds (for status pages
    /// and tests).
    pub fn idle_connections(&self, addr: &str) -> usize {
        let slots = lock(&self.inner.peers).get(addr).cloned();
        slots.map_or(0, |s| lock(&s.idle).len())
    }

    async fn exchange(
        &self,
        addr: &str,
        mut msg: PeerMessage,
        body: Option<Bytes>,
    ) -> Result<Reply, P2pError> {
        let slots = self.slots(addr);
        let _permit = slots
            .in_flight
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| P2pError::Closed)?;
        let mut reused = self.take_idle(&slots);
        loop {
            let was_idle = reused.is_some();
            let (mut conn, peer) = match reused.take() {
                Some(idle) => idle,
                None => self.connect(addr).await?,
            };
            let max_body = self.inner.limits.max_body;
            let result = async {
                conn.write_message(&mut msg, body.as_ref()).await?;
                conn.read_message(max_body).await?.ok_or(P2pError::Closed)
            }
            .await;
            let e = match result {
                Ok(reply) => {
                    lock(&slots.idle).push(IdleConnection {
                        conn,
                        peer: peer.clone(),
                        since: Instant::now(),
                    });
                    return Ok(Reply {
                        msg: reply.msg,
                        body: reply.body,
                        peer,
                    });
                }
                Err(e) => e,
            };
            debug!(%addr, node = %peer.node_id, "peer request failed: {e}");
            if was_idle && closed_under_us(&e) {
                // The peer closed this idle connection (its idle timeout)
                // just before we used it; one fresh connection settles it.
                continue;
            }
            if e.is_protocol_violation() {
                // Tell the peer why, off the caller's path.
                let reason = e.wire_reason();
                tokio::spawn(async move {
                    let _ = conn.send_error(&reason).await;
                });
            }
            return Err(e);
        }
    }

    fn slots(&self, addr: &str) -> Arc<PeerSlots> {
        let per_peer = self.inner.limits.per_peer_connections.max(1);
        lock(&self.inner.peers)
            .entry(addr.to_owned())
            .or_insert_with(|| {
                Arc::new(PeerSlots {
                    in_flight: Arc::new(Semaphore::new(per_peer)),
                    idle: Mutex::new(Vec::new()),
                })
            })
            .clone()
    }

    /// The most recently used idle connection that still looks alive. Ones
    /// idle for over half the idle timeout are dropped rather than raced
    /// against the server closing them.
    fn take_idle(&self, slots: &PeerSlots) -> Option<(Connection<TcpStream>, PeerInfo)> {
        let max_age = self.inner.limits.idle_timeout / 2;
        let mut idle = lock(&slots.idle);
        while let Some(candidate) = idle.pop() {
            if candidate.since.elapsed() < max_age && candidate.conn.is_reusable() {
                return Some((candidate.conn, candidate.peer));
            }
        }
        None
    }

    /// Dials `addr` (each resolved address in turn until one connects) and
    /// runs the handshake. A handshake failure is final: another address of
    /// the same name would hold the same secret.
    async fn connect(&self, addr: &str) -> Result<(Connection<TcpStream>, PeerInfo), P2pError> {
        let limits = &self.inner.limits;
        let resolved: Vec<SocketAddr> =
            tokio::time::timeout(limits.connect_timeout, tokio::net::lookup_host(addr))
                .await
                .map_err(|_| P2pError::Timeout("resolving a peer address"))??
                .collect();
        let mut last_error = P2pError::NoAddress(addr.to_owned());
        for remote in resolved {
            let stream = match tokio::time::timeout(
                limits.connect_timeout,
                TcpStream::connect(remote),
            )
            .await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    last_error = e.into();
                    continue;
                }
                Err(_) => {
                    last_error = P2pError::Timeout("connecting to a peer");
                    continue;
                }
            };
            stream.set_nodelay(true)?;
            let mut conn = Connection::new(stream);
            let inner = &self.inner;
            let handshake = handshake::dial(
                &mut conn,
                &inner.identity,
                &inner.keys,
                limits.handshake_timeout,
                remote,
            );
            return match handshake.await {
                Ok(peer) => {
                    debug!(%addr, %remote, node = %peer.node_id, "connected to peer");
                    Ok((conn, peer))
                }
                Err(e) => {
                    warn!(%addr, %remote, "peer handshake failed: {e}");
                    if e.is_protocol_violation() {
                        let reason = e.wire_reason();
                        tokio::spawn(async move {
                            let _ = conn.send_error(&reason).await;
                        });
                    }
                    Err(e)
                }
            };
        }
        Err(last_error)
    }
}

/// True for the ways a connection the peer had already closed fails: EOF
/// before any reply, or a reset. Retrying such a request once on a new
/// connection is safe because peer requests are idempotent (chunks are
/// content-addressed, index updates are last-writer-wins, the rest read).
fn closed_under_us(e: &P2pError) -> bool {
    use std::io::ErrorKind;
    match e {
        P2pError::Closed => true,
        P2pError::Io(io) => matches!(
            io.kind(),
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted
        ),
        _ => false,
    }
}

/// Locks a mutex that is never held across an await or a panic-prone call;
/// a poisoned one is still consistent, so it is used as is.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
