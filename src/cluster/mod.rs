//! The cluster: membership, placement, replication, remote reads, index
//! convergence and repair, over the peer protocol (`p2p`).
//!
//! A node that was never started as part of a cluster (no peers, `start` not
//! called) is a cluster of one: every chunk's only owner is itself.

mod commit;
mod handler;
pub mod lease;
pub mod membership;
pub mod placement;
mod records;
mod repair;
mod sync;

use std::{
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use bytes::Bytes;
use tokio::sync::watch;

pub use lease::{Copies, UploadLease};
pub use membership::{MemberState, MemberView, Membership};
pub use records::PushOutcome;
pub use sync::ForgetError;

use crate::{
    chunks::{ChunkError, Chunks},
    crypto::{ChunkId, HEADER_LEN, Keys},
    identity::NodeKey,
    index::Index,
    p2p::{self, Identity, Limits, PeerPool},
    proto::{GetChunk, PeerMessage, PutChunk, peer_message::Kind},
};

/// Records pushed or pulled per index message.
const SYNC_PAGE: usize = 500;

fn unreached_note(unreached: usize) -> String {
    match unreached {
        0 => String::new(),
        n => format!(" ({n} member(s) not heard from, which may hold it)"),
    }
}

/// Errors the cluster reports to the node.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Fewer nodes took a chunk than the write rule requires.
    #[error("chunk {id} is durable on {copies} node(s), {required} required: {reasons}")]
    TooFewCopies {
        id: ChunkId,
        copies: usize,
        required: usize,
        reasons: String,
    },
    /// No node that answered holds a chunk that verifies. `unreached`
    /// members (down, unreachable, or failing the request) were not heard:
    /// while any is, the chunk may well be safe on it, so the error is
    /// transient (UNAVAILABLE); with every member heard it is lost
    /// (DATA_LOSS).
    #[error("no node holds a verified copy of chunk {id}: {reasons}{}", unreached_note(*.unreached))]
    ChunkUnavailable {
        id: ChunkId,
        reasons: String,
        unreached: usize,
    },
    /// The local store refused a write for lack of space, or a write fell
    /// short of the write rule because an owner's disk is full.
    #[error("{0}")]
    DiskFull(String),
    /// The node cannot accept writes now (too few members reachable for
    /// the write rule, or its clock disagrees with theirs).
    #[error("{0}")]
    NotWritable(String),
    /// A record (object or tombstone) is durable on fewer nodes than the
    /// write rule requires. It is on this node, and may still reach the
    /// others (whole) through index sync.
    #[error("the record is durable on {copies} node(s), {required} required: {reasons}")]
    RecordNotDurable {
        copies: usize,
        required: usize,
        reasons: String,
    },
    /// A peer could not be reached or broke the exchange off.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The node that answered at a member's address proved to be another
    /// node: nothing it said counts for the member.
    #[error("the address of member {member} answers as node {answered}")]
    WrongNode { member: String, answered: String },
    #[error("{0}")]
    Internal(String),
}

/// How the cluster part of a node is configured.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Address to accept peer connections on.
    pub listen_addr: String,
    /// Address peers should use to reach this node (default: the bound one).
    pub advertise_addr: Option<String>,
    /// Bootstrap peers: `host:port`; a name that resolves to several
    /// addresses counts as several peers.
    pub peers: Vec<String>,
    /// Copies of every chunk (R), capped at the cluster size.
    pub replicas: usize,
    /// Copies an upload waits for (W); `None` applies the default rule.
    pub write_quorum: Option<usize>,
    /// A member silent this long is down.
    pub dead_after: Duration,
    /// How often each peer's index is pulled in full.
    pub sync_interval: Duration,
    /// How often the repair pass runs.
    pub repair_interval: Duration,
    /// Repair transfer budget, bytes per second.
    pub repair_rate: u64,
    /// Largest sealed chunk a peer may send.
    pub max_chunk: usize,
    /// Largest difference between this node's clock and its peers' that the
    /// cluster tolerates: records stamped further ahead are refused, and a
    /// node whose clock is further from its peers' refuses writes.
    pub max_clock_skew: Duration,
    /// How long a lease of an upload in progress holds without renewal.
    pub lease_ttl: Duration,
    /// Longest a peer request may take (connect, handshake, request, reply)
    /// before the peer counts as failed for it.
    pub peer_timeout: Duration,
}

