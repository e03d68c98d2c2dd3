//! The answers this node gives to its peers' requests.

use std::sync::Arc;

use bytes::Bytes;

use super::{Cluster, code, membership::Change};
use crate::{
    crypto::ChunkId,
    p2p::{PeerHandler, PeerInfo},
    proto::{
        GetChunkReply, GetRecordReply, HasChunksReply, IndexSyncReply, IndexUpdateReply, PeerError,
        PeerMessage, Pong, PutChunkReply, RecordOutcome, get_record, peer_message::Kind,
    },
    store::StoreError,
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
        let usage = match &msg.kind {
            Some(Kind::Ping(p)) => Some((p.chunk_count, p.bytes_stored)),
            _ => None,
        };
        if c.membership
            .observe(&peer.node_id, &peer.advertised_addr, usage)
            != Change::None
        {
            c.member_appeared(&peer.node_id, &peer.advertised_addr);
        }
        match msg.kind {
            Some(Kind::Ping(p)) => {
                for addr in c.membership.learn(&p.members) {
                    tracing::info!(addr = %addr, from = %peer.node_id, "learned of a new member");
                }
                let (chunk_count, bytes_stored) = c.store.usage();
                reply(Kind::Pong(Pong {
                    members: c.membership.for_exchange(c.advertised_addr()),
                    chunk_count,
                    bytes_stored,
                }))
            }
            Some(Kind::PutChunk(p)) => {
                let Some(id) = ChunkId::from_slice(&p.chunk_id) else {
                    return bad_chunk_id();
                };
                let Some(sealed) = body else {
                    return error(code::INVALID_ARGUMENT, "PutChunk needs a body");
                };
                let (keys, store) = (c.keys.clone(), c.store.clone());
                let result = tokio::task::spawn_blocking(move || {
                    // Verify before the chunk becomes durable: a bad copy
                    // must never count as a replica.
                    keys.verify_sealed(&sealed, &id).map_err(|e| {
                        crate::metrics::verification_failed(crate::metrics::BadCopy::Incoming);
                        (code::DATA_LOSS, format!("refused chunk {id}: {e}"))
                    })?;
                    store.put(&id, &sealed).map_err(|e| match e {
                        StoreError::DiskFull(m) => (code::RESOURCE_EXHAUSTED, m),
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
                let store = c.store.clone();
                let present = tokio::task::spawn_blocking(move || {
                    h.chunk_ids
                        .iter()
                        .map(|raw| {
                            ChunkId::from_slice(raw).is_some_and(|id| {
                                if h.touch {
                                    store.touch(&id)
                                } else {
                                    store.contains(&id)
                                }
                            })
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
        let (store, keys, max) = (self.store.clone(), self.keys.clone(), self.cfg.max_chunk);
        let result = tokio::task::spawn_blocking(move || {
            let sealed = store.read(&id, max)?;
            if let Err(e) = keys.verify_sealed(&sealed, &id) {
                crate::metrics::verification_failed(crate::metrics::BadCopy::Local);
                let _ = store.quarantine(&id);
                tracing::error!(chunk = %id, error = %e, "local chunk failed verification; moved to quarantine");
                return Err(StoreError::Corrupt { id, reason: e.to_string() });
            }
            Ok(Bytes::from(sealed))
        })
        .await;
        match result {
            Ok(Ok(b)) => Some(b),
            _ => None,
        }
    }
}
