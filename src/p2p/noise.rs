//! The cryptography of the peer channel: the Noise handshake (through the
//! `snow` crate) and the Noise transport cipher states of the record layer.
//!
//! Pattern `Noise_XXpsk3_25519_AESGCM_SHA256`: both sides prove their static
//! X25519 key (their node identity), and the pre-shared key derived from the
//! cluster secret is mixed in at the third message, so only members of the
//! cluster complete a handshake. The prologue binds the protocol magic and
//! version, so two sides that disagree on either cannot agree on keys.
//!
//! After the handshake the two transport keys (one per direction, Noise's
//! `Split()`) drive [`CipherState`]s that implement the Noise transport
//! exactly as the specification's section 5.1 does for AESGCM: AES-256-GCM,
//! the 96-bit nonce `0x00000000 || n` with `n` a 64-bit big-endian message
//! counter starting at 0, empty associated data, `n = 2^64 - 1` never used.
//! They are here rather than in snow's `TransportState` only because snow
//! offers no in-place decryption, and the body path decrypts each record
//! straight into the pooled buffer it was read into; a test checks that
//! both produce the same bytes.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};
use snow::resolvers::{CryptoResolver, DefaultResolver, FallbackResolver, RingResolver};

use super::handshake::{MAGIC, VERSION};
use super::{HandshakeError, P2pError};
use crate::identity::{KEY_LEN, NodeKey};

/// The Noise protocol name: the whole of the handshake's parameters.
pub const NOISE_PARAMS: &str = "Noise_XXpsk3_25519_AESGCM_SHA256";
/// Bytes of an AES-GCM tag, appended to every Noise ciphertext.
pub const TAG_LEN: usize = 16;
/// The largest Noise message (handshake or transport), by the specification.
pub const MAX_NOISE_MESSAGE: usize = 65535;
/// The most plaintext one transport message carries.
pub const MAX_RECORD_PLAINTEXT: usize = MAX_NOISE_MESSAGE - TAG_LEN;

/// The Noise prologue: `"dfs-peer/" || u32be(version)`. Both sides hash it
/// into the handshake, so a tampered or mismatched magic or version fails it.
pub fn prologue() -> Vec<u8> {
    let mut p = format!("{MAGIC}/").into_bytes();
    p.extend_from_slice(&VERSION.to_be_bytes());
    p
}

/// snow with ring's SHA-256 and AES-GCM (several times faster here than the
/// pure-Rust ones) and snow's own X25519 and random numbers.
fn resolver() -> Box<dyn CryptoResolver + Send> {
    Box::new(FallbackResolver::new(
        Box::new(RingResolver),
        Box::new(DefaultResolver),
    ))
}

/// The handshake of one connection, either role.
pub struct Handshake {
    state: snow::HandshakeState,
}

impl Handshake {
    /// A handshake as `me` with the cluster's `psk`. `ephemeral` fixes the
    /// ephemeral private key, for reproducible examples and tests only: a
    /// reused ephemeral key destroys forward secrecy.
    pub fn new(
        me: &NodeKey,
        psk: &[u8; 32],
        initiator: bool,
        ephemeral: Option<&[u8; KEY_LEN]>,
    ) -> Result<Self, P2pError> {
        let params = NOISE_PARAMS.parse().map_err(noise_error)?;
        let prologue = prologue();
        let mut builder = snow::Builder::with_resolver(params, resolver())
            .local_private_key(me.private())
            .and_then(|b| b.psk(3, psk))
            .and_then(|b| b.prologue(&prologue))
            .map_err(noise_error)?;
        if let Some(e) = ephemeral {
            builder = builder.fixed_ephemeral_key_for_testing_only(e);
        }
        let state = if initiator {
            builder.build_initiator()
        } else {
            builder.build_responder()
        }
        .map_err(noise_error)?;
        Ok(Self { state })
    }

    /// The next handshake message of ours, carrying `payload`.
    pub fn write(&mut self, payload: &[u8]) -> Result<Vec<u8>, P2pError> {
        let mut out = vec![0u8; MAX_NOISE_MESSAGE];
        let n = self
            .state
            .write_message(payload, &mut out)
            .map_err(noise_error)?;
        out.truncate(n);
        Ok(out)
    }

