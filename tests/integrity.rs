//! Nothing unverified: a damaged chunk is never served, is moved to
//! quarantine, and does not affect other objects; and data is bound to the
//! cluster key it was written with.

mod common;

use std::fs;

use common::*;
use tonic::Code;

async fn corrupt_chunk_is_detected(how: Damage) {
    let node_root = tempfile::tempdir().unwrap();
    let key_file = write_key_file(&node_root.path().join("cluster.key"), 1);
    let mut node = TestNode::new(&["--cluster-key-file", key_file.to_str().unwrap()]);
    node.launch().await;
    let mut storage = node.storage().await;

    let victim = pseudo_random(100, 5 * CHUNK + 10);
    let bystander = pseudo_random(101, 3 * CHUNK + 20);
    upload(&mut storage, "victim", &victim, CHUNK)
        .await
        .unwrap();
    upload(&mut storage, "bystander", &bystander, CHUNK)
        .await
        .unwrap();

    let ids = chunk_ids(&key_file, &victim);
    let bad_index = 2;
    let bad_path = chunk_path(&node.data_dir(), &ids[bad_index]);
    assert!(
        bad_path.is_file(),
        "chunk 2 of the victim is at {bad_path:?}"
    );
    let other = chunk_path(&node.data_dir(), &chunk_ids(&key_file, &bystander)[0]);
    damage_file(&bad_path, Some(&other), how);

    let d = download_partial(&mut storage, key_request("victim", 0, 0)).await;
    match &d.end {
        Err(s) => assert_eq!(s.code(), Code::DataLoss, "{how:?}: {s:?}"),
        Ok(()) => panic!("{how:?}: a download with a damaged chunk succeeded"),
    }
    let good_prefix = bad_index * CHUNK;
    assert!(
        d.bytes.len() <= good_prefix,
        "{how:?}: {} bytes delivered, the damaged chunk starts at {good_prefix}",
        d.bytes.len()
    );
    assert!(
        d.bytes == victim[..d.bytes.len()],
        "{how:?}: delivered bytes are not the object's"
    );

    // The damaged file is moved aside, not deleted and not served again.
    assert!(
        !bad_path.exists(),
        "{how:?}: damaged chunk still in chunks/"
    );
    let quarantined = node.quarantine_files();
    assert_eq!(
        quarantined.len(),
        1,
        "{how:?}: quarantine holds {quarantined:?}"
    );
    let name = quarantined[0].file_name().unwrap().to_str().unwrap();
    assert!(name.starts_with(&ids[bad_index].to_hex()), "{name}");

    assert_eq!(
        status_chunk_count(&node).await as usize,
        node.chunk_files().len(),
        "{how:?}: Cluster.Status counts the quarantined chunk as gone"
    );

    // A range that avoids the damaged chunk still reads; one that needs it fails.
    let (_, head) = download(&mut storage, key_request("victim", 0, 2 * CHUNK as u64))
        .await
        .unwrap();
    assert!(head == victim[..2 * CHUNK]);
    assert_code(
        download(
            &mut storage,
            key_request("victim", 2 * CHUNK as u64 + 1, 10),
        )
        .await,
        Code::DataLoss,
        "range inside the lost chunk",
    );

    // Another object in the same store is unaffected.
    let (_, got) = download(&mut storage, key_request("bystander", 0, 0))
        .await
        .unwrap();
    assert!(got == bystander, "{how:?}: bystander damaged");

    // Uploading the same content again restores a good copy of the chunk.
    upload(&mut storage, "victim-again", &victim, CHUNK)
        .await
        .unwrap();
    let (_, got) = download(&mut storage, key_request("victim", 0, 0))
        .await
        .unwrap();
    assert!(got == victim, "{how:?}: re-upload did not heal the object");
    node.assert_healthy().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn flipped_byte_in_a_chunk_is_data_loss_and_quarantined() {
    corrupt_chunk_is_detected(Damage::FlipByte).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn truncated_chunk_is_data_loss_and_quarantined() {
    corrupt_chunk_is_detected(Damage::Truncate).await;
    corrupt_chunk_is_detected(Damage::TruncateBelowIv).await;
    corrupt_chunk_is_detected(Damage::Empty).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn foreign_bytes_in_a_chunk_file_are_data_loss_and_quarantined() {
    corrupt_chunk_is_detected(Damage::SwapWithOther).await;
    corrupt_chunk_is_detected(Damage::OversizedJunk).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_chunk_file_is_data_loss() {
    let node = TestNode::start(&[]).await;
    let mut storage = node.storage().await;
    let data = pseudo_random(110, 2 * CHUNK);
    upload(&mut storage, "m", &data, CHUNK).await.unwrap();
    for f in node.chunk_files() {
        fs::remove_file(f).unwrap();
    }
    assert_code(
        download(&mut storage, key_request("m", 0, 0)).await,
        Code::DataLoss,
        "download with its chunks gone",
    );
    node.assert_healthy().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn node_uses_the_cluster_key_file_it_is_given() {
    let keys = tempfile::tempdir().unwrap();
    let key_file = write_key_file(&keys.path().join("k1"), 10);
    let mut node = TestNode::new(&["--cluster-key-file", key_file.to_str().unwrap()]);
    node.launch().await;
    let data = pseudo_random(120, 3 * CHUNK + 1);
    {
        let mut storage = node.storage().await;
        upload(&mut storage, "keyed", &data, CHUNK).await.unwrap();
    }
    // Chunk ids are keyed hashes under the given key: the files are where
    // that key puts them, and nowhere else.
    let in_order: Vec<_> = chunk_ids(&key_file, &data)
        .iter()
        .map(|id| chunk_path(&node.data_dir(), id))
        .collect();
    let mut expected = in_order.clone();
    expected.sort();
    assert_eq!(node.chunk_files(), expected);
    assert!(
        !node.data_dir().join("cluster.key").exists(),
        "a node given a key file must not create its own"
    );
    // Chunk files hold no plaintext.
    for (i, path) in in_order.iter().enumerate() {
        let sealed = fs::read(path).unwrap();
        let plain = &data[i * CHUNK..((i + 1) * CHUNK).min(data.len())];
        assert_eq!(
            sealed.len(),
            plain.len() + dfs::crypto::HEADER_LEN,
            "magic, IV, tag, ciphertext"
        );
        assert!(
            plain.len() < 32 || !sealed.windows(32).any(|w| w == &plain[..32]),
            "plaintext on disk"
        );
    }
    assert!(node.sigterm().await.success());

    // A second node on a copy of the data, with a different key, must
    // refuse to start (the index remembers the key's fingerprint) rather
    // than serve garbage or quarantine every chunk it tries to read.
    let other_key = write_key_file(&keys.path().join("k2"), 11);
    let impostor = TestNode::new(&[]);
    copy_dir(&node.data_dir(), &impostor.data_dir());
    let err = refuse_to_start(&[
        "--data",
        impostor.data_dir().to_str().unwrap(),
        "--cluster-key-file",
        other_key.to_str().unwrap(),
    ])
    .await;
    assert!(
        err.contains("different cluster key"),
        "unclear refusal: {err}"
    );
    assert!(
        files_under(&impostor.data_dir().join("quarantine")).is_empty(),
        "nothing was quarantined"
    );

    // The original node, with its key, still reads its (untouched) data.
    node.launch().await;
    let mut storage = node.storage().await;
    let (_, got) = download(&mut storage, key_request("keyed", 0, 0))
        .await
        .unwrap();
    assert!(got == data);
}

#[tokio::test(flavor = "multi_thread")]
async fn node_without_a_key_file_creates_and_keeps_one() {
    let mut node = TestNode::start(&[]).await;
    let key_path = node.data_dir().join("cluster.key");
    let key = fs::read_to_string(&key_path).expect("cluster.key created in the data dir");
    let key = key.trim();
    assert_eq!(key.len(), 64);
    assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o600,
        "the key the node made is readable by its owner only"
    );
    assert!(!node.log().contains(key), "the node logged its key");
    let data = pseudo_random(130, CHUNK + 5);
    {
        let mut storage = node.storage().await;
        upload(&mut storage, "k", &data, CHUNK).await.unwrap();
    }
    node.restart().await;
    assert_eq!(
        fs::read_to_string(&key_path).unwrap().trim(),
        key,
        "key kept"
    );
    let mut storage = node.storage().await;
    let (_, got) = download(&mut storage, key_request("k", 0, 0))
        .await
        .unwrap();
    assert!(got == data);
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_that_forgets_the_key_file_does_not_mint_a_new_key() {
    // A node first started with --cluster-key-file, restarted without it,
    // must not create a fresh key in its data dir: that key cannot read a
    // single existing chunk, and every read would quarantine one.
    let mut node = TestNode::new(&[]);
    let key_file = write_key_file(&node.root().join("k"), 20);
    node.set_args(&["--cluster-key-file", key_file.to_str().unwrap()]);
    node.launch().await;
    let data = pseudo_random(140, 2 * CHUNK);
    {
        let mut storage = node.storage().await;
        upload(&mut storage, "k", &data, CHUNK).await.unwrap();
    }
    assert!(node.sigterm().await.success());

    node.set_args(&[]);
    let err = refuse_to_start(&["--data", node.data_dir().to_str().unwrap()]).await;
    assert!(err.contains("cluster"), "unclear refusal: {err}");
    assert!(
        !node.data_dir().join("cluster.key").exists(),
        "a new key was minted"
    );

    node.set_args(&["--cluster-key-file", key_file.to_str().unwrap()]);
    node.launch().await;
    let mut storage = node.storage().await;
    let (_, got) = download(&mut storage, key_request("k", 0, 0))
        .await
        .unwrap();
    assert!(got == data);
    assert!(node.quarantine_files().is_empty());
}
