//! The simulated LRU block cache over (stream, block): the replay's cache (`replay`) and each
//! candidate's ghost cache in `auto` (`select::Ghost`).

use std::collections::VecDeque;

use foldhash::HashMap;

/// (stream, block).
pub(crate) type Key = (u64, u64);

/// A cached block.
#[derive(Debug)]
pub(crate) struct Entry {
    seq: u64,
    /// Brought in by a prefetch and not read yet.
    pub(crate) prefetched_unused: bool,
    /// When its data is there (a demand miss in progress until then).
    pub(crate) ready_at: u64,
}

/// LRU over (stream, block). Ages live in a queue, oldest first; a touch pushes a new age
/// and leaves the old one stale (an age that is not its key's current one), skipped when it
/// comes up for eviction. Stale ages are dropped when the queue holds more than twice the
/// capacity (+ 64): O(1) amortized per touch, which `select::Ghost` pays on every read for
/// each of `auto`'s candidates.
#[derive(Debug)]
pub(crate) struct Lru {
    cap: usize,
    next_seq: u64,
    pub(crate) map: HashMap<Key, Entry>,
    pub(crate) order: VecDeque<(Key, u64)>,
}

impl Lru {
    pub(crate) fn new(cap: usize) -> Self {
        Self { cap: cap.max(1), next_seq: 0, map: HashMap::default(), order: VecDeque::new() }
    }

    /// A new age for `k`, queued at the MRU end.
    fn stamp(&mut self, k: Key) -> u64 {
        self.next_seq += 1;
        let seq = self.next_seq;
        self.order.push_back((k, seq));
        if self.order.len() > 2 * self.cap + 64 {
            let map = &self.map;
            self.order.retain(|&(k, s)| s == seq || map.get(&k).is_some_and(|e| e.seq == s));
        }
        seq
    }

    /// Moves `k` to the MRU end, if cached.
    pub(crate) fn touch(&mut self, k: Key) -> Option<&mut Entry> {
        if !self.map.contains_key(&k) {
            return None;
        }
        let seq = self.stamp(k);
        let e = self.map.get_mut(&k)?;
        e.seq = seq;
        Some(e)
    }

    /// Inserts at the MRU end; returns whether an unused prefetched block was evicted.
    pub(crate) fn insert(&mut self, k: Key, prefetched_unused: bool, ready_at: u64) -> bool {
        if self.touch(k).is_some() {
            return false;
        }
        let mut wasted = false;
        while self.map.len() >= self.cap {
            let Some((victim, s)) = self.order.pop_front() else { break };
            if self.map.get(&victim).is_some_and(|e| e.seq == s) {
                wasted = self.map.remove(&victim).is_some_and(|v| v.prefetched_unused);
            }
        }
        let seq = self.stamp(k);
        self.map.insert(k, Entry { seq, prefetched_unused, ready_at });
        wasted
    }
}
