//! Keys, chunk ids and chunk encryption.
//!
//! One 32-byte cluster secret is the root of every key. HKDF-SHA256 derives
//! three independent keys from it, so that a weakness in one use (say, the
//! chunk id) never exposes another (the encryption key):
//!
//! * `K_enc`: AES-256-CTR key for chunk contents;
//! * `K_id`: HMAC-SHA1 key for chunk ids (keyed so that nobody without the
//!   secret can fingerprint stored chunks or craft colliding ones);
//! * `K_psk`: the Noise pre-shared key of the peer channel, which every
//!   handshake mixes in, so only holders of the secret complete one.
//!
//! A sealed chunk is `IV (16 random bytes) || AES-256-CTR(K_enc, IV, plain)`,
//! the same bytes on disk and on the peer wire.

use std::{fmt, fs, io, path::Path, str::FromStr};

use aes::cipher::{KeyIvInit, StreamCipher};
use hmac::{Hmac, KeyInit, Mac};
use rand::Rng;
use sha2::Sha256;

/// AES-256 in CTR mode with a 128-bit big-endian counter: the whole 16-byte
/// IV is the initial counter block, so random IVs never need a nonce split.
type Aes256Ctr = ctr::Ctr128BE<aes::Aes256>;
type HmacSha1 = Hmac<sha1::Sha1>;

/// Length of the random IV that prefixes every sealed chunk.
pub const IV_LEN: usize = 16;
/// Length of a chunk id (an HMAC-SHA1 output).
pub const CHUNK_ID_LEN: usize = 20;

/// Errors from key handling and chunk verification.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("cluster key file {path}: {source}")]
    KeyFileIo { path: String, source: io::Error },
    #[error("cluster key file {path} must hold 64 hex characters (32 bytes)")]
    KeyFileFormat { path: String },
    #[error("sealed chunk is {0} bytes, shorter than its {IV_LEN}-byte IV")]
    TooShort(usize),
    #[error("chunk content does not match its id {expected} (got {actual})")]
    Mismatch { expected: ChunkId, actual: ChunkId },
}

/// The shared secret of a cluster. Every node of a cluster holds the same one.
#[derive(Clone)]
pub struct ClusterSecret([u8; 32]);

impl ClusterSecret {
    /// A fresh secret from the operating system's random source.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// The secret as 64 lowercase hex characters, the key file format.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Reads a key file: 64 hex characters, surrounding whitespace ignored.
    pub fn read_file(path: &Path) -> Result<Self, CryptoError> {
        let shown = path.display().to_string();
        let text = fs::read_to_string(path).map_err(|source| CryptoError::KeyFileIo {
            path: shown.clone(),
            source,
        })?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut bytes)
            .map_err(|_| CryptoError::KeyFileFormat { path: shown })?;
        Ok(Self(bytes))
    }

    /// Writes the secret to a new file readable by its owner only. Refuses to
    /// overwrite an existing file: losing a cluster secret loses the data.
    pub fn write_new_file(&self, path: &Path) -> Result<(), CryptoError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let shown = path.display().to_string();
        let io_err = |source| CryptoError::KeyFileIo {
            path: shown.clone(),
            source,
        };
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io_err)?;
        writeln!(file, "{}", self.to_hex()).map_err(io_err)?;
        file.sync_all().map_err(io_err)?;
        // The new directory entry must be durable too, or a power loss can
        // leave data written under a key whose file is gone.
        crate::fsutil::sync_parent(path).map_err(io_err)
    }
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(<redacted>)")
    }
}

/// The keys derived from a cluster secret.
#[derive(Clone)]
pub struct Keys {
    enc: [u8; 32],
    id: [u8; 32],
    psk: [u8; 32],
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Keys(<redacted>)")
    }
}

impl Keys {
    /// Derives the three purpose keys with HKDF-SHA256. The info strings bind
    /// each key to its use and to this format version (the peer PSK's label
    /// names the peer protocol version it was introduced with).
    pub fn derive(secret: &ClusterSecret) -> Self {
        let hk = hkdf::Hkdf::<Sha256>::new(Some(b"dfs cluster v1"), &secret.0);
        let expand = |info: &[u8]| {
            let mut out = [0u8; 32];
            // 32 bytes is far below HKDF-SHA256's 8160-byte limit.
            hk.expand(info, &mut out).expect("32-byte HKDF output");
            out
        };
        Self {
            enc: expand(b"dfs chunk encryption v1"),
            id: expand(b"dfs chunk id v1"),
            psk: expand(b"dfs peer noise psk v2"),
        }
    }

