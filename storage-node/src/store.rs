//! The RocksDB block store.
//!
//! Column families:
//! - `blocks`: block bytes, in blob files when large. Key = `volume u64 BE | shard u32 BE |
//!   ino u64 BE | index u64 BE`, so one shard's blocks are one contiguous key range (cheap
//!   migration and deletion) and one inode's blocks inside a shard are contiguous too (cheap
//!   truncate). Value = `format u8 | crc32 u32 LE | bytes`.
//! - `placement`: volume layouts and shard placements set by the meta group (or an admin).
//! - `node`: this node's identity and the on-disk format version.
//! - `index`: the key of every stored block, with no value, written and deleted in the same
//!   batches as `blocks`. The scrub walks it: a RocksDB iterator over `blocks` itself stops at
//!   the first value it cannot read (a damaged blob) without naming its key, while one over
//!   `index` never reads a value, so each block is then read, and judged, on its own.
//!
//! Durability: every write is a RocksDB write with `sync = true`, so the WAL is fsynced before
//! the write returns and before the RPC is acked. Concurrent writers are group-committed by
//! RocksDB's write thread (one fsync covers every writer that joined the group).
//!
//! A full disk: RocksDB refuses the write that finds no space and then stops writing for good
//! (a background error it keeps until the database is reopened, which its C API offers no other
//! way out of). The store notes it (`is_stopped`), and `reopen` closes and opens the database
//! again once the node has seen space come back; reads go on meanwhile.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard};

use augur_proto::msg::{ShardPlacement, VolumeLayout};
use augur_proto::{BlockId, Ino, NodeId, ShardId, VolumeId};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, DBCompressionType, Options, WriteBatch,
    WriteOptions,
};

pub const BLOCKS_CF: &str = "blocks";
pub const PLACEMENT_CF: &str = "placement";
pub const NODE_CF: &str = "node";
pub const INDEX_CF: &str = "index";
/// Every column family, for tools that open a store's RocksDB directly.
pub const ALL_CFS: [&str; 4] = [BLOCKS_CF, PLACEMENT_CF, NODE_CF, INDEX_CF];

/// On-disk format of this store. A store written by another format is refused, not guessed at.
pub const STORE_FORMAT: u32 = 1;
/// Format byte at the head of every stored block value.
const VALUE_FORMAT: u8 = 1;
const VALUE_HEADER_BYTES: usize = 5;
pub const BLOCK_KEY_BYTES: usize = 28;
/// Per-block write locks are striped over this many mutexes (bounded memory, rare collisions).
const BLOCK_LOCK_STRIPES: usize = 1024;

const KEY_FORMAT: &[u8] = b"format";
const KEY_NODE_ID: &[u8] = b"node-id";
/// Present once `index` holds the key of every block (built at the first open of a store
/// written before it existed).
const KEY_INDEX_BUILT: &[u8] = b"index-built";
/// The scrub's place in the current pass.
const KEY_SCRUB_CURSOR: &[u8] = b"scrub-cursor";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error(
        "checksum mismatch in stored block {volume}/{shard}/{block}: stored {stored:08x}, computed {computed:08x}"
    )]
    Checksum { volume: VolumeId, shard: ShardId, block: BlockId, stored: u32, computed: u32 },
    #[error("stored value of block {volume}/{shard}/{block} is malformed: {reason}")]
    Corrupt { volume: VolumeId, shard: ShardId, block: BlockId, reason: String },
    #[error("rocksdb detected corruption: {0}")]
    Corruption(String),
    #[error("no space left on the data directory's file system")]
    NoSpace,
    #[error("{0}")]
    InvalidArgument(String),
    #[error("data directory: {0}")]
    Format(String),
}

impl StoreError {
    /// Whether the error means a stored copy is damaged: a sound copy from another replica heals it.
    pub fn is_damage(&self) -> bool {
        matches!(self, StoreError::Checksum { .. } | StoreError::Corrupt { .. } | StoreError::Corruption(_))
    }

    fn from_rocks(e: rocksdb::Error) -> Self {
        // RocksDB reports ENOSPC as an IOError whose message carries the OS text.
        if e.kind() == rocksdb::ErrorKind::IOError && e.to_string().contains("No space left") {
            StoreError::NoSpace
        } else if e.kind() == rocksdb::ErrorKind::Corruption {
            StoreError::Corruption(e.to_string())
        } else {
            StoreError::Rocks(e)
        }
    }
}

