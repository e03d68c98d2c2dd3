//! "Present" is "verified": a copy counts toward W, toward dropping another
//! copy, or as a dedup hit only if it is known good; a scrubber finds rot in
//! data nobody reads.

mod common;

use std::time::Duration;

use common::*;

/// Flips one byte of a chunk file's ciphertext (past the 16-byte IV).
fn rot(path: &std::path::Path) {
    let mut bytes = std::fs::read(path).expect("read chunk file");
    bytes[40] ^= 0x55;
    std::fs::write(path, bytes).expect("write chunk file");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dedup_hit_on_a_rotten_copy_stores_a_good_one() {
    let node = TestNode::start(&[]).await;
    let key_file = node.data_dir().join("cluster.key");
    let data = pseudo_random(950, 3 * CHUNK);
    put(&node, "first", &data).await;
    let ids = chunk_ids(&key_file, &data);
    rot(&chunk_path(&node.data_dir(), &ids[1]));
    // The same content again: the rotten copy must not count as stored.
    put(&node, "second", &data).await;
    let got = get(&node, "second")
        .await
        .expect("the second object is whole");
    assert!(got == data);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_with_a_rotten_copy_does_not_count_it() {
    // R=2 on two nodes: every chunk lives on both.
    let mut c = TestCluster::start(2, 2, &[]).await;
    let data = pseudo_random(951, 4 * CHUNK);
    put(&c.nodes[0], "a", &data).await;
    c.wait_copies(&data, 2, Duration::from_secs(10)).await;
    let ids = chunk_ids(&c.key_file, &data);
    for id in &ids {
        rot(&chunk_path(&c.nodes[1].data_dir(), id));
    }
    // Node 0 writes the same chunks again; node 1 must not answer "stored"
    // for its rotten copies.
    put(&c.nodes[0], "b", &data).await;
    c.nodes[0].kill9();
    let got = get(&c.nodes[1], "b")
        .await
        .expect("node 1 holds good copies of what it acknowledged");
    assert!(got == data);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_scrubber_finds_rot_nobody_reads_and_repair_restores_it() {
    let c = TestCluster::start(2, 2, &["--scrub-interval", "2s", "--scrub-rate", "64MiB"]).await;
    let data = pseudo_random(952, 6 * CHUNK);
    put(&c.nodes[0], "cold", &data).await;
    c.wait_copies(&data, 2, Duration::from_secs(10)).await;
    let ids = chunk_ids(&c.key_file, &data);
    let path = chunk_path(&c.nodes[1].data_dir(), &ids[2]);
    rot(&path);
    let keys = dfs::crypto::Keys::derive(
        &dfs::crypto::ClusterSecret::read_file(&c.key_file).expect("read key"),
    );
    // No client reads anything: the scrubber alone must notice, and repair
    // must put a good copy back.
    let healed = wait_until(Duration::from_secs(30), || {
        std::fs::read(&path).is_ok_and(|b| keys.verify_sealed(&b, &ids[2]).is_ok())
    })
    .await;
    assert!(healed, "the rotten copy was not replaced by a good one");
    assert_eq!(c.nodes[1].quarantine_files().len(), 1);
    let out = run_dfs(&["status", "--json", "--node", c.nodes[1].addr()]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    let status: serde_json::Value = serde_json::from_str(&text).expect("status json");
    assert!(
        status["scrub"]["corrupt_found"].as_u64() >= Some(1),
        "status must show what the scrubber found: {text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chunk_held_only_by_unreachable_nodes_is_unavailable_not_lost() {
    // Seen in a 30-minute harness run (seed 20261128): reads during
    // partitions ended DATA_LOSS "no live peers" while the chunk was safe on
    // nodes the reader could not reach. DATA_LOSS tells a client the data is
    // gone; it must mean that every member answered and none holds a good
    // copy.
    let mut c = TestCluster::start(3, 1, FAST).await;
    c.wait_members_up(3).await;
    let data = pseudo_random(951, 12 * CHUNK);
    put(&c.nodes[0], "far", &data).await;
    let ids = chunk_ids(&c.key_file, &data);
    let (far, holder) = ids
        .iter()
        .find_map(|id| {
            let h = c.holders(id);
            (h.len() == 1 && h[0] != 0).then(|| (*id, h[0]))
        })
        .expect("with R=1 some chunk lives on another node only");
    c.nodes[holder].kill9();
    let down = wait_until_async(Duration::from_secs(20), || async {
        common::cluster::members_up(&c.nodes[0]).await == 1
    })
    .await;
    assert!(down, "node 0 never saw node {holder} down");
    let err = get(&c.nodes[0], "far")
        .await
        .expect_err("a chunk is out of reach");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");

    c.nodes[holder].restart().await;
    c.wait_members_up(3).await;
    assert_eq!(
        get(&c.nodes[0], "far").await.expect("reachable again"),
        data
    );

    // Every member answers, none holds it: that is DATA_LOSS.
    std::fs::remove_file(c.chunk_file(holder, &far)).expect("remove the only copy");
    let err = get(&c.nodes[0], "far")
        .await
        .expect_err("the only copy is gone");
    assert_eq!(err.code(), tonic::Code::DataLoss, "{err}");
}
