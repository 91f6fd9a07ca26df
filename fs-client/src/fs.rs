//! The mounted file system: fuser callbacks over the meta group (namespace) and the block data
//! path. Every callback hands its work to the tokio runtime and replies from there; errors
//! become errno values here and nowhere else, and no callback panics (no unwrap on input).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use augur_meta::MetaClient;
use augur_prefetch::filetype::Group;
use augur_proto::meta::{
    Attr, DirEntry, FileKind, NsOp, NsReply, PrefetchMode, ROOT_INO, SetAttr, TimeSet, Timestamp, XattrMode,
};
use augur_proto::msg::{RequestBody, ResponseBody};
use augur_proto::{BlockId, ErrorCode, Ino, RpcError, VolumeId};
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, Notifier, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};
use serde_bytes::ByteBuf;
use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tracing::{debug, warn};

use crate::blocks::{BlockClient, BlockError};
use crate::cache::{BlockCache, BlockKey, CachedBlock};
use crate::file::{Dirty, OpenFile, UploadError, split};
use crate::stats::{Counter, PrefetchMark, PrefetchStats, StatsPair};

/// Read-only attributes computed by the client.
pub const XATTR_SHARDS: &[u8] = b"user.augur.shards";
pub const XATTR_PREFETCH_STATS: &[u8] = b"user.augur.prefetch_stats";
pub const XATTR_PREFETCH: &[u8] = b"user.augur.prefetch";
pub const XATTR_FILETYPE: &[u8] = b"user.augur.filetype";

/// Tunables of a mount; every limit is named here (defaults in `Default`).
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Client block cache, in bytes (0 disables it). Default 256 MiB.
    pub cache_bytes: u64,
    /// Bytes of block uploads in flight over all files; a writer past it waits. Default 64 MiB.
    pub write_back_bytes: u64,
    /// Block uploads in flight over all files (each one a primary write plus its forwarding
    /// to the backups). More only queue inside the nodes, past the per-attempt deadline, and
    /// come back as retries. Default 64.
    pub uploads_in_flight_max: usize,
    /// Bytes of partly written blocks kept per open file before they are all sent. Default
    /// 16 MiB (at least one block).
    pub dirty_bytes_per_file: u64,
    /// Bytes of partly written blocks kept over all files (each one a whole block's buffer):
    /// past it, a writer sends all of its own file's before it returns. Default 256 MiB.
    pub dirty_bytes_total: u64,
    /// How long written data may stay on this client only: a file written this long ago and
    /// not flushed since (a slow appender that keeps it open) is flushed in the background, its
    /// blocks to the replicas and its size to the meta group, as the kernel's write-back does
    /// after `dirty_expire_centisecs`. So a client crash loses at most about this much of what
    /// was written, and other mounts see it. `Duration::ZERO` turns it off. Default 30 s.
    pub dirty_expire: Duration,
    /// Most blocks read ahead of a sequential reader. Default 32.
    pub readahead_blocks_max: u32,
    /// Block fetches for prefetching (the engine's and the hints' readahead) in flight over all
    /// files; more named blocks wait in the prefetch queue (`PREFETCH_QUEUE_MAX`) and go stale
    /// there (`PREFETCH_STALE_READS`). Default 64.
    pub prefetch_in_flight_max: usize,
    /// Kernel caching of attributes and directory entries. Default 1 s.
    pub attr_ttl: Duration,
    /// Callbacks being served at once; the kernel's next request waits past it. Default 256.
    pub ops_in_flight_max: usize,
    /// Threads reading requests from /dev/fuse. Default 4.
    pub fuse_threads: usize,
    /// Let every local user in (`allow_other`). Default: on when mounted by root.
    pub allow_other: bool,
    /// Let the kernel check permissions from mode/uid/gid (`default_permissions`). Default on.
    pub default_permissions: bool,
    /// Largest write the kernel sends in one request. Default 1 MiB.
    pub max_write_bytes: u32,
    /// Record every read and write request here (`trace::TraceRecorder`). Default none.
    pub trace: Option<std::path::PathBuf>,
    /// The prefetch engine's ONNX model (`engine`); None, missing or corrupt: the heuristic
    /// predictor (`auto`) runs instead. Default none (`augur mount|dev` pass the shipped one).
    pub model: Option<std::path::PathBuf>,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            cache_bytes: 256 << 20,
            write_back_bytes: 64 << 20,
            uploads_in_flight_max: 64,
            dirty_bytes_per_file: 16 << 20,
            dirty_bytes_total: 256 << 20,
            dirty_expire: Duration::from_secs(30),
            readahead_blocks_max: 32,
            prefetch_in_flight_max: 64,
            attr_ttl: Duration::from_secs(1),
            ops_in_flight_max: 256,
            fuse_threads: 4,
            allow_other: nix_is_root(),
            default_permissions: true,
            max_write_bytes: 1 << 20,
            trace: None,
            model: None,
        }
    }
}

fn nix_is_root() -> bool {
    // SAFETY-free: geteuid has no preconditions; libc is the only way without another crate.
    #[allow(unsafe_code)]
    unsafe {
        libc::geteuid() == 0
    }
}

/// A block named for prefetch, waiting for a slot.
struct Queued {
    file: Arc<OpenFile>,
    index: u64,
    /// The file's read count when it was named.
    named_at: u64,
    /// The prefetch engine named it (`Inner::prefetch_block`).
    by_engine: bool,
}

/// Blocks waiting for a prefetch slot; past it the oldest is dropped (counted stale).
pub const PREFETCH_QUEUE_MAX: usize = 256;

/// The prefetch queue, oldest first, and the keys in it: a block queued already is not wanted
/// again (`Inner::wants_prefetch`), so it is neither queued twice nor paid for twice.
#[derive(Default)]
struct PrefetchQueue {
    order: VecDeque<Queued>,
    keys: HashSet<BlockKey>,
}

impl PrefetchQueue {
    fn len(&self) -> usize {
        self.order.len()
    }
    fn contains(&self, key: &BlockKey) -> bool {
        self.keys.contains(key)
    }
    fn push_back(&mut self, q: Queued) {
        self.keys.insert(BlockKey { ino: q.file.ino, index: q.index });
        self.order.push_back(q);
    }
    fn pop_front(&mut self) -> Option<Queued> {
        let q = self.order.pop_front()?;
        self.keys.remove(&BlockKey { ino: q.file.ino, index: q.index });
        Some(q)
    }
}
/// Reads of its file after which a queued block is stale and dropped unfetched: the reads have
/// moved on, and the engine has named what they lead to since.
pub const PREFETCH_STALE_READS: u64 = 8;
/// Most files whose prefetch counters are remembered.
const PREFETCH_STATS_FILES_MAX: usize = 4096;
/// Inodes whose last reported (size, mtime) is remembered for invalidating the kernel's copy;
/// an inode forgotten here is simply invalidated at its next open.
const TOLD_INODES_MAX: usize = 1 << 16;
/// Files whose type group is remembered across opens, so a file opened again unchanged is read
/// with its type from the first request; one forgotten (or changed since) is detected again.
const FILE_GROUPS_MAX: usize = 1 << 16;
/// A read of at most 1/this of a block, not following the previous one, fetches only its bytes.
const SMALL_READ_FRACTION: u64 = 8;
/// Unlinked files whose blocks are being deleted in the background at once.
const RECLAIMS_IN_FLIGHT: usize = 64;
/// Directory entries fetched from the meta group per page.
const READDIR_PAGE: u32 = 1024;
/// Most entries a directory handle holds at once: a larger directory is listed in parts of
/// this many, each fetched when `readdir` reaches it (after the last name of the one before).
pub const DIR_PART_ENTRIES: usize = 4096;

/// One part of a directory listing held by its handle: entries `base .. base + list.len()` in
/// name order, and whether more follow the last one.
struct DirPart {
    base: usize,
    list: Vec<DirEntry>,
    more: bool,
}

/// What a FUSE file handle stands for.
enum OpenHandle {
    /// `seen`: the file's upload failures this handle has been told of (`file::Failures`).
    File {
        ino: Ino,
        seen: AtomicU64,
    },
    Dir {
        ino: Ino,
        entries: Mutex<Option<Arc<DirPart>>>,
    },
}

impl OpenHandle {
    /// The upload failures a file handle has been told of (`None` for a directory).
    fn seen(&self) -> Option<&AtomicU64> {
        match self {
            OpenHandle::File { seen, .. } => Some(seen),
            OpenHandle::Dir { .. } => None,
        }
    }
}

/// Everything the callbacks share; lives in an `Arc` so work can move onto the runtime.
pub struct Inner {
    pub meta: Arc<MetaClient>,
    pub blocks: Arc<BlockClient>,
    pub vol: VolumeId,
    pub block_bytes: u64,
    pub opts: MountOptions,
    pub cache: Arc<BlockCache>,
    files: Mutex<HashMap<Ino, Arc<OpenFile>>>,
    handles: Mutex<HashMap<u64, Arc<OpenHandle>>>,
    next_fh: AtomicU64,
    /// Write-back budget in KiB permits.
    write_budget: Arc<Semaphore>,
    /// Bytes of dirty block buffers over all files (`MountOptions::dirty_bytes_total`).
    dirty_now: AtomicU64,
    upload_slots: Arc<Semaphore>,
    prefetch_slots: Arc<Semaphore>,
    reclaims: Arc<Semaphore>,
    fetching: Mutex<HashMap<BlockKey, watch::Receiver<()>>>,
    /// Blocks named for prefetch while every prefetch slot was busy, oldest first.
    prefetch_queue: Mutex<PrefetchQueue>,
    trace: Option<crate::trace::TraceRecorder>,
    stats: quick_cache::sync::Cache<Ino, Arc<PrefetchStats>>,
    /// The mount's prefetch counters (the root directory's `user.augur.prefetch_stats`).
    total: Arc<PrefetchStats>,
    pub notifier: OnceLock<Notifier>,
    /// The prefetch engine (started by `start_engine` once the `Arc` exists).
    engine: OnceLock<crate::engine::Engine>,
    /// (size, mtime) of every inode as last told to the kernel, to drop its stale copy at open.
    told: quick_cache::sync::Cache<Ino, (u64, Timestamp)>,
    /// Type groups learned, by inode, with the mtime the file had then: for its next open, if
    /// the file has not changed.
    groups: quick_cache::sync::Cache<Ino, (Group, Timestamp)>,
}

