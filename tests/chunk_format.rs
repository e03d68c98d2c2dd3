//! Chunk format 2 (keyed-BLAKE3 ids, encrypt-then-MAC) next to the format 1
//! data that earlier versions wrote: a node on an old data directory reads
//! every old chunk byte-exact, serves and replicates it, finds rot in it,
//! and writes new chunks in format 2 under ids of their own.
//!
//! `tests/fixtures/datadir-v1` is a data directory written by the last
//! version that wrote format 1 (see `tests/format.rs` on the branch that
//! added it); its objects are rebuilt here from the same recipe.

mod common;

use std::{fs, path::Path, time::Duration};

use common::{cluster::FAST, *};
use dfs::crypto::{ChunkFormat, ChunkId, HEADER_LEN, Keys, MAGIC_V2};
use tonic::Code;

fn fixture_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/datadir-v1")
}

/// The fixture's recipe (a 32-bit LCG).
fn recipe(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        })
        .collect()
}

/// The fixture's live objects and the SHA-1s it recorded for them.
fn fixture_objects() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let block = recipe(1, 64 * 1024);
    vec![
        (
            "empty",
            Vec::new(),
            "da39a3ee5e6b4b0d3255bfef95601890afd80709",
        ),
        (
            "dir/small.txt",
            b"hello from dfs format v1\n".to_vec(),
            "5e0a33fd6c0f92156092a63793e78048abde5ced",
        ),
        (
            "multi.bin",
            [block.clone(), block, recipe(2, 100)].concat(),
            "692151f02ecef43faec94f606635da0734b87b92",
        ),
        (
            "overwritten",
            recipe(4, 5000),
            "aed90985848a13f8d12880146d4cec8d651b9768",
        ),
    ]
}

fn fixture_keys() -> Keys {
    let secret = dfs::crypto::ClusterSecret::read_file(&fixture_dir().join("cluster.key"))
        .expect("fixture key");
    Keys::derive(&secret)
}

/// A node on a private copy of the fixture.
async fn fixture_node(extra: &[&str]) -> TestNode {
    let mut node = TestNode::new(extra);
    copy_dir(&fixture_dir(), &node.data_dir());
    node.launch().await;
    node
}

