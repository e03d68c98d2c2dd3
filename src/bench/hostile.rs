//! `dfs bench --hostile`: what slow and hostile clients cost everyone else.
//!
//! Sixteen clients run a 4 KiB put/get mix on a quiet node, then while the
//! bench holds 8 downloads that never read, 8 uploads that stall after one
//! chunk (and one more byte, so each holds a buffer), 500 idle TCP
//! connections on the gRPC port and 200 on the peer port, then quiet again
//! (the two quiet runs show the machine's own drift). It reports each run's
//! rate and latency, the node's peak RSS, and what the node did with the
//! hostile calls and connections.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use tokio::{io::AsyncReadExt, net::TcpStream, sync::mpsc, task::JoinSet};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use super::RandomReader;
use crate::{
    client::Client,
    proto::{
        DownloadRequest, UploadHeader, UploadRequest, download_request,
        storage_client::StorageClient, upload_request,
    },
    units::format_size,
};

/// Clients of the put/get mix.
pub(super) const CLIENTS: usize = 16;
const SMALL_OBJECT: u64 = 4096;
const STALLED_DOWNLOADS: usize = 8;
const STALLED_UPLOADS: usize = 8;
const IDLE_GRPC: usize = 500;
const IDLE_PEER: usize = 200;
/// Object the stalled downloads read: larger than what a client's windows
/// and socket buffers absorb, so the node is left holding the rest.
const BIG_OBJECT: u64 = 40 << 20;
/// What a stalled upload sends: one default chunk and a byte.
const STALLED_UPLOAD_BYTES: usize = (4 << 20) + 1;
/// How long the hostile load settles before the mix starts.
const SETTLE: Duration = Duration::from_secs(2);

/// One run of the mix.
struct MixResult {
    ops_per_sec: f64,
    p50: Duration,
    p99: Duration,
    errors: usize,
}

/// The hostile calls and sockets the bench holds.
struct Hostile {
    _downloads: Vec<tonic::Streaming<crate::proto::DownloadResponse>>,
    download_errors: Vec<String>,
    uploads: Vec<(mpsc::Sender<UploadRequest>, tokio::task::JoinHandle<String>)>,
    grpc_closed: Arc<AtomicUsize>,
    peer_closed: Arc<AtomicUsize>,
    sockets: JoinSet<()>,
}

/// Runs the hostile bench against `addr`; `peak_rss` reads the node's peak
/// RSS (`VmHWM`).
pub(super) async fn run(
    addr: &str,
    ops: usize,
    peak_rss: impl Fn() -> Option<u64>,
) -> anyhow::Result<()> {
    let client = Client::connect(addr, std::env::var("DFS_TOKEN").ok()).await?;
    let p2p = client.clone().status().await?.p2p_address;
    println!(
        "hostile bench: {CLIENTS} clients x 4 KiB put/get mix ({ops} operations per run), node {addr}"
    );
    // Warm-up, not reported: connections, the index, the allocator, and
    // the chunk store's shard directories (a first write into each costs a
    // mkdir and two fsyncs, which would make the first run look slow).
    mix(client.clone(), ops, "warm-up").await?;
    let before = mix(client.clone(), ops, "quiet-before").await?;
    print_mix("quiet, before", &before, None);

    let rss_quiet = peak_rss();
    store_big_object(client.clone()).await?;
    let rss_big = peak_rss();
    let mut hostile = hold_hostile_load(addr, &p2p).await?;
    tokio::time::sleep(SETTLE).await;
    // A fresh connection: idle ones may have been closed to make room.
    let client = Client::connect(addr, std::env::var("DFS_TOKEN").ok()).await?;
    let loaded = mix(client.clone(), ops, "hostile").await?;
    let rss = peak_rss();
    report_hostile(&mut hostile).await;
    hostile.sockets.abort_all();
    drop(hostile);

    let after = mix(client.clone(), ops, "quiet-after").await?;
    print_mix("quiet, after", &after, None);
    // The machine's own drift shows as the difference between the two
    // quiet runs; the hostile run is compared with the better of them
    // (higher rate, lower latencies), the stricter comparison.
    let quiet = MixResult {
        ops_per_sec: before.ops_per_sec.max(after.ops_per_sec),
        p50: before.p50.min(after.p50),
        p99: before.p99.min(after.p99),
        errors: before.errors + after.errors,
    };
    print_mix("hostile", &loaded, Some(&quiet));
    let text = |r: Option<u64>| r.map_or("unknown".into(), format_size);
    println!(
        "  node peak RSS (VmHWM): {} after the quiet run, {} after storing the {} object \
         the stalled downloads read, {} at the end of the hostile run",
        text(rss_quiet),
        text(rss_big),
        format_size(BIG_OBJECT),
        text(rss)
    );
    let throughput = loaded.ops_per_sec / quiet.ops_per_sec;
    let p99 = loaded.p99.as_secs_f64() / quiet.p99.as_secs_f64().max(1e-9);
    let met = |ok: bool| if ok { "met" } else { "MISSED" };
    println!("  targets:");
    println!(
        "    throughput >= 0.8 x quiet   {:.2} x  {}",
        throughput,
        met(throughput >= 0.8)
    );
    println!(
        "    p99 <= 2 x quiet            {:.2} x  {}",
        p99,
        met(p99 <= 2.0)
    );
    if let Some(rss) = rss {
        println!(
            "    peak RSS <= 64 MiB          {}  {}",
            format_size(rss),
            met(rss <= 64 << 20)
        );
    }
    Ok(())
}

