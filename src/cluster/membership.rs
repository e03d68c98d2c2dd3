//! Who is in the cluster and who is alive.
//!
//! Members are keyed by node id. A member is *up* while it has been heard
//! from (a ping answered, or any request received) within `dead_after`, and
//! *down* after that. Known members persist in `<data>/members` so a
//! restarted node finds its cluster again without its bootstrap flags.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::proto::Member;

/// A member's liveness as this node sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberState {
    Up,
    Down,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Up => "up",
            MemberState::Down => "down",
        }
    }
}

/// A snapshot of one member.
#[derive(Clone, Debug)]
pub struct MemberView {
    pub node_id: String,
    pub addr: String,
    pub state: MemberState,
    /// Milliseconds since the Unix epoch of the last contact; 0 if never.
    pub last_seen_unix_ms: u64,
    pub chunk_count: u64,
    pub bytes_stored: u64,
}

struct Entry {
    addr: String,
    state: MemberState,
    /// Last contact, or when the member was learned of: a member gets one
    /// `dead_after` to answer before it counts as down.
    heard: Instant,
    last_seen_unix_ms: u64,
    chunk_count: u64,
    bytes_stored: u64,
}

/// What an observation changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    None,
    /// A member not known before.
    Joined,
    /// A member that was down answered again.
    Recovered,
}

/// The member list of one node (itself excluded).
pub struct Membership {
    self_id: String,
    dead_after: Duration,
    path: Option<PathBuf>,
    members: Mutex<HashMap<String, Entry>>,
}

impl Membership {
    /// Loads the persisted member list (if `path` is given and exists).
    pub fn load(self_id: &str, dead_after: Duration, path: Option<PathBuf>) -> Self {
        let mut members = HashMap::new();
        if let Some(text) = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
            for line in text.lines() {
                let mut parts = line.split_whitespace();
                if let (Some(id), Some(addr)) = (parts.next(), parts.next())
                    && id != self_id
                {
                    members.insert(id.to_owned(), Entry::new(addr));
                }
            }
        }
        Self {
            self_id: self_id.to_owned(),
            dead_after,
            path,
            members: Mutex::new(members),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records contact with a member (and its usage, when known).
    pub fn observe(&self, node_id: &str, addr: &str, usage: Option<(u64, u64)>) -> Change {
        if node_id == self.self_id || node_id.is_empty() {
            return Change::None;
        }
        let (change, persist) = {
            let mut members = self.lock();
            let entry = members.entry(node_id.to_owned());
            let mut change = Change::None;
            let mut persist = false;
            let e = match entry {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    change = Change::Joined;
                    persist = true;
                    v.insert(Entry::new(addr))
                }
            };
            if !addr.is_empty() && e.addr != addr {
                e.addr = addr.to_owned();
                persist = true;
            }
            if e.state == MemberState::Down {
                change = Change::Recovered;
            }
            e.state = MemberState::Up;
            e.heard = Instant::now();
            e.last_seen_unix_ms = crate::units::unix_ms();
            if let Some((chunks, bytes)) = usage {
                e.chunk_count = chunks;
                e.bytes_stored = bytes;
            }
            (change, persist)
        };
        if persist {
            self.persist();
        }
        change
    }

    /// Adds members learned from a peer; they get `dead_after` to answer.
    /// Returns the addresses of members not known before.
    pub fn learn(&self, members: &[Member]) -> Vec<String> {
        let mut new = Vec::new();
        {
            let mut known = self.lock();
            for m in members {
                if m.node_id == self.self_id || m.node_id.is_empty() || m.addr.is_empty() {
                    continue;
                }
                if !known.contains_key(&m.node_id) {
                    known.insert(m.node_id.clone(), Entry::new(&m.addr));
                    new.push(m.addr.clone());
                }
            }
        }
        if !new.is_empty() {
            self.persist();
        }
        new
    }

    /// Marks members silent for longer than `dead_after` as down. Returns the
    /// ids that went down now.
    pub fn expire(&self) -> Vec<String> {
        let mut gone = Vec::new();
        for (id, e) in self.lock().iter_mut() {
            if e.state == MemberState::Up && e.heard.elapsed() > self.dead_after {
                e.state = MemberState::Down;
                gone.push(id.clone());
            }
        }
        gone
    }