/// Tuning of the store, from the node config.
#[derive(Clone, Copy, Debug)]
pub struct StoreOptions {
    /// RocksDB's own block cache for SST index/data blocks.
    pub rocksdb_cache_bytes: u64,
    /// Values at least this large are kept in blob files rather than in SSTs.
    pub blob_min_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self { rocksdb_cache_bytes: 64 << 20, blob_min_bytes: 4096 }
    }
}

/// The key of a block. Public so fault tests can find and damage a stored value.
pub fn block_key(volume: VolumeId, shard: ShardId, block: BlockId) -> [u8; BLOCK_KEY_BYTES] {
    let mut key = [0u8; BLOCK_KEY_BYTES];
    key[0..8].copy_from_slice(&volume.0.to_be_bytes());
    key[8..12].copy_from_slice(&shard.0.to_be_bytes());
    key[12..20].copy_from_slice(&block.ino.0.to_be_bytes());
    key[20..28].copy_from_slice(&block.index.to_be_bytes());
    key
}

fn encode_value(data: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(VALUE_HEADER_BYTES + data.len());
    value.push(VALUE_FORMAT);
    value.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    value.extend_from_slice(data);
    value
}

/// One step of a scrub (`BlockStore::scrub`).
#[derive(Debug, Default)]
pub struct ScrubStep {
    /// Blocks whose stored copy is damaged.
    pub damaged: Vec<(VolumeId, ShardId, BlockId)>,
    /// Where the next step starts after; `None` once the pass has read every block.
    pub next: Option<[u8; BLOCK_KEY_BYTES]>,
    /// Bytes read and checked.
    pub bytes: u64,
    /// Blocks visited.
    pub visited: usize,
    /// Blocks that could not be read for a reason other than damage (logged).
    pub unreadable: u64,
}

impl BlockStore {
    /// Where the scrub goes on after a restart (`None`: from the start).
    pub fn scrub_cursor(&self) -> Result<Option<[u8; BLOCK_KEY_BYTES]>, StoreError> {
        let db = self.db()?;
        Ok(db
            .get_cf(db.node_cf(), KEY_SCRUB_CURSOR)?
            .and_then(|v| <[u8; BLOCK_KEY_BYTES]>::try_from(&v[..]).ok()))
    }

    /// Keeps the scrub's place (not synced: a crash loses at most the last steps, done again).
    pub fn save_scrub_cursor(&self, cursor: Option<[u8; BLOCK_KEY_BYTES]>) -> Result<(), StoreError> {
        let db = self.db()?;
        let result = match cursor {
            Some(key) => db.put_cf(db.node_cf(), KEY_SCRUB_CURSOR, key),
            None => db.delete_cf(db.node_cf(), KEY_SCRUB_CURSOR),
        };
        self.written(result)
    }
}

/// `block_key` read back.
fn decode_block_key(key: &[u8; BLOCK_KEY_BYTES]) -> (VolumeId, ShardId, BlockId) {
    let u64_at = |i: usize| u64::from_be_bytes(key[i..i + 8].try_into().expect("8 bytes"));
    let shard = u32::from_be_bytes(key[8..12].try_into().expect("4 bytes"));
    (VolumeId(u64_at(0)), ShardId(shard), BlockId::new(Ino(u64_at(12)), u64_at(20)))
}

/// Fills `index` from `blocks` once, for a store written before `index` existed. A value
/// RocksDB cannot read stops its iterator: the blocks past it are left out of the index (the
/// scrub misses them; reads still check them), and it is logged.
fn build_index(db: &DB) -> Result<(), StoreError> {
    let node = db.cf_handle(NODE_CF).expect("node column family opened above");
    if db.get_cf(node, KEY_INDEX_BUILT)?.is_some() {
        return Ok(());
    }
    let blocks = db.cf_handle(BLOCKS_CF).expect("blocks column family opened above");
    let index = db.cf_handle(INDEX_CF).expect("index column family opened above");
    let mut batch = WriteBatch::default();
    let mut indexed = 0u64;
    for item in db.iterator_cf(blocks, rocksdb::IteratorMode::Start) {
        match item {
            Ok((key, _)) => {
                batch.put_cf(index, &key, []);
                indexed += 1;
            }
            Err(e) => {
                tracing::error!(error = %e, indexed, "building the scrub index stopped at a value RocksDB cannot read; blocks past it are not scrubbed");
                break;
            }
        }
        if batch.len() >= 4096 {
            db.write_opt(std::mem::take(&mut batch), &sync_write())?;
        }
    }
    batch.put_cf(node, KEY_INDEX_BUILT, []);
    db.write_opt(batch, &sync_write())?;
    Ok(())
}

