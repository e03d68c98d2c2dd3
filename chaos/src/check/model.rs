//! What each key's history allows: which uploads may be the object, and
//! which final states are consistent with last-writer-wins on versions.
//!
//! Versions are hybrid clock readings stamped by the node that took the
//! write. A version is assigned after its operation was invoked and before
//! it was answered, on a clock that is off true time by at most the skew the
//! harness applied (plus whatever a skewed node pushed into the others'
//! clocks, which is bounded the same way). So with `spread` = largest skew
//! difference, an operation invoked more than `spread` after another was
//! answered must carry the larger version; anything closer may go either way.

use std::collections::HashMap;

use crate::history::{Event, Outcome, PutDetail, Seen, Ver};

/// Clock slack between the harness's timestamps and version stamps.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Largest difference between two nodes' clocks the run created, in ms.
    pub spread_ms: u64,
    /// Rounding and scheduling slack, in ms.
    pub margin_ms: u64,
}

impl Timing {
    fn slack(&self) -> u64 {
        self.spread_ms + self.margin_ms
    }

    /// Whether `later` was invoked certainly after `earlier` was answered,
    /// once clocks are accounted for: then its version must be larger.
    pub fn certainly_after(&self, earlier: &Event, later: &Event) -> bool {
        later.invoke_ms > earlier.complete_ms + self.slack()
    }
}

/// What an upload may have become.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// Acknowledged, with the version the node reported.
    Acked(Option<Ver>),
    /// Ended without an acknowledgement after the whole stream was sent:
    /// no object, or the whole object later.
    Maybe,
    /// The stream never ended normally: it can never be an object.
    Never,
    /// (Deletes only) NOT_FOUND: wrote no tombstone.
    NoOp,
}

/// One upload or delete of a key.
#[derive(Debug, Clone)]
pub struct Write<'a> {
    pub ev: &'a Event,
    pub fate: Fate,
}

impl<'a> Write<'a> {
    pub fn put(&self) -> Option<&'a PutDetail> {
        self.ev.put.as_ref()
    }

    pub fn is_delete(&self) -> bool {
        self.ev.put.is_none()
    }

    pub fn version(&self) -> Option<&Ver> {
        match &self.fate {
            Fate::Acked(v) => v.as_ref(),
            _ => None,
        }
    }

    /// Whether an object seen with version `v` could be this write, by time.
    fn plausible_version(&self, v: &Ver, t: &Timing) -> bool {
        let ms = v.ms();
        ms + t.slack() >= self.ev.invoke_ms && ms <= self.ev.complete_ms + t.slack()
    }
}

/// Which write an observed object is.
#[derive(Debug)]
pub enum Identity<'a> {
    Upload(Write<'a>),
    /// The bytes of an upload whose stream never ended: must never exist.
    Abandoned(Write<'a>),
    Foreign(String),
}

/// Every key's writes, in invocation order.
pub struct Model<'a> {
    pub keys: HashMap<&'a str, Vec<Write<'a>>>,
    pub timing: Timing,
}

impl<'a> Model<'a> {
    pub fn build(events: &'a [Event], timing: Timing) -> Self {
        let mut keys: HashMap<&str, Vec<Write>> = HashMap::new();
        for ev in events {
            let fate = match (&ev.put, ev.op.kind.name(), &ev.outcome) {
                (Some(_), _, Outcome::Ok) => Fate::Acked(ev.version.clone()),
                (Some(p), _, _) if p.sent_all => Fate::Maybe,
                (Some(_), _, _) => Fate::Never,
                (None, "delete", Outcome::Ok) => Fate::Acked(ev.version.clone()),
                (None, "delete", Outcome::Err { code, .. }) if code == "NOT_FOUND" => Fate::NoOp,
                (None, "delete", _) => Fate::Maybe,
                _ => continue,
            };
            keys.entry(ev.op.key.as_str())
                .or_default()
                .push(Write { ev, fate });
        }
        for writes in keys.values_mut() {
            writes.sort_by_key(|w| (w.ev.invoke_ms, w.ev.op.id));
        }
        Self { keys, timing }
    }

