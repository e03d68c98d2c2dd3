//! The handshake: the first exchange on every connection.
//!
//! Four MESSAGE frames, in the clear, carry a Noise `XXpsk3` handshake (see
//! [`super::noise`]) and each side's [`NodeInfo`]:
//!
//! ```text
//! dialer   -> Hello{magic, version, noise: e}
//! acceptor -> Hello{magic, version, noise: e, ee, s, es}
//! dialer   -> Auth{noise: s, se, psk + NodeInfo}
//! acceptor -> Auth{noise: transport message 0 = NodeInfo}
//! ```
//!
//! Magic and version are checked before any cryptography, so peers of two
//! versions refuse each other with a clear reason. Each side derives the
//! other's node id from the static key the handshake proved and refuses a
//! `NodeInfo` that claims another id, and a key that is its own (it dialed
//! itself). The acceptor reveals nothing but its public key before the dialer
//! has proved the cluster key, and the dialer trusts nothing from the
//! acceptor before the last message has proved it too. Afterwards the
//! connection carries only encrypted records. The whole handshake must finish
//! within one timeout.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite};

use super::connection::{Connection, decode_message};
use super::error::AUTH_FAILED_REASON;
use super::frame::Frame;
use super::noise::{Handshake, TAG_LEN};
use super::{HandshakeError, Identity, P2pError, PeerInfo};
use crate::crypto::Keys;
use crate::identity::{KEY_LEN, node_id_of};
use crate::proto::{Auth, Hello, NodeInfo, PeerMessage, peer_message::Kind};

/// The magic of every Hello: says "this is a dfs peer" before anything else.
pub const MAGIC: &str = "dfs-peer";
/// The protocol version this code speaks. Peers with any other version refuse
/// each other; see "Versioning" in `docs/PROTOCOL.md`.
pub const VERSION: u32 = 2;
/// Longest node id or advertised address accepted in a NodeInfo: both end up
/// in logs and membership lists, so a peer may not make them huge.
pub const MAX_HELLO_FIELD: usize = 256;
/// Cap on any frame before the handshake completes: its messages are a few
/// hundred bytes, and a peer that has proved nothing gets no large buffer.
pub const MAX_HANDSHAKE_FRAME: usize = 4096;

/// An ephemeral key to use instead of a fresh one: reproducible examples
/// and tests only (a reused ephemeral key gives up forward secrecy).
type FixedEphemeral<'a> = Option<&'a [u8; KEY_LEN]>;

/// The dialing side. On success the connection carries records.
pub async fn dial<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    identity: &Identity,
    keys: &Keys,
    timeout: Duration,
    remote: SocketAddr,
) -> Result<PeerInfo, P2pError> {
    within(timeout, dial_steps(conn, identity, keys, remote, None)).await
}

/// The accepting side. On success the connection carries records.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    identity: &Identity,
    keys: &Keys,
    timeout: Duration,
    remote: SocketAddr,
) -> Result<PeerInfo, P2pError> {
    within(timeout, accept_steps(conn, identity, keys, remote, None)).await
}

/// [`dial`] with a fixed ephemeral key, so that the bytes on the wire are
/// reproducible (the examples of `docs/PROTOCOL.md`). Never in production.
#[doc(hidden)]
pub async fn dial_with_fixed_ephemeral<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    identity: &Identity,
    keys: &Keys,
    remote: SocketAddr,
    ephemeral: &[u8; KEY_LEN],
) -> Result<PeerInfo, P2pError> {
    dial_steps(conn, identity, keys, remote, Some(ephemeral)).await
}

/// [`accept`] with a fixed ephemeral key; see [`dial_with_fixed_ephemeral`].
#[doc(hidden)]
pub async fn accept_with_fixed_ephemeral<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    identity: &Identity,
    keys: &Keys,
    remote: SocketAddr,
    ephemeral: &[u8; KEY_LEN],
) -> Result<PeerInfo, P2pError> {
    accept_steps(conn, identity, keys, remote, Some(ephemeral)).await
}

