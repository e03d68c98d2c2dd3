//! Checks 2 and 7 on the history: every byte a client was given, and every
//! answer to a read, against what the documentation promises.

use sha1::{Digest, Sha1};

use super::{
    Violations,
    model::{Fate, Identity, Model, Write},
};
use crate::{
    history::{Event, Outcome, Seen},
    nemesis::FaultRecord,
    rng::DataGen,
};

/// When the cluster was quiet, and when each node was under a process fault.
pub struct Windows {
    /// Intervals (wall ms) that are not quiet: a fault, or its settle time.
    busy: Vec<(u64, u64)>,
    /// Per node: intervals its process was killed, stopped or restarting.
    node_busy: Vec<Vec<(u64, u64)>>,
}

impl Windows {
    pub fn new(faults: &[FaultRecord], settle_ms: u64, run_start_ms: u64, nodes: usize) -> Self {
        let mut busy = vec![(run_start_ms, run_start_ms + settle_ms)];
        let mut node_busy = vec![Vec::new(); nodes];
        for f in faults.iter().filter(|f| f.executed) {
            busy.push((f.start_ms, f.end_ms + settle_ms));
            if f.is_process_fault()
                && let Some(n) = f.node
            {
                node_busy[n].push((f.start_ms, f.end_ms + 2_000));
            }
        }
        Self { busy, node_busy }
    }

    /// No fault, and none within the settle time before, during `from..=to`.
    pub fn quiet(&self, from: u64, to: u64) -> bool {
        !self.busy.iter().any(|(s, e)| *s <= to && from <= *e)
    }

    /// Whether `node`'s own process was faulted during `from..=to`.
    pub fn gateway_faulted(&self, node: usize, from: u64, to: u64) -> bool {
        self.node_busy
            .get(node)
            .is_some_and(|v| v.iter().any(|(s, e)| *s <= to && from <= *e))
    }
}

/// What the history checks need.
pub struct Ctx<'a> {
    pub model: &'a Model<'a>,
    pub windows: &'a Windows,
    pub seed: u64,
    pub violations: &'a Violations,
}

/// Runs checks 2 and 7 over every event.
pub fn check_history(events: &[Event], ctx: &Ctx) {
    for ev in events {
        match ev.op.kind.name() {
            "get" | "range" => check_read(ev, ctx),
            "stat" => {
                if let Some(s) = &ev.stat {
                    check_seen(ev, s, ctx);
                }
                check_code(ev, ctx);
            }
            "list" => {
                for s in ev.list.iter().flatten() {
                    if !s.key.starts_with(&ev.op.key) {
                        ctx.violations.add(
                            2,
                            format!(
                                "op {} listed {:?} for prefix {:?}",
                                ev.op.id, s.key, ev.op.key
                            ),
                        );
                    }
                    check_seen(ev, s, ctx);
                }
                check_code(ev, ctx);
            }
            "put" | "pause" | "cancel" => check_ack(ev, ctx),
            _ => {}
        }
        check_quiet_read(ev, ctx);
    }
}

/// An acknowledged upload: the node must describe exactly the data sent.
fn check_ack(ev: &Event, ctx: &Ctx) {
    let (Some(p), Outcome::Ok) = (&ev.put, &ev.outcome) else {
        return;
    };
    if !p.sent_all {
        ctx.violations.add(
            2,
            format!(
                "op {} was acknowledged before its stream ended ({} of {} bytes sent)",
                ev.op.id, p.sent, p.size
            ),
        );
    }
    match &ev.stat {
        Some(s) if s.sha1 == p.sha1 && s.size == p.size && s.key == ev.op.key => {}
        other => ctx.violations.add(
            2,
            format!(
                "op {} uploaded {} bytes with sha1 {}, acknowledged as {:?}",
                ev.op.id,
                p.size,
                p.sha1,
                other.as_ref().map(|s| (&s.key, s.size, &s.sha1))
            ),
        ),
    }
}

/// A stat or list entry must be an upload of that key started before.
fn check_seen(ev: &Event, s: &Seen, ctx: &Ctx) {
    if ev.op.kind.name() == "stat" && s.key != ev.op.key {
        ctx.violations.add(
            2,
            format!(
                "op {} asked for {:?} and got {:?}",
                ev.op.id, ev.op.key, s.key
            ),
        );
    }
    match ctx.model.identify(s, Some(ev.complete_ms)) {
        Identity::Upload(_) => {}
        Identity::Abandoned(w) => ctx.violations.add(
            2,
            format!(
                "op {} ({}) saw {:?} as op {}, an upload abandoned mid-stream",
                ev.op.id,
                ev.op.kind.name(),
                s.key,
                w.ev.op.id
            ),
        ),
        Identity::Foreign(why) => ctx
            .violations
            .add(2, format!("op {} ({}): {why}", ev.op.id, ev.op.kind.name())),
    }
}

