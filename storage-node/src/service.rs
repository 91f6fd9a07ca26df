//! The storage node's RPC service: every block request is checked against the placement table,
//! served from the memory cache or the RocksDB store, and checksummed on the way out.

use std::sync::{Arc, RwLock};
use std::time::Instant;

use augur_proto::msg::{
    BATCH_BLOCKS_MAX, BATCH_BYTES_MAX, BlockData, BlockRead, NodeStatus, RequestBody, Response, ResponseBody,
    ShardPlacement, VolumeLayout,
};
use augur_proto::{BlockId, ErrorCode, Ino, NodeId, Peer, Service, ShardRef, WireError};
use serde_bytes::ByteBuf;
use tracing::{error, warn};

use crate::cache::{BlockCache, CacheKey, CachedBlock};
use crate::placement::PlacementTable;
use crate::space::SpaceMonitor;
use crate::store::{BlockStore, StoreError};

pub struct NodeService {
    store: Arc<BlockStore>,
    cache: BlockCache,
    placement: RwLock<PlacementTable>,
    space: SpaceMonitor,
    node_id: NodeId,
    listen: String,
    started: Instant,
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
            cache,
            placement: RwLock::new(table),
            space,
            listen,
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
        let found = self.blocking(move |s| s.read(shard.volume, shard.shard, block)).await?;
        Ok(found.map(|b| {
            let cached = CachedBlock { data: b.data.into(), crc32: b.crc32 };
            self.cache.insert(key, cached.clone());
            cached
        }))
    }

    async fn read(&self, read: BlockRead) -> Result<BlockData, WireError> {
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
        let mut bytes = 0u64;
        for read in reads {
            // Blocks of shards not held here answer with an error entry, which costs nothing.
            let block_size = self.check(read.shard).unwrap_or(0);
            bytes += read.range.map_or(u64::from(block_size), |r| u64::from(r.len));
        }
        if bytes > BATCH_BYTES_MAX {
            return Err(invalid(format!("batch asks for {bytes} bytes; the maximum is {BATCH_BYTES_MAX}")));
        }
        Ok(())
    }

    async fn write(
        &self,
        shard: ShardRef,
        block: BlockId,
        offset: u32,
        data: ByteBuf,
    ) -> Result<ResponseBody, WireError> {
        let block_size = self.check(shard)?;
        if u64::from(offset) + data.len() as u64 > u64::from(block_size) {
            return Err(invalid(format!(
                "write of {} bytes at offset {offset} overruns the {block_size}-byte block",
                data.len()
            )));
        }
        self.space.check_room(data.len() as u64).map_err(wire)?;
        let key = CacheKey { volume: shard.volume, shard: shard.shard, block };
        // Drop the cached copy before and after: a concurrent read may re-cache the old bytes
        // between our removal and the store write.
        self.cache.remove(&key);
        let len = data.len() as u64;
        self.blocking(move |s| s.write(shard.volume, shard.shard, block, offset, &data, block_size)).await?;
        self.cache.remove(&key);
        metrics::counter!("augur_node_write_bytes_total").increment(len);
        Ok(ResponseBody::Written)
    }

    async fn delete_range(
        &self,
        shard: ShardRef,
        ino: Ino,
        from_index: u64,
    ) -> Result<ResponseBody, WireError> {
        self.check(shard)?;
        self.cache.remove_from(shard.volume, shard.shard, ino, from_index);
        self.blocking(move |s| s.delete_from(shard.volume, shard.shard, ino, from_index)).await?;
        self.cache.remove_from(shard.volume, shard.shard, ino, from_index);
        Ok(ResponseBody::Deleted)
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
        self.placement.read().unwrap_or_else(|p| p.into_inner()).validate(&layout, &shards)?;
        let (l, s) = (layout, shards.clone());
        self.blocking(move |store| store.save_placement(&l, &s)).await?;
        let mut table = self.placement.write().unwrap_or_else(|p| p.into_inner());
        // Validate again under the write lock: another update may have landed meanwhile.
        table.validate(&layout, &shards)?;
        tracing::info!(peer = %peer.name, volume = %layout.volume, shards = shards.len(), "placement updated");
        table.apply(layout, shards);
        Ok(ResponseBody::PlacementSet)
    }

    pub fn status(&self) -> NodeStatus {
        let (capacity_bytes, free_bytes) = self.space.refresh();
        NodeStatus {
            node: self.node_id,
            version: env!("CARGO_PKG_VERSION").to_string(),
            listen: self.listen.clone(),
            uptime_s: self.started.elapsed().as_secs(),
            capacity_bytes,
            free_bytes,
            used_bytes: self.store.used_bytes(),
            blocks_estimate: self.store.blocks_estimate(),
            cache_bytes: self.cache.bytes(),
            cache_bytes_max: self.cache.bytes_max(),
            cache_hits: self.cache.hits(),
            cache_misses: self.cache.misses(),
            shards: self.placement.read().unwrap_or_else(|p| p.into_inner()).status(self.node_id),
        }
    }
}

impl Service for NodeService {
    async fn handle(&self, peer: &Peer, body: RequestBody) -> Response {
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
                self.delete_range(shard, ino, from_index).await
            }
            RequestBody::Warm { blocks } => self.warm(blocks).await,
            RequestBody::NodeStatus => Ok(ResponseBody::NodeStatus(Box::new(self.status()))),
            RequestBody::SetPlacement { layout, shards } => self.set_placement(peer, layout, shards).await,
        };
        if let Err(e) = &result
            && matches!(e.code, ErrorCode::InvalidArgument)
        {
            warn!(peer = %peer.addr, error = %e, "refused request");
        }
        result
    }
}
