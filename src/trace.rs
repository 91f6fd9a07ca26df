//! `augur trace eval`: replay traces through the predictors under the replay model of SPEC §7
//! and print their figures side by side.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use augur_prefetch::model::ModelKnobs;
use augur_prefetch::model::predictor_with;
use augur_prefetch::{ReplayConfig, Score, Trace, all_heuristics, replay};
use clap::Args;
use serde::Serialize;

#[derive(Args)]
pub struct EvalArgs {
    /// Trace files in the shared CSV shape (`.csv` or `.csv.gz`).
    #[arg(required = true)]
    traces: Vec<PathBuf>,
    /// Predictors to run, comma-separated; the heuristic set is always reported as well.
    #[arg(long, value_delimiter = ',', default_value = "none")]
    predictors: Vec<String>,
    /// Block size in KiB (64 is the volume default; 4 for database-page studies).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    block_kib: u64,
    /// Cache size as a share of the trace's footprint (distinct blocks touched).
    #[arg(long, default_value_t = 0.05)]
    cache_frac: f64,
    /// Cost of a demand miss and of a prefetch's trip, in ms.
    #[arg(long, default_value_t = 1.0)]
    latency_ms: f64,
    /// Spacing of requests in untimed traces (ARC), in µs (at most 60 s).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=60_000_000))]
    iat_us: u64,
    /// Most prefetched blocks in flight; extra predictions are dropped.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_inflight: u64,
    /// Score only this last share of each trace (everything before warms caches and predictors).
    #[arg(long, default_value_t = 1.0)]
    tail_frac: f64,
    /// The ONNX model for the `model` predictor (its `.json` config sits beside it). A missing
    /// or corrupt model is reported and `model` runs as its fallback heuristic.
    #[arg(long, env = "AUGUR_MODEL", default_value = "models/prefetch.onnx")]
    model: PathBuf,
    /// Knobs of the `model` predictor, `name=value,...` (threshold, min_p, budget_blocks,
    /// unsure_below, accuracy_floor, fallback, fetch_us, fetch_ratio, bucket, shadow_bucket, fill,
    /// trust, waste_cost, cache_blocks; `fetch_us` defaults to `--latency-ms`, `cache_blocks` to
    /// the replay's cache, `--cache-frac` of each trace's footprint). Repeat the flag to run the
    /// model once per set, side by side (validation sweeps); each then reports as
    /// `model[KNOBS]`.
    #[arg(long = "model-knobs")]
    model_knobs: Vec<String>,
    /// Use only this first share of each trace (before `--tail-frac`): with `--head-frac 0.7
    /// --tail-frac 0.3` the scored part lies inside the first 70%, the part models train on,
    /// so knobs chosen there are not tuned on the last 30%.
    #[arg(long, default_value_t = 1.0)]
    head_frac: f64,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct TraceReport {
    trace: String,
    requests: usize,
    footprint_blocks: usize,
    timed: bool,
    scores: Vec<Score>,
}

pub fn eval(args: EvalArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&args.cache_frac) || args.cache_frac == 0.0 {
        bail!("--cache-frac {} must be in (0, 1]", args.cache_frac);
    }
    if !(0.0..=1.0).contains(&args.tail_frac) || args.tail_frac == 0.0 {
        bail!("--tail-frac {} must be in (0, 1]", args.tail_frac);
    }
    if !(0.0..=1.0).contains(&args.head_frac) || args.head_frac == 0.0 {
        bail!("--head-frac {} must be in (0, 1]", args.head_frac);
    }
    if !(args.latency_ms >= 0.0 && args.latency_ms <= 60_000.0) {
        bail!("--latency-ms {} must be between 0 and 60000", args.latency_ms);
    }
    let latency_us = (args.latency_ms * 1000.0).round() as u64;
    // The predictors are told the fetch latency, as a client measures it, and (per trace, below)
    // the cache size, as a client knows its own.
    let base = ModelKnobs { fetch_us: latency_us as f32, ..ModelKnobs::default() };
    // The model's runs: (reported name, knob text over the base).
    let knob_sets: Vec<(String, &str)> = if args.model_knobs.is_empty() {
        vec![("model".into(), "")]
    } else {
        args.model_knobs.iter().map(|k| (format!("model[{k}]"), k.as_str())).collect()
    };
    // Refuse bad knobs before any work.
    for (_, k) in &knob_sets {
        base.with(k).map_err(anyhow::Error::msg)?;
    }
    let mut names: Vec<String> = all_heuristics().map(String::from).collect();
    for p in &args.predictors {
        if !names.contains(p) {
            names.push(p.clone());
        }
    }
    // Refuse unknown names before any work.
    for n in names.iter().filter(|n| *n != "model") {
        predictor_with(n, None, base).map_err(anyhow::Error::msg)?;
    }
    let model = if names.iter().any(|n| n == "model") {
        match augur_prefetch::model::Model::load(&args.model) {
            Ok(m) => Some(m),
            Err(e) => {
                let fallbacks: Vec<&str> =
                    knob_sets.iter().map(|(_, k)| base.with(k).expect("checked above").fallback).collect();
                eprintln!("augur: {e}; the model predictor runs as its fallback ({})", fallbacks.join(", "));
                None
            }
        }
    } else {
        None
    };
    let cfg = ReplayConfig {
        block_bytes: args.block_kib << 10,
        cache_frac: args.cache_frac,
        latency_us,
        iat_us: args.iat_us,
        max_inflight: args.max_inflight as usize,
        tail_frac: args.tail_frac,
    };
    let mut reports = Vec::new();
    for path in &args.traces {
        let mut trace = Trace::read(path)?;
        trace.check_blocks(path, cfg.block_bytes)?;
        let keep = (args.head_frac * trace.accesses.len() as f64).round() as usize;
        trace.accesses.truncate(keep.max(1));
        let mut scores: Vec<Score> = Vec::new();
        let cache_blocks = (cfg.cache_frac * trace.footprint(cfg.block_bytes) as f64).round() as usize;
        let base = ModelKnobs { cache_blocks, ..base };
        for n in &names {
            if n != "model" {
                let mut p = predictor_with(n, None, base).expect("checked above");
                scores.push(replay(&trace, &mut *p, &cfg));
                continue;
            }
            for (label, knobs) in &knob_sets {
                let knobs = base.with(knobs).expect("checked above");
                let mut p = predictor_with(n, model.as_ref(), knobs).expect("checked above");
                scores.push(Score { predictor: label.clone(), ..replay(&trace, &mut *p, &cfg) });
            }
        }
        // Every predictor that is not a heuristic itself (`model`, `auto`) is judged.
        for i in 0..scores.len() {
            if !all_heuristics().any(|h| h == scores[i].predictor) {
                scores[i].verdict = augur_prefetch::replay::verdict(&scores, &scores[i]);
            }
        }
        let report = TraceReport {
            trace: trace.name.clone(),
            requests: trace.accesses.len(),
            footprint_blocks: trace.footprint(cfg.block_bytes),
            timed: trace.timed,
            scores,
        };
        if !args.json {
            print!("{}", table(&report, &args));
        }
        reports.push(report);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    }
    Ok(())
}