/// Volume layouts and shard placements as saved in the `placement` column family.
pub type SavedPlacement = (Vec<VolumeLayout>, Vec<(VolumeId, ShardPlacement)>);

/// A block read from disk whose checksum matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedBlock {
    pub data: Vec<u8>,
    pub crc32: u32,
}

pub struct BlockStore {
    /// `None` only after a `reopen` failed to open it again; every call then says "no space".
    db: RwLock<Option<DB>>,
    dir: PathBuf,
    options: StoreOptions,
    locks: Vec<Mutex<()>>,
    node_id: NodeId,
    /// RocksDB refused a write for want of space, and so stopped writing until reopened.
    stopped: AtomicBool,
    /// What `usage` last measured.
    last_usage: Mutex<(u64, u64)>,
}

/// The open database, read-locked for one call.
struct Db<'a>(RwLockReadGuard<'a, Option<DB>>);

impl std::ops::Deref for Db<'_> {
    type Target = DB;

    fn deref(&self) -> &DB {
        self.0.as_ref().expect("checked by BlockStore::db")
    }
}

impl Db<'_> {
    fn blocks_cf(&self) -> &rocksdb::ColumnFamily {
        self.cf_handle(BLOCKS_CF).expect("blocks column family opened at start")
    }

    fn index_cf(&self) -> &rocksdb::ColumnFamily {
        self.cf_handle(INDEX_CF).expect("index column family opened at start")
    }

    fn node_cf(&self) -> &rocksdb::ColumnFamily {
        self.cf_handle(NODE_CF).expect("node column family opened at start")
    }

    fn placement_cf(&self) -> &rocksdb::ColumnFamily {
        self.cf_handle(PLACEMENT_CF).expect("placement column family opened at start")
    }
}

impl BlockStore {
    /// Opens (creating if needed) the store in `dir`. `node_id` is used on first creation; later
    /// opens keep the id stored there.
    pub fn open(dir: &Path, options: StoreOptions, node_id: Option<NodeId>) -> Result<Self, StoreError> {
        let db = open_db(dir, options)?;
        let node_id = Self::init_identity(&db, node_id)?;
        build_index(&db)?;
        let locks = (0..BLOCK_LOCK_STRIPES).map(|_| Mutex::new(())).collect();
        Ok(Self {
            db: RwLock::new(Some(db)),
            dir: dir.to_path_buf(),
            options,
            locks,
            node_id,
            stopped: AtomicBool::new(false),
            last_usage: Mutex::new((0, 0)),
        })
    }

    /// Whether RocksDB stopped writing for want of space (see the module docs).
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Closes the database and opens it again, which clears RocksDB's stop after a full disk.
    /// Waits for calls in progress. If opening fails, every call says "no space" until a later
    /// `reopen` succeeds.
    pub fn reopen(&self) -> Result<(), StoreError> {
        let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
        drop(db.take());
        *db = Some(open_db(&self.dir, self.options)?);
        self.stopped.store(false, Ordering::Release);
        Ok(())
    }

