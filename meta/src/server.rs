//! Running a meta member: open the raft log and the state, bootstrap or join, start the group
//! thread and serve RPCs until shutdown.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use augur_proto::rpc::{ServerLimits, serve, server_endpoint};
use augur_proto::{Role, RpcClient, TlsIdentity};
use raft::prelude::ConfState;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::group::{Group, GroupConfig, GroupHandle};
use crate::logstore::{LogStore, SnapshotSource};
use crate::service::MetaService;
use crate::state::StateMachine;
use crate::transport::Transport;

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("reading config {path}: {reason}")]
    Config { path: String, reason: String },
    #[error("invalid meta config: {0}")]
    Invalid(String),
    #[error("TLS: {0}")]
    Tls(#[from] augur_proto::TlsError),
    #[error("the certificate in {dir} has role {role}; a meta member needs a `meta` certificate")]
    WrongRole { dir: String, role: Role },
    #[error("{what} in {dir}: {reason}")]
    Storage { what: &'static str, dir: String, reason: String },
    #[error("binding {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("raft: {0}")]
    Raft(String),
}

/// A meta member's configuration: a TOML file (kebab-case keys) overlaid by flags.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct MetaConfig {
    /// This member's Raft id (non-zero, unique in the group). Required.
    pub id: u64,
    /// UDP address to serve QUIC on. Default `127.0.0.1:7000`.
    pub listen: SocketAddr,
    /// Every initial member, `id -> address`, this one included. A new group is bootstrapped
    /// from it on first start; later starts read the membership from the log.
    pub peers: BTreeMap<u64, String>,
    /// Start with an empty state and wait to be added (`augur meta add-member`) and sent a
    /// snapshot, instead of bootstrapping. Use for new members and for a member whose data was
    /// lost. Default false.
    pub join: bool,
    /// Where the Raft log (`raft/`) and the state (`state/`) live. Required.
    pub data_dir: Option<PathBuf>,
    /// Directory with this member's certificate (role `meta`). Required.
    pub tls_dir: Option<PathBuf>,
    /// Raft tick. Default 100 ms.
    pub tick_ms: u64,
    /// Ticks without a leader before an election (randomised up to twice this). Default 10.
    pub election_ticks: usize,
    /// Ticks between leader heartbeats. Default 2.
    pub heartbeat_ticks: usize,
    /// Compact the Raft log every this many applied entries. Default 10000.
    pub compact_entries: u64,
    /// A storage node silent for this long is dropped from its shards. Default 10000 ms.
    pub node_dead_after_ms: u64,
    /// The heartbeat interval storage nodes use (for IOPS arithmetic). Default 1000 ms.
    pub node_heartbeat_ms: u64,
    /// HTTP address serving Prometheus metrics. Default: off.
    pub metrics_listen: Option<SocketAddr>,
}

/// Largest member id: proposal ids put the member id above 40 bits of a counter
/// (`group::Group::new_id`), so ids must fit in the 24 left.
pub const MEMBER_ID_MAX: u64 = (1 << 24) - 1;

/// Checks a member id (`what` names it in the message): 1 to `MEMBER_ID_MAX`. The config, its
/// peers and `AddMember` all go through here.
pub fn check_member_id(what: &str, id: u64) -> Result<(), String> {
    if id == 0 || id > MEMBER_ID_MAX {
        return Err(format!("{what} {id} is not between 1 and {MEMBER_ID_MAX}"));
    }
    Ok(())
}

/// "`key` `v` is not between `lo` and `hi`", when it is not.
fn check_range(key: &str, v: u64, lo: u64, hi: u64) -> Result<(), String> {
    if !(lo..=hi).contains(&v) {
        return Err(format!("{key} {v} is not between {lo} and {hi}"));
    }
    Ok(())
}
/// Largest `election_ticks` (raft-rs doubles it for its randomised timeout).
pub const ELECTION_TICKS_MAX: usize = 1000;
/// Largest `compact_entries`.
pub const COMPACT_ENTRIES_MAX: u64 = 1_000_000_000;
/// Largest `node_heartbeat_ms` (as a storage node's own bound).
pub const NODE_HEARTBEAT_MS_MAX: u64 = 60_000;
/// Largest `node_dead_after_ms`: an hour.
pub const NODE_DEAD_AFTER_MS_MAX: u64 = 3_600_000;

