//! What "acknowledged" means, with real node processes: an upload or delete
//! that returned OK is whole and durable on W nodes whatever the client or
//! the cluster did meanwhile; one that could not be made so fails.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tonic::Code;

/// Collector settings that make a paused upload outlive the grace period.
const FAST_GC: &[&str] = &["--gc-grace", "3s", "--gc-interval", "500ms"];

/// Uploads and deletes an object so that its chunks become garbage: their
/// disappearance later proves that the collector ran on every node.
async fn make_garbage(node: &TestNode, key: &str) -> Vec<u8> {
    let data = pseudo_random(777, 3 * CHUNK);
    put(node, key, &data).await;
    node.client(None)
        .await
        .delete(key)
        .await
        .expect("delete the garbage object");
    data
}

/// Pauses an upload after half its data for longer than the GC grace, with
/// proof that every node's collector ran meanwhile, then finishes it: the
/// acknowledged object must be whole.
async fn paused_upload_is_whole(c: &TestCluster, gateway: usize) {
    let garbage = make_garbage(&c.nodes[gateway], "garbage").await;
    // An upload's lease spares what was written since it began (with two
    // seconds of slack); the garbage must be older than that, yet still
    // inside its grace period when the upload starts, so that its
    // collection proves the collector ran during the pause.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let data = pseudo_random(778, 16 * CHUNK + 100);
    let upload = SlowUpload::start(&c.nodes[gateway], "paused").await;
    assert!(upload.send(&data[..8 * CHUNK]).await);
    let paused = Instant::now();
    let collected = wait_until(Duration::from_secs(30), || {
        c.copies(&garbage).iter().all(|n| *n == 0)
    })
    .await;
    assert!(
        collected,
        "the collector never ran: {:?}",
        c.copies(&garbage)
    );
    // Every chunk written so far is now older than the grace period.
    let grace = Duration::from_secs(3);
    if paused.elapsed() < grace * 2 {
        tokio::time::sleep(grace * 2 - paused.elapsed()).await;
    }
    assert!(upload.send(&data[8 * CHUNK..]).await);
    let info = upload.finish().await.expect("the paused upload succeeds");
    assert_eq!(info.size, data.len() as u64);
    for (i, node) in c.nodes.iter().enumerate() {
        let got = get(node, "paused")
            .await
            .unwrap_or_else(|e| panic!("read through node {i}: {e}"));
        assert!(got == data, "node {i} returned different bytes");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_upload_keeps_its_chunks_on_a_single_node() {
    let node = TestNode::start(FAST_GC).await;
    let c = TestCluster::from_nodes(vec![node]);
    paused_upload_is_whole(&c, 0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_upload_keeps_its_chunks_on_every_holder() {
    let c = TestCluster::start(3, 2, FAST_GC).await;
    paused_upload_is_whole(&c, 0).await;
}

/// Freezes every node but the first, and waits until the first has given
/// up on them, so it is alone.
async fn isolate_first(c: &TestCluster) {
    for node in &c.nodes[1..] {
        node.signal(libc::SIGSTOP);
    }
    let alone = wait_until_async(Duration::from_secs(20), || async {
        c.nodes[0]
            .status()
            .await
            .members
            .iter()
            .all(|m| m.state != "up")
    })
    .await;
    assert!(alone, "node 0 never saw its peers down");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_that_reaches_only_its_gateway_is_not_acknowledged() {
    let c = TestCluster::start(3, 3, &[]).await;
    isolate_first(&c).await;
    // An empty object has no chunks: only the record's durability decides.
    let result = upload(&mut c.nodes[0].storage().await, "lonely", b"", 1000).await;
    assert_code(
        result,
        Code::Unavailable,
        "empty upload on an isolated node",
    );
    let result = upload(&mut c.nodes[0].storage().await, "lonely2", b"abc", 1000).await;
    assert_code(
        result,
        Code::Unavailable,
        "small upload on an isolated node",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delete_on_an_isolated_node_fails_and_the_object_stays() {
    let c = TestCluster::start(3, 3, &[]).await;
    let data = pseudo_random(779, 2 * CHUNK);
    put(&c.nodes[0], "kept", &data).await;
    isolate_first(&c).await;
    let result = c.nodes[0].client(None).await.delete("kept").await;
    assert!(
        result
            .as_ref()
            .is_err_and(|e| e.code() == Code::Unavailable),
        "a delete below the write rule must fail UNAVAILABLE: {result:?}"
    );
    for node in &c.nodes[1..] {
        node.signal(libc::SIGCONT);
    }
    c.wait_members_up(3).await;
    // Index sync had its chance: a full pull runs on every recovery.
    for (i, node) in c.nodes.iter().enumerate() {
        let got = get(node, "kept")
            .await
            .unwrap_or_else(|e| panic!("node {i} lost the object: {e}"));
        assert!(got == data, "node {i}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_cannot_reach_its_configured_peers_refuses_writes() {
    // Nothing listens on port 1: the node knows only itself, yet it was told
    // it is part of a cluster with three copies of everything.
    let node = TestNode::start(&["--peer", "127.0.0.1:1", "--replicas", "3"]).await;
    let result = upload(&mut node.storage().await, "solo", b"data", 1000).await;
    assert_code(result, Code::Unavailable, "upload without the cluster");
    assert!(
        !node.is_serving().await,
        "health must not say SERVING before the node reached its cluster"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_node_alone_with_remembered_peers_refuses_writes() {
    let mut c = TestCluster::start(2, 2, &[]).await;
    c.nodes[1].kill9();
    c.nodes[0].kill9();
    // Restarted without --peer: it remembers its peer, which is gone.
    c.nodes[0].launch().await;
    let result = upload(&mut c.nodes[0].storage().await, "solo", b"data", 1000).await;
    assert_code(result, Code::Unavailable, "upload with the peer gone");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_whose_clock_runs_an_hour_ahead_cannot_delete_an_acknowledged_object() {
    let mut c = TestCluster::start(3, 3, &[]).await;
    let data = pseudo_random(780, 2 * CHUNK);
    put(&c.nodes[1], "precious", &data).await;
    c.nodes[0].kill9();
    c.nodes[0].set_clock_offset("+1h");
    c.nodes[0].launch().await;
    c.wait_members_up(3).await;
    let result = c.nodes[0].client(None).await.delete("precious").await;
    assert!(
        result.is_err(),
        "a delete stamped an hour in the future must not be acknowledged"
    );
    // A later upload acknowledged by the others is what everyone serves,
    // the skewed node included, once it has synced.
    let newer = pseudo_random(781, CHUNK + 5);
    put(&c.nodes[1], "precious", &newer).await;
    for (i, node) in c.nodes.iter().enumerate() {
        let converged = wait_until_async(Duration::from_secs(20), || async {
            get(node, "precious").await.is_ok_and(|b| b == newer)
        })
        .await;
        assert!(converged, "node {i} does not serve the acknowledged upload");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_holder_replaced_during_a_paused_upload_has_its_chunks_written_again() {
    let (mut c, _addrs) = TestCluster::start_fixed(3, 2, FAST_GC).await;
    let data = pseudo_random(782, 24 * CHUNK + 9);
    let upload = SlowUpload::start(&c.nodes[0], "survivor").await;
    assert!(upload.send(&data[..16 * CHUNK]).await);
    // The first 15 chunks are written (the 16th may wait for more data).
    let written = wait_until(Duration::from_secs(20), || {
        c.copies(&data[..15 * CHUNK]).iter().all(|n| *n == 2)
    })
    .await;
    assert!(written, "{:?}", c.copies(&data[..15 * CHUNK]));
    // Node 1 loses its disk mid-upload and comes back empty on the same
    // address: the copies it acknowledged are gone.
    c.nodes[1].kill9();
    std::fs::remove_dir_all(c.nodes[1].data_dir()).unwrap();
    c.nodes[1].launch().await;
    c.wait_members_up(3).await;
    // Give the lease a renewal or two to meet the new node.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(upload.send(&data[16 * CHUNK..]).await);
    upload.finish().await.expect("the upload succeeds");
    let copies = c.copies(&data);
    assert!(
        copies.iter().all(|n| *n >= 2),
        "acknowledged with W=2, yet copies per chunk are {copies:?}"
    );
    assert!(
        c.nodes[0].log().contains("lost copies while it ran"),
        "the gateway re-checked the replaced holder and wrote the lost chunks again"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_cut_off_from_its_cluster_is_alive_but_not_ready() {
    let node = TestNode::start(&["--peer", "127.0.0.1:1", "--replicas", "3"]).await;
    let mut health = node.health().await;
    let check = |service: &str| tonic_health::pb::HealthCheckRequest {
        service: service.to_owned(),
    };
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let live = health.check(check("liveness")).await.unwrap().into_inner();
    assert_eq!(
        live.status, serving,
        "liveness does not depend on the cluster"
    );
    let ready = health.check(check("")).await.unwrap().into_inner();
    assert_ne!(ready.status, serving, "readiness does");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_frozen_past_its_lease_rechecks_its_chunks_before_the_commit() {
    // Found by the fault harness (seed 20261127, 5 nodes): a gateway
    // SIGSTOPped for longer than the lease period stops renewing; the
    // holders' leases expire and their collectors take the upload's first
    // chunks; the renewals after SIGCONT succeed, and the upload must not be
    // acknowledged on copies that are gone.
    let c = TestCluster::start(3, 3, FAST_GC).await;
    let data = pseudo_random(783, 20 * CHUNK + 3);
    let upload = SlowUpload::start(&c.nodes[0], "frozen").await;
    assert!(upload.send(&data[..8 * CHUNK]).await);
    let written = wait_until(Duration::from_secs(20), || {
        c.copies(&data[..7 * CHUNK]).iter().all(|n| *n == 3)
    })
    .await;
    assert!(written, "{:?}", c.copies(&data[..7 * CHUNK]));
    c.nodes[0].signal(libc::SIGSTOP);
    // Both holders' collectors take the chunks once the lease has expired
    // (3 s) and the chunks are past the grace (3 s); the frozen gateway keeps
    // the only copy.
    let collected = wait_until(Duration::from_secs(30), || {
        c.copies(&data[..7 * CHUNK]).iter().all(|n| *n <= 1)
    })
    .await;
    c.nodes[0].signal(libc::SIGCONT);
    assert!(collected, "the holders never collected the unleased chunks");
    assert!(upload.send(&data[8 * CHUNK..]).await);
    let result = upload.finish().await;
    if result.is_ok() {
        let copies = c.copies(&data);
        assert!(
            copies.iter().all(|n| *n >= 2),
            "acknowledged, yet copies per chunk are {copies:?}"
        );
    }
}
