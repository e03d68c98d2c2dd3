//! Membership pings and index reconciliation.

use std::{collections::HashSet, sync::Arc, time::Duration};

use tokio::sync::watch;

use super::{
    Cluster, SYNC_PAGE,
    membership::{Change, Contact},
};
use crate::{
    p2p::{HandshakeError, P2pError},
    proto::{IndexSync, Member, PeerMessage, Ping, RecordOutcome, peer_message::Kind},
};

/// Waits for `d`, or returns false at once if shutdown was signalled.
pub(super) async fn sleep_or_stop(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => !*shutdown.borrow(),
        _ = shutdown.changed() => false,
    }
}

impl Cluster {
    /// How often members are pinged: often enough that a live member is
    /// never mistaken for a dead one (five pings per `dead_after`).
    fn ping_interval(&self) -> Duration {
        (self.cfg.dead_after / 5).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// How long one ping may take: a silent peer is given up on well within
    /// `dead_after`, and never longer than a peer request may take.
    fn ping_timeout(&self) -> Duration {
        (self.cfg.dead_after / 2).min(self.cfg.peer_timeout)
    }

    /// The failure detector. Every target address is probed by its own task
    /// with its own timeout, so a frozen or unreachable peer never delays
    /// what this node learns about the others; a separate tick marks members
    /// silent for `dead_after` as down.
    pub(super) async fn membership_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let self_addrs: Arc<std::sync::Mutex<HashSet<String>>> = Arc::default();
        let mut probers: std::collections::HashMap<String, tokio::task::JoinHandle<()>> =
            Default::default();
        loop {
            let known = self_addrs.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let targets = self.ping_targets(&known).await;
            probers.retain(|addr, task| {
                let keep = targets.contains(addr) && !task.is_finished();
                if !keep {
                    task.abort();
                }
                keep
            });
            for addr in targets {
                if probers.contains_key(&addr) {
                    continue;
                }
                let task = tokio::spawn(self.clone().probe(addr.clone(), self_addrs.clone()));
                probers.insert(addr, task);
            }
            for id in self.membership.expire() {
                tracing::warn!(member = %id, dead_after = ?self.cfg.dead_after,
                    "member is down: nothing heard from it within dead_after");
                if let (Some(pool), Some(addr)) = (self.pool(), self.membership.addr_of(&id)) {
                    pool.forget(&addr);
                }
                self.repair.kick();
            }
            if !sleep_or_stop(self.ping_interval(), &mut shutdown).await {
                for task in probers.values() {
                    task.abort();
                }
                return;
            }
        }
    }

    /// Pings one address every ping interval until it turns out to be this
    /// node itself (or the task is stopped).
    async fn probe(
        self: Arc<Self>,
        addr: String,
        self_addrs: Arc<std::sync::Mutex<HashSet<String>>>,
    ) {
        loop {
            match tokio::time::timeout(self.ping_timeout(), self.ping(&addr)).await {
                Ok(Ok(())) => {}
                Ok(Err(PingError::Myself)) => {
                    self_addrs
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(addr);
                    return;
                }
                Ok(Err(PingError::Failed(e))) => {
                    tracing::debug!(addr = %addr, error = %e, "ping failed")
                }
                Err(_) => tracing::debug!(addr = %addr, "ping timed out"),
            }
            tokio::time::sleep(self.ping_interval()).await;
        }
    }

    /// Known members plus every address the bootstrap names resolve to.
    async fn ping_targets(&self, self_addrs: &HashSet<String>) -> HashSet<String> {
        let mut targets: HashSet<String> = self
            .membership
            .peers()
            .into_iter()
            .map(|m| m.addr)
            .collect();
        for name in &self.cfg.peers {
            match tokio::net::lookup_host(name.as_str()).await {
                Ok(addrs) => targets.extend(addrs.map(|a| a.to_string())),
                Err(e) => {
                    tracing::debug!(peer = %name, error = %e, "cannot resolve peer address");
                    targets.insert(name.clone());
                }
            }
        }
        targets.remove(self.advertised_addr());
        targets.retain(|a| !self_addrs.contains(a));
        targets
    }

    async fn ping(&self, addr: &str) -> Result<(), PingError> {
        let pool = self
            .pool()
            .ok_or_else(|| PingError::Failed("not started".into()))?;
        let (chunk_count, bytes_stored) = self.chunks.store().usage();
        let sent_ms = crate::units::unix_ms();
        let msg = PeerMessage {
            has_body: false,
            kind: Some(Kind::Ping(Ping {
                members: self.membership.for_exchange(self.advertised_addr()),
                chunk_count,
                bytes_stored,
                forgotten: self.membership.forgotten(),
                unix_ms: sent_ms,
            })),
        };
        let reply = pool.request(addr, msg, None).await.map_err(|e| match e {
            P2pError::Handshake(HandshakeError::SelfConnection(_)) => PingError::Myself,
            // The acceptor side of a self-connection refuses it first.
            P2pError::Handshake(HandshakeError::Rejected(r)) if r.contains("ourselves") => {
                PingError::Myself
            }
            other => PingError::Failed(other.to_string()),
        })?;
        if reply.peer.node_id == self.node_id {
            return Err(PingError::Myself);
        }
        let Some(Kind::Pong(pong)) = reply.msg.kind else {
            return Err(PingError::Failed(
                "answered a ping with something else".into(),
            ));
        };
        // The peer read its clock between our send and our receive: compare
        // it with the midpoint.
        let mid = (sent_ms + crate::units::unix_ms()) / 2;
        let contact = Contact {
            usage: Some((pong.chunk_count, pong.bytes_stored)),
            clock_offset_ms: (pong.unix_ms > 0).then(|| pong.unix_ms as i64 - mid as i64),
        };
        let change =
            self.membership
                .observe(&reply.peer.node_id, &reply.peer.advertised_addr, contact);
        match change {
            Change::None => {}
            Change::Refused => return Err(PingError::Failed("a forgotten node".into())),
            Change::Joined | Change::Recovered => {
                self.member_appeared(&reply.peer.node_id, &reply.peer.advertised_addr)
            }
        }
        self.learn_from_peer(&reply.peer.node_id, &pong.members, &pong.forgotten);
        Ok(())
    }

