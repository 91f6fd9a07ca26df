//! The mount's prefetch engine: every read request is observed (per block: hit or miss; its
//! arrival; the request's size) and handed, in order, to one thread that runs the
//! `model` predictor (`augur_prefetch::model::ModelPredictor`, the same code `augur trace eval`
//! judges) with the file's inode as the stream. The blocks it names are fetched in the
//! background by `Inner::prefetch_block`: no duplicates (cached or in flight); at most
//! `MountOptions::prefetch_in_flight_max` fetches at once, the rest queued (`PREFETCH_QUEUE_MAX`)
//! and dropped as stale once their file has been read `PREFETCH_STALE_READS` more times; a
//! demand read never waits for a queued block (it fetches it itself). The predictor's byte
//! budget pays only for blocks that need a fetch (`Predictor::pays`, asked once the block is
//! known not to be past the end, cached or in flight), and what it paid for but was dropped
//! from the queue unfetched is handed back (`Predictor::not_fetched`).
//!
//! The engine steers only files whose `user.augur.prefetch` hint is `auto` (the default); the
//! other hints are served by the hint's fixed readahead (`Inner::read_ahead`). A file's hint is
//! looked up once, in a task of its own, when the engine first has something to fetch for it
//! (what it named then is fetched when the answer is `auto`; what it names while the lookup is
//! under way is handed back), and again after the hint is removed on this mount; a hint set on
//! this mount takes effect on the open file at once. Reads never wait for the engine:
//! observations go through a queue of `OBSERVED_QUEUE` requests, and when it is full they are
//! dropped and counted (`Engine::dropped`, logged), never delayed. The predictor runs on a
//! thread of its own (`augur-prefetch`), not on the runtime's workers.
//!
//! Each read carries the file's type group as the mount knew it when the request came
//! (`OpenFile::group`: the volume's filetype hint, else detected from the bytes of the first
//! read at offset 0, or by the hint lookup; a `user.augur.filetype` override replaces it), the
//! same value `augur mount --trace` records, so the model sees at serving what it trained on.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
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
/// Blocks dropped from the prefetch queue waiting to be handed back to the predictor; past it
/// the budget is simply not given back for them.
pub const HANDED_BACK_MAX: usize = crate::fs::PREFETCH_QUEUE_MAX;

/// One read request as the engine sees it.
pub struct Observed {
    pub file: Arc<OpenFile>,
    /// The request's first block.
    pub first: u64,
    /// Per block of the request, from `first`: whether it was cached when the read came.
    pub hits: Vec<bool>,
    /// When the request arrived.
    pub at: Instant,
    /// The file's type group when it arrived.
    pub group: Group,
}

/// The sending side, kept by the file system.
pub struct Engine {
    tx: mpsc::Sender<Observed>,
    /// Observations dropped because the queue was full (or the engine had stopped).
    dropped: AtomicU64,
    /// Blocks observed, and blocks on which the network's own choice was passed on.
    pub reads: Arc<AtomicU64>,
    pub decided: Arc<AtomicU64>,
    /// (inode, block) the engine named that were dropped unfetched (`hand_back`).
    handed_back: HandedBack,
}

type HandedBack = Arc<Mutex<Vec<(u64, u64)>>>;

