//! Index traffic bounded in bytes, not in records (issue 7, defect 2), and
//! records from peers validated like client input (defect 7, structural
//! half), with real node processes on loopback.
//!
//! * Content type and metadata have caps, refused on Upload.
//! * List pages and IndexSync replies stay far under the 4 MiB limits even
//!   when every record is at the caps.
//! * A record whose chunk list is far larger than any frame (300,000 ids)
//!   leaves its node: by lookup (`GetRecord`) and by sync (`IndexSync`), its
//!   list fetched in pages.
//! * An out-of-line chunk list works end to end for real uploads (the
//!   hidden `--inline-chunk-ids` test knob makes a 2 MiB upload use it).
//! * A peer's malformed record is refused, a well-formed one applied.

mod common;

use std::{collections::HashMap, path::Path, time::Duration};

use common::*;
use dfs::proto::{ListRequest, ObjectInfo, ObjectRecord, UploadHeader, Version};
use tonic::Code;

/// The documented caps (README, docs/PROTOCOL.md). Written out rather than
/// imported so these tests also build against code that has no caps.
const CONTENT_TYPE_CAP: usize = 1024;
const METADATA_BYTES_CAP: usize = 8 * 1024;
const METADATA_ENTRIES_CAP: usize = 64;
/// The gRPC message limit and the peer MESSAGE frame cap.
const FOUR_MIB: usize = 4 << 20;

fn key_file(dir: &Path) -> std::path::PathBuf {
    write_key_file(&dir.join("cluster.key"), 77)
}

/// Metadata of exactly `total` bytes (keys plus values) in `entries` entries.
fn metadata(entries: usize, total: usize) -> HashMap<String, String> {
    let per = total / entries;
    (0..entries)
        .map(|i| {
            let k = format!("m{i:05}");
            let len = if i == entries - 1 {
                total - per * (entries - 1)
            } else {
                per
            } - k.len();
            (k, "v".repeat(len))
        })
        .collect()
}

async fn put_with(
    node: &TestNode,
    key: &str,
    content_type: &str,
    metadata: HashMap<String, String>,
    data: &[u8],
) -> Result<ObjectInfo, tonic::Status> {
    let header = UploadHeader {
        key: key.to_owned(),
        content_type: content_type.to_owned(),
        metadata,
        ..Default::default()
    };
    upload_raw(
        &mut node.storage().await,
        upload_messages(header, data, 1 << 20),
    )
    .await
}

/// Every live object a node lists, fetched with pages of up to 1000.
async fn list_all(node: &TestNode) -> Result<Vec<ObjectInfo>, tonic::Status> {
    list_paged(node, 1000).await
}

/// Every live object a node lists, fetched with pages of up to `page_size`.
async fn list_paged(node: &TestNode, page_size: u32) -> Result<Vec<ObjectInfo>, tonic::Status> {
    let mut storage = node.storage().await;
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let page = storage
            .list(ListRequest {
                prefix: String::new(),
                page_size,
                page_token: token,
            })
            .await?
            .into_inner();
        all.extend(page.objects);
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        token = page.next_page_token;
    }
}

