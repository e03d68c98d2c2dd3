//! Scraping a node's Prometheus endpoint (`--metrics-addr`).

use std::{collections::BTreeMap, time::Duration};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::TestNode;

/// One sample: metric name and its labels, sorted, as `k="v"` pairs.
pub type Series = (String, Vec<String>);

/// Every sample of one scrape.
pub struct Scrape {
    pub body: String,
    pub samples: BTreeMap<Series, f64>,
}

impl Scrape {
    /// The value of `name{labels}` (labels as `k="v"`, any order), if the
    /// node exports that series.
    pub fn get(&self, name: &str, labels: &[&str]) -> Option<f64> {
        let mut labels: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
        labels.sort();
        self.samples.get(&(name.to_owned(), labels)).copied()
    }

    /// Like [`Scrape::get`], but a missing series is a test failure: an
    /// assertion that a counter is 0 must not pass because it is absent.
    #[track_caller]
    pub fn require(&self, name: &str, labels: &[&str]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| {
            panic!(
                "the node exports no series {name}{{{}}}; scrape:\n{}",
                labels.join(","),
                self.body
            )
        })
    }

    /// Calls of a Storage method that ended with `code`: `None` when no such
    /// call ended that way yet (the series appears with its first count).
    pub fn calls(&self, method: &str, code: &str) -> Option<f64> {
        self.get(
            "dfs_grpc_requests_total",
            &[
                "service=\"dfs.v1.Storage\"",
                &format!("method=\"{method}\""),
                &format!("code=\"{code}\""),
            ],
        )
    }
}

/// Adds `--metrics-addr 127.0.0.1:0` (and an address file) to a node not
/// started yet; returns the file the node writes the bound address to.
pub fn enable_metrics(node: &mut TestNode) -> std::path::PathBuf {
    let addr_file = node.root().join("metrics-addr");
    node.add_args(&[
        "--metrics-addr",
        "127.0.0.1:0",
        "--metrics-addr-file",
        addr_file.to_str().expect("utf-8 temp path"),
    ]);
    addr_file
}

/// The metrics address a node started after [`enable_metrics`] wrote.
pub fn metrics_addr(node: &TestNode) -> String {
    std::fs::read_to_string(node.root().join("metrics-addr"))
        .expect("the node writes its metrics address before serving gRPC")
        .trim()
        .to_owned()
}

/// GETs `path` from a metrics endpoint: (status line, body).
pub async fn http_get(addr: &str, path: &str) -> (String, String) {
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

/// Scrapes `/metrics` at `addr` and parses every sample line.
pub async fn scrape(addr: &str) -> Scrape {
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
    Scrape { body, samples }
}
