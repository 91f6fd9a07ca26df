//! Error codes carried on the wire, and the library error of this crate.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::Epoch;

/// What went wrong, as the remote side reports it. Stable on the wire: add variants only at
/// the end, and bump `PROTOCOL_VERSION` when the meaning of one changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The request was routed with an old placement epoch; refresh placement and retry.
    StaleEpoch { current: Epoch },
    /// The request's epoch is newer than the node's: the node has not learned the new placement yet.
    EpochAhead { current: Epoch },
    /// This node holds no replica of the shard.
    ShardNotHere,
    /// A stored block failed its CRC-32 check; the bytes were not returned.
    ChecksumMismatch,
    /// A field of the request is out of range or inconsistent.
    InvalidArgument,
    /// The caller's certificate role may not call this RPC.
    PermissionDenied,
    /// The node's disk is full (or below its reserve); nothing was written.
    NoSpace,
    /// The frame's protocol version is not one this peer speaks.
    UnsupportedVersion { supported: u16 },
    /// The frame is larger than the peer accepts.
    FrameTooLarge { max_bytes: u32 },
    /// The frame could not be decoded.
    Malformed,
    /// The request's deadline passed before it completed.
    DeadlineExceeded,
    /// The peer refuses work because a queue or limit is full; retry later.
    Overloaded,
    /// A storage or internal error on the peer.
    Internal,
    /// The named object does not exist.
    NotFound,
    /// This meta member is not the leader; ask `leader` (when known) instead.
    NotLeader { leader: Option<String> },
    /// No quorum or no leader right now; retry later.
    Unavailable,
    /// The name (or attribute) already exists.
    AlreadyExists,
    /// The directory is not empty.
    NotEmpty,
    /// A path component or target is not a directory.
    NotDirectory,
    /// The target is a directory where a non-directory was expected.
    IsDirectory,
    /// The extended attribute does not exist (ENODATA).
    NoData,
    /// A name is longer than the file system allows.
    NameTooLong,
    /// The write went to a replica that is not the shard's primary.
    NotPrimary,
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorCode::StaleEpoch { current } => write!(f, "stale epoch (current {current})"),
            ErrorCode::EpochAhead { current } => write!(f, "epoch ahead of node (node has {current})"),
            ErrorCode::ShardNotHere => f.write_str("shard not on this node"),
            ErrorCode::ChecksumMismatch => f.write_str("checksum mismatch"),
            ErrorCode::InvalidArgument => f.write_str("invalid argument"),
            ErrorCode::PermissionDenied => f.write_str("permission denied"),
            ErrorCode::NoSpace => f.write_str("no space left on node"),
            ErrorCode::UnsupportedVersion { supported } => {
                write!(f, "unsupported protocol version (peer speaks {supported})")
            }
            ErrorCode::FrameTooLarge { max_bytes } => {
                write!(f, "frame too large (max {max_bytes} bytes)")
            }
            ErrorCode::Malformed => f.write_str("malformed frame"),
            ErrorCode::DeadlineExceeded => f.write_str("deadline exceeded"),
            ErrorCode::Overloaded => f.write_str("overloaded"),
            ErrorCode::Internal => f.write_str("internal error"),
            ErrorCode::NotFound => f.write_str("not found"),
            ErrorCode::NotLeader { leader: Some(l) } => write!(f, "not the meta leader (leader is {l})"),
            ErrorCode::NotLeader { leader: None } => f.write_str("not the meta leader (leader unknown)"),
            ErrorCode::Unavailable => f.write_str("unavailable"),
            ErrorCode::AlreadyExists => f.write_str("already exists"),
            ErrorCode::NotEmpty => f.write_str("directory not empty"),
            ErrorCode::NotDirectory => f.write_str("not a directory"),
            ErrorCode::IsDirectory => f.write_str("is a directory"),
            ErrorCode::NoData => f.write_str("no such attribute"),
            ErrorCode::NameTooLong => f.write_str("name too long"),
            ErrorCode::NotPrimary => f.write_str("not the shard's primary"),
        }
    }
}

/// An error returned by the remote side of an RPC: a code for programs, a message for people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

/// Errors of framing: reading or writing one frame on a stream.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("bad frame magic {0:02x?} (not an augur peer?)")]
    BadMagic([u8; 2]),
    #[error("unsupported protocol version {got} (this build speaks {supported})")]
    UnsupportedVersion { got: u16, supported: u16 },
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge { len: u32, max: u32 },
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("undecodable frame body: {0}")]
    Decode(#[from] postcard::Error),
    #[error("stream I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// The wire error to send back to the peer that sent a bad frame.
    pub fn to_wire(&self) -> WireError {
        let code = match self {
            FrameError::UnsupportedVersion { supported, .. } => {
                ErrorCode::UnsupportedVersion { supported: *supported }
            }
            FrameError::TooLarge { max, .. } => ErrorCode::FrameTooLarge { max_bytes: *max },
            FrameError::Io(_) => ErrorCode::Internal,
            FrameError::BadMagic(_) | FrameError::Truncated | FrameError::Decode(_) => ErrorCode::Malformed,
        };
        WireError::new(code, self.to_string())
    }
}

/// Errors of TLS material: the cluster CA and the certificates it issues.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{0} already exists; refusing to overwrite cluster key material")]
    Exists(String),
    #[error("{path}: {reason}")]
    BadMaterial { path: String, reason: String },
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("unknown role {0:?} (expected meta, node, client or admin)")]
    UnknownRole(String),
}

/// Errors of an RPC call as seen by the caller.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("connecting to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("peer {addr} presented role {role}, expected a server role (meta or node)")]
    WrongPeerRole { addr: String, role: String },
    #[error("connection to {addr} lost: {reason}")]
    Connection { addr: String, reason: String },
    #[error("request to {addr} timed out after {ms} ms")]
    Timeout { addr: String, ms: u64 },
    #[error("frame from {addr}: {error}")]
    Frame { addr: String, error: FrameError },
    #[error("{addr} answered: {error}")]
    Remote { addr: String, error: WireError },
    #[error("{addr} answered with an unexpected response: {what}")]
    Unexpected { addr: String, what: String },
}

impl RpcError {
    /// The remote error code, when the peer answered with an error.
    pub fn code(&self) -> Option<&ErrorCode> {
        match self {
            RpcError::Remote { error, .. } => Some(&error.code),
            _ => None,
        }
    }

    /// True when another replica or a retry could succeed (transport trouble, not a refusal).
    pub fn is_transport(&self) -> bool {
        matches!(self, RpcError::Connect { .. } | RpcError::Connection { .. } | RpcError::Timeout { .. })
    }
}
