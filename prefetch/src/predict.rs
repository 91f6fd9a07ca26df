//! Predictors behind one trait, shared by the client and the trace evaluator. Each sees the
//! demand reads of a stream (block index, hit or miss) and answers with blocks to fetch ahead,
//! best first. Per-stream state is bounded (`STREAMS_MAX`); tables are bounded per predictor.

use std::collections::VecDeque;

use foldhash::HashMap;

/// Streams a predictor keeps state for; past it, the state of an arbitrary stream is dropped.
pub const STREAMS_MAX: usize = 4096;

/// One demand read of one block, as a predictor sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Read {
    pub stream: u64,
    pub block: u64,
    /// Already cached (a prefetch still in flight counts as a miss).
    pub hit: bool,
    /// Time of the request in µs (an ordinal when `timed` is false).
    pub t_us: u64,
    pub timed: bool,
    /// Blocks the whole request covers, from `request_first` on.
    pub request_blocks: u64,
    /// The request's first block (this read is one of its blocks; the ones after it are read
    /// next, by the request itself).
    pub request_first: u64,
    pub group: crate::filetype::Group,
}

impl Read {
    /// Whether `block` is a later block of this read's own request: read next whatever is
    /// predicted, so a prefetch of it hides nothing.
    pub fn in_request_after(&self, block: u64) -> bool {
        block > self.block && block < self.request_first.saturating_add(self.request_blocks)
    }

    /// A read with no timing or type information (tests, simple callers).
    pub fn at(stream: u64, block: u64, hit: bool) -> Self {
        Read {
            stream,
            block,
            hit,
            t_us: 0,
            timed: false,
            request_blocks: 1,
            request_first: block,
            group: crate::filetype::Group::Other,
        }
    }
}

pub trait Predictor: Send {
    fn name(&self) -> String;
    /// A demand read; appends the blocks to prefetch to `out`, best first.
    fn on_read(&mut self, r: &Read, out: &mut Vec<u64>);
    /// Asked by the caller for each block this predictor named, in order, that it is about to
    /// fetch (not cached, not in flight, within the file; the replay drops what is past its
    /// limit on fetches in flight unasked, a mount queues it, not twice):
    /// whether the predictor's fetch budget pays for it. A predictor with a budget
    /// (`model`) spends it here, on real fetches only, so it never guesses what the cache holds;
    /// the rest always pay. A block not paid for is not fetched.
    fn pays(&mut self, _stream: u64, _block: u64) -> bool {
        true
    }
    /// A block paid for (`pays`) was not fetched after all (dropped from a full or stale queue,
    /// or fetched meanwhile by a demand read): the budget gets it back.
    fn not_fetched(&mut self, _stream: u64, _block: u64) {}
    /// For a predictor that hands some reads to a fallback (`model`): reads seen so far, and on
    /// how many of them its own choice was passed on.
    fn decisions(&self) -> Option<(u64, u64)> {
        None
    }
    /// Work a predictor put off to answer sooner (the `model`'s network step on a read it
    /// could not decide). Runs at the next `on_read` anyway; a caller with time on its hands
    /// (the engine, once it has issued a read's prefetches) calls it earlier.
    fn catch_up(&mut self) {}
}

/// The heuristic set every evaluation reports (SPEC §7), in order.
pub const HEURISTICS: [&str; 9] =
    ["none", "next-1", "next-2", "next-4", "next-8", "linux-ra", "leap", "markov", "mithril"];

/// Heuristics beyond SPEC §7's set: chosen among by `auto` (and the model's fallback), and
/// reported beside it.
pub const EXTRA_HEURISTICS: [&str; 2] = ["history", "ctx"];

/// Every heuristic by name: SPEC §7's set, then `EXTRA_HEURISTICS`.
pub fn all_heuristics() -> impl Iterator<Item = &'static str> {
    HEURISTICS.into_iter().chain(EXTRA_HEURISTICS)
}

/// `all_heuristics` as a list for messages ("none, next-1, ...").
pub fn heuristics_listed() -> String {
    all_heuristics().collect::<Vec<_>>().join(", ")
}