    pub fn writes(&self, key: &str) -> &[Write<'a>] {
        self.keys.get(key).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Which upload `seen` is. `before_ms`: the observation ended then, so
    /// the upload must have started earlier.
    pub fn identify(&self, seen: &Seen, before_ms: Option<u64>) -> Identity<'a> {
        let started =
            |w: &Write| before_ms.is_none_or(|b| w.ev.invoke_ms <= b + self.timing.margin_ms);
        let same_bytes = |w: &&Write| {
            w.put()
                .is_some_and(|p| p.sha1 == seen.sha1 && p.size == seen.size)
                && started(w)
        };
        let candidates: Vec<&Write> = self.writes(&seen.key).iter().filter(same_bytes).collect();
        let fits = |w: &&&Write| match (&w.fate, &seen.version) {
            (Fate::Acked(Some(v)), Some(s)) => v == s,
            (Fate::Acked(_), _) => true,
            (Fate::Maybe, Some(s)) => w.plausible_version(s, &self.timing),
            (Fate::Maybe, None) => true,
            _ => false,
        };
        if let Some(w) = candidates.iter().find(fits) {
            return Identity::Upload((*w).clone());
        }
        if let Some(w) = candidates.iter().find(|w| w.fate == Fate::Never) {
            return Identity::Abandoned((*w).clone());
        }
        let why = if candidates.is_empty() {
            format!(
                "{:?} with sha1 {} and {} bytes matches no upload of that key{}",
                seen.key,
                seen.sha1,
                seen.size,
                if before_ms.is_some() {
                    " started before it was seen"
                } else {
                    ""
                }
            )
        } else {
            format!(
                "{:?} has the bytes of op {} but version {:?}, which no upload of those bytes can have",
                seen.key, candidates[0].ev.op.id, seen.version
            )
        };
        Identity::Foreign(why)
    }

