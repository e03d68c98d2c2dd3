//! The on-disk and key formats, pinned. Every constant here was computed
//! outside dfs (Python's hmac/hashlib for HKDF-SHA256 and HMAC-SHA1, the
//! openssl command for AES-256-CTR) or read from the committed data
//! directory that this version wrote, never from the code under test. A
//! change to a key-derivation label, the chunk-id function, the sealed
//! layout or the record encoding fails here; such a change needs a
//! deliberate migration that keeps `tests/fixtures/datadir-v1` readable.

mod common;

use std::{fs, path::Path};

use aes::cipher::{KeyIvInit, StreamCipher};
use common::*;
use dfs::{
    crypto::{ChunkId, ClusterSecret, IV_LEN, Keys},
    proto::{DeleteRequest, ListRequest},
};
use tonic::Code;

/// The test secret: bytes 00 01 .. 1f, as a key file holds it.
const SECRET_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
/// K_enc for [`SECRET_HEX`]: HKDF-SHA256(salt `dfs cluster v1`, info
/// `dfs chunk encryption v1`).
const K_ENC: &str = "bfca88e98f614bf2036ce682e9cc9807dcbc0c49193de71beb139e84bba51cad";
/// A plaintext chunk and its id, HMAC-SHA1(K_id, plain) with K_id from
/// info `dfs chunk id v1`.
const PLAIN: &[u8] = b"The quick brown fox jumps over the lazy dog, chunk format v1.";
const PLAIN_ID: &str = "1975d6dce52607a31ea447381b369ab2c94e1487";
const EMPTY_ID: &str = "d7608be52f9ebd3337a6f616d0849b881cef9e32";
/// The sealed form of [`PLAIN`] with an IV whose low 64 bits are all ones:
/// the second block's counter carries into the high half, which only a
/// 128-bit big-endian counter does.
const SEALED_IV: &str = "0001020304050607ffffffffffffffff";
const SEALED_CT: &str = "d6f0be7683680f64204b15ab2a67039a0f295bd0eff44696f9510383d72dc80c\
                         8a85a7736b96ea399f263114fed2abb43f78c12b9f6212d75711325d5d";
/// The key fingerprint a data directory records (first 8 bytes of
/// HMAC-SHA1(K_id, `dfs key fingerprint v1`)).
const FINGERPRINT: u64 = 0x0d45_d6a6_6203_e532;

fn test_keys() -> Keys {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("k");
    fs::write(&path, SECRET_HEX).expect("write key");
    Keys::derive(&ClusterSecret::read_file(&path).expect("read key"))
}

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s.split_whitespace().collect::<String>()).expect("hex constant")
}

/// AES-256-CTR with a 128-bit big-endian counter, as openssl's aes-256-ctr.
fn ctr(key: &[u8], iv: &[u8], data: &mut [u8]) {
    let mut c = ctr::Ctr128BE::<aes::Aes256>::new_from_slices(key, iv).expect("key and iv sizes");
    c.apply_keystream(data);
}

#[test]
fn chunk_ids_are_hmac_sha1_under_the_v1_id_key() {
    let keys = test_keys();
    assert_eq!(keys.chunk_id(PLAIN).to_hex(), PLAIN_ID);
    assert_eq!(keys.chunk_id(b"").to_hex(), EMPTY_ID);
    assert_eq!(keys.fingerprint(), FINGERPRINT);
}

