//! Judging predictors online, per stream, by the latency their answers would have hidden, and
//! passing on the answer of the best one (the `auto` predictor, and the model's fallback).
//!
//! A [`Shadow`] judges one predictor on one stream as if its answers had been fetched: each
//! block it names that it has not named recently, and the stream has not just read, spends one
//! of the shadow's own fetch credits (the budget real fetches get, `fetch_ratio` per block
//! read); when the stream then reads a block it named, the shadow's score gains the share of a
//! fetch that the lead hid, `min(lead, fetch_us) / fetch_us` (a prefetch issued just before
//! its read saves little, one issued a fetch time ahead saves a whole miss). Scores halve every
//! `HALF_LIFE_READS` reads of the stream, so they follow phase changes. A block unread after
//! `JUDGE_AFTER_READS` reads counts as wasted; used / (used + wasted) over the last
//! `OUTCOMES` judged blocks is the shadow's accuracy.
//!
//! Shadows gate: `auto` passes on only candidates that hide more than their waste costs
//! ([`Shadow::net`]). Among those it ranks by [`Ghost`]s when it knows the client's cache size
//! (`Judge::cache_blocks`): per candidate, one simulated cache that every stream's reads go
//! through with that candidate's prefetches, scoring per stream the fetch time hidden. A
//! shadow cannot see the cache, so it misjudges what a prefetch pushes out and what is read
//! after its horizon; a ghost sees both (models/README item 34).

use std::collections::VecDeque;

use foldhash::HashMap;

use crate::features::RecentReads;
use crate::lru::Lru;
use crate::predict::{PerStream, Predictor, Read};

/// Reads after which a named block that was not read counts as wasted.
pub const JUDGE_AFTER_READS: u64 = 64;
/// Blocks a shadow waits on at most (the oldest is judged wasted past it).
pub const PENDING_MAX: usize = 256;
/// Judged blocks a shadow's accuracy is taken over; until half of it is known it is 1.0.
pub const OUTCOMES: usize = 64;
/// Reads over which a shadow's score halves.
pub const HALF_LIFE_READS: f32 = 256.0;
/// Most fetch credits the model's real budget saves up by default (`ModelKnobs::bucket`): its
/// largest burst, reached only after `BUCKET_BLOCKS` / `SAVE_PER_READ` block reads.
pub const BUCKET_BLOCKS: f32 = 1024.0;
/// Most fetch credits a shadow saves up by default (`ModelKnobs::shadow_bucket`).
pub const SHADOW_BUCKET_BLOCKS: f32 = 192.0;
/// What a named block never read costs a candidate by default (`ModelKnobs::waste_cost`,
/// `Judge::waste_cost`), in fetches: `auto` passes on a candidate only while the fetch time it
/// hid lately is at least this much per block it wasted ([`Shadow::net`] not below 0). Where
/// nothing can be predicted (uniform random reads) the candidates are right about 0.5% of the
/// time and every block they fetch pushes a cached one out: they end slightly slower than
/// fetching nothing, at twice the traffic.
pub const WASTE_COST: f32 = 0.005;
/// Reads of other streams after which the model counts a stream as idle: it forgets what it
/// sent and read, and its network shadow judges what it still awaits ([`Shadow::expire`]; see
/// `model::IDLE_READS`). With more streams than this reading in turn, each is idle between
/// its reads.
pub const IDLE_READS: u64 = 64;
/// Reads of other streams after which `auto` counts a stream as gone quiet: its ghost scores
/// leave its group's sums ([`GroupGhost`]), and a young one counts as finished (a small file
/// read and closed), its shadows judging what they still await ([`Shadow::expire`]); `ctx`
/// drops a stream then. Longer than `IDLE_READS`, so that up to this many files read in turn
/// are not taken as finished.
pub const DEAD_READS: u64 = 1024;
/// A stream's guesses named in its first `JUDGE_AFTER_READS` reads are its young guesses: they
/// are judged by read `YOUNG_READS` (or when it goes idle), and pooled per file type
/// ([`Pooled`]). Until its own guesses can have been judged wasted (its first
/// `JUDGE_AFTER_READS` reads), a stream is gated by that pool.
pub const YOUNG_READS: u64 = 2 * JUDGE_AFTER_READS;
/// Fetch credits a stream starts with, so a new stream can get ahead of its reads at once.
pub const START_CREDITS: f32 = 8.0;
/// Time one request stands for on an untimed trace (µs), as the replay's default `iat_us`.
pub const UNTIMED_STEP_US: u64 = 100;

/// The most credits the model's real budget may hold, per block read so far (at least
/// `START_CREDITS`, at most its `bucket`): savings grow with the reads that earned them, so a
/// short stretch of reads after a long one cannot spend far more than it earns. Over a window of
/// N block reads after R, fetches exceed N by at most max(`START_CREDITS`, R/100) − (1 −
/// `fetch_ratio`) N, plus credits paid before the window and given back in it (on a mount,
/// `Predictor::not_fetched`; never in the replay): none for N ≥ 267 when R ≤ 3 N (as for
/// `--tail-frac 0.3` when reads are spread evenly). Shadows keep a fixed bucket, so early on
/// they may credit a candidate with a burst the real budget cannot pay for yet.
pub const SAVE_PER_READ: f32 = 0.01;

/// A fetch budget (a shadow's, or the model's real one over all streams): credits earned per
/// block read (and given back for blocks that cost no fetch), saved up to its limit, one credit
/// per fetch. A fixed budget (`new`, shadows) saves up to its cap (the `shadow_bucket` knob,
/// `SHADOW_BUCKET_BLOCKS` by default); a growing one (`growing`, the model's real budget) up to
/// `SAVE_PER_READ` per block read so far, between `START_CREDITS` and the cap. Both start with
/// `START_CREDITS` (at most the limit).
#[derive(Clone, Copy, Debug)]
pub struct Credits {
    have: f32,
    /// The most it will ever save up.
    cap: f32,
    /// Whether the limit grows with the reads (`SAVE_PER_READ`) rather than staying at `cap`.
    grows: bool,
    /// Block reads so far (counted only when it `grows`).
    reads: u32,
}

