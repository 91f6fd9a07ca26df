//! Per-file client state while a file is open here: write-back buffer, uploads in flight,
//! the size this client knows, the cache stamp, and sequential-read detection.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

use augur_proto::Ino;
use augur_proto::meta::{FileType, PrefetchMode, Timestamp};
use tokio::task::JoinHandle;

/// Where uploads leave their failures (shared by the file's upload tasks).
pub type UploadError = std::sync::Arc<Mutex<Failures>>;

/// A file's upload failures, counted like the kernel's `errseq_t`: every open handle is told
/// of a failure once, at its next write, flush, fsync or close, whichever handle wrote the
/// data (an application that closes or fsyncs learns of every failure since it opened the
/// file, and an unrelated reader closing first does not use the report up).
#[derive(Debug, Default)]
pub struct Failures {
    /// Failures so far.
    pub count: u64,
    /// The latest (errno, message).
    pub last: Option<(i32, String)>,
}

impl Failures {
    /// The latest failure if there were any since a handle last saw `seen` failures, and the
    /// count that handle has now seen.
    pub fn since(&self, seen: u64) -> (Option<(i32, String)>, u64) {
        if self.count > seen { (self.last.clone(), self.count) } else { (None, seen) }
    }
}

/// Bytes of one block written here and not yet sent: `data[lo..hi]` is what was written.
pub struct Dirty {
    pub data: Vec<u8>,
    pub lo: u32,
    pub hi: u32,
}

impl Dirty {
    /// True when `[off, off+len)` overlaps or touches the dirty range, so they merge into one.
    pub fn joins(&self, off: u32, len: u32) -> bool {
        off <= self.hi && off + len >= self.lo
    }

    pub fn covers(&self, off: u32, len: u32) -> bool {
        self.lo <= off && off + len <= self.hi
    }
}

/// What only the holder of the file's async lock may change.
#[derive(Default)]
pub struct FileState {
    /// Size as the meta group last confirmed it.
    pub meta_size: u64,
    /// Blocks written and not yet handed to an upload, by index.
    pub dirty: BTreeMap<u64, Dirty>,
    /// Uploads in flight, by block index (at most one per block, so writes land in order).
    pub uploads: HashMap<u64, JoinHandle<()>>,
    /// Background upload failures (see [`Failures`]).
    pub errors: UploadError,
    /// Data was written since the size and mtime were last sent to the meta group.
    pub wrote: bool,
    /// When the first write not yet flushed came (`MountOptions::dirty_expire`).
    pub written_at: Option<std::time::Instant>,
}

/// Where the last read ended, and the prefetch hint in force.
#[derive(Default)]
pub struct ReadAhead {
    /// Block index one past the last read.
    pub next: u64,
    /// Blocks the hint reads ahead (0 for `auto`, which the prefetch engine serves).
    pub window: u32,
    /// Highest block index already requested ahead.
    pub issued_until: u64,
    /// The file's `user.augur.prefetch` (or the volume's), once looked up.
    pub mode: Option<PrefetchMode>,
    /// Bumped when the hint is set or removed through this mount: a lookup started before
    /// does not overwrite what was set since.
    pub mode_generation: u64,
}

pub struct OpenFile {
    pub ino: Ino,
    /// Open handles of this client on the file (guarded by the file table's lock).
    pub handles: AtomicU64,
    /// Size including writes not yet flushed; read without the async lock by getattr.
    pub size: AtomicU64,
    /// Bumped on every write and every finished upload: a block fetched across either is not
    /// cached.
    pub write_gen: std::sync::Arc<AtomicU64>,
    /// Cached blocks are valid only with this stamp (the mtime seen at open).
    pub stamp: Mutex<Timestamp>,
    pub state: tokio::sync::Mutex<FileState>,
    pub ra: Mutex<ReadAhead>,
    /// A lookup of the prefetch hint was started (it runs once per open file).
    pub hint_lookup: AtomicBool,
    /// Read requests so far: how the prefetch queue tells that a named block went stale.
    pub reads: AtomicU64,
    /// The last link went while the file was open: reclaim on the last release.
    pub unlinked: std::sync::atomic::AtomicBool,
    /// The file's type group as this mount knows it (`GROUP_UNKNOWN` until it does), with
    /// `OVERRIDDEN` set when it is the file's `user.augur.filetype`: what the prefetch engine
    /// and the trace are told with each read.
    group: AtomicU8,
}

/// `OpenFile::group` before the type is known (the engine is then told `Other`); a known group
/// is stored as `group_code`.
const GROUP_UNKNOWN: u8 = 0;
/// Set in `OpenFile::group` when the group is an override, not detected.
const OVERRIDDEN: u8 = 0x80;

fn group_code(g: FileType) -> u8 {
    g.index() as u8 + 1
}

