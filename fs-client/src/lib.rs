//! The file system client. `blocks` is the block data path (routing, replica failover,
//! placement refresh); the FUSE file system itself comes with its own issue.

pub mod blocks;

pub use blocks::{BlockClient, BlockError};
