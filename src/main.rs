//! `augur`: the one binary. It parses flags and calls into the crates; the work lives there.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use augur_proto::Role;
use augur_storage_node::NodeConfig;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

mod admin;
mod bench;
mod dev;
mod mount;
mod status;
mod trace;

#[derive(Parser)]
#[command(name = "augur", version, about = "Augur: a distributed file system with a learned prefetcher")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Cluster certificates: create the CA, issue role certificates.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Storage-node daemon and its status.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Benchmarks that compare side by side in one run and print ratios.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Start a self-contained development cluster under one state directory and mount it.
    Dev(dev::DevArgs),
    /// Mount a volume as a directory (FUSE) until unmounted or SIGTERM/SIGINT.
    Mount(mount::MountArgs),
    /// Metadata group: run a member, see its status, change membership.
    #[command(subcommand)]
    Meta(MetaCommand),
    /// Volumes: create, list, info, delete.
    #[command(subcommand)]
    Volume(admin::VolumeCommand),
    /// Where a volume's shards live (replicas, primaries, epochs).
    Shards {
        volume: String,
        /// Say why each shard sits where it does.
        #[arg(long)]
        explain: bool,
        #[command(flatten)]
        meta: admin::MetaArgs,
    },
    /// Set a volume's prefetch hint: TYPE `prefetch` with auto|sequential|random|off|readahead:N,
    /// or TYPE `filetype` with image|database|other|auto.
    Hint {
        volume: String,
        #[arg(value_name = "TYPE")]
        hint_type: String,
        value: String,
        #[command(flatten)]
        meta: admin::MetaArgs,
    },
    /// Warm blocks into the memory caches of every storage node holding them (`PrefetchData`),
    /// so the next reads are served from memory. Blocks never written load nothing.
    Prefetch {
        volume: String,
        /// What to warm: INO (a whole file), INO:INDEX, INO:FIRST-LAST (block indexes,
        /// inclusive), or the path of a file on a mount of VOLUME (the whole file). At most
        /// 1 Mi blocks per run.
        #[arg(required = true, value_name = "TARGET")]
        targets: Vec<String>,
        #[command(flatten)]
        meta: admin::MetaArgs,
    },
    /// Admin: give one shard a new replica list (first = primary); its epoch increases.
    MoveShard {
        volume: String,
        shard: u32,
        /// Node ids, comma-separated, primary first.
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<u64>,
        #[command(flatten)]
        meta: admin::MetaArgs,
    },
    /// Cluster overview: meta leader, storage nodes (liveness, capacity, load), volumes.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Block I/O traces: judge the prefetch predictors on them.
    #[command(subcommand)]
    Trace(TraceCommand),
}

#[derive(Subcommand)]
enum TraceCommand {
    /// Replay traces through every predictor (simulated LRU cache and fetch latency) and print
    /// accuracy, coverage, hit ratio, over-fetch, late share and read latency side by side.
    Eval(trace::EvalArgs),
    /// Rewrite a trace in the shared CSV shape (filter reads, streams, a prefix; gzip by name).
    Convert(trace::ConvertArgs),
    /// Compute the model's input tensors from traces (NumPy .npy files + features.json), so
    /// training reads exactly what the runtime computes.
    Features(trace::FeaturesArgs),
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Show the cluster as the meta leader sees it.
    Status {
        #[command(flatten)]
        meta: admin::MetaArgs,
    },
}

#[derive(Subcommand)]
enum MetaCommand {
    /// Run a meta member until SIGTERM or SIGINT. Flags override the config file.
    Serve(MetaServeArgs),
    #[command(flatten)]
    Admin(admin::MetaAdminCommand),
}

#[derive(Args)]
struct MetaServeArgs {
    /// TOML config file (kebab-case keys as in `MetaConfig`; see ARCHITECTURE.md).
    #[arg(long)]
    config: Option<PathBuf>,
    /// This member's Raft id (non-zero, unique).
    #[arg(long)]
    id: Option<u64>,
    /// UDP address to serve QUIC on [default: 127.0.0.1:7000].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Initial members as ID=ADDR,... including this one (used to bootstrap a new group).
    #[arg(long, value_parser = parse_peers)]
    peers: Option<std::collections::BTreeMap<u64, String>>,
    /// Start empty and wait to be added with `augur meta add-member` (new or wiped member).
    #[arg(long)]
    join: bool,
    /// Directory for the Raft log and the state.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Directory with this member's certificate (role `meta`).
    #[arg(long, env = "AUGUR_TLS")]
    tls: Option<PathBuf>,
    /// Serve Prometheus metrics over HTTP on this address.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Compact the Raft log every this many applied entries [default: 10000].
    #[arg(long)]
    compact_entries: Option<u64>,
    /// Drop a storage node from its shards after this long without a heartbeat [default: 10000].
    #[arg(long)]
    node_dead_after_ms: Option<u64>,
}

