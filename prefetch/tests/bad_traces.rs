//! Whatever a trace file holds, reading it either fails with an error naming the line, or gives
//! a trace that the replay, the footprint and the features take without panicking (overflow
//! checks are on in these builds) and within the trace limits.

use augur_prefetch::features::samples;
use augur_prefetch::model::{ModelKnobs, predictor_with};
use augur_prefetch::trace::{CSV_HEADER, REQUEST_BYTES_MAX, TIMESTAMP_US_MAX};
use augur_prefetch::{ReplayConfig, Trace, replay};
use proptest::prelude::*;

/// Numbers near the edges the parser and the replay must handle, or mixed with ordinary ones.
fn number() -> impl Strategy<Value = u64> {
    prop_oneof![
        60 => 0u64..200_000,
        3 => Just(0),
        1 => Just(u64::MAX),
        1 => Just(u64::MAX - 4095),
        1 => Just(TIMESTAMP_US_MAX),
        1 => Just(TIMESTAMP_US_MAX + 1),
        1 => Just(REQUEST_BYTES_MAX),
        1 => Just(REQUEST_BYTES_MAX + 1),
        1 => Just(1 << 52),
        1 => any::<u64>(),
    ]
}

fn line() -> impl Strategy<Value = String> {
    prop_oneof![
        60 => (number(), prop::sample::select(vec!["R", "W", "r"]), number(), number(), number())
            .prop_map(|(t, op, off, size, stream)| format!("{t},{op},{off},{size},{}", stream % 4)),
        1 => Just(String::new()),
        1 => prop::sample::select(vec!["1,R,0", "x,R,0,1,0", "1.5,R,0,4096,0", "1,R,-1,1,0", "1e300,R,0,1,0"])
            .prop_map(str::to_string),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn a_trace_is_refused_by_line_or_replayed_without_panic(lines in prop::collection::vec(line(), 0..40)) {
        // Each line alone: refused with its line named, or kept.
        let mut kept = Vec::new();
        for l in &lines {
            match Trace::parse("fuzz.csv", "fuzz", format!("{CSV_HEADER}\n{l}\n").as_bytes()) {
                Err(e) => {
                    let e = e.to_string();
                    prop_assert!(e.starts_with("fuzz.csv: line 2: "), "{}", e);
                }
                Ok(_) => kept.push(l.as_str()),
            }
        }
        // Every line that passes, together: a trace the replay, footprint and features take.
        let text = format!("{CSV_HEADER}\n{}\n", kept.join("\n"));
        let trace = Trace::parse("fuzz.csv", "fuzz", text.as_bytes()).unwrap();
        for block_kib in [4u64, 64] {
            let block_bytes = block_kib << 10;
            if trace.check_blocks(std::path::Path::new("fuzz.csv"), block_bytes).is_err() {
                continue;
            }
            trace.footprint(block_bytes);
            samples(&trace, block_bytes, 1, 1000);
            let cfg = ReplayConfig { block_bytes, tail_frac: 0.3, ..ReplayConfig::default() };
            for name in ["next-2", "linux-ra", "markov", "mithril", "history", "auto", "model"] {
                let mut p = predictor_with(name, None, ModelKnobs::default()).unwrap();
                let s = replay(&trace, &mut *p, &cfg);
                prop_assert!(s.mean_latency_us.is_finite(), "{name}: {s:?}");
            }
        }
    }
}
