//! Sealed chunks: the bytes a chunk is on disk and on the peer wire.
//!
//! Format 2, written by this version, is encrypt-then-MAC:
//!
//! ```text
//! offset  0  magic "dfschnk2"     8 bytes, names the format
//!         8  IV                   16 random bytes
//!        24  tag                  32 bytes: BLAKE3-keyed(K_mac, ciphertext || magic || IV || id)
//!        56  ciphertext           AES-256-CTR(K_enc, IV, plaintext), 128-bit big-endian counter
//!
//! id = the first 20 bytes of BLAKE3-keyed(K_id2, plaintext)
//! ```
//!
//! The tag binds the ciphertext to the chunk's id, so whoever holds a
//! sealed chunk and its id checks it with one keyed hash of the bytes as
//! they are: a replica receiving a copy, the scrubber, a dedup hit and a
//! peer serving a chunk never decrypt. Only a read for a client decrypts,
//! in the same pass as the check. The ciphertext comes first in the tag's
//! input so that BLAKE3 sees it on its 1 KiB chunk boundaries, where it
//! hashes many chunks at once (after a 24-byte prefix, updates of 64 KiB
//! ran at half the speed); the fixed-length fields follow, the id last, so
//! sealing computes id, ciphertext and tag in one pass over the chunk.
//!
//! Format 1, written before (read, never written): `IV (16 random bytes) ||
//! AES-256-CTR(K_enc, IV, plaintext)`, named by `HMAC-SHA1(K_id, plaintext)`;
//! checking one means decrypting it and recomputing the HMAC. A file is
//! format 2 when it starts with the magic; a format 1 file whose random IV
//! happens to start with it (one in 2^64) fails as format 2 and is then
//! checked as format 1, so every old chunk stays readable.

use aes::cipher::{KeyIvInit, StreamCipher};
use rand::Rng;

use super::{ChunkId, CryptoError, Keys};

/// AES-256 in CTR mode with a 128-bit big-endian counter: the whole 16-byte
/// IV is the initial counter block, so random IVs never need a nonce split.
type Aes256Ctr = ctr::Ctr128BE<aes::Aes256>;

/// First bytes of every format 2 chunk.
pub const MAGIC_V2: [u8; 8] = *b"dfschnk2";
/// Length of the random IV of a sealed chunk (both formats).
pub const IV_LEN: usize = 16;
/// Length of a format 2 chunk's authentication tag.
pub const TAG_LEN: usize = 32;
/// Bytes a format 2 chunk has before its ciphertext, and so the headroom a
/// buffer needs to be sealed in place. Format 1 chunks have fewer (`IV_LEN`),
/// so it also bounds what any sealed chunk adds to its plaintext.
pub const HEADER_LEN: usize = MAGIC_V2.len() + IV_LEN + TAG_LEN;

/// Hashing and encryption run over this many bytes at a time, so that a
/// chunk is read from memory once while it is hashed and encrypted, not
/// once per pass; large enough for BLAKE3's widest SIMD path.
const PIECE: usize = 64 << 10;

const IV_AT: usize = MAGIC_V2.len();
const TAG_AT: usize = IV_AT + IV_LEN;

/// The layout of a sealed chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkFormat {
    /// `IV || ciphertext`, named by HMAC-SHA1 of the plaintext.
    V1,
    /// `magic || IV || tag || ciphertext`, named by keyed BLAKE3.
    V2,
}

impl ChunkFormat {
    /// The format a sealed chunk says it has.
    pub fn of(sealed: &[u8]) -> Self {
        if sealed.starts_with(&MAGIC_V2) {
            Self::V2
        } else {
            Self::V1
        }
    }
}

impl Keys {
    /// The id of a plaintext chunk sealed by this version: the first 20
    /// bytes of `BLAKE3-keyed(K_id2, plain)`.
    pub fn chunk_id(&self, plain: &[u8]) -> ChunkId {
        id_of(blake3::keyed_hash(&self.id2, plain))
    }

