//! The gateway's side of upload leases (see `chunks::lease` for the holder's
//! side): grant a lease with every chunk written, renew it on every holder on
//! a timer while the upload runs, and before the record is committed make
//! sure every chunk is still on W holders, re-writing any that is not.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use bytes::Bytes;

use super::{Cluster, ClusterError};
use crate::{
    chunks::{Chunks, LeaseId},
    crypto::ChunkId,
    proto::{HasChunks, Lease, PeerMessage, RenewLeases, peer_message::Kind},
};

/// Chunk ids per verifying HasChunks: each one reads a chunk on the holder.
const CONFIRM_BATCH: usize = 256;

/// Which of an upload's holders took one chunk, kept per chunk while the
/// upload runs (16 bytes each): bit `i` is the lease's holder `i`; holders
/// from the 64th on share the last bit (an upload that touches more nodes
/// re-checks their chunks a little more often than needed, never less).
#[derive(Debug, Clone, Copy, Default)]
pub struct Copies {
    mask: u64,
    count: u8,
}

impl Copies {
    /// Good copies counted for the chunk.
    pub fn count(&self) -> usize {
        self.count as usize
    }
}

fn bit(index: usize) -> u64 {
    1 << index.min(63)
}

/// An upload's lease, held from its first chunk to its commit. Dropping it
/// stops the renewals and releases the lease on this node; the holders'
/// copies of it expire within one lease period.
pub struct UploadLease {
    id: LeaseId,
    started: Instant,
    ttl: Duration,
    chunks: Arc<Chunks>,
    /// Every member a copy was sent to; a chunk's holders are indices here.
    holders: Mutex<Vec<String>>,
    /// Holders a renewal could not reach, or that answered as another node:
    /// their copies are re-checked before the commit.
    suspects: Mutex<HashSet<String>>,
    /// When the last renewal round began: every holder then either said its
    /// lease was still in force or became a suspect, so no copy outside the
    /// suspects can have been collected before this instant plus the period.
    renewed: Mutex<Instant>,
    renewer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl UploadLease {
    /// The lease as a holder is told it (age measured now).
    pub fn grant(&self) -> Lease {
        Lease {
            id: self.id.to_vec().into(),
            age_ms: self.started.elapsed().as_millis() as u64,
            ttl_ms: self.ttl.as_millis() as u64,
        }
    }

    /// Notes that `member` is about to receive a copy; returns its index.
    pub fn add_holder(&self, member: &str) -> usize {
        let mut holders = self.holders.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = holders.iter().position(|h| h == member) {
            return i;
        }
        holders.push(member.to_owned());
        holders.len() - 1
    }

    /// The compact record of which members hold a chunk.
    pub fn copies(&self, members: &[String]) -> Copies {
        let mut copies = Copies::default();
        for m in members {
            copies.mask |= bit(self.add_holder(m));
            copies.count = copies.count.saturating_add(1);
        }
        copies
    }

    fn holder_ids(&self) -> Vec<String> {
        self.holders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn suspect(&self, member: &str) {
        self.suspects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(member.to_owned());
    }

    /// The suspects, cleared: the caller re-checks them.
    fn take_suspects(&self) -> HashSet<String> {
        std::mem::take(&mut *self.suspects.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Whether a lease may have lapsed somewhere since the last renewal
    /// round: half a period gone leaves room for a slow round and for clocks
    /// that run at slightly different rates.
    fn may_have_lapsed(&self) -> bool {
        let renewed = *self.renewed.lock().unwrap_or_else(|p| p.into_inner());
        renewed.elapsed() >= self.ttl / 2
    }

    fn renewed_at(&self, round: Instant) {
        let mut renewed = self.renewed.lock().unwrap_or_else(|p| p.into_inner());
        *renewed = (*renewed).max(round);
    }

    /// Renews the lease on this node; false if it had lapsed here.
    fn renew_locally(&self) -> bool {
        self.chunks
            .leases()
            .hold(self.id, self.started.elapsed(), self.ttl)
    }
}

impl Drop for UploadLease {
    fn drop(&mut self) {
        if let Some(task) = self
            .renewer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            task.abort();
        }
        self.chunks.leases().release(&self.id);
    }
}

impl Cluster {
    /// Opens a lease for a new upload: held on this node now, granted to
    /// every holder with its first copy, renewed every third of its period
    /// until the returned lease is dropped.
    pub fn lease_upload(self: &Arc<Self>) -> Arc<UploadLease> {
        let mut id = [0u8; 16];
        rand::Rng::fill_bytes(&mut rand::rng(), &mut id);
        let lease = Arc::new(UploadLease {
            id,
            started: Instant::now(),
            ttl: self.cfg.lease_ttl,
            chunks: self.chunks.clone(),
            holders: Mutex::new(Vec::new()),
            suspects: Mutex::new(HashSet::new()),
            renewed: Mutex::new(Instant::now()),
            renewer: Mutex::new(None),
        });
        // A new grant: nothing of this upload exists yet to have lapsed.
        let _ = lease.renew_locally();
        let task = tokio::spawn(self.clone().renew_loop(Arc::downgrade(&lease)));
        *lease.renewer.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        lease
    }

    async fn renew_loop(self: Arc<Self>, lease: Weak<UploadLease>) {
        loop {
            tokio::time::sleep(self.cfg.lease_ttl / 3).await;
            let Some(lease) = lease.upgrade() else { return };
            self.renew_round(&lease).await;
        }
    }

    /// Renews the lease on every holder at once. A holder that cannot be
    /// reached, or says the lease had lapsed there (the gateway was frozen
    /// or cut off for longer than the period, or the holder restarted), may
    /// have collected the upload's chunks: it becomes a suspect.
    async fn renew_round(self: &Arc<Self>, lease: &Arc<UploadLease>) {
        let round = Instant::now();
        let every = self.cfg.lease_ttl / 3;
        if !lease.renew_locally() {
            tracing::warn!(
                "an upload's lease lapsed on this node; its copies here will be re-checked before the commit"
            );
            lease.suspect(&self.node_id);
        }
        let mut renewals = tokio::task::JoinSet::new();
        for member in lease
            .holder_ids()
            .into_iter()
            .filter(|m| *m != self.node_id)
        {
            let (this, lease) = (self.clone(), lease.clone());
            renewals.spawn(async move {
                let renewed = tokio::time::timeout(every, this.renew_on(&member, &lease)).await;
                match renewed {
                    Ok(Ok(true)) => {}
                    Ok(Ok(false)) => {
                        tracing::warn!(member = %member, "an upload's lease had lapsed on a holder; its copies there will be re-checked before the commit");
                        lease.suspect(&member);
                    }
                    _ => {
                        tracing::warn!(member = %member, "cannot renew an upload's lease; its copies there will be re-checked before the commit");
                        lease.suspect(&member);
                    }
                }
            });
        }
        while renewals.join_next().await.is_some() {}
        lease.renewed_at(round);
    }

    /// Renews the lease on `member`: whether it was in force there all along.
    async fn renew_on(&self, member: &str, lease: &UploadLease) -> Result<bool, ClusterError> {
        let (Some(pool), Some(addr)) = (self.pool(), self.membership.addr_of(member)) else {
            return Err(ClusterError::Unreachable(format!(
                "no address for {member}"
            )));
        };
        let msg = PeerMessage {
            has_body: false,
            kind: Some(Kind::RenewLeases(RenewLeases {
                leases: vec![lease.grant()],
            })),
        };
        let reply = super::ask_member(pool, member, &addr, msg, None).await?;
        match reply.msg.kind {
            Some(Kind::RenewLeasesReply(r)) => Ok(r.held.len() == 1 && r.held[0]),
            _ => Err(ClusterError::Internal(
                "unexpected reply to RenewLeases".into(),
            )),
        }
    }

    /// Before an upload is acknowledged: every chunk must still be on W good
    /// copies. If the lease may have lapsed anywhere since its last renewal
    /// (this gateway was frozen or slow), it is renewed now; holders the
    /// lease lost touch with are asked to verify what they hold, and a chunk
    /// that fell below W is fetched from a good copy and written again.
    /// `copies[i]` says who holds `ids[i]` and is updated. Fails if a chunk
    /// cannot be brought back to W copies. Called before the record is
    /// committed and again after it (a freeze between the two is caught).
    pub async fn confirm_copies(
        self: &Arc<Self>,
        lease: &Arc<UploadLease>,
        ids: &[ChunkId],
        copies: &mut [Copies],
    ) -> Result<(), ClusterError> {
        if lease.may_have_lapsed() {
            self.renew_round(lease).await;
        }
        let suspects = lease.take_suspects();
        if suspects.is_empty() {
            return Ok(());
        }
        for member in &suspects {
            let Some(index) = lease.holder_ids().iter().position(|h| h == member) else {
                continue;
            };
            let on_it: Vec<usize> = (0..ids.len())
                .filter(|i| copies[*i].mask & bit(index) != 0)
                .collect();
            for batch in on_it.chunks(CONFIRM_BATCH) {
                let asked: Vec<ChunkId> = batch.iter().map(|i| ids[*i]).collect();
                let good = self.has_verified(member, &asked).await;
                for (i, ok) in batch.iter().zip(good) {
                    if !ok {
                        copies[*i].count = copies[*i].count.saturating_sub(1);
                    }
                }
            }
        }
        let w = self.write_quorum();
        for (i, id) in ids.iter().enumerate() {
            if copies[i].count() >= w {
                continue;
            }
            tracing::warn!(chunk = %id, copies = copies[i].count(), required = w,
                "a chunk of the upload lost copies while it ran; writing it again");
            let sealed = self.good_copy(*id).await?;
            let holders = self.replicate(*id, sealed, Some(lease)).await?;
            copies[i] = lease.copies(&holders);
        }
        Ok(())
    }

    /// A verified sealed copy of a chunk: local if good, else from a peer.
    async fn good_copy(&self, id: ChunkId) -> Result<Bytes, ClusterError> {
        let chunks = self.chunks.clone();
        if let Ok(Ok(sealed)) = tokio::task::spawn_blocking(move || chunks.read_verified(&id)).await
        {
            return Ok(Bytes::from(sealed));
        }
        self.fetch(id).await
    }

    /// Which of `ids` `member` holds good copies of (all false when it cannot
    /// be asked, or answers as another node).
    pub(super) async fn has_verified(&self, member: &str, ids: &[ChunkId]) -> Vec<bool> {
        self.has_chunks_on(member, ids, true)
            .await
            .unwrap_or_else(|| vec![false; ids.len()])
    }

    /// Asks `member` which of `ids` it holds (`verify`: holds good copies
    /// of). `None` when it cannot be asked or answers as another node.
    pub(super) async fn has_chunks_on(
        &self,
        member: &str,
        ids: &[ChunkId],
        verify: bool,
    ) -> Option<Vec<bool>> {
        if member == self.node_id {
            let (chunks, ids) = (self.chunks.clone(), ids.to_vec());
            return tokio::task::spawn_blocking(move || {
                ids.iter().map(|id| chunks.holds(id, verify)).collect()
            })
            .await
            .ok();
        }
        let (pool, addr) = (self.pool()?, self.membership.addr_of(member)?);
        let msg = PeerMessage {
            has_body: false,
            kind: Some(Kind::HasChunks(HasChunks {
                chunk_ids: ids.iter().map(|id| id.0.to_vec().into()).collect(),
                touch: false,
                verify,
            })),
        };
        let reply = super::ask_member(pool, member, &addr, msg, None)
            .await
            .ok()?;
        match reply.msg.kind {
            Some(Kind::HasChunksReply(r)) if r.present.len() == ids.len() => Some(r.present),
            _ => None,
        }
    }
}
