//! The peer channel's effects on real `dfs node` processes that need no man
//! in the middle: a data directory from before node keys migrating to a
//! key-derived id, and peer bodies paid for while the node's budget is held
//! by uploads to the very peer that sends them.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_data_dir_with_a_random_node_id_migrates_to_a_key_derived_one() {
    use std::os::unix::fs::PermissionsExt;
    let mut node = TestNode::new(&[]);
    std::fs::create_dir_all(node.data_dir()).unwrap();
    std::fs::write(node.data_dir().join("node.id"), "0123456789abcdef\n").unwrap();
    node.launch().await;
    let id = node.status().await.node_id;
    assert_ne!(id, "0123456789abcdef");
    let key_file = node.data_dir().join("node.key");
    let text = std::fs::read_to_string(&key_file).unwrap();
    let mut private = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut private).unwrap();
    let key = dfs::identity::NodeKey::from_private(private);
    assert_eq!(id, key.node_id(), "the id is derived from node.key");
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        std::fs::read_to_string(node.data_dir().join("node.id.old")).unwrap(),
        "0123456789abcdef\n"
    );
    assert!(!node.data_dir().join("node.id").exists());
    let migrated = |log: &str| {
        log.lines()
            .filter(|l| l.contains("migrated to a node key") && l.contains("0123456789abcdef"))
            .count()
    };
    assert_eq!(migrated(&node.log()), 1, "{}", node.log());
    // A restart keeps the id and migrates nothing again.
    node.restart().await;
    assert_eq!(node.status().await.node_id, id);
    assert_eq!(migrated(&node.log()), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_uploading_to_each_other_with_full_budgets_do_not_wait_for_each_other() {
    // Each node's budget is two chunks, and each holds it with its own
    // uploads, whose copies go to the other node. If a request body from a
    // peer could only be paid from that same budget, each node's server
    // would wait for the other's uploads: a circular wait that only the
    // 30 s request timeout breaks.
    let key_dir = tempfile::tempdir().unwrap();
    let key_file = write_key_file(&key_dir.path().join("cluster.key"), 91);
    let budget = (2 * (CHUNK + dfs::crypto::HEADER_LEN)).to_string();
    let args = [
        "--cluster-key-file",
        key_file.to_str().unwrap(),
        "--replicas",
        "2",
        "--buffer-budget",
        &budget,
    ];
    let a = TestNode::start(&args).await;
    let seed = a.p2p_addr().await;
    let mut b_args = args.to_vec();
    b_args.extend_from_slice(&["--peer", &seed]);
    let b = TestNode::start(&b_args).await;
    for node in [&a, &b] {
        let mut up = false;
        for _ in 0..200 {
            if node.status().await.members.iter().any(|m| m.state == "up") {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(up, "the nodes never met");
    }
    let started = std::time::Instant::now();
    let mut uploads = Vec::new();
    for (i, node) in [&a, &b, &a, &b, &a, &b].into_iter().enumerate() {
        let data = pseudo_random(100 + i as u64, 24 * CHUNK);
        let mut storage = node.storage().await;
        uploads.push(tokio::spawn(async move {
            upload(&mut storage, &format!("both-ways-{i}"), &data, 100_000).await
        }));
    }
    for (i, u) in uploads.into_iter().enumerate() {
        u.await
            .unwrap()
            .unwrap_or_else(|e| panic!("upload {i} failed: {e}"));
    }
    // A circular wait ends only at the 30 s peer request timeout (and then
    // the uploads above fail): finishing well before it shows there was none.
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(25),
        "six small uploads took {took:?}: the nodes waited for each other"
    );
}
