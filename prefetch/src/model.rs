//! The `model` predictor: the ONNX network trained in `model-training/`, run with tract-onnx.
//!
//! The exported graph is one LSTM step with constant shapes (`LANES` state lanes, sequence
//! length 1): inputs `x` = the token one-hot, the step's features, then the state h
//! [LANES, V + F + H], and `c` [LANES, H]; outputs `probs` [LANES, V], `h_out`, `c_out`. It is a
//! single ONNX `LSTM` node (the embedding, biases and recurrent weights folded into its input
//! weights) plus the head, which tract runs as two matrix products, its fused LSTM cell kernel
//! and a sigmoid: per-node overhead, not arithmetic, is most of a step's cost (models/README
//! item 38). State is kept per stream: its features (`features::StreamFeatures`) and `LANES`
//! LSTM states, each restarted every `SEQ_LEN` steps, `SEQ_LEN / LANES` steps apart; the oldest
//! answers, so the model looks back `SEQ_LEN - SEQ_LEN / LANES + 1 ..= SEQ_LEN` steps, exactly
//! the window lengths it was trained on, at one tract run per read. With one lane (the default: a run costs about 60% of a
//! two-lane run) that is 1..=16 steps.
//!
//! For each read the network gives, per delta token, the probability that the block that far
//! away is read within the stream's next `HORIZON` reads. The predictor takes the likeliest
//! deltas (top-k chosen here), skipping blocks it chose or the stream read recently, while each
//! is at least `min_p`, until their probabilities add up to `threshold` (expected useful blocks)
//! or `budget_blocks` blocks are chosen. Its choices are judged as if fetched
//! (`select::Shadow`) whoever decides. When the best probability is below `unsure_below`, the
//! measured accuracy of its recent choices on this stream (used / judged; until 32 are judged,
//! of its young guesses on every stream of the file type, `select::Pooled`) falls below
//! `accuracy_floor`, or its shadow hid less fetch time lately than `trust` × the fallback's, the
//! fallback (`auto`: the best heuristic for the stream, of those that hide more fetch time than
//! their waste costs, or nothing) decides. The answer is passed on best first; one fetch budget
//! over all streams pays for what of it is really fetched: the caller skips what is cached or in
//! flight, at no cost, and asks the budget (`Predictor::pays`) for each of the rest, so no credit
//! goes on a block that needs no fetch.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tract_onnx::prelude::*;

use crate::features::{self, RecentReads, SEQ_LEN, Step, StreamFeatures, token_delta};
use crate::predict::{PerStream, Predictor, Read};
use crate::select::{
    Credits, Idle, Judge, OUTCOMES, Pooled, Seen, Selector, Sent, Shadow, YOUNG_READS, clock_us,
};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model file {path}: {what}")]
    File { path: String, what: String },
    #[error("model {path} does not fit this build: {what}")]
    Mismatch { path: String, what: String },
}

type Plan = Arc<TypedRunnableModel>;

/// Delta tokens: the width of the token one-hot in the step graph's `x` and of `probs`.
const VOCAB: usize = features::VOCAB as usize;

/// State lanes one run of the step graph serves per stream (see the module doc).
pub const LANES: usize = 1;
/// Largest LSTM state accepted from a config.
const HIDDEN_MAX: u64 = 1024;

/// A loaded network and the config it was trained with.
#[derive(Clone)]
pub struct Model {
    plan: Plan,
    hidden: usize,
    pub path: PathBuf,
}

/// The recurrent state of one stream.
#[derive(Clone, Debug, Default)]
pub struct StreamState {
    h: Vec<f32>,
    c: Vec<f32>,
    steps: u64,
}