    /// Marks a member down at once (a write to it failed at the transport
    /// level). Returns whether it was up.
    pub fn suspect(&self, node_id: &str) -> bool {
        match self.lock().get_mut(node_id) {
            Some(e) if e.state == MemberState::Up => {
                e.state = MemberState::Down;
                true
            }
            _ => false,
        }
    }

    /// Ids of members currently up, this node included.
    pub fn live_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, e)| e.state == MemberState::Up)
            .map(|(id, _)| id.clone())
            .collect();
        ids.push(self.self_id.clone());
        ids
    }

    /// Number of known members, this node and down members included.
    pub fn size(&self) -> usize {
        self.lock().len() + 1
    }

    /// The peer address of a member.
    pub fn addr_of(&self, node_id: &str) -> Option<String> {
        self.lock().get(node_id).map(|e| e.addr.clone())
    }

    /// Every known member except this node.
    pub fn peers(&self) -> Vec<MemberView> {
        let mut all: Vec<MemberView> = self
            .lock()
            .iter()
            .map(|(id, e)| MemberView {
                node_id: id.clone(),
                addr: e.addr.clone(),
                state: e.state,
                last_seen_unix_ms: e.last_seen_unix_ms,
                chunk_count: e.chunk_count,
                bytes_stored: e.bytes_stored,
            })
            .collect();
        all.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        all
    }

    /// Members to tell a peer about, this node included.
    pub fn for_exchange(&self, self_addr: &str) -> Vec<Member> {
        let mut list: Vec<Member> = self
            .lock()
            .iter()
            .map(|(id, e)| Member {
                node_id: id.clone(),
                addr: e.addr.clone(),
            })
            .collect();
        list.push(Member {
            node_id: self.self_id.clone(),
            addr: self_addr.to_owned(),
        });
        list
    }

    fn persist(&self) {
        let Some(path) = &self.path else { return };
        let text: String = self
            .lock()
            .iter()
            .map(|(id, e)| format!("{id} {}\n", e.addr))
            .collect();
        let tmp = path.with_extension("tmp");
        let result = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e, "cannot save the member list");
        }
    }
}

impl Entry {
    fn new(addr: &str) -> Self {
        Self {
            addr: addr.to_owned(),
            state: MemberState::Up,
            heard: Instant::now(),
            last_seen_unix_ms: 0,
            chunk_count: 0,
            bytes_stored: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silent_members_go_down_and_come_back() {
        let dead_after = Duration::from_millis(200);
        let m = Membership::load("me", dead_after, None);
        assert_eq!(m.observe("a", "127.0.0.1:1", None), Change::Joined);
        let heard = Instant::now();
        assert_eq!(m.observe("a", "127.0.0.1:1", Some((3, 30))), Change::None);
        // Polled: "a" goes down, and not before it was silent for dead_after.
        let deadline = heard + Duration::from_secs(10);
        loop {
            let checked = Instant::now();
            let expired = m.expire();
            if !expired.is_empty() {
                assert_eq!(expired, vec!["a".to_string()]);
                assert!(
                    heard.elapsed() >= dead_after,
                    "down after {:?}",
                    heard.elapsed()
                );
                break;
            }
            assert!(checked < deadline, "still up after {:?}", heard.elapsed());
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(m.live_ids(), vec!["me".to_string()]);
        assert_eq!(
            m.size(),
            2,
            "a down member still counts in the cluster size"
        );
        assert_eq!(m.observe("a", "127.0.0.1:1", None), Change::Recovered);
        assert_eq!(m.live_ids().len(), 2);
        assert!(m.suspect("a"), "a failed write takes it down at once");
        assert!(!m.suspect("a"));
        assert_eq!(m.live_ids(), vec!["me".to_string()]);
        assert_eq!(m.observe("a", "127.0.0.1:1", None), Change::Recovered);
    }

    #[test]
    fn members_persist_and_self_is_never_a_peer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("members");
        {
            let m = Membership::load("me", Duration::from_secs(5), Some(path.clone()));
            m.observe("a", "127.0.0.1:1", None);
            m.observe("me", "127.0.0.1:9", None);
            let learned = m.learn(&[Member {
                node_id: "b".into(),
                addr: "127.0.0.1:2".into(),
            }]);
            assert_eq!(learned, vec!["127.0.0.1:2".to_string()]);
        }
        let m = Membership::load("me", Duration::from_secs(5), Some(path));
        let ids: Vec<_> = m.peers().into_iter().map(|p| p.node_id).collect();
        assert_eq!(ids, ["a", "b"]);
    }
}
