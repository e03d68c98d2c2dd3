//! The checker: what the history and the healed cluster must show. Each
//! violation names the promise it breaks, numbered as in docs/TESTING.md:
//!
//! 1. acknowledged uploads survive and read back byte-exact through every node;
//! 2. reads return exactly the bytes of an upload of that key, never partial,
//!    mixed or foreign bytes;
//! 3. acknowledged deletes stay deleted (no resurrection);
//! 4. all nodes converge to the same listing;
//! 5. every chunk of every live object has R verified copies on distinct nodes
//!    after healing, and was on W nodes' disks when its upload was acknowledged;
//! 6. no node exits unless the harness made it, and memory stays bounded;
//! 7. the documented behaviour of reads during faults holds.

pub mod acks;
pub mod final_state;
pub mod model;
pub mod reads;
pub mod replicas;

use std::sync::Mutex;

/// Violations of one check printed as they are found; the rest go to the file.
const PRINT_PER_CHECK: usize = 15;

/// One broken promise.
#[derive(Debug, Clone)]
pub struct Violation {
    pub check: u8,
    pub what: String,
}

/// Violations found so far, from every part of the run.
#[derive(Default)]
pub struct Violations(Mutex<Vec<Violation>>);

impl Violations {
    pub fn add(&self, check: u8, what: impl Into<String>) {
        let v = Violation {
            check,
            what: what.into(),
        };
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let same = all.iter().filter(|o| o.check == v.check).count();
        // The file has them all; the terminal gets the first few of each kind.
        if same < PRINT_PER_CHECK {
            println!("chaos: VIOLATION (check {}): {}", v.check, v.what);
        } else if same == PRINT_PER_CHECK {
            println!(
                "chaos: more violations of check {} follow in violations.txt",
                v.check
            );
        }
        all.push(v);
    }

    pub fn all(&self) -> Vec<Violation> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn count(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Hand-made histories for the checker's own tests: a checker that cannot
/// fail is a defect too.
#[cfg(test)]
pub mod fixtures {
    use crate::{
        history::{Event, Outcome, PutDetail, Seen, Ver},
        plan::{OpKind, PlannedOp},
        rng::DataGen,
    };
    use sha1::{Digest, Sha1};

    pub const SEED: u64 = 42;

    fn op(id: u64, key: &str, kind: OpKind) -> PlannedOp {
        PlannedOp {
            id,
            client: 0,
            at_ms: 0,
            node: 0,
            key: key.into(),
            kind,
        }
    }

    pub fn ver(ms: u64, node: &str) -> Ver {
        Ver {
            hlc: ms << 16,
            node: node.into(),
        }
    }

    /// The SHA-1 of op `id`'s `size` bytes.
    pub fn sha1_of(id: u64, size: u64) -> String {
        hex::encode(Sha1::digest(DataGen::new(SEED, id).bytes(0, size as usize)))
    }

    /// An upload of `size` bytes, invoked at `t0` and answered at `t1`.
    #[allow(clippy::too_many_arguments)]
    pub fn put(
        id: u64,
        key: &str,
        size: u64,
        t0: u64,
        t1: u64,
        outcome: Outcome,
        v: Option<Ver>,
        sent_all: bool,
    ) -> Event {
        let mut e = Event::new(&op(id, key, OpKind::Put { size }), t0);
        e.complete_ms = t1;
        let sha1 = sha1_of(id, size);
        e.put = Some(PutDetail {
            size,
            sha1: sha1.clone(),
            chunks: vec![],
            sent: size,
            sent_all,
        });
        if outcome.is_ok() {
            e.stat = Some(Seen {
                key: key.into(),
                sha1,
                size,
                version: v.clone(),
            });
        }
        e.outcome = outcome;
        e.version = v;
        e
    }

    pub fn acked(id: u64, key: &str, size: u64, t0: u64, t1: u64, v_ms: u64) -> Event {
        put(
            id,
            key,
            size,
            t0,
            t1,
            Outcome::Ok,
            Some(ver(v_ms, "a")),
            true,
        )
    }

    pub fn delete(id: u64, key: &str, t0: u64, t1: u64, outcome: Outcome, v: Option<Ver>) -> Event {
        let mut e = Event::new(&op(id, key, OpKind::Delete), t0);
        e.complete_ms = t1;
        e.outcome = outcome;
        e.version = v;
        e
    }

    pub fn seen_of(e: &Event) -> Seen {
        let p = e.put.as_ref().unwrap();
        Seen {
            key: e.op.key.clone(),
            sha1: p.sha1.clone(),
            size: p.size,
            version: e.version.clone(),
        }
    }

    pub fn unavailable() -> Outcome {
        Outcome::Err {
            code: "UNAVAILABLE".into(),
            msg: String::new(),
        }
    }
}
