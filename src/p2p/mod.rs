//! The peer protocol: dfs's own framed TCP protocol between nodes.
//!
//! A connection carries frames (`kind u8 | len u32 BE | payload`, each kind
//! with a hard cap). It starts with a Noise handshake (`XXpsk3`: both static
//! node keys and the cluster's pre-shared key), after which every frame
//! travels encrypted and authenticated in Noise transport records, and the
//! connection carries strictly alternating requests and replies: the dialing
//! side asks, the accepting side answers, one request in flight per
//! connection. Parallelism comes from several pooled connections per peer,
//! not from a multiplexer.
//!
//! The layers, bottom up:
//! * [`frame`]: the frame format and its size rules;
//! * [`noise`]: the handshake's cryptography and the record ciphers;
//! * [`connection`]: a stream that reads and writes frames (in the clear
//!   during the handshake, in records after it) and whole messages (a
//!   `PeerMessage`, optionally followed by a body);
//! * [`handshake`]: version checks, the Noise handshake and node identities;
//! * [`serve`]: the accepting side, answering with a [`PeerHandler`];
//! * [`PeerPool`]: the dialing side, a pool of authenticated connections.
//!
//! This module knows nothing of chunks or objects: messages are opaque to it
//! beyond `has_body`. The byte-level specification is `docs/PROTOCOL.md`,
//! section "The peer protocol"; a test checks its examples against this code.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;

use crate::identity::{KEY_LEN, NodeKey};
use crate::proto::PeerMessage;

pub mod connection;
mod error;
pub mod frame;
pub mod handshake;
pub mod noise;
mod pool;
mod server;

pub use connection::{Connection, Incoming};
pub use error::{AUTH_FAILED_REASON, HandshakeError, P2pError};
pub use frame::{Frame, FrameKind};
pub use pool::PeerPool;
pub use server::serve;

/// Who this node is, as proved to peers in the handshake.
#[derive(Clone, Debug)]
pub struct Identity {
    /// This node's static key pair; its node id is derived from the public
    /// key. A peer proving the same key is this node itself, and is refused.
    pub key: NodeKey,
    /// Where this node accepts peer connections (`host:port`), so that peers
    /// can pass it on to others.
    pub advertised_addr: String,
}

impl Identity {
    /// This node's id (derived from its public key).
    pub fn node_id(&self) -> &str {
        self.key.node_id()
    }
}

/// The authenticated other end of a connection.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The peer's node id, derived from the static key it proved in the
    /// handshake (never taken from what it says; a claim that differs is
    /// refused). Only the holder of that key can appear under this id.
    pub node_id: String,
    /// The peer's static public key.
    pub public_key: [u8; KEY_LEN],
    /// The address the peer says it accepts connections on (sent inside
    /// the encrypted handshake, so authentic, but not checked by dialing).
    pub advertised_addr: String,
    /// The socket address this connection actually reaches.
    pub remote: SocketAddr,
}

/// Budget a received body is paid from: the node's buffer budget, passed
/// down by the layer above so that a peer's bodies count against the same
/// memory bound as every other chunk buffer.
pub trait BodyBudget: Send + Sync + 'static {
    /// Waits until `bytes` of budget are free and takes them; they return
    /// when the permit is dropped (with the last reference to the body).
    fn acquire(&self, bytes: usize) -> Pin<Box<dyn Future<Output = BodyPermit> + Send + '_>>;
}

/// Budget held by a received body; released when dropped.
pub type BodyPermit = Box<dyn Send + Sync>;

/// Every bound of the peer protocol in one place; `Default` holds the values
/// the protocol document describes.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Server: concurrent inbound connections. Further connections wait in
    /// the listen backlog until one closes (their dialer's handshake timeout
    /// bounds the wait).
    pub max_connections: usize,
    /// Pool: connections open at once to one address; more concurrent
    /// requests wait for one of them.
    pub per_peer_connections: usize,
    /// Pool: one TCP connect attempt.
    pub connect_timeout: Duration,
    /// Both sides: the whole handshake, from the TCP accept (or connect) to
    /// the first encrypted record. An acceptor spends nothing on a
    /// connection that has not proved the cluster key beyond this.
    pub handshake_timeout: Duration,
    /// Server: connections from one source IP address still in their
    /// handshake at once. Further ones from that address are closed at
    /// once, so that one host cannot hold every slot of `max_connections`.
    pub max_unauthenticated_per_source: usize,
    /// Pool: a whole exchange (waiting for a connection, connecting,
    /// handshake, request, reply). Server: a request from its first frame to
    /// the end of the reply.
    pub request_timeout: Duration,
    /// Server: an authenticated connection with no request for this long is
    /// closed. The pool stops reusing idle connections after half of it.
    pub idle_timeout: Duration,
    /// Both sides: the largest body accepted, enforced as DATA arrives.
    pub max_body: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            per_peer_connections: 4,
            connect_timeout: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(3),
            max_unauthenticated_per_source: 32,
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            // A sealed 16 MiB chunk: the IV plus the largest chunk size.
            max_body: 16 * 1024 * 1024 + 16,
        }
    }
}

/// A reply as the dialing side receives it.
#[derive(Debug)]
pub struct Reply {
    /// The reply message. A `PeerError` here is the peer's answer, not a
    /// transport failure: the exchange itself succeeded.
    pub msg: PeerMessage,
    /// The body, when the reply carried one.
    pub body: Option<Bytes>,
    /// Who answered.
    pub peer: PeerInfo,
}

/// What the accepting side does with requests. Implemented by the layer
/// above (the cluster), handed to [`serve`] at start-up, so that this module
/// never depends on what the messages mean.
pub trait PeerHandler: Send + Sync + 'static {
    /// Answers one request. Never fails at this level: errors are replies (PeerMessage with `kind: Error(PeerError{code, message})`).
    ///
    /// `has_body` of the returned message is ignored and set from the
    /// returned body. A request of a kind this node does not know arrives
    /// with `kind: None` (a newer peer); answer it with a `PeerError`.
    fn handle(
        &self,
        peer: &PeerInfo,
        msg: PeerMessage,
        body: Option<Bytes>,
    ) -> impl Future<Output = (PeerMessage, Option<Bytes>)> + Send;
}