impl Credits {
    /// A fixed budget saving up to `cap`.
    pub fn new(cap: f32) -> Self {
        Self { have: START_CREDITS.min(cap), cap, grows: false, reads: 0 }
    }
    /// A budget whose savings grow with the reads (`SAVE_PER_READ`), up to `cap`.
    pub fn growing(cap: f32) -> Self {
        Self { have: START_CREDITS.min(cap), cap, grows: true, reads: 0 }
    }
    /// The most it saves up now.
    fn limit(&self) -> f32 {
        if !self.grows {
            return self.cap;
        }
        (self.reads as f32 * SAVE_PER_READ).max(START_CREDITS).min(self.cap)
    }
    /// A block read earns `n` credits.
    pub fn earn_read(&mut self, n: f32) {
        if self.grows {
            self.reads = self.reads.saturating_add(1);
        }
        self.earn(n);
    }
    /// Credits given back (or earned), up to the limit.
    pub fn earn(&mut self, n: f32) {
        self.have = (self.have + n).min(self.limit());
    }
    /// Pays for one fetch, if there is a credit.
    pub fn spend(&mut self) -> bool {
        let ok = self.have >= 1.0;
        if ok {
            self.have -= 1.0;
        }
        ok
    }
}

/// A read's time in µs (untimed traces count requests).
pub fn clock_us(r: &Read) -> u64 {
    if r.timed { r.t_us } else { r.t_us.saturating_mul(UNTIMED_STEP_US) }
}

/// How shadows judge: the fetch latency (µs) and the fetch budget per block read.
#[derive(Clone, Copy, Debug)]
pub struct Judge {
    pub fetch_us: f32,
    pub fetch_ratio: f32,
    /// Most credits saved up (the largest burst).
    pub bucket: f32,
    /// What a named block that was never read costs, in fetches (in [`Shadow::net`], not in its
    /// score): the reads a useless prefetch slows down by pushing cached blocks out.
    /// A candidate whose `net` is below 0 did worse than fetching nothing, and `auto` does not
    /// pass it on.
    pub waste_cost: f32,
    /// Blocks the client's cache holds: when not 0, `auto` ranks its candidates by what they
    /// would have hidden in a cache of this size ([`Ghost`]) rather than by their shadows'
    /// scores (which still gate them, [`Shadow::net`]).
    pub cache_blocks: usize,
}

/// One read as shadows see it.
#[derive(Clone, Copy, Debug)]
pub struct Seen {
    pub block: u64,
    pub now_us: u64,
    /// The stream's read count, this read included.
    pub reads: u64,
    /// Whether a prefetch of this block could have helped: it missed the cache, or it is there
    /// because it was prefetched. A block cached by an earlier demand read helps nobody: naming
    /// it earns no score (and is not judged).
    pub useful: bool,
}

/// One predictor's answers on one stream, judged as if fetched (see the module doc).
#[derive(Debug)]
pub struct Shadow {
    credits: Credits,
    /// Named block → (time named, read index when named).
    pending: HashMap<u64, (u64, u64)>,
    order: VecDeque<(u64, u64)>,
    /// Fetch time hidden and blocks judged used and wasted, decayed per read (`HALF_LIFE_READS`;
    /// see [`Shadow::score`], [`Shadow::net`]).
    recent: Pooled,
    /// Judgments of young guesses (named in the stream's first `JUDGE_AFTER_READS` reads) not
    /// yet taken for pooling ([`Shadow::take_young`]).
    young: Pooled,
    outcomes: VecDeque<bool>,
}

impl Shadow {
    /// A shadow saving up at most `bucket` credits (`Judge::bucket`).
    pub fn new(bucket: f32) -> Self {
        Self {
            credits: Credits::new(bucket),
            pending: HashMap::default(),
            order: VecDeque::new(),
            recent: Pooled::default(),
            young: Pooled::default(),
            outcomes: VecDeque::new(),
        }
    }
}

impl Default for Shadow {
    fn default() -> Self {
        Self::new(SHADOW_BUCKET_BLOCKS)
    }
}

impl Shadow {
    /// The stream read a block: credits, scores, judges.
    pub fn on_read(&mut self, seen: &Seen, judge: &Judge) {
        self.recent.decay();
        self.credits.earn_read(judge.fetch_ratio);
        if let Some((named_at, at_read)) = self.pending.remove(&seen.block)
            && seen.useful
        {
            let lead = seen.now_us.saturating_sub(named_at) as f32;
            let gain = if judge.fetch_us > 0.0 { (lead / judge.fetch_us).min(1.0) } else { 1.0 };
            self.recent.score += gain;
            self.judge(true, at_read);
            if at_read <= JUDGE_AFTER_READS {
                self.young.score += gain;
            }
        }
        while let Some(&(b, at_read)) = self.order.front() {
            if self.order.len() <= PENDING_MAX && at_read + JUDGE_AFTER_READS > seen.reads {
                break;
            }
            self.order.pop_front();
            // Still waiting under this naming (not used, not named again since): wasted.
            if self.pending.get(&b).is_some_and(|&(_, r)| r == at_read) {
                self.pending.remove(&b);
                self.judge(false, at_read);
            }
        }
    }

    /// The stream went idle (`IDLE_READS`, `DEAD_READS`): judges the blocks still awaited up
    /// to `highest`, the highest block it read, as not used, and forgets the rest unjudged
    /// (past the last block a stream read may be past the end of its file, where nothing is
    /// fetched).
    pub fn expire(&mut self, highest: u64) {
        let mut pending = std::mem::take(&mut self.pending);
        for (_, &(_, at_read)) in pending.iter().filter(|&(&b, _)| b <= highest) {
            self.judge(false, at_read);
        }
        pending.clear();
        self.pending = pending;
        self.order.clear();
    }

    /// Judges a block named at the stream's read `at_read`.
    fn judge(&mut self, used: bool, at_read: u64) {
        self.recent.count(used);
        if at_read <= JUDGE_AFTER_READS {
            self.young.count(used);
        }
        self.outcomes.push_back(used);
        if self.outcomes.len() > OUTCOMES {
            self.outcomes.pop_front();
        }
    }

