//! QUIC endpoints and the request/response RPC layer shared by every role.
//!
//! One connection per peer, one bidirectional stream per request: the caller writes one request
//! frame and finishes its side; the server answers with one response frame. The server learns
//! the caller's role once per connection from its certificate and checks it on every request.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, VarInt};
use quinn_proto::HashedConnectionIdGenerator;
use rustls::pki_types::CertificateDer;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::error::{ErrorCode, FrameError, RpcError, TlsError, WireError};
use crate::frame::{FRAME_BODY_MAX_BYTES, read_frame, read_frame_budgeted, write_frame};
use crate::msg::{DEADLINE_MS_MAX, Request, RequestBody, Response, ResponseBody};
use crate::tls::{CLUSTER_SERVER_NAME, Role, TlsIdentity, name_of, role_of};

/// Most concurrent request streams one peer may hold open on one connection.
pub const STREAMS_PER_CONNECTION_MAX: u32 = 256;
/// Bytes one stream may have unread in flight towards us (QUIC stream flow-control window).
pub const STREAM_WINDOW_BYTES: u32 = 8 * 1024 * 1024;
/// Bytes one connection may have unread in flight towards us, over all its streams.
pub const CONNECTION_WINDOW_BYTES: u32 = 64 * 1024 * 1024;
/// A connection with no traffic (keep-alives included) for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Callers ping idle connections this often so servers do not drop them.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// Longest wait for a QUIC + TLS handshake before a peer is considered unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a shutting-down server waits for in-flight requests before closing connections.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Deadline of requests sent without an explicit one.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);

/// Application close / stop codes.
const CODE_SHUTDOWN: VarInt = VarInt::from_u32(1);
const CODE_BAD_PEER: VarInt = VarInt::from_u32(2);
const CODE_BAD_FRAME: VarInt = VarInt::from_u32(3);

fn transport_config(keep_alive: bool) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(STREAMS_PER_CONNECTION_MAX))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW_BYTES))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW_BYTES))
        .max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("idle timeout fits a VarInt")));
    if keep_alive {
        t.keep_alive_interval(Some(KEEP_ALIVE_INTERVAL));
    }
    t
}

fn client_config(identity: &TlsIdentity) -> Result<quinn::ClientConfig, TlsError> {
    let crypto = QuicClientConfig::try_from(identity.client_config()?).map_err(|e| {
        TlsError::BadMaterial { path: identity.dir.display().to_string(), reason: e.to_string() }
    })?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(true)));
    Ok(config)
}

/// A QUIC endpoint that serves on `listen` and can also call other peers (nodes replicate to
/// each other, meta members talk among themselves).
pub fn server_endpoint(identity: &TlsIdentity, listen: SocketAddr) -> Result<Endpoint, std::io::Error> {
    let to_io = |e: TlsError| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string());
    let crypto = QuicServerConfig::try_from(identity.server_config().map_err(to_io)?)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(false)));
    let (reset_key, cid_key) = identity.restart_stable_keys();
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
    endpoint_config.cid_generator(move || Box::new(HashedConnectionIdGenerator::from_key(cid_key)));
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for the QUIC endpoint"))?;
    let socket = std::net::UdpSocket::bind(listen)?;
    let mut endpoint = Endpoint::new(endpoint_config, Some(config), socket, runtime)?;
    endpoint.set_default_client_config(client_config(identity).map_err(to_io)?);
    Ok(endpoint)
}

/// A client-only QUIC endpoint bound to an ephemeral port (dual-stack where the host allows).
pub fn client_endpoint(identity: &TlsIdentity) -> Result<Endpoint, std::io::Error> {
    let mut endpoint = Endpoint::client("[::]:0".parse().expect("literal address"))
        .or_else(|_| Endpoint::client("0.0.0.0:0".parse().expect("literal address")))?;
    endpoint.set_default_client_config(
        client_config(identity)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?,
    );
    Ok(endpoint)
}

/// Who is calling: learned from the peer's certificate when its connection was accepted.
#[derive(Clone, Debug)]
pub struct Peer {
    pub role: Role,
    pub name: String,
    pub addr: SocketAddr,
}

fn peer_of(conn: &Connection) -> Result<Peer, String> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or("no peer certificate")?;
    let leaf = certs.first().ok_or("empty peer certificate chain")?;
    let role = role_of(leaf).ok_or("peer certificate carries no augur role")?;
    Ok(Peer { role, name: name_of(leaf).unwrap_or_default(), addr: conn.remote_address() })
}

