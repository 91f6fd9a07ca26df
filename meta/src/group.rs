//! The Raft group member: one thread owns raft-rs's `RawNode` and drives it — ticks, incoming
//! messages, batched proposals, ReadIndex requests, Ready handling (persist, send, apply).
//! Everything else talks to it through a bounded channel (`GroupHandle`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use augur_proto::meta::{MemberInfo, MetaStatus};
use augur_proto::{ErrorCode, WireError};
use protobuf::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeType, ConfChangeV2, Entry, EntryType, Message, MessageType, Snapshot,
};
use raft::{RawNode, SnapshotStatus, StateRole, Storage};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use crate::logstore::LogStore;
use crate::state::{Cmd, CmdResult, Proposal, StateMachine};
use crate::transport::Transport;

/// Inputs waiting for the group thread; senders get `Overloaded` beyond this.
pub const INPUT_QUEUE_MAX: usize = 8192;
/// Most proposals folded into one log entry.
pub const PROPOSALS_PER_ENTRY_MAX: usize = 256;
/// Most bytes of commands in one log entry (a proposal larger than this goes alone).
pub const ENTRY_BYTES_MAX: usize = 1024 * 1024;
/// Bytes of proposed-but-uncommitted entries the leader accepts before refusing proposals.
pub const UNCOMMITTED_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Largest Raft append message.
pub const APPEND_BYTES_MAX: u64 = 1024 * 1024;
/// A ReadIndex request not answered within this long fails with `Unavailable`.
pub const READ_TIMEOUT: Duration = Duration::from_secs(3);
/// A proposal not applied within this long fails with `Unavailable` (the client retries).
pub const PROPOSAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Ready rounds handled back to back before the loop looks at its inputs again.
const READY_ROUNDS_MAX: usize = 16;

/// Tunables of the group (defaults suit a LAN; tests shorten nothing but the compaction).
#[derive(Clone, Debug)]
pub struct GroupConfig {
    pub id: u64,
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Compact the log once this many entries are applied past the last compaction.
    pub compact_entries: u64,
}

/// State the group thread publishes for everyone else.
pub struct Shared {
    pub id: u64,
    /// 0 when unknown.
    pub leader: AtomicU64,
    pub members: RwLock<BTreeMap<u64, String>>,
    /// False while a joining member has no configuration yet (it refuses to vote then).
    pub initialized: AtomicBool,
    /// The data of the last snapshot sent, served in chunks to the member installing it.
    pub outgoing_snapshot: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
    pub stopped: AtomicBool,
}

impl Shared {
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Acquire) == self.id
    }

    pub fn leader_addr(&self) -> Option<String> {
        let leader = self.leader.load(Ordering::Acquire);
        self.members.read().unwrap_or_else(|p| p.into_inner()).get(&leader).cloned()
    }

    pub fn not_leader(&self) -> WireError {
        let leader = self.leader_addr();
        WireError::new(
            ErrorCode::NotLeader { leader: leader.clone() },
            match leader {
                Some(l) => format!("member {} is not the leader; {l} is", self.id),
                None => format!("member {} knows no leader yet", self.id),
            },
        )
    }
}

pub enum Input {
    Propose { cmd: Cmd, reply: oneshot::Sender<CmdResult> },
    Read { reply: oneshot::Sender<Result<(), WireError>> },
    Raft(Box<Message>),
    Member { add: bool, id: u64, addr: String, reply: oneshot::Sender<Result<(), WireError>> },
    Unreachable(u64),
    SnapshotDone { to: u64, ok: bool },
    Status { reply: oneshot::Sender<MetaStatus> },
}

/// How the rest of the process reaches the group thread.
#[derive(Clone)]
pub struct GroupHandle {
    tx: SyncSender<Input>,
    pub shared: Arc<Shared>,
}

fn unavailable(msg: impl Into<String>) -> WireError {
    WireError::new(ErrorCode::Unavailable, msg.into())
}

impl GroupHandle {
    pub fn send(&self, input: Input) -> Result<(), WireError> {
        self.tx.try_send(input).map_err(|e| match e {
            TrySendError::Full(_) => WireError::new(
                ErrorCode::Overloaded,
                format!("meta member input queue is full ({INPUT_QUEUE_MAX})"),
            ),
            TrySendError::Disconnected(_) => unavailable("meta member is shutting down"),
        })
    }

