//! `augur dev`: the embedded default. One process runs a 3-member meta group and three storage
//! nodes on loopback with everything under one state directory, creates the `default` volume,
//! mounts it, and on Ctrl-C unmounts and stops cleanly. Restarted on the same state directory
//! it finds its files again (fixed addresses, so the group and the nodes find each other).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use augur_meta::{MetaClient, MetaConfig, MetaServer};
use augur_proto::meta::VolumeSpec;
use augur_proto::msg::{RequestBody, ResponseBody};
use augur_proto::tls::{CA_CERT_FILE, init_ca, issue};
use augur_proto::{ErrorCode, Role, RpcClient, TlsIdentity};
use augur_storage_node::config::INJECT_LATENCY_MS_MAX;
use augur_storage_node::{Node, NodeConfig};
use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::mount::MountTuning;

#[derive(Args)]
pub struct DevArgs {
    /// Where to mount the volume [default: STATE/mnt].
    mountpoint: Option<PathBuf>,
    /// State directory (certificates, meta and node data) [default: $HOME/.local/share/augur/dev].
    #[arg(long)]
    state: Option<PathBuf>,
    /// Loopback address to serve on: meta members on ports 7001-7003, nodes on 7101-7103.
    #[arg(long, default_value = "127.0.0.1")]
    ip: IpAddr,
    /// Name of the volume created and mounted.
    #[arg(long, default_value = "default")]
    volume: String,
    /// Tests and benchmarks only: the storage nodes delay every block read and write by this
    /// many ms (at most 10000), standing in for the distance to remote storage.
    #[arg(long, default_value_t = 0, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(..=INJECT_LATENCY_MS_MAX))]
    inject_latency_ms: u64,
    #[command(flatten)]
    tuning: MountTuning,
}

const MEMBERS: u64 = 3;
const NODES: u64 = 3;
/// How long the group and the nodes get to come up before `dev` gives up.
const READY_WITHIN: Duration = Duration::from_secs(60);

fn default_state() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set; pass --state DIR")?;
    Ok(PathBuf::from(home).join(".local/share/augur/dev"))
}

fn certificates(state: &Path) -> Result<()> {
    let ca = state.join("ca");
    if !ca.join(CA_CERT_FILE).exists() {
        init_ca(&ca, "augur-dev")?;
    }
    let mut wanted = vec![(Role::Admin, "admin".to_string()), (Role::Client, "client".to_string())];
    wanted.extend((1..=MEMBERS).map(|i| (Role::Meta, format!("meta-{i}"))));
    wanted.extend((1..=NODES).map(|i| (Role::Node, format!("node-{i}"))));
    for (role, name) in wanted {
        let out = state.join("tls").join(&name);
        if !out.join("cert.pem").exists() {
            issue(&ca, role, &name, &out)?;
        }
    }
    Ok(())
}

/// The embedded cluster: meta members and storage nodes serving until `stop` is called.
pub struct DevCluster {
    pub state: PathBuf,
    pub meta_addrs: Vec<SocketAddr>,
    token: CancellationToken,
    servers: Vec<tokio::task::JoinHandle<()>>,
}

impl DevCluster {
    /// Starts (or restarts, on an existing state directory) 3 meta members on `ip`:7001-7003
    /// and 3 storage nodes on `ip`:7101-7103, and makes sure `volume` exists. `quiet` keeps
    /// it from printing what it does.
    pub async fn start(state: &Path, ip: IpAddr, volume: &str, quiet: bool) -> Result<Self> {
        Self::start_with_latency(state, ip, volume, quiet, 0).await
    }

    /// `start`, with `inject_latency_ms` added by the nodes to every block request (tests and
    /// benchmarks only: it stands in for the distance to remote storage).
    pub async fn start_with_latency(
        state: &Path,
        ip: IpAddr,
        volume: &str,
        quiet: bool,
        inject_latency_ms: u64,
    ) -> Result<Self> {
        let say = |line: String| {
            if !quiet {
                println!("{line}");
            }
        };
        certificates(state)?;
        let token = CancellationToken::new();
        let mut servers = Vec::new();
        let meta_addr = |i: u64| SocketAddr::new(ip, 7000 + i as u16);
        let peers: std::collections::BTreeMap<u64, String> =
            (1..=MEMBERS).map(|i| (i, meta_addr(i).to_string())).collect();
        for id in 1..=MEMBERS {
            let config = MetaConfig {
                id,
                listen: meta_addr(id),
                peers: peers.clone(),
                data_dir: Some(state.join(format!("meta-{id}"))),
                tls_dir: Some(state.join(format!("tls/meta-{id}"))),
                ..Default::default()
            };
            let server = MetaServer::start(&config).with_context(|| format!("starting meta member {id}"))?;
            say(format!(
                "meta member {id} on {} (data in {})",
                server.local_addr,
                state.join(format!("meta-{id}")).display()
            ));
            servers.push(tokio::spawn(server.serve(token.clone())));
        }
        let meta_addrs: Vec<SocketAddr> = (1..=MEMBERS).map(meta_addr).collect();
        for i in 1..=NODES {
            let config = NodeConfig {
                listen: SocketAddr::new(ip, 7100 + i as u16),
                data_dir: Some(state.join(format!("node-{i}"))),
                tls_dir: Some(state.join(format!("tls/node-{i}"))),
                meta: meta_addrs.clone(),
                zone: Some(format!("zone-{i}")),
                inject_latency_ms,
                ..NodeConfig::default()
            };
            let node = Node::start(&config).with_context(|| format!("starting storage node {i}"))?;
            say(format!(
                "storage node {} on {} (data in {})",
                node.node_id,
                node.local_addr,
                state.join(format!("node-{i}")).display()
            ));
            let token = token.clone();
            servers.push(tokio::spawn(async move {
                if let Err(e) = node.serve(token).await {
                    tracing::error!(error = %e, "storage node stopped");
                }
            }));
        }
        let cluster = Self { state: state.to_path_buf(), meta_addrs, token, servers };
        let admin = meta_client(&state.join("tls/admin"), &cluster.meta_addrs)?;
        say(ensure_volume(&admin, volume).await?);
        Ok(cluster)
    }