    /// The acknowledged write of `key` with the largest version.
    pub fn newest_acked(&self, key: &str) -> Option<&Write<'a>> {
        self.writes(key)
            .iter()
            .filter(|w| w.version().is_some())
            .max_by(|a, b| a.version().cmp(&b.version()))
    }

    /// Whether a final state `seen` (None: no object) of `key` is one that
    /// last-writer-wins on these writes allows. Err names the promise broken.
    pub fn judge_final(&self, key: &str, seen: Option<&Seen>) -> Result<(), (u8, String)> {
        let newest = self.newest_acked(key);
        match seen {
            Some(o) => {
                match self.identify(o, None) {
                    Identity::Upload(_) => {}
                    Identity::Abandoned(w) => {
                        return Err((
                            2,
                            format!(
                                "{key:?} holds the bytes of op {}, an upload the client abandoned mid-stream",
                                w.ev.op.id
                            ),
                        ));
                    }
                    Identity::Foreign(why) => return Err((2, why)),
                }
                let Some(m) = newest else { return Ok(()) };
                if o.version.as_ref() >= m.version() {
                    return Ok(());
                }
                let (check, what) = if m.is_delete() {
                    (3, "resurrected: the acknowledged delete")
                } else {
                    (1, "lost: the acknowledged upload")
                };
                Err((
                    check,
                    format!(
                        "{key:?} {what} op {} (version {:?}) lost to an older version {:?}",
                        m.ev.op.id,
                        m.version(),
                        o.version
                    ),
                ))
            }
            None => {
                let Some(m) = newest else { return Ok(()) };
                if m.is_delete() {
                    return Ok(());
                }
                let mv = m.version().map_or(0, Ver::ms);
                let unanswered_delete = self.writes(key).iter().any(|w| {
                    w.is_delete()
                        && w.fate == Fate::Maybe
                        && w.ev.complete_ms + self.timing.slack() >= mv
                });
                if unanswered_delete {
                    return Ok(());
                }
                Err((
                    1,
                    format!(
                        "{key:?} is gone, but op {} uploaded it (acknowledged, version {:?}) and no delete can be newer",
                        m.ev.op.id,
                        m.version()
                    ),
                ))
            }
        }
    }

    /// Acknowledged writes whose versions contradict real time: `b` was
    /// invoked after `a` was acknowledged (beyond the clock spread) yet got
    /// the smaller version, so `b` silently lost to an older write.
    pub fn order_violations(&self) -> Vec<(u8, String)> {
        let mut out = Vec::new();
        for (key, writes) in &self.keys {
            let acked: Vec<&Write> = writes.iter().filter(|w| w.version().is_some()).collect();
            for a in &acked {
                for b in &acked {
                    if self.timing.certainly_after(a.ev, b.ev) && b.version() < a.version() {
                        let check = if b.is_delete() { 3 } else { 1 };
                        out.push((check, format!(
                            "{key:?}: op {} (acknowledged at {} ms, version {:?}) beats op {} \
                             (invoked at {} ms, acknowledged, version {:?}), which started after it",
                            a.ev.op.id, a.ev.complete_ms, a.version(), b.ev.op.id, b.ev.invoke_ms, b.version()
                        )));
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::fixtures::*;

    const T: Timing = Timing {
        spread_ms: 0,
        margin_ms: 5,
    };

    #[test]
    fn a_lost_acknowledged_upload_is_check_1() {
        let events = vec![acked(1, "k", 10, 100, 110, 105)];
        let m = Model::build(&events, T);
        assert_eq!(m.judge_final("k", None).unwrap_err().0, 1);
        assert!(m.judge_final("k", Some(&seen_of(&events[0]))).is_ok());
    }

    #[test]
    fn an_object_older_than_an_acknowledged_delete_is_check_3() {
        let events = vec![
            acked(1, "k", 10, 100, 110, 105),
            delete(2, "k", 200, 210, Outcome::Ok, Some(ver(205, "b"))),
        ];
        let m = Model::build(&events, T);
        assert_eq!(
            m.judge_final("k", Some(&seen_of(&events[0])))
                .unwrap_err()
                .0,
            3
        );
        assert!(m.judge_final("k", None).is_ok());
    }

    #[test]
    fn a_failed_upload_may_appear_only_with_a_plausible_version() {
        let mut events = vec![put(1, "k", 10, 100, 110, unavailable(), None, true)];
        let m = Model::build(&events, T);
        assert!(
            m.judge_final("k", None).is_ok(),
            "a failed upload may leave no object"
        );
        let mut seen = seen_of(&events[0]);
        seen.version = Some(ver(107, "a"));
        assert!(
            m.judge_final("k", Some(&seen)).is_ok(),
            "or the whole object"
        );
        seen.version = Some(ver(5_000, "a"));
        assert_eq!(
            m.judge_final("k", Some(&seen)).unwrap_err().0,
            2,
            "not with a version from after it ended"
        );
        events[0].put.as_mut().unwrap().sent_all = false;
        let m = Model::build(&events, T);
        seen.version = Some(ver(107, "a"));
        assert!(matches!(m.identify(&seen, None), Identity::Abandoned(_)));
        assert_eq!(
            m.judge_final("k", Some(&seen)).unwrap_err().0,
            2,
            "an abandoned stream never becomes an object"
        );
    }

    #[test]
    fn bytes_nobody_uploaded_are_foreign() {
        let events = vec![acked(1, "k", 10, 100, 110, 105)];
        let m = Model::build(&events, T);
        let mut seen = seen_of(&events[0]);
        seen.sha1 = sha1_of(99, 10);
        assert!(matches!(m.identify(&seen, None), Identity::Foreign(_)));
        let seen = seen_of(&events[0]);
        assert!(
            matches!(m.identify(&seen, Some(50)), Identity::Foreign(_)),
            "seen before it was uploaded"
        );
    }

    #[test]
    fn an_unanswered_delete_may_explain_a_missing_object() {
        let events = vec![
            acked(1, "k", 10, 100, 110, 105),
            delete(2, "k", 200, 210, unavailable(), None),
        ];
        assert!(Model::build(&events, T).judge_final("k", None).is_ok());
        let events = vec![
            acked(1, "k", 10, 100, 110, 105),
            delete(
                2,
                "k",
                20,
                30,
                Outcome::Err {
                    code: "NOT_FOUND".into(),
                    msg: String::new(),
                },
                None,
            ),
        ];
        assert_eq!(
            Model::build(&events, T)
                .judge_final("k", None)
                .unwrap_err()
                .0,
            1
        );
    }

    #[test]
    fn later_acknowledged_writes_must_get_larger_versions_beyond_the_skew() {
        // Op 2 starts 100 ms after op 1 was acknowledged but gets an older version.
        let events = vec![
            acked(1, "k", 10, 100, 110, 300),
            acked(2, "k", 20, 210, 220, 215),
        ];
        let strict = Model::build(&events, T).order_violations();
        assert_eq!(strict.len(), 1);
        assert_eq!(strict[0].0, 1);
        let lenient = Timing {
            spread_ms: 500,
            margin_ms: 5,
        };
        assert!(Model::build(&events, lenient).order_violations().is_empty());
    }
}
