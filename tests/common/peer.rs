//! Speaking the peer protocol from a test, through the library's public
//! p2p API only (so these helpers are the one place to adapt when the
//! channel underneath changes): a client pool holding the cluster key, and
//! a "lying" peer that joins a cluster and answers with bad chunk copies.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use dfs::{
    crypto::{ClusterSecret, Keys},
    identity::NodeKey,
    p2p::{Identity, Limits, PeerHandler, PeerInfo, PeerPool, Reply},
    proto::{
        GetChunkReply, HasChunksReply, IndexSyncReply, IndexUpdateReply, PeerError, PeerMessage,
        Ping, Pong, PutChunkReply, peer_message::Kind,
    },
};
use tokio::sync::watch;

/// The keys a node started with the key file at `key_file` derives.
pub fn cluster_keys(key_file: &Path) -> Keys {
    let secret = ClusterSecret::read_file(key_file).expect("read cluster key file");
    Keys::derive(&secret)
}

/// A client of the peer protocol holding the cluster key in `key_file`, with
/// a fresh node key (its id derives from it), reachable at `advertised_addr`.
pub fn peer_pool(key_file: &Path, advertised_addr: &str) -> PeerPool {
    pool_with_key(key_file, NodeKey::generate(), advertised_addr)
}

fn pool_with_key(key_file: &Path, key: NodeKey, advertised_addr: &str) -> PeerPool {
    let identity = Identity {
        key,
        advertised_addr: advertised_addr.to_owned(),
    };
    PeerPool::new(identity, cluster_keys(key_file), Limits::default())
}

/// Sends one request through `pool` to `addr`; panics on a transport error.
pub async fn peer_request(pool: &PeerPool, addr: &str, kind: Kind, body: Option<Bytes>) -> Reply {
    let msg = PeerMessage {
        has_body: body.is_some(),
        kind: Some(kind),
    };
    pool.request(addr, msg, body)
        .await
        .unwrap_or_else(|e| panic!("peer request to {addr}: {e}"))
}

/// What a lying peer has been asked.
#[derive(Default)]
pub struct LiarStats {
    /// GetChunk requests answered with a bad copy.
    pub bad_copies_sent: AtomicU64,
    /// PutChunk requests answered (nothing is ever stored).
    pub puts_answered: AtomicU64,
}

/// A peer that holds the cluster key and answers like a member, except that
/// it claims to hold every chunk and sends a bad copy of any chunk asked for
/// (the right length, every byte wrong), and answers every PutChunk with
/// `stored: put_stored` without storing anything.
struct Liar {
    stats: Arc<LiarStats>,
    chunk_len: usize,
    put_stored: bool,
}

impl PeerHandler for Liar {
    async fn handle(
        &self,
        _peer: &PeerInfo,
        msg: PeerMessage,
        _body: Option<Bytes>,
    ) -> (PeerMessage, Option<Bytes>) {
        let reply = |kind| PeerMessage {
            has_body: false,
            kind: Some(kind),
        };
        match msg.kind {
            Some(Kind::Ping(_)) => (
                reply(Kind::Pong(Pong {
                    unix_ms: dfs::units::unix_ms(),
                    ..Default::default()
                })),
                None,
            ),
            Some(Kind::GetChunk(_)) => {
                self.stats.bad_copies_sent.fetch_add(1, Ordering::SeqCst);
                let junk = super::pseudo_random(super::unique_number(), self.chunk_len);
                let mut m = reply(Kind::GetChunkReply(GetChunkReply { found: true }));
                m.has_body = true;
                (m, Some(Bytes::from(junk)))
            }
            Some(Kind::PutChunk(_)) => {
                self.stats.puts_answered.fetch_add(1, Ordering::SeqCst);
                let stored = self.put_stored;
                (reply(Kind::PutChunkReply(PutChunkReply { stored })), None)
            }
            Some(Kind::HasChunks(h)) => (
                reply(Kind::HasChunksReply(HasChunksReply {
                    present: vec![true; h.chunk_ids.len()],
                })),
                None,
            ),
            Some(Kind::IndexUpdate(_)) => (
                reply(Kind::IndexUpdateReply(IndexUpdateReply::default())),
                None,
            ),
            Some(Kind::IndexSync(_)) => (
                reply(Kind::IndexSyncReply(IndexSyncReply {
                    records: Vec::new(),
                    more: false,
                })),
                None,
            ),
            _ => (
                reply(Kind::Error(PeerError {
                    code: 3,
                    message: "the liar does not answer this".into(),
                })),
                None,
            ),
        }
    }
}

/// A running lying peer; stops when dropped.
pub struct LyingPeer {
    pub stats: Arc<LiarStats>,
    pub addr: String,
    pub node_id: String,
    stop: watch::Sender<bool>,
}

impl LyingPeer {
    /// Starts a liar on a loopback port that sends bad copies `chunk_len`
    /// bytes long, and introduces it to the node whose peer address is
    /// `join` with one Ping, after which the node counts it as a member.
    pub async fn start(key_file: &Path, chunk_len: usize, join: &str) -> Self {
        Self::start_with(key_file, chunk_len, join, true).await
    }

    /// Like [`LyingPeer::start`]; `put_stored` is what it answers PutChunk.
    pub async fn start_with(
        key_file: &Path,
        chunk_len: usize,
        join: &str,
        put_stored: bool,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the liar's port");
        let addr = listener.local_addr().expect("local addr").to_string();
        let key = NodeKey::generate();
        let node_id = key.node_id().to_owned();
        let identity = Identity {
            key: key.clone(),
            advertised_addr: addr.clone(),
        };
        let stats = Arc::new(LiarStats::default());
        let (stop, stopped) = watch::channel(false);
        let handler = Arc::new(Liar {
            stats: stats.clone(),
            chunk_len,
            put_stored,
        });
        tokio::spawn(dfs::p2p::serve(
            listener,
            identity,
            cluster_keys(key_file),
            Limits::default(),
            handler,
            None,
            stopped,
        ));
        let pool = pool_with_key(key_file, key, &addr);
        let pong = peer_request(
            &pool,
            join,
            Kind::Ping(Ping {
                unix_ms: dfs::units::unix_ms(),
                ..Default::default()
            }),
            None,
        )
        .await;
        assert!(
            matches!(pong.msg.kind, Some(Kind::Pong(_))),
            "the node answered the liar's ping with {:?}",
            pong.msg
        );
        Self {
            stats,
            addr,
            node_id,
            stop,
        }
    }
}

impl Drop for LyingPeer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