    /// Whether `block` was named and is still awaited.
    pub fn awaits(&self, block: u64) -> bool {
        self.pending.contains_key(&block)
    }

    /// Takes the predictor's answer: names each block not awaited already and not `skip`ped,
    /// while its credits last.
    pub fn offer(&mut self, blocks: &[u64], now_us: u64, reads: u64, skip: impl Fn(u64) -> bool) {
        for &b in blocks {
            if self.pending.contains_key(&b) || skip(b) {
                continue;
            }
            if !self.credits.spend() {
                break;
            }
            self.pending.insert(b, (now_us, reads));
            self.order.push_back((b, reads));
        }
    }

    /// Fetch time this predictor would have hidden, per read, recently (decayed).
    pub fn score(&self) -> f32 {
        self.recent.score
    }

    /// The score less what its wasted blocks cost at `waste_cost` each (`Judge::waste_cost`):
    /// below 0, fetching nothing would have done better.
    pub fn net(&self, waste_cost: f32) -> f32 {
        self.recent.net(waste_cost)
    }

    /// What its young guesses earned and were judged since the last call (for [`Pooled`]).
    pub fn take_young(&mut self) -> Pooled {
        std::mem::take(&mut self.young)
    }

    /// Blocks judged so far, up to `OUTCOMES`.
    pub fn judged(&self) -> usize {
        self.outcomes.len()
    }

    /// Used / judged over the last `OUTCOMES` judged blocks (1.0 until half of those are known).
    pub fn accuracy(&self) -> f32 {
        if self.outcomes.len() < OUTCOMES / 2 {
            return 1.0;
        }
        self.outcomes.iter().filter(|&&u| u).count() as f32 / self.outcomes.len() as f32
    }
}

/// Per-read decay of a score: halves every `HALF_LIFE_READS` reads (0.5^(1/256), checked by a
/// test).
const DECAY: f32 = 0.997_296_7;

/// The last `SENT_MEMORY` blocks sent for fetching on a stream: a hit on one of them is a read a
/// prefetch helped ([`Seen::useful`]).
#[derive(Debug, Default)]
pub struct Sent {
    order: VecDeque<(u64, u64)>,
    /// Block → the sequence number it was (last) sent under.
    blocks: HashMap<u64, u64>,
    next: u64,
}

/// Blocks a stream remembers having passed on for fetching.
pub const SENT_MEMORY: usize = 256;

impl Sent {
    pub fn contains(&self, block: u64) -> bool {
        self.blocks.contains_key(&block)
    }
    pub fn insert(&mut self, block: u64) {
        if self.blocks.contains_key(&block) {
            return;
        }
        if self.order.len() == SENT_MEMORY
            && let Some((old, seq)) = self.order.pop_front()
            && self.blocks.get(&old) == Some(&seq)
        {
            self.blocks.remove(&old);
        }
        self.next += 1;
        self.blocks.insert(block, self.next);
        self.order.push_back((block, self.next));
    }
    /// Forgets `block` (it was not fetched after all).
    pub fn remove(&mut self, block: u64) {
        self.blocks.remove(&block);
    }
    /// Whether a prefetch could have helped read `r` of this stream ([`Seen::useful`]): it
    /// missed, or it hit a block that is cached because it was sent.
    pub fn useful(&self, r: &Read) -> bool {
        !r.hit || self.contains(r.block)
    }
}

/// Runs several predictors side by side and passes on, per stream, the answer of the one whose
/// [`Shadow`] scores best (ties keep the current choice) among those whose [`Shadow::net`] is
/// not below 0 (in a stream's first `JUDGE_AFTER_READS` reads: whose net pooled over the young
/// guesses of its file type's streams is, [`Pooled`]); when every one wastes more than it
/// hides, nothing. (With a single candidate it passes that one's answer on unjudged.)
pub struct Selector {
    candidates: Vec<Box<dyn Predictor>>,
    answers: Vec<Vec<u64>>,
    streams: PerStream<SelectStream>,
    judge: Judge,
    name: String,
    /// Per file type group (`Group::index`), per candidate: the latency its shadows hid on
    /// every stream of the group, decayed like a shadow's score. A new stream starts with the
    /// group's best candidate rather than the first one.
    groups: [Vec<f32>; crate::filetype::Group::ALL.len()],
    /// Per file type group, per candidate: its shadows' young guesses on every stream of the
    /// group ([`Pooled`]). A stream in its first `JUDGE_AFTER_READS` reads is gated by these,
    /// not by its own shadows.
    young: [Vec<Pooled>; crate::filetype::Group::ALL.len()],
    /// Finds streams gone quiet for `DEAD_READS` reads (`SelectStream::retire`).
    idle: Idle,
    before: Vec<f32>,
    /// Per candidate, when `Judge::cache_blocks` is not 0 (and there is more than one).
    ghosts: Vec<Ghost>,
    /// Per file type group: its streams' ghost scores pooled ([`GroupGhost`]).
    group_ghosts: [GroupGhost; crate::filetype::Group::ALL.len()],
}

/// Per candidate, the sum of the ghost scores of a file type group's active streams (those read
/// within the last `DEAD_READS` reads of any stream). A stream ranks candidates by its own ghost
/// score plus `GROUP_WEIGHT` times this, so where several streams behave alike (MQSim's
/// devices) each choice rests on all of their evidence rather than on one stream's noise,
/// while every stream's score still remembers only its own last reads (half-life
/// `HALF_LIFE_READS`): more evidence, not a longer past, which costs traces whose phases need
/// quick switches (models/README items 45–47). With n alike streams the group's part weighs
/// about `GROUP_WEIGHT` × n times the stream's own, so it mostly decides, and a new stream
/// follows its group's best candidate from its first read. A group of one stream ranks as its
/// own score alone would (up to rounding, reset at each recount). The sums follow the changes
/// to their streams' scores (a stream leaves them when it goes idle or is dropped past
/// `STREAMS_MAX`) and are recounted from them every `RECOUNT_READS` reads, which drops
/// rounding drift.
#[derive(Debug, Default)]
struct GroupGhost {
    score: Vec<f32>,
}

