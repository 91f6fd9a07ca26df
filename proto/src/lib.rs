//! Augur's wire contract: identifier newtypes, versioned messages with a maximum frame size,
//! error codes, and the QUIC + mutual-TLS endpoints every role uses. No role's logic lives here.

pub mod error;
pub mod frame;
pub mod ids;
pub mod meta;
pub mod msg;
pub mod rpc;
pub mod tls;

pub use error::{ErrorCode, FrameError, RpcError, TlsError, WireError};
pub use ids::{BlockId, Epoch, Ino, NodeId, ShardId, ShardRef, VolumeId};
pub use rpc::{Peer, RpcClient, ServerLimits, Service};
pub use tls::{Role, TlsIdentity};
