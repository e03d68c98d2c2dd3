//! The handshake: the first exchange on every connection.
//!
//! Each side sends a `Hello` (magic, version, node id, advertised address, a
//! fresh 32-byte nonce), then proves it holds the cluster secret with an
//! HMAC-SHA256 tag over the transcript of both hellos, exact bytes as sent:
//!
//! ```text
//! transcript = "dfs-peer-auth-v1" || u32be(len(dialer hello)) || dialer hello
//!                                 || u32be(len(acceptor hello)) || acceptor hello
//! dialer tag   = HMAC(K_auth, "dialer"   || transcript)
//! acceptor tag = HMAC(K_auth, "acceptor" || transcript)
//! ```
//!
//! Both nonces make every transcript fresh, so a recorded tag is worthless;
//! the role prefixes make a tag useless in the other direction, so a peer
//! cannot reflect the dialer's own tag back at it. The acceptor verifies the
//! dialer before it sends its own tag, so a dialer without the secret learns
//! nothing but a Hello. Each step waits at most the handshake timeout.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use tokio::io::{AsyncRead, AsyncWrite};

use super::connection::{Connection, decode_message};
use super::error::AUTH_FAILED_REASON;
use super::frame::Frame;
use super::{HandshakeError, Identity, P2pError, PeerInfo};
use crate::crypto::{Keys, auth_tag};
use crate::proto::{Auth, Hello, PeerMessage, peer_message::Kind};

/// The magic of every Hello: says "this is a dfs peer" before anything else.
pub const MAGIC: &str = "dfs-peer";
/// The protocol version this code speaks. Peers with any other version refuse
/// each other; see "Versioning" in `docs/PROTOCOL.md`.
pub const VERSION: u32 = 1;
/// Length of each side's nonce.
pub const NONCE_LEN: usize = 32;
/// Longest node id or advertised address accepted in a Hello: both end up in
/// logs and membership lists, so a peer may not make them huge.
pub const MAX_HELLO_FIELD: usize = 256;
/// The domain label that starts every transcript.
const TRANSCRIPT_LABEL: &[u8] = b"dfs-peer-auth-v1";

/// The dialing side: sends its Hello, checks the acceptor's, then trades tags.
pub async fn dial<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    identity: &Identity,
    keys: &Keys,
    step_timeout: Duration,
    remote: SocketAddr,
) -> Result<PeerInfo, P2pError> {
    let (ours, our_payload) = hello_frame(identity)?;
    step(step_timeout, "sending hello", send(conn, &ours)).await?;
    let their_payload = step(step_timeout, "waiting for hello", read_payload(conn)).await?;
    let theirs = expect_hello(their_payload.clone(), &identity.node_id)?;
    let transcript = transcript(&our_payload, &their_payload);

    let tag = auth_tag(keys, &[b"dialer".as_slice(), &transcript].concat());
    step(step_timeout, "sending auth", send(conn, &auth_frame(&tag)?)).await?;
    let their_tag = step(step_timeout, "waiting for auth", read_payload(conn)).await?;
    let expected = auth_tag(keys, &[b"acceptor".as_slice(), &transcript].concat());
    if !tags_match(&expected, &expect_auth(their_tag)?) {
        return Err(HandshakeError::AuthFailed.into());
    }
    Ok(peer_info(theirs, remote))
}

/// The accepting side: checks the dialer's Hello, answers with its own,
/// verifies the dialer's tag, then sends its own.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    identity: &Identity,
    keys: &Keys,
    step_timeout: Duration,
    remote: SocketAddr,
) -> Result<PeerInfo, P2pError> {
    let their_payload = step(step_timeout, "waiting for hello", read_payload(conn)).await?;
    let theirs = expect_hello(their_payload.clone(), &identity.node_id)?;
    let (ours, our_payload) = hello_frame(identity)?;
    step(step_timeout, "sending hello", send(conn, &ours)).await?;
    let transcript = transcript(&their_payload, &our_payload);

    let their_tag = step(step_timeout, "waiting for auth", read_payload(conn)).await?;
    let expected = auth_tag(keys, &[b"dialer".as_slice(), &transcript].concat());
    if !tags_match(&expected, &expect_auth(their_tag)?) {
        return Err(HandshakeError::AuthFailed.into());
    }
    let tag = auth_tag(keys, &[b"acceptor".as_slice(), &transcript].concat());
    step(step_timeout, "sending auth", send(conn, &auth_frame(&tag)?)).await?;
    Ok(peer_info(theirs, remote))
}

/// The transcript both tags are computed over (without the role prefix).
pub fn transcript(dialer_hello: &[u8], acceptor_hello: &[u8]) -> Vec<u8> {
    let mut t =
        Vec::with_capacity(TRANSCRIPT_LABEL.len() + 8 + dialer_hello.len() + acceptor_hello.len());
    t.extend_from_slice(TRANSCRIPT_LABEL);
    for hello in [dialer_hello, acceptor_hello] {
        // Hellos are MESSAGE payloads, capped far below u32::MAX.
        t.extend_from_slice(&(hello.len() as u32).to_be_bytes());
        t.extend_from_slice(hello);
    }
    t
}

