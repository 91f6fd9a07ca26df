//! The metadata group end to end: real `augur meta serve` members and storage nodes on
//! 127.0.0.x, killed with SIGKILL, wiped, restarted, added and removed.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use augur_meta::MetaClient;
use augur_proto::meta::{NsOp, NsReply, ROOT_INO, VolumeInfo, VolumeSpec, XattrMode};
use augur_proto::msg::{BlockRead, RequestBody, ResponseBody};
use augur_proto::{BlockId, ErrorCode, Ino, Role, ShardRef};
use common::*;
use serde_bytes::ByteBuf;

const LONG: Duration = Duration::from_secs(60);

fn name(i: u64) -> ByteBuf {
    ByteBuf::from(format!("file-{i:05}").into_bytes())
}

fn mk(i: u64) -> NsOp {
    NsOp::create_file(ROOT_INO, name(i).into_vec(), 0o644)
}

async fn create_volume(admin: &MetaClient, spec: VolumeSpec) -> VolumeInfo {
    match admin.call(RequestBody::CreateVolume(spec)).await.expect("create volume") {
        ResponseBody::Volume(v) => *v,
        other => panic!("unexpected {other:?}"),
    }
}

/// Every name in the root directory, paging through ReadDir.
async fn list_root(client: &MetaClient, vol: &VolumeInfo) -> Vec<String> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let op = NsOp::ReadDir { ino: ROOT_INO, after: after.clone(), limit: 100 };
        let NsReply::Entries { entries, more } = client.ns(vol.id, op).await.expect("readdir") else {
            panic!()
        };
        for e in &entries {
            out.push(String::from_utf8(e.name.to_vec()).unwrap());
        }
        after = entries.last().map(|e| e.name.clone());
        if !more {
            return out;
        }
    }
}