impl Model {
    /// Loads `prefetch.onnx` and checks `prefetch.json` beside it against this build's features.
    pub fn load(onnx: &Path) -> Result<Model, ModelError> {
        let p = onnx.display().to_string();
        let json_path = onnx.with_extension("json");
        let text = std::fs::read_to_string(&json_path)
            .map_err(|e| ModelError::File { path: json_path.display().to_string(), what: e.to_string() })?;
        let cfg: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::File { path: json_path.display().to_string(), what: e.to_string() })?;
        let want = [
            ("vocab", features::VOCAB as u64),
            ("delta_range", features::DELTA_RANGE as u64),
            ("seq_len", SEQ_LEN as u64),
            ("horizon", features::HORIZON as u64),
            ("lanes", LANES as u64),
        ];
        for (k, v) in want {
            if cfg[k].as_u64() != Some(v) {
                return Err(ModelError::Mismatch {
                    path: p.clone(),
                    what: format!("{k} is {} in its config, {v} here", cfg[k]),
                });
            }
        }
        let strings = |key: &str| -> Vec<&str> {
            cfg[key].as_array().map_or(vec![], |a| a.iter().filter_map(|v| v.as_str()).collect())
        };
        if strings("inputs") != ["x", "c"] {
            return Err(ModelError::Mismatch {
                path: p.clone(),
                what: format!(
                    "its graph takes inputs {:?}; this build serves the step graph with inputs [\"x\", \"c\"] \
                     (export it again: `python -m augur_train.train` in model-training/)",
                    strings("inputs")
                ),
            });
        }
        let names = strings("features");
        if names != features::FEATURES {
            return Err(ModelError::Mismatch {
                path: p.clone(),
                what: format!("features {names:?}, this build computes {:?}", features::FEATURES),
            });
        }
        let hidden = match cfg["hidden"].as_u64() {
            Some(h) if (1..=HIDDEN_MAX).contains(&h) => h as usize,
            _ => {
                return Err(ModelError::Mismatch {
                    path: p.clone(),
                    what: format!("hidden is {} in its config, expected 1..={HIDDEN_MAX}", cfg["hidden"]),
                });
            }
        };
        let file_err = |e: TractError| ModelError::File { path: p.clone(), what: format!("{e:#}") };
        let nf = features::FEATURES.len();
        let plan = tract_onnx::onnx()
            .model_for_path(onnx)
            .map_err(file_err)?
            .with_input_fact(0, f32::fact([LANES, VOCAB + nf + hidden]).into())
            .map_err(file_err)?
            .with_input_fact(1, f32::fact([LANES, hidden]).into())
            .map_err(file_err)?
            .into_optimized()
            .map_err(file_err)?
            .into_runnable()
            .map_err(file_err)?;
        let model = Model { plan, hidden, path: onnx.to_path_buf() };
        // One step on a padding token, so a graph that loads but cannot run, or answers in
        // other shapes, is refused here rather than failing on every read.
        let mut probs = Vec::new();
        model
            .runner()
            .and_then(|mut r| r.step(&mut StreamState::default(), &Step::PAD, &mut probs))
            .map_err(|e| ModelError::Mismatch {
                path: p.clone(),
                what: format!("a trial step failed: {e:#}"),
            })?;
        Ok(model)
    }

    /// A runner: tract's execution state for this plan, reused from read to read.
    pub fn runner(&self) -> TractResult<Runner> {
        let nf = features::FEATURES.len();
        let inputs = [
            Tensor::zero::<f32>(&[LANES, VOCAB + nf + self.hidden])?,
            Tensor::zero::<f32>(&[LANES, self.hidden])?,
        ];
        Ok(Runner {
            state: TypedSimpleState::new(&self.plan)?,
            hidden: self.hidden,
            inputs: inputs.map(Arc::new),
        })
    }

    /// Per-token probabilities after a whole window fed step by step from a fresh state (what
    /// training computes for a window; the parity vectors are checked this way).
    pub fn window_probs(&self, seq: &[Step; SEQ_LEN]) -> TractResult<Vec<f32>> {
        let mut runner = self.runner()?;
        let mut state = StreamState::default();
        let mut probs = Vec::new();
        for s in seq {
            runner.step(&mut state, s, &mut probs)?;
        }
        Ok(probs)
    }
}

/// Runs the step graph for one predictor (tract's state and the input tensors are reused, not
/// rebuilt per read).
pub struct Runner {
    state: TypedSimpleState,
    hidden: usize,
    /// `x`, `c`: filled in place each step.
    inputs: [Arc<Tensor>; 2],
}

