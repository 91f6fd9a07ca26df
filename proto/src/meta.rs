//! Messages of the metadata group: members, storage-node registry, volumes, shard placement,
//! prefetch hints and the namespace. The types are shared by the meta members (which serve
//! them), the storage nodes (which register and heartbeat) and every client.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::ids::{Ino, NodeId, ShardId, VolumeId};
use crate::msg::{BLOCK_SIZE_MAX_BYTES, BLOCK_SIZE_MIN_BYTES, ShardPlacement};

/// Longest volume name.
pub const VOLUME_NAME_MAX_BYTES: usize = 64;
/// Most replicas a shard may have.
pub const REPLICAS_MAX: u8 = 7;
/// Most shards a volume may have (a power of two).
pub const SHARDS_MAX: u32 = 4096;
/// Largest stripe unit, in blocks.
pub const STRIPE_UNIT_MAX_BLOCKS: u32 = 1 << 20;
/// Longest file name (one path component), as in Linux.
pub const NAME_MAX_BYTES: usize = 255;
/// Longest symlink target, as Linux's PATH_MAX.
pub const SYMLINK_MAX_BYTES: usize = 4096;
/// Longest extended attribute name (Linux XATTR_NAME_MAX).
pub const XATTR_NAME_MAX_BYTES: usize = 255;
/// Largest extended attribute value (Linux XATTR_SIZE_MAX).
pub const XATTR_VALUE_MAX_BYTES: usize = 64 * 1024;
/// Most extended attributes one inode may carry.
pub const XATTRS_PER_INODE_MAX: usize = 1024;
/// Most entries one `ReadDir` returns; callers page with `after`.
pub const READDIR_ENTRIES_MAX: u32 = 1024;
/// Largest `readahead:<blocks>` hint.
pub const READAHEAD_BLOCKS_MAX: u32 = 4096;
/// Largest file size (bytes): 2^63 - 1, as `off_t` allows.
pub const FILE_SIZE_MAX: u64 = i64::MAX as u64;
/// The root directory of every volume.
pub const ROOT_INO: Ino = Ino(1);

/// A volume's shape, as asked for at creation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub name: String,
    pub block_size_bytes: u32,
    pub replicas: u8,
    pub shard_count: u32,
    pub stripe_unit_blocks: u32,
}

impl VolumeSpec {
    /// The defaults of SPEC §2: 64 KiB blocks, 3 replicas, 16 shards, stripe unit 16 blocks.
    pub fn with_defaults(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            block_size_bytes: 64 * 1024,
            replicas: 3,
            shard_count: 16,
            stripe_unit_blocks: 16,
        }
    }

    /// Checks every field; the error names the bad one.
    pub fn validate(&self) -> Result<(), String> {
        validate_volume_name(&self.name)?;
        let bs = self.block_size_bytes;
        if !(BLOCK_SIZE_MIN_BYTES..=BLOCK_SIZE_MAX_BYTES).contains(&bs) || !bs.is_power_of_two() {
            return Err(format!(
                "block size {bs} is not a power of two between {BLOCK_SIZE_MIN_BYTES} and {BLOCK_SIZE_MAX_BYTES}"
            ));
        }
        if !(1..=REPLICAS_MAX).contains(&self.replicas) {
            return Err(format!("replica count {} is not between 1 and {REPLICAS_MAX}", self.replicas));
        }
        if !self.shard_count.is_power_of_two() || self.shard_count > SHARDS_MAX {
            return Err(format!("shard count {} is not a power of two up to {SHARDS_MAX}", self.shard_count));
        }
        if !(1..=STRIPE_UNIT_MAX_BLOCKS).contains(&self.stripe_unit_blocks) {
            return Err(format!(
                "stripe unit {} blocks is not between 1 and {STRIPE_UNIT_MAX_BLOCKS}",
                self.stripe_unit_blocks
            ));
        }
        Ok(())
    }
}