pub struct AugurFs {
    inner: Arc<Inner>,
    rt: Handle,
    slots: Arc<Semaphore>,
}

/// An error on its way to becoming an errno.
#[derive(Debug)]
pub struct FsError {
    pub errno: i32,
    pub what: String,
}

type FsResult<T> = Result<T, FsError>;

impl FsError {
    pub fn new(errno: i32, what: impl Into<String>) -> Self {
        Self { errno, what: what.into() }
    }
}

impl From<RpcError> for FsError {
    fn from(e: RpcError) -> Self {
        let errno = match e.code() {
            Some(ErrorCode::NotFound) => libc::ENOENT,
            Some(ErrorCode::AlreadyExists) => libc::EEXIST,
            Some(ErrorCode::NotEmpty) => libc::ENOTEMPTY,
            Some(ErrorCode::NotDirectory) => libc::ENOTDIR,
            Some(ErrorCode::IsDirectory) => libc::EISDIR,
            Some(ErrorCode::NoData) => libc::ENODATA,
            Some(ErrorCode::NameTooLong) => libc::ENAMETOOLONG,
            Some(ErrorCode::InvalidArgument) => libc::EINVAL,
            Some(ErrorCode::PermissionDenied) => libc::EPERM,
            Some(ErrorCode::NoSpace) => libc::ENOSPC,
            _ => libc::EIO,
        };
        FsError::new(errno, e.to_string())
    }
}

impl From<BlockError> for FsError {
    fn from(e: BlockError) -> Self {
        match e {
            BlockError::NoSpace(_) => FsError::new(libc::ENOSPC, e.to_string()),
            BlockError::Invalid(_) => FsError::new(libc::EINVAL, e.to_string()),
            BlockError::Unavailable(_) => FsError::new(libc::EIO, e.to_string()),
            BlockError::Meta(m) => m.into(),
        }
    }
}

/// A stored time as the kernel gets it. Total: a time `SystemTime` cannot hold (seconds near
/// ±2^63; the meta group refuses nanoseconds of a second or more) reads as the epoch rather than
/// failing every stat of the inode.
fn ts(t: Timestamp) -> SystemTime {
    let secs = Duration::from_secs(t.secs.unsigned_abs());
    let whole = if t.secs >= 0 { UNIX_EPOCH.checked_add(secs) } else { UNIX_EPOCH.checked_sub(secs) };
    whole.and_then(|w| w.checked_add(Duration::from_nanos(u64::from(t.nanos)))).unwrap_or(UNIX_EPOCH)
}

fn timeset(t: TimeOrNow) -> TimeSet {
    match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(st) => TimeSet::At(match st.duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp { secs: d.as_secs() as i64, nanos: d.subsec_nanos() },
            // fuser 0.18 builds a pre-1970 time as EPOCH - (-secs, nsecs) (its own TODO
            // notes the missing borrow), so the kernel's (secs, nsecs) is read back as is.
            Err(e) => {
                Timestamp { secs: -(e.duration().as_secs() as i64), nanos: e.duration().subsec_nanos() }
            }
        }),
    }
}

pub fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
    }
}

fn kind_of_mode(mode: u32) -> Option<FileKind> {
    Some(match mode & libc::S_IFMT {
        libc::S_IFREG | 0 => FileKind::File,
        libc::S_IFDIR => FileKind::Dir,
        libc::S_IFLNK => FileKind::Symlink,
        libc::S_IFIFO => FileKind::Fifo,
        libc::S_IFSOCK => FileKind::Socket,
        libc::S_IFCHR => FileKind::CharDev,
        libc::S_IFBLK => FileKind::BlockDev,
        _ => return None,
    })
}

fn ino(i: INodeNo) -> Ino {
    Ino(i.0)
}

fn name_buf(name: &OsStr) -> ByteBuf {
    ByteBuf::from(name.as_bytes().to_vec())
}

impl Inner {
    pub fn new(
        meta: Arc<MetaClient>,
        blocks: Arc<BlockClient>,
        opts: MountOptions,
        trace: Option<crate::trace::TraceRecorder>,
    ) -> Self {
        let block_bytes = u64::from(blocks.volume.block_size_bytes);
        Self {
            vol: blocks.volume.id,
            cache: Arc::new(BlockCache::new(opts.cache_bytes, block_bytes)),
            write_budget: Arc::new(Semaphore::new(((opts.write_back_bytes >> 10) as usize).max(1))),
            dirty_now: AtomicU64::new(0),
            prefetch_slots: Arc::new(Semaphore::new(opts.prefetch_in_flight_max.max(1))),
            upload_slots: Arc::new(Semaphore::new(opts.uploads_in_flight_max.max(1))),
            reclaims: Arc::new(Semaphore::new(RECLAIMS_IN_FLIGHT)),
            meta,
            blocks,
            block_bytes,
            opts,
            files: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            fetching: Mutex::new(HashMap::new()),
            prefetch_queue: Mutex::new(Default::default()),
            trace,
            stats: quick_cache::sync::Cache::new(PREFETCH_STATS_FILES_MAX),
            total: Arc::default(),
            notifier: OnceLock::new(),
            engine: OnceLock::new(),
            told: quick_cache::sync::Cache::new(TOLD_INODES_MAX),
            groups: quick_cache::sync::Cache::new(FILE_GROUPS_MAX),
        }
    }

    /// Loads the model named in the options (or logs why not) and starts the prefetch engine.
    pub fn start_engine(self: &Arc<Self>) {
        // `auto` judges its candidates in a cache of this mount's size (0 with no cache: by
        // their shadows).
        let cache_blocks = (self.opts.cache_bytes / self.block_bytes.max(1)) as usize;
        let knobs = augur_prefetch::model::ModelKnobs { cache_blocks, ..Default::default() };
        let model = crate::engine::load_model(self.opts.model.as_deref());
        let had_model = model.is_some();
        let mut started = crate::engine::Engine::start(Arc::downgrade(self), model, knobs);
        if had_model && let Err(e) = &started {
            warn!(error = %e, "prefetch: the model cannot run; prefetching with the heuristic predictor (auto)");
            started = crate::engine::Engine::start(Arc::downgrade(self), None, knobs);
        }
        match started {
            Ok(engine) => {
                let _ = self.engine.set(engine);
            }
            Err(e) => warn!(error = %e, "prefetch: the engine did not start; only hints prefetch"),
        }
    }

    /// The prefetch engine's counters: blocks it observed, and blocks on which the network's
    /// own choice was passed on.
    pub fn engine_counters(&self) -> (u64, u64) {
        self.engine
            .get()
            .map_or((0, 0), |e| (e.reads.load(Ordering::Relaxed), e.decided.load(Ordering::Relaxed)))
    }

