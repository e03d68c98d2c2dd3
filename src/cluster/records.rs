//! Object records between nodes: pushing one to a peer, accepting a peer's
//! (validated exactly like a client's), and moving out-of-line chunk lists.
//!
//! A record travels in its stored form: a chunk list longer than the inline
//! limit is replaced by its count and SHA-256 digest, so every record fits a
//! message. The receiver fetches such a list from the sender in pages
//! (`GetChunkList`, at most [`LIST_PAGE_IDS`] ids each), stages it, and
//! applies the record only once the whole list is there and matches the
//! digest: a node never holds a record whose chunks it cannot name.

use bytes::Bytes;

use super::{Cluster, ClusterError, code};
use crate::{
    index::{IndexError, LIST_PAGE_IDS, ListDigest, StagedList},
    proto::{
        GetChunkList, GetChunkListReply, IndexUpdate, ObjectRecord, PeerMessage, RecordOutcome,
        peer_message::Kind,
    },
};

/// Bytes of records per `IndexSync` reply (plus one record, at most
/// `index::MAX_RECORD_LEN`): a quarter of the peer MESSAGE cap.
pub(super) const SYNC_PAGE_BYTES: usize = crate::index::PAGE_BYTES;

/// What a peer did with a record pushed to it; either way the record (or a
/// newer version of its key) is durable there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// The record was newer than the peer's and is now applied.
    Applied,
    /// The peer already held this version or a newer one.
    Current,
}

/// What the local apply step decided.
enum Local {
    Done(RecordOutcome),
    /// The record's out-of-line list must be fetched first.
    NeedsList(Box<ObjectRecord>, ListDigest),
}

impl Cluster {
    /// Sends one record to `member` at `addr` (`IndexUpdate`) and reports
    /// whether it is now durable there; an answer counts only if the peer
    /// proved to be `member`. An out-of-line list is fetched by the peer from
    /// this node before it answers, so the record must be committed in this
    /// node's index first.
    pub async fn push_record(
        &self,
        member: &str,
        addr: &str,
        record: &ObjectRecord,
    ) -> Result<PushOutcome, ClusterError> {
        let pool = self
            .pool()
            .ok_or_else(|| ClusterError::Unreachable("the peer protocol is not started".into()))?;
        let msg = PeerMessage {
            has_body: false,
            kind: Some(Kind::IndexUpdate(IndexUpdate {
                records: vec![record.header_form(self.index.inline_limit())],
            })),
        };
        let reply = super::ask_member(pool, member, addr, msg, None).await?;
        let outcome = match reply.msg.kind {
            Some(Kind::IndexUpdateReply(r)) => r.outcomes.first().copied(),
            Some(Kind::Error(e)) => return Err(ClusterError::Internal(e.message)),
            _ => None,
        };
        match outcome.map(RecordOutcome::try_from) {
            Some(Ok(RecordOutcome::Applied)) => Ok(PushOutcome::Applied),
            Some(Ok(RecordOutcome::Current)) => Ok(PushOutcome::Current),
            Some(Ok(RecordOutcome::Failed)) => Err(ClusterError::Unreachable(format!(
                "{addr} could not apply the record for {:?} yet",
                record.key
            ))),
            Some(Ok(RecordOutcome::Refused)) => Err(ClusterError::Internal(format!(
                "{addr} refused the record for {:?} (malformed, or stamped ahead of its clock)",
                record.key
            ))),
            _ => Err(ClusterError::Internal(format!(
                "{addr} gave no outcome for the record for {:?}",
                record.key
            ))),
        }
    }

    /// Accepts one record a peer at `from` sent (push, sync or lookup):
    /// checked like client input, applied if newer, its out-of-line list
    /// fetched from `from` when this node does not hold it.
    pub(super) async fn accept_record(&self, from: &str, record: ObjectRecord) -> RecordOutcome {
        if let Err(e) = record.validate() {
            tracing::warn!(peer = %from, key = %record.key.escape_debug(), error = %e,
                "refused a peer's record that breaks the record rules");
            return RecordOutcome::Refused;
        }
        if let Err(e) = super::commit::check_clock(&record, self.version_horizon()) {
            tracing::warn!(peer = %from, key = %record.key.escape_debug(), error = %e,
                "refused a peer's record stamped in the future");
            return RecordOutcome::Refused;
        }
        let index = self.index.clone();
        let key = record.key.clone();
        let local = tokio::task::spawn_blocking(move || {
            if index.is_current(&record)? {
                return Ok(Local::Done(RecordOutcome::Current));
            }
            match index.apply(&record) {
                Ok(true) => Ok(Local::Done(RecordOutcome::Applied)),
                Ok(false) => Ok(Local::Done(RecordOutcome::Current)),
                Err(IndexError::MissingList(d)) => Ok(Local::NeedsList(Box::new(record), d)),
                Err(e) => Err(e),
            }
        })
        .await;
        let (record, digest) = match local {
            Ok(Ok(Local::Done(outcome))) => return outcome,
            Ok(Ok(Local::NeedsList(record, digest))) => (record, digest),
            Ok(Err(e)) => return failed(from, &key, &e.to_string()),
            Err(e) => return failed(from, &key, &e.to_string()),
        };
        let staged = match self
            .fetch_list(from, digest, record.chunk_count() as u64)
            .await
        {
            Ok(staged) => staged,
            Err(e) => return failed(from, &record.key, &e),
        };
        let index = self.index.clone();
        match tokio::task::spawn_blocking(move || index.apply_staged(&record, staged)).await {
            Ok(Ok(true)) => RecordOutcome::Applied,
            Ok(Ok(false)) => RecordOutcome::Current,
            Ok(Err(e)) => failed(from, &key, &e.to_string()),
            Err(e) => failed(from, &key, &e.to_string()),
        }
    }