    /// Seals a chunk in place, in format 2. `buf` holds [`HEADER_LEN`] bytes
    /// of headroom followed by the plaintext; on return it holds the sealed
    /// chunk. Returns the chunk's id. One pass over the chunk computes the
    /// id, encrypts and computes the tag.
    pub fn seal_in_place(&self, buf: &mut [u8]) -> ChunkId {
        assert!(buf.len() >= HEADER_LEN, "a chunk buffer has header room");
        let (head, body) = buf.split_at_mut(HEADER_LEN);
        let mut iv = [0u8; IV_LEN];
        rand::rng().fill_bytes(&mut iv);
        let mut cipher = Aes256Ctr::new(&self.enc.into(), &iv.into());
        let mut id_hash = blake3::Hasher::new_keyed(&self.id2);
        let mut tag = blake3::Hasher::new_keyed(&self.mac);
        for piece in body.chunks_mut(PIECE) {
            id_hash.update(piece);
            cipher.apply_keystream(piece);
            tag.update(piece);
        }
        let id = id_of(id_hash.finalize());
        head[..IV_AT].copy_from_slice(&MAGIC_V2);
        head[IV_AT..TAG_AT].copy_from_slice(&iv);
        head[TAG_AT..].copy_from_slice(tag_end(tag, &iv, &id).as_bytes());
        id
    }

    /// Opens a sealed chunk (either format) in place and checks it against
    /// `expected`. On success returns where the plaintext starts: it is
    /// `buf[offset..]`. A chunk that does not verify is an error, and its
    /// bytes must never reach a client.
    pub fn open_in_place(&self, buf: &mut [u8], expected: &ChunkId) -> Result<usize, CryptoError> {
        if ChunkFormat::of(buf) == ChunkFormat::V1 {
            return self.open_v1(buf, expected).map(|()| IV_LEN);
        }
        let Err(e) = self.open_v2(buf, expected) else {
            return Ok(HEADER_LEN);
        };
        // A format 1 chunk whose IV starts with the magic (see the module
        // documentation); `open_v2` left its bytes as they were.
        match self.open_v1(buf, expected) {
            Ok(()) => Ok(IV_LEN),
            Err(_) => Err(e),
        }
    }

    /// Checks a sealed chunk (either format) against `expected` without
    /// changing it: for chunks received from or served to peers, which are
    /// stored or sent sealed. Format 2 needs one keyed hash of the bytes.
    pub fn verify_sealed(&self, sealed: &[u8], expected: &ChunkId) -> Result<(), CryptoError> {
        if ChunkFormat::of(sealed) == ChunkFormat::V1 {
            return self.verify_v1(sealed, expected);
        }
        let Err(e) = self.verify_v2(sealed, expected) else {
            return Ok(());
        };
        self.verify_v1(sealed, expected).map_err(|_| e)
    }

    /// Seals a chunk in format 1 (`buf` holds [`IV_LEN`] bytes of headroom,
    /// then the plaintext). This version never writes format 1; it is here
    /// so tests can make the data older versions wrote.
    #[doc(hidden)]
    pub fn seal_v1_in_place(&self, buf: &mut [u8]) -> ChunkId {
        let (iv, body) = buf.split_at_mut(IV_LEN);
        let id = self.chunk_id_v1(body);
        rand::rng().fill_bytes(iv);
        Aes256Ctr::new(&self.enc.into(), (&*iv).try_into().expect("16-byte IV"))
            .apply_keystream(body);
        id
    }