impl ClusterConfig {
    /// Defaults for everything but the listen address.
    pub fn new(listen_addr: String) -> Self {
        Self {
            listen_addr,
            advertise_addr: None,
            peers: Vec::new(),
            replicas: 3,
            write_quorum: None,
            dead_after: Duration::from_secs(30),
            sync_interval: Duration::from_secs(60),
            repair_interval: Duration::from_secs(60),
            repair_rate: 256 << 20,
            max_chunk: crate::config::MAX_CHUNK_SIZE + HEADER_LEN,
            max_clock_skew: Duration::from_secs(60),
            lease_ttl: Duration::from_secs(60),
            peer_timeout: Duration::from_secs(10),
        }
    }
}

/// The cluster state of one node.
pub struct Cluster {
    node_id: String,
    /// The static key the peer channel proves; `node_id` is derived from it.
    key: NodeKey,
    /// What request bodies from peers are paid from (the node's budget).
    body_budget: OnceLock<Arc<dyn p2p::BodyBudget>>,
    cfg: ClusterConfig,
    keys: Keys,
    chunks: Arc<Chunks>,
    index: Arc<Index>,
    membership: Membership,
    /// Set by `start`, once the advertised address is known.
    pool: OnceLock<PeerPool>,
    advertised: OnceLock<String>,
    repair: repair::RepairState,
    sync: sync::SyncRequests,
}

impl Cluster {
    /// A cluster of one until `start` is called.
    pub fn new(
        key: NodeKey,
        cfg: ClusterConfig,
        keys: Keys,
        chunks: Arc<Chunks>,
        index: Arc<Index>,
        members_file: Option<std::path::PathBuf>,
    ) -> Self {
        let node_id = key.node_id().to_owned();
        Self {
            membership: Membership::load(&node_id, cfg.dead_after, members_file),
            node_id,
            key,
            body_budget: OnceLock::new(),
            cfg,
            keys,
            chunks,
            index,
            pool: OnceLock::new(),
            advertised: OnceLock::new(),
            repair: repair::RepairState::default(),
            sync: sync::SyncRequests::default(),
        }
    }

    /// Binds the peer port, then runs the peer server, the membership,
    /// index-sync and repair loops until `shutdown` turns true. Returns the
    /// bound address.
    pub async fn start(
        self: &Arc<Self>,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(&self.cfg.listen_addr)
            .await
            .map_err(|e| {
                anyhow::anyhow!("cannot listen for peers on {}: {e}", self.cfg.listen_addr)
            })?;
        let local = listener.local_addr()?;
        let advertised = self
            .cfg
            .advertise_addr
            .clone()
            .unwrap_or_else(|| local.to_string());
        let identity = || Identity {
            key: self.key.clone(),
            advertised_addr: advertised.clone(),
        };
        let limits = Limits {
            max_body: self.cfg.max_chunk,
            request_timeout: self.cfg.peer_timeout,
            connect_timeout: Limits::default().connect_timeout.min(self.cfg.peer_timeout),
            ..Limits::default()
        };
        let _ = self.advertised.set(advertised.clone());
        let _ = self
            .pool
            .set(PeerPool::new(identity(), self.keys.clone(), limits.clone()));
        let handler = Arc::new(handler::PeerService::new(self.clone()));
        tokio::spawn(p2p::serve(
            listener,
            identity(),
            self.keys.clone(),
            limits,
            handler,
            self.body_budget.get().cloned(),
            shutdown.clone(),
        ));
        tokio::spawn(self.clone().membership_loop(shutdown.clone()));
        tokio::spawn(self.clone().sync_loop(shutdown.clone()));
        tokio::spawn(self.clone().repair_loop(shutdown));
        tracing::info!(p2p = %local, advertised = %advertised, peers = ?self.cfg.peers, "peer protocol listening");
        Ok(local)
    }

