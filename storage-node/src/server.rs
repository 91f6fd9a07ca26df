//! Running a storage node: open the store, bind the QUIC endpoint, serve until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use augur_meta::MetaClient;

use augur_proto::rpc::{ServerLimits, serve, server_endpoint};
use augur_proto::{NodeId, Role, RpcClient, TlsIdentity};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::cache::BlockCache;
use crate::config::{ConfigError, NodeConfig};
use crate::heartbeat::Heartbeat;
use crate::service::NodeService;
use crate::space::SpaceMonitor;
use crate::store::{BlockStore, StoreError, StoreOptions};

/// Typical block size, used only to size the cache's index.
const TYPICAL_BLOCK_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("TLS: {0}")]
    Tls(#[from] augur_proto::TlsError),
    #[error("the certificate in {dir} has role {role}; a storage node needs a `node` certificate")]
    WrongRole { dir: String, role: Role },
    #[error("opening the block store in {dir}: {source}")]
    Store { dir: String, source: StoreError },
    #[error("binding {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("metrics endpoint on {addr}: {reason}")]
    Metrics { addr: SocketAddr, reason: String },
}

/// A bound, ready node: call `serve` to run it.
pub struct Node {
    pub node_id: NodeId,
    pub local_addr: SocketAddr,
    endpoint: quinn::Endpoint,
    service: Arc<NodeService>,
    store: Arc<BlockStore>,
    limits: ServerLimits,
    heartbeat: Option<Heartbeat>,
    /// (bytes per second, pause between passes); see `NodeConfig::scrub_bytes_per_sec`.
    scrub: (u64, Duration),
}

impl Node {
    /// Validates the config, opens the store and binds the endpoint.
    pub fn start(config: &NodeConfig) -> Result<Self, NodeError> {
        config.validate()?;
        let data_dir = config.data_dir.clone().expect("validated");
        let tls_dir = config.tls_dir.clone().expect("validated");
        let identity = TlsIdentity::load(&tls_dir)?;
        if identity.role != Role::Node {
            return Err(NodeError::WrongRole { dir: tls_dir.display().to_string(), role: identity.role });
        }
        let store_err = |source| NodeError::Store { dir: data_dir.display().to_string(), source };
        std::fs::create_dir_all(&data_dir).map_err(|e| store_err(StoreError::Format(e.to_string())))?;
        let options = StoreOptions {
            rocksdb_cache_bytes: config.rocksdb_cache_bytes,
            blob_min_bytes: config.blob_min_bytes,
        };
        let store =
            Arc::new(BlockStore::open(&data_dir, options, config.node_id.map(NodeId)).map_err(store_err)?);
        if let Some(addr) = config.metrics_listen {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .with_http_listener(addr)
                .install()
                .map_err(|e| NodeError::Metrics { addr, reason: e.to_string() })?;
        }
        let endpoint = server_endpoint(&identity, config.listen)
            .map_err(|source| NodeError::Bind { addr: config.listen, source })?;
        let local_addr =
            endpoint.local_addr().map_err(|source| NodeError::Bind { addr: config.listen, source })?;
        let cache = BlockCache::new(config.cache_bytes_max, TYPICAL_BLOCK_BYTES);
        let space = SpaceMonitor::new(data_dir.clone(), config.reserve_bytes);
        let rpc = Arc::new(RpcClient::with_endpoint(endpoint.clone()));
        let mut service = NodeService::new(store.clone(), cache, space, local_addr.to_string(), rpc.clone())
            .map_err(store_err)?;
        service.inject_latency = Duration::from_millis(config.inject_latency_ms);
        let service = Arc::new(service);
        let heartbeat = (!config.meta.is_empty()).then(|| Heartbeat {
            meta: Arc::new(MetaClient::new(rpc, config.meta.clone())),
            service: service.clone(),
            addr: local_addr.to_string(),
            zone: config.zone.clone(),
            perf_class: config.perf_class.parse().unwrap_or_default(),
            interval: Duration::from_millis(config.heartbeat_ms),
        });
        let limits = ServerLimits {
            connections_max: config.connections_max,
            requests_in_flight_max: config.requests_in_flight_max,
            ..ServerLimits::default()
        };
        let scrub = (config.scrub_bytes_per_sec, Duration::from_secs(config.scrub_pause_s));
        Ok(Self { node_id: store.node_id(), local_addr, endpoint, service, store, limits, heartbeat, scrub })
    }

    /// Serves until `shutdown` is cancelled, then finishes in-flight requests and flushes.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), NodeError> {
        info!(node = %self.node_id, addr = %self.local_addr, "storage node serving");
        let heartbeat = self.heartbeat.map(|h| tokio::spawn(h.run(shutdown.clone())));
        let repairs = tokio::spawn(self.service.clone().run_repairs(shutdown.clone()));
        let (rate, pause) = self.scrub;
        let scrub = tokio::spawn(self.service.clone().run_scrub(rate, pause, shutdown.clone()));
        serve(self.endpoint, self.service, self.limits, shutdown).await;
        if let Some(h) = heartbeat {
            let _ = h.await;
        }
        let _ = repairs.await;
        let _ = scrub.await;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.flush())
            .await
            .ok()
            .transpose()
            .map_err(|source| NodeError::Store { dir: "(flush)".into(), source })?;
        info!(node = %self.node_id, "storage node stopped");
        Ok(())
    }
}
