//! The storage node's RPC service: every block request is checked against the placement table,
//! served from the memory cache or the RocksDB store, and checksummed on the way out. A stored
//! copy found damaged is reported to its reader (who fails over) and repaired in the background
//! from another replica of its shard.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use augur_proto::meta::{NodeAssignment, ShardLoad};
use augur_proto::msg::{
    BATCH_BLOCKS_MAX, BATCH_BYTES_MAX, BlockData, BlockRead, NodeStatus, Replica, RequestBody, Response,
    ResponseBody, ShardPlacement, VolumeLayout,
};
use augur_proto::{
    BlockId, ErrorCode, Ino, NodeId, Peer, RpcClient, Service, ShardId, ShardRef, VolumeId, WireError,
};
use serde_bytes::ByteBuf;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::cache::{BlockCache, CacheKey, CachedBlock};
use crate::placement::PlacementTable;
use crate::space::SpaceMonitor;
use crate::store::{BlockStore, StoreError};

/// Stripes of the per-block write locks that order a primary's writes and their forwarding.
const WRITE_LOCK_STRIPES: usize = 1024;
/// Deadline of one forwarded write to a backup.
const REPLICATE_DEADLINE: Duration = Duration::from_secs(5);
/// Most damaged blocks waiting for repair. Past it a damaged block is not queued (logged); its
/// next read finds it again.
pub const REPAIR_QUEUE_MAX: usize = 1024;
/// Deadline of one fetch of a sound copy from another replica during a repair.
const REPAIR_FETCH_DEADLINE: Duration = Duration::from_secs(5);
/// Room past the reserve the disk must have again before a store that RocksDB stopped for want
/// of space is reopened: reopening replays the WAL and flushes what it held (up to two 64 MiB
/// memtables), and a reopen that fails leaves the store unreadable until the next one.
const STORE_REOPEN_ROOM_BYTES: u64 = 160 << 20;
/// Tries at reopening a stopped store are at least this far apart.
const STORE_REOPEN_INTERVAL: Duration = Duration::from_secs(2);
/// Blocks the scrub reads per step (one block in memory at a time); it saves its place after each.
const SCRUB_STEP_BLOCKS: usize = 64;
/// Bytes each block visited counts for the scrub's pace on top of its own, so a run of tiny
/// or absent blocks is paced too.
const SCRUB_BLOCK_COST_BYTES: u64 = 4096;
/// Wait before a scrub step that failed (say, a store stopped for want of space) is tried again.
const SCRUB_RETRY: Duration = Duration::from_secs(10);

type ShardLock = Arc<tokio::sync::RwLock<()>>;

/// One shard's load since the last heartbeat.
#[derive(Default, Clone, Copy)]
struct LoadAcc {
    load: ShardLoad,
    latency_sum_us: u64,
}

pub struct NodeService {
    store: Arc<BlockStore>,
    rpc: Arc<RpcClient>,
    /// Writes hold their shard's lock shared, range deletes exclusive, so every replica sees
    /// a delete and the writes around it in the same order.
    shard_locks: Mutex<HashMap<(VolumeId, ShardId), ShardLock>>,
    /// Held by a primary from its local write until every backup has the block.
    write_locks: Vec<tokio::sync::Mutex<()>>,
    loads: Mutex<HashMap<(VolumeId, ShardId), LoadAcc>>,
    cache: BlockCache,
    placement: RwLock<PlacementTable>,
    /// Held across a placement update's check, its save to disk and its install in memory, so
    /// that updates land on disk in the order they land in memory (two pushes validated
    /// against the same table could otherwise save in one order and apply in the other).
    placement_update: tokio::sync::Mutex<()>,
    space: SpaceMonitor,
    /// When the store was last reopened, or tried, after RocksDB stopped for want of space.
    reopened: tokio::sync::Mutex<Option<Instant>>,
    repairs: Repairs,
    node_id: NodeId,
    listen: String,
    /// Test/bench only: added to every block request (`inject-latency-ms`).
    pub(crate) inject_latency: Duration,
    started: Instant,
}