fn check_read(ev: &Event, ctx: &Ctx) {
    let Some(r) = &ev.read else { return };
    if let Some(p) = &r.protocol {
        ctx.violations.add(
            7,
            format!(
                "op {} read {:?}: the stream broke its shape: {p}",
                ev.op.id, ev.op.key
            ),
        );
    }
    let Some(info) = &r.info else {
        if ev.outcome.is_ok() {
            ctx.violations.add(
                7,
                format!(
                    "op {} read {:?}: OK without an info message",
                    ev.op.id, ev.op.key
                ),
            );
        }
        return check_code(ev, ctx);
    };
    if info.key != ev.op.key {
        ctx.violations.add(
            2,
            format!(
                "op {} read {:?} and got object {:?}",
                ev.op.id, ev.op.key, info.key
            ),
        );
    }
    match ctx.model.identify(info, Some(ev.complete_ms)) {
        Identity::Upload(w) => check_bytes(ev, info, &w, ctx),
        Identity::Abandoned(w) => ctx.violations.add(
            2,
            format!(
                "op {} read {:?} as op {}, an upload abandoned mid-stream",
                ev.op.id, ev.op.key, w.ev.op.id
            ),
        ),
        Identity::Foreign(why) => ctx
            .violations
            .add(2, format!("op {} read: {why}", ev.op.id)),
    }
    if !ev.outcome.is_ok() {
        check_code(ev, ctx);
    }
}

/// The bytes a read delivered must be the requested range of the upload
/// its info names: all of it when the read succeeded, a prefix otherwise.
fn check_bytes(ev: &Event, info: &Seen, w: &Write, ctx: &Ctx) {
    let r = ev.read.as_ref().expect("a read");
    let Some((offset, len)) = resolve(info.size, r.offset, r.length) else {
        if ev.outcome.is_ok() {
            ctx.violations.add(
                7,
                format!(
                    "op {} read {}+{} of a {}-byte object and got OK instead of OUT_OF_RANGE",
                    ev.op.id, r.offset, r.length, info.size
                ),
            );
        }
        return;
    };
    if ev.outcome.is_ok() && r.got_len != len {
        ctx.violations.add(
            2,
            format!(
                "op {} read {:?} {offset}+{len}: OK with {} bytes (partial or too long)",
                ev.op.id, ev.op.key, r.got_len
            ),
        );
        return;
    }
    if r.got_len > len {
        ctx.violations.add(
            2,
            format!(
                "op {} got {} bytes for a {len}-byte range",
                ev.op.id, r.got_len
            ),
        );
        return;
    }
    let expected = if offset == 0 && r.got_len == info.size {
        info.sha1.clone()
    } else {
        let bytes = DataGen::new(ctx.seed, w.ev.op.id).bytes(offset, r.got_len as usize);
        hex::encode(Sha1::digest(&bytes))
    };
    if r.got_sha1 != expected {
        ctx.violations.add(
            2,
            format!(
                "op {} read {:?} {offset}+{} ({}): the bytes are not those of op {} at that range",
                ev.op.id,
                ev.op.key,
                r.got_len,
                ev.outcome.label(),
                w.ev.op.id
            ),
        );
    }
}

/// `(offset, len)` of a request against an object size, as the node
/// resolves it; None when it is out of range.
pub fn resolve(size: u64, offset: u64, length: u64) -> Option<(u64, u64)> {
    if offset > size {
        return None;
    }
    let len = if length == 0 { size - offset } else { length };
    (len <= size - offset).then_some((offset, len))
}