/// Builds a predictor by name: `none`, `next-N`, `linux-ra`, `leap`, `markov`, `mithril`,
/// `history`, `ctx`.
pub fn by_name(name: &str) -> Result<Box<dyn Predictor>, String> {
    Ok(match name {
        "none" => Box::new(NoPrefetch),
        "history" => Box::new(History::default()),
        "ctx" => Box::new(CtxReadahead::default()),
        "linux-ra" => Box::new(LinuxReadahead::default()),
        "leap" => Box::new(Leap::default()),
        "markov" => Box::new(Markov::default()),
        "mithril" => Box::new(Mithril::default()),
        n if n.starts_with("next-") => {
            let k: u32 = n[5..].parse().map_err(|_| format!("bad predictor {n:?}: next-N needs a number"))?;
            if !(1..=256).contains(&k) {
                return Err(format!("bad predictor {n:?}: N must be 1..=256"));
            }
            Box::new(NextN(k))
        }
        other => {
            return Err(format!("unknown predictor {other:?} (known: {}, next-N)", heuristics_listed()));
        }
    })
}

/// Keeps per-stream state within `STREAMS_MAX` streams (or fewer, `with_max`).
pub(crate) struct PerStream<S> {
    map: HashMap<u64, S>,
    max: usize,
}

impl<S: Default> Default for PerStream<S> {
    fn default() -> Self {
        Self::with_max(STREAMS_MAX)
    }
}

impl<S: Default> PerStream<S> {
    pub(crate) fn with_max(max: usize) -> Self {
        Self { map: HashMap::default(), max: max.max(1) }
    }

    pub(crate) fn get(&mut self, stream: u64) -> &mut S {
        if !self.map.contains_key(&stream) && self.map.len() >= self.max {
            let victim = *self.map.keys().next().expect("non-empty");
            self.map.remove(&victim);
        }
        self.map.entry(stream).or_default()
    }

    /// A stream's state, if it is kept (never adds one).
    pub(crate) fn peek(&mut self, stream: u64) -> Option<&mut S> {
        self.map.get_mut(&stream)
    }

    /// Like `get`, but when full the kept stream with the least `age` (the lowest id among
    /// equals, so the choice does not depend on the hasher) makes room, handed to `evicted`
    /// first so that what it still owes can be settled.
    pub(crate) fn get_or_evict(
        &mut self,
        stream: u64,
        age: impl Fn(&S) -> u64,
        evicted: impl FnOnce(&mut S),
    ) -> &mut S {
        if !self.map.contains_key(&stream) && self.map.len() >= self.max {
            let victim = self.map.iter().min_by_key(|(id, s)| (age(s), **id)).map(|(id, _)| *id);
            if let Some(mut s) = victim.and_then(|v| self.map.remove(&v)) {
                evicted(&mut s);
            }
        }
        self.map.entry(stream).or_default()
    }

    /// Drops a stream's state.
    pub(crate) fn remove(&mut self, stream: u64) {
        self.map.remove(&stream);
    }

    /// Every kept stream's state.
    pub(crate) fn values(&self) -> impl Iterator<Item = &S> {
        self.map.values()
    }
}

pub struct NoPrefetch;

impl Predictor for NoPrefetch {
    fn name(&self) -> String {
        "none".into()
    }
    fn on_read(&mut self, _: &Read, _: &mut Vec<u64>) {}
}

/// The next N blocks after every read.
pub struct NextN(pub u32);

impl Predictor for NextN {
    fn name(&self) -> String {
        format!("next-{}", self.0)
    }
    fn on_read(&mut self, r: &Read, out: &mut Vec<u64>) {
        out.extend((1..=u64::from(self.0)).map(|i| r.block + i));
    }
}

/// Linux on-demand readahead, per stream: a sequential miss opens a window of 4 blocks; reading
/// the async marker (the first block of the window's last `async_size`) issues the next window,
/// twice as large, up to 32; a non-sequential read starts over.
#[derive(Default)]
pub struct LinuxReadahead {
    streams: PerStream<RaState>,
}

#[derive(Default)]
struct RaState {
    prev: Option<u64>,
    start: u64,
    size: u64,
    async_size: u64,
}

const RA_INITIAL: u64 = 4;
const RA_MAX: u64 = 32;

impl Predictor for LinuxReadahead {
    fn name(&self) -> String {
        "linux-ra".into()
    }
    fn on_read(&mut self, r: &Read, out: &mut Vec<u64>) {
        let (stream, block, hit) = (r.stream, r.block, r.hit);
        let s = self.streams.get(stream);
        let sequential = s.prev.is_some_and(|p| block == p + 1 || block == p);
        s.prev = Some(block);
        let in_window = s.size > 0 && block >= s.start && block < s.start + s.size;
        if in_window {
            // Reading the async marker issues the next window, twice as large.
            if block == s.start + s.size - s.async_size {
                let next = s.start + s.size;
                s.size = (s.size * 2).min(RA_MAX);
                s.start = next;
                s.async_size = s.size;
                out.extend(s.start..s.start + s.size);
            }
        } else if !hit && (sequential || block == 0) {
            // A sequential miss (or the start of a file) opens an initial window after it.
            s.start = block + 1;
            s.size = RA_INITIAL;
            s.async_size = RA_INITIAL - 1;
            out.extend(s.start..s.start + s.size);
        } else if !hit {
            // A random miss is read alone and forgets the window.
            s.size = 0;
        }
    }
}

