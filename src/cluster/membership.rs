//! Who is in the cluster and who is alive.
//!
//! Members are keyed by node id. A member is *up* while it has been heard
//! from directly (a ping answered, or any authenticated request received)
//! within `dead_after`, and *down* after that. A member this node only
//! remembers (from its members file) or was told about by a peer is
//! *unknown* until it is heard from: nothing counts on it before that.
//!
//! Identity rules, so that no replica counts twice:
//! * an id whose address another id now answers on is *retired*: it is
//!   removed, and gossip cannot bring it back (only the node itself, heard
//!   from directly, can);
//! * an id an operator *forgot* (`dfs members forget`) is gone for good:
//!   every node learns it through pings and refuses it, even in person.
//!
//! Known members persist in `<data>/members` (written atomically, fsynced)
//! so a restarted node finds its cluster again without its bootstrap flags.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::proto::Member;

/// A member's liveness as this node sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberState {
    /// Remembered or learned of, not heard from since this node started.
    Unknown,
    Up,
    Down,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Unknown => "unknown",
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
    /// The member's clock minus this node's, as last measured (ms).
    pub clock_offset_ms: i64,
}

struct Entry {
    addr: String,
    state: MemberState,
    /// Last direct contact, or when the member was learned of.
    heard: Instant,
    last_seen_unix_ms: u64,
    chunk_count: u64,
    bytes_stored: u64,
    clock_offset_ms: i64,
}

/// What an observation changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    None,
    /// A member not known before.
    Joined,
    /// A member that was down or unknown answered.
    Recovered,
    /// The id was forgotten by an operator: ignored.
    Refused,
}

/// What a contact with a member reported.
#[derive(Debug, Default, Clone, Copy)]
pub struct Contact {
    /// (chunks, bytes) the member stores.
    pub usage: Option<(u64, u64)>,
    /// The member's clock minus ours, when the contact measured it.
    pub clock_offset_ms: Option<i64>,
}

#[derive(Default)]
struct State {
    members: HashMap<String, Entry>,
    retired: HashSet<String>,
    forgotten: HashSet<String>,
}

/// The member list of one node (itself excluded).
pub struct Membership {
    self_id: String,
    dead_after: Duration,
    path: Option<PathBuf>,
    state: Mutex<State>,
}

