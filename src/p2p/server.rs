//! The accepting side: one task per connection, bounded by a semaphore.
//!
//! Each connection runs the handshake, then a loop of "read a request, ask
//! the handler, write the reply". Anything that goes wrong on a connection
//! (a bad frame, a failed handshake, a timeout) ends that connection alone,
//! with a warn line naming the remote address and the reason; the accept loop
//! and every other connection carry on.
//!
//! Before it has proved the cluster key, a connection gets little: the
//! handshake's own timeout, small frames only, and at most
//! `max_unauthenticated_per_source` such connections from one IP address.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use prost::Message;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tracing::{debug, warn};

use super::connection::{Connection, Incoming};
use super::frame::{Frame, MAX_MESSAGE_LEN};
use super::{BodyBudget, Identity, Limits, P2pError, PeerHandler, PeerInfo, handshake};
use crate::crypto::Keys;
use crate::proto::{PeerError, PeerMessage, peer_message::Kind};

/// `google.rpc.Code.INTERNAL`, for replies the handler got wrong.
const CODE_INTERNAL: u32 = 13;

/// What every connection task shares.
struct Context<H> {
    identity: Identity,
    keys: Keys,
    limits: Limits,
    handler: Arc<H>,
    budget: Option<Arc<dyn BodyBudget>>,
    /// Connections still in their handshake, per source address.
    unauthenticated: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place in the per-source count of unauthenticated
/// connections; given back when the handshake ends, however it ends.
struct PreAuthSlot<'a, H> {
    ctx: &'a Context<H>,
    ip: IpAddr,
}

impl<'a, H> PreAuthSlot<'a, H> {
    /// A slot for `ip`, or `None` when that address holds its maximum.
    fn take(ctx: &'a Context<H>, ip: IpAddr) -> Option<Self> {
        let mut map = lock(&ctx.unauthenticated);
        let count = map.entry(ip).or_insert(0);
        if *count >= ctx.limits.max_unauthenticated_per_source.max(1) {
            return None;
        }
        *count += 1;
        Some(Self { ctx, ip })
    }
}

