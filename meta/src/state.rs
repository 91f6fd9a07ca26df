//! The replicated state machine: RocksDB, written only by applying committed Raft entries, with
//! the applied index (and ConfState, and member addresses) in the same write batch as the state
//! it describes. Reads come straight from RocksDB once a ReadIndex round says they may.
//!
//! Keys (one column family, one byte of prefix, integers big-endian so scans are ordered):
//! `m…` group metadata, `n<node>` storage nodes, `v<vol>` volumes, `w<name>` volume by name,
//! `s<vol><shard>` shard placement, `i<vol><ino>` inodes, `d<vol><parent><name>` directory
//! entries, `x<vol><ino><name>` xattrs, `o<vol><ino>` orphans (unlinked, maybe still open),
//! `r<client>` answers kept for exactly-once retries (a client session), `q<client>` when that
//! client's last tagged request came (its command's `now`, in seconds).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use augur_proto::meta::{
    Attr, DirEntry, FILE_SIZE_MAX, FileKind, FileType, NodeAssignment, NodeRegistration, NsOp, NsReply,
    PrefetchMode, READDIR_ENTRIES_MAX, ROOT_INO, RequestTag, SYMLINK_MAX_BYTES, SetAttr, TimeSet, Timestamp,
    VolumeInfo, VolumeSpec, XATTR_NAME_MAX_BYTES, XATTR_VALUE_MAX_BYTES, XATTRS_PER_INODE_MAX, XattrMode,
    validate_name,
};
use augur_proto::msg::{Replica, ShardPlacement, VolumeLayout};
use augur_proto::{Epoch, ErrorCode, Ino, NodeId, ShardId, VolumeId, WireError};
use protobuf::Message as _;
use raft::prelude::ConfState;
use rocksdb::{DB, Direction, IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

const K_APPLIED: &[u8] = b"m:applied";
/// (index, term) of the snapshot this member's state was last restored from: what the raft
/// log is told if a crash came between restoring the state and recording the snapshot there.
const K_RESTORED_FROM: &[u8] = b"m:restored_from";
const K_CONF: &[u8] = b"m:conf";
const K_MEMBERS: &[u8] = b"m:members";
const K_NEXT_VOLUME: &[u8] = b"m:next_volume";
const K_PLACEMENT_VERSION: &[u8] = b"m:placement_version";

/// Names of the xattrs the file system gives meaning to.
pub const XATTR_PREFETCH: &[u8] = b"user.augur.prefetch";
pub const XATTR_FILETYPE: &[u8] = b"user.augur.filetype";
/// `S_ISGID` in an inode's permission bits.
const SETGID_BIT: u16 = 0o2000;
const XATTRS_READ_ONLY: [&[u8]; 2] = [b"user.augur.shards", b"user.augur.prefetch_stats"];

/// A command, as proposed by the leader and applied by every member. Everything it needs is
/// inside it (times, placements), so applying is deterministic.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Cmd {
    RegisterNode(NodeRegistration),
    CreateVolume { spec: VolumeSpec, shards: Vec<Vec<NodeId>>, now_ms: u64 },
    DeleteVolume { name: String },
    SetHint { name: String, hint_type: String, hint_value: String },
    SetShardReplicas { volume: VolumeId, shard: ShardId, nodes: Vec<NodeId>, expected_epoch: Option<Epoch> },
    Ns { volume: VolumeId, op: NsOp, now: Timestamp, tag: Option<RequestTag> },
}

/// What applying a command produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CmdOutput {
    Volume(Box<VolumeInfo>),
    Ns(NsReply),
    Done,
}

pub type CmdResult = Result<CmdOutput, WireError>;