    /// Reads the peer's next handshake message; returns its payload. Any
    /// failure here (a wrong length, a tag that does not verify, which is
    /// what a different cluster secret or tampering produce) is a refusal.
    pub fn read(&mut self, message: &[u8]) -> Result<Vec<u8>, P2pError> {
        if message.len() > MAX_NOISE_MESSAGE {
            return Err(HandshakeError::Unexpected("handshake message too long".into()).into());
        }
        let mut out = vec![0u8; message.len()];
        match self.state.read_message(message, &mut out) {
            Ok(n) => {
                out.truncate(n);
                Ok(out)
            }
            Err(snow::Error::Decrypt) => Err(HandshakeError::AuthFailed.into()),
            Err(e) => Err(HandshakeError::Unexpected(format!("bad Noise message: {e}")).into()),
        }
    }

    /// The peer's static public key, once a message carrying it was read.
    pub fn remote_static(&self) -> Option<[u8; KEY_LEN]> {
        self.state.get_remote_static()?.try_into().ok()
    }

    /// The transport cipher states, once the three messages are done:
    /// (ours for sending, ours for receiving).
    pub fn split(mut self) -> Result<(CipherState, CipherState), P2pError> {
        if !self.state.is_handshake_finished() {
            return Err(HandshakeError::Unexpected("handshake not finished".into()).into());
        }
        let initiator = self.state.is_initiator();
        let (i_to_r, r_to_i) = self.state.dangerously_get_raw_split();
        let (send, recv) = if initiator {
            (i_to_r, r_to_i)
        } else {
            (r_to_i, i_to_r)
        };
        Ok((CipherState::new(&send), CipherState::new(&recv)))
    }
}

fn noise_error(e: snow::Error) -> P2pError {
    HandshakeError::Unexpected(format!("noise: {e}")).into()
}

/// One direction of the Noise transport: a key and its message counter.
pub struct CipherState {
    key: LessSafeKey,
    n: u64,
}

impl CipherState {
    fn new(key: &[u8; 32]) -> Self {
        let key = UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte AES-256-GCM key");
        Self {
            key: LessSafeKey::new(key),
            n: 0,
        }
    }