/// Leap (ATC'20): the majority delta over the last 8, 16 or 32 deltas (the smallest window
/// with a strict majority), prefetching along it; the depth grows while reads hit and shrinks
/// on misses.
#[derive(Default)]
pub struct Leap {
    streams: PerStream<LeapState>,
}

#[derive(Default)]
struct LeapState {
    prev: Option<u64>,
    deltas: VecDeque<i64>,
    depth: u64,
}

const LEAP_HISTORY: usize = 32;
const LEAP_DEPTH_MAX: u64 = 8;

fn majority(d: &VecDeque<i64>, window: usize) -> Option<i64> {
    if d.len() < window {
        return None;
    }
    let slice = d.iter().rev().take(window);
    let (mut cand, mut count) = (0i64, 0usize);
    for &x in slice.clone() {
        if count == 0 {
            cand = x;
            count = 1;
        } else if x == cand {
            count += 1;
        } else {
            count -= 1;
        }
    }
    let n = slice.filter(|&&x| x == cand).count();
    (n * 2 > window).then_some(cand)
}

impl Predictor for Leap {
    fn name(&self) -> String {
        "leap".into()
    }
    fn on_read(&mut self, r: &Read, out: &mut Vec<u64>) {
        let (stream, block, hit) = (r.stream, r.block, r.hit);
        let s = self.streams.get(stream);
        if let Some(p) = s.prev {
            s.deltas.push_back(block as i64 - p as i64);
            if s.deltas.len() > LEAP_HISTORY {
                s.deltas.pop_front();
            }
        }
        s.prev = Some(block);
        s.depth = if hit { (s.depth * 2).clamp(1, LEAP_DEPTH_MAX) } else { (s.depth / 2).max(1) };
        let trend = [8, 16, 32].iter().find_map(|&w| majority(&s.deltas, w));
        if let Some(d) = trend.filter(|&d| d != 0) {
            for i in 1..=s.depth as i64 {
                let b = block as i64 + d * i;
                if b >= 0 {
                    out.push(b as u64);
                }
            }
        }
    }
}

/// Order-1 Markov chain over block deltas, learned online per stream: after delta `a`, which
/// deltas followed and how often. Predicts up to 4 deltas with probability above 0.1.
#[derive(Default)]
pub struct Markov {
    streams: PerStream<MarkovState>,
}

#[derive(Default)]
struct MarkovState {
    prev: Option<u64>,
    last_delta: Option<i64>,
    table: HashMap<i64, Vec<(i64, u32)>>,
}

const MARKOV_FROM_MAX: usize = 4096;
const MARKOV_NEXT_MAX: usize = 16;
const MARKOV_TOP: usize = 4;
const MARKOV_MIN_P: f64 = 0.1;

impl Predictor for Markov {
    fn name(&self) -> String {
        "markov".into()
    }
    fn on_read(&mut self, r: &Read, out: &mut Vec<u64>) {
        let (stream, block) = (r.stream, r.block);
        let s = self.streams.get(stream);
        let delta = s.prev.map(|p| block as i64 - p as i64);
        if let (Some(from), Some(to)) = (s.last_delta, delta) {
            if s.table.len() >= MARKOV_FROM_MAX && !s.table.contains_key(&from) {
                s.table.clear();
            }
            let next = s.table.entry(from).or_default();
            if let Some(i) = next.iter().position(|(d, _)| *d == to) {
                next[i].1 += 1;
            } else if next.len() < MARKOV_NEXT_MAX {
                next.push((to, 1));
            } else if let Some(min) = next.iter_mut().min_by_key(|(_, c)| *c) {
                // Replace the rarest follower.
                *min = (to, 1);
            }
        }
        s.prev = Some(block);
        s.last_delta = delta;
        let Some(d) = delta else { return };
        let Some(next) = s.table.get(&d) else { return };
        let total: u32 = next.iter().map(|(_, c)| c).sum();
        let mut ranked: Vec<(i64, u32)> = next.clone();
        ranked.sort_by_key(|&(_, c)| std::cmp::Reverse(c));
        for (nd, c) in ranked.into_iter().take(MARKOV_TOP) {
            if f64::from(c) / f64::from(total) > MARKOV_MIN_P {
                let b = block as i64 + nd;
                if b >= 0 && nd != 0 {
                    out.push(b as u64);
                }
            }
        }
    }
}