/// What a server does with a request that passed framing, version and role checks.
pub trait Service: Send + Sync + 'static {
    fn handle(&self, peer: &Peer, body: RequestBody) -> impl Future<Output = Response> + Send;

    /// Most bytes the answer to `body` can hold. They are reserved from the server's response
    /// budget (`ServerLimits::response_bytes_in_flight_max`) before the request is handled and
    /// freed once the answer is sent (or dropped, for a caller past its deadline). Default 0:
    /// for answers no bigger than their request, which the request budget already bounds.
    fn response_bytes(&self, _body: &RequestBody) -> u32 {
        0
    }
}

/// Limits of one server.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    /// Most connections open at once; further handshakes are refused.
    pub connections_max: usize,
    /// Most requests being handled at once over all connections; further streams wait.
    pub requests_in_flight_max: usize,
    /// Most request body bytes held at once over all requests (read, or being handled); a
    /// request whose body does not fit waits after its header. At least
    /// `FRAME_BODY_MAX_BYTES`, so any one request fits.
    pub request_bytes_in_flight_max: usize,
    /// Most answer bytes reserved at once over all requests (`Service::response_bytes`: being
    /// handled, or being sent); a request whose answer does not fit waits before its handler.
    /// At least `FRAME_BODY_MAX_BYTES`, so any one answer fits.
    pub response_bytes_in_flight_max: usize,
}

/// `ServerLimits::request_bytes_in_flight_max` by default: 256 MiB, about 28 of the largest
/// requests (a batch write of 8 MiB of blocks) against the 1 024 requests of the count limit.
pub const REQUEST_BYTES_IN_FLIGHT_MAX: usize = 256 << 20;
/// `ServerLimits::response_bytes_in_flight_max` by default: 256 MiB, 32 batch reads of the
/// largest size (8 MiB) against the 1 024 requests of the count limit.
pub const RESPONSE_BYTES_IN_FLIGHT_MAX: usize = 256 << 20;

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            connections_max: 1024,
            requests_in_flight_max: 1024,
            request_bytes_in_flight_max: REQUEST_BYTES_IN_FLIGHT_MAX,
            response_bytes_in_flight_max: RESPONSE_BYTES_IN_FLIGHT_MAX,
        }
    }
}

/// Serves `service` on `endpoint` until `shutdown` is cancelled, then closes every connection
/// and waits for in-flight requests to finish.
pub async fn serve<S: Service>(
    endpoint: Endpoint,
    service: Arc<S>,
    limits: ServerLimits,
    shutdown: CancellationToken,
) {
    let tasks = TaskTracker::new();
    let in_flight = Arc::new(Semaphore::new(limits.requests_in_flight_max));
    let floor = |max: usize| max.max(FRAME_BODY_MAX_BYTES as usize);
    let budgets = Budgets {
        requests: Arc::new(Semaphore::new(floor(limits.request_bytes_in_flight_max))),
        responses: Arc::new(Semaphore::new(floor(limits.response_bytes_in_flight_max))),
    };
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        if endpoint.open_connections() >= limits.connections_max {
            warn!(peer = %incoming.remote_address(), max = limits.connections_max, "refusing connection: too many open");
            incoming.refuse();
            continue;
        }
        let service = service.clone();
        let (in_flight, budgets) = (in_flight.clone(), budgets.clone());
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let addr = incoming.remote_address();
            let conn = match incoming.await {
                Ok(conn) => conn,
                Err(e) => {
                    // Includes peers without a certificate signed by the cluster CA.
                    warn!(peer = %addr, error = %e, "refused connection: handshake failed");
                    return;
                }
            };
            let peer = match peer_of(&conn) {
                Ok(peer) => peer,
                Err(reason) => {
                    warn!(peer = %addr, reason, "refused connection");
                    conn.close(CODE_BAD_PEER, reason.as_bytes());
                    return;
                }
            };
            debug!(peer = %addr, role = %peer.role, name = %peer.name, "connection accepted");
            serve_connection(conn, peer, service, in_flight, budgets, shutdown).await;
        });
    }
    // Stop taking requests, let those in flight finish (bounded), then say goodbye.
    tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait()).await.is_err() {
        warn!(
            grace_ms = SHUTDOWN_GRACE.as_millis() as u64,
            "requests still running at shutdown; closing anyway"
        );
    }
    endpoint.close(CODE_SHUTDOWN, b"server shutting down");
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, endpoint.wait_idle()).await;
}