/// Damaged blocks waiting for repair: a bounded queue drained by `NodeService::run_repairs`,
/// each block in it at most once.
struct Repairs {
    queue: tokio::sync::mpsc::Sender<(ShardRef, BlockId)>,
    receiver: Mutex<Option<tokio::sync::mpsc::Receiver<(ShardRef, BlockId)>>>,
    queued: Mutex<HashSet<(VolumeId, ShardId, BlockId)>>,
    /// Copies replaced by a sound one from another replica.
    done: AtomicU64,
    /// Repairs that found no sound copy (no other replica, or none answered with one).
    failed: AtomicU64,
    /// Scrub passes finished since start.
    scrub_passes: AtomicU64,
    /// Damaged copies the scrub found since start.
    scrub_found: AtomicU64,
}

impl Repairs {
    fn new() -> Self {
        let (queue, receiver) = tokio::sync::mpsc::channel(REPAIR_QUEUE_MAX);
        Self {
            queue,
            receiver: Mutex::new(Some(receiver)),
            queued: Mutex::new(HashSet::new()),
            done: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            scrub_passes: AtomicU64::new(0),
            scrub_found: AtomicU64::new(0),
        }
    }

    /// `push` for the scrub: waits for room in the queue rather than drop the block (nobody
    /// reads it, so nothing else would find it before the next pass).
    async fn push_waiting(&self, shard: ShardRef, block: BlockId) {
        if self.claim(shard, block) && self.queue.send((shard, block)).await.is_err() {
            self.finish(shard, block);
        }
    }

    fn push(&self, shard: ShardRef, block: BlockId) {
        if self.claim(shard, block) && self.queue.try_send((shard, block)).is_err() {
            self.finish(shard, block);
            warn!(%shard, %block, "repair queue full ({REPAIR_QUEUE_MAX}); the damaged block waits for its next read");
        }
    }

    /// Marks a block queued; false if it is queued already.
    fn claim(&self, shard: ShardRef, block: BlockId) -> bool {
        self.queued.lock().unwrap_or_else(|p| p.into_inner()).insert((shard.volume, shard.shard, block))
    }

    fn finish(&self, shard: ShardRef, block: BlockId) {
        self.queued.lock().unwrap_or_else(|p| p.into_inner()).remove(&(shard.volume, shard.shard, block));
    }
}

fn wire(e: StoreError) -> WireError {
    let code = match &e {
        StoreError::Checksum { .. } | StoreError::Corrupt { .. } | StoreError::Corruption(_) => {
            ErrorCode::ChecksumMismatch
        }
        StoreError::NoSpace => ErrorCode::NoSpace,
        StoreError::InvalidArgument(_) => ErrorCode::InvalidArgument,
        StoreError::Rocks(_) | StoreError::Format(_) => ErrorCode::Internal,
    };
    if matches!(code, ErrorCode::ChecksumMismatch | ErrorCode::Internal) {
        // Logged here, where it is handled: the caller only sees the code.
        error!(error = %e, "block store error");
    }
    WireError::new(code, e.to_string())
}

fn invalid(msg: String) -> WireError {
    WireError::new(ErrorCode::InvalidArgument, msg)
}

impl NodeService {
    pub fn new(
        store: Arc<BlockStore>,
        cache: BlockCache,
        space: SpaceMonitor,
        listen: String,
        rpc: Arc<RpcClient>,
    ) -> Result<Self, StoreError> {
        let mut table = PlacementTable::default();
        let (layouts, shards) = store.load_placement()?;
        for layout in layouts {
            let mine: Vec<ShardPlacement> =
                shards.iter().filter(|(v, _)| *v == layout.volume).map(|(_, p)| p.clone()).collect();
            table.apply(layout, mine);
        }
        Ok(Self {
            node_id: store.node_id(),
            store,
            rpc,
            shard_locks: Mutex::new(HashMap::new()),
            write_locks: (0..WRITE_LOCK_STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            loads: Mutex::new(HashMap::new()),
            cache,
            placement: RwLock::new(table),
            placement_update: tokio::sync::Mutex::new(()),
            space,
            reopened: tokio::sync::Mutex::new(None),
            repairs: Repairs::new(),
            listen,
            inject_latency: Duration::ZERO,
            started: Instant::now(),
        })
    }

    fn check(&self, shard: ShardRef) -> Result<u32, WireError> {
        self.placement.read().unwrap_or_else(|p| p.into_inner()).check(self.node_id, shard)
    }

    /// Runs blocking store work off the async executor.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&BlockStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, WireError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || work(&store))
            .await
            .map_err(|e| WireError::new(ErrorCode::Internal, format!("store task failed: {e}")))?
            .map_err(wire)
    }