#[test]
fn a_sealed_chunk_is_the_iv_then_aes256_ctr_of_the_plaintext() {
    let keys = test_keys();
    let id: ChunkId = PLAIN_ID.parse().expect("id");
    // Opening the known sealed bytes gives the plaintext back.
    let mut sealed = unhex(SEALED_IV);
    sealed.extend(unhex(SEALED_CT));
    keys.verify_sealed(&sealed, &id)
        .expect("known sealed chunk verifies");
    let mut opened = sealed.clone();
    keys.open_in_place(&mut opened, &id)
        .expect("known sealed chunk opens");
    assert_eq!(&opened[IV_LEN..], PLAIN);
    // Sealing writes a 16-byte IV, then the plaintext under AES-256-CTR
    // with K_enc and that IV as the whole initial counter block.
    let mut buf = vec![0u8; IV_LEN];
    buf.extend_from_slice(PLAIN);
    assert_eq!(keys.seal_in_place(&mut buf).to_hex(), PLAIN_ID);
    assert_eq!(buf.len(), IV_LEN + PLAIN.len(), "no header, no tag");
    let (iv, body) = buf.split_at_mut(IV_LEN);
    ctr(&unhex(K_ENC), iv, body);
    assert_eq!(body, PLAIN);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_stores_a_chunk_under_its_keyed_id_as_iv_and_ciphertext() {
    let mut node = TestNode::new(&[]);
    let key_file = node.root().join("cluster.key");
    fs::write(&key_file, format!("{SECRET_HEX}\n")).expect("write key");
    node.add_args(&["--cluster-key-file", key_file.to_str().expect("utf-8")]);
    node.launch().await;
    upload(&mut node.storage().await, "plain", PLAIN, 7)
        .await
        .expect("upload");
    let path = node
        .data_dir()
        .join("chunks")
        .join(&PLAIN_ID[..2])
        .join(&PLAIN_ID[2..4])
        .join(PLAIN_ID);
    assert_eq!(
        node.chunk_files(),
        vec![path.clone()],
        "one chunk, at its id"
    );
    let mut sealed = fs::read(&path).expect("read the chunk file");
    assert_eq!(sealed.len(), IV_LEN + PLAIN.len());
    let (iv, body) = sealed.split_at_mut(IV_LEN);
    ctr(&unhex(K_ENC), iv, body);
    assert_eq!(body, PLAIN);
}

// ---------------------------------------------------------------------------
// The committed data directory.

/// Where the data directory written by this version lives.
fn fixture_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/datadir-v1")
}

/// Bytes of the fixture's objects: a fixed recipe (a 32-bit LCG), pinned by
/// the SHA-1s below so that a change to it cannot go unnoticed.
fn recipe(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        })
        .collect()
}

/// The multi-chunk object: two identical 64 KiB chunks (stored once) and a
/// 100-byte tail.
fn multi_bytes() -> Vec<u8> {
    let block = recipe(1, 64 * 1024);
    [block.clone(), block, recipe(2, 100)].concat()
}

const SMALL: &[u8] = b"hello from dfs format v1\n";

/// What each live key of the fixture holds: (key, bytes, sha1, chunks,
/// content type).
fn fixture_objects() -> Vec<(&'static str, Vec<u8>, &'static str, u32, &'static str)> {
    vec![
        (
            "empty",
            Vec::new(),
            "da39a3ee5e6b4b0d3255bfef95601890afd80709",
            0,
            "",
        ),
        ("dir/small.txt", SMALL.to_vec(), SMALL_SHA1, 1, "text/plain"),
        ("multi.bin", multi_bytes(), MULTI_SHA1, 3, ""),
        ("overwritten", recipe(4, 5000), OVERWRITTEN_SHA1, 1, ""),
    ]
}
const SMALL_SHA1: &str = "5e0a33fd6c0f92156092a63793e78048abde5ced";
const MULTI_SHA1: &str = "692151f02ecef43faec94f606635da0734b87b92";
const OVERWRITTEN_SHA1: &str = "aed90985848a13f8d12880146d4cec8d651b9768";
/// The fixture's chunk files: HMAC-SHA1 under the test key's K_id of the
/// 64 KiB block, the 100-byte tail, the small file, both versions of
/// `overwritten` and the deleted object's bytes (the last two are garbage
/// a collector may take once their grace has passed).
const FIXTURE_CHUNKS: [&str; 6] = [
    "547cd52439a56579294792172514d02d5c2c200f",
    "89522b31108f8d3739c56c8fdb1c8a2178755fba",
    "89c67e2702ddf8f199b13d85c2988bfecc017ac3",
    "8a913efbf74162ad050595f51a7a44dbf3d5453a",
    "97b4ec23d95fc53a119c62e0e8d17daf7f6c60e6",
    "eb4fbc780a6a1247ef59ff2b6bf74c300730b223",
];

