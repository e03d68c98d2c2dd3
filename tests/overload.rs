//! Slow, stalled and hostile clients against a real `dfs node`: none of them
//! may stop the node from serving everyone else, and whatever they hold is
//! bounded and given back (issue 10; the budget back-pressure item of 12).
//!
//! The nodes run with small chunks (256 KiB) and a small buffer budget
//! (2 MiB: a reserve of 512 KiB for small requests, 1.5 MiB for the rest),
//! so a handful of stalled transfers is enough to fill what they may take.

mod common;

use std::{
    collections::HashMap,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use common::*;
use dfs::proto::{ObjectInfo, UploadRequest, storage_client::StorageClient};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
    task::JoinHandle,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, transport::Channel};

const BIG_CHUNK: usize = 256 * 1024;
/// Flags of every node here: 256 KiB chunks, a 2 MiB budget.
const SMALL_NODE: &[&str] = &["--chunk-size", "256KiB", "--buffer-budget", "2MiB"];

/// A node with metrics on an ephemeral port: the node and the metrics
/// address. [`SMALL_NODE`]'s flags unless `extra` sets a chunk size.
async fn node_with_metrics(extra: &[&str]) -> (TestNode, String) {
    let mut args: Vec<&str> = if extra.contains(&"--chunk-size") {
        Vec::new()
    } else {
        SMALL_NODE.to_vec()
    };
    args.extend_from_slice(extra);
    let mut node = TestNode::new(&args);
    let file = node.root().join("metrics-addr");
    node.add_args(&[
        "--metrics-addr",
        "127.0.0.1:0",
        "--metrics-addr-file",
        file.to_str().expect("utf-8 temp path"),
    ]);
    node.launch().await;
    let addr = std::fs::read_to_string(&file)
        .expect("metrics address file")
        .trim()
        .to_owned();
    (node, addr)
}

/// Every sample of a scrape: name -> [(labels, value)].
type Samples = HashMap<String, Vec<(String, f64)>>;

async fn scrape(addr: &str) -> Samples {
    let mut conn = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to metrics");
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    conn.write_all(req.as_bytes()).await.expect("send GET");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut raw))
        .await
        .expect("metrics answer within 10 s")
        .expect("read metrics");
    let text = String::from_utf8(raw).expect("utf-8 metrics");
    let body = text.split_once("\r\n\r\n").expect("an HTTP answer").1;
    let mut out: Samples = HashMap::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("`series value`");
        let value: f64 = value.parse().expect("numeric sample");
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}').to_owned()),
            None => (series, String::new()),
        };
        out.entry(name.to_owned())
            .or_default()
            .push((labels, value));
    }
    out
}

/// The sum of `name`'s samples whose labels contain every `k="v"` given;
/// `None` if the node exports no such series.
fn metric(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let series = samples.get(name)?;
    let matching: Vec<f64> = series
        .iter()
        .filter(|(l, _)| {
            labels
                .iter()
                .all(|(k, v)| l.split(',').any(|kv| kv == format!("{k}=\"{v}\"")))
        })
        .map(|(_, v)| *v)
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}