impl Default for MetaConfig {
    fn default() -> Self {
        Self {
            id: 0,
            listen: SocketAddr::from(([127, 0, 0, 1], 7000)),
            peers: BTreeMap::new(),
            join: false,
            data_dir: None,
            tls_dir: None,
            tick_ms: 100,
            election_ticks: 10,
            heartbeat_ticks: 2,
            compact_entries: 10_000,
            node_dead_after_ms: 10_000,
            node_heartbeat_ms: 1_000,
            metrics_listen: None,
        }
    }
}

impl MetaConfig {
    pub fn from_file(path: &Path) -> Result<Self, MetaError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| MetaError::Config { path: path.display().to_string(), reason: e.to_string() })?;
        toml::from_str(&text)
            .map_err(|e| MetaError::Config { path: path.display().to_string(), reason: e.to_string() })
    }

    /// Parses `--peers 1=127.0.0.1:7001,2=...`.
    pub fn parse_peers(s: &str) -> Result<BTreeMap<u64, String>, String> {
        let mut peers = BTreeMap::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (id, addr) = part.split_once('=').ok_or_else(|| format!("peer {part:?} is not ID=ADDR"))?;
            let id: u64 = id.trim().parse().map_err(|_| format!("peer id {id:?} is not a number"))?;
            addr.trim().parse::<SocketAddr>().map_err(|e| format!("peer {id} address {addr:?}: {e}"))?;
            if peers.insert(id, addr.trim().to_string()).is_some() {
                return Err(format!("peer id {id} listed twice"));
            }
        }
        Ok(peers)
    }

    pub fn validate(&self) -> Result<(), MetaError> {
        let invalid = |m: String| Err(MetaError::Invalid(m));
        check_member_id("id", self.id).map_err(MetaError::Invalid)?;
        if self.data_dir.is_none() {
            return invalid("data-dir is required (--data-dir)".into());
        }
        if self.tls_dir.is_none() {
            return invalid("tls-dir is required (--tls)".into());
        }
        if !self.join && !self.peers.contains_key(&self.id) {
            return invalid(format!("peers must list this member (id {}) with its address", self.id));
        }
        for (id, addr) in &self.peers {
            check_member_id("peer id", *id).map_err(MetaError::Invalid)?;
            addr.parse::<SocketAddr>()
                .map_err(|e| MetaError::Invalid(format!("peer {id} address {addr:?}: {e}")))?;
        }
        if !(10..=10_000).contains(&self.tick_ms) {
            return invalid(format!("tick-ms {} is not between 10 and 10000", self.tick_ms));
        }
        if self.heartbeat_ticks == 0 || self.election_ticks <= self.heartbeat_ticks {
            return invalid("election-ticks must exceed heartbeat-ticks, which must be at least 1".into());
        }
        if self.election_ticks > ELECTION_TICKS_MAX {
            return invalid(format!("election-ticks {} is over {ELECTION_TICKS_MAX}", self.election_ticks));
        }
        check_range("compact-entries", self.compact_entries, 10, COMPACT_ENTRIES_MAX)
            .map_err(MetaError::Invalid)?;
        check_range("node-heartbeat-ms", self.node_heartbeat_ms, 1, NODE_HEARTBEAT_MS_MAX)
            .map_err(MetaError::Invalid)?;
        if self.node_dead_after_ms < 2 * self.node_heartbeat_ms
            || self.node_dead_after_ms > NODE_DEAD_AFTER_MS_MAX
        {
            return invalid(format!(
                "node-dead-after-ms {} must be at least twice node-heartbeat-ms ({}) and at most {NODE_DEAD_AFTER_MS_MAX}",
                self.node_dead_after_ms, self.node_heartbeat_ms
            ));
        }
        Ok(())
    }
}

struct StateSource(Arc<StateMachine>);

impl SnapshotSource for StateSource {
    fn build(&self) -> Result<(u64, ConfState, Vec<u8>), String> {
        self.0.snapshot().map_err(|e| e.to_string())
    }
}

/// A started member: the group thread runs; call `serve` to answer RPCs.
pub struct MetaServer {
    pub local_addr: SocketAddr,
    endpoint: quinn::Endpoint,
    service: Arc<MetaService>,
    handle: GroupHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn slog_logger() -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!())
}