impl Runner {
    /// Feeds one step of a stream; writes the per-token probabilities (read within the
    /// horizon) as seen from the stream's oldest state into `probs`.
    pub fn step(&mut self, state: &mut StreamState, step: &Step, probs: &mut Vec<f32>) -> TractResult<()> {
        let (h, nf) = (self.hidden, features::FEATURES.len());
        if state.h.len() != LANES * h {
            *state = StreamState { h: vec![0.0; LANES * h], c: vec![0.0; LANES * h], steps: 0 };
        }
        let stagger = (SEQ_LEN / LANES) as u64;
        // Steps since each lane (re)started, this one not counted.
        let age = |lane: usize| (state.steps + lane as u64 * stagger) % SEQ_LEN as u64;
        for lane in 0..LANES {
            if age(lane) == 0 {
                state.h[lane * h..(lane + 1) * h].fill(0.0);
                state.c[lane * h..(lane + 1) * h].fill(0.0);
            }
        }
        let older = (0..LANES).max_by_key(|&l| age(l)).unwrap_or(0);
        // Filled in place: tract drops its references when a run ends (if a failed run kept
        // one, `make_mut` copies the tensor instead of failing every later step).
        let token = usize::try_from(step.token).ok().filter(|&t| t < VOCAB).ok_or_else(|| {
            TractError::msg(format!("token {} is outside the vocabulary 0..{VOCAB}", step.token))
        })?;
        let [x, c] = &mut self.inputs;
        // x = [token one-hot | features | h] per lane.
        let mut xs = Arc::make_mut(x).try_as_plain_ram_mut()?;
        for (lane, row) in xs.as_slice_mut::<f32>()?.chunks_exact_mut(VOCAB + nf + h).enumerate() {
            let (onehot, rest) = row.split_at_mut(VOCAB);
            onehot.fill(0.0);
            onehot[token] = 1.0;
            rest[..nf].copy_from_slice(&step.features);
            rest[nf..].copy_from_slice(&state.h[lane * h..(lane + 1) * h]);
        }
        Arc::make_mut(c).try_as_plain_ram_mut()?.as_slice_mut::<f32>()?.copy_from_slice(&state.c);
        let out = self.state.run(self.inputs.iter().map(|t| TValue::from_const(t.clone())).collect())?;
        let [p, h_out, c_out] = &out[..] else {
            return Err(TractError::msg(format!("the graph gave {} outputs, expected 3", out.len())));
        };
        let (p, h_out, c_out) = (
            p.try_as_plain_ram()?.as_slice::<f32>()?,
            h_out.try_as_plain_ram()?.as_slice::<f32>()?,
            c_out.try_as_plain_ram()?.as_slice::<f32>()?,
        );
        if p.len() != LANES * VOCAB || h_out.len() != state.h.len() || c_out.len() != state.c.len() {
            return Err(TractError::msg(format!(
                "the graph gave outputs of {} / {} / {} values, expected {} / {} / {}",
                p.len(),
                h_out.len(),
                c_out.len(),
                LANES * VOCAB,
                state.h.len(),
                state.c.len()
            )));
        }
        probs.clear();
        probs.extend_from_slice(&p[older * VOCAB..(older + 1) * VOCAB]);
        state.h.copy_from_slice(h_out);
        state.c.copy_from_slice(c_out);
        state.steps += 1;
        Ok(())
    }
}

/// Knobs of the model predictor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelKnobs {
    /// Issue predictions until their probabilities add up to this (expected useful blocks).
    pub threshold: f32,
    /// Never issue a block less likely than this.
    pub min_p: f32,
    /// Most new blocks issued per read.
    pub budget_blocks: usize,
    /// Below this top probability the fallback decides.
    pub unsure_below: f32,
    /// Below this measured accuracy (used / issued) of recent predictions, the fallback decides.
    pub accuracy_floor: f32,
    /// What decides when the model does not: one of `predict::all_heuristics`, or `auto` (per
    /// stream, the heuristic whose shadow scores best of those whose waste costs less than they
    /// hide, else nothing; see `select`).
    pub fallback: &'static str,
    /// The fetch latency the client sees (µs): a prefetch named this long before its read hid a
    /// whole miss, when choices are judged (`select::Shadow`).
    pub fetch_us: f32,
    /// The byte budget: blocks fetched ahead per block read, over all streams (model and
    /// fallback together, paid in `Predictor::pays`), kept by a bucket of at most `bucket`
    /// credits.
    pub fetch_ratio: f32,
    /// The most credits saved up (blocks): the largest burst of fetches ahead of reads, and how
    /// far over `fetch_ratio` a stretch of reads can go. The real budget reaches it only after
    /// `bucket` / `select::SAVE_PER_READ` block reads (`select::Credits::growing`).
    pub bucket: usize,
    /// The most credits a shadow saves up (`select::Shadow`, `Judge::bucket`): the largest
    /// burst a candidate is judged as if it could fetch.
    pub shadow_bucket: usize,
    /// Also pass on the fallback's predictions after the model's own (the budget pays for them
    /// while credits last).
    pub fill: bool,
    /// The model decides only while its shadow score is at least this times the fallback's
    /// (the fetch time each would have hidden recently, see `select::Shadow`). A fallback of one
    /// heuristic is not judged (score 0): against it only `unsure_below` and `accuracy_floor`
    /// count.
    pub trust: f32,
    /// What a prefetch never read costs a candidate of `auto`, in fetches (`Judge::waste_cost`):
    /// `auto` passes on only candidates whose `select::Shadow::net` is not below 0. The network
    /// needs `accuracy_floor` (5%), far above what its waste costs, so its `net` is not checked.
    pub waste_cost: f32,
    /// Blocks the client's cache holds, which `auto` judges its candidates in
    /// (`select::Judge::cache_blocks`, `select::Ghost`; at most `select::GHOST_BLOCKS_MAX`);
    /// 0: ranked by their shadows instead. A mount passes its cache, `augur trace eval` the
    /// replay's.
    pub cache_blocks: usize,
}

