//! Records between nodes: committing a write's record (an object or a
//! tombstone) on W nodes before it is acknowledged, applying the records
//! peers send, asking peers for records this node lacks, and the clock
//! agreement that versions rely on.

use std::sync::Arc;

use super::{Cluster, ClusterError, MemberState};
use crate::proto::{
    GetRecord, ObjectRecord, PeerMessage, RecordOutcome, get_record, peer_message::Kind,
};

/// Bits of a version's hybrid clock that count milliseconds (the low 16 are
/// a logical counter; see `index`).
const HLC_MS_SHIFT: u32 = 16;

impl Cluster {
    /// Makes `record` durable on this node and on enough others for the
    /// write rule (W nodes, counted like chunk copies: only members that
    /// proved their identity). Pushes to every live peer; returns as soon as
    /// W nodes hold it, and lets the remaining pushes finish on their own.
    ///
    /// On `RecordNotDurable` the record is still on this node (and on the
    /// peers that took it): index sync spreads it later, whole. That is the
    /// honest outcome of a failed write: no object, or the whole object
    /// later, never part of one.
    pub async fn commit_record(self: &Arc<Self>, record: ObjectRecord) -> Result<(), ClusterError> {
        self.writable().map_err(ClusterError::NotWritable)?;
        let index = self.index.clone();
        let local = record.clone();
        tokio::task::spawn_blocking(move || index.apply(&local))
            .await
            .map_err(|e| ClusterError::Internal(format!("index commit stopped: {e}")))?
            .map_err(|e| ClusterError::Internal(e.to_string()))?;
        let w = self.write_quorum();
        let mut durable = 1;
        let mut reasons = Vec::new();
        let peers: Vec<_> = self
            .membership
            .peers()
            .into_iter()
            .filter(|p| p.state == MemberState::Up)
            .collect();
        let (tx, mut rx) = tokio::sync::mpsc::channel(peers.len().max(1));
        for peer in peers {
            let (this, record, tx) = (self.clone(), record.clone(), tx.clone());
            // Detached: the pushes beyond the first W still deliver the
            // record after the client has its answer.
            tokio::spawn(async move {
                // A push that fetches a long out-of-line list back from this
                // node takes a few requests: allow it a few peer timeouts.
                let pushed = tokio::time::timeout(
                    this.cfg.peer_timeout * 3,
                    this.push_record(&peer.node_id, &peer.addr, &record),
                )
                .await
                .unwrap_or_else(|_| Err(ClusterError::Unreachable("timed out".into())));
                let _ = tx.send((peer.node_id, pushed)).await;
            });
        }
        drop(tx);
        while durable < w {
            let Some((member, pushed)) = rx.recv().await else {
                break;
            };
            match pushed {
                Ok(_) => durable += 1,
                Err(e) => reasons.push(format!("{member}: {e}")),
            }
        }
        if durable >= w {
            return Ok(());
        }
        tracing::warn!(key = %record.key, durable, required = w, "a record did not reach the write quorum; index sync will spread it");
        Err(ClusterError::RecordNotDurable {
            copies: durable,
            required: w,
            reasons: if reasons.is_empty() {
                "not enough live members".into()
            } else {
                reasons.join("; ")
            },
        })
    }

    /// Asks live peers for a record this node does not have (a key or a
    /// SHA-1), applies what they know (last writer wins) and returns
    /// whether anything new was applied.
    pub async fn lookup(&self, target: get_record::Target) -> bool {
        let Some(pool) = self.pool() else {
            return false;
        };
        let mut asks = tokio::task::JoinSet::new();
        for peer in self
            .membership
            .peers()
            .into_iter()
            .filter(|p| p.state == MemberState::Up)
        {
            let (pool, target) = (pool.clone(), target.clone());
            asks.spawn(async move {
                let msg = PeerMessage {
                    has_body: false,
                    kind: Some(Kind::GetRecord(GetRecord {
                        target: Some(target),
                    })),
                };
                (pool.request(&peer.addr, msg, None).await, peer.addr)
            });
        }
        let mut applied = false;
        while let Some(done) = asks.join_next().await {
            if let Ok((Ok(reply), addr)) = done
                && let Some(Kind::GetRecordReply(r)) = reply.msg.kind
                && let Some(record) = r.record
            {
                applied |= self.accept_record(&addr, record).await == RecordOutcome::Applied;
            }
        }
        applied
    }

    /// Applies records from the peer at `from` (newer ones win), each
    /// checked like client input; an out-of-line chunk list is fetched from
    /// `from`. Returns what happened to each, in order.
    pub async fn apply_records(
        &self,
        from: &str,
        records: Vec<ObjectRecord>,
    ) -> Vec<RecordOutcome> {
        let mut outcomes = Vec::with_capacity(records.len());
        for r in records {
            outcomes.push(self.accept_record(from, r).await);
        }
        outcomes
    }

    /// The newest version clock this node accepts: its own clock plus the
    /// allowed skew. A record stamped later would win every future write
    /// until the clocks caught up (and one at `u64::MAX` forever).
    pub(super) fn version_horizon(&self) -> u64 {
        let ms = crate::units::unix_ms().saturating_add(self.cfg.max_clock_skew.as_millis() as u64);
        ms.saturating_mul(1 << HLC_MS_SHIFT) | ((1 << HLC_MS_SHIFT) - 1)
    }

    /// Whether this node's clock agrees with its peers' within the allowed
    /// skew. Versions are clock readings, so a node whose clock is off must
    /// not stamp writes: its deletes would win over later uploads (clock
    /// ahead) or its uploads lose to earlier ones (clock behind).
    pub(super) fn clock_agrees(&self) -> Result<(), String> {
        let skew = self.cfg.max_clock_skew.as_millis() as i64;
        let offsets: Vec<i64> = self
            .membership
            .peers()
            .into_iter()
            .filter(|p| p.state == MemberState::Up && p.last_seen_unix_ms > 0)
            .map(|p| p.clock_offset_ms)
            .collect();
        let off = offsets.iter().filter(|o| o.abs() > skew).count();
        // A majority of the peers heard from, so that one bad clock elsewhere
        // does not stop a good node.
        if off > 0 && off * 2 > offsets.len() {
            let mut sorted = offsets.clone();
            sorted.sort();
            let median = sorted[sorted.len() / 2];
            return Err(format!(
                "this node's clock is {}s {} its peers' (more than --max-clock-skew {}s); \
                 refusing writes until it is fixed",
                median.unsigned_abs() / 1000,
                if median < 0 { "ahead of" } else { "behind" },
                skew / 1000
            ));
        }
        Ok(())
    }
}

/// Refuses a record stamped beyond `horizon` (this node's clock plus the
/// allowed skew): it would win every later write until the clocks caught up,
/// and one at `u64::MAX` forever.
pub(super) fn check_clock(r: &ObjectRecord, horizon: u64) -> Result<(), String> {
    match &r.version {
        Some(v) if v.hlc > horizon => Err(format!(
            "version clock {} ms is further ahead of this node's clock than the allowed skew",
            v.hlc >> HLC_MS_SHIFT
        )),
        _ => Ok(()),
    }
}
