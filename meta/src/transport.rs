//! Raft messages between members over the `proto` RPC layer: one sender task per peer that
//! batches whatever is queued into one `Raft` request; snapshots travel out of band, pulled by
//! the receiver in chunks so no frame exceeds its limit.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use augur_proto::msg::{RequestBody, ResponseBody};
use augur_proto::{ErrorCode, RpcClient, WireError};
use raft::prelude::{Message, MessageType};
use serde_bytes::ByteBuf;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::group::{GroupHandle, Input, decode, encode};

/// Messages queued towards one peer; more are dropped (Raft retransmits).
pub const PEER_QUEUE_MAX: usize = 4096;
/// Most messages in one `Raft` request.
pub const MESSAGES_PER_REQUEST_MAX: usize = 128;
/// Most encoded bytes in one `Raft` request (well under the frame limit).
pub const REQUEST_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Deadline of one `Raft` request.
pub const SEND_DEADLINE: Duration = Duration::from_secs(2);
/// Bytes of snapshot one `SnapshotChunk` answer carries.
pub const SNAPSHOT_CHUNK_BYTES: usize = 4 * 1024 * 1024;
/// Largest snapshot a member accepts.
pub const SNAPSHOT_BYTES_MAX: u64 = 4 * 1024 * 1024 * 1024;

pub struct Transport {
    rt: tokio::runtime::Handle,
    rpc: Arc<RpcClient>,
    handle: Option<GroupHandle>,
    peers: HashMap<u64, mpsc::Sender<Message>>,
}

impl Transport {
    pub fn new(rt: tokio::runtime::Handle, rpc: Arc<RpcClient>) -> Self {
        Self { rt, rpc, handle: None, peers: HashMap::new() }
    }

    /// Connects the transport to its group (done once the group exists).
    pub fn bind(&mut self, handle: GroupHandle) {
        self.handle = Some(handle);
    }

    /// Queues a message for its peer; never blocks the group thread.
    pub fn send(&mut self, msg: Message) {
        let Some(handle) = self.handle.clone() else { return };
        let to = msg.to;
        let rpc = self.rpc.clone();
        let rt = self.rt.clone();
        let tx = self.peers.entry(to).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(PEER_QUEUE_MAX);
            rt.spawn(peer_task(to, rx, rpc, handle));
            tx
        });
        if let Err(mpsc::error::TrySendError::Full(m)) = tx.try_send(msg) {
            debug!(to, kind = ?m.get_msg_type(), "peer queue full; message dropped");
        }
    }
}

fn peer_addr(handle: &GroupHandle, id: u64) -> Option<SocketAddr> {
    handle.shared.members.read().unwrap_or_else(|p| p.into_inner()).get(&id).and_then(|a| a.parse().ok())
}

