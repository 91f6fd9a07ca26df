//! The model's inputs, computed here only (SPEC §8): `augur trace features` writes them for
//! training, and the `model` predictor computes the same values at run time, so training and
//! serving cannot disagree.
//!
//! Per stream, every demand read of a block is one step:
//! - a delta token: the block minus the stream's previous block, `DELTA_RANGE` each way, with
//!   tokens for "far behind", "far ahead" and padding ([`delta_token`]);
//! - features ([`FEATURES`]): log2 of the inter-arrival time (0 when untimed), whether the trace
//!   is timed, log2 of the request's length in blocks, the file-type group (image, database),
//!   and whether the block just before / just after this one was among the stream's last
//!   `CONTEXT` reads (a sequential run that other reads interleave with shows up there even when
//!   the delta from the previous read does not).
//!
//! A training sample is `SEQ_LEN` consecutive steps of one stream up to a read; its targets are
//! the deltas from that read's block to the stream's next `HORIZON` reads.

use std::collections::HashMap;
use std::io::Write;

use crate::filetype::Group;

/// Deltas from -DELTA_RANGE to +DELTA_RANGE blocks get their own token.
pub const DELTA_RANGE: i64 = 64;
pub const TOKEN_PAD: i64 = 0;
pub const TOKEN_FAR_BEHIND: i64 = 1;
pub const TOKEN_FAR_AHEAD: i64 = 2;
const TOKEN_FIRST_DELTA: i64 = 3;
/// Number of distinct tokens.
pub const VOCAB: i64 = TOKEN_FIRST_DELTA + 2 * DELTA_RANGE + 1;
/// Steps the model sees at once (constant: the ONNX graph has a fixed sequence length).
pub const SEQ_LEN: usize = 16;
/// Names of the per-step features, in order.
pub const FEATURES: [&str; 7] = [
    "log2_iat_us",
    "timed",
    "log2_request_blocks",
    "is_image",
    "is_database",
    "prev_block_recent",
    "next_block_recent",
];
/// Reads of a stream the context features look back over.
pub const CONTEXT: usize = 32;

/// The token of a block delta.
pub fn delta_token(d: i64) -> i64 {
    if d < -DELTA_RANGE {
        TOKEN_FAR_BEHIND
    } else if d > DELTA_RANGE {
        TOKEN_FAR_AHEAD
    } else {
        TOKEN_FIRST_DELTA + d + DELTA_RANGE
    }
}

/// The delta a token stands for (`None` for padding and the far tokens).
pub fn token_delta(t: i64) -> Option<i64> {
    (TOKEN_FIRST_DELTA..VOCAB).contains(&t).then(|| t - TOKEN_FIRST_DELTA - DELTA_RANGE)
}

/// One step's inputs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Step {
    pub token: i64,
    pub features: [f32; FEATURES.len()],
}

impl Step {
    pub const PAD: Step = Step { token: TOKEN_PAD, features: [0.0; FEATURES.len()] };
}

fn log2_1p(x: u64) -> f32 {
    ((x as f64) + 1.0).log2() as f32
}

/// The last `CONTEXT` blocks a stream read.
#[derive(Clone, Debug, Default)]
pub struct RecentReads(std::collections::VecDeque<u64>);

impl RecentReads {
    pub fn push(&mut self, block: u64) {
        if self.0.len() == CONTEXT {
            self.0.pop_front();
        }
        self.0.push_back(block);
    }
    pub fn contains(&self, block: u64) -> bool {
        self.0.contains(&block)
    }
}

/// The running state of one stream: its last block and time, its last `CONTEXT` blocks and its
/// last `SEQ_LEN` steps.
#[derive(Clone, Debug, Default)]
pub struct StreamFeatures {
    prev_block: Option<u64>,
    prev_t_us: Option<u64>,
    recent: RecentReads,
    pub window: std::collections::VecDeque<Step>,
}