async fn leader_index(rpc: &augur_proto::RpcClient, members: &[MetaProc]) -> Option<usize> {
    for (i, m) in members.iter().enumerate() {
        if let Some(s) = meta_status(rpc, m.addr).await
            && s.role == "leader"
        {
            return Some(i);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kill9_mid_stream_loses_no_acked_write_and_restarts_keep_state() {
    let cluster = Cluster::new();
    let (mut members, addrs) = meta_group(&cluster, "127.0.1", 3, &[]);
    let admin = meta_client(&cluster, Role::Admin, &addrs);
    let _node = common::registered_node(&cluster, "node-1", "127.0.1.10", &addrs, &[]);
    common::wait_for_nodes(&admin, 1).await;
    let spec = VolumeSpec { replicas: 1, shard_count: 1, ..VolumeSpec::with_defaults("ns") };
    let vol = create_volume(&admin, spec).await;
    let client = meta_client(&cluster, Role::Client, &addrs);
    let rpc = cluster.client(Role::Admin, "observer");

    // Four writers create files; the leader is killed once 150 creates are acked.
    let acked = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let next = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for _ in 0..4 {
        let (client, acked, next) = (client.clone(), acked.clone(), next.clone());
        writers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= 400 {
                    return;
                }
                match client.ns(vol.id, mk(i)).await {
                    Ok(NsReply::Attr(_)) => {
                        acked.lock().unwrap().insert(i);
                    }
                    other => panic!("create {i} failed: {other:?}"),
                }
            }
        }));
    }
    wait_until("150 acked creates", LONG, || async { acked.lock().unwrap().len() >= 150 }).await;
    let old = leader_index(&rpc, &members).await.expect("a leader");
    members[old].kill9();
    let killed_at = Instant::now();
    let survivors: Vec<usize> = (0..3).filter(|i| *i != old).collect();
    wait_until("a new leader", LONG, || async {
        for &i in &survivors {
            if meta_status(&rpc, members[i].addr).await.is_some_and(|s| s.role == "leader") {
                return true;
            }
        }
        false
    })
    .await;
    eprintln!("new leader after {:?}", killed_at.elapsed());
    for w in writers {
        w.await.unwrap();
    }
    let want: Vec<String> =
        acked.lock().unwrap().iter().map(|i| String::from_utf8(name(*i).to_vec()).unwrap()).collect();
    assert_eq!(want.len(), 400, "every create was acked (retries are transparent)");
    let have = list_root(&client, &vol).await;
    assert_eq!(have, want, "every acked create is present exactly once, nothing else");
    let NsReply::StatFs { inodes, .. } = client.ns(vol.id, NsOp::StatFs).await.unwrap() else { panic!() };
    assert_eq!(inodes, 401, "no create was applied twice (root + 400 files)");

    // The killed member comes back and catches up.
    members[old].restart(&[]);
    wait_until("the restarted member to catch up", LONG, || async {
        let Some(l) = leader_index(&rpc, &members).await else { return false };
        let leader = meta_status(&rpc, members[l].addr).await.unwrap();
        meta_status(&rpc, members[old].addr).await.is_some_and(|s| s.applied >= leader.commit)
    })
    .await;

    // Every member stopped (one cleanly, two with SIGKILL) and started again: state intact.
    members[0].terminate();
    members[1].kill9();
    members[2].kill9();
    for m in members.iter_mut() {
        m.restart(&[]);
    }
    let client = meta_client(&cluster, Role::Client, &addrs);
    assert_eq!(list_root(&client, &vol).await, want);
    client.ns(vol.id, mk(1000)).await.expect("writes work after a full restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wiped_member_rejoins_through_a_snapshot_and_members_change() {
    let cluster = Cluster::new();
    // A short log so the wiped member cannot catch up from entries alone.
    let (mut members, addrs) = meta_group(&cluster, "127.0.2", 3, &["--compact-entries", "20"]);
    let admin = meta_client(&cluster, Role::Admin, &addrs);
    let _node = common::registered_node(&cluster, "node-1", "127.0.2.10", &addrs, &[]);
    common::wait_for_nodes(&admin, 1).await;
    let spec = VolumeSpec { replicas: 1, shard_count: 1, ..VolumeSpec::with_defaults("snap") };
    let vol = create_volume(&admin, spec).await;
    let client = meta_client(&cluster, Role::Client, &addrs);
    let rpc = cluster.client(Role::Admin, "observer");
    for i in 0..100 {
        client.ns(vol.id, mk(i)).await.unwrap();
    }
    // Wipe a follower and bring it back empty.
    let leader = leader_index(&rpc, &members).await;
    let victim = (0..3).find(|i| Some(*i) != leader).unwrap();
    members[victim].kill9();
    std::fs::remove_dir_all(&members[victim].data).unwrap();
    for i in 100..150 {
        client.ns(vol.id, mk(i)).await.unwrap();
    }
    members[victim].restart(&["--join"]);
    // The group forgets the lost member and takes it back: it catches up from a snapshot.
    let admin_tls = cluster.tls(Role::Admin, "admin");
    let vid = (victim + 1).to_string();
    let vaddr = members[victim].addr.to_string();
    for args in [
        &["meta", "remove-member", "--id", &vid][..],
        &["meta", "add-member", "--id", &vid, "--addr", &vaddr],
    ] {
        let mut a = args.to_vec();
        a.extend(["--meta", &addrs, "--tls", admin_tls.to_str().unwrap()]);
        let (ok, out, err) = augur(&a);
        assert!(ok, "{args:?}: {out} {err}");
    }
    wait_until("the wiped member to install a snapshot and catch up", LONG, || async {
        let Some(l) = leader_index(&rpc, &members).await else { return false };
        let leader = meta_status(&rpc, members[l].addr).await.unwrap();
        meta_status(&rpc, members[victim].addr).await.is_some_and(|s| s.applied >= leader.commit)
    })
    .await;
    assert!(members[victim].log().contains("installing snapshot"), "caught up through a snapshot");

    // Add a fourth member (empty, joining), then remove the first: the group keeps working.
    let new_addr: std::net::SocketAddr = "127.0.2.4:7000".parse().unwrap();
    let mut fourth = MetaProc::spawn(&cluster, 4, new_addr, &peers_of(&members, new_addr), &["--join"]);
    let (ok, out, err) = augur(&[
        "meta",
        "add-member",
        "--id",
        "4",
        "--addr",
        &new_addr.to_string(),
        "--meta",
        &addrs,
        "--tls",
        cluster.tls(Role::Admin, "admin").to_str().unwrap(),
    ]);
    assert!(ok, "add-member: {out} {err}");
    wait_until("member 4 to catch up", LONG, || async {
        let Some(l) = leader_index(&rpc, &members).await else { return false };
        let leader = meta_status(&rpc, members[l].addr).await.unwrap();
        meta_status(&rpc, fourth.addr).await.is_some_and(|s| s.applied >= leader.commit)
    })
    .await;
    let (ok, out, err) = augur(&[
        "meta",
        "remove-member",
        "--id",
        "1",
        "--meta",
        &addrs,
        "--tls",
        cluster.tls(Role::Admin, "admin").to_str().unwrap(),
    ]);
    assert!(ok, "remove-member: {out} {err}");
    let all = format!("{addrs},{new_addr}");
    let client = meta_client(&cluster, Role::Client, &all);
    client.ns(vol.id, mk(500)).await.expect("writes after membership changes");
    let status = meta_status(&rpc, fourth.addr).await.unwrap();
    let ids: Vec<u64> = status.members.iter().map(|m| m.id).collect();
    assert_eq!(ids, vec![2, 3, 4]);
    // Member 1 is gone: stopping it costs nothing; a second loss among 2,3,4 is tolerated.
    members[0].kill9();
    let other = if victim == 1 { 2 } else { 1 };
    members[other].kill9();
    client.ns(vol.id, mk(501)).await.expect("two of three remaining voters still commit");
    let names = list_root(&client, &vol).await;
    assert_eq!(names.len(), 152);
    fourth.kill9();
}

