//! The block data path: route each block to its shard's replicas, read from the nearest
//! in-sync replica and fail over, write through the primary, and refresh placement from the
//! meta group whenever a node says the client's epoch is stale.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use augur_meta::MetaClient;
use augur_proto::meta::VolumeInfo;
use augur_proto::msg::{
    BATCH_BLOCKS_MAX, BATCH_BYTES_MAX, BlockRead, ByteRange, Replica, RequestBody, ResponseBody,
    ShardPlacement,
};
use augur_proto::{BlockId, ErrorCode, Ino, RpcClient, RpcError, ShardId, ShardRef};
use serde_bytes::ByteBuf;
use tracing::{debug, warn};

/// How long one block operation keeps retrying (through node loss, placement changes and
/// elections) before it fails. Longer than the meta group's default dead-node timeout, so a
/// write outlives the failover that makes it possible again.
pub const BLOCK_OP_DEADLINE: Duration = Duration::from_secs(30);
/// Deadline of one attempt against one replica.
pub const BLOCK_ATTEMPT_DEADLINE: Duration = Duration::from_secs(5);
/// A replica that failed at the transport level is tried last for this long.
pub const SUSPECT_FOR: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(1000);

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("no space left on the storage nodes of {0}")]
    NoSpace(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Invalid(String),
    #[error("meta group: {0}")]
    Meta(RpcError),
}

/// What `BlockClient::warm` did.
#[derive(Debug, Default)]
pub struct WarmReport {
    /// Per node: blocks it loaded (each block is asked of every replica of its shard).
    pub loaded: BTreeMap<String, u64>,
    /// Shards and replicas that could not be asked, and why.
    pub errors: Vec<String>,
}

pub struct BlockClient {
    meta: Arc<MetaClient>,
    rpc: Arc<RpcClient>,
    pub volume: VolumeInfo,
    placement: RwLock<HashMap<ShardId, ShardPlacement>>,
    /// Replicas that recently failed to answer at all, and when.
    suspects: std::sync::Mutex<HashMap<SocketAddr, Instant>>,
    pub deadline: Duration,
}

fn addr_of(r: &Replica) -> Option<SocketAddr> {
    r.addr.parse().ok()
}

impl BlockClient {
    /// Opens `volume` by name: learns its parameters and placement.
    pub async fn open(meta: Arc<MetaClient>, rpc: Arc<RpcClient>, volume: &str) -> Result<Self, BlockError> {
        let (info, shards) = sharding(&meta, volume).await?;
        Ok(Self::with_placement(meta, rpc, info, shards))
    }

    /// A client of `volume` routing by `shards` (what the meta group said).
    fn with_placement(
        meta: Arc<MetaClient>,
        rpc: Arc<RpcClient>,
        volume: VolumeInfo,
        shards: Vec<ShardPlacement>,
    ) -> Self {
        Self {
            meta,
            rpc,
            volume,
            placement: RwLock::new(shards.into_iter().map(|p| (p.shard, p)).collect()),
            suspects: std::sync::Mutex::new(HashMap::new()),
            deadline: BLOCK_OP_DEADLINE,
        }
    }

    /// Fetches the placement again (after a node refused our epoch).
    pub async fn refresh(&self) -> Result<(), BlockError> {
        let (_, shards) = sharding(&self.meta, &self.volume.name).await?;
        let mut table = self.placement.write().unwrap_or_else(|p| p.into_inner());
        for p in shards {
            // Never go back to an older epoch than one already learnt.
            if table.get(&p.shard).is_none_or(|old| old.epoch <= p.epoch) {
                table.insert(p.shard, p);
            }
        }
        Ok(())
    }

    /// The placement the client currently routes `shard` with.
    pub fn placement_of(&self, shard: ShardId) -> Option<ShardPlacement> {
        self.placement.read().unwrap_or_else(|p| p.into_inner()).get(&shard).cloned()
    }

    fn route(&self, block: BlockId) -> Result<(ShardRef, Vec<Replica>), BlockError> {
        let shard = self.volume.shard_of(block.ino, block.index);
        let p = self
            .placement_of(shard)
            .ok_or_else(|| BlockError::Unavailable(format!("no placement known for {shard}")))?;
        Ok((ShardRef { volume: self.volume.id, shard, epoch: p.epoch }, p.replicas))
    }

