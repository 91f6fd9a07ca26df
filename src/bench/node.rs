//! `augur bench node`: the same block operations over QUIC (a real node on loopback, mutual
//! TLS) and on the RocksDB store in-process, side by side in one run, with ratios.
//!
//! Both sides read from RocksDB: the node's memory cache is off, so the ratio is the cost of
//! the network path (QUIC, TLS, framing, RPC dispatch), not of caching.

use std::sync::Arc;
use std::time::{Duration, Instant};

use augur_proto::msg::{BlockRead, ByteRange, Replica, RequestBody, ShardPlacement, VolumeLayout};
use augur_proto::rpc::RpcClient;
use augur_proto::tls::{init_ca, issue};
use augur_proto::{BlockId, Epoch, Ino, Role, ShardId, ShardRef, TlsIdentity, VolumeId};
use serde::Serialize;
use serde_bytes::ByteBuf;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use augur_storage_node::store::{BlockStore, StoreOptions};
use augur_storage_node::{Node, NodeConfig};

const BLOCK_BYTES: u32 = 64 * 1024;
const SMALL_READ_BYTES: u32 = 4 * 1024;
const SHARDS: u32 = 16;
/// Requests in flight during the throughput phases, on both sides.
const CONCURRENCY: usize = 32;

#[derive(Clone, Copy, Debug)]
pub struct BenchOptions {
    pub runs: u32,
    pub blocks: u32,
    pub samples: u32,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Figures {
    pub write_mib_s: f64,
    pub read_mib_s: f64,
    pub read_4k_us_p50: f64,
    pub read_4k_us_p99: f64,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub runs: u32,
    pub blocks_per_run: u32,
    pub block_bytes: u32,
    pub concurrency: usize,
    /// Medians over the runs.
    pub quic: Figures,
    pub in_process: Figures,
    /// quic / in-process for each figure (throughput: below 1 is slower; latency: above 1 is slower).
    pub ratio: Figures,
    pub per_run: Vec<(Figures, Figures)>,
}

impl BenchReport {
    pub fn table(&self) -> String {
        let row = |name: &str, q: f64, l: f64, r: f64| format!("{name:<26}{q:>12.1}{l:>14.1}{r:>10.2}\n");
        let mut out = format!(
            "augur bench node: {} runs x {} blocks of {} KiB, {} in flight; medians\n",
            self.runs,
            self.blocks_per_run,
            self.block_bytes / 1024,
            self.concurrency
        );
        out += &format!("{:<26}{:>12}{:>14}{:>10}\n", "metric", "quic", "in-process", "ratio");
        out += &row(
            "write 64 KiB (MiB/s)",
            self.quic.write_mib_s,
            self.in_process.write_mib_s,
            self.ratio.write_mib_s,
        );
        out += &row(
            "read 64 KiB (MiB/s)",
            self.quic.read_mib_s,
            self.in_process.read_mib_s,
            self.ratio.read_mib_s,
        );
        out += &row(
            "read 4 KiB p50 (us)",
            self.quic.read_4k_us_p50,
            self.in_process.read_4k_us_p50,
            self.ratio.read_4k_us_p50,
        );
        out += &row(
            "read 4 KiB p99 (us)",
            self.quic.read_4k_us_p99,
            self.in_process.read_4k_us_p99,
            self.ratio.read_4k_us_p99,
        );
        out
    }
}

fn shard_ref(index: u64) -> ShardRef {
    ShardRef { volume: VolumeId(1), shard: ShardId((index % u64::from(SHARDS)) as u32), epoch: Epoch(1) }
}

fn block_payload(index: u64) -> Vec<u8> {
    let mut data = vec![0u8; BLOCK_BYTES as usize];
    for (i, chunk) in data.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64).to_le_bytes());
    }
    data
}

/// A small deterministic generator for the random read offsets (same sequence on both sides).
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn mib_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64().max(1e-9)
}

