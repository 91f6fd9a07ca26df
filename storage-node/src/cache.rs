//! The node's bounded memory cache of hot and warmed blocks, weighed in bytes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use augur_proto::{BlockId, Ino, ShardId, VolumeId};
use quick_cache::Weighter;
use quick_cache::sync::Cache;

/// Entries are whole blocks; this is the weight of the bookkeeping around each.
const ENTRY_OVERHEAD_BYTES: u64 = 64;

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

pub struct BlockCache {
    cache: Cache<CacheKey, CachedBlock, BytesWeighter>,
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

    pub fn insert(&self, key: CacheKey, block: CachedBlock) {
        if self.bytes_max > 0 {
            self.cache.insert(key, block);
        }
    }

    pub fn remove(&self, key: &CacheKey) {
        self.cache.remove(key);
    }

    /// Drops every cached block of `ino` in `shard` with index >= `from_index`.
    pub fn remove_from(&self, volume: VolumeId, shard: ShardId, ino: Ino, from_index: u64) {
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
            cache.insert(key, CachedBlock { data: vec![0u8; 65536].into(), crc32: 0 });
        }
        assert!(cache.bytes() <= 1 << 20, "{} bytes cached", cache.bytes());
        cache.remove_from(VolumeId(1), ShardId(0), Ino(1), 0);
        assert_eq!(cache.bytes(), 0);
    }
}
