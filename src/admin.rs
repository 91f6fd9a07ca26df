//! Client commands against the meta group: `meta status|add-member|remove-member`, `volume`,
//! `shards`, `hint`, `prefetch`, `cluster status`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use augur_meta::{MetaClient, parse_addrs};
use augur_proto::meta::{MetaStatus, VolumeInfo, VolumeSpec};
use augur_proto::msg::{RequestBody, ResponseBody};
use augur_proto::{RpcClient, ShardId, TlsIdentity};
use clap::{Args, Subcommand};

/// How to reach the meta group.
#[derive(Args, Clone)]
pub struct MetaArgs {
    /// Meta member addresses, comma-separated (any member; requests find the leader).
    #[arg(long, env = "AUGUR_META", value_parser = parse_meta, default_value = "127.0.0.1:7000")]
    pub meta: Addrs,
    /// Directory with this caller's certificate (`client` for reads and hints, `admin` to
    /// create/delete volumes, move shards and change members).
    #[arg(long, env = "AUGUR_TLS")]
    pub tls: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Debug)]
pub struct Addrs(pub Vec<SocketAddr>);

fn parse_meta(s: &str) -> Result<Addrs, String> {
    parse_addrs(s).map(Addrs)
}

impl MetaArgs {
    pub fn client(&self) -> Result<MetaClient> {
        let identity = TlsIdentity::load(&self.tls)?;
        let rpc = Arc::new(RpcClient::new(&identity)?);
        Ok(MetaClient::new(rpc, self.meta.0.clone()))
    }
}

#[derive(Subcommand)]
pub enum VolumeCommand {
    /// Create a volume; its shards are placed on live storage nodes at once.
    Create {
        name: String,
        /// Block size in bytes: a power of two from 4096 to 4194304.
        #[arg(long, default_value_t = 64 * 1024)]
        block_size: u32,
        /// Replicas per shard (distinct nodes; 1 for a single-node setup).
        #[arg(long, default_value_t = 3)]
        replicas: u8,
        /// Shards (a power of two up to 4096).
        #[arg(long, default_value_t = 16)]
        shards: u32,
        /// Consecutive blocks of a file that stay in one shard.
        #[arg(long, default_value_t = 16)]
        stripe_unit: u32,
        #[command(flatten)]
        meta: MetaArgs,
    },
    /// List volumes.
    List {
        #[command(flatten)]
        meta: MetaArgs,
    },
    /// Show one volume.
    Info {
        name: String,
        #[command(flatten)]
        meta: MetaArgs,
    },
    /// Delete a volume and its namespace (its blocks are not reclaimed from nodes yet).
    Delete {
        name: String,
        #[command(flatten)]
        meta: MetaArgs,
    },
}