/// How much a stream's group's ghost score weighs in its ranking against its own (chosen on the
/// validation cut: models/README item 47).
pub const GROUP_WEIGHT: f32 = 1.0;
/// Reads of the selector between recounts of the groups' ghost scores.
const RECOUNT_READS: u64 = 4096;

/// One candidate's answers fetched into a simulated LRU cache of the client's size
/// (`Judge::cache_blocks`), as if every stream had chosen it; every stream's reads go through
/// it. A read of a block it holds hides the whole fetch, or the part that has passed if the
/// block is still in flight (`ready_at`); a miss waits a whole fetch and brings the block in.
/// It spends its own fetch budget (`Credits`, as a shadow's) on blocks it lacks, so it is
/// judged under the budget the real fetches get. Unlike a [`Shadow`], it sees what a prefetch
/// pushes out (a wasted block costs the cached one it evicted) and credits a prefetch read long
/// after it was named, while still cached (a shadow stops waiting after `JUDGE_AFTER_READS`):
/// on MQSim's trace the shadows credited next-2 with 160 µs per block read where it hid 232,
/// and next-8 with 153 where it hid 144 (models/README item 32). Prefetches are cached (at the
/// MRU end) when named, not when they land.
#[derive(Debug)]
pub struct Ghost {
    /// Blocks are cached as not prefetched: a ghost scores hidden time, not waste.
    cache: Lru,
    credits: Credits,
}

/// Most blocks a ghost cache simulates (`Judge::cache_blocks` is capped to this): 4 GiB of
/// 64 KiB blocks. A ghost takes about 90 bytes per block (the map of its `lru::Lru`, and
/// its queue of ages with stale ones up to twice the blocks), so `auto`'s ten candidates take about 900 bytes per
/// block of the client's cache: 3.5 MiB for `CACHE_BLOCKS`, 56 MiB at this limit.
pub const GHOST_BLOCKS_MAX: usize = 1 << 16;
/// The cache size candidates are judged in when nobody says (`ModelKnobs::cache_blocks`): the
/// client's default block cache, 256 MiB of 64 KiB blocks. A mount passes its own
/// (`--cache-mib` over the volume's block size), `augur trace eval` the replay's.
pub const CACHE_BLOCKS: usize = 4096;

impl Ghost {
    pub fn new(cap: usize, bucket: f32) -> Self {
        Self { cache: Lru::new(cap.clamp(1, GHOST_BLOCKS_MAX)), credits: Credits::new(bucket) }
    }

    /// A read at `now` (µs): the share of a fetch it did not wait for (1 for a hit, 0 for a
    /// miss, which it fetches).
    pub fn read(&mut self, k: (u64, u64), now: u64, judge: &Judge) -> f32 {
        self.credits.earn_read(judge.fetch_ratio);
        let fetch_us = judge.fetch_us.max(1.0);
        if let Some(e) = self.cache.touch(k) {
            return 1.0 - (e.ready_at.saturating_sub(now) as f32 / fetch_us).min(1.0);
        }
        self.cache.insert(k, false, now + fetch_us as u64);
        0.0
    }

    /// Fetches what the candidate named and the cache lacks, while its credits last.
    pub fn offer(
        &mut self,
        stream: u64,
        blocks: &[u64],
        now: u64,
        judge: &Judge,
        skip: impl Fn(u64) -> bool,
    ) {
        for &b in blocks {
            if skip(b) || self.cache.map.contains_key(&(stream, b)) {
                continue;
            }
            if !self.credits.spend() {
                break;
            }
            self.cache.insert((stream, b), false, now + judge.fetch_us as u64);
        }
    }
}

/// One predictor's young guesses (named in a stream's first `JUDGE_AFTER_READS` reads; see
/// `YOUNG_READS`), pooled over the streams of a file type: the fetch time they hid, and how
/// many were judged used and wasted. Decays like a shadow's score, per read of a young stream.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pooled {
    score: f32,
    wasted: f32,
    used: f32,
}

impl Pooled {
    /// Adds `more` ([`Shadow::take_young`]); `read` (a young stream's read, `YOUNG_READS`)
    /// decays the pool by one read first.
    pub fn add(&mut self, more: Pooled, read: bool) {
        if read {
            self.decay();
        }
        self.score += more.score;
        self.wasted += more.wasted;
        self.used += more.used;
    }

    /// One read older.
    fn decay(&mut self) {
        self.score *= DECAY;
        self.wasted *= DECAY;
        self.used *= DECAY;
    }

    /// Counts a judged block.
    fn count(&mut self, used: bool) {
        *if used { &mut self.used } else { &mut self.wasted } += 1.0;
    }

    /// The fetch time hidden less what the wasted blocks cost at `waste_cost` each: below 0,
    /// fetching nothing would have done better.
    pub fn net(&self, waste_cost: f32) -> f32 {
        self.score - waste_cost * self.wasted
    }

    /// Used / judged, of the decayed totals (1.0 until `OUTCOMES` / 2 blocks' worth are
    /// judged).
    pub fn accuracy(&self) -> f32 {
        let judged = self.used + self.wasted;
        if judged < (OUTCOMES / 2) as f32 { 1.0 } else { self.used / judged }
    }
}

/// Finds streams gone idle: no read in the last `window` reads over every stream.
#[derive(Debug)]
pub struct Idle {
    window: u64,
    clock: u64,
    /// (stream, `clock` at its read) for the last `window` + 1 reads.
    last: VecDeque<(u64, u64)>,
}

impl Idle {
    pub fn new(window: u64) -> Self {
        Self { window, clock: 0, last: VecDeque::new() }
    }

    /// Counts a read of `stream`; returns the clock at it (1 for the first read).
    pub fn read(&mut self, stream: u64) -> u64 {
        self.clock += 1;
        self.last.push_back((stream, self.clock));
        self.clock
    }

    /// Calls `expire` (with the stream's id) on each stream of `streams` gone idle since the
    /// last call: its last read (`last_at`, the clock then) has just left the window.
    pub(crate) fn sweep<S: Default>(
        &mut self,
        streams: &mut PerStream<S>,
        last_at: impl Fn(&S) -> u64,
        mut expire: impl FnMut(u64, &mut S),
    ) {
        while let Some(&(stream, at)) = self.last.front() {
            if at + self.window >= self.clock {
                break;
            }
            self.last.pop_front();
            if let Some(s) = streams.peek(stream).filter(|s| last_at(s) == at) {
                expire(stream, s);
            }
        }
    }
}