/// Forwards raft-rs's slog records to `tracing`.
struct TracingDrain;

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;
    fn log(&self, record: &slog::Record<'_>, _: &slog::OwnedKVList) -> Result<(), slog::Never> {
        match record.level() {
            slog::Level::Critical | slog::Level::Error => tracing::error!(target: "raft", "{}", record.msg()),
            slog::Level::Warning => tracing::warn!(target: "raft", "{}", record.msg()),
            slog::Level::Info => tracing::info!(target: "raft", "{}", record.msg()),
            _ => tracing::debug!(target: "raft", "{}", record.msg()),
        }
        Ok(())
    }
}

impl MetaServer {
    /// Opens storage, bootstraps or joins, starts the group thread and binds the endpoint.
    /// Must run inside a tokio runtime.
    pub fn start(config: &MetaConfig) -> Result<Self, MetaError> {
        config.validate()?;
        let data_dir = config.data_dir.clone().expect("validated");
        let tls_dir = config.tls_dir.clone().expect("validated");
        let identity = TlsIdentity::load(&tls_dir)?;
        if identity.role != Role::Meta {
            return Err(MetaError::WrongRole { dir: tls_dir.display().to_string(), role: identity.role });
        }
        let storage = |what, e: &dyn std::fmt::Display| MetaError::Storage {
            what,
            dir: data_dir.display().to_string(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(&data_dir).map_err(|e| storage("creating the data directory", &e))?;
        let sm = Arc::new(
            StateMachine::open(&data_dir.join("state")).map_err(|e| storage("opening the state", &e))?,
        );
        let engine = raft_engine::Engine::open(raft_engine::Config {
            dir: data_dir.join("raft").display().to_string(),
            ..Default::default()
        })
        .map_err(|e| storage("opening the raft log", &e))?;
        let cs = sm.conf_state().map_err(|e| storage("reading the state", &e))?;
        let source = Arc::new(StateSource(sm.clone()));
        let mut store =
            LogStore::open(Arc::new(engine), cs, source).map_err(|e| storage("reading the raft log", &e))?;
        if store.is_empty() && sm.applied() <= 1 {
            if config.join {
                info!(id = config.id, "empty member: waiting to be added and sent a snapshot");
            } else {
                let cs = ConfState { voters: config.peers.keys().copied().collect(), ..Default::default() };
                // A crash between these two writes left the state bootstrapped (applied 1) and
                // the log empty: the log's half is written now.
                if sm.applied() == 0 {
                    sm.bootstrap(&cs, &config.peers).map_err(|e| storage("bootstrapping the state", &e))?;
                }
                store.bootstrap(cs).map_err(|e| storage("bootstrapping the raft log", &e))?;
                info!(id = config.id, peers = ?config.peers, "bootstrapped a new group");
            }
        }
        reconcile(&sm, &mut store).map_err(|e| storage("bringing the raft log level with the state", &e))?;
        let endpoint = server_endpoint(&identity, config.listen)
            .map_err(|source| MetaError::Bind { addr: config.listen, source })?;
        let local_addr =
            endpoint.local_addr().map_err(|source| MetaError::Bind { addr: config.listen, source })?;
        let rpc = Arc::new(RpcClient::with_endpoint(endpoint.clone()));
        let transport = Transport::new(tokio::runtime::Handle::current(), rpc.clone());
        let group_config = GroupConfig {
            id: config.id,
            tick: Duration::from_millis(config.tick_ms),
            election_ticks: config.election_ticks,
            heartbeat_ticks: config.heartbeat_ticks,
            compact_entries: config.compact_entries,
        };
        let (group, handle) = Group::new(group_config, store, sm.clone(), transport, &slog_logger())
            .map_err(|e| MetaError::Raft(e.to_string()))?;
        {
            // Peers given on the command line fill in addresses the log does not know yet
            // (a joining member learns the rest from its snapshot).
            let mut members = handle.shared.members.write().unwrap_or_else(|p| p.into_inner());
            for (id, addr) in &config.peers {
                members.entry(*id).or_insert_with(|| addr.clone());
            }
        }
        let thread = std::thread::Builder::new()
            .name(format!("meta-{}", config.id))
            .spawn(move || group.run())
            .map_err(|e| MetaError::Raft(format!("starting the group thread: {e}")))?;
        let service = Arc::new(MetaService::new(
            handle.clone(),
            sm,
            rpc,
            Duration::from_millis(config.node_dead_after_ms),
            Duration::from_millis(config.node_heartbeat_ms),
        ));
        if let Some(addr) = config.metrics_listen {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .with_http_listener(addr)
                .install()
                .map_err(|e| MetaError::Invalid(format!("metrics endpoint on {addr}: {e}")))?;
        }
        Ok(Self { local_addr, endpoint, service, handle, thread: Some(thread) })
    }

    /// Serves until `shutdown`, then stops the group thread.
    pub async fn serve(mut self, shutdown: CancellationToken) {
        info!(addr = %self.local_addr, id = self.handle.shared.id, "meta member serving");
        let duties = {
            let service = self.service.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = every.tick() => service.evict_dead_nodes().await,
                    }
                }
            })
        };
        serve(self.endpoint.clone(), self.service.clone(), ServerLimits::default(), shutdown).await;
        let _ = duties.await;
        self.handle.shared.stopped.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        info!("meta member stopped");
    }
}

