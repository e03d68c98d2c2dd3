//! The answers this node gives to its peers' requests.

use std::sync::Arc;

use bytes::Bytes;

use super::{
    Cluster, code,
    membership::{Change, Contact},
};
use crate::{
    chunks::ChunkError,
    crypto::ChunkId,
    p2p::{PeerHandler, PeerInfo},
    proto::{
        GetChunkReply, GetRecordReply, HasChunksReply, IndexSyncReply, IndexUpdateReply, Lease,
        PeerError, PeerMessage, Pong, PutChunkReply, RecordOutcome, RenewLeasesReply, get_record,
        peer_message::Kind,
    },
};

/// Serves peer requests from this node's store and index.
pub struct PeerService {
    cluster: Arc<Cluster>,
}

impl PeerService {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Self { cluster }
    }
}

pub(super) fn reply(kind: Kind) -> (PeerMessage, Option<Bytes>) {
    (
        PeerMessage {
            has_body: false,
            kind: Some(kind),
        },
        None,
    )
}

pub(super) fn error(code: u32, message: impl Into<String>) -> (PeerMessage, Option<Bytes>) {
    reply(Kind::Error(PeerError {
        code,
        message: message.into(),
    }))
}

fn bad_chunk_id() -> (PeerMessage, Option<Bytes>) {
    error(code::INVALID_ARGUMENT, "chunk id must be 20 bytes")
}

impl PeerHandler for PeerService {
    async fn handle(
        &self,
        peer: &PeerInfo,
        msg: PeerMessage,
        body: Option<Bytes>,
    ) -> (PeerMessage, Option<Bytes>) {
        let c = &self.cluster;
        // Any authenticated request is a sign of life.
        let contact = match &msg.kind {
            Some(Kind::Ping(p)) => Contact {
                usage: Some((p.chunk_count, p.bytes_stored)),
                // One way: the ping's send time against our receive time.
                clock_offset_ms: (p.unix_ms > 0)
                    .then(|| p.unix_ms as i64 - crate::units::unix_ms() as i64),
            },
            _ => Contact::default(),
        };
        match c
            .membership
            .observe(&peer.node_id, &peer.advertised_addr, contact)
        {
            Change::None => {}
            Change::Refused => {
                tracing::warn!(peer = %peer.node_id, "a forgotten node tried to take part; refused");
                return error(
                    code::FAILED_PRECONDITION,
                    "this node was removed from the cluster (dfs members forget); \
                     it needs a fresh data directory to rejoin",
                );
            }
            Change::Joined | Change::Recovered => {
                c.member_appeared(&peer.node_id, &peer.advertised_addr)
            }
        }
        match msg.kind {
            Some(Kind::Ping(p)) => {
                c.learn_from_peer(&peer.node_id, &p.members, &p.forgotten);
                let (chunk_count, bytes_stored) = c.chunks.store().usage();
                reply(Kind::Pong(Pong {
                    members: c.membership.for_exchange(c.advertised_addr()),
                    chunk_count,
                    bytes_stored,
                    forgotten: c.membership.forgotten(),
                    unix_ms: crate::units::unix_ms(),
                }))
            }
            Some(Kind::RenewLeases(r)) => {
                let held = c.hold_leases(&r.leases);
                reply(Kind::RenewLeasesReply(RenewLeasesReply { held }))
            }
            Some(Kind::PutChunk(p)) => {
                let Some(id) = ChunkId::from_slice(&p.chunk_id) else {
                    return bad_chunk_id();
                };
                let Some(sealed) = body else {
                    return error(code::INVALID_ARGUMENT, "PutChunk needs a body");
                };
                // The lease first: from now on the collector spares the copy.
                if let Some(lease) = &p.lease {
                    c.hold_leases(std::slice::from_ref(lease));
                }
                let chunks = c.chunks.clone();
                // Verified before it becomes durable (and an existing copy
                // only counts if it verifies): a bad copy never counts.
                let result = tokio::task::spawn_blocking(move || {
                    chunks.put_received(&id, &sealed).map_err(|e| match e {
                        ChunkError::DiskFull(m) => (code::RESOURCE_EXHAUSTED, m),
                        ChunkError::Corrupt { .. } => {
                            (code::DATA_LOSS, format!("refused chunk {id}: {e}"))
                        }
                        other => (code::INTERNAL, other.to_string()),
                    })
                })
                .await;
                match result {
                    Ok(Ok(_)) => reply(Kind::PutChunkReply(PutChunkReply { stored: true })),
                    Ok(Err((code, message))) => error(code, message),
                    Err(e) => error(code::INTERNAL, e.to_string()),
                }
            }
            Some(Kind::GetChunk(g)) => {
                let Some(id) = ChunkId::from_slice(&g.chunk_id) else {
                    return bad_chunk_id();
                };
                match c.read_verified(id).await {
                    Some(sealed) => (
                        PeerMessage {
                            has_body: true,
                            kind: Some(Kind::GetChunkReply(GetChunkReply { found: true })),
                        },
                        Some(sealed),
                    ),
                    None => reply(Kind::GetChunkReply(GetChunkReply { found: false })),
                }
            }
            Some(Kind::HasChunks(h)) => {
                let chunks = c.chunks.clone();
                let present = tokio::task::spawn_blocking(move || {
                    h.chunk_ids
                        .iter()
                        .map(|raw| {
                            ChunkId::from_slice(raw).is_some_and(|id| chunks.holds(&id, h.verify))
                        })
                        .collect()
                })
                .await
                .unwrap_or_default();
                reply(Kind::HasChunksReply(HasChunksReply { present }))
            }
            Some(Kind::IndexUpdate(u)) => {
                // An out-of-line chunk list is fetched from the sender.
                let outcomes = c.apply_records(&peer.advertised_addr, u.records).await;
                let applied = outcomes
                    .iter()
                    .filter(|o| **o == RecordOutcome::Applied)
                    .count() as u32;
                let outcomes = outcomes.into_iter().map(|o| o as i32).collect();
                reply(Kind::IndexUpdateReply(IndexUpdateReply {
                    applied,
                    outcomes,
                }))
            }
            Some(Kind::GetChunkList(g)) => c.serve_chunk_list(g).await,
            Some(Kind::IndexSync(s)) => {
                let index = c.index.clone();
                let limit = (s.limit as usize).clamp(1, super::SYNC_PAGE);
                let after = (!s.after_key.is_empty()).then_some(s.after_key);
                let page = tokio::task::spawn_blocking(move || {
                    index.records_after(after.as_deref(), limit, super::records::SYNC_PAGE_BYTES)
                })
                .await;
                match page {
                    Ok(Ok((records, more))) => {
                        reply(Kind::IndexSyncReply(IndexSyncReply { records, more }))
                    }
                    Ok(Err(e)) => error(code::INTERNAL, e.to_string()),
                    Err(e) => error(code::INTERNAL, e.to_string()),
                }
            }
            Some(Kind::GetRecord(g)) => {
                let index = c.index.clone();
                let found = tokio::task::spawn_blocking(move || match g.target {
                    Some(get_record::Target::Key(k)) => index.get(&k),
                    Some(get_record::Target::Sha1(s)) => match <[u8; 20]>::try_from(s.as_ref()) {
                        Ok(sha1) => index.get_by_sha1(&sha1),
                        Err(_) => Ok(None),
                    },
                    None => Ok(None),
                })
                .await;
                match found {
                    Ok(Ok(record)) => reply(Kind::GetRecordReply(GetRecordReply { record })),
                    Ok(Err(e)) => error(code::INTERNAL, e.to_string()),
                    Err(e) => error(code::INTERNAL, e.to_string()),
                }
            }
            other => error(
                code::INVALID_ARGUMENT,
                format!(
                    "not a request this node answers: {:?}",
                    other.map(|k| kind_name(&k))
                ),
            ),
        }
    }
}