/// Volume names: 1–64 bytes of ASCII letters, digits, `-`, `_` and `.`, not starting with `.`.
pub fn validate_volume_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty()
        || name.len() > VOLUME_NAME_MAX_BYTES
        || name.starts_with('.')
        || !name.chars().all(ok_char)
    {
        return Err(format!(
            "volume name {name:?} must be 1-{VOLUME_NAME_MAX_BYTES} of [A-Za-z0-9._-], not starting with '.'"
        ));
    }
    Ok(())
}

/// The shard a block lives in: `hash(inode, index / stripe_unit) mod shard_count` (SPEC §2).
/// The hash is SplitMix64's finaliser: stable across builds and platforms.
pub fn shard_of(ino: Ino, index: u64, stripe_unit_blocks: u32, shard_count: u32) -> ShardId {
    let stripe = index / u64::from(stripe_unit_blocks.max(1));
    let mut x = ino.0.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ stripe;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    ShardId((x % u64::from(shard_count.max(1))) as u32)
}

/// How the prefetch engine treats a file, directory or volume (`user.augur.prefetch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum PrefetchMode {
    /// The learned model decides.
    #[default]
    Auto,
    Sequential,
    Random,
    Off,
    /// Always read this many blocks ahead.
    Readahead(u32),
}

impl FromStr for PrefetchMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "sequential" => Ok(Self::Sequential),
            "random" => Ok(Self::Random),
            "off" => Ok(Self::Off),
            _ => {
                let bad = || {
                    format!(
                        "prefetch hint {s:?} is not one of auto, sequential, random, off, readahead:<1-{READAHEAD_BLOCKS_MAX}>"
                    )
                };
                let n = s.strip_prefix("readahead:").ok_or_else(bad)?;
                // Digits only: no sign, no spaces, no leading '+'.
                if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                match n.parse::<u32>() {
                    Ok(v) if (1..=READAHEAD_BLOCKS_MAX).contains(&v) => Ok(Self::Readahead(v)),
                    _ => Err(bad()),
                }
            }
        }
    }
}

impl fmt::Display for PrefetchMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Sequential => f.write_str("sequential"),
            Self::Random => f.write_str("random"),
            Self::Off => f.write_str("off"),
            Self::Readahead(n) => write!(f, "readahead:{n}"),
        }
    }
}

/// What kind of data a file holds, as detected or as overridden (`user.augur.filetype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileType {
    Image,
    Database,
    Other,
}

impl FromStr for FileType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "image" => Ok(Self::Image),
            "database" => Ok(Self::Database),
            "other" => Ok(Self::Other),
            _ => Err(format!("file type {s:?} is not one of image, database, other")),
        }
    }
}

impl FileType {
    /// Every group, in `index` order.
    pub const ALL: [FileType; 3] = [Self::Image, Self::Database, Self::Other];

    /// The group's place in `ALL` (for tables kept per group).
    pub fn index(self) -> usize {
        match self {
            Self::Image => 0,
            Self::Database => 1,
            Self::Other => 2,
        }
    }
}

impl fmt::Display for FileType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Image => "image",
            Self::Database => "database",
            Self::Other => "other",
        })
    }
}

/// A volume's hints, set with `SetPrefetchHint`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct VolumeHints {
    /// Hint type `prefetch`: the volume-wide default mode.
    pub prefetch: PrefetchMode,
    /// Hint type `filetype`: treat every file as this type unless a file says otherwise
    /// (`auto` clears it).
    pub filetype: Option<FileType>,
}

impl VolumeHints {
    /// Parses `hint_type` / `hint_value` strictly and applies it; the error names the bad part.
    pub fn set(&mut self, hint_type: &str, hint_value: &str) -> Result<(), String> {
        match hint_type {
            "prefetch" => self.prefetch = hint_value.parse()?,
            "filetype" => {
                self.filetype = match hint_value {
                    "auto" => None,
                    v => Some(v.parse().map_err(|e| format!("{e} (or auto)"))?),
                }
            }
            other => return Err(format!("hint type {other:?} is not one of prefetch, filetype")),
        }
        Ok(())
    }
}