    /// Ready to write: if RocksDB stopped writing for want of space, the store is reopened once
    /// the disk has `STORE_REOPEN_ROOM_BYTES` past the reserve again (tried at most every
    /// `STORE_REOPEN_INTERVAL`); until then writes get "no space", and reads go on.
    async fn writable(&self) -> Result<(), WireError> {
        if !self.store.is_stopped() {
            return Ok(());
        }
        let mut last = self.reopened.lock().await;
        if !self.store.is_stopped() {
            return Ok(());
        }
        if last.is_some_and(|at| at.elapsed() < STORE_REOPEN_INTERVAL) {
            return Err(wire(StoreError::NoSpace));
        }
        *last = Some(Instant::now());
        self.space.refresh();
        self.space.check_room(STORE_REOPEN_ROOM_BYTES).map_err(wire)?;
        self.blocking(|s| s.reopen()).await?;
        warn!(node = %self.node_id, "block store reopened: the disk has room again");
        Ok(())
    }

    /// A whole block, verified: from the cache or from disk (then cached). `None` if never written.
    async fn load(&self, shard: ShardRef, block: BlockId) -> Result<Option<CachedBlock>, WireError> {
        let key = CacheKey { volume: shard.volume, shard: shard.shard, block };
        if let Some(hit) = self.cache.get(&key) {
            // Paired check: cached bytes were verified on load and are verified again on use.
            if crc32fast::hash(&hit.data) == hit.crc32 {
                return Ok(Some(hit));
            }
            error!(%shard, %block, "cached block failed its checksum; dropping it");
            self.cache.remove(&key);
        }
        let generation = self.cache.generation(&key);
        let found = match self.blocking(move |s| s.read(shard.volume, shard.shard, block)).await {
            Err(e) if e.code == ErrorCode::ChecksumMismatch => {
                // The reader fails over to another replica; this copy is healed from one.
                self.repairs.push(shard, block);
                return Err(e);
            }
            found => found?,
        };
        Ok(found.map(|b| {
            let cached = CachedBlock { data: b.data.into(), crc32: b.crc32 };
            self.cache.insert_loaded(key, cached.clone(), generation);
            cached
        }))
    }

    async fn read(&self, read: BlockRead) -> Result<BlockData, WireError> {
        let started = Instant::now();
        let result = self.read_inner(read).await;
        if let Ok(d) = &result {
            self.record(read.shard, false, d.data.len() as u64, started);
        }
        result
    }

    async fn read_inner(&self, read: BlockRead) -> Result<BlockData, WireError> {
        let block_size = self.check(read.shard)?;
        if let Some(r) = read.range
            && u64::from(r.offset) + u64::from(r.len) > u64::from(block_size)
        {
            return Err(invalid(format!(
                "range {}+{} overruns the {block_size}-byte block",
                r.offset, r.len
            )));
        }
        let Some(block) = self.load(read.shard, read.block).await? else {
            return Ok(BlockData { data: ByteBuf::new(), crc32: crc32fast::hash(&[]) });
        };
        let data = match read.range {
            None => {
                return Ok(self
                    .count_read(BlockData { data: ByteBuf::from(block.data.to_vec()), crc32: block.crc32 }));
            }
            Some(r) => {
                let start = (r.offset as usize).min(block.data.len());
                let end = (r.offset as usize + r.len as usize).min(block.data.len());
                block.data[start..end].to_vec()
            }
        };
        let crc32 = crc32fast::hash(&data);
        Ok(self.count_read(BlockData { data: ByteBuf::from(data), crc32 }))
    }

    fn count_read(&self, data: BlockData) -> BlockData {
        metrics::counter!("augur_node_read_bytes_total").increment(data.data.len() as u64);
        data
    }

    /// Checks a batch's size against its limits before any of it is served.
    fn check_batch(&self, reads: &[BlockRead]) -> Result<(), WireError> {
        if reads.len() > BATCH_BLOCKS_MAX {
            return Err(invalid(format!(
                "{} blocks in one batch; the maximum is {BATCH_BLOCKS_MAX}",
                reads.len()
            )));
        }
        let bytes = self.batch_bytes(reads);
        if bytes > BATCH_BYTES_MAX {
            return Err(invalid(format!("batch asks for {bytes} bytes; the maximum is {BATCH_BYTES_MAX}")));
        }
        Ok(())
    }