/// The server's byte budgets (`ServerLimits`), shared by every connection.
#[derive(Clone)]
struct Budgets {
    requests: Arc<Semaphore>,
    responses: Arc<Semaphore>,
}

async fn serve_connection<S: Service>(
    conn: Connection,
    peer: Peer,
    service: Arc<S>,
    in_flight: Arc<Semaphore>,
    budgets: Budgets,
    shutdown: CancellationToken,
) {
    let streams = TaskTracker::new();
    loop {
        let (send, recv) = tokio::select! {
            _ = shutdown.cancelled() => break,
            stream = conn.accept_bi() => match stream {
                Ok(stream) => stream,
                Err(e) => {
                    debug!(peer = %peer.addr, error = %e, "connection closed");
                    break;
                }
            },
        };
        // Waits for a slot, but not past shutdown (handlers stuck on a hung disk keep theirs).
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = in_flight.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let service = service.clone();
        let peer = peer.clone();
        let (tracker, budgets) = (streams.clone(), budgets.clone());
        streams.spawn(async move {
            serve_stream(send, recv, &peer, service, permit, &budgets, &tracker).await;
        });
    }
    streams.close();
    streams.wait().await;
}

/// Serves one request stream. Its body's bytes are taken from the request budget before it is
/// read (`ServerLimits::request_bytes_in_flight_max`), and its answer's most bytes from the
/// response budget before it is handled, until the answer is sent. The handler runs as a task
/// of its own, holding the request's in-flight `permit` and its bytes until it returns (and
/// the answer's reservation until the answer is sent or dropped): when the deadline passes the caller is answered
/// `DeadlineExceeded`, but the handler is not dropped halfway (a storage node's write would
/// otherwise release its locks with its replication under way, and a later write of the same
/// block could overtake it on a backup), and the in-flight limit still counts it.
async fn serve_stream<S: Service>(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    peer: &Peer,
    service: Arc<S>,
    permit: tokio::sync::OwnedSemaphorePermit,
    budgets: &Budgets,
    tracker: &TaskTracker,
) {
    let started = Instant::now();
    let request = read_frame_budgeted::<Request, _>(&mut recv, FRAME_BODY_MAX_BYTES, &budgets.requests).await;
    // Held until the answer is sent.
    let mut reserved = None;
    let (name, response): (&str, Response) = match request {
        Err(e) => {
            warn!(peer = %peer.addr, role = %peer.role, error = %e, "bad request frame; closing stream");
            // Stop the peer from sending the rest of a frame we will not read.
            let _ = recv.stop(CODE_BAD_FRAME);
            ("bad_frame", Err(e.to_wire()))
        }
        Ok((request, held)) => {
            let name = request.body.name();
            if !request.body.allowed_roles().contains(&peer.role) {
                warn!(peer = %peer.addr, role = %peer.role, rpc = name, "refused: role may not call this RPC");
                let msg = format!("role {} may not call {name}", peer.role);
                (name, Err(WireError::new(ErrorCode::PermissionDenied, msg)))
            } else {
                let deadline = Duration::from_millis(u64::from(request.deadline_ms.min(DEADLINE_MS_MAX)));
                let handler_peer = peer.clone();
                let responses = budgets.responses.clone();
                let handler = tracker.spawn(async move {
                    let want = service.response_bytes(&request.body).min(FRAME_BODY_MAX_BYTES);
                    // Room for the answer is waited for no longer than the caller waits; past
                    // that the handler never runs.
                    let answer_bytes =
                        match tokio::time::timeout(deadline, responses.acquire_many_owned(want)).await {
                            Ok(Ok(answer_bytes)) => answer_bytes,
                            Ok(Err(_)) => {
                                return (
                                    Err(WireError::new(ErrorCode::Unavailable, "server shutting down")),
                                    None,
                                );
                            }
                            Err(_) => {
                                let msg = format!("no room for a {want}-byte answer within the deadline");
                                return (Err(WireError::new(ErrorCode::Overloaded, msg)), None);
                            }
                        };
                    let response = service.handle(&handler_peer, request.body).await;
                    drop((permit, held));
                    (response, Some(answer_bytes))
                });
                let response = match tokio::time::timeout(deadline, handler).await {
                    Ok(Ok((response, answer_bytes))) => {
                        reserved = answer_bytes;
                        response
                    }
                    Ok(Err(e)) => {
                        Err(WireError::new(ErrorCode::Internal, format!("{name} handler failed: {e}")))
                    }
                    Err(_) => Err(WireError::new(
                        ErrorCode::DeadlineExceeded,
                        format!("{name} exceeded its {} ms deadline", deadline.as_millis()),
                    )),
                };
                (name, response)
            }
        }
    };
    let outcome = match &response {
        Ok(_) => "ok",
        Err(e) => error_label(&e.code),
    };
    metrics::counter!("augur_rpc_requests_total", "rpc" => name, "outcome" => outcome).increment(1);
    metrics::histogram!("augur_rpc_seconds", "rpc" => name).record(started.elapsed().as_secs_f64());
    if let Err(e) = write_frame(&mut send, &response).await {
        debug!(peer = %peer.addr, error = %e, "could not send response");
        return;
    }
    drop(reserved);
    let _ = send.finish();
}

