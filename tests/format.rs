//! The on-disk and key formats, pinned. Every constant here was computed
//! outside dfs (Python's hmac/hashlib for HKDF-SHA256 and HMAC-SHA1,
//! `b3sum --keyed` for keyed BLAKE3, the openssl command for AES-256-CTR)
//! or read from a committed data directory that a version of dfs wrote,
//! never from the code under test. A change to a key-derivation label, a
//! chunk-id function, a sealed layout or the record encoding fails here;
//! such a change needs a new format version that keeps every committed
//! fixture (`tests/fixtures/datadir-v1`, format 1 chunks, and
//! `tests/fixtures/datadir-v2`, format 2 chunks) readable.

mod common;

use std::{fs, path::Path};

use aes::cipher::{KeyIvInit, StreamCipher};
use common::*;
use dfs::{
    crypto::{ChunkFormat, ChunkId, ClusterSecret, HEADER_LEN, IV_LEN, Keys, MAGIC_V2, TAG_LEN},
    proto::{DeleteRequest, ListRequest},
};
use tonic::Code;

/// The test secret: bytes 00 01 .. 1f, as a key file holds it.
const SECRET_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
/// K_enc for [`SECRET_HEX`]: HKDF-SHA256(salt `dfs cluster v1`, info
/// `dfs chunk encryption v1`). Both formats encrypt with it.
const K_ENC: &str = "bfca88e98f614bf2036ce682e9cc9807dcbc0c49193de71beb139e84bba51cad";
/// K_mac for [`SECRET_HEX`] (info `dfs chunk mac v2`): the key of format
/// 2's tag.
const K_MAC: &str = "a5ae00520aacf3b49d644c1df46eac16295ff21cd61b3d3416b0d32f38e7cf2d";
/// A plaintext chunk and its format 1 id, HMAC-SHA1(K_id, plain) with
/// K_id from info `dfs chunk id v1`.
const PLAIN: &[u8] = b"The quick brown fox jumps over the lazy dog, chunk format v1.";
const PLAIN_ID: &str = "1975d6dce52607a31ea447381b369ab2c94e1487";
const EMPTY_ID: &str = "d7608be52f9ebd3337a6f616d0849b881cef9e32";
/// The sealed form of [`PLAIN`] with an IV whose low 64 bits are all ones:
/// the second block's counter carries into the high half, which only a
/// 128-bit big-endian counter does.
const SEALED_IV: &str = "0001020304050607ffffffffffffffff";
const SEALED_CT: &str = "d6f0be7683680f64204b15ab2a67039a0f295bd0eff44696f9510383d72dc80c\
                         8a85a7736b96ea399f263114fed2abb43f78c12b9f6212d75711325d5d";
/// A plaintext chunk and its format 2 id: the first 20 bytes of
/// BLAKE3-keyed(K_id2, plain), K_id2 from info `dfs chunk id v2`
/// (`f295710a…312e346b`).
const PLAIN2: &[u8] = b"The quick brown fox jumps over the lazy dog, chunk format v2.";
const PLAIN2_ID: &str = "c8beaa8839b14849ba3c5033a940cdff551518e3";
const EMPTY2_ID: &str = "c11e9aa7141f354e852dbba66051a170123542aa";
/// [`PLAIN2`] sealed in format 2 with [`SEALED_IV`]: the ciphertext
/// (AES-256-CTR under K_enc) and the tag, BLAKE3-keyed(K_mac, ciphertext ||
/// "dfschnk2" || IV || id).
const SEALED2_CT: &str = "d6f0be7683680f64204b15ab2a67039a0f295bd0eff44696f9510383d72dc80c\
                          8a85a7736b96ea399f263114fed2abb43f78c12b9f6212d75711325e5d";
const SEALED2_TAG: &str = "934fd267e1b4f5706573f3b828a83eaa4eea37b095426c509fef58297cc5aebe";
/// The key fingerprint a data directory records (first 8 bytes of
/// HMAC-SHA1(K_id, `dfs key fingerprint v1`)); format 2 keeps it.
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

/// Format 2's tag, from its definition (the blake3 crate, not dfs).
fn tag_v2(ciphertext: &[u8], iv: &[u8], id: &str) -> [u8; TAG_LEN] {
    let key: [u8; 32] = unhex(K_MAC).try_into().expect("32-byte key");
    let mut h = blake3::Hasher::new_keyed(&key);
    h.update(ciphertext);
    h.update(b"dfschnk2");
    h.update(iv);
    h.update(&unhex(id));
    *h.finalize().as_bytes()
}