    /// Removes a member for good (`dfs members forget`): it stops counting
    /// at once, peers learn it with the next pings, and repair re-replicates
    /// what it held. Refused for a member that is up.
    pub fn forget_member(&self, node_id: &str) -> Result<(), ForgetError> {
        if node_id == self.node_id {
            return Err(ForgetError::Myself);
        }
        match self.membership.state_of(node_id) {
            Some(super::MemberState::Up) => return Err(ForgetError::IsUp(node_id.to_owned())),
            None if !self.membership.is_forgotten(node_id) => {
                return Err(ForgetError::Unknown(node_id.to_owned()));
            }
            _ => {}
        }
        if let (Some(pool), Some(addr)) = (self.pool(), self.membership.addr_of(node_id)) {
            pool.forget(&addr);
        }
        self.membership.forget(node_id);
        tracing::warn!(member = %node_id, "member forgotten for good; re-replicating what it held");
        self.repair.kick();
        Ok(())
    }

    /// Takes in what a peer knows: members (unknown until heard from) and
    /// ids forgotten for good.
    pub(super) fn learn_from_peer(&self, from: &str, members: &[Member], forgotten: &[String]) {
        for addr in self.membership.learn(members) {
            tracing::info!(addr = %addr, from = %from, "learned of a new member");
        }
        for id in self.membership.learn_forgotten(forgotten) {
            tracing::warn!(member = %id, from = %from, "member was forgotten by an operator; it no longer counts");
            self.repair.kick();
        }
    }

    /// A member joined or came back: reconcile indexes with it now and let
    /// repair move copies to (or back from) it.
    pub(super) fn member_appeared(self: &Cluster, node_id: &str, addr: &str) {
        tracing::info!(member = %node_id, addr = %addr, "member is up");
        self.repair.kick();
        self.sync.request(addr);
    }

    pub(super) async fn sync_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut next_full = tokio::time::Instant::now();
        loop {
            // Pull from members that just appeared, and from everyone periodically.
            let mut addrs = self.sync.take_requests();
            if tokio::time::Instant::now() >= next_full {
                addrs.extend(
                    self.membership
                        .peers()
                        .into_iter()
                        .filter(|p| p.state == super::MemberState::Up)
                        .map(|p| p.addr),
                );
                next_full = tokio::time::Instant::now() + self.cfg.sync_interval;
            }
            for addr in addrs {
                match self.pull_index(&addr).await {
                    Ok(n) if n > 0 => {
                        tracing::info!(peer = %addr, applied = n, "index sync applied newer records")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(peer = %addr, error = %e, "index sync failed"),
                }
            }
            tokio::select! {
                _ = self.sync.wait() => {}
                keep = sleep_or_stop(Duration::from_millis(500).min(self.cfg.sync_interval), &mut shutdown) => {
                    if !keep { return; }
                }
            }
            if *shutdown.borrow() {
                return;
            }
        }
    }

    /// Pulls every record a peer holds, page by page, applying the newer
    /// ones. Returns how many were applied.
    pub async fn pull_index(&self, addr: &str) -> Result<u32, String> {
        let pool = self.pool().ok_or("not started")?;
        let mut after = String::new();
        let mut applied = 0;
        loop {
            let msg = PeerMessage {
                has_body: false,
                kind: Some(Kind::IndexSync(IndexSync {
                    after_key: after.clone(),
                    limit: SYNC_PAGE as u32,
                })),
            };
            let reply = pool
                .request(addr, msg, None)
                .await
                .map_err(|e| e.to_string())?;
            let Some(Kind::IndexSyncReply(page)) = reply.msg.kind else {
                return Err("unexpected reply to IndexSync".into());
            };
            let Some(last) = page.records.last().map(|r| r.key.clone()) else {
                return Ok(applied);
            };
            applied += self
                .apply_records(addr, page.records)
                .await
                .iter()
                .filter(|o| **o == RecordOutcome::Applied)
                .count() as u32;
            if !page.more || last <= after {
                return Ok(applied);
            }
            after = last;
        }
    }
}

/// Why a member cannot be forgotten.
#[derive(Debug, thiserror::Error)]
pub enum ForgetError {
    #[error("no member {0} is known to this node")]
    Unknown(String),
    #[error("member {0} is up: stop it (and wait until it is down) before forgetting it")]
    IsUp(String),
    #[error("a node cannot forget itself")]
    Myself,
}

/// Why a ping got no answer.
enum PingError {
    /// The address is this node's own (a bootstrap list names every node).
    Myself,
    Failed(String),
}

/// Addresses waiting for an immediate index pull.
#[derive(Default)]
pub struct SyncRequests {
    pending: std::sync::Mutex<HashSet<String>>,
    notify: tokio::sync::Notify,
}

impl SyncRequests {
    pub fn request(&self, addr: &str) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr.to_owned());
        self.notify.notify_one();
    }

    fn take_requests(&self) -> HashSet<String> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()))
    }

    async fn wait(&self) {
        self.notify.notified().await
    }
}
