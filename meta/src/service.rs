//! The meta member's RPC service. Raft traffic goes to the group; everything else is served by
//! the leader only (others answer `NotLeader` with the leader's address): writes are proposed
//! and answered once applied, reads wait for a ReadIndex round and then read the state.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use augur_proto::meta::{
    ClusterStatus, NodeInfo, NodeRegistration, NsOp, ShardLoad, ShardingInfo, Timestamp, VolumeHints,
    VolumeInfo,
};
use augur_proto::msg::{RequestBody, Response, ResponseBody, VolumeLayout};
use augur_proto::{ErrorCode, NodeId, Peer, RpcClient, Service, VolumeId, WireError};
use tracing::{info, warn};

use crate::group::GroupHandle;
use crate::placement::{Candidate, place};
use crate::state::{Cmd, CmdOutput, StateMachine};
use crate::transport::Receiver;

/// Deadline of a placement push to a storage node.
const PUSH_DEADLINE: Duration = Duration::from_secs(2);

/// What the leader knows of a storage node from its heartbeats (not replicated: a new leader
/// starts every node with a fresh grace period).
#[derive(Clone, Debug)]
struct Liveness {
    last_seen: Instant,
    capacity_bytes: u64,
    used_bytes: u64,
    iops: u64,
    loads: Vec<ShardLoad>,
}

pub struct MetaService {
    group: GroupHandle,
    sm: Arc<StateMachine>,
    receiver: Receiver,
    rpc: Arc<RpcClient>,
    live: Mutex<HashMap<NodeId, Liveness>>,
    /// A node not heard from for this long is dead: it is dropped from its shards' replica lists.
    pub node_dead_after: Duration,
    /// Heartbeat interval the nodes use (for IOPS).
    pub heartbeat_interval: Duration,
}

fn invalid(msg: impl Into<String>) -> WireError {
    WireError::new(ErrorCode::InvalidArgument, msg.into())
}

