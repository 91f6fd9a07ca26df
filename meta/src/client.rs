//! Calling the meta group from anywhere (CLI, storage nodes, the file system): finds the
//! leader, follows redirects, retries through elections, and tags namespace writes so a retry
//! never applies twice.

use std::collections::BTreeSet;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use augur_proto::meta::{NsOp, NsReply, RequestTag};
use augur_proto::msg::{RequestBody, ResponseBody};
use augur_proto::{ErrorCode, RpcClient, RpcError, VolumeId};
use tracing::debug;

/// How long one logical call keeps retrying through leader changes and lost members.
pub const META_CALL_DEADLINE: Duration = Duration::from_secs(30);
/// Deadline of one attempt.
pub const META_ATTEMPT_DEADLINE: Duration = Duration::from_secs(5);
/// First and largest pause between attempts when no leader is known.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_millis(800);

/// Parses `--meta 127.0.0.1:7001,127.0.0.1:7002`.
pub fn parse_addrs(s: &str) -> Result<Vec<SocketAddr>, String> {
    let addrs: Vec<SocketAddr> = s
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|a| a.parse().map_err(|e| format!("meta address {a:?}: {e}")))
        .collect::<Result<_, _>>()?;
    if addrs.is_empty() {
        return Err("no meta addresses given".into());
    }
    Ok(addrs)
}

pub struct MetaClient {
    rpc: Arc<RpcClient>,
    addrs: Mutex<Vec<SocketAddr>>,
    leader: Mutex<Option<SocketAddr>>,
    next: AtomicUsize,
    client_id: u64,
    seq: AtomicU64,
    outstanding: Mutex<BTreeSet<u64>>,
    pub deadline: Duration,
}

impl MetaClient {
    pub fn new(rpc: Arc<RpcClient>, addrs: Vec<SocketAddr>) -> Self {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos(),
        );
        h.write_u32(std::process::id());
        Self {
            rpc,
            addrs: Mutex::new(addrs),
            leader: Mutex::new(None),
            next: AtomicUsize::new(0),
            client_id: h.finish() | 1,
            seq: AtomicU64::new(1),
            outstanding: Mutex::new(BTreeSet::new()),
            deadline: META_CALL_DEADLINE,
        }
    }

    pub fn rpc(&self) -> &Arc<RpcClient> {
        &self.rpc
    }

    /// The member believed to lead, if any.
    pub fn leader(&self) -> Option<SocketAddr> {
        *self.leader.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pick(&self) -> SocketAddr {
        if let Some(l) = self.leader() {
            return l;
        }
        let addrs = self.addrs.lock().unwrap_or_else(|p| p.into_inner());
        addrs[self.next.fetch_add(1, Ordering::Relaxed) % addrs.len()]
    }

    fn set_leader(&self, addr: Option<SocketAddr>) {
        *self.leader.lock().unwrap_or_else(|p| p.into_inner()) = addr;
        if let Some(a) = addr {
            let mut addrs = self.addrs.lock().unwrap_or_else(|p| p.into_inner());
            if !addrs.contains(&a) {
                addrs.push(a);
            }
        }
    }

    /// Sends a request to the leader, following redirects and retrying until `deadline`.
    pub async fn call(&self, body: RequestBody) -> Result<ResponseBody, RpcError> {
        let started = Instant::now();
        let mut backoff = BACKOFF_MIN;
        loop {
            let addr = self.pick();
            let result = self.rpc.call_with_deadline(addr, body.clone(), META_ATTEMPT_DEADLINE).await;
            let retry_after = match &result {
                Ok(_) => {
                    self.set_leader(Some(addr));
                    return result;
                }
                Err(e) => match e.code() {
                    Some(ErrorCode::NotLeader { leader: Some(l) }) => match l.parse::<SocketAddr>() {
                        Ok(l) if l != addr => {
                            self.set_leader(Some(l));
                            Duration::ZERO
                        }
                        _ => {
                            self.set_leader(None);
                            backoff
                        }
                    },
                    Some(
                        ErrorCode::NotLeader { leader: None }
                        | ErrorCode::Unavailable
                        | ErrorCode::Overloaded,
                    ) => {
                        self.set_leader(None);
                        backoff
                    }
                    None if e.is_transport() => {
                        self.set_leader(None);
                        backoff
                    }
                    _ => return result,
                },
            };
            if started.elapsed() + retry_after >= self.deadline {
                return result;
            }
            debug!(%addr, error = %result.as_ref().err().map(|e| e.to_string()).unwrap_or_default(), "meta call retrying");
            if !retry_after.is_zero() {
                tokio::time::sleep(retry_after).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }

    /// A namespace operation; writes carry a tag so a retry is answered, not re-applied.
    pub async fn ns(&self, volume: VolumeId, op: NsOp) -> Result<NsReply, RpcError> {
        let tag = op.is_write().then(|| {
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            let mut out = self.outstanding.lock().unwrap_or_else(|p| p.into_inner());
            out.insert(seq);
            let done_below = *out.first().expect("just inserted");
            RequestTag { client: self.client_id, seq, done_below }
        });
        let result = self.call(RequestBody::Ns { volume, op, tag }).await;
        if let Some(t) = tag {
            self.outstanding.lock().unwrap_or_else(|p| p.into_inner()).remove(&t.seq);
        }
        match result? {
            ResponseBody::Ns(reply) => Ok(reply),
            other => Err(RpcError::Unexpected { addr: "meta".into(), what: format!("{other:?}") }),
        }
    }
}
