//! Wire messages. One request enum for every service so that one server loop, one framing and
//! one role check serve all roles; each variant says which certificate roles may send it.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::error::WireError;
use crate::ids::{BlockId, Epoch, Ino, NodeId, ShardId, ShardRef, VolumeId};
use crate::tls::Role;

/// Protocol version carried in every frame header. Bump on any incompatible change of the
/// messages below; peers refuse other versions with `ErrorCode::UnsupportedVersion`.
pub const PROTOCOL_VERSION: u16 = 1;

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
    ReadBlock { read: BlockRead },
    /// Read many blocks in one round trip; each gets its own result.
    ReadBlocks { reads: Vec<BlockRead> },
    /// Write `data` into a block at `offset` (a partial write is read-modify-write on the node).
    WriteBlock { shard: ShardRef, block: BlockId, offset: u32, data: ByteBuf },
    /// Delete the blocks of `ino` with index >= `from_index` held by this shard (truncate/unlink).
    DeleteRange { shard: ShardRef, ino: Ino, from_index: u64 },
    /// Load blocks into the node's memory cache ahead of reads.
    Warm { blocks: Vec<BlockRead> },
    /// The node's state: capacity, use, cache, shards.
    NodeStatus,
    /// Admin: set a volume's layout and the placement of some of its shards on this node.
    SetPlacement { layout: VolumeLayout, shards: Vec<ShardPlacement> },
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
    pub shards: Vec<ShardStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseBody {
    Block(BlockData),
    Blocks(Vec<Result<BlockData, WireError>>),
    Written,
    Deleted,
    Warmed { loaded: u32 },
    NodeStatus(Box<NodeStatus>),
    PlacementSet,
}

pub type Response = Result<ResponseBody, WireError>;