/// Mithril-style association mining (SoCC'17, simplified): blocks read within a short window
/// after block `a`, seen there at least `MITHRIL_SUPPORT` times, become `a`'s associations and
/// are prefetched when `a` is read. Counting is bounded and restarts when full.
#[derive(Default)]
pub struct Mithril {
    recent: PerStream<VecDeque<u64>>,
    counts: HashMap<(u64, u64, u64), u16>,
    assoc: HashMap<(u64, u64), Vec<u64>>,
}

const MITHRIL_WINDOW: usize = 8;
const MITHRIL_SUPPORT: u16 = 2;
const MITHRIL_ASSOC_MAX: usize = 4;
const MITHRIL_COUNTS_MAX: usize = 1 << 20;
const MITHRIL_TABLE_MAX: usize = 1 << 18;

impl Predictor for Mithril {
    fn name(&self) -> String {
        "mithril".into()
    }
    fn on_read(&mut self, r: &Read, out: &mut Vec<u64>) {
        let (stream, block) = (r.stream, r.block);
        if let Some(list) = self.assoc.get(&(stream, block)) {
            out.extend(list.iter().copied());
        }
        let recent = self.recent.get(stream);
        let earlier: Vec<u64> = recent.iter().copied().filter(|&b| b != block).collect();
        recent.push_back(block);
        if recent.len() > MITHRIL_WINDOW {
            recent.pop_front();
        }
        if self.counts.len() >= MITHRIL_COUNTS_MAX {
            self.counts.clear();
        }
        if self.assoc.len() >= MITHRIL_TABLE_MAX {
            self.assoc.clear();
        }
        for a in earlier {
            let c = self.counts.entry((stream, a, block)).or_insert(0);
            *c = c.saturating_add(1);
            if *c == MITHRIL_SUPPORT {
                let list = self.assoc.entry((stream, a)).or_default();
                if !list.contains(&block) {
                    if list.len() >= MITHRIL_ASSOC_MAX {
                        list.remove(0);
                    }
                    list.push(block);
                }
            }
        }
    }
}

/// Temporal streaming: when a request starts at a block some earlier request of the stream
/// started at, the blocks of the requests that followed that one (up to `HISTORY_NAMES`), and
/// the block after the request, as next-1. It finds the workload's way back into a region it
/// read before, which a cache of a few percent of the footprint has long dropped and which no
/// recent read points to (models/README.md, item 22). The history is one log of the last
/// `HISTORY_REQUESTS` requests over all streams.
#[derive(Default)]
pub struct History {
    /// (stream, first block, blocks) of each request, oldest first; `log[0]` is request `base`.
    log: VecDeque<(u64, u64, u32)>,
    base: u64,
    /// (stream, block) → the last request that started at it.
    started: HashMap<(u64, u64), u64>,
}

/// Requests the history remembers (over all streams): about 19 MiB with its index, on every
/// mount (the engine's fallback runs it).
pub const HISTORY_REQUESTS: usize = 1 << 18;
/// Blocks named from the history per request.
pub const HISTORY_NAMES: usize = 4;
/// Requests looked at after the earlier one: at most this many of the stream's, within
/// `HISTORY_SCAN` of the log.
const HISTORY_FOLLOWERS: usize = 4 * HISTORY_NAMES;
const HISTORY_SCAN: usize = 256;

