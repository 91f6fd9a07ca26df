//! The client's bounded memory cache of blocks, weighed in bytes.
//!
//! Close-to-open consistency: every cached block carries the modification time of its inode as
//! the client saw it when the block was fetched (its *stamp*). A file opened later validates
//! its cached blocks against the mtime the meta group reports at that open; a block with
//! another stamp is treated as absent. So a file closed by another mount (which bumps mtime on
//! close) is never served from an older copy here, and nothing has to be swept on open.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use augur_proto::Ino;
use augur_proto::meta::Timestamp;
use quick_cache::Weighter;
use quick_cache::sync::Cache;

use crate::stats::PrefetchMark;

/// Bookkeeping weight of one entry on top of its bytes.
const ENTRY_OVERHEAD_BYTES: u64 = 96;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockKey {
    pub ino: Ino,
    pub index: u64,
}

/// One cached block. `data` may be shorter than the block size: the rest reads as zeros.
#[derive(Clone, Debug)]
pub struct CachedBlock {
    pub stamp: Timestamp,
    pub data: Arc<[u8]>,
    /// Set when a prefetch brought the block in: counts it as used, late or wasted once
    /// (`user.augur.prefetch_stats`). Shared by the cache's entry and every copy a read took:
    /// when the last goes (the entry left the cache: evicted, replaced or invalidated) and no
    /// read took it, the prefetch was wasted.
    pub prefetched: Option<Arc<PrefetchMark>>,
}

#[derive(Clone)]
struct BytesWeighter;

impl Weighter<BlockKey, CachedBlock> for BytesWeighter {
    fn weight(&self, _key: &BlockKey, val: &CachedBlock) -> u64 {
        val.data.len() as u64 + ENTRY_OVERHEAD_BYTES
    }
}

type Blocks = Cache<BlockKey, CachedBlock, BytesWeighter>;

pub struct BlockCache {
    cache: Option<Blocks>,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

impl BlockCache {
    /// A cache of at most `bytes_max` bytes (0 disables it); `block_bytes` sizes its index.
    pub fn new(bytes_max: u64, block_bytes: u64) -> Self {
        let cache = (bytes_max > 0).then(|| {
            let items = (bytes_max / block_bytes.max(1)).max(16) as usize;
            Cache::with_weighter(items, bytes_max, BytesWeighter)
        });
        Self { cache, hits: AtomicU64::new(0), misses: AtomicU64::new(0) }
    }

    /// The block if cached with this `stamp`.
    pub fn get(&self, key: BlockKey, stamp: Timestamp) -> Option<CachedBlock> {
        let found = self.cache.as_ref().and_then(|c| c.get(&key)).filter(|b| b.stamp == stamp);
        let counter = if found.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// True when the block is cached with this stamp (no hit/miss counted).
    pub fn contains(&self, key: BlockKey, stamp: Timestamp) -> bool {
        self.cache.as_ref().and_then(|c| c.peek(&key)).is_some_and(|b| b.stamp == stamp)
    }

    /// Caches `block` (with no cache, it is dropped at once: a prefetch of it was wasted).
    pub fn insert(&self, key: BlockKey, block: CachedBlock) {
        if let Some(c) = &self.cache {
            c.insert(key, block);
        }
    }

    pub fn remove(&self, key: BlockKey) {
        if let Some(c) = &self.cache {
            c.remove(&key);
        }
    }

    pub fn bytes(&self) -> u64 {
        self.cache.as_ref().map_or(0, |c| c.weight())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(stamp: i64, len: usize) -> CachedBlock {
        CachedBlock {
            stamp: Timestamp { secs: stamp, nanos: 0 },
            data: vec![7u8; len].into(),
            prefetched: None,
        }
    }

    #[test]
    fn a_block_with_another_stamp_is_a_miss() {
        let c = BlockCache::new(1 << 20, 4096);
        let k = BlockKey { ino: Ino(5), index: 3 };
        c.insert(k, block(1, 4096));
        assert!(c.get(k, Timestamp { secs: 1, nanos: 0 }).is_some());
        assert!(c.get(k, Timestamp { secs: 2, nanos: 0 }).is_none());
        c.remove(k);
        assert!(c.get(k, Timestamp { secs: 1, nanos: 0 }).is_none());
    }

    #[test]
    fn the_cache_stays_within_its_byte_budget() {
        let c = BlockCache::new(64 * 4096, 4096);
        for i in 0..1000 {
            c.insert(BlockKey { ino: Ino(1), index: i }, block(1, 4096));
        }
        assert!(c.bytes() <= 64 * 4096, "{} bytes", c.bytes());
    }

    #[test]
    fn a_prefetched_block_leaving_unread_is_wasted_and_a_read_one_is_not() {
        use crate::stats::{Counter, PrefetchMark, StatsPair};
        let pair = StatsPair { file: Arc::default(), total: Arc::default() };
        let c = BlockCache::new(16 * 4096, 4096);
        let prefetched =
            || CachedBlock { prefetched: Some(PrefetchMark::new(pair.clone())), ..block(1, 4096) };
        let key = |index| BlockKey { ino: Ino(1), index };
        // Read, then evicted: used. Invalidated unread, replaced unread: wasted.
        c.insert(key(0), prefetched());
        c.get(key(0), Timestamp { secs: 1, nanos: 0 }).unwrap().prefetched.unwrap().read(false);
        c.insert(key(1), prefetched());
        c.remove(key(1));
        c.insert(key(2), prefetched());
        c.insert(key(2), block(1, 4096));
        // Evicted unread: a cache of 16 blocks sees 1000 more go by.
        c.insert(key(3), prefetched());
        for i in 100..1100 {
            c.insert(key(i), block(1, 4096));
        }
        assert_eq!(pair.file.get(Counter::Used), 1);
        assert_eq!(pair.file.get(Counter::Wasted), 3);
        assert_eq!(pair.total.get(Counter::Wasted), 3);
    }

    #[test]
    fn a_zero_budget_disables_caching() {
        let c = BlockCache::new(0, 4096);
        let k = BlockKey { ino: Ino(1), index: 0 };
        c.insert(k, block(1, 10));
        assert!(c.get(k, Timestamp { secs: 1, nanos: 0 }).is_none());
    }
}