fn error_label(code: &ErrorCode) -> &'static str {
    match code {
        ErrorCode::StaleEpoch { .. } | ErrorCode::EpochAhead { .. } => "epoch",
        ErrorCode::ShardNotHere => "shard_not_here",
        ErrorCode::ChecksumMismatch => "checksum",
        ErrorCode::InvalidArgument => "invalid",
        ErrorCode::PermissionDenied => "denied",
        ErrorCode::NoSpace => "no_space",
        ErrorCode::UnsupportedVersion { .. } | ErrorCode::FrameTooLarge { .. } | ErrorCode::Malformed => {
            "bad_frame"
        }
        ErrorCode::DeadlineExceeded => "deadline",
        ErrorCode::Overloaded => "overloaded",
        ErrorCode::Internal => "internal",
        ErrorCode::NotFound => "not_found",
        ErrorCode::NotLeader { .. } => "not_leader",
        ErrorCode::Unavailable => "unavailable",
        ErrorCode::AlreadyExists
        | ErrorCode::NotEmpty
        | ErrorCode::NotDirectory
        | ErrorCode::IsDirectory
        | ErrorCode::NoData
        | ErrorCode::NameTooLong => "namespace",
        ErrorCode::NotPrimary => "not_primary",
    }
}

type ConnSlot = Arc<tokio::sync::Mutex<Option<Connection>>>;

/// Calls servers over cached connections (one per peer address).
pub struct RpcClient {
    endpoint: Endpoint,
    conns: Mutex<HashMap<SocketAddr, ConnSlot>>,
}

impl RpcClient {
    /// A client with its own ephemeral endpoint.
    pub fn new(identity: &TlsIdentity) -> Result<Self, std::io::Error> {
        Ok(Self::with_endpoint(client_endpoint(identity)?))
    }

    /// A client sharing a server's endpoint (its default client config must be set).
    pub fn with_endpoint(endpoint: Endpoint) -> Self {
        Self { endpoint, conns: Mutex::new(HashMap::new()) }
    }

    fn slot(&self, addr: SocketAddr) -> ConnSlot {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.entry(addr).or_default().clone()
    }