fn parse_peers(s: &str) -> Result<std::collections::BTreeMap<u64, String>, String> {
    augur_meta::MetaConfig::parse_peers(s)
}

#[derive(Subcommand)]
enum CertCommand {
    /// Create a new cluster CA (ca.pem, ca-key.pem) in DIR. Refuses to overwrite one.
    Init {
        /// Directory for the CA certificate and key (the key is written mode 0600).
        #[arg(long)]
        dir: PathBuf,
        /// Cluster name written into the CA's common name.
        #[arg(long, default_value = "augur")]
        cluster: String,
    },
    /// Issue a certificate with a role, signed by the cluster CA; writes cert.pem, key.pem, ca.pem.
    Issue {
        /// Directory holding the cluster CA (from `augur cert init`).
        #[arg(long)]
        ca: PathBuf,
        /// What the holder may do: meta, node, client or admin.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// Name of the holder (letters, digits, '-', '.'), e.g. node-1.
        #[arg(long)]
        name: String,
        /// Output directory (created if missing; existing files are not overwritten).
        #[arg(long)]
        out: PathBuf,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse().map_err(|e: augur_proto::TlsError| e.to_string())
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Run a storage node until SIGTERM or SIGINT. Flags override the config file.
    Serve(Box<NodeServeArgs>),
    /// Ask a node for its status.
    Status {
        /// Node address, e.g. 127.0.0.1:7100.
        #[arg(long)]
        node: SocketAddr,
        /// Directory with this caller's certificate (any role).
        #[arg(long, env = "AUGUR_TLS")]
        tls: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct NodeServeArgs {
    /// TOML config file (kebab-case keys as in `NodeConfig`; see ARCHITECTURE.md).
    #[arg(long)]
    config: Option<PathBuf>,
    /// UDP address to serve QUIC on [default: 127.0.0.1:7100; port 0 picks one].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory for RocksDB.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Directory with this node's certificate (role `node`).
    #[arg(long, env = "AUGUR_TLS")]
    tls: Option<PathBuf>,
    /// Node id used when the data directory is first created [default: random].
    #[arg(long)]
    node_id: Option<u64>,
    /// Serve Prometheus metrics over HTTP on this address.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Memory cache for hot and warmed blocks, in bytes [default: 268435456].
    #[arg(long)]
    cache_bytes_max: Option<u64>,
    /// Meta members to register and heartbeat with, comma-separated.
    #[arg(long, env = "AUGUR_META", value_delimiter = ',')]
    meta: Vec<SocketAddr>,
    /// Failure domain (rack, host...) used to spread replicas.
    #[arg(long)]
    zone: Option<String>,
    /// Storage performance class: hdd, ssd or nvme [default: ssd].
    #[arg(long)]
    perf_class: Option<String>,
    /// Scrub: read every stored block at about this many bytes per second and repair damaged
    /// copies from other replicas; 0 turns it off [default: 16777216].
    #[arg(long)]
    scrub_bytes_per_sec: Option<u64>,
    /// Seconds between scrub passes (the first starts with the node) [default: 86400].
    #[arg(long)]
    scrub_pause_s: Option<u64>,
    /// Test/bench only: delay every block read/write by this many ms (stands in for distance).
    #[arg(long)]
    inject_latency_ms: Option<u64>,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Time per access of every predictor (the model through tract, auto, the heuristics) and
    /// of the network's step alone, on one core over a trace's reads; medians of several runs.
    Predictor {
        /// Trace whose reads drive the predictors.
        #[arg(long, default_value = "tests/data/traces/cloudphysics_excerpt.csv.gz")]
        trace: PathBuf,
        /// The ONNX model.
        #[arg(long, env = "AUGUR_MODEL", default_value = "models/prefetch.onnx")]
        model: PathBuf,
        /// Accesses timed per predictor.
        #[arg(long, default_value_t = 20_000)]
        accesses: usize,
        /// Runs over the accesses; figures are medians over them.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=100))]
        runs: u64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Prefetching end to end: a trace's reads replayed on a real mount (embedded cluster, the
    /// nodes adding LATENCY per block request) once per mode, side by side: off, model (the
    /// engine with the shipped model), heuristic (the engine's fallback alone) and sequential
    /// (fixed readahead); mean/p50/p99 read latency and each mode's ratio to off, medians of
    /// several runs.
    Prefetch {
        /// Trace whose reads are replayed (the shared CSV shape or a client trace); each stream
        /// becomes one sparse file.
        #[arg(long, default_value = "tests/data/traces/cloudphysics_excerpt.csv.gz")]
        trace: PathBuf,
        /// The ONNX model for the `model` row (it must load).
        #[arg(long, env = "AUGUR_MODEL", default_value = "models/prefetch.onnx")]
        model: PathBuf,
        /// Reads replayed: the trace's first ones.
        #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
        reads: u64,
        /// Runs over all modes; figures are medians over them.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
        runs: u32,
        /// Milliseconds every node adds to each block request (the distance to remote storage).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=1000))]
        latency_ms: u64,
        /// Microseconds the reader waits between reads (its own work).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
        think_us: u64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// File system: sequential write/read, 4 KiB random read latency (queue depth 1) and
    /// small-file create/stat/unlink, on an embedded Augur mount vs a local directory.
    Fs {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Runs to take the median of.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
        runs: u32,
        /// Size of the sequentially written and read file, in MiB.
        #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
        size_mb: u64,
        /// Random 4 KiB reads timed per run.
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(10..=1_000_000))]
        samples: u32,
        /// Empty files created, stat'ed and unlinked per run.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(10..=1_000_000))]
        files: u32,
        /// Directory to hold the local side [default: a temporary directory in /var/tmp].
        #[arg(long)]
        local: Option<PathBuf>,
        #[command(flatten)]
        tuning: mount::MountTuning,
    },
    /// Namespace ops/s (create, stat, rename) and commit latency: 1-member vs 3-member group.
    Meta {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Runs to take the median of.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
        runs: u32,
        /// Operations of each kind per run.
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(10..=1_000_000))]
        ops: u32,
        /// Sequential creates timed per run for commit latency.
        #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(10..=100_000))]
        samples: u32,
    },
    /// Block write/read throughput and 4 KiB read latency: over QUIC vs the store in-process.
    Node {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Runs to take the median of.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
        runs: u32,
        /// 64 KiB blocks written and read per run.
        #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u32).range(16..=1_000_000))]
        blocks: u32,
        /// 4 KiB reads timed per run (queue depth 1).
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(10..=1_000_000))]
        samples: u32,
    },
}