impl<H> Drop for PreAuthSlot<'_, H> {
    fn drop(&mut self) {
        let mut map = lock(&self.ctx.unauthenticated);
        if let Some(count) = map.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Counters stay consistent under panic: each update is one statement.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Accepts peer connections until `shutdown` turns true (or its sender is
/// dropped), then stops accepting, lets each connection finish the request
/// it is serving, and returns once all have closed.
///
/// At most `limits.max_connections` connections are served at once (a
/// semaphore; 0 counts as 1). When all are taken the loop stops accepting:
/// further dialers wait in the listen backlog, and their handshake timeout
/// bounds that wait. Waiting rather than refusing keeps a burst of dials from
/// turning into a burst of failures, and costs nothing while the node keeps up.
///
/// Request bodies are paid from `budget` when one is given (the node's
/// buffer budget), so peers cannot make this node hold more body memory
/// than its budget allows.
pub async fn serve<H: PeerHandler>(
    listener: TcpListener,
    identity: Identity,
    keys: Keys,
    limits: Limits,
    handler: Arc<H>,
    budget: Option<Arc<dyn BodyBudget>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let max = limits.max_connections.clamp(1, u32::MAX as usize);
    let permits = Arc::new(Semaphore::new(max));
    let ctx = Arc::new(Context {
        identity,
        keys,
        limits,
        handler,
        budget,
        unauthenticated: Mutex::new(HashMap::new()),
    });
    loop {
        let permit = tokio::select! {
            _ = signalled(&mut shutdown) => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break, // never closed; nothing left to serve if it were
            },
        };
        let (stream, remote) = tokio::select! {
            _ = signalled(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Usually out of file descriptors: back off instead of
                    // spinning, and keep serving the connections we have.
                    warn!(error = %e, "peer listener failed to accept; retrying in 100ms");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        if let Err(e) = stream.set_nodelay(true) {
            debug!(%remote, error = %e, "could not set TCP_NODELAY on a peer connection");
        }
        let task = run_connection(stream, remote, ctx.clone(), shutdown.clone(), permit);
        tokio::spawn(task);
    }
    drop(listener);
    // Every connection task holds a permit until it ends: owning them all
    // again means every connection has closed.
    let _ = permits.acquire_many(max as u32).await;
    debug!("peer server stopped");
}

/// Returns when shutdown is signalled or can no longer be (sender dropped).
async fn signalled(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

async fn run_connection<H: PeerHandler>(
    stream: TcpStream,
    remote: SocketAddr,
    ctx: Arc<Context<H>>,
    mut shutdown: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    let Some(slot) = PreAuthSlot::take(&ctx, remote.ip()) else {
        debug!(%remote, "too many unauthenticated connections from this address; closing");
        return;
    };
    let mut conn = Connection::new(stream);
    let limits = &ctx.limits;
    let handshake = handshake::accept(
        &mut conn,
        &ctx.identity,
        &ctx.keys,
        limits.handshake_timeout,
        remote,
    );
    let peer = match handshake.await {
        Ok(peer) => peer,
        Err(e) => {
            warn!(%remote, "refused a peer connection: {e}");
            drop(slot);
            conn.close_after(&e).await;
            return;
        }
    };
    drop(slot);
    debug!(%remote, node = %peer.node_id, "peer connected");
    loop {
        // Between requests: wait for the next one, the idle limit, or shutdown.
        let next = tokio::select! {
            _ = signalled(&mut shutdown) => break,
            next = tokio::time::timeout(limits.idle_timeout, conn.read_frame()) => next,
        };
        let first = match next {
            Err(_) => {
                debug!(%remote, node = %peer.node_id, "closing an idle peer connection");
                break;
            }
            Ok(Ok(Some(first))) => first,
            Ok(Ok(None)) => {
                debug!(%remote, node = %peer.node_id, "peer closed the connection");
                return;
            }
            Ok(Err(e)) => return fail(conn, &peer, e).await,
        };
        let answer = answer(&mut conn, first, &peer, &ctx);
        match tokio::time::timeout(limits.request_timeout, answer).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return fail(conn, &peer, e).await,
            Err(_) => return fail(conn, &peer, P2pError::Timeout("serving a request")).await,
        }
    }
    conn.close_after(&P2pError::Closed).await;
}

/// Reads the rest of a request, runs the handler, writes the reply.
async fn answer<H: PeerHandler>(
    conn: &mut Connection<TcpStream>,
    first: Frame,
    peer: &PeerInfo,
    ctx: &Context<H>,
) -> Result<(), P2pError> {
    let budget = ctx.budget.as_deref();
    let Incoming { msg, body } = conn
        .finish_message(first, ctx.limits.max_body, budget)
        .await?;
    let (reply, reply_body) = ctx.handler.handle(peer, msg, body).await;
    let (mut reply, reply_body) = sanitize_reply(reply, reply_body);
    conn.write_message(&mut reply, reply_body.as_ref()).await
}

/// Replaces a reply the wire cannot carry with an INTERNAL `PeerError`: the
/// handler's mistake is reported to the requester instead of looking like a
/// protocol violation of this node.
fn sanitize_reply(reply: PeerMessage, body: Option<Bytes>) -> (PeerMessage, Option<Bytes>) {
    let problem = if body.as_ref().is_some_and(|b| b.is_empty()) {
        "the handler returned an empty body".to_owned()
    } else if reply.encoded_len() > MAX_MESSAGE_LEN {
        format!(
            "the reply is {} bytes, over the {MAX_MESSAGE_LEN}-byte message cap",
            reply.encoded_len()
        )
    } else {
        return (reply, body);
    };
    warn!("peer handler bug: {problem}");
    let error = PeerMessage {
        has_body: false,
        kind: Some(Kind::Error(PeerError {
            code: CODE_INTERNAL,
            message: problem,
        })),
    };
    (error, None)
}

async fn fail(conn: Connection<TcpStream>, peer: &PeerInfo, e: P2pError) {
    match &e {
        P2pError::Io(_) | P2pError::Closed => {
            debug!(remote = %peer.remote, node = %peer.node_id, "peer connection lost: {e}");
        }
        _ => warn!(remote = %peer.remote, node = %peer.node_id, "closing a peer connection: {e}"),
    }
    conn.close_after(&e).await;
}
