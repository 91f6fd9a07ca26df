//! `augur node status`.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Result, bail};
use augur_proto::msg::{RequestBody, ResponseBody};
use augur_proto::{RpcClient, TlsIdentity};

pub async fn node_status(node: SocketAddr, tls: &Path, json: bool) -> Result<()> {
    let identity = TlsIdentity::load(tls)?;
    let client = RpcClient::new(&identity)?;
    let ResponseBody::NodeStatus(status) = client.call(node, RequestBody::NodeStatus).await? else {
        bail!("{node} answered NodeStatus with another response");
    };
    client.close().await;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!("node        {} (augur {})", status.node, status.version);
    println!("listen      {}", status.listen);
    println!("uptime      {} s", status.uptime_s);
    println!(
        "disk        {:.1} MiB used by blocks, {:.1} MiB free of {:.1} MiB",
        mib(status.used_bytes),
        mib(status.free_bytes),
        mib(status.capacity_bytes)
    );
    println!("blocks      ~{}", status.blocks_estimate);
    if status.store_stopped {
        println!("store       STOPPED: the disk filled; writes are refused until it has room again");
    }
    println!(
        "cache       {:.1} / {:.1} MiB, {} hits, {} misses",
        mib(status.cache_bytes),
        mib(status.cache_bytes_max),
        status.cache_hits,
        status.cache_misses
    );
    println!(
        "repairs     {} damaged copies repaired from another replica, {} unrepairable",
        status.repairs_done, status.repairs_failed
    );
    println!("scrub       {} passes done, {} damaged copies found", status.scrub_passes, status.scrub_found);
    println!("shards      {}", status.shards.len());
    for s in &status.shards {
        let role = if s.is_primary { "primary" } else { "backup" };
        println!("  {}/{} {} {role}", s.volume, s.shard, s.epoch);
    }
    Ok(())
}