    /// Most bytes a read answers with: its range, or its shard's block size. Blocks of shards
    /// not held here answer with an error entry, which costs nothing.
    fn read_bytes(&self, read: &BlockRead) -> u64 {
        let block_size = u64::from(self.check(read.shard).unwrap_or(0));
        read.range.map_or(block_size, |r| u64::from(r.len).min(block_size))
    }

    fn batch_bytes(&self, reads: &[BlockRead]) -> u64 {
        reads.iter().map(|r| self.read_bytes(r)).sum()
    }

    fn shard_lock(&self, shard: ShardRef) -> ShardLock {
        let mut locks = self.shard_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry((shard.volume, shard.shard)).or_default().clone()
    }

    /// The backups of a shard this node is primary of; `NotPrimary` otherwise.
    fn backups(&self, shard: ShardRef) -> Result<Vec<Replica>, WireError> {
        let table = self.placement.read().unwrap_or_else(|p| p.into_inner());
        let p = table.get(shard.volume, shard.shard).ok_or_else(|| {
            WireError::new(ErrorCode::ShardNotHere, format!("{} holds no {shard}", self.node_id))
        })?;
        match p.replicas.first() {
            Some(r) if r.node == self.node_id => Ok(p.replicas[1..].to_vec()),
            first => Err(WireError::new(
                ErrorCode::NotPrimary,
                format!(
                    "{} is not the primary of {shard}; {} is",
                    self.node_id,
                    first.map(|r| r.node.to_string()).unwrap_or_default()
                ),
            )),
        }
    }

