//! A node's identity: its static X25519 key pair and the node id derived
//! from the public key.
//!
//! The peer channel (`p2p`) proves possession of the private key in every
//! handshake, and each side computes the other's node id from the static
//! public key it authenticated, never from what the peer says. So an id can
//! only be spoken for by the holder of its key: no node can pose as another.
//!
//! The key lives in `<data>/node.key` (64 hex characters, mode 0600), created
//! on first start. A data directory of an older version holds a random
//! `node.id` instead: it gets a key and the derived id on its first start with
//! this version, and the old id is retired (see `docs/OPERATIONS.md`).

use std::{fmt, fs, io, path::Path};

use rand::Rng;
use sha2::{Digest, Sha256};

/// Length of an X25519 key, private or public.
pub const KEY_LEN: usize = 32;
/// Bytes of the hash kept in a node id: 128 bits, so finding a key pair for
/// a given id (a second preimage) is out of reach.
const ID_BYTES: usize = 16;
/// The domain label hashed in front of the public key.
const ID_LABEL: &[u8] = b"dfs node id v1";
/// The key file in a data directory.
pub const KEY_FILE: &str = "node.key";
/// The random id file of data directories from before node keys.
pub const LEGACY_ID_FILE: &str = "node.id";

/// Errors reading or creating a node key.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("node key file {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("node key file {path} must hold 64 hex characters (a 32-byte X25519 private key)")]
    Format { path: String },
}

/// The node id of the holder of `public`: the first 16 bytes of
/// `SHA-256("dfs node id v1" || public)`, as 32 lowercase hex characters.
pub fn node_id_of(public: &[u8; KEY_LEN]) -> String {
    let digest = Sha256::new()
        .chain_update(ID_LABEL)
        .chain_update(public)
        .finalize();
    hex::encode(&digest[..ID_BYTES])
}

/// A node's static key pair and the id derived from it.
#[derive(Clone)]
pub struct NodeKey {
    private: [u8; KEY_LEN],
    public: [u8; KEY_LEN],
    id: String,
}

impl NodeKey {
    /// A fresh key pair from the operating system's random source.
    pub fn generate() -> Self {
        let mut private = [0u8; KEY_LEN];
        rand::rng().fill_bytes(&mut private);
        Self::from_private(private)
    }

    /// The key pair of an X25519 private key (clamped as X25519 does).
    pub fn from_private(private: [u8; KEY_LEN]) -> Self {
        let public = curve25519_dalek::MontgomeryPoint::mul_base_clamped(private).to_bytes();
        Self {
            id: node_id_of(&public),
            private,
            public,
        }
    }

    /// The private key, for the handshake only.
    pub fn private(&self) -> &[u8; KEY_LEN] {
        &self.private
    }

    /// The public key peers authenticate this node by.
    pub fn public(&self) -> &[u8; KEY_LEN] {
        &self.public
    }

    /// The node id derived from the public key.
    pub fn node_id(&self) -> &str {
        &self.id
    }

    /// Reads `<dir>/node.key`, or creates it on first start. A legacy random
    /// `node.id` found next to a new key is retired (renamed `node.id.old`)
    /// and the change logged, since peers knew this node by that id.
    pub fn load_or_create(dir: &Path) -> Result<Self, IdentityError> {
        let path = dir.join(KEY_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => return parse_key(&text, &path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(io_error(&path, source)),
        }
        let key = Self::generate();
        write_key_file(dir, &key)?;
        let legacy = dir.join(LEGACY_ID_FILE);
        match fs::read_to_string(&legacy) {
            Ok(old) => {
                let retired = dir.join("node.id.old");
                fs::rename(&legacy, &retired)
                    .and_then(|()| crate::fsutil::sync_dir(dir))
                    .map_err(|source| io_error(&legacy, source))?;
                tracing::warn!(
                    old_node_id = %old.trim(),
                    node_id = %key.node_id(),
                    "migrated to a node key: this node's id is now derived from its public key; \
                     peers retire the old id once they reach this node under the new one"
                );
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::info!(node_id = %key.node_id(), "created a new node key");
            }
            Err(source) => return Err(io_error(&legacy, source)),
        }
        Ok(key)
    }
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeKey({}, <redacted>)", self.id)
    }
}

fn parse_key(text: &str, path: &Path) -> Result<NodeKey, IdentityError> {
    let mut private = [0u8; KEY_LEN];
    hex::decode_to_slice(text.trim(), &mut private).map_err(|_| IdentityError::Format {
        path: path.display().to_string(),
    })?;
    Ok(NodeKey::from_private(private))
}

/// Writes the key as a temp file (0600), fsyncs it, renames it into place
/// and fsyncs the directory: a crash leaves either no key or the whole key,
/// never a half-written one that would change the node's id.
fn write_key_file(dir: &Path, key: &NodeKey) -> Result<(), IdentityError> {
    let path = dir.join(KEY_FILE);
    let text = format!("{}\n", hex::encode(key.private));
    crate::fsutil::write_atomically(&path, text.as_bytes(), 0o600)
        .map_err(|source| io_error(&path, source))
}

fn io_error(path: &Path, source: io::Error) -> IdentityError {
    IdentityError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_public_key_and_id_follow_from_the_private_key() {
        // RFC 7748, section 6.1: Alice's private and public key.
        let mut private = [0u8; 32];
        hex::decode_to_slice(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
            &mut private,
        )
        .unwrap();
        let key = NodeKey::from_private(private);
        assert_eq!(
            hex::encode(key.public()),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
        // Pinned (computed independently: Python hashlib): a changed label or
        // length would change every node's id.
        assert_eq!(key.node_id(), "006fd9949859705f2811674c63e99ab7");
        assert_eq!(key.node_id(), node_id_of(key.public()));
    }

    #[test]
    fn a_key_is_created_once_with_mode_0600_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let first = NodeKey::load_or_create(dir.path()).unwrap();
        let mode = fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = NodeKey::load_or_create(dir.path()).unwrap();
        assert_eq!(first.node_id(), again.node_id());
        assert_eq!(first.public(), again.public());
        assert!(!dir.path().join("node.key.tmp").exists());
    }

    #[test]
    fn a_legacy_node_id_is_retired_for_the_derived_one() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(LEGACY_ID_FILE), "0123456789abcdef\n").unwrap();
        let key = NodeKey::load_or_create(dir.path()).unwrap();
        assert_ne!(key.node_id(), "0123456789abcdef");
        assert_eq!(key.node_id().len(), 32);
        assert!(!dir.path().join(LEGACY_ID_FILE).exists());
        assert_eq!(
            fs::read_to_string(dir.path().join("node.id.old")).unwrap(),
            "0123456789abcdef\n"
        );
    }

    #[test]
    fn a_damaged_key_file_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(KEY_FILE), "not hex\n").unwrap();
        assert!(matches!(
            NodeKey::load_or_create(dir.path()),
            Err(IdentityError::Format { .. })
        ));
    }

    #[test]
    fn debug_output_never_shows_the_private_key() {
        let key = NodeKey::from_private([7u8; 32]);
        let shown = format!("{key:?}");
        assert!(!shown.contains(&hex::encode([7u8; 32])));
        assert!(shown.contains(key.node_id()));
    }
}