/// A volume as the meta group records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub id: VolumeId,
    pub name: String,
    pub block_size_bytes: u32,
    pub replicas: u8,
    pub shard_count: u32,
    pub stripe_unit_blocks: u32,
    pub created_unix_ms: u64,
    pub hints: VolumeHints,
    /// Inodes in use (files, directories, links, and unlinked-but-open files).
    pub inodes: u64,
}

impl VolumeInfo {
    pub fn shard_of(&self, ino: Ino, index: u64) -> ShardId {
        shard_of(ino, index, self.stripe_unit_blocks, self.shard_count)
    }
}

/// Storage performance class of a node; placement prefers faster classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, PartialOrd, Ord)]
pub enum PerfClass {
    Hdd,
    #[default]
    Ssd,
    Nvme,
}

impl FromStr for PerfClass {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "hdd" => Ok(Self::Hdd),
            "ssd" => Ok(Self::Ssd),
            "nvme" => Ok(Self::Nvme),
            _ => Err(format!("performance class {s:?} is not one of hdd, ssd, nvme")),
        }
    }
}

impl fmt::Display for PerfClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Hdd => "hdd",
            Self::Ssd => "ssd",
            Self::Nvme => "nvme",
        })
    }
}

/// What a storage node says about itself when it registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRegistration {
    pub node: NodeId,
    pub addr: String,
    pub zone: Option<String>,
    pub perf_class: PerfClass,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
}

/// One shard's load over one heartbeat interval, as its node measured it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ShardLoad {
    pub volume: VolumeId,
    pub shard: ShardId,
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub latency_mean_us: u64,
    pub latency_max_us: u64,
}

/// A storage node as `cluster status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node: NodeId,
    pub addr: String,
    pub zone: Option<String>,
    pub perf_class: PerfClass,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    /// Heartbeat seen by the current leader within the liveness timeout.
    pub alive: bool,
    /// Milliseconds since the current leader last heard from it (None: not since it took over).
    pub last_heartbeat_ms_ago: Option<u64>,
    /// Read + write operations per second over the last heartbeat interval.
    pub iops: u64,
    pub shards: u32,
}

/// A meta member as `meta status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub id: u64,
    pub addr: String,
    pub voter: bool,
    /// Highest log index known replicated to it (leader's view only).
    pub matched: Option<u64>,
}

/// One member's view of the group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaStatus {
    pub id: u64,
    pub addr: String,
    pub role: String,
    pub leader: Option<u64>,
    pub leader_addr: Option<String>,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    pub first_index: u64,
    pub last_index: u64,
    pub members: Vec<MemberInfo>,
}

/// The whole cluster as the leader sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub meta: MetaStatus,
    pub nodes: Vec<NodeInfo>,
    pub volumes: Vec<VolumeInfo>,
}

/// What a storage node must hold for one volume (heartbeat answer, placement push).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAssignment {
    pub layout: crate::msg::VolumeLayout,
    pub shards: Vec<ShardPlacement>,
}

/// `GetVolumeShardingInfo`: a volume and where every shard lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardingInfo {
    pub volume: VolumeInfo,
    pub shards: Vec<ShardPlacement>,
    /// Why each shard sits where it does, one line per shard (same order as `shards`).
    pub explain: Vec<String>,
}

// ---- namespace ----

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

/// Seconds and nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

impl Timestamp {
    pub fn now() -> Self {
        let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Self { secs: d.as_secs() as i64, nanos: d.subsec_nanos() }
    }
}

/// An inode's attributes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    pub ino: Ino,
    pub kind: FileKind,
    /// Permission bits, including setuid/setgid/sticky (`mode & 0o7777`).
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub rdev: u32,
}

/// A time to set: the server's clock at commit, or a given value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimeSet {
    Now,
    At(Timestamp),
}

/// `SetAttr`: every field that is `Some` is changed; ctime is updated whenever anything is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SetAttr {
    pub perm: Option<u16>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: ByteBuf,
    pub ino: Ino,
    pub kind: FileKind,
}

