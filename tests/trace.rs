//! `augur trace eval` end to end on trace excerpts kept in the repository (tests/data/traces).

mod common;

use common::augur;

fn excerpt(name: &str) -> String {
    format!("{}/tests/data/traces/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn eval_reports_every_heuristic_per_trace_in_text_and_json() {
    let cp = excerpt("cloudphysics_excerpt.csv.gz");
    let arc = excerpt("arc_P3_excerpt.csv.gz");
    let (ok, out, err) = augur(&["trace", "eval", &cp, &arc, "--tail-frac", "0.3"]);
    assert!(ok, "{err}");
    for name in augur_prefetch::all_heuristics() {
        assert_eq!(
            out.matches(&format!("\n  {name} ")).count(),
            2,
            "{name} reported for both traces:\n{out}"
        );
    }
    assert!(out.contains("untimed"), "ARC is replayed as untimed:\n{out}");

    let (ok, out, err) = augur(&["trace", "eval", &cp, "--json", "--block-kib", "4", "--latency-ms", "2"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let scores = v[0]["scores"].as_array().unwrap();
    assert_eq!(scores.len(), augur_prefetch::all_heuristics().count());
    let none = scores.iter().find(|s| s["predictor"] == "none").unwrap();
    assert_eq!(none["issued"], 0);
    assert!(none["mean_latency_us"].as_f64().unwrap() > 0.0);
    for s in scores {
        let acc = s["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{s}");
    }
    // On this VM trace sequential readahead helps: next-4 beats no prefetch.
    let next4 = scores.iter().find(|s| s["predictor"] == "next-4").unwrap();
    assert!(next4["mean_latency_us"].as_f64() < none["mean_latency_us"].as_f64(), "{next4} vs {none}");
}

#[test]
fn eval_refuses_bad_input_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "time,op\n1,R\n").unwrap();
    let (ok, _, err) = augur(&["trace", "eval", bad.to_str().unwrap()]);
    assert!(!ok && err.contains("header") && err.contains("bad.csv"), "{err}");
    let (ok, _, err) = augur(&["trace", "eval", "/nonexistent/t.csv"]);
    assert!(!ok && err.contains("/nonexistent/t.csv"), "{err}");
    let cp = excerpt("cloudphysics_excerpt.csv.gz");
    let (ok, _, err) = augur(&["trace", "eval", &cp, "--predictors", "oracle"]);
    assert!(!ok && err.contains("unknown predictor \"oracle\""), "{err}");
    let (ok, _, err) = augur(&["trace", "eval", &cp, "--cache-frac", "0"]);
    assert!(!ok && err.contains("--cache-frac"), "{err}");
    let (ok, _, err) = augur(&["trace", "eval", &cp, "--latency-ms=-1"]);
    assert!(!ok && err.contains("--latency-ms"), "{err}");
    let (ok, _, err) = augur(&["trace", "eval", &cp, "--head-frac", "1.5"]);
    assert!(!ok && err.contains("--head-frac"), "{err}");
    // A corrupt size is an error, not billions of blocks replayed; an overflowing offset too.
    let header = augur_prefetch::trace::CSV_HEADER;
    std::fs::write(&bad, format!("{header}\n0,R,0,4096,1\n1,R,0,99999999999999,1\n")).unwrap();
    let (ok, _, err) = augur(&["trace", "eval", bad.to_str().unwrap()]);
    assert!(!ok && err.contains("bad.csv: line 3: size_bytes 99999999999999"), "{err}");
    std::fs::write(&bad, format!("{header}\n0,R,18446744073709551615,4096,1\n")).unwrap();
    let (ok, _, err) = augur(&["trace", "eval", bad.to_str().unwrap()]);
    assert!(!ok && err.contains("line 2") && err.contains("past byte 2^64 - 1"), "{err}");
    std::fs::write(&bad, "").unwrap();
    let (ok, _, err) = augur(&["trace", "eval", bad.to_str().unwrap()]);
    assert!(!ok && err.contains("empty file"), "{err}");
    // Nothing to score is said, and the other traces of the run are still judged.
    let writes = dir.path().join("writes.csv");
    std::fs::write(&writes, format!("{header}\n0,W,0,4096,1\n")).unwrap();
    let (ok, out, err) = augur(&["trace", "eval", writes.to_str().unwrap(), &cp, "--predictors", "auto"]);
    assert!(ok, "{err}");
    let (writes_part, rest) = out.split_once("cloudphysics_excerpt").expect("both traces reported");
    assert!(writes_part.contains("no reads in the scored part: nothing to judge"), "{out}");
    assert!(!writes_part.contains("fastest SPEC heuristic"), "nothing judged on no reads: {out}");
    assert!(rest.contains("auto: ") && rest.contains("the fastest SPEC heuristic"), "{out}");
    let (ok, out, err) =
        augur(&["trace", "eval", writes.to_str().unwrap(), "--predictors", "auto", "--json"]);
    assert!(ok, "{err}");
    let reports: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(reports[0]["scores"].as_array().unwrap().iter().all(|s| s.get("verdict").is_none()), "{out}");
    let (ok, _, err) = augur(&["trace", "eval", &cp, "--iat-us", "99999999999"]);
    assert!(!ok && err.contains("--iat-us"), "{err}");
}

/// Reads a .npy header: (descr, shape).
fn npy_header(path: &std::path::Path) -> (String, String) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00", "{}", path.display());
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + len]).unwrap().to_string();
    let descr = header.split("'descr': '").nth(1).unwrap().split('\'').next().unwrap().to_string();
    let shape = header.split("'shape': ").nth(1).unwrap().split(')').next().unwrap().to_string() + ")";
    (descr, shape)
}