    /// Proposes a command and waits until it is applied here; leader only.
    pub async fn propose(&self, cmd: Cmd) -> CmdResult {
        if !self.shared.is_leader() {
            return Err(self.shared.not_leader());
        }
        let (reply, rx) = oneshot::channel();
        self.send(Input::Propose { cmd, reply })?;
        match tokio::time::timeout(PROPOSAL_TIMEOUT, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(unavailable("meta member stopped before the proposal was applied")),
            Err(_) => Err(unavailable("proposal not applied in time; outcome unknown")),
        }
    }

    /// Waits until this member may serve a linearizable read (ReadIndex); leader only.
    pub async fn read_barrier(&self) -> Result<(), WireError> {
        if !self.shared.is_leader() {
            return Err(self.shared.not_leader());
        }
        let (reply, rx) = oneshot::channel();
        self.send(Input::Read { reply })?;
        match tokio::time::timeout(READ_TIMEOUT + Duration::from_millis(500), rx).await {
            Ok(Ok(result)) => result,
            _ => Err(unavailable("read index not confirmed in time")),
        }
    }

    pub async fn change_member(&self, add: bool, id: u64, addr: String) -> Result<(), WireError> {
        if !self.shared.is_leader() {
            return Err(self.shared.not_leader());
        }
        let (reply, rx) = oneshot::channel();
        self.send(Input::Member { add, id, addr, reply })?;
        match tokio::time::timeout(PROPOSAL_TIMEOUT, rx).await {
            Ok(Ok(result)) => result,
            _ => Err(unavailable("membership change not applied in time; check `augur meta status`")),
        }
    }

    pub async fn status(&self) -> Result<MetaStatus, WireError> {
        let (reply, rx) = oneshot::channel();
        self.send(Input::Status { reply })?;
        rx.await.map_err(|_| unavailable("meta member stopped"))
    }
}

/// Context of a proposed membership change: who asked, and the member's address.
#[derive(Serialize, Deserialize)]
struct MemberContext {
    proposal: u64,
    addr: Option<String>,
}

/// Someone waiting for a linearizable read to be allowed.
type Reader = oneshot::Sender<Result<(), WireError>>;

pub struct Group {
    raw: RawNode<LogStore>,
    sm: Arc<StateMachine>,
    rx: Receiver<Input>,
    shared: Arc<Shared>,
    transport: Transport,
    config: GroupConfig,
    next_id: u64,
    waiters: HashMap<u64, (Instant, oneshot::Sender<CmdResult>)>,
    member_waiters: HashMap<u64, oneshot::Sender<Result<(), WireError>>>,
    batch: Vec<Proposal>,
    batch_bytes: usize,
    read_batch: Vec<Reader>,
    /// ReadIndex rounds in flight: context -> (asked at, readers).
    pending_reads: HashMap<Vec<u8>, (Instant, Vec<Reader>)>,
    /// Confirmed rounds waiting for their index to be applied.
    ready_reads: Vec<(u64, Vec<Reader>)>,
    was_leader: bool,
}

impl Group {
    /// Builds the member. `raw_store` must already be bootstrapped or empty (joining).
    pub fn new(
        config: GroupConfig,
        store: LogStore,
        sm: Arc<StateMachine>,
        transport: Transport,
        logger: &slog::Logger,
    ) -> Result<(Self, GroupHandle), raft::Error> {
        let applied = sm.applied();
        let raft_config = raft::Config {
            id: config.id,
            election_tick: config.election_ticks,
            heartbeat_tick: config.heartbeat_ticks,
            applied,
            max_size_per_msg: APPEND_BYTES_MAX,
            max_inflight_msgs: 256,
            max_uncommitted_size: UNCOMMITTED_BYTES_MAX,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        raft_config.validate()?;
        let initialized = !store.initial_state()?.conf_state.voters.is_empty();
        let raw = RawNode::new(&raft_config, store, logger)?;
        let members = sm.members().map_err(|e| raft::Error::Store(raft::StorageError::Other(e.into())))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(INPUT_QUEUE_MAX);
        let shared = Arc::new(Shared {
            id: config.id,
            leader: AtomicU64::new(0),
            members: RwLock::new(members),
            initialized: AtomicBool::new(initialized),
            outgoing_snapshot: Mutex::new(None),
            stopped: AtomicBool::new(false),
        });
        let handle = GroupHandle { tx, shared: shared.clone() };
        let mut transport = transport;
        transport.bind(handle.clone());
        let group = Self {
            raw,
            sm,
            rx,
            shared,
            transport,
            config,
            next_id: random_id_start(),
            waiters: HashMap::new(),
            member_waiters: HashMap::new(),
            batch: Vec::new(),
            batch_bytes: 0,
            read_batch: Vec::new(),
            pending_reads: HashMap::new(),
            ready_reads: Vec::new(),
            was_leader: false,
        };
        Ok((group, handle))
    }

    /// A proposal's id: this member's id in the top 24 bits, a counter in the low 40. The
    /// counter starts at a random point on every start (`random_id_start`), so a member
    /// restarted while proposals of its last run are still in the log does not hand their
    /// results to new callers that got the same ids.
    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        (self.config.id << 40) | (self.next_id & ((1 << 40) - 1))
    }

