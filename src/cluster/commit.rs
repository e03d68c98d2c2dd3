//! Records between nodes: committing a write's record (an object or a
//! tombstone) on W nodes before it is acknowledged, applying the records
//! peers send, asking peers for records this node lacks, and the clock
//! agreement that versions rely on.

use std::{sync::Arc, time::Duration};

use super::{Cluster, ClusterError, MemberState};
use crate::proto::{
    GetRecord, IndexUpdate, ObjectRecord, PeerMessage, get_record, peer_message::Kind,
};

/// Bits of a version's hybrid clock that count milliseconds (the low 16 are
/// a logical counter; see `index`).
const HLC_MS_SHIFT: u32 = 16;

/// How long a commit waits for peers before it settles for what it has.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);

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
                let pushed = tokio::time::timeout(
                    COMMIT_TIMEOUT,
                    this.push_record(&peer.node_id, &peer.addr, record),
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
                Ok(true) => durable += 1,
                Ok(false) => reasons.push(format!("{member}: refused the record")),
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

    /// Sends one record to `member`; true when it reports holding this
    /// version or a newer one durably.
    async fn push_record(
        &self,
        member: &str,
        addr: &str,
        record: ObjectRecord,
    ) -> Result<bool, ClusterError> {
        let pool = self
            .pool()
            .ok_or_else(|| ClusterError::Internal("not started".into()))?;
        let msg = PeerMessage {
            has_body: false,
            kind: Some(Kind::IndexUpdate(IndexUpdate {
                records: vec![record],
            })),
        };
        let reply = pool
            .request(addr, msg, None)
            .await
            .map_err(|e| ClusterError::Unreachable(e.to_string()))?;
        if reply.peer.node_id != member {
            return Err(ClusterError::WrongNode {
                member: member.to_owned(),
                answered: reply.peer.node_id,
            });
        }
        match reply.msg.kind {
            Some(Kind::IndexUpdateReply(r)) => Ok(r.durable.first().copied().unwrap_or(false)),
            Some(Kind::Error(e)) => Err(ClusterError::Internal(e.message)),
            _ => Err(ClusterError::Internal(
                "unexpected reply to IndexUpdate".into(),
            )),
        }
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
                pool.request(&peer.addr, msg, None).await
            });
        }
        let mut applied = false;
        while let Some(done) = asks.join_next().await {
            if let Ok(Ok(reply)) = done
                && let Some(Kind::GetRecordReply(r)) = reply.msg.kind
                && let Some(record) = r.record
            {
                applied |= self.apply_records(vec![record]).await.0 > 0;
            }
        }
        applied
    }

    /// Applies records from a peer (last writer wins). Returns how many were
    /// newer, and for each record whether this node now durably holds it or
    /// a newer version of its key (false: refused).
    pub async fn apply_records(&self, records: Vec<ObjectRecord>) -> (u32, Vec<bool>) {
        let index = self.index.clone();
        let horizon = self.version_horizon();
        tokio::task::spawn_blocking(move || {
            let mut applied = 0;
            let mut durable = Vec::with_capacity(records.len());
            for r in records {
                if let Err(why) = check_peer_record(&r, horizon) {
                    tracing::warn!(key = %r.key, reason = %why, "refused a peer's record");
                    durable.push(false);
                    continue;
                }
                match index.apply(&r) {
                    Ok(true) => {
                        applied += 1;
                        durable.push(true);
                    }
                    // Not newer: this node holds this version or a newer one.
                    Ok(false) => durable.push(true),
                    Err(e) => {
                        tracing::warn!(key = %r.key, error = %e, "cannot apply a peer's record");
                        durable.push(false);
                    }
                }
            }
            (applied, durable)
        })
        .await
        .unwrap_or_default()
    }

    /// The newest version clock this node accepts: its own clock plus the
    /// allowed skew. A record stamped later would win every future write
    /// until the clocks caught up (and one at `u64::MAX` forever).
    fn version_horizon(&self) -> u64 {
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

/// Checks what a peer's record must satisfy beyond its structure: a version,
/// and not stamped beyond `horizon`.
fn check_peer_record(r: &ObjectRecord, horizon: u64) -> Result<(), String> {
    if r.key.is_empty() || r.key.len() > crate::node::MAX_KEY_LEN || r.key.contains('\0') {
        return Err("bad key".into());
    }
    let Some(v) = &r.version else {
        return Err("no version".into());
    };
    if v.hlc > horizon {
        return Err(format!(
            "version clock {} is further ahead of this node's clock than the allowed skew",
            v.hlc >> HLC_MS_SHIFT
        ));
    }
    // Versions order by clock, then origin node: the origin must be named.
    if v.node_id.is_empty() {
        return Err("version has no origin node".into());
    }
    Ok(())
}