impl Predictor for History {
    fn name(&self) -> String {
        "history".into()
    }
    fn on_read(&mut self, r: &Read, out: &mut Vec<u64>) {
        let last = r.request_first + r.request_blocks.max(1) - 1;
        let start = out.len();
        if r.block == last {
            out.push(r.block + 1);
        }
        if r.block != r.request_first {
            return;
        }
        if let Some(&seq) = self.started.get(&(r.stream, r.block)) {
            // Every entry of `started` is at `base` or later: the oldest is dropped with the
            // log's front.
            let from = (seq - self.base) as usize + 1;
            let followers = self.log.range(from..).take(HISTORY_SCAN).filter(|e| e.0 == r.stream);
            let mut named = 0;
            'followers: for &(_, first, blocks) in followers.take(HISTORY_FOLLOWERS) {
                for b in first..first + u64::from(blocks) {
                    if (r.request_first..=last + 1).contains(&b) || out[start..].contains(&b) {
                        continue;
                    }
                    out.push(b);
                    named += 1;
                    if named == HISTORY_NAMES {
                        break 'followers;
                    }
                }
            }
        }
        if self.log.len() == HISTORY_REQUESTS
            && let Some((stream, block, _)) = self.log.pop_front()
        {
            if self.started.get(&(stream, block)) == Some(&self.base) {
                self.started.remove(&(stream, block));
            }
            self.base += 1;
        }
        let seq = self.base + self.log.len() as u64;
        self.log.push_back((r.stream, r.block, r.request_blocks.clamp(1, u64::from(u32::MAX)) as u32));
        self.started.insert((r.stream, r.block), seq);
    }
}

/// `ctx`: a readahead whose depth is learned per read context (models/README.md, items 44 and
/// 47). On a read of a request's last block b it names, nearest first, each b+k (k ≤
/// `CTX_DEPTH`) that is not among the stream's last `CTX_RECENT_READS` block reads and whose
/// learned share is at least `CTX_SHARE_MIN`; each k is judged on its own, so it may name b+3
/// without b+2. A share is kept per file type group, read context and k: of the reads in that
/// context (every one is a trial, re-reads of a block too) after which b+k was not read lately,
/// the decayed share (half-life `CTX_HALF_LIFE` trials) after which b+k was read within the
/// stream's next `CTX_HORIZON` block reads. The context is whether the block before the request
/// and the block itself were among the stream's recent reads, and whether the read hit. On
/// MQSim's search-engine trace (cursors over posting lists that step over a block onto one
/// fetched ahead for them) it learns to name b+1 only after a miss with nothing read around it,
/// and b+1 … b+4 after a hit on a block not read lately. A stream idle for `DEAD_READS` reads of
/// others is dropped (and past `CTX_STREAMS_MAX` the least recently read one); its trials still
/// open count as unread up to the highest block it read, and are dropped past it (maybe past
/// the file's end, where nothing is fetched), as `auto`'s shadows do. So for a stream that
/// reads slowly the horizon is also bounded by `DEAD_READS` reads of all streams.
pub struct CtxReadahead {
    streams: PerStream<CtxStream>,
    idle: crate::select::Idle,
    gone: Vec<u64>,
    shares: [[[Share; CTX_DEPTH]; CTX_CONTEXTS]; crate::filetype::Group::ALL.len()],
}

/// Blocks after a read that `ctx` may name.
pub const CTX_DEPTH: usize = 4;
/// Block reads of a stream that count as "read lately" (found by models/README item 31's search).
pub const CTX_RECENT_READS: usize = 766;
/// Block reads of the stream within which a named block must be read to count as used.
pub const CTX_HORIZON: u64 = 64;
/// Least learned share for which `ctx` names a block (chosen on the validation cut, item 44).
pub const CTX_SHARE_MIN: f32 = 0.1;
/// Trials over which a share's weight halves.
pub const CTX_HALF_LIFE: f32 = 4096.0;
/// Per-trial decay of a share: 0.5^(1 / `CTX_HALF_LIFE`) (checked by a test).
const CTX_DECAY: f32 = 0.999_830_8;
/// Streams `ctx` keeps state for. A stream holds at most about 64 KiB: its recent reads (a
/// queue and a counted set of `CTX_RECENT_READS` blocks, about 25 KiB) and its open trials
/// (at most `CTX_DEPTH` × (`CTX_HORIZON` + 1), about 40 KiB at most); so at most about 16 MiB,
/// though only streams read within the last `DEAD_READS` reads are kept.
pub const CTX_STREAMS_MAX: usize = 256;
const CTX_CONTEXTS: usize = 8;

/// A decayed share: used / judged.
#[derive(Clone, Copy, Debug)]
struct Share {
    used: f32,
    judged: f32,
}

impl Share {
    fn judge(&mut self, used: bool) {
        self.used = self.used * CTX_DECAY + f32::from(u8::from(used));
        self.judged = self.judged * CTX_DECAY + 1.0;
    }
}

