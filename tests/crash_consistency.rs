//! Crash consistency beyond kill -9. A SIGKILL keeps the page cache, so a
//! node that never synced anything would pass every kill test; these tests
//! instead record a real node's file-system syscalls with strace and check,
//! per chunk and per record, that everything an acknowledgement depends on
//! was durable before the client got it:
//!
//! * a chunk file is written under a temporary name, its data synced after
//!   the last write, renamed into place, and its directory synced;
//! * every directory the node created on the way (the data directory, its
//!   `chunks/` and shard directories) has its entry synced in its parent;
//! * every write to the record database before the acknowledgement is
//!   followed by a sync of it (redb's commit with `Durability::Immediate`);
//! * the files the data cannot be read without (the cluster key a node made
//!   itself, the database file) have durable directory entries.
//!
//! What this cannot see is listed in docs/TESTING.md ("Crash consistency").

mod common;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use common::{
    strace::{Call, Durability, now_us, parse, strace_wrapper},
    *,
};

/// Fails the test with a clear message when strace is missing (the CI
/// script installs it); a skipped check would be a test that cannot fail.
fn require_strace() {
    let found = std::process::Command::new("strace")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "strace is required by the crash-consistency tests: apt-get install strace"
    );
}

/// A node (not started) that will run under strace, recording into
/// `<root>/trace`.
fn traced_node(extra: &[&str]) -> TestNode {
    require_strace();
    let mut node = TestNode::new(extra);
    let trace = node.root().join("trace");
    let wrapper = strace_wrapper(&trace);
    node.set_wrapper(&wrapper.iter().map(String::as_str).collect::<Vec<_>>());
    let canonical = std::fs::canonicalize(node.root()).expect("canonical root");
    assert_eq!(
        canonical,
        node.root(),
        "strace shows resolved paths for descriptors; the test's paths must be resolved too"
    );
    node
}

/// Stops a traced node (so strace has written everything) and parses its trace.
async fn stop_and_read_trace(node: &mut TestNode) -> Vec<Call> {
    let status = node.sigterm().await;
    assert!(status.success(), "traced node exited with {status}");
    let text = std::fs::read_to_string(node.root().join("trace")).expect("read the trace");
    let calls = parse(&text);
    assert!(
        calls.iter().any(|c| c.is_sync()),
        "the trace holds no sync at all: is strace recording? first lines:\n{}",
        text.lines().take(20).collect::<Vec<_>>().join("\n")
    );
    calls
}

/// strace pads short pids and splits a call another thread interrupted.
#[test]
fn parses_padded_pids_split_calls_and_drops_failures() {
    let text = "\
2967  1795820020.000001 openat(AT_FDCWD</w>, \"/d/x\", O_RDONLY) = -1 ENOENT (No such file)
12345 1795820020.000002 fdatasync(9</d/tmp/a> <unfinished ...>
777   1795820020.000003 rename(\"/d/tmp/a\", \"/d/chunks/a\") = 0
12345 1795820020.000009 <... fdatasync resumed>) = 0
";
    let calls = parse(text);
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0].pid, 777);
    assert_eq!(
        calls[0].paths,
        [PathBuf::from("/d/tmp/a"), PathBuf::from("/d/chunks/a")]
    );
    assert_eq!(
        (calls[1].name.as_str(), calls[1].start, calls[1].end),
        ("fdatasync", 1795820020000002, 1795820020000009)
    );
    assert_eq!(calls[1].paths, [PathBuf::from("/d/tmp/a")]);
}

