//! The budget request bodies from peers are paid from.
//!
//! A body is paid from the node's buffer budget when the budget has room at
//! once; otherwise from a small reserve that only peer bodies use. Waiting
//! on the shared budget could deadlock: an upload holds its buffers while it
//! waits for peers to take its copies, so two nodes whose budgets are full
//! of uploads to each other would each wait, in their peer servers, for the
//! other's uploads to finish (measured: every upload stuck until the 30 s
//! peer request timeout). A body paid from the reserve waits only for other
//! peer bodies, which finish without waiting for anyone. So memory for chunk
//! buffers is bounded by the budget plus the reserve (one chunk).

use std::{future::Future, pin::Pin, sync::Arc};

use tokio::sync::Semaphore;

use super::BufferBudget;
use crate::p2p::{BodyBudget, BodyPermit};

/// The node's budget, and the reserve for when it is full.
pub(super) struct PeerBodyBudget {
    budget: BufferBudget,
    reserve: Arc<Semaphore>,
    reserve_bytes: usize,
}

impl PeerBodyBudget {
    /// Pays from `budget`, falling back to a reserve of `reserve` bytes.
    pub(super) fn new(budget: BufferBudget, reserve: usize) -> Self {
        Self {
            budget,
            reserve: Arc::new(Semaphore::new(reserve)),
            reserve_bytes: reserve,
        }
    }
}

impl BodyBudget for PeerBodyBudget {
    fn acquire(&self, bytes: usize) -> Pin<Box<dyn Future<Output = BodyPermit> + Send + '_>> {
        Box::pin(async move {
            if let Some(permit) = self.budget.try_acquire(bytes) {
                return Box::new(permit) as BodyPermit;
            }
            // A body larger than the reserve takes all of it.
            let n = bytes.clamp(1, self.reserve_bytes) as u32;
            match self.reserve.clone().acquire_many_owned(n).await {
                Ok(permit) => Box::new(permit) as BodyPermit,
                // The semaphore is never closed.
                Err(_) => Box::new(()) as BodyPermit,
            }
        })
    }
}