#[derive(Default)]
struct CtxStream {
    /// The last `CTX_RECENT_READS` blocks read, oldest first, and how often each is among them.
    recent: VecDeque<u64>,
    counts: HashMap<u64, u32>,
    reads: u64,
    /// `Group::index` of its file type.
    group: usize,
    /// The highest block it read, and `Idle::read`'s clock at its last read.
    highest: u64,
    last_at: u64,
    /// Open trials: block → (context, k − 1, last read index at which it counts), and the
    /// same as (last read index, block) in order.
    awaited: HashMap<u64, Vec<(u8, u8, u64)>>,
    deadlines: VecDeque<(u64, u64)>,
}

impl CtxStream {
    /// The stream is dropped (idle, or evicted for another): its open trials count as unread
    /// up to the highest block it read, and are dropped past it.
    fn retire(&self, shares: &mut [[[Share; CTX_DEPTH]; CTX_CONTEXTS]; crate::filetype::Group::ALL.len()]) {
        for (&b, trials) in &self.awaited {
            if b <= self.highest {
                for &(c, k, _) in trials {
                    shares[self.group][c as usize][k as usize].judge(false);
                }
            }
        }
    }

    fn recent(&self, block: u64) -> bool {
        self.counts.contains_key(&block)
    }

    fn push(&mut self, block: u64) {
        if self.recent.len() == CTX_RECENT_READS
            && let Some(old) = self.recent.pop_front()
            && let Some(c) = self.counts.get_mut(&old)
        {
            *c -= 1;
            if *c == 0 {
                self.counts.remove(&old);
            }
        }
        self.recent.push_back(block);
        *self.counts.entry(block).or_default() += 1;
    }
}

impl Default for CtxReadahead {
    fn default() -> Self {
        // Before anything is judged, b+k counts as read one time in k (so b+1 … b+4 are named).
        let prior = |k: usize| Share { used: 1.0 / (k as f32 + 1.0), judged: 1.0 };
        Self {
            streams: PerStream::with_max(CTX_STREAMS_MAX),
            idle: crate::select::Idle::new(crate::select::DEAD_READS),
            gone: Vec::new(),
            shares: [[std::array::from_fn(prior); CTX_CONTEXTS]; crate::filetype::Group::ALL.len()],
        }
    }
}