fn table(r: &TraceReport, a: &EvalArgs) -> String {
    let none = r.scores.iter().find(|s| s.predictor == "none").map_or(0.0, |s| s.mean_latency_us);
    let mut out = format!(
        "{}: {} requests, {} blocks of {} KiB, cache {:.0}% of footprint, {} ms fetch, {}scored: last {:.0}%\n",
        r.trace,
        r.requests,
        r.footprint_blocks,
        a.block_kib,
        a.cache_frac * 100.0,
        a.latency_ms,
        if r.timed { "" } else { "untimed (iat from --iat-us), " },
        a.tail_frac * 100.0
    );
    out += &format!(
        "  {:<10}{:>9}{:>9}{:>9}{:>10}{:>7}{:>11}{:>9}{:>10}\n",
        "predictor", "accuracy", "coverage", "hit", "overfetch", "late", "mean(us)", "vs none", "p99(us)"
    );
    for s in &r.scores {
        let rel = if none > 0.0 { s.mean_latency_us / none } else { 0.0 };
        out += &format!(
            "  {:<10}{:>9.3}{:>9.3}{:>9.3}{:>10.2}{:>7.2}{:>11.1}{:>9.2}{:>10.0}\n",
            s.predictor,
            s.accuracy,
            s.coverage,
            s.hit_ratio,
            s.over_fetch,
            s.late_share,
            s.mean_latency_us,
            rel,
            s.p99_latency_us
        );
    }
    if r.scores.iter().all(|s| s.reads == 0) {
        out += "  no reads in the scored part: nothing to judge\n";
        return out;
    }
    for s in &r.scores {
        if let Some(d) = s.model_decided {
            out += &format!(
                "  {}: the network decided on {:.1}% of scored reads, its fallback on the rest\n",
                s.predictor,
                d * 100.0
            );
        }
        if let Some(v) = &s.verdict {
            out += &format!(
                "  {}: {:.3}x {}, the fastest SPEC heuristic with over-fetch <= 1.0: {}\n",
                s.predictor,
                v.ratio,
                v.best,
                if v.wins { "a win" } else { "not a win" }
            );
        }
    }
    out
}