#[test]
fn chunk_ids_are_hmac_sha1_under_the_v1_id_key() {
    let keys = test_keys();
    assert_eq!(keys.chunk_id_v1(PLAIN).to_hex(), PLAIN_ID);
    assert_eq!(keys.chunk_id_v1(b"").to_hex(), EMPTY_ID);
    assert_eq!(keys.fingerprint(), FINGERPRINT);
}

#[test]
fn format_2_chunk_ids_are_keyed_blake3_under_the_v2_id_key() {
    let keys = test_keys();
    assert_eq!(keys.chunk_id(PLAIN2).to_hex(), PLAIN2_ID);
    assert_eq!(keys.chunk_id(b"").to_hex(), EMPTY2_ID);
}

#[test]
fn a_format_1_chunk_is_the_iv_then_aes256_ctr_of_the_plaintext() {
    let keys = test_keys();
    let id: ChunkId = PLAIN_ID.parse().expect("id");
    // Opening the known sealed bytes gives the plaintext back.
    let mut sealed = unhex(SEALED_IV);
    sealed.extend(unhex(SEALED_CT));
    assert_eq!(ChunkFormat::of(&sealed), ChunkFormat::V1);
    keys.verify_sealed(&sealed, &id)
        .expect("known sealed chunk verifies");
    let mut opened = sealed.clone();
    let at = keys
        .open_in_place(&mut opened, &id)
        .expect("known sealed chunk opens");
    assert_eq!(at, IV_LEN);
    assert_eq!(&opened[IV_LEN..], PLAIN);
    // Format 1 sealing (kept for tests only) writes a 16-byte IV, then the
    // plaintext under AES-256-CTR with K_enc and that IV as the whole
    // initial counter block.
    let mut buf = vec![0u8; IV_LEN];
    buf.extend_from_slice(PLAIN);
    assert_eq!(keys.seal_v1_in_place(&mut buf).to_hex(), PLAIN_ID);
    assert_eq!(buf.len(), IV_LEN + PLAIN.len(), "no header, no tag");
    let (iv, body) = buf.split_at_mut(IV_LEN);
    ctr(&unhex(K_ENC), iv, body);
    assert_eq!(body, PLAIN);
}