async fn assert_fixture_reads(node: &TestNode) {
    let mut storage = node.storage().await;
    for (key, bytes, sha1) in fixture_objects() {
        assert_eq!(sha1_hex(&bytes), sha1, "the recipe for {key} changed");
        let (info, got) = download(&mut storage, key_request(key, 0, 0))
            .await
            .unwrap_or_else(|e| panic!("download {key}: {e}"));
        assert_eq!(info.sha1, sha1, "{key}");
        assert!(got == bytes, "{key}: bytes differ");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_old_data_directory_reads_back_and_new_chunks_are_format_2() {
    let mut node = fixture_node(&[]).await;
    let old_files = node.chunk_files();
    assert!(
        old_files
            .iter()
            .all(|p| ChunkFormat::of(&fs::read(p).expect("read")) == ChunkFormat::V1),
        "the fixture holds format 1 chunks only"
    );
    assert_fixture_reads(&node).await;

    // The same bytes as an old object, uploaded again: a new chunk in format
    // 2 under its own id, next to the old one (the formats never dedup
    // into each other), and both objects read back.
    let keys = fixture_keys();
    let small = b"hello from dfs format v1\n";
    let mut storage = node.storage().await;
    upload(&mut storage, "again", small, 7)
        .await
        .expect("upload");
    let new_id = keys.chunk_id(small);
    assert_ne!(new_id, keys.chunk_id_v1(small));
    let new_path = chunk_path(&node.data_dir(), &new_id);
    let sealed = fs::read(&new_path).expect("the new chunk is stored under its format 2 id");
    assert_eq!(&sealed[..MAGIC_V2.len()], &MAGIC_V2);
    assert_eq!(sealed.len(), HEADER_LEN + small.len());
    keys.verify_sealed(&sealed, &new_id).expect("verifies");
    assert!(
        chunk_path(&node.data_dir(), &keys.chunk_id_v1(small)).is_file(),
        "the old copy stays"
    );
    let (_, got) = download(&mut storage, key_request("again", 0, 0))
        .await
        .expect("new object");
    assert_eq!(got, small);

    node.restart().await;
    assert_fixture_reads(&node).await;
    let (_, got) = download(&mut node.storage().await, key_request("again", 0, 0))
        .await
        .expect("new object after restart");
    assert_eq!(got, small);
    for old in old_files {
        assert!(old.is_file(), "{} is still there", old.display());
    }
    assert!(node.quarantine_files().is_empty(), "nothing failed");
}

#[tokio::test(flavor = "multi_thread")]
async fn rot_in_an_old_chunk_is_still_caught() {
    let keys = fixture_keys();
    let block = recipe(1, 64 * 1024);
    let id = keys.chunk_id_v1(&block);
    // The scrubber checks format 1 chunks as well; start it fast.
    let mut node = TestNode::new(&["--scrub-interval", "2s", "--scrub-rate", "64MiB"]);
    copy_dir(&fixture_dir(), &node.data_dir());
    let path = chunk_path(&node.data_dir(), &id);
    let mut bytes = fs::read(&path).expect("fixture chunk");
    bytes[5000] ^= 0x04;
    fs::write(&path, bytes).expect("rot");
    node.launch().await;
    // Found without a read, by the scrubber, and moved aside.
    let found = wait_until(Duration::from_secs(30), || {
        node.quarantine_files().len() == 1 && !path.exists()
    })
    .await;
    assert!(
        found,
        "the scrubber did not quarantine the rotten format 1 chunk"
    );
    assert_code(
        download(&mut node.storage().await, key_request("multi.bin", 0, 0)).await,
        Code::DataLoss,
        "an object whose only copy rotted",
    );
    // The other old objects are untouched.
    let (_, got) = download(&mut node.storage().await, key_request("overwritten", 0, 0))
        .await
        .expect("overwritten");
    assert_eq!(got, recipe(4, 5000));
}

#[tokio::test(flavor = "multi_thread")]
async fn old_chunks_replicate_to_a_new_node_and_serve_from_it() {
    // The fixture node and an empty one, R=2: repair copies every old chunk
    // to the new node as it is (format 1), which must take it.
    let key = fixture_dir().join("cluster.key");
    let key = key.to_str().expect("utf-8");
    let args = [&["--cluster-key-file", key, "--replicas", "2"][..], FAST].concat();
    let mut old = fixture_node(&args).await;
    let seed = old.p2p_addr().await;
    let fresh = TestNode::start(&[&args[..], &["--peer", &seed]].concat()).await;
    let keys = fixture_keys();
    let block = recipe(1, 64 * 1024);
    let ids: Vec<ChunkId> = [
        block.clone(),
        recipe(2, 100),
        b"hello from dfs format v1\n".to_vec(),
        recipe(4, 5000),
    ]
    .iter()
    .map(|plain| keys.chunk_id_v1(plain))
    .collect();
    let copied = wait_until(Duration::from_secs(60), || {
        ids.iter()
            .all(|id| chunk_path(&fresh.data_dir(), id).is_file())
    })
    .await;
    assert!(copied, "repair did not copy the old chunks to the new node");
    for id in &ids {
        let sealed = fs::read(chunk_path(&fresh.data_dir(), id)).expect("copy");
        assert_eq!(ChunkFormat::of(&sealed), ChunkFormat::V1);
        keys.verify_sealed(&sealed, id).expect("the copy verifies");
    }
    // The new node serves the old objects (its index synced from the old
    // one) with the old node gone.
    old.kill9();
    let mut storage = fresh.storage().await;
    for (key, bytes, _) in fixture_objects() {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let got = loop {
            match download(&mut storage, key_request(key, 0, 0)).await {
                Ok((_, got)) => break got,
                Err(e) if std::time::Instant::now() > deadline => {
                    panic!("{key} is not served by the new node: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        assert!(got == bytes, "{key}: bytes differ");
    }
}

/// A chunk size that is not a multiple of 4 KiB, and objects whose last
/// chunk is empty, tiny, exactly 64 KiB sealed, or large with a partial
/// block: every chunk file is a format 2 chunk of exactly its plaintext
/// and header (direct writes cut nothing and pad nothing), and every
/// object and range reads back byte-exact, through the API and `dfs get`,
/// before and after a restart.
#[tokio::test(flavor = "multi_thread")]
async fn odd_chunk_sizes_and_partial_chunks_round_trip_around_the_page_cache() {
    const CHUNK: usize = 100_000;
    let mut node = TestNode::new(&["--chunk-size", "100000"]);
    let key_file = node.use_key_file(77);
    node.launch().await;
    let keys = Keys::derive(&dfs::crypto::ClusterSecret::read_file(&key_file).expect("key"));
    let sizes = [
        0,
        1,
        4095,
        65_536 - HEADER_LEN, // sealed: exactly 64 KiB, no partial block
        99_999,
        CHUNK,
        CHUNK + 1,
        2 * CHUNK + 4096 - HEADER_LEN, // a tail sealed to one block
        2 * CHUNK + 70_000,            // a large tail with a partial block
        3 * CHUNK + 7,
    ];
    let objects: Vec<(String, Vec<u8>)> = sizes
        .iter()
        .map(|&n| (format!("odd/{n}"), pseudo_random(n as u64 + 5, n)))
        .collect();
    let mut storage = node.storage().await;
    for (key, data) in &objects {
        let info = upload(&mut storage, key, data, 30_000)
            .await
            .unwrap_or_else(|e| panic!("upload {key}: {e}"));
        assert_eq!(info.chunk_count as usize, data.len().div_ceil(CHUNK));
        for plain in data.chunks(CHUNK) {
            let id = keys.chunk_id(plain);
            let sealed = fs::read(chunk_path(&node.data_dir(), &id)).expect("chunk file");
            assert_eq!(sealed.len(), HEADER_LEN + plain.len(), "{key}: {id}");
            assert_eq!(ChunkFormat::of(&sealed), ChunkFormat::V2, "{key}");
            keys.verify_sealed(&sealed, &id)
                .unwrap_or_else(|e| panic!("{key}: {e}"));
        }
    }
    for round in ["written", "after a restart"] {
        let mut storage = node.storage().await;
        for (key, data) in &objects {
            let (_, got) = download(&mut storage, key_request(key, 0, 0))
                .await
                .unwrap_or_else(|e| panic!("{round}: download {key}: {e}"));
            assert!(got == *data, "{round}: {key}: bytes differ");
            if data.len() > CHUNK + 8 {
                // Across the first chunk boundary, and the last byte.
                let (_, got) = download(&mut storage, key_request(key, CHUNK as u64 - 8, 16))
                    .await
                    .expect("range");
                assert_eq!(got, data[CHUNK - 8..CHUNK + 8], "{round}: {key}");
                let last = data.len() as u64 - 1;
                let (_, got) = download(&mut storage, key_request(key, last, 1))
                    .await
                    .expect("last byte");
                assert_eq!(got, data[data.len() - 1..], "{round}: {key}");
            }
        }
        let out = node.root().join("got.bin");
        for (key, data) in [&objects[0], &objects[8]] {
            let _ = fs::remove_file(&out);
            let get = run_dfs(&[
                "get",
                key,
                "-o",
                out.to_str().expect("utf-8"),
                "--node",
                node.addr(),
            ])
            .await;
            assert!(get.status.success(), "{round}: dfs get {key}: {get:?}");
            assert!(fs::read(&out).expect("output") == *data, "{round}: {key}");
        }
        if round == "written" {
            node.restart().await;
        }
    }
    assert!(node.quarantine_files().is_empty(), "nothing failed");
}