    /// Replicas ordered for reading: lowest measured round trip first, the primary first
    /// among those not measured yet, and replicas that just failed to answer last.
    fn read_order(&self, replicas: Vec<Replica>) -> Vec<Replica> {
        let suspects = self.suspects.lock().unwrap_or_else(|p| p.into_inner());
        let mut ranked: Vec<(bool, Duration, usize, Replica)> = replicas
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let addr = addr_of(&r);
                let suspect =
                    addr.and_then(|a| suspects.get(&a)).is_some_and(|since| since.elapsed() < SUSPECT_FOR);
                let rtt = addr.and_then(|a| self.rpc.rtt(a)).unwrap_or(Duration::from_secs(1));
                (suspect, rtt, i, r)
            })
            .collect();
        ranked.sort_by_key(|(suspect, rtt, i, _)| (*suspect, *rtt, *i));
        ranked.into_iter().map(|(_, _, _, r)| r).collect()
    }

    fn suspect(&self, addr: SocketAddr) {
        let mut suspects = self.suspects.lock().unwrap_or_else(|p| p.into_inner());
        suspects.retain(|_, since| since.elapsed() < SUSPECT_FOR);
        suspects.insert(addr, Instant::now());
    }

    /// Reads a whole block (bytes past what was ever written read as zeros: the result may be
    /// shorter than the block size). Verifies the CRC again on arrival.
    pub async fn read(&self, block: BlockId) -> Result<Vec<u8>, BlockError> {
        self.read_range(block, None).await
    }

    /// Reads `range` of a block (all of it when `None`); the result may be shorter than asked
    /// (bytes never written read as zeros).
    pub async fn read_range(&self, block: BlockId, range: Option<ByteRange>) -> Result<Vec<u8>, BlockError> {
        let started = Instant::now();
        let mut backoff = BACKOFF_MIN;
        loop {
            let (shard, replicas) = self.route(block)?;
            let mut refresh = false;
            let mut last = String::from("no replicas");
            for r in self.read_order(replicas) {
                let Some(addr) = addr_of(&r) else { continue };
                let body = RequestBody::ReadBlock { read: BlockRead { shard, block, range } };
                match self.rpc.call_with_deadline(addr, body, BLOCK_ATTEMPT_DEADLINE).await {
                    Ok(ResponseBody::Block(b)) if crc32fast::hash(&b.data) == b.crc32 => {
                        return Ok(b.data.into_vec());
                    }
                    Ok(ResponseBody::Block(_)) => {
                        warn!(%block, node = %r.node, "block failed its checksum in transit; trying another replica");
                        last = format!("{} sent a damaged block", r.node);
                    }
                    Ok(other) => last = format!("{} answered {other:?}", r.node),
                    Err(e) => {
                        if matches!(
                            e.code(),
                            Some(
                                ErrorCode::StaleEpoch { .. }
                                    | ErrorCode::ShardNotHere
                                    | ErrorCode::EpochAhead { .. }
                            )
                        ) {
                            refresh = true;
                        }
                        if e.is_transport() {
                            self.suspect(addr);
                        }
                        debug!(%block, node = %r.node, error = %e, "read failed on one replica");
                        last = e.to_string();
                    }
                }
            }
            if started.elapsed() >= self.deadline {
                return Err(BlockError::Unavailable(format!(
                    "reading {block}: every replica failed; last: {last}"
                )));
            }
            if refresh {
                self.refresh().await?;
            } else {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                let _ = self.refresh().await;
            }
        }
    }

    /// `PrefetchData`: asks every replica of each block's shard to load the block into its
    /// memory cache, so the next read from any replica is served from memory (blocks never
    /// written load nothing). Requests stay within `BATCH_BLOCKS_MAX` blocks and
    /// `BATCH_BYTES_MAX` bytes; they go one at a time. A replica that fails, or a shard whose
    /// replicas cannot be found, is reported and the rest go on.
    pub async fn warm(&self, blocks: &[BlockId]) -> WarmReport {
        let mut by_shard: BTreeMap<ShardId, Vec<BlockId>> = BTreeMap::new();
        for &b in blocks {
            by_shard.entry(self.volume.shard_of(b.ino, b.index)).or_default().push(b);
        }
        let per_request = (BATCH_BYTES_MAX / u64::from(self.volume.block_size_bytes).max(1))
            .clamp(1, BATCH_BLOCKS_MAX as u64) as usize;
        let mut report = WarmReport::default();
        for ids in by_shard.values() {
            let (shard, replicas) = match self.route(ids[0]) {
                Ok(route) => route,
                Err(e) => {
                    report.errors.push(format!("{e} ({} blocks not warmed)", ids.len()));
                    continue;
                }
            };
            for chunk in ids.chunks(per_request) {
                let reads: Vec<BlockRead> =
                    chunk.iter().map(|&block| BlockRead { shard, block, range: None }).collect();
                for r in &replicas {
                    let Some(addr) = addr_of(r) else {
                        report.errors.push(format!("{}: unusable address {:?}", r.node, r.addr));
                        continue;
                    };
                    let body = RequestBody::Warm { blocks: reads.clone() };
                    match self.rpc.call_with_deadline(addr, body, BLOCK_ATTEMPT_DEADLINE).await {
                        Ok(ResponseBody::Warmed { loaded }) => {
                            *report.loaded.entry(r.node.to_string()).or_default() += u64::from(loaded);
                        }
                        Ok(other) => report.errors.push(format!("{} ({addr}) answered {other:?}", r.node)),
                        Err(e) => report.errors.push(format!("{} ({addr}): {e}", r.node)),
                    }
                }
            }
        }
        report
    }

    /// Writes `data` at `offset` in a block through the shard's primary, which acks once every
    /// in-sync replica has it.
    pub async fn write(&self, block: BlockId, offset: u32, data: &[u8]) -> Result<(), BlockError> {
        if u64::from(offset) + data.len() as u64 > u64::from(self.volume.block_size_bytes) {
            return Err(BlockError::Invalid(format!(
                "write of {} bytes at {offset} overruns the {}-byte block",
                data.len(),
                self.volume.block_size_bytes
            )));
        }
        let data = ByteBuf::from(data.to_vec());
        let shard = self.volume.shard_of(block.ino, block.index);
        self.through_primary(shard, block, |shard| RequestBody::WriteBlock {
            shard,
            block,
            offset,
            data: data.clone(),
        })
        .await
    }

    /// Deletes the blocks of `ino` from `from_index` on, in every shard (truncate, unlink).
    pub async fn delete_from(&self, ino: Ino, from_index: u64) -> Result<(), BlockError> {
        for s in 0..self.volume.shard_count {
            self.delete_in(ShardId(s), ino, from_index).await?;
        }
        Ok(())
    }

    /// Deletes the blocks of `ino` from `from_index` on that live in `shard`.
    pub async fn delete_in(&self, shard: ShardId, ino: Ino, from_index: u64) -> Result<(), BlockError> {
        let probe = BlockId::new(ino, from_index);
        self.through_primary(shard, probe, |shard| RequestBody::DeleteRange { shard, ino, from_index }).await
    }

    async fn through_primary(
        &self,
        shard: ShardId,
        what: BlockId,
        body: impl Fn(ShardRef) -> RequestBody,
    ) -> Result<(), BlockError> {
        let started = Instant::now();
        let mut backoff = BACKOFF_MIN;
        loop {
            let p = self
                .placement_of(shard)
                .ok_or_else(|| BlockError::Unavailable(format!("no placement known for {shard}")))?;
            let shard_ref = ShardRef { volume: self.volume.id, shard, epoch: p.epoch };
            let primary = p.replicas.first().cloned();
            let result = match primary.as_ref().and_then(addr_of) {
                Some(addr) => {
                    self.rpc.call_with_deadline(addr, body(shard_ref), BLOCK_ATTEMPT_DEADLINE).await
                }
                None => {
                    Err(RpcError::Unexpected { addr: String::new(), what: format!("{shard} has no primary") })
                }
            };
            let err = match result {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            match err.code() {
                Some(ErrorCode::NoSpace) => return Err(BlockError::NoSpace(shard.to_string())),
                Some(ErrorCode::InvalidArgument | ErrorCode::PermissionDenied) => {
                    return Err(BlockError::Invalid(err.to_string()));
                }
                _ => {}
            }
            if started.elapsed() >= self.deadline {
                return Err(BlockError::Unavailable(format!("writing {what} to {shard}: {err}")));
            }
            debug!(%shard, error = %err, "write attempt failed; retrying");
            match err.code() {
                // The client is behind: learn the new placement and go again at once.
                Some(ErrorCode::StaleEpoch { .. } | ErrorCode::ShardNotHere | ErrorCode::NotPrimary) => {
                    self.refresh().await?;
                }
                // The node is behind, or a replica is down: give the meta group time to act.
                _ => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    let _ = self.refresh().await;
                }
            }
        }
    }
}