/// One proposal inside a batched entry: its id (proposer << 40 | counter) and command.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Proposal {
    pub id: u64,
    pub cmd: Cmd,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct VolumeRecord {
    info: VolumeInfo,
    next_ino: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShardRecord {
    pub epoch: Epoch,
    pub nodes: Vec<NodeId>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Inode {
    attr: Attr,
    parent: Ino,
    target: Option<ByteBuf>,
    /// Directory entries (directories only).
    entries: u64,
    xattrs: u32,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct Dentry {
    ino: Ino,
    kind: FileKind,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state store: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("state store record {key}: {reason}")]
    Corrupt { key: String, reason: String },
}

fn err(code: ErrorCode, msg: impl Into<String>) -> WireError {
    WireError::new(code, msg.into())
}

fn internal(e: impl std::fmt::Display) -> WireError {
    err(ErrorCode::Internal, e.to_string())
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("state records always serialize")
}

fn dec<T: for<'a> Deserialize<'a>>(key: &[u8], bytes: &[u8]) -> Result<T, StateError> {
    postcard::from_bytes(bytes)
        .map_err(|e| StateError::Corrupt { key: format!("{key:02x?}"), reason: e.to_string() })
}

fn key(prefix: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = vec![prefix];
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

fn k_node(n: NodeId) -> Vec<u8> {
    key(b'n', &[&n.0.to_be_bytes()])
}
fn k_volume(v: VolumeId) -> Vec<u8> {
    key(b'v', &[&v.0.to_be_bytes()])
}
fn k_volume_name(name: &str) -> Vec<u8> {
    key(b'w', &[name.as_bytes()])
}
fn k_shard(v: VolumeId, s: ShardId) -> Vec<u8> {
    key(b's', &[&v.0.to_be_bytes(), &s.0.to_be_bytes()])
}
fn k_inode(v: VolumeId, i: Ino) -> Vec<u8> {
    key(b'i', &[&v.0.to_be_bytes(), &i.0.to_be_bytes()])
}
fn k_dentry(v: VolumeId, parent: Ino, name: &[u8]) -> Vec<u8> {
    key(b'd', &[&v.0.to_be_bytes(), &parent.0.to_be_bytes(), name])
}
fn k_xattr(v: VolumeId, i: Ino, name: &[u8]) -> Vec<u8> {
    key(b'x', &[&v.0.to_be_bytes(), &i.0.to_be_bytes(), name])
}
fn k_orphan(v: VolumeId, i: Ino) -> Vec<u8> {
    key(b'o', &[&v.0.to_be_bytes(), &i.0.to_be_bytes()])
}
fn k_session(client: u64) -> Vec<u8> {
    key(b'r', &[&client.to_be_bytes()])
}
fn k_session_seen(client: u64) -> Vec<u8> {
    key(b'q', &[&client.to_be_bytes()])
}
/// The last client whose session the sweep looked at (`remember_answer`).
const K_SESSION_SWEEP: &[u8] = b"m:session_sweep";

/// Up to `limit` rows of `db` from `start` on whose keys start with `prefix`.
fn scan(db: &DB, start: &[u8], prefix: &[u8], limit: usize) -> Result<Vec<Row>, WireError> {
    let mut opts = ReadOptions::default();
    opts.set_iterate_upper_bound(prefix_end(prefix));
    let mut out = Vec::new();
    for item in db.iterator_opt(IteratorMode::From(start, Direction::Forward), opts) {
        let (k, v) = item.map_err(internal)?;
        if !k.starts_with(prefix) || out.len() >= limit {
            break;
        }
        out.push((k.to_vec(), v.to_vec()));
    }
    Ok(out)
}

/// The smallest key greater than every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xff; prefix.len() + 1]
}

/// Writes of one entry, buffered over RocksDB so later commands of a batch see earlier ones,
/// with savepoints so a failing command leaves nothing behind.
struct Txn<'a> {
    db: &'a DB,
    /// Pending writes: `None` deletes.
    overlay: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Undo log: each key's overlay entry before a write (`None`: it had none).
    undo: Vec<UndoEntry>,
    ranges: Vec<KeyRange>,
}

type UndoEntry = (Vec<u8>, Option<Option<Vec<u8>>>);
type KeyRange = (Vec<u8>, Vec<u8>);
type Row = (Vec<u8>, Vec<u8>);

impl<'a> Txn<'a> {
    fn new(db: &'a DB) -> Self {
        Self { db, overlay: BTreeMap::new(), undo: Vec::new(), ranges: Vec::new() }
    }

    fn get_raw(&self, k: &[u8]) -> Result<Option<Vec<u8>>, WireError> {
        if let Some(v) = self.overlay.get(k) {
            return Ok(v.clone());
        }
        if self.ranges.iter().any(|(s, e)| k >= s.as_slice() && k < e.as_slice()) {
            return Ok(None);
        }
        self.db.get(k).map_err(internal)
    }

    fn get<T: for<'de> Deserialize<'de>>(&self, k: &[u8]) -> Result<Option<T>, WireError> {
        self.get_raw(k)?.map(|b| dec(k, &b).map_err(internal)).transpose()
    }

    fn set(&mut self, k: Vec<u8>, v: Option<Vec<u8>>) {
        let prev = self.overlay.insert(k.clone(), v);
        self.undo.push((k, prev));
    }

    fn put<T: Serialize>(&mut self, k: Vec<u8>, v: &T) {
        self.set(k, Some(enc(v)));
    }

    fn delete(&mut self, k: Vec<u8>) {
        self.set(k, None);
    }

    fn delete_prefix(&mut self, prefix: &[u8]) {
        let end = prefix_end(prefix);
        let inside: Vec<Vec<u8>> =
            self.overlay.range(prefix.to_vec()..end.clone()).map(|(k, _)| k.clone()).collect();
        for k in inside {
            self.delete(k);
        }
        self.ranges.push((prefix.to_vec(), end));
    }

    fn savepoint(&self) -> (usize, usize) {
        (self.undo.len(), self.ranges.len())
    }

    fn rollback(&mut self, (undo_len, ranges_len): (usize, usize)) {
        while self.undo.len() > undo_len {
            let (k, prev) = self.undo.pop().expect("length checked");
            match prev {
                Some(v) => self.overlay.insert(k, v),
                None => self.overlay.remove(&k),
            };
        }
        self.ranges.truncate(ranges_len);
    }

    fn into_batch(self) -> WriteBatch {
        let mut batch = WriteBatch::default();
        for (start, end) in &self.ranges {
            batch.delete_range(start, end);
        }
        for (k, v) in self.overlay {
            match v {
                Some(v) => batch.put(k, v),
                None => batch.delete(k),
            }
        }
        batch
    }
}

/// The serialized form of a whole state (a snapshot's data).
#[derive(Serialize, Deserialize)]
struct SnapshotData {
    pairs: Vec<(ByteBuf, ByteBuf)>,
}

pub struct StateMachine {
    db: DB,
    applied: AtomicU64,
}

impl StateMachine {
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_keep_log_file_num(4);
        let db = DB::open(&opts, dir)?;
        let applied = match db.get(K_APPLIED)? {
            Some(b) => dec::<u64>(K_APPLIED, &b)?,
            None => 0,
        };
        Ok(Self { db, applied: AtomicU64::new(applied) })
    }

    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    pub fn conf_state(&self) -> Result<ConfState, StateError> {
        Ok(match self.db.get(K_CONF)? {
            Some(b) => ConfState::parse_from_bytes(&b)
                .map_err(|e| StateError::Corrupt { key: "m:conf".into(), reason: e.to_string() })?,
            None => ConfState::default(),
        })
    }

    pub fn members(&self) -> Result<BTreeMap<u64, String>, StateError> {
        Ok(match self.db.get(K_MEMBERS)? {
            Some(b) => dec(K_MEMBERS, &b)?,
            None => BTreeMap::new(),
        })
    }

    fn write(&self, mut batch: WriteBatch, applied: u64, sync: bool) -> Result<(), StateError> {
        batch.put(K_APPLIED, enc(&applied));
        let mut opts = WriteOptions::default();
        opts.set_sync(sync);
        self.db.write_opt(batch, &opts)?;
        self.applied.store(applied, Ordering::Release);
        Ok(())
    }

    /// Seeds the state of an initial member: its ConfState and member addresses at index 1.
    pub fn bootstrap(&self, cs: &ConfState, members: &BTreeMap<u64, String>) -> Result<(), StateError> {
        let mut batch = WriteBatch::default();
        batch.put(K_CONF, cs.write_to_bytes().expect("conf state encodes"));
        batch.put(K_MEMBERS, enc(members));
        self.write(batch, 1, true)
    }

    /// Applies an entry with no command (a leader's empty entry).
    pub fn apply_empty(&self, index: u64) -> Result<(), StateError> {
        self.write(WriteBatch::default(), index, false)
    }

    /// Applies a membership change: the new ConfState and address book with the index.
    pub fn apply_conf(
        &self,
        index: u64,
        cs: &ConfState,
        member: Option<(u64, Option<String>)>,
    ) -> Result<(), StateError> {
        let mut batch = WriteBatch::default();
        batch.put(K_CONF, cs.write_to_bytes().expect("conf state encodes"));
        if let Some((id, addr)) = member {
            let mut members = self.members()?;
            match addr {
                Some(a) => members.insert(id, a),
                None => members.remove(&id),
            };
            batch.put(K_MEMBERS, enc(&members));
        }
        self.write(batch, index, true)
    }

    /// Applies a batch of commands committed at `index`; one result per proposal.
    pub fn apply(&self, index: u64, proposals: &[Proposal]) -> Result<Vec<CmdResult>, StateError> {
        let mut txn = Txn::new(&self.db);
        let mut results = Vec::with_capacity(proposals.len());
        for p in proposals {
            // A retried request that was applied before gets its first answer again.
            if let Cmd::Ns { tag: Some(tag), .. } = &p.cmd
                && let Ok(Some(session)) = txn.get::<Session>(&k_session(tag.client))
                && let Some(prev) = session.answers.get(&tag.seq)
            {
                results.push(prev.clone());
                continue;
            }
            let sp = txn.savepoint();
            let result = apply_one(&mut txn, &p.cmd);
            if result.is_err() {
                txn.rollback(sp);
            }
            // Remember tagged answers (errors too) so a retry gets the same answer.
            if let Cmd::Ns { tag: Some(tag), now, .. } = &p.cmd {
                remember_answer(&mut txn, tag, &result, *now);
            }
            results.push(result);
        }
        self.write(txn.into_batch(), index, false)?;
        Ok(results)
    }

    /// Makes every applied write durable (before the log behind it is compacted away).
    pub fn sync(&self) -> Result<(), StateError> {
        self.db.flush_wal(true)?;
        Ok(())
    }

    /// The whole state, consistent at one applied index.
    pub fn snapshot(&self) -> Result<(u64, ConfState, Vec<u8>), StateError> {
        let snap = self.db.snapshot();
        let applied = match snap.get(K_APPLIED)? {
            Some(b) => dec::<u64>(K_APPLIED, &b)?,
            None => 0,
        };
        let cs = match snap.get(K_CONF)? {
            Some(b) => ConfState::parse_from_bytes(&b)
                .map_err(|e| StateError::Corrupt { key: "m:conf".into(), reason: e.to_string() })?,
            None => ConfState::default(),
        };
        let mut pairs = Vec::new();
        for item in snap.iterator(IteratorMode::Start) {
            let (k, v) = item?;
            pairs.push((ByteBuf::from(k.to_vec()), ByteBuf::from(v.to_vec())));
        }
        Ok((applied, cs, enc(&SnapshotData { pairs })))
    }

    /// (index, term) of the snapshot the state was last restored from, if any.
    pub fn restored_from(&self) -> Result<Option<(u64, u64)>, StateError> {
        Ok(match self.db.get(K_RESTORED_FROM)? {
            Some(b) => Some(dec(K_RESTORED_FROM, &b)?),
            None => None,
        })
    }

    /// Replaces the whole state with a snapshot's (its applied index and ConfState included),
    /// noting the snapshot's `term` ([`Self::restored_from`]).
    pub fn restore(&self, data: &[u8], term: u64) -> Result<u64, StateError> {
        let snap: SnapshotData = dec(b"snapshot", data)?;
        let mut batch = WriteBatch::default();
        batch.delete_range(&[0u8][..], &[0xffu8; 8][..]);
        for (k, v) in &snap.pairs {
            batch.put(k, v);
        }
        let applied = snap
            .pairs
            .iter()
            .find(|(k, _)| k.as_slice() == K_APPLIED)
            .map(|(_, v)| dec::<u64>(K_APPLIED, v))
            .transpose()?
            .ok_or_else(|| StateError::Corrupt {
                key: "snapshot".into(),
                reason: "no applied index".into(),
            })?;
        // After the snapshot's own pairs, so the sender's record of its last restore is replaced.
        batch.put(K_RESTORED_FROM, enc(&(applied, term)));
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(batch, &opts)?;
        self.applied.store(applied, Ordering::Release);
        Ok(applied)
    }

    // ---- reads (after a ReadIndex round on the leader) ----

    fn get<T: for<'de> Deserialize<'de>>(&self, k: &[u8]) -> Result<Option<T>, WireError> {
        self.db.get(k).map_err(internal)?.map(|b| dec(k, &b).map_err(internal)).transpose()
    }

    fn scan(&self, start: &[u8], prefix: &[u8], limit: usize) -> Result<Vec<Row>, WireError> {
        scan(&self.db, start, prefix, limit)
    }

    pub fn placement_version(&self) -> Result<u64, WireError> {
        Ok(self.get(K_PLACEMENT_VERSION)?.unwrap_or(0))
    }

    pub fn nodes(&self) -> Result<Vec<NodeRegistration>, WireError> {
        self.scan(b"n", b"n", usize::MAX)?.iter().map(|(k, v)| dec(k, v).map_err(internal)).collect()
    }

    pub fn volumes(&self) -> Result<Vec<VolumeInfo>, WireError> {
        self.scan(b"v", b"v", usize::MAX)?
            .iter()
            .map(|(k, v)| dec::<VolumeRecord>(k, v).map(|r| r.info).map_err(internal))
            .collect()
    }

    pub fn volume_by_name(&self, name: &str) -> Result<VolumeInfo, WireError> {
        let id: VolumeId = self
            .get(&k_volume_name(name))?
            .ok_or_else(|| err(ErrorCode::NotFound, format!("no volume named {name:?}")))?;
        self.volume(id)
    }

    pub fn volume(&self, id: VolumeId) -> Result<VolumeInfo, WireError> {
        let rec: VolumeRecord =
            self.get(&k_volume(id))?.ok_or_else(|| err(ErrorCode::NotFound, format!("no volume {id}")))?;
        Ok(rec.info)
    }

    pub fn shards(&self, volume: VolumeId) -> Result<Vec<(ShardId, ShardRecord)>, WireError> {
        let prefix = key(b's', &[&volume.0.to_be_bytes()]);
        self.scan(&prefix, &prefix, usize::MAX)?
            .iter()
            .map(|(k, v)| {
                let shard = ShardId(u32::from_be_bytes(k[9..13].try_into().expect("shard key length")));
                dec(k, v).map(|r| (shard, r)).map_err(internal)
            })
            .collect()
    }

    /// Node id -> address, from the registry (read once per answer, not once per shard).
    fn addresses(&self) -> Result<HashMap<NodeId, String>, WireError> {
        Ok(self.nodes()?.into_iter().map(|n| (n.node, n.addr)).collect())
    }

    fn placements_with(
        &self,
        volume: VolumeId,
        addrs: &HashMap<NodeId, String>,
    ) -> Result<Vec<ShardPlacement>, WireError> {
        let resolve = |(shard, rec): (ShardId, ShardRecord)| ShardPlacement {
            shard,
            epoch: rec.epoch,
            replicas: rec
                .nodes
                .iter()
                .map(|n| Replica { node: *n, addr: addrs.get(n).cloned().unwrap_or_default() })
                .collect(),
        };
        Ok(self.shards(volume)?.into_iter().map(resolve).collect())
    }

    /// A volume's shards with their replicas' addresses.
    pub fn placements(&self, volume: VolumeId) -> Result<Vec<ShardPlacement>, WireError> {
        self.placements_with(volume, &self.addresses()?)
    }

    /// Everything one storage node must hold.
    pub fn assignments(&self, node: NodeId) -> Result<Vec<NodeAssignment>, WireError> {
        let addrs = self.addresses()?;
        let mut out = Vec::new();
        for vol in self.volumes()? {
            let shards: Vec<ShardPlacement> = self
                .placements_with(vol.id, &addrs)?
                .into_iter()
                .filter(|p| p.replicas.iter().any(|r| r.node == node))
                .collect();
            if !shards.is_empty() {
                out.push(NodeAssignment {
                    layout: VolumeLayout { volume: vol.id, block_size_bytes: vol.block_size_bytes },
                    shards,
                });
            }
        }
        Ok(out)
    }

    /// A registered storage node.
    pub fn node(&self, node: NodeId) -> Result<Option<NodeRegistration>, WireError> {
        self.get(&k_node(node))
    }

    /// How many replicas each node holds, over every volume.
    pub fn replicas_held(&self) -> Result<HashMap<NodeId, u32>, WireError> {
        let mut held = HashMap::new();
        for vol in self.volumes()? {
            for (_, rec) in self.shards(vol.id)? {
                for n in rec.nodes {
                    *held.entry(n).or_default() += 1;
                }
            }
        }
        Ok(held)
    }

    /// Serves a namespace read.
    pub fn ns_read(&self, volume: VolumeId, op: &NsOp) -> Result<NsReply, WireError> {
        let vol = self.volume(volume)?;
        let inode = |ino: Ino| -> Result<Inode, WireError> {
            self.get(&k_inode(volume, ino))?
                .ok_or_else(|| err(ErrorCode::NotFound, format!("no inode {ino}")))
        };
        match op {
            NsOp::Lookup { parent, name } => {
                check_name(name)?;
                let p = inode(*parent)?;
                if p.attr.kind != FileKind::Dir {
                    return Err(err(ErrorCode::NotDirectory, format!("{parent} is not a directory")));
                }
                let d: Dentry = self.get(&k_dentry(volume, *parent, name))?.ok_or_else(|| {
                    err(
                        ErrorCode::NotFound,
                        format!("no entry {:?} in {parent}", String::from_utf8_lossy(name)),
                    )
                })?;
                Ok(NsReply::Attr(inode(d.ino)?.attr))
            }
            NsOp::GetAttr { ino } => Ok(NsReply::Attr(inode(*ino)?.attr)),
            NsOp::ReadDir { ino, after, limit } => {
                let dir = inode(*ino)?;
                if dir.attr.kind != FileKind::Dir {
                    return Err(err(ErrorCode::NotDirectory, format!("{ino} is not a directory")));
                }
                let limit = (*limit).clamp(1, READDIR_ENTRIES_MAX) as usize;
                let prefix = key(b'd', &[&volume.0.to_be_bytes(), &ino.0.to_be_bytes()]);
                let start = match after {
                    // Strictly after `after`: append a zero byte (the next possible name).
                    Some(a) => [k_dentry(volume, *ino, a), vec![0]].concat(),
                    None => prefix.clone(),
                };
                let mut rows = self.scan(&start, &prefix, limit + 1)?;
                let more = rows.len() > limit;
                rows.truncate(limit);
                let entries = rows
                    .iter()
                    .map(|(k, v)| {
                        let d: Dentry = dec(k, v).map_err(internal)?;
                        Ok(DirEntry {
                            name: ByteBuf::from(k[prefix.len()..].to_vec()),
                            ino: d.ino,
                            kind: d.kind,
                        })
                    })
                    .collect::<Result<_, WireError>>()?;
                Ok(NsReply::Entries { entries, more })
            }
            NsOp::ReadLink { ino } => {
                let i = inode(*ino)?;
                i.target
                    .map(NsReply::Target)
                    .ok_or_else(|| err(ErrorCode::InvalidArgument, format!("{ino} is not a symlink")))
            }
            NsOp::GetXattr { ino, name } => {
                inode(*ino)?;
                let v: Option<Vec<u8>> = self.db.get(k_xattr(volume, *ino, name)).map_err(internal)?;
                v.map(|v| NsReply::Value(ByteBuf::from(v))).ok_or_else(|| {
                    err(
                        ErrorCode::NoData,
                        format!("{ino} has no attribute {:?}", String::from_utf8_lossy(name)),
                    )
                })
            }
            NsOp::ListXattr { ino } => {
                inode(*ino)?;
                let prefix = key(b'x', &[&volume.0.to_be_bytes(), &ino.0.to_be_bytes()]);
                let rows = self.scan(&prefix, &prefix, XATTRS_PER_INODE_MAX)?;
                Ok(NsReply::Names(
                    rows.iter().map(|(k, _)| ByteBuf::from(k[prefix.len()..].to_vec())).collect(),
                ))
            }
            NsOp::StatFs => Ok(NsReply::StatFs { inodes: vol.inodes, files_max: u64::from(u32::MAX) }),
            _ => Err(err(ErrorCode::Internal, format!("{} is not a read", op.name()))),
        }
    }
}