fn peers_of(members: &[MetaProc], new: std::net::SocketAddr) -> String {
    let mut p: Vec<String> = members.iter().map(|m| format!("{}={}", m.id, m.addr)).collect();
    p.push(format!("4={new}"));
    p.join(",")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_never_see_state_older_than_an_acked_write() {
    let cluster = Cluster::new();
    let (mut members, addrs) = meta_group(&cluster, "127.0.3", 3, &[]);
    let admin = meta_client(&cluster, Role::Admin, &addrs);
    let _node = common::registered_node(&cluster, "node-1", "127.0.3.10", &addrs, &[]);
    common::wait_for_nodes(&admin, 1).await;
    let vol =
        create_volume(&admin, VolumeSpec { replicas: 1, shard_count: 1, ..VolumeSpec::with_defaults("lin") })
            .await;
    let writer = meta_client(&cluster, Role::Client, &addrs);
    let NsReply::Attr(file) = writer.ns(vol.id, mk(0)).await.unwrap() else { panic!() };
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ino = file.ino;
    let set = move |v: u64| NsOp::SetXattr {
        ino,
        name: ByteBuf::from(b"user.counter".to_vec()),
        value: ByteBuf::from(v.to_string().into_bytes()),
        mode: XattrMode::Upsert,
    };
    let w = {
        let (writer, acked, stop) = (writer.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut v = 0;
            while !stop.load(Ordering::SeqCst) {
                v += 1;
                writer.ns(vol.id, set(v)).await.unwrap();
                acked.store(v, Ordering::SeqCst);
            }
        })
    };
    let mut readers = Vec::new();
    for r in 0..3 {
        let (reader, acked, stop) =
            (meta_client(&cluster, Role::Client, &addrs), acked.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let mut reads = 0;
            while !stop.load(Ordering::SeqCst) {
                let floor = acked.load(Ordering::SeqCst);
                let op = NsOp::GetXattr { ino: file.ino, name: ByteBuf::from(b"user.counter".to_vec()) };
                match reader.ns(vol.id, op).await {
                    Ok(NsReply::Value(v)) => {
                        let seen: u64 = String::from_utf8(v.to_vec()).unwrap().parse().unwrap();
                        assert!(seen >= floor, "reader {r} saw {seen} after {floor} was acked");
                        reads += 1;
                    }
                    Err(e) if e.code() == Some(&ErrorCode::NoData) && floor == 0 => {}
                    other => panic!("read failed: {other:?}"),
                }
            }
            reads
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Leadership changes in the middle of it.
    let rpc = cluster.client(Role::Admin, "observer");
    let l = leader_index(&rpc, &members).await.unwrap();
    members[l].kill9();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::SeqCst);
    w.await.unwrap();
    let mut total = 0;
    for r in readers {
        total += r.await.unwrap();
    }
    assert!(total > 50, "readers made progress ({total} reads)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_failover_and_stale_epochs() {
    let cluster = Cluster::new();
    let (_members, addrs) = meta_group(&cluster, "127.0.4", 1, &["--node-dead-after-ms", "3000"]);
    let admin = meta_client(&cluster, Role::Admin, &addrs);
    let mut nodes: Vec<NodeProc> = (1..=3)
        .map(|i| {
            common::registered_node(
                &cluster,
                &format!("node-{i}"),
                &format!("127.0.4.{}", 10 + i),
                &addrs,
                &[],
            )
        })
        .collect();
    common::wait_for_nodes(&admin, 3).await;
    let spec =
        VolumeSpec { replicas: 3, shard_count: 4, stripe_unit_blocks: 1, ..VolumeSpec::with_defaults("r3") };
    let vol = create_volume(&admin, spec).await;
    let client_rpc = Arc::new(cluster.client(Role::Client, "fs"));
    let meta = meta_client(&cluster, Role::Client, &addrs);
    let blocks = augur_fs_client::BlockClient::open(meta.clone(), client_rpc.clone(), "r3").await.unwrap();
    let stale = augur_fs_client::BlockClient::open(meta.clone(), client_rpc.clone(), "r3").await.unwrap();
    let content = |i: u64| format!("block {i} ").repeat(100).into_bytes();
    for i in 0..32 {
        blocks.write(BlockId::new(Ino(7), i), 0, &content(i)).await.unwrap();
    }
    // Every block is on all three replicas, read from each directly.
    for i in 0..32 {
        let block = BlockId::new(Ino(7), i);
        let shard = vol.shard_of(block.ino, block.index);
        let p = blocks.placement_of(shard).unwrap();
        assert_eq!(p.replicas.len(), 3);
        for r in &p.replicas {
            let read =
                BlockRead { shard: ShardRef { volume: vol.id, shard, epoch: p.epoch }, block, range: None };
            let Ok(ResponseBody::Block(b)) =
                client_rpc.call(r.addr.parse().unwrap(), RequestBody::ReadBlock { read }).await
            else {
                panic!("{} could not serve {block}", r.node)
            };
            assert_eq!(b.data.to_vec(), content(i), "{block} on {}", r.node);
        }
    }
    // Kill the primary of shard 0: reads are served by the backups, with no error.
    let shard0 = blocks.placement_of(augur_proto::ShardId(0)).unwrap();
    let dead = shard0.replicas[0].node;
    let dead_idx = (dead.0 - 1) as usize;
    nodes[dead_idx].kill9();
    for i in 0..32 {
        assert_eq!(blocks.read(BlockId::new(Ino(7), i)).await.unwrap(), content(i));
    }
    // The meta leader drops the dead node (new epochs); writes continue on the survivors.
    for i in 0..32 {
        blocks.write(BlockId::new(Ino(7), i), 0, &content(i + 100)).await.unwrap();
    }
    let now0 = blocks.placement_of(augur_proto::ShardId(0)).unwrap();
    assert!(now0.epoch > shard0.epoch && !now0.replicas.iter().any(|r| r.node == dead));
    // A request routed with the old epoch is refused by a live replica...
    let live = &now0.replicas[0];
    let old_ref = ShardRef { volume: vol.id, shard: augur_proto::ShardId(0), epoch: shard0.epoch };
    let probe = BlockId::new(Ino(7), (0..32).find(|i| vol.shard_of(Ino(7), *i).0 == 0).unwrap());
    let read = BlockRead { shard: old_ref, block: probe, range: None };
    let err = client_rpc.call(live.addr.parse().unwrap(), RequestBody::ReadBlock { read }).await.unwrap_err();
    assert!(matches!(err.code(), Some(ErrorCode::StaleEpoch { .. })), "{err}");
    // ...and a client still holding it recovers by refreshing placement.
    assert_eq!(stale.placement_of(augur_proto::ShardId(0)).unwrap().epoch, shard0.epoch);
    for i in 0..32 {
        assert_eq!(stale.read(BlockId::new(Ino(7), i)).await.unwrap(), content(i + 100));
    }
    stale.write(probe, 0, b"written with a refreshed placement").await.unwrap();
    assert!(stale.placement_of(augur_proto::ShardId(0)).unwrap().epoch > shard0.epoch);
    // The dead node comes back: acked data it held is intact on disk.
    nodes[dead_idx].restart();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_with_clear_errors() {
    let cluster = Cluster::new();
    let (_members, addrs) = meta_group(&cluster, "127.0.5", 1, &[]);
    let tls_admin = cluster.tls(Role::Admin, "admin");
    let tls_client = cluster.tls(Role::Client, "client");
    let run = |args: &[&str], tls: &std::path::Path| {
        let mut a: Vec<&str> = args.to_vec();
        a.extend(["--meta", &addrs, "--tls", tls.to_str().unwrap()]);
        augur(&a)
    };
    // No storage nodes: a volume cannot be placed, and the error says why.
    let (ok, _, err) = run(&["volume", "create", "v"], &tls_admin);
    assert!(!ok && err.contains("live storage nodes"), "{err}");
    let (ok, _, err) = run(&["volume", "create", "v", "--block-size", "5000"], &tls_admin);
    assert!(!ok && err.contains("5000"), "{err}");
    // A client certificate may not create volumes or change members.
    let (ok, _, err) = run(&["volume", "create", "v"], &tls_client);
    assert!(!ok && err.contains("permission denied"), "{err}");
    let (ok, _, err) = run(&["meta", "remove-member", "--id", "1"], &tls_client);
    assert!(!ok && err.contains("permission denied"), "{err}");
    let (ok, _, err) = run(&["hint", "nosuch", "prefetch", "readahead:0"], &tls_client);
    assert!(!ok && err.contains("readahead:0"), "{err}");
    let (ok, _, err) = run(&["hint", "nosuch", "colour", "red"], &tls_client);
    assert!(!ok && err.contains("hint type"), "{err}");
    let (ok, _, err) = run(&["hint", "nosuch", "prefetch", "random"], &tls_client);
    assert!(!ok && err.contains("no volume named"), "{err}");
    // Bad daemon flags are named.
    let (ok, _, err) = augur(&[
        "meta",
        "serve",
        "--id",
        "1",
        "--peers",
        "1=nowhere",
        "--data-dir",
        "/tmp/x",
        "--tls",
        "/tmp/x",
    ]);
    assert!(!ok && err.contains("nowhere"), "{err}");
    let (ok, _, err) = augur(&[
        "meta",
        "serve",
        "--id",
        "2",
        "--peers",
        "1=127.0.0.1:1",
        "--data-dir",
        cluster.path().join("x").to_str().unwrap(),
        "--tls",
        tls_admin.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("peers must list this member"), "{err}");
    let (ok, _, err) = augur(&[
        "meta",
        "serve",
        "--id",
        "1",
        "--peers",
        "1=127.0.5.9:7000",
        "--data-dir",
        cluster.path().join("x").to_str().unwrap(),
        "--tls",
        tls_admin.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("needs a `meta` certificate"), "{err}");
    let (ok, out, _) = run(&["meta", "status"], &tls_client);
    assert!(ok && out.contains("leader"), "{out}");
}
