//! Augur storage node: a RocksDB block store served over QUIC with mutual TLS.
//!
//! `store` keeps blocks durably with a CRC each; `placement` decides whether a request's shard
//! and epoch are served here; `cache` holds hot and warmed blocks; `service` answers RPCs;
//! `server` wires them to a QUIC endpoint.

pub mod cache;
pub mod config;
pub mod placement;
pub mod server;
pub mod service;
pub mod space;
pub mod store;

pub use config::NodeConfig;
pub use server::{Node, NodeError};