    /// Pays request bodies received from peers from `budget` (set once,
    /// before `start`).
    pub fn set_body_budget(&self, budget: Arc<dyn p2p::BodyBudget>) {
        let _ = self.body_budget.set(budget);
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The address peers reach this node at (empty before `start`).
    pub fn advertised_addr(&self) -> &str {
        self.advertised.get().map(String::as_str).unwrap_or("")
    }

    /// Every other known member.
    pub fn peers(&self) -> Vec<MemberView> {
        self.membership.peers()
    }

    /// Chunks waiting for repair on this node.
    pub fn repair_backlog(&self) -> u64 {
        self.repair.backlog(&self.index)
    }

    fn pool(&self) -> Option<&PeerPool> {
        self.pool.get()
    }

    /// Whether this node runs alone by design: no peers configured, none
    /// remembered or heard of. Only then do R and W fall to 1; a node that
    /// was told it is part of a cluster applies the configured rule even
    /// while it cannot reach anyone.
    pub fn standalone(&self) -> bool {
        self.cfg.peers.is_empty() && self.membership.size() == 1
    }

    /// R for this cluster: the configured replica count (1 when standalone).
    pub fn replicas(&self) -> usize {
        if self.standalone() {
            1
        } else {
            self.cfg.replicas.max(1)
        }
    }

    /// Copies a write must reach: W = R while R members are up; with
    /// fewer up, every live member takes a copy and a majority of R must.
    /// `--write-quorum` sets W explicitly.
    pub fn write_quorum(&self) -> usize {
        let r = self.replicas();
        if let Some(w) = self.cfg.write_quorum {
            return w.clamp(1, r);
        }
        let live = self.membership.live_ids().len();
        if live >= r { r } else { r / 2 + 1 }
    }

    /// Whether a write could succeed now; `Err` says why not. Checked before
    /// anything of a write is stored, and by health checking.
    pub fn writable(&self) -> Result<(), String> {
        let live = self.membership.live_ids().len();
        let w = self.write_quorum();
        if live < w {
            return Err(format!(
                "{live} of the {w} nodes the write rule needs are reachable (R={}); \
                 nothing was stored",
                self.replicas()
            ));
        }
        self.clock_agrees()
    }

    /// Live members ranked for `id`, best first.
    pub fn ranked_live(&self, id: &ChunkId) -> Vec<String> {
        let live = self.membership.live_ids();
        placement::rank(id, live.iter().map(String::as_str))
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    /// The chunk's owners: the first R live members in its ranking.
    pub fn owners(&self, id: &ChunkId) -> Vec<String> {
        let mut ranked = self.ranked_live(id);
        ranked.truncate(self.replicas());
        ranked
    }

    /// Makes a sealed chunk durable on its owners: R copies in parallel, a
    /// failed member replaced by the next in rank. Succeeds only with at
    /// least W verified copies, each on a member that proved its identity.
    /// Returns the ids of the nodes that hold it. `lease` (the upload's) is
    /// granted to every holder before its copy is written.
    pub async fn replicate(
        &self,
        id: ChunkId,
        sealed: Bytes,
        lease: Option<&UploadLease>,
    ) -> Result<Vec<String>, ClusterError> {
        let r = self.replicas();
        let mut candidates = self.ranked_live(&id).into_iter();
        let mut holders = Vec::new();
        let mut reasons = Vec::new();
        let mut running = tokio::task::JoinSet::new();
        let mut disk_full = None;
        let grant = lease.map(UploadLease::grant);
        loop {
            while holders.len() + running.len() < r {
                let Some(member) = candidates.next() else {
                    break;
                };
                if let Some(lease) = lease {
                    lease.add_holder(&member);
                }
                let this = self.clone_for_task();
                let (body, grant) = (sealed.clone(), grant.clone());
                running.spawn(async move {
                    let result = this.put_on(&member, id, body, grant).await;
                    (member, result)
                });
            }
            let Some(done) = running.join_next().await else {
                break;
            };
            match done {
                Ok((member, Ok(()))) => {
                    if member != self.node_id {
                        crate::metrics::replicated();
                    }
                    holders.push(member)
                }
                Ok((member, Err(e))) => {
                    crate::metrics::replica_failed();
                    self.replica_write_failed(&member, &e);
                    if let ClusterError::DiskFull(msg) = &e {
                        disk_full.get_or_insert(msg.clone());
                    }
                    tracing::warn!(chunk = %id, member = %member, error = %e, "replica write failed; trying the next member");
                    reasons.push(format!("{member}: {e}"));
                }
                Err(e) => reasons.push(format!("write task: {e}")),
            }
        }
        // W is decided after the attempts: a member found unreachable during
        // them is down now, which can lower W to a majority of R.
        let w = self.write_quorum();
        if holders.len() >= w {
            return Ok(holders);
        }
        if let Some(msg) = disk_full {
            return Err(ClusterError::DiskFull(format!(
                "chunk {id} is durable on {} node(s), {w} required: an owner's disk is full ({msg})",
                holders.len()
            )));
        }
        Err(ClusterError::TooFewCopies {
            id,
            copies: holders.len(),
            required: w,
            reasons: if reasons.is_empty() {
                "not enough live members".into()
            } else {
                reasons.join("; ")
            },
        })
    }

    /// Reacts to a failed replica write: a member that cannot be reached is
    /// down at once (without this every chunk of every upload would wait out
    /// a connect timeout until `dead_after` passes; a ping that succeeds
    /// brings it back), and one whose address answers as another node is
    /// retired.
    fn replica_write_failed(&self, member: &str, e: &ClusterError) {
        match e {
            ClusterError::Unreachable(_) if self.membership.suspect(member) => {
                tracing::warn!(member = %member, "member unreachable during a write; down until it answers a ping");
                self.repair.kick();
            }
            ClusterError::WrongNode { answered, .. } if self.membership.retire(member) => {
                tracing::warn!(member = %member, answered = %answered,
                    "member's address answers as another node; retired");
                self.repair.kick();
            }
            _ => {}
        }
    }

    /// A cheap handle for spawned tasks.
    fn clone_for_task(&self) -> ChunkWriter {
        ChunkWriter {
            self_id: self.node_id.clone(),
            chunks: self.chunks.clone(),
            pool: self.pool().cloned(),
            addr: self
                .membership
                .peers()
                .into_iter()
                .map(|m| (m.node_id, m.addr))
                .collect(),
        }
    }

    /// Fetches a chunk from peers: owners in rank order first, then every
    /// other live member. Returns the sealed bytes, verified.
    pub async fn fetch(&self, id: ChunkId) -> Result<Bytes, ClusterError> {
        let chunks = self.chunks.clone();
        self.fetch_checked(id, move |sealed: Bytes| {
            chunks.verify_fetched(&id, &sealed).map(|()| sealed)
        })
        .await
    }

    /// Like [`Cluster::fetch`], but `check` does the verification (and may
    /// keep what it computed doing it, such as the plaintext, so a reader
    /// does not decrypt twice). A copy `check` refuses counts as bad and the
    /// next member is tried. `check` runs on a blocking thread.
    pub async fn fetch_checked<T, F>(&self, id: ChunkId, check: F) -> Result<T, ClusterError>
    where
        T: Send + 'static,
        F: Fn(Bytes) -> Result<T, crate::crypto::CryptoError> + Send + Sync + 'static,
    {
        let check = Arc::new(check);
        let Some(pool) = self.pool() else {
            return Err(ClusterError::ChunkUnavailable {
                id,
                reasons: "not stored on this node, which has no peers".into(),
                unreached: 0,
            });
        };
        let mut reasons = Vec::new();
        let ranked = self.ranked_live(&id);
        // Members not up are not asked: they are not heard.
        let mut unreached = self.membership.size().saturating_sub(ranked.len());
        for member in ranked.into_iter().filter(|m| *m != self.node_id) {
            let Some(addr) = self.membership.addr_of(&member) else {
                unreached += 1;
                continue;
            };
            let msg = PeerMessage {
                has_body: false,
                kind: Some(Kind::GetChunk(GetChunk {
                    chunk_id: id.0.to_vec().into(),
                })),
            };
            match pool.request(&addr, msg, None).await {
                Ok(reply) => match (reply.msg.kind, reply.body) {
                    (Some(Kind::GetChunkReply(r)), Some(body)) if r.found => {
                        let check = check.clone();
                        let verified = tokio::task::spawn_blocking(move || check(body))
                            .await
                            .map_err(|e| ClusterError::Internal(e.to_string()))?;
                        match verified {
                            Ok(value) => return Ok(value),
                            Err(e) => {
                                crate::metrics::verification_failed(
                                    crate::metrics::BadCopy::Fetched,
                                );
                                tracing::warn!(chunk = %id, member = %member, error = %e, "peer sent a chunk that does not verify");
                                reasons.push(format!("{member}: {e}"));
                            }
                        }
                    }
                    (Some(Kind::GetChunkReply(_)), _) => {
                        reasons.push(format!("{member}: not held"))
                    }
                    (Some(Kind::Error(e)), _) => {
                        unreached += 1;
                        reasons.push(format!("{member}: {}", e.message))
                    }
                    _ => {
                        unreached += 1;
                        reasons.push(format!("{member}: unexpected reply"))
                    }
                },
                Err(e) => {
                    unreached += 1;
                    reasons.push(format!("{member}: {e}"))
                }
            }
        }
        Err(ClusterError::ChunkUnavailable {
            id,
            reasons: if reasons.is_empty() {
                "no live peers".into()
            } else {
                reasons.join("; ")
            },
            unreached,
        })
    }
}

/// What a replica write task needs, detached from the cluster's lifetime.
struct ChunkWriter {
    self_id: String,
    chunks: Arc<Chunks>,
    pool: Option<PeerPool>,
    addr: std::collections::HashMap<String, String>,
}

impl ChunkWriter {
    /// Writes a copy on `member` (this node included). It counts only if the
    /// node that answered proved to be `member` and reports a verified copy.
    async fn put_on(
        &self,
        member: &str,
        id: ChunkId,
        sealed: Bytes,
        lease: Option<crate::proto::Lease>,
    ) -> Result<(), ClusterError> {
        if member == self.self_id {
            let chunks = self.chunks.clone();
            return tokio::task::spawn_blocking(move || chunks.put_sealed(&id, &sealed))
                .await
                .map_err(|e| ClusterError::Internal(e.to_string()))?
                .map(|_| ())
                .map_err(|e| match e {
                    ChunkError::DiskFull(m) => ClusterError::DiskFull(m),
                    other => ClusterError::Internal(other.to_string()),
                });
        }
        let (Some(pool), Some(addr)) = (&self.pool, self.addr.get(member)) else {
            return Err(ClusterError::Internal(format!(
                "no address for member {member}"
            )));
        };
        let msg = PeerMessage {
            has_body: true,
            kind: Some(Kind::PutChunk(PutChunk {
                chunk_id: id.0.to_vec().into(),
                lease,
            })),
        };
        let reply = ask_member(pool, member, addr, msg, Some(sealed)).await?;
        match reply.msg.kind {
            Some(Kind::PutChunkReply(r)) if r.stored => Ok(()),
            Some(Kind::Error(e)) if e.code == code::RESOURCE_EXHAUSTED => {
                Err(ClusterError::DiskFull(e.message))
            }
            Some(Kind::Error(e)) => Err(ClusterError::Internal(e.message)),
            _ => Err(ClusterError::Internal(
                "unexpected reply to PutChunk".into(),
            )),
        }
    }
}

/// Sends a request to `member` at `addr` and returns the reply only if the
/// peer that answered proved to be `member`: nothing another node says at
/// a member's address counts for that member (a node replaced on the same
/// address, say).
pub(super) async fn ask_member(
    pool: &PeerPool,
    member: &str,
    addr: &str,
    msg: PeerMessage,
    body: Option<Bytes>,
) -> Result<p2p::Reply, ClusterError> {
    let reply = pool
        .request(addr, msg, body)
        .await
        .map_err(|e| ClusterError::Unreachable(e.to_string()))?;
    if reply.peer.node_id != member {
        return Err(ClusterError::WrongNode {
            member: member.to_owned(),
            answered: reply.peer.node_id,
        });
    }
    Ok(reply)
}

/// `google.rpc.Code` values carried in `PeerError.code`.
pub mod code {
    pub const INVALID_ARGUMENT: u32 = 3;
    pub const FAILED_PRECONDITION: u32 = 9;
    pub const NOT_FOUND: u32 = 5;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const INTERNAL: u32 = 13;
    pub const DATA_LOSS: u32 = 15;
}