impl Default for ModelKnobs {
    fn default() -> Self {
        // Chosen by validation inside the first 70% of the shared traces (`augur trace eval
        // --head-frac 0.7 --tail-frac 0.3 --model-knobs ...`, see models/README.md), never on
        // the last 30% that the figures are reported on.
        Self {
            threshold: 16.0,
            min_p: 0.1,
            budget_blocks: 32,
            unsure_below: 0.05,
            accuracy_floor: 0.05,
            fallback: FALLBACK,
            fetch_us: 1000.0,
            fetch_ratio: 0.97,
            bucket: crate::select::BUCKET_BLOCKS as usize,
            shadow_bucket: crate::select::SHADOW_BUCKET_BLOCKS as usize,
            fill: true,
            trust: 1.0,
            waste_cost: crate::select::WASTE_COST,
            cache_blocks: crate::select::CACHE_BLOCKS,
        }
    }
}

impl ModelKnobs {
    /// Parses `name=value,...` over the defaults (`threshold`, `min_p`, `budget_blocks`,
    /// `unsure_below`, `accuracy_floor`, `fallback`, `fetch_us`, `fetch_ratio`, `bucket`, `shadow_bucket`, `fill`,
    /// `trust`, `waste_cost`, `cache_blocks`).
    pub fn parse(text: &str) -> Result<Self, String> {
        Self::default().with(text)
    }

    /// How choices are judged (`select::Shadow`).
    pub fn judge(&self) -> Judge {
        Judge {
            fetch_us: self.fetch_us,
            fetch_ratio: self.fetch_ratio,
            bucket: self.shadow_bucket as f32,
            waste_cost: self.waste_cost,
            cache_blocks: self.cache_blocks,
        }
    }