/// Error codes: the documented ones, or anything when the node answering
/// was itself being killed, stopped or restarted.
fn check_code(ev: &Event, ctx: &Ctx) {
    let Outcome::Err { code, msg } = &ev.outcome else {
        return;
    };
    let kind = ev.op.kind.name();
    let documented = match code.as_str() {
        "UNAVAILABLE" => true,
        "NOT_FOUND" => kind != "list",
        "DATA_LOSS" => kind == "get" || kind == "range",
        "OUT_OF_RANGE" => kind == "range" && out_of_range_possible(ev, ctx),
        _ => false,
    };
    if documented
        || ctx
            .windows
            .gateway_faulted(ev.op.node, ev.invoke_ms, ev.complete_ms)
    {
        return;
    }
    ctx.violations.add(
        7,
        format!(
            "op {} {kind} {:?} through n{}: {code} is not a documented answer ({msg})",
            ev.op.id,
            ev.op.key,
            ev.op.node + 1
        ),
    );
}

/// Whether some version the read could have met makes its range invalid.
fn out_of_range_possible(ev: &Event, ctx: &Ctx) -> bool {
    let Some(r) = &ev.read else { return false };
    ctx.model.writes(&ev.op.key).iter().any(|w| {
        w.ev.invoke_ms <= ev.complete_ms
            && w.put().is_some_and(|p| {
                w.fate != Fate::Never && resolve(p.size, r.offset, r.length).is_none()
            })
    })
}

