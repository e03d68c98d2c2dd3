//! The checker: what the history and the healed cluster must show. Each
//! violation names the promise it breaks, numbered as in docs/TESTING.md:
//!
//! 1. acknowledged uploads survive and read back byte-exact through every node;
//! 2. reads return exactly the bytes of an upload of that key, never partial,
//!    mixed or foreign bytes;
//! 3. acknowledged deletes stay deleted (no resurrection);
//! 4. all nodes converge to the same listing;
//! 5. every chunk of every live object has R verified copies on distinct nodes;
//! 6. no node exits unless the harness made it, and memory stays bounded;
//! 7. the documented behaviour of reads during faults holds.

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
            println!("chaos: more violations of check {} follow in violations.txt", v.check);
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