pub(crate) fn percentile_us(sorted_ns: &[u64], p: f64) -> f64 {
    if sorted_ns.is_empty() {
        return 0.0;
    }
    let i = ((sorted_ns.len() - 1) as f64 * p).round() as usize;
    sorted_ns[i] as f64 / 1000.0
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `op(i)` for i in 0..n with at most `CONCURRENCY` in flight.
pub(crate) async fn drive<F, Fut>(n: u64, op: F) -> anyhow::Result<()>
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut set = JoinSet::new();
    for i in 0..n {
        if set.len() >= CONCURRENCY {
            set.join_next().await.expect("set is not empty")??;
        }
        set.spawn(op(i));
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

async fn run_quic(
    dir: &std::path::Path,
    tls: &std::path::Path,
    client_tls: &TlsIdentity,
    o: BenchOptions,
) -> anyhow::Result<Figures> {
    let config = NodeConfig {
        listen: "127.0.0.1:0".parse()?,
        data_dir: Some(dir.to_path_buf()),
        tls_dir: Some(tls.to_path_buf()),
        cache_bytes_max: 0,
        reserve_bytes: 0,
        ..NodeConfig::default()
    };
    let node = Node::start(&config)?;
    let addr = node.local_addr;
    let me = node.node_id;
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(node.serve(shutdown.clone()));
    let client = Arc::new(RpcClient::new(client_tls)?);
    let admin_shards = (0..SHARDS)
        .map(|s| ShardPlacement {
            shard: ShardId(s),
            epoch: Epoch(1),
            replicas: vec![Replica { node: me, addr: addr.to_string() }],
        })
        .collect();
    // The bench's client holds an admin certificate so it can also set placement.
    client
        .call(
            addr,
            RequestBody::SetPlacement {
                layout: VolumeLayout { volume: VolumeId(1), block_size_bytes: BLOCK_BYTES },
                shards: admin_shards,
            },
        )
        .await?;

    let n = u64::from(o.blocks);
    let started = Instant::now();
    drive(n, |i| {
        let client = client.clone();
        async move {
            let body = RequestBody::WriteBlock {
                shard: shard_ref(i),
                block: BlockId::new(Ino(1), i),
                offset: 0,
                data: ByteBuf::from(block_payload(i)),
            };
            client.call(addr, body).await?;
            Ok(())
        }
    })
    .await?;
    let write_mib_s = mib_s(n * u64::from(BLOCK_BYTES), started.elapsed());

    let started = Instant::now();
    drive(n, |i| {
        let client = client.clone();
        async move {
            let read = BlockRead { shard: shard_ref(i), block: BlockId::new(Ino(1), i), range: None };
            match client.call(addr, RequestBody::ReadBlock { read }).await? {
                augur_proto::msg::ResponseBody::Block(b)
                    if b.data.len() == BLOCK_BYTES as usize && crc32fast::hash(&b.data) == b.crc32 =>
                {
                    Ok(())
                }
                other => anyhow::bail!("bad read of block {i}: {:?}", other_kind(&other)),
            }
        }
    })
    .await?;
    let read_mib_s = mib_s(n * u64::from(BLOCK_BYTES), started.elapsed());

    let mut rng = XorShift(0x5EED);
    let mut lat = Vec::with_capacity(o.samples as usize);
    for _ in 0..o.samples {
        let i = rng.next() % n;
        let offset = (rng.next() % u64::from(BLOCK_BYTES / SMALL_READ_BYTES)) as u32 * SMALL_READ_BYTES;
        let read = BlockRead {
            shard: shard_ref(i),
            block: BlockId::new(Ino(1), i),
            range: Some(ByteRange { offset, len: SMALL_READ_BYTES }),
        };
        let t = Instant::now();
        client.call(addr, RequestBody::ReadBlock { read }).await?;
        lat.push(t.elapsed().as_nanos() as u64);
    }
    lat.sort_unstable();
    client.close().await;
    shutdown.cancel();
    server.await??;
    Ok(Figures {
        write_mib_s,
        read_mib_s,
        read_4k_us_p50: percentile_us(&lat, 0.5),
        read_4k_us_p99: percentile_us(&lat, 0.99),
    })
}

fn other_kind(r: &augur_proto::msg::ResponseBody) -> String {
    match r {
        augur_proto::msg::ResponseBody::Block(b) => format!("{} bytes, crc {:08x}", b.data.len(), b.crc32),
        other => format!("{other:?}").chars().take(60).collect(),
    }
}

async fn run_local(dir: &std::path::Path, o: BenchOptions) -> anyhow::Result<Figures> {
    let store = Arc::new(BlockStore::open(dir, StoreOptions::default(), None)?);
    let n = u64::from(o.blocks);
    let started = Instant::now();
    drive(n, |i| {
        let store = store.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let s = shard_ref(i);
                store.write(s.volume, s.shard, BlockId::new(Ino(1), i), 0, &block_payload(i), BLOCK_BYTES)
            })
            .await??;
            Ok(())
        }
    })
    .await?;
    let write_mib_s = mib_s(n * u64::from(BLOCK_BYTES), started.elapsed());

    let started = Instant::now();
    drive(n, |i| {
        let store = store.clone();
        async move {
            let got = tokio::task::spawn_blocking(move || {
                let s = shard_ref(i);
                store.read(s.volume, s.shard, BlockId::new(Ino(1), i))
            })
            .await??;
            anyhow::ensure!(got.is_some_and(|b| b.data.len() == BLOCK_BYTES as usize), "block {i} missing");
            Ok(())
        }
    })
    .await?;
    let read_mib_s = mib_s(n * u64::from(BLOCK_BYTES), started.elapsed());

    let mut rng = XorShift(0x5EED);
    let mut lat = Vec::with_capacity(o.samples as usize);
    for _ in 0..o.samples {
        let i = rng.next() % n;
        let offset =
            (rng.next() % u64::from(BLOCK_BYTES / SMALL_READ_BYTES)) as usize * SMALL_READ_BYTES as usize;
        let s = shard_ref(i);
        let t = Instant::now();
        let store2 = store.clone();
        let block =
            tokio::task::spawn_blocking(move || store2.read(s.volume, s.shard, BlockId::new(Ino(1), i)))
                .await??;
        let slice = block.map(|b| b.data[offset..offset + SMALL_READ_BYTES as usize].to_vec());
        lat.push(t.elapsed().as_nanos() as u64);
        anyhow::ensure!(slice.is_some(), "block {i} missing");
    }
    lat.sort_unstable();
    Ok(Figures {
        write_mib_s,
        read_mib_s,
        read_4k_us_p50: percentile_us(&lat, 0.5),
        read_4k_us_p99: percentile_us(&lat, 0.99),
    })
}

