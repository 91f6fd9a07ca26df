//! The file system client: `blocks` is the block data path (routing, replica failover,
//! placement refresh), `cache` the client's block cache, `file` the per-open-file write-back
//! state, `fs` the FUSE callbacks, `engine` the prefetch engine (the `model` predictor run on
//! every read), `mount` what `augur mount` and `augur dev` call.

pub mod blocks;
pub mod cache;
pub mod engine;
pub mod file;
pub mod fs;
pub mod mount;
pub mod stats;
pub mod trace;

pub use blocks::{BlockClient, BlockError};
pub use fs::MountOptions;
pub use mount::{Mounted, mount};