#[test]
fn a_format_2_chunk_is_magic_iv_tag_then_ciphertext() {
    let keys = test_keys();
    let id: ChunkId = PLAIN2_ID.parse().expect("id");
    let iv = unhex(SEALED_IV);
    assert_eq!(
        tag_v2(&unhex(SEALED2_CT), &iv, PLAIN2_ID).to_vec(),
        unhex(SEALED2_TAG),
        "the tag's definition"
    );
    let sealed = [
        b"dfschnk2".to_vec(),
        iv,
        unhex(SEALED2_TAG),
        unhex(SEALED2_CT),
    ]
    .concat();
    assert_eq!(ChunkFormat::of(&sealed), ChunkFormat::V2);
    keys.verify_sealed(&sealed, &id)
        .expect("known sealed chunk verifies");
    let mut opened = sealed.clone();
    let at = keys
        .open_in_place(&mut opened, &id)
        .expect("known sealed chunk opens");
    assert_eq!(at, HEADER_LEN);
    assert_eq!(&opened[HEADER_LEN..], PLAIN2);

    // Sealing writes the magic, a fresh IV, the tag, then the plaintext
    // under AES-256-CTR with K_enc and that IV as the initial counter block.
    let mut buf = vec![0u8; HEADER_LEN];
    buf.extend_from_slice(PLAIN2);
    assert_eq!(keys.seal_in_place(&mut buf).to_hex(), PLAIN2_ID);
    assert_eq!(buf.len(), HEADER_LEN + PLAIN2.len());
    assert_eq!(HEADER_LEN, 8 + IV_LEN + TAG_LEN, "56-byte header");
    assert_eq!(&buf[..8], MAGIC_V2);
    assert_eq!(&buf[..8], b"dfschnk2");
    let (head, body) = buf.split_at_mut(HEADER_LEN);
    let (iv, tag) = (&head[8..8 + IV_LEN], &head[8 + IV_LEN..]);
    assert_eq!(tag, tag_v2(body, iv, PLAIN2_ID));
    ctr(&unhex(K_ENC), iv, body);
    assert_eq!(body, PLAIN2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_stores_a_chunk_under_its_format_2_id_as_magic_iv_tag_and_ciphertext() {
    let mut node = TestNode::new(&[]);
    let key_file = node.root().join("cluster.key");
    fs::write(&key_file, format!("{SECRET_HEX}\n")).expect("write key");
    node.add_args(&["--cluster-key-file", key_file.to_str().expect("utf-8")]);
    node.launch().await;
    upload(&mut node.storage().await, "plain", PLAIN2, 7)
        .await
        .expect("upload");
    let path = node
        .data_dir()
        .join("chunks")
        .join(&PLAIN2_ID[..2])
        .join(&PLAIN2_ID[2..4])
        .join(PLAIN2_ID);
    assert_eq!(
        node.chunk_files(),
        vec![path.clone()],
        "one chunk, at its id"
    );
    let mut sealed = fs::read(&path).expect("read the chunk file");
    assert_eq!(sealed.len(), HEADER_LEN + PLAIN2.len());
    assert_eq!(&sealed[..8], b"dfschnk2");
    let (head, body) = sealed.split_at_mut(HEADER_LEN);
    let (iv, tag) = (&head[8..8 + IV_LEN], &head[8 + IV_LEN..]);
    assert_eq!(tag, tag_v2(body, iv, PLAIN2_ID));
    ctr(&unhex(K_ENC), iv, body);
    assert_eq!(body, PLAIN2);
}

// ---------------------------------------------------------------------------
// The committed data directory.

/// Where a committed data directory lives: `datadir-v1` was written by the
/// last version that wrote format 1 chunks, `datadir-v2` by the first that
/// wrote format 2; both from the same recipe.
fn fixture_dir(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
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
/// The chunk files of `datadir-v1`: HMAC-SHA1 under the test key's K_id of
/// the 64 KiB block, the 100-byte tail, the small file, both versions of
/// `overwritten` and the deleted object's bytes (the last two are garbage
/// a collector may take once their grace has passed).
const FIXTURE_CHUNKS_V1: [&str; 6] = [
    "547cd52439a56579294792172514d02d5c2c200f",
    "89522b31108f8d3739c56c8fdb1c8a2178755fba",
    "89c67e2702ddf8f199b13d85c2988bfecc017ac3",
    "8a913efbf74162ad050595f51a7a44dbf3d5453a",
    "97b4ec23d95fc53a119c62e0e8d17daf7f6c60e6",
    "eb4fbc780a6a1247ef59ff2b6bf74c300730b223",
];
/// The chunk files of `datadir-v2`: the same plaintexts named by keyed
/// BLAKE3 under the test key's K_id2 (`b3sum --keyed`, first 20 bytes), in
/// sorted order: the tail, the small file, the 64 KiB block, the first
/// version of `overwritten`, its second, the deleted object.
const FIXTURE_CHUNKS_V2: [&str; 6] = [
    "92fa5cced549068b6d572d417de4ebb683f5fcd4",
    "9598714bde81ccbc84f80c11c915cb656b2c7dfb",
    "98016739bf83d95f6b680700fd4e4a1ce9ff4f45",
    "9bbc816d055866d24d245b1bc449de337ae39671",
    "e4d78a8282ea2ffc9ec5d4d717e2a4a67b225275",
    "f623d99a69e0b9247b835f6937299240f2b4fa45",
];

/// Writes a fixture with a real node of this version. Run once, by hand,
/// when a new format version gets its own fixture, naming the directory:
/// `DFS_WRITE_FIXTURE=datadir-v3 cargo test --test format -- --ignored write_fixture`.
/// Never rewrite an existing fixture: it stands for data already on disks.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "writes tests/fixtures; run by hand for a new format version"]
async fn write_fixture() {
    let name = std::env::var("DFS_WRITE_FIXTURE").expect("DFS_WRITE_FIXTURE names the fixture");
    assert!(name.starts_with("datadir-v"), "{name}");
    let target = fixture_dir(&name);
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
    // The empty lock file a running node holds: a copy makes its own.
    let _ = fs::remove_file(target.join("lock"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_data_directory_written_by_v1_reads_back_byte_exact() {
    reads_back_byte_exact("datadir-v1", FIXTURE_CHUNKS_V1, ChunkFormat::V1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_data_directory_written_by_v2_reads_back_byte_exact() {
    reads_back_byte_exact("datadir-v2", FIXTURE_CHUNKS_V2, ChunkFormat::V2).await;
}

/// A node on a copy of the committed fixture `name` serves every object,
/// its metadata, tombstone and listing as they were written, takes new
/// writes and keeps everything over a restart.
async fn reads_back_byte_exact(name: &str, chunks: [&str; 6], format: ChunkFormat) {
    let files = files_under(&fixture_dir(name).join("chunks"));
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, chunks, "chunk files are named by their keyed ids");
    for file in &files {
        let sealed = fs::read(file).expect("read a fixture chunk");
        assert_eq!(ChunkFormat::of(&sealed), format, "{}", file.display());
    }
    let mut node = TestNode::new(&[]);
    copy_dir(&fixture_dir(name), &node.data_dir());
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