#[test]
fn features_and_convert_write_what_training_and_replay_read() {
    let dir = tempfile::tempdir().unwrap();
    let cp = excerpt("cloudphysics_excerpt.csv.gz");
    let out = dir.path().join("feat");
    let (ok, stdout, err) =
        augur(&["trace", "features", &cp, "--out", out.to_str().unwrap(), "--stride", "2"]);
    assert!(ok, "{err}");
    let n: usize = stdout.split(": ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(n > 1000, "{stdout}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("features.json")).unwrap()).unwrap();
    let (seq, nf) = (config["seq_len"].as_u64().unwrap(), config["features"].as_array().unwrap().len());
    let name = "cloudphysics_excerpt";
    assert_eq!(npy_header(&out.join(format!("{name}.tokens.npy"))), ("<i8".into(), format!("({n}, {seq})")));
    assert_eq!(
        npy_header(&out.join(format!("{name}.features.npy"))),
        ("<f4".into(), format!("({n}, {seq}, {nf})"))
    );
    assert_eq!(npy_header(&out.join(format!("{name}.labels.npy"))), ("<i8".into(), format!("({n},)")));

    // convert: reads of one stream, a prefix, gzip by name; the result replays.
    let small = dir.path().join("small.csv.gz");
    let (ok, stdout, err) =
        augur(&["trace", "convert", &cp, small.to_str().unwrap(), "--reads-only", "--limit", "500"]);
    assert!(ok, "{err}");
    assert!(stdout.starts_with("wrote 500 of 20000"), "{stdout}");
    let (ok, out, err) = augur(&["trace", "eval", small.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["requests"], 500);
}