#[derive(Default)]
struct SelectStream {
    shadows: Vec<Shadow>,
    recent: RecentReads,
    /// What this selector passed on (when it runs as a predictor of its own).
    sent: Sent,
    reads: u64,
    best: usize,
    /// `Group::index` of its file type.
    group: usize,
    /// What `Idle::read` returned at its last read.
    last_at: u64,
    /// The highest block it read.
    highest: u64,
    /// Per candidate: the fetch share its [`Ghost`] hid on this stream's reads, decayed like a
    /// shadow's score (`HALF_LIFE_READS`); what `auto` ranks by when there are ghosts.
    ghost: Vec<f32>,
    /// Whether `ghost` is counted in its group's [`GroupGhost`] (from a read until the stream
    /// goes idle).
    pooled: bool,
}

/// The heuristics `auto` chooses among (every SPEC §7 heuristic that fetches, `history` and
/// `ctx`).
pub const AUTO: [&str; 10] =
    ["next-1", "next-2", "next-4", "next-8", "linux-ra", "leap", "markov", "mithril", "history", "ctx"];

impl SelectStream {
    /// The stream went quiet for `DEAD_READS` reads of others, or is dropped for another: its
    /// ghost scores leave its group's sums, and if it was young (a small file finished), its
    /// young guesses still awaited were wasted.
    fn retire(
        &mut self,
        young: &mut [Vec<Pooled>; crate::filetype::Group::ALL.len()],
        group_ghosts: &mut [GroupGhost; crate::filetype::Group::ALL.len()],
    ) {
        if std::mem::take(&mut self.pooled) {
            for (sum, own) in group_ghosts[self.group].score.iter_mut().zip(&self.ghost) {
                *sum -= own;
            }
        }
        if self.reads <= YOUNG_READS {
            for (pooled, sh) in young[self.group].iter_mut().zip(&mut self.shadows) {
                sh.expire(self.highest);
                pooled.add(sh.take_young(), false);
            }
        }
    }
}

impl Selector {
    /// `auto` (all of `AUTO`) or one heuristic by name.
    pub fn new(name: &str, judge: Judge) -> Result<Self, String> {
        let names: Vec<&str> = if name == "auto" { AUTO.to_vec() } else { vec![name] };
        Self::among(name, &names, judge)
    }

    /// A selector called `name` choosing among the heuristics `names`.
    fn among(name: &str, names: &[&str], judge: Judge) -> Result<Self, String> {
        let candidates = names.iter().map(|n| crate::predict::by_name(n)).collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            answers: vec![Vec::new(); candidates.len()],
            candidates,
            streams: PerStream::default(),
            judge,
            name: name.to_string(),
            groups: std::array::from_fn(|_| vec![0.0; names.len()]),
            young: std::array::from_fn(|_| vec![Pooled::default(); names.len()]),
            idle: Idle::new(DEAD_READS),
            before: Vec::with_capacity(names.len()),
            ghosts: if judge.cache_blocks == 0 || names.len() < 2 {
                Vec::new()
            } else {
                names.iter().map(|_| Ghost::new(judge.cache_blocks, judge.bucket)).collect()
            },
            group_ghosts: Default::default(),
        })
    }

    /// Like `on_read`, `useful` as in [`Seen`]; returns the chosen candidate's score.
    pub fn select(&mut self, r: &Read, useful: bool, out: &mut Vec<u64>) -> f32 {
        for (p, a) in self.candidates.iter_mut().zip(&mut self.answers) {
            a.clear();
            p.on_read(r, a);
        }
        if self.candidates.len() == 1 {
            out.extend_from_slice(&self.answers[0]);
            return 0.0;
        }
        let now = self.idle.read(r.stream);
        let (young, group_ghosts) = (&mut self.young, &mut self.group_ghosts);
        self.idle.sweep(&mut self.streams, |s| s.last_at, |_, s| s.retire(young, group_ghosts));
        if now.is_multiple_of(RECOUNT_READS) && !self.ghosts.is_empty() {
            // In f64, so that the order the streams come in changes no bit of the result.
            let mut sums = vec![vec![0f64; self.ghosts.len()]; self.group_ghosts.len()];
            for s in self.streams.values().filter(|s| s.pooled) {
                for (sum, own) in sums[s.group].iter_mut().zip(&s.ghost) {
                    *sum += f64::from(*own);
                }
            }
            for (g, sums) in self.group_ghosts.iter_mut().zip(sums) {
                g.score = sums.into_iter().map(|x| x as f32).collect();
            }
        }
        let (young, group_ghosts) = (&mut self.young, &mut self.group_ghosts);
        let s = self.streams.get_or_evict(r.stream, |s| s.last_at, |s| s.retire(young, group_ghosts));
        if s.reads == 0 {
            s.shadows.resize_with(self.candidates.len(), || Shadow::new(self.judge.bucket));
            s.ghost = vec![0.0; self.ghosts.len()];
            s.group = r.group.index();
            let best = self.groups[s.group].iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1));
            s.best = best.filter(|b| *b.1 > 0.0).map_or(0, |b| b.0);
        }
        let group = &mut self.groups[s.group];
        s.reads += 1;
        s.last_at = now;
        s.highest = s.highest.max(r.block);
        s.recent.push(r.block);
        let seen = Seen { block: r.block, now_us: clock_us(r), reads: s.reads, useful };
        self.before.clear();
        self.before.extend(s.shadows.iter().map(|sh| sh.score() * DECAY));
        for (sh, a) in s.shadows.iter_mut().zip(&self.answers) {
            sh.on_read(&seen, &self.judge);
            sh.offer(a, seen.now_us, s.reads, |b| s.recent.contains(b) || r.in_request_after(b));
        }
        let sums = &mut self.group_ghosts[s.group].score;
        sums.resize(self.ghosts.len(), 0.0);
        let counted = std::mem::replace(&mut s.pooled, true);
        for (((g, score), a), sum) in self.ghosts.iter_mut().zip(&mut s.ghost).zip(&self.answers).zip(sums) {
            let before = if counted { *score } else { 0.0 };
            *score = *score * DECAY + g.read((r.stream, r.block), seen.now_us, &self.judge);
            *sum += *score - before;
            g.offer(r.stream, a, seen.now_us, &self.judge, |b| r.in_request_after(b));
        }
        for ((pooled, sh), before) in group.iter_mut().zip(&s.shadows).zip(&self.before) {
            *pooled = *pooled * DECAY + (sh.score() - before);
        }
        let young = &mut self.young[s.group];
        for (pooled, sh) in young.iter_mut().zip(&mut s.shadows) {
            pooled.add(sh.take_young(), s.reads <= YOUNG_READS);
        }
        // The best score (its ghost's, if there are ghosts) among candidates that hide more
        // than they waste (on a young stream: on the young streams of its file type); none of
        // them: pass nothing on (fetching nothing does best).
        let cost = self.judge.waste_cost;
        let is_young = s.reads <= JUDGE_AFTER_READS;
        let worth = |i: usize| {
            if is_young { young[i].net(cost) >= 0.0 } else { s.shadows[i].net(cost) >= 0.0 }
        };
        let mut best = worth(s.best).then_some(s.best);
        for (i, sh) in s.shadows.iter().enumerate() {
            let better = |b: usize| {
                if s.ghost.is_empty() {
                    sh.score() > s.shadows[b].score()
                } else {
                    let sums = &self.group_ghosts[s.group].score;
                    s.ghost[i] + GROUP_WEIGHT * sums[i] > s.ghost[b] + GROUP_WEIGHT * sums[b]
                }
            };
            if worth(i) && best.is_none_or(better) {
                best = Some(i);
            }
        }
        let Some(best) = best else {
            return 0.0;
        };
        s.best = best;
        out.extend_from_slice(&self.answers[best]);
        s.shadows[best].score()
    }
}

