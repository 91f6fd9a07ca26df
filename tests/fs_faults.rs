//! Faults under a real mount (separate processes: one meta member, three storage nodes, `augur
//! mount`): `kill -9` of a node during a long sequential read (the reader sees no error) and
//! during writes (they complete once placement moves on); a second mount sees a file closed
//! by the first, including an overwrite of cached blocks, and what a file it keeps open holds
//! once the write-back delay has passed; everything written is there after
//! the whole cluster is restarted; copies damaged on disk are read around and repaired; two
//! mounts writing disjoint regions of one file keep both.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use augur_proto::Role;
use augur_proto::meta::VolumeSpec;
use augur_proto::msg::RequestBody;
use common::{Cluster, MountProc, NodeProc, ci, meta_client, meta_group};

const LONG: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

/// The byte at `offset` of test file `seed`.
fn pattern(seed: u64, offset: u64) -> u8 {
    ((offset.wrapping_mul(31) ^ (offset >> 12).wrapping_mul(seed + 7)) % 251) as u8
}

fn chunk(seed: u64, start: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| pattern(seed, start + i)).collect()
}

/// Writes `size` bytes of pattern `seed`, counting progress in `done`.
fn write_file(path: &Path, seed: u64, size: u64, done: &AtomicU64) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    let mut off = 0;
    while off < size {
        let n = MIB.min(size - off) as usize;
        f.write_all(&chunk(seed, off, n))?;
        off += n as u64;
        done.store(off, Ordering::Release);
    }
    f.sync_all()?;
    Ok(())
}

/// Reads the file in 1 MiB pieces and checks every byte against pattern `seed`.
fn check_file(path: &Path, seed: u64, size: u64, done: &AtomicU64) -> Result<(), String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| format!("read at {off}: {e}"))?;
        if n == 0 {
            break;
        }
        if buf[..n] != chunk(seed, off, n)[..] {
            return Err(format!("wrong bytes in the MiB at {off}"));
        }
        off += n as u64;
        done.store(off, Ordering::Release);
    }
    if off != size {
        return Err(format!("read {off} bytes, expected {size}"));
    }
    Ok(())
}

fn node(cluster: &Cluster, i: u64, meta: &str) -> NodeProc {
    node_on(cluster, "127.0.8", i, meta, &[])
}

/// Storage node `i` of a test's cluster on `net`.{10 + i}.
fn node_on(cluster: &Cluster, net: &str, i: u64, meta: &str, extra: &[&str]) -> NodeProc {
    common::registered_node(cluster, &format!("node-{i}"), &format!("{net}.{}", 10 + i), meta, extra)
}

/// One meta member and one storage node on `net`, with a volume `v` of one replica and four
/// shards: (cluster, meta member, meta addresses, admin client, node).
fn one_node_cluster(
    rt: &tokio::runtime::Runtime,
    net: &str,
) -> (Cluster, common::MetaProc, String, Arc<augur_meta::MetaClient>, NodeProc) {
    let cluster = Cluster::new();
    let (mut members, addrs) = meta_group(&cluster, net, 1, &[]);
    let admin = meta_client(&cluster, Role::Admin, &addrs);
    let node = node_on(&cluster, net, 1, &addrs, &[]);
    rt.block_on(common::wait_for_nodes(&admin, 1));
    let spec = VolumeSpec { replicas: 1, shard_count: 4, ..VolumeSpec::with_defaults("v") };
    rt.block_on(admin.call(RequestBody::CreateVolume(spec))).expect("create volume");
    (cluster, members.remove(0), addrs, admin, node)
}