// The predictors and tract allocate small tensors on every read; mimalloc keeps that cheap.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // A log line that cannot be written (stderr on a full disk) is dropped; reporting that
        // on stderr too would panic the task that logged.
        .log_internal_errors(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("augur: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("augur: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Cert(CertCommand::Init { dir, cluster }) => {
            augur_proto::tls::init_ca(&dir, &cluster)?;
            println!("created cluster CA in {}", dir.display());
        }
        Command::Cert(CertCommand::Issue { ca, role, name, out }) => {
            augur_proto::tls::issue(&ca, role, &name, &out)?;
            println!("issued {role} certificate for {name} in {}", out.display());
        }
        Command::Node(NodeCommand::Serve(args)) => node_serve(*args).await?,
        Command::Node(NodeCommand::Status { node, tls, json }) => {
            status::node_status(node, &tls, json).await?
        }
        Command::Bench(BenchCommand::Meta { json, runs, ops, samples }) => {
            let report = bench::meta::run(bench::meta::BenchOptions { runs, ops, samples }).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.table());
            }
        }
        Command::Bench(BenchCommand::Predictor { trace, model, accesses, runs, json }) => {
            let rows = tokio::task::spawn_blocking(move || {
                bench::predictor::run(&trace, &model, accesses, runs as usize)
            })
            .await??;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", bench::predictor::table(&rows));
            }
        }
        Command::Bench(BenchCommand::Fs { json, runs, size_mb, samples, files, local, tuning }) => {
            let options = bench::fs::BenchOptions { runs, size_mb, samples, files, local, tuning };
            let report = bench::fs::run(options).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.table());
            }
        }
        Command::Bench(BenchCommand::Prefetch { trace, model, reads, runs, latency_ms, think_us, json }) => {
            let options = bench::prefetch::BenchOptions {
                trace,
                model,
                reads: reads as usize,
                runs,
                latency_ms,
                think_us,
            };
            let report = bench::prefetch::run(options).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.table());
            }
        }
        Command::Bench(BenchCommand::Node { json, runs, blocks, samples }) => {
            let options = bench::node::BenchOptions { runs, blocks, samples };
            let report = bench::node::run(options).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.table());
            }
        }
        Command::Dev(args) => dev::run(args).await?,
        Command::Mount(args) => mount::run(args).await?,
        Command::Meta(MetaCommand::Serve(args)) => meta_serve(args).await?,
        Command::Meta(MetaCommand::Admin(cmd)) => admin::meta_admin(cmd).await?,
        Command::Volume(cmd) => admin::volume(cmd).await?,
        Command::Shards { volume, explain, meta } => admin::shards(volume, explain, meta).await?,
        Command::Hint { volume, hint_type, value, meta } => {
            admin::hint(volume, hint_type, value, meta).await?
        }
        Command::Prefetch { volume, targets, meta } => admin::prefetch(volume, targets, meta).await?,
        Command::MoveShard { volume, shard, nodes, meta } => {
            admin::move_shard(volume, shard, nodes, meta).await?
        }
        Command::Cluster(ClusterCommand::Status { meta }) => admin::cluster_status(meta).await?,
        Command::Trace(TraceCommand::Eval(args)) => {
            tokio::task::spawn_blocking(move || trace::eval(args)).await??
        }
        Command::Trace(TraceCommand::Convert(args)) => {
            tokio::task::spawn_blocking(move || trace::convert(args)).await??
        }
        Command::Trace(TraceCommand::Features(args)) => {
            tokio::task::spawn_blocking(move || trace::features(args)).await??
        }
    }
    Ok(())
}