/// A Hello for `identity` with a fresh nonce, as a frame and its payload.
fn hello_frame(identity: &Identity) -> Result<(Frame, Bytes), P2pError> {
    let mut nonce = [0u8; NONCE_LEN];
    rand::rng().fill_bytes(&mut nonce);
    let msg = PeerMessage {
        has_body: false,
        kind: Some(Kind::Hello(Hello {
            magic: MAGIC.to_owned(),
            version: VERSION,
            node_id: identity.node_id.clone(),
            advertised_addr: identity.advertised_addr.clone(),
            nonce: Bytes::copy_from_slice(&nonce),
        })),
    };
    let frame = Frame::message(&msg)?;
    let Frame::Message(payload) = &frame else {
        unreachable!("Frame::message builds a MESSAGE frame")
    };
    let payload = payload.clone();
    Ok((frame, payload))
}

fn auth_frame(tag: &[u8; 32]) -> Result<Frame, P2pError> {
    Frame::message(&PeerMessage {
        has_body: false,
        kind: Some(Kind::Auth(Auth {
            tag: Bytes::copy_from_slice(tag),
        })),
    })
}

async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    frame: &Frame,
) -> Result<(), P2pError> {
    conn.write_frame(frame).await?;
    conn.flush().await
}

/// Reads the next MESSAGE payload. An ERROR frame here is the peer refusing
/// the handshake; its reason is kept, and the authentication failure and
/// self-connection the acceptor reports are recognised as such, so that a
/// dialer gets the same typed error as the acceptor.
async fn read_payload<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
) -> Result<Bytes, P2pError> {
    match conn.read_frame().await? {
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
/// reason: not a dfs peer at all, then the wrong version, then bad fields.
fn expect_hello(payload: Bytes, own_node_id: &str) -> Result<Hello, P2pError> {
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
    if hello.nonce.len() != NONCE_LEN {
        return Err(unexpected("the nonce must be 32 bytes"));
    }
    if hello.node_id.is_empty() || hello.node_id.len() > MAX_HELLO_FIELD {
        return Err(unexpected("the node id must be 1 to 256 bytes"));
    }
    if hello.advertised_addr.len() > MAX_HELLO_FIELD {
        return Err(unexpected(
            "the advertised address must be at most 256 bytes",
        ));
    }
    if hello.node_id == own_node_id {
        return Err(HandshakeError::SelfConnection(hello.node_id).into());
    }
    Ok(hello)
}

/// The node id in an acceptor's self-connection refusal, if `reason` is one.
fn self_connection_id(reason: &str) -> Option<String> {
    let rest = reason.strip_prefix("refusing a connection to ourselves (node id ")?;
    rest.strip_suffix(')').map(str::to_owned)
}

fn expect_auth(payload: Bytes) -> Result<Bytes, P2pError> {
    let msg = decode_message(payload)?;
    match msg.kind {
        Some(Kind::Auth(auth)) if !msg.has_body => Ok(auth.tag),
        _ => Err(unexpected(
            "the second message must be an Auth without a body",
        )),
    }
}

fn unexpected(why: &str) -> P2pError {
    HandshakeError::Unexpected(why.to_owned()).into()
}

fn peer_info(hello: Hello, remote: SocketAddr) -> PeerInfo {
    PeerInfo {
        node_id: hello.node_id,
        advertised_addr: hello.advertised_addr,
        remote,
    }
}

/// Compares a tag in time independent of where the first difference is, so
/// response timing does not leak how much of a forged tag was right.
fn tags_match(expected: &[u8; 32], got: &[u8]) -> bool {
    if got.len() != expected.len() {
        return false;
    }
    let diff = expected
        .iter()
        .zip(got)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    std::hint::black_box(diff) == 0
}

async fn step<T>(
    limit: Duration,
    what: &'static str,
    fut: impl Future<Output = Result<T, P2pError>>,
) -> Result<T, P2pError> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| P2pError::Timeout(what))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transcript_is_label_then_length_prefixed_hellos() {
        let t = transcript(b"ab", b"xyz");
        assert_eq!(t, b"dfs-peer-auth-v1\0\0\0\x02ab\0\0\0\x03xyz".to_vec());
    }

    #[test]
    fn a_self_connection_refusal_is_recognised_from_its_reason() {
        let reason = HandshakeError::SelfConnection("node-7".into()).to_string();
        assert_eq!(self_connection_id(&reason).as_deref(), Some("node-7"));
        assert_eq!(self_connection_id("something else"), None);
    }

    #[test]
    fn tags_match_only_equal_tags() {
        let tag = [7u8; 32];
        assert!(tags_match(&tag, &tag));
        let mut other = tag;
        other[31] ^= 1;
        assert!(!tags_match(&tag, &other));
        assert!(!tags_match(&tag, &tag[..31]));
        assert!(!tags_match(&tag, &[]));
    }
}
