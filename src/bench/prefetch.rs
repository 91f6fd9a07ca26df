//! `augur bench prefetch`: a trace's reads replayed on a real mount, once per prefetch mode, side
//! by side in one run: `off` (no prefetch), `model` (the engine with the shipped model),
//! `heuristic` (the engine without a model: its fallback, `auto`) and `sequential` (the hint's
//! fixed readahead). The cluster is embedded (as `augur dev`) with `--inject-latency-ms` added
//! by the nodes to every block request, standing in for remote storage.
//!
//! Each stream of the trace becomes one sparse file, as large as the stream's highest offset.
//! Per mode and run: the volume's prefetch hint is set, a fresh mount (empty client cache,
//! kernel caches dropped when root) replays the reads in order at queue depth 1 with
//! `think_us` between them, and each read's latency is taken. Figures are medians over runs;
//! ratios are against `off`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use augur_fs_client::fs::Inner;
use augur_fs_client::stats::{Counter, PrefetchStats};
use augur_prefetch::{Op, Trace};
use augur_proto::meta::ROOT_INO;
use augur_proto::msg::RequestBody;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::node::{median, percentile_us};
use crate::dev::DevCluster;

pub struct BenchOptions {
    pub trace: PathBuf,
    pub model: PathBuf,
    /// Reads replayed (the trace's first ones).
    pub reads: usize,
    pub runs: u32,
    pub latency_ms: u64,
    pub think_us: u64,
}

/// The modes compared, in table order; `off` is the baseline.
pub const MODES: [&str; 4] = ["off", "model", "heuristic", "sequential"];

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub mode: String,
    /// Medians over the runs.
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// The mount's prefetch counters, last run: prefetches issued, used (read before
    /// eviction), late (read while in flight); coverage = used / (used + demand misses);
    /// over-fetch = prefetched bytes / bytes read.
    pub issued: u64,
    pub used: u64,
    pub late: u64,
    pub coverage: f64,
    pub over_fetch: f64,
    /// mean / `off`'s mean.
    pub vs_off: f64,
    /// Share of the blocks the engine observed on which the network's own choice was passed on
    /// (the fallback decided the rest), last run.
    pub network_decided: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub trace: String,
    pub reads: usize,
    pub files: usize,
    pub runs: u32,
    pub latency_ms: u64,
    pub think_us: u64,
    pub caches_dropped: bool,
    pub rows: Vec<Row>,
}

impl Report {
    pub fn table(&self) -> String {
        let mut out = format!(
            "augur bench prefetch: {} reads of {} over {} files, {} ms added per block fetch, {} us between \
             reads, {} runs; medians{}\n",
            self.reads,
            self.trace,
            self.files,
            self.latency_ms,
            self.think_us,
            self.runs,
            if self.caches_dropped { "" } else { " (not root: page caches NOT dropped)" }
        );
        out += &format!(
            "{:<12}{:>11}{:>11}{:>11}{:>9}{:>9}{:>9}{:>9}{:>9}{:>10}{:>10}\n",
            "mode",
            "mean(us)",
            "p50(us)",
            "p99(us)",
            "vs off",
            "issued",
            "used",
            "late",
            "coverage",
            "overfetch",
            "network"
        );
        for r in &self.rows {
            out += &format!(
                "{:<12}{:>11.1}{:>11.1}{:>11.1}{:>9.3}{:>9}{:>9}{:>9}{:>9.3}{:>10.3}{:>9.1}%\n",
                r.mode,
                r.mean_us,
                r.p50_us,
                r.p99_us,
                r.vs_off,
                r.issued,
                r.used,
                r.late,
                r.coverage,
                r.over_fetch,
                100.0 * r.network_decided
            );
        }
        out
    }
}

/// One read of the replay: file index, offset, length.
type ReadOp = (usize, u64, usize);

pub async fn run(o: BenchOptions) -> Result<Report> {
    let trace = Trace::read(&o.trace)?;
    let mut streams: Vec<u64> = Vec::new();
    let mut sizes: Vec<u64> = Vec::new();
    let mut ops: Vec<ReadOp> = Vec::new();
    for a in trace.accesses.iter().filter(|a| a.op == Op::Read && a.size > 0).take(o.reads) {
        let file = match streams.iter().position(|&s| s == a.stream) {
            Some(i) => i,
            None => {
                streams.push(a.stream);
                sizes.push(0);
                streams.len() - 1
            }
        };
        sizes[file] = sizes[file].max(a.offset + a.size);
        ops.push((file, a.offset, a.size as usize));
    }
    if ops.is_empty() {
        bail!("{}: no reads to replay", o.trace.display());
    }
    // The `model` row must be the model's: a model that does not load is an error here, not
    // the silent heuristic fallback a mount would use.
    augur_prefetch::model::Model::load(&o.model)
        .with_context(|| format!("--model {} (the model the `model` row measures)", o.model.display()))?;
    let tmp = tempfile::Builder::new().prefix("augur-bench-prefetch").tempdir_in("/var/tmp")?;
    let cluster = DevCluster::start_with_latency(
        &tmp.path().join("state"),
        "127.0.9.201".parse()?,
        "bench",
        true,
        o.latency_ms,
    )
    .await?;
    let (sizes, ops) = (Arc::new(sizes), Arc::new(ops));
    let result = measure_modes(&o, &cluster, tmp.path(), sizes.clone(), ops.clone()).await;
    cluster.stop().await;
    let (rows, caches_dropped) = result?;
    Ok(Report {
        trace: o.trace.display().to_string(),
        reads: ops.len(),
        files: sizes.len(),
        runs: o.runs,
        latency_ms: o.latency_ms,
        think_us: o.think_us,
        caches_dropped,
        rows,
    })
}