/// "Any node serves any object": a read in a quiet window of a key that
/// certainly exists must succeed.
fn check_quiet_read(ev: &Event, ctx: &Ctx) {
    let kind = ev.op.kind.name();
    if !matches!(kind, "get" | "range" | "stat")
        || ev.outcome.is_ok()
        || matches!(ev.outcome, Outcome::Timeout)
        || !ctx.windows.quiet(ev.invoke_ms, ev.complete_ms)
    {
        return;
    }
    let t = &ctx.model.timing;
    let writes = ctx.model.writes(&ev.op.key);
    let live = writes.iter().find(|u| {
        !u.is_delete()
            && matches!(u.fate, Fate::Acked(_))
            && u.ev.complete_ms + t.margin_ms < ev.invoke_ms
            && !writes.iter().any(|d| {
                d.is_delete()
                    && matches!(d.fate, Fate::Acked(_) | Fate::Maybe)
                    && d.ev.invoke_ms < ev.complete_ms
                    && !t.certainly_after(d.ev, u.ev)
            })
    });
    let Some(u) = live else { return };
    if ev.outcome.label() == "OUT_OF_RANGE" && out_of_range_possible(ev, ctx) {
        return;
    }
    ctx.violations.add(7, format!(
        "op {} {kind} {:?} through n{} on a quiet cluster: {} although op {} (acknowledged) made it exist",
        ev.op.id, ev.op.key, ev.op.node + 1, ev.outcome.label(), u.ev.op.id
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        check::{fixtures::*, model::Timing},
        history::ReadDetail,
        plan::{OpKind, PlannedOp},
    };

    #[allow(clippy::too_many_arguments)]
    fn read(
        id: u64,
        key: &str,
        offset: u64,
        length: u64,
        t: (u64, u64),
        info: Option<Seen>,
        got: &[u8],
        outcome: Outcome,
    ) -> Event {
        let kind = if offset == 0 && length == 0 {
            OpKind::Get
        } else {
            OpKind::GetRange { a: 0, b: 0 }
        };
        let op = PlannedOp {
            id,
            client: 1,
            at_ms: 0,
            node: 1,
            key: key.into(),
            kind,
        };
        let mut e = Event::new(&op, t.0);
        e.complete_ms = t.1;
        e.outcome = outcome;
        e.read = Some(ReadDetail {
            offset,
            length,
            info,
            got_len: got.len() as u64,
            got_sha1: hex::encode(Sha1::digest(got)),
            protocol: None,
        });
        e
    }

    /// Checks `events` with no faults at all (every window after the
    /// first second is quiet) and returns the checks that failed.
    fn failures(events: &[Event]) -> Vec<u8> {
        failures_settling(events, 1_000)
    }

    /// As [`failures`], with the cluster settling until `settle_ms`.
    fn failures_settling(events: &[Event], settle_ms: u64) -> Vec<u8> {
        let model = Model::build(
            events,
            Timing {
                spread_ms: 0,
                margin_ms: 5,
            },
        );
        let windows = Windows::new(&[], settle_ms, 0, 3);
        let violations = Violations::default();
        check_history(
            events,
            &Ctx {
                model: &model,
                windows: &windows,
                seed: SEED,
                violations: &violations,
            },
        );
        violations.all().iter().map(|v| v.check).collect()
    }

    #[test]
    fn whole_and_ranged_reads_of_the_right_bytes_pass() {
        let up = acked(1, "k", 1000, 2_000, 2_010, 2_005);
        let data = DataGen::new(SEED, 1).bytes(0, 1000);
        let events = vec![
            up.clone(),
            read(
                2,
                "k",
                0,
                0,
                (3_000, 3_010),
                Some(seen_of(&up)),
                &data,
                Outcome::Ok,
            ),
            read(
                3,
                "k",
                100,
                50,
                (3_000, 3_010),
                Some(seen_of(&up)),
                &data[100..150],
                Outcome::Ok,
            ),
            read(
                4,
                "k",
                100,
                0,
                (3_000, 3_010),
                Some(seen_of(&up)),
                &data[100..],
                Outcome::Ok,
            ),
        ];
        assert_eq!(failures(&events), Vec::<u8>::new());
        // During faults, a read that fails midway may have delivered a correct prefix.
        let cut = read(
            5,
            "k",
            0,
            0,
            (3_000, 3_010),
            Some(seen_of(&up)),
            &data[..300],
            Outcome::Err {
                code: "UNAVAILABLE".into(),
                msg: String::new(),
            },
        );
        assert_eq!(
            failures_settling(&[up.clone(), cut.clone()], 10_000),
            Vec::<u8>::new()
        );
        // On a quiet cluster the same failure breaks "any node serves any object".
        assert_eq!(failures(&[up, cut]), [7]);
    }

    #[test]
    fn partial_wrong_and_early_bytes_are_check_2() {
        let up = acked(1, "k", 1000, 2_000, 2_010, 2_005);
        let data = DataGen::new(SEED, 1).bytes(0, 1000);
        let mut wrong = data.clone();
        wrong[500] ^= 1;
        assert_eq!(
            failures(&[
                up.clone(),
                read(
                    2,
                    "k",
                    0,
                    0,
                    (3_000, 3_010),
                    Some(seen_of(&up)),
                    &data[..999],
                    Outcome::Ok
                )
            ]),
            [2]
        );
        assert_eq!(
            failures(&[
                up.clone(),
                read(
                    2,
                    "k",
                    0,
                    0,
                    (3_000, 3_010),
                    Some(seen_of(&up)),
                    &wrong,
                    Outcome::Ok
                )
            ]),
            [2]
        );
        assert_eq!(
            failures(&[
                up.clone(),
                read(
                    2,
                    "k",
                    10,
                    5,
                    (3_000, 3_010),
                    Some(seen_of(&up)),
                    &data[11..16],
                    Outcome::Ok
                )
            ]),
            [2]
        );
        // Seen before the upload started: foreign at that time.
        assert_eq!(
            failures(&[
                up.clone(),
                read(
                    2,
                    "k",
                    0,
                    0,
                    (1_000, 1_500),
                    Some(seen_of(&up)),
                    &data,
                    Outcome::Ok
                )
            ]),
            [2]
        );
    }

    #[test]
    fn undocumented_codes_and_failures_on_a_quiet_cluster_are_check_7() {
        let up = acked(1, "k", 1000, 2_000, 2_010, 2_005);
        let internal = Outcome::Err {
            code: "INTERNAL".into(),
            msg: String::new(),
        };
        assert_eq!(
            failures(&[
                up.clone(),
                read(2, "k", 0, 0, (3_000, 3_010), None, &[], internal)
            ]),
            [7, 7]
        );
        let lost = Outcome::Err {
            code: "DATA_LOSS".into(),
            msg: String::new(),
        };
        assert_eq!(
            failures(&[
                up.clone(),
                read(2, "k", 0, 0, (3_000, 3_010), None, &[], lost.clone())
            ]),
            [7]
        );
        // Not quiet (within the first second, the cluster's settle time): allowed.
        let early = acked(1, "k", 1000, 100, 110, 105);
        assert_eq!(
            failures(&[early, read(2, "k", 0, 0, (500, 600), None, &[], lost)]),
            Vec::<u8>::new()
        );
    }

    #[test]
    fn ranges_resolve_like_the_node() {
        assert_eq!(resolve(10, 0, 0), Some((0, 10)));
        assert_eq!(resolve(10, 10, 0), Some((10, 0)));
        assert_eq!(resolve(10, 11, 0), None);
        assert_eq!(resolve(10, 5, 6), None);
        assert_eq!(resolve(10, 5, 5), Some((5, 5)));
    }
}