/// Polls `node`'s listing (in pages of 100, which fit any limit) until
/// `pred` holds, for up to `timeout`.
async fn wait_listing(
    node: &TestNode,
    timeout: Duration,
    pred: impl Fn(&[ObjectInfo]) -> bool,
) -> Result<Vec<ObjectInfo>, String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match list_paged(node, 100).await {
            Ok(all) if pred(&all) => return Ok(all),
            Ok(all) => format!("{} objects listed", all.len()),
            Err(e) => format!("List failed: {e}"),
        };
        if tokio::time::Instant::now() > deadline {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// No node log reports a message over a size cap.
fn assert_no_cap_exceeded(nodes: &[&TestNode]) {
    for (i, n) in nodes.iter().enumerate() {
        let log = n.log();
        for needle in ["byte cap", "message cap", "over the cap"] {
            assert!(
                !log.contains(needle),
                "node {i} logged a message over a cap ({needle:?}):\n{log}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn content_type_and_metadata_over_their_caps_are_refused_on_upload() {
    let node = TestNode::start(&[]).await;
    let data = pseudo_random(1, 1000);
    // The repro: a 100,000-byte content type.
    let cases: Vec<(&str, String, HashMap<String, String>)> = vec![
        ("ct-100k", "x".repeat(100_000), HashMap::new()),
        ("ct-over", "x".repeat(CONTENT_TYPE_CAP + 1), HashMap::new()),
        (
            "md-bytes-over",
            String::new(),
            metadata(8, METADATA_BYTES_CAP + 1),
        ),
        (
            "md-entries-over",
            String::new(),
            metadata(METADATA_ENTRIES_CAP + 1, 1000),
        ),
    ];
    for (key, ct, md) in cases {
        let got = put_with(&node, key, &ct, md, &data).await.map(|i| i.key);
        assert_code(got, Code::InvalidArgument, key);
        assert_code(
            stat_key(&mut node.storage().await, key).await,
            Code::NotFound,
            &format!("{key} must not be stored"),
        );
    }
    // Exactly at the caps is accepted and kept whole.
    let md = metadata(METADATA_ENTRIES_CAP, METADATA_BYTES_CAP);
    let ct = "y".repeat(CONTENT_TYPE_CAP);
    let info = put_with(&node, "at-caps", &ct, md.clone(), &data)
        .await
        .expect("upload at the caps");
    assert_eq!(info.content_type, ct);
    assert_eq!(info.metadata, md);
    node.assert_healthy().await;
}

/// Records at the caps: ~10 KiB each, so 450 of them are more than 4 MiB.
/// Paged by count (1000 per List page, 500 per IndexSync reply), List fails
/// with OUT_OF_RANGE and sync from that node stops for good.
#[tokio::test(flavor = "multi_thread")]
async fn list_and_index_sync_pages_are_bounded_in_bytes_with_records_at_the_caps() {
    const OBJECTS: usize = 450;
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let key = key.to_str().unwrap();
    let a = TestNode::start(&[
        "--cluster-key-file",
        key,
        "--replicas",
        "1",
        "--sync-interval",
        "3s",
    ])
    .await;
    let ct = "t".repeat(CONTENT_TYPE_CAP);
    let md = metadata(8, METADATA_BYTES_CAP);
    let mut storage = a.storage().await;
    for i in 0..OBJECTS {
        let k = format!("{i:04}{}", "k".repeat(1000));
        let header = UploadHeader {
            key: k.clone(),
            content_type: ct.clone(),
            metadata: md.clone(),
            ..Default::default()
        };
        upload_raw(&mut storage, upload_messages(header, &[i as u8; 10], 100))
            .await
            .unwrap_or_else(|e| panic!("upload {i}: {e}"));
    }
    // B joins and pulls the whole index from A (IndexSync).
    let seed = a.p2p_addr().await;
    let b = TestNode::start(&["--cluster-key-file", key, "--peer", &seed]).await;
    let got = wait_listing(&b, Duration::from_secs(90), |all| all.len() == OBJECTS)
        .await
        .unwrap_or_else(|e| panic!("B never listed all {OBJECTS} objects: {e}"));
    assert!(got.iter().all(|o| o.metadata == md && o.content_type == ct));

    // Together the records are well over one 4 MiB message, yet List pages
    // of "up to 1000" work.
    let all = list_all(&a).await.expect("List on A, paged by bytes");
    assert_eq!(all.len(), OBJECTS);
    let total: usize = all.iter().map(prost::Message::encoded_len).sum();
    assert!(
        total > FOUR_MIB,
        "the test needs {total} > 4 MiB of records"
    );
    assert!(all.iter().all(|o| o.metadata == md && o.content_type == ct));
    // `dfs ls` (pages of 1000) works too.
    let ls = run_dfs(&["ls", "--node", a.addr()]).await;
    assert!(
        ls.status.success(),
        "dfs ls: {}",
        String::from_utf8_lossy(&ls.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&ls.stdout).lines().count(), OBJECTS);
    assert_no_cap_exceeded(&[&a, &b]);
}

/// A record of `ids` chunk ids (which need not exist) made with the library.
fn huge_record(key: &str, ids: &[u8]) -> ObjectRecord {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let count = (ids.len() / 20) as u64;
    ObjectRecord {
        key: key.to_owned(),
        size: count * CHUNK as u64,
        sha1: vec![0xab; 20].into(),
        chunk_size: CHUNK as u32,
        chunk_ids: ids.to_vec().into(),
        content_type: "application/octet-stream".into(),
        created_unix_ms: now_ms,
        version: Some(Version {
            hlc: now_ms << 16,
            node_id: "00000000feedf00d".into(),
        }),
        ..Default::default()
    }
}

/// Waits until `node` reports a member at `addr` that is up.
async fn wait_member_at(node: &TestNode, addr: &str) {
    for _ in 0..300 {
        if node
            .status()
            .await
            .members
            .iter()
            .any(|m| m.address == addr && m.state == "up")
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no member up at {addr}; log:\n{}", node.log());
}

/// A read of one chunk of `key` must fail naming exactly chunk `id`: proof
/// that the node found the right id at that position of the list.
async fn assert_reads_chunk(node: &TestNode, key: &str, index: u64, id_hex: &str) {
    let got = download(
        &mut node.storage().await,
        key_request(key, index * CHUNK as u64, 1),
    )
    .await;
    match got {
        Err(s) => {
            // DATA_LOSS once every member answered; UNAVAILABLE while one
            // (a member only heard of, not yet contacted) may hold it.
            assert!(
                matches!(s.code(), Code::DataLoss | Code::Unavailable),
                "chunk {index}: {s:?}"
            );
            assert!(
                s.message().contains(id_hex),
                "chunk {index}: expected id {id_hex} in {:?}",
                s.message()
            );
        }
        Ok(_) => panic!("chunk {index} of {key} cannot exist, yet it was read"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_of_300000_chunk_ids_converges_by_lookup_and_by_sync() {
    const IDS: usize = 300_000;
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let key = key.to_str().unwrap();
    let slow_sync = [
        "--cluster-key-file",
        key,
        "--sync-interval",
        "1h",
        "--dead-after",
        "60s",
    ];
    let mut a = TestNode::start(&slow_sync).await;
    let seed = a.p2p_addr().await;
    let mut c_args = slow_sync.to_vec();
    c_args.extend(["--peer", &seed]);
    let c = TestNode::start(&c_args).await;
    wait_member_at(&c, &seed).await;

    // A learns of the record while stopped: C's index never syncs from A
    // again (A comes back within --dead-after, and the periodic sync is an
    // hour away), so only a lookup can bring it to C.
    a.sigterm().await;
    let ids = pseudo_random(300, IDS * 20);
    let record = huge_record("huge", &ids);
    assert!(prost::Message::encoded_len(&record) > FOUR_MIB);
    {
        let index = dfs::index::Index::open(&a.data_dir().join("index.redb")).unwrap();
        assert!(index.apply(&record).unwrap());
    }
    a.launch().await;
    let a_p2p = a.p2p_addr().await;
    wait_member_at(&c, &a_p2p).await;
    let before = list_all(&c).await.expect("List on C");
    assert!(
        before.is_empty(),
        "setup: C must not have the record before the lookup: {before:?}"
    );

    // By lookup: GetRecord, then the list in pages.
    let info = stat_key(&mut c.storage().await, "huge")
        .await
        .unwrap_or_else(|e| panic!("stat through C: {e}; log of C:\n{}", c.log()));
    assert_eq!(info.chunk_count as usize, IDS);
    assert_eq!(info.size, record.size);
    let listed = list_all(&c).await.expect("List on C");
    assert_eq!(listed.len(), 1, "the lookup applied the record on C");
    let first = hex::encode(&ids[..20]);
    let last = hex::encode(&ids[(IDS - 1) * 20..]);
    assert_reads_chunk(&c, "huge", 0, &first).await;
    assert_reads_chunk(&c, "huge", IDS as u64 - 1, &last).await;

    // By sync: B joins through C and pulls the index.
    let c_p2p = c.p2p_addr().await;
    let b = TestNode::start(&["--cluster-key-file", key, "--peer", &c_p2p]).await;
    let got = wait_listing(&b, Duration::from_secs(120), |all| {
        all.iter().any(|o| o.key == "huge")
    })
    .await
    .unwrap_or_else(|e| panic!("B never listed the record: {e}; log of B:\n{}", b.log()));
    assert_eq!(got[0].chunk_count as usize, IDS);
    assert_reads_chunk(&b, "huge", IDS as u64 - 1, &last).await;
    assert_reads_chunk(&b, "huge", 4096, &hex::encode(&ids[4096 * 20..4097 * 20])).await;

    // The CLI on B.
    let stat = run_dfs(&["stat", "huge", "--node", b.addr()]).await;
    assert!(
        stat.status.success(),
        "{}",
        String::from_utf8_lossy(&stat.stderr)
    );
    assert!(String::from_utf8_lossy(&stat.stdout).contains("300000 x 64"));
    let ls = run_dfs(&["ls", "--node", b.addr()]).await;
    assert!(ls.status.success());
    assert!(String::from_utf8_lossy(&ls.stdout).contains("huge"));
    assert_no_cap_exceeded(&[&a, &b, &c]);
}

/// Starts `n` nodes that keep every list of more than 4 chunk ids out of line.
async fn knob_cluster(n: usize, key: &str) -> Vec<TestNode> {
    let base = [
        "--cluster-key-file",
        key,
        "--replicas",
        "2",
        "--inline-chunk-ids",
        "4",
        "--dead-after",
        "3s",
    ];
    let first = TestNode::start(&base).await;
    let seed = first.p2p_addr().await;
    let mut nodes = vec![first];
    for _ in 1..n {
        let mut args = base.to_vec();
        args.extend(["--peer", &seed]);
        nodes.push(TestNode::start(&args).await);
    }
    for node in &nodes {
        for _ in 0..300 {
            let up = node
                .status()
                .await
                .members
                .iter()
                .filter(|m| m.state == "up")
                .count();
            if up == n - 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    nodes
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_line_chunk_lists_work_end_to_end_for_uploads_downloads_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let nodes = knob_cluster(3, key.to_str().unwrap()).await;
    let data = pseudo_random(5, 2 << 20); // 32 chunks
    let other = pseudo_random(6, 40 * CHUNK + 123);
    let mut s0 = nodes[0].storage().await;
    upload(&mut s0, "big", &data, 1 << 20).await.unwrap();
    upload(&mut s0, "twin", &data, 1 << 20).await.unwrap(); // same list
    upload(&mut nodes[1].storage().await, "other", &other, 1 << 20)
        .await
        .unwrap();
    for (i, node) in nodes.iter().enumerate() {
        let mut s = node.storage().await;
        let (info, got) = download(&mut s, key_request("big", 0, 0)).await.unwrap();
        assert_eq!(info.chunk_count, 32, "node {i}");
        assert!(got == data, "node {i}: big");
        let (_, got) = download(&mut s, key_request("other", 0, 0)).await.unwrap();
        assert!(got == other, "node {i}: other");
        let (_, part) = download(
            &mut s,
            key_request("big", 5 * CHUNK as u64 - 7, 3 * CHUNK as u64),
        )
        .await
        .unwrap();
        assert!(
            part[..] == data[5 * CHUNK - 7..8 * CHUNK - 7],
            "node {i}: range"
        );
    }
    // Deleting one of two objects that share a list keeps the other whole;
    // overwriting replaces the list.
    s0.delete(dfs::proto::DeleteRequest { key: "twin".into() })
        .await
        .unwrap();
    upload(&mut nodes[2].storage().await, "other", &data, 1 << 20)
        .await
        .unwrap();
    for (i, node) in nodes.iter().enumerate() {
        let mut s = node.storage().await;
        assert_code(
            stat_key(&mut s, "twin").await,
            Code::NotFound,
            "deleted twin",
        );
        let (_, got) = download(&mut s, key_request("big", 0, 0)).await.unwrap();
        assert!(got == data, "node {i}: big after its twin was deleted");
        let (_, got) = download(&mut s, key_request("other", 0, 0)).await.unwrap();
        assert!(got == data, "node {i}: other after its overwrite");
    }
    let refs: Vec<&TestNode> = nodes.iter().collect();
    assert_no_cap_exceeded(&refs);
}

/// A peer that speaks the protocol with the cluster secret but sends
/// records no client could have made.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_records_from_a_peer_are_refused_and_good_ones_applied() {
    use dfs::p2p::{Identity, Limits, PeerPool};
    use dfs::proto::{IndexUpdate, PeerMessage, peer_message::Kind};

    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    // R = 1: the fake peer becomes a member but never holds a copy.
    let node = TestNode::start(&[
        "--cluster-key-file",
        key.to_str().unwrap(),
        "--replicas",
        "1",
    ])
    .await;
    let secret = dfs::crypto::ClusterSecret::read_file(&key).unwrap();
    let pool = PeerPool::new(
        Identity {
            key: dfs::identity::NodeKey::generate(),
            advertised_addr: "127.0.0.1:1".into(),
        },
        dfs::crypto::Keys::derive(&secret),
        Limits::default(),
    );
    let peer_addr = node.p2p_addr().await;
    let push = |record: ObjectRecord| {
        let pool = pool.clone();
        let addr = peer_addr.clone();
        async move {
            let msg = PeerMessage {
                has_body: false,
                kind: Some(Kind::IndexUpdate(IndexUpdate {
                    records: vec![record],
                })),
            };
            match pool.request(&addr, msg, None).await.expect("push").msg.kind {
                Some(Kind::IndexUpdateReply(r)) => r.applied,
                other => panic!("unexpected reply {other:?}"),
            }
        }
    };
    let good = |key: &str| {
        let mut r = huge_record(key, &[7u8; 3 * 20]);
        r.size = 2 * CHUNK as u64 + 1;
        r
    };
    let bad: Vec<(&str, ObjectRecord)> = vec![
        ("chunk size near 4 GiB", {
            let mut r = good("bad-chunk-size");
            r.chunk_size = u32::MAX - 15;
            r.size = 1;
            r.chunk_ids = vec![7u8; 20].into();
            r
        }),
        ("chunk size below the minimum", {
            let mut r = good("bad-small-chunk");
            r.chunk_size = 4096;
            r
        }),
        ("ids not a multiple of 20", {
            let mut r = good("bad-ids");
            r.chunk_ids = vec![7u8; 59].into();
            r
        }),
        ("id count inconsistent with the size", {
            let mut r = good("bad-count");
            r.size = 10 * CHUNK as u64;
            r
        }),
        ("sha1 of 19 bytes", {
            let mut r = good("bad-sha1");
            r.sha1 = vec![1u8; 19].into();
            r
        }),
        ("no version", {
            let mut r = good("bad-version");
            r.version = None;
            r
        }),
        ("content type over the cap", {
            let mut r = good("bad-ct");
            r.content_type = "x".repeat(CONTENT_TYPE_CAP + 1);
            r
        }),
        ("metadata over the cap", {
            let mut r = good("bad-md");
            r.metadata = metadata(8, METADATA_BYTES_CAP + 1);
            r
        }),
        ("key with NUL", good("bad\0key")),
        ("empty key", good("")),
    ];
    for (what, record) in bad {
        let k = record.key.clone();
        assert_eq!(push(record).await, 0, "{what} was applied");
        if !k.is_empty() && !k.contains('\0') {
            assert_code(
                stat_key(&mut node.storage().await, &k).await,
                Code::NotFound,
                what,
            );
        }
    }
    // The same path applies a well-formed record: the refusals had their chance.
    assert_eq!(push(good("fine")).await, 1);
    let info = stat_key(&mut node.storage().await, "fine").await.unwrap();
    assert_eq!(info.chunk_count, 3);
    assert_eq!(list_all(&node).await.unwrap().len(), 1);
    node.assert_healthy().await;
}
