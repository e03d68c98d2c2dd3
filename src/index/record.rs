//! The rules every object record obeys, wherever it comes from: a client's
//! upload, a peer's push, sync or lookup answer, or this node's own disk.
//!
//! One set of checks for all of them, so a peer can never store what a
//! client could not (a key with NUL, a 100 KB content type, a chunk size
//! near 4 GiB that every read would then allocate), and so that every
//! record has a known maximum size: with an inline chunk list of at most
//! [`MAX_INLINE_CHUNK_IDS`] ids, a record is at most [`MAX_RECORD_LEN`]
//! bytes encoded, far below every message limit. A longer list is stored
//! and sent out of line, in pages (see `chunk_lists`).

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::{
    config::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE},
    crypto::{CHUNK_ID_LEN, ChunkId},
    proto::ObjectRecord,
};

/// Longest key, in bytes of UTF-8.
pub const MAX_KEY_LEN: usize = 1024;
/// Longest content type, in bytes. Media types are short (RFC 6838 caps
/// each name at 127 characters); this leaves room for parameters.
pub const MAX_CONTENT_TYPE_LEN: usize = 1024;
/// Most user metadata entries per object.
pub const MAX_METADATA_ENTRIES: usize = 64;
/// Most bytes of user metadata per object, keys and values together (S3
/// allows 2 KiB; this is four times that).
pub const MAX_METADATA_BYTES: usize = 8 << 10;
/// Longest origin node id in a version.
pub const MAX_NODE_ID_LEN: usize = 128;
/// Longest chunk list a record carries inline (80 KiB of ids: 256 MiB of
/// data at 64 KiB chunks, 16 GiB at 4 MiB). A longer list is stored and sent
/// out of line.
pub const MAX_INLINE_CHUNK_IDS: usize = 4096;
/// Most chunks of one object: `ObjectInfo.chunk_count` is a u32.
pub const MAX_CHUNK_COUNT: u64 = u32::MAX as u64;
/// Length of a chunk list's digest (SHA-256).
pub const LIST_DIGEST_LEN: usize = 32;
/// Upper bound of an encoded record whose list is inline and within
/// [`MAX_INLINE_CHUNK_IDS`], or out of line: every field at its cap plus
/// protobuf tags and lengths (each field's overhead is at most 1 + 10 bytes;
/// each metadata entry's at most 1 + 3 + 2 * (1 + 2)).
pub const MAX_RECORD_LEN: usize = MAX_KEY_LEN
    + MAX_CONTENT_TYPE_LEN
    + MAX_METADATA_BYTES
    + MAX_METADATA_ENTRIES * 10
    + MAX_INLINE_CHUNK_IDS * CHUNK_ID_LEN
    + 20 // sha1
    + LIST_DIGEST_LEN
    + MAX_NODE_ID_LEN + 16 // version: node id, hlc, tags
    + 12 * 11; // every field's tag and length or varint

/// A chunk list's identity: SHA-256 of its concatenated raw ids.
pub type ListDigest = [u8; LIST_DIGEST_LEN];

/// Why a record (or an upload's header) breaks the rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("key must not be empty")]
    EmptyKey,
    #[error("key is {0} bytes, longer than the limit of {MAX_KEY_LEN}")]
    KeyTooLong(usize),
    #[error("key must not contain NUL characters")]
    KeyHasNul,
    #[error("content type is {0} bytes, longer than the limit of {MAX_CONTENT_TYPE_LEN}")]
    ContentTypeTooLong(usize),
    #[error("metadata has {0} entries, more than the limit of {MAX_METADATA_ENTRIES}")]
    TooManyMetadataEntries(usize),
    #[error(
        "metadata is {0} bytes (keys and values together), more than the limit of {MAX_METADATA_BYTES}"
    )]
    MetadataTooLarge(usize),
    #[error("record has no version")]
    NoVersion,
    #[error("version's node id is {0} bytes: it must be 1..={MAX_NODE_ID_LEN}")]
    BadNodeId(usize),
    #[error("sha1 is {0} bytes, not 20")]
    BadSha1(usize),
    #[error("chunk size {0} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}")]
    BadChunkSize(u32),
    #[error("chunk list: {0}")]
    BadChunkList(String),
    #[error("tombstone carries data: {0}")]
    BadTombstone(&'static str),
}

