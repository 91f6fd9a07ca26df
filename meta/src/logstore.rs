//! The Raft log: raft-rs's `Storage` over raft-engine, as TiKV does it.
//!
//! raft-engine holds the entries plus two messages of the one Raft group: `hs` (HardState) and
//! `trunc` (index and term of the last entry compacted away or covered by a snapshot). The
//! ConfState lives with the state machine (it changes when entries are applied) and is handed
//! in at open and on every change.

use std::sync::Arc;

use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use raft_engine::{Command, Engine, LogBatch, MessageExt};

/// raft-engine's group id for the one Raft group.
const GROUP: u64 = 1;
const KEY_HARD_STATE: &[u8] = b"hs";
const KEY_TRUNCATED: &[u8] = b"trunc";

/// Tells raft-engine how to index raft-rs entries.
#[derive(Clone)]
pub struct EntryExt;

impl MessageExt for EntryExt {
    type Entry = Entry;
    fn index(e: &Entry) -> u64 {
        e.index
    }
}

/// Builds the snapshot that `Storage::snapshot` hands to raft-rs: the state machine at its
/// applied index, with that index's ConfState.
pub trait SnapshotSource: Send + Sync {
    /// (applied index, ConfState at that index, serialized state).
    fn build(&self) -> Result<(u64, ConfState, Vec<u8>), String>;
}

pub struct LogStore {
    engine: Arc<Engine>,
    hs: HardState,
    cs: ConfState,
    /// (index, term) of the newest entry no longer in the log.
    trunc: (u64, u64),
    last: u64,
    source: Arc<dyn SnapshotSource>,
    /// The last snapshot built, reused while it is new enough (at or past the log's compaction
    /// point and raft's requested index).
    cached: std::sync::Mutex<Option<Snapshot>>,
}

fn other(e: impl std::fmt::Display) -> raft::Error {
    raft::Error::Store(StorageError::Other(e.to_string().into()))
}

impl LogStore {
    /// Opens the log. `cs` is the ConfState the state machine recorded.
    pub fn open(engine: Arc<Engine>, cs: ConfState, source: Arc<dyn SnapshotSource>) -> raft::Result<Self> {
        let hs: HardState = engine.get_message(GROUP, KEY_HARD_STATE).map_err(other)?.unwrap_or_default();
        let trunc = engine
            .get_message::<SnapshotMetadata>(GROUP, KEY_TRUNCATED)
            .map_err(other)?
            .map_or((0, 0), |m| (m.index, m.term));
        let last = engine.last_index(GROUP).unwrap_or(trunc.0).max(trunc.0);
        Ok(Self { engine, hs, cs, trunc, last, source, cached: Default::default() })
    }

    /// True when the log has never been written (a brand-new or joining member).
    pub fn is_empty(&self) -> bool {
        self.hs == HardState::default() && self.trunc == (0, 0) && self.last == 0
    }

    /// Seeds a brand-new member of the initial group: a "snapshot at index 1" that every
    /// initial member shares, so none of them needs the others' history.
    pub fn bootstrap(&mut self, cs: ConfState) -> raft::Result<()> {
        let hs = HardState { term: 1, commit: 1, ..Default::default() };
        let trunc = SnapshotMetadata { index: 1, term: 1, ..Default::default() };
        let mut batch = LogBatch::default();
        batch.put_message(GROUP, KEY_TRUNCATED.to_vec(), &trunc).map_err(other)?;
        batch.put_message(GROUP, KEY_HARD_STATE.to_vec(), &hs).map_err(other)?;
        self.engine.write(&mut batch, true).map_err(other)?;
        self.hs = hs;
        self.trunc = (1, 1);
        self.last = 1;
        self.cs = cs;
        Ok(())
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hs
    }

    pub fn truncated(&self) -> (u64, u64) {
        self.trunc
    }

    pub fn set_conf_state(&mut self, cs: ConfState) {
        self.cs = cs;
    }

    /// Appends entries and/or a new HardState in one write (synced when raft says so).
    pub fn persist(&mut self, entries: &[Entry], hs: Option<&HardState>, sync: bool) -> raft::Result<()> {
        if entries.is_empty() && hs.is_none() {
            return Ok(());
        }
        let mut batch = LogBatch::default();
        if !entries.is_empty() {
            batch.add_entries::<EntryExt>(GROUP, entries).map_err(other)?;
        }
        if let Some(hs) = hs {
            batch.put_message(GROUP, KEY_HARD_STATE.to_vec(), hs).map_err(other)?;
        }
        self.engine.write(&mut batch, sync).map_err(other)?;
        if let Some(e) = entries.last() {
            // An append inside the log truncates the conflicting tail, so the new last is e's.
            self.last = e.index;
        }
        if let Some(hs) = hs {
            self.hs = hs.clone();
        }
        Ok(())
    }

    /// Records a commit index learnt after `advance` (not synced: raft re-learns it).
    pub fn persist_commit(&mut self, commit: u64) -> raft::Result<()> {
        if commit <= self.hs.commit {
            return Ok(());
        }
        let mut hs = self.hs.clone();
        hs.commit = commit;
        self.persist(&[], Some(&hs), false)
    }