    /// A short public fingerprint of the keys, stored in a node's index so a
    /// node started with another cluster's key refuses to start instead of
    /// failing (and quarantining) every chunk it reads. Reveals nothing
    /// usable: it is a keyed hash of a constant.
    pub fn fingerprint(&self) -> u64 {
        let id = self.chunk_id(b"dfs key fingerprint v1");
        u64::from_be_bytes(id.0[..8].try_into().expect("20-byte id"))
    }

    /// The pre-shared key of the peer channel's Noise handshake (`psk3`).
    pub fn peer_psk(&self) -> &[u8; 32] {
        &self.psk
    }

    /// The id of a plaintext chunk: `HMAC-SHA1(K_id, plain)`.
    pub fn chunk_id(&self, plain: &[u8]) -> ChunkId {
        let mut mac = <HmacSha1 as KeyInit>::new_from_slice(&self.id).expect("HMAC takes any key");
        mac.update(plain);
        ChunkId(mac.finalize().into_bytes().into())
    }

    /// Seals a chunk in place. `buf` holds `IV_LEN` bytes of headroom followed
    /// by the plaintext; on return it holds `IV || ciphertext`. Returns the
    /// chunk's id, computed over the plaintext before it is encrypted.
    pub fn seal_in_place(&self, buf: &mut [u8]) -> ChunkId {
        let (iv, body) = buf.split_at_mut(IV_LEN);
        let id = self.chunk_id(body);
        rand::rng().fill_bytes(iv);
        self.apply_keystream(iv, body);
        id
    }

    /// Opens a sealed chunk in place and checks it against `expected`. On
    /// success the plaintext is `buf[IV_LEN..]`. A chunk that does not verify
    /// is an error: its bytes must never reach a client.
    pub fn open_in_place(&self, buf: &mut [u8], expected: &ChunkId) -> Result<(), CryptoError> {
        if buf.len() < IV_LEN {
            return Err(CryptoError::TooShort(buf.len()));
        }
        let (iv, body) = buf.split_at_mut(IV_LEN);
        self.apply_keystream(iv, body);
        let actual = self.chunk_id(body);
        if &actual != expected {
            return Err(CryptoError::Mismatch {
                expected: *expected,
                actual,
            });
        }
        Ok(())
    }

    /// Checks a sealed chunk against `expected` without changing it, using a
    /// small scratch buffer: for chunks received from or served to peers,
    /// which are stored or sent sealed and never need their plaintext whole.
    pub fn verify_sealed(&self, sealed: &[u8], expected: &ChunkId) -> Result<(), CryptoError> {
        /// Plaintext is produced and hashed this many bytes at a time.
        const SCRATCH: usize = 64 << 10;
        if sealed.len() < IV_LEN {
            return Err(CryptoError::TooShort(sealed.len()));
        }
        let (iv, body) = sealed.split_at(IV_LEN);
        let mut cipher =
            Aes256Ctr::new_from_slices(&self.enc, iv).expect("32-byte key and 16-byte IV");
        let mut mac = <HmacSha1 as KeyInit>::new_from_slice(&self.id).expect("HMAC takes any key");
        let mut scratch = vec![0u8; SCRATCH.min(body.len())];
        for piece in body.chunks(SCRATCH) {
            let out = &mut scratch[..piece.len()];
            cipher.apply_keystream_b2b(piece, out);
            mac.update(out);
        }
        let actual = ChunkId(mac.finalize().into_bytes().into());
        if &actual != expected {
            return Err(CryptoError::Mismatch {
                expected: *expected,
                actual,
            });
        }
        Ok(())
    }

    fn apply_keystream(&self, iv: &[u8], body: &mut [u8]) {
        let mut cipher =
            Aes256Ctr::new_from_slices(&self.enc, iv).expect("32-byte key and 16-byte IV");
        cipher.apply_keystream(body);
    }
}

/// The content address of a chunk: 20 bytes, shown as 40 lowercase hex chars.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; CHUNK_ID_LEN]);

impl ChunkId {
    /// Parses a raw 20-byte id.
    pub fn from_slice(raw: &[u8]) -> Option<Self> {
        raw.try_into().ok().map(Self)
    }

    /// The id as 40 lowercase hex characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.to_hex())
    }
}