async fn peer_task(to: u64, mut rx: mpsc::Receiver<Message>, rpc: Arc<RpcClient>, handle: GroupHandle) {
    let mut reported_down = false;
    while let Some(first) = rx.recv().await {
        let mut msgs = vec![first];
        let mut bytes = 0;
        while msgs.len() < MESSAGES_PER_REQUEST_MAX && bytes < REQUEST_BYTES_MAX {
            match rx.try_recv() {
                Ok(m) => {
                    bytes += m.entries.iter().map(|e| e.data.len()).sum::<usize>();
                    msgs.push(m);
                }
                Err(_) => break,
            }
        }
        let snapshots = msgs.iter().filter(|m| m.get_msg_type() == MessageType::MsgSnapshot).count();
        let Some(addr) = peer_addr(&handle, to) else {
            debug!(to, "no address for peer; dropping messages");
            continue;
        };
        let body = RequestBody::Raft { msgs: msgs.iter().map(|m| ByteBuf::from(encode(m))).collect() };
        let ok = match rpc.call_with_deadline(addr, body, SEND_DEADLINE).await {
            Ok(_) => {
                if reported_down {
                    info!(to, %addr, "peer reachable again");
                    reported_down = false;
                }
                true
            }
            Err(e) => {
                if !reported_down {
                    warn!(to, %addr, error = %e, "peer unreachable");
                    reported_down = true;
                }
                let _ = handle.send(Input::Unreachable(to));
                false
            }
        };
        for _ in 0..snapshots {
            let _ = handle.send(Input::SnapshotDone { to, ok });
        }
        if !ok {
            // Do not spin on a dead peer: raft will send again after its next tick.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Receiving side: hands decoded messages to the group, fetching snapshot data first.
pub struct Receiver {
    handle: GroupHandle,
    rpc: Arc<RpcClient>,
    fetching: Arc<AtomicBool>,
}

impl Receiver {
    pub fn new(handle: GroupHandle, rpc: Arc<RpcClient>) -> Self {
        Self { handle, rpc, fetching: Arc::new(AtomicBool::new(false)) }
    }

    pub fn receive(&self, msgs: Vec<ByteBuf>) -> Result<(), WireError> {
        for bytes in msgs {
            let mut msg = decode(&bytes).map_err(|m| WireError::new(ErrorCode::Malformed, m))?;
            let initialized = self.handle.shared.initialized.load(Ordering::Acquire);
            if !initialized && msg.get_msg_type() == MessageType::MsgHeartbeat {
                // A leader that still counts entries this (wiped) member once held would make
                // raft-rs commit past the empty log and panic; the member commits nothing
                // until its snapshot arrives (re-added, the leader sends one).
                msg.commit = 0;
            }
            match msg.get_msg_type() {
                // A member that lost its state (or never had any) does not vote: it may have
                // voted in this term before it was wiped.
                MessageType::MsgRequestVote | MessageType::MsgRequestPreVote if !initialized => {
                    debug!(from = msg.from, "not voting before the first snapshot");
                }
                MessageType::MsgSnapshot => {
                    if self.fetching.swap(true, Ordering::AcqRel) {
                        continue; // one at a time; the leader resends
                    }
                    let (handle, rpc, fetching) =
                        (self.handle.clone(), self.rpc.clone(), self.fetching.clone());
                    tokio::spawn(async move {
                        match fetch_snapshot(&rpc, &handle, msg).await {
                            Ok(msg) => {
                                let _ = handle.send(Input::Raft(Box::new(msg)));
                            }
                            Err(e) => warn!(error = %e, "snapshot transfer failed; the leader will retry"),
                        }
                        fetching.store(false, Ordering::Release);
                    });
                }
                _ => self.handle.send(Input::Raft(Box::new(msg)))?,
            }
        }
        Ok(())
    }

    /// Serves a chunk of the snapshot this member last sent.
    pub fn chunk(&self, index: u64, offset: u64) -> Result<ResponseBody, WireError> {
        let guard = self.handle.shared.outgoing_snapshot.lock().unwrap_or_else(|p| p.into_inner());
        let Some((i, data)) = guard.as_ref().filter(|(i, _)| *i == index) else {
            return Err(WireError::new(ErrorCode::NotFound, format!("no snapshot at index {index} here")));
        };
        let start = (offset as usize).min(data.len());
        let end = (start + SNAPSHOT_CHUNK_BYTES).min(data.len());
        debug!(index = i, start, end, "serving snapshot chunk");
        Ok(ResponseBody::SnapshotChunk {
            data: ByteBuf::from(data[start..end].to_vec()),
            total_bytes: data.len() as u64,
        })
    }
}

async fn fetch_snapshot(rpc: &RpcClient, handle: &GroupHandle, mut msg: Message) -> Result<Message, String> {
    let from = msg.from;
    let addr = peer_addr(handle, from).ok_or_else(|| format!("no address for member {from}"))?;
    let index = msg.get_snapshot().get_metadata().index;
    let mut data = Vec::new();
    loop {
        let body = RequestBody::SnapshotChunk { index, offset: data.len() as u64 };
        match rpc.call(addr, body).await.map_err(|e| e.to_string())? {
            ResponseBody::SnapshotChunk { data: chunk, total_bytes } => {
                if total_bytes > SNAPSHOT_BYTES_MAX {
                    return Err(format!("snapshot of {total_bytes} bytes exceeds {SNAPSHOT_BYTES_MAX}"));
                }
                data.extend_from_slice(&chunk);
                if data.len() as u64 >= total_bytes {
                    break;
                }
                if chunk.is_empty() {
                    return Err("snapshot ended early".into());
                }
            }
            other => return Err(format!("unexpected answer to a snapshot chunk: {other:?}")),
        }
    }
    info!(from, index, bytes = data.len(), "snapshot received");
    msg.mut_snapshot().data = data.into();
    Ok(msg)
}
