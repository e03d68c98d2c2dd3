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

use std::{future::Future, pin::Pin};

use tokio::sync::OwnedSemaphorePermit;

use super::BufferBudget;
use crate::p2p::{BodyBudget, BodyPermit};

/// The node's budget, and the reserve for when it is full.
pub(super) struct PeerBodyBudget {
    budget: BufferBudget,
    reserve: BufferBudget,
}

impl PeerBodyBudget {
    /// Pays from `budget`, falling back to a reserve of `reserve` bytes.
    pub(super) fn new(budget: BufferBudget, reserve: usize) -> Self {
        Self {
            budget,
            reserve: BufferBudget::new(reserve),
        }
    }
}

impl BufferBudget {
    /// Takes `bytes` of budget if they are free right now (the same
    /// clamping as `acquire`), without waiting.
    fn try_acquire_now(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let n = bytes.clamp(1, self.total) as u32;
        self.sem.clone().try_acquire_many_owned(n).ok()
    }
}

impl BodyBudget for PeerBodyBudget {
    fn acquire(&self, bytes: usize) -> Pin<Box<dyn Future<Output = BodyPermit> + Send + '_>> {
        Box::pin(async move {
            let permit = match self.budget.try_acquire_now(bytes) {
                Some(permit) => permit,
                None => self.reserve.acquire(bytes).await,
            };
            Box::new(permit) as BodyPermit
        })
    }
}
