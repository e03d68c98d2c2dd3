//! Multi-node behaviour with real node processes on loopback: placement,
//! replication, failover reads, repair, index convergence, refusal of
//! foreign nodes, write quorum, dedup across gateways.

mod common;

use std::{collections::HashMap, time::Duration};

use common::{
    cluster::{FAST, get, members_up, put},
    *,
};
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn every_chunk_has_r_copies_on_distinct_nodes_and_reads_work_through_every_node() {
    let c = TestCluster::start(3, 2, &[]).await;
    let data = pseudo_random(1, 40 * CHUNK + 77);
    put(&c.nodes[0], "big", &data).await;
    let copies = c.copies(&data);
    assert!(
        copies.iter().all(|n| *n == 2),
        "copies per chunk right after the upload: {copies:?}"
    );
    // Read-your-write through every other node.
    for node in &c.nodes {
        assert_eq!(get(node, "big").await.unwrap(), data);
    }
    // Placement spreads chunks over all three nodes.
    let ids = chunk_ids(&c.key_file, &data);
    let mut per_node: HashMap<usize, usize> = HashMap::new();
    for id in &ids {
        for h in c.holders(id) {
            *per_node.entry(h).or_default() += 1;
        }
    }
    assert_eq!(per_node.len(), 3, "{per_node:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn any_single_node_can_die_and_every_survivor_serves_everything() {
    let mut c = TestCluster::start(3, 2, &[]).await;
    let data = pseudo_random(2, 30 * CHUNK + 5);
    put(&c.nodes[1], "obj", &data).await;
    for victim in 0..3 {
        c.nodes[victim].kill9();
        for (i, node) in c.nodes.iter().enumerate().filter(|(i, _)| *i != victim) {
            let got = get(node, "obj")
                .await
                .unwrap_or_else(|e| panic!("via node {i} with {victim} dead: {e}"));
            assert_eq!(got, data, "via node {i} with node {victim} dead");
        }
        c.nodes[victim].launch().await;
        c.wait_members_up(3).await;
    }
}

async fn repair_then_second_death(n: usize, r: usize) {
    let mut c = TestCluster::start(n, r, &[]).await;
    let data = pseudo_random(3, 24 * CHUNK);
    put(&c.nodes[0], "obj", &data).await;
    c.wait_copies(&data, r, Duration::from_secs(5)).await;
    c.nodes[n - 1].kill9();
    // Back to R copies among the survivors without anyone acting.
    c.wait_copies(&data, r, Duration::from_secs(30)).await;
    c.nodes[n - 2].kill9();
    let got = get(&c.nodes[0], "obj")
        .await
        .expect("download after a second death");
    assert_eq!(got, data);
}

#[tokio::test(flavor = "multi_thread")]
async fn repair_restores_two_copies_and_a_second_death_loses_nothing() {
    repair_then_second_death(3, 2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn repair_restores_three_copies_and_a_second_death_loses_nothing() {
    repair_then_second_death(4, 3).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_returning_node_gets_its_surplus_copies_dropped() {
    let mut c = TestCluster::start(3, 2, &[]).await;
    let data = pseudo_random(4, 20 * CHUNK);
    put(&c.nodes[0], "obj", &data).await;
    c.nodes[2].kill9();
    c.wait_copies(&data, 2, Duration::from_secs(30)).await;
    c.nodes[2].launch().await;
    c.wait_members_up(3).await;
    // Copies move back to the rightful owners and the temporary ones go.
    c.wait_copies(&data, 2, Duration::from_secs(30)).await;
    for node in &c.nodes {
        assert_eq!(get(node, "obj").await.unwrap(), data);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_killed_mid_download_does_not_break_the_stream() {
    let mut c = TestCluster::start(3, 2, &[]).await;
    let data = pseudo_random(5, 120 * CHUNK);
    put(&c.nodes[0], "big", &data).await;
    let mut storage = c.nodes[0].storage().await;
    let mut stream = storage
        .download(key_request("big", 0, 0))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    let mut killed = false;
    while let Some(msg) = stream.message().await.expect("stream continues") {
        if let Some(dfs::proto::download_response::Msg::Data(d)) = msg.msg {
            got.extend_from_slice(&d);
            if !killed && got.len() > data.len() / 4 {
                c.nodes[1].kill9();
                killed = true;
            }
        }
    }
    assert!(killed);
    assert_eq!(got, data);
}

#[tokio::test(flavor = "multi_thread")]
async fn indexes_converge_after_a_restart_including_deletes_made_while_down() {
    let mut c = TestCluster::start(3, 2, &[]).await;
    let a = pseudo_random(6, 3 * CHUNK);
    put(&c.nodes[0], "keep", &a).await;
    put(&c.nodes[0], "gone", &a[..CHUNK]).await;
    c.nodes[2].kill9();
    c.nodes[0]
        .storage()
        .await
        .delete(dfs::proto::DeleteRequest { key: "gone".into() })
        .await
        .unwrap();
    put(&c.nodes[1], "new", &a[CHUNK..]).await;
    c.nodes[2].launch().await;
    c.wait_members_up(3).await;
    // Node 2's own index (List answers locally) converges.
    let listed = async || {
        let list = c.nodes[2]
            .storage()
            .await
            .list(dfs::proto::ListRequest::default())
            .await
            .expect("list")
            .into_inner();
        list.objects
            .iter()
            .map(|o| o.key.clone())
            .collect::<Vec<_>>()
    };
    poll_until(
        Duration::from_secs(30),
        "node 2 lists exactly keep and new",
        async || listed().await == ["keep", "new"],
    )
    .await;
    assert_code(
        stat_key(&mut c.nodes[2].storage().await, "gone").await,
        Code::NotFound,
        "deleted while down",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_with_a_foreign_secret_is_refused() {
    let c = TestCluster::start(2, 2, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let other_key = write_key_file(&dir.path().join("other.key"), 7);
    let seed = c.nodes[0].p2p_addr().await;
    let mut args = vec![
        "--cluster-key-file",
        other_key.to_str().unwrap(),
        "--peer",
        &seed,
    ];
    args.extend_from_slice(FAST);
    let stranger = TestNode::start(&args).await;
    // Proof the stranger had its chance: it dialled the cluster, and both
    // ends logged the refusal and its reason.
    poll_until(
        Duration::from_secs(20),
        "the stranger dials and both ends log the refusal",
        async || {
            let (ours, theirs) = (c.nodes[0].log(), stranger.log());
            ours.lines().any(|l| {
                l.contains("refused a peer connection") && l.contains("different cluster secret")
            }) && theirs.lines().any(|l| {
                l.contains("peer handshake failed") && l.contains("different cluster secret")
            })
        },
    )
    .await;
    assert_eq!(members_up(&stranger).await, 0, "the stranger joined nobody");
    assert_eq!(
        stranger.status().await.members.len(),
        1,
        "the stranger knows only itself"
    );
    for node in &c.nodes {
        assert_eq!(
            node.status().await.members.len(),
            2,
            "the cluster (itself and one peer) did not add the stranger"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_peer_frames_close_only_their_connection() {
    use tokio::io::AsyncWriteExt;
    let c = TestCluster::start(2, 2, &[]).await;
    let addr = c.nodes[0].p2p_addr().await;
    let attacks: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        vec![9, 0, 0, 0, 1, 0],                // unknown frame kind
        vec![1, 0xff, 0xff, 0xff, 0xff],       // oversized length
        vec![1, 0, 0, 0, 3, 0xff, 0xff, 0xff], // bad protobuf
        vec![1, 0, 0, 0, 50, 1, 2],            // EOF mid-frame
    ];
    for bytes in attacks {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let _ = s.write_all(&bytes).await;
        let _ = s.shutdown().await;
    }
    // The node still replicates and serves.
    let data = pseudo_random(8, 5 * CHUNK);
    put(&c.nodes[0], "after", &data).await;
    assert_eq!(c.copies(&data), vec![2; 5]);
    assert_eq!(get(&c.nodes[1], "after").await.unwrap(), data);
}

#[tokio::test(flavor = "multi_thread")]
async fn too_few_live_owners_fail_with_unavailable_and_store_no_object() {
    let mut c = TestCluster::start(3, 3, &[]).await;
    c.nodes[1].kill9();
    c.nodes[2].kill9();
    // Wait until node 0 has noticed both deaths.
    poll_until(
        Duration::from_secs(30),
        "node 0 sees both peers down",
        async || members_up(&c.nodes[0]).await == 0,
    )
    .await;
    let data = pseudo_random(9, 3 * CHUNK);
    let result = upload(&mut c.nodes[0].storage().await, "lonely", &data, 100_000).await;
    assert_code(
        result,
        Code::Unavailable,
        "one live node of three, majority is two",
    );
    assert_code(
        stat_key(&mut c.nodes[0].storage().await, "lonely").await,
        Code::NotFound,
        "no object",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_content_through_two_gateways_is_stored_once_per_owner() {
    let c = TestCluster::start(3, 2, &[]).await;
    let data = pseudo_random(10, 16 * CHUNK);
    let (a, b) = tokio::join!(
        put(&c.nodes[0], "via-a", &data),
        put(&c.nodes[1], "via-b", &data)
    );
    let _ = (a, b);
    assert!(
        c.copies(&data).iter().all(|n| *n == 2),
        "{:?}",
        c.copies(&data)
    );
    for node in &c.nodes {
        assert_eq!(get(node, "via-a").await.unwrap(), data);
        assert_eq!(get(node, "via-b").await.unwrap(), data);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_right_after_a_node_dies_succeeds_on_the_survivors() {
    let mut c = TestCluster::start(3, 3, &["--dead-after", "120s"]).await;
    c.nodes[2].kill9();
    // Long before dead-after, the first write to the dead node fails, it is
    // taken as down, and W falls to a majority of R: two copies. (A quarter
    // of dead-after leaves room for a loaded machine without letting a
    // node that waits dead-after out pass.)
    let data = pseudo_random(11, 12 * CHUNK);
    let started = std::time::Instant::now();
    put(&c.nodes[0], "after-death", &data).await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        members_up(&c.nodes[0]).await,
        1,
        "the dead member is down long before dead-after"
    );
    assert!(
        c.copies(&data).iter().all(|n| *n == 2),
        "{:?}",
        c.copies(&data)
    );
    assert_eq!(get(&c.nodes[1], "after-death").await.unwrap(), data);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_longer_than_the_gc_grace_keeps_its_remote_copies() {
    let c = TestCluster::start(2, 2, &["--gc-grace", "1s", "--gc-interval", "200ms"]).await;
    let data = pseudo_random(12, 30 * CHUNK);
    // 30 chunks over ~4.5 s: the first ones age well past the grace on the
    // peer before the object's record exists.
    let call = common::slow::paced_upload(
        &c.nodes[0],
        "slow",
        data.clone(),
        CHUNK,
        Duration::from_millis(150),
    );
    call.await.expect("upload task").expect("slow upload");
    let copies = c.copies(&data);
    assert!(
        copies.iter().all(|n| *n == 2),
        "copies per chunk: {copies:?}"
    );
    assert_eq!(get(&c.nodes[1], "slow").await.unwrap(), data);
}