impl FromStr for ChunkId {
    type Err = hex::FromHexError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut raw = [0u8; CHUNK_ID_LEN];
        hex::decode_to_slice(s, &mut raw)?;
        Ok(Self(raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hmac_sha1(key: &[u8], data: &[u8]) -> String {
        let mut mac = <HmacSha1 as KeyInit>::new_from_slice(key).unwrap();
        mac.update(data);
        hex::encode(mac.finalize().into_bytes())
    }

    #[test]
    fn hmac_sha1_matches_rfc2202_vectors() {
        // RFC 2202 section 3, test cases 1, 2, 3 and 6.
        assert_eq!(
            hmac_sha1(&[0x0b; 20], b"Hi There"),
            "b617318655057264e28bc0b6fb378c8ef146be00"
        );
        assert_eq!(
            hmac_sha1(b"Jefe", b"what do ya want for nothing?"),
            "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"
        );
        assert_eq!(
            hmac_sha1(&[0xaa; 20], &[0xdd; 50]),
            "125d7342b9ac11cd91a39af48aa17b4f63f175d3"
        );
        assert_eq!(
            hmac_sha1(
                &[0xaa; 80],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            ),
            "aa4ae5e15272d00e95705637ce8a3b55ed402112"
        );
    }

    #[test]
    fn aes256_ctr_matches_nist_sp800_38a_f5_5() {
        // NIST SP 800-38A, F.5.5 CTR-AES256.Encrypt.
        let key = hex::decode("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
            .unwrap();
        let iv = hex::decode("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff").unwrap();
        let mut data = hex::decode(concat!(
            "6bc1bee22e409f96e93d7e117393172a",
            "ae2d8a571e03ac9c9eb76fac45af8e51",
            "30c81c46a35ce411e5fbc1191a0a52ef",
            "f69f2445df4f9b17ad2b417be66c3710"
        ))
        .unwrap();
        let mut cipher = Aes256Ctr::new_from_slices(&key, &iv).unwrap();
        cipher.apply_keystream(&mut data);
        assert_eq!(
            hex::encode(data),
            concat!(
                "601ec313775789a5b7a7f504bbf3d228",
                "f443e3ca4d62b59aca84e990cacaf5c5",
                "2b0930daa23de94ce87017ba2d84988d",
                "dfc9c58db67aada613c2dd08457941a6"
            )
        );
    }

    #[test]
    fn the_peer_psk_is_pinned() {
        // HKDF-SHA256(salt "dfs cluster v1", secret 00 01 .. 1f, info
        // "dfs peer noise psk v2"), computed independently with Python's
        // hmac module. A changed label splits every cluster in two.
        let mut raw = [0u8; 32];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = i as u8;
        }
        let keys = Keys::derive(&ClusterSecret(raw));
        assert_eq!(
            hex::encode(keys.peer_psk()),
            "808ce37d37f29b2b4bdb0ba0a9e14c1442ffa568dc3e670b8d9fc7e3f1b39a56"
        );
    }

    #[test]
    fn seal_then_open_round_trips_and_hides_plaintext() {
        let keys = Keys::derive(&ClusterSecret::generate());
        let plain = b"attack at dawn, attack at dawn, attack at dawn".to_vec();
        let mut buf = vec![0u8; IV_LEN];
        buf.extend_from_slice(&plain);
        let id = keys.seal_in_place(&mut buf);
        assert_eq!(id, keys.chunk_id(&plain));
        assert_ne!(
            &buf[IV_LEN..],
            &plain[..],
            "sealed bytes must not be plaintext"
        );
        keys.open_in_place(&mut buf, &id).unwrap();
        assert_eq!(&buf[IV_LEN..], &plain[..]);
    }

    #[test]
    fn verify_sealed_agrees_with_open_without_changing_the_chunk() {
        let keys = Keys::derive(&ClusterSecret::generate());
        let mut sealed = vec![0u8; IV_LEN];
        sealed.extend((0..200_000u32).map(|i| (i * 7) as u8));
        let id = keys.seal_in_place(&mut sealed);
        let before = sealed.clone();
        keys.verify_sealed(&sealed, &id).unwrap();
        assert_eq!(sealed, before);
        sealed[IV_LEN + 150_000] ^= 0x80;
        assert!(keys.verify_sealed(&sealed, &id).is_err());
        assert!(keys.verify_sealed(&sealed[..5], &id).is_err());
    }

    #[test]
    fn sealing_twice_uses_fresh_ivs() {
        let keys = Keys::derive(&ClusterSecret::generate());
        let mut a = vec![0u8; IV_LEN + 64];
        let mut b = a.clone();
        keys.seal_in_place(&mut a);
        keys.seal_in_place(&mut b);
        assert_ne!(a, b);
    }

    #[test]
    fn open_rejects_flipped_bit_truncation_and_foreign_key() {
        let keys = Keys::derive(&ClusterSecret::generate());
        let mut sealed = vec![0u8; IV_LEN];
        sealed.extend_from_slice(&[7u8; 100]);
        let id = keys.seal_in_place(&mut sealed);

        let mut flipped = sealed.clone();
        flipped[IV_LEN + 10] ^= 1;
        assert!(matches!(
            keys.open_in_place(&mut flipped, &id),
            Err(CryptoError::Mismatch { .. })
        ));
        let mut short = sealed[..10].to_vec();
        assert!(matches!(
            keys.open_in_place(&mut short, &id),
            Err(CryptoError::TooShort(10))
        ));
        let other = Keys::derive(&ClusterSecret::generate());
        let mut copy = sealed.clone();
        assert!(other.open_in_place(&mut copy, &id).is_err());
    }

    /// Known answers for the v1 key schedule, computed outside this code
    /// (Python's hmac/hashlib, RFC 5869 by hand): HKDF-SHA256, salt
    /// `dfs cluster v1`, secret 00 01 .. 1f. A changed label or salt makes
    /// every existing data directory unreadable, so it must fail here and
    /// come with a migration.
    #[test]
    fn v1_key_schedule_matches_known_answers() {
        let secret = ClusterSecret(std::array::from_fn(|i| i as u8));
        let k = Keys::derive(&secret);
        assert_eq!(
            hex::encode(k.enc),
            "bfca88e98f614bf2036ce682e9cc9807dcbc0c49193de71beb139e84bba51cad",
            "K_enc (info `dfs chunk encryption v1`)"
        );
        assert_eq!(
            hex::encode(k.id),
            "0690352d5dbe831834bc8ea521a6e2b766ba0e0f058c855b1b9a528a54bef388",
            "K_id (info `dfs chunk id v1`)"
        );
        assert_eq!(
            hex::encode(k.psk),
            "808ce37d37f29b2b4bdb0ba0a9e14c1442ffa568dc3e670b8d9fc7e3f1b39a56",
            "the peer channel's PSK (info `dfs peer noise psk v2`)"
        );
    }

    #[test]
    fn debug_output_never_shows_key_material() {
        let secret = ClusterSecret([0xab; 32]);
        let keys = Keys::derive(&secret);
        let material = [
            hex::encode(secret.0),
            hex::encode(keys.enc),
            hex::encode(keys.id),
            hex::encode(keys.psk),
        ];
        for shown in [
            format!("{secret:?}"),
            format!("{keys:?}"),
            format!("{:#?}", (&secret, &keys, Some(secret.clone()))),
        ] {
            assert!(shown.contains("<redacted>"), "{shown}");
            for m in &material {
                assert!(!shown.contains(&m[..8]), "{shown} shows key bytes");
            }
            // Nor as decimal bytes, as a derived Debug of an array would.
            assert!(!shown.contains("171"), "{shown}");
        }
    }

    #[test]
    fn derived_keys_differ_by_purpose_and_secret() {
        let s = ClusterSecret::generate();
        let k = Keys::derive(&s);
        assert_ne!(k.enc, k.id);
        assert_ne!(k.id, k.psk);
        assert_ne!(k.enc, k.psk);
        let k2 = Keys::derive(&s);
        assert_eq!(k.id, k2.id, "derivation is deterministic");
        let k3 = Keys::derive(&ClusterSecret::generate());
        assert_ne!(k.enc, k3.enc);
    }

    #[test]
    fn key_file_round_trips_and_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let s = ClusterSecret::generate();
        s.write_new_file(&path).unwrap();
        assert_eq!(
            ClusterSecret::read_file(&path).unwrap().to_hex(),
            s.to_hex()
        );
        assert!(s.write_new_file(&path).is_err(), "must not overwrite a key");
        fs::write(&path, "not hex").unwrap();
        assert!(matches!(
            ClusterSecret::read_file(&path),
            Err(CryptoError::KeyFileFormat { .. })
        ));
    }

    #[test]
    fn chunk_id_parses_and_prints_hex() {
        let id: ChunkId = "00112233445566778899aabbccddeeff00112233".parse().unwrap();
        assert_eq!(id.to_string(), "00112233445566778899aabbccddeeff00112233");
        assert!("zz".parse::<ChunkId>().is_err());
    }
}