    /// Fetches list `digest` of `count` ids from the peer at `from`, page by
    /// page into staging, and verifies it against the digest.
    async fn fetch_list(
        &self,
        from: &str,
        digest: ListDigest,
        count: u64,
    ) -> Result<StagedList, String> {
        let pool = self.pool().ok_or("the peer protocol is not started")?;
        let mut stager = self.index.stage_list(digest, count);
        while stager.received() < count {
            let msg = PeerMessage {
                has_body: false,
                kind: Some(Kind::GetChunkList(GetChunkList {
                    list_sha256: digest.to_vec().into(),
                    offset: stager.received(),
                    limit: LIST_PAGE_IDS as u32,
                })),
            };
            let reply = pool
                .request(from, msg, None)
                .await
                .map_err(|e| e.to_string())?;
            let ids = match reply.msg.kind {
                Some(Kind::GetChunkListReply(r)) if r.found && !r.chunk_ids.is_empty() => {
                    r.chunk_ids
                }
                Some(Kind::GetChunkListReply(r)) if r.found => {
                    return Err(format!("the list ended after {} ids", stager.received()));
                }
                Some(Kind::GetChunkListReply(_)) => {
                    return Err("the peer no longer holds the chunk list".into());
                }
                Some(Kind::Error(e)) => return Err(e.message),
                _ => return Err("unexpected reply to GetChunkList".into()),
            };
            stager = tokio::task::spawn_blocking(move || stager.append(&ids).map(|()| stager))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        tokio::task::spawn_blocking(move || stager.finish())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    /// Answers `GetChunkList` from this node's index.
    pub(super) async fn serve_chunk_list(&self, ask: GetChunkList) -> (PeerMessage, Option<Bytes>) {
        let Ok(digest) = ListDigest::try_from(ask.list_sha256.as_ref()) else {
            return super::handler::error(code::INVALID_ARGUMENT, "list digest must be 32 bytes");
        };
        let index = self.index.clone();
        let max = (ask.limit as usize).clamp(1, LIST_PAGE_IDS);
        let read =
            tokio::task::spawn_blocking(move || index.read_list(&digest, ask.offset, max)).await;
        let reply = match read {
            Ok(Ok(Some(ids))) => GetChunkListReply {
                found: true,
                chunk_ids: ids.into(),
            },
            Ok(Ok(None)) => GetChunkListReply::default(),
            Ok(Err(e)) => return super::handler::error(code::INTERNAL, e.to_string()),
            Err(e) => return super::handler::error(code::INTERNAL, e.to_string()),
        };
        super::handler::reply(Kind::GetChunkListReply(reply))
    }
}

/// Logs a record that could not be applied for now and says so.
fn failed(from: &str, key: &str, why: &str) -> RecordOutcome {
    tracing::warn!(peer = %from, key = %key.escape_debug(), error = %why,
        "cannot apply a peer's record yet; a later sync retries");
    RecordOutcome::Failed
}

#[cfg(test)]
mod tests {
    use crate::{index::MAX_RECORD_LEN, p2p::frame::MAX_MESSAGE_LEN};

    use super::*;

    /// Every index message stays far below the peer MESSAGE cap: a sync page
    /// of records plus one more record, or a page of list ids.
    #[test]
    fn index_pages_fit_the_message_cap() {
        const { assert!(SYNC_PAGE_BYTES + MAX_RECORD_LEN + 1024 <= MAX_MESSAGE_LEN / 2) };
        const { assert!(LIST_PAGE_IDS * 20 + 1024 <= MAX_MESSAGE_LEN / 8) };
    }
}
