//! Storage node end to end: real `augur node serve` processes on 127.0.0.x, real QUIC + mTLS.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use augur_proto::frame::{FRAME_BODY_MAX_BYTES, FRAME_MAGIC, read_frame};
use augur_proto::msg::{
    BlockRead, ByteRange, PROTOCOL_VERSION, Replica, Request, RequestBody, Response, ResponseBody,
    ShardPlacement, VolumeLayout,
};
use augur_proto::{
    BlockId, Epoch, ErrorCode, Ino, NodeId, Role, RpcClient, RpcError, ShardId, ShardRef, VolumeId,
};
use common::{Cluster, NodeProc, augur};
use serde_bytes::ByteBuf;

const BS: u32 = 64 * 1024;
const VOL: VolumeId = VolumeId(1);
const SHARDS: u32 = 4;

fn shard_of(block: BlockId) -> ShardRef {
    ShardRef { volume: VOL, shard: ShardId((block.index % u64::from(SHARDS)) as u32), epoch: Epoch(1) }
}

async fn node_id(client: &RpcClient, node: &NodeProc) -> NodeId {
    match client.call(node.addr, RequestBody::NodeStatus).await.unwrap() {
        ResponseBody::NodeStatus(s) => s.node,
        other => panic!("unexpected {other:?}"),
    }
}

async fn place(admin: &RpcClient, node: &NodeProc, epoch: u64) {
    let me = node_id(admin, node).await;
    let shards = (0..SHARDS)
        .map(|s| ShardPlacement {
            shard: ShardId(s),
            epoch: Epoch(epoch),
            replicas: vec![Replica { node: me, addr: node.addr.to_string() }],
        })
        .collect();
    let layout = VolumeLayout { volume: VOL, block_size_bytes: BS };
    admin.call(node.addr, RequestBody::SetPlacement { layout, shards }).await.unwrap();
}

/// Deterministic content of block `i`: sizes vary so short, partial and full blocks all occur.
fn content(i: u64, salt: u8) -> Vec<u8> {
    let len = match i % 4 {
        0 => BS as usize,
        1 => 1,
        2 => 4096 + i as usize,
        _ => BS as usize / 2,
    };
    (0..len).map(|j| (j as u64 ^ i.wrapping_mul(31) ^ u64::from(salt)) as u8).collect()
}

async fn write(
    client: &RpcClient,
    node: &NodeProc,
    block: BlockId,
    offset: u32,
    data: Vec<u8>,
) -> Result<ResponseBody, RpcError> {
    let body = RequestBody::WriteBlock { shard: shard_of(block), block, offset, data: ByteBuf::from(data) };
    client.call(node.addr, body).await
}

async fn read(
    client: &RpcClient,
    node: &NodeProc,
    block: BlockId,
    range: Option<ByteRange>,
) -> Result<Vec<u8>, RpcError> {
    let read = BlockRead { shard: shard_of(block), block, range };
    match client.call(node.addr, RequestBody::ReadBlock { read }).await? {
        ResponseBody::Block(b) => {
            assert_eq!(crc32fast::hash(&b.data), b.crc32, "client-side CRC check of {block}");
            Ok(b.data.into_vec())
        }
        other => panic!("unexpected {other:?}"),
    }
}