fn unexpected(what: &str) -> WireError {
    WireError::new(ErrorCode::Internal, format!("unexpected result of {what}"))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl MetaService {
    pub fn new(
        group: GroupHandle,
        sm: Arc<StateMachine>,
        rpc: Arc<RpcClient>,
        node_dead_after: Duration,
        heartbeat_interval: Duration,
    ) -> Self {
        Self {
            receiver: Receiver::new(group.clone(), rpc.clone()),
            group,
            sm,
            rpc,
            live: Mutex::new(HashMap::new()),
            node_dead_after,
            heartbeat_interval,
        }
    }

    fn leader_only(&self) -> Result<(), WireError> {
        if self.group.shared.is_leader() { Ok(()) } else { Err(self.group.shared.not_leader()) }
    }

    async fn read(&self) -> Result<(), WireError> {
        self.group.read_barrier().await
    }

    async fn volume_output(&self, cmd: Cmd) -> Result<VolumeInfo, WireError> {
        match self.group.propose(cmd).await? {
            CmdOutput::Volume(v) => Ok(*v),
            _ => Err(unexpected("a volume command")),
        }
    }

    fn liveness(&self) -> HashMap<NodeId, Liveness> {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn is_alive(&self, live: &HashMap<NodeId, Liveness>, node: NodeId) -> bool {
        live.get(&node).is_some_and(|l| l.last_seen.elapsed() < self.node_dead_after)
    }

    fn candidates(&self) -> Result<Vec<Candidate>, WireError> {
        let live = self.liveness();
        let held = self.sm.replicas_held()?;
        Ok(self
            .sm
            .nodes()?
            .into_iter()
            .filter(|n| self.is_alive(&live, n.node))
            .map(|n| {
                let l = &live[&n.node];
                Candidate {
                    node: n.node,
                    zone: n.zone,
                    perf_class: n.perf_class,
                    capacity_bytes: l.capacity_bytes,
                    used_bytes: l.used_bytes,
                    iops: l.iops,
                    replicas_held: held.get(&n.node).copied().unwrap_or(0),
                }
            })
            .collect())
    }

    /// Tells every replica of `volume` its placement now, rather than at its next heartbeat.
    fn push_placement(&self, volume: VolumeId) {
        let (Ok(info), Ok(placements)) = (self.sm.volume(volume), self.sm.placements(volume)) else { return };
        let layout = VolumeLayout { volume, block_size_bytes: info.block_size_bytes };
        let mut per_node: HashMap<String, Vec<augur_proto::msg::ShardPlacement>> = HashMap::new();
        for p in placements {
            for r in &p.replicas {
                per_node.entry(r.addr.clone()).or_default().push(p.clone());
            }
        }
        for (addr, shards) in per_node {
            let Ok(addr) = addr.parse::<SocketAddr>() else { continue };
            let rpc = self.rpc.clone();
            tokio::spawn(async move {
                let body = RequestBody::SetPlacement { layout, shards };
                if let Err(e) = rpc.call_with_deadline(addr, body, PUSH_DEADLINE).await {
                    info!(%addr, error = %e, "placement push failed; the node learns it at its next heartbeat");
                }
            });
        }
    }

    /// The answer to a node: the placement version, and its full assignment when the node's
    /// differs. An assignment is sent only after a read barrier: a leader deposed without
    /// knowing it yet would otherwise send an old one, and the node installs what it is sent
    /// (keeping only newer epochs of the shards listed, so a shard assigned since would go).
    async fn node_ack(&self, node: NodeId, known_version: u64) -> Result<ResponseBody, WireError> {
        if self.sm.placement_version()? == known_version {
            return Ok(ResponseBody::NodeAck { placement_version: known_version, assignments: None });
        }
        self.read().await?;
        let version = self.sm.placement_version()?;
        let assignments = (version != known_version).then(|| self.sm.assignments(node)).transpose()?;
        Ok(ResponseBody::NodeAck { placement_version: version, assignments })
    }

    async fn register(&self, reg: NodeRegistration) -> Result<ResponseBody, WireError> {
        self.leader_only()?;
        reg.addr.parse::<SocketAddr>().map_err(|e| invalid(format!("node address {:?}: {e}", reg.addr)))?;
        if reg.node.0 == 0 {
            return Err(invalid("node id 0 is reserved"));
        }
        let node = reg.node;
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(
            node,
            Liveness {
                last_seen: Instant::now(),
                capacity_bytes: reg.capacity_bytes,
                used_bytes: reg.used_bytes,
                iops: 0,
                loads: vec![],
            },
        );
        info!(%node, addr = %reg.addr, "storage node registered");
        self.group.propose(Cmd::RegisterNode(reg)).await?;
        self.node_ack(node, u64::MAX).await
    }

    async fn heartbeat(
        &self,
        node: NodeId,
        capacity_bytes: u64,
        used_bytes: u64,
        loads: Vec<ShardLoad>,
        version: u64,
    ) -> Result<ResponseBody, WireError> {
        self.leader_only()?;
        if self.sm.node(node)?.is_none() {
            return Err(WireError::new(
                ErrorCode::NotFound,
                format!("{node} is not registered; register first"),
            ));
        }
        // A node's counters are its own to report, so sums saturate rather than trust them.
        let ops = loads.iter().fold(0u64, |a, l| a.saturating_add(l.reads.saturating_add(l.writes)));
        let iops = ops.saturating_mul(1000) / (self.heartbeat_interval.as_millis() as u64).max(1);
        let revived = {
            let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            let was_dead = live.get(&node).is_some_and(|l| l.last_seen.elapsed() >= self.node_dead_after);
            live.insert(
                node,
                Liveness { last_seen: Instant::now(), capacity_bytes, used_bytes, iops, loads },
            );
            was_dead
        };
        if revived {
            info!(%node, "storage node heard from again");
        }
        self.node_ack(node, version).await
    }

    async fn create_volume(&self, spec: augur_proto::meta::VolumeSpec) -> Result<ResponseBody, WireError> {
        self.leader_only()?;
        spec.validate().map_err(invalid)?;
        self.read().await?;
        if self.sm.volume_by_name(&spec.name).is_ok() {
            return Err(WireError::new(
                ErrorCode::AlreadyExists,
                format!("volume {:?} already exists", spec.name),
            ));
        }
        let placed = place(&self.candidates()?, spec.replicas as usize, spec.shard_count)
            .map_err(|e| WireError::new(ErrorCode::Unavailable, e.to_string()))?;
        let shards = placed.into_iter().map(|p| p.nodes).collect();
        let info = self.volume_output(Cmd::CreateVolume { spec, shards, now_ms: now_ms() }).await?;
        info!(volume = %info.name, id = %info.id, "volume created");
        self.push_placement(info.id);
        Ok(ResponseBody::Volume(Box::new(info)))
    }

    async fn sharding_info(&self, name: &str) -> Result<ResponseBody, WireError> {
        self.leader_only()?;
        self.read().await?;
        let volume = self.sm.volume_by_name(name)?;
        let shards = self.sm.placements(volume.id)?;
        let live = self.liveness();
        let nodes: HashMap<NodeId, NodeRegistration> =
            self.sm.nodes()?.into_iter().map(|n| (n.node, n)).collect();
        let explain = shards
            .iter()
            .map(|p| {
                let replicas: Vec<String> = p
                    .replicas
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        let n = nodes.get(&r.node);
                        let l = live.get(&r.node);
                        format!(
                            "{}{} [{}{}{}]",
                            if i == 0 { "primary " } else { "backup " },
                            r.node,
                            if self.is_alive(&live, r.node) { "alive" } else { "NOT HEARD FROM" },
                            n.map(|n| format!(", {}", n.perf_class)).unwrap_or_default(),
                            l.map(|l| {
                                let free = l.capacity_bytes.saturating_sub(l.used_bytes) as f64
                                    / l.capacity_bytes.max(1) as f64;
                                format!(", free {:.0}%, {} iops", 100.0 * free, l.iops)
                            })
                            .unwrap_or_default()
                        )
                    })
                    .collect();
                let (reads, writes, lat) = live
                    .values()
                    .flat_map(|l| l.loads.iter())
                    .filter(|l| l.volume == volume.id && l.shard == p.shard)
                    .fold((0u64, 0u64, 0), |(r, w, m), l| {
                        (r.saturating_add(l.reads), w.saturating_add(l.writes), m.max(l.latency_max_us))
                    });
                format!(
                    "{} at {}: {}; last interval {reads} reads, {writes} writes, max latency {lat} us; placed by score over free capacity, performance class, load and replicas held, on distinct nodes{}",
                    p.shard,
                    p.epoch,
                    replicas.join(", "),
                    if p.epoch.0 > 1 { "; changed since creation (node loss or operator move)" } else { "" }
                )
            })
            .collect();
        Ok(ResponseBody::Sharding(Box::new(ShardingInfo { volume, shards, explain })))
    }

    async fn cluster_status(&self) -> Result<ResponseBody, WireError> {
        self.leader_only()?;
        self.read().await?;
        let live = self.liveness();
        let held = self.sm.replicas_held()?;
        let volumes = self.sm.volumes()?;
        let nodes = self
            .sm
            .nodes()?
            .into_iter()
            .map(|n| {
                let l = live.get(&n.node);
                NodeInfo {
                    node: n.node,
                    alive: self.is_alive(&live, n.node),
                    last_heartbeat_ms_ago: l.map(|l| l.last_seen.elapsed().as_millis() as u64),
                    capacity_bytes: l.map_or(n.capacity_bytes, |l| l.capacity_bytes),
                    used_bytes: l.map_or(n.used_bytes, |l| l.used_bytes),
                    iops: l.map_or(0, |l| l.iops),
                    shards: held.get(&n.node).copied().unwrap_or(0),
                    addr: n.addr,
                    zone: n.zone,
                    perf_class: n.perf_class,
                }
            })
            .collect();
        let meta = self.group.status().await?;
        Ok(ResponseBody::Cluster(Box::new(ClusterStatus { meta, nodes, volumes })))
    }

    async fn ns(&self, volume: VolumeId, op: NsOp, tag: Option<augur_proto::meta::RequestTag>) -> Response {
        self.leader_only()?;
        if op.is_write() {
            match self.group.propose(Cmd::Ns { volume, op, now: Timestamp::now(), tag }).await? {
                CmdOutput::Ns(reply) => Ok(ResponseBody::Ns(reply)),
                _ => Err(unexpected("a namespace command")),
            }
        } else {
            self.read().await?;
            Ok(ResponseBody::Ns(self.sm.ns_read(volume, &op)?))
        }
    }

    /// Leader duty, run every second: drop dead nodes from their shards' replica lists (a new
    /// epoch each) so writes continue on the survivors. A shard's last replica is never dropped.
    pub async fn evict_dead_nodes(&self) {
        if !self.group.shared.is_leader() {
            self.live.lock().unwrap_or_else(|p| p.into_inner()).clear();
            return;
        }
        let Ok(nodes) = self.sm.nodes() else { return };
        let dead: Vec<NodeId> = {
            let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            for n in &nodes {
                // A node this leader never heard from gets a grace period from now.
                live.entry(n.node).or_insert_with(|| Liveness {
                    last_seen: Instant::now(),
                    capacity_bytes: n.capacity_bytes,
                    used_bytes: n.used_bytes,
                    iops: 0,
                    loads: vec![],
                });
            }
            live.iter()
                .filter(|(_, l)| l.last_seen.elapsed() >= self.node_dead_after)
                .map(|(n, _)| *n)
                .collect()
        };
        if dead.is_empty() {
            return;
        }
        let Ok(volumes) = self.sm.volumes() else { return };
        for vol in volumes {
            let Ok(shards) = self.sm.shards(vol.id) else { continue };
            let mut changed = false;
            for (shard, rec) in shards {
                let survivors: Vec<NodeId> =
                    rec.nodes.iter().copied().filter(|n| !dead.contains(n)).collect();
                if survivors.len() == rec.nodes.len() || survivors.is_empty() {
                    continue;
                }
                let cmd = Cmd::SetShardReplicas {
                    volume: vol.id,
                    shard,
                    nodes: survivors.clone(),
                    expected_epoch: Some(rec.epoch),
                };
                match self.group.propose(cmd).await {
                    Ok(_) => {
                        warn!(volume = %vol.name, %shard, dead = ?dead, now = ?survivors, "dropped dead replicas");
                        changed = true;
                    }
                    Err(e) => info!(error = %e, "could not drop a dead replica; will retry"),
                }
            }
            if changed {
                self.push_placement(vol.id);
            }
        }
    }

    pub fn group(&self) -> &GroupHandle {
        &self.group
    }
}