async fn sharding(meta: &MetaClient, volume: &str) -> Result<(VolumeInfo, Vec<ShardPlacement>), BlockError> {
    match meta.call(RequestBody::GetVolumeShardingInfo { volume: volume.to_string() }).await {
        Ok(ResponseBody::Sharding(info)) => Ok((info.volume, info.shards)),
        Ok(other) => {
            Err(BlockError::Unavailable(format!("unexpected answer to GetVolumeShardingInfo: {other:?}")))
        }
        Err(e) => Err(BlockError::Meta(e)),
    }
}

#[cfg(test)]
mod tests {
    use augur_proto::meta::{VolumeHints, VolumeInfo};
    use augur_proto::tls::{self, Role, TlsIdentity};
    use augur_proto::{Epoch, NodeId, VolumeId};

    use super::*;

    /// A client of a two-shard volume whose placement table holds only `placed` (no meta group:
    /// nothing here asks it).
    fn client(dir: &std::path::Path, placed: Vec<ShardPlacement>) -> BlockClient {
        tls::init_ca(&dir.join("ca"), "warm-test").unwrap();
        tls::issue(&dir.join("ca"), Role::Client, "client", &dir.join("client")).unwrap();
        let rpc = Arc::new(RpcClient::new(&TlsIdentity::load(&dir.join("client")).unwrap()).unwrap());
        let volume = VolumeInfo {
            id: VolumeId(1),
            name: "v".into(),
            block_size_bytes: 64 << 10,
            replicas: 1,
            shard_count: 2,
            stripe_unit_blocks: 1,
            created_unix_ms: 0,
            hints: VolumeHints::default(),
            inodes: 0,
        };
        BlockClient::with_placement(Arc::new(MetaClient::new(rpc.clone(), Vec::new())), rpc, volume, placed)
    }