    fn db(&self) -> Result<Db<'_>, StoreError> {
        let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            return Err(StoreError::NoSpace);
        }
        Ok(Db(guard))
    }

    /// Maps a RocksDB write's error, noting a refusal for want of space (RocksDB has stopped).
    fn written<T>(&self, result: Result<T, rocksdb::Error>) -> Result<T, StoreError> {
        result.map_err(|e| {
            let e = StoreError::from_rocks(e);
            if matches!(e, StoreError::NoSpace) && !self.stopped.swap(true, Ordering::AcqRel) {
                tracing::error!(dir = %self.dir.display(), "the disk is full: RocksDB stopped writing; writes are refused until it has room again");
            }
            e
        })
    }

    fn init_identity(db: &DB, wanted: Option<NodeId>) -> Result<NodeId, StoreError> {
        let cf = db.cf_handle(NODE_CF).expect("node column family opened above");
        match db.get_cf(cf, KEY_FORMAT)? {
            Some(v) => {
                let format = <[u8; 4]>::try_from(v.as_slice())
                    .map(u32::from_le_bytes)
                    .map_err(|_| StoreError::Format("unreadable format marker".into()))?;
                if format != STORE_FORMAT {
                    return Err(StoreError::Format(format!(
                        "store format {format}, this build reads format {STORE_FORMAT}"
                    )));
                }
            }
            None => {
                let mut batch = WriteBatch::default();
                batch.put_cf(cf, KEY_FORMAT, STORE_FORMAT.to_le_bytes());
                let id = wanted.unwrap_or_else(|| NodeId(random_u64()));
                batch.put_cf(cf, KEY_NODE_ID, id.0.to_le_bytes());
                db.write_opt(batch, &sync_write())?;
            }
        }
        let stored = db
            .get_cf(cf, KEY_NODE_ID)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(|b| NodeId(u64::from_le_bytes(b)))
            .ok_or_else(|| StoreError::Format("missing node id".into()))?;
        if let Some(wanted) = wanted.filter(|w| *w != stored) {
            return Err(StoreError::Format(format!("this data directory belongs to {stored}, not {wanted}")));
        }
        Ok(stored)
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    fn lock(&self, key: &[u8; BLOCK_KEY_BYTES]) -> MutexGuard<'_, ()> {
        let stripe = (crc32fast::hash(key) as usize) % self.locks.len();
        self.locks[stripe].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads a block and verifies its checksum. `None` when the block was never written.
    pub fn read(
        &self,
        volume: VolumeId,
        shard: ShardId,
        block: BlockId,
    ) -> Result<Option<VerifiedBlock>, StoreError> {
        let key = block_key(volume, shard, block);
        let db = self.db()?;
        let Some(value) = db.get_pinned_cf(db.blocks_cf(), key).map_err(StoreError::from_rocks)? else {
            return Ok(None);
        };
        let corrupt = |reason: &str| StoreError::Corrupt { volume, shard, block, reason: reason.into() };
        if value.len() < VALUE_HEADER_BYTES {
            return Err(corrupt("shorter than its header"));
        }
        if value[0] != VALUE_FORMAT {
            return Err(corrupt("unknown value format"));
        }
        let stored = u32::from_le_bytes([value[1], value[2], value[3], value[4]]);
        let data = &value[VALUE_HEADER_BYTES..];
        let computed = crc32fast::hash(data);
        if stored != computed {
            return Err(StoreError::Checksum { volume, shard, block, stored, computed });
        }
        Ok(Some(VerifiedBlock { data: data.to_vec(), crc32: stored }))
    }

    /// Writes `data` at `offset` inside a block of `block_size` bytes, durably. A write that does
    /// not cover the whole block reads the stored block first (read-modify-write) under the
    /// block's lock. Returns the block's new content.
    pub fn write(
        &self,
        volume: VolumeId,
        shard: ShardId,
        block: BlockId,
        offset: u32,
        data: &[u8],
        block_size: u32,
    ) -> Result<Vec<u8>, StoreError> {
        let end = u64::from(offset) + data.len() as u64;
        if end > u64::from(block_size) {
            return Err(StoreError::InvalidArgument(format!(
                "write of {} bytes at offset {offset} overruns the {block_size}-byte block",
                data.len()
            )));
        }
        let key = block_key(volume, shard, block);
        let _guard = self.lock(&key);
        let content = if offset == 0 && data.len() == block_size as usize {
            data.to_vec()
        } else {
            let mut content = self.read(volume, shard, block)?.map(|b| b.data).unwrap_or_default();
            let end = end as usize;
            if content.len() < end {
                content.resize(end, 0);
            }
            content[offset as usize..end].copy_from_slice(data);
            content
        };
        let value = encode_value(&content);
        // Paired with the check in `read`: what goes to disk is verified right before it goes.
        debug_assert_eq!(crc32fast::hash(&value[VALUE_HEADER_BYTES..]).to_le_bytes(), value[1..5]);
        self.store_value(&key, value)?;
        Ok(content)
    }

    /// Replaces a whole block with `content`, durably (a backup storing what its primary holds).
    pub fn put(
        &self,
        volume: VolumeId,
        shard: ShardId,
        block: BlockId,
        content: &[u8],
    ) -> Result<(), StoreError> {
        let key = block_key(volume, shard, block);
        let _guard = self.lock(&key);
        self.put_locked(&key, content)
    }

    /// Replaces a block with `content` (a sound copy from another replica) only if the stored
    /// copy is damaged, checked under the block's lock: a write that landed since the damage was
    /// found is never undone, and a block deleted since is not brought back. Returns whether it
    /// replaced the stored copy.
    pub fn repair(
        &self,
        volume: VolumeId,
        shard: ShardId,
        block: BlockId,
        content: &[u8],
    ) -> Result<bool, StoreError> {
        let key = block_key(volume, shard, block);
        let _guard = self.lock(&key);
        match self.read(volume, shard, block) {
            Err(e) if e.is_damage() => self.put_locked(&key, content).map(|()| true),
            Err(e) => Err(e),
            Ok(_) => Ok(false),
        }
    }

    /// Stores a block's whole value; the caller holds the block's lock.
    fn put_locked(&self, key: &[u8; BLOCK_KEY_BYTES], content: &[u8]) -> Result<(), StoreError> {
        self.store_value(key, encode_value(content))
    }

    /// Writes a block's encoded value and its `index` entry in one durable batch.
    fn store_value(&self, key: &[u8; BLOCK_KEY_BYTES], value: Vec<u8>) -> Result<(), StoreError> {
        let db = self.db()?;
        let mut batch = WriteBatch::default();
        batch.put_cf(db.blocks_cf(), key, value);
        batch.put_cf(db.index_cf(), key, []);
        self.written(db.write_opt(batch, &sync_write()))
    }

    /// Reads, and so checks, up to `max` stored blocks in key order after `after` (from the
    /// start when `None`), walking `index`. Returns the damaged ones, the key to go on after
    /// (`None`: the pass is done) and how many bytes were read.
    pub fn scrub(&self, after: Option<[u8; BLOCK_KEY_BYTES]>, max: usize) -> Result<ScrubStep, StoreError> {
        let keys: Vec<[u8; BLOCK_KEY_BYTES]> = {
            let db = self.db()?;
            let from = after.map(|k| k.to_vec()).unwrap_or_default();
            let mode = rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward);
            let mut keys = Vec::with_capacity(max);
            for item in db.iterator_cf(db.index_cf(), mode) {
                let (key, _) = item.map_err(StoreError::from_rocks)?;
                let Ok(key) = <[u8; BLOCK_KEY_BYTES]>::try_from(&key[..]) else { continue };
                if Some(key) == after {
                    continue;
                }
                keys.push(key);
                if keys.len() == max {
                    break;
                }
            }
            keys
        };
        let mut step = ScrubStep { visited: keys.len(), ..ScrubStep::default() };
        for key in &keys {
            let (volume, shard, block) = decode_block_key(key);
            match self.read(volume, shard, block) {
                Ok(found) => step.bytes += found.map_or(0, |b| b.data.len() as u64),
                Err(e) if e.is_damage() => step.damaged.push((volume, shard, block)),
                // One block that cannot be read for another reason does not stop the pass.
                Err(e) => {
                    tracing::warn!(%volume, %shard, %block, error = %e, "scrub could not read a block");
                    step.unreadable += 1;
                }
            }
        }
        if keys.len() == max {
            step.next = keys.last().copied();
        }
        Ok(step)
    }

    /// Deletes, durably, the blocks of `ino` in this shard whose index is at least `from_index`.
    pub fn delete_from(
        &self,
        volume: VolumeId,
        shard: ShardId,
        ino: Ino,
        from_index: u64,
    ) -> Result<(), StoreError> {
        let start = block_key(volume, shard, BlockId::new(ino, from_index));
        let mut end = block_key(volume, shard, BlockId::new(ino, u64::MAX)).to_vec();
        // delete_range's end is exclusive: extend past index u64::MAX.
        end.push(0);
        let db = self.db()?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(db.blocks_cf(), &start[..], &end[..]);
        batch.delete_range_cf(db.index_cf(), &start[..], &end[..]);
        self.written(db.write_opt(batch, &sync_write()))
    }

    /// Saves a volume layout and shard placements atomically.
    pub fn save_placement(&self, layout: &VolumeLayout, shards: &[ShardPlacement]) -> Result<(), StoreError> {
        let db = self.db()?;
        let cf = db.placement_cf();
        let mut batch = WriteBatch::default();
        batch.put_cf(cf, layout_key(layout.volume), encode(layout));
        for shard in shards {
            batch.put_cf(cf, shard_key(layout.volume, shard.shard), encode(shard));
        }
        self.written(db.write_opt(batch, &sync_write()))
    }

    /// Replaces every saved layout and placement at once (the meta group's full assignment).
    pub fn replace_placement(
        &self,
        assignments: &[(VolumeLayout, Vec<ShardPlacement>)],
    ) -> Result<(), StoreError> {
        let db = self.db()?;
        let cf = db.placement_cf();
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf, &[0u8][..], &[0xffu8; 16][..]);
        for (layout, shards) in assignments {
            batch.put_cf(cf, layout_key(layout.volume), encode(layout));
            for shard in shards {
                batch.put_cf(cf, shard_key(layout.volume, shard.shard), encode(shard));
            }
        }
        self.written(db.write_opt(batch, &sync_write()))
    }

    /// Loads every saved layout and placement.
    pub fn load_placement(&self) -> Result<SavedPlacement, StoreError> {
        let db = self.db()?;
        let cf = db.placement_cf();
        let mut layouts = Vec::new();
        let mut shards = Vec::new();
        for item in db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
            let (key, value) = item?;
            let bad = || StoreError::Format(format!("unreadable placement record {key:02x?}"));
            match key.first() {
                Some(b'L') => layouts.push(postcard::from_bytes(&value).map_err(|_| bad())?),
                Some(b'S') if key.len() == 13 => {
                    let volume = VolumeId(u64::from_be_bytes(key[1..9].try_into().map_err(|_| bad())?));
                    shards.push((volume, postcard::from_bytes(&value).map_err(|_| bad())?));
                }
                _ => return Err(bad()),
            }
        }
        Ok((layouts, shards))
    }

    /// (bytes the store occupies on disk in SST and blob files, RocksDB's estimate of how many
    /// blocks are stored). Never waits: while a `reopen` holds the database, or after one
    /// failed, the last figures are given (status and heartbeats run on the async runtime).
    pub fn usage(&self) -> (u64, u64) {
        let guard = match self.db.try_read() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                return *self.last_usage.lock().unwrap_or_else(|p| p.into_inner());
            }
        };
        let Some(db) = guard.as_ref() else {
            return *self.last_usage.lock().unwrap_or_else(|p| p.into_inner());
        };
        let cf = db.cf_handle(BLOCKS_CF).expect("blocks column family opened at start");
        let prop = |name: &str| db.property_int_value_cf(cf, name).ok().flatten().unwrap_or(0);
        let usage = (
            prop("rocksdb.total-sst-files-size") + prop("rocksdb.total-blob-file-size"),
            prop("rocksdb.estimate-num-keys"),
        );
        *self.last_usage.lock().unwrap_or_else(|p| p.into_inner()) = usage;
        usage
    }

    /// Flushes memtables so a clean shutdown leaves nothing to replay. With the database not
    /// open (a failed `reopen`) there is nothing to flush: what was acked is in its WAL.
    pub fn flush(&self) -> Result<(), StoreError> {
        let Ok(db) = self.db() else { return Ok(()) };
        db.flush_wal(true)?;
        db.flush_cf(db.blocks_cf())?;
        Ok(())
    }
}

