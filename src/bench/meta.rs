//! `augur bench meta`: namespace operations per second (create, stat, rename, 32 in flight)
//! and commit latency (one create at a time, p50/p99) on a 1-member and a 3-member group,
//! side by side in one run, with the 3/1 ratios. Members and a storage node run in this
//! process over real QUIC + mutual TLS on loopback, with their real Raft logs and RocksDB.

use std::sync::Arc;
use std::time::{Duration, Instant};

use augur_meta::{MetaClient, MetaConfig, MetaServer};
use augur_proto::meta::{NsOp, NsReply, ROOT_INO, VolumeSpec};
use augur_proto::msg::{RequestBody, ResponseBody};
use augur_proto::tls::{init_ca, issue};
use augur_proto::{Ino, Role, RpcClient, TlsIdentity};
use augur_storage_node::{Node, NodeConfig};
use serde::Serialize;
use serde_bytes::ByteBuf;
use tokio_util::sync::CancellationToken;

use super::node::{drive, median, percentile_us};

#[derive(Clone, Copy, Debug)]
pub struct BenchOptions {
    pub runs: u32,
    pub ops: u32,
    pub samples: u32,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Figures {
    pub create_ops_s: f64,
    pub stat_ops_s: f64,
    pub rename_ops_s: f64,
    pub commit_us_p50: f64,
    pub commit_us_p99: f64,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub runs: u32,
    pub ops_per_run: u32,
    pub latency_samples: u32,
    pub one_member: Figures,
    pub three_members: Figures,
    /// three / one (throughput: below 1 is slower; latency: above 1 is slower).
    pub ratio: Figures,
    pub per_run: Vec<(Figures, Figures)>,
}

impl BenchReport {
    pub fn table(&self) -> String {
        let mut out = format!(
            "augur bench meta: {} runs x {} ops (32 in flight), {} sequential commits; medians\n",
            self.runs, self.ops_per_run, self.latency_samples
        );
        out += &format!("{:<24}{:>12}{:>12}{:>10}\n", "metric", "1 member", "3 members", "ratio");
        let (a, b, r) = (&self.one_member, &self.three_members, &self.ratio);
        for (name, x, y, z) in [
            ("create (ops/s)", a.create_ops_s, b.create_ops_s, r.create_ops_s),
            ("stat (ops/s)", a.stat_ops_s, b.stat_ops_s, r.stat_ops_s),
            ("rename (ops/s)", a.rename_ops_s, b.rename_ops_s, r.rename_ops_s),
            ("commit p50 (us)", a.commit_us_p50, b.commit_us_p50, r.commit_us_p50),
            ("commit p99 (us)", a.commit_us_p99, b.commit_us_p99, r.commit_us_p99),
        ] {
            out += &format!("{name:<24}{x:>12.1}{y:>12.1}{z:>10.2}\n");
        }
        out
    }
}

fn file(i: u64, prefix: &str) -> ByteBuf {
    ByteBuf::from(format!("{prefix}{i:08}").into_bytes())
}

/// Starts a group of `members` members and one storage node; returns a client and the
/// shutdown token. Ports are picked by address: 127.0.9.<n>.
async fn start_group(
    dir: &std::path::Path,
    members: u64,
    base: u8,
) -> anyhow::Result<(Arc<MetaClient>, CancellationToken)> {
    let ca = dir.join("ca");
    if !ca.exists() {
        init_ca(&ca, "bench")?;
        issue(&ca, Role::Meta, "meta", &dir.join("meta"))?;
        issue(&ca, Role::Node, "node", &dir.join("node"))?;
        issue(&ca, Role::Admin, "admin", &dir.join("admin"))?;
    }
    let shutdown = CancellationToken::new();
    let addr = |i: u64| format!("127.0.9.{}:7000", u64::from(base) + i);
    let peers: std::collections::BTreeMap<u64, String> = (1..=members).map(|i| (i, addr(i))).collect();
    let mut meta_addrs = Vec::new();
    for id in 1..=members {
        let config = MetaConfig {
            id,
            listen: addr(id).parse()?,
            peers: peers.clone(),
            data_dir: Some(dir.join(format!("m{base}-{id}"))),
            tls_dir: Some(dir.join("meta")),
            ..Default::default()
        };
        let server = MetaServer::start(&config)?;
        meta_addrs.push(server.local_addr);
        tokio::spawn(server.serve(shutdown.clone()));
    }
    let node_config = NodeConfig {
        listen: format!("127.0.9.{}:0", base + 9).parse()?,
        data_dir: Some(dir.join(format!("n{base}"))),
        tls_dir: Some(dir.join("node")),
        meta: meta_addrs.clone(),
        ..Default::default()
    };
    let node = Node::start(&node_config)?;
    tokio::spawn(node.serve(shutdown.clone()));
    let rpc = Arc::new(RpcClient::new(&TlsIdentity::load(&dir.join("admin"))?)?);
    let client = Arc::new(MetaClient::new(rpc, meta_addrs));
    // Wait for a leader and the node's registration, then make the volume.
    let started = Instant::now();
    loop {
        let spec = VolumeSpec { replicas: 1, shard_count: 1, ..VolumeSpec::with_defaults("bench") };
        match client.call(RequestBody::CreateVolume(spec)).await {
            Ok(_) => break,
            Err(e) if started.elapsed() < Duration::from_secs(30) => {
                tracing::debug!(error = %e, "waiting for the group to be ready");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => anyhow::bail!("benchmark group never became ready: {e}"),
        }
    }
    Ok((client, shutdown))
}

async fn measure(client: &Arc<MetaClient>, o: BenchOptions, run: u32) -> anyhow::Result<Figures> {
    let vol = match client.call(RequestBody::GetVolume { name: "bench".into() }).await? {
        ResponseBody::Volume(v) => v.id,
        other => anyhow::bail!("unexpected {other:?}"),
    };
    let prefix = format!("r{run}-");
    let mk = |name: ByteBuf| NsOp::create_file(ROOT_INO, name.into_vec(), 0o644);
    let n = u64::from(o.ops);
    let inos = Arc::new(std::sync::Mutex::new(vec![Ino(0); n as usize]));
    let t = Instant::now();
    drive(n, |i| {
        let (client, inos, op) = (client.clone(), inos.clone(), mk(file(i, &prefix)));
        async move {
            match client.ns(vol, op).await? {
                NsReply::Attr(a) => inos.lock().unwrap()[i as usize] = a.ino,
                other => anyhow::bail!("create answered {other:?}"),
            }
            Ok(())
        }
    })
    .await?;
    let create_ops_s = n as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    drive(n, |i| {
        let (client, ino) = (client.clone(), inos.lock().unwrap()[i as usize]);
        async move {
            client.ns(vol, NsOp::GetAttr { ino }).await?;
            Ok(())
        }
    })
    .await?;
    let stat_ops_s = n as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    drive(n, |i| {
        let client = client.clone();
        let (from, to) = (file(i, &prefix), file(i, &format!("{prefix}moved-")));
        async move {
            let op = NsOp::Rename {
                parent: ROOT_INO,
                name: from,
                new_parent: ROOT_INO,
                new_name: to,
                no_replace: false,
                exchange: false,
            };
            client.ns(vol, op).await?;
            Ok(())
        }
    })
    .await?;
    let rename_ops_s = n as f64 / t.elapsed().as_secs_f64();
    let mut lat = Vec::with_capacity(o.samples as usize);
    for i in 0..u64::from(o.samples) {
        let t = Instant::now();
        client.ns(vol, mk(file(i, &format!("{prefix}seq-")))).await?;
        lat.push(t.elapsed().as_nanos() as u64);
    }
    lat.sort_unstable();
    Ok(Figures {
        create_ops_s,
        stat_ops_s,
        rename_ops_s,
        commit_us_p50: percentile_us(&lat, 0.5),
        commit_us_p99: percentile_us(&lat, 0.99),
    })
}

fn medians(v: &[Figures]) -> Figures {
    let m = |f: fn(&Figures) -> f64| median(v.iter().map(f).collect());
    Figures {
        create_ops_s: m(|f| f.create_ops_s),
        stat_ops_s: m(|f| f.stat_ops_s),
        rename_ops_s: m(|f| f.rename_ops_s),
        commit_us_p50: m(|f| f.commit_us_p50),
        commit_us_p99: m(|f| f.commit_us_p99),
    }
}

pub async fn run(o: BenchOptions) -> anyhow::Result<BenchReport> {
    let dir = tempfile::tempdir()?;
    let (one, stop_one) = start_group(dir.path(), 1, 10).await?;
    let (three, stop_three) = start_group(dir.path(), 3, 20).await?;
    let mut per_run = Vec::new();
    for run in 0..o.runs {
        // Alternate the order so neither side always runs on a warmer machine.
        let (a, b) = if run % 2 == 0 {
            let a = measure(&one, o, run).await?;
            (a, measure(&three, o, run).await?)
        } else {
            let b = measure(&three, o, run).await?;
            (measure(&one, o, run).await?, b)
        };
        eprintln!("run {}: 1 member {a:?}\n       3 members {b:?}", run + 1);
        per_run.push((a, b));
    }
    stop_one.cancel();
    stop_three.cancel();
    let one_member = medians(&per_run.iter().map(|p| p.0).collect::<Vec<_>>());
    let three_members = medians(&per_run.iter().map(|p| p.1).collect::<Vec<_>>());
    let ratio = Figures {
        create_ops_s: three_members.create_ops_s / one_member.create_ops_s,
        stat_ops_s: three_members.stat_ops_s / one_member.stat_ops_s,
        rename_ops_s: three_members.rename_ops_s / one_member.rename_ops_s,
        commit_us_p50: three_members.commit_us_p50 / one_member.commit_us_p50,
        commit_us_p99: three_members.commit_us_p99 / one_member.commit_us_p99,
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(BenchReport {
        runs: o.runs,
        ops_per_run: o.ops,
        latency_samples: o.samples,
        one_member,
        three_members,
        ratio,
        per_run,
    })
}