    /// The open connection to `addr`, connecting (and checking the server's role) if needed.
    pub async fn connection(&self, addr: SocketAddr) -> Result<Connection, RpcError> {
        let slot = self.slot(addr);
        let mut guard = slot.lock().await;
        if let Some(conn) = guard.as_ref().filter(|c| c.close_reason().is_none()) {
            return Ok(conn.clone());
        }
        let connect_err = |reason: String| RpcError::Connect { addr: addr.to_string(), reason };
        let connecting =
            self.endpoint.connect(addr, CLUSTER_SERVER_NAME).map_err(|e| connect_err(e.to_string()))?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| connect_err(format!("no handshake within {} ms", CONNECT_TIMEOUT.as_millis())))?
            .map_err(|e| connect_err(e.to_string()))?;
        let peer = peer_of(&conn).map_err(|e| connect_err(e.to_string()))?;
        if !peer.role.is_server() {
            conn.close(CODE_BAD_PEER, b"server presented a non-server role");
            return Err(RpcError::WrongPeerRole { addr: addr.to_string(), role: peer.role.to_string() });
        }
        *guard = Some(conn.clone());
        Ok(conn)
    }

    /// Drops the cached connection to `addr` (after it failed).
    pub fn forget(&self, addr: SocketAddr) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.remove(&addr);
    }

    /// Sends `body` to `addr` with the default deadline.
    pub async fn call(&self, addr: SocketAddr, body: RequestBody) -> Result<ResponseBody, RpcError> {
        self.call_with_deadline(addr, body, DEFAULT_DEADLINE).await
    }

    /// Sends `body` to `addr`; after `deadline` the server answers `DeadlineExceeded` (its
    /// handler still runs to completion) and we stop waiting.
    ///
    /// A request that fails because its connection was lost (a peer restarted on the same
    /// address answers a stale connection with a reset) is sent once more on a fresh
    /// connection, within the same deadline. Every request of the protocol is idempotent
    /// (block writes name their offset, deletes their range), so a repeat is harmless.
    pub async fn call_with_deadline(
        &self,
        addr: SocketAddr,
        body: RequestBody,
        deadline: Duration,
    ) -> Result<ResponseBody, RpcError> {
        let deadline_ms = u32::try_from(deadline.as_millis()).unwrap_or(u32::MAX).min(DEADLINE_MS_MAX);
        let request = Request { deadline_ms, body };
        let attempts = async {
            match self.exchange(addr, &request).await {
                Err(RpcError::Connection { .. }) => {
                    self.forget(addr);
                    self.exchange(addr, &request).await
                }
                other => other,
            }
        };
        match tokio::time::timeout(deadline, attempts).await {
            Ok(Err(e)) if e.is_transport() => {
                self.forget(addr);
                Err(e)
            }
            Ok(result) => result,
            Err(_) => {
                self.forget(addr);
                Err(RpcError::Timeout { addr: addr.to_string(), ms: deadline.as_millis() as u64 })
            }
        }
    }

    /// One request/response exchange on a new stream.
    async fn exchange(&self, addr: SocketAddr, request: &Request) -> Result<ResponseBody, RpcError> {
        let lost = |e: &dyn std::fmt::Display| RpcError::Connection {
            addr: addr.to_string(),
            reason: e.to_string(),
        };
        let frame_err = |e: FrameError| match e {
            FrameError::Io(io) => lost(&io),
            FrameError::Truncated => lost(&"stream closed before the response"),
            other => RpcError::Frame { addr: addr.to_string(), error: other },
        };
        let (mut send, mut recv) = self.open_stream(addr).await?;
        write_frame(&mut send, request).await.map_err(frame_err)?;
        let _ = send.finish();
        let response = read_frame::<Response, _>(&mut recv, FRAME_BODY_MAX_BYTES).await.map_err(frame_err)?;
        response.map_err(|error| RpcError::Remote { addr: addr.to_string(), error })
    }

    /// Opens a raw request stream to `addr`, reconnecting once if the cached connection died.
    /// Tests use it to send hand-made frames.
    pub async fn open_stream(
        &self,
        addr: SocketAddr,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), RpcError> {
        for attempt in 0..2 {
            let conn = self.connection(addr).await?;
            match conn.open_bi().await {
                Ok(stream) => return Ok(stream),
                Err(e) if attempt == 0 => {
                    info!(peer = %addr, error = %e, "cached connection failed; reconnecting");
                    self.forget(addr);
                }
                Err(e) => {
                    return Err(RpcError::Connection { addr: addr.to_string(), reason: e.to_string() });
                }
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// Round-trip time of the connection to `addr`, if one is open.
    pub fn rtt(&self, addr: SocketAddr) -> Option<Duration> {
        let slot = self.conns.lock().unwrap_or_else(|p| p.into_inner()).get(&addr).cloned()?;
        let guard = slot.try_lock().ok()?;
        guard.as_ref().map(|c| c.rtt())
    }

    /// Closes every connection politely.
    pub async fn close(&self) {
        self.endpoint.close(CODE_SHUTDOWN, b"client closing");
        self.endpoint.wait_idle().await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::tls::{Role, init_ca, issue};

    /// Sleeps in every request, noting when each starts and ends.
    struct Slow {
        events: Mutex<Vec<&'static str>>,
    }

    impl Service for Slow {
        async fn handle(&self, _: &Peer, _: RequestBody) -> Response {
            self.events.lock().unwrap().push("start");
            tokio::time::sleep(Duration::from_millis(400)).await;
            self.events.lock().unwrap().push("end");
            Ok(ResponseBody::PlacementSet)
        }
    }

    /// Each handler notes its start, waits (up to a second) until two handlers have started,
    /// and notes its end. With `big`, every answer reserves the whole response budget.
    struct Meet {
        events: Mutex<Vec<&'static str>>,
        started: std::sync::atomic::AtomicUsize,
        big: bool,
    }

    impl Service for Meet {
        async fn handle(&self, _: &Peer, _: RequestBody) -> Response {
            use std::sync::atomic::Ordering::SeqCst;
            self.events.lock().unwrap().push("start");
            self.started.fetch_add(1, SeqCst);
            let waited = Instant::now();
            while self.started.load(SeqCst) < 2 && waited.elapsed() < Duration::from_secs(1) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            self.events.lock().unwrap().push("end");
            Ok(ResponseBody::PlacementSet)
        }

        fn response_bytes(&self, _: &RequestBody) -> u32 {
            if self.big { FRAME_BODY_MAX_BYTES } else { 0 }
        }
    }

    struct Setup {
        addr: SocketAddr,
        client: RpcClient,
        shutdown: CancellationToken,
        served: tokio::task::JoinHandle<()>,
        _dir: tempfile::TempDir,
    }

    fn setup<S: Service>(service: Arc<S>, limits: ServerLimits) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca, "test").unwrap();
        issue(&ca, Role::Node, "node-1", &dir.path().join("node")).unwrap();
        issue(&ca, Role::Admin, "admin-1", &dir.path().join("admin")).unwrap();
        let server = TlsIdentity::load(&dir.path().join("node")).unwrap();
        let admin = TlsIdentity::load(&dir.path().join("admin")).unwrap();
        let endpoint = server_endpoint(&server, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let served = tokio::spawn(serve(endpoint, service, limits, shutdown.clone()));
        Setup { addr, client: RpcClient::new(&admin).unwrap(), shutdown, served, _dir: dir }
    }

    /// Two requests at once, with room for one largest answer; the events of their handlers.
    async fn two_at_once(big: bool) -> Vec<&'static str> {
        let service = Arc::new(Meet { events: Mutex::default(), started: Default::default(), big });
        let limits = ServerLimits {
            response_bytes_in_flight_max: FRAME_BODY_MAX_BYTES as usize,
            ..ServerLimits::default()
        };
        let s = setup(service.clone(), limits);
        let long = Duration::from_secs(20);
        let (a, b) = tokio::join!(
            s.client.call_with_deadline(s.addr, RequestBody::NodeStatus, long),
            s.client.call_with_deadline(s.addr, RequestBody::NodeStatus, long),
        );
        assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
        s.shutdown.cancel();
        s.served.await.unwrap();
        service.events.lock().unwrap().clone()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_that_do_not_fit_the_response_budget_together_are_handled_one_after_the_other() {
        let small = two_at_once(false).await;
        assert_eq!(small, ["start", "start", "end", "end"], "small answers are handled together");
        let big = two_at_once(true).await;
        assert_eq!(big, ["start", "end", "start", "end"], "the second big answer waits for the first");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_handler_past_its_deadline_runs_to_the_end_and_keeps_its_in_flight_slot() {
        let service = Arc::new(Slow { events: Mutex::new(Vec::new()) });
        let limits =
            ServerLimits { connections_max: 4, requests_in_flight_max: 1, ..ServerLimits::default() };
        let Setup { addr, client, shutdown, served, _dir } = setup(service.clone(), limits);
        let short = Duration::from_millis(100);
        let first = client.call_with_deadline(addr, RequestBody::NodeStatus, short).await;
        assert!(first.is_err(), "answered before the handler could finish: {first:?}");
        // The second request waits for the first handler's slot, so it starts after it ends.
        let second = client.call_with_deadline(addr, RequestBody::NodeStatus, Duration::from_secs(5)).await;
        assert!(matches!(second, Ok(ResponseBody::PlacementSet)), "{second:?}");
        assert_eq!(*service.events.lock().unwrap(), ["start", "end", "start", "end"]);
        shutdown.cancel();
        served.await.unwrap();
    }
}