/// Opens (creating if needed) RocksDB in `dir` with the store's column families and tuning.
fn open_db(dir: &Path, options: StoreOptions) -> Result<DB, StoreError> {
    let mut db_opts = Options::default();
    db_opts.create_if_missing(true);
    db_opts.create_missing_column_families(true);
    db_opts.set_max_background_jobs(2);
    db_opts.set_paranoid_checks(true);

    let cache = Cache::new_lru_cache(options.rocksdb_cache_bytes as usize);
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(&cache);
    table.set_bloom_filter(10.0, false);

    let mut blocks = Options::default();
    blocks.set_block_based_table_factory(&table);
    blocks.set_compression_type(DBCompressionType::Lz4);
    blocks.set_enable_blob_files(true);
    blocks.set_min_blob_size(options.blob_min_bytes);
    blocks.set_blob_file_size(256 << 20);
    blocks.set_enable_blob_gc(true);

    let cfs = vec![
        ColumnFamilyDescriptor::new(BLOCKS_CF, blocks),
        ColumnFamilyDescriptor::new(PLACEMENT_CF, Options::default()),
        ColumnFamilyDescriptor::new(NODE_CF, Options::default()),
        ColumnFamilyDescriptor::new(INDEX_CF, Options::default()),
    ];
    DB::open_cf_descriptors(&db_opts, dir, cfs).map_err(StoreError::from_rocks)
}