    /// Every file open here now.
    fn open_files(&self) -> Vec<Arc<OpenFile>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    fn file(&self, ino: Ino) -> Option<Arc<OpenFile>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner()).get(&ino).cloned()
    }

    fn new_handle(&self, h: OpenHandle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().unwrap_or_else(|p| p.into_inner()).insert(fh, Arc::new(h));
        fh
    }

    /// A new handle on open file `f`: told of upload failures from now on only.
    async fn file_handle(&self, f: &OpenFile) -> u64 {
        let seen = failures(&f.state.lock().await.errors);
        self.new_handle(OpenHandle::File { ino: f.ino, seen: AtomicU64::new(seen) })
    }

    fn handle(&self, fh: u64) -> Option<Arc<OpenHandle>> {
        self.handles.lock().unwrap_or_else(|p| p.into_inner()).get(&fh).cloned()
    }

    async fn ns(&self, op: NsOp) -> FsResult<NsReply> {
        Ok(self.meta.ns(self.vol, op).await?)
    }

    async fn attr_op(&self, op: NsOp) -> FsResult<Attr> {
        match self.ns(op).await? {
            NsReply::Attr(a) => Ok(a),
            other => Err(FsError::new(libc::EIO, format!("meta answered {other:?}"))),
        }
    }

    /// Converts an attribute for the kernel, with this client's unflushed size on top.
    fn to_kernel(&self, a: &Attr) -> FileAttr {
        let size = match (a.kind, self.file(a.ino)) {
            (FileKind::File, Some(f)) => f.size().max(a.size),
            _ => a.size,
        };
        self.told.insert(a.ino, (size, a.mtime));
        FileAttr {
            ino: INodeNo(a.ino.0),
            size,
            blocks: size.div_ceil(512),
            atime: ts(a.atime),
            mtime: ts(a.mtime),
            ctime: ts(a.ctime),
            crtime: ts(a.ctime),
            kind: file_type(a.kind),
            perm: a.perm,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            rdev: a.rdev,
            blksize: self.block_bytes as u32,
            flags: 0,
        }
    }

    // ---- data path ----

    /// Reads one block: the cache, a fetch already under way, or the replicas.
    async fn block(self: &Arc<Self>, f: &OpenFile, index: u64) -> FsResult<Arc<[u8]>> {
        let key = BlockKey { ino: f.ino, index };
        let stamp = f.stamp();
        if let Some(b) = self.cache.get(key, stamp) {
            if let Some(m) = &b.prefetched {
                m.read(false);
            }
            return Ok(b.data);
        }
        // Either join a fetch already under way (a readahead), or become the one fetching.
        let joined = {
            let mut fetching = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
            match fetching.get(&key) {
                Some(rx) => Ok(rx.clone()),
                None => {
                    let (tx, rx) = watch::channel(());
                    fetching.insert(key, rx);
                    Err(tx)
                }
            }
        };
        match joined {
            Err(tx) => {
                self.stats_of(f.ino).add(Counter::DemandMisses, 1);
                let result = self.fetch(f, key, stamp, false).await;
                self.fetching.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
                drop(tx);
                result
            }
            Ok(mut rx) => {
                // Ends when that fetch finishes (its sender drops); then look in the cache
                // again, and fetch here if it failed.
                let _ = rx.changed().await;
                match self.cache.get(key, stamp) {
                    Some(b) => {
                        if let Some(m) = &b.prefetched {
                            m.read(true);
                        }
                        Ok(b.data)
                    }
                    None => {
                        self.stats_of(f.ino).add(Counter::DemandMisses, 1);
                        self.fetch(f, key, stamp, false).await
                    }
                }
            }
        }
    }

    async fn fetch(
        &self,
        f: &OpenFile,
        key: BlockKey,
        stamp: Timestamp,
        prefetch: bool,
    ) -> FsResult<Arc<[u8]>> {
        let gen_before = f.write_gen.load(Ordering::Acquire);
        let data: Arc<[u8]> = self.blocks.read(BlockId::new(key.ino, key.index)).await?.into();
        // A write (or an upload landing) while we fetched makes these bytes possibly old: do
        // not keep them. Insert first and check after, so a write between the two still wins.
        let prefetched = prefetch.then(|| {
            // The file's bytes the block covers (a block never written comes back empty).
            let covered = self.block_bytes.min(f.size().saturating_sub(key.index * self.block_bytes));
            let stats = self.stats_of(key.ino);
            stats.add(Counter::PrefetchedBytes, covered);
            PrefetchMark::new(stats)
        });
        let block = CachedBlock { stamp, data: data.clone(), prefetched };
        self.cache.insert(key, block);
        // Writes through a later open of the file bump that open's `write_gen`, not this one's:
        // a fetch that outlived its open (closed, or closed and opened again) keeps nothing.
        let still_open = self.file(key.ino).is_some_and(|cur| std::ptr::eq(Arc::as_ptr(&cur), f));
        if f.write_gen.load(Ordering::Acquire) != gen_before || !still_open {
            self.cache.remove(key);
        }
        Ok(data)
    }

    /// A file's prefetch counters (remembered for `PREFETCH_STATS_FILES_MAX` files) with the
    /// mount's.
    fn stats_of(&self, ino: Ino) -> StatsPair {
        let file = self.stats.get_or_insert_with(&ino, || Ok::<_, ()>(Arc::default())).unwrap_or_default();
        StatsPair { file, total: self.total.clone() }
    }

    /// A file's prefetch counters (`user.augur.prefetch_stats`); the root's are the mount's.
    pub fn prefetch_stats(&self, ino: Ino) -> Arc<PrefetchStats> {
        if ino == ROOT_INO { self.total.clone() } else { self.stats_of(ino).file }
    }

    async fn read(self: &Arc<Self>, f: Arc<OpenFile>, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let (arrived, group) = (std::time::Instant::now(), f.group());
        // Blocks with unsent or in-flight writes are sent first, so the replicas have them.
        {
            let mut st = f.state.lock().await;
            let first = offset / self.block_bytes;
            let last = (offset + u64::from(size)).div_ceil(self.block_bytes);
            let pending = st.dirty.range(first..last).next().is_some()
                || st.uploads.keys().any(|i| (first..last).contains(i));
            if pending {
                let before = failures(&st.errors);
                self.flush_data(&f, &mut st).await;
                // An upload that failed just now fails this read too (and stays counted for
                // the writer's flush).
                failure_since(&st.errors, before).1?;
            }
        }
        let file_size = f.size();
        if offset >= file_size || size == 0 {
            return Ok(Vec::new());
        }
        let len = (u64::from(size)).min(file_size - offset);
        f.reads.fetch_add(1, Ordering::Relaxed);
        let stats = self.stats_of(f.ino);
        stats.add(Counter::DemandBytes, len);
        let pieces: Vec<(u64, u32, u32)> = split(offset, len, self.block_bytes).collect();
        let stamp = f.stamp();
        let hits: Vec<bool> = pieces
            .iter()
            .map(|&(index, _, _)| self.cache.contains(BlockKey { ino: f.ino, index }, stamp))
            .collect();
        // A small read away from where the last one ended, of a block neither cached nor being
        // fetched: fetch just those bytes (a random 4 KiB read need not move a whole block),
        // and cache nothing.
        if let [(index, off, n)] = pieces[..]
            && u64::from(n) * SMALL_READ_FRACTION <= self.block_bytes
            && f.ra.lock().unwrap_or_else(|p| p.into_inner()).next != index
            && !hits[0]
            && !self
                .fetching
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&BlockKey { ino: f.ino, index })
        {
            stats.add(Counter::DemandMisses, 1);
            let range = Some(augur_proto::msg::ByteRange { offset: off, len: n });
            let mut data = self.blocks.read_range(BlockId::new(f.ino, index), range).await?;
            data.resize(n as usize, 0);
            f.ra.lock().unwrap_or_else(|p| p.into_inner()).next = index + 1;
            self.observe(&f, index, hits, (arrived, group));
            self.detect_group(&f, offset, &data, 1);
            return Ok(data);
        }
        let mut tasks = Vec::with_capacity(pieces.len());
        for &(index, _, _) in &pieces {
            let (me, f) = (self.clone(), f.clone());
            tasks.push(tokio::spawn(async move { me.block(&f, index).await }));
        }
        let mut out = Vec::with_capacity(len as usize);
        for (task, (_, off, n)) in tasks.into_iter().zip(&pieces) {
            let data = task.await.map_err(|e| FsError::new(libc::EIO, e.to_string()))??;
            let (off, n) = (*off as usize, *n as usize);
            let have = data.len().saturating_sub(off).min(n);
            if have > 0 {
                out.extend_from_slice(&data[off..off + have]);
            }
            out.resize(out.len() + (n - have), 0);
        }
        if let (Some(first), Some(last)) = (pieces.first(), pieces.last()) {
            self.observe(&f, first.0, hits, (arrived, group));
            self.read_ahead(&f, first.0, last.0).await;
        }
        self.detect_group(&f, offset, &out, 1);
        Ok(out)
    }

    /// Hands a read request to the prefetch engine, with when it came and the file's type
    /// group as known then.
    fn observe(
        &self,
        f: &Arc<OpenFile>,
        first: u64,
        hits: Vec<bool>,
        (at, group): (std::time::Instant, Group),
    ) {
        if let Some(e) = self.engine.get() {
            e.observe(f.clone(), first, hits, at, group);
        }
    }

    /// The readahead a fixed hint asks for (`sequential`: `readahead_blocks_max` blocks,
    /// `readahead:N`: N); `auto` files are the prefetch engine's (`engine`), `off` and `random`
    /// get none.
    async fn read_ahead(self: &Arc<Self>, f: &Arc<OpenFile>, first: u64, last: u64) {
        let max = self.opts.readahead_blocks_max;
        let need_mode = {
            let ra = f.ra.lock().unwrap_or_else(|p| p.into_inner());
            ra.mode.is_none() && (first == ra.next || first + 1 == ra.next) && first > 0
        };
        if need_mode {
            // Looked up off the read path; the window opens at a later read.
            self.look_up_mode(f, Vec::new());
        }
        let (from, to) = {
            let mut ra = f.ra.lock().unwrap_or_else(|p| p.into_inner());
            ra.window = match ra.mode.unwrap_or_default() {
                PrefetchMode::Off | PrefetchMode::Random | PrefetchMode::Auto => 0,
                PrefetchMode::Sequential => max,
                PrefetchMode::Readahead(n) => n.min(max),
            };
            ra.next = last + 1;
            if ra.window == 0 {
                return;
            }
            let end_block = f.size().div_ceil(self.block_bytes);
            if last + 1 + u64::from(ra.window) < ra.issued_until {
                // Read again from further back (a loader's next epoch from offset 0): the
                // window starts over from here rather than after the old high-water mark.
                ra.issued_until = last + 1;
            }
            let from = (last + 1).max(ra.issued_until);
            let to = (last + 1 + u64::from(ra.window)).min(end_block);
            if from >= to {
                return;
            }
            ra.issued_until = to;
            (from, to)
        };
        for index in from..to {
            self.prefetch_block(f, index, None);
        }
    }

    /// Asks for block `index` of `f` in the background. Returns false, doing nothing, if the
    /// block is past the end of the file, cached, being fetched or queued already, or `f` is no
    /// longer the file as open now (a handle released and opened again has a new `OpenFile`,
    /// whose writes the old one's `write_gen` would not see), or if `pay` declines. Otherwise
    /// (true) the block is fetched at once if fewer than `prefetch_in_flight_max` prefetches
    /// are under way, else queued until one ends. `pay` is given for a block the prefetch
    /// engine named (None: a fixed hint's readahead) and asked only once the block is known to
    /// need a fetch, so the engine's budget is spent on real fetches (`Predictor::pays`). Once
    /// paid, every refund is made here or by the queue: a block a demand read started fetching
    /// in between, or one dropped from the queue unfetched, hands its credit back.
    pub(crate) fn prefetch_block(
        self: &Arc<Self>,
        f: &Arc<OpenFile>,
        index: u64,
        pay: Option<&mut dyn FnMut() -> bool>,
    ) -> bool {
        if !self.wants_prefetch(f, index) {
            return false;
        }
        let by_engine = pay.is_some();
        if pay.is_some_and(|pay| !pay()) {
            return false;
        }
        if let Ok(permit) = self.prefetch_slots.clone().try_acquire_owned() {
            if self.start_prefetch(f.clone(), index, permit).is_some() {
                // Being fetched already (a demand read took it meanwhile): no fetch of its own.
                self.hand_back(by_engine, f.ino, index);
            }
            return true;
        }
        {
            let mut queue = self.prefetch_queue.lock().unwrap_or_else(|p| p.into_inner());
            if queue.len() >= PREFETCH_QUEUE_MAX
                && let Some(old) = queue.pop_front()
            {
                self.drop_queued(&old);
            }
            queue.push_back(Queued {
                file: f.clone(),
                index,
                named_at: f.reads.load(Ordering::Relaxed),
                by_engine,
            });
        }
        // A slot may have come free since, with nobody left to look at the queue.
        if let Ok(permit) = self.prefetch_slots.clone().try_acquire_owned() {
            self.next_queued(permit);
        }
        true
    }

    pub(crate) fn wants_prefetch(&self, f: &Arc<OpenFile>, index: u64) -> bool {
        let key = BlockKey { ino: f.ino, index };
        index < f.size().div_ceil(self.block_bytes)
            && !self.cache.contains(key, f.stamp())
            && self.file(f.ino).is_some_and(|now| Arc::ptr_eq(&now, f))
            && !self.fetching.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&key)
            && !self.prefetch_queue.lock().unwrap_or_else(|p| p.into_inner()).contains(&key)
    }

    /// Fetches a block into the cache holding a prefetch slot, then hands the slot to the
    /// queue. Gives the slot back if the block is being fetched already.
    fn start_prefetch(
        self: &Arc<Self>,
        f: Arc<OpenFile>,
        index: u64,
        permit: OwnedSemaphorePermit,
    ) -> Option<OwnedSemaphorePermit> {
        let stamp = f.stamp();
        let key = BlockKey { ino: f.ino, index };
        let tx = {
            let mut fetching = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
            if fetching.contains_key(&key) {
                return Some(permit);
            }
            let (tx, rx) = watch::channel(());
            fetching.insert(key, rx);
            tx
        };
        self.stats_of(f.ino).add(Counter::Issued, 1);
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(e) = me.fetch(&f, key, stamp, true).await {
                debug!(ino = %key.ino, index = key.index, error = %e.what, "prefetch failed");
            }
            me.fetching.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
            drop(tx);
            me.next_queued(permit);
        });
        None
    }

    /// With a free prefetch slot: starts the oldest queued block still worth fetching. Blocks
    /// named `PREFETCH_STALE_READS` or more reads of their file ago, or no longer wanted
    /// (`wants_prefetch`), are dropped on the way and counted stale.
    fn next_queued(self: &Arc<Self>, mut permit: OwnedSemaphorePermit) {
        loop {
            let mut queue = self.prefetch_queue.lock().unwrap_or_else(|p| p.into_inner());
            let Some(q) = queue.pop_front() else {
                // The slot goes back while the queue is still locked: a block queued after this
                // look finds the slot free on its own second try (`prefetch_block`).
                drop(permit);
                return;
            };
            drop(queue);
            let age = q.file.reads.load(Ordering::Relaxed).saturating_sub(q.named_at);
            if age >= PREFETCH_STALE_READS || !self.wants_prefetch(&q.file, q.index) {
                self.drop_queued(&q);
                continue;
            }
            let (ino, index, by_engine) = (q.file.ino, q.index, q.by_engine);
            match self.start_prefetch(q.file, q.index, permit) {
                None => return,
                // Being fetched already (a demand read took it): no fetch of its own.
                Some(p) => {
                    permit = p;
                    self.hand_back(by_engine, ino, index);
                }
            }
        }
    }

    /// A queued block is dropped unfetched: counted stale, and if the engine named it, its
    /// credit goes back to the engine.
    fn drop_queued(&self, q: &Queued) {
        // Returned first: the stats line reads `stale` before `returned`, so a reader never
        // sees an engine block stale and not yet returned.
        self.hand_back(q.by_engine, q.file.ino, q.index);
        self.stats_of(q.file.ino).add(Counter::Stale, 1);
    }

    /// A block named for prefetch was not fetched for it: if the engine named it, the engine
    /// gets its credit back (counted `returned`).
    fn hand_back(&self, by_engine: bool, ino: Ino, index: u64) {
        if by_engine
            && let Some(e) = self.engine.get()
            && e.hand_back(ino.0, index)
        {
            self.count_returned(ino);
        }
    }

    /// One block's credit went back to the engine (`Counter::Returned`).
    pub(crate) fn count_returned(&self, ino: Ino) {
        self.stats_of(ino).add(Counter::Returned, 1);
    }

    /// The file's prefetch hint, if looked up already.
    pub(crate) fn known_mode(&self, f: &OpenFile) -> Option<PrefetchMode> {
        f.ra.lock().unwrap_or_else(|p| p.into_inner()).mode
    }

    /// Looks the file's prefetch hint up in a task of its own, once per open file (and again
    /// after its `user.augur.prefetch` is removed here); if it is `auto`, then fetches `then`
    /// (what the engine named meanwhile). The file's type group is looked up beside it; the
    /// hint takes effect as soon as it is known. Returns `then` if a lookup was under way
    /// already (its blocks are not fetched: the caller hands them back).
    pub(crate) fn look_up_mode(self: &Arc<Self>, f: &Arc<OpenFile>, then: Vec<u64>) -> Vec<u64> {
        if f.hint_lookup.swap(true, Ordering::AcqRel) {
            return then;
        }
        let (me, f) = (self.clone(), f.clone());
        let generation = f.ra.lock().unwrap_or_else(|p| p.into_inner()).mode_generation;
        tokio::spawn(async move {
            let hint = async {
                let found = me.hint_of(f.ino).await;
                let mode = {
                    let mut ra = f.ra.lock().unwrap_or_else(|p| p.into_inner());
                    // Unless the hint was set or removed here meanwhile: that answer is newer.
                    if ra.mode_generation == generation {
                        ra.mode = Some(found);
                    }
                    ra.mode
                };
                // Paid for by the engine already: what is not fetched now goes back.
                for b in then {
                    if mode != Some(PrefetchMode::Auto) || !me.prefetch_block(&f, b, Some(&mut || true)) {
                        me.hand_back(true, f.ino, b);
                    }
                }
            };
            tokio::join!(hint, me.look_up_group(&f));
        });
        Vec::new()
    }

    /// The file's `user.augur.prefetch` changed here: `mode` in force now, or (None) looked up
    /// again at its next read. A file whose hint was never looked up still has its type looked
    /// up (that runs beside the hint lookup).
    fn set_mode(self: &Arc<Self>, f: &Arc<OpenFile>, mode: Option<PrefetchMode>) {
        {
            let mut ra = f.ra.lock().unwrap_or_else(|p| p.into_inner());
            ra.mode = mode;
            ra.mode_generation += 1;
        }
        if mode.is_none() {
            f.hint_lookup.store(false, Ordering::Release);
        } else if !f.hint_lookup.swap(true, Ordering::AcqRel) {
            let (me, f) = (self.clone(), f.clone());
            tokio::spawn(async move { me.look_up_group(&f).await });
        }
    }

    /// The file's `user.augur.filetype` override, if it has one, replaces whatever group was
    /// known; without one, a group still unknown (no read has covered offset 0 yet) is
    /// detected from the replicas' first bytes. A failure leaves the group as it was.
    async fn look_up_group(&self, f: &OpenFile) {
        if let Some(g) = self.xattr_value(f.ino, XATTR_FILETYPE).await {
            f.set_group(g);
        } else if !f.group_known()
            && let Ok(g) = self.detected_filetype(f.ino).await
        {
            self.learn_group(f, g);
        }
    }

    /// Detects a file's type group from the bytes a read at `offset` returned (or a write at
    /// `offset` carries), when they start at 0, are at least `min_len` long and the group is
    /// not known yet.
    fn detect_group(&self, f: &OpenFile, offset: u64, data: &[u8], min_len: usize) {
        if offset == 0 && !f.group_known() && data.len() >= min_len.max(1) {
            self.learn_group(f, augur_prefetch::filetype::group_of_head(data));
        }
    }

    /// Takes a detected group for the open file (unless it knows one) and remembers what was
    /// detected for the file's next open (an override is found there by the hint lookup).
    fn learn_group(&self, f: &OpenFile, g: Group) {
        f.learn_group(g);
        if !f.group_overridden() {
            self.groups.insert(f.ino, (f.group(), f.stamp()));
        }
    }

    async fn hint_of(&self, ino: Ino) -> PrefetchMode {
        self.xattr_value(ino, XATTR_PREFETCH).await.unwrap_or(self.blocks.volume.hints.prefetch)
    }

    /// A file's Augur attribute `name` as the meta group keeps it, parsed; None when it has
    /// none (or it cannot be read or parsed).
    async fn xattr_value<T: std::str::FromStr>(&self, ino: Ino, name: &[u8]) -> Option<T> {
        match self.ns(NsOp::GetXattr { ino, name: ByteBuf::from(name.to_vec()) }).await {
            Ok(NsReply::Value(v)) => parse_value(&v),
            _ => None,
        }
    }

    /// Hands block `index`'s dirty bytes to a background upload (after any earlier upload of
    /// the same block, so writes land in order), within the write-back budget.
    async fn upload(&self, st: &mut crate::file::FileState, f: &OpenFile, index: u64, d: Dirty) {
        let ino = f.ino;
        self.dirty_now.fetch_sub(self.block_bytes, Ordering::AcqRel);
        if let Some(earlier) = st.uploads.remove(&index) {
            record(&st.errors, earlier.await.map(|()| Ok(())));
        }
        let kib = (((d.hi - d.lo) as usize).div_ceil(1024)).max(1) as u32;
        let permits = kib.min(self.write_budget_total());
        let (Ok(permit), Ok(slot)) = (
            self.write_budget.clone().acquire_many_owned(permits).await,
            self.upload_slots.clone().acquire_owned().await,
        ) else {
            return;
        };
        let (blocks, errors) = (self.blocks.clone(), st.errors.clone());
        let (cache, write_gen) = (self.cache.clone(), f.write_gen.clone());
        let handle = tokio::spawn(async move {
            let _permits = (permit, slot);
            let bytes = &d.data[d.lo as usize..d.hi as usize];
            record(&errors, Ok(blocks.write(BlockId::new(ino, index), d.lo, bytes).await));
            // Whatever was fetched or cached for this block before it landed is old now.
            write_gen.fetch_add(1, Ordering::AcqRel);
            cache.remove(BlockKey { ino, index });
        });
        st.uploads.insert(index, handle);
    }

    fn write_budget_total(&self) -> u32 {
        u32::try_from(self.opts.write_back_bytes >> 10).unwrap_or(u32::MAX).max(1)
    }

    async fn write(&self, f: &OpenFile, seen: Option<&AtomicU64>, offset: u64, data: &[u8]) -> FsResult<u32> {
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| FsError::new(libc::EFBIG, "write past the largest offset"))?;
        // A new file's header names its type (a short first write may be only part of it).
        self.detect_group(f, offset, data, augur_prefetch::filetype::HEAD_BYTES);
        let mut st = f.state.lock().await;
        // A background upload of this file failed: say so now rather than only at close.
        report_failures(&st.errors, seen)?;
        f.write_gen.fetch_add(1, Ordering::AcqRel);
        let mut pos = 0usize;
        for (index, off, n) in split(offset, data.len() as u64, self.block_bytes) {
            let piece = &data[pos..pos + n as usize];
            pos += n as usize;
            self.cache.remove(BlockKey { ino: f.ino, index });
            if let Some(d) = st.dirty.get(&index)
                && !d.joins(off, n)
            {
                let old = st.dirty.remove(&index).expect("present");
                self.upload(&mut st, f, index, old).await;
            }
            let block_bytes = self.block_bytes as usize;
            let dirty_now = &self.dirty_now;
            let d = st.dirty.entry(index).or_insert_with(|| {
                dirty_now.fetch_add(block_bytes as u64, Ordering::AcqRel);
                Dirty { data: vec![0; block_bytes], lo: off, hi: off }
            });
            d.data[off as usize..(off + n) as usize].copy_from_slice(piece);
            d.lo = d.lo.min(off);
            d.hi = d.hi.max(off + n);
            if d.lo == 0 && d.hi as u64 == self.block_bytes {
                let full = st.dirty.remove(&index).expect("present");
                self.upload(&mut st, f, index, full).await;
            }
        }
        if st.dirty.len() as u64 > (self.opts.dirty_bytes_per_file / self.block_bytes).max(1)
            || self.dirty_now.load(Ordering::Acquire) > self.opts.dirty_bytes_total
        {
            let all = std::mem::take(&mut st.dirty);
            for (index, d) in all {
                self.upload(&mut st, f, index, d).await;
            }
        }
        st.wrote = true;
        st.written_at.get_or_insert_with(std::time::Instant::now);
        f.size.fetch_max(end, Ordering::AcqRel);
        reap(&mut st);
        Ok(data.len() as u32)
    }

    /// Sends every dirty block and waits for every upload of the file. Failures stay in the
    /// file's error slot for the next write, flush or fsync to report.
    async fn flush_data(&self, f: &OpenFile, st: &mut crate::file::FileState) {
        let all = std::mem::take(&mut st.dirty);
        for (index, d) in all {
            self.upload(st, f, index, d).await;
        }
        let uploads: Vec<_> = st.uploads.drain().collect();
        for (_, h) in uploads {
            record(&st.errors, h.await.map(|()| Ok(())));
        }
    }

    /// Flush: data to the replicas, then size and mtime to the meta group (close-to-open).
    /// Upload failures are reported to the handle `seen` (each once; see `file::Failures`);
    /// as with the kernel's write-back, the size is committed even so: the handles are told,
    /// and holding the size back would silently drop what was written after the failure.
    async fn flush(&self, f: &OpenFile, seen: Option<&AtomicU64>) -> FsResult<()> {
        let mut st = f.state.lock().await;
        self.flush_data(f, &mut st).await;
        report_failures(&st.errors, seen)?;
        if st.wrote {
            let size = f.size();
            let a = self.attr_op(NsOp::Extend { ino: f.ino, size }).await?;
            st.meta_size = a.size;
            st.wrote = false;
            f.size.store(a.size.max(size), Ordering::Release);
        }
        st.written_at = None;
        Ok(())
    }

    /// Starts the background write-back (`MountOptions::dirty_expire`): it ends with the mount.
    pub fn start_write_back(self: &Arc<Self>) {
        let expire = self.opts.dirty_expire;
        if expire.is_zero() {
            return;
        }
        let tick = (expire / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(tick).await;
                let Some(inner) = weak.upgrade() else { return };
                inner.write_back(expire).await;
            }
        });
    }

    /// Flushes every open file written more than `expire` ago and not flushed since. A failure
    /// stays in the file's error slot for its handles to report (`file::Failures`).
    async fn write_back(&self, expire: Duration) {
        for f in self.open_files() {
            let due = f.state.lock().await.written_at.is_some_and(|at| at.elapsed() >= expire);
            if due && let Err(e) = self.flush(&f, None).await {
                warn!(ino = %f.ino, error = %e.what, "write-back of a file left open failed");
            }
        }
    }

    /// Deletes `ino`'s blocks from `from` on (its size bounds which shards can hold any).
    async fn delete_blocks(&self, ino: Ino, from: u64, size: u64) -> FsResult<()> {
        let end = size.div_ceil(self.block_bytes);
        if end <= from {
            return Ok(());
        }
        let v = &self.blocks.volume;
        let stripe = u64::from(v.stripe_unit_blocks.max(1));
        let stripes = end.div_ceil(stripe) - from / stripe;
        let shards: BTreeSet<_> = if stripes >= u64::from(v.shard_count) {
            (0..v.shard_count).map(augur_proto::ShardId).collect()
        } else {
            (from / stripe..end.div_ceil(stripe)).map(|s| v.shard_of(ino, s * stripe)).collect()
        };
        let mut tasks = Vec::new();
        for shard in shards {
            let blocks = self.blocks.clone();
            tasks.push(tokio::spawn(async move { blocks.delete_in(shard, ino, from).await }));
        }
        for t in tasks {
            t.await.map_err(|e| FsError::new(libc::EIO, e.to_string()))??;
        }
        Ok(())
    }

    /// Zeroes a block's bytes from `from_offset` to its end (the new tail after a truncate).
    async fn zero_tail(&self, ino: Ino, size: u64) -> FsResult<()> {
        let off = size % self.block_bytes;
        if off == 0 {
            return Ok(());
        }
        let index = size / self.block_bytes;
        let zeros = vec![0u8; (self.block_bytes - off) as usize];
        self.blocks.write(BlockId::new(ino, index), off as u32, &zeros).await?;
        self.cache.remove(BlockKey { ino, index });
        Ok(())
    }

    /// Truncates or extends `ino` to `size`: data first (so nothing old shows through a later
    /// extension), then the meta group.
    async fn set_size(&self, ino: Ino, size: u64, mut set: SetAttr) -> FsResult<Attr> {
        let current = self.attr_op(NsOp::GetAttr { ino }).await?;
        if current.kind == FileKind::Dir {
            return Err(FsError::new(libc::EISDIR, "a directory has no size to set"));
        }
        let f = self.file(ino);
        let mut guard = match &f {
            Some(f) => Some(f.state.lock().await),
            None => None,
        };
        let mut old_size = current.size;
        if let (Some(f), Some(st)) = (&f, guard.as_mut()) {
            f.write_gen.fetch_add(1, Ordering::AcqRel);
            // Failures stay counted for the handles' next flush; the size set here is what
            // the caller asked for either way.
            self.flush_data(f, st).await;
            old_size = old_size.max(f.size());
        }
        if current.kind == FileKind::File && size < old_size {
            self.zero_tail(ino, size).await?;
            self.delete_blocks(ino, size.div_ceil(self.block_bytes), old_size).await?;
            let first_gone = size / self.block_bytes;
            for index in first_gone..old_size.div_ceil(self.block_bytes).min(first_gone + 1 + (1 << 16)) {
                self.cache.remove(BlockKey { ino, index });
            }
        }
        set.size = Some(size);
        let a = self.attr_op(NsOp::SetAttr { ino, set }).await?;
        if let (Some(f), Some(st)) = (&f, guard.as_mut()) {
            st.meta_size = a.size;
            st.wrote = false;
            f.size.store(a.size, Ordering::Release);
            f.set_stamp(a.mtime);
        }
        Ok(a)
    }

    /// Deletes an orphan's blocks and forgets it in the meta group. The size is looked up
    /// again (a release elsewhere may have grown it since the unlink answered); `size_hint` is
    /// what this client knows on top.
    async fn reclaim(&self, ino: Ino, size_hint: u64) -> FsResult<()> {
        let a = match self.attr_op(NsOp::GetAttr { ino }).await {
            Ok(a) => a,
            Err(e) if e.errno == libc::ENOENT => return Ok(()), // reclaimed already
            Err(e) => return Err(e),
        };
        if a.nlink != 0 {
            return Ok(());
        }
        if a.kind == FileKind::File {
            self.delete_blocks(ino, 0, a.size.max(size_hint)).await?;
        }
        self.ns(NsOp::Reclaim { ino }).await?;
        Ok(())
    }

    /// Reclaims in the background, at most `RECLAIMS_IN_FLIGHT` at once (the caller waits for
    /// a slot). A failure leaves an orphan in the meta group and is logged.
    async fn reclaim_later(self: &Arc<Self>, ino: Ino, size_hint: u64) {
        let Ok(slot) = self.reclaims.clone().acquire_owned().await else { return };
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(e) = me.reclaim(ino, size_hint).await {
                warn!(%ino, error = %e.what, "reclaiming an unlinked file failed; it stays an orphan");
            }
            drop(slot);
        });
    }

    /// An unlink or rename; an inode whose last link it dropped is reclaimed.
    async fn remove(self: &Arc<Self>, op: NsOp) -> FsResult<()> {
        match self.ns(op).await? {
            NsReply::Removed { orphan } => self.orphaned(orphan).await,
            _ => Ok(()),
        }
    }

    /// After an unlink/rename dropped a last link: reclaim on the last release here, or now.
    async fn orphaned(self: &Arc<Self>, orphan: Option<Attr>) -> FsResult<()> {
        let Some(o) = orphan else { return Ok(()) };
        let mut size = o.size;
        {
            // Under the table lock, so a release cannot slip between the check and the mark.
            let files = self.files.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(f) = files.get(&o.ino) {
                f.unlinked.store(true, Ordering::Release);
                return Ok(());
            }
        }
        if let Some(f) = self.file(o.ino) {
            size = size.max(f.size());
        }
        self.reclaim_later(o.ino, size).await;
        Ok(())
    }

    /// Counts one more handle on `i`, creating its state if needed. Done before the inode's
    /// attributes are fetched, so an unlink meanwhile defers its reclaim to our release.
    fn register(&self, i: Ino, a: Option<&Attr>) -> Arc<OpenFile> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let f = files
            .entry(i)
            .or_insert_with(|| {
                let (size, mtime) = a.map_or((0, Timestamp::default()), |a| (a.size, a.mtime));
                Arc::new(OpenFile::new(i, size, mtime))
            })
            .clone();
        f.handles.fetch_add(1, Ordering::AcqRel);
        f
    }

    /// Drops one handle; the last one removes the file's state. True when it was the last.
    fn unregister(&self, f: &OpenFile) -> bool {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let left = f.handles.fetch_sub(1, Ordering::AcqRel) - 1;
        if left == 0 {
            files.remove(&f.ino);
        }
        left == 0
    }

    async fn open(self: &Arc<Self>, i: Ino) -> FsResult<Arc<OpenFile>> {
        let f = self.register(i, None);
        match self.attr_op(NsOp::GetAttr { ino: i }).await {
            Ok(a) => {
                self.refresh(&f, &a).await;
                let remembered = self.groups.get(&i).filter(|(_, mtime)| *mtime == f.stamp());
                if let Some(g) = self.blocks.volume.hints.filetype.or(remembered.map(|(g, _)| g)) {
                    f.learn_group(g);
                }
                Ok(f)
            }
            Err(e) => {
                if self.unregister(&f) && f.unlinked.load(Ordering::Acquire) {
                    self.reclaim_later(i, 0).await;
                }
                Err(e)
            }
        }
    }

    /// Takes the fresh attributes `a` seen at an open (close-to-open): with no unflushed
    /// writes here, size and cache stamp follow the meta group (a new mtime from another
    /// mount's close makes every cached block of the file stale), and the kernel's copy of the
    /// attributes is dropped when it differs.
    async fn refresh(&self, f: &OpenFile, a: &Attr) {
        {
            let mut st = f.state.lock().await;
            if !st.wrote && st.dirty.is_empty() && st.uploads.is_empty() {
                f.set_stamp(a.mtime);
                f.size.store(a.size, Ordering::Release);
                st.meta_size = a.size;
            }
        }
        if self.told.get(&a.ino) != Some((a.size, a.mtime))
            && let Some(n) = self.notifier.get()
            && let Err(e) = n.inval_inode(INodeNo(a.ino.0), -1, 0)
        {
            debug!(ino = %a.ino, error = %e, "could not drop the kernel's attributes");
        }
    }

    async fn release(self: &Arc<Self>, f: Arc<OpenFile>, seen: &AtomicU64) -> FsResult<()> {
        let flushed = self.flush(&f, Some(seen)).await;
        if self.unregister(&f) && f.unlinked.load(Ordering::Acquire) {
            self.reclaim_later(f.ino, f.size()).await;
        }
        flushed
    }

    /// Flushes every open file (unmount).
    pub async fn flush_all(&self) {
        for f in self.open_files() {
            if let Err(e) = self.flush(&f, None).await {
                warn!(ino = %f.ino, error = %e.what, "flush at unmount failed");
            }
        }
        // Background reclaims finish too (bounded: a dead cluster must not hold up unmount).
        let all = RECLAIMS_IN_FLIGHT as u32;
        let _ = tokio::time::timeout(Duration::from_secs(30), self.reclaims.acquire_many(all)).await;
    }

    /// Up to `DIR_PART_ENTRIES` entries of `dir` after the name `after` (from the first
    /// without), and whether more follow.
    async fn listing(&self, dir: Ino, mut after: Option<ByteBuf>) -> FsResult<(Vec<DirEntry>, bool)> {
        let mut out = Vec::new();
        loop {
            let limit = READDIR_PAGE.min((DIR_PART_ENTRIES - out.len()) as u32);
            match self.ns(NsOp::ReadDir { ino: dir, after: after.clone(), limit }).await? {
                NsReply::Entries { entries, more } => {
                    after = entries.last().map(|e| e.name.clone());
                    out.extend(entries);
                    if !more || after.is_none() || out.len() >= DIR_PART_ENTRIES {
                        return Ok((out, more && after.is_some()));
                    }
                }
                other => return Err(FsError::new(libc::EIO, format!("meta answered {other:?}"))),
            }
        }
    }

    /// The part of `dir`'s listing that holds entry `want` (or the last part, if the directory
    /// ends before it), starting from the handle's current part `cur`: the next parts follow
    /// it by name; an entry before it (a rewind or seek back) lists again from the start.
    async fn dir_part(&self, dir: Ino, cur: Option<Arc<DirPart>>, want: usize) -> FsResult<Arc<DirPart>> {
        let mut part = match cur {
            Some(p) if p.base <= want => p,
            _ => {
                let (list, more) = self.listing(dir, None).await?;
                Arc::new(DirPart { base: 0, list, more })
            }
        };
        while want >= part.base + part.list.len() && part.more {
            let after = part.list.last().map(|e| e.name.clone());
            let (list, more) = self.listing(dir, after).await?;
            if list.is_empty() {
                break;
            }
            part = Arc::new(DirPart { base: part.base + part.list.len(), list, more });
        }
        Ok(part)
    }

    async fn statfs(&self) -> FsResult<(u64, u64, u64, u64)> {
        let (inodes, files_max) = match self.ns(NsOp::StatFs).await? {
            NsReply::StatFs { inodes, files_max } => (inodes, files_max),
            other => return Err(FsError::new(libc::EIO, format!("meta answered {other:?}"))),
        };
        let (mut capacity, mut used) = (0u64, 0u64);
        if let ResponseBody::Cluster(c) = self.meta.call(RequestBody::ClusterStatus).await? {
            for n in c.nodes.iter().filter(|n| n.alive) {
                capacity = capacity.saturating_add(n.capacity_bytes);
                used = used.saturating_add(n.used_bytes.min(n.capacity_bytes));
            }
        }
        let r = u64::from(self.blocks.volume.replicas.max(1));
        let bs = self.block_bytes;
        Ok((
            capacity / r / bs,
            capacity.saturating_sub(used) / r / bs,
            files_max,
            files_max.saturating_sub(inodes),
        ))
    }

    /// `user.augur.shards`: the shards that can hold this file's blocks and their replicas.
    async fn shards_text(&self, i: Ino) -> FsResult<Vec<u8>> {
        let a = self.attr_op(NsOp::GetAttr { ino: i }).await?;
        let size = match self.file(i) {
            Some(f) => f.size().max(a.size),
            None => a.size,
        };
        let v = &self.blocks.volume;
        let stripe = u64::from(v.stripe_unit_blocks.max(1));
        let stripes = size.div_ceil(self.block_bytes).div_ceil(stripe);
        let mut shards: Vec<augur_proto::ShardId> =
            (0..stripes.min(u64::from(v.shard_count) * 4)).map(|s| v.shard_of(i, s * stripe)).collect();
        shards.sort();
        shards.dedup();
        let _ = self.blocks.refresh().await;
        let mut out = String::new();
        for s in shards {
            let p = self.blocks.placement_of(s);
            let replicas = p
                .as_ref()
                .map(|p| {
                    p.replicas.iter().map(|r| format!("{}@{}", r.node, r.addr)).collect::<Vec<_>>().join(",")
                })
                .unwrap_or_default();
            let epoch = p.map(|p| p.epoch.0).unwrap_or_default();
            out.push_str(&format!("{s} epoch={epoch} replicas={replicas}\n"));
        }
        if out.is_empty() {
            out.push_str("none (no blocks written)\n");
        }
        Ok(out.into_bytes())
    }

    async fn getxattr(&self, i: Ino, name: &[u8]) -> FsResult<Vec<u8>> {
        if name == XATTR_SHARDS {
            return self.shards_text(i).await;
        }
        if name == XATTR_PREFETCH_STATS {
            // Counted per file (and for the mount, on its root): a directory has none of its own.
            if i != ROOT_INO
                && self.file(i).is_none()
                && self.attr_op(NsOp::GetAttr { ino: i }).await?.kind == FileKind::Dir
            {
                return Err(FsError::new(
                    libc::ENODATA,
                    "prefetch stats are kept per file, and for the whole mount on its root",
                ));
            }
            return Ok(self.prefetch_stats(i).to_string().into_bytes());
        }
        if !name.starts_with(b"user.") {
            return Err(FsError::new(libc::ENODATA, "only user.* attributes are kept"));
        }
        match self.ns(NsOp::GetXattr { ino: i, name: ByteBuf::from(name.to_vec()) }).await {
            Ok(NsReply::Value(v)) => Ok(v.into_vec()),
            // Not overridden: the volume's hint, else what the first bytes say.
            Err(e) if name == XATTR_FILETYPE && e.errno == libc::ENODATA => {
                Ok(self.detected_filetype(i).await?.to_string().into_bytes())
            }
            Ok(other) => Err(FsError::new(libc::EIO, format!("meta answered {other:?}"))),
            Err(e) => Err(e),
        }
    }

    /// The type group of a file without a `user.augur.filetype` of its own: the volume's
    /// filetype hint, else what this mount knows of the file if it is open here, else detected
    /// from its first `HEAD_BYTES` bytes as the replicas have them.
    async fn detected_filetype(&self, i: Ino) -> FsResult<augur_proto::meta::FileType> {
        if self.attr_op(NsOp::GetAttr { ino: i }).await?.kind != FileKind::File {
            return Err(FsError::new(libc::ENODATA, "only regular files have a detected type"));
        }
        if let Some(g) = self.blocks.volume.hints.filetype {
            return Ok(g);
        }
        // Known already from a read or write of the head here: no need to read it again.
        if let Some(f) = self.file(i).filter(|f| f.group_known() && !f.group_overridden()) {
            return Ok(f.group());
        }
        let range =
            augur_proto::msg::ByteRange { offset: 0, len: augur_prefetch::filetype::HEAD_BYTES as u32 };
        let head = self.blocks.read_range(BlockId::new(i, 0), Some(range)).await?;
        Ok(augur_prefetch::filetype::group_of_head(&head))
    }
}

