//! What survives a restart, a crash and a cancelled upload: acknowledged
//! objects always; unacknowledged ones never, and never half.

mod common;

use std::time::Duration;

use common::{slow::paced_upload, *};
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn objects_survive_a_graceful_restart() {
    let mut node = TestNode::start(&[]).await;
    let data = pseudo_random(40, 7 * CHUNK + 77);
    {
        let mut storage = node.storage().await;
        upload(&mut storage, "keep", &data, 10_000).await.unwrap();
        upload(&mut storage, "empty", &[], 1).await.unwrap();
    }
    let status = node.sigterm().await;
    assert!(status.success(), "SIGTERM exit status: {status}");
    node.launch().await;
    let mut storage = node.storage().await;
    let (info, got) = download(&mut storage, key_request("keep", 0, 0))
        .await
        .unwrap();
    assert!(got == data, "bytes differ after restart");
    assert_eq!(info.sha1, sha1_hex(&data));
    let (_, got) = download(&mut storage, key_request("empty", 0, 0))
        .await
        .unwrap();
    assert!(got.is_empty());
    // New writes after the restart are ordered after the old ones.
    let before = stat_key(&mut storage, "keep")
        .await
        .unwrap()
        .version
        .unwrap();
    let after = upload(&mut storage, "keep", b"v2", 1)
        .await
        .unwrap()
        .version
        .unwrap();
    assert!(
        after.hlc > before.hlc,
        "versions keep growing across restarts"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_objects_survive_kill_9() {
    let mut node = TestNode::start(&[]).await;
    let data = pseudo_random(41, 9 * CHUNK + 1);
    {
        let mut storage = node.storage().await;
        upload(&mut storage, "acked", &data, 30_000).await.unwrap();
        storage
            .delete(dfs::proto::DeleteRequest {
                key: "acked".into(),
            })
            .await
            .unwrap();
        upload(&mut storage, "acked", &data, 30_000).await.unwrap();
        upload(&mut storage, "deleted", b"bye", 1).await.unwrap();
        storage
            .delete(dfs::proto::DeleteRequest {
                key: "deleted".into(),
            })
            .await
            .unwrap();
    }
    node.kill9();
    node.launch().await;
    let mut storage = node.storage().await;
    let (_, got) = download(&mut storage, key_request("acked", 0, 0))
        .await
        .unwrap();
    assert!(got == data, "bytes differ after kill -9");
    assert_code(
        stat_key(&mut storage, "deleted").await,
        Code::NotFound,
        "an acknowledged delete survives kill -9",
    );
    node.assert_healthy().await;
}

/// Runs a slow upload to `key`, kills the node with SIGKILL once some of its
/// chunks are on disk, checks the client saw a failure, and restarts the node.
async fn kill_9_during_upload(node: &mut TestNode, key: &str, data: Vec<u8>) {
    let chunks_before = node.chunk_files().len();
    let call = paced_upload(node, key, data, 16 * 1024, Duration::from_millis(10));
    let progressed = wait_until(Duration::from_secs(20), || {
        node.chunk_files().len() >= chunks_before + 3
    })
    .await;
    assert!(progressed, "the slow upload wrote no chunks");
    assert!(!call.is_finished(), "the upload finished before the kill");
    node.kill9();
    let result = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the client notices the dead node")
        .expect("upload task");
    assert!(result.is_err(), "an upload to a killed node cannot succeed");
    node.launch().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_upload_leaves_no_object() {
    let mut node = TestNode::start(&[]).await;
    let big = pseudo_random(50, 40 * CHUNK);
    kill_9_during_upload(&mut node, "partial", big).await;
    let mut storage = node.storage().await;
    assert_code(
        stat_key(&mut storage, "partial").await,
        Code::NotFound,
        "an interrupted upload leaves no object",
    );
    assert!(
        node.tmp_files().is_empty(),
        "tmp/ after restart: {:?}",
        node.tmp_files()
    );
    let listed = storage
        .list(dfs::proto::ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.objects.is_empty());
    // The data directory still takes new uploads, including the same key.
    let fresh = pseudo_random(51, 3 * CHUNK + 9);
    upload(&mut storage, "partial", &fresh, CHUNK)
        .await
        .unwrap();
    let (_, got) = download(&mut storage, key_request("partial", 0, 0))
        .await
        .unwrap();
    assert!(got == fresh);
    node.assert_healthy().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_overwrite_keeps_the_previous_version() {
    let mut node = TestNode::start(&[]).await;
    let old = pseudo_random(60, 4 * CHUNK + 100);
    {
        let mut storage = node.storage().await;
        upload(&mut storage, "doc", &old, CHUNK).await.unwrap();
    }
    let new = pseudo_random(61, 40 * CHUNK);
    kill_9_during_upload(&mut node, "doc", new).await;
    let mut storage = node.storage().await;
    let (info, got) = download(&mut storage, key_request("doc", 0, 0))
        .await
        .unwrap();
    assert!(
        got == old,
        "the old version is intact after a crashed overwrite"
    );
    assert_eq!(info.sha1, sha1_hex(&old));
    assert!(
        node.tmp_files().is_empty(),
        "tmp/ after restart: {:?}",
        node.tmp_files()
    );
    upload(&mut storage, "doc2", b"works", 2).await.unwrap();
    node.assert_healthy().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelled_upload_leaves_no_object_and_empty_tmp() {
    let mut node = TestNode::new(&[]);
    common::metrics::enable_metrics(&mut node);
    node.launch().await;
    let metrics = common::metrics::metrics_addr(&node);
    let chunks_before = node.chunk_files().len();
    let call = paced_upload(
        &node,
        "cancelled",
        pseudo_random(70, 40 * CHUNK),
        16 * 1024,
        Duration::from_millis(10),
    );
    assert!(
        wait_until(Duration::from_secs(20), || node.chunk_files().len()
            >= chunks_before + 2)
        .await,
        "the upload wrote no chunks"
    );
    // Dropping the call's future cancels the gRPC call (RST_STREAM).
    call.abort();
    let _ = call.await;
    let mut storage = node.storage().await;
    // Proof the node noticed the cancellation: the call is over, counted
    // as CANCELLED (its handler, which alone can commit, was dropped), and
    // tmp/ is empty.
    poll_until(
        Duration::from_secs(10),
        "the node counts the upload as cancelled",
        async || {
            let s = common::metrics::scrape(&metrics).await;
            s.calls("Upload", "CANCELLED") == Some(1.0)
                && s.require(
                    "dfs_grpc_requests_in_flight",
                    &["service=\"dfs.v1.Storage\"", "method=\"Upload\""],
                ) == 0.0
        },
    )
    .await;
    assert!(
        wait_until(Duration::from_secs(10), || node.tmp_files().is_empty()).await,
        "tmp/ still holds {:?}",
        node.tmp_files()
    );
    assert_code(
        stat_key(&mut storage, "cancelled").await,
        Code::NotFound,
        "a cancelled upload leaves no object",
    );
    assert!(node.tmp_files().is_empty());
    assert!(!node.log().contains("stored object key=cancelled"));
    node.assert_healthy().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chunks_orphaned_by_a_crash_are_collected_after_restart() {
    let mut node = TestNode::start(&["--gc-grace", "1s", "--gc-interval", "500ms"]).await;
    let keep = pseudo_random(80, 3 * CHUNK);
    {
        let mut storage = node.storage().await;
        upload(&mut storage, "keep", &keep, CHUNK).await.unwrap();
    }
    let committed = node.chunk_files();
    assert_eq!(committed.len(), 3);
    kill_9_during_upload(&mut node, "lost", pseudo_random(81, 40 * CHUNK)).await;
    assert!(
        node.chunk_files().len() > 3,
        "the crashed upload left chunks"
    );
    assert!(
        wait_until(Duration::from_secs(8), || node.chunk_files() == committed).await,
        "orphaned chunks were not collected: {} files",
        node.chunk_files().len()
    );
    assert_eq!(status_chunk_count(&node).await, 3);
    let mut storage = node.storage().await;
    let (_, got) = download(&mut storage, key_request("keep", 0, 0))
        .await
        .unwrap();
    assert!(got == keep);
}

#[tokio::test(flavor = "multi_thread")]
async fn objects_keep_their_chunk_size_when_the_node_changes_it() {
    let mut node = TestNode::start(&[]).await;
    let data = pseudo_random(90, 5 * CHUNK + 7);
    {
        let mut storage = node.storage().await;
        upload(&mut storage, "small-chunks", &data, 50_000)
            .await
            .unwrap();
    }
    assert!(node.sigterm().await.success());
    node.set_args(&["--chunk-size", "128KiB"]);
    node.launch().await;
    let mut storage = node.storage().await;
    let (info, got) = download(&mut storage, key_request("small-chunks", 0, 0))
        .await
        .unwrap();
    assert!(got == data);
    assert_eq!(info.chunk_size as usize, CHUNK);
    assert_eq!(info.chunk_count, 6);
    let (_, mid) = download(
        &mut storage,
        key_request("small-chunks", CHUNK as u64 - 3, CHUNK as u64 + 6),
    )
    .await
    .unwrap();
    assert!(mid == data[CHUNK - 3..2 * CHUNK + 3]);
    let info = upload(&mut storage, "big-chunks", &data, 50_000)
        .await
        .unwrap();
    assert_eq!(info.chunk_size, 128 * 1024);
    assert_eq!(info.chunk_count, 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_an_in_flight_upload_finish() {
    let mut node = TestNode::start(&[]).await;
    let data = pseudo_random(95, 12 * CHUNK);
    let chunks_before = node.chunk_files().len();
    // About 1.5 s of upload.
    let call = paced_upload(
        &node,
        "inflight",
        data.clone(),
        16 * 1024,
        Duration::from_millis(30),
    );
    assert!(
        wait_until(Duration::from_secs(20), || node.chunk_files().len()
            > chunks_before)
        .await,
        "the upload wrote no chunks"
    );
    let status = node.sigterm().await;
    assert!(status.success(), "exit status after SIGTERM: {status}");
    let result = call.await.unwrap();
    let info = result.expect("an upload in flight at SIGTERM completes");
    assert_eq!(info.sha1, sha1_hex(&data));
    node.launch().await;
    let mut storage = node.storage().await;
    let (_, got) = download(&mut storage, key_request("inflight", 0, 0))
        .await
        .unwrap();
    assert!(
        got == data,
        "the acknowledged upload is whole after restart"
    );
}
