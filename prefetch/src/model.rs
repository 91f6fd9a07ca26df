//! The `model` predictor: the ONNX network trained in `model-training/`, run with tract-onnx.
//!
//! State is kept per stream (its last `SEQ_LEN` steps, computed by `features`). For each read
//! the network gives, per delta token, the probability that the block that far away is read
//! within the stream's next `HORIZON` reads. The predictor takes the likeliest deltas (top-k
//! chosen here) while each is at least `min_p`, until their probabilities add up to `threshold`
//! (expected useful blocks) or `budget_blocks` are issued. When the best probability is below
//! `unsure_below`, or the share of recent reads the model had predicted falls below
//! `accuracy_floor`, the fallback heuristic decides instead.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tract_onnx::prelude::*;

use crate::features::{self, SEQ_LEN, Step, StreamFeatures, token_delta};
use crate::predict::{PerStream, Predictor, Read};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model file {path}: {what}")]
    File { path: String, what: String },
    #[error("model {path} does not fit this build: {what}")]
    Mismatch { path: String, what: String },
}

type Plan = Arc<TypedRunnableModel>;

/// A loaded network and the config it was trained with.
#[derive(Clone)]
pub struct Model {
    plan: Plan,
    pub path: PathBuf,
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
        ];
        for (k, v) in want {
            if cfg[k].as_u64() != Some(v) {
                return Err(ModelError::Mismatch {
                    path: p.clone(),
                    what: format!("{k} is {} in its config, {v} here", cfg[k]),
                });
            }
        }
        let names: Vec<&str> =
            cfg["features"].as_array().map_or(vec![], |a| a.iter().filter_map(|v| v.as_str()).collect());
        if names != features::FEATURES {
            return Err(ModelError::Mismatch {
                path: p.clone(),
                what: format!("features {names:?}, this build computes {:?}", features::FEATURES),
            });
        }
        let file_err = |e: TractError| ModelError::File { path: p.clone(), what: format!("{e:#}") };
        let nf = features::FEATURES.len();
        let plan = tract_onnx::onnx()
            .model_for_path(onnx)
            .map_err(file_err)?
            .with_input_fact(0, i64::fact([1, SEQ_LEN]).into())
            .map_err(file_err)?
            .with_input_fact(1, f32::fact([1, SEQ_LEN, nf]).into())
            .map_err(file_err)?
            .into_optimized()
            .map_err(file_err)?
            .into_runnable()
            .map_err(file_err)?;
        Ok(Model { plan, path: onnx.to_path_buf() })
    }

    /// Per-token probabilities (read within the horizon) for a window of steps.
    pub fn probs(&self, seq: &[Step; SEQ_LEN]) -> TractResult<Vec<f32>> {
        let nf = features::FEATURES.len();
        let tokens: Vec<i64> = seq.iter().map(|s| s.token).collect();
        let feats: Vec<f32> = seq.iter().flat_map(|s| s.features).collect();
        let t = tract_ndarray::Array2::from_shape_vec((1, SEQ_LEN), tokens)?;
        let f = tract_ndarray::Array3::from_shape_vec((1, SEQ_LEN, nf), feats)?;
        let out = self.plan.run(tvec!(Tensor::from(t).into(), Tensor::from(f).into()))?;
        Ok(out[0].to_plain_array_view::<f32>()?.iter().copied().collect())
    }
}

/// Knobs of the model predictor.
#[derive(Clone, Copy, Debug)]
pub struct ModelKnobs {
    /// Issue predictions until their probabilities add up to this (expected useful blocks).
    pub threshold: f32,
    /// Never issue a block less likely than this.
    pub min_p: f32,
    /// Most blocks issued per read.
    pub budget_blocks: usize,
    /// Below this top probability the fallback decides.
    pub unsure_below: f32,
    /// Below this share of recent reads predicted by the model, the fallback decides.
    pub accuracy_floor: f32,
}

impl Default for ModelKnobs {
    fn default() -> Self {
        Self { threshold: 4.0, min_p: 0.3, budget_blocks: 8, unsure_below: 0.3, accuracy_floor: 0.2 }
    }
}

/// Reads per stream over which the model's own accuracy is measured.
const ACCURACY_WINDOW: usize = 32;

