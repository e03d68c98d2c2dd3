//! The data directory on disk: private, never shared by two live nodes, and
//! a full disk reported as such.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn the_data_dir_is_private_to_its_owner() {
    let node = TestNode::start(&[]).await;
    let mode = std::fs::metadata(node.data_dir())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "data dir mode {:o}", mode & 0o777);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_node_on_a_live_data_dir_touches_nothing() {
    let node = TestNode::start(&[]).await;
    // Stands for a chunk write in progress in the live node.
    let in_flight = node.data_dir().join("tmp").join("in-flight");
    std::fs::write(&in_flight, b"partial chunk").unwrap();
    let out = run_dfs(&[
        "node",
        "--data",
        node.data_dir().to_str().unwrap(),
        "--grpc-addr",
        "127.0.0.1:0",
        "--p2p-addr",
        "127.0.0.1:0",
    ])
    .await;
    assert!(!out.status.success(), "a second node must refuse the dir");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "says why: {err}");
    assert!(in_flight.is_file(), "the live node's tmp/ was emptied");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_on_one_owner_is_resource_exhausted() {
    let mut c = TestCluster::start(3, 3, &[]).await;
    // Node 2 restarts with room for almost nothing.
    c.nodes[2].kill9();
    c.nodes[2].add_args(&["--capacity", "1KiB"]);
    c.nodes[2].launch().await;
    c.wait_members_up(3).await;
    let data = pseudo_random(790, 4 * CHUNK);
    let result = upload(&mut c.nodes[0].storage().await, "big", &data, 100_000).await;
    assert_code(
        result,
        Code::ResourceExhausted,
        "upload with one owner full",
    );
}
