//! Storage-node configuration: a TOML file (kebab-case keys) overlaid by command-line flags.
//! Every field's default is stated on it; `validate` names the field it refuses.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid node config: {0}")]
    Invalid(String),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct NodeConfig {
    /// UDP address to serve QUIC on. Default `127.0.0.1:7100`; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Where RocksDB keeps blocks and placement. Required.
    pub data_dir: Option<PathBuf>,
    /// Directory with this node's `cert.pem`, `key.pem` and `ca.pem` (role `node`). Required.
    pub tls_dir: Option<PathBuf>,
    /// Node id used when the data directory is created; later starts keep the stored id.
    /// Default: a random id.
    pub node_id: Option<u64>,
    /// HTTP address serving Prometheus metrics at `/metrics`. Default: none (off).
    pub metrics_listen: Option<SocketAddr>,
    /// Memory cache of hot and warmed blocks, in bytes. Default 256 MiB; 0 disables it.
    pub cache_bytes_max: u64,
    /// Writes are refused with "no space" once the data directory's file system has fewer free
    /// bytes than this, so RocksDB never runs the disk dry. Default 256 MiB.
    pub reserve_bytes: u64,
    /// RocksDB's own block cache (SST index and data blocks), in bytes. Default 64 MiB.
    pub rocksdb_cache_bytes: u64,
    /// Block values of at least this many bytes live in RocksDB blob files. Default 4096.
    pub blob_min_bytes: u64,
    /// Most QUIC connections open at once. Default 1024.
    pub connections_max: usize,
    /// Most requests handled at once over all connections; more wait. Default 1024.
    pub requests_in_flight_max: usize,
    /// Meta members to register and heartbeat with (`--meta`). Default: none (standalone node,
    /// placement set by an admin).
    pub meta: Vec<SocketAddr>,
    /// Failure domain this node is in, used to spread replicas. Default: none.
    pub zone: Option<String>,
    /// Storage performance class: `hdd`, `ssd` or `nvme`. Default `ssd`.
    pub perf_class: String,
    /// Interval between heartbeats to the meta leader. Default 1000 ms.
    pub heartbeat_ms: u64,
    /// The scrub reads every stored block at about this many bytes per second and repairs the
    /// damaged ones from other replicas. Default 16 MiB/s; 0 turns it off.
    pub scrub_bytes_per_sec: u64,
    /// Seconds between the end of one scrub pass and the start of the next (the first starts
    /// with the node). Default 86400 (a day).
    pub scrub_pause_s: u64,
    /// Test/bench only: delay every block read and write by this many milliseconds, to stand in
    /// for network distance where `tc netem` is unavailable. Default 0 (never set it in production).
    pub inject_latency_ms: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7100)),
            data_dir: None,
            tls_dir: None,
            node_id: None,
            metrics_listen: None,
            cache_bytes_max: 256 << 20,
            reserve_bytes: 256 << 20,
            rocksdb_cache_bytes: 64 << 20,
            blob_min_bytes: 4096,
            connections_max: 1024,
            requests_in_flight_max: 1024,
            meta: Vec::new(),
            zone: None,
            perf_class: "ssd".into(),
            heartbeat_ms: 1000,
            scrub_bytes_per_sec: 16 << 20,
            scrub_pause_s: 86_400,
            inject_latency_ms: 0,
        }
    }
}

/// Largest memory cache a node accepts: a typo with extra zeros should not OOM the host.
const CACHE_BYTES_CEILING: u64 = 1 << 40;
/// The most `scrub_bytes_per_sec` may be (10 GiB/s).
pub const SCRUB_BYTES_PER_SEC_MAX: u64 = 10 << 30;
/// The most `scrub_pause_s` may be (a year).
pub const SCRUB_PAUSE_S_MAX: u64 = 366 * 86_400;
/// The most `inject_latency_ms` may be (tests and benchmarks only).
pub const INJECT_LATENCY_MS_MAX: u64 = 10_000;

impl NodeConfig {
    /// Reads a TOML config file; unknown keys and bad values are errors naming them.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        toml::from_str(&text)
            .map_err(|e| ConfigError::Parse { path: path.display().to_string(), message: e.to_string() })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if let Err(e) = self.perf_class.parse::<augur_proto::meta::PerfClass>() {
            return invalid(e);
        }
        if !(100..=60_000).contains(&self.heartbeat_ms) {
            return invalid(format!("heartbeat-ms {} is not between 100 and 60000", self.heartbeat_ms));
        }
        if self.inject_latency_ms > INJECT_LATENCY_MS_MAX {
            return invalid(format!(
                "inject-latency-ms {} exceeds {INJECT_LATENCY_MS_MAX}",
                self.inject_latency_ms
            ));
        }
        if self.data_dir.is_none() {
            return invalid("data-dir is required (flag --data-dir or key data-dir)".into());
        }
        if self.tls_dir.is_none() {
            return invalid("tls-dir is required (flag --tls or key tls-dir)".into());
        }
        if self.cache_bytes_max > CACHE_BYTES_CEILING {
            return invalid(format!(
                "cache-bytes-max = {} exceeds the ceiling of {CACHE_BYTES_CEILING}",
                self.cache_bytes_max
            ));
        }
        if self.rocksdb_cache_bytes < 1 << 20 || self.rocksdb_cache_bytes > CACHE_BYTES_CEILING {
            return invalid(format!(
                "rocksdb-cache-bytes = {} must be between 1 MiB and 1 TiB",
                self.rocksdb_cache_bytes
            ));
        }
        if self.blob_min_bytes == 0 {
            return invalid("blob-min-bytes must be at least 1".into());
        }
        if self.connections_max == 0 || self.connections_max > 100_000 {
            return invalid(format!(
                "connections-max = {} must be between 1 and 100000",
                self.connections_max
            ));
        }
        if self.requests_in_flight_max == 0 || self.requests_in_flight_max > 100_000 {
            return invalid(format!(
                "requests-in-flight-max = {} must be between 1 and 100000",
                self.requests_in_flight_max
            ));
        }
        if self.scrub_bytes_per_sec > SCRUB_BYTES_PER_SEC_MAX {
            return invalid(format!(
                "scrub-bytes-per-sec = {} exceeds {SCRUB_BYTES_PER_SEC_MAX}",
                self.scrub_bytes_per_sec
            ));
        }
        if self.scrub_pause_s > SCRUB_PAUSE_S_MAX {
            return invalid(format!(
                "scrub-pause-s = {} exceeds {SCRUB_PAUSE_S_MAX} (a year)",
                self.scrub_pause_s
            ));
        }
        if self.node_id == Some(0) {
            return invalid("node-id 0 is reserved".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_unknown_or_bad_keys_are_named() {
        let c: NodeConfig = toml::from_str("data-dir = \"/d\"\ntls-dir = \"/t\"\n").unwrap();
        c.validate().unwrap();
        assert_eq!(c.cache_bytes_max, 256 << 20);

        let err = toml::from_str::<NodeConfig>("cache-bytes = 5\n").unwrap_err().to_string();
        assert!(err.contains("cache-bytes"), "{err}");
        let err = toml::from_str::<NodeConfig>("listen = \"nowhere\"\n").unwrap_err().to_string();
        assert!(err.contains("listen"), "{err}");

        let c = NodeConfig { connections_max: 0, ..c };
        assert!(c.validate().unwrap_err().to_string().contains("connections-max"));
        assert!(NodeConfig::default().validate().unwrap_err().to_string().contains("data-dir"));
    }
}