/// Loads the model for the engine: `None` (with the reason logged) runs the heuristic fallback
/// (`auto`: per file, the heuristic that would have hidden the most fetch time lately, of those
/// whose wasted fetches cost less; none when nothing can be foreseen).
pub fn load_model(path: Option<&Path>) -> Option<Model> {
    let Some(path) = path else {
        info!("prefetch: no model configured; prefetching with the heuristic predictor (auto)");
        return None;
    };
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
    /// Starts the engine's thread. It holds `inner` weakly, spawns fetches and hint lookups on
    /// the current runtime, and ends when the file system (and so the queue's sender) is gone.
    pub fn start(inner: Weak<Inner>, model: Option<Model>, knobs: ModelKnobs) -> std::io::Result<Engine> {
        let (tx, rx) = mpsc::channel(OBSERVED_QUEUE);
        let predictor = ModelPredictor::new(model, knobs).map_err(std::io::Error::other)?;
        let (reads, decided) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let runtime = tokio::runtime::Handle::current();
        let counters = (reads.clone(), decided.clone());
        let handed_back = HandedBack::default();
        let back = handed_back.clone();
        std::thread::Builder::new().name("augur-prefetch".into()).spawn(move || {
            let _entered = runtime.enter();
            run(inner, rx, predictor, counters, back);
        })?;
        Ok(Engine { tx, dropped: AtomicU64::new(0), reads, decided, handed_back })
    }

    /// A block the engine named for `ino` was dropped unfetched: its credit goes back to the
    /// predictor before its next read. False if `HANDED_BACK_MAX` are waiting already (the
    /// credit is lost).
    pub fn hand_back(&self, ino: u64, block: u64) -> bool {
        let mut v = self.handed_back.lock().unwrap_or_else(|p| p.into_inner());
        let room = v.len() < HANDED_BACK_MAX;
        if room {
            v.push((ino, block));
        }
        room
    }

    /// Queues one read request that arrived `at` (never waits).
    pub fn observe(&self, file: Arc<OpenFile>, first: u64, hits: Vec<bool>, at: Instant, group: Group) {
        if self.tx.try_send(Observed { file, first, hits, at, group }).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                warn!(dropped = n, "prefetch: engine queue full or stopped; read requests not observed");
            }
        }
    }
}

fn run(
    inner: Weak<Inner>,
    mut rx: mpsc::Receiver<Observed>,
    mut predictor: ModelPredictor,
    (reads, decided): (Arc<AtomicU64>, Arc<AtomicU64>),
    handed_back: HandedBack,
) {
    let mut out = Vec::new();
    let mut back = Vec::new();
    let started = Instant::now();
    while let Some(o) = rx.blocking_recv() {
        let Some(inner) = inner.upgrade() else { break };
        std::mem::swap(&mut back, &mut *handed_back.lock().unwrap_or_else(|p| p.into_inner()));
        for (ino, b) in back.drain(..) {
            predictor.not_fetched(ino, b);
        }
        let ino = o.file.ino.0;
        let t_us = o.at.saturating_duration_since(started).as_micros() as u64;
        let mut pending = Vec::new();
        for (j, &hit) in o.hits.iter().enumerate() {
            let read = Read {
                stream: ino,
                block: o.first + j as u64,
                hit,
                t_us,
                timed: true,
                request_blocks: o.hits.len() as u64,
                request_first: o.first,
                group: o.group,
            };
            out.clear();
            predictor.on_read(&read, &mut out);
            match inner.known_mode(&o.file) {
                Some(PrefetchMode::Auto) => {
                    for &b in &out {
                        inner.prefetch_block(&o.file, b, Some(&mut || predictor.pays(ino, b)));
                    }
                }
                // A fixed hint's file: the engine fetches nothing for it, so pays nothing.
                Some(_) => {}
                // Fetched by the lookup if the file turns out to be `auto`.
                None => {
                    for &b in &out {
                        if !pending.contains(&b) && inner.wants_prefetch(&o.file, b) && predictor.pays(ino, b)
                        {
                            pending.push(b);
                        }
                    }
                }
            }
        }
        if !pending.is_empty() {
            // Named while a lookup is under way already: not fetched, so the credit goes back.
            for b in inner.look_up_mode(&o.file, pending) {
                predictor.not_fetched(ino, b);
                inner.count_returned(o.file.ino);
            }
        }
        // The read's prefetches are on their way: now the work the predictor put off.
        predictor.catch_up();
        if let Some((r, d)) = predictor.decisions() {
            reads.store(r, Ordering::Relaxed);
            decided.store(d, Ordering::Relaxed);
        }
    }
}