    /// Sends `body` to every backup; all must persist it before the primary acks.
    async fn forward(&self, backups: Vec<Replica>, body: RequestBody) -> Result<(), WireError> {
        let mut calls = tokio::task::JoinSet::new();
        for r in backups {
            let (rpc, body) = (self.rpc.clone(), body.clone());
            calls.spawn(async move {
                let addr: SocketAddr = r.addr.parse().map_err(|e| {
                    WireError::new(
                        ErrorCode::Internal,
                        format!("backup {} has a bad address {:?}: {e}", r.node, r.addr),
                    )
                })?;
                rpc.call_with_deadline(addr, body, REPLICATE_DEADLINE).await.map(|_| ()).map_err(|e| {
                    let code = match e.code() {
                        Some(
                            c @ (ErrorCode::StaleEpoch { .. }
                            | ErrorCode::EpochAhead { .. }
                            | ErrorCode::NoSpace),
                        ) => c.clone(),
                        Some(ErrorCode::ShardNotHere) => ErrorCode::ShardNotHere,
                        _ => ErrorCode::Unavailable,
                    };
                    WireError::new(code, format!("backup {} ({addr}): {e}", r.node))
                })
            });
        }
        let mut first_error = None;
        while let Some(done) = calls.join_next().await {
            let result = done.unwrap_or_else(|e| Err(WireError::new(ErrorCode::Internal, e.to_string())));
            if let Err(e) = result {
                warn!(error = %e, "replication to a backup failed; the write is not acked");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn record(&self, shard: ShardRef, write: bool, bytes: u64, started: Instant) {
        let us = started.elapsed().as_micros() as u64;
        let mut loads = self.loads.lock().unwrap_or_else(|p| p.into_inner());
        let acc = loads.entry((shard.volume, shard.shard)).or_default();
        if write {
            acc.load.writes += 1;
            acc.load.write_bytes += bytes;
        } else {
            acc.load.reads += 1;
            acc.load.read_bytes += bytes;
        }
        acc.latency_sum_us += us;
        acc.load.latency_max_us = acc.load.latency_max_us.max(us);
    }

    /// Per-shard load since the last call (sent with each heartbeat).
    pub fn take_loads(&self) -> Vec<ShardLoad> {
        let loads = std::mem::take(&mut *self.loads.lock().unwrap_or_else(|p| p.into_inner()));
        loads
            .into_iter()
            .map(|((volume, shard), acc)| {
                let ops = (acc.load.reads + acc.load.writes).max(1);
                ShardLoad { volume, shard, latency_mean_us: acc.latency_sum_us / ops, ..acc.load }
            })
            .collect()
    }

    /// Installs the meta group's full assignment for this node.
    pub async fn apply_assignments(&self, assignments: Vec<NodeAssignment>) -> Result<(), WireError> {
        self.writable().await?;
        let _update = self.placement_update.lock().await;
        let list = assignments.into_iter().map(|a| (a.layout, a.shards)).collect();
        // Saved first, installed after: memory never holds a placement the disk does not.
        let mut next = self.placement.read().unwrap_or_else(|p| p.into_inner()).clone();
        let table = next.replace_all(list);
        let shards: usize = table.iter().map(|(_, s)| s.len()).sum();
        self.blocking(move |s| s.replace_placement(&table)).await?;
        *self.placement.write().unwrap_or_else(|p| p.into_inner()) = next;
        info!(node = %self.node_id, shards, "placement from the meta group installed");
        Ok(())
    }

    async fn write(
        &self,
        shard: ShardRef,
        block: BlockId,
        offset: u32,
        data: ByteBuf,
    ) -> Result<ResponseBody, WireError> {
        let started = Instant::now();
        let block_size = self.check(shard)?;
        self.backups(shard)?;
        if u64::from(offset) + data.len() as u64 > u64::from(block_size) {
            return Err(invalid(format!(
                "write of {} bytes at offset {offset} overruns the {block_size}-byte block",
                data.len()
            )));
        }
        self.writable().await?;
        self.space.check_room(data.len() as u64).map_err(wire)?;
        let shard_lock = self.shard_lock(shard);
        let _shard_guard = shard_lock.read().await;
        let stripe = (crc32fast::hash(&crate::store::block_key(shard.volume, shard.shard, block)) as usize)
            % self.write_locks.len();
        let _block_guard = self.write_locks[stripe].lock().await;
        // The placement may have moved on while this write waited for its locks: the epoch is
        // checked again, and the write goes to the backups in force now.
        self.check(shard)?;
        let backups = self.backups(shard)?;
        let key = CacheKey { volume: shard.volume, shard: shard.shard, block };
        // Drop the cached copy before and after the store write; a read that loaded the old
        // bytes meanwhile does not cache them (`BlockCache::insert_loaded`).
        self.cache.remove(&key);
        let len = data.len() as u64;
        let data = Arc::new(data);
        let write = |data: Arc<ByteBuf>| {
            self.blocking(move |s| s.write(shard.volume, shard.shard, block, offset, &data, block_size))
        };
        let content = match write(data.clone()).await {
            Err(e) if e.code == ErrorCode::ChecksumMismatch => {
                // A partial write builds on the stored copy, which is damaged: heal it from a
                // backup now (this write's locks are held, so nothing else changes the block
                // meanwhile) and write once more.
                self.repair(shard, block, true).await.map_err(|why| {
                    WireError::new(ErrorCode::ChecksumMismatch, format!("{e}; and no repair: {why}"))
                })?;
                write(data).await?
            }
            content => content?,
        };
        self.cache.remove(&key);
        if !backups.is_empty() {
            let crc32 = crc32fast::hash(&content);
            let body = RequestBody::ReplicateBlock { shard, block, data: ByteBuf::from(content), crc32 };
            self.forward(backups, body).await?;
        }
        metrics::counter!("augur_node_write_bytes_total").increment(len);
        self.record(shard, true, len, started);
        Ok(ResponseBody::Written)
    }

    /// A backup stores a block exactly as its primary has it.
    async fn replicate_block(
        &self,
        shard: ShardRef,
        block: BlockId,
        data: ByteBuf,
        crc32: u32,
    ) -> Result<ResponseBody, WireError> {
        let started = Instant::now();
        let block_size = self.check(shard)?;
        if data.len() > block_size as usize {
            return Err(invalid(format!("replicated block of {} bytes exceeds {block_size}", data.len())));
        }
        if crc32fast::hash(&data) != crc32 {
            return Err(WireError::new(
                ErrorCode::ChecksumMismatch,
                format!("replicated {block} arrived damaged"),
            ));
        }
        self.writable().await?;
        self.space.check_room(data.len() as u64).map_err(wire)?;
        let key = CacheKey { volume: shard.volume, shard: shard.shard, block };
        self.cache.remove(&key);
        let len = data.len() as u64;
        self.blocking(move |s| s.put(shard.volume, shard.shard, block, &data)).await?;
        self.cache.remove(&key);
        self.record(shard, true, len, started);
        Ok(ResponseBody::Replicated)
    }

    async fn delete_range(
        &self,
        shard: ShardRef,
        ino: Ino,
        from_index: u64,
        forward: bool,
    ) -> Result<ResponseBody, WireError> {
        self.check(shard)?;
        if forward {
            self.backups(shard)?;
        }
        self.writable().await?;
        let shard_lock = self.shard_lock(shard);
        let _guard = shard_lock.write().await;
        // Checked again once the lock is held, as for a write.
        self.check(shard)?;
        let backups = if forward { self.backups(shard)? } else { Vec::new() };
        self.cache.remove_from(shard.volume, shard.shard, ino, from_index);
        self.blocking(move |s| s.delete_from(shard.volume, shard.shard, ino, from_index)).await?;
        self.cache.remove_from(shard.volume, shard.shard, ino, from_index);
        if !backups.is_empty() {
            self.forward(backups, RequestBody::ReplicateDelete { shard, ino, from_index }).await?;
        }
        Ok(if forward { ResponseBody::Deleted } else { ResponseBody::Replicated })
    }

    async fn warm(&self, blocks: Vec<BlockRead>) -> Result<ResponseBody, WireError> {
        self.check_batch(&blocks)?;
        let mut loaded = 0;
        for read in blocks {
            self.check(read.shard)?;
            if self.load(read.shard, read.block).await?.is_some() {
                loaded += 1;
            }
        }
        Ok(ResponseBody::Warmed { loaded })
    }

    async fn set_placement(
        &self,
        peer: &Peer,
        layout: VolumeLayout,
        shards: Vec<ShardPlacement>,
    ) -> Result<ResponseBody, WireError> {
        self.writable().await?;
        let _update = self.placement_update.lock().await;
        self.placement.read().unwrap_or_else(|p| p.into_inner()).validate(&layout, &shards)?;
        let (l, s) = (layout, shards.clone());
        self.blocking(move |store| store.save_placement(&l, &s)).await?;
        let mut table = self.placement.write().unwrap_or_else(|p| p.into_inner());
        tracing::info!(peer = %peer.name, volume = %layout.volume, shards = shards.len(), "placement updated");
        table.apply(layout, shards);
        Ok(ResponseBody::PlacementSet)
    }

    /// Drains the repair queue until `shutdown`: each damaged copy is replaced by a sound one
    /// fetched from another replica of its shard. One repair at a time.
    pub async fn run_repairs(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(mut receiver) = self.repairs.receiver.lock().unwrap_or_else(|p| p.into_inner()).take()
        else {
            return;
        };
        loop {
            let next = tokio::select! {
                biased;
                _ = shutdown.cancelled() => None,
                next = receiver.recv() => next,
            };
            let Some((shard, block)) = next else { return };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                // Errors are counted and logged by `repair`.
                _ = self.repair(shard, block, false) => {}
            }
            self.repairs.finish(shard, block);
        }
    }

    /// Reads every stored block in turn, at about `bytes_per_sec` (0: off), and queues the
    /// damaged ones for repair, so damage in data nobody reads is healed too, before the other
    /// replicas can fail as well. A pass starts at start and then `pause` after the last ended.
    pub async fn run_scrub(
        self: Arc<Self>,
        bytes_per_sec: u64,
        pause: Duration,
        shutdown: CancellationToken,
    ) {
        if bytes_per_sec == 0 {
            return;
        }
        // A restart goes on where the pass was.
        let mut after = self.blocking(|s| s.scrub_cursor()).await.unwrap_or(None);
        loop {
            let wait = match self.blocking(move |s| s.scrub(after, SCRUB_STEP_BLOCKS)).await {
                Ok(step) => {
                    for (volume, shard, block) in step.damaged {
                        self.repairs.scrub_found.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("augur_node_scrub_damaged_total").increment(1);
                        let epoch = self
                            .placement
                            .read()
                            .unwrap_or_else(|p| p.into_inner())
                            .get(volume, shard)
                            .filter(|p| p.replicas.iter().any(|r| r.node == self.node_id))
                            .map(|p| p.epoch);
                        // A shard this node no longer holds is not served from here.
                        if let Some(epoch) = epoch {
                            warn!(%volume, %shard, %block, "scrub found a damaged copy; repairing it");
                            tokio::select! {
                                biased;
                                _ = shutdown.cancelled() => return,
                                _ = self.repairs.push_waiting(ShardRef { volume, shard, epoch }, block) => {}
                            }
                        }
                    }
                    metrics::counter!("augur_node_scrub_bytes_total").increment(step.bytes);
                    metrics::counter!("augur_node_scrub_unreadable_total").increment(step.unreadable);
                    after = step.next;
                    if let Err(e) = self.blocking(move |s| s.save_scrub_cursor(after)).await {
                        debug!(error = %e, "could not save the scrub's place");
                    }
                    let cost = step.bytes + step.visited as u64 * SCRUB_BLOCK_COST_BYTES;
                    let paced = Duration::from_secs_f64(cost as f64 / bytes_per_sec as f64);
                    if after.is_none() {
                        self.repairs.scrub_passes.fetch_add(1, Ordering::Relaxed);
                        info!(node = %self.node_id, "scrub pass done");
                        paced.max(pause)
                    } else {
                        paced
                    }
                }
                Err(e) => {
                    warn!(error = %e, "scrub step failed; trying again");
                    SCRUB_RETRY
                }
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Replaces this node's damaged copy of `block` with a sound one from another replica.
    /// `Ok(false)`: the stored copy was sound by then (a write replaced it, or it was deleted).
    /// `holding_shard_lock`: the caller (a write) holds the shard's lock shared already.
    async fn repair(
        &self,
        shard: ShardRef,
        block: BlockId,
        holding_shard_lock: bool,
    ) -> Result<bool, String> {
        let outcome = self.repair_from_peers(shard, block, holding_shard_lock).await;
        match &outcome {
            Ok(true) => {
                self.repairs.done.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("augur_node_repairs_total").increment(1);
                info!(%shard, %block, "damaged block repaired from another replica");
            }
            Ok(false) => debug!(%shard, %block, "damaged block was rewritten before its repair"),
            Err(why) => {
                self.repairs.failed.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("augur_node_repairs_failed_total").increment(1);
                error!(%shard, %block, %why, "damaged block could not be repaired");
            }
        }
        outcome
    }

    async fn repair_from_peers(
        &self,
        shard: ShardRef,
        block: BlockId,
        holding_shard_lock: bool,
    ) -> Result<bool, String> {
        let (shard, peers) = {
            let table = self.placement.read().unwrap_or_else(|p| p.into_inner());
            let p =
                table.get(shard.volume, shard.shard).ok_or_else(|| format!("{shard} is no longer here"))?;
            let peers: Vec<Replica> = p.replicas.iter().filter(|r| r.node != self.node_id).cloned().collect();
            (ShardRef { epoch: p.epoch, ..shard }, peers)
        };
        if peers.is_empty() {
            return Err(format!("no other replica holds {shard}"));
        }
        let mut tried = Vec::new();
        for peer in peers {
            match self.fetch_copy(shard, block, &peer).await {
                Ok(data) => {
                    // The copy is stored holding the shard's lock shared, as a write does, so
                    // a range delete (exclusive) never lands between the store's check that
                    // the copy is still damaged and its write, to be undone by it.
                    // The guard moves into the store task, which runs to its end even if this
                    // repair is dropped (at shutdown).
                    let shared = match holding_shard_lock {
                        true => None,
                        false => Some(self.shard_lock(shard).read_owned().await),
                    };
                    let storing = |e: WireError| format!("storing the copy from {}: {e}", peer.node);
                    self.writable().await.map_err(storing)?;
                    self.space.check_room(data.len() as u64).map_err(|e| storing(wire(e)))?;
                    let key = CacheKey { volume: shard.volume, shard: shard.shard, block };
                    self.cache.remove(&key);
                    let repaired = self
                        .blocking(move |s| {
                            let _shared = shared;
                            s.repair(shard.volume, shard.shard, block, &data)
                        })
                        .await
                        .map_err(storing)?;
                    self.cache.remove(&key);
                    return Ok(repaired);
                }
                Err(why) => tried.push(format!("{}: {why}", peer.node)),
            }
        }
        Err(format!("no sound copy: {}", tried.join("; ")))
    }

    /// A sound whole copy of `block` from `peer`, checked against its CRC.
    async fn fetch_copy(&self, shard: ShardRef, block: BlockId, peer: &Replica) -> Result<ByteBuf, String> {
        let addr: SocketAddr = peer.addr.parse().map_err(|e| format!("bad address {:?}: {e}", peer.addr))?;
        let body = RequestBody::ReadBlock { read: BlockRead { shard, block, range: None } };
        match self.rpc.call_with_deadline(addr, body, REPAIR_FETCH_DEADLINE).await {
            // A never-written block reads as empty: that replica has no copy to give.
            Ok(ResponseBody::Block(b)) if b.data.is_empty() => Err("holds no copy".into()),
            Ok(ResponseBody::Block(b)) if crc32fast::hash(&b.data) == b.crc32 => Ok(b.data),
            Ok(ResponseBody::Block(_)) => Err("sent a copy that failed its checksum".into()),
            Ok(other) => Err(format!("answered {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    pub fn status(&self) -> NodeStatus {
        let (capacity_bytes, free_bytes) = self.space.refresh();
        let (used_bytes, blocks_estimate) = self.store.usage();
        NodeStatus {
            node: self.node_id,
            version: env!("CARGO_PKG_VERSION").to_string(),
            listen: self.listen.clone(),
            uptime_s: self.started.elapsed().as_secs(),
            capacity_bytes,
            free_bytes,
            used_bytes,
            blocks_estimate,
            store_stopped: self.store.is_stopped(),
            cache_bytes: self.cache.bytes(),
            cache_bytes_max: self.cache.bytes_max(),
            cache_hits: self.cache.hits(),
            cache_misses: self.cache.misses(),
            repairs_done: self.repairs.done.load(Ordering::Relaxed),
            repairs_failed: self.repairs.failed.load(Ordering::Relaxed),
            scrub_passes: self.repairs.scrub_passes.load(Ordering::Relaxed),
            scrub_found: self.repairs.scrub_found.load(Ordering::Relaxed),
            shards: self.placement.read().unwrap_or_else(|p| p.into_inner()).status(self.node_id),
        }
    }
}

impl Service for NodeService {
    fn response_bytes(&self, body: &RequestBody) -> u32 {
        let bytes = match body {
            RequestBody::ReadBlock { read } => self.read_bytes(read),
            // A batch past its limits is refused unread.
            RequestBody::ReadBlocks { reads } => self.batch_bytes(reads).min(BATCH_BYTES_MAX),
            _ => 0,
        };
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }

    async fn handle(&self, peer: &Peer, body: RequestBody) -> Response {
        if !self.inject_latency.is_zero()
            && matches!(
                body,
                RequestBody::ReadBlock { .. }
                    | RequestBody::ReadBlocks { .. }
                    | RequestBody::WriteBlock { .. }
                    | RequestBody::Warm { .. }
            )
        {
            tokio::time::sleep(self.inject_latency).await;
        }
        let result = match body {
            RequestBody::ReadBlock { read } => self.read(read).await.map(ResponseBody::Block),
            RequestBody::ReadBlocks { reads } => match self.check_batch(&reads) {
                Err(e) => Err(e),
                Ok(()) => {
                    let mut out = Vec::with_capacity(reads.len());
                    for read in reads {
                        out.push(self.read(read).await);
                    }
                    Ok(ResponseBody::Blocks(out))
                }
            },
            RequestBody::WriteBlock { shard, block, offset, data } => {
                self.write(shard, block, offset, data).await
            }
            RequestBody::DeleteRange { shard, ino, from_index } => {
                self.delete_range(shard, ino, from_index, true).await
            }
            RequestBody::ReplicateBlock { shard, block, data, crc32 } => {
                self.replicate_block(shard, block, data, crc32).await
            }
            RequestBody::ReplicateDelete { shard, ino, from_index } => {
                self.delete_range(shard, ino, from_index, false).await
            }
            RequestBody::Warm { blocks } => self.warm(blocks).await,
            RequestBody::NodeStatus => Ok(ResponseBody::NodeStatus(Box::new(self.status()))),
            RequestBody::SetPlacement { layout, shards } => self.set_placement(peer, layout, shards).await,
            other => Err(invalid(format!("{} is a meta request; this is a storage node", other.name()))),
        };
        if let Err(e) = &result
            && matches!(e.code, ErrorCode::InvalidArgument)
        {
            warn!(peer = %peer.addr, error = %e, "refused request");
        }
        result
    }
}
