//! The mount's prefetch engine: every read request is observed (per block: hit or miss, time,
//! the request's size, the file's type group) and handed, in order, to one task that runs the
//! `model` predictor (`augur_prefetch::model::ModelPredictor`, the same code `augur trace eval`
//! judges) with the file's inode as the stream. The blocks it names are fetched in the
//! background by `Inner::prefetch_block` (no duplicates: cached or in flight; at most
//! `MountOptions::prefetch_in_flight_max` at once); what it names but cannot be fetched is
//! handed back (`Predictor::not_fetched`), so its byte budget is not spent on it.
//!
//! The engine steers only files whose `user.augur.prefetch` hint is `auto` (the default); the
//! other hints are served by the hint's fixed readahead (`Inner::read_ahead`). Reads never wait
//! for it: observations go through a queue of `OBSERVED_QUEUE` requests, and when it is full
//! they are dropped and counted (`Engine::dropped`), never delayed.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use augur_prefetch::filetype::Group;
use augur_prefetch::model::{Model, ModelKnobs, ModelPredictor};
use augur_prefetch::{Predictor, Read};
use augur_proto::meta::PrefetchMode;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::file::OpenFile;
use crate::fs::Inner;

/// Read requests waiting for the engine; past it observations are dropped (and counted).
pub const OBSERVED_QUEUE: usize = 1024;

/// One read request as the engine sees it.
pub struct Observed {
    pub file: Arc<OpenFile>,
    /// The request's first block.
    pub first: u64,
    /// Per block of the request, from `first`: whether it was cached when the read came.
    pub hits: Vec<bool>,
    /// µs since the mount started.
    pub at_us: u64,
}

/// The sending side, kept by the file system.
pub struct Engine {
    tx: mpsc::Sender<Observed>,
    started: Instant,
    /// Observations dropped because the queue was full.
    pub dropped: AtomicU64,
}

/// Loads the model for the engine: `None` (with the reason logged) runs the heuristic fallback
/// (`auto`: per file, the heuristic that would have hidden the most fetch time lately).
pub fn load_model(path: Option<&Path>) -> Option<Model> {
    let path = path?;
    match Model::load(path) {
        Ok(m) => {
            info!(model = %path.display(), "prefetch: model loaded");
            Some(m)
        }
        Err(e) => {
            warn!(error = %e, "prefetch: no model; prefetching with the heuristic predictor (auto)");
            None
        }
    }
}

impl Engine {
    /// Starts the engine task on the current runtime. It holds `inner` weakly and ends when the
    /// file system is gone.
    pub fn start(inner: Weak<Inner>, model: Option<Model>, knobs: ModelKnobs) -> Engine {
        let (tx, rx) = mpsc::channel(OBSERVED_QUEUE);
        let predictor = ModelPredictor::new(model, knobs).expect("the default knobs name a known fallback");
        tokio::spawn(run(inner, rx, predictor));
        Engine { tx, started: Instant::now(), dropped: AtomicU64::new(0) }
    }

    /// Queues one read request (never waits).
    pub fn observe(&self, file: Arc<OpenFile>, first: u64, hits: Vec<bool>) {
        let at_us = self.started.elapsed().as_micros() as u64;
        if self.tx.try_send(Observed { file, first, hits, at_us }).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn run(inner: Weak<Inner>, mut rx: mpsc::Receiver<Observed>, mut predictor: ModelPredictor) {
    let mut out = Vec::new();
    while let Some(o) = rx.recv().await {
        let Some(inner) = inner.upgrade() else { break };
        let ino = o.file.ino.0;
        let group = o.file.group().unwrap_or(Group::Other);
        for (j, &hit) in o.hits.iter().enumerate() {
            let read = Read {
                stream: ino,
                block: o.first + j as u64,
                hit,
                t_us: o.at_us,
                timed: true,
                request_blocks: o.hits.len() as u64,
                group,
            };
            out.clear();
            predictor.on_read(&read, &mut out);
            if out.is_empty() {
                continue;
            }
            // Only `auto` files are the engine's (the hint is looked up once per open file,
            // when there is first something to fetch).
            if inner.prefetch_mode(&o.file).await != PrefetchMode::Auto {
                for &b in &out {
                    predictor.not_fetched(ino, b);
                }
                continue;
            }
            for &b in &out {
                if !inner.prefetch_block(&o.file, b) {
                    predictor.not_fetched(ino, b);
                }
            }
        }
    }
}