impl Predictor for CtxReadahead {
    fn name(&self) -> String {
        "ctx".into()
    }
    fn on_read(&mut self, r: &Read, out: &mut Vec<u64>) {
        let now = self.idle.read(r.stream);
        let (shares, gone) = (&mut self.shares, &mut self.gone);
        self.idle.sweep(
            &mut self.streams,
            |s| s.last_at,
            |stream, s| {
                s.retire(shares);
                gone.push(stream);
            },
        );
        for stream in self.gone.drain(..) {
            self.streams.remove(stream);
        }
        let shares = &mut self.shares;
        let s = self.streams.get_or_evict(r.stream, |s| s.last_at, |s| s.retire(shares));
        if s.reads == 0 {
            s.group = r.group.index();
        }
        let shares = &mut self.shares[s.group];
        s.reads += 1;
        s.last_at = now;
        s.highest = s.highest.max(r.block);
        while let Some(&(last, block)) = s.deadlines.front()
            && last < s.reads
        {
            s.deadlines.pop_front();
            if let Some(trials) = s.awaited.get_mut(&block) {
                trials.retain(|&(c, k, l)| {
                    if l == last {
                        shares[c as usize][k as usize].judge(false);
                    }
                    l != last
                });
                if trials.is_empty() {
                    s.awaited.remove(&block);
                }
            }
        }
        for (c, k, _) in s.awaited.remove(&r.block).unwrap_or_default() {
            shares[c as usize][k as usize].judge(true);
        }
        if r.block + 1 >= r.request_first.saturating_add(r.request_blocks) {
            let before = r.request_first.checked_sub(1).is_some_and(|b| s.recent(b));
            let context = u8::from(before) | u8::from(s.recent(r.block)) << 1 | u8::from(r.hit) << 2;
            let last = s.reads + CTX_HORIZON;
            for (k, share) in shares[context as usize].iter().enumerate() {
                let b = r.block + k as u64 + 1;
                if s.recent(b) {
                    continue;
                }
                if share.used >= CTX_SHARE_MIN * share.judged {
                    out.push(b);
                }
                s.awaited.entry(b).or_default().push((context, k as u8, last));
                s.deadlines.push_back((last, b));
            }
        }
        s.push(r.block);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(p: &mut dyn Predictor, blocks: &[u64]) -> Vec<Vec<u64>> {
        blocks
            .iter()
            .map(|&b| {
                let mut out = Vec::new();
                p.on_read(&Read::at(0, b, false), &mut out);
                out
            })
            .collect()
    }

    #[test]
    fn ctx_learns_per_read_context_how_far_ahead_reads_follow() {
        let mut c = CtxReadahead::default();
        let read = |c: &mut CtxReadahead, stream, block, hit| {
            let mut out = Vec::new();
            c.on_read(&Read::at(stream, block, hit), &mut out);
            out
        };
        assert_eq!(read(&mut c, 0, 5, false), vec![6, 7, 8, 9], "before anything is judged");
        // Misses far apart, nothing read after them: after a cold miss nothing is named.
        for i in 0..3000 {
            read(&mut c, 0, 1_000_000 + i * 1000, false);
        }
        assert_eq!(read(&mut c, 0, 50_000_000, false), Vec::<u64>::new());
        // Another stream scans, hitting: after a hit following its neighbour, the next blocks.
        for b in 10_000..13_000 {
            read(&mut c, 1, b, true);
        }
        assert_eq!(read(&mut c, 1, 13_000, true), vec![13_001, 13_002, 13_003, 13_004]);
        assert_eq!(read(&mut c, 1, 90_000_000, false), Vec::<u64>::new(), "a cold miss is still a cold miss");
        // Blocks read lately are not named again (12 999 and 13 000; the rest of this context
        // is still unjudged).
        assert_eq!(read(&mut c, 1, 12_998, true), vec![13_001, 13_002]);
    }

    #[test]
    fn ctx_counts_a_block_read_within_its_horizon_and_not_one_read_after() {
        let used = |c: &CtxReadahead| c.shares[crate::filetype::Group::Other.index()][0][0].used;
        for (gap, read) in [(CTX_HORIZON, true), (CTX_HORIZON + 1, false)] {
            let mut c = CtxReadahead::default();
            let mut out = Vec::new();
            c.on_read(&Read::at(0, 1000, false), &mut out);
            // `gap` - 1 reads far from everything, then block 1001 (b+1 of the first read).
            for i in 1..gap {
                c.on_read(&Read::at(0, 1_000_000 * i, false), &mut out);
            }
            let before = used(&c);
            c.on_read(&Read::at(0, 1001, false), &mut out);
            let gained = used(&c) - before * CTX_DECAY;
            assert!((gained - f32::from(u8::from(read))).abs() < 1e-6, "read {gap} reads later: {gained}");
        }
        assert!((CTX_DECAY.powf(CTX_HALF_LIFE) - 0.5).abs() < 1e-3);
    }

    /// An image stream's two cold misses (open trials for 1001..=1004 and 2001..=2004), then
    /// `others` reads of other-type streams from `streams(i)`; checks that the image stream is
    /// gone and its trials at or below its highest block (2000) counted unread, once, and those
    /// past it dropped.
    fn ctx_retired(others: u64, streams: impl Fn(u64) -> u64) {
        use crate::filetype::Group;
        let mut c = CtxReadahead::default();
        let mut out = Vec::new();
        let image = |block| Read { group: Group::Image, ..Read::at(7, block, false) };
        c.on_read(&image(1000), &mut out);
        c.on_read(&image(2000), &mut out);
        for i in 0..others {
            c.on_read(&Read::at(streams(i), 5_000_000 + 3 * i, false), &mut out);
        }
        assert!(c.streams.peek(7).is_none(), "dropped");
        for (k, share) in c.shares[Group::Image.index()][0].iter().enumerate() {
            assert!((share.judged - (1.0 * CTX_DECAY + 1.0)).abs() < 1e-6, "b+{} judged once", k + 1);
            assert!((share.used - CTX_DECAY / (k as f32 + 1.0)).abs() < 1e-6, "and unread");
        }
    }

    #[test]
    fn ctx_drops_an_idle_stream_and_counts_its_open_trials_unread_up_to_its_highest_block() {
        ctx_retired(crate::select::DEAD_READS + 1, |_| 8);
    }

    #[test]
    fn ctx_past_its_stream_limit_drops_the_least_recently_read_stream_the_same_way() {
        ctx_retired(CTX_STREAMS_MAX as u64, |i| 100 + i);
    }

    #[test]
    fn history_returns_to_what_followed_a_request_last_time() {
        let mut h = History::default();
        let read = |h: &mut History, stream, first, blocks: u64| {
            let mut out = Vec::new();
            for b in first..first + blocks {
                h.on_read(
                    &Read { request_first: first, request_blocks: blocks, ..Read::at(stream, b, false) },
                    &mut out,
                );
            }
            out
        };
        // A pass over a region, then elsewhere (and another stream in between).
        assert_eq!(read(&mut h, 0, 100, 2), vec![102], "nothing known yet: the next block");
        read(&mut h, 0, 500, 1);
        read(&mut h, 9, 101, 1);
        read(&mut h, 0, 900, 2);
        read(&mut h, 0, 300, 1);
        read(&mut h, 0, 700, 1);
        for b in 5000..5100 {
            read(&mut h, 0, b * 10, 1);
        }
        // Back at 100: what followed it then, whole requests, four blocks, this stream's only.
        assert_eq!(read(&mut h, 0, 100, 2), vec![500, 900, 901, 300, 102]);
        // A block the request itself (or next-1) covers is not named again.
        read(&mut h, 0, 40, 1);
        read(&mut h, 0, 41, 1);
        read(&mut h, 0, 42, 1);
        assert_eq!(read(&mut h, 0, 40, 1), vec![41, 42]);
        // Followers are looked for within HISTORY_SCAN requests of the log: past a long run of
        // another stream's, nothing is named.
        read(&mut h, 0, 7000, 1);
        for i in 0..HISTORY_SCAN as u64 {
            read(&mut h, 2, i, 1);
        }
        read(&mut h, 0, 8000, 1);
        assert_eq!(read(&mut h, 0, 7000, 1), vec![7001], "8000 lies past the scan");
        // Past HISTORY_REQUESTS later requests, the start at 100 is forgotten.
        for i in 0..HISTORY_REQUESTS as u64 {
            read(&mut h, 1, i * 7, 1);
        }
        assert_eq!(read(&mut h, 0, 100, 2), vec![102]);
        assert!(h.log.len() <= HISTORY_REQUESTS && h.started.len() <= HISTORY_REQUESTS);
    }

    #[test]
    fn names_build_predictors_and_bad_names_are_refused() {
        for n in all_heuristics() {
            assert_eq!(by_name(n).unwrap().name(), n);
        }
        assert!(by_name("next-0").is_err());
        assert!(by_name("next-x").err().unwrap().contains("next-N"));
        assert!(by_name("oracle").err().unwrap().contains("unknown predictor"));
    }

    #[test]
    fn next_n_and_readahead_follow_a_sequential_stream() {
        assert_eq!(run(&mut NextN(2), &[10])[0], vec![11, 12]);
        let mut ra = LinuxReadahead::default();
        let outs = run(&mut ra, &[0, 1, 2, 3, 4, 5]);
        assert_eq!(outs[0], vec![1, 2, 3, 4], "initial window of 4");
        // Reading the async marker (block 2 = start 1 + size 4 - async 3) issues the next window.
        assert_eq!(outs[2], (5..13).collect::<Vec<_>>(), "doubled window");
    }

    #[test]
    fn leap_finds_a_strided_trend_among_noise() {
        let mut blocks = Vec::new();
        for i in 0..40u64 {
            blocks.push(if i % 5 == 4 { 10_000 + i * 7 } else { 100 + i * 3 });
        }
        let mut l = Leap::default();
        let mut out = Vec::new();
        for &b in &blocks {
            out.clear();
            l.on_read(&Read::at(0, b, true), &mut out);
        }
        assert!(!out.is_empty());
    }

    #[test]
    fn markov_learns_an_alternating_delta_pattern() {
        // Deltas +1, +10, +1, +10, ...
        let mut b = 0u64;
        let mut seq = Vec::new();
        for i in 0..50 {
            b += if i % 2 == 0 { 1 } else { 10 };
            seq.push(b);
        }
        let mut m = Markov::default();
        let outs = run(&mut m, &seq);
        let last = *seq.last().unwrap();
        let last_delta = seq[49] - seq[48];
        let expected_next = if last_delta == 1 { last + 10 } else { last + 1 };
        assert_eq!(outs[49], vec![expected_next]);
    }

    #[test]
    fn mithril_associates_blocks_read_together() {
        let mut m = Mithril::default();
        let pattern = [5u64, 900, 42, 7000];
        let mut out = Vec::new();
        for round in 0..3 {
            for &b in &pattern {
                out.clear();
                m.on_read(&Read::at(1, b, false), &mut out);
                if round == 2 && b == 5 {
                    assert!(out.contains(&900) && out.contains(&42), "{out:?}");
                }
            }
            // Unrelated reads between rounds.
            for x in 0..10 {
                m.on_read(&Read::at(1, 50_000 + round * 100 + x, false), &mut out);
            }
        }
    }
}