    /// Parses `name=value,...` over these knobs.
    pub fn with(self, text: &str) -> Result<Self, String> {
        let mut k = self;
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) =
                part.split_once('=').ok_or_else(|| format!("model knob {part:?}: expected name=value"))?;
            let bad = |e: &dyn std::fmt::Display| format!("model knob {name}={value:?}: {e}");
            let number = || match value.parse::<f32>() {
                Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
                Ok(_) => Err(bad(&"must be a number >= 0")),
                Err(e) => Err(bad(&e)),
            };
            match name {
                "threshold" => k.threshold = number()?,
                "min_p" => k.min_p = number()?,
                "unsure_below" => k.unsure_below = number()?,
                "accuracy_floor" => k.accuracy_floor = number()?,
                "fetch_ratio" => k.fetch_ratio = number()?,
                "fetch_us" => {
                    k.fetch_us = number()?;
                    if k.fetch_us > 60e6 {
                        return Err(bad(&"must be at most 60000000 (60 s)"));
                    }
                }
                "trust" => k.trust = number()?,
                "waste_cost" => k.waste_cost = number()?,
                "cache_blocks" => {
                    k.cache_blocks = value.parse().map_err(|e| bad(&e))?;
                }
                "fill" => {
                    k.fill = match value {
                        "1" | "true" => true,
                        "0" | "false" => false,
                        _ => return Err(bad(&"must be 0 or 1")),
                    }
                }
                "fallback" => {
                    use crate::predict::{all_heuristics, heuristics_listed};
                    k.fallback = std::iter::once("auto")
                        .chain(all_heuristics())
                        .find(|h| *h == value)
                        .ok_or_else(|| bad(&format!("not auto or one of {}", heuristics_listed())))?;
                }
                "bucket" | "shadow_bucket" => {
                    let v: usize = value.parse().map_err(|e| bad(&e))?;
                    if !(1..=65536).contains(&v) {
                        return Err(bad(&"must be 1..=65536"));
                    }
                    *if name == "bucket" { &mut k.bucket } else { &mut k.shadow_bucket } = v;
                }
                "budget_blocks" => {
                    k.budget_blocks = value.parse().map_err(|e| bad(&e))?;
                    if !(1..=256).contains(&k.budget_blocks) {
                        return Err(bad(&"must be 1..=256"));
                    }
                }
                _ => {
                    return Err(format!(
                        "unknown model knob {name:?} (known: threshold, min_p, budget_blocks, unsure_below, \
                         accuracy_floor, fallback, fetch_us, fetch_ratio, bucket, shadow_bucket, fill, trust, \
                         waste_cost, cache_blocks)"
                    ));
                }
            }
        }
        Ok(k)
    }
}

#[derive(Default)]
struct ModelStream {
    features: StreamFeatures,
    state: StreamState,
    reads: u64,
    /// Blocks fetched for this stream recently (paid for, `Predictor::pays`): a hit on one of
    /// them is one a prefetch helped (`Seen::useful`).
    sent: Sent,
    /// The stream's reads since it was last idle: read recently, so cached or in flight.
    fresh: RecentReads,
    /// What `Idle::read` returned at this stream's last read.
    last_at: u64,
    /// `Group::index` of its file type.
    group: usize,
    /// The highest block it read.
    highest: u64,
    /// The model's own choices, judged as if fetched, also while the fallback decides, so the
    /// model can take over again.
    shadow: Shadow,
}

/// Passes on `blocks`, best first, less those the read's own request reads next and those
/// passed on already for this read. What is cached or in flight already the caller skips at no
/// cost; the rest the budget pays for while it lasts (`Predictor::pays`).
fn pass_on(r: &Read, blocks: &[u64], out: &mut Vec<u64>, from: usize) {
    for &b in blocks {
        if !r.in_request_after(b) && !out[from..].contains(&b) {
            out.push(b);
        }
    }
}

pub struct ModelPredictor {
    runner: Option<Runner>,
    fallback: Selector,
    knobs: ModelKnobs,
    streams: PerStream<ModelStream>,
    /// Real fetch credits (see `ModelKnobs::fetch_ratio`), shared by the model and the fallback
    /// over every stream, so the budget holds however many streams there are.
    credits: Credits,
    /// Reads over every stream, and which streams went idle.
    idle: Idle,
    /// Per file type group: the network's young guesses on every stream of the group
    /// (`select::Pooled`). Until a stream's own shadow has judged `OUTCOMES` / 2 blocks, the
    /// network decides there only if this pool's accuracy is at least `accuracy_floor`: a
    /// short stream (a small file) would never be judged on its own.
    young: [Pooled; crate::filetype::Group::ALL.len()],
    scratch: Vec<u64>,
    picks: Vec<u64>,
    probs: Vec<f32>,
    ranked: Vec<(usize, f32)>,
    /// The last read's network step, when it could not decide that read (run by `catch_up`).
    pending: Option<Pending>,
    /// Times the fallback decided (unsure, inaccurate, behind it, or no model).
    pub fell_back: u64,
    /// Times the network's choice was passed on.
    pub decided: u64,
    pub inferences: u64,
}

/// A read whose network step is still to run (see `ModelPredictor::catch_up`).
struct Pending {
    step: Step,
    read: Read,
    /// The stream's read count at this read.
    reads: u64,
}

