//! `augur bench predictor`: time per access of every predictor (the model through tract, `auto`
//! and the heuristics) and of the network's step alone, on one core, over the reads of a trace,
//! side by side, medians of several runs.

use std::path::Path;
use std::time::Instant;

use std::collections::HashMap;

use anyhow::Result;
use augur_prefetch::features::StreamFeatures;
use augur_prefetch::model::{Model, StreamState};
use augur_prefetch::{Read, Trace, all_heuristics, trace::blocks_of};
use serde::Serialize;

use super::node::percentile_us;

#[derive(Serialize)]
pub struct Row {
    pub predictor: String,
    pub accesses: usize,
    pub runs: usize,
    /// Medians over the runs.
    pub p50_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
}

/// What is timed besides the predictors: one step of the network through tract alone (features
/// computed, state kept per stream), the inference inside `model`.
pub const STEP: &str = "model-step";

pub fn run(trace: &Path, model: &Path, accesses: usize, runs: usize) -> Result<Vec<Row>> {
    let t = Trace::read(trace)?;
    let reads: Vec<Read> = t
        .accesses
        .iter()
        .enumerate()
        .filter(|(_, a)| a.op == augur_prefetch::Op::Read)
        .flat_map(|(i, a)| {
            let r = blocks_of(a, 64 << 10);
            let (first, n) = (r.start, r.end - r.start);
            let t_us = if t.timed { a.t_us } else { i as u64 };
            r.map(move |b| Read {
                request_blocks: n,
                request_first: first,
                t_us,
                timed: t.timed,
                ..Read::at(a.stream, b, false)
            })
        })
        .take(accesses)
        .collect();
    let model = augur_prefetch::model::Model::load(model)?;
    let mut names: Vec<&str> = vec![STEP, "model", "auto"];
    names.extend(all_heuristics());
    // Per predictor, one (p50, p99, mean) per run; runs interleave the predictors so a noisy
    // stretch of the machine hits them alike.
    let mut results: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); names.len()];
    for _ in 0..runs.max(1) {
        for (name, res) in names.iter().zip(&mut results) {
            let lat = if *name == STEP {
                time_steps(&model, &reads)?
            } else {
                time_predictor(name, &model, &reads)?
            };
            let mean = lat.iter().sum::<u64>() as f64 / lat.len().max(1) as f64 / 1000.0;
            let mut lat = lat;
            lat.sort_unstable();
            res.push((percentile_us(&lat, 0.5), percentile_us(&lat, 0.99), mean));
        }
    }
    Ok(names
        .iter()
        .zip(results)
        .map(|(name, res)| {
            let median = |f: fn(&(f64, f64, f64)) -> f64| {
                let mut v: Vec<f64> = res.iter().map(f).collect();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            Row {
                predictor: name.to_string(),
                accesses: reads.len(),
                runs: res.len(),
                p50_us: median(|r| r.0),
                p99_us: median(|r| r.1),
                mean_us: median(|r| r.2),
            }
        })
        .collect())
}

fn time_predictor(name: &str, model: &Model, reads: &[Read]) -> Result<Vec<u64>> {
    let mut p = augur_prefetch::model::predictor(name, Some(model)).map_err(anyhow::Error::msg)?;
    let mut lat = Vec::with_capacity(reads.len());
    let mut out = Vec::new();
    for r in reads {
        out.clear();
        let t = Instant::now();
        p.on_read(r, &mut out);
        // As a caller would: the budget is asked for each block named (as if none were cached).
        for &b in &out {
            p.pays(r.stream, b);
        }
        lat.push(t.elapsed().as_nanos() as u64);
    }
    Ok(lat)
}

fn time_steps(model: &Model, reads: &[Read]) -> Result<Vec<u64>> {
    let mut runner = model.runner()?;
    let mut streams: HashMap<u64, (StreamFeatures, StreamState)> = HashMap::new();
    let mut probs = Vec::new();
    let mut lat = Vec::with_capacity(reads.len());
    for r in reads {
        let (f, state) = streams.entry(r.stream).or_default();
        let t = Instant::now();
        let step = f.push(r.block, r.t_us, r.timed, r.request_blocks, r.group);
        runner.step(state, &step, &mut probs)?;
        lat.push(t.elapsed().as_nanos() as u64);
    }
    Ok(lat)
}

pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<12}{:>10}{:>6}{:>10}{:>10}{:>10}\n",
        "predictor", "accesses", "runs", "p50(us)", "p99(us)", "mean(us)"
    );
    for r in rows {
        out += &format!(
            "{:<12}{:>10}{:>6}{:>10.2}{:>10.2}{:>10.2}\n",
            r.predictor, r.accesses, r.runs, r.p50_us, r.p99_us, r.mean_us
        );
    }
    out += "(medians over the runs; model-step is the network alone: features and one tract run)\n";
    out
}
