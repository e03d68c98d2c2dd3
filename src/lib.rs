//! dfs: a decentralized, content-addressed, encrypted file store.
//!
//! The crate is organised in rooms that data flows through in one direction:
//! `grpc -> node -> (crypto, store, index)`. See `docs/ARCHITECTURE.md`.

pub mod alloc;
pub mod bench;
pub mod budget;
pub mod bufpool;
pub mod chunks;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod crypto;
pub mod fsutil;
pub mod grpc;
pub mod identity;
pub mod index;
pub mod metrics;
pub mod node;
pub mod p2p;
pub mod store;
pub mod units;

/// Generated protobuf and gRPC code for the `dfs.v1` package.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("dfs.v1");

    /// Encoded `FileDescriptorSet` of every dfs `.proto`, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/dfs_descriptor.bin"));
}
