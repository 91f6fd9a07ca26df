//! `augur bench fs`: the same file workload on an Augur mount and on a local directory, in one
//! run, with ratios. The Augur side is an embedded cluster like `augur dev` (3 meta members,
//! 3 storage nodes with 3 replicas over QUIC/mTLS on loopback, a FUSE mount in this process).
//!
//! Per run: sequential write of SIZE (1 MiB writes, then fsync), sequential read of it (caches
//! dropped first when running as root), 4 KiB reads at random aligned offsets at queue depth 1,
//! and FILES empty files created, stat'ed and unlinked one at a time. Medians over the runs.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::node::{median, percentile_us};
use crate::dev::DevCluster;
use crate::mount::MountTuning;

pub struct BenchOptions {
    pub runs: u32,
    pub size_mb: u64,
    pub samples: u32,
    pub files: u32,
    /// Directory for the local side (default: a temporary directory under /var/tmp).
    pub local: Option<PathBuf>,
    pub tuning: MountTuning,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Figures {
    pub seq_write_mib_s: f64,
    pub seq_read_mib_s: f64,
    pub rand_read_4k_us_p50: f64,
    pub rand_read_4k_us_p99: f64,
    pub create_ops_s: f64,
    pub stat_ops_s: f64,
    pub unlink_ops_s: f64,
}

/// Picks one figure out of a set.
type Metric = fn(&Figures) -> f64;

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub runs: u32,
    pub size_mib: u64,
    pub samples: u32,
    pub files: u32,
    pub caches_dropped: bool,
    pub augur: Figures,
    pub local: Figures,
    /// augur / local (for latencies, above 1 means Augur is slower).
    pub ratio: Figures,
}

impl BenchReport {
    pub fn table(&self) -> String {
        let mut out = format!(
            "augur bench fs: {} runs, {} MiB file, {} random 4 KiB reads, {} small files; medians{}\n",
            self.runs,
            self.size_mib,
            self.samples,
            self.files,
            if self.caches_dropped { "" } else { " (not root: page caches NOT dropped before reads)" }
        );
        out += &format!("{:<28}{:>12}{:>12}{:>10}\n", "metric", "augur", "local", "ratio");
        let rows: [(&str, Metric); 7] = [
            ("seq write (MiB/s)", |f| f.seq_write_mib_s),
            ("seq read (MiB/s)", |f| f.seq_read_mib_s),
            ("rand read 4 KiB p50 (us)", |f| f.rand_read_4k_us_p50),
            ("rand read 4 KiB p99 (us)", |f| f.rand_read_4k_us_p99),
            ("create (files/s)", |f| f.create_ops_s),
            ("stat (files/s)", |f| f.stat_ops_s),
            ("unlink (files/s)", |f| f.unlink_ops_s),
        ];
        for (name, get) in rows {
            out += &format!(
                "{name:<28}{:>12.1}{:>12.1}{:>10.2}\n",
                get(&self.augur),
                get(&self.local),
                get(&self.ratio)
            );
        }
        out
    }
}

pub async fn run(o: BenchOptions) -> Result<BenchReport> {
    let tmp = tempfile::Builder::new().prefix("augur-bench-fs").tempdir_in("/var/tmp")?;
    let local = match &o.local {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::Builder::new().prefix("augur-bench-local").tempdir_in("/var/tmp")?,
    };
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt)?;
    let cluster = DevCluster::start(&tmp.path().join("state"), "127.0.9.200".parse()?, "bench", true).await?;
    let mounted = augur_fs_client::mount(cluster.client()?, "bench", &mnt, o.tuning.options()).await?;
    let stop = CancellationToken::new();
    let serving = tokio::spawn(mounted.run_until(stop.clone()));

    let caches_dropped = drop_caches();
    let (mut augur, mut localf) = (Vec::new(), Vec::new());
    let result: Result<()> = async {
        for run in 0..o.runs {
            let a = measure(&mnt, &o, run).await.context("on the Augur mount")?;
            let l = measure(local.path(), &o, run).await.context("on the local directory")?;
            eprintln!("run {}: augur {a:?}\n       local {l:?}", run + 1);
            augur.push(a);
            localf.push(l);
        }
        Ok(())
    }
    .await;
    stop.cancel();
    let _ = serving.await;
    cluster.stop().await;
    result?;
    let (a, l) = (medians(&augur), medians(&localf));
    Ok(BenchReport {
        runs: o.runs,
        size_mib: o.size_mb,
        samples: o.samples,
        files: o.files,
        caches_dropped,
        ratio: ratio(&a, &l),
        augur: a,
        local: l,
    })
}

