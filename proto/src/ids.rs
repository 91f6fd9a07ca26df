//! Identifier newtypes shared by every role. They are plain integers on the wire; the types keep
//! a volume id from ever being passed where a shard id is expected.

use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! id_newtype {
    ($(#[$doc:meta])* $name:ident($inner:ty), $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

id_newtype!(
    /// A volume: a named block space with its own block size, replica count and shard count.
    VolumeId(u64), "vol-"
);
id_newtype!(
    /// A shard of a volume: `hash(inode, index / stripe_unit) mod shard_count`.
    ShardId(u32), "shard-"
);
id_newtype!(
    /// A storage node or meta member.
    NodeId(u64), "node-"
);
id_newtype!(
    /// A shard's placement version; it increases on every change of the shard's replica list.
    Epoch(u64), "e"
);
id_newtype!(
    /// An inode number inside a volume.
    Ino(u64), "ino-"
);

/// Block `index` of inode `ino` covers bytes `[index * block_size, (index + 1) * block_size)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BlockId {
    pub ino: Ino,
    pub index: u64,
}

impl BlockId {
    pub fn new(ino: Ino, index: u64) -> Self {
        Self { ino, index }
    }
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ino, self.index)
    }
}

/// Where a block request was routed: the shard and the placement epoch the sender believed in.
/// A node refuses a request whose epoch is not the shard's current one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ShardRef {
    pub volume: VolumeId,
    pub shard: ShardId,
    pub epoch: Epoch,
}

impl fmt::Display for ShardRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}@{}", self.volume, self.shard, self.epoch)
    }
}