impl StreamFeatures {
    /// Records a read of `block` at `t_us` (`timed` false: ordinal time) from a request of
    /// `request_blocks` blocks in a file of `group`; returns the step.
    pub fn push(&mut self, block: u64, t_us: u64, timed: bool, request_blocks: u64, group: Group) -> Step {
        let token = match self.prev_block {
            Some(p) => delta_token(block as i64 - p as i64),
            None => TOKEN_PAD,
        };
        let iat = match (timed, self.prev_t_us) {
            (true, Some(p)) => log2_1p(t_us.saturating_sub(p)),
            _ => 0.0,
        };
        let seen = |b: Option<u64>| b.is_some_and(|b| self.recent.contains(b));
        let flag = |x: bool| if x { 1.0 } else { 0.0 };
        let step = Step {
            token,
            features: [
                iat,
                flag(timed),
                log2_1p(request_blocks.saturating_sub(1)),
                flag(group == Group::Image),
                flag(group == Group::Database),
                flag(seen(block.checked_sub(1))),
                flag(seen(block.checked_add(1))),
            ],
        };
        self.recent.push(block);
        self.prev_block = Some(block);
        self.prev_t_us = Some(t_us);
        self.window.push_back(step);
        if self.window.len() > SEQ_LEN {
            self.window.pop_front();
        }
        step
    }

    /// Whether `block` is among the stream's last `CONTEXT` reads.
    pub fn recently_read(&self, block: u64) -> bool {
        self.recent.contains(block)
    }

    /// The last `SEQ_LEN` steps, left-padded.
    pub fn sequence(&self) -> [Step; SEQ_LEN] {
        let mut out = [Step::PAD; SEQ_LEN];
        let skip = SEQ_LEN - self.window.len();
        for (i, s) in self.window.iter().enumerate() {
            out[skip + i] = *s;
        }
        out
    }
}

/// Steps ahead a training sample's targets look: the model learns which deltas (from the
/// current block) are read within the next `HORIZON` reads of the stream, so what it issues is
/// needed far enough ahead to arrive in time.
pub const HORIZON: usize = 32;

/// Training samples of one trace: inputs, targets, and where each sample falls in the trace.
#[derive(Default)]
pub struct Samples {
    /// `[N, SEQ_LEN]`: the window up to and including the current read.
    pub tokens: Vec<i64>,
    /// `[N, SEQ_LEN, FEATURES]`.
    pub features: Vec<f32>,
    /// `[N]`: the token of the next read (the delta after the current one).
    pub labels: Vec<i64>,
    /// `[N, HORIZON]`: tokens of the next `HORIZON` reads as deltas from the current block
    /// (padding past the stream's end).
    pub future: Vec<i64>,
    /// Index of the request the current read comes from (chronological splits use it).
    pub request: Vec<i64>,
}

