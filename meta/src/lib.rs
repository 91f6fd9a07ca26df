//! Augur's metadata group: a raft-rs `RawNode` driven by one thread, raft-engine as the Raft
//! log, RocksDB as the state machine (namespace, volumes, shard placement, storage nodes), and
//! the RPC service and client around it.

pub mod client;
pub mod group;
pub mod logstore;
pub mod placement;
pub mod server;
pub mod service;
pub mod state;
pub mod transport;

pub use client::{MetaClient, parse_addrs};
pub use server::{MetaConfig, MetaError, MetaServer};