fn expect_code<T: std::fmt::Debug>(r: Result<T, RpcError>, want: fn(&ErrorCode) -> bool) {
    match r {
        Err(e) if e.code().is_some_and(want) => {}
        other => panic!("expected a specific error code, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_blocks_round_trip_batch_delete_and_survive_restart() {
    let cluster = Cluster::new();
    let mut node = cluster.node("node-a", "127.0.0.2");
    let admin = cluster.client(Role::Admin, "admin");
    let client = Arc::new(cluster.client(Role::Client, "client"));
    place(&admin, &node, 1).await;

    const N: u64 = 400;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let client = client.clone();
        let addr = node.addr;
        tasks.spawn(async move {
            let block = BlockId::new(Ino(10 + i % 3), i);
            let body = RequestBody::WriteBlock {
                shard: shard_of(block),
                block,
                offset: 0,
                data: ByteBuf::from(content(i, 0)),
            };
            client.call(addr, body).await.unwrap();
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    // A partial write in the middle of an existing block is read-modify-write on the node.
    let patched = BlockId::new(Ino(10), 0);
    write(&client, &node, patched, 1000, vec![0xEE; 100]).await.unwrap();

    let expected = |i: u64| {
        let mut c = content(i, 0);
        if i == 0 {
            c[1000..1100].fill(0xEE);
        }
        c
    };
    let check_all = |client: Arc<RpcClient>, node_addr| async move {
        for i in 0..N {
            let block = BlockId::new(Ino(10 + i % 3), i);
            let read = BlockRead { shard: shard_of(block), block, range: None };
            let ResponseBody::Block(b) =
                client.call(node_addr, RequestBody::ReadBlock { read }).await.unwrap()
            else {
                panic!("not a block")
            };
            assert_eq!(b.data.as_slice(), expected(i).as_slice(), "block {i}");
        }
    };
    check_all(client.clone(), node.addr).await;

    // Byte ranges, including past the stored length (zeros are implicit, so the reply is short).
    let got =
        read(&client, &node, BlockId::new(Ino(13), 1), Some(ByteRange { offset: 0, len: 10 })).await.unwrap();
    assert!(got.is_empty(), "never-written block reads empty");
    let got = read(&client, &node, BlockId::new(Ino(11), 1), Some(ByteRange { offset: 0, len: 4096 }))
        .await
        .unwrap();
    assert_eq!(got, content(1, 0), "1-byte block read with a larger range");
    let got = read(&client, &node, patched, Some(ByteRange { offset: 990, len: 20 })).await.unwrap();
    assert_eq!(got, expected(0)[990..1010].to_vec());

    // A batched read answers each block on its own.
    let reads: Vec<BlockRead> = (0..40)
        .map(|i| {
            let block = BlockId::new(Ino(10 + i % 3), i);
            BlockRead { shard: shard_of(block), block, range: None }
        })
        .collect();
    let ResponseBody::Blocks(results) =
        client.call(node.addr, RequestBody::ReadBlocks { reads }).await.unwrap()
    else {
        panic!("not blocks")
    };
    for (i, r) in results.into_iter().enumerate() {
        assert_eq!(r.unwrap().data.as_slice(), expected(i as u64).as_slice());
    }
    // Oversized batches are refused before any work.
    let too_many: Vec<BlockRead> = (0..300)
        .map(|i| BlockRead {
            shard: shard_of(BlockId::new(Ino(10), i)),
            block: BlockId::new(Ino(10), i),
            range: None,
        })
        .collect();
    expect_code(client.call(node.addr, RequestBody::ReadBlocks { reads: too_many }).await, |c| {
        *c == ErrorCode::InvalidArgument
    });

    // Warm loads into the node cache.
    let warm: Vec<BlockRead> = (0..8u64)
        .map(|i| BlockRead {
            shard: shard_of(BlockId::new(Ino(10 + i % 3), i)),
            block: BlockId::new(Ino(10 + i % 3), i),
            range: None,
        })
        .collect();
    assert_eq!(
        client.call(node.addr, RequestBody::Warm { blocks: warm }).await.unwrap(),
        ResponseBody::Warmed { loaded: 8 }
    );

    // Clean restart: everything is still there.
    assert!(node.terminate().success(), "SIGTERM exits cleanly");
    node.restart();
    check_all(client.clone(), node.addr).await;

    // Delete range: inode 10's blocks from index 200 on, in every shard.
    for s in 0..SHARDS {
        let shard = ShardRef { volume: VOL, shard: ShardId(s), epoch: Epoch(1) };
        client
            .call(node.addr, RequestBody::DeleteRange { shard, ino: Ino(10), from_index: 200 })
            .await
            .unwrap();
    }
    for i in (0..N).filter(|i| i % 3 == 0) {
        let got = read(&client, &node, BlockId::new(Ino(10), i), None).await.unwrap();
        if i >= 200 {
            assert!(got.is_empty(), "block {i} deleted");
        } else {
            assert_eq!(got, expected(i));
        }
    }
    let got = read(&client, &node, BlockId::new(Ino(11), 301), None).await.unwrap();
    assert_eq!(got, content(301, 0), "other inodes untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_writes_survive_kill_9() {
    let cluster = Cluster::new();
    let mut node = cluster.node("node-k", "127.0.0.3");
    let admin = cluster.client(Role::Admin, "admin");
    let client = Arc::new(cluster.client(Role::Client, "client"));
    place(&admin, &node, 1).await;

    for round in 0..3u8 {
        // Many writers; the node is killed the moment the 150th ack arrives, with writes in flight.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..16u64 {
            let (client, tx, addr) = (client.clone(), tx.clone(), node.addr);
            tasks.spawn(async move {
                for k in 0..1000u64 {
                    let i = w * 1000 + k;
                    let block = BlockId::new(Ino(77), i);
                    let body = RequestBody::WriteBlock {
                        shard: shard_of(block),
                        block,
                        offset: 0,
                        data: ByteBuf::from(content(i, round)),
                    };
                    match client.call(addr, body).await {
                        Ok(_) => {
                            if tx.send(i).is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
            });
        }
        drop(tx);
        let mut acked = Vec::new();
        while let Some(i) = rx.recv().await {
            acked.push(i);
            if acked.len() == 150 {
                node.kill9();
                break;
            }
        }
        // Acks that raced the kill are acked too.
        while let Ok(i) = rx.try_recv() {
            acked.push(i);
        }
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        node.restart();
        for &i in &acked {
            let got = read(&client, &node, BlockId::new(Ino(77), i), None).await.unwrap();
            assert_eq!(
                got,
                content(i, round),
                "acked block {i} lost or damaged after kill -9 (round {round})"
            );
        }
    }
}

async fn status(client: &RpcClient, node: &NodeProc) -> augur_proto::msg::NodeStatus {
    match client.call(node.addr, RequestBody::NodeStatus).await.unwrap() {
        ResponseBody::NodeStatus(s) => *s,
        other => panic!("unexpected {other:?}"),
    }
}

/// Damages the stored values of `blocks` in a stopped node (`common::damage_values`).
fn damage_values(node: &NodeProc, blocks: &[BlockId]) {
    use augur_storage_node::store::block_key;
    let keys: Vec<_> = blocks.iter().map(|&b| block_key(VOL, shard_of(b).shard, b)).collect();
    let damaged = common::damage_values(&node.data, |_, key| keys.iter().any(|k| &k[..] == key));
    assert_eq!(damaged, blocks.len());
}

/// Places every shard on `nodes` in that order (the first is primary), on each of them.
async fn place_replicated(admin: &RpcClient, nodes: &[&NodeProc], epoch: u64) {
    let mut replicas = Vec::new();
    for node in nodes {
        replicas.push(Replica { node: node_id(admin, node).await, addr: node.addr.to_string() });
    }
    let shards: Vec<ShardPlacement> = (0..SHARDS)
        .map(|s| ShardPlacement { shard: ShardId(s), epoch: Epoch(epoch), replicas: replicas.clone() })
        .collect();
    let layout = VolumeLayout { volume: VOL, block_size_bytes: BS };
    for node in nodes {
        let body = RequestBody::SetPlacement { layout, shards: shards.clone() };
        admin.call(node.addr, body).await.unwrap();
    }
}

/// Waits until every block in `want` reads back from `node` exactly as given; a read may fail
/// with a checksum mismatch meanwhile, never return other bytes. Returns how many reads failed
/// (a damaged copy's first read always does: its repair starts there).
async fn wait_until_sound(
    client: &RpcClient,
    node: &NodeProc,
    want: &[(BlockId, Vec<u8>)],
    what: &str,
) -> usize {
    let failed = std::sync::atomic::AtomicUsize::new(0);
    common::wait_until(what, Duration::from_secs(60), || async {
        let mut sound = true;
        for (block, bytes) in want {
            match read(client, node, *block, None).await {
                Ok(got) => assert_eq!(&got, bytes, "{block} returned damaged bytes"),
                Err(e) => {
                    assert_eq!(e.code(), Some(&ErrorCode::ChecksumMismatch), "{block}: {e}");
                    failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    sound = false;
                }
            }
        }
        sound
    })
    .await;
    failed.into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_copies_are_repaired_from_another_replica() {
    let cluster = Cluster::new();
    // The scrub is off: here reads find the damage (the next test leaves it to the scrub).
    let no_scrub = ["--scrub-bytes-per-sec", "0"];
    let mut a = cluster.node_with("node-r1", "127.0.0.5", &no_scrub);
    let mut b = cluster.node_with("node-r2", "127.0.0.6", &no_scrub);
    let admin = cluster.client(Role::Admin, "admin");
    let client = cluster.client(Role::Client, "client");
    place_replicated(&admin, &[&a, &b], 1).await;
    let blocks: Vec<BlockId> = (0..32).map(|i| BlockId::new(Ino(7), i)).collect();
    let mut want: Vec<(BlockId, Vec<u8>)> = blocks.iter().map(|b| (*b, content(b.index, 3))).collect();
    for (block, bytes) in &want {
        write(&client, &a, *block, 0, bytes.clone()).await.unwrap();
    }

    // 1. The primary's copies are damaged: each read reports it (the reader fails over) and
    //    the node heals every one from its backup.
    assert!(a.terminate().success());
    damage_values(&a, &blocks);
    a.restart();
    expect_code(read(&client, &a, blocks[0], None).await, |c| *c == ErrorCode::ChecksumMismatch);
    wait_until_sound(&client, &a, &want, "the primary's copies to be repaired").await;
    let repaired = status(&client, &a).await;
    assert_eq!((repaired.repairs_done, repaired.repairs_failed), (blocks.len() as u64, 0));

    // 2. A partial write on a damaged primary copy heals it first and goes through.
    assert!(a.terminate().success());
    damage_values(&a, &blocks[..1]);
    a.restart();
    write(&client, &a, blocks[0], 10, vec![0xAB; 3]).await.unwrap();
    want[0].1[10..13].fill(0xAB);
    for node in [&a, &b] {
        assert_eq!(read(&client, node, blocks[0], None).await.unwrap(), want[0].1);
    }

    // 3. A backup's damaged copies heal from the primary.
    assert!(b.terminate().success());
    damage_values(&b, &blocks[..8]);
    b.restart();
    let failed = wait_until_sound(&client, &b, &want[..8], "the backup's copies to be repaired").await;
    assert!(failed >= 8, "only {failed} damaged copies were noticed");

    // 4. Damage RocksDB itself reports (bytes flipped in blob files) heals the same way.
    assert!(a.terminate().success());
    common::damage_blob_files(&a.data);
    a.restart();
    let failed = wait_until_sound(&client, &a, &want, "copies in damaged blob files to be repaired").await;
    assert!(failed > 0, "the damage to the blob files hit no block");
    assert_eq!(status(&client, &a).await.repairs_failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scrub_finds_and_repairs_damage_nobody_reads() {
    let cluster = Cluster::new();
    let mut a = cluster.node("node-s1", "127.0.0.12");
    let b = cluster.node("node-s2", "127.0.0.13");
    let admin = cluster.client(Role::Admin, "admin");
    let client = cluster.client(Role::Client, "client");
    place_replicated(&admin, &[&a, &b], 1).await;
    let blocks: Vec<BlockId> = (0..32).map(|i| BlockId::new(Ino(8), i)).collect();
    for block in &blocks {
        write(&client, &a, *block, 0, content(block.index, 5)).await.unwrap();
    }
    assert!(a.terminate().success());
    damage_values(&a, &blocks);
    // Restarted, the node scrubs at once (default pace and pause): nobody reads a block, yet
    // every damaged copy is found and repaired from the backup.
    a.restart();
    common::wait_until(
        "the scrub to find and repair every damaged copy",
        Duration::from_secs(60),
        || async {
            let s = status(&client, &a).await;
            assert_eq!(s.repairs_failed, 0);
            s.scrub_found == blocks.len() as u64 && s.repairs_done == blocks.len() as u64
        },
    )
    .await;
    for block in &blocks {
        assert_eq!(read(&client, &a, *block, None).await.unwrap(), content(block.index, 5), "{block}");
    }
    // A scrub pass over sound copies finds nothing: restarted, the node scrubs again.
    assert!(a.terminate().success());
    a.restart();
    common::wait_until("a second scrub pass", Duration::from_secs(60), || async {
        status(&client, &a).await.scrub_passes >= 1
    })
    .await;
    assert_eq!(status(&client, &a).await.scrub_found, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_bytes_on_disk_are_never_returned() {
    let cluster = Cluster::new();
    let mut node = cluster.node("node-c", "127.0.0.4");
    let admin = cluster.client(Role::Admin, "admin");
    let client = cluster.client(Role::Client, "client");
    place(&admin, &node, 1).await;
    for i in 0..64 {
        write(&client, &node, BlockId::new(Ino(5), i), 0, vec![i as u8; BS as usize]).await.unwrap();
    }
    assert!(node.terminate().success());

    // 1. Flip a byte inside one stored value, leaving RocksDB's own structures intact.
    let victim = BlockId::new(Ino(5), 3);
    damage_values(&node, &[victim]);
    node.restart();
    expect_code(read(&client, &node, victim, None).await, |c| *c == ErrorCode::ChecksumMismatch);
    // With no other replica there is nothing to repair from: the damage stays reported.
    common::wait_until("the failed repair to be counted", Duration::from_secs(30), || async {
        status(&client, &node).await.repairs_failed > 0
    })
    .await;
    expect_code(read(&client, &node, victim, Some(ByteRange { offset: 0, len: 16 })).await, |c| {
        *c == ErrorCode::ChecksumMismatch
    });
    // A batch holding the bad block answers it with an error and serves the rest.
    let reads = [2u64, 3, 4].map(|i| BlockRead {
        shard: shard_of(BlockId::new(Ino(5), i)),
        block: BlockId::new(Ino(5), i),
        range: None,
    });
    let ResponseBody::Blocks(results) =
        client.call(node.addr, RequestBody::ReadBlocks { reads: reads.to_vec() }).await.unwrap()
    else {
        panic!()
    };
    assert_eq!(results[0].as_ref().unwrap().data.as_slice(), &[2u8; BS as usize][..]);
    assert_eq!(results[1].as_ref().unwrap_err().code, ErrorCode::ChecksumMismatch);
    assert_eq!(results[2].as_ref().unwrap().data.as_slice(), &[4u8; BS as usize][..]);
    // A partial write cannot build on a corrupt block either.
    expect_code(write(&client, &node, victim, 10, vec![1, 2, 3]).await, |c| {
        *c == ErrorCode::ChecksumMismatch
    });
    // A whole-block rewrite heals it (what repair from a replica will do).
    write(&client, &node, victim, 0, vec![9u8; BS as usize]).await.unwrap();
    assert_eq!(read(&client, &node, victim, None).await.unwrap(), vec![9u8; BS as usize]);

    // 2. Flip bytes in the blob files themselves (what a bad disk does): every block either
    //    reads back exactly as written or fails; damaged bytes are never returned as data.
    assert!(node.terminate().success());
    let flipped = common::damage_blob_files(&node.data);
    node.restart();
    let mut errors = 0;
    for i in 0..64u64 {
        let want = if i == 3 { vec![9u8; BS as usize] } else { vec![i as u8; BS as usize] };
        match read(&client, &node, BlockId::new(Ino(5), i), None).await {
            Ok(got) => assert_eq!(got, want, "block {i} returned damaged bytes"),
            Err(e) => {
                assert_eq!(e.code(), Some(&ErrorCode::ChecksumMismatch), "block {i}: {e}");
                errors += 1;
            }
        }
    }
    assert!(errors > 0, "flipping {flipped} blob bytes went unnoticed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_and_wrong_roles_are_refused() {
    let cluster = Cluster::new();
    let node = cluster.node("node-s", "127.0.0.5");
    let admin = cluster.client(Role::Admin, "admin");
    place(&admin, &node, 1).await;

    // A certificate from another CA gets no service at all.
    let other = Cluster::new();
    let stranger = other.client(Role::Admin, "stranger");
    let err = stranger.call(node.addr, RequestBody::NodeStatus).await.unwrap_err();
    assert!(matches!(err, RpcError::Connect { .. } | RpcError::Connection { .. }), "{err}");

    // A client may read and write but not call admin RPCs.
    let client = cluster.client(Role::Client, "client");
    let layout = VolumeLayout { volume: VOL, block_size_bytes: BS };
    let err = client.call(node.addr, RequestBody::SetPlacement { layout, shards: vec![] }).await.unwrap_err();
    assert_eq!(err.code(), Some(&ErrorCode::PermissionDenied), "{err}");
    client.call(node.addr, RequestBody::NodeStatus).await.unwrap();

    // A node certificate on the calling side may not set placement either (only meta/admin).
    let peer_node = cluster.client(Role::Node, "node-peer");
    let err =
        peer_node.call(node.addr, RequestBody::SetPlacement { layout, shards: vec![] }).await.unwrap_err();
    assert_eq!(err.code(), Some(&ErrorCode::PermissionDenied));

    // A client certificate cannot run a server: callers refuse a peer presenting one.
    let fake_tls = cluster.tls(Role::Client, "fake-node");
    let out = std::process::Command::new(common::AUGUR)
        .args(["node", "serve", "--listen", "127.0.0.5:0", "--data-dir"])
        .arg(cluster.path().join("fake"))
        .arg("--tls")
        .arg(&fake_tls)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("role client"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_epochs_are_refused_and_placement_never_regresses() {
    let cluster = Cluster::new();
    let node = cluster.node("node-e", "127.0.0.6");
    let admin = cluster.client(Role::Admin, "admin");
    let client = cluster.client(Role::Client, "client");
    place(&admin, &node, 1).await;
    let block = BlockId::new(Ino(1), 0);
    write(&client, &node, block, 0, b"epoch one".to_vec()).await.unwrap();
    place(&admin, &node, 2).await;
    // The client still routes with epoch 1: refused, told the current epoch.
    expect_code(read(&client, &node, block, None).await, |c| {
        *c == ErrorCode::StaleEpoch { current: Epoch(2) }
    });
    let fresh = ShardRef { epoch: Epoch(2), ..shard_of(block) };
    let ResponseBody::Block(b) = client
        .call(node.addr, RequestBody::ReadBlock { read: BlockRead { shard: fresh, block, range: None } })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(b.data.as_slice(), b"epoch one");
    // An epoch from the future is refused too, and placement cannot go back.
    let future = ShardRef { epoch: Epoch(9), ..shard_of(block) };
    expect_code(
        client
            .call(node.addr, RequestBody::ReadBlock { read: BlockRead { shard: future, block, range: None } })
            .await,
        |c| matches!(c, ErrorCode::EpochAhead { .. }),
    );
    let me = node_id(&admin, &node).await;
    let back = ShardPlacement {
        shard: ShardId(0),
        epoch: Epoch(1),
        replicas: vec![Replica { node: me, addr: node.addr.to_string() }],
    };
    let layout = VolumeLayout { volume: VOL, block_size_bytes: BS };
    expect_code(admin.call(node.addr, RequestBody::SetPlacement { layout, shards: vec![back] }).await, |c| {
        *c == ErrorCode::InvalidArgument
    });
    // A shard the node does not hold.
    let elsewhere = ShardRef { volume: VolumeId(99), shard: ShardId(0), epoch: Epoch(1) };
    expect_code(
        client
            .call(
                node.addr,
                RequestBody::ReadBlock { read: BlockRead { shard: elsewhere, block, range: None } },
            )
            .await,
        |c| *c == ErrorCode::ShardNotHere,
    );
    // Writes past the block end are refused with a message naming the sizes.
    let err = client
        .call(
            node.addr,
            RequestBody::WriteBlock {
                shard: fresh,
                block,
                offset: BS - 1,
                data: ByteBuf::from(vec![0u8; 2]),
            },
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("overruns"), "{err}");
}

async fn raw_exchange(
    client: &RpcClient,
    addr: std::net::SocketAddr,
    bytes: &[u8],
    finish: bool,
) -> Response {
    let (mut send, mut recv) = client.open_stream(addr).await.unwrap();
    send.write_all(bytes).await.unwrap();
    if finish {
        send.finish().unwrap();
    }
    tokio::time::timeout(Duration::from_secs(10), read_frame::<Response, _>(&mut recv, FRAME_BODY_MAX_BYTES))
        .await
        .expect("server answers a bad frame promptly")
        .expect("the answer is a well-formed error frame")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversized_and_wrong_version_frames_close_only_their_stream() {
    let cluster = Cluster::new();
    let node = cluster.node("node-f", "127.0.0.7");
    let client = cluster.client(Role::Client, "client");
    client.call(node.addr, RequestBody::NodeStatus).await.unwrap();

    // A stream that sends half a frame and stalls must not hold up anyone else.
    let (mut stalled, _stalled_recv) = client.open_stream(node.addr).await.unwrap();
    stalled.write_all(&[FRAME_MAGIC[0], FRAME_MAGIC[1], 1, 0, 100, 0, 0, 0, 1, 2]).await.unwrap();

    let header = |version: u16, len: u32| {
        let mut h = FRAME_MAGIC.to_vec();
        h.extend_from_slice(&version.to_le_bytes());
        h.extend_from_slice(&len.to_le_bytes());
        h
    };
    // Garbage body under a good header.
    let mut garbage = header(PROTOCOL_VERSION, 16);
    garbage.extend_from_slice(&[0xFF; 16]);
    let r = raw_exchange(&client, node.addr, &garbage, true).await;
    assert_eq!(r.unwrap_err().code, ErrorCode::Malformed);
    // Not even a header: bad magic.
    let r = raw_exchange(&client, node.addr, b"GET / HTTP/1.1\r\n", true).await;
    assert_eq!(r.unwrap_err().code, ErrorCode::Malformed);
    // Oversized: refused from the header alone; the body is never read.
    let r = raw_exchange(&client, node.addr, &header(PROTOCOL_VERSION, 1 << 30), false).await;
    assert_eq!(r.unwrap_err().code, ErrorCode::FrameTooLarge { max_bytes: FRAME_BODY_MAX_BYTES });
    // Wrong protocol version: refused, naming the version this node speaks.
    let mut future = header(PROTOCOL_VERSION + 1, 4);
    future.extend_from_slice(&[0; 4]);
    let r = raw_exchange(&client, node.addr, &future, true).await;
    let err = r.unwrap_err();
    assert_eq!(err.code, ErrorCode::UnsupportedVersion { supported: PROTOCOL_VERSION });
    assert!(err.message.contains(&(PROTOCOL_VERSION + 1).to_string()), "{}", err.message);
    // Truncated frame: the stream ends early.
    let mut good =
        augur_proto::frame::encode_frame(&Request { deadline_ms: 1000, body: RequestBody::NodeStatus })
            .unwrap();
    good.pop();
    let r = raw_exchange(&client, node.addr, &good, true).await;
    assert_eq!(r.unwrap_err().code, ErrorCode::Malformed);

    // Through all of that, the same connection and fresh ones are served.
    client.call(node.addr, RequestBody::NodeStatus).await.unwrap();
    cluster.client(Role::Client, "client2").call(node.addr, RequestBody::NodeStatus).await.unwrap();
}

#[test]
fn bad_configs_and_flags_are_named() {
    let cluster = Cluster::new();
    let tls = cluster.tls(Role::Node, "node-cfg");
    let tls = tls.to_str().unwrap();
    let cfg = cluster.path().join("bad.toml");
    let data = cluster.path().join("d");
    let data = data.to_str().unwrap();

    std::fs::write(&cfg, "cache-bytes = 5\n").unwrap();
    let (ok, _, err) =
        augur(&["node", "serve", "--config", cfg.to_str().unwrap(), "--data-dir", data, "--tls", tls]);
    assert!(!ok && err.contains("cache-bytes"), "{err}");

    std::fs::write(&cfg, "connections-max = 0\n").unwrap();
    let (ok, _, err) =
        augur(&["node", "serve", "--config", cfg.to_str().unwrap(), "--data-dir", data, "--tls", tls]);
    assert!(!ok && err.contains("connections-max"), "{err}");

    std::fs::write(&cfg, "listen = 7\n").unwrap();
    let (ok, _, err) = augur(&["node", "serve", "--config", cfg.to_str().unwrap()]);
    assert!(!ok && err.contains("listen"), "{err}");

    let (ok, _, err) = augur(&["node", "serve", "--config", "/nonexistent/augur.toml"]);
    assert!(!ok && err.contains("/nonexistent/augur.toml"), "{err}");

    let (ok, _, err) =
        augur(&["node", "serve", "--listen", "not-an-address", "--data-dir", data, "--tls", tls]);
    assert!(!ok && err.contains("--listen") && err.contains("not-an-address"), "{err}");

    let (ok, _, err) = augur(&["node", "serve", "--tls", tls]);
    assert!(!ok && err.contains("data-dir"), "{err}");

    let (ok, _, err) = augur(&["node", "serve", "--data-dir", data, "--tls", "/nonexistent/tls"]);
    assert!(!ok && err.contains("/nonexistent/tls"), "{err}");

    let (ok, _, err) = augur(&[
        "cert",
        "issue",
        "--ca",
        cluster.path().join("ca").to_str().unwrap(),
        "--role",
        "root",
        "--name",
        "x",
        "--out",
        data,
    ]);
    assert!(!ok && err.contains("root"), "{err}");

    let (ok, _, err) = augur(&["cert", "init", "--dir", cluster.path().join("ca").to_str().unwrap()]);
    assert!(!ok && err.contains("already exists"), "{err}");
}

#[test]
fn status_command_and_metrics_report_the_node() {
    let cluster = Cluster::new();
    let metrics = "127.0.0.8:19188";
    let node = NodeProc::spawn(
        "127.0.0.8:0",
        &cluster.path().join("data/node-st"),
        &cluster.tls(Role::Node, "node-st"),
        &["--metrics", metrics],
    );
    let tls = cluster.tls(Role::Client, "client");
    let addr = node.addr.to_string();
    let (ok, out, err) =
        augur(&["node", "status", "--node", &addr, "--tls", tls.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    let status: HashMap<String, serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(status["listen"], serde_json::Value::String(addr.clone()));
    assert!(status["capacity_bytes"].as_u64().unwrap() > 0);
    let (ok, out, _) = augur(&["node", "status", "--node", &addr, "--tls", tls.to_str().unwrap()]);
    assert!(ok && out.contains("cache"), "{out}");

    // Prometheus text over HTTP, counting the status requests just made.
    let body = (0..50)
        .find_map(|_| {
            use std::io::{Read, Write};
            let mut conn = std::net::TcpStream::connect(metrics).ok().or_else(|| {
                std::thread::sleep(Duration::from_millis(100));
                None
            })?;
            conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
            let mut body = String::new();
            conn.read_to_string(&mut body).ok()?;
            Some(body)
        })
        .expect("metrics endpoint answers");
    assert!(body.contains("augur_rpc_requests_total") && body.contains("node_status"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_free_space_reserve_writes_get_no_space_and_data_is_kept() {
    let cluster = Cluster::new();
    let mut node = cluster.node("node-full", "127.0.0.10");
    let admin = cluster.client(Role::Admin, "admin");
    let client = cluster.client(Role::Client, "client");
    place(&admin, &node, 1).await;
    let kept = BlockId::new(Ino(3), 0);
    write(&client, &node, kept, 0, vec![5u8; BS as usize]).await.unwrap();
    assert!(node.terminate().success());

    // Restart demanding more free space than any disk has: the node is "full".
    let cfg = cluster.path().join("full.toml");
    std::fs::write(&cfg, "reserve-bytes = 1152921504606846976\n").unwrap();
    let full =
        NodeProc::spawn(&node.addr.to_string(), &node.data, &node.tls, &["--config", cfg.to_str().unwrap()]);
    expect_code(write(&client, &full, BlockId::new(Ino(3), 1), 0, vec![1u8; 10]).await, |c| {
        *c == ErrorCode::NoSpace
    });
    expect_code(write(&client, &full, kept, 0, vec![1u8; 10]).await, |c| *c == ErrorCode::NoSpace);
    assert_eq!(
        read(&client, &full, kept, None).await.unwrap(),
        vec![5u8; BS as usize],
        "stored data unharmed"
    );
    assert!(read(&client, &full, BlockId::new(Ino(3), 1), None).await.unwrap().is_empty());
}

/// Unmounts (lazily) the tmpfs at its path when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: &std::path::Path, size: &str) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs at {} (the tests run as root)", path.display());
        Self(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_really_fills_refuses_writes_keeps_data_and_recovers_when_space_is_freed() {
    let cluster = Cluster::new();
    let disk = cluster.path().join("disk");
    let _tmpfs = Tmpfs::mount(&disk, "320m");
    // Freed later: room enough for the node to reopen its store (`STORE_REOPEN_ROOM_BYTES`).
    let filler = disk.join("filler");
    std::fs::write(&filler, vec![1u8; 200 << 20]).unwrap();
    // No reserve: RocksDB itself runs into the full disk.
    let cfg = cluster.path().join("no-reserve.toml");
    std::fs::write(&cfg, "reserve-bytes = 0\n").unwrap();
    let tls = cluster.tls(Role::Node, "node-disk");
    let mut node =
        NodeProc::spawn("127.0.0.11:0", &disk.join("data"), &tls, &["--config", cfg.to_str().unwrap()]);
    let admin = cluster.client(Role::Admin, "admin");
    let client = cluster.client(Role::Client, "client");
    place(&admin, &node, 1).await;

    let mut acked = Vec::new();
    let refusal = loop {
        let i = acked.len() as u64;
        assert!(i < 8192, "a 120 MiB disk took {i} blocks of 64 KiB");
        let block = BlockId::new(Ino(9), i);
        match write(&client, &node, block, 0, content(i * 4, 1)).await {
            Ok(_) => acked.push(block),
            Err(e) => break e,
        }
    };
    eprintln!("refused after {} blocks: {refusal}", acked.len());
    assert_eq!(refusal.code(), Some(&ErrorCode::NoSpace), "{refusal}");
    for (i, block) in acked.iter().enumerate() {
        assert_eq!(read(&client, &node, *block, None).await.unwrap(), content(i as u64 * 4, 1), "{block}");
    }

    // Space comes back: writes go through again, without a restart.
    std::fs::remove_file(&filler).unwrap();
    let next = BlockId::new(Ino(9), acked.len() as u64);
    let started = std::time::Instant::now();
    loop {
        match write(&client, &node, next, 0, content(acked.len() as u64 * 4, 1)).await {
            Ok(_) => break,
            Err(e) => {
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "still refused once space was freed: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    eprintln!("writes resumed after {:?}", started.elapsed());
    // Normally RocksDB itself ran into the full disk and the store was reopened (the node's log
    // is on that disk too, so the line saying it stopped is lost, and the node goes on). Rarely
    // the node's own free-space check, measured at the wrong moment, refuses first and RocksDB
    // never stops: writes resume all the same.
    let log = std::fs::read_to_string(disk.join("data.log")).unwrap();
    eprintln!("store reopened: {}", log.contains("block store reopened"));
    acked.push(next);
    // Everything acked, before the disk filled and after, survives a kill -9.
    node.kill9();
    node.restart();
    for (i, block) in acked.iter().enumerate() {
        assert_eq!(read(&client, &node, *block, None).await.unwrap(), content(i as u64 * 4, 1), "{block}");
    }
}