impl Predictor for Selector {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn on_read(&mut self, r: &Read, out: &mut Vec<u64>) {
        let useful = self.streams.get(r.stream).sent.useful(r);
        let start = out.len();
        self.select(r, useful, out);
        let sent = &mut self.streams.get(r.stream).sent;
        for &b in &out[start..] {
            sent.insert(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JUDGE: Judge = Judge {
        fetch_us: 1000.0,
        fetch_ratio: 1.0,
        bucket: SHADOW_BUCKET_BLOCKS,
        waste_cost: WASTE_COST,
        cache_blocks: 0,
    };

    #[test]
    fn a_shadow_scores_the_lead_it_would_have_hidden() {
        let mut s = Shadow {
            credits: Credits { have: 0.0, ..Credits::new(SHADOW_BUCKET_BLOCKS) },
            ..Shadow::default()
        };
        let j = JUDGE;
        let seen = |block, now_us, reads| Seen { block, now_us, reads, useful: true };
        s.on_read(&seen(10, 0, 1), &j);
        s.offer(&[11, 12], 0, 1, |_| false);
        assert!(s.awaits(11) && !s.awaits(12), "one credit after one read");
        s.on_read(&seen(11, 250, 2), &j);
        assert!((s.score() - 0.25).abs() < 0.01, "{}", s.score());
        s.offer(&[30], 250, 2, |_| false);
        assert!(s.awaits(30));
        for i in 0..JUDGE_AFTER_READS + 1 {
            s.on_read(&seen(1000 + i, 10_000, 3 + i), &j);
        }
        assert!(!s.awaits(30), "judged wasted");
        assert_eq!(s.outcomes, [true, false]);
    }

    /// `auto`'s answer to read `r`, timed at `t_us`.
    fn select(auto: &mut Selector, r: Read, t_us: u64) -> Vec<u64> {
        let mut out = Vec::new();
        auto.select(&Read { t_us, timed: true, ..r }, true, &mut out);
        out
    }

    #[test]
    fn auto_follows_the_heuristic_that_fits_the_stream() {
        let mut auto = Selector::new("auto", JUDGE).unwrap();
        let mut out = Vec::new();
        // A sequential stream, one read each 100 µs: the deepest look-ahead hides the most.
        for b in 0..400u64 {
            out = select(&mut auto, Read::at(7, b, false), b * 100);
        }
        let s = auto.streams.get(7);
        assert_eq!(
            AUTO[s.best],
            "next-8",
            "scores {:?}",
            s.shadows.iter().map(Shadow::score).collect::<Vec<_>>()
        );
        assert_eq!(out, (400..408).collect::<Vec<_>>());
        assert!(Selector::new("oracle", JUDGE).is_err());
    }

    #[test]
    fn a_ghost_is_an_lru_cache_that_hides_what_has_landed() {
        let mut g = Ghost::new(2, 100.0);
        let j = JUDGE;
        assert_eq!(g.read((1, 10), 0, &j), 0.0, "a miss fetches");
        assert_eq!(g.read((1, 10), 500, &j), 0.5, "in flight: half the fetch waited");
        assert_eq!(g.read((1, 10), 2000, &j), 1.0, "landed");
        g.read((1, 11), 2000, &j);
        g.read((1, 10), 3000, &j);
        g.read((1, 12), 3000, &j);
        assert!(
            g.cache.map.contains_key(&(1, 10)) && !g.cache.map.contains_key(&(1, 11)),
            "11 was the least recent"
        );
        for i in 0..1000 {
            g.read((1, i % 3), 4000 + i, &j);
            assert!(
                g.cache.map.len() <= 2 && g.cache.order.len() <= 2 * 2 + 64 + 1,
                "stale LRU entries are compacted"
            );
        }
    }

    #[test]
    fn a_ghost_fetches_only_what_its_budget_pays_for_and_it_lacks() {
        let mut g = Ghost::new(100, 4.0);
        g.offer(2, &[1, 2, 3, 4, 5, 6], 0, &JUDGE, |b| b == 2);
        assert_eq!(g.cache.map.len(), 4, "four credits: 1, 3, 4, 5 (2 is skipped)");
        assert!(!g.cache.map.contains_key(&(2, 2)) && !g.cache.map.contains_key(&(2, 6)));
        g.read((2, 1), 100, &JUDGE);
        g.offer(2, &[1, 3, 6, 7], 100, &JUDGE, |_| false);
        assert!(
            g.cache.map.contains_key(&(2, 6)) && !g.cache.map.contains_key(&(2, 7)),
            "one credit earned, spent on 6"
        );
    }

    /// Which of next-2 and next-8 `auto` passes on for a sequential stream read every 200 µs
    /// (fetches take 1000 µs), judging in a cache of `cache_blocks` blocks (0: by shadows).
    fn sequential_choice(cache_blocks: usize) -> usize {
        let names = ["next-2", "next-8"];
        let mut auto = Selector::among("auto", &names, Judge { cache_blocks, ..JUDGE }).unwrap();
        let mut out = Vec::new();
        for b in 0..400u64 {
            out = select(&mut auto, Read::at(7, b, false), b * 200);
        }
        let s = auto.streams.get(7);
        assert_eq!(out, (400..400 + [2, 8][s.best]).collect::<Vec<_>>(), "ghosts {:?}", s.ghost);
        s.best
    }

    #[test]
    fn ghosts_rank_by_what_the_cache_keeps_where_shadows_cannot_see_it() {
        // Shadows credit the deeper look-ahead; in a 4-block cache its blocks are pushed out
        // before they are read, and the shallow one hides more.
        assert_eq!(sequential_choice(0), 1, "shadows: next-8");
        assert_eq!(sequential_choice(4), 0, "ghosts in 4 blocks: next-2");
        assert_eq!(sequential_choice(64), 1, "ghosts in 64 blocks: next-8");
    }

    /// Block of read `i` of a stream in no order (SplitMix64's finalizer spreads them over 2^40
    /// blocks, with no pattern in their deltas); every `step`th read, when `step` is not 0, is
    /// the block after the read before it.
    fn scattered(i: u64, step: u64) -> u64 {
        let hashed = |i: u64| {
            let mut z = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) >> 24
        };
        if step > 0 && i % step == step - 1 { hashed(i - 1) + 1 } else { hashed(i) }
    }

    /// Blocks `selector` passes on over the last half of `n` reads of stream 1 (`scattered`),
    /// and what `select` returned for the last read.
    fn passed_on(mut selector: Selector, n: u64, step: u64) -> (usize, f32) {
        let (mut blocks, mut last) = (0, 0.0);
        for i in 0..n {
            let mut out = Vec::new();
            let r = Read { t_us: i * 1000, timed: true, ..Read::at(1, scattered(i, step), false) };
            last = selector.select(&r, true, &mut out);
            if i >= n / 2 {
                blocks += out.len();
            }
        }
        (blocks, last)
    }

    #[test]
    fn auto_fetches_nothing_where_fetching_wastes_more_than_it_hides() {
        let auto = |judge| Selector::new("auto", judge).unwrap();
        let free = Judge { waste_cost: 0.0, ..JUDGE };
        // No structure: with no cost for waste, a candidate that fetches (and hid nothing, like
        // the rest) stays the choice; with the default cost, `auto` turns to one that names
        // nothing.
        assert!(passed_on(auto(free), 2000, 0).0 > 0);
        assert_eq!(passed_on(auto(JUDGE), 2000, 0).0, 0);
        // Candidates that all fetch, all wasting: none is passed on, and `select` says so.
        let fetchers = || Selector::among("fetchers", &["next-1", "next-2"], JUDGE).unwrap();
        assert_eq!(passed_on(fetchers(), 2000, 0), (0, 0.0));
        // One read in ten follows the read before it: next-1 is right that often, a whole fetch
        // hidden each time, which is worth its waste.
        let (blocks, score) = passed_on(fetchers(), 2000, 10);
        assert!(blocks >= 900 && score > 0.0, "{blocks} blocks, score {score}");
    }

    /// Blocks `selector` passes on over the last half of `files` short streams of 16 reads each,
    /// read one after another; `block(file, i)` is read `i` of a file.
    fn passed_on_short(selector: &mut Selector, files: u64, block: impl Fn(u64, u64) -> u64) -> usize {
        let mut blocks = 0;
        for f in 0..files {
            for i in 0..16 {
                let mut out = Vec::new();
                let t_us = (f * 16 + i) * 1000;
                selector.select(
                    &Read { t_us, timed: true, ..Read::at(f, block(f, i), false) },
                    true,
                    &mut out,
                );
                if f >= files / 2 {
                    blocks += out.len();
                }
            }
        }
        blocks
    }

    #[test]
    fn young_streams_are_gated_by_what_young_streams_of_their_type_wasted() {
        use crate::filetype::Group;
        let fetchers = || Selector::among("fetchers", &["next-1", "next-2"], JUDGE).unwrap();
        // Small files read at random places: no stream lives long enough to judge its own
        // guesses, but the ones gone quiet show they were wasted; later files get nothing.
        let mut gated = fetchers();
        assert_eq!(passed_on_short(&mut gated, 400, |f, i| scattered(f * 16 + i, 0)), 0);
        // What small files of another type wasted says nothing of images.
        let image = Read { group: Group::Image, t_us: 1 << 40, timed: true, ..Read::at(1 << 20, 7, false) };
        let mut out = Vec::new();
        gated.select(&image, true, &mut out);
        assert!(!out.is_empty(), "a new image file is not gated by other files' waste");
        // Small files read from start to end keep fetching.
        assert!(passed_on_short(&mut fetchers(), 400, |f, i| f * 1000 + i) >= 200 * 16);
    }

    #[test]
    fn a_stream_gone_quiet_wastes_only_what_it_awaited_below_its_highest_read() {
        let mut s = Shadow::default();
        let seen = |block, reads| Seen { block, now_us: 0, reads, useful: true };
        s.on_read(&seen(10, 1), &JUDGE);
        s.offer(&[5, 20], 0, 1, |_| false);
        s.on_read(&seen(11, 2), &JUDGE);
        // Block 5 (below the highest read, 11) was wasted; 20 may lie past the file's end.
        s.expire(11);
        assert_eq!(s.outcomes, [false]);
        assert!(!s.awaits(20));
        let young = s.take_young();
        assert_eq!((young.used, young.wasted), (0.0, 1.0));
        assert_eq!(s.take_young().wasted, 0.0, "taken once");
    }

    #[test]
    fn a_new_stream_starts_with_its_file_types_best_heuristic() {
        use crate::filetype::Group;
        let mut auto = Selector::new("auto", JUDGE).unwrap();
        // Image files read whole, one 64 KiB piece every 100 µs: next-8 hides the most.
        for file in 0..20u64 {
            for b in 0..40u64 {
                select(
                    &mut auto,
                    Read { group: Group::Image, ..Read::at(file, b, false) },
                    (file * 40 + b) * 100,
                );
            }
        }
        let first = |auto: &mut Selector, stream: u64, group: Group| {
            select(auto, Read { group, ..Read::at(stream, 0, false) }, 1_000_000);
            AUTO[auto.streams.get(stream).best]
        };
        assert_eq!(first(&mut auto, 100, Group::Image), "next-8", "a new image file");
        assert_eq!(first(&mut auto, 101, Group::Database), AUTO[0], "nothing known of databases");
    }

    #[test]
    fn auto_chooses_among_every_heuristic_that_fetches() {
        let fetching: Vec<&str> = crate::predict::all_heuristics().filter(|n| *n != "none").collect();
        assert_eq!(AUTO[..], fetching[..]);
    }

    #[test]
    fn a_group_score_is_the_sum_of_its_active_streams_own_scores() {
        let names = ["next-1", "next-4"];
        let mut auto = Selector::among("auto", &names, Judge { cache_blocks: 64, ..JUDGE }).unwrap();
        let sums = |auto: &Selector| auto.group_ghosts[crate::filetype::Group::Other.index()].score.clone();
        let own = |auto: &mut Selector, stream| auto.streams.get(stream).ghost.clone();
        // Two streams read runs, one with gaps.
        for b in 0..300u64 {
            select(&mut auto, Read::at(1, b, false), b * 300);
            select(&mut auto, Read::at(2, 10_000 + 3 * b, false), b * 300 + 100);
        }
        let (one, two) = (own(&mut auto, 1), own(&mut auto, 2));
        for (i, sum) in sums(&auto).iter().enumerate() {
            assert!((sum - (one[i] + two[i])).abs() < 1e-3 * sum.max(1.0), "{sum} against {one:?} + {two:?}");
        }
        // Stream 2 goes quiet for `DEAD_READS` reads of stream 1: the sum is stream 1's alone,
        // also across a recount (`RECOUNT_READS`).
        for b in 300..300 + RECOUNT_READS {
            select(&mut auto, Read::at(1, b, false), b * 300);
        }
        let one = own(&mut auto, 1);
        for (i, sum) in sums(&auto).iter().enumerate() {
            assert!((sum - one[i]).abs() < 1e-3 * sum.max(1.0), "{sum} against {one:?}");
        }
        // It reads again: counted once more.
        select(&mut auto, Read::at(2, 20_000, false), 2_000_000);
        let (one, two) = (own(&mut auto, 1), own(&mut auto, 2));
        for (i, sum) in sums(&auto).iter().enumerate() {
            assert!((sum - (one[i] + two[i])).abs() < 1e-3 * sum.max(1.0), "{sum} against {one:?} + {two:?}");
        }
    }

    #[test]
    fn decay_halves_a_score_over_the_half_life() {
        let half = DECAY.powf(HALF_LIFE_READS);
        assert!((half - 0.5).abs() < 1e-3, "{half}");
    }

    #[test]
    fn sent_forgets_the_oldest() {
        let mut s = Sent::default();
        for b in 0..SENT_MEMORY as u64 + 1 {
            s.insert(b);
            s.insert(b);
        }
        assert!(!s.contains(0) && s.contains(1) && s.contains(SENT_MEMORY as u64));
        s.remove(1);
        assert!(!s.contains(1));
        s.insert(1); // takes the place of its stale entry
        assert!(s.contains(1) && s.contains(2));
        s.insert(10_000);
        assert!(!s.contains(2) && s.contains(1), "2 was the oldest live entry");
    }

    /// Spends every credit it can on each of `n` reads; the blocks paid for.
    fn spend_over(c: &mut Credits, n: usize, ratio: f32) -> usize {
        let mut paid = 0;
        for _ in 0..n {
            c.earn_read(ratio);
            while c.spend() {
                paid += 1;
            }
        }
        paid
    }

    #[test]
    fn a_growing_budget_saves_only_a_share_of_the_reads_so_far() {
        // A quiet stretch of R reads that spend nothing, then a window of N reads that spend all
        // they can, R = 7/3 N as with `--tail-frac 0.3`.
        for n in [300usize, 1000, 3000, 20_000] {
            let mut growing = Credits::growing(BUCKET_BLOCKS);
            let mut fixed = Credits::new(BUCKET_BLOCKS);
            for _ in 0..n * 7 / 3 {
                growing.earn_read(0.97);
                fixed.earn_read(0.97);
            }
            let paid = spend_over(&mut growing, n, 0.97);
            assert!(paid <= n, "window of {n} reads: {paid} paid for");
            let cap = (n * 7 / 3) as f32 * SAVE_PER_READ;
            assert!(paid as f32 >= 0.97 * n as f32 + cap.clamp(START_CREDITS, BUCKET_BLOCKS) - 2.0);
            if n < 6000 {
                assert!(
                    spend_over(&mut fixed, n, 0.97) > n,
                    "a fixed bucket of BUCKET_BLOCKS runs over in {n} reads"
                );
            }
        }
        // It starts with `START_CREDITS` and never saves less, so a new engine can get ahead.
        let mut c = Credits::growing(BUCKET_BLOCKS);
        assert_eq!(spend_over(&mut c, 1, 0.0), 8);
        // Given-back credits do not count as reads.
        let mut c = Credits::growing(BUCKET_BLOCKS);
        for _ in 0..10_000 {
            c.earn(1.0);
        }
        assert_eq!(c.limit(), START_CREDITS);
    }
}
