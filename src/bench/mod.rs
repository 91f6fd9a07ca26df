//! Benchmarks: programs that measure side by side in one run and print ratios.

pub mod fs;
pub mod meta;
pub mod node;
pub mod predictor;
pub mod prefetch;