    /// The nonce for the next message, advancing the counter; `2^64 - 1` is
    /// reserved by Noise, and reaching it ends the connection.
    fn next_nonce(&mut self) -> Result<Nonce, P2pError> {
        if self.n == u64::MAX {
            return Err(P2pError::NonceExhausted);
        }
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&self.n.to_be_bytes());
        self.n += 1;
        Ok(Nonce::assume_unique_for_key(nonce))
    }

    /// Encrypts `in_out` in place; returns the tag to send after it.
    pub fn seal(&mut self, in_out: &mut [u8]) -> Result<[u8; TAG_LEN], P2pError> {
        let nonce = self.next_nonce()?;
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::empty(), in_out)
            .map_err(|_| P2pError::RecordAuth)?;
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Decrypts `in_out` in place if `tag` verifies for the next counter
    /// value. A failure (tampering, a dropped, replayed, reordered or
    /// foreign message) is final: the connection must be dropped.
    pub fn open(&mut self, in_out: &mut [u8], tag: &[u8; TAG_LEN]) -> Result<(), P2pError> {
        let nonce = self.next_nonce()?;
        let tag = Tag::from(*tag);
        self.key
            .open_in_place_separate_tag(nonce, Aad::empty(), tag, in_out, 0..)
            .map(|_| ())
            .map_err(|_| P2pError::RecordAuth)
    }

    /// Messages sealed or opened so far.
    pub fn count(&self) -> u64 {
        self.n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(psk_a: [u8; 32], psk_b: [u8; 32]) -> (Handshake, Handshake, NodeKey, NodeKey) {
        let (a, b) = (NodeKey::generate(), NodeKey::generate());
        let i = Handshake::new(&a, &psk_a, true, None).unwrap();
        let r = Handshake::new(&b, &psk_b, false, None).unwrap();
        (i, r, a, b)
    }

    #[test]
    fn three_messages_authenticate_both_static_keys() {
        let (mut i, mut r, a, b) = pair([1; 32], [1; 32]);
        r.read(&i.write(b"").unwrap()).unwrap();
        i.read(&r.write(b"").unwrap()).unwrap();
        assert_eq!(i.remote_static().as_ref(), Some(b.public()));
        assert_eq!(r.read(&i.write(b"hi").unwrap()).unwrap(), b"hi");
        assert_eq!(r.remote_static().as_ref(), Some(a.public()));
        let (mut i_send, mut i_recv) = i.split().unwrap();
        let (mut r_send, mut r_recv) = r.split().unwrap();
        let mut msg = b"request".to_vec();
        let tag = i_send.seal(&mut msg).unwrap();
        assert_ne!(msg, b"request");
        r_recv.open(&mut msg, &tag).unwrap();
        assert_eq!(msg, b"request");
        let mut reply = b"reply".to_vec();
        let tag = r_send.seal(&mut reply).unwrap();
        i_recv.open(&mut reply, &tag).unwrap();
        assert_eq!(reply, b"reply");
    }

    #[test]
    fn a_different_psk_fails_the_third_message() {
        let (mut i, mut r, _, _) = pair([1; 32], [2; 32]);
        r.read(&i.write(b"").unwrap()).unwrap();
        i.read(&r.write(b"").unwrap()).unwrap();
        let third = i.write(b"").unwrap();
        assert!(matches!(
            r.read(&third),
            Err(P2pError::Handshake(HandshakeError::AuthFailed))
        ));
    }

    #[test]
    fn replayed_reordered_and_reflected_records_fail() {
        let (mut i, mut r, _, _) = pair([1; 32], [1; 32]);
        r.read(&i.write(b"").unwrap()).unwrap();
        i.read(&r.write(b"").unwrap()).unwrap();
        r.read(&i.write(b"").unwrap()).unwrap();
        let (mut send, mut own_recv) = i.split().unwrap();
        let sealed: Vec<(Vec<u8>, [u8; 16])> = (0..3)
            .map(|k| {
                let mut m = vec![k as u8; 10];
                let tag = send.seal(&mut m).unwrap();
                (m, tag)
            })
            .collect();
        let (_, recv) = r.split().unwrap();
        let mut recv = recv;
        let open = |recv: &mut CipherState, k: usize| {
            let (mut m, t) = sealed[k].clone();
            recv.open(&mut m, &t).map(|()| m)
        };
        // Out of order: message 1 where 0 is due.
        assert!(open(&mut recv, 1).is_err());
        // Reflected: our own message 0 fed back to us.
        assert!(open(&mut own_recv, 0).is_err());
        // A fresh receiver accepts 0, then refuses 0 again (a replay).
        let (mut i2, mut r2, _, _) = pair([1; 32], [1; 32]);
        r2.read(&i2.write(b"").unwrap()).unwrap();
        i2.read(&r2.write(b"").unwrap()).unwrap();
        r2.read(&i2.write(b"").unwrap()).unwrap();
        let (mut send2, _) = i2.split().unwrap();
        let (_, mut recv2) = r2.split().unwrap();
        let mut m = b"once".to_vec();
        let tag = send2.seal(&mut m).unwrap();
        let copy = m.clone();
        recv2.open(&mut m, &tag).unwrap();
        let mut again = copy;
        assert!(recv2.open(&mut again, &tag).is_err());
    }

    #[test]
    fn the_record_cipher_is_the_noise_transport_of_snow() {
        // The same handshake twice, with fixed keys: one side moves to snow's
        // own TransportState, the other to ours; they must agree both ways.
        let (a, b) = (
            NodeKey::from_private([3; 32]),
            NodeKey::from_private([4; 32]),
        );
        let run = || {
            let mut i = Handshake::new(&a, &[9; 32], true, Some(&[5; 32])).unwrap();
            let mut r = Handshake::new(&b, &[9; 32], false, Some(&[6; 32])).unwrap();
            r.read(&i.write(b"").unwrap()).unwrap();
            i.read(&r.write(b"").unwrap()).unwrap();
            r.read(&i.write(b"").unwrap()).unwrap();
            (i, r)
        };
        let (i, r) = run();
        let (mut ours_send, mut ours_recv) = i.split().unwrap();
        let mut snow_r = r.state.into_transport_mode().unwrap();
        for len in [1usize, 5, 1000, MAX_RECORD_PLAINTEXT] {
            let plain: Vec<u8> = (0..len).map(|x| x as u8).collect();
            let mut ours = plain.clone();
            let tag = ours_send.seal(&mut ours).unwrap();
            ours.extend_from_slice(&tag);
            let mut got = vec![0u8; len];
            assert_eq!(snow_r.read_message(&ours, &mut got).unwrap(), len);
            assert_eq!(got, plain);
            let mut theirs = vec![0u8; len + TAG_LEN];
            snow_r.write_message(&plain, &mut theirs).unwrap();
            let (body, tag) = theirs.split_at_mut(len);
            ours_recv.open(body, &tag[..].try_into().unwrap()).unwrap();
            assert_eq!(body, &plain[..]);
        }
    }
}