#[derive(Subcommand)]
pub enum MetaAdminCommand {
    /// Each member's view: role, term, commit and applied index, members.
    Status {
        #[command(flatten)]
        meta: MetaArgs,
    },
    /// Add a voting member. Start it first with `augur meta serve --join --id ID`.
    AddMember {
        #[arg(long)]
        id: u64,
        /// The new member's QUIC address.
        #[arg(long)]
        addr: SocketAddr,
        #[command(flatten)]
        meta: MetaArgs,
    },
    /// Remove a member (the leader hands over leadership first if it is the one removed).
    RemoveMember {
        #[arg(long)]
        id: u64,
        #[command(flatten)]
        meta: MetaArgs,
    },
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn print_volume(v: &VolumeInfo) {
    println!(
        "{:<20} {:<8} block {:>8} B  replicas {}  shards {:>4}  stripe {:>4}  inodes {:>8}  prefetch {}{}",
        v.name,
        v.id.to_string(),
        v.block_size_bytes,
        v.replicas,
        v.shard_count,
        v.stripe_unit_blocks,
        v.inodes,
        v.hints.prefetch,
        v.hints.filetype.map(|t| format!("  filetype {t}")).unwrap_or_default()
    );
}

async fn expect_volume(client: &MetaClient, body: RequestBody) -> Result<VolumeInfo> {
    match client.call(body).await? {
        ResponseBody::Volume(v) => Ok(*v),
        other => bail!("unexpected answer: {other:?}"),
    }
}

pub async fn volume(cmd: VolumeCommand) -> Result<()> {
    match cmd {
        VolumeCommand::Create { name, block_size, replicas, shards, stripe_unit, meta } => {
            let spec = VolumeSpec {
                name,
                block_size_bytes: block_size,
                replicas,
                shard_count: shards,
                stripe_unit_blocks: stripe_unit,
            };
            spec.validate().map_err(anyhow::Error::msg)?;
            let v = expect_volume(&meta.client()?, RequestBody::CreateVolume(spec)).await?;
            if meta.json { print_json(&v)? } else { print_volume(&v) }
        }
        VolumeCommand::List { meta } => {
            let ResponseBody::Volumes(list) = meta.client()?.call(RequestBody::ListVolumes).await? else {
                bail!("unexpected answer to ListVolumes");
            };
            if meta.json { print_json(&list)? } else { list.iter().for_each(print_volume) }
        }
        VolumeCommand::Info { name, meta } => {
            let v = expect_volume(&meta.client()?, RequestBody::GetVolume { name }).await?;
            if meta.json { print_json(&v)? } else { print_volume(&v) }
        }
        VolumeCommand::Delete { name, meta } => {
            meta.client()?.call(RequestBody::DeleteVolume { name: name.clone() }).await?;
            println!("deleted volume {name}");
        }
    }
    Ok(())
}

pub async fn shards(volume: String, explain: bool, meta: MetaArgs) -> Result<()> {
    let ResponseBody::Sharding(info) =
        meta.client()?.call(RequestBody::GetVolumeShardingInfo { volume }).await?
    else {
        bail!("unexpected answer to GetVolumeShardingInfo");
    };
    if meta.json {
        return print_json(&info);
    }
    print_volume(&info.volume);
    for (p, why) in info.shards.iter().zip(&info.explain) {
        if explain {
            println!("  {why}");
        } else {
            let replicas: Vec<String> = p.replicas.iter().map(|r| format!("{}@{}", r.node, r.addr)).collect();
            println!("  {:<10} {:<5} {}", p.shard.to_string(), p.epoch.to_string(), replicas.join(" "));
        }
    }
    Ok(())
}

pub async fn hint(volume: String, hint_type: String, value: String, meta: MetaArgs) -> Result<()> {
    let body = RequestBody::SetPrefetchHint { volume, hint_type, hint_value: value };
    let v = expect_volume(&meta.client()?, body).await?;
    if meta.json {
        print_json(&v)
    } else {
        print_volume(&v);
        Ok(())
    }
}

/// `augur prefetch`: what to warm, as given on the command line.
#[derive(Debug, PartialEq)]
enum Target {
    /// Blocks `first..=last` of an inode; `last` None: to the end of the file.
    Blocks { ino: u64, first: u64, last: Option<u64> },
    /// A file on a mount of the volume: all of it.
    Path(PathBuf),
}

fn parse_target(s: &str) -> Result<Target> {
    let bad = || {
        anyhow::anyhow!(
            "bad target {s:?}: give INO, INO:INDEX, INO:FIRST-LAST (block indexes, inclusive) or the path \
             of a file on a mount"
        )
    };
    if s.contains('/') || !s.starts_with(|c: char| c.is_ascii_digit()) {
        return if std::path::Path::new(s).exists() { Ok(Target::Path(s.into())) } else { Err(bad()) };
    }
    let num = |t: &str| t.parse::<u64>().map_err(|_| bad());
    Ok(match s.split_once(':') {
        None => Target::Blocks { ino: num(s)?, first: 0, last: None },
        Some((ino, range)) => {
            let (first, last) = match range.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None => (num(range)?, num(range)?),
            };
            if first > last {
                return Err(bad());
            }
            Target::Blocks { ino: num(ino)?, first, last: Some(last) }
        }
    })
}

/// Blocks `PrefetchData` asks for in one run at most.
const PREFETCH_BLOCKS_MAX: u64 = 1 << 20;

/// `PrefetchData(volume, blocks)`: the storage nodes holding the blocks load them into memory.
pub async fn prefetch(volume: String, targets: Vec<String>, meta: MetaArgs) -> Result<()> {
    use augur_proto::meta::{NsOp, NsReply};
    use augur_proto::{BlockId, Ino};
    let targets: Vec<Target> = targets.iter().map(|t| parse_target(t)).collect::<Result<_>>()?;
    let client = Arc::new(meta.client()?);
    let blocks = augur_fs_client::blocks::BlockClient::open(client.clone(), client.rpc().clone(), &volume)
        .await
        .with_context(|| format!("opening volume {volume}"))?;
    let block_bytes = u64::from(blocks.volume.block_size_bytes);
    let mut ids = Vec::new();
    for t in targets {
        // Block indexes first..end.
        let (ino, first, end) = match t {
            Target::Blocks { ino, first, last: Some(last) } => (ino, first, last.saturating_add(1)),
            Target::Blocks { ino, first, last: None } => {
                let size = match client.ns(blocks.volume.id, NsOp::GetAttr { ino: Ino(ino) }).await {
                    Ok(NsReply::Attr(a)) => a.size,
                    Ok(other) => bail!("inode {ino}: meta answered {other:?}"),
                    Err(e) => bail!("inode {ino} of volume {volume}: {e}"),
                };
                (ino, first, size.div_ceil(block_bytes))
            }
            Target::Path(p) => {
                use std::os::unix::fs::MetadataExt;
                let m = std::fs::metadata(&p).with_context(|| format!("{}", p.display()))?;
                if !m.is_file() {
                    bail!("{} is not a regular file", p.display());
                }
                (m.ino(), 0, m.size().div_ceil(block_bytes))
            }
        };
        if (ids.len() as u64).saturating_add(end.saturating_sub(first)) > PREFETCH_BLOCKS_MAX {
            bail!("more than {PREFETCH_BLOCKS_MAX} blocks asked for; warm in parts");
        }
        ids.extend((first..end).map(|i| BlockId::new(Ino(ino), i)));
    }
    let report = blocks.warm(&ids).await;
    let loaded: u64 = report.loaded.values().sum();
    if meta.json {
        print_json(&serde_json::json!({
            "volume": volume, "blocks": ids.len(), "loaded": report.loaded, "errors": report.errors,
        }))?;
    } else {
        println!("asked for {} blocks of {volume}; replicas loaded {loaded}", ids.len());
        for (node, n) in &report.loaded {
            println!("  {node}: {n}");
        }
        for e in &report.errors {
            println!("  failed: {e}");
        }
    }
    if !report.errors.is_empty() && loaded == 0 {
        bail!("nothing was loaded: {}", report.errors.join("; "));
    }
    Ok(())
}

