//! A frozen peer never stalls the rest of the cluster: each peer is probed
//! on its own with its own timeout, peer requests are bounded by
//! `--peer-timeout`, and healthy nodes never mark each other down because
//! another one froze.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn with_one_node_frozen_uploads_through_the_others_keep_working() {
    let dead_after = Duration::from_secs(3);
    let peer_timeout = Duration::from_secs(2);
    let c = TestCluster::start(3, 3, &["--dead-after", "3s", "--peer-timeout", "2s"]).await;
    c.nodes[2].signal(libc::SIGSTOP);
    let frozen_at = Instant::now();
    let mut done = 0;
    let mut slowest = Duration::ZERO;
    while frozen_at.elapsed() < Duration::from_secs(20) {
        let gateway = &c.nodes[done % 2];
        let data = pseudo_random(1000 + done as u64, 3 * CHUNK + 17);
        let started = Instant::now();
        let result = upload(
            &mut gateway.storage().await,
            &format!("k{done}"),
            &data,
            100_000,
        )
        .await;
        let took = started.elapsed();
        slowest = slowest.max(took);
        assert!(
            result.is_ok(),
            "upload {done} through node {} failed after {took:?} with node 2 frozen: {result:?}",
            done % 2
        );
        done += 1;
    }
    assert!(
        slowest <= dead_after + peer_timeout + Duration::from_secs(1),
        "an upload took {slowest:?}"
    );
    // The healthy nodes never lost sight of each other.
    for (i, node) in c.nodes[..2].iter().enumerate() {
        let log = node.log();
        let other = c.nodes[1 - i].status().await.node_id;
        assert!(
            !log.lines().any(|l| (l.contains("member is down")
                || l.contains("member unreachable"))
                && l.contains(&other)),
            "node {i} marked the healthy node down"
        );
    }
    c.nodes[2].signal(libc::SIGCONT);
    assert!(done >= 5, "only {done} uploads in 20 s");
}