/// Writes the fixture with a real node of this version. Run once, by hand,
/// when a new format version gets its own fixture:
/// `DFS_WRITE_FIXTURE=1 cargo test --test format -- --ignored write_fixture`.
/// Never rewrite an existing fixture: it stands for data already on disks.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "writes tests/fixtures; run by hand for a new format version"]
async fn write_fixture() {
    assert_eq!(std::env::var("DFS_WRITE_FIXTURE").as_deref(), Ok("1"));
    let target = fixture_dir();
    assert!(
        !target.exists(),
        "{} exists: never rewrite a fixture",
        target.display()
    );
    let mut node = TestNode::new(&[]);
    fs::create_dir_all(node.data_dir()).expect("data dir");
    fs::write(
        node.data_dir().join("cluster.key"),
        format!("{SECRET_HEX}\n"),
    )
    .expect("key");
    node.launch().await;
    let mut storage = node.storage().await;
    let header = |key: &str, ct: &str| dfs::proto::UploadHeader {
        key: key.into(),
        content_type: ct.into(),
        metadata: if key == "dir/small.txt" {
            [("origin".to_owned(), "fixture".to_owned())].into()
        } else {
            Default::default()
        },
        ..Default::default()
    };
    upload_raw(
        &mut storage,
        upload_messages(header("overwritten", ""), &recipe(3, 3000), 1000),
    )
    .await
    .expect("first version");
    upload_raw(
        &mut storage,
        upload_messages(header("deleted", ""), b"gone", 4),
    )
    .await
    .expect("to delete");
    storage
        .delete(DeleteRequest {
            key: "deleted".into(),
        })
        .await
        .expect("delete");
    for (key, bytes, _, _, ct) in fixture_objects() {
        upload_raw(
            &mut storage,
            upload_messages(header(key, ct), &bytes, 10_000),
        )
        .await
        .expect("fixture upload");
    }
    assert!(node.sigterm().await.success());
    copy_dir(&node.data_dir(), &target);
    for empty in ["tmp", "quarantine"] {
        let _ = fs::remove_dir(target.join(empty));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_data_directory_written_by_v1_reads_back_byte_exact() {
    let names: Vec<String> = files_under(&fixture_dir().join("chunks"))
        .iter()
        .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names, FIXTURE_CHUNKS,
        "chunk files are named by their keyed ids"
    );
    let mut node = TestNode::new(&[]);
    copy_dir(&fixture_dir(), &node.data_dir());
    node.launch().await;
    let mut storage = node.storage().await;
    for (key, bytes, sha1, chunks, ct) in fixture_objects() {
        assert_eq!(sha1_hex(&bytes), sha1, "the recipe for {key} changed");
        let info = stat_key(&mut storage, key)
            .await
            .unwrap_or_else(|e| panic!("stat {key}: {e}"));
        assert_eq!(info.size, bytes.len() as u64, "{key}");
        assert_eq!(info.sha1, sha1, "{key}");
        assert_eq!(info.chunk_count, chunks, "{key}");
        assert_eq!(info.chunk_size, 64 * 1024, "{key}");
        assert_eq!(info.content_type, ct, "{key}");
        let (_, got) = download(&mut storage, key_request(key, 0, 0))
            .await
            .unwrap_or_else(|e| panic!("download {key}: {e}"));
        assert!(got == bytes, "{key}: bytes differ");
        assert_eq!(sha1_hex(&got), sha1, "{key}");
    }
    let small = stat_key(&mut storage, "dir/small.txt").await.expect("stat");
    assert_eq!(
        small.metadata.get("origin").map(String::as_str),
        Some("fixture")
    );
    assert_code(
        stat_key(&mut storage, "deleted").await,
        Code::NotFound,
        "a tombstone of v1 stays a tombstone",
    );
    let listed: Vec<String> = storage
        .list(ListRequest::default())
        .await
        .expect("list")
        .into_inner()
        .objects
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(
        listed,
        ["dir/small.txt", "empty", "multi.bin", "overwritten"]
    );
    // The old directory takes new writes and keeps everything over a restart.
    upload(&mut storage, "new", b"written by a later version", 5)
        .await
        .expect("upload into the old directory");
    node.restart().await;
    let mut storage = node.storage().await;
    let (_, got) = download(&mut storage, key_request("multi.bin", 0, 0))
        .await
        .expect("old object after restart");
    assert!(got == multi_bytes());
    assert!(
        node.quarantine_files().is_empty(),
        "nothing failed verification"
    );
}
