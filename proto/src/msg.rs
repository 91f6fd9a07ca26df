//! Wire messages. One request enum for every service so that one server loop, one framing and
//! one role check serve all roles; each variant says which certificate roles may send it.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::error::WireError;
use crate::ids::{BlockId, Epoch, Ino, NodeId, ShardId, ShardRef, VolumeId};
use crate::meta::{
    ClusterStatus, MetaStatus, NodeAssignment, NodeRegistration, NsOp, NsReply, RequestTag, ShardLoad,
    ShardingInfo, VolumeInfo, VolumeSpec,
};
use crate::tls::Role;

/// Protocol version carried in every frame header. Bump on any incompatible change of the
/// messages below; peers refuse other versions with `ErrorCode::UnsupportedVersion`.
pub const PROTOCOL_VERSION: u16 = 2;

/// Smallest and largest block sizes a volume may have (SPEC §2).
pub const BLOCK_SIZE_MIN_BYTES: u32 = 4 * 1024;
pub const BLOCK_SIZE_MAX_BYTES: u32 = 4 * 1024 * 1024;
/// Most blocks one batched read or warm request may name.
pub const BATCH_BLOCKS_MAX: usize = 256;
/// Most payload bytes one batched read may return; the node refuses larger batches.
pub const BATCH_BYTES_MAX: u64 = 8 * 1024 * 1024;
/// Longest deadline a request may ask for; longer ones are clamped.
pub const DEADLINE_MS_MAX: u32 = 120_000;

/// A request: its deadline (relative, since peers' clocks are not synchronised) and its body.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Request {
    /// Milliseconds the caller will wait; the server abandons the work after that.
    pub deadline_ms: u32,
    pub body: RequestBody,
}

/// A byte range inside one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteRange {
    pub offset: u32,
    pub len: u32,
}

/// One block to read in a batched read or to warm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRead {
    pub shard: ShardRef,
    pub block: BlockId,
    /// `None` reads the whole block.
    pub range: Option<ByteRange>,
}

/// A volume's parameters as a storage node needs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeLayout {
    pub volume: VolumeId,
    pub block_size_bytes: u32,
}

/// One replica of a shard: the node and the address it serves on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    pub node: NodeId,
    pub addr: String,
}

/// Where a shard lives: an ordered replica list (first = primary) at an epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardPlacement {
    pub shard: ShardId,
    pub epoch: Epoch,
    pub replicas: Vec<Replica>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum RequestBody {
    /// Read one block, whole or a byte range of it.
    ReadBlock {
        read: BlockRead,
    },
    /// Read many blocks in one round trip; each gets its own result.
    ReadBlocks {
        reads: Vec<BlockRead>,
    },
    /// Write `data` into a block at `offset` (a partial write is read-modify-write on the node).
    WriteBlock {
        shard: ShardRef,
        block: BlockId,
        offset: u32,
        data: ByteBuf,
    },
    /// Delete the blocks of `ino` with index >= `from_index` held by this shard (truncate/unlink).
    DeleteRange {
        shard: ShardRef,
        ino: Ino,
        from_index: u64,
    },
    /// Load blocks into the node's memory cache ahead of reads.
    Warm {
        blocks: Vec<BlockRead>,
    },
    /// The node's state: capacity, use, cache, shards.
    NodeStatus,
    /// Admin: set a volume's layout and the placement of some of its shards on this node.
    SetPlacement {
        layout: VolumeLayout,
        shards: Vec<ShardPlacement>,
    },

    // ---- primary -> backup replication (node to node) ----
    /// Store this whole block exactly as the shard's primary now holds it.
    ReplicateBlock {
        shard: ShardRef,
        block: BlockId,
        data: ByteBuf,
        crc32: u32,
    },
    /// Delete a range of blocks, as the primary did.
    ReplicateDelete {
        shard: ShardRef,
        ino: Ino,
        from_index: u64,
    },

    // ---- meta group ----
    /// Raft messages between members (raft-rs `eraftpb::Message`, protobuf-encoded).
    Raft {
        msgs: Vec<ByteBuf>,
    },
    /// Part of the snapshot at `index` that the member serving it holds, from byte `offset`.
    SnapshotChunk {
        index: u64,
        offset: u64,
    },
    /// This member's view of the group.
    MetaStatus,
    /// Admin: add a voting member (it must be started with `--join`).
    AddMember {
        id: u64,
        addr: String,
    },
    /// Admin: remove a member.
    RemoveMember {
        id: u64,
    },
    /// A storage node announces itself (and its address) to the group.
    RegisterNode(NodeRegistration),
    /// A storage node's periodic report; the answer carries its placement when it changed.
    Heartbeat {
        node: NodeId,
        capacity_bytes: u64,
        used_bytes: u64,
        loads: Vec<ShardLoad>,
        placement_version: u64,
    },
    CreateVolume(VolumeSpec),
    DeleteVolume {
        name: String,
    },
    ListVolumes,
    GetVolume {
        name: String,
    },
    GetVolumeShardingInfo {
        volume: String,
    },
    SetPrefetchHint {
        volume: String,
        hint_type: String,
        hint_value: String,
    },
    /// Admin: give a shard a new replica list (first = primary); its epoch increases.
    SetShardReplicas {
        volume: String,
        shard: ShardId,
        nodes: Vec<NodeId>,
    },
    ClusterStatus,
    /// A namespace operation on a volume.
    Ns {
        volume: VolumeId,
        op: NsOp,
        tag: Option<RequestTag>,
    },
}