/// Runs `work` on a thread and kills `victim` once `progress` passes a third of `total`.
fn kill_midway<F>(victim: &mut NodeProc, total: u64, work: F) -> Result<(), String>
where
    F: FnOnce(&AtomicU64) -> Result<(), String> + Send + 'static,
{
    let progress = Arc::new(AtomicU64::new(0));
    let p = progress.clone();
    let worker = std::thread::spawn(move || work(&p));
    let started = std::time::Instant::now();
    while progress.load(Ordering::Acquire) < total / 3 && !worker.is_finished() {
        assert!(started.elapsed() < LONG * 2, "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    let at = progress.load(Ordering::Acquire);
    victim.kill9();
    let result = worker.join().expect("worker thread");
    eprintln!("killed a node after {} of {} MiB", at / MIB, total / MIB);
    result
}

#[test]
fn node_kills_a_second_mount_and_a_full_restart_lose_nothing() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_runtime = rt.enter();
    let cluster = Cluster::new();
    let (mut members, addrs) = meta_group(&cluster, "127.0.8", 1, &["--node-dead-after-ms", "3000"]);
    let admin = meta_client(&cluster, Role::Admin, &addrs);
    let mut nodes: Vec<NodeProc> = (1..=3).map(|i| node(&cluster, i, &addrs)).collect();
    rt.block_on(common::wait_for_nodes(&admin, 3));
    let spec = VolumeSpec { shard_count: 8, ..VolumeSpec::with_defaults("v") };
    rt.block_on(admin.call(RequestBody::CreateVolume(spec))).expect("create volume");

    let mnt = cluster.path().join("mnt1");
    let mut m1 = MountProc::start(&cluster, &addrs, "v", &mnt, &["--dirty-expire-ms", "500"]);
    let size_a = if ci() { 96 * MIB } else { 256 * MIB };
    let size_b = 48 * MIB;
    write_file(&mnt.join("a"), 1, size_a, &AtomicU64::new(0)).expect("write a");

    // 1. kill -9 a node while a long sequential read runs: no error, every byte right.
    let path = mnt.join("a");
    kill_midway(&mut nodes[0], size_a, move |p| check_file(&path, 1, size_a, p))
        .expect("read through a node kill");

    // 2. kill -9 another node while writing: the writes complete once placement moves on.
    let path = mnt.join("b");
    kill_midway(&mut nodes[1], size_b, move |p| write_file(&path, 2, size_b, p).map_err(|e| e.to_string()))
        .expect("write through a node kill");
    check_file(&mnt.join("b"), 2, size_b, &AtomicU64::new(0)).expect("b reads back");

    // 3. A second mount sees what the first closed, even over blocks it has cached.
    let mnt2 = cluster.path().join("mnt2");
    let mut m2 = MountProc::start(&cluster, &addrs, "v", &mnt2, &[]);
    std::fs::write(mnt.join("c"), chunk(3, 0, 300_000)).unwrap();
    assert_eq!(
        std::fs::read(mnt2.join("c")).unwrap(),
        chunk(3, 0, 300_000),
        "second mount reads the closed file"
    );
    std::fs::write(mnt.join("c"), chunk(4, 0, 300_000)).unwrap();
    assert_eq!(
        std::fs::read(mnt2.join("c")).unwrap(),
        chunk(4, 0, 300_000),
        "an overwrite closed by the first mount shows"
    );
    {
        let mut f = std::fs::OpenOptions::new().append(true).open(mnt.join("c")).unwrap();
        f.write_all(b"appended").unwrap();
    }
    let again = std::fs::read(mnt2.join("c")).unwrap();
    assert_eq!(again.len(), 300_008, "an append closed by the first mount shows");
    assert_eq!(&again[300_000..], b"appended");
    std::fs::create_dir(mnt2.join("from-2")).unwrap();
    std::fs::write(mnt2.join("from-2/x"), b"x").unwrap();
    assert_eq!(std::fs::read(mnt.join("from-2/x")).unwrap(), b"x", "and the other way round");
    // A file the first mount keeps open, unflushed: the write-back (`--dirty-expire-ms 500`)
    // sends its partial block and size, and the second mount sees them without a close.
    let mut open = std::fs::File::create(mnt.join("open")).unwrap();
    open.write_all(&chunk(5, 0, 1000)).unwrap();
    let started = std::time::Instant::now();
    while !std::fs::read(mnt2.join("open")).is_ok_and(|d| d == chunk(5, 0, 1000)) {
        assert!(started.elapsed() < LONG, "what a file left open holds never left its mount");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(open);

    // 4. Everything stops (mounts cleanly, the meta member by SIGTERM, the last node by kill -9)
    //    and comes back: every file is there.
    assert!(m2.stop().success());
    assert!(m1.stop().success());
    members[0].terminate();
    nodes[2].kill9();
    for n in nodes.iter_mut() {
        n.restart();
    }
    members[0].restart(&[]);
    rt.block_on(common::wait_for_nodes(&admin, 3));
    let _m1 = MountProc::start(&cluster, &addrs, "v", &mnt, &[]);
    check_file(&mnt.join("a"), 1, size_a, &AtomicU64::new(0)).expect("a after restart");
    check_file(&mnt.join("b"), 2, size_b, &AtomicU64::new(0)).expect("b after restart");
    let c = std::fs::read(mnt.join("c")).unwrap();
    assert_eq!(&c[..300_000], &chunk(4, 0, 300_000)[..]);
    assert_eq!(std::fs::read(mnt.join("from-2/x")).unwrap(), b"x");
}

#[test]
fn damaged_copies_are_read_around_and_repaired() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_runtime = rt.enter();
    let cluster = Cluster::new();
    let (_members, addrs) = meta_group(&cluster, "127.0.12", 1, &[]);
    let admin = meta_client(&cluster, Role::Admin, &addrs);
    // The scrub is off: here the reads find the damage, and a scrub repairing from a node
    // while it is stopped below would count failures.
    let mut nodes: Vec<NodeProc> =
        (1..=2).map(|i| node_on(&cluster, "127.0.12", i, &addrs, &["--scrub-bytes-per-sec", "0"])).collect();
    rt.block_on(common::wait_for_nodes(&admin, 2));
    let spec = VolumeSpec { replicas: 2, shard_count: 4, ..VolumeSpec::with_defaults("v") };
    rt.block_on(admin.call(RequestBody::CreateVolume(spec))).expect("create volume");
    let mnt = cluster.path().join("mnt");
    let size = 16 * MIB;
    let mut m = MountProc::start(&cluster, &addrs, "v", &mnt, &[]);
    write_file(&mnt.join("f"), 7, size, &AtomicU64::new(0)).expect("write f");
    assert!(m.stop().success());

    // Both nodes hold every block; each gets half of its copies damaged, the halves
    // complementary (by rank in key order, the same on both), so every block has exactly one
    // sound copy and whichever replica the client asks first, about half its reads hit damage.
    for (parity, node) in nodes.iter_mut().enumerate() {
        node.terminate();
        let damaged = common::damage_values(&node.data, |rank, _| rank % 2 == parity);
        assert!(damaged as u64 >= size / (64 * 1024) / 2 - 1, "only {damaged} copies on node {parity}");
        node.restart();
    }
    rt.block_on(common::wait_for_nodes(&admin, 2));
    let _m = MountProc::start(&cluster, &addrs, "v", &mnt, &[]);
    check_file(&mnt.join("f"), 7, size, &AtomicU64::new(0)).expect("f reads right around damaged copies");

    // The nodes repair what the reads found damaged, from each other.
    let probe = cluster.client(Role::Client, "probe");
    let repairs = |node: &NodeProc| match rt.block_on(probe.call(node.addr, RequestBody::NodeStatus)) {
        Ok(augur_proto::msg::ResponseBody::NodeStatus(s)) => (s.repairs_done, s.repairs_failed),
        other => panic!("node status: {other:?}"),
    };
    let started = std::time::Instant::now();
    loop {
        let (done, failed): (Vec<u64>, Vec<u64>) = nodes.iter().map(repairs).unzip();
        assert_eq!(failed, [0, 0], "a repair failed");
        if done.iter().sum::<u64>() > 0 {
            break;
        }
        assert!(started.elapsed() < LONG, "no damaged copy was repaired");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn two_mounts_writing_disjoint_regions_of_one_file_keep_both() {
    use std::os::unix::fs::FileExt;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_runtime = rt.enter();
    let (cluster, _member, addrs, _admin, _node) = one_node_cluster(&rt, "127.0.13");
    let (mnt_a, mnt_b) = (cluster.path().join("a"), cluster.path().join("b"));
    let _a = MountProc::start(&cluster, &addrs, "v", &mnt_a, &[]);
    let _b = MountProc::start(&cluster, &addrs, "v", &mnt_b, &[]);
    std::fs::write(mnt_a.join("shared"), b"").unwrap();
    // Both open the empty file; A writes the first MiB (whole blocks reach the node at once,
    // the size waits for its close), then B writes the second MiB, past the end B knows (a
    // gap), and closes first. Neither region may be lost.
    let fa = std::fs::OpenOptions::new().write(true).open(mnt_a.join("shared")).unwrap();
    let fb = std::fs::OpenOptions::new().write(true).open(mnt_b.join("shared")).unwrap();
    fa.write_all_at(&chunk(1, 0, MIB as usize), 0).unwrap();
    // B writes once A's blocks are on the node.
    let ino = std::os::unix::fs::MetadataExt::ino(&fa.metadata().unwrap());
    let rpc = Arc::new(cluster.client(Role::Client, "probe"));
    let meta = meta_client(&cluster, Role::Client, &addrs);
    let blocks = rt.block_on(augur_fs_client::BlockClient::open(meta, rpc, "v")).unwrap();
    let started = std::time::Instant::now();
    for index in 0..MIB / (64 * 1024) {
        let block = augur_proto::BlockId::new(augur_proto::Ino(ino), index);
        let want = chunk(1, index * 64 * 1024, 64 * 1024);
        while rt.block_on(blocks.read(block)).unwrap() != want {
            assert!(started.elapsed() < LONG, "A's blocks never reached the node");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    fb.write_all_at(&chunk(2, MIB, MIB as usize), MIB).unwrap();
    drop(fb);
    drop(fa);
    let mut want = chunk(1, 0, MIB as usize);
    want.extend(chunk(2, MIB, MIB as usize));
    for mnt in [&mnt_a, &mnt_b] {
        let got = std::fs::read(mnt.join("shared")).unwrap();
        assert_eq!(got.len(), want.len(), "size seen through {}", mnt.display());
        assert!(got == want, "content seen through {}", mnt.display());
    }
}

#[test]
fn full_nodes_give_the_writer_enospc_and_keep_what_was_stored() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_runtime = rt.enter();
    let (cluster, _member, addrs, _admin, mut node) = one_node_cluster(&rt, "127.0.10");
    let mnt = cluster.path().join("mnt");
    // Bad mount requests fail with a message naming what is wrong.
    let tls = cluster.tls(Role::Client, "mount");
    let tls = tls.to_str().unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let (ok, _, err) =
        common::augur(&["mount", "nosuch", mnt.to_str().unwrap(), "--meta", &addrs, "--tls", tls]);
    assert!(!ok && err.contains("nosuch"), "{err}");
    let (ok, _, err) = common::augur(&["mount", "v", "/proc/version", "--meta", &addrs, "--tls", tls]);
    assert!(!ok && err.contains("not a directory"), "{err}");
    let mount = MountProc::start(&cluster, &addrs, "v", &mnt, &[]);
    std::fs::write(mnt.join("kept"), chunk(5, 0, 200_000)).unwrap();

    // The node restarts demanding more free space than any disk has: it is "full".
    assert!(node.terminate().success());
    let cfg = cluster.path().join("full.toml");
    std::fs::write(&cfg, "reserve-bytes = 1152921504606846976\n").unwrap();
    let cfg = cfg.to_str().unwrap().to_string();
    let _full = NodeProc::spawn(
        &node.addr.to_string(),
        &node.data,
        &node.tls,
        &["--meta", &addrs, "--node-id", "1", "--config", &cfg],
    );
    let mut f = std::fs::File::create(mnt.join("new")).unwrap();
    // Written into the write-back buffer; the refusal arrives by the next write, fsync or close.
    let written = f.write_all(&chunk(6, 0, 1 << 20)).and_then(|()| f.sync_all());
    let err = written.expect_err("a full cluster refuses the data");
    assert_eq!(err.raw_os_error(), Some(28), "ENOSPC, got {err}");
    drop(f);
    assert_eq!(std::fs::read(mnt.join("kept")).unwrap(), chunk(5, 0, 200_000), "stored data unharmed");

    // Every handle open when an upload fails is told once, so a reader closing first does not
    // use the report up.
    let mut w = std::fs::File::create(mnt.join("small")).unwrap();
    w.write_all(&chunk(7, 0, 1000)).unwrap(); // a partial block: it waits in the write-back buffer
    let r = std::fs::File::open(mnt.join("small")).unwrap();
    drop(r); // its close flushes the file, and the upload fails
    let err = w.sync_all().expect_err("the writer is told as well");
    assert_eq!(err.raw_os_error(), Some(28), "ENOSPC, got {err}");
    w.sync_all().expect("a failure is told to a handle once");
    drop(w);
    drop(mount);
}