fn sync_write() -> WriteOptions {
    let mut opts = WriteOptions::default();
    opts.set_sync(true);
    opts
}

fn layout_key(volume: VolumeId) -> Vec<u8> {
    let mut key = vec![b'L'];
    key.extend_from_slice(&volume.0.to_be_bytes());
    key
}

fn shard_key(volume: VolumeId, shard: ShardId) -> Vec<u8> {
    let mut key = vec![b'S'];
    key.extend_from_slice(&volume.0.to_be_bytes());
    key.extend_from_slice(&shard.0.to_be_bytes());
    key
}

fn encode<T: serde::Serialize>(record: &T) -> Vec<u8> {
    postcard::to_allocvec(record).expect("placement records always serialize")
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS; mixing in the time makes two ids in one process differ.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos(),
    );
    h.finish() >> 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const BS: u32 = 4096;

    fn open(dir: &Path) -> BlockStore {
        BlockStore::open(dir, StoreOptions::default(), None).unwrap()
    }

    #[test]
    fn partial_writes_read_modify_write_and_sparse_reads() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (v, s, b) = (VolumeId(1), ShardId(2), BlockId::new(Ino(3), 4));
        assert_eq!(store.read(v, s, b).unwrap(), None);
        store.write(v, s, b, 10, b"hello", BS).unwrap();
        let got = store.read(v, s, b).unwrap().unwrap();
        assert_eq!(&got.data[..10], &[0u8; 10]);
        assert_eq!(&got.data[10..], b"hello");
        store.write(v, s, b, 12, b"LLO world", BS).unwrap();
        assert_eq!(&store.read(v, s, b).unwrap().unwrap().data[10..], b"heLLO world");
        let err = store.write(v, s, b, BS - 2, b"abc", BS).unwrap_err();
        assert!(err.to_string().contains("overruns"), "{err}");
    }

    #[test]
    fn delete_from_removes_only_that_inode_tail() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (v, s) = (VolumeId(1), ShardId(0));
        for ino in [Ino(5), Ino(6)] {
            for i in [0, 1, 2, u64::MAX] {
                store.write(v, s, BlockId::new(ino, i), 0, b"x", BS).unwrap();
            }
        }
        store.delete_from(v, s, Ino(5), 1).unwrap();
        assert!(store.read(v, s, BlockId::new(Ino(5), 0)).unwrap().is_some());
        for i in [1, 2, u64::MAX] {
            assert!(store.read(v, s, BlockId::new(Ino(5), i)).unwrap().is_none());
            assert!(store.read(v, s, BlockId::new(Ino(6), i)).unwrap().is_some());
        }
    }

    #[test]
    fn identity_and_placement_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let id = {
            let store = BlockStore::open(dir.path(), StoreOptions::default(), Some(NodeId(7))).unwrap();
            let layout = VolumeLayout { volume: VolumeId(9), block_size_bytes: BS };
            let shard = ShardPlacement { shard: ShardId(1), epoch: augur_proto::Epoch(4), replicas: vec![] };
            store.save_placement(&layout, &[shard]).unwrap();
            store.node_id()
        };
        let store = open(dir.path());
        assert_eq!(store.node_id(), id);
        let (layouts, shards) = store.load_placement().unwrap();
        assert_eq!(layouts[0].volume, VolumeId(9));
        assert_eq!(shards[0].1.epoch, augur_proto::Epoch(4));
        drop(store);
        let err = BlockStore::open(dir.path(), StoreOptions::default(), Some(NodeId(8))).err().unwrap();
        assert!(err.to_string().contains("belongs to node-7"), "{err}");
    }

    /// Flips a byte inside a block's stored value, leaving RocksDB's own structures intact.
    fn damage(store: &BlockStore, v: VolumeId, s: ShardId, b: BlockId) {
        let key = block_key(v, s, b);
        let db = store.db().unwrap();
        let mut raw = db.get_cf(db.blocks_cf(), key).unwrap().unwrap();
        raw[50] ^= 0x40;
        db.put_cf(db.blocks_cf(), key, raw).unwrap();
    }

    #[test]
    fn flipped_value_byte_is_a_checksum_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (v, s, b) = (VolumeId(1), ShardId(0), BlockId::new(Ino(1), 0));
        store.write(v, s, b, 0, &[7u8; 100], BS).unwrap();
        damage(&store, v, s, b);
        assert!(matches!(store.read(v, s, b), Err(StoreError::Checksum { .. })));
    }

    #[test]
    fn repair_replaces_only_a_damaged_copy() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (v, s) = (VolumeId(1), ShardId(0));
        let (damaged, sound, absent) =
            (BlockId::new(Ino(1), 0), BlockId::new(Ino(1), 1), BlockId::new(Ino(1), 2));
        store.write(v, s, damaged, 0, &[7u8; 100], BS).unwrap();
        store.write(v, s, sound, 0, &[8u8; 100], BS).unwrap();
        damage(&store, v, s, damaged);
        assert!(store.read(v, s, damaged).unwrap_err().is_damage());
        // The damaged copy is replaced; once sound, a second (stale) repair changes nothing.
        assert!(store.repair(v, s, damaged, &[7u8; 100]).unwrap());
        assert_eq!(store.read(v, s, damaged).unwrap().unwrap().data, vec![7u8; 100]);
        assert!(!store.repair(v, s, damaged, &[1u8; 100]).unwrap());
        assert_eq!(store.read(v, s, damaged).unwrap().unwrap().data, vec![7u8; 100]);
        // A sound copy is never overwritten, and an absent block is not created.
        assert!(!store.repair(v, s, sound, &[1u8; 100]).unwrap());
        assert_eq!(store.read(v, s, sound).unwrap().unwrap().data, vec![8u8; 100]);
        assert!(!store.repair(v, s, absent, &[1u8; 100]).unwrap());
        assert!(store.read(v, s, absent).unwrap().is_none());
    }

    /// Every block a whole scrub pass visits, two at a time: (damaged, bytes read).
    fn scrub_pass(store: &BlockStore) -> (Vec<BlockId>, u64) {
        let (mut damaged, mut bytes, mut after) = (Vec::new(), 0, None);
        loop {
            let step = store.scrub(after, 2).unwrap();
            damaged.extend(step.damaged.iter().map(|(_, _, b)| *b));
            bytes += step.bytes;
            match step.next {
                Some(next) => after = Some(next),
                None => return (damaged, bytes),
            }
        }
    }

    #[test]
    fn a_scrub_pass_reads_every_block_once_and_names_the_damaged_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (v, s) = (VolumeId(1), ShardId(0));
        for i in 0..5 {
            store.write(v, s, BlockId::new(Ino(1), i), 0, &[i as u8; 100], BS).unwrap();
        }
        store.put(v, s, BlockId::new(Ino(2), 0), &[9u8; 10]).unwrap();
        let damaged = BlockId::new(Ino(1), 3);
        damage(&store, v, s, damaged);
        assert_eq!(scrub_pass(&store), (vec![damaged], 4 * 100 + 10));
        // Deleted blocks leave the index with their values.
        store.delete_from(v, s, Ino(1), 2).unwrap();
        assert_eq!(scrub_pass(&store), (vec![], 2 * 100 + 10));
    }

    #[test]
    fn a_store_written_before_the_index_gets_one_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (v, s) = (VolumeId(1), ShardId(3));
        {
            let store = open(dir.path());
            for i in 0..3 {
                store.write(v, s, BlockId::new(Ino(4), i), 0, &[1u8; 64], BS).unwrap();
            }
            // As a store of the earlier format had it: no index entries, no marker.
            let db = store.db().unwrap();
            let mut batch = WriteBatch::default();
            batch.delete_range_cf(db.index_cf(), &[0u8][..], &[0xffu8; 29][..]);
            batch.delete_cf(db.cf_handle(NODE_CF).unwrap(), KEY_INDEX_BUILT);
            db.write(batch).unwrap();
            drop(db);
            assert_eq!(scrub_pass(&store), (vec![], 0));
        }
        let store = open(dir.path());
        assert_eq!(scrub_pass(&store), (vec![], 3 * 64));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write { ino: u64, index: u64, offset: u32, len: u32, byte: u8 },
        Delete { ino: u64, from: u64 },
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u64..3, 0u64..4, 0u32..BS, 1u32..BS, any::<u8>()).prop_map(|(ino, index, offset, len, byte)| {
                let len = len.min(BS - offset).max(1);
                let offset = offset.min(BS - len);
                Op::Write { ino, index, offset, len, byte }
            }),
            1 => (0u64..3, 0u64..4).prop_map(|(ino, from)| Op::Delete { ino, from }),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        // The store against a BTreeMap model, with random operations and reopens (sled-style).
        #[test]
        fn store_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let mut store = open(dir.path());
            let mut model: BTreeMap<(u64, u64), Vec<u8>> = BTreeMap::new();
            let (v, s) = (VolumeId(1), ShardId(0));
            for op in ops {
                match op {
                    Op::Write { ino, index, offset, len, byte } => {
                        let data = vec![byte; len as usize];
                        store.write(v, s, BlockId::new(Ino(ino), index), offset, &data, BS).unwrap();
                        let entry = model.entry((ino, index)).or_default();
                        let end = (offset + len) as usize;
                        if entry.len() < end { entry.resize(end, 0); }
                        entry[offset as usize..end].copy_from_slice(&data);
                    }
                    Op::Delete { ino, from } => {
                        store.delete_from(v, s, Ino(ino), from).unwrap();
                        model.retain(|(i, idx), _| !(*i == ino && *idx >= from));
                    }
                    Op::Reopen => {
                        drop(store);
                        store = open(dir.path());
                    }
                }
            }
            for ino in 0..3 {
                for index in 0..4 {
                    let got = store.read(v, s, BlockId::new(Ino(ino), index)).unwrap().map(|b| b.data);
                    prop_assert_eq!(got.as_ref(), model.get(&(ino, index)));
                }
            }
        }
    }
}