impl ModelPredictor {
    /// With `model` None (missing or corrupt file), every read goes to the fallback. Fails on a
    /// `knobs.fallback` that names no heuristic (`ModelKnobs::parse` checks that already), or
    /// if tract cannot make a runner for the model.
    pub fn new(model: Option<Model>, knobs: ModelKnobs) -> Result<Self, String> {
        let fallback = Selector::new(knobs.fallback, knobs.judge())?;
        let runner = match model {
            Some(m) => Some(m.runner().map_err(|e| format!("model {}: no runner: {e:#}", m.path.display()))?),
            None => None,
        };
        Ok(Self {
            runner,
            fallback,
            knobs,
            streams: PerStream::default(),
            credits: Credits::growing(knobs.bucket as f32),
            idle: Idle::new(IDLE_READS),
            young: Default::default(),
            scratch: Vec::new(),
            picks: Vec::new(),
            probs: Vec::new(),
            ranked: Vec::new(),
            pending: None,
            fell_back: 0,
            decided: 0,
            inferences: 0,
        })
    }

    /// Runs the network's step for a read: its state moves on, its choices (`picks`) are
    /// offered to its shadow. Returns the top probability, or None if the step failed.
    fn infer(&mut self, p: &Pending) -> Option<f32> {
        let runner = self.runner.as_mut()?;
        let s = self.streams.get(p.read.stream);
        runner.step(&mut s.state, &p.step, &mut self.probs).ok()?;
        self.inferences += 1;
        let min_p = self.knobs.min_p;
        self.ranked.clear();
        self.ranked.extend(
            self.probs
                .iter()
                .enumerate()
                .filter(|&(t, &p)| p >= min_p && token_delta(t as i64).is_some_and(|d| d != 0))
                .map(|(t, &p)| (t, p)),
        );
        self.ranked.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        let top = self.ranked.first().map_or(0.0, |r| r.1);
        self.picks.clear();
        let mut cumulative = 0.0;
        let r = &p.read;
        for &(token, prob) in &self.ranked {
            if cumulative >= self.knobs.threshold || self.picks.len() >= self.knobs.budget_blocks {
                break;
            }
            let Some(b) = token_delta(token as i64).and_then(|d| r.block.checked_add_signed(d)) else {
                continue;
            };
            // Chosen or read recently (so cached or in flight): not again.
            if s.shadow.awaits(b) || s.fresh.contains(b) || r.in_request_after(b) {
                continue;
            }
            cumulative += prob;
            self.picks.push(b);
        }
        s.shadow.offer(&self.picks, clock_us(r), p.reads, |_| false);
        Some(top)
    }
}

impl Predictor for ModelPredictor {
    fn name(&self) -> String {
        "model".into()
    }

    fn on_read(&mut self, r: &Read, out: &mut Vec<u64>) {
        self.catch_up();
        let block = r.block;
        // The fallback sees every read, so its state is current when it is needed.
        self.scratch.clear();
        let at = self.idle.read(r.stream);
        let young = &mut self.young;
        self.idle.sweep(
            &mut self.streams,
            |s| s.last_at,
            |_, s| {
                // Gone idle (a file closed, a volume gone quiet): what it sent and read will be
                // gone from the cache when it is back, so a hit on it then is no prefetch's doing,
                // and the network may choose it again; what its shadow awaits was wasted.
                s.sent = Sent::default();
                s.fresh = RecentReads::default();
                s.shadow.expire(s.highest);
                young[s.group].add(s.shadow.take_young(), false);
            },
        );
        let useful = self.streams.get(r.stream).sent.useful(r);
        let fallback_score = self.fallback.select(r, useful, &mut self.scratch);
        let s = self.streams.get(r.stream);
        if s.reads == 0 {
            s.shadow = Shadow::new(self.knobs.shadow_bucket as f32);
            s.group = r.group.index();
        }
        s.last_at = at;
        s.highest = s.highest.max(block);
        s.fresh.push(block);
        s.reads += 1;
        self.credits.earn_read(self.knobs.fetch_ratio);
        let now = clock_us(r);
        s.shadow.on_read(&Seen { block, now_us: now, reads: s.reads, useful }, &self.knobs.judge());
        self.young[s.group].add(s.shadow.take_young(), s.reads <= YOUNG_READS);
        let young = &self.young[s.group];
        let trusted = if s.shadow.judged() < OUTCOMES / 2 {
            young.accuracy() >= self.knobs.accuracy_floor
        } else {
            s.shadow.accuracy() >= self.knobs.accuracy_floor
        };
        let step = s.features.push(block, r.t_us, r.timed, r.request_blocks, r.group);
        let step = Pending { step, read: *r, reads: s.reads };
        // Whatever the network says, it cannot decide this read (inaccurate or behind its
        // fallback lately, or no model): the fallback's answer goes out now, and the network's
        // step, which keeps its state and its shadow current, waits for `catch_up`.
        let may_decide =
            self.runner.is_some() && trusted && s.shadow.score() >= self.knobs.trust * fallback_score;
        let from = out.len();
        if !may_decide {
            self.fell_back += 1;
            pass_on(r, &self.scratch, out, from);
            self.pending = self.runner.is_some().then_some(step);
            return;
        }
        let top = self.infer(&step);
        if top.is_some_and(|top| top >= self.knobs.unsure_below) {
            self.decided += 1;
            pass_on(r, &self.picks, out, from);
            if self.knobs.fill {
                pass_on(r, &self.scratch, out, from);
            }
        } else {
            self.fell_back += 1;
            pass_on(r, &self.scratch, out, from);
        }
    }