impl Service for MetaService {
    async fn handle(&self, _peer: &Peer, body: RequestBody) -> Response {
        match body {
            RequestBody::Raft { msgs } => self.receiver.receive(msgs).map(|()| ResponseBody::RaftAccepted),
            RequestBody::SnapshotChunk { index, offset } => self.receiver.chunk(index, offset),
            RequestBody::MetaStatus => Ok(ResponseBody::MetaStatus(Box::new(self.group.status().await?))),
            RequestBody::AddMember { id, addr } => {
                crate::server::check_member_id("member id", id).map_err(invalid)?;
                addr.parse::<SocketAddr>().map_err(|e| invalid(format!("member address {addr:?}: {e}")))?;
                self.group.change_member(true, id, addr).await.map(|()| ResponseBody::Done)
            }
            RequestBody::RemoveMember { id } => {
                self.group.change_member(false, id, String::new()).await.map(|()| ResponseBody::Done)
            }
            RequestBody::RegisterNode(reg) => self.register(reg).await,
            RequestBody::Heartbeat { node, capacity_bytes, used_bytes, loads, placement_version } => {
                self.heartbeat(node, capacity_bytes, used_bytes, loads, placement_version).await
            }
            RequestBody::CreateVolume(spec) => self.create_volume(spec).await,
            RequestBody::DeleteVolume { name } => {
                self.leader_only()?;
                self.group.propose(Cmd::DeleteVolume { name: name.clone() }).await?;
                info!(volume = %name, "volume deleted");
                Ok(ResponseBody::Done)
            }
            RequestBody::ListVolumes => {
                self.leader_only()?;
                self.read().await?;
                Ok(ResponseBody::Volumes(self.sm.volumes()?))
            }
            RequestBody::GetVolume { name } => {
                self.leader_only()?;
                self.read().await?;
                Ok(ResponseBody::Volume(Box::new(self.sm.volume_by_name(&name)?)))
            }
            RequestBody::GetVolumeShardingInfo { volume } => self.sharding_info(&volume).await,
            RequestBody::SetPrefetchHint { volume, hint_type, hint_value } => {
                // Refuse bad hints before they reach the log.
                VolumeHints::default().set(&hint_type, &hint_value).map_err(invalid)?;
                let cmd = Cmd::SetHint { name: volume, hint_type, hint_value };
                Ok(ResponseBody::Volume(Box::new(self.volume_output(cmd).await?)))
            }
            RequestBody::SetShardReplicas { volume, shard, nodes } => {
                self.leader_only()?;
                self.read().await?;
                let vol = self.sm.volume_by_name(&volume)?;
                if shard.0 >= vol.shard_count {
                    return Err(invalid(format!("{volume} has {} shards; no {shard}", vol.shard_count)));
                }
                self.group
                    .propose(Cmd::SetShardReplicas { volume: vol.id, shard, nodes, expected_epoch: None })
                    .await?;
                self.push_placement(vol.id);
                Ok(ResponseBody::Done)
            }
            RequestBody::ClusterStatus => self.cluster_status().await,
            RequestBody::Ns { volume, op, tag } => self.ns(volume, op, tag).await,
            other => Err(WireError::new(
                ErrorCode::InvalidArgument,
                format!("{} is a storage-node request; this is a meta member", other.name()),
            )),
        }
    }
}