    /// Installs a received snapshot's position: the log restarts after it.
    pub fn apply_snapshot(&mut self, meta: &SnapshotMetadata, hs: Option<&HardState>) -> raft::Result<()> {
        let mut hs = hs.cloned().unwrap_or_else(|| self.hs.clone());
        hs.commit = hs.commit.max(meta.index);
        hs.term = hs.term.max(meta.term);
        let trunc = SnapshotMetadata { index: meta.index, term: meta.term, ..Default::default() };
        let mut batch = LogBatch::default();
        // Clean, not Compact: entries above the snapshot may conflict with it and must go.
        batch.add_command(GROUP, Command::Clean);
        batch.put_message(GROUP, KEY_TRUNCATED.to_vec(), &trunc).map_err(other)?;
        batch.put_message(GROUP, KEY_HARD_STATE.to_vec(), &hs).map_err(other)?;
        self.engine.write(&mut batch, true).map_err(other)?;
        self.hs = hs;
        self.trunc = (meta.index, meta.term);
        self.last = meta.index;
        self.cs = meta.get_conf_state().clone();
        Ok(())
    }

    /// Drops entries up to and including `index` (the state machine through it is durable).
    pub fn compact_to(&mut self, index: u64) -> raft::Result<()> {
        if index <= self.trunc.0 || index > self.last {
            return Ok(());
        }
        let term = self.term(index)?;
        let trunc = SnapshotMetadata { index, term, ..Default::default() };
        let mut batch = LogBatch::default();
        batch.put_message(GROUP, KEY_TRUNCATED.to_vec(), &trunc).map_err(other)?;
        batch.add_command(GROUP, Command::Compact { index: index + 1 });
        if self.hs.commit < index {
            let mut hs = self.hs.clone();
            hs.commit = index;
            batch.put_message(GROUP, KEY_HARD_STATE.to_vec(), &hs).map_err(other)?;
            self.hs = hs;
        }
        self.engine.write(&mut batch, true).map_err(other)?;
        self.trunc = (index, term);
        // Let raft-engine recycle files no group needs any more.
        self.engine.purge_expired_files().map_err(other)?;
        Ok(())
    }
}

impl Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hs.clone(), self.cs.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.trunc.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        assert!(high <= self.last + 1, "raft asked for entries up to {high}, past last index {}", self.last);
        let mut out = Vec::with_capacity((high - low) as usize);
        if low == high {
            return Ok(out);
        }
        let max = max_size.into().map(|m| m.min(usize::MAX as u64) as usize);
        self.engine.fetch_entries_to::<EntryExt>(GROUP, low, high, max, &mut out).map_err(|e| match e {
            raft_engine::Error::EntryCompacted => raft::Error::Store(StorageError::Compacted),
            raft_engine::Error::EntryNotFound => raft::Error::Store(StorageError::Unavailable),
            e => other(e),
        })?;
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.trunc.0 {
            return Ok(self.trunc.1);
        }
        if idx < self.trunc.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        match self.engine.get_entry::<EntryExt>(GROUP, idx).map_err(other)? {
            Some(e) => Ok(e.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.trunc.0 + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last)
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = cached.as_ref() {
            let cs = s.get_metadata().get_conf_state();
            let includes_peer = cs.voters.contains(&to) || cs.learners.contains(&to);
            // Reused only while the log still holds what follows it: a follower that needs a
            // snapshot lacks entries the log has compacted, and one older than the compaction
            // point leaves it short of them again, to be sent the same snapshot for ever.
            let index = s.get_metadata().index;
            if index >= request_index && index >= self.trunc.0 && includes_peer {
                return Ok(s.clone());
            }
        }
        let (index, cs, data) = self.source.build().map_err(other)?;
        let term = self.term(index)?;
        let mut snap = Snapshot::default();
        snap.set_data(data.into());
        let meta = snap.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(cs);
        *cached = Some(snap.clone());
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// A state machine whose applied index is whatever the test sets.
    struct Applied(AtomicU64);

    impl SnapshotSource for Applied {
        fn build(&self) -> Result<(u64, ConfState, Vec<u8>), String> {
            let cs = ConfState { voters: vec![1, 2], ..Default::default() };
            Ok((self.0.load(Ordering::SeqCst), cs, Vec::new()))
        }
    }

    #[test]
    fn a_cached_snapshot_older_than_the_compacted_log_is_built_again() {
        let dir = tempfile::tempdir().unwrap();
        let engine =
            Engine::open(raft_engine::Config { dir: dir.path().display().to_string(), ..Default::default() })
                .unwrap();
        let source = Arc::new(Applied(AtomicU64::new(10)));
        let cs = ConfState { voters: vec![1, 2], ..Default::default() };
        let mut store = LogStore::open(Arc::new(engine), cs, source.clone()).unwrap();
        let entries: Vec<Entry> =
            (1..=30).map(|index| Entry { index, term: 1, ..Default::default() }).collect();
        store.persist(&entries, None, true).unwrap();
        assert_eq!(store.snapshot(0, 2).unwrap().get_metadata().index, 10);
        source.0.store(20, Ordering::SeqCst);
        assert_eq!(store.snapshot(0, 2).unwrap().get_metadata().index, 10, "still new enough: reused");
        store.compact_to(15).unwrap();
        // A follower now needs index 16 on; the cached snapshot at 10 would leave it short.
        assert_eq!(store.snapshot(0, 2).unwrap().get_metadata().index, 20);
    }
}