/// Answers a client may still retry, by sequence number. Answers below the client's
/// `done_below` are dropped; at most `SESSION_ANSWERS_MAX` are kept (the oldest go first).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Session {
    answers: BTreeMap<u64, CmdResult>,
}

/// Most remembered answers per client (a client has at most this many requests in flight).
pub const SESSION_ANSWERS_MAX: usize = 4096;
/// A client with no tagged request for this long has nothing left to retry (a client retries
/// for minutes at most): its session is dropped. One day.
pub const SESSION_IDLE_SECS: i64 = 24 * 3600;
/// Sessions the sweep looks at per tagged request: more than one, so that it keeps ahead of
/// new clients.
const SESSION_SWEEP_PER_REQUEST: usize = 2;

/// Remembers `result` for `tag`'s client at `now`, then sweeps idle sessions
/// ([`sweep_sessions`]).
fn remember_answer(txn: &mut Txn<'_>, tag: &RequestTag, result: &CmdResult, now: Timestamp) {
    let mut session: Session = txn.get(&k_session(tag.client)).ok().flatten().unwrap_or_default();
    session.answers = session.answers.split_off(&tag.done_below);
    session.answers.insert(tag.seq, result.clone());
    while session.answers.len() > SESSION_ANSWERS_MAX {
        session.answers.pop_first();
    }
    txn.put(k_session(tag.client), &session);
    txn.put(k_session_seen(tag.client), &now.secs);
    sweep_sessions(txn, now);
}