/// An attribute's value as text parsed into `T` (a prefetch hint, a file type).
fn parse_value<T: std::str::FromStr>(v: &[u8]) -> Option<T> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Keeps the first failure of an upload for the next flush (or write) to report.
fn record(slot: &UploadError, r: Result<Result<(), BlockError>, tokio::task::JoinError>) {
    let err: Option<FsError> = match r {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.into()),
        Err(e) => Some(FsError::new(libc::EIO, e.to_string())),
    };
    if let Some(e) = err {
        warn!(error = %e.what, "block upload failed");
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        slot.count += 1;
        slot.last = Some((e.errno, e.what));
    }
}

/// Upload failures so far.
fn failures(slot: &UploadError) -> u64 {
    slot.lock().unwrap_or_else(|p| p.into_inner()).count
}

/// The failure count now, and the latest failure if there were more than `seen`.
fn failure_since(slot: &UploadError, seen: u64) -> (u64, FsResult<()>) {
    let (latest, now) = slot.lock().unwrap_or_else(|p| p.into_inner()).since(seen);
    (now, latest.map_or(Ok(()), |(errno, what)| Err(FsError::new(errno, what))))
}

/// Reports the latest upload failure to a handle that has not been told of every failure so
/// far (`seen`), and marks them told. `None`: a caller with no handle (unmount), told nothing.
fn report_failures(slot: &UploadError, seen: Option<&AtomicU64>) -> FsResult<()> {
    let Some(seen) = seen else { return Ok(()) };
    let (now, result) = failure_since(slot, seen.load(Ordering::Acquire));
    seen.fetch_max(now, Ordering::AcqRel);
    result
}

