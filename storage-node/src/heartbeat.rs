//! A storage node's link to the meta group: register (address, zone, class, capacity), then
//! heartbeat every interval with capacity, use and per-shard load; install the placement the
//! leader hands back whenever it changed.

use std::sync::Arc;
use std::time::Duration;

use augur_meta::MetaClient;
use augur_proto::meta::{NodeRegistration, PerfClass};
use augur_proto::msg::{RequestBody, ResponseBody};
use augur_proto::{ErrorCode, RpcError};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::service::NodeService;

pub struct Heartbeat {
    pub meta: Arc<MetaClient>,
    pub service: Arc<NodeService>,
    pub addr: String,
    pub zone: Option<String>,
    pub perf_class: PerfClass,
    pub interval: Duration,
}

impl Heartbeat {
    async fn register(&self) -> Result<u64, RpcError> {
        let status = self.service.status();
        let reg = NodeRegistration {
            node: status.node,
            addr: self.addr.clone(),
            zone: self.zone.clone(),
            perf_class: self.perf_class,
            capacity_bytes: status.capacity_bytes,
            used_bytes: status.used_bytes,
        };
        let answer = self.meta.call(RequestBody::RegisterNode(reg)).await?;
        let version = self.install(answer).await;
        info!(node = %status.node, "registered with the meta group");
        Ok(version)
    }

    /// Installs a changed placement; returns the placement version now held.
    async fn install(&self, answer: ResponseBody) -> u64 {
        match answer {
            ResponseBody::NodeAck { placement_version, assignments: Some(a) } => {
                match self.service.apply_assignments(a).await {
                    Ok(()) => placement_version,
                    Err(e) => {
                        warn!(error = %e, "could not install placement; will ask again");
                        u64::MAX
                    }
                }
            }
            ResponseBody::NodeAck { placement_version, assignments: None } => placement_version,
            other => {
                warn!(answer = ?other, "unexpected heartbeat answer");
                u64::MAX
            }
        }
    }

    /// Runs until `shutdown`: registration (retried), then heartbeats.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut version = None;
        let mut every = tokio::time::interval(self.interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            let Some(v) = version else {
                match self.register().await {
                    Ok(v) => version = Some(v),
                    Err(e) => warn!(error = %e, "registering with the meta group failed; retrying"),
                }
                continue;
            };
            let status = self.service.status();
            let body = RequestBody::Heartbeat {
                node: status.node,
                capacity_bytes: status.capacity_bytes,
                used_bytes: status.used_bytes,
                loads: self.service.take_loads(),
                placement_version: v,
            };
            match self.meta.call(body).await {
                Ok(answer) => version = Some(self.install(answer).await),
                Err(e) if e.code() == Some(&ErrorCode::NotFound) => version = None,
                Err(e) => warn!(error = %e, "heartbeat failed"),
            }
        }
    }
}