/// Drops the next `SESSION_SWEEP_PER_REQUEST` sessions after the last one swept (wrapping
/// round) if idle for `SESSION_IDLE_SECS` at `now`. It reads the state as committed before
/// this batch (the same on every member) and skips sessions this batch wrote, so it is
/// deterministic.
fn sweep_sessions(txn: &mut Txn<'_>, now: Timestamp) {
    // The last client swept; none: start from the first.
    let after: Option<u64> = txn.get(K_SESSION_SWEEP).ok().flatten().flatten();
    let from = match after {
        Some(c) => [k_session_seen(c), vec![0]].concat(),
        None => b"q".to_vec(),
    };
    let rows = scan(txn.db, &from, b"q", SESSION_SWEEP_PER_REQUEST).unwrap_or_default();
    let seen: Vec<(u64, i64)> = rows
        .iter()
        .filter_map(|(k, v)| Some((u64::from_be_bytes(k.get(1..9)?.try_into().ok()?), dec(k, v).ok()?)))
        .collect();
    for &(client, secs) in &seen {
        let written_now = txn.overlay.contains_key(&k_session_seen(client));
        if !written_now && now.secs.saturating_sub(secs) > SESSION_IDLE_SECS {
            txn.delete(k_session(client));
            txn.delete(k_session_seen(client));
        }
    }
    // Fewer than asked for: the end was reached, start again from the first.
    let next = if rows.len() < SESSION_SWEEP_PER_REQUEST { None } else { seen.last().map(|s| s.0) };
    txn.put(K_SESSION_SWEEP.to_vec(), &next);
}

fn check_name(name: &[u8]) -> Result<(), WireError> {
    if name.len() > augur_proto::meta::NAME_MAX_BYTES {
        return Err(err(ErrorCode::NameTooLong, format!("name of {} bytes", name.len())));
    }
    validate_name(name).map_err(|m| err(ErrorCode::InvalidArgument, m))
}

fn resolve_time(t: TimeSet, now: Timestamp) -> Timestamp {
    match t {
        TimeSet::Now => now,
        TimeSet::At(t) => t,
    }
}

fn apply_one(txn: &mut Txn<'_>, cmd: &Cmd) -> CmdResult {
    match cmd {
        Cmd::RegisterNode(reg) => {
            let old: Option<NodeRegistration> = txn.get(&k_node(reg.node))?;
            if old.as_ref().is_none_or(|o| o.addr != reg.addr) {
                bump_placement_version(txn)?;
            }
            txn.put(k_node(reg.node), reg);
            Ok(CmdOutput::Done)
        }
        Cmd::CreateVolume { spec, shards, now_ms } => create_volume(txn, spec, shards, *now_ms),
        Cmd::DeleteVolume { name } => {
            let id: VolumeId = txn
                .get(&k_volume_name(name))?
                .ok_or_else(|| err(ErrorCode::NotFound, format!("no volume named {name:?}")))?;
            txn.delete(k_volume_name(name));
            txn.delete(k_volume(id));
            for p in [b's', b'i', b'd', b'x', b'o'] {
                txn.delete_prefix(&key(p, &[&id.0.to_be_bytes()]));
            }
            bump_placement_version(txn)?;
            Ok(CmdOutput::Done)
        }
        Cmd::SetHint { name, hint_type, hint_value } => {
            let id: VolumeId = txn
                .get(&k_volume_name(name))?
                .ok_or_else(|| err(ErrorCode::NotFound, format!("no volume named {name:?}")))?;
            let mut rec: VolumeRecord =
                txn.get(&k_volume(id))?.ok_or_else(|| internal("volume record missing"))?;
            rec.info.hints.set(hint_type, hint_value).map_err(|m| err(ErrorCode::InvalidArgument, m))?;
            txn.put(k_volume(id), &rec);
            Ok(CmdOutput::Volume(Box::new(rec.info)))
        }
        Cmd::SetShardReplicas { volume, shard, nodes, expected_epoch } => {
            let mut rec: ShardRecord = txn
                .get(&k_shard(*volume, *shard))?
                .ok_or_else(|| err(ErrorCode::NotFound, format!("no shard {volume}/{shard}")))?;
            if let Some(e) = expected_epoch
                && *e != rec.epoch
            {
                return Err(err(ErrorCode::StaleEpoch { current: rec.epoch }, "placement changed meanwhile"));
            }
            if nodes.is_empty() {
                return Err(err(ErrorCode::InvalidArgument, "a shard needs at least one replica"));
            }
            for (i, n) in nodes.iter().enumerate() {
                if nodes[..i].contains(n) {
                    return Err(err(ErrorCode::InvalidArgument, format!("{n} listed twice")));
                }
                if txn.get::<NodeRegistration>(&k_node(*n))?.is_none() {
                    return Err(err(ErrorCode::NotFound, format!("{n} is not a registered storage node")));
                }
            }
            if rec.nodes != *nodes {
                rec.epoch = Epoch(rec.epoch.0 + 1);
                rec.nodes = nodes.clone();
                txn.put(k_shard(*volume, *shard), &rec);
                bump_placement_version(txn)?;
            }
            Ok(CmdOutput::Done)
        }
        Cmd::Ns { volume, op, now, tag: _ } => ns_write(txn, *volume, op, *now).map(CmdOutput::Ns),
    }
}

fn bump_placement_version(txn: &mut Txn<'_>) -> Result<(), WireError> {
    let v: u64 = txn.get(K_PLACEMENT_VERSION)?.unwrap_or(0);
    txn.put(K_PLACEMENT_VERSION.to_vec(), &(v + 1));
    Ok(())
}

fn create_volume(txn: &mut Txn<'_>, spec: &VolumeSpec, shards: &[Vec<NodeId>], now_ms: u64) -> CmdResult {
    spec.validate().map_err(|m| err(ErrorCode::InvalidArgument, m))?;
    if txn.get::<VolumeId>(&k_volume_name(&spec.name))?.is_some() {
        return Err(err(ErrorCode::AlreadyExists, format!("volume {:?} already exists", spec.name)));
    }
    if shards.len() != spec.shard_count as usize {
        return Err(internal("placement does not cover every shard"));
    }
    let next: u64 = txn.get(K_NEXT_VOLUME)?.unwrap_or(1);
    txn.put(K_NEXT_VOLUME.to_vec(), &(next + 1));
    let id = VolumeId(next);
    let info = VolumeInfo {
        id,
        name: spec.name.clone(),
        block_size_bytes: spec.block_size_bytes,
        replicas: spec.replicas,
        shard_count: spec.shard_count,
        stripe_unit_blocks: spec.stripe_unit_blocks,
        created_unix_ms: now_ms,
        hints: Default::default(),
        inodes: 1,
    };
    let t = Timestamp { secs: (now_ms / 1000) as i64, nanos: ((now_ms % 1000) * 1_000_000) as u32 };
    let root = Inode {
        attr: Attr {
            ino: ROOT_INO,
            kind: FileKind::Dir,
            perm: 0o755,
            nlink: 2,
            uid: 0,
            gid: 0,
            size: 0,
            atime: t,
            mtime: t,
            ctime: t,
            rdev: 0,
        },
        parent: ROOT_INO,
        target: None,
        entries: 0,
        xattrs: 0,
    };
    txn.put(k_inode(id, ROOT_INO), &root);
    for (i, nodes) in shards.iter().enumerate() {
        txn.put(k_shard(id, ShardId(i as u32)), &ShardRecord { epoch: Epoch(1), nodes: nodes.clone() });
    }
    txn.put(k_volume_name(&spec.name), &id);
    txn.put(k_volume(id), &VolumeRecord { info: info.clone(), next_ino: ROOT_INO.0 + 1 });
    bump_placement_version(txn)?;
    Ok(CmdOutput::Volume(Box::new(info)))
}