/// Brings the raft log level with the state machine after a crash between two writes that
/// belong together, since raft-rs refuses to start with the state applied past the log's
/// commit index: a snapshot restored into the state but not yet recorded in the log is
/// recorded now (from the state's `restored_from`), and a commit index lost with an unsynced
/// write is raised to what the state applied (only committed entries are ever applied).
pub(crate) fn reconcile(sm: &StateMachine, store: &mut LogStore) -> Result<(), String> {
    use raft::Storage;
    let applied = sm.applied();
    let last = store.last_index().map_err(|e| e.to_string())?;
    let restored = sm.restored_from().map_err(|e| e.to_string())?.filter(|(index, _)| *index == applied);
    // The state is that of a snapshot the log never recorded (a recorded one moved the log's
    // compaction point to it): record it now. This comes first, whatever the log holds at that
    // index, since a snapshot is installed only when the log's entry there (if any) differs.
    if let Some((index, term)) = restored
        && store.truncated().0 < index
    {
        let mut meta = raft::prelude::SnapshotMetadata { index, term, ..Default::default() };
        meta.set_conf_state(sm.conf_state().map_err(|e| e.to_string())?);
        store.apply_snapshot(&meta, None).map_err(|e| e.to_string())?;
        tracing::warn!(index, term, "finished installing a snapshot a crash had interrupted");
    } else if applied > last {
        return Err(format!(
            "the state is applied to {applied}, past the raft log's last entry {last}, and was not restored from \
             a snapshot at that index: wipe this member's data directory and add it again"
        ));
    } else if applied > store.hard_state().commit {
        let mut hs = store.hard_state().clone();
        hs.commit = applied;
        store.persist(&[], Some(&hs), true).map_err(|e| e.to_string())?;
        tracing::warn!(applied, "raised the raft log's commit index to what the state applied");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member's state machine and raft log in `dir`, as `Member::start` opens them.
    fn open(dir: &Path) -> (Arc<StateMachine>, LogStore) {
        let sm = Arc::new(StateMachine::open(&dir.join("state")).unwrap());
        let engine = raft_engine::Engine::open(raft_engine::Config {
            dir: dir.join("raft").display().to_string(),
            ..Default::default()
        })
        .unwrap();
        let cs = sm.conf_state().unwrap();
        let store = LogStore::open(Arc::new(engine), cs, Arc::new(StateSource(sm.clone()))).unwrap();
        (sm, store)
    }

    /// Whether raft-rs accepts the log and the state as they are (it panics when the state is
    /// applied past the log's commit index).
    fn raft_starts(sm: &StateMachine, store: LogStore) -> bool {
        let config = raft::Config { id: 1, applied: sm.applied(), ..Default::default() };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            raft::RawNode::new(&config, store, &logger).is_ok()
        }))
        .unwrap_or(false)
    }

    #[test]
    fn a_crash_inside_a_snapshot_install_or_a_bootstrap_is_finished_at_the_next_start() {
        let cs = ConfState { voters: vec![1, 2], ..Default::default() };
        let peers: BTreeMap<u64, String> = [(1, "a".to_string()), (2, "b".to_string())].into();
        // A snapshot restored into the state, the crash before the log recorded it.
        let leader = tempfile::tempdir().unwrap();
        let (lsm, _) = open(leader.path());
        lsm.bootstrap(&cs, &peers).unwrap();
        let (index, _, data) = lsm.snapshot().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (sm, store) = open(dir.path());
        sm.restore(&data, 5).unwrap();
        assert!(!raft_starts(&sm, store), "raft-rs takes this state and log as they are");
        drop(sm);
        let (sm, mut store) = open(dir.path());
        reconcile(&sm, &mut store).unwrap();
        assert_eq!(store.truncated(), (index, 5));
        assert!(raft_starts(&sm, store), "after reconcile");
        // The same on a member whose log holds other entries past the snapshot's index (a
        // former leader's uncommitted tail): the snapshot is recorded, not the tail committed.
        let tail = tempfile::tempdir().unwrap();
        let (sm, mut store) = open(tail.path());
        sm.bootstrap(&cs, &peers).unwrap();
        store.bootstrap(cs.clone()).unwrap();
        let entries: Vec<raft::prelude::Entry> =
            (2..=5).map(|index| raft::prelude::Entry { index, term: 1, ..Default::default() }).collect();
        store.persist(&entries, None, true).unwrap();
        lsm.apply_empty(2).unwrap();
        lsm.apply_empty(3).unwrap();
        let (three, _, data) = lsm.snapshot().unwrap();
        sm.restore(&data, 2).unwrap();
        reconcile(&sm, &mut store).unwrap();
        assert_eq!((three, store.truncated()), (3, (3, 2)));
        assert!(store.hard_state().commit >= 3);
        drop(sm);
        // A state ahead of the log with no snapshot to explain it is refused with a way out.
        let bare = tempfile::tempdir().unwrap();
        let (sm, mut store) = open(bare.path());
        sm.bootstrap(&cs, &peers).unwrap();
        let e = reconcile(&sm, &mut store).unwrap_err();
        assert!(e.contains("wipe this member's data directory"), "{e}");
        // A commit index lost (an unsynced write) below what the state applied is raised.
        let lost = tempfile::tempdir().unwrap();
        let (sm, mut store) = open(lost.path());
        sm.bootstrap(&cs, &peers).unwrap();
        store.bootstrap(cs.clone()).unwrap();
        let entry = raft::prelude::Entry { index: 2, term: 1, ..Default::default() };
        store.persist(&[entry], None, true).unwrap();
        sm.apply_empty(2).unwrap();
        assert!(!raft_starts(&sm, store));
        drop(sm);
        let (sm, mut store) = open(lost.path());
        reconcile(&sm, &mut store).unwrap();
        assert_eq!(store.hard_state().commit, 2);
        assert!(raft_starts(&sm, store));
    }

    #[test]
    fn config_values_out_of_range_are_named_not_overflowed() {
        let good = MetaConfig {
            id: 1,
            data_dir: Some("/tmp/x".into()),
            tls_dir: Some("/tmp/t".into()),
            peers: [(1, "127.0.0.1:7001".to_string())].into_iter().collect(),
            ..MetaConfig::default()
        };
        good.validate().unwrap();
        let error = |c: MetaConfig| c.validate().unwrap_err().to_string();
        let e = error(MetaConfig { id: 1 << 24, ..good.clone() });
        assert!(e.contains("id 16777216 is not between 1 and 16777215"), "{e}");
        let e = error(MetaConfig { election_ticks: usize::MAX, ..good.clone() });
        assert!(e.contains("election-ticks"), "{e}");
        let e = error(MetaConfig { compact_entries: u64::MAX, ..good.clone() });
        assert!(e.contains("compact-entries 18446744073709551615"), "{e}");
        let e = error(MetaConfig { node_heartbeat_ms: 1 << 63, ..good.clone() });
        assert!(e.contains("node-heartbeat-ms 9223372036854775808"), "{e}");
        let e = error(MetaConfig { node_dead_after_ms: u64::MAX, ..good.clone() });
        assert!(e.contains("node-dead-after-ms"), "{e}");
    }
}