#[derive(Default)]
struct ModelStream {
    features: StreamFeatures,
    /// Blocks the model predicted at each of the last `HORIZON` reads (to score later reads).
    predicted: VecDeque<Vec<u64>>,
    /// Whether each recent read was among the model's predictions for it.
    recent: VecDeque<bool>,
}

pub struct ModelPredictor {
    model: Option<Model>,
    fallback: Box<dyn Predictor>,
    knobs: ModelKnobs,
    streams: PerStream<ModelStream>,
    scratch: Vec<u64>,
    /// Times the fallback decided (unsure, inaccurate, or no model).
    pub fell_back: u64,
    pub inferences: u64,
}

impl ModelPredictor {
    /// With `model` None (missing or corrupt file), every read goes to `fallback`.
    pub fn new(model: Option<Model>, fallback: Box<dyn Predictor>, knobs: ModelKnobs) -> Self {
        Self {
            model,
            fallback,
            knobs,
            streams: PerStream::default(),
            scratch: Vec::new(),
            fell_back: 0,
            inferences: 0,
        }
    }
}

impl Predictor for ModelPredictor {
    fn name(&self) -> String {
        "model".into()
    }

    fn on_read(&mut self, r: &Read, out: &mut Vec<u64>) {
        let (stream, block) = (r.stream, r.block);
        // The fallback sees every read, so its state is current when it is needed.
        self.scratch.clear();
        self.fallback.on_read(r, &mut self.scratch);
        let s = self.streams.get(stream);
        let was_predicted = s.predicted.iter().any(|p| p.contains(&block));
        if s.predicted.iter().any(|p| !p.is_empty()) {
            s.recent.push_back(was_predicted);
            if s.recent.len() > ACCURACY_WINDOW {
                s.recent.pop_front();
            }
        }
        s.features.push(block, r.t_us, r.timed, r.request_blocks, r.group);
        let accuracy = if s.recent.len() < ACCURACY_WINDOW / 2 {
            1.0
        } else {
            s.recent.iter().filter(|&&x| x).count() as f32 / s.recent.len() as f32
        };
        let seq = s.features.sequence();
        let mut chosen = Vec::new();
        let mut confident = false;
        if let Some(model) = &self.model
            && let Ok(probs) = model.probs(&seq)
        {
            self.inferences += 1;
            let mut ranked: Vec<(usize, f32)> = probs.iter().copied().enumerate().collect();
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
            confident = ranked
                .iter()
                .find(|&&(t, _)| token_delta(t as i64).is_some_and(|d| d != 0))
                .is_some_and(|&(_, p)| p >= self.knobs.unsure_below);
            let mut cumulative = 0.0;
            for (token, p) in ranked {
                if p < self.knobs.min_p
                    || cumulative >= self.knobs.threshold
                    || chosen.len() >= self.knobs.budget_blocks
                {
                    break;
                }
                if let Some(d) = token_delta(token as i64)
                    && d != 0
                {
                    let b = block as i64 + d;
                    if b >= 0 {
                        cumulative += p;
                        chosen.push(b as u64);
                    }
                }
            }
        }
        let s = self.streams.get(stream);
        s.predicted.push_back(chosen.clone());
        if s.predicted.len() > features::HORIZON {
            s.predicted.pop_front();
        }
        if confident && accuracy >= self.knobs.accuracy_floor {
            out.extend(chosen);
        } else {
            self.fell_back += 1;
            out.extend_from_slice(&self.scratch);
        }
    }
}

/// The heuristic the model hands reads to when unsure or inaccurate (and runs as without a model).
pub const FALLBACK: &str = "linux-ra";

/// Any predictor by name: `model` runs `model` (or, without one, its fallback) with the default
/// knobs; the rest as [`crate::predict::by_name`].
pub fn predictor(name: &str, model: Option<&Model>) -> Result<Box<dyn Predictor>, String> {
    match name {
        "model" => {
            let fallback = crate::predict::by_name(FALLBACK)?;
            Ok(Box::new(ModelPredictor::new(model.cloned(), fallback, ModelKnobs::default())))
        }
        n => crate::predict::by_name(n),
    }
}