/// Namespace writes. Every check comes before the first write, but the caller rolls back on
/// error anyway.
fn ns_write(txn: &mut Txn<'_>, vol: VolumeId, op: &NsOp, now: Timestamp) -> Result<NsReply, WireError> {
    let mut volume: VolumeRecord =
        txn.get(&k_volume(vol))?.ok_or_else(|| err(ErrorCode::NotFound, format!("no volume {vol}")))?;
    let get = |txn: &Txn<'_>, ino: Ino| -> Result<Inode, WireError> {
        txn.get(&k_inode(vol, ino))?.ok_or_else(|| err(ErrorCode::NotFound, format!("no inode {ino}")))
    };
    let dir = |txn: &Txn<'_>, ino: Ino| -> Result<Inode, WireError> {
        let d = get(txn, ino)?;
        if d.attr.kind != FileKind::Dir {
            return Err(err(ErrorCode::NotDirectory, format!("{ino} is not a directory")));
        }
        Ok(d)
    };
    let name_str = |n: &[u8]| String::from_utf8_lossy(n).into_owned();
    match op {
        NsOp::MkNode { parent, name, kind, perm, uid, gid, rdev, target } => {
            check_name(name)?;
            let mut p = dir(txn, *parent)?;
            if p.attr.nlink == 0 {
                return Err(err(ErrorCode::NotFound, format!("{parent} was removed")));
            }
            if txn.get::<Dentry>(&k_dentry(vol, *parent, name))?.is_some() {
                return Err(err(
                    ErrorCode::AlreadyExists,
                    format!("{:?} exists in {parent}", name_str(name)),
                ));
            }
            let target = match (kind, target) {
                (FileKind::Symlink, Some(t)) if !t.is_empty() && t.len() <= SYMLINK_MAX_BYTES => {
                    Some(t.clone())
                }
                (FileKind::Symlink, Some(t)) if t.len() > SYMLINK_MAX_BYTES => {
                    return Err(err(ErrorCode::NameTooLong, format!("symlink target of {} bytes", t.len())));
                }
                (FileKind::Symlink, _) => {
                    return Err(err(ErrorCode::InvalidArgument, "a symlink needs a non-empty target"));
                }
                (_, None) => None,
                (_, Some(_)) => return Err(err(ErrorCode::InvalidArgument, "only symlinks take a target")),
            };
            let ino = Ino(volume.next_ino);
            volume.next_ino += 1;
            volume.info.inodes += 1;
            let is_dir = *kind == FileKind::Dir;
            // BSD group semantics under a set-group-ID directory (as ext4 does): the new entry
            // takes the directory's group, and a new directory keeps the bit.
            let setgid_parent = p.attr.perm & SETGID_BIT != 0;
            let gid = if setgid_parent { p.attr.gid } else { *gid };
            let perm = if setgid_parent && is_dir { (perm & 0o7777) | SETGID_BIT } else { perm & 0o7777 };
            let attr = Attr {
                ino,
                kind: *kind,
                perm,
                nlink: if is_dir { 2 } else { 1 },
                uid: *uid,
                gid,
                size: target.as_ref().map_or(0, |t| t.len() as u64),
                atime: now,
                mtime: now,
                ctime: now,
                rdev: *rdev,
            };
            let mut node = Inode { attr: attr.clone(), parent: *parent, target, entries: 0, xattrs: 0 };
            // A directory's prefetch hint is inherited by what is created in it.
            if let Some(hint) = txn.get_raw(&k_xattr(vol, *parent, XATTR_PREFETCH))? {
                txn.set(k_xattr(vol, ino, XATTR_PREFETCH), Some(hint));
                node.xattrs = 1;
            }
            p.entries += 1;
            if is_dir {
                p.attr.nlink += 1;
            }
            p.attr.mtime = now;
            p.attr.ctime = now;
            txn.put(k_inode(vol, *parent), &p);
            txn.put(k_inode(vol, ino), &node);
            txn.put(k_dentry(vol, *parent, name), &Dentry { ino, kind: *kind });
            txn.put(k_volume(vol), &volume);
            Ok(NsReply::Attr(attr))
        }
        NsOp::SetAttr { ino, set } => {
            let mut i = get(txn, *ino)?;
            set_attr(&mut i, set, now)?;
            txn.put(k_inode(vol, *ino), &i);
            Ok(NsReply::Attr(i.attr))
        }
        NsOp::Extend { ino, size } => {
            let mut i = get(txn, *ino)?;
            if i.attr.kind != FileKind::File {
                return Err(err(ErrorCode::InvalidArgument, format!("{ino} is not a regular file")));
            }
            if *size > FILE_SIZE_MAX {
                return Err(err(ErrorCode::InvalidArgument, format!("size {size} exceeds the maximum")));
            }
            i.attr.size = i.attr.size.max(*size);
            i.attr.mtime = now;
            i.attr.ctime = now;
            txn.put(k_inode(vol, *ino), &i);
            Ok(NsReply::Attr(i.attr))
        }
        NsOp::Link { ino, new_parent, new_name } => {
            check_name(new_name)?;
            let mut i = get(txn, *ino)?;
            if i.attr.kind == FileKind::Dir {
                return Err(err(ErrorCode::PermissionDenied, "hard links to directories are not allowed"));
            }
            if i.attr.nlink == 0 {
                return Err(err(ErrorCode::NotFound, format!("{ino} was removed")));
            }
            let mut p = dir(txn, *new_parent)?;
            if txn.get::<Dentry>(&k_dentry(vol, *new_parent, new_name))?.is_some() {
                return Err(err(ErrorCode::AlreadyExists, format!("{:?} exists", name_str(new_name))));
            }
            i.attr.nlink += 1;
            i.attr.ctime = now;
            p.entries += 1;
            p.attr.mtime = now;
            p.attr.ctime = now;
            txn.put(k_inode(vol, *new_parent), &p);
            txn.put(k_inode(vol, *ino), &i);
            txn.put(k_dentry(vol, *new_parent, new_name), &Dentry { ino: *ino, kind: i.attr.kind });
            Ok(NsReply::Attr(i.attr))
        }
        NsOp::Unlink { parent, name } | NsOp::Rmdir { parent, name } => {
            let rmdir = matches!(op, NsOp::Rmdir { .. });
            check_name(name)?;
            let mut p = dir(txn, *parent)?;
            let d: Dentry = txn
                .get(&k_dentry(vol, *parent, name))?
                .ok_or_else(|| err(ErrorCode::NotFound, format!("no entry {:?}", name_str(name))))?;
            let mut victim = get(txn, d.ino)?;
            let is_dir = victim.attr.kind == FileKind::Dir;
            if rmdir && !is_dir {
                return Err(err(ErrorCode::NotDirectory, format!("{:?} is not a directory", name_str(name))));
            }
            if !rmdir && is_dir {
                return Err(err(ErrorCode::IsDirectory, format!("{:?} is a directory", name_str(name))));
            }
            if is_dir && victim.entries > 0 {
                return Err(err(ErrorCode::NotEmpty, format!("{:?} is not empty", name_str(name))));
            }
            txn.delete(k_dentry(vol, *parent, name));
            p.entries -= 1;
            if is_dir {
                p.attr.nlink -= 1;
            }
            p.attr.mtime = now;
            p.attr.ctime = now;
            txn.put(k_inode(vol, *parent), &p);
            let orphan = drop_link(txn, &mut volume, vol, &mut victim, now);
            txn.put(k_volume(vol), &volume);
            Ok(NsReply::Removed { orphan })
        }
        NsOp::Rename { parent, name, new_parent, new_name, no_replace, exchange } => rename(
            txn,
            &mut volume,
            vol,
            (*parent, name),
            (*new_parent, new_name),
            *no_replace,
            *exchange,
            now,
        ),
        NsOp::SetXattr { ino, name, value, mode } => {
            check_xattr_name(name)?;
            if value.len() > XATTR_VALUE_MAX_BYTES {
                return Err(err(
                    ErrorCode::InvalidArgument,
                    format!("attribute value of {} bytes exceeds {XATTR_VALUE_MAX_BYTES}", value.len()),
                ));
            }
            if XATTRS_READ_ONLY.contains(&name.as_slice()) {
                return Err(err(ErrorCode::PermissionDenied, format!("{} is read-only", name_str(name))));
            }
            let text = || std::str::from_utf8(value).unwrap_or("\u{fffd}");
            if name.as_slice() == XATTR_PREFETCH {
                text().parse::<PrefetchMode>().map_err(|m| err(ErrorCode::InvalidArgument, m))?;
            }
            if name.as_slice() == XATTR_FILETYPE {
                text().parse::<FileType>().map_err(|m| err(ErrorCode::InvalidArgument, m))?;
            }
            let mut i = get(txn, *ino)?;
            let exists = txn.get_raw(&k_xattr(vol, *ino, name))?.is_some();
            match mode {
                XattrMode::CreateOnly if exists => {
                    return Err(err(ErrorCode::AlreadyExists, format!("{} exists", name_str(name))));
                }
                XattrMode::ReplaceOnly if !exists => {
                    return Err(err(ErrorCode::NoData, format!("{} does not exist", name_str(name))));
                }
                _ => {}
            }
            if !exists {
                if i.xattrs as usize >= XATTRS_PER_INODE_MAX {
                    return Err(err(
                        ErrorCode::NoSpace,
                        format!("{ino} has {XATTRS_PER_INODE_MAX} attributes"),
                    ));
                }
                i.xattrs += 1;
            }
            i.attr.ctime = now;
            txn.put(k_inode(vol, *ino), &i);
            txn.set(k_xattr(vol, *ino, name), Some(value.to_vec()));
            Ok(NsReply::Done)
        }
        NsOp::RemoveXattr { ino, name } => {
            check_xattr_name(name)?;
            let mut i = get(txn, *ino)?;
            if txn.get_raw(&k_xattr(vol, *ino, name))?.is_none() {
                return Err(err(ErrorCode::NoData, format!("{} does not exist", name_str(name))));
            }
            i.xattrs -= 1;
            i.attr.ctime = now;
            txn.put(k_inode(vol, *ino), &i);
            txn.delete(k_xattr(vol, *ino, name));
            Ok(NsReply::Done)
        }
        NsOp::Reclaim { ino } => {
            let i = get(txn, *ino)?;
            if i.attr.nlink != 0 {
                return Err(err(
                    ErrorCode::InvalidArgument,
                    format!("{ino} still has {} links", i.attr.nlink),
                ));
            }
            forget_inode(txn, &mut volume, vol, *ino);
            txn.put(k_volume(vol), &volume);
            Ok(NsReply::Done)
        }
        _ => Err(err(ErrorCode::Internal, format!("{} is not a write", op.name()))),
    }
}

