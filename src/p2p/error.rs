//! The errors of the peer protocol.
//!
//! Every failure is typed, so a caller can tell a peer that broke the
//! protocol (close that connection, log it) from a peer that is merely slow or
//! gone (try the next replica) without parsing messages.

use std::io;

use super::frame::FrameKind;

/// Why a peer connection or a request on it failed. A connection that
/// produced any of these is closed, never reused.
#[derive(Debug, thiserror::Error)]
pub enum P2pError {
    /// The socket failed (reset, refused, ...).
    #[error("peer i/o: {0}")]
    Io(#[from] io::Error),
    /// A step took longer than its limit; the string names the step.
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// `addr` resolved to no socket address.
    #[error("peer address {0:?} resolves to nothing")]
    NoAddress(String),
    /// A frame header announced more bytes than its kind allows. Raised before
    /// anything is allocated for the payload.
    #[error("{kind} frame of {len} bytes exceeds the {cap}-byte cap")]
    FrameTooLarge {
        kind: FrameKind,
        len: usize,
        cap: usize,
    },
    /// The first byte of a frame is not a known kind.
    #[error("unknown frame kind {0}")]
    UnknownFrameKind(u8),
    /// A DATA frame with no bytes (an empty body has no DATA frames at all, and
    /// bodies may not be empty).
    #[error("empty DATA frame")]
    EmptyData,
    /// An END frame whose payload is not exactly 12 bytes.
    #[error("END frame of {0} bytes (must be 12)")]
    BadEnd(usize),
    /// An ERROR frame whose reason is not UTF-8.
    #[error("ERROR frame reason is not UTF-8")]
    BadErrorText,
    /// A MESSAGE frame that is not a valid protobuf `PeerMessage`.
    #[error("bad peer message: {0}")]
    BadMessage(String),
    /// The stream ended inside a frame or inside a body.
    #[error("connection closed in the middle of a {0}")]
    Truncated(&'static str),
    /// The peer closed the connection where a frame was due.
    #[error("peer closed the connection")]
    Closed,
    /// A body grew past the receiver's limit.
    #[error("body exceeds the {max}-byte limit")]
    BodyTooLarge { max: usize },
    /// A body to send is empty: the wire cannot carry one (see `EmptyData`).
    #[error("cannot send an empty body")]
    EmptyBody,
    /// The body's length or CRC-32 does not match its END frame.
    #[error(
        "body does not match its END frame: got {actual_len} bytes crc {actual_crc:08x}, END says {expected_len} bytes crc {expected_crc:08x}"
    )]
    BodyMismatch {
        expected_len: u64,
        actual_len: u64,
        expected_crc: u32,
        actual_crc: u32,
    },
    /// A frame of the wrong kind for this point of the exchange.
    #[error("unexpected {got} frame (expected {expected})")]
    UnexpectedFrame {
        expected: &'static str,
        got: FrameKind,
    },
    /// The handshake failed; the connection was never usable.
    #[error("peer handshake: {0}")]
    Handshake(#[from] HandshakeError),
    /// The peer sent an ERROR frame (and is closing the connection).
    #[error("peer reported a protocol error: {0}")]
    Remote(String),
    /// A record's length prefix is not the one the frame layer expects
    /// there (a dropped, inserted or reordered record, or a broken peer).
    #[error("record of {got} bytes where {expected} were due")]
    RecordLength { expected: usize, got: usize },
    /// A record failed authentication: it was altered, replayed, reordered,
    /// dropped before, or does not belong to this connection at all.
    #[error("record failed authentication (tampered, replayed, reordered or foreign)")]
    RecordAuth,
    /// 2^64 - 1 records were sent on one connection; Noise forbids more.
    #[error("record counter exhausted")]
    NonceExhausted,
}

impl P2pError {
    /// True when the peer broke the protocol. The local side then sends an
    /// ERROR frame with this error's text before closing, so the operator of
    /// the other node can see why it was dropped. Socket failures, timeouts
    /// and errors the peer reported itself get no ERROR frame.
    pub fn is_protocol_violation(&self) -> bool {
        match self {
            Self::FrameTooLarge { .. }
            | Self::UnknownFrameKind(_)
            | Self::EmptyData
            | Self::BadEnd(_)
            | Self::BadErrorText
            | Self::BadMessage(_)
            | Self::BodyTooLarge { .. }
            | Self::BodyMismatch { .. }
            | Self::UnexpectedFrame { .. }
            | Self::RecordLength { .. }
            | Self::RecordAuth => true,
            Self::Handshake(e) => !matches!(e, HandshakeError::Rejected(_)),
            Self::Io(_)
            | Self::Timeout(_)
            | Self::NoAddress(_)
            | Self::Truncated(_)
            | Self::Closed
            | Self::EmptyBody
            | Self::NonceExhausted
            | Self::Remote(_) => false,
        }
    }
}

impl P2pError {
    /// The reason put in the ERROR frame for this error. A handshake failure
    /// is sent as the bare sentence (`protocol version 2 is not supported
    /// (this node speaks 1)`), which is what the other operator needs.
    pub fn wire_reason(&self) -> String {
        match self {
            Self::Handshake(e) => e.to_string(),
            other => other.to_string(),
        }
    }
}

/// Why a handshake failed. The `Display` text of each is also the reason
/// sent in the ERROR frame, so both operators read the same sentence.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The first message's magic is not `dfs-peer`: not a dfs peer at all.
    #[error("not a dfs peer: bad magic {0:?} (expected \"dfs-peer\")")]
    WrongMagic(String),
    /// The peer speaks another protocol version.
    #[error("protocol version {theirs} is not supported (this node speaks {ours})")]
    VersionMismatch { theirs: u32, ours: u32 },
    /// A Noise handshake message does not verify: the peer holds a
    /// different cluster secret, or the message was altered on the way.
    /// Also raised on the dialer when the acceptor reports this failure in
    /// its ERROR frame.
    #[error("{AUTH_FAILED_REASON}")]
    AuthFailed,
    /// The peer announced our own node id: we dialed ourselves. Also raised
    /// on the dialer when the acceptor reports this in its ERROR frame.
    #[error("refusing a connection to ourselves (node id {0})")]
    SelfConnection(String),
    /// The peer's handshake names a node id that is not the one derived
    /// from the static key it proved: a node speaking as another.
    #[error("the peer claims node id {claimed} but its key is that of node {derived}")]
    IdMismatch { claimed: String, derived: String },
    /// A message of the wrong kind or with malformed fields.
    #[error("unexpected handshake message: {0}")]
    Unexpected(String),
    /// The peer refused us with an ERROR frame carrying this reason.
    #[error("refused by the peer: {0}")]
    Rejected(String),
}

/// The exact reason text of an authentication failure, on the wire and in
/// logs; the dialer recognises it in the acceptor's ERROR frame.
pub const AUTH_FAILED_REASON: &str = "authentication failed: the peer holds a different cluster secret \
     (or the handshake was altered on the way)";