#[derive(Args)]
pub struct ConvertArgs {
    /// Input: the shared CSV shape or the client's own trace (`augur mount --trace` writes the
    /// same shape plus a `file_type` column, one stream per file; kept in the output),
    /// `.csv` or `.csv.gz`.
    input: PathBuf,
    /// Output file; gzip-compressed when it ends in `.gz`.
    output: PathBuf,
    /// Keep reads only.
    #[arg(long)]
    reads_only: bool,
    /// Keep only the first N records (after filtering).
    #[arg(long)]
    limit: Option<usize>,
    /// Keep only these streams (volume/object or file ids), comma-separated.
    #[arg(long, value_delimiter = ',')]
    streams: Vec<u64>,
}

pub fn convert(args: ConvertArgs) -> Result<()> {
    let trace = Trace::read(&args.input)?;
    let kept: Vec<_> = trace
        .accesses
        .iter()
        .filter(|a| !args.reads_only || a.op == augur_prefetch::Op::Read)
        .filter(|a| args.streams.is_empty() || args.streams.contains(&a.stream))
        .take(args.limit.unwrap_or(usize::MAX))
        .copied()
        .collect();
    augur_prefetch::trace::write_csv(&args.output, &kept, trace.files)?;
    println!("wrote {} of {} records to {}", kept.len(), trace.accesses.len(), args.output.display());
    Ok(())
}

#[derive(Args)]
pub struct FeaturesArgs {
    /// Traces to turn into training tensors.
    #[arg(required = true)]
    traces: Vec<PathBuf>,
    /// Directory for the tensors (`NAME.tokens.npy`, `.features.npy`, `.labels.npy`,
    /// `.future.npy`, `.request.npy`) and `features.json` (vocabulary and shapes).
    #[arg(long)]
    out: PathBuf,
    /// Block size in KiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    block_kib: u64,
    /// Keep every Nth sample.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    stride: u64,
    /// Most samples per trace.
    #[arg(long, default_value_t = 2_000_000)]
    max_samples: usize,
}

#[derive(Serialize)]
struct FeaturesReport {
    vocab: i64,
    delta_range: i64,
    seq_len: usize,
    horizon: usize,
    features: Vec<&'static str>,
    block_kib: u64,
    token_pad: i64,
    token_far_behind: i64,
    token_far_ahead: i64,
    traces: Vec<FeaturesTrace>,
}

#[derive(Serialize)]
struct FeaturesTrace {
    name: String,
    samples: usize,
    requests: usize,
    timed: bool,
}

pub fn features(args: FeaturesArgs) -> Result<()> {
    use augur_prefetch::features as f;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let mut report = FeaturesReport {
        vocab: f::VOCAB,
        delta_range: f::DELTA_RANGE,
        seq_len: f::SEQ_LEN,
        horizon: f::HORIZON,
        features: f::FEATURES.to_vec(),
        block_kib: args.block_kib,
        token_pad: f::TOKEN_PAD,
        token_far_behind: f::TOKEN_FAR_BEHIND,
        token_far_ahead: f::TOKEN_FAR_AHEAD,
        traces: Vec::new(),
    };
    for path in &args.traces {
        let trace = Trace::read(path)?;
        trace.check_blocks(path, args.block_kib << 10)?;
        let s = f::samples(&trace, args.block_kib << 10, args.stride as usize, args.max_samples);
        let n = s.len();
        let write = |suffix: &str, descr: &str, shape: &[usize], data: Vec<u8>| -> Result<()> {
            let p = args.out.join(format!("{}.{suffix}.npy", trace.name));
            let file = std::fs::File::create(&p).with_context(|| format!("creating {}", p.display()))?;
            f::write_npy(std::io::BufWriter::new(file), descr, shape, &data)
                .with_context(|| format!("writing {}", p.display()))
        };
        write("tokens", "<i8", &[n, f::SEQ_LEN], f::i64_bytes(&s.tokens))?;
        write("features", "<f4", &[n, f::SEQ_LEN, f::FEATURES.len()], f::f32_bytes(&s.features))?;
        write("labels", "<i8", &[n], f::i64_bytes(&s.labels))?;
        write("future", "<i8", &[n, f::HORIZON], f::i64_bytes(&s.future))?;
        write("request", "<i8", &[n], f::i64_bytes(&s.request))?;
        println!("{}: {n} samples from {} requests", trace.name, trace.accesses.len());
        report.traces.push(FeaturesTrace {
            name: trace.name.clone(),
            samples: n,
            requests: trace.accesses.len(),
            timed: trace.timed,
        });
    }
    let json = args.out.join("features.json");
    std::fs::write(&json, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    Ok(())
}