fn check_xattr_name(name: &[u8]) -> Result<(), WireError> {
    if name.is_empty() {
        return Err(err(ErrorCode::InvalidArgument, "empty attribute name"));
    }
    if name.len() > XATTR_NAME_MAX_BYTES {
        return Err(err(ErrorCode::NameTooLong, format!("attribute name of {} bytes", name.len())));
    }
    Ok(())
}

fn set_attr(i: &mut Inode, set: &SetAttr, now: Timestamp) -> Result<(), WireError> {
    for t in [set.atime, set.mtime] {
        if let Some(TimeSet::At(t)) = t
            && t.nanos >= 1_000_000_000
        {
            return Err(err(
                ErrorCode::InvalidArgument,
                format!("a time's nanoseconds {} are not below 10^9", t.nanos),
            ));
        }
    }
    if let Some(size) = set.size {
        match i.attr.kind {
            FileKind::File => {}
            FileKind::Dir => {
                return Err(err(ErrorCode::IsDirectory, format!("{} is a directory", i.attr.ino)));
            }
            _ => {
                return Err(err(ErrorCode::InvalidArgument, format!("{} is not a regular file", i.attr.ino)));
            }
        }
        if size > FILE_SIZE_MAX {
            return Err(err(ErrorCode::InvalidArgument, format!("size {size} exceeds the maximum")));
        }
        i.attr.size = size;
        if set.mtime.is_none() {
            i.attr.mtime = now;
        }
    }
    if let Some(perm) = set.perm {
        i.attr.perm = perm & 0o7777;
    }
    if let Some(uid) = set.uid {
        i.attr.uid = uid;
    }
    if let Some(gid) = set.gid {
        i.attr.gid = gid;
    }
    if let Some(t) = set.atime {
        i.attr.atime = resolve_time(t, now);
    }
    if let Some(t) = set.mtime {
        i.attr.mtime = resolve_time(t, now);
    }
    i.attr.ctime = now;
    Ok(())
}

/// Removes one link to `victim` (its directory entry is already gone). A directory goes at
/// once; a file whose last link went becomes an orphan, returned to the caller.
fn drop_link(
    txn: &mut Txn<'_>,
    volume: &mut VolumeRecord,
    vol: VolumeId,
    victim: &mut Inode,
    now: Timestamp,
) -> Option<Attr> {
    let ino = victim.attr.ino;
    if victim.attr.kind == FileKind::Dir {
        forget_inode(txn, volume, vol, ino);
        return None;
    }
    victim.attr.nlink -= 1;
    victim.attr.ctime = now;
    txn.put(k_inode(vol, ino), victim);
    if victim.attr.nlink == 0 {
        txn.put(k_orphan(vol, ino), &());
        return Some(victim.attr.clone());
    }
    None
}

fn forget_inode(txn: &mut Txn<'_>, volume: &mut VolumeRecord, vol: VolumeId, ino: Ino) {
    txn.delete(k_inode(vol, ino));
    txn.delete(k_orphan(vol, ino));
    txn.delete_prefix(&key(b'x', &[&vol.0.to_be_bytes(), &ino.0.to_be_bytes()]));
    volume.info.inodes = volume.info.inodes.saturating_sub(1);
}

#[allow(clippy::too_many_arguments)]
fn rename(
    txn: &mut Txn<'_>,
    volume: &mut VolumeRecord,
    vol: VolumeId,
    (parent, name): (Ino, &ByteBuf),
    (new_parent, new_name): (Ino, &ByteBuf),
    no_replace: bool,
    exchange: bool,
    now: Timestamp,
) -> Result<NsReply, WireError> {
    check_name(name)?;
    check_name(new_name)?;
    let load_dir = |txn: &Txn<'_>, ino: Ino| -> Result<Inode, WireError> {
        let d: Inode = txn
            .get(&k_inode(vol, ino))?
            .ok_or_else(|| err(ErrorCode::NotFound, format!("no inode {ino}")))?;
        if d.attr.kind != FileKind::Dir {
            return Err(err(ErrorCode::NotDirectory, format!("{ino} is not a directory")));
        }
        Ok(d)
    };
    load_dir(txn, parent)?;
    load_dir(txn, new_parent)?;
    let src: Dentry = txn
        .get(&k_dentry(vol, parent, name))?
        .ok_or_else(|| err(ErrorCode::NotFound, format!("no entry {:?}", String::from_utf8_lossy(name))))?;
    let dst: Option<Dentry> = txn.get(&k_dentry(vol, new_parent, new_name))?;
    if no_replace && dst.is_some() {
        return Err(err(ErrorCode::AlreadyExists, format!("{:?} exists", String::from_utf8_lossy(new_name))));
    }
    if exchange && dst.is_none() {
        return Err(err(
            ErrorCode::NotFound,
            format!("no entry {:?} to exchange with", String::from_utf8_lossy(new_name)),
        ));
    }
    // Same inode under both names: nothing to do (POSIX).
    if let Some(d) = dst
        && d.ino == src.ino
    {
        return Ok(NsReply::Removed { orphan: None });
    }
    // A directory may not move into its own subtree.
    let is_ancestor = |txn: &Txn<'_>, anc: Ino, mut of: Ino| -> Result<bool, WireError> {
        loop {
            if of == anc {
                return Ok(true);
            }
            if of == ROOT_INO {
                return Ok(false);
            }
            let i: Inode = txn.get(&k_inode(vol, of))?.ok_or_else(|| internal("directory without inode"))?;
            of = i.parent;
        }
    };
    if src.kind == FileKind::Dir && is_ancestor(txn, src.ino, new_parent)? {
        return Err(err(ErrorCode::InvalidArgument, "cannot move a directory into itself"));
    }
    if exchange {
        let dst = dst.expect("checked above");
        if dst.kind == FileKind::Dir && is_ancestor(txn, dst.ino, parent)? {
            return Err(err(ErrorCode::InvalidArgument, "cannot move a directory into itself"));
        }
        txn.put(k_dentry(vol, parent, name), &dst);
        txn.put(k_dentry(vol, new_parent, new_name), &src);
        for (moved, to) in [(src, new_parent), (dst, parent)] {
            let mut i: Inode =
                txn.get(&k_inode(vol, moved.ino))?.ok_or_else(|| internal("entry without inode"))?;
            i.parent = to;
            i.attr.ctime = now;
            txn.put(k_inode(vol, moved.ino), &i);
        }
        if parent != new_parent && (src.kind == FileKind::Dir) != (dst.kind == FileKind::Dir) {
            let (gains, loses) =
                if src.kind == FileKind::Dir { (new_parent, parent) } else { (parent, new_parent) };
            adjust_dir(txn, vol, gains, 0, 1, now)?;
            adjust_dir(txn, vol, loses, 0, -1, now)?;
        }
        adjust_dir(txn, vol, parent, 0, 0, now)?;
        adjust_dir(txn, vol, new_parent, 0, 0, now)?;
        return Ok(NsReply::Removed { orphan: None });
    }
    let mut orphan = None;
    if let Some(d) = dst {
        let mut victim: Inode =
            txn.get(&k_inode(vol, d.ino))?.ok_or_else(|| internal("entry without inode"))?;
        match (src.kind == FileKind::Dir, d.kind == FileKind::Dir) {
            (true, false) => {
                return Err(err(
                    ErrorCode::NotDirectory,
                    format!("{:?} is not a directory", String::from_utf8_lossy(new_name)),
                ));
            }
            (false, true) => {
                return Err(err(
                    ErrorCode::IsDirectory,
                    format!("{:?} is a directory", String::from_utf8_lossy(new_name)),
                ));
            }
            (true, true) if victim.entries > 0 => {
                return Err(err(
                    ErrorCode::NotEmpty,
                    format!("{:?} is not empty", String::from_utf8_lossy(new_name)),
                ));
            }
            _ => {}
        }
        // The replaced entry goes away: its parent loses an entry (and a link if a directory).
        adjust_dir(txn, vol, new_parent, -1, if d.kind == FileKind::Dir { -1 } else { 0 }, now)?;
        orphan = drop_link(txn, volume, vol, &mut victim, now);
        txn.put(k_volume(vol), &*volume);
    }
    txn.delete(k_dentry(vol, parent, name));
    txn.put(k_dentry(vol, new_parent, new_name), &src);
    let links = if src.kind == FileKind::Dir { 1 } else { 0 };
    adjust_dir(txn, vol, parent, -1, -links, now)?;
    adjust_dir(txn, vol, new_parent, 1, links, now)?;
    let mut moved: Inode = txn.get(&k_inode(vol, src.ino))?.ok_or_else(|| internal("entry without inode"))?;
    moved.parent = new_parent;
    moved.attr.ctime = now;
    txn.put(k_inode(vol, src.ino), &moved);
    Ok(NsReply::Removed { orphan })
}

