//! `augur bench predictor`: time per access of every predictor (the model through tract and the
//! heuristics) on one core, over the reads of a trace, side by side.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use augur_prefetch::{HEURISTICS, Read, Trace, trace::blocks_of};
use serde::Serialize;

use super::node::percentile_us;

#[derive(Serialize)]
pub struct Row {
    pub predictor: String,
    pub accesses: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
}

pub fn run(trace: &Path, model: &Path, accesses: usize) -> Result<Vec<Row>> {
    let t = Trace::read(trace).with_context(|| format!("reading {}", trace.display()))?;
    let reads: Vec<Read> = t
        .accesses
        .iter()
        .enumerate()
        .filter(|(_, a)| a.op == augur_prefetch::Op::Read)
        .flat_map(|(i, a)| {
            let r = blocks_of(a, 64 << 10);
            let n = r.end - r.start;
            let t_us = if t.timed { a.t_us } else { i as u64 };
            r.map(move |b| Read { request_blocks: n, t_us, timed: t.timed, ..Read::at(a.stream, b, false) })
        })
        .take(accesses)
        .collect();
    let model = augur_prefetch::model::Model::load(model)?;
    let mut rows = Vec::new();
    let mut names: Vec<&str> = vec!["model"];
    names.extend(HEURISTICS);
    for name in names {
        let mut p = augur_prefetch::model::predictor(name, Some(&model)).map_err(anyhow::Error::msg)?;
        let mut lat = Vec::with_capacity(reads.len());
        let mut out = Vec::new();
        for r in &reads {
            out.clear();
            let t = Instant::now();
            p.on_read(r, &mut out);
            lat.push(t.elapsed().as_nanos() as u64);
        }
        let mean_us = lat.iter().sum::<u64>() as f64 / lat.len().max(1) as f64 / 1000.0;
        lat.sort_unstable();
        rows.push(Row {
            predictor: name.into(),
            accesses: lat.len(),
            p50_us: percentile_us(&lat, 0.5),
            p99_us: percentile_us(&lat, 0.99),
            mean_us,
        });
    }
    Ok(rows)
}

pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<10}{:>10}{:>10}{:>10}{:>10}\n",
        "predictor", "accesses", "p50(us)", "p99(us)", "mean(us)"
    );
    for r in rows {
        out += &format!(
            "{:<10}{:>10}{:>10.2}{:>10.2}{:>10.2}\n",
            r.predictor, r.accesses, r.p50_us, r.p99_us, r.mean_us
        );
    }
    out
}
