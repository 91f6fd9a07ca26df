//! `augur dev`: a self-contained cluster under one state directory. For now one storage node
//! with a block round trip; the meta group and the mounted volume join it as they land.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use augur_proto::msg::{BlockRead, Replica, RequestBody, ResponseBody, ShardPlacement, VolumeLayout};
use augur_proto::tls::{CA_CERT_FILE, init_ca, issue};
use augur_proto::{BlockId, Epoch, Ino, Role, RpcClient, ShardId, ShardRef, TlsIdentity, VolumeId};
use augur_storage_node::{Node, NodeConfig};
use clap::Args;
use serde_bytes::ByteBuf;
use tokio_util::sync::CancellationToken;

#[derive(Args)]
pub struct DevArgs {
    /// State directory (certificates, node data) [default: $HOME/.local/share/augur/dev].
    #[arg(long)]
    state: Option<PathBuf>,
    /// Address of the dev storage node.
    #[arg(long, default_value = "127.0.0.1:7100")]
    listen: SocketAddr,
}

const DEV_VOLUME: VolumeId = VolumeId(1);
const DEV_BLOCK_BYTES: u32 = 64 * 1024;
/// The block that carries the greeting left by the previous run.
const GREETING: BlockId = BlockId { ino: Ino(1), index: 0 };

fn default_state() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set; pass --state DIR")?;
    Ok(PathBuf::from(home).join(".local/share/augur/dev"))
}

pub async fn run(args: DevArgs) -> Result<()> {
    let state = match args.state {
        Some(s) => s,
        None => default_state()?,
    };
    std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
    let ca = state.join("ca");
    if !ca.join(CA_CERT_FILE).exists() {
        init_ca(&ca, "augur-dev")?;
        issue(&ca, Role::Node, "node-1", &state.join("tls/node-1"))?;
        issue(&ca, Role::Admin, "dev-admin", &state.join("tls/admin"))?;
        println!("created cluster CA and certificates in {}", state.display());
    }
    let config = NodeConfig {
        listen: args.listen,
        data_dir: Some(state.join("node-1")),
        tls_dir: Some(state.join("tls/node-1")),
        ..NodeConfig::default()
    };
    let node = Node::start(&config)?;
    let addr = node.local_addr;
    let me = node.node_id;
    println!("storage node {me} serving on {addr} (data in {})", state.join("node-1").display());
    let shutdown = CancellationToken::new();
    crate::cancel_on_signal(shutdown.clone())?;
    let server = tokio::spawn(node.serve(shutdown.clone()));

    let client = RpcClient::new(&TlsIdentity::load(&state.join("tls/admin"))?)?;
    let placement = ShardPlacement {
        shard: ShardId(0),
        epoch: Epoch(1),
        replicas: vec![Replica { node: me, addr: addr.to_string() }],
    };
    let layout = VolumeLayout { volume: DEV_VOLUME, block_size_bytes: DEV_BLOCK_BYTES };
    client.call(addr, RequestBody::SetPlacement { layout, shards: vec![placement] }).await?;
    let shard = ShardRef { volume: DEV_VOLUME, shard: ShardId(0), epoch: Epoch(1) };

    let read = BlockRead { shard, block: GREETING, range: None };
    let ResponseBody::Block(previous) = client.call(addr, RequestBody::ReadBlock { read }).await? else {
        bail!("unexpected answer to a block read");
    };
    if crc32fast::hash(&previous.data) != previous.crc32 {
        bail!("greeting block failed its checksum in transit");
    }
    match previous.data.is_empty() {
        true => println!("no greeting yet: this is a fresh state directory"),
        false => println!("read back over QUIC: {:?}", String::from_utf8_lossy(&previous.data)),
    }
    let greeting = format!(
        "written by augur dev (pid {}) at unix time {}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs()
    );
    let write =
        RequestBody::WriteBlock { shard, block: GREETING, offset: 0, data: ByteBuf::from(greeting.clone()) };
    client.call(addr, write).await?;
    println!("wrote {greeting:?} (durable before the ack); restart `augur dev` to read it back");
    println!(
        "try: augur node status --node {addr} --tls {}\nCtrl-C stops the node cleanly.",
        state.join("tls/admin").display()
    );
    client.close().await;

    server.await??;
    println!("stopped; state kept in {}", state.display());
    Ok(())
}
