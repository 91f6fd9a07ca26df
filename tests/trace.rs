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
    for name in augur_prefetch::HEURISTICS {
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
    assert_eq!(scores.len(), augur_prefetch::HEURISTICS.len());
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
}
