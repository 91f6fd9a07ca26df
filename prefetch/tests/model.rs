//! The shipped model through tract: parity with the vectors PyTorch wrote, and clear errors plus
//! the heuristic fallback for a missing, corrupt or mismatched model.

use std::path::PathBuf;

use augur_prefetch::features::{FEATURES, SEQ_LEN, Step};
use augur_prefetch::model::{Model, ModelError, ModelKnobs, ModelPredictor};
use augur_prefetch::{Predictor, Read, by_name};

fn shipped() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/prefetch.onnx")
}

#[test]
fn tract_matches_the_parity_vectors() {
    let model = Model::load(&shipped()).expect("the shipped model loads");
    let parity: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(shipped().with_extension("parity.json")).unwrap())
            .unwrap();
    let tolerance = parity["tolerance"].as_f64().unwrap() as f32;
    let cases = parity["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let mut seq = [Step::PAD; SEQ_LEN];
        for (i, s) in seq.iter_mut().enumerate() {
            s.token = case["tokens"][i].as_i64().unwrap();
            for j in 0..FEATURES.len() {
                s.features[j] = case["features"][i][j].as_f64().unwrap() as f32;
            }
        }
        let got = model.probs(&seq).unwrap();
        let want: Vec<f32> =
            case["probs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(got.len(), want.len());
        let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(diff <= tolerance, "tract differs from PyTorch by {diff}");
    }
}

fn same_as_fallback(model: Option<Model>) {
    let mut with = ModelPredictor::new(model, by_name("linux-ra").unwrap(), ModelKnobs::default());
    let mut alone = by_name("linux-ra").unwrap();
    for b in [0u64, 1, 2, 3, 4, 5, 100, 101, 7, 8, 9] {
        let (mut x, mut y) = (Vec::new(), Vec::new());
        with.on_read(&Read::at(0, b, false), &mut x);
        alone.on_read(&Read::at(0, b, false), &mut y);
        assert_eq!(x, y, "without a model, `model` is its fallback");
    }
}

#[test]
fn missing_corrupt_or_mismatched_models_are_named_and_fall_back() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.onnx");
    let e = Model::load(&missing).err().unwrap();
    assert!(matches!(e, ModelError::File { .. }) && e.to_string().contains("none.json"), "{e}");

    let corrupt = dir.path().join("prefetch.onnx");
    std::fs::write(&corrupt, b"this is not an onnx file").unwrap();
    std::fs::copy(shipped().with_extension("json"), corrupt.with_extension("json")).unwrap();
    let e = Model::load(&corrupt).err().unwrap();
    assert!(e.to_string().contains("prefetch.onnx"), "{e}");

    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(shipped().with_extension("json")).unwrap()).unwrap();
    cfg["seq_len"] = serde_json::json!(8);
    std::fs::copy(shipped(), &corrupt).unwrap();
    std::fs::write(corrupt.with_extension("json"), cfg.to_string()).unwrap();
    let e = Model::load(&corrupt).err().unwrap();
    assert!(matches!(e, ModelError::Mismatch { .. }) && e.to_string().contains("seq_len"), "{e}");

    same_as_fallback(None);
}

#[test]
fn the_model_predicts_ahead_of_a_stream() {
    let model = Model::load(&shipped()).unwrap();
    let mut p = ModelPredictor::new(Some(model), by_name("none").unwrap(), ModelKnobs::default());
    let mut out = Vec::new();
    for b in 0..64u64 {
        out.clear();
        p.on_read(&Read::at(0, 1000 + b, false), &mut out);
    }
    assert!(p.inferences > 0);
    assert!(out.iter().all(|&b| b != 1063), "never the block just read: {out:?}");
}