    /// A meta client with the dev `client` certificate (what a mount uses).
    pub fn client(&self) -> Result<Arc<MetaClient>> {
        Ok(Arc::new(meta_client(&self.state.join("tls/client"), &self.meta_addrs)?))
    }

    pub async fn stop(self) {
        self.token.cancel();
        for s in self.servers {
            let _ = s.await;
        }
    }
}

pub async fn run(args: DevArgs) -> Result<()> {
    let state = match &args.state {
        Some(s) => s.clone(),
        None => default_state()?,
    };
    std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
    let state = state.canonicalize()?;
    let mountpoint = args.mountpoint.clone().unwrap_or_else(|| state.join("mnt"));
    augur_fs_client::mount::clear_stale_mount(&mountpoint);
    std::fs::create_dir_all(&mountpoint).with_context(|| format!("creating {}", mountpoint.display()))?;

    let cluster =
        DevCluster::start_with_latency(&state, args.ip, &args.volume, false, args.inject_latency_ms).await?;
    let mounted =
        augur_fs_client::mount(cluster.client()?, &args.volume, &mountpoint, args.tuning.options()).await?;

    let stop = CancellationToken::new();
    crate::cancel_on_signal(stop.clone())?;
    let meta_list = cluster.meta_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",");
    println!("try:  export AUGUR_META={meta_list} AUGUR_TLS={}", state.join("tls/admin").display());
    // The user.augur.* attributes are computed, so they are read by name, not listed (a copy
    // with `cp -a` or `rsync -X` would otherwise try to write the read-only ones).
    println!(
        "      augur cluster status; augur shards {}; getfattr -n user.augur.shards {}/FILE",
        args.volume,
        mountpoint.display()
    );
    // Tests and scripts wait for this line.
    println!(
        "augur dev: volume {} mounted on {}; Ctrl-C unmounts and stops",
        args.volume,
        mountpoint.display()
    );
    let unmounted = mounted.run_until(stop).await;
    println!("unmounted {}", mountpoint.display());
    cluster.stop().await;
    unmounted?;
    println!("stopped; state kept in {}", state.display());
    Ok(())
}

fn meta_client(tls: &Path, addrs: &[SocketAddr]) -> Result<MetaClient> {
    let rpc = Arc::new(RpcClient::new(&TlsIdentity::load(tls)?)?);
    Ok(MetaClient::new(rpc, addrs.to_vec()))
}

/// Waits for a leader and all three nodes, then creates the volume unless it exists; says
/// which it did.
async fn ensure_volume(admin: &MetaClient, name: &str) -> Result<String> {
    let started = Instant::now();
    loop {
        let last = match admin.call(RequestBody::GetVolume { name: name.into() }).await {
            Ok(ResponseBody::Volume(v)) => {
                return Ok(format!("volume {name} found again ({} inodes)", v.inodes));
            }
            Err(e) if matches!(e.code(), Some(ErrorCode::NotFound)) => {
                let alive = match admin.call(RequestBody::ClusterStatus).await {
                    Ok(ResponseBody::Cluster(c)) => c.nodes.iter().filter(|n| n.alive).count() as u64,
                    _ => 0,
                };
                if alive >= NODES {
                    admin.call(RequestBody::CreateVolume(VolumeSpec::with_defaults(name))).await?;
                    return Ok(format!("created volume {name}: 64 KiB blocks, 3 replicas, 16 shards"));
                }
                format!("{alive} of {NODES} storage nodes registered")
            }
            Ok(other) => format!("unexpected answer {other:?}"),
            Err(e) => e.to_string(),
        };
        if started.elapsed() > READY_WITHIN {
            bail!("the dev cluster did not come up within {READY_WITHIN:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