#[track_caller]
fn assert_none(violations: Vec<String>, what: &str) {
    assert!(
        violations.is_empty(),
        "{what}: acknowledged before it was durable:\n  {}",
        violations.join("\n  ")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_acknowledges_uploads_and_deletes_only_once_they_are_durable() {
    let mut node = traced_node(&[]);
    node.launch().await;
    let data_dir = node.data_dir();
    let mut storage = node.storage().await;

    let data = pseudo_random(900, 3 * CHUNK + 100);
    let upload_from = now_us();
    upload(&mut storage, "durable", &data, 50_000)
        .await
        .expect("upload");
    let upload_ack = now_us();

    let delete_from = now_us();
    storage
        .delete(dfs::proto::DeleteRequest {
            key: "durable".into(),
        })
        .await
        .expect("delete");
    let delete_ack = now_us();

    // The node made its own key (none was given): the data needs it.
    let key_file = data_dir.join("cluster.key");
    let ids = chunk_ids(&key_file, &data);
    let calls = stop_and_read_trace(&mut node).await;

    let upload = Durability {
        calls: &calls,
        ack: upload_ack,
    };
    for id in &ids {
        assert_none(upload.chunk_file(&chunk_path(&data_dir, id)), "chunk");
    }
    // Whole chunks were written around the page cache (and the checks
    // above held for them); the 100-byte tail through it.
    assert_direct_writes(&upload, &data_dir, &ids, 3);
    let index = data_dir.join("index.redb");
    assert_none(upload.database(&index, upload_from), "object record");
    assert_none(upload.created_file(&index), "record database file");
    assert_none(upload.created_file(&key_file), "cluster key file");
    assert_none(
        upload.chunk_file(&data_dir.join("node.key")),
        "node key file",
    );

    let delete = Durability {
        calls: &calls,
        ack: delete_ack,
    };
    assert_none(delete.database(&index, delete_from), "tombstone");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_replica_is_durable_before_the_upload_is_acknowledged() {
    let key_dir = tempfile::tempdir().expect("temp dir");
    let key_file = write_key_file(&key_dir.path().join("cluster.key"), 901);
    let key = key_file.to_str().expect("utf-8 path");
    let base = [
        "--cluster-key-file",
        key,
        "--replicas",
        "2",
        "--dead-after",
        "5s",
    ];
    let mut a = traced_node(&base);
    a.launch().await;
    let seed = a.p2p_addr().await;
    let mut b_args = base.to_vec();
    b_args.extend_from_slice(&["--peer", &seed]);
    let mut b = traced_node(&b_args);
    b.launch().await;
    for node in [&a, &b] {
        poll_until(
            Duration::from_secs(30),
            "the two nodes see each other",
            async || common::cluster::members_up(node).await == 1,
        )
        .await;
    }

    let data = pseudo_random(902, 4 * CHUNK + 5);
    let from = now_us();
    upload(&mut a.storage().await, "replicated", &data, 100_000)
        .await
        .expect("upload");
    let ack = now_us();

    let ids = chunk_ids(&key_file, &data);
    let gateway = a.data_dir();
    for node in [&mut a, &mut b] {
        let dir = node.data_dir();
        let calls = stop_and_read_trace(node).await;
        let rules = Durability { calls: &calls, ack };
        for id in &ids {
            // R = 2 of two nodes: every chunk on both, synced before the ack.
            assert_none(rules.chunk_file(&chunk_path(&dir, id)), "replica");
        }
        // The gateway's own copies and the replica's received ones alike.
        assert_direct_writes(&rules, &dir, &ids, 4);
        if dir == gateway {
            assert_none(rules.database(&dir.join("index.redb"), from), "record");
        }
    }
    assert_chunks_present(&a.data_dir(), &b.data_dir(), &ids);
}

/// The first `whole` chunks (64 KiB and more sealed) were created with
/// O_DIRECT, the rest without: the durability checks covered direct writes.
#[track_caller]
fn assert_direct_writes(
    rules: &Durability,
    data_dir: &Path,
    ids: &[dfs::crypto::ChunkId],
    whole: usize,
) {
    for (i, id) in ids.iter().enumerate() {
        let direct = rules.created_with(&chunk_path(data_dir, id), "O_DIRECT");
        assert_eq!(direct, i < whole, "chunk {i} ({id}) created with O_DIRECT");
    }
}

fn assert_chunks_present(a: &Path, b: &Path, ids: &[dfs::crypto::ChunkId]) {
    for id in ids {
        for dir in [a, b] {
            assert!(chunk_path(dir, id).is_file(), "{id} missing in {dir:?}");
        }
    }
}