    /// Checks and decrypts a format 2 chunk in one pass. On failure the
    /// bytes are restored (CTR is its own inverse), so the caller can still
    /// try them as format 1.
    fn open_v2(&self, buf: &mut [u8], expected: &ChunkId) -> Result<(), CryptoError> {
        if buf.len() < HEADER_LEN {
            return Err(CryptoError::HeaderTooShort(buf.len()));
        }
        let (head, body) = buf.split_at_mut(HEADER_LEN);
        let iv = &head[IV_AT..TAG_AT];
        let mut tag = blake3::Hasher::new_keyed(&self.mac);
        let mut cipher = self.cipher(iv);
        for piece in body.chunks_mut(PIECE) {
            tag.update(piece);
            cipher.apply_keystream(piece);
        }
        if tag_matches(tag_end(tag, iv, expected), &head[TAG_AT..]) {
            return Ok(());
        }
        self.cipher(iv).apply_keystream(body);
        Err(CryptoError::BadTag(*expected))
    }

    fn verify_v2(&self, sealed: &[u8], expected: &ChunkId) -> Result<(), CryptoError> {
        if sealed.len() < HEADER_LEN {
            return Err(CryptoError::HeaderTooShort(sealed.len()));
        }
        let (head, body) = sealed.split_at(HEADER_LEN);
        let mut tag = blake3::Hasher::new_keyed(&self.mac);
        tag.update(body);
        if tag_matches(
            tag_end(tag, &head[IV_AT..TAG_AT], expected),
            &head[TAG_AT..],
        ) {
            Ok(())
        } else {
            Err(CryptoError::BadTag(*expected))
        }
    }

    fn open_v1(&self, buf: &mut [u8], expected: &ChunkId) -> Result<(), CryptoError> {
        if buf.len() < IV_LEN {
            return Err(CryptoError::TooShort(buf.len()));
        }
        let (iv, body) = buf.split_at_mut(IV_LEN);
        self.cipher(iv).apply_keystream(body);
        let actual = self.chunk_id_v1(body);
        if &actual != expected {
            return Err(CryptoError::Mismatch {
                expected: *expected,
                actual,
            });
        }
        Ok(())
    }

    /// Format 1 has no tag: the plaintext is made and hashed a small piece
    /// at a time, in a scratch buffer.
    fn verify_v1(&self, sealed: &[u8], expected: &ChunkId) -> Result<(), CryptoError> {
        use hmac::{KeyInit, Mac};
        if sealed.len() < IV_LEN {
            return Err(CryptoError::TooShort(sealed.len()));
        }
        let (iv, body) = sealed.split_at(IV_LEN);
        let mut cipher = self.cipher(iv);
        let mut mac =
            <super::HmacSha1 as KeyInit>::new_from_slice(&self.id).expect("HMAC takes any key");
        let mut scratch = vec![0u8; PIECE.min(body.len())];
        for piece in body.chunks(PIECE) {
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

    fn cipher(&self, iv: &[u8]) -> Aes256Ctr {
        Aes256Ctr::new(&self.enc.into(), iv.try_into().expect("16-byte IV"))
    }
}

/// A chunk id from a keyed BLAKE3 output: its first 160 bits.
fn id_of(hash: blake3::Hash) -> ChunkId {
    let mut id = [0u8; super::CHUNK_ID_LEN];
    id.copy_from_slice(&hash.as_bytes()[..super::CHUNK_ID_LEN]);
    ChunkId(id)
}

/// Finishes a tag whose hasher has seen the whole ciphertext: the format
/// marker, the IV and the id follow it.
fn tag_end(mut tag: blake3::Hasher, iv: &[u8], id: &ChunkId) -> blake3::Hash {
    tag.update(&MAGIC_V2);
    tag.update(iv);
    tag.update(&id.0);
    tag.finalize()
}

/// Compares a computed tag with a stored one in constant time (BLAKE3's
/// `Hash` equality), so a forger learns nothing from how long it takes.
fn tag_matches(computed: blake3::Hash, stored: &[u8]) -> bool {
    <[u8; TAG_LEN]>::try_from(stored).is_ok_and(|stored| computed == stored)
}

#[cfg(test)]
mod tests;