/// Polls the metrics until `cond` holds, for up to `timeout`; returns the
/// last scrape, or panics with `what`.
async fn wait_for_metrics(
    addr: &str,
    timeout: Duration,
    what: &str,
    cond: impl Fn(&Samples) -> bool,
) -> Samples {
    let deadline = Instant::now() + timeout;
    loop {
        let samples = scrape(addr).await;
        if cond(&samples) {
            return samples;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `name` (with `labels`) is at least `at_least` and then stops
/// moving for half a second: the traffic behind it has stalled.
async fn wait_until_stalled(addr: &str, name: &str, labels: &[(&str, &str)], at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = -1.0;
    loop {
        let now = metric(&scrape(addr).await, name, labels).unwrap_or(0.0);
        if now >= at_least && now == last {
            return;
        }
        last = now;
        assert!(
            Instant::now() < deadline,
            "{name} did not settle at >= {at_least} (now {now})"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// An upload that sent `sent` bytes after its header and now waits, its
/// request stream held open.
struct StalledUpload {
    tx: mpsc::Sender<UploadRequest>,
    call: JoinHandle<Result<ObjectInfo, Status>>,
}

async fn stalled_upload(channel: Channel, key: &str, pieces: &[&[u8]]) -> StalledUpload {
    let (tx, rx) = mpsc::channel(16);
    tx.send(header_msg(key)).await.expect("queue header");
    for piece in pieces {
        tx.send(data_msg(piece)).await.expect("queue data");
    }
    let mut storage = StorageClient::new(channel);
    let call = tokio::spawn(async move {
        let resp = storage.upload(ReceiverStream::new(rx)).await?;
        resp.into_inner()
            .object
            .ok_or_else(|| Status::internal("no object info"))
    });
    StalledUpload { tx, call }
}

/// Runs `dfs` with `args` against `node`, which must finish within 15 s.
async fn dfs_within_15s(node: &TestNode, args: &[&str]) -> std::process::Output {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--node", node.addr()]);
    tokio::time::timeout(Duration::from_secs(15), run_dfs(&all))
        .await
        .unwrap_or_else(|_| panic!("`dfs {}` hung for 15 s", args.join(" ")))
}

fn assert_ok(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A small put and get through the CLI both finish, and correctly.
async fn small_calls_work(node: &TestNode, dir: &Path) {
    let six = dir.join("six-byte-file");
    std::fs::write(&six, b"hello\n").expect("write six-byte file");
    let put = dfs_within_15s(
        node,
        &["put", six.to_str().unwrap(), "--key", "six-byte-file"],
    )
    .await;
    assert_ok(&put, "dfs put six-byte-file");
    let out = dir.join("small0.out");
    let get = dfs_within_15s(node, &["get", "small0", "-o", out.to_str().unwrap()]).await;
    assert_ok(&get, "dfs get small0");
    assert_eq!(std::fs::read(&out).unwrap(), pseudo_random(7, 1000));
}

/// The repro: three `dfs get big -o - | sleep 120`, then a small put
/// and get must not hang. (Before: they hung, every buffer held by the
/// three stalled downloads, with health still SERVING.)
#[tokio::test(flavor = "multi_thread")]
async fn three_stalled_downloads_do_not_stop_small_calls() {
    let (node, metrics) = node_with_metrics(&[]).await;
    let mut storage = node.storage().await;
    let big = pseudo_random(1, 8 << 20);
    upload(&mut storage, "big", &big, 1 << 20)
        .await
        .expect("upload big");
    upload(&mut storage, "small0", &pseudo_random(7, 1000), 1000)
        .await
        .expect("upload small0");

    // Each download writes into a pipe nobody reads, like `| sleep 120`.
    let mut gets = Vec::new();
    for _ in 0..3 {
        let child = tokio::process::Command::new(dfs_bin())
            .args(["get", "big", "-o", "-", "--node", node.addr()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn dfs get");
        gets.push(child);
    }
    // Proof they are stuck: three downloads in flight and no bytes moving.
    wait_for_metrics(&metrics, Duration::from_secs(30), "3 downloads", |s| {
        metric(s, "dfs_grpc_requests_in_flight", &[("method", "Download")]) == Some(3.0)
    })
    .await;
    wait_until_stalled(&metrics, "dfs_download_bytes_total", &[], 1.0).await;

    let dir = tempfile::tempdir().unwrap();
    small_calls_work(&node, dir.path()).await;
    assert!(node.is_serving().await);
    drop(gets);
}

/// About eight uploads that send one chunk and a byte and then wait must not
/// stop small calls either. (Before: each held a chunk buffer for its one
/// byte; eight filled the budget and every later call hung.)
#[tokio::test(flavor = "multi_thread")]
async fn uploads_stalled_after_one_chunk_do_not_stop_small_calls() {
    let (node, metrics) = node_with_metrics(&[]).await;
    let mut storage = node.storage().await;
    upload(&mut storage, "small0", &pseudo_random(7, 1000), 1000)
        .await
        .expect("upload small0");
    let chunk = pseudo_random(2, BIG_CHUNK);
    let mut stalled = Vec::new();
    for i in 0..8 {
        let channel = node.channel().await;
        stalled.push(stalled_upload(channel, &format!("stalled-{i}"), &[&chunk, b"x"]).await);
    }
    // Proof they are all in and stuck: every byte they sent was received.
    let sent = 8.0 * (BIG_CHUNK as f64 + 1.0);
    wait_until_stalled(
        &metrics,
        "dfs_upload_bytes_total",
        &[],
        sent - BIG_CHUNK as f64,
    )
    .await;

    let dir = tempfile::tempdir().unwrap();
    small_calls_work(&node, dir.path()).await;
    drop(stalled);
}

/// An upload whose client goes quiet is cancelled after `--idle-timeout`:
/// it ends DEADLINE_EXCEEDED, stores nothing and gives its budget back.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_upload_is_cancelled_and_stores_nothing() {
    let (node, metrics) = node_with_metrics(&["--idle-timeout", "2s"]).await;
    let chunk = pseudo_random(3, BIG_CHUNK);
    let started = Instant::now();
    let upload = stalled_upload(node.channel().await, "quiet", &[&chunk, b"x"]).await;
    // It holds a buffer for its one extra byte while it waits.
    wait_for_metrics(&metrics, Duration::from_secs(10), "budget held", |s| {
        metric(s, "dfs_budget_in_use_bytes", &[]).unwrap_or(0.0) > 0.0
    })
    .await;
    let result = tokio::time::timeout(Duration::from_secs(20), upload.call)
        .await
        .expect("the node ends the idle upload")
        .expect("upload task");
    assert!(started.elapsed() >= Duration::from_secs(2));
    let status = result.expect_err("an idle upload cannot succeed");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("--idle-timeout"), "{status:?}");
    let samples = wait_for_metrics(&metrics, Duration::from_secs(10), "budget back", |s| {
        metric(s, "dfs_budget_in_use_bytes", &[]) == Some(0.0)
    })
    .await;
    assert_eq!(
        metric(
            &samples,
            "dfs_grpc_calls_timed_out_total",
            &[("method", "Upload"), ("reason", "idle")]
        ),
        Some(1.0)
    );
    let mut storage = node.storage().await;
    assert_code(
        stat_key(&mut storage, "quiet").await,
        Code::NotFound,
        "stat of a cancelled upload",
    );
    drop(upload.tx);
}

/// Starts a download of `key` and reads only its first message, keeping the
/// stream open: the client has stopped reading.
async fn download_and_stop_reading(
    channel: Channel,
    key: &str,
    timeout: Option<Duration>,
) -> tonic::Streaming<dfs::proto::DownloadResponse> {
    let mut storage = StorageClient::new(channel);
    let mut req = tonic::Request::new(key_request(key, 0, 0));
    if let Some(t) = timeout {
        req.set_timeout(t);
    }
    let mut stream = storage.download(req).await.expect("download").into_inner();
    stream
        .message()
        .await
        .expect("first message")
        .expect("info");
    stream
}

/// A download whose client stops reading is cut off after `--idle-timeout`,
/// giving back every buffer, and its connection (nothing else on it) is
/// closed.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_download_is_cut_off_and_frees_its_buffers() {
    let (node, metrics) = node_with_metrics(&["--idle-timeout", "2s"]).await;
    let mut storage = node.storage().await;
    upload(&mut storage, "big", &pseudo_random(4, 8 << 20), 1 << 20)
        .await
        .expect("upload big");
    let stream = download_and_stop_reading(node.channel().await, "big", None).await;
    wait_for_metrics(&metrics, Duration::from_secs(10), "budget held", |s| {
        metric(s, "dfs_budget_in_use_bytes", &[]).unwrap_or(0.0) > 0.0
    })
    .await;
    let samples = wait_for_metrics(&metrics, Duration::from_secs(20), "cut off", |s| {
        metric(s, "dfs_budget_in_use_bytes", &[]) == Some(0.0)
            && metric(
                s,
                "dfs_grpc_connections_closed_total",
                &[("reason", "stalled")],
            ) == Some(1.0)
    })
    .await;
    assert_eq!(
        metric(
            &samples,
            "dfs_grpc_calls_timed_out_total",
            &[("method", "Download"), ("reason", "idle")]
        ),
        Some(1.0)
    );
    drop(stream);
    node.assert_healthy().await;
}

/// A client's deadline covers a download's whole stream, not only its first
/// message: past it, the node ends the call and frees its buffers even
/// though the client neither reads nor cancels.
#[tokio::test(flavor = "multi_thread")]
async fn a_download_deadline_covers_the_whole_stream() {
    let (node, metrics) = node_with_metrics(&[]).await;
    let mut storage = node.storage().await;
    upload(&mut storage, "big", &pseudo_random(5, 8 << 20), 1 << 20)
        .await
        .expect("upload big");
    let started = Instant::now();
    let stream =
        download_and_stop_reading(node.channel().await, "big", Some(Duration::from_secs(2))).await;
    let samples = wait_for_metrics(&metrics, Duration::from_secs(20), "deadline", |s| {
        metric(
            s,
            "dfs_grpc_calls_timed_out_total",
            &[("method", "Download"), ("reason", "deadline")],
        ) == Some(1.0)
    })
    .await;
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "cut by the deadline, not the 5 min idle timeout"
    );
    let samples = if metric(&samples, "dfs_budget_in_use_bytes", &[]) == Some(0.0) {
        samples
    } else {
        wait_for_metrics(&metrics, Duration::from_secs(10), "budget back", |s| {
            metric(s, "dfs_budget_in_use_bytes", &[]) == Some(0.0)
        })
        .await
    };
    assert_eq!(metric(&samples, "dfs_budget_in_use_bytes", &[]), Some(0.0));
    drop(stream);
}

/// A transfer that cannot get buffer memory within `--budget-wait` ends
/// RESOURCE_EXHAUSTED with a message, instead of hanging; small calls keep
/// working meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn a_transfer_without_budget_ends_resource_exhausted() {
    let (node, metrics) = node_with_metrics(&["--budget-wait", "1s"]).await;
    let mut storage = node.storage().await;
    upload(&mut storage, "small0", &pseudo_random(7, 1000), 1000)
        .await
        .expect("upload small0");
    // Five uploads one byte short of a chunk, each holding a whole chunk
    // buffer, fill the part of the budget whole chunks may use.
    let chunk = pseudo_random(6, BIG_CHUNK - 1);
    let mut stalled = Vec::new();
    for i in 0..5 {
        let ch = node.channel().await;
        stalled.push(stalled_upload(ch, &format!("hold-{i}"), &[&chunk]).await);
    }
    wait_for_metrics(&metrics, Duration::from_secs(20), "bulk full", |s| {
        metric(s, "dfs_budget_in_use_bytes", &[]).unwrap_or(0.0) >= 5.0 * BIG_CHUNK as f64
    })
    .await;
    let started = Instant::now();
    let result = tokio::time::timeout(
        Duration::from_secs(15),
        upload(
            &mut storage,
            "large",
            &pseudo_random(8, 2 * BIG_CHUNK),
            1 << 20,
        ),
    )
    .await
    .expect("a large upload without budget must not hang");
    let status = result.expect_err("no budget for a large upload");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("buffer memory"), "{status:?}");
    assert!(started.elapsed() >= Duration::from_secs(1));
    let samples = scrape(&metrics).await;
    assert!(metric(&samples, "dfs_budget_exhausted_total", &[]).unwrap_or(0.0) >= 1.0);
    let dir = tempfile::tempdir().unwrap();
    small_calls_work(&node, dir.path()).await;
    drop(stalled);
}

/// Not even small transfers can get memory: health turns NOT_SERVING and new
/// transfers are refused at once; once the stalled calls go, it recovers.
#[tokio::test(flavor = "multi_thread")]
async fn a_saturated_node_sheds_new_transfers_and_says_so_in_health() {
    let (node, metrics) = node_with_metrics(&["--budget-wait", "30s"]).await;
    // Uploads one byte short of a chunk fill the bulk part...
    let chunk = pseudo_random(9, BIG_CHUNK - 1);
    let mut stalled = Vec::new();
    for i in 0..5 {
        let ch = node.channel().await;
        stalled.push(stalled_upload(ch, &format!("bulk-{i}"), &[&chunk]).await);
    }
    // ...and uploads that sent one byte each hold a small first buffer
    // (16 KiB + the sealed header with 256 KiB chunks) until the reserve is
    // gone too.
    let channel = node.channel().await;
    for i in 0..60 {
        stalled.push(stalled_upload(channel.clone(), &format!("small-{i}"), &[b"x"]).await);
    }
    wait_for_metrics(&metrics, Duration::from_secs(20), "waiters", |s| {
        metric(s, "dfs_budget_waiters", &[]).unwrap_or(0.0) >= 1.0
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while node.is_serving().await {
        assert!(
            Instant::now() < deadline,
            "health stays SERVING while saturated"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut storage = node.storage().await;
    let started = Instant::now();
    let shed = upload(&mut storage, "shed", b"tiny", 4).await;
    assert_code(shed, Code::ResourceExhausted, "upload while saturated");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused at once"
    );
    let samples = scrape(&metrics).await;
    assert!(
        metric(
            &samples,
            "dfs_grpc_calls_shed_total",
            &[("reason", "budget")]
        ) >= Some(1.0)
    );

    // Clients give up: every stalled upload is cancelled.
    for s in stalled {
        s.call.abort();
        drop(s.tx);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !node.is_serving().await {
        assert!(Instant::now() < deadline, "health does not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for_metrics(&metrics, Duration::from_secs(10), "budget back", |s| {
        metric(s, "dfs_budget_in_use_bytes", &[]) == Some(0.0)
    })
    .await;
    node.assert_healthy().await;
}

/// `--max-calls`: beyond it, calls are refused at once with
/// RESOURCE_EXHAUSTED, while health (never shed) reports NOT_SERVING.
#[tokio::test(flavor = "multi_thread")]
async fn calls_beyond_max_calls_are_refused_at_once() {
    let (node, metrics) = node_with_metrics(&["--max-calls", "3"]).await;
    let channel = node.channel().await;
    let mut stalled = Vec::new();
    for i in 0..3 {
        stalled.push(stalled_upload(channel.clone(), &format!("slot-{i}"), &[b"x"]).await);
    }
    wait_for_metrics(&metrics, Duration::from_secs(10), "3 uploads", |s| {
        metric(s, "dfs_grpc_requests_in_flight", &[("method", "Upload")]) == Some(3.0)
    })
    .await;
    let mut storage = node.storage().await;
    let started = Instant::now();
    assert_code(
        stat_key(&mut storage, "anything").await,
        Code::ResourceExhausted,
        "a call beyond --max-calls",
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.is_serving().await {
        assert!(Instant::now() < deadline, "health SERVING at --max-calls");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for s in stalled {
        s.call.abort();
        drop(s.tx);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node.is_serving().await {
        assert!(Instant::now() < deadline, "health does not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_code(
        stat_key(&mut storage, "anything").await,
        Code::NotFound,
        "calls are served again",
    );
}

/// Reads from a raw socket until the node closes it; true if it did within
/// `timeout`.
async fn closed_within(sock: &mut tokio::net::TcpStream, timeout: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, sock.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {} // the server's HTTP/2 SETTINGS
        }
    }
}

/// `--max-connections`: idle connections make room for new ones, busy ones
/// are never dropped for a newcomer, and a connection idle for
/// `--idle-timeout` is closed.
#[tokio::test(flavor = "multi_thread")]
async fn connections_are_capped_and_idle_ones_closed() {
    let (node, metrics) =
        node_with_metrics(&["--max-connections", "4", "--idle-timeout", "3s"]).await;
    let addr = node.addr().to_owned();
    // Idle sockets that never speak HTTP/2 fill the cap...
    let mut idle = Vec::new();
    for _ in 0..6 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    // ...yet a real client gets in: the longest-idle ones are closed for it.
    let mut storage = node.storage().await;
    assert_code(
        stat_key(&mut storage, "nothing").await,
        Code::NotFound,
        "a call on a new connection",
    );
    let samples = scrape(&metrics).await;
    assert!(
        metric(
            &samples,
            "dfs_grpc_connections_closed_total",
            &[("reason", "evicted")]
        ) >= Some(3.0)
    );
    // A busy connection (a stalled upload on it) is never the one evicted.
    let busy = node.channel().await;
    let upload = stalled_upload(busy, "busy", &[b"x"]).await;
    wait_for_metrics(&metrics, Duration::from_secs(10), "upload running", |s| {
        metric(s, "dfs_grpc_requests_in_flight", &[("method", "Upload")]) == Some(1.0)
    })
    .await;
    let evicted = |s: &Samples| {
        metric(
            s,
            "dfs_grpc_connections_closed_total",
            &[("reason", "evicted")],
        )
        .unwrap_or(0.0)
    };
    let before = evicted(&scrape(&metrics).await);
    for _ in 0..6 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    // Proof that each newcomer made room (the busy one had its chance to go)...
    wait_for_metrics(&metrics, Duration::from_secs(10), "6 evictions", |s| {
        evicted(s) >= before + 6.0
    })
    .await;
    // ...and the busy connection was not the one closed: its upload still
    // completes once the client finishes it.
    assert!(!upload.call.is_finished(), "the busy connection was kept");
    drop(upload.tx);
    let info = tokio::time::timeout(Duration::from_secs(10), upload.call)
        .await
        .expect("the upload completes")
        .expect("upload task")
        .expect("the busy connection's upload succeeds");
    assert_eq!(info.size, 1);
    // Idle sockets are closed after --idle-timeout.
    let mut last = idle.pop().unwrap();
    assert!(
        closed_within(&mut last, Duration::from_secs(15)).await,
        "an idle connection stays open past --idle-timeout"
    );
    let samples = scrape(&metrics).await;
    assert!(
        metric(
            &samples,
            "dfs_grpc_connections_closed_total",
            &[("reason", "idle")]
        ) >= Some(1.0)
    );
}

/// Many concurrent transfers wait for buffer budget rather than allocate:
/// with 1 MiB chunks and a 4 MiB budget, eight concurrent uploads and
/// downloads of 4 MiB each (which could hold 4 chunk buffers apiece, 32 MiB,
/// without the budget) leave the node's peak RSS near that of one transfer,
/// and the budget metrics show the waits (issue 12).
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_transfers_wait_for_budget_with_flat_rss() {
    let (node, metrics) =
        node_with_metrics(&["--chunk-size", "1MiB", "--buffer-budget", "4MiB"]).await;
    let channel = node.channel().await;
    let object = |i: u64| pseudo_random(100 + i, 4 << 20);
    let round_trip = |channel: Channel, key: String, data: Vec<u8>| async move {
        let mut storage = StorageClient::new(channel);
        upload(&mut storage, &key, &data, 64 << 10).await?;
        let (_, got) = download(&mut storage, key_request(&key, 0, 0)).await?;
        assert!(got == data, "{key} round trip");
        Ok::<_, Status>(())
    };
    // One transfer alone: the baseline.
    round_trip(channel.clone(), "solo".into(), object(99))
        .await
        .expect("solo round trip");
    let baseline = peak_rss(node.pid());

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8 {
        tasks.spawn(round_trip(channel.clone(), format!("many-{i}"), object(i)));
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("transfer task").expect("transfer");
    }
    let peak = peak_rss(node.pid());
    let samples = scrape(&metrics).await;
    let waits = metric(&samples, "dfs_budget_wait_seconds_count", &[]).unwrap_or(0.0);
    let quick = metric(
        &samples,
        "dfs_budget_wait_seconds_bucket",
        &[("le", "0.001")],
    )
    .unwrap_or(0.0);
    assert!(
        waits - quick >= 1.0,
        "no request waited for budget ({waits} requests, {quick} within 1 ms)"
    );
    assert_eq!(
        metric(&samples, "dfs_budget_exhausted_total", &[]),
        Some(0.0)
    );
    // Beyond the budget, each call may pin one gRPC message and one HTTP/2
    // stream window (64 KiB + 512 KiB here), or two 256 KiB messages being
    // sent: under 5 MiB for eight.
    assert!(
        peak <= baseline + (12 << 20),
        "peak RSS grew from {baseline} to {peak} bytes"
    );
}

/// The peak resident set size (VmHWM) of `pid`, in bytes.
fn peak_rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM line");
    line["VmHWM:".len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .expect("VmHWM value")
        * 1024
}
