//! What README.md and docs/ promise that no other test checked: the write
//! quorum flag, repair pacing, the List page cap, draining on SIGTERM,
//! concurrent writes of one key through two gateways, and R-1 nodes lost
//! at once.

mod common;

use std::time::{Duration, Instant};

use common::{
    cluster::{get, members_up, put},
    *,
};
use dfs::proto::ListRequest;
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

#[tokio::test(flavor = "multi_thread")]
async fn write_quorum_w_r_refuses_an_upload_the_default_rule_would_take() {
    // R = 3 with one member dead: by default W falls to a majority (2) and
    // the upload succeeds (tests/cluster.rs); --write-quorum 3 insists.
    let mut c = TestCluster::start(3, 3, &["--dead-after", "30s", "--write-quorum", "3"]).await;
    c.nodes[2].kill9();
    let data = pseudo_random(600, 4 * CHUNK);
    let result = upload(&mut c.nodes[0].storage().await, "w3", &data, CHUNK).await;
    assert_code(result, Code::Unavailable, "two copies when W = 3");
    assert_code(
        stat_key(&mut c.nodes[0].storage().await, "w3").await,
        Code::NotFound,
        "no object",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn write_quorum_of_one_takes_an_upload_the_default_rule_would_refuse() {
    // R = 3 with two members dead: by default a majority (2) is needed and
    // the upload fails (tests/cluster.rs); --write-quorum 1 accepts one copy.
    let mut c = TestCluster::start(3, 3, &["--write-quorum", "1"]).await;
    c.nodes[1].kill9();
    c.nodes[2].kill9();
    poll_until(
        Duration::from_secs(30),
        "node 0 sees both peers down",
        async || members_up(&c.nodes[0]).await == 0,
    )
    .await;
    let data = pseudo_random(601, 4 * CHUNK);
    put(&c.nodes[0], "w1", &data).await;
    assert_eq!(c.copies(&data), vec![1; 4]);
    assert_eq!(get(&c.nodes[0], "w1").await.unwrap(), data);
}

#[tokio::test(flavor = "multi_thread")]
async fn repair_transfers_are_paced_to_the_repair_rate() {
    const RATE: u64 = 256 * 1024;
    let rate = RATE.to_string();
    let mut c = TestCluster::start(3, 2, &["--repair-rate", &rate]).await;
    let data = pseudo_random(610, 40 * CHUNK);
    put(&c.nodes[0], "paced", &data).await;
    c.wait_copies(&data, 2, Duration::from_secs(10)).await;
    let ids = chunk_ids(&c.key_file, &data);
    let lost = ids.iter().filter(|id| c.holders(id).contains(&2)).count();
    c.nodes[2].kill9();
    // Watch the copies come back on the two survivors.
    let mut first = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    let last = loop {
        let restored = c.copies(&data).iter().filter(|n| **n == 2).count() - (ids.len() - lost);
        if restored > 0 && first.is_none() {
            first = Some(Instant::now());
        }
        if restored == lost {
            break Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "{restored} of {lost} copies restored"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = last - first.expect("a first copy was seen");
    // Each survivor's transfers start at least one slot apart; the two
    // share the work, so the last copy lands no sooner than this after the
    // first (less a little for the 20 ms polling).
    let slot = Duration::from_secs_f64((CHUNK + 16) as f64 / RATE as f64);
    let floor = slot * (lost.div_ceil(2) as u32 - 1);
    assert!(
        took + Duration::from_millis(100) >= floor,
        "{lost} copies restored in {took:?}, faster than {RATE} B/s per node allows ({floor:?})"
    );
    assert_eq!(get(&c.nodes[1], "paced").await.unwrap(), data);
}

#[tokio::test(flavor = "multi_thread")]
async fn list_pages_are_capped_at_1000() {
    let node = TestNode::start(&[]).await;
    let total = 1003;
    let mut uploads = tokio::task::JoinSet::new();
    for worker in 0..8 {
        let channel = node.channel().await;
        uploads.spawn(async move {
            let mut storage = dfs::proto::storage_client::StorageClient::new(channel);
            for i in (worker..total).step_by(8) {
                upload(&mut storage, &format!("k/{i:05}"), b"", 1)
                    .await
                    .expect("upload");
            }
        });
    }
    while let Some(done) = uploads.join_next().await {
        done.expect("upload task");
    }
    let mut storage = node.storage().await;
    let list = |page_size, page_token: String| ListRequest {
        prefix: "k/".into(),
        page_size,
        page_token,
    };
    let first = storage
        .list(list(5000, String::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        first.objects.len(),
        1000,
        "a page asked for 5000 holds 1000"
    );
    assert!(!first.next_page_token.is_empty());
    let rest = storage
        .list(list(5000, first.next_page_token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.objects.len(), total - 1000);
    assert!(
        rest.next_page_token.is_empty(),
        "the last page has no token"
    );
    let keys: Vec<_> = first
        .objects
        .iter()
        .chain(&rest.objects)
        .map(|o| o.key.clone())
        .collect();
    let want: Vec<_> = (0..total).map(|i| format!("k/{i:05}")).collect();
    assert_eq!(keys, want, "every key once, in order");
    let default = storage
        .list(list(0, String::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(default.objects.len(), 100, "page_size 0 means 100");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_not_serving_refusing_new_calls_then_cuts_off_at_the_grace() {
    let grace = Duration::from_secs(5);
    let mut node = TestNode::start(&["--shutdown-grace", "5s"]).await;
    let addr = node.addr().to_owned();
    // Before SIGTERM: a health watch, an idle connection that has made a
    // call, and an upload in flight that the test never finishes.
    let mut health = node.health().await;
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health watch")
        .into_inner();
    let first = watch.message().await.expect("watch").expect("a status");
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let mut idle = node.storage().await;
    upload(&mut idle, "before", b"x", 1)
        .await
        .expect("a call before SIGTERM");
    let stuck = SlowUpload::start(&node, "in-flight").await;
    assert!(stuck.send(&pseudo_random(620, CHUNK + 5)).await);
    // The node is serving it: its first chunk is on disk.
    assert!(
        wait_until(Duration::from_secs(20), || node.chunk_files().len() == 2).await,
        "the upload's first chunk was not written"
    );

    let signalled = Instant::now();
    node.signal(libc::SIGTERM);
    let status = watch
        .message()
        .await
        .expect("the watch stream stays open while draining")
        .expect("a status update");
    assert_eq!(
        status.status,
        ServingStatus::NotServing as i32,
        "health turns NOT_SERVING"
    );
    // Draining: new calls are refused on the old connection and on new
    // ones, while the process is still up for the upload in flight.
    poll_until(
        grace,
        "a new call on an existing connection is refused",
        async || stat_key(&mut idle, "before").await.is_err(),
    )
    .await;
    let fresh = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await;
    if let Ok(channel) = fresh {
        let mut storage = dfs::proto::storage_client::StorageClient::new(channel);
        assert!(
            stat_key(&mut storage, "before").await.is_err(),
            "a new connection was served while draining"
        );
    }
    assert!(
        node.alive(),
        "the node exited before the grace: nothing proved a drain"
    );
    if stuck.is_finished() {
        let outcome = stuck.outcome(Duration::from_secs(1)).await;
        panic!(
            "the in-flight upload was cut short: {outcome:?}\n{}",
            node.log()
        );
    }
    // The grace runs out: the node exits 0 without waiting for the upload.
    let exit = node.wait_exit(grace + Duration::from_secs(10)).await;
    let took = signalled.elapsed();
    assert!(exit.success(), "exit status {exit}");
    assert!(
        took >= grace,
        "exited after {took:?}, before the {grace:?} grace"
    );
    assert!(
        node.log().contains("outlived the shutdown grace"),
        "{}",
        node.log()
    );
    assert!(stuck.outcome(Duration::from_secs(10)).await.is_err());
    node.launch().await;
    let mut storage = node.storage().await;
    assert_code(
        stat_key(&mut storage, "in-flight").await,
        Code::NotFound,
        "cut-off upload",
    );
    stat_key(&mut storage, "before")
        .await
        .expect("earlier object");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_writes_of_one_key_through_two_gateways_converge_on_the_later() {
    let c = TestCluster::start(3, 2, &[]).await;
    let (a, b) = (
        pseudo_random(630, 5 * CHUNK + 1),
        pseudo_random(631, 3 * CHUNK + 2),
    );
    let (ra, rb) = tokio::join!(
        async { upload(&mut c.nodes[0].storage().await, "contested", &a, CHUNK).await },
        async { upload(&mut c.nodes[1].storage().await, "contested", &b, CHUNK).await },
    );
    let (ia, ib) = (ra.expect("write via node 0"), rb.expect("write via node 1"));
    let key = |i: &dfs::proto::ObjectInfo| {
        let v = i.version.as_ref().expect("version");
        (v.hlc, v.node_id.clone())
    };
    assert_ne!(key(&ia), key(&ib), "two writes, two versions");
    let (winner, bytes) = if key(&ia) > key(&ib) {
        (&ia, &a)
    } else {
        (&ib, &b)
    };
    for (i, node) in c.nodes.iter().enumerate() {
        poll_until(
            Duration::from_secs(30),
            &format!("node {i} serves the later write"),
            async || {
                stat_key(&mut node.storage().await, "contested")
                    .await
                    .is_ok_and(|s| key(&s) == key(winner))
            },
        )
        .await;
        let got = get(node, "contested").await.expect("download");
        assert!(
            got == *bytes,
            "node {i} serves other bytes than the later write's"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn r_minus_1_nodes_lost_at_once_lose_nothing_and_repair_restores_r_copies() {
    let mut c = TestCluster::start(5, 3, &[]).await;
    let objects: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| {
            (
                format!("obj{i}"),
                pseudo_random(640 + i, (6 + i as usize) * CHUNK + 3),
            )
        })
        .collect();
    for (key, data) in &objects {
        put(&c.nodes[0], key, data).await;
    }
    // Two of five nodes (R - 1) die at the same moment, before any repair.
    c.nodes[3].kill9();
    c.nodes[4].kill9();
    for (i, node) in c.nodes.iter().enumerate().take(3) {
        for (key, data) in &objects {
            let got = get(node, key)
                .await
                .unwrap_or_else(|e| panic!("{key} via node {i}: {e}"));
            assert!(got == *data, "{key} via node {i}");
        }
    }
    for (_, data) in &objects {
        c.wait_copies(data, 3, Duration::from_secs(60)).await;
    }
}
