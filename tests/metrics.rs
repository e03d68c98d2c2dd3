//! `dfs node --metrics-addr`: a real node's Prometheus endpoint, scraped
//! over HTTP, moves with the calls made against it.

mod common;

use common::{
    metrics::{enable_metrics, http_get, metrics_addr, scrape},
    *,
};
use tonic::Code;

/// A node with metrics on an ephemeral loopback port; returns the node and
/// the metrics address it wrote.
async fn node_with_metrics(extra: &[&str]) -> (TestNode, String) {
    let mut node = TestNode::new(extra);
    enable_metrics(&mut node);
    node.launch().await;
    let addr = metrics_addr(&node);
    assert!(addr.starts_with("127.0.0.1:"), "metrics address {addr}");
    (node, addr)
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_calls_by_code_bytes_and_stored_chunks() {
    let (node, addr) = node_with_metrics(&[]).await;
    let before = scrape(&addr).await;
    // A call series appears with its first call: none has been made yet.
    assert_eq!(before.calls("Upload", "OK"), None, "{}", before.body);
    assert_eq!(before.require("dfs_upload_bytes_total", &[]), 0.0);
    assert_eq!(
        before.require(
            "dfs_chunk_verification_failures_total",
            &["source=\"local\""]
        ),
        0.0,
        "alerting counters are exported from the start"
    );

    let data = pseudo_random(7, 5 * CHUNK + 1234);
    let mut storage = node.storage().await;
    upload(&mut storage, "metrics/a", &data, 32 * 1024)
        .await
        .expect("upload");
    let (_, got) = download(&mut storage, key_request("metrics/a", 0, 0))
        .await
        .expect("download");
    assert_eq!(got, data);
    let missing = stat_key(&mut storage, "metrics/missing").await;
    assert_eq!(missing.expect_err("no such key").code(), Code::NotFound);

    let after = scrape(&addr).await;
    let body = &after.body;
    assert_eq!(after.calls("Upload", "OK"), Some(1.0), "{body}");
    assert_eq!(after.calls("Download", "OK"), Some(1.0), "{body}");
    assert_eq!(after.calls("Stat", "NOT_FOUND"), Some(1.0), "{body}");
    // The one Stat ended NOT_FOUND (counted just above), so no OK series.
    assert_eq!(after.calls("Stat", "OK"), None, "{body}");
    let n = data.len() as f64;
    assert_eq!(after.require("dfs_upload_bytes_total", &[]), n);
    assert_eq!(after.require("dfs_download_bytes_total", &[]), n);
    assert_eq!(after.require("dfs_store_chunks", &[]), 6.0, "{body}");
    assert!(after.require("dfs_store_bytes", &[]) > n);
    assert_eq!(after.require("dfs_objects_live", &[]), 1.0);
    assert_eq!(
        after.require("dfs_cluster_members", &["state=\"down\""]),
        0.0
    );
    assert_eq!(
        after.require(
            "dfs_grpc_request_duration_seconds_count",
            &["service=\"dfs.v1.Storage\"", "method=\"Download\""]
        ),
        1.0,
        "{body}"
    );
    assert_eq!(
        after.require(
            "dfs_grpc_requests_in_flight",
            &["service=\"dfs.v1.Storage\"", "method=\"Upload\""]
        ),
        0.0
    );
    assert!(body.contains("# HELP dfs_grpc_requests_total "), "{body}");
    assert!(body.contains("# TYPE dfs_grpc_request_duration_seconds histogram"));

    let (status, _) = http_get(&addr, "/elsewhere").await;
    assert!(status.contains(" 404 "), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_download_failing_after_data_counts_as_data_loss() {
    let (node, addr) = node_with_metrics(&[]).await;
    let data = pseudo_random(8, 3 * CHUNK);
    let mut storage = node.storage().await;
    upload(&mut storage, "metrics/bad", &data, 64 * 1024)
        .await
        .expect("upload");
    // Damage every chunk: the info message goes out first, so the status
    // arrives in the trailers of a streaming response.
    for path in node.chunk_files() {
        damage_file(&path, None, Damage::FlipByte);
    }
    let delivered = download_partial(&mut storage, key_request("metrics/bad", 0, 0)).await;
    assert!(delivered.info.is_some(), "info is sent before any chunk");
    assert_eq!(
        delivered.end.expect_err("damaged").code(),
        Code::DataLoss,
        "the client sees DATA_LOSS"
    );
    let after = scrape(&addr).await;
    let body = &after.body;
    assert_eq!(after.calls("Download", "DATA_LOSS"), Some(1.0), "{body}");
    assert_eq!(after.calls("Download", "OK"), None, "{body}");
    let failures = after.require(
        "dfs_chunk_verification_failures_total",
        &["source=\"local\""],
    );
    assert!(failures >= 1.0, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_refused_by_auth_are_counted_as_unauthenticated() {
    let mut node = TestNode::new(&[]);
    node.use_token("t0ken");
    enable_metrics(&mut node);
    node.launch().await;
    let addr = metrics_addr(&node);
    let mut client = node.client(None).await;
    assert_eq!(
        client.stat("k").await.expect_err("no token").code(),
        Code::Unauthenticated
    );
    assert!(node.is_serving().await, "health answers without a token");
    let after = scrape(&addr).await;
    let body = &after.body;
    assert_eq!(after.calls("Stat", "UNAUTHENTICATED"), Some(1.0), "{body}");
    let health_ok = after.require(
        "dfs_grpc_requests_total",
        &[
            "service=\"grpc.health.v1.Health\"",
            "method=\"Check\"",
            "code=\"OK\"",
        ],
    );
    assert!(health_ok >= 1.0, "{body}");
}
