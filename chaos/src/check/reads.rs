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
                        ctx.violations.add(2, format!("op {} listed {:?} for prefix {:?}", ev.op.id, s.key, ev.op.key));
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
        ctx.violations.add(2, format!("op {} was acknowledged before its stream ended ({} of {} bytes sent)", ev.op.id, p.sent, p.size));
    }
    match &ev.stat {
        Some(s) if s.sha1 == p.sha1 && s.size == p.size && s.key == ev.op.key => {}
        other => ctx.violations.add(2, format!(
            "op {} uploaded {} bytes with sha1 {}, acknowledged as {:?}",
            ev.op.id, p.size, p.sha1, other.as_ref().map(|s| (&s.key, s.size, &s.sha1))
        )),
    }
}

/// A stat or list entry must be an upload of that key started before.
fn check_seen(ev: &Event, s: &Seen, ctx: &Ctx) {
    if ev.op.kind.name() == "stat" && s.key != ev.op.key {
        ctx.violations.add(2, format!("op {} asked for {:?} and got {:?}", ev.op.id, ev.op.key, s.key));
    }
    match ctx.model.identify(s, Some(ev.complete_ms)) {
        Identity::Upload(_) => {}
        Identity::Abandoned(w) => ctx.violations.add(2, format!(
            "op {} ({}) saw {:?} as op {}, an upload abandoned mid-stream",
            ev.op.id, ev.op.kind.name(), s.key, w.ev.op.id
        )),
        Identity::Foreign(why) => ctx.violations.add(2, format!("op {} ({}): {why}", ev.op.id, ev.op.kind.name())),
    }
}

fn check_read(ev: &Event, ctx: &Ctx) {
    let Some(r) = &ev.read else { return };
    if let Some(p) = &r.protocol {
        ctx.violations.add(7, format!("op {} read {:?}: the stream broke its shape: {p}", ev.op.id, ev.op.key));
    }
    let Some(info) = &r.info else {
        if ev.outcome.is_ok() {
            ctx.violations.add(7, format!("op {} read {:?}: OK without an info message", ev.op.id, ev.op.key));
        }
        return check_code(ev, ctx);
    };
    if info.key != ev.op.key {
        ctx.violations.add(2, format!("op {} read {:?} and got object {:?}", ev.op.id, ev.op.key, info.key));
    }
    match ctx.model.identify(info, Some(ev.complete_ms)) {
        Identity::Upload(w) => check_bytes(ev, info, &w, ctx),
        Identity::Abandoned(w) => ctx.violations.add(2, format!(
            "op {} read {:?} as op {}, an upload abandoned mid-stream",
            ev.op.id, ev.op.key, w.ev.op.id
        )),
        Identity::Foreign(why) => ctx.violations.add(2, format!("op {} read: {why}", ev.op.id)),
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
            ctx.violations.add(7, format!(
                "op {} read {}+{} of a {}-byte object and got OK instead of OUT_OF_RANGE",
                ev.op.id, r.offset, r.length, info.size
            ));
        }
        return;
    };
    if ev.outcome.is_ok() && r.got_len != len {
        ctx.violations.add(2, format!(
            "op {} read {:?} {offset}+{len}: OK with {} bytes (partial or too long)",
            ev.op.id, ev.op.key, r.got_len
        ));
        return;
    }
    if r.got_len > len {
        ctx.violations.add(2, format!("op {} got {} bytes for a {len}-byte range", ev.op.id, r.got_len));
        return;
    }
    let expected = if offset == 0 && r.got_len == info.size {
        info.sha1.clone()
    } else {
        let bytes = DataGen::new(ctx.seed, w.ev.op.id).bytes(offset, r.got_len as usize);
        hex::encode(Sha1::digest(&bytes))
    };
    if r.got_sha1 != expected {
        ctx.violations.add(2, format!(
            "op {} read {:?} {offset}+{} ({}): the bytes are not those of op {} at that range",
            ev.op.id, ev.op.key, r.got_len, ev.outcome.label(), w.ev.op.id
        ));
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
    if documented || ctx.windows.gateway_faulted(ev.op.node, ev.invoke_ms, ev.complete_ms) {
        return;
    }
    ctx.violations.add(7, format!(
        "op {} {kind} {:?} through n{}: {code} is not a documented answer ({msg})",
        ev.op.id, ev.op.key, ev.op.node + 1
    ));
}

/// Whether some version the read could have met makes its range invalid.
fn out_of_range_possible(ev: &Event, ctx: &Ctx) -> bool {
    let Some(r) = &ev.read else { return false };
    ctx.model.writes(&ev.op.key).iter().any(|w| {
        w.ev.invoke_ms <= ev.complete_ms
            && w.put().is_some_and(|p| w.fate != Fate::Never && resolve(p.size, r.offset, r.length).is_none())
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