impl RequestBody {
    /// Certificate roles allowed to send this request.
    pub fn allowed_roles(&self) -> &'static [Role] {
        use Role::*;
        match self {
            RequestBody::ReadBlock { .. }
            | RequestBody::ReadBlocks { .. }
            | RequestBody::WriteBlock { .. }
            | RequestBody::DeleteRange { .. }
            | RequestBody::Warm { .. } => &[Client, Node, Admin],
            RequestBody::NodeStatus => &[Client, Node, Meta, Admin],
            RequestBody::SetPlacement { .. } => &[Meta, Admin],
            RequestBody::ReplicateBlock { .. } | RequestBody::ReplicateDelete { .. } => &[Node],
            RequestBody::Raft { .. } | RequestBody::SnapshotChunk { .. } => &[Meta],
            RequestBody::MetaStatus | RequestBody::ClusterStatus => &[Client, Node, Meta, Admin],
            RequestBody::AddMember { .. }
            | RequestBody::RemoveMember { .. }
            | RequestBody::CreateVolume(_)
            | RequestBody::DeleteVolume { .. }
            | RequestBody::SetShardReplicas { .. } => &[Admin],
            RequestBody::RegisterNode(_) | RequestBody::Heartbeat { .. } => &[Node],
            RequestBody::ListVolumes
            | RequestBody::GetVolume { .. }
            | RequestBody::GetVolumeShardingInfo { .. } => &[Client, Node, Admin],
            RequestBody::SetPrefetchHint { .. } | RequestBody::Ns { .. } => &[Client, Admin],
        }
    }

    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            RequestBody::ReadBlock { .. } => "read_block",
            RequestBody::ReadBlocks { .. } => "read_blocks",
            RequestBody::WriteBlock { .. } => "write_block",
            RequestBody::DeleteRange { .. } => "delete_range",
            RequestBody::Warm { .. } => "warm",
            RequestBody::NodeStatus => "node_status",
            RequestBody::SetPlacement { .. } => "set_placement",
            RequestBody::ReplicateBlock { .. } => "replicate_block",
            RequestBody::ReplicateDelete { .. } => "replicate_delete",
            RequestBody::Raft { .. } => "raft",
            RequestBody::SnapshotChunk { .. } => "snapshot_chunk",
            RequestBody::MetaStatus => "meta_status",
            RequestBody::AddMember { .. } => "add_member",
            RequestBody::RemoveMember { .. } => "remove_member",
            RequestBody::RegisterNode(_) => "register_node",
            RequestBody::Heartbeat { .. } => "heartbeat",
            RequestBody::CreateVolume(_) => "create_volume",
            RequestBody::DeleteVolume { .. } => "delete_volume",
            RequestBody::ListVolumes => "list_volumes",
            RequestBody::GetVolume { .. } => "get_volume",
            RequestBody::GetVolumeShardingInfo { .. } => "get_volume_sharding_info",
            RequestBody::SetPrefetchHint { .. } => "set_prefetch_hint",
            RequestBody::SetShardReplicas { .. } => "set_shard_replicas",
            RequestBody::ClusterStatus => "cluster_status",
            RequestBody::Ns { op, .. } => op.name(),
        }
    }
}

/// Block bytes as returned by a read. `data` may be shorter than asked: the rest reads as zeros
/// (blocks are sparse). `crc32` covers `data`, so the client checks it again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockData {
    pub data: ByteBuf,
    pub crc32: u32,
}

/// One shard as a node holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardStatus {
    pub volume: VolumeId,
    pub shard: ShardId,
    pub epoch: Epoch,
    pub is_primary: bool,
}

/// What `NodeStatus` reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: NodeId,
    pub version: String,
    pub listen: String,
    pub uptime_s: u64,
    pub capacity_bytes: u64,
    pub free_bytes: u64,
    pub used_bytes: u64,
    pub blocks_estimate: u64,
    pub cache_bytes: u64,
    pub cache_bytes_max: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// RocksDB stopped writing for want of space; writes are refused until the disk has room.
    pub store_stopped: bool,
    /// Damaged stored copies replaced by a sound one from another replica since start.
    pub repairs_done: u64,
    /// Damaged copies found with no sound copy to repair them from since start.
    pub repairs_failed: u64,
    /// Scrub passes over every stored block finished since start.
    pub scrub_passes: u64,
    /// Damaged copies the scrub found since start (each then repaired, or counted failed).
    pub scrub_found: u64,
    pub shards: Vec<ShardStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseBody {
    Block(BlockData),
    Blocks(Vec<Result<BlockData, WireError>>),
    Written,
    Deleted,
    Warmed {
        loaded: u32,
    },
    NodeStatus(Box<NodeStatus>),
    PlacementSet,
    Replicated,
    RaftAccepted,
    SnapshotChunk {
        data: ByteBuf,
        total_bytes: u64,
    },
    MetaStatus(Box<MetaStatus>),
    /// Registration or heartbeat answer: the node's placement when it changed since
    /// `placement_version` (None: unchanged).
    NodeAck {
        placement_version: u64,
        assignments: Option<Vec<NodeAssignment>>,
    },
    Volume(Box<VolumeInfo>),
    Volumes(Vec<VolumeInfo>),
    Sharding(Box<ShardingInfo>),
    Cluster(Box<ClusterStatus>),
    Ns(NsReply),
    Done,
}

pub type Response = Result<ResponseBody, WireError>;
