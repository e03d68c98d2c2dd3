//! Check 5 at the moment of acknowledgement: "an upload is acknowledged
//! only when every chunk is durable on W distinct nodes". Right after each
//! acknowledged upload the workload looked in every node's data directory
//! for each chunk, and asked the gateway which members it saw up just
//! before the upload and just after. W is R when the gateway saw at least R
//! members up all along (README "Writes"), and never less than a majority
//! of R. Distinct data directories are distinct nodes, whatever ids they
//! answer to, so a copy counted twice by the cluster counts once here.

use super::Violations;
use crate::{history::Event, nemesis::FaultRecord};

fn overlaps(f: &FaultRecord, from: u64, to: u64) -> bool {
    f.executed && f.start_ms <= to && from <= f.end_ms
}

/// Reports acknowledged uploads with chunks on fewer disks than W.
pub fn check(events: &[Event], faults: &[FaultRecord], r: usize, violations: &Violations) {
    let majority = r / 2 + 1;
    for ev in events.iter().filter(|e| e.outcome.is_ok()) {
        let (Some(a), Some(p)) = (&ev.ack, &ev.put) else {
            continue;
        };
        let (from, to) = (ev.invoke_ms, a.checked_ms);
        // Data destroyed on purpose in the meantime is not the upload's fault.
        if faults
            .iter()
            .any(|f| overlaps(f, from, to) && matches!(f.kind, "replace" | "forget"))
        {
            continue;
        }
        let calm = !faults
            .iter()
            .any(|f| overlaps(f, from, to) && f.kind != "flip");
        let all_up = match (&a.up_before, &a.up_after) {
            (Some(b), Some(after)) => b == after && b.len() >= r,
            _ => false,
        };
        let need = if calm && all_up { r } else { majority };
        let short: Vec<(usize, u8)> = a
            .copies
            .iter()
            .enumerate()
            .filter(|(_, c)| usize::from(**c) < need)
            .map(|(i, c)| (i, *c))
            .collect();
        let Some((first, copies)) = short.first() else {
            continue;
        };
        let seen = a.up_before.as_ref().map_or(0, Vec::len);
        violations.add(
            5,
            format!(
                "op {} {:?} was acknowledged through n{} (which saw {seen} members up, so W = {need}) \
                 while {} of its {} chunks were on fewer than {need} nodes' disks, e.g. chunk #{first} {} on {copies}",
                ev.op.id,
                ev.op.key,
                ev.op.node + 1,
                short.len(),
                a.copies.len(),
                hex::encode(p.chunks[*first]),
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{check::fixtures::*, history::AckCheck};

    fn with_ack(mut e: Event, up: usize, copies: Vec<u8>) -> Event {
        let ids: Vec<String> = (0..up).map(|i| format!("n{i}")).collect();
        e.put.as_mut().unwrap().chunks = vec![[7; 20]; copies.len()];
        e.ack = Some(AckCheck {
            up_before: Some(ids.clone()),
            up_after: Some(ids),
            copies,
            checked_ms: e.complete_ms,
        });
        e
    }

    fn fault(kind: &'static str, start_ms: u64, end_ms: u64) -> FaultRecord {
        FaultRecord {
            id: 0,
            kind,
            node: Some(0),
            start_ms,
            end_ms,
            executed: true,
            note: String::new(),
        }
    }

    fn count(events: &[Event], faults: &[FaultRecord]) -> usize {
        let v = Violations::default();
        check(events, faults, 3, &v);
        v.count()
    }

    #[test]
    fn all_up_means_every_chunk_on_r_disks() {
        let up = acked(1, "k", 10, 100, 110, 105);
        assert_eq!(count(&[with_ack(up.clone(), 3, vec![3, 3])], &[]), 0);
        assert_eq!(
            count(&[with_ack(up.clone(), 3, vec![3, 2])], &[]),
            1,
            "W = R = 3"
        );
        // A ghost member makes the gateway see four up: still W = 3.
        assert_eq!(count(&[with_ack(up.clone(), 4, vec![2, 2])], &[]), 1);
        // Fewer members up: a majority of R.
        assert_eq!(count(&[with_ack(up.clone(), 2, vec![2, 2])], &[]), 0);
        assert_eq!(count(&[with_ack(up.clone(), 2, vec![1, 2])], &[]), 1);
    }

    #[test]
    fn faults_relax_or_excuse_the_count() {
        let up = acked(1, "k", 10, 100, 110, 105);
        assert_eq!(
            count(
                &[with_ack(up.clone(), 3, vec![2])],
                &[fault("kill", 90, 105)]
            ),
            0,
            "not calm: majority"
        );
        assert_eq!(
            count(
                &[with_ack(up.clone(), 3, vec![1])],
                &[fault("kill", 90, 105)]
            ),
            1
        );
        assert_eq!(
            count(
                &[with_ack(up.clone(), 3, vec![0])],
                &[fault("replace", 90, 105)]
            ),
            0,
            "destroyed on purpose"
        );
        assert_eq!(
            count(
                &[with_ack(up.clone(), 3, vec![2])],
                &[fault("kill", 10, 50)]
            ),
            1,
            "a fault long over"
        );
    }
}
