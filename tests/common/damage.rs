//! Damaging chunk files on disk the ways a disk or an operator can.
//!
//! A chunk file is `<data>/chunks/ab/cd/<40 hex>` holding
//! `IV (16 bytes) || AES-256-CTR ciphertext`.

use std::{fs, path::Path};

use super::pseudo_random;

/// How a test damages a chunk file.
#[derive(Debug, Clone, Copy)]
pub enum Damage {
    /// One bit flipped in the middle of the ciphertext.
    FlipByte,
    /// One bit flipped in the IV: the whole plaintext changes.
    FlipIv,
    /// The last 1000 bytes cut off.
    Truncate,
    /// Cut to 5 bytes, shorter than the IV.
    TruncateBelowIv,
    /// Replaced by the bytes of another (validly sealed) chunk file.
    SwapWithOther,
    /// Replaced by junk larger than any chunk.
    OversizedJunk,
    /// Emptied.
    Empty,
    /// Removed.
    Delete,
}

/// Damages the chunk file at `path`; `other` is another chunk's file, which
/// [`Damage::SwapWithOther`] copies over it.
pub fn damage_file(path: &Path, other: Option<&Path>, how: Damage) {
    if let Damage::Delete = how {
        fs::remove_file(path).unwrap_or_else(|e| panic!("remove {}: {e}", path.display()));
        return;
    }
    let mut bytes = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    match how {
        Damage::FlipByte => {
            let i = 16 + (bytes.len() - 16) / 2;
            bytes[i] ^= 0x01;
        }
        Damage::FlipIv => bytes[3] ^= 0x80,
        Damage::Truncate => bytes.truncate(bytes.len().saturating_sub(1000)),
        Damage::TruncateBelowIv => bytes.truncate(5),
        Damage::SwapWithOther => {
            let other = other.expect("SwapWithOther needs another chunk file");
            bytes = fs::read(other).expect("read the other chunk");
        }
        Damage::OversizedJunk => bytes = pseudo_random(666, 3 * super::CHUNK),
        Damage::Empty => bytes.clear(),
        Damage::Delete => unreachable!(),
    }
    fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