pub async fn move_shard(volume: String, shard: u32, nodes: Vec<u64>, meta: MetaArgs) -> Result<()> {
    let nodes = nodes.into_iter().map(augur_proto::NodeId).collect();
    meta.client()?.call(RequestBody::SetShardReplicas { volume, shard: ShardId(shard), nodes }).await?;
    println!("placement changed");
    Ok(())
}

fn print_member(s: &MetaStatus) {
    println!(
        "member {} at {}: {} (term {}, commit {}, applied {}, log {}..{}), leader {}",
        s.id,
        s.addr,
        s.role,
        s.term,
        s.commit,
        s.applied,
        s.first_index,
        s.last_index,
        s.leader.map(|l| l.to_string()).unwrap_or_else(|| "unknown".into())
    );
}

pub async fn meta_admin(cmd: MetaAdminCommand) -> Result<()> {
    match cmd {
        MetaAdminCommand::Status { meta } => {
            let identity = TlsIdentity::load(&meta.tls)?;
            let rpc = RpcClient::new(&identity)?;
            let mut views = Vec::new();
            for addr in &meta.meta.0 {
                match rpc.call(*addr, RequestBody::MetaStatus).await {
                    Ok(ResponseBody::MetaStatus(s)) => views.push(serde_json::to_value(&*s)?),
                    Ok(other) => bail!("{addr} answered MetaStatus with {other:?}"),
                    Err(e) => {
                        views.push(serde_json::json!({ "addr": addr.to_string(), "error": e.to_string() }))
                    }
                }
            }
            if meta.json {
                return print_json(&views);
            }
            for v in views {
                match serde_json::from_value::<MetaStatus>(v.clone()) {
                    Ok(s) => {
                        print_member(&s);
                        for m in &s.members {
                            println!(
                                "    {} {} {}{}",
                                m.id,
                                m.addr,
                                if m.voter { "voter" } else { "learner" },
                                m.matched.map(|x| format!(" matched {x}")).unwrap_or_default()
                            );
                        }
                    }
                    Err(_) => println!("{}: unreachable: {}", v["addr"], v["error"]),
                }
            }
        }
        MetaAdminCommand::AddMember { id, addr, meta } => {
            meta.client()?.call(RequestBody::AddMember { id, addr: addr.to_string() }).await?;
            println!("member {id} at {addr} added");
        }
        MetaAdminCommand::RemoveMember { id, meta } => {
            meta.client()?.call(RequestBody::RemoveMember { id }).await?;
            println!("member {id} removed");
        }
    }
    Ok(())
}

pub async fn cluster_status(meta: MetaArgs) -> Result<()> {
    let ResponseBody::Cluster(c) =
        meta.client()?.call(RequestBody::ClusterStatus).await.context("cluster status")?
    else {
        bail!("unexpected answer to ClusterStatus");
    };
    if meta.json {
        return print_json(&c);
    }
    print_member(&c.meta);
    println!("storage nodes: {}", c.nodes.len());
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    for n in &c.nodes {
        println!(
            "  {:<22} {:<22} {:<5} {:<6} {:>7.1}/{:>7.1} GiB used  {:>6} iops  {:>4} shards{}",
            n.node.to_string(),
            n.addr,
            if n.alive { "up" } else { "DOWN" },
            n.perf_class.to_string(),
            gib(n.used_bytes),
            gib(n.capacity_bytes),
            n.iops,
            n.shards,
            n.zone.as_deref().map(|z| format!("  zone {z}")).unwrap_or_default()
        );
    }
    println!("volumes: {}", c.volumes.len());
    c.volumes.iter().for_each(print_volume);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_targets_parse_and_bad_ones_are_named() {
        assert_eq!(parse_target("7").unwrap(), Target::Blocks { ino: 7, first: 0, last: None });
        assert_eq!(parse_target("7:3").unwrap(), Target::Blocks { ino: 7, first: 3, last: Some(3) });
        assert_eq!(parse_target("7:3-9").unwrap(), Target::Blocks { ino: 7, first: 3, last: Some(9) });
        assert_eq!(parse_target("/").unwrap(), Target::Path("/".into()));
        for bad in ["7:9-3", "7:x", "x:1", "7:1-", "/nonexistent/file", "nosuchfile"] {
            let e = parse_target(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }
}
