//! `dfs node --metrics-addr`: a real node's Prometheus endpoint, scraped
//! over HTTP, moves with the calls made against it.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

/// One sample: metric name and its labels, sorted, as `k="v"` pairs.
type Series = (String, Vec<String>);

/// A node with metrics on an ephemeral loopback port; returns the node and
/// the metrics address it wrote.
async fn node_with_metrics(extra: &[&str]) -> (TestNode, String) {
    let mut node = TestNode::new(extra);
    let addr_file = node.root().join("metrics-addr");
    node.add_args(&[
        "--metrics-addr",
        "127.0.0.1:0",
        "--metrics-addr-file",
        addr_file.to_str().expect("utf-8 temp path"),
    ]);
    node.launch().await;
    let addr = std::fs::read_to_string(&addr_file)
        .expect("the node writes its metrics address before serving gRPC")
        .trim()
        .to_owned();
    assert!(addr.starts_with("127.0.0.1:"), "metrics address {addr}");
    (node, addr)
}

/// GETs `path` from the metrics endpoint: (status line, body).
async fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut conn = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics endpoint");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await.expect("send GET");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut raw))
        .await
        .expect("the endpoint answers within 10 s")
        .expect("read the answer");
    let text = String::from_utf8(raw).expect("the answer is UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, body.to_owned())
}

/// Scrapes `/metrics` and parses every sample line.
async fn scrape(addr: &str) -> (String, BTreeMap<Series, f64>) {
    let (status, body) = http_get(addr, "/metrics").await;
    assert!(status.contains(" 200 "), "scrape status: {status}");
    let mut samples = BTreeMap::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("`series value` lines");
        let value: f64 = value.parse().expect("a numeric sample value");
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let mut labels: Vec<String> = rest
                    .trim_end_matches('}')
                    .split(',')
                    .map(str::to_owned)
                    .collect();
                labels.sort();
                (name.to_owned(), labels)
            }
            None => (series.to_owned(), Vec::new()),
        };
        samples.insert((name, labels), value);
    }
    (body, samples)
}

/// The value of `name{labels}` (labels as `k="v"`, any order).
fn value(samples: &BTreeMap<Series, f64>, name: &str, labels: &[&str]) -> Option<f64> {
    let mut labels: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
    labels.sort();
    samples.get(&(name.to_owned(), labels)).copied()
}

fn calls(samples: &BTreeMap<Series, f64>, method: &str, code: &str) -> f64 {
    value(
        samples,
        "dfs_grpc_requests_total",
        &[
            "service=\"dfs.v1.Storage\"",
            &format!("method=\"{method}\""),
            &format!("code=\"{code}\""),
        ],
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_calls_by_code_bytes_and_stored_chunks() {
    let (node, addr) = node_with_metrics(&[]).await;
    let (_, before) = scrape(&addr).await;
    assert_eq!(calls(&before, "Upload", "OK"), 0.0);
    assert_eq!(value(&before, "dfs_upload_bytes_total", &[]), Some(0.0));
    assert_eq!(
        value(
            &before,
            "dfs_chunk_verification_failures_total",
            &["source=\"local\""]
        ),
        Some(0.0),
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

    let (body, after) = scrape(&addr).await;
    assert_eq!(calls(&after, "Upload", "OK"), 1.0, "{body}");
    assert_eq!(calls(&after, "Download", "OK"), 1.0, "{body}");
    assert_eq!(calls(&after, "Stat", "NOT_FOUND"), 1.0, "{body}");
    assert_eq!(calls(&after, "Stat", "OK"), 0.0, "{body}");
    let n = data.len() as f64;
    assert_eq!(value(&after, "dfs_upload_bytes_total", &[]), Some(n));
    assert_eq!(value(&after, "dfs_download_bytes_total", &[]), Some(n));
    assert_eq!(value(&after, "dfs_store_chunks", &[]), Some(6.0), "{body}");
    assert!(value(&after, "dfs_store_bytes", &[]).unwrap_or(0.0) > n);
    assert_eq!(value(&after, "dfs_objects_live", &[]), Some(1.0));
    assert_eq!(
        value(&after, "dfs_cluster_members", &["state=\"down\""]),
        Some(0.0)
    );
    assert_eq!(
        value(
            &after,
            "dfs_grpc_request_duration_seconds_count",
            &["service=\"dfs.v1.Storage\"", "method=\"Download\""]
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        value(
            &after,
            "dfs_grpc_requests_in_flight",
            &["service=\"dfs.v1.Storage\"", "method=\"Upload\""]
        ),
        Some(0.0)
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
        let mut bytes = std::fs::read(&path).expect("read chunk");
        let last = bytes.len() - 1;
        bytes[last] ^= 0x5a;
        std::fs::write(&path, bytes).expect("write chunk");
    }
    let delivered = download_partial(&mut storage, key_request("metrics/bad", 0, 0)).await;
    assert!(delivered.info.is_some(), "info is sent before any chunk");
    assert_eq!(
        delivered.end.expect_err("damaged").code(),
        Code::DataLoss,
        "the client sees DATA_LOSS"
    );
    let (body, samples) = scrape(&addr).await;
    assert_eq!(calls(&samples, "Download", "DATA_LOSS"), 1.0, "{body}");
    assert_eq!(calls(&samples, "Download", "OK"), 0.0, "{body}");
    let failures = value(
        &samples,
        "dfs_chunk_verification_failures_total",
        &["source=\"local\""],
    )
    .unwrap_or(0.0);
    assert!(failures >= 1.0, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_refused_by_auth_are_counted_as_unauthenticated() {
    let mut node = TestNode::new(&[]);
    let token_file = node.root().join("token");
    std::fs::write(&token_file, "t0ken\n").expect("write token");
    let addr_file = node.root().join("metrics-addr");
    node.add_args(&[
        "--auth-token-file",
        token_file.to_str().expect("utf-8"),
        "--metrics-addr",
        "127.0.0.1:0",
        "--metrics-addr-file",
        addr_file.to_str().expect("utf-8"),
    ]);
    node.launch().await;
    let addr = std::fs::read_to_string(&addr_file).expect("metrics address");
    let mut client = node.client(None).await;
    assert_eq!(
        client.stat("k").await.expect_err("no token").code(),
        Code::Unauthenticated
    );
    assert!(node.is_serving().await, "health answers without a token");
    let (body, samples) = scrape(addr.trim()).await;
    assert_eq!(calls(&samples, "Stat", "UNAUTHENTICATED"), 1.0, "{body}");
    assert!(
        value(
            &samples,
            "dfs_grpc_requests_total",
            &[
                "service=\"grpc.health.v1.Health\"",
                "method=\"Check\"",
                "code=\"OK\""
            ]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{body}"
    );
}