/// How `SetXattr` treats an existing attribute (Linux XATTR_CREATE / XATTR_REPLACE).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum XattrMode {
    Upsert,
    CreateOnly,
    ReplaceOnly,
}

/// Namespace operations. Reads are served after a ReadIndex round; writes go through Raft.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NsOp {
    Lookup {
        parent: Ino,
        name: ByteBuf,
    },
    GetAttr {
        ino: Ino,
    },
    ReadDir {
        ino: Ino,
        after: Option<ByteBuf>,
        limit: u32,
    },
    ReadLink {
        ino: Ino,
    },
    GetXattr {
        ino: Ino,
        name: ByteBuf,
    },
    ListXattr {
        ino: Ino,
    },
    StatFs,
    /// Create a file, directory, symlink (with `target`), fifo, socket or device node.
    MkNode {
        parent: Ino,
        name: ByteBuf,
        kind: FileKind,
        perm: u16,
        uid: u32,
        gid: u32,
        rdev: u32,
        target: Option<ByteBuf>,
    },
    SetAttr {
        ino: Ino,
        set: SetAttr,
    },
    /// Grow the size to at least `size` and set mtime (after a write past the end).
    Extend {
        ino: Ino,
        size: u64,
    },
    Link {
        ino: Ino,
        new_parent: Ino,
        new_name: ByteBuf,
    },
    Unlink {
        parent: Ino,
        name: ByteBuf,
    },
    Rmdir {
        parent: Ino,
        name: ByteBuf,
    },
    Rename {
        parent: Ino,
        name: ByteBuf,
        new_parent: Ino,
        new_name: ByteBuf,
        no_replace: bool,
        exchange: bool,
    },
    SetXattr {
        ino: Ino,
        name: ByteBuf,
        value: ByteBuf,
        mode: XattrMode,
    },
    RemoveXattr {
        ino: Ino,
        name: ByteBuf,
    },
    /// Forget an unlinked inode (nlink 0) once no handle holds it; its blocks must be deleted first.
    Reclaim {
        ino: Ino,
    },
}

impl NsOp {
    /// Creates a regular file `name` in `parent`, owned by root.
    pub fn create_file(parent: Ino, name: impl Into<Vec<u8>>, perm: u16) -> Self {
        NsOp::MkNode {
            parent,
            name: ByteBuf::from(name.into()),
            kind: FileKind::File,
            perm,
            uid: 0,
            gid: 0,
            rdev: 0,
            target: None,
        }
    }

    /// True for operations that change state (and so go through Raft).
    pub fn is_write(&self) -> bool {
        !matches!(
            self,
            NsOp::Lookup { .. }
                | NsOp::GetAttr { .. }
                | NsOp::ReadDir { .. }
                | NsOp::ReadLink { .. }
                | NsOp::GetXattr { .. }
                | NsOp::ListXattr { .. }
                | NsOp::StatFs
        )
    }

    pub fn name(&self) -> &'static str {
        match self {
            NsOp::Lookup { .. } => "lookup",
            NsOp::GetAttr { .. } => "getattr",
            NsOp::ReadDir { .. } => "readdir",
            NsOp::ReadLink { .. } => "readlink",
            NsOp::GetXattr { .. } => "getxattr",
            NsOp::ListXattr { .. } => "listxattr",
            NsOp::StatFs => "statfs",
            NsOp::MkNode { .. } => "mknode",
            NsOp::SetAttr { .. } => "setattr",
            NsOp::Extend { .. } => "extend",
            NsOp::Link { .. } => "link",
            NsOp::Unlink { .. } => "unlink",
            NsOp::Rmdir { .. } => "rmdir",
            NsOp::Rename { .. } => "rename",
            NsOp::SetXattr { .. } => "setxattr",
            NsOp::RemoveXattr { .. } => "removexattr",
            NsOp::Reclaim { .. } => "reclaim",
        }
    }
}