fn print_mix(name: &str, r: &MixResult, quiet: Option<&MixResult>) {
    let ratio = quiet.map_or(String::new(), |q| {
        format!(
            "  (= {:.2} x the better quiet rate, p99 {:.2} x)",
            r.ops_per_sec / q.ops_per_sec,
            r.p99.as_secs_f64() / q.p99.as_secs_f64().max(1e-9)
        )
    });
    println!(
        "  {name:<14} {:>7.0} ops/s, p50 {:.1} ms, p99 {:.1} ms, {} errors{ratio}",
        r.ops_per_sec,
        r.p50.as_secs_f64() * 1e3,
        r.p99.as_secs_f64() * 1e3,
        r.errors
    );
}

/// `ops` operations from [`CLIENTS`] concurrent clients, alternating a
/// 4 KiB put and a get of what was just put. Errors are counted, not fatal:
/// a node that sheds load answers some calls RESOURCE_EXHAUSTED.
async fn mix(client: Client, ops: usize, run: &str) -> anyhow::Result<MixResult> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..CLIENTS {
        let (mut client, next, run) = (client.clone(), next.clone(), run.to_owned());
        tasks.spawn(async move {
            let (mut latencies, mut errors) = (Vec::new(), 0usize);
            loop {
                let i = next.fetch_add(2, Ordering::Relaxed);
                if i >= ops {
                    return (latencies, errors);
                }
                let key = format!("bench-mix/{run}/{i}");
                let header = UploadHeader {
                    key: key.clone(),
                    ..Default::default()
                };
                let t = Instant::now();
                let reader = RandomReader::new(SMALL_OBJECT, i as u64 + 1);
                match client.upload(header, reader, |_| {}).await {
                    Ok(_) => latencies.push(t.elapsed()),
                    Err(_) => errors += 1,
                }
                let t = Instant::now();
                match client.download_discard(Client::key_request(&key)).await {
                    Ok(_) => latencies.push(t.elapsed()),
                    Err(_) => errors += 1,
                }
            }
        });
    }
    let (mut all, mut errors) = (Vec::with_capacity(ops), 0);
    while let Some(done) = tasks.join_next().await {
        let (latencies, errs) = done?;
        all.extend(latencies);
        errors += errs;
    }
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(!all.is_empty(), "every operation of the {run} run failed");
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    Ok(MixResult {
        ops_per_sec: all.len() as f64 / secs,
        p50: pct(0.50),
        p99: pct(0.99),
        errors,
    })
}

async fn channel(addr: &str) -> anyhow::Result<Channel> {
    let uri = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    Ok(Endpoint::from_shared(uri)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?)
}

/// Stores the object the stalled downloads read.
async fn store_big_object(mut client: Client) -> anyhow::Result<()> {
    let header = UploadHeader {
        key: "bench-hostile/big".into(),
        ..Default::default()
    };
    client
        .upload(header, RandomReader::new(BIG_OBJECT, 0xb16), |_| {})
        .await?;
    Ok(())
}