/// Checks a key: 1..=1024 bytes of UTF-8 (guaranteed by the type), no NUL.
pub fn check_key(key: &str) -> Result<(), RecordError> {
    if key.is_empty() {
        return Err(RecordError::EmptyKey);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(RecordError::KeyTooLong(key.len()));
    }
    if key.contains('\0') {
        return Err(RecordError::KeyHasNul);
    }
    Ok(())
}

/// Checks what a client says about an object besides its key: the content
/// type and the user metadata, against their caps.
pub fn check_description(
    content_type: &str,
    metadata: &HashMap<String, String>,
) -> Result<(), RecordError> {
    if content_type.len() > MAX_CONTENT_TYPE_LEN {
        return Err(RecordError::ContentTypeTooLong(content_type.len()));
    }
    if metadata.len() > MAX_METADATA_ENTRIES {
        return Err(RecordError::TooManyMetadataEntries(metadata.len()));
    }
    let bytes: usize = metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > MAX_METADATA_BYTES {
        return Err(RecordError::MetadataTooLarge(bytes));
    }
    Ok(())
}

/// SHA-256 of a chunk list's concatenated raw ids.
pub fn list_digest(ids: &[u8]) -> ListDigest {
    Sha256::digest(ids).into()
}

impl ObjectRecord {
    /// Checks every rule a stored or transmitted record obeys. An inline
    /// list may be longer than [`MAX_INLINE_CHUNK_IDS`] here (an upload's
    /// record before the index moves its list out of line); the message
    /// caps bound what a peer can send.
    pub fn validate(&self) -> Result<(), RecordError> {
        check_key(&self.key)?;
        check_description(&self.content_type, &self.metadata)?;
        let version = self.version.as_ref().ok_or(RecordError::NoVersion)?;
        if version.node_id.is_empty() || version.node_id.len() > MAX_NODE_ID_LEN {
            return Err(RecordError::BadNodeId(version.node_id.len()));
        }
        if self.deleted {
            return self.check_tombstone();
        }
        if self.sha1.len() != 20 {
            return Err(RecordError::BadSha1(self.sha1.len()));
        }
        let chunk_size = self.chunk_size as usize;
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(RecordError::BadChunkSize(self.chunk_size));
        }
        let count = self.checked_chunk_count()?;
        let needed = self.size.div_ceil(self.chunk_size as u64);
        if count != needed {
            return Err(RecordError::BadChunkList(format!(
                "{count} chunk ids for {} bytes in chunks of {}: {needed} needed",
                self.size, self.chunk_size
            )));
        }
        Ok(())
    }

    /// The number of chunk ids, checked for the list's form.
    fn checked_chunk_count(&self) -> Result<u64, RecordError> {
        let bad = |s: String| Err(RecordError::BadChunkList(s));
        if self.chunk_list_sha256.is_empty() {
            if !self.chunk_ids.len().is_multiple_of(CHUNK_ID_LEN) {
                return bad(format!(
                    "{} bytes of ids is not a multiple of {CHUNK_ID_LEN}",
                    self.chunk_ids.len()
                ));
            }
            let count = (self.chunk_ids.len() / CHUNK_ID_LEN) as u64;
            if self.chunk_count != 0 && self.chunk_count != count {
                return bad(format!(
                    "chunk_count {} but {count} inline ids",
                    self.chunk_count
                ));
            }
            return Ok(count);
        }
        if self.chunk_list_sha256.len() != LIST_DIGEST_LEN {
            return bad(format!(
                "list digest is {} bytes, not {LIST_DIGEST_LEN}",
                self.chunk_list_sha256.len()
            ));
        }
        if !self.chunk_ids.is_empty() {
            return bad("both inline ids and an out-of-line list".into());
        }
        if !(1..=MAX_CHUNK_COUNT).contains(&self.chunk_count) {
            return bad(format!(
                "out-of-line list of {} chunks (1..={MAX_CHUNK_COUNT})",
                self.chunk_count
            ));
        }
        Ok(self.chunk_count)
    }

    fn check_tombstone(&self) -> Result<(), RecordError> {
        if self.size != 0 {
            return Err(RecordError::BadTombstone("a size"));
        }
        if !self.chunk_ids.is_empty() || !self.chunk_list_sha256.is_empty() || self.chunk_count != 0
        {
            return Err(RecordError::BadTombstone("a chunk list"));
        }
        if !self.sha1.is_empty() && self.sha1.len() != 20 {
            return Err(RecordError::BadSha1(self.sha1.len()));
        }
        Ok(())
    }

    /// The inline chunk ids, in file order. Empty for a record whose list
    /// is out of line: read those with `Index::chunk_ids`.
    pub fn chunk_id_list(&self) -> impl Iterator<Item = ChunkId> + '_ {
        self.chunk_ids
            .chunks_exact(CHUNK_ID_LEN)
            .filter_map(ChunkId::from_slice)
    }

    /// Number of chunks, whatever the list's form.
    pub fn chunk_count(&self) -> usize {
        if self.chunk_count != 0 {
            return usize::try_from(self.chunk_count).unwrap_or(usize::MAX);
        }
        self.chunk_ids.len() / CHUNK_ID_LEN
    }

    /// The digest of the out-of-line chunk list, if the list is out of line.
    pub fn list_digest(&self) -> Option<ListDigest> {
        self.chunk_list_sha256.as_ref().try_into().ok()
    }

    /// The record as it is stored and sent: an inline list longer than
    /// `inline_limit` ids replaced by its count and digest. Every node
    /// computes the same form, so a peer can fetch the list by digest from
    /// the node that sent the record.
    pub fn header_form(&self, inline_limit: usize) -> ObjectRecord {
        let count = self.chunk_ids.len() / CHUNK_ID_LEN;
        if self.deleted || !self.chunk_list_sha256.is_empty() || count <= inline_limit {
            return self.clone();
        }
        ObjectRecord {
            chunk_count: count as u64,
            chunk_list_sha256: list_digest(&self.chunk_ids).to_vec().into(),
            chunk_ids: Default::default(),
            ..self.clone()
        }
    }

    /// The record without its inline ids (the count kept): what a listing
    /// needs, at a bounded size. Never to be applied.
    pub fn without_ids(mut self) -> ObjectRecord {
        if !self.chunk_ids.is_empty() {
            self.chunk_count = (self.chunk_ids.len() / CHUNK_ID_LEN) as u64;
            self.chunk_ids = Default::default();
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::proto::Version;

    fn live(size: u64, ids: usize) -> ObjectRecord {
        ObjectRecord {
            key: "k".into(),
            size,
            sha1: vec![1; 20].into(),
            chunk_size: MIN_CHUNK_SIZE as u32,
            chunk_ids: vec![9; ids * CHUNK_ID_LEN].into(),
            version: Some(Version {
                hlc: 1,
                node_id: "n".into(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn well_formed_records_pass() {
        let c = MIN_CHUNK_SIZE as u64;
        for (size, ids) in [(0, 0), (1, 1), (c, 1), (c + 1, 2), (3 * c, 3)] {
            assert_eq!(live(size, ids).validate(), Ok(()), "{size} bytes");
        }
        let out = live(5000 * c, 5000).header_form(MAX_INLINE_CHUNK_IDS);
        assert!(out.chunk_ids.is_empty() && out.list_digest().is_some());
        assert_eq!(out.chunk_count(), 5000);
        assert_eq!(out.validate(), Ok(()));
        let tomb = ObjectRecord {
            deleted: true,
            ..live(0, 0)
        };
        assert_eq!(tomb.validate(), Ok(()));
    }

    #[test]
    fn every_rule_refuses_what_breaks_it() {
        let c = MIN_CHUNK_SIZE as u64;
        let cases: Vec<(ObjectRecord, &str)> = vec![
            (
                ObjectRecord {
                    key: "".into(),
                    ..live(1, 1)
                },
                "empty key",
            ),
            (
                ObjectRecord {
                    key: "a\0".into(),
                    ..live(1, 1)
                },
                "NUL",
            ),
            (
                ObjectRecord {
                    key: "k".repeat(1025),
                    ..live(1, 1)
                },
                "long key",
            ),
            (
                ObjectRecord {
                    content_type: "x".repeat(1025),
                    ..live(1, 1)
                },
                "content type",
            ),
            (
                ObjectRecord {
                    version: None,
                    ..live(1, 1)
                },
                "no version",
            ),
            (
                ObjectRecord {
                    sha1: vec![1; 19].into(),
                    ..live(1, 1)
                },
                "sha1",
            ),
            (
                ObjectRecord {
                    chunk_size: u32::MAX - 15,
                    ..live(1, 1)
                },
                "huge chunk size",
            ),
            (
                ObjectRecord {
                    chunk_size: 4096,
                    ..live(1, 1)
                },
                "tiny chunk size",
            ),
            (
                ObjectRecord {
                    chunk_ids: vec![1; 21].into(),
                    ..live(1, 1)
                },
                "ids not x20",
            ),
            (live(2 * c + 1, 2), "too few ids"),
            (live(c, 2), "too many ids"),
            (
                ObjectRecord {
                    chunk_count: 3,
                    ..live(c, 1)
                },
                "count disagrees",
            ),
            (
                ObjectRecord {
                    chunk_list_sha256: vec![1; 31].into(),
                    chunk_count: 1,
                    chunk_ids: Default::default(),
                    ..live(1, 1)
                },
                "digest length",
            ),
            (
                ObjectRecord {
                    chunk_list_sha256: vec![1; 32].into(),
                    chunk_count: 1,
                    ..live(1, 1)
                },
                "inline and out of line",
            ),
            (
                ObjectRecord {
                    deleted: true,
                    ..live(1, 1)
                },
                "tombstone with data",
            ),
        ];
        for (record, what) in cases {
            assert!(record.validate().is_err(), "{what} passed");
        }
        let mut md = HashMap::new();
        for i in 0..=MAX_METADATA_ENTRIES {
            md.insert(format!("{i}"), String::new());
        }
        assert!(check_description("", &md).is_err());
        md.clear();
        md.insert("k".into(), "v".repeat(MAX_METADATA_BYTES));
        assert_eq!(
            check_description("", &md),
            Err(RecordError::MetadataTooLarge(MAX_METADATA_BYTES + 1))
        );
    }

    #[test]
    fn a_record_at_every_cap_encodes_within_max_record_len() {
        let metadata = (0..MAX_METADATA_ENTRIES)
            .map(|i| {
                let k = format!("{i:03}");
                let v = "v".repeat(MAX_METADATA_BYTES / MAX_METADATA_ENTRIES - k.len());
                (k, v)
            })
            .collect();
        let c = MIN_CHUNK_SIZE as u64;
        let r = ObjectRecord {
            key: "k".repeat(MAX_KEY_LEN),
            content_type: "t".repeat(MAX_CONTENT_TYPE_LEN),
            metadata,
            created_unix_ms: u64::MAX,
            chunk_size: MAX_CHUNK_SIZE as u32,
            size: MAX_INLINE_CHUNK_IDS as u64 * MAX_CHUNK_SIZE as u64,
            version: Some(Version {
                hlc: u64::MAX,
                node_id: "n".repeat(MAX_NODE_ID_LEN),
            }),
            ..live(0, MAX_INLINE_CHUNK_IDS)
        };
        assert_eq!(r.validate(), Ok(()));
        assert!(r.encoded_len() <= MAX_RECORD_LEN, "{}", r.encoded_len());
        let out = ObjectRecord {
            chunk_size: MIN_CHUNK_SIZE as u32,
            size: MAX_CHUNK_COUNT * c,
            chunk_count: MAX_CHUNK_COUNT,
            chunk_list_sha256: vec![0xff; 32].into(),
            chunk_ids: Default::default(),
            ..r
        };
        assert_eq!(out.validate(), Ok(()));
        assert!(out.encoded_len() <= MAX_RECORD_LEN);
    }
}
