//! The node's buffer budget as the peer protocol's [`BodyBudget`]: request
//! bodies received from peers are paid from the same budget as every other
//! chunk buffer of the node.

use std::{future::Future, pin::Pin};

use super::BufferBudget;
use crate::p2p::{BodyBudget, BodyPermit};

impl BodyBudget for BufferBudget {
    fn acquire(&self, bytes: usize) -> Pin<Box<dyn Future<Output = BodyPermit> + Send + '_>> {
        Box::pin(async move { Box::new(BufferBudget::acquire(self, bytes).await) as BodyPermit })
    }
}