/// Opens every hostile call and socket and returns once they are in place.
async fn hold_hostile_load(addr: &str, p2p: &str) -> anyhow::Result<Hostile> {
    let mut hostile = Hostile {
        _downloads: Vec::new(),
        download_errors: Vec::new(),
        uploads: Vec::new(),
        grpc_closed: Arc::default(),
        peer_closed: Arc::default(),
        sockets: JoinSet::new(),
    };
    for _ in 0..STALLED_DOWNLOADS {
        let mut storage = StorageClient::new(channel(addr).await?);
        let req = DownloadRequest {
            target: Some(download_request::Target::Key("bench-hostile/big".into())),
            offset: 0,
            length: 0,
        };
        match storage.download(req).await {
            Ok(resp) => hostile._downloads.push(resp.into_inner()),
            Err(s) => hostile.download_errors.push(format!("{:?}", s.code())),
        }
    }
    for i in 0..STALLED_UPLOADS {
        let header = UploadHeader {
            key: format!("bench-hostile/stalled-{i}"),
            ..Default::default()
        };
        let data = RandomReader::new(0, 0x5a1 + i as u64).bytes(STALLED_UPLOAD_BYTES);
        let mut msgs = vec![upload_request::Msg::Header(header)];
        msgs.extend(
            (0..STALLED_UPLOAD_BYTES)
                .step_by(crate::client::UPLOAD_MESSAGE_BYTES)
                .map(|at| {
                    let end = (at + crate::client::UPLOAD_MESSAGE_BYTES).min(STALLED_UPLOAD_BYTES);
                    upload_request::Msg::Data(data.slice(at..end))
                }),
        );
        let (tx, rx) = mpsc::channel(msgs.len());
        for msg in msgs {
            tx.send(UploadRequest { msg: Some(msg) }).await?;
        }
        let mut storage = StorageClient::new(channel(addr).await?);
        let call = tokio::spawn(async move {
            match storage.upload(ReceiverStream::new(rx)).await {
                Ok(_) => "OK".to_owned(),
                Err(s) => format!("{:?}", s.code()),
            }
        });
        hostile.uploads.push((tx, call));
    }
    for (target, count, closed) in [
        (addr, IDLE_GRPC, hostile.grpc_closed.clone()),
        (p2p, IDLE_PEER, hostile.peer_closed.clone()),
    ] {
        for _ in 0..count {
            let mut socket = TcpStream::connect(target).await?;
            let closed = closed.clone();
            hostile.sockets.spawn(async move {
                // Hold the connection; read (and drop) what the node sends
                // until it closes it.
                let mut buf = [0u8; 1024];
                while matches!(socket.read(&mut buf).await, Ok(n) if n > 0) {}
                closed.fetch_add(1, Ordering::Relaxed);
            });
        }
    }
    Ok(hostile)
}

/// Prints what became of the hostile calls and sockets.
async fn report_hostile(h: &mut Hostile) {
    let (mut held, mut codes) = (0, Vec::new());
    for (tx, call) in h.uploads.drain(..) {
        if call.is_finished() {
            codes.push(call.await.unwrap_or_else(|e| e.to_string()));
        } else {
            held += 1;
            call.abort();
        }
        drop(tx);
    }
    println!(
        "  stalled uploads: {held} still held by the node at the end, {} ended ({})",
        codes.len(),
        codes.join(", ")
    );
    println!(
        "  downloads not reading: {} opened, {} refused ({})",
        STALLED_DOWNLOADS - h.download_errors.len(),
        h.download_errors.len(),
        h.download_errors.join(", ")
    );
    println!(
        "  idle connections the node closed: {} of {IDLE_GRPC} on the gRPC port, {} of {IDLE_PEER} on the peer port",
        h.grpc_closed.load(Ordering::Relaxed),
        h.peer_closed.load(Ordering::Relaxed)
    );
}

impl RandomReader {
    /// The next `len` bytes, as one buffer.
    fn bytes(mut self, len: usize) -> Bytes {
        let mut out = vec![0u8; len];
        self.fill(&mut out);
        Bytes::from(out)
    }
}