fn adjust_dir(
    txn: &mut Txn<'_>,
    vol: VolumeId,
    dir: Ino,
    entries: i64,
    links: i64,
    now: Timestamp,
) -> Result<(), WireError> {
    let mut d: Inode = txn.get(&k_inode(vol, dir))?.ok_or_else(|| internal("directory without inode"))?;
    d.entries =
        d.entries.checked_add_signed(entries).ok_or_else(|| internal("directory entry count underflow"))?;
    d.attr.nlink =
        d.attr.nlink.checked_add_signed(links as i32).ok_or_else(|| internal("link count underflow"))?;
    d.attr.mtime = now;
    d.attr.ctime = now;
    txn.put(k_inode(vol, dir), &d);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct T {
        _dir: tempfile::TempDir,
        sm: StateMachine,
        index: u64,
        vol: VolumeId,
    }

    impl T {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let sm = StateMachine::open(&dir.path().join("s")).unwrap();
            let mut t = Self { _dir: dir, sm, index: 1, vol: VolumeId(0) };
            let spec = VolumeSpec { replicas: 1, shard_count: 1, ..VolumeSpec::with_defaults("v") };
            let reg = NodeRegistration {
                node: NodeId(1),
                addr: "127.0.0.1:1".into(),
                zone: None,
                perf_class: Default::default(),
                capacity_bytes: 1,
                used_bytes: 0,
            };
            t.cmd(Cmd::RegisterNode(reg)).unwrap();
            match t.cmd(Cmd::CreateVolume { spec, shards: vec![vec![NodeId(1)]], now_ms: 0 }).unwrap() {
                CmdOutput::Volume(v) => t.vol = v.id,
                other => panic!("{other:?}"),
            }
            t
        }

        fn batch(&mut self, cmds: Vec<Cmd>) -> Vec<CmdResult> {
            self.index += 1;
            let proposals: Vec<Proposal> =
                cmds.into_iter().enumerate().map(|(i, cmd)| Proposal { id: i as u64, cmd }).collect();
            self.sm.apply(self.index, &proposals).unwrap()
        }

        fn cmd(&mut self, cmd: Cmd) -> CmdResult {
            self.batch(vec![cmd]).pop().unwrap()
        }

        fn ns(&mut self, op: NsOp) -> Result<NsReply, WireError> {
            let cmd = Cmd::Ns {
                volume: self.vol,
                op,
                now: Timestamp { secs: self.index as i64, nanos: 0 },
                tag: None,
            };
            self.cmd(cmd).map(|o| match o {
                CmdOutput::Ns(r) => r,
                other => panic!("{other:?}"),
            })
        }

        fn mk(&mut self, parent: Ino, name: &str, kind: FileKind) -> Result<Attr, WireError> {
            let target = (kind == FileKind::Symlink).then(|| ByteBuf::from(b"/target".to_vec()));
            match self.ns(NsOp::MkNode {
                parent,
                name: ByteBuf::from(name.as_bytes().to_vec()),
                kind,
                perm: 0o755,
                uid: 1,
                gid: 1,
                rdev: 0,
                target,
            })? {
                NsReply::Attr(a) => Ok(a),
                other => panic!("{other:?}"),
            }
        }

        fn attr(&self, ino: Ino) -> Attr {
            match self.sm.ns_read(self.vol, &NsOp::GetAttr { ino }).unwrap() {
                NsReply::Attr(a) => a,
                other => panic!("{other:?}"),
            }
        }

        fn rename(
            &mut self,
            p: Ino,
            a: &str,
            np: Ino,
            b: &str,
            no_replace: bool,
            exchange: bool,
        ) -> Result<NsReply, WireError> {
            self.ns(NsOp::Rename {
                parent: p,
                name: ByteBuf::from(a.as_bytes().to_vec()),
                new_parent: np,
                new_name: ByteBuf::from(b.as_bytes().to_vec()),
                no_replace,
                exchange,
            })
        }
    }

    fn code<T: std::fmt::Debug>(r: Result<T, WireError>) -> ErrorCode {
        r.unwrap_err().code
    }

    fn n(s: &str) -> ByteBuf {
        ByteBuf::from(s.as_bytes().to_vec())
    }

    #[test]
    fn directories_count_links_and_refuse_bad_removals() {
        let mut t = T::new();
        let d = t.mk(ROOT_INO, "d", FileKind::Dir).unwrap();
        let f = t.mk(d.ino, "f", FileKind::File).unwrap();
        assert_eq!(t.attr(ROOT_INO).nlink, 3);
        assert_eq!(code(t.mk(d.ino, "f", FileKind::File)), ErrorCode::AlreadyExists);
        assert_eq!(code(t.mk(f.ino, "x", FileKind::File)), ErrorCode::NotDirectory);
        assert_eq!(code(t.mk(ROOT_INO, &"n".repeat(256), FileKind::File)), ErrorCode::NameTooLong);
        assert_eq!(code(t.ns(NsOp::Rmdir { parent: ROOT_INO, name: n("d") })), ErrorCode::NotEmpty);
        assert_eq!(code(t.ns(NsOp::Unlink { parent: ROOT_INO, name: n("d") })), ErrorCode::IsDirectory);
        assert_eq!(code(t.ns(NsOp::Rmdir { parent: d.ino, name: n("f") })), ErrorCode::NotDirectory);
        let r = t.ns(NsOp::Unlink { parent: d.ino, name: n("f") }).unwrap();
        assert!(matches!(r, NsReply::Removed { orphan: Some(ref a) } if a.ino == f.ino && a.nlink == 0));
        t.ns(NsOp::Reclaim { ino: f.ino }).unwrap();
        t.ns(NsOp::Rmdir { parent: ROOT_INO, name: n("d") }).unwrap();
        assert_eq!(t.attr(ROOT_INO).nlink, 2);
        let NsReply::StatFs { inodes, .. } = t.sm.ns_read(t.vol, &NsOp::StatFs).unwrap() else { panic!() };
        assert_eq!(inodes, 1);
    }

    #[test]
    fn rename_follows_posix() {
        let mut t = T::new();
        let a = t.mk(ROOT_INO, "a", FileKind::Dir).unwrap();
        let b = t.mk(a.ino, "b", FileKind::Dir).unwrap();
        let f = t.mk(ROOT_INO, "f", FileKind::File).unwrap();
        let g = t.mk(ROOT_INO, "g", FileKind::File).unwrap();
        assert_eq!(code(t.rename(ROOT_INO, "a", b.ino, "a2", false, false)), ErrorCode::InvalidArgument);
        assert_eq!(code(t.rename(ROOT_INO, "f", ROOT_INO, "a", false, false)), ErrorCode::IsDirectory);
        assert_eq!(code(t.rename(ROOT_INO, "a", ROOT_INO, "f", false, false)), ErrorCode::NotDirectory);
        assert_eq!(code(t.rename(ROOT_INO, "f", ROOT_INO, "g", true, false)), ErrorCode::AlreadyExists);
        let r = t.rename(ROOT_INO, "f", ROOT_INO, "g", false, false).unwrap();
        assert!(matches!(r, NsReply::Removed { orphan: Some(ref o) } if o.ino == g.ino));
        assert_eq!(t.attr(f.ino).nlink, 1);
        // Moving a directory moves its parent link.
        t.rename(a.ino, "b", ROOT_INO, "b", false, false).unwrap();
        assert_eq!((t.attr(a.ino).nlink, t.attr(ROOT_INO).nlink), (2, 4));
        // Replacing a non-empty directory is refused; an empty one is replaced.
        t.mk(b.ino, "inner", FileKind::File).unwrap();
        assert_eq!(code(t.rename(ROOT_INO, "a", ROOT_INO, "b", false, false)), ErrorCode::NotEmpty);
        t.rename(ROOT_INO, "b", ROOT_INO, "a", false, false).unwrap();
        assert_eq!(t.attr(ROOT_INO).nlink, 3);
        // Exchange swaps two names atomically.
        let h = t.mk(ROOT_INO, "h", FileKind::Symlink).unwrap();
        t.rename(ROOT_INO, "g", ROOT_INO, "h", false, true).unwrap();
        let look = |t: &T, s: &str| match t
            .sm
            .ns_read(t.vol, &NsOp::Lookup { parent: ROOT_INO, name: n(s) })
            .unwrap()
        {
            NsReply::Attr(a) => a.ino,
            other => panic!("{other:?}"),
        };
        assert_eq!((look(&t, "g"), look(&t, "h")), (h.ino, f.ino));
    }

    #[test]
    fn set_attr_refuses_a_time_with_a_second_of_nanoseconds_and_changes_nothing() {
        let mut t = T::new();
        let f = t.mk(ROOT_INO, "f", FileKind::File).unwrap();
        let bad = Timestamp { secs: i64::MAX, nanos: u32::MAX };
        let set = SetAttr { perm: Some(0o600), mtime: Some(TimeSet::At(bad)), ..SetAttr::default() };
        let e = t.ns(NsOp::SetAttr { ino: f.ino, set }).unwrap_err();
        assert!(e.code == ErrorCode::InvalidArgument && e.message.contains("nanoseconds"), "{e:?}");
        assert_eq!(t.attr(f.ino), f, "nothing changed");
        let far = Timestamp { secs: i64::MAX, nanos: 999_999_999 };
        t.ns(NsOp::SetAttr {
            ino: f.ino,
            set: SetAttr { atime: Some(TimeSet::At(far)), ..SetAttr::default() },
        })
        .unwrap();
        assert_eq!(
            t.attr(f.ino).atime,
            far,
            "any whole second is stored; clients clamp what they cannot show"
        );
    }

    #[test]
    fn xattrs_modes_validation_and_inheritance() {
        let mut t = T::new();
        let d = t.mk(ROOT_INO, "d", FileKind::Dir).unwrap();
        let set =
            |ino, name: &str, value: &str, mode| NsOp::SetXattr { ino, name: n(name), value: n(value), mode };
        assert_eq!(code(t.ns(set(d.ino, "user.x", "1", XattrMode::ReplaceOnly))), ErrorCode::NoData);
        t.ns(set(d.ino, "user.x", "1", XattrMode::CreateOnly)).unwrap();
        assert_eq!(code(t.ns(set(d.ino, "user.x", "2", XattrMode::CreateOnly))), ErrorCode::AlreadyExists);
        let bad = t.ns(set(d.ino, "user.augur.prefetch", "readahead:0", XattrMode::Upsert)).unwrap_err();
        assert!(bad.code == ErrorCode::InvalidArgument && bad.message.contains("readahead:0"));
        assert_eq!(
            code(t.ns(set(d.ino, "user.augur.shards", "x", XattrMode::Upsert))),
            ErrorCode::PermissionDenied
        );
        t.ns(set(d.ino, "user.augur.prefetch", "sequential", XattrMode::Upsert)).unwrap();
        let f = t.mk(d.ino, "f", FileKind::File).unwrap();
        let got =
            t.sm.ns_read(t.vol, &NsOp::GetXattr { ino: f.ino, name: n("user.augur.prefetch") }).unwrap();
        assert_eq!(got, NsReply::Value(n("sequential")));
        t.ns(NsOp::RemoveXattr { ino: d.ino, name: n("user.x") }).unwrap();
        assert_eq!(code(t.ns(NsOp::RemoveXattr { ino: d.ino, name: n("user.x") })), ErrorCode::NoData);
    }

    /// A command creating file `name` in the root of volume 1 at `now`, tagged `tag`.
    fn mk_file(name: &str, now: Timestamp, tag: Option<RequestTag>) -> Cmd {
        Cmd::Ns {
            volume: VolumeId(1),
            op: NsOp::MkNode {
                parent: ROOT_INO,
                name: n(name),
                kind: FileKind::File,
                perm: 0o600,
                uid: 0,
                gid: 0,
                rdev: 0,
                target: None,
            },
            now,
            tag,
        }
    }

    #[test]
    fn a_failed_command_leaves_nothing_and_retries_are_answered_not_reapplied() {
        let mut t = T::new();
        let mk = |name: &str, tag| mk_file(name, Timestamp::default(), tag);
        let tag = RequestTag { client: 9, seq: 1, done_below: 1 };
        let first = t.batch(vec![mk("a", Some(tag)), mk("a", None), mk("b", None)]);
        assert!(first[0].is_ok() && first[2].is_ok());
        assert_eq!(first[1].as_ref().unwrap_err().code, ErrorCode::AlreadyExists);
        // The same tagged request again: the first answer, no second inode.
        let again = t.cmd(mk("a", Some(tag)));
        assert_eq!(again, first[0]);
        let NsReply::StatFs { inodes, .. } = t.sm.ns_read(t.vol, &NsOp::StatFs).unwrap() else { panic!() };
        assert_eq!(inodes, 3);
    }

    #[test]
    fn sessions_idle_for_a_day_are_swept_and_busy_ones_kept() {
        let mut t = T::new();
        let mk = |name: String, client: u64, seq: u64, secs: i64| {
            mk_file(&name, Timestamp { secs, nanos: 0 }, Some(RequestTag { client, seq, done_below: seq }))
        };
        let has = |t: &T, client: u64| t.sm.db.get(k_session(client)).unwrap().is_some();
        // Ten clients at time 0, then one busy client a day and a second later.
        for c in 1..=10 {
            t.cmd(mk(format!("early{c}"), c, 1, 0)).unwrap();
        }
        assert!((1..=10).all(|c| has(&t, c)));
        let later = SESSION_IDLE_SECS + 1;
        for seq in 1..=12 {
            t.cmd(mk(format!("late{seq}"), 100, seq, later)).unwrap();
        }
        assert!((1..=10).all(|c| !has(&t, c)), "idle sessions swept");
        assert!(has(&t, 100), "the busy one kept");
        // A client a day minus a second old is kept.
        t.cmd(mk("edge".into(), 5, 2, later)).unwrap();
        for seq in 13..=30 {
            t.cmd(mk(format!("late{seq}"), 100, seq, 2 * SESSION_IDLE_SECS)).unwrap();
        }
        assert!(has(&t, 5), "{:?}", t.sm.db.get(k_session_seen(5)).unwrap());
    }

    #[test]
    fn a_snapshot_restores_the_same_state() {
        let mut t = T::new();
        for i in 0..50 {
            t.mk(ROOT_INO, &format!("f{i}"), FileKind::File).unwrap();
        }
        let (applied, _, data) = t.sm.snapshot().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let other = StateMachine::open(dir.path()).unwrap();
        assert_eq!(other.restore(&data, 3).unwrap(), applied);
        assert_eq!(other.restored_from().unwrap(), Some((applied, 3)));
        let list = |sm: &StateMachine| {
            sm.ns_read(t.vol, &NsOp::ReadDir { ino: ROOT_INO, after: None, limit: 1000 }).unwrap()
        };
        assert_eq!(list(&other), list(&t.sm));
        assert_eq!(other.volumes().unwrap(), t.sm.volumes().unwrap());
    }
}
