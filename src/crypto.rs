//! Keys, chunk ids and chunk encryption.
//!
//! One 32-byte cluster secret is the root of every key. HKDF-SHA256 derives
//! independent keys from it, so that a weakness in one use (say, the chunk
//! id) never exposes another (the encryption key):
//!
//! * `K_enc`: AES-256-CTR key for chunk contents (both formats);
//! * `K_id2`: keyed-BLAKE3 key for the ids of chunks this version writes;
//! * `K_mac`: keyed-BLAKE3 key for their authentication tags;
//! * `K_id`: HMAC-SHA1 key for the ids of chunks written before (format 1,
//!   still read) and for the key fingerprint;
//! * `K_psk`: the Noise pre-shared key of the peer channel, which every
//!   handshake mixes in, so only holders of the secret complete one.
//!
//! The sealed layouts, what each one costs to check and why, are in
//! `crypto/seal.rs` and docs/SECURITY.md.

use std::{fmt, fs, io, path::Path, str::FromStr};

use hmac::{Hmac, KeyInit, Mac};
use rand::Rng;
use sha2::Sha256;

mod seal;

pub use seal::{ChunkFormat, HEADER_LEN, IV_LEN, MAGIC_V2, TAG_LEN};

type HmacSha1 = Hmac<sha1::Sha1>;

/// Length of a chunk id (a keyed BLAKE3 output cut to 160 bits; format 1
/// ids are HMAC-SHA1 outputs of the same length).
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
    #[error("sealed chunk is {0} bytes, shorter than its {HEADER_LEN}-byte header")]
    HeaderTooShort(usize),
    #[error(
        "chunk does not authenticate as {0}: changed, truncated, or sealed under another key or id"
    )]
    BadTag(ChunkId),
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
    id2: [u8; 32],
    mac: [u8; 32],
    psk: [u8; 32],
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Keys(<redacted>)")
    }
}

impl Keys {
    /// Derives the purpose keys with HKDF-SHA256. The info strings bind each
    /// key to its use and to the format version it came with (the peer PSK's
    /// label names the peer protocol version it was introduced with).
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
            id2: expand(b"dfs chunk id v2"),
            mac: expand(b"dfs chunk mac v2"),
            psk: expand(b"dfs peer noise psk v2"),
        }
    }

    /// A short public fingerprint of the keys, stored in a node's index so a
    /// node started with another cluster's key refuses to start instead of
    /// failing (and quarantining) every chunk it reads. Reveals nothing
    /// usable: it is a keyed hash of a constant. Stays the format 1 id of
    /// that constant, so data directories written before keep their check.
    pub fn fingerprint(&self) -> u64 {
        let id = self.chunk_id_v1(b"dfs key fingerprint v1");
        u64::from_be_bytes(id.0[..8].try_into().expect("20-byte id"))
    }

    /// The pre-shared key of the peer channel's Noise handshake (`psk3`).
    pub fn peer_psk(&self) -> &[u8; 32] {
        &self.psk
    }

    /// The id a format 1 chunk has: `HMAC-SHA1(K_id, plain)`. New chunks
    /// are named by [`Keys::chunk_id`]; this one stays for reading old ones.
    pub fn chunk_id_v1(&self, plain: &[u8]) -> ChunkId {
        let mut mac = <HmacSha1 as KeyInit>::new_from_slice(&self.id).expect("HMAC takes any key");
        mac.update(plain);
        ChunkId(mac.finalize().into_bytes().into())
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
            hex::encode(keys.id2),
            hex::encode(keys.mac),
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
        let all = [k.enc, k.id, k.id2, k.mac, k.psk];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a, b, "every purpose has its own key");
            }
        }
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