    fn catch_up(&mut self) {
        if let Some(p) = self.pending.take() {
            self.infer(&p);
        }
    }

    fn decisions(&self) -> Option<(u64, u64)> {
        Some((self.fell_back + self.decided, self.decided))
    }

    fn pays(&mut self, stream: u64, block: u64) -> bool {
        let paid = self.credits.spend();
        if paid {
            self.streams.get(stream).sent.insert(block);
        }
        paid
    }

    fn not_fetched(&mut self, stream: u64, block: u64) {
        self.credits.earn(1.0);
        self.streams.get(stream).sent.remove(block);
    }
}

/// The heuristic the model hands reads to when unsure or inaccurate (and runs as without a model).
pub const FALLBACK: &str = "auto";

/// Reads of other streams after which a stream counts as idle: its memory of blocks sent and
/// read is dropped (they are long evicted), and what its shadow still awaits up to the highest
/// block it read is judged unused (`select::Shadow::expire`).
pub use crate::select::IDLE_READS;

/// Any predictor by name: `model` runs `model` (or, without one, its fallback) with the default
/// knobs; the rest as [`crate::predict::by_name`].
pub fn predictor(name: &str, model: Option<&Model>) -> Result<Box<dyn Predictor>, String> {
    predictor_with(name, model, ModelKnobs::default())
}

/// [`predictor`] with the model's knobs given.
pub fn predictor_with(
    name: &str,
    model: Option<&Model>,
    knobs: ModelKnobs,
) -> Result<Box<dyn Predictor>, String> {
    match name {
        "model" => Ok(Box::new(ModelPredictor::new(model.cloned(), knobs)?)),
        "auto" => Ok(Box::new(Selector::new("auto", knobs.judge())?)),
        n => crate::predict::by_name(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(p: &mut ModelPredictor, stream: u64, block: u64) {
        p.on_read(&Read::at(stream, block, false), &mut Vec::new());
    }

    /// Stream 1 reads once more after `others` reads of stream 2; whether a hit on block 10,
    /// paid for before the pause, then counts as a prefetch's doing, whether block 3, read
    /// before it, is still taken as cached, and whether the network's shadow still awaits
    /// block 20, named before it.
    fn after_pause(others: u64) -> (bool, bool, bool) {
        let mut p = ModelPredictor::new(None, ModelKnobs::default()).unwrap();
        for b in 0..4 {
            read(&mut p, 1, b);
        }
        assert!(p.pays(1, 10));
        p.streams.get(1).shadow.offer(&[20], 0, 4, |_| false);
        for i in 0..others {
            read(&mut p, 2, 1_000 + i);
        }
        read(&mut p, 1, 4);
        let s = p.streams.get(1);
        assert!(s.fresh.contains(4));
        (s.sent.useful(&Read::at(1, 10, true)), s.fresh.contains(3), s.shadow.awaits(20))
    }

    #[test]
    fn a_stream_back_from_idle_forgets_what_it_sent_and_read() {
        assert_eq!(after_pause(0), (true, true, true));
        assert_eq!(after_pause(IDLE_READS - 1), (true, true, true), "not idle yet");
        assert_eq!(after_pause(IDLE_READS), (false, false, false), "idle: a hit now is no prefetch's doing");
    }
}