/// Forgets finished uploads (each recorded its own failure).
fn reap(st: &mut crate::file::FileState) {
    st.uploads.retain(|_, h| !h.is_finished());
}

use std::future::Future;

impl AugurFs {
    pub fn new(inner: Arc<Inner>, rt: Handle) -> Self {
        let slots = Arc::new(Semaphore::new(inner.opts.ops_in_flight_max.max(1)));
        Self { inner, rt, slots }
    }

    /// An operation answered with a new or found entry (lookup, mknod, mkdir, symlink, link).
    fn entry(&self, op: NsOp, reply: ReplyEntry, what: &'static str) {
        self.spawn(move |fs| async move {
            match fs.attr_op(op).await {
                Ok(a) => reply.entry(&fs.opts.attr_ttl, &fs.to_kernel(&a), Generation(0)),
                Err(e) => reply.error(fail(what, &e)),
            }
        });
    }

    /// Runs `work` on the runtime with one of the bounded operation slots.
    fn spawn<F, Fut>(&self, work: F)
    where
        F: FnOnce(Arc<Inner>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let permit = match self.rt.block_on(self.slots.clone().acquire_owned()) {
            Ok(p) => p,
            Err(_) => return,
        };
        let fut = work(self.inner.clone());
        self.rt.spawn(async move {
            fut.await;
            drop(permit);
        });
    }
}