pub async fn run(o: BenchOptions) -> anyhow::Result<BenchReport> {
    let tmp = tempfile::tempdir()?;
    let ca = tmp.path().join("ca");
    init_ca(&ca, "bench")?;
    issue(&ca, Role::Node, "bench-node", &tmp.path().join("node-tls"))?;
    issue(&ca, Role::Admin, "bench-client", &tmp.path().join("client-tls"))?;
    let client_tls = TlsIdentity::load(&tmp.path().join("client-tls"))?;
    let mut per_run = Vec::new();
    for run in 0..o.runs {
        let quic_dir = tmp.path().join(format!("quic-{run}"));
        let local_dir = tmp.path().join(format!("local-{run}"));
        // Alternate the order so neither side always runs on a warmer machine.
        let (q, l) = if run % 2 == 0 {
            let q = run_quic(&quic_dir, &tmp.path().join("node-tls"), &client_tls, o).await?;
            (q, run_local(&local_dir, o).await?)
        } else {
            let l = run_local(&local_dir, o).await?;
            (run_quic(&quic_dir, &tmp.path().join("node-tls"), &client_tls, o).await?, l)
        };
        std::fs::remove_dir_all(&quic_dir).ok();
        std::fs::remove_dir_all(&local_dir).ok();
        per_run.push((q, l));
    }
    let med = |f: fn(&Figures) -> f64, side: usize| {
        median(per_run.iter().map(|(q, l)| if side == 0 { f(q) } else { f(l) }).collect())
    };
    let fig = |side| Figures {
        write_mib_s: med(|f| f.write_mib_s, side),
        read_mib_s: med(|f| f.read_mib_s, side),
        read_4k_us_p50: med(|f| f.read_4k_us_p50, side),
        read_4k_us_p99: med(|f| f.read_4k_us_p99, side),
    };
    let (quic, in_process) = (fig(0), fig(1));
    let ratio = Figures {
        write_mib_s: quic.write_mib_s / in_process.write_mib_s,
        read_mib_s: quic.read_mib_s / in_process.read_mib_s,
        read_4k_us_p50: quic.read_4k_us_p50 / in_process.read_4k_us_p50,
        read_4k_us_p99: quic.read_4k_us_p99 / in_process.read_4k_us_p99,
    };
    Ok(BenchReport {
        runs: o.runs,
        blocks_per_run: o.blocks,
        block_bytes: BLOCK_BYTES,
        concurrency: CONCURRENCY,
        quic,
        in_process,
        ratio,
        per_run,
    })
}
