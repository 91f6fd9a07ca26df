//! The node's bounded memory cache of hot and warmed blocks, weighed in bytes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use augur_proto::{BlockId, Ino, ShardId, VolumeId};
use quick_cache::Weighter;
use quick_cache::sync::Cache;

/// Entries are whole blocks; this is the weight of the bookkeeping around each.
const ENTRY_OVERHEAD_BYTES: u64 = 64;
/// Stripes of invalidation generations (see [`BlockCache::generation`]).
const GENERATION_STRIPES: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub volume: VolumeId,
    pub shard: ShardId,
    pub block: BlockId,
}

/// A block's verified content and its CRC, shared with readers without copying.
#[derive(Clone, Debug)]
pub struct CachedBlock {
    pub data: Arc<[u8]>,
    pub crc32: u32,
}

#[derive(Clone)]
struct BytesWeighter;

impl Weighter<CacheKey, CachedBlock> for BytesWeighter {
    fn weight(&self, _key: &CacheKey, val: &CachedBlock) -> u64 {
        val.data.len() as u64 + ENTRY_OVERHEAD_BYTES
    }
}

/// A bounded cache that a load from disk can fill without racing a write: every removal bumps
/// its key's stripe generation, and a block read from disk is kept only if no removal of its
/// stripe happened since before the read ([`BlockCache::generation`], [`BlockCache::insert_loaded`]).
/// Otherwise a reader that read the old bytes, then lost the CPU while a write replaced them on
/// disk and dropped the cached copy, could cache the old bytes after the write was acked.
pub struct BlockCache {
    cache: Cache<CacheKey, CachedBlock, BytesWeighter>,
    generations: Vec<AtomicU64>,
    bytes_max: u64,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl BlockCache {
    /// A cache holding at most `bytes_max` bytes; `typical_block_bytes` sizes its index.
    pub fn new(bytes_max: u64, typical_block_bytes: u64) -> Self {
        let items = (bytes_max / typical_block_bytes.max(1)).max(16) as usize;
        Self {
            cache: Cache::with_weighter(items, bytes_max.max(1), BytesWeighter),
            generations: (0..GENERATION_STRIPES).map(|_| AtomicU64::new(0)).collect(),
            bytes_max,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    pub fn get(&self, key: &CacheKey) -> Option<CachedBlock> {
        let found = if self.bytes_max == 0 { None } else { self.cache.get(key) };
        let counter = if found.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    fn stripe(&self, key: &CacheKey) -> &AtomicU64 {
        let mut h = std::hash::DefaultHasher::new();
        std::hash::Hash::hash(key, &mut h);
        &self.generations[std::hash::Hasher::finish(&h) as usize % GENERATION_STRIPES]
    }

    /// The invalidation generation of `key`'s stripe: read it before reading the block from
    /// disk, and hand it to [`Self::insert_loaded`].
    pub fn generation(&self, key: &CacheKey) -> u64 {
        self.stripe(key).load(Ordering::SeqCst)
    }

    /// Caches a block read from disk, unless a removal of its stripe happened since
    /// `generation` was read (the bytes may be older than a write that followed): then the
    /// block is not kept. The insert comes first and the check after, so a removal between
    /// the two is seen by the check, and one after the insert removes the entry itself.
    pub fn insert_loaded(&self, key: CacheKey, block: CachedBlock, generation: u64) {
        if self.bytes_max == 0 || self.generation(&key) != generation {
            return;
        }
        self.cache.insert(key, block);
        if self.generation(&key) != generation {
            self.cache.remove(&key);
        }
    }

    /// Drops `key`'s cached copy; a load that started before this does not cache its bytes.
    pub fn remove(&self, key: &CacheKey) {
        self.stripe(key).fetch_add(1, Ordering::SeqCst);
        self.cache.remove(key);
    }

    /// Drops every cached block of `ino` in `shard` with index >= `from_index` (and keeps
    /// loads under way anywhere from caching theirs).
    pub fn remove_from(&self, volume: VolumeId, shard: ShardId, ino: Ino, from_index: u64) {
        for g in &self.generations {
            g.fetch_add(1, Ordering::SeqCst);
        }
        self.cache.retain(|k, _| {
            !(k.volume == volume && k.shard == shard && k.block.ino == ino && k.block.index >= from_index)
        });
    }

    pub fn bytes(&self) -> u64 {
        self.cache.weight()
    }

    pub fn bytes_max(&self) -> u64 {
        self.bytes_max
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_within_its_byte_bound() {
        let cache = BlockCache::new(1 << 20, 65536);
        for i in 0..100 {
            let key = CacheKey { volume: VolumeId(1), shard: ShardId(0), block: BlockId::new(Ino(1), i) };
            cache.insert_loaded(
                key,
                CachedBlock { data: vec![0u8; 65536].into(), crc32: 0 },
                cache.generation(&key),
            );
        }
        assert!(cache.bytes() <= 1 << 20, "{} bytes cached", cache.bytes());
        cache.remove_from(VolumeId(1), ShardId(0), Ino(1), 0);
        assert_eq!(cache.bytes(), 0);
    }

    #[test]
    fn a_load_that_raced_a_removal_is_not_cached() {
        let cache = BlockCache::new(1 << 20, 65536);
        let key = CacheKey { volume: VolumeId(1), shard: ShardId(0), block: BlockId::new(Ino(1), 3) };
        let old = CachedBlock { data: vec![1u8; 16].into(), crc32: 0 };
        // A reader notes the generation and reads the old bytes from disk; a write replaces
        // them and drops the cached copy; the reader then tries to cache what it read.
        let before = cache.generation(&key);
        cache.remove(&key);
        cache.insert_loaded(key, old.clone(), before);
        assert!(cache.get(&key).is_none(), "old bytes cached after a write");
        // Same for a truncate's range removal.
        let before = cache.generation(&key);
        cache.remove_from(VolumeId(1), ShardId(0), Ino(1), 0);
        cache.insert_loaded(key, old.clone(), before);
        assert!(cache.get(&key).is_none(), "old bytes cached after a truncate");
        // With no removal in between, the load is cached.
        cache.insert_loaded(key, old, cache.generation(&key));
        assert!(cache.get(&key).is_some());
    }
}