impl Samples {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Builds samples from the reads of `trace` at `block_bytes`: every read with a full window
/// becomes one sample (every `stride`-th, at most `max` in all).
pub fn samples(trace: &crate::trace::Trace, block_bytes: u64, stride: usize, max: usize) -> Samples {
    // Each stream's blocks in order, to look ahead for the targets.
    let mut order: Vec<(u64, usize)> = Vec::new();
    let mut seqs: HashMap<u64, Vec<u64>> = HashMap::new();
    for a in trace.accesses.iter().filter(|a| a.op == crate::trace::Op::Read) {
        for b in crate::trace::blocks_of(a, block_bytes) {
            let seq = seqs.entry(a.stream).or_default();
            order.push((a.stream, seq.len()));
            seq.push(b);
        }
    }
    let mut streams: HashMap<u64, StreamFeatures> = HashMap::new();
    let mut out = Samples::default();
    let (mut k, mut step) = (0usize, 0usize);
    for (i, a) in trace.accesses.iter().enumerate() {
        if a.op != crate::trace::Op::Read {
            continue;
        }
        let blocks = crate::trace::blocks_of(a, block_bytes);
        let n = blocks.end - blocks.start;
        let t = if trace.timed { a.t_us } else { i as u64 };
        for b in blocks {
            let (stream, pos) = order[step];
            step += 1;
            let s = streams.entry(stream).or_default();
            s.push(b, t, trace.timed, n, a.group);
            if s.window.len() < SEQ_LEN {
                continue;
            }
            k += 1;
            if !k.is_multiple_of(stride.max(1)) || out.len() >= max {
                continue;
            }
            for st in s.sequence() {
                out.tokens.push(st.token);
                out.features.extend_from_slice(&st.features);
            }
            let seq = &seqs[&stream];
            for h in 1..=HORIZON {
                let tok = seq.get(pos + h).map_or(TOKEN_PAD, |&f| delta_token(f as i64 - b as i64));
                if h == 1 {
                    out.labels.push(tok);
                }
                out.future.push(tok);
            }
            out.request.push(i as i64);
        }
    }
    out
}

/// Writes a NumPy `.npy` file (version 1.0, little-endian, C order).
pub fn write_npy<W: Write>(mut w: W, descr: &str, shape: &[usize], data: &[u8]) -> std::io::Result<()> {
    let shape_text = match shape {
        [n] => format!("({n},)"),
        dims => format!("({})", dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_text}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n' is a multiple of 64.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    w.write_all(b"\x93NUMPY\x01\x00")?;
    w.write_all(&(header.len() as u16).to_le_bytes())?;
    w.write_all(header.as_bytes())?;
    w.write_all(data)
}

pub fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{Access, Op, Trace};

    #[test]
    fn tokens_round_trip_and_clip() {
        for d in -DELTA_RANGE..=DELTA_RANGE {
            assert_eq!(token_delta(delta_token(d)), Some(d));
        }
        assert_eq!(delta_token(-1000), TOKEN_FAR_BEHIND);
        assert_eq!(delta_token(1000), TOKEN_FAR_AHEAD);
        assert_eq!(token_delta(TOKEN_PAD), None);
        assert_eq!(delta_token(DELTA_RANGE), VOCAB - 1);
    }

    #[test]
    fn samples_are_windows_of_one_stream_with_the_next_reads_as_targets() {
        let accesses = (0..40u64)
            .map(|i| Access {
                t_us: i * 10,
                op: Op::Read,
                offset: i * 2 * 4096,
                size: 4096,
                stream: i % 2,
                group: Group::Other,
            })
            .collect();
        let t = Trace { name: "t".into(), accesses, timed: true, files: false };
        let s = samples(&t, 4096, 1, usize::MAX);
        // Each stream: 20 reads; from the 16th on the window is full: 5 samples each.
        assert_eq!(s.len(), 10);
        assert_eq!(s.tokens.len(), 10 * SEQ_LEN);
        assert_eq!(s.features.len(), 10 * SEQ_LEN * FEATURES.len());
        assert_eq!(s.future.len(), 10 * HORIZON);
        // Within a stream, blocks go up by 4 (stride 2 blocks, every other request); a stream's
        // last read has nothing after it.
        assert_eq!(s.labels.iter().filter(|&&l| l == delta_token(4)).count(), 8);
        assert_eq!(s.labels.iter().filter(|&&l| l == TOKEN_PAD).count(), 2);
        // The first sample of stream 0 (its 16th read) sees 4 more reads, then the end.
        let first: Vec<i64> = s.future[..HORIZON].to_vec();
        let want: Vec<i64> =
            (1..=HORIZON as i64).map(|h| if h <= 4 { delta_token(4 * h) } else { TOKEN_PAD }).collect();
        assert_eq!(first, want);
    }

    #[test]
    fn context_features_see_a_run_through_interleaved_reads() {
        let mut s = StreamFeatures::default();
        let f = |s: &mut StreamFeatures, b: u64| s.push(b, 0, false, 1, Group::Other).features;
        let (prev, next) = (FEATURES.len() - 2, FEATURES.len() - 1);
        assert_eq!(f(&mut s, 100)[prev], 0.0);
        f(&mut s, 7000);
        // 101 follows 100 although 7000 came between: a run the delta does not show.
        let x = f(&mut s, 101);
        assert_eq!((x[prev], x[next]), (1.0, 0.0));
        // 99 sits just before 100 (read recently): the run read backwards.
        assert_eq!(f(&mut s, 99)[next], 1.0);
        for b in 0..CONTEXT as u64 {
            f(&mut s, 50_000 + 10 * b);
        }
        assert_eq!(f(&mut s, 102)[prev], 0.0, "101 is out of the context by now");
        assert!(s.recently_read(102) && !s.recently_read(101));
    }

    #[test]
    fn npy_headers_are_aligned() {
        let mut buf = Vec::new();
        write_npy(&mut buf, "<i8", &[2, 3], &i64_bytes(&[1, 2, 3, 4, 5, 6])).unwrap();
        let hlen = u16::from_le_bytes([buf[8], buf[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        assert!(std::str::from_utf8(&buf[10..10 + hlen]).unwrap().contains("'shape': (2, 3)"));
        assert_eq!(buf.len(), 10 + hlen + 48);
    }
}