async fn measure_modes(
    o: &BenchOptions,
    cluster: &DevCluster,
    dir: &Path,
    sizes: Arc<Vec<u64>>,
    ops: Arc<Vec<ReadOp>>,
) -> Result<(Vec<Row>, bool)> {
    // The files, sparse, at their streams' sizes.
    let all = sizes.clone();
    with_mount(cluster, dir, o, "off", move |mnt| {
        for (i, &size) in all.iter().enumerate() {
            File::create(mnt.join(format!("stream-{i}")))?.set_len(size)?;
        }
        Ok(())
    })
    .await?;
    let mut samples: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); MODES.len()];
    let mut counts: Vec<(Arc<PrefetchStats>, f64)> = vec![Default::default(); MODES.len()];
    let mut caches_dropped = true;
    for run in 0..o.runs {
        for (m, mode) in MODES.iter().enumerate() {
            let think = Duration::from_micros(o.think_us);
            let (sizes, ops) = (sizes.clone(), ops.clone());
            let ((lat, dropped), inner) = with_mount(cluster, dir, o, mode, move |mnt| {
                let dropped = super::fs::drop_caches();
                let files: Vec<File> = (0..sizes.len())
                    .map(|i| File::open(mnt.join(format!("stream-{i}"))))
                    .collect::<std::io::Result<_>>()?;
                let mut buf = Vec::new();
                let mut lat = Vec::with_capacity(ops.len());
                for &(file, offset, len) in ops.iter() {
                    buf.resize(len, 0);
                    let t = Instant::now();
                    files[file].read_exact_at(&mut buf, offset)?;
                    lat.push(t.elapsed().as_nanos() as u64);
                    std::thread::sleep(think);
                }
                Ok((lat, dropped))
            })
            .await
            .with_context(|| format!("replaying with prefetch mode {mode}"))?;
            caches_dropped &= dropped;
            let mut sorted = lat.clone();
            sorted.sort_unstable();
            let mean = lat.iter().sum::<u64>() as f64 / lat.len() as f64 / 1000.0;
            let fig = (mean, percentile_us(&sorted, 0.5), percentile_us(&sorted, 0.99));
            eprintln!("run {} {mode}: mean {:.1} us, p50 {:.1}, p99 {:.1}", run + 1, fig.0, fig.1, fig.2);
            samples[m].push(fig);
            let (reads, decided) = inner.engine_counters();
            counts[m] =
                (inner.prefetch_stats(ROOT_INO), if reads > 0 { decided as f64 / reads as f64 } else { 0.0 });
        }
    }
    let mean_of = |m: usize| median(samples[m].iter().map(|f| f.0).collect());
    let off = mean_of(0);
    let rows = MODES
        .iter()
        .enumerate()
        .map(|(m, mode)| Row {
            mode: mode.to_string(),
            mean_us: mean_of(m),
            p50_us: median(samples[m].iter().map(|f| f.1).collect()),
            p99_us: median(samples[m].iter().map(|f| f.2).collect()),
            issued: counts[m].0.get(Counter::Issued),
            used: counts[m].0.get(Counter::Used),
            late: counts[m].0.get(Counter::Late),
            coverage: counts[m].0.coverage(),
            over_fetch: counts[m].0.over_fetch(),
            vs_off: if off > 0.0 { mean_of(m) / off } else { 0.0 },
            network_decided: counts[m].1,
        })
        .collect();
    Ok((rows, caches_dropped))
}

/// Sets the volume's prefetch hint for `mode`, mounts it fresh (the model only for `model`),
/// runs `work` on the mount point off the runtime, and unmounts. Also returns the client's
/// state, for its counters.
async fn with_mount<T: Send + 'static>(
    cluster: &DevCluster,
    dir: &Path,
    o: &BenchOptions,
    mode: &str,
    work: impl FnOnce(&Path) -> Result<T> + Send + 'static,
) -> Result<(T, Arc<Inner>)> {
    let hint = match mode {
        "off" => "off",
        "sequential" => "sequential",
        _ => "auto",
    };
    let body = RequestBody::SetPrefetchHint {
        volume: "bench".into(),
        hint_type: "prefetch".into(),
        hint_value: hint.into(),
    };
    cluster.client()?.call(body).await.context("setting the volume's prefetch hint")?;
    // The client's defaults (`augur mount`'s), with the model only where it is measured.
    let options = augur_fs_client::MountOptions {
        model: (mode == "model").then(|| o.model.clone()),
        ..Default::default()
    };
    let mnt = dir.join(format!("mnt-{mode}"));
    std::fs::create_dir_all(&mnt)?;
    let mounted = augur_fs_client::mount(cluster.client()?, "bench", &mnt, options).await?;
    let inner = mounted.inner.clone();
    let stop = CancellationToken::new();
    let serving = tokio::spawn(mounted.run_until(stop.clone()));
    let path = mnt.clone();
    let result = tokio::task::spawn_blocking(move || work(&path)).await;
    stop.cancel();
    let _ = serving.await;
    Ok((result??, inner))
}