#[test]
fn eval_runs_the_shipped_model_and_falls_back_without_one() {
    let cp = excerpt("cloudphysics_excerpt.csv.gz");
    let model = format!("{}/models/prefetch.onnx", env!("CARGO_MANIFEST_DIR"));
    let (ok, out, err) = augur(&["trace", "eval", &cp, "--predictors", "model", "--model", &model, "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let m = v[0]["scores"].as_array().unwrap().iter().find(|s| s["predictor"] == "model").cloned().unwrap();
    assert!(m["issued"].as_u64().unwrap() > 0, "{m}");
    // How often the network decided is reported for `model` only.
    let decided = m["model_decided"].as_f64().unwrap();
    assert!(decided > 0.0 && decided <= 1.0, "{m}");
    let next1 = v[0]["scores"].as_array().unwrap().iter().find(|s| s["predictor"] == "next-1").cloned();
    assert!(next1.is_some_and(|s| s.get("model_decided").is_none()));
    // SPEC §7's verdict on `model`, against the set's fastest within over-fetch 1.0.
    let scores = v[0]["scores"].as_array().unwrap();
    let lat = |s: &serde_json::Value| s["mean_latency_us"].as_f64().unwrap();
    let best = scores
        .iter()
        .filter(|s| augur_prefetch::predict::HEURISTICS.contains(&s["predictor"].as_str().unwrap()))
        .filter(|s| s["over_fetch"].as_f64().unwrap() <= 1.0)
        .min_by(|a, b| lat(a).total_cmp(&lat(b)))
        .unwrap();
    let verdict = &m["verdict"];
    assert_eq!(verdict["best"], best["predictor"], "{m}");
    assert!((verdict["ratio"].as_f64().unwrap() - lat(&m) / lat(best)).abs() < 1e-9, "{m}");
    let wins = m["over_fetch"].as_f64().unwrap() <= 1.0 && lat(&m) < lat(best);
    assert_eq!(verdict["wins"], wins, "{m}");
    let mut heuristics = scores.iter().filter(|s| s["predictor"] != "model");
    assert!(heuristics.all(|s| s.get("verdict").is_none()), "heuristics are not judged");

    // Without a model, `model` is its fallback (here linux-ra, with a generous fetch budget):
    // it prefetches what linux-ra does, less what it sent or read recently.
    let args = ["--predictors", "model", "--model", "/nonexistent/m.onnx", "--json"];
    let knobs = ["--model-knobs", "fallback=linux-ra,fetch_ratio=64"];
    let (ok, out, err) = augur(&[&["trace", "eval", &cp][..], &args, &knobs].concat());
    assert!(ok, "a missing model is not fatal: {err}");
    assert!(err.contains("/nonexistent/m.json") && err.contains("fallback (linux-ra)"), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let scores = v[0]["scores"].as_array().unwrap();
    let get = |n: &str| scores.iter().find(|s| s["predictor"] == n).cloned().unwrap();
    let (m, ra) = (get("model[fallback=linux-ra,fetch_ratio=64]"), get("linux-ra"));
    let used = |s: &serde_json::Value| s["used"].as_f64().unwrap();
    let issued = |s: &serde_json::Value| s["issued"].as_f64().unwrap();
    assert!(used(&m) >= 0.9 * used(&ra) && issued(&m) <= 1.1 * issued(&ra), "{m}\n{ra}");
    assert_eq!(m["model_decided"], 0.0, "no network, no decisions: {m}");

    // Knob sets side by side, on the first half only; bad knobs are named.
    let (ok, out, err) = augur(&[
        "trace",
        "eval",
        &cp,
        "--predictors",
        "model",
        "--model",
        &model,
        "--json",
        "--head-frac",
        "0.5",
        "--model-knobs",
        "min_p=0.2",
        "--model-knobs",
        "min_p=0.05,fallback=mithril,fetch_ratio=0.5",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["requests"], 10_000, "--head-frac 0.5 of the 20 000-request excerpt");
    let names: Vec<&str> =
        v[0]["scores"].as_array().unwrap().iter().map(|s| s["predictor"].as_str().unwrap()).collect();
    assert!(
        names.contains(&"model[min_p=0.2]")
            && names.contains(&"model[min_p=0.05,fallback=mithril,fetch_ratio=0.5]"),
        "{names:?}"
    );
    for (knob, want) in
        [("min_p=x", "min_p"), ("fallback=oracle", "not auto or one of"), ("depth=3", "unknown model knob")]
    {
        let (ok, _, err) = augur(&["trace", "eval", &cp, "--predictors", "model", "--model-knobs", knob]);
        assert!(!ok && err.contains(want), "{knob}: {err}");
    }
}

/// SPEC §7: where no predictor can help, the model must at least not be slower than `none`.
/// A trace with no structure at all (8 KiB reads at uniformly random places in 8 GiB, 500 µs
/// apart): the model learns that nothing it could fetch is worth the cache space, and fetches
/// (nearly) nothing rather than doubling the traffic for reads it cannot foresee.
#[test]
fn eval_model_fetches_nothing_on_a_trace_with_no_structure() {
    let mut z: u64 = 7;
    let rows = (0..20_000u64).map(|i| (i * 500, (splitmix(&mut z) % (1 << 20)) * 8192, 0)).collect();
    let (m, none, next1) = eval_shipped_model(rows);
    assert!(over_fetch(&next1) > 0.9, "a heuristic fetches by chance here: {next1}");
    assert!(over_fetch(&m) < 0.02, "{m}");
    assert!(latency(&m) <= latency(&none), "{m}\n{none}");
}

/// The same for streams too short to judge on their own: half the reads go to one stream
/// re-reading 256 blocks (they fit the cache), half to small files (streams 1, 2, ...) of 8
/// reads each at random places in 8 GiB. A prefetch for a small file pushes hot blocks out and
/// is almost never read; the model learns that from the files gone idle and wastes (nearly)
/// nothing on the new ones (what it does fetch is for the hot stream, most of it used).
#[test]
fn eval_model_wastes_little_on_short_streams_with_no_structure() {
    let mut z: u64 = 11;
    let rows = (0..20_000u64)
        .map(|i| {
            let x = splitmix(&mut z);
            if i % 2 == 0 {
                (i * 500, (x % 256) * 65536, 0)
            } else {
                (i * 500, (x % (1 << 20)) * 8192, 1 + i / 16)
            }
        })
        .collect();
    let (m, none, next1) = eval_shipped_model(rows);
    assert!(latency(&next1) > latency(&none), "fetching costs here: {next1}\n{none}");
    let wasted = m["wasted"].as_f64().unwrap() / m["blocks_read"].as_f64().unwrap();
    assert!(wasted < 0.1, "guesses for short streams wasted: {m}");
    assert!(latency(&m) <= latency(&none), "{m}\n{none}");
}

/// SplitMix64: no pattern in the values or their deltas.
fn splitmix(z: &mut u64) -> u64 {
    *z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut x = (*z ^ (*z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// `augur trace eval` of 8 KiB reads `rows` (µs, offset, stream) with the shipped model and
/// `--tail-frac 0.3`: the scores of the model, `none` and next-1.
fn eval_shipped_model(
    rows: Vec<(u64, u64, u64)>,
) -> (serde_json::Value, serde_json::Value, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("generated.csv");
    let mut text = String::from("timestamp_us,op,offset_bytes,size_bytes,volume_or_object_id\n");
    for (t, offset, stream) in rows {
        text.push_str(&format!("{t},R,{offset},8192,{stream}\n"));
    }
    std::fs::write(&path, text).unwrap();
    let model = format!("{}/models/prefetch.onnx", env!("CARGO_MANIFEST_DIR"));
    let trace = path.to_str().unwrap();
    let args =
        ["trace", "eval", trace, "--predictors", "model", "--model", &model, "--tail-frac", "0.3", "--json"];
    let (ok, out, err) = augur(&args);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let scores = v[0]["scores"].as_array().unwrap();
    let get = |n: &str| scores.iter().find(|s| s["predictor"] == n).cloned().unwrap();
    (get("model"), get("none"), get("next-1"))
}

fn latency(s: &serde_json::Value) -> f64 {
    s["mean_latency_us"].as_f64().unwrap()
}

fn over_fetch(s: &serde_json::Value) -> f64 {
    s["over_fetch"].as_f64().unwrap()
}

#[test]
fn bench_predictor_times_the_model_beside_every_heuristic() {
    let cp = excerpt("cloudphysics_excerpt.csv.gz");
    let model = format!("{}/models/prefetch.onnx", env!("CARGO_MANIFEST_DIR"));
    let (ok, out, err) = augur(&[
        "bench",
        "predictor",
        "--trace",
        &cp,
        "--model",
        &model,
        "--accesses",
        "300",
        "--runs",
        "3",
        "--json",
    ]);
    assert!(ok, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = rows.as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["predictor"].as_str().unwrap()).collect();
    assert_eq!(names[..3], ["model-step", "model", "auto"]);
    assert_eq!(names[3..], augur_prefetch::all_heuristics().collect::<Vec<_>>());
    assert!(
        rows.iter().all(|r| r["accesses"] == 300 && r["runs"] == 3 && r["p50_us"].as_f64().unwrap() > 0.0),
        "{out}"
    );
}

#[test]
fn bench_prefetch_replays_a_trace_on_a_mount_in_every_mode() {
    let cp = excerpt("cloudphysics_excerpt.csv.gz");
    let model = format!("{}/models/prefetch.onnx", env!("CARGO_MANIFEST_DIR"));
    let args = ["bench", "prefetch", "--trace", &cp, "--reads", "300", "--runs", "1", "--json"];
    let (ok, out, err) = augur(&[&args[..], &["--model", &model]].concat());
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["reads"], 300, "{out}");
    let rows = report["rows"].as_array().unwrap();
    let modes: Vec<&str> = rows.iter().map(|r| r["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["off", "model", "heuristic", "sequential"]);
    assert_eq!(rows[0]["issued"], 0, "off prefetches nothing: {out}");
    for r in &rows[1..3] {
        // On this VM trace the engine's prefetches are read (whatever the timing).
        assert!(r["issued"].as_u64() > Some(0) && r["used"].as_u64() > Some(0), "{out}");
    }
    // The model row runs the network (it decides on part of the reads), the heuristic row not.
    assert!(rows[1]["network_decided"].as_f64() > Some(0.0), "{out}");
    assert_eq!(rows[2]["network_decided"].as_f64(), Some(0.0), "{out}");
    assert!(rows.iter().all(|r| r["mean_us"].as_f64().unwrap() > 0.0), "{out}");

    // The model row must be the model's: one that does not load is an error, said up front.
    let (ok, _, err) = augur(&[&args[..], &["--model", "/nonexistent/prefetch.onnx"]].concat());
    assert!(!ok && err.contains("/nonexistent/prefetch.json"), "{err}");
}
