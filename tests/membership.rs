//! Who counts as a replica: a copy counts for member X only if the node that
//! took it proved to be X; a node replaced by a fresh data dir on the same
//! address is a new member, and the old one is retired; operators can list
//! members and forget a dead one for good.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_node_replaced_on_the_same_address_is_never_counted_twice() {
    let (mut c, _addrs) = TestCluster::start_fixed(3, 3, &["--dead-after", "6s"]).await;
    let old_b = c.nodes[1].status().await.node_id;
    // B loses its disk and comes back, empty, on the same peer address.
    c.nodes[1].kill9();
    std::fs::remove_dir_all(c.nodes[1].data_dir()).unwrap();
    c.nodes[1].launch().await;
    let new_b = c.nodes[1].status().await.node_id;
    assert_ne!(old_b, new_b, "a fresh data dir is a new node");
    tokio::time::sleep(Duration::from_secs(10)).await;
    // A restarts and writes at once, before it heard from anyone.
    c.nodes[0].kill9();
    c.nodes[0].launch().await;
    let data = pseudo_random(900, 32 * CHUNK);
    let acknowledged = upload(&mut c.nodes[0].storage().await, "after", &data, 100_000).await;
    if acknowledged.is_ok() {
        let copies = c.copies(&data);
        assert!(
            copies.iter().all(|n| *n >= 3),
            "acknowledged with W=3 on three nodes, yet copies per chunk are {copies:?}"
        );
    }
    // Once A has heard from everyone, the old id is gone from its view.
    let retired = wait_until_async(Duration::from_secs(20), || async {
        let members = c.nodes[0].status().await.members;
        !members.iter().any(|m| m.node_id == old_b)
            && members
                .iter()
                .any(|m| m.node_id == new_b && m.state == "up")
    })
    .await;
    assert!(
        retired,
        "the replaced id must be retired: {:?}",
        c.nodes[0].status().await.members
    );
    upload(&mut c.nodes[0].storage().await, "later", &data, 100_000)
        .await
        .expect("writes work once the cluster is known");
    assert!(c.copies(&data).iter().all(|n| *n == 3));
}

#[tokio::test(flavor = "multi_thread")]
async fn remembered_members_are_unknown_until_heard_from() {
    let (mut c, addrs) = TestCluster::start_fixed(3, 3, &["--dead-after", "30s"]).await;
    let dead_id = c.nodes[2].status().await.node_id;
    c.nodes[2].kill9();
    c.nodes[0].kill9();
    c.nodes[0].launch().await;
    let members = c.nodes[0].status().await.members;
    let dead = members
        .iter()
        .find(|m| m.node_id == dead_id)
        .unwrap_or_else(|| panic!("the dead member is remembered: {members:?}"));
    assert_eq!(dead.address, addrs[2]);
    assert_ne!(
        dead.state, "up",
        "a remembered member is not up until it answers"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn members_lists_and_forget_removes_a_dead_node_for_good() {
    let (mut c, _addrs) = TestCluster::start_fixed(3, 3, &["--dead-after", "2s"]).await;
    let data = pseudo_random(901, 12 * CHUNK);
    put(&c.nodes[0], "obj", &data).await;
    let victim = c.nodes[2].status().await.node_id;
    let grpc = c.nodes[0].addr().to_owned();
    let listed = run_dfs(&["members", "--node", &grpc]).await;
    assert!(listed.status.success(), "{listed:?}");
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&victim));
    // A live member cannot be forgotten.
    let refused = run_dfs(&["members", "forget", &victim, "--node", &grpc]).await;
    assert!(
        !refused.status.success(),
        "forgetting a live member must fail"
    );
    c.nodes[2].kill9();
    let down = wait_until_async(Duration::from_secs(20), || async {
        c.nodes[0]
            .status()
            .await
            .members
            .iter()
            .any(|m| m.node_id == victim && m.state == "down")
    })
    .await;
    assert!(down);
    let forgot = run_dfs(&["members", "forget", &victim, "--node", &grpc]).await;
    assert!(forgot.status.success(), "{forgot:?}");
    // Gone everywhere (peers learn it), and the survivors hold every chunk.
    for node in &c.nodes[..2] {
        let gone = wait_until_async(Duration::from_secs(20), || async {
            !node
                .status()
                .await
                .members
                .iter()
                .any(|m| m.node_id == victim)
        })
        .await;
        assert!(gone, "{:?}", node.status().await.members);
    }
    c.wait_copies(&data, 2, Duration::from_secs(30)).await;
    assert_eq!(get(&c.nodes[1], "obj").await.unwrap(), data);
}