async fn node_serve(args: NodeServeArgs) -> Result<()> {
    let mut config = match &args.config {
        Some(path) => NodeConfig::from_file(path)?,
        None => NodeConfig::default(),
    };
    if let Some(v) = args.listen {
        config.listen = v;
    }
    if let Some(v) = args.data_dir {
        config.data_dir = Some(v);
    }
    if let Some(v) = args.tls {
        config.tls_dir = Some(v);
    }
    if let Some(v) = args.node_id {
        config.node_id = Some(v);
    }
    if let Some(v) = args.metrics {
        config.metrics_listen = Some(v);
    }
    if let Some(v) = args.cache_bytes_max {
        config.cache_bytes_max = v;
    }
    if !args.meta.is_empty() {
        config.meta = args.meta;
    }
    if let Some(v) = args.zone {
        config.zone = Some(v);
    }
    if let Some(v) = args.perf_class {
        config.perf_class = v;
    }
    if let Some(v) = args.inject_latency_ms {
        config.inject_latency_ms = v;
    }
    if let Some(v) = args.scrub_bytes_per_sec {
        config.scrub_bytes_per_sec = v;
    }
    if let Some(v) = args.scrub_pause_s {
        config.scrub_pause_s = v;
    }
    let node = augur_storage_node::Node::start(&config)?;
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone())?;
    // The one line on stdout: scripts and tests wait for it to know the node is ready.
    println!("augur node {} serving on {}", node.node_id, node.local_addr);
    node.serve(shutdown).await?;
    Ok(())
}

async fn meta_serve(args: MetaServeArgs) -> Result<()> {
    let mut config = match &args.config {
        Some(path) => augur_meta::MetaConfig::from_file(path)?,
        None => augur_meta::MetaConfig::default(),
    };
    if let Some(v) = args.id {
        config.id = v;
    }
    if let Some(v) = args.listen {
        config.listen = v;
    }
    if let Some(v) = args.peers {
        config.peers = v;
    }
    if args.join {
        config.join = true;
    }
    if let Some(v) = args.data_dir {
        config.data_dir = Some(v);
    }
    if let Some(v) = args.tls {
        config.tls_dir = Some(v);
    }
    if let Some(v) = args.metrics {
        config.metrics_listen = Some(v);
    }
    if let Some(v) = args.compact_entries {
        config.compact_entries = v;
    }
    if let Some(v) = args.node_dead_after_ms {
        config.node_dead_after_ms = v;
    }
    let server = augur_meta::MetaServer::start(&config)?;
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone())?;
    // The one line on stdout: scripts and tests wait for it.
    println!("augur meta {} serving on {}", config.id, server.local_addr);
    server.serve(shutdown).await;
    Ok(())
}

/// Cancels `token` on SIGTERM or SIGINT. The handlers are installed before this returns, so a
/// signal sent right after a ready line is printed is never lost to the default action.
pub(crate) fn cancel_on_signal(token: CancellationToken) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        token.cancel();
    });
    Ok(())
}