impl Membership {
    /// Loads the persisted member list (if `path` is given and exists). Every
    /// remembered member starts unknown.
    pub fn load(self_id: &str, dead_after: Duration, path: Option<PathBuf>) -> Self {
        let mut state = State::default();
        if let Some(text) = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
            for line in text.lines() {
                let mut parts = line.split_whitespace();
                match (parts.next(), parts.next()) {
                    (Some("forgotten"), Some(id)) => {
                        state.forgotten.insert(id.to_owned());
                    }
                    (Some("retired"), Some(id)) => {
                        state.retired.insert(id.to_owned());
                    }
                    (Some(id), Some(addr)) if id != self_id => {
                        state.members.insert(id.to_owned(), Entry::new(addr));
                    }
                    _ => {}
                }
            }
        }
        Self {
            self_id: self_id.to_owned(),
            dead_after,
            path,
            state: Mutex::new(state),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records direct, authenticated contact with a member. Another id that
    /// was known at the same address is retired: that address now answers
    /// as `node_id`.
    pub fn observe(&self, node_id: &str, addr: &str, contact: Contact) -> Change {
        if node_id == self.self_id || node_id.is_empty() {
            return Change::None;
        }
        let (change, persist) = {
            let mut st = self.lock();
            if st.forgotten.contains(node_id) {
                return Change::Refused;
            }
            let mut persist = st.retired.remove(node_id);
            if !addr.is_empty() {
                persist |= retire_others_at(&mut st, node_id, addr);
            }
            let mut change = Change::None;
            let e = st.members.entry(node_id.to_owned()).or_insert_with(|| {
                change = Change::Joined;
                persist = true;
                Entry::new(addr)
            });
            if !addr.is_empty() && e.addr != addr {
                e.addr = addr.to_owned();
                persist = true;
            }
            if e.state != MemberState::Up && change == Change::None {
                change = Change::Recovered;
            }
            e.state = MemberState::Up;
            e.heard = Instant::now();
            e.last_seen_unix_ms = crate::units::unix_ms();
            if let Some((chunks, bytes)) = contact.usage {
                e.chunk_count = chunks;
                e.bytes_stored = bytes;
            }
            if let Some(offset) = contact.clock_offset_ms {
                e.clock_offset_ms = offset;
            }
            (change, persist)
        };
        if persist {
            self.persist();
        }
        change
    }

    /// Adds members learned from a peer; they stay unknown until heard from
    /// directly. Retired and forgotten ids are not learned. Returns the
    /// addresses of members not known before.
    pub fn learn(&self, members: &[Member]) -> Vec<String> {
        let mut new = Vec::new();
        {
            let mut st = self.lock();
            for m in members {
                if m.node_id == self.self_id
                    || m.node_id.is_empty()
                    || m.addr.is_empty()
                    || st.retired.contains(&m.node_id)
                    || st.forgotten.contains(&m.node_id)
                {
                    continue;
                }
                if !st.members.contains_key(&m.node_id) {
                    st.members.insert(m.node_id.clone(), Entry::new(&m.addr));
                    new.push(m.addr.clone());
                }
            }
        }
        if !new.is_empty() {
            self.persist();
        }
        new
    }

    /// Forgets `node_id` for good; the caller checked that it may. Returns
    /// whether it was known (as a member, or already forgotten).
    pub fn forget(&self, node_id: &str) -> bool {
        let known = {
            let mut st = self.lock();
            let known = st.members.remove(node_id).is_some() | st.forgotten.contains(node_id);
            st.retired.remove(node_id);
            st.forgotten.insert(node_id.to_owned());
            known
        };
        self.persist();
        known
    }

    /// Applies forgotten ids a peer told us about. Returns those new here.
    pub fn learn_forgotten(&self, ids: &[String]) -> Vec<String> {
        let mut new = Vec::new();
        {
            let mut st = self.lock();
            for id in ids {
                if id.is_empty() || *id == self.self_id || st.forgotten.contains(id) {
                    continue;
                }
                st.members.remove(id);
                st.retired.remove(id);
                st.forgotten.insert(id.clone());
                new.push(id.clone());
            }
        }
        if !new.is_empty() {
            self.persist();
        }
        new
    }

    /// Ids forgotten for good, to pass on to peers.
    pub fn forgotten(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock().forgotten.iter().cloned().collect();
        ids.sort();
        ids
    }

    /// Whether `node_id` was forgotten for good.
    pub fn is_forgotten(&self, node_id: &str) -> bool {
        self.lock().forgotten.contains(node_id)
    }

    /// Retires `node_id` because its address answered as another node.
    /// Returns whether it was a member.
    pub fn retire(&self, node_id: &str) -> bool {
        let was = {
            let mut st = self.lock();
            let was = st.members.remove(node_id).is_some();
            if was {
                st.retired.insert(node_id.to_owned());
            }
            was
        };
        if was {
            self.persist();
        }
        was
    }

    /// Marks members silent for longer than `dead_after` as down. Returns the
    /// ids that went down now.
    pub fn expire(&self) -> Vec<String> {
        let mut gone = Vec::new();
        for (id, e) in self.lock().members.iter_mut() {
            if e.state != MemberState::Down && e.heard.elapsed() > self.dead_after {
                e.state = MemberState::Down;
                gone.push(id.clone());
            }
        }
        gone
    }

    /// Marks a member down at once (a request to it failed at the transport
    /// level). Returns whether it was up.
    pub fn suspect(&self, node_id: &str) -> bool {
        match self.lock().members.get_mut(node_id) {
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
            .members
            .iter()
            .filter(|(_, e)| e.state == MemberState::Up)
            .map(|(id, _)| id.clone())
            .collect();
        ids.push(self.self_id.clone());
        ids
    }

    /// Number of known members, this node and down or unknown members
    /// included.
    pub fn size(&self) -> usize {
        self.lock().members.len() + 1
    }

    /// The state of a member, if it is one.
    pub fn state_of(&self, node_id: &str) -> Option<MemberState> {
        self.lock().members.get(node_id).map(|e| e.state)
    }

    /// The peer address of a member.
    pub fn addr_of(&self, node_id: &str) -> Option<String> {
        self.lock().members.get(node_id).map(|e| e.addr.clone())
    }

    /// Every known member except this node.
    pub fn peers(&self) -> Vec<MemberView> {
        let mut all: Vec<MemberView> = self
            .lock()
            .members
            .iter()
            .map(|(id, e)| MemberView {
                node_id: id.clone(),
                addr: e.addr.clone(),
                state: e.state,
                last_seen_unix_ms: e.last_seen_unix_ms,
                chunk_count: e.chunk_count,
                bytes_stored: e.bytes_stored,
                clock_offset_ms: e.clock_offset_ms,
            })
            .collect();
        all.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        all
    }

    /// Members to tell a peer about, this node included. Unknown members are
    /// passed on too: the receiver checks them itself.
    pub fn for_exchange(&self, self_addr: &str) -> Vec<Member> {
        let mut list: Vec<Member> = self
            .lock()
            .members
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
        let text: String = {
            let st = self.lock();
            let mut lines: Vec<String> = st
                .members
                .iter()
                .map(|(id, e)| format!("{id} {}\n", e.addr))
                .collect();
            lines.extend(st.retired.iter().map(|id| format!("retired {id}\n")));
            lines.extend(st.forgotten.iter().map(|id| format!("forgotten {id}\n")));
            lines.sort();
            lines.concat()
        };
        if let Err(e) = crate::fsutil::write_atomically(path, text.as_bytes(), 0o600) {
            tracing::warn!(path = %path.display(), error = %e, "cannot save the member list");
        }
    }
}

/// Removes every member other than `node_id` known at `addr`, marking it
/// retired. Returns whether anything changed.
fn retire_others_at(st: &mut State, node_id: &str, addr: &str) -> bool {
    let stale: Vec<String> = st
        .members
        .iter()
        .filter(|(id, e)| *id != node_id && e.addr == addr)
        .map(|(id, _)| id.clone())
        .collect();
    for id in &stale {
        tracing::warn!(retired = %id, now = %node_id, addr = %addr,
            "another node answers at this member's address; retiring the old id");
        st.members.remove(id);
        st.retired.insert(id.clone());
    }
    !stale.is_empty()
}

impl Entry {
    fn new(addr: &str) -> Self {
        Self {
            addr: addr.to_owned(),
            state: MemberState::Unknown,
            heard: Instant::now(),
            last_seen_unix_ms: 0,
            chunk_count: 0,
            bytes_stored: 0,
            clock_offset_ms: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heard(m: &Membership, id: &str, addr: &str) -> Change {
        m.observe(id, addr, Contact::default())
    }

    #[test]
    fn silent_members_go_down_and_come_back() {
        let dead_after = Duration::from_millis(200);
        let m = Membership::load("me", dead_after, None);
        assert_eq!(heard(&m, "a", "127.0.0.1:1"), Change::Joined);
        let last = Instant::now();
        assert_eq!(heard(&m, "a", "127.0.0.1:1"), Change::None);
        // Polled: "a" goes down, and not before it was silent for dead_after.
        let deadline = last + Duration::from_secs(10);
        loop {
            let checked = Instant::now();
            let expired = m.expire();
            if !expired.is_empty() {
                assert_eq!(expired, vec!["a".to_string()]);
                assert!(
                    last.elapsed() >= dead_after,
                    "down after {:?}",
                    last.elapsed()
                );
                break;
            }
            assert!(checked < deadline, "still up after {:?}", last.elapsed());
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(m.live_ids(), vec!["me".to_string()]);
        assert_eq!(
            m.size(),
            2,
            "a down member still counts in the cluster size"
        );
        assert_eq!(heard(&m, "a", "127.0.0.1:1"), Change::Recovered);
        assert_eq!(m.live_ids().len(), 2);
        assert!(m.suspect("a"), "a failed write takes it down at once");
        assert!(!m.suspect("a"));
        assert_eq!(m.live_ids(), vec!["me".to_string()]);
        assert_eq!(heard(&m, "a", "127.0.0.1:1"), Change::Recovered);
    }

    #[test]
    fn remembered_and_learned_members_are_unknown_until_heard_from() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("members");
        {
            let m = Membership::load("me", Duration::from_secs(5), Some(path.clone()));
            heard(&m, "a", "127.0.0.1:1");
            heard(&m, "me", "127.0.0.1:9");
            let learned = m.learn(&[Member {
                node_id: "b".into(),
                addr: "127.0.0.1:2".into(),
            }]);
            assert_eq!(learned, vec!["127.0.0.1:2".to_string()]);
            assert_eq!(m.state_of("b"), Some(MemberState::Unknown));
            assert_eq!(m.live_ids().len(), 2, "b does not count before it answers");
        }
        let m = Membership::load("me", Duration::from_secs(5), Some(path));
        let ids: Vec<_> = m
            .peers()
            .into_iter()
            .map(|p| (p.node_id, p.state))
            .collect();
        assert_eq!(
            ids,
            [
                ("a".to_string(), MemberState::Unknown),
                ("b".to_string(), MemberState::Unknown)
            ]
        );
        assert_eq!(m.live_ids(), vec!["me".to_string()]);
    }

    #[test]
    fn a_new_id_at_a_known_address_retires_the_old_one_for_gossip() {
        let m = Membership::load("me", Duration::from_secs(5), None);
        heard(&m, "old", "127.0.0.1:7");
        assert_eq!(heard(&m, "new", "127.0.0.1:7"), Change::Joined);
        assert_eq!(m.state_of("old"), None);
        let stale = Member {
            node_id: "old".into(),
            addr: "127.0.0.1:7".into(),
        };
        assert!(
            m.learn(std::slice::from_ref(&stale)).is_empty(),
            "gossip cannot revive it"
        );
        // The old node itself, heard from at a new address, is back.
        assert_eq!(heard(&m, "old", "127.0.0.1:8"), Change::Joined);
    }

    #[test]
    fn forgotten_ids_are_refused_everywhere_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("members");
        {
            let m = Membership::load("me", Duration::from_secs(5), Some(path.clone()));
            heard(&m, "gone", "127.0.0.1:5");
            assert!(m.forget("gone"));
            assert_eq!(heard(&m, "gone", "127.0.0.1:5"), Change::Refused);
            assert_eq!(m.learn_forgotten(&["x".into(), "gone".into()]), vec!["x"]);
        }
        let m = Membership::load("me", Duration::from_secs(5), Some(path));
        assert!(m.is_forgotten("gone") && m.is_forgotten("x"));
        assert!(m.peers().is_empty());
        assert_eq!(m.forgotten(), vec!["gone", "x"]);
    }
}