fn kind_name(kind: &Kind) -> &'static str {
    match kind {
        Kind::Hello(_) => "Hello",
        Kind::Auth(_) => "Auth",
        Kind::Pong(_) => "Pong",
        Kind::PutChunkReply(_) => "PutChunkReply",
        Kind::GetChunkReply(_) => "GetChunkReply",
        Kind::HasChunksReply(_) => "HasChunksReply",
        Kind::IndexUpdateReply(_) => "IndexUpdateReply",
        Kind::IndexSyncReply(_) => "IndexSyncReply",
        Kind::GetRecordReply(_) => "GetRecordReply",
        Kind::GetChunkListReply(_) => "GetChunkListReply",
        Kind::Error(_) => "Error",
        _ => "request",
    }
}

impl Cluster {
    /// Reads a local chunk and verifies it; a copy that fails is moved to
    /// quarantine (repair later restores a good one) and reported absent.
    pub async fn read_verified(&self, id: ChunkId) -> Option<Bytes> {
        let chunks = self.chunks.clone();
        match tokio::task::spawn_blocking(move || chunks.read_verified(&id)).await {
            Ok(Ok(sealed)) => Some(Bytes::from(sealed)),
            _ => None,
        }
    }

    /// Holds (or renews) leases a gateway granted on this node.
    /// Holds each lease; says for each whether it was already in force (a
    /// malformed id is never held).
    fn hold_leases(&self, leases: &[Lease]) -> Vec<bool> {
        let max_ttl = self.cfg.lease_ttl.max(std::time::Duration::from_secs(60));
        leases
            .iter()
            .map(|lease| {
                let Ok(id) = <[u8; 16]>::try_from(lease.id.as_ref()) else {
                    return false;
                };
                let ttl = std::time::Duration::from_millis(lease.ttl_ms).min(max_ttl);
                let age = std::time::Duration::from_millis(lease.age_ms);
                self.chunks.leases().hold(id, age, ttl)
            })
            .collect()
    }
}