impl OpenFile {
    pub fn new(ino: Ino, size: u64, stamp: Timestamp) -> Self {
        Self {
            ino,
            handles: AtomicU64::new(0),
            size: AtomicU64::new(size),
            write_gen: std::sync::Arc::new(AtomicU64::new(0)),
            stamp: Mutex::new(stamp),
            state: tokio::sync::Mutex::new(FileState { meta_size: size, ..Default::default() }),
            ra: Mutex::new(ReadAhead::default()),
            hint_lookup: AtomicBool::new(false),
            reads: AtomicU64::new(0),
            unlinked: std::sync::atomic::AtomicBool::new(false),
            group: AtomicU8::new(GROUP_UNKNOWN),
        }
    }

    /// The type group known so far (`Other` while unknown).
    pub fn group(&self) -> FileType {
        let code = self.group.load(Ordering::Acquire) & !OVERRIDDEN;
        code.checked_sub(1)
            .and_then(|i| FileType::ALL.get(usize::from(i)).copied())
            .unwrap_or(FileType::Other)
    }

    pub fn group_known(&self) -> bool {
        self.group.load(Ordering::Acquire) != GROUP_UNKNOWN
    }

    /// Takes a detected group, unless one is known already.
    pub fn learn_group(&self, g: FileType) {
        let _ =
            self.group.compare_exchange(GROUP_UNKNOWN, group_code(g), Ordering::AcqRel, Ordering::Acquire);
    }

    /// Whether the group is the file's `user.augur.filetype` (not detected).
    pub fn group_overridden(&self) -> bool {
        self.group.load(Ordering::Acquire) & OVERRIDDEN != 0
    }

    /// Takes an overriding group (`user.augur.filetype` set on the file), whatever was known.
    pub fn set_group(&self, g: FileType) {
        self.group.store(group_code(g) | OVERRIDDEN, Ordering::Release);
    }

    /// The override was removed: the group is unknown again (to be detected), unless it was
    /// detected rather than overridden.
    pub fn forget_override(&self) {
        let _ = self.group.fetch_update(Ordering::AcqRel, Ordering::Acquire, |code| {
            (code & OVERRIDDEN != 0).then_some(GROUP_UNKNOWN)
        });
    }

    pub fn stamp(&self) -> Timestamp {
        *self.stamp.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_stamp(&self, t: Timestamp) {
        *self.stamp.lock().unwrap_or_else(|p| p.into_inner()) = t;
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
}

/// Splits the byte range `[offset, offset+len)` into `(block index, offset in block, length)`.
pub fn split(offset: u64, len: u64, block_bytes: u64) -> impl Iterator<Item = (u64, u32, u32)> {
    let end = offset + len;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let index = pos / block_bytes;
        let in_block = pos % block_bytes;
        let n = (block_bytes - in_block).min(end - pos);
        pos += n;
        Some((index, in_block as u32, n as u32))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_detected_group_never_replaces_a_known_one_but_an_override_does() {
        let f = OpenFile::new(Ino(9), 0, Timestamp::default());
        assert!(!f.group_known());
        assert_eq!(f.group(), FileType::Other, "unknown reads as other");
        f.learn_group(FileType::Image);
        f.learn_group(FileType::Database);
        assert_eq!(f.group(), FileType::Image);
        assert!(!f.group_overridden(), "detected");
        f.forget_override();
        assert_eq!(f.group(), FileType::Image, "a detected group is no override to forget");
        f.set_group(FileType::Database);
        assert_eq!(f.group(), FileType::Database);
        assert!(f.group_overridden());
        f.learn_group(FileType::Other);
        assert_eq!(f.group(), FileType::Database);
        f.forget_override();
        assert!(!f.group_known() && !f.group_overridden(), "unknown again, to be detected");
        f.learn_group(FileType::Image);
        assert_eq!(f.group(), FileType::Image);
    }

    #[test]
    fn split_covers_the_range_in_block_pieces() {
        let pieces: Vec<_> = split(100, 300, 128).collect();
        assert_eq!(pieces, vec![(0, 100, 28), (1, 0, 128), (2, 0, 128), (3, 0, 16)]);
        assert_eq!(split(0, 0, 128).count(), 0);
        assert_eq!(split(256, 128, 128).collect::<Vec<_>>(), vec![(2, 0, 128)]);
    }

    #[test]
    fn dirty_ranges_join_when_they_touch() {
        let d = Dirty { data: vec![0; 16], lo: 4, hi: 8 };
        assert!(d.joins(8, 2));
        assert!(d.joins(0, 4));
        assert!(d.joins(5, 1));
        assert!(!d.joins(9, 2));
        assert!(!d.joins(0, 3));
        assert!(d.covers(4, 4));
        assert!(!d.covers(3, 2));
    }
}