async fn dial_steps<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    identity: &Identity,
    keys: &Keys,
    remote: SocketAddr,
    ephemeral: FixedEphemeral<'_>,
) -> Result<PeerInfo, P2pError> {
    let mut noise = Handshake::new(&identity.key, keys.peer_psk(), true, ephemeral)?;
    send(conn, hello(noise.write(&[])?)).await?;
    let theirs = expect_hello(read_payload(conn).await?)?;
    noise.read(&theirs)?;
    let their_key = noise
        .remote_static()
        .ok_or_else(|| unexpected("the second message carries no static key"))?;
    let their_id = node_id_of(&their_key);
    if &their_key == identity.key.public() {
        return Err(HandshakeError::SelfConnection(their_id).into());
    }
    send(conn, auth(noise.write(&node_info(identity))?)).await?;
    let (send_state, mut recv_state) = noise.split()?;
    let mut sealed = expect_auth(read_payload(conn).await?)?.to_vec();
    if sealed.len() < TAG_LEN {
        return Err(unexpected("the acceptor's Auth is shorter than a tag"));
    }
    let tag_at = sealed.len() - TAG_LEN;
    let (plain, tag) = sealed.split_at_mut(tag_at);
    let tag: [u8; TAG_LEN] = (&*tag).try_into().expect("16-byte tag");
    // The first message under the acceptor's transport key: it opens only
    // if the acceptor mixed in the same pre-shared key.
    recv_state
        .open(plain, &tag)
        .map_err(|_| HandshakeError::AuthFailed)?;
    let info = check_info(plain, &their_id)?;
    conn.secure(send_state, recv_state);
    Ok(peer_info(their_id, their_key, info, remote))
}

async fn accept_steps<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    identity: &Identity,
    keys: &Keys,
    remote: SocketAddr,
    ephemeral: FixedEphemeral<'_>,
) -> Result<PeerInfo, P2pError> {
    let theirs = expect_hello(read_payload(conn).await?)?;
    let mut noise = Handshake::new(&identity.key, keys.peer_psk(), false, ephemeral)?;
    noise.read(&theirs)?;
    send(conn, hello(noise.write(&[])?)).await?;
    let payload = noise.read(&expect_auth(read_payload(conn).await?)?)?;
    let their_key = noise
        .remote_static()
        .ok_or_else(|| unexpected("the third message carries no static key"))?;
    let their_id = node_id_of(&their_key);
    if &their_key == identity.key.public() {
        return Err(HandshakeError::SelfConnection(their_id).into());
    }
    let info = check_info(&payload, &their_id)?;
    let (mut send_state, recv_state) = noise.split()?;
    let mut sealed = node_info(identity);
    let tag = send_state.seal(&mut sealed)?;
    sealed.extend_from_slice(&tag);
    send(conn, auth(sealed)).await?;
    conn.secure(send_state, recv_state);
    Ok(peer_info(their_id, their_key, info, remote))
}

fn hello(noise: Vec<u8>) -> PeerMessage {
    PeerMessage {
        has_body: false,
        kind: Some(Kind::Hello(Hello {
            magic: MAGIC.to_owned(),
            version: VERSION,
            noise: noise.into(),
        })),
    }
}

fn auth(noise: Vec<u8>) -> PeerMessage {
    PeerMessage {
        has_body: false,
        kind: Some(Kind::Auth(Auth {
            noise: noise.into(),
        })),
    }
}

fn node_info(identity: &Identity) -> Vec<u8> {
    NodeInfo {
        node_id: identity.node_id().to_owned(),
        advertised_addr: identity.advertised_addr.clone(),
    }
    .encode_to_vec()
}

async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    msg: PeerMessage,
) -> Result<(), P2pError> {
    conn.write_frame(&Frame::message(&msg)?).await?;
    conn.flush().await
}

/// Reads the next MESSAGE payload (at most `MAX_HANDSHAKE_FRAME` bytes). An
/// ERROR frame here is the peer refusing the handshake; its reason is kept,
/// and the authentication failure and self-connection the acceptor reports
/// are recognised as such, so that a dialer gets the same typed error as the
/// acceptor.
async fn read_payload<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
) -> Result<Bytes, P2pError> {
    match conn.read_frame_within(MAX_HANDSHAKE_FRAME).await? {
        Some(Frame::Message(payload)) => Ok(payload),
        Some(Frame::Error(reason)) if reason == AUTH_FAILED_REASON => {
            Err(HandshakeError::AuthFailed.into())
        }
        Some(Frame::Error(reason)) => match self_connection_id(&reason) {
            Some(id) => Err(HandshakeError::SelfConnection(id).into()),
            None => Err(HandshakeError::Rejected(reason).into()),
        },
        Some(other) => Err(P2pError::UnexpectedFrame {
            expected: "MESSAGE",
            got: other.kind(),
        }),
        None => Err(P2pError::Closed),
    }
}