fn fail(what: &str, e: &FsError) -> Errno {
    if matches!(e.errno, libc::EIO | libc::ENOSPC) {
        warn!(op = what, errno = e.errno, error = %e.what, "file system operation failed");
    } else {
        debug!(op = what, errno = e.errno, error = %e.what, "file system operation refused");
    }
    Errno::from_i32(e.errno)
}

impl Filesystem for AugurFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(self.inner.opts.max_write_bytes);
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn destroy(&mut self) {
        let inner = self.inner.clone();
        self.rt.block_on(async move { inner.flush_all().await });
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let op = NsOp::Lookup { parent: ino(parent), name: name_buf(name) };
        self.entry(op, reply, "lookup");
    }

    fn getattr(&self, _req: &Request, i: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.spawn(move |fs| async move {
            match fs.attr_op(NsOp::GetAttr { ino: ino(i) }).await {
                Ok(a) => reply.attr(&fs.opts.attr_ttl, &fs.to_kernel(&a)),
                Err(e) => reply.error(fail("getattr", &e)),
            }
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        i: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            perm: mode.map(|m| (m & 0o7777) as u16),
            uid,
            gid,
            size: None,
            atime: atime.map(timeset),
            mtime: mtime.map(timeset),
        };
        let i = ino(i);
        self.spawn(move |fs| async move {
            let result = async {
                if let Some(size) = size {
                    return fs.set_size(i, size, set).await;
                }
                // Unsent writes go first, so their mtime does not land after an explicit one.
                if let Some(f) = fs.file(i) {
                    fs.flush(&f, None).await?;
                }
                fs.attr_op(NsOp::SetAttr { ino: i, set }).await
            }
            .await;
            match result {
                Ok(a) => reply.attr(&fs.opts.attr_ttl, &fs.to_kernel(&a)),
                Err(e) => reply.error(fail("setattr", &e)),
            }
        });
    }

    fn readlink(&self, _req: &Request, i: INodeNo, reply: ReplyData) {
        self.spawn(move |fs| async move {
            match fs.ns(NsOp::ReadLink { ino: ino(i) }).await {
                Ok(NsReply::Target(t)) => reply.data(&t),
                Ok(_) => reply.error(Errno::EINVAL),
                Err(e) => reply.error(fail("readlink", &e)),
            }
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let Some(kind) = kind_of_mode(mode) else {
            reply.error(Errno::EINVAL);
            return;
        };
        if kind == FileKind::Dir || kind == FileKind::Symlink {
            reply.error(Errno::EINVAL);
            return;
        }
        let op = mknode(req, parent, name, kind, mode & !umask, rdev, None);
        self.entry(op, reply, "mknod");
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let op = mknode(req, parent, name, FileKind::Dir, mode & !umask, 0, None);
        self.entry(op, reply, "mkdir");
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let op = NsOp::Unlink { parent: ino(parent), name: name_buf(name) };
        self.spawn(move |fs| async move {
            match fs.remove(op).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(fail("unlink", &e)),
            }
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let op = NsOp::Rmdir { parent: ino(parent), name: name_buf(name) };
        self.spawn(move |fs| async move {
            match fs.ns(op).await {
                Ok(_) => reply.ok(),
                Err(e) => reply.error(fail("rmdir", &e)),
            }
        });
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        let target = ByteBuf::from(target.as_os_str().as_bytes().to_vec());
        let op = mknode(req, parent, link_name, FileKind::Symlink, 0o777, 0, Some(target));
        self.entry(op, reply, "symlink");
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_WHITEOUT)
            || (flags.contains(RenameFlags::RENAME_EXCHANGE) && flags.contains(RenameFlags::RENAME_NOREPLACE))
        {
            reply.error(Errno::EINVAL);
            return;
        }
        let op = NsOp::Rename {
            parent: ino(parent),
            name: name_buf(name),
            new_parent: ino(newparent),
            new_name: name_buf(newname),
            no_replace: flags.contains(RenameFlags::RENAME_NOREPLACE),
            exchange: flags.contains(RenameFlags::RENAME_EXCHANGE),
        };
        self.spawn(move |fs| async move {
            match fs.remove(op).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(fail("rename", &e)),
            }
        });
    }

    fn link(&self, _req: &Request, i: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let op = NsOp::Link { ino: ino(i), new_parent: ino(newparent), new_name: name_buf(newname) };
        self.entry(op, reply, "link");
    }

    fn open(&self, _req: &Request, i: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.spawn(move |fs| async move {
            match fs.open(ino(i)).await {
                Ok(f) => {
                    let fh = fs.file_handle(&f).await;
                    reply.opened(FileHandle(fh), FopenFlags::empty());
                }
                Err(e) => reply.error(fail("open", &e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.spawn(move |fs| async move {
            let Some(f) = fs.file(ino(i)) else {
                reply.error(Errno::EBADF);
                return;
            };
            if let Some(t) = &fs.trace {
                t.record(augur_prefetch::Op::Read, offset, u64::from(size), i.0, f.group());
            }
            match fs.read(f, offset, size).await {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(fail("read", &e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        i: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let data = data.to_vec();
        self.spawn(move |fs| async move {
            let Some(f) = fs.file(ino(i)) else {
                reply.error(Errno::EBADF);
                return;
            };
            if let Some(t) = &fs.trace {
                t.record(augur_prefetch::Op::Write, offset, data.len() as u64, i.0, f.group());
            }
            let h = fs.handle(fh.0);
            match fs.write(&f, h.as_deref().and_then(OpenHandle::seen), offset, &data).await {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(fail("write", &e)),
            }
        });
    }

    fn flush(&self, _req: &Request, i: INodeNo, fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        self.spawn(move |fs| async move {
            let h = fs.handle(fh.0);
            let r = match fs.file(ino(i)) {
                Some(f) => fs.flush(&f, h.as_deref().and_then(OpenHandle::seen)).await,
                None => Ok(()),
            };
            match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(fail("flush", &e)),
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        _i: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.spawn(move |fs| async move {
            let h = fs.handles.lock().unwrap_or_else(|p| p.into_inner()).remove(&fh.0);
            let r = match h.as_deref() {
                Some(OpenHandle::File { ino, seen }) => match fs.file(*ino) {
                    Some(f) => fs.release(f, seen).await,
                    None => Ok(()),
                },
                _ => Ok(()),
            };
            match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(fail("release", &e)),
            }
        });
    }

    fn fsync(&self, _req: &Request, i: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Block writes are acked only once every in-sync replica has synced them, and the
        // meta group commits size and mtime to a synced log: flush is already durable.
        self.flush(_req, i, _fh, LockOwner(0), reply);
    }

    fn opendir(&self, _req: &Request, i: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.spawn(move |fs| async move {
            match fs.attr_op(NsOp::GetAttr { ino: ino(i) }).await {
                Ok(a) if a.kind == FileKind::Dir => {
                    let fh = fs.new_handle(OpenHandle::Dir { ino: a.ino, entries: Mutex::new(None) });
                    reply.opened(FileHandle(fh), FopenFlags::empty());
                }
                Ok(_) => reply.error(Errno::ENOTDIR),
                Err(e) => reply.error(fail("opendir", &e)),
            }
        });
    }

    fn readdir(&self, _req: &Request, _i: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        self.spawn(move |fs| async move {
            let Some(h) = fs.handle(fh.0) else {
                reply.error(Errno::EBADF);
                return;
            };
            let OpenHandle::Dir { ino: dir, entries } = &*h else {
                reply.error(Errno::ENOTDIR);
                return;
            };
            // The listing is taken in parts (`DIR_PART_ENTRIES`), the first at the first read
            // (and again after a rewind), each served from the handle, so offsets stay stable
            // while entries come and go.
            let cur =
                if offset == 0 { None } else { entries.lock().unwrap_or_else(|p| p.into_inner()).clone() };
            let want = (offset as usize).saturating_sub(2);
            let part = match fs.dir_part(*dir, cur, want).await {
                Ok(part) => part,
                Err(e) => {
                    reply.error(fail("readdir", &e));
                    return;
                }
            };
            *entries.lock().unwrap_or_else(|p| p.into_inner()) = Some(part.clone());
            let dots =
                [(*dir, FileType::Directory, &b"."[..]), (i_parent(*dir), FileType::Directory, &b".."[..])];
            let mut pos = offset as usize;
            while pos < 2 {
                let (n, k, name) = dots[pos];
                if reply.add(INodeNo(n.0), pos as u64 + 1, k, OsStr::from_bytes(name)) {
                    reply.ok();
                    return;
                }
                pos += 1;
            }
            for (idx, e) in part.list.iter().enumerate().skip((pos - 2).saturating_sub(part.base)) {
                let next = (part.base + idx + 3) as u64;
                if reply.add(INodeNo(e.ino.0), next, file_type(e.kind), OsStr::from_bytes(&e.name)) {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn releasedir(&self, _req: &Request, _i: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.inner.handles.lock().unwrap_or_else(|p| p.into_inner()).remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _i: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Namespace changes are committed to the meta group's synced log before they are acked.
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _i: INodeNo, reply: ReplyStatfs) {
        self.spawn(move |fs| async move {
            match fs.statfs().await {
                Ok((blocks, free, files, ffree)) => {
                    let bs = fs.block_bytes as u32;
                    reply.statfs(blocks, free, free, files, ffree, bs, 255, bs);
                }
                Err(e) => reply.error(fail("statfs", &e)),
            }
        });
    }

    fn setxattr(
        &self,
        _req: &Request,
        i: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        position: u32,
        reply: ReplyEmpty,
    ) {
        let name = name.as_bytes().to_vec();
        if position != 0 {
            reply.error(Errno::EINVAL);
            return;
        }
        if !name.starts_with(b"user.") {
            reply.error(Errno::from_i32(libc::EOPNOTSUPP));
            return;
        }
        let mode = match flags {
            0 => XattrMode::Upsert,
            libc::XATTR_CREATE => XattrMode::CreateOnly,
            libc::XATTR_REPLACE => XattrMode::ReplaceOnly,
            _ => {
                reply.error(Errno::EINVAL);
                return;
            }
        };
        let op = NsOp::SetXattr {
            ino: ino(i),
            name: ByteBuf::from(name.clone()),
            value: ByteBuf::from(value.to_vec()),
            mode,
        };
        let value = value.to_vec();
        self.spawn(move |fs| async move {
            match fs.ns(op).await {
                Ok(_) => {
                    if name == XATTR_PREFETCH
                        && let Some(f) = fs.file(ino(i))
                    {
                        fs.set_mode(&f, parse_value(&value));
                    }
                    if name == XATTR_FILETYPE
                        && let Some(g) = parse_value(&value)
                    {
                        // Later opens find the override in the hint lookup.
                        fs.groups.remove(&ino(i));
                        if let Some(f) = fs.file(ino(i)) {
                            f.set_group(g);
                        }
                    }
                    reply.ok()
                }
                Err(e) => reply.error(fail("setxattr", &e)),
            }
        });
    }

    fn getxattr(&self, _req: &Request, i: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let name = name.as_bytes().to_vec();
        self.spawn(move |fs| async move {
            match fs.getxattr(ino(i), &name).await {
                Ok(v) => xattr_reply(reply, size, &v),
                Err(e) => reply.error(fail("getxattr", &e)),
            }
        });
    }

    fn listxattr(&self, _req: &Request, i: INodeNo, size: u32, reply: ReplyXattr) {
        self.spawn(move |fs| async move {
            match fs.ns(NsOp::ListXattr { ino: ino(i) }).await {
                Ok(NsReply::Names(names)) => {
                    let mut out = Vec::new();
                    for n in names {
                        out.extend_from_slice(&n);
                        out.push(0);
                    }
                    xattr_reply(reply, size, &out)
                }
                Ok(_) => reply.error(Errno::EIO),
                Err(e) => reply.error(fail("listxattr", &e)),
            }
        });
    }

    fn removexattr(&self, _req: &Request, i: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.as_bytes().to_vec();
        if !name.starts_with(b"user.") {
            reply.error(Errno::from_i32(libc::EOPNOTSUPP));
            return;
        }
        let (filetype, prefetch) = (name == XATTR_FILETYPE, name == XATTR_PREFETCH);
        let op = NsOp::RemoveXattr { ino: ino(i), name: ByteBuf::from(name) };
        self.spawn(move |fs| async move {
            match fs.ns(op).await {
                Ok(_) => {
                    let open = fs.file(ino(i));
                    if prefetch && let Some(f) = &open {
                        // The inherited hint, looked up at the next read.
                        fs.set_mode(f, None);
                    }
                    if !filetype {
                        return reply.ok();
                    }
                    fs.groups.remove(&ino(i));
                    if let Some(f) = &open {
                        f.forget_override();
                    }
                    reply.ok();
                    // An open file has its type detected again now.
                    if let Some(f) = open {
                        fs.look_up_group(&f).await;
                    }
                }
                Err(e) => reply.error(fail("removexattr", &e)),
            }
        });
    }

    fn access(&self, req: &Request, i: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        // Only called without `default_permissions`: check the mode bits ourselves.
        let (uid, gid) = (req.uid(), req.gid());
        let mask = mask.bits() as u16;
        self.spawn(move |fs| async move {
            match fs.attr_op(NsOp::GetAttr { ino: ino(i) }).await {
                Ok(a) => {
                    let granted = if uid == 0 {
                        0o7
                    } else if uid == a.uid {
                        (a.perm >> 6) & 7
                    } else if gid == a.gid {
                        (a.perm >> 3) & 7
                    } else {
                        a.perm & 7
                    };
                    if mask & 7 & !granted == 0 { reply.ok() } else { reply.error(Errno::EACCES) }
                }
                Err(e) => reply.error(fail("access", &e)),
            }
        });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let op = mknode(req, parent, name, FileKind::File, mode & !umask, 0, None);
        self.spawn(move |fs| async move {
            let r = match fs.attr_op(op).await {
                Ok(a) => {
                    let f = fs.register(a.ino, Some(&a));
                    fs.refresh(&f, &a).await;
                    Ok((a, f))
                }
                Err(e) => Err(e),
            };
            match r {
                Ok((a, f)) => {
                    let fh = fs.file_handle(&f).await;
                    reply.created(
                        &fs.opts.attr_ttl,
                        &fs.to_kernel(&a),
                        Generation(0),
                        FileHandle(fh),
                        FopenFlags::empty(),
                    )
                }
                Err(e) => reply.error(fail("create", &e)),
            }
        });
    }
}

/// The parent reported for `..` (the kernel answers `..` lookups itself; this is only shown by
/// readdir, where the directory's own inode stands in below the root).
fn i_parent(dir: Ino) -> Ino {
    if dir == ROOT_INO { ROOT_INO } else { dir }
}

fn mknode(
    req: &Request,
    parent: INodeNo,
    name: &OsStr,
    kind: FileKind,
    mode: u32,
    rdev: u32,
    target: Option<ByteBuf>,
) -> NsOp {
    NsOp::MkNode {
        parent: ino(parent),
        name: name_buf(name),
        kind,
        perm: (mode & 0o7777) as u16,
        uid: req.uid(),
        gid: req.gid(),
        rdev,
        target,
    }
}

fn xattr_reply(reply: ReplyXattr, size: u32, v: &[u8]) {
    if size == 0 {
        reply.size(v.len() as u32);
    } else if v.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_times_convert_without_panicking_at_the_edges() {
        let at = |secs, nanos| ts(Timestamp { secs, nanos });
        assert_eq!(at(1, 5), UNIX_EPOCH + Duration::new(1, 5));
        assert_eq!(at(-1, 500_000_000), UNIX_EPOCH - Duration::from_millis(500));
        assert_eq!(at(i64::MAX, u32::MAX), UNIX_EPOCH, "beyond SystemTime: the epoch");
        assert!(at(i64::MIN, 0) < UNIX_EPOCH, "the earliest second SystemTime holds");
    }
}