/// Answers to namespace operations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NsReply {
    Attr(Attr),
    Entries {
        entries: Vec<DirEntry>,
        more: bool,
    },
    Target(ByteBuf),
    Value(ByteBuf),
    Names(Vec<ByteBuf>),
    StatFs {
        inodes: u64,
        files_max: u64,
    },
    /// An unlink/rmdir/rename that dropped an inode's last link: it is now an orphan (nlink 0)
    /// the caller must reclaim (delete its blocks, then `Reclaim`) once no handle holds it.
    Removed {
        orphan: Option<Attr>,
    },
    Done,
}

/// A client's identity and sequence number for exactly-once namespace writes: a retried
/// request with the same `(client, seq)` gets the first answer instead of running twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestTag {
    pub client: u64,
    pub seq: u64,
    /// Every request of this client with a smaller seq has been answered: the group may forget them.
    pub done_below: u64,
}

/// Checks a directory entry name: 1–255 bytes, no `/` or NUL, not `.` or `..`.
pub fn validate_name(name: &[u8]) -> Result<(), String> {
    if name.is_empty() || name == b"." || name == b".." {
        return Err(format!("invalid file name {:?}", String::from_utf8_lossy(name)));
    }
    if name.len() > NAME_MAX_BYTES {
        return Err(format!("file name of {} bytes exceeds {NAME_MAX_BYTES}", name.len()));
    }
    if name.contains(&b'/') || name.contains(&0) {
        return Err(format!("file name {:?} contains '/' or NUL", String::from_utf8_lossy(name)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_hints_parse_strictly() {
        for ok in ["auto", "sequential", "random", "off", "readahead:1", "readahead:4096"] {
            assert_eq!(ok.parse::<PrefetchMode>().unwrap().to_string(), ok);
        }
        for bad in
            ["", "Auto", "readahead:", "readahead:0", "readahead:4097", "readahead:+5", "readahead: 5", "seq"]
        {
            assert!(bad.parse::<PrefetchMode>().unwrap_err().contains("prefetch hint"), "{bad}");
        }
        let mut h = VolumeHints::default();
        h.set("filetype", "image").unwrap();
        assert_eq!(h.filetype, Some(FileType::Image));
        h.set("filetype", "auto").unwrap();
        assert_eq!(h.filetype, None);
        assert!(h.set("colour", "red").unwrap_err().contains("hint type"));
        assert!(h.set("filetype", "video").unwrap_err().contains("video"));
    }

    #[test]
    fn file_types_index_their_place_and_round_trip_as_text() {
        for (i, g) in FileType::ALL.into_iter().enumerate() {
            assert_eq!(g.index(), i);
            assert_eq!(g.to_string().parse::<FileType>().unwrap(), g);
        }
    }

    #[test]
    fn volume_specs_are_checked() {
        VolumeSpec::with_defaults("data").validate().unwrap();
        let bad = |f: fn(&mut VolumeSpec)| {
            let mut s = VolumeSpec::with_defaults("data");
            f(&mut s);
            s.validate().unwrap_err()
        };
        assert!(bad(|s| s.name = "a/b".into()).contains("a/b"));
        assert!(bad(|s| s.block_size_bytes = 3000).contains("3000"));
        assert!(bad(|s| s.replicas = 0).contains("replica"));
        assert!(bad(|s| s.shard_count = 12).contains("12"));
        assert!(bad(|s| s.stripe_unit_blocks = 0).contains("stripe"));
    }

    #[test]
    fn shards_spread_and_stripes_stay_together() {
        let mut counts = [0u32; 16];
        for ino in 0..1000 {
            for i in 0..16 {
                counts[shard_of(Ino(ino), i * 4, 4, 16).0 as usize] += 1;
            }
        }
        assert!(counts.iter().all(|&c| c > 700), "{counts:?}");
        assert_eq!(shard_of(Ino(9), 4, 4, 16), shard_of(Ino(9), 7, 4, 16));
    }

    #[test]
    fn names_are_checked() {
        validate_name(b"ok.txt").unwrap();
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b", &[b'x'; 256]] {
            assert!(validate_name(bad).is_err());
        }
    }
}