    #[tokio::test]
    async fn warm_reports_what_it_cannot_ask_and_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        // Shard 0 (asked first) is placed nowhere; shard 1 lives on two nodes registered
        // without a usable address.
        let unusable = |n| Replica { node: NodeId(n), addr: "not an address".into() };
        let replicas = vec![unusable(7), unusable(8)];
        let placed = vec![ShardPlacement { shard: ShardId(1), epoch: Epoch(1), replicas }];
        let c = client(dir.path(), placed);
        let blocks: Vec<BlockId> = (0..64).map(|i| BlockId::new(Ino(9), i)).collect();
        let unplaced = blocks.iter().filter(|b| c.volume.shard_of(b.ino, b.index) == ShardId(0)).count();
        assert!(unplaced > 0 && unplaced < blocks.len(), "the blocks must span both shards");

        let report = c.warm(&blocks).await;
        assert!(report.loaded.is_empty(), "{report:?}");
        let no_placement = format!("no placement known for {} ({unplaced} blocks not warmed)", ShardId(0));
        assert_eq!(report.errors.iter().filter(|e| **e == no_placement).count(), 1, "{report:?}");
        for node in ["node-7", "node-8"] {
            let said = format!("{node}: unusable address \"not an address\"");
            assert!(report.errors.contains(&said), "every replica is tried: {report:?}");
        }
        // Every error is one of the two: the unplaced shard did not stop the placed one's turn.
        assert!(report.errors.iter().all(|e| *e == no_placement || e.contains("unusable address")));
    }
}
