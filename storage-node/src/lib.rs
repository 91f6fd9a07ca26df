//! Augur storage node: a RocksDB block store served over QUIC with mutual TLS.
//!
//! `store` keeps blocks durably with a CRC each; `placement` decides whether a request's shard
//! and epoch are served here; `cache` holds hot and warmed blocks; `service` answers RPCs;
//! `server` wires them to a QUIC endpoint; `heartbeat` registers with the meta group and
//! installs the placement it hands out. Writes reach a shard's primary, which forwards the
//! resulting block to every backup before it acks.

pub mod cache;
pub mod config;
pub mod heartbeat;
pub mod placement;
pub mod server;
pub mod service;
pub mod space;
pub mod store;

pub use config::NodeConfig;
pub use server::{Node, NodeError};
