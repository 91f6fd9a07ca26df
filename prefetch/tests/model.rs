//! The shipped model through tract: parity with the vectors PyTorch wrote, and clear errors plus
//! the heuristic fallback for a missing, corrupt or mismatched model.

use std::collections::HashSet;
use std::path::PathBuf;

use augur_prefetch::features::{FEATURES, SEQ_LEN, Step};
use augur_prefetch::model::{Model, ModelError, ModelKnobs, ModelPredictor};
use augur_prefetch::select::START_CREDITS;
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
        let got = model.window_probs(&seq).unwrap();
        let want: Vec<f32> =
            case["probs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(got.len(), want.len());
        let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(diff <= tolerance, "tract differs from PyTorch by {diff}");
    }
}

/// What a caller does with an answer (the replay, the mount's engine): skips the blocks fetched
/// already, asks the budget for the rest. Returns how many were paid for (and so fetched).
fn fetch(p: &mut dyn Predictor, stream: u64, out: &[u64], fetched: &mut HashSet<u64>) -> usize {
    let mut paid = 0;
    for &b in out {
        if !fetched.contains(&b) && p.pays(stream, b) {
            fetched.insert(b);
            paid += 1;
        }
    }
    paid
}

fn same_as_fallback(model: Option<Model>) {
    // A fetch budget that does not bind here: 64 credits per read, at most `START_CREDITS`
    // saved this early (`Credits::growing`), more than linux-ra names anew at any read below.
    let loose = ModelKnobs { fetch_ratio: 64.0, ..ModelKnobs::default() };
    let mut with = ModelPredictor::new(model.clone(), ModelKnobs { fallback: "linux-ra", ..loose }).unwrap();
    // The default budget: some of what the fallback says, within the credits.
    let mut budgeted =
        ModelPredictor::new(model, ModelKnobs { fallback: "linux-ra", ..ModelKnobs::default() }).unwrap();
    let mut alone = by_name("linux-ra").unwrap();
    let (mut issued, mut reads) = (0.0, 0.0);
    let (mut fetched_with, mut fetched) = (HashSet::new(), HashSet::new());
    for b in [0u64, 1, 2, 3, 4, 5, 100, 101, 7, 8, 9] {
        let (mut x, mut y, mut z) = (Vec::new(), Vec::new(), Vec::new());
        with.on_read(&Read::at(0, b, false), &mut x);
        alone.on_read(&Read::at(0, b, false), &mut y);
        budgeted.on_read(&Read::at(0, b, false), &mut z);
        // Without a model, `model` passes on its fallback's answer, and a budget that does not
        // bind pays for every block of it not fetched already.
        assert_eq!(x, y, "read {b}");
        let new = x.iter().filter(|b| !fetched_with.contains(*b)).count();
        assert_eq!(fetch(&mut with, 0, &x, &mut fetched_with), new, "read {b}");
        assert!(z.iter().all(|b| y.contains(b)), "{z:?} is not from {y:?}");
        issued += fetch(&mut budgeted, 0, &z, &mut fetched) as f32;
        reads += 1.0;
        let budget = START_CREDITS + reads * ModelKnobs::default().fetch_ratio;
        assert!(issued <= budget, "{issued} blocks after {reads} reads");
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
    cfg["seq_len"] = serde_json::json!(SEQ_LEN);
    cfg["hidden"] = serde_json::json!(-3);
    std::fs::write(corrupt.with_extension("json"), cfg.to_string()).unwrap();
    let e = Model::load(&corrupt).err().unwrap();
    assert!(e.to_string().contains("hidden"), "{e}");
    // A state size the graph was not built with: refused at load, not on every read.
    cfg["hidden"] = serde_json::json!(16);
    std::fs::write(corrupt.with_extension("json"), cfg.to_string()).unwrap();
    let e = Model::load(&corrupt).err().expect("a model whose state does not fit is refused");
    eprintln!("hidden 16: {e}");
    assert!(e.to_string().contains("prefetch.onnx"), "{e}");
    // A model exported with the earlier input layout (a token id beside x) is named as such.
    cfg["hidden"] = serde_json::json!(32);
    cfg["inputs"] = serde_json::json!(["token", "x", "c"]);
    std::fs::write(corrupt.with_extension("json"), cfg.to_string()).unwrap();
    let e = Model::load(&corrupt).err().expect("a model of another input layout is refused");
    assert!(matches!(e, ModelError::Mismatch { .. }) && e.to_string().contains("inputs"), "{e}");

    same_as_fallback(None);
}

#[test]
fn the_model_predicts_ahead_of_a_stream() {
    let model = Model::load(&shipped()).unwrap();
    let mut p =
        ModelPredictor::new(Some(model), ModelKnobs { fallback: "none", ..ModelKnobs::default() }).unwrap();
    let unknown = ModelKnobs { fallback: "oracle", ..ModelKnobs::default() };
    assert!(ModelPredictor::new(None, unknown).err().is_some_and(|e| e.contains("oracle")));
    let mut out = Vec::new();
    for b in 0..64u64 {
        out.clear();
        p.on_read(&Read::at(0, 1000 + b, false), &mut out);
    }
    assert!(p.inferences > 0);
    assert!(out.iter().all(|&b| b != 1063), "never the block just read: {out:?}");
}

#[test]
fn the_step_state_is_per_stream() {
    // Two streams interleaved give each the answers it gets alone.
    let model = Model::load(&shipped()).unwrap();
    let knobs = ModelKnobs { fallback: "none", ..ModelKnobs::default() };
    let mut both = ModelPredictor::new(Some(model.clone()), knobs).unwrap();
    let mut alone = ModelPredictor::new(Some(model), knobs).unwrap();
    for i in 0..40u64 {
        let (mut x, mut y, mut z) = (Vec::new(), Vec::new(), Vec::new());
        both.on_read(&Read::at(1, 500 + 3 * i, false), &mut x);
        both.on_read(&Read::at(2, 9000 + i, false), &mut z);
        alone.on_read(&Read::at(1, 500 + 3 * i, false), &mut y);
        assert_eq!(x, y, "read {i}");
    }
}

#[test]
fn knobs_parse_and_bad_ones_are_named() {
    let k = ModelKnobs::parse("min_p=0.2, budget_blocks=4,fallback=mithril,bucket=1024").unwrap();
    assert_eq!((k.min_p, k.budget_blocks, k.fallback, k.bucket), (0.2, 4, "mithril", 1024));
    assert_eq!(k.threshold, ModelKnobs::default().threshold);
    for (bad, want) in [
        ("min_p", "expected name=value"),
        ("min_p=-1", "min_p"),
        ("budget_blocks=0", "1..=256"),
        ("bucket=0", "1..=65536"),
        ("fallback=model", "not auto or one of none, next-1"),
        ("speed=9", "unknown model knob"),
        ("cache_blocks=-3", "cache_blocks"),
        ("fetch_us=1e12", "at most 60000000"),
    ] {
        let e = ModelKnobs::parse(bad).unwrap_err();
        assert!(e.contains(want), "{bad}: {e}");
    }
    assert_eq!(ModelKnobs::parse("fallback=history").unwrap().fallback, "history");
    assert_eq!(ModelKnobs::parse("cache_blocks=0").unwrap().cache_blocks, 0, "0: no ghosts");
}

#[test]
fn the_fetch_budget_holds_over_many_short_streams() {
    // A thousand files of one read each: the budget is shared, so a new stream does not bring
    // credits of its own, and at most one block per read (plus the start) is paid for.
    let knobs = ModelKnobs { fallback: "next-8", ..ModelKnobs::default() };
    let mut p = ModelPredictor::new(None, knobs).unwrap();
    let mut paid = 0;
    for file in 0..1000u64 {
        let mut out = Vec::new();
        p.on_read(&Read { t_us: file * 100, timed: true, ..Read::at(file, 0, false) }, &mut out);
        paid += fetch(&mut p, file, &out, &mut HashSet::new());
    }
    let earned = (1000.0 * knobs.fetch_ratio) as usize;
    assert!(paid <= earned + START_CREDITS as usize, "{paid} blocks paid for in 1000 reads");
    assert!(paid >= earned, "and the budget is spent: {paid}");
}

#[test]
fn the_budget_pays_for_fetches_only() {
    // A sequential stream under next-8: each read names 8 blocks, 7 of them fetched already,
    // which cost nothing, so a budget of one block per read keeps up with the stream.
    let knobs = ModelKnobs { fallback: "next-8", fetch_ratio: 1.0, ..ModelKnobs::default() };
    let mut p = ModelPredictor::new(None, knobs).unwrap();
    let mut fetched = HashSet::new();
    for b in 0..500u64 {
        let mut out = Vec::new();
        p.on_read(&Read { t_us: b * 100, timed: true, ..Read::at(0, b, false) }, &mut out);
        fetch(&mut p, 0, &out, &mut fetched);
        assert!((b + 1..=b + 8).all(|x| fetched.contains(&x)), "read {b}: next 8 not all fetched");
    }
    // The blocks just fetched are named again on the next read (the predictor keeps no memory
    // of what it sent; the caller skips them at no cost), so a block named again after its
    // copy is gone (evicted) is fetched again, and the budget pays.
    let mut out = Vec::new();
    p.on_read(&Read { t_us: 60_000, timed: true, ..Read::at(0, 499, false) }, &mut out);
    assert!((500..=507).all(|b| out.contains(&b)), "{out:?}");
    assert_eq!(fetch(&mut p, 0, &out, &mut fetched), 0, "all fetched already: nothing paid");
    assert!(p.pays(0, 500));
    // Once the credits are spent nothing more is paid for, until one is handed back.
    while p.pays(0, 7) {}
    assert!(!p.pays(0, 2));
    p.not_fetched(0, 7);
    assert!(p.pays(0, 2));
}

#[test]
fn the_rest_of_a_reads_own_request_is_never_passed_on() {
    // A request of blocks 20..24 read block by block: the blocks after each one are read by the
    // request itself, so fetching them ahead hides nothing and would only spend the budget.
    for model in [None, Some(Model::load(&shipped()).unwrap())] {
        let knobs = ModelKnobs { fallback: "next-8", fetch_ratio: 64.0, ..ModelKnobs::default() };
        let mut p = ModelPredictor::new(model, knobs).unwrap();
        let mut all = Vec::new();
        for b in 20..24u64 {
            let mut out = Vec::new();
            let read = Read { request_first: 20, request_blocks: 4, ..Read::at(0, b, false) };
            p.on_read(&read, &mut out);
            assert!(out.iter().all(|&x| !(b + 1..24).contains(&x)), "read {b} passed on {out:?}");
            all.extend(out);
        }
        assert!((24..28).all(|b| all.contains(&b)), "what follows the request is: {all:?}");
    }
}

#[test]
fn the_bucket_caps_a_burst() {
    // Credits saved while reading cached blocks (nothing new to fetch) are spent on the next
    // jump, at most `bucket` of them at once.
    for (bucket, want) in [(4, 4), (256, 8)] {
        let knobs = ModelKnobs { fallback: "next-8", bucket, ..ModelKnobs::default() };
        let mut p = ModelPredictor::new(None, knobs).unwrap();
        let mut fetched = HashSet::new();
        for _ in 0..300 {
            let mut out = Vec::new();
            p.on_read(&Read::at(0, 0, true), &mut out);
            fetch(&mut p, 0, &out, &mut fetched);
        }
        let mut out = Vec::new();
        p.on_read(&Read::at(0, 5000, false), &mut out);
        assert_eq!(out.len(), 8, "{out:?}");
        assert_eq!(fetch(&mut p, 0, &out, &mut fetched), want, "bucket {bucket}");
    }
}

#[test]
fn a_step_put_off_changes_no_answer() {
    // The network's step on a read it cannot decide runs later (`catch_up`, or the next read):
    // the answers are the same whenever it runs.
    let model = Model::load(&shipped()).unwrap();
    let mut eager = ModelPredictor::new(Some(model.clone()), ModelKnobs::default()).unwrap();
    let mut lazy = ModelPredictor::new(Some(model), ModelKnobs::default()).unwrap();
    let mut t = 0;
    for i in 0..400u64 {
        // Two streams: one sequential in two-block requests, one jumping about.
        let (stream, block) = if i % 3 == 0 { (2, (i * 7919) % 5000) } else { (1, 100 + i) };
        t += 100;
        let read = Read {
            t_us: t,
            timed: true,
            request_first: block - (block % 2),
            request_blocks: 2,
            ..Read::at(stream, block, false)
        };
        let (mut x, mut y) = (Vec::new(), Vec::new());
        eager.on_read(&read, &mut x);
        eager.catch_up();
        lazy.on_read(&read, &mut y);
        assert_eq!(x, y, "read {i}");
    }
    eager.catch_up();
    lazy.catch_up();
    assert_eq!(eager.decisions(), lazy.decisions());
    assert_eq!(eager.inferences, lazy.inferences);
    assert!(eager.inferences > 0);
}
