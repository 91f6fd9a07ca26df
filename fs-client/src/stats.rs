//! Prefetch counters (SPEC §7 "Metrics"), per file and for the whole mount: a file's are read as
//! `user.augur.prefetch_stats` on the file, the mount's on its root directory.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Which counter. Blocks unless named `…Bytes`.
#[derive(Clone, Copy, Debug)]
pub enum Counter {
    /// Prefetch fetches started.
    Issued,
    /// Prefetched blocks read before they were evicted (late ones included).
    Used,
    /// Prefetched blocks whose read came while they were still being fetched.
    Late,
    /// Prefetched blocks evicted or invalidated unread.
    Wasted,
    /// Named blocks that waited for a fetch slot and went stale first (never fetched).
    Stale,
    /// Blocks the prefetch engine named and paid for that were not fetched for it (dropped from
    /// the queue, fetched by a read meanwhile, or of a file whose hint is not `auto`): their
    /// share of its byte budget went back to it (`Predictor::not_fetched`).
    Returned,
    /// Blocks reads fetched themselves (not cached, no prefetch under way).
    DemandMisses,
    /// The file bytes prefetched blocks cover.
    PrefetchedBytes,
    /// Bytes applications read.
    DemandBytes,
}

const COUNTERS: usize = Counter::DemandBytes as usize + 1;

/// Counters of one file or of the mount, indexed by `Counter`.
#[derive(Default, Debug)]
pub struct PrefetchStats([AtomicU64; COUNTERS]);

impl PrefetchStats {
    fn counter(&self, c: Counter) -> &AtomicU64 {
        &self.0[c as usize]
    }

    pub fn add(&self, c: Counter, n: u64) {
        self.counter(c).fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self, c: Counter) -> u64 {
        self.counter(c).load(Ordering::Relaxed)
    }

    /// used / issued.
    pub fn accuracy(&self) -> f64 {
        ratio(self.get(Counter::Used), self.get(Counter::Issued))
    }

    /// used / (used + demand misses).
    pub fn coverage(&self) -> f64 {
        let used = self.get(Counter::Used);
        ratio(used, used + self.get(Counter::DemandMisses))
    }

    /// prefetched bytes / bytes read.
    pub fn over_fetch(&self) -> f64 {
        ratio(self.get(Counter::PrefetchedBytes), self.get(Counter::DemandBytes))
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// A file's counters and the mount's, bumped together.
#[derive(Clone, Debug)]
pub struct StatsPair {
    pub file: Arc<PrefetchStats>,
    pub total: Arc<PrefetchStats>,
}

impl StatsPair {
    pub fn add(&self, c: Counter, n: u64) {
        self.file.add(c, n);
        self.total.add(c, n);
    }
}

/// Carried by a cached block that a prefetch brought in: the first read counts it used (and
/// late if it waited); if no read took it before the block left the cache (evicted, replaced,
/// invalidated; the mark's last `Arc` dropped), it counts wasted.
#[derive(Debug)]
pub struct PrefetchMark {
    unread: AtomicBool,
    stats: StatsPair,
}

impl PrefetchMark {
    pub fn new(stats: StatsPair) -> Arc<Self> {
        Arc::new(Self { unread: AtomicBool::new(true), stats })
    }

    /// The block was read: used (and late, if its read waited for the fetch).
    pub fn read(&self, late: bool) {
        if self.unread.swap(false, Ordering::Relaxed) {
            self.stats.add(Counter::Used, 1);
            if late {
                self.stats.add(Counter::Late, 1);
            }
        }
    }
}

/// The block left the cache (and every read's copy of it is gone): wasted if none read it.
impl Drop for PrefetchMark {
    fn drop(&mut self) {
        if *self.unread.get_mut() {
            self.stats.add(Counter::Wasted, 1);
        }
    }
}

/// The counters as `user.augur.prefetch_stats` shows them, with the ratios of SPEC §7.
impl fmt::Display for PrefetchStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Counter::*;
        let [issued, used, late, wasted, stale, returned, misses, pbytes, dbytes] =
            [Issued, Used, Late, Wasted, Stale, Returned, DemandMisses, PrefetchedBytes, DemandBytes]
                .map(|c| self.get(c));
        writeln!(
            f,
            "issued={issued} used={used} late={late} wasted={wasted} unread={} stale={stale} \
             returned={returned} demand_misses={misses} prefetched_bytes={pbytes} demand_bytes={dbytes} \
             accuracy={:.3} coverage={:.3} over_fetch={:.3}",
            issued.saturating_sub(used + wasted),
            self.accuracy(),
            self.coverage(),
            self.over_fetch(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_counts_its_block_once_as_used_or_wasted() {
        let pair = StatsPair { file: Arc::default(), total: Arc::default() };
        let (a, b) = (PrefetchMark::new(pair.clone()), PrefetchMark::new(pair.clone()));
        a.read(true);
        a.read(false);
        drop(a);
        drop(b);
        for s in [&pair.file, &pair.total] {
            assert_eq!((s.get(Counter::Used), s.get(Counter::Late), s.get(Counter::Wasted)), (1, 1, 1));
        }
        pair.add(Counter::Issued, 4);
        pair.add(Counter::DemandMisses, 2);
        pair.add(Counter::PrefetchedBytes, 100);
        pair.add(Counter::DemandBytes, 400);
        assert_eq!(
            pair.file.to_string(),
            "issued=4 used=1 late=1 wasted=1 unread=2 stale=0 returned=0 demand_misses=2 prefetched_bytes=100 \
             demand_bytes=400 accuracy=0.250 coverage=0.333 over_fetch=0.250\n"
        );
    }
}