/// Decodes and checks a Hello, in the order that gives the most useful
/// reason: not a dfs peer at all, then the wrong version. Returns its Noise
/// message.
fn expect_hello(payload: Bytes) -> Result<Bytes, P2pError> {
    let msg = decode_message(payload)?;
    let hello = match msg.kind {
        Some(Kind::Hello(hello)) if !msg.has_body => hello,
        _ => {
            return Err(unexpected(
                "the first message must be a Hello without a body",
            ));
        }
    };
    if hello.magic != MAGIC {
        let shown: String = hello.magic.chars().take(64).collect();
        return Err(HandshakeError::WrongMagic(shown).into());
    }
    if hello.version != VERSION {
        return Err(HandshakeError::VersionMismatch {
            theirs: hello.version,
            ours: VERSION,
        }
        .into());
    }
    Ok(hello.noise)
}

fn expect_auth(payload: Bytes) -> Result<Bytes, P2pError> {
    let msg = decode_message(payload)?;
    match msg.kind {
        Some(Kind::Auth(auth)) if !msg.has_body => Ok(auth.noise),
        _ => Err(unexpected(
            "the second message must be an Auth without a body",
        )),
    }
}

/// Decodes the peer's NodeInfo and checks it against the id derived from
/// the key it proved.
fn check_info(payload: &[u8], derived: &str) -> Result<NodeInfo, P2pError> {
    let info = NodeInfo::decode(payload).map_err(|e| P2pError::BadMessage(e.to_string()))?;
    if info.node_id.is_empty() || info.node_id.len() > MAX_HELLO_FIELD {
        return Err(unexpected("the node id must be 1 to 256 bytes"));
    }
    if info.advertised_addr.len() > MAX_HELLO_FIELD {
        return Err(unexpected(
            "the advertised address must be at most 256 bytes",
        ));
    }
    if info.node_id != derived {
        return Err(HandshakeError::IdMismatch {
            claimed: info.node_id,
            derived: derived.to_owned(),
        }
        .into());
    }
    Ok(info)
}

/// The node id in an acceptor's self-connection refusal, if `reason` is one.
fn self_connection_id(reason: &str) -> Option<String> {
    let rest = reason.strip_prefix("refusing a connection to ourselves (node id ")?;
    rest.strip_suffix(')').map(str::to_owned)
}

fn unexpected(why: &str) -> P2pError {
    HandshakeError::Unexpected(why.to_owned()).into()
}

fn peer_info(
    node_id: String,
    public_key: [u8; KEY_LEN],
    info: NodeInfo,
    remote: SocketAddr,
) -> PeerInfo {
    PeerInfo {
        node_id,
        public_key,
        advertised_addr: info.advertised_addr,
        remote,
    }
}

async fn within<T>(
    limit: Duration,
    fut: impl Future<Output = Result<T, P2pError>>,
) -> Result<T, P2pError> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| P2pError::Timeout("the handshake"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_self_connection_refusal_is_recognised_from_its_reason() {
        let reason = HandshakeError::SelfConnection("node-7".into()).to_string();
        assert_eq!(self_connection_id(&reason).as_deref(), Some("node-7"));
        assert_eq!(self_connection_id("something else"), None);
    }

    #[test]
    fn a_claimed_id_must_be_the_derived_one() {
        let info = NodeInfo {
            node_id: "someone-else".into(),
            advertised_addr: "127.0.0.1:1".into(),
        }
        .encode_to_vec();
        assert!(matches!(
            check_info(&info, "abc"),
            Err(P2pError::Handshake(HandshakeError::IdMismatch { .. }))
        ));
        let good = NodeInfo {
            node_id: "abc".into(),
            advertised_addr: String::new(),
        }
        .encode_to_vec();
        assert_eq!(check_info(&good, "abc").unwrap().node_id, "abc");
    }
}