    /// Runs until every handle is dropped or `shared.stopped` is set.
    pub fn run(mut self) {
        let mut last_tick = Instant::now();
        loop {
            if self.shared.stopped.load(Ordering::Acquire) {
                break;
            }
            let wait = self.config.tick.saturating_sub(last_tick.elapsed());
            match self.rx.recv_timeout(wait) {
                Ok(input) => {
                    self.handle(input);
                    // Drain what else is queued so it lands in the same batch.
                    for _ in 0..INPUT_QUEUE_MAX {
                        match self.rx.try_recv() {
                            Ok(input) => self.handle(input),
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.flush_batch();
            self.flush_reads();
            if last_tick.elapsed() >= self.config.tick {
                last_tick = Instant::now();
                self.raw.tick();
                self.expire();
            }
            // Advancing can make more work ready at once (a single member commits its own
            // append): drain it now rather than at the next tick.
            let mut failed = None;
            for _ in 0..READY_ROUNDS_MAX {
                if !self.raw.has_ready() {
                    break;
                }
                if let Err(e) = self.on_ready() {
                    failed = Some(e);
                    break;
                }
            }
            if let Some(e) = failed {
                error!(error = %e, "meta member cannot continue: storage failed");
                break;
            }
        }
        // Nothing here answers as leader any more (a node's heartbeat checks `is_leader`).
        self.shared.leader.store(0, Ordering::Release);
        self.shared.stopped.store(true, Ordering::Release);
        self.fail_all("meta member stopped");
        info!(id = self.config.id, "meta member loop stopped");
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Propose { cmd, reply } => {
                if self.raw.raft.state != StateRole::Leader {
                    let _ = reply.send(Err(self.shared.not_leader()));
                    return;
                }
                let id = self.new_id();
                let size = postcard::experimental::serialized_size(&cmd).unwrap_or(0);
                if self.batch.len() >= PROPOSALS_PER_ENTRY_MAX || self.batch_bytes + size > ENTRY_BYTES_MAX {
                    self.flush_batch();
                }
                self.batch_bytes += size;
                self.batch.push(Proposal { id, cmd });
                self.waiters.insert(id, (Instant::now(), reply));
            }
            Input::Read { reply } => self.read_batch.push(reply),
            Input::Raft(msg) => {
                if let Err(e) = self.raw.step(*msg) {
                    debug!(error = %e, "raft message not stepped");
                }
            }
            Input::Member { add, id, addr, reply } => self.propose_member(add, id, addr, reply),
            Input::Unreachable(to) => self.raw.report_unreachable(to),
            Input::SnapshotDone { to, ok } => {
                let status = if ok { SnapshotStatus::Finish } else { SnapshotStatus::Failure };
                self.raw.report_snapshot(to, status);
            }
            Input::Status { reply } => {
                let _ = reply.send(self.status());
            }
        }
    }

    fn propose_member(
        &mut self,
        add: bool,
        id: u64,
        addr: String,
        reply: oneshot::Sender<Result<(), WireError>>,
    ) {
        let invalid = |m: String| Err(WireError::new(ErrorCode::InvalidArgument, m));
        let conf = self.raw.raft.prs().conf().to_conf_state();
        let present = conf.voters.contains(&id) || conf.learners.contains(&id);
        let refusal = if id == 0 {
            Some(invalid("member id 0 is reserved".into()))
        } else if add && present {
            Some(invalid(format!("member {id} is already in the group")))
        } else if !add && !present {
            Some(invalid(format!("member {id} is not in the group")))
        } else if !add && id == self.config.id {
            // Hand leadership to another voter first; the caller retries there.
            if let Some(&to) = conf.voters.iter().find(|v| **v != id) {
                self.raw.transfer_leader(to);
            }
            Some(Err(WireError::new(
                ErrorCode::NotLeader { leader: None },
                "the leader cannot remove itself; leadership is being transferred, retry",
            )))
        } else if !add && conf.voters.len() == 1 {
            Some(invalid("cannot remove the last voter".into()))
        } else if self.raw.raft.pending_conf_index > self.raw.raft.raft_log.applied {
            // raft-rs would turn this change into an empty entry and say nothing (one change at
            // a time, and a new leader counts its whole log as possibly one): say so now.
            Some(Err(unavailable(
                "another membership change (or a new leader's first entries) is still being applied; retry shortly",
            )))
        } else {
            None
        };
        if let Some(r) = refusal {
            let _ = reply.send(r);
            return;
        }
        let proposal = self.new_id();
        let context = postcard::to_stdvec(&MemberContext { proposal, addr: add.then_some(addr) })
            .expect("member context serializes");
        let mut cc = ConfChange::default();
        cc.set_change_type(if add { ConfChangeType::AddNode } else { ConfChangeType::RemoveNode });
        cc.node_id = id;
        cc.context = context.clone().into();
        match self.raw.propose_conf_change(context, cc) {
            Ok(()) => {
                self.member_waiters.insert(proposal, reply);
            }
            Err(e) => {
                let _ = reply.send(Err(unavailable(format!("membership change refused: {e}"))));
            }
        }
    }

    fn flush_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let data = postcard::to_stdvec(&batch).expect("proposals serialize");
        if let Err(e) = self.raw.propose(vec![], data) {
            let code = if matches!(e, raft::Error::ProposalDropped) {
                ErrorCode::Unavailable
            } else {
                ErrorCode::Internal
            };
            for p in batch {
                if let Some((_, w)) = self.waiters.remove(&p.id) {
                    let _ = w.send(Err(WireError::new(code.clone(), format!("proposal dropped: {e}"))));
                }
            }
        }
    }

    fn flush_reads(&mut self) {
        if self.read_batch.is_empty() {
            return;
        }
        let readers = std::mem::take(&mut self.read_batch);
        if self.raw.raft.state != StateRole::Leader {
            let e = self.shared.not_leader();
            readers.into_iter().for_each(|r| drop(r.send(Err(e.clone()))));
            return;
        }
        // One ReadIndex round serves every read that arrived meanwhile.
        let ctx = self.new_id().to_be_bytes().to_vec();
        self.raw.read_index(ctx.clone());
        self.pending_reads.insert(ctx, (Instant::now(), readers));
    }

    /// Fails reads and proposals that waited too long (lost with a leader change).
    fn expire(&mut self) {
        let now = Instant::now();
        let stale: Vec<Vec<u8>> = self
            .pending_reads
            .iter()
            .filter(|(_, (t, _))| now.duration_since(*t) > READ_TIMEOUT)
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            if let Some((_, readers)) = self.pending_reads.remove(&k) {
                readers.into_iter().for_each(|r| drop(r.send(Err(unavailable("read index timed out")))));
            }
        }
        let late: Vec<u64> = self
            .waiters
            .iter()
            .filter(|(_, (t, _))| now.duration_since(*t) > PROPOSAL_TIMEOUT)
            .map(|(k, _)| *k)
            .collect();
        for id in late {
            if let Some((_, w)) = self.waiters.remove(&id) {
                let _ = w.send(Err(unavailable("proposal not committed in time; outcome unknown")));
            }
        }
    }

    fn fail_all(&mut self, why: &str) {
        for (_, (_, w)) in self.waiters.drain() {
            let _ = w.send(Err(unavailable(format!("{why}; outcome unknown, retry"))));
        }
        for (_, w) in self.member_waiters.drain() {
            let _ = w.send(Err(unavailable(format!("{why}; check `augur meta status`"))));
        }
        for (_, (_, readers)) in self.pending_reads.drain() {
            readers.into_iter().for_each(|r| drop(r.send(Err(unavailable(why.to_string())))));
        }
        for (_, readers) in self.ready_reads.drain(..) {
            readers.into_iter().for_each(|r| drop(r.send(Err(unavailable(why.to_string())))));
        }
    }

    fn status(&self) -> MetaStatus {
        let st = self.raw.status();
        let conf = self.raw.raft.prs().conf().to_conf_state();
        let members = self.shared.members.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut ids: Vec<u64> = conf.voters.iter().chain(conf.learners.iter()).copied().collect();
        ids.sort_unstable();
        ids.dedup();
        let leader = (st.ss.leader_id != 0).then_some(st.ss.leader_id);
        MetaStatus {
            id: self.config.id,
            addr: members.get(&self.config.id).cloned().unwrap_or_default(),
            role: format!("{:?}", st.ss.raft_state).to_lowercase(),
            leader,
            leader_addr: leader.and_then(|l| members.get(&l).cloned()),
            term: st.hs.term,
            commit: st.hs.commit,
            applied: self.sm.applied(),
            first_index: self.raw.store().first_index().unwrap_or(0),
            last_index: self.raw.store().last_index().unwrap_or(0),
            members: ids
                .into_iter()
                .map(|id| MemberInfo {
                    id,
                    addr: members.get(&id).cloned().unwrap_or_default(),
                    voter: conf.voters.contains(&id),
                    matched: st.progress.and_then(|p| p.get(id)).map(|p| p.matched),
                })
                .collect(),
        }
    }

    fn send(&mut self, msgs: Vec<Message>) {
        for mut msg in msgs {
            if msg.get_msg_type() == MessageType::MsgSnapshot {
                // The state travels out of band, in chunks the receiver pulls (frames are bounded).
                let snap = msg.mut_snapshot();
                let data = std::mem::take(&mut snap.data);
                let index = snap.get_metadata().index;
                *self.shared.outgoing_snapshot.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((index, Arc::new(data.to_vec())));
                info!(to = msg.to, index, bytes = data.len(), "sending snapshot");
            }
            self.transport.send(msg);
        }
    }

    fn on_ready(&mut self) -> Result<(), String> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut rd = self.raw.ready();
        if let Some(ss) = rd.ss() {
            self.shared.leader.store(ss.leader_id, Ordering::Release);
            let leader = ss.raft_state == StateRole::Leader;
            if leader != self.was_leader {
                info!(id = self.config.id, leader, term = self.raw.raft.term, "leadership changed");
                if !leader {
                    self.fail_all("leadership lost");
                }
                self.was_leader = leader;
            }
        }
        self.send(rd.take_messages());
        if !rd.snapshot().is_empty() {
            self.install_snapshot(rd.snapshot().clone(), rd.hs().cloned())?;
        }
        for rs in rd.take_read_states() {
            if let Some((_, readers)) = self.pending_reads.remove(&rs.request_ctx) {
                self.ready_reads.push((rs.index, readers));
            }
        }
        let committed = rd.take_committed_entries();
        self.raw
            .mut_store()
            .persist(rd.entries(), rd.hs(), rd.must_sync())
            .map_err(|e| format!("raft log write: {e}"))?;
        self.apply(committed)?;
        self.send(rd.take_persisted_messages());
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().persist_commit(commit).map_err(|e| format!("raft log write: {e}"))?;
        }
        self.send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.release_reads();
        self.maybe_compact()?;
        Ok(())
    }

    fn install_snapshot(
        &mut self,
        snap: Snapshot,
        hs: Option<raft::prelude::HardState>,
    ) -> Result<(), String> {
        let meta = snap.get_metadata();
        info!(index = meta.index, term = meta.term, bytes = snap.data.len(), "installing snapshot");
        // State first (noting the snapshot's term), then the log: a crash between the two is
        // finished at the next start (`server::reconcile`).
        self.sm.restore(&snap.data, meta.term).map_err(|e| format!("installing snapshot: {e}"))?;
        self.raw
            .mut_store()
            .apply_snapshot(meta, hs.as_ref())
            .map_err(|e| format!("installing snapshot: {e}"))?;
        let members = self.sm.members().map_err(|e| e.to_string())?;
        *self.shared.members.write().unwrap_or_else(|p| p.into_inner()) = members;
        self.shared.initialized.store(true, Ordering::Release);
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), String> {
        for e in entries {
            if e.index <= self.sm.applied() {
                continue;
            }
            match e.get_entry_type() {
                EntryType::EntryNormal if e.data.is_empty() => {
                    self.sm.apply_empty(e.index).map_err(|e| e.to_string())?;
                }
                EntryType::EntryNormal => {
                    let proposals: Vec<Proposal> = postcard::from_bytes(&e.data)
                        .map_err(|err| format!("undecodable entry {}: {err}", e.index))?;
                    let results = self.sm.apply(e.index, &proposals).map_err(|e| e.to_string())?;
                    for (p, r) in proposals.iter().zip(results) {
                        if let Some((_, w)) = self.waiters.remove(&p.id) {
                            let _ = w.send(r);
                        }
                    }
                }
                EntryType::EntryConfChange => {
                    let mut cc = ConfChange::default();
                    cc.merge_from_bytes(&e.data).map_err(|err| format!("conf change {}: {err}", e.index))?;
                    self.apply_conf(e.index, &cc, cc.node_id, cc.get_change_type())?;
                }
                EntryType::EntryConfChangeV2 => {
                    let mut cc = ConfChangeV2::default();
                    cc.merge_from_bytes(&e.data).map_err(|err| format!("conf change {}: {err}", e.index))?;
                    let cs = self.raw.apply_conf_change(&cc).map_err(|e| e.to_string())?;
                    self.sm.apply_conf(e.index, &cs, None).map_err(|e| e.to_string())?;
                    self.raw.mut_store().set_conf_state(cs);
                }
            }
        }
        Ok(())
    }

    fn apply_conf(
        &mut self,
        index: u64,
        cc: &ConfChange,
        id: u64,
        kind: ConfChangeType,
    ) -> Result<(), String> {
        let ctx: Option<MemberContext> = postcard::from_bytes(&cc.context).ok();
        let cs = self.raw.apply_conf_change(cc).map_err(|e| e.to_string())?;
        let addr = match kind {
            ConfChangeType::RemoveNode => None,
            _ => ctx.as_ref().and_then(|c| c.addr.clone()),
        };
        let member = match (kind, addr) {
            (ConfChangeType::RemoveNode, _) => Some((id, None)),
            (_, Some(a)) => Some((id, Some(a))),
            _ => None,
        };
        self.sm.apply_conf(index, &cs, member).map_err(|e| e.to_string())?;
        *self.shared.members.write().unwrap_or_else(|p| p.into_inner()) =
            self.sm.members().map_err(|e| e.to_string())?;
        self.raw.mut_store().set_conf_state(cs.clone());
        info!(index, member = id, change = ?kind, voters = ?cs.voters, "membership changed");
        if kind == ConfChangeType::RemoveNode && id == self.config.id {
            warn!(id, "this member was removed from the group; it will stay passive");
        }
        if let Some(c) = ctx
            && let Some(w) = self.member_waiters.remove(&c.proposal)
        {
            let _ = w.send(Ok(()));
        }
        Ok(())
    }

    fn release_reads(&mut self) {
        let applied = self.sm.applied();
        let (ready, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.ready_reads).into_iter().partition(|(index, _)| *index <= applied);
        self.ready_reads = waiting;
        for (_, readers) in ready {
            readers.into_iter().for_each(|r| drop(r.send(Ok(()))));
        }
    }

    fn maybe_compact(&mut self) -> Result<(), String> {
        let applied = self.sm.applied();
        let (trunc, _) = self.raw.store().truncated();
        if applied < trunc.saturating_add(self.config.compact_entries) {
            return Ok(());
        }
        // The state through `applied` must be durable before the log behind it goes.
        self.sm.sync().map_err(|e| e.to_string())?;
        self.raw.mut_store().compact_to(applied).map_err(|e| format!("compacting the raft log: {e}"))?;
        debug!(applied, "raft log compacted");
        Ok(())
    }
}

/// Encodes raft messages for the wire.
pub fn encode(msg: &Message) -> Vec<u8> {
    msg.write_to_bytes().expect("raft messages encode")
}

/// Decodes a raft message from a peer.
pub fn decode(bytes: &[u8]) -> Result<Message, String> {
    Message::parse_from_bytes(bytes).map_err(|e| format!("undecodable raft message: {e}"))
}

/// A random start for the proposal counter (std's per-process random hash keys, drawn from the
/// OS), below 2^39 so it cannot wrap into the member id bits in this run.
fn random_id_start() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new().build_hasher().finish() & ((1 << 39) - 1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn proposal_counters_start_apart_on_each_start() {
        let starts: std::collections::HashSet<u64> = (0..64).map(|_| super::random_id_start()).collect();
        assert_eq!(starts.len(), 64, "two starts drew the same counter");
        assert!(starts.iter().all(|s| *s < 1 << 39));
    }
}
