//! `augur mount`: serve a volume through FUSE until unmounted or signalled.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use augur_fs_client::MountOptions;
use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::admin::MetaArgs;

#[derive(Args)]
pub struct MountArgs {
    /// Volume to mount (see `augur volume list`).
    pub volume: String,
    /// Empty directory to mount it on.
    pub mountpoint: PathBuf,
    #[command(flatten)]
    pub tuning: MountTuning,
    #[command(flatten)]
    pub meta: MetaArgs,
}

/// Client limits and caching; the defaults suit a workstation.
#[derive(Args, Clone)]
pub struct MountTuning {
    /// Client block cache in MiB (0 turns it off; at most 1 TiB).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(0..=1 << 20))]
    pub cache_mb: u64,
    /// Block uploads in flight over all files, in MiB (1 to 65536); writers wait beyond it.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1 << 16))]
    pub write_back_mb: u64,
    /// Most blocks read ahead of a sequential reader (at most 4096, as a `readahead:N` hint).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(0..=i64::from(augur_proto::meta::READAHEAD_BLOCKS_MAX)))]
    pub readahead_blocks: u32,
    /// Block fetches for prefetching (the engine's and readahead hints') in flight over all
    /// files, which bounds prefetched bytes in flight to N blocks. Blocks named past it wait in
    /// a queue of 256 and are dropped unfetched (counted `stale`) once their file has been read
    /// 8 more times. Demand reads never wait for prefetches.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub prefetch_in_flight: u64,
    /// How long the kernel may cache attributes and names, in ms (0 asks every time).
    #[arg(long, default_value_t = 1000)]
    pub attr_ttl_ms: u64,
    /// How long written data may stay on this client only, in ms: a file written this long ago
    /// and still open unflushed is written back in the background (blocks to the replicas,
    /// size to the meta group), like the kernel's write-back, so a client crash loses at most
    /// about this much and other mounts see it. 0 turns it off (data then leaves at close,
    /// fsync, or when the dirty limits are reached).
    #[arg(long, default_value_t = 30_000)]
    pub dirty_expire_ms: u64,
    /// Threads reading requests from /dev/fuse.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub fuse_threads: u64,
    /// Let only the mounting user in (no `allow_other`; by default root mounts for everyone).
    #[arg(long)]
    pub private: bool,
    /// Do not let the kernel check permissions from mode bits (`default_permissions` off).
    #[arg(long)]
    pub no_default_permissions: bool,
    /// Record every read and write request to FILE (CSV in the shape of the shared traces, the
    /// file's inode as the stream, plus the file's type group) for `augur trace eval|features`
    /// and training. Requests are queued (65 536 at most; past it records are dropped and
    /// counted), never delayed.
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// The prefetch engine's ONNX model (`prefetch.json` beside it). Files whose
    /// `user.augur.prefetch` is `auto` (the default) are prefetched by it; if it is missing or
    /// corrupt the client says so in its log and prefetches with the heuristic predictor
    /// (`auto`: per file, the heuristic that lately would have hidden the most fetch time, of
    /// those whose wasted fetches cost less; none when nothing can be foreseen).
    #[arg(long, env = "AUGUR_MODEL", default_value = "models/prefetch.onnx")]
    pub model: PathBuf,
}

impl MountTuning {
    pub fn options(&self) -> MountOptions {
        let mut o = MountOptions {
            cache_bytes: self.cache_mb << 20,
            write_back_bytes: self.write_back_mb << 20,
            readahead_blocks_max: self.readahead_blocks,
            prefetch_in_flight_max: self.prefetch_in_flight as usize,
            attr_ttl: Duration::from_millis(self.attr_ttl_ms),
            dirty_expire: Duration::from_millis(self.dirty_expire_ms),
            fuse_threads: self.fuse_threads as usize,
            default_permissions: !self.no_default_permissions,
            trace: self.trace.clone(),
            model: Some(self.model.clone()),
            ..MountOptions::default()
        };
        if self.private {
            o.allow_other = false;
        }
        o
    }
}

pub async fn run(args: MountArgs) -> Result<()> {
    let meta = Arc::new(args.meta.client()?);
    let mounted = augur_fs_client::mount(meta, &args.volume, &args.mountpoint, args.tuning.options()).await?;
    let shutdown = CancellationToken::new();
    crate::cancel_on_signal(shutdown.clone())?;
    // The one line on stdout: scripts and tests wait for it.
    println!("augur mounted {} on {}", args.volume, args.mountpoint.display());
    mounted.run_until(shutdown).await?;
    println!("unmounted {}", args.mountpoint.display());
    Ok(())
}