/// Drops the kernel's page cache (root only) so reads measure the file system, not memory.
pub(crate) fn drop_caches() -> bool {
    std::fs::write("/proc/sys/vm/drop_caches", b"3").is_ok()
}

async fn measure(dir: &Path, o: &BenchOptions, run: u32) -> Result<Figures> {
    let dir = dir.to_path_buf();
    let (size, samples, files) = (o.size_mb << 20, o.samples, o.files);
    // Plain blocking file I/O: run it off the runtime that serves the mount.
    tokio::task::spawn_blocking(move || measure_blocking(&dir, size, samples, files, run)).await?
}

fn measure_blocking(dir: &Path, size: u64, samples: u32, files: u32, run: u32) -> Result<Figures> {
    let path = dir.join(format!("seq-{run}"));
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let t = Instant::now();
    {
        let mut f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        f.sync_all()?;
    }
    let seq_write_mib_s = mib(size) / t.elapsed().as_secs_f64();

    drop_caches();
    let t = Instant::now();
    {
        let mut f = File::open(&path)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        anyhow::ensure!(total == size, "read {total} bytes of {size}");
    }
    let seq_read_mib_s = mib(size) / t.elapsed().as_secs_f64();

    drop_caches();
    let f = OpenOptions::new().read(true).open(&path)?;
    let pages = (size / 4096).max(1);
    let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(run);
    let mut lat = Vec::with_capacity(samples as usize);
    let mut buf = [0u8; 4096];
    for _ in 0..samples {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let off = (rng % pages) * 4096;
        let t = Instant::now();
        f.read_exact_at(&mut buf, off)?;
        lat.push(t.elapsed().as_nanos() as u64);
    }
    lat.sort_unstable();
    drop(f);
    std::fs::remove_file(&path)?;

    let small = dir.join(format!("small-{run}"));
    std::fs::create_dir(&small)?;
    let name = |i: u32| small.join(format!("f{i:06}"));
    let t = Instant::now();
    for i in 0..files {
        File::create(name(i))?;
    }
    let create_ops_s = f64::from(files) / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in 0..files {
        std::fs::metadata(name(i))?;
    }
    let stat_ops_s = f64::from(files) / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in 0..files {
        std::fs::remove_file(name(i))?;
    }
    let unlink_ops_s = f64::from(files) / t.elapsed().as_secs_f64();
    std::fs::remove_dir(&small)?;

    Ok(Figures {
        seq_write_mib_s,
        seq_read_mib_s,
        rand_read_4k_us_p50: percentile_us(&lat, 0.5),
        rand_read_4k_us_p99: percentile_us(&lat, 0.99),
        create_ops_s,
        stat_ops_s,
        unlink_ops_s,
    })
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

fn medians(v: &[Figures]) -> Figures {
    let m = |f: fn(&Figures) -> f64| median(v.iter().map(f).collect());
    Figures {
        seq_write_mib_s: m(|f| f.seq_write_mib_s),
        seq_read_mib_s: m(|f| f.seq_read_mib_s),
        rand_read_4k_us_p50: m(|f| f.rand_read_4k_us_p50),
        rand_read_4k_us_p99: m(|f| f.rand_read_4k_us_p99),
        create_ops_s: m(|f| f.create_ops_s),
        stat_ops_s: m(|f| f.stat_ops_s),
        unlink_ops_s: m(|f| f.unlink_ops_s),
    }
}

fn ratio(a: &Figures, l: &Figures) -> Figures {
    let r = |x: f64, y: f64| if y > 0.0 { x / y } else { 0.0 };
    Figures {
        seq_write_mib_s: r(a.seq_write_mib_s, l.seq_write_mib_s),
        seq_read_mib_s: r(a.seq_read_mib_s, l.seq_read_mib_s),
        rand_read_4k_us_p50: r(a.rand_read_4k_us_p50, l.rand_read_4k_us_p50),
        rand_read_4k_us_p99: r(a.rand_read_4k_us_p99, l.rand_read_4k_us_p99),
        create_ops_s: r(a.create_ops_s, l.create_ops_s),
        stat_ops_s: r(a.stat_ops_s, l.stat_ops_s),
        unlink_ops_s: r(a.unlink_ops_s, l.unlink_ops_s),
    }
}
