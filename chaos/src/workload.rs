//! The clients: each runs its planned operations in order, through the
//! planned node, and records what it sent and what it was told.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use dfs::proto::{
    DeleteRequest, DownloadRequest, ListRequest, StatRequest, StatusRequest, UploadHeader,
    UploadRequest, cluster_client::ClusterClient, download_request, download_response,
    stat_request, storage_client::StorageClient, upload_request,
};
use sha1::{Digest, Sha1};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, transport::Channel};

use crate::{
    config::Config,
    conn,
    history::{AckCheck, Event, History, Outcome, PutDetail, ReadDetail, Seen, Ver, now_ms},
    plan::{OpKind, PlannedOp},
    procs::Procs,
    rng::DataGen,
};

/// Largest message a read may receive (nodes send at most 1 MiB).
const MAX_DECODE: usize = 8 << 20;

/// Shared by every client of a run.
pub struct Workload {
    cfg: Config,
    addrs: Vec<String>,
    procs: Arc<Procs>,
    history: Arc<History>,
    keys: dfs::crypto::Keys,
    /// Last acknowledged size per key, to draw ranged reads against.
    sizes: Mutex<HashMap<String, u64>>,
    /// Chunk ids of uploads in progress, by op id (the nemesis must not
    /// destroy their last copies either).
    pub inflight: Mutex<HashMap<u64, Vec<[u8; 20]>>>,
}

impl Workload {
    pub fn new(cfg: &Config, procs: Arc<Procs>, history: Arc<History>) -> anyhow::Result<Self> {
        let secret = dfs::crypto::ClusterSecret::read_file(procs.key_file())?;
        let addrs = (0..cfg.nodes).map(|i| procs.grpc_addr(i)).collect();
        Ok(Self {
            cfg: cfg.clone(),
            addrs,
            procs,
            history,
            keys: dfs::crypto::Keys::derive(&secret),
            sizes: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
        })
    }

    /// Runs one client's operations, each no earlier than planned, none
    /// started after `end`.
    pub async fn run_client(self: Arc<Self>, ops: Vec<PlannedOp>, start: Instant, end: Instant) {
        let mut channels: Vec<Option<Channel>> = vec![None; self.addrs.len()];
        for op in ops {
            let at = start + Duration::from_millis(op.at_ms);
            if at >= end || Instant::now() >= end {
                break;
            }
            tokio::time::sleep_until(at).await;
            let event = self.execute(&mut channels, &op).await;
            self.history.record(event);
        }
    }

    fn storage(
        &self,
        channels: &mut [Option<Channel>],
        node: usize,
    ) -> Result<StorageClient<Channel>, Status> {
        if channels[node].is_none() {
            channels[node] = Some(conn::shared(&self.addrs[node])?);
        }
        let ch = channels[node].clone().expect("set above");
        Ok(StorageClient::new(ch).max_decoding_message_size(MAX_DECODE))
    }

    async fn execute(&self, channels: &mut [Option<Channel>], op: &PlannedOp) -> Event {
        let mut ev = Event::new(op, now_ms());
        match &op.kind {
            OpKind::Put { size } => self.put(channels, op, *size, None, None, &mut ev).await,
            OpKind::PausedPut {
                size,
                pause_after,
                pause_ms,
            } => {
                self.put(
                    channels,
                    op,
                    *size,
                    Some((*pause_after, *pause_ms)),
                    None,
                    &mut ev,
                )
                .await
            }
            OpKind::CancelledPut { size, cancel_after } => {
                self.put(channels, op, *size, None, Some(*cancel_after), &mut ev)
                    .await
            }
            other => match self.storage(channels, op.node) {
                Ok(mut storage) => {
                    let limit = self.cfg.op_timeout;
                    let work = self.simple(&mut storage, op, other, &mut ev);
                    if tokio::time::timeout(limit, work).await.is_err() {
                        ev.outcome = Outcome::Timeout;
                    }
                }
                Err(s) => ev.outcome = Outcome::from_status(&s),
            },
        }
        ev.complete_ms = now_ms();
        ev
    }

    /// Every operation but uploads. Sets `ev.outcome` as it goes, so a
    /// timeout keeps whatever was seen.
    async fn simple(
        &self,
        storage: &mut StorageClient<Channel>,
        op: &PlannedOp,
        kind: &OpKind,
        ev: &mut Event,
    ) {
        let result = match kind {
            OpKind::Delete => storage
                .delete(DeleteRequest {
                    key: op.key.clone(),
                })
                .await
                .map(|r| ev.version = Ver::from_proto(r.into_inner().version.as_ref())),
            OpKind::Get => self.read(storage, op, 0, 0, ev).await,
            OpKind::GetRange { a, b } => {
                let size = self.known_size(&op.key);
                let (offset, length) = draw_range(size, *a, *b);
                self.read(storage, op, offset, length, ev).await
            }
            OpKind::Stat => storage
                .stat(StatRequest {
                    target: Some(stat_request::Target::Key(op.key.clone())),
                })
                .await
                .map(|r| ev.stat = Some(Seen::from_info(&r.into_inner()))),
            OpKind::List { prefix } => list(storage, prefix, ev).await,
            _ => unreachable!("uploads are not simple"),
        };
        ev.outcome = match result {
            Ok(()) => Outcome::Ok,
            Err(s) => Outcome::from_status(&s),
        };
    }

    fn known_size(&self, key: &str) -> u64 {
        let sizes = self.sizes.lock().unwrap_or_else(|p| p.into_inner());
        sizes.get(key).copied().unwrap_or(2 * self.cfg.chunk_size)
    }

    /// Streams a download, hashing what arrives and checking the stream's
    /// shape: the info first, once, then data.
    async fn read(
        &self,
        storage: &mut StorageClient<Channel>,
        op: &PlannedOp,
        offset: u64,
        length: u64,
        ev: &mut Event,
    ) -> Result<(), Status> {
        ev.read = Some(ReadDetail {
            offset,
            length,
            ..Default::default()
        });
        let detail = ev.read.as_mut().expect("set above");
        let req = DownloadRequest {
            target: Some(download_request::Target::Key(op.key.clone())),
            offset,
            length,
        };
        let mut sha1 = Sha1::new();
        let result = async {
            let mut stream = storage.download(req).await?.into_inner();
            while let Some(m) = stream.message().await? {
                match m.msg {
                    Some(download_response::Msg::Info(info)) if detail.info.is_none() => {
                        detail.info = Some(Seen::from_info(&info));
                    }
                    Some(download_response::Msg::Info(_)) => {
                        detail
                            .protocol
                            .get_or_insert("a second info message".into());
                    }
                    Some(download_response::Msg::Data(d)) => {
                        if detail.info.is_none() {
                            detail
                                .protocol
                                .get_or_insert("data before the info message".into());
                        }
                        sha1.update(&d);
                        detail.got_len += d.len() as u64;
                        detail.got_sha1 = hex::encode(sha1.clone().finalize());
                    }
                    None => {
                        detail.protocol.get_or_insert("an empty message".into());
                    }
                }
            }
            Ok(())
        }
        .await;
        detail.got_sha1 = hex::encode(sha1.finalize());
        result
    }

    /// SHA-1 and chunk ids of an upload's whole data.
    fn describe(&self, op: u64, size: u64) -> PutDetail {
        let data = DataGen::new(self.cfg.seed, op);
        let mut sha1 = Sha1::new();
        let mut chunks = Vec::new();
        let mut buf = vec![0u8; self.cfg.chunk_size as usize];
        let mut off = 0;
        while off < size {
            let n = (size - off).min(self.cfg.chunk_size) as usize;
            data.fill(off, &mut buf[..n]);
            sha1.update(&buf[..n]);
            chunks.push(self.keys.chunk_id(&buf[..n]).0);
            off += n as u64;
        }
        PutDetail {
            size,
            sha1: hex::encode(sha1.finalize()),
            chunks,
            ..Default::default()
        }
    }

    /// The ids the gateway reports as itself or up, sorted.
    async fn gateway_up(
        &self,
        channels: &mut [Option<Channel>],
        node: usize,
    ) -> Option<Vec<String>> {
        self.storage(channels, node).ok()?;
        let channel = channels[node].clone()?;
        let mut client = ClusterClient::new(channel);
        let call = client.status(StatusRequest {});
        let status = tokio::time::timeout(Duration::from_secs(2), call)
            .await
            .ok()?
            .ok()?
            .into_inner();
        let mut up: Vec<String> = status
            .members
            .into_iter()
            .filter(|m| m.state == "up" || m.state == "self")
            .map(|m| m.node_id)
            .collect();
        up.sort();
        Some(up)
    }

    /// On how many nodes' disks each chunk is now.
    fn copies(&self, chunks: &[[u8; 20]]) -> Vec<u8> {
        let dirs: Vec<std::path::PathBuf> = (0..self.procs.slots.len())
            .map(|i| self.procs.slot(i).data_dir().join("chunks"))
            .collect();
        chunks
            .iter()
            .map(|c| {
                let rel = dfs::store::shard_path(&dfs::crypto::ChunkId(*c));
                dirs.iter().filter(|d| d.join(&rel).exists()).count() as u8
            })
            .collect()
    }

    /// One upload on a connection of its own; see [`conn`] for why.
    #[allow(clippy::too_many_arguments)]
    async fn put(
        &self,
        channels: &mut [Option<Channel>],
        op: &PlannedOp,
        size: u64,
        pause: Option<(u64, u64)>,
        cancel_after: Option<u64>,
        ev: &mut Event,
    ) {
        let up_before = self.gateway_up(channels, op.node).await;
        ev.invoke_ms = now_ms();
        let mut detail = self.describe(op.id, size);
        self.inflight_set(op.id, Some(detail.chunks.clone()));
        let limit = self.cfg.op_timeout + Duration::from_millis(pause.map_or(0, |p| p.1));
        let (channel, cut) = match conn::dedicated(&self.addrs[op.node]).await {
            Ok(c) => c,
            Err(s) => {
                ev.outcome = Outcome::from_status(&s);
                ev.put = Some(detail);
                self.inflight_set(op.id, None);
                return;
            }
        };
        let state = Arc::new(Mutex::new(FeedState::default()));
        let (tx, rx) = mpsc::channel(2);
        let (cancel_tx, cancel_rx) = oneshot::channel();
        let feed = Feed {
            header: UploadHeader {
                key: op.key.clone(),
                ..Default::default()
            },
            data: DataGen::new(self.cfg.seed, op.id),
            size,
            piece: self.cfg.chunk_size,
            pause,
            cancel_after,
            state: state.clone(),
        };
        tokio::spawn(feed.run(tx, cancel_tx));
        let mut storage = StorageClient::new(channel).max_decoding_message_size(MAX_DECODE);
        let call = storage.upload(ReceiverStream::new(rx));
        let ended = tokio::select! {
            r = tokio::time::timeout(limit, call) => match r {
                Ok(reply) => Ended::Reply(reply.map(|r| r.into_inner())),
                Err(_) => Ended::TimedOut,
            },
            Ok(()) = cancel_rx => Ended::Cancelled,
        };
        // Whatever happened, the stream must not end normally from now on.
        let (sent, sent_all) = {
            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
            s.abandoned = true;
            (s.sent, s.sent_all)
        };
        cut.cut();
        (detail.sent, detail.sent_all) = (sent, sent_all);
        ev.outcome = match ended {
            Ended::Reply(Ok(resp)) => {
                let copies = self.copies(&detail.chunks);
                let checked_ms = now_ms();
                ev.ack = Some(AckCheck {
                    up_before,
                    up_after: self.gateway_up(channels, op.node).await,
                    copies,
                    checked_ms,
                });
                let info = resp.object.unwrap_or_default();
                ev.version = Ver::from_proto(info.version.as_ref());
                ev.stat = Some(Seen::from_info(&info));
                self.sizes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(op.key.clone(), size);
                Outcome::Ok
            }
            Ended::Reply(Err(s)) => Outcome::from_status(&s),
            Ended::TimedOut => Outcome::Timeout,
            Ended::Cancelled => Outcome::Cancelled,
        };
        ev.put = Some(detail);
        self.inflight_set(op.id, None);
    }

    fn inflight_set(&self, op: u64, chunks: Option<Vec<[u8; 20]>>) {
        let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        match chunks {
            Some(c) => map.insert(op, c),
            None => map.remove(&op),
        };
    }
}

enum Ended {
    Reply(Result<dfs::proto::UploadResponse, Status>),
    TimedOut,
    Cancelled,
}

/// Shared between an upload's feeder and its caller: the caller marks the
/// upload abandoned, the feeder only ends the stream if it is not.
#[derive(Default)]
struct FeedState {
    sent: u64,
    sent_all: bool,
    abandoned: bool,
}

/// Sends an upload's messages, pausing or giving up where planned.
struct Feed {
    header: UploadHeader,
    data: DataGen,
    size: u64,
    piece: u64,
    pause: Option<(u64, u64)>,
    cancel_after: Option<u64>,
    state: Arc<Mutex<FeedState>>,
}

impl Feed {
    async fn run(self, tx: mpsc::Sender<UploadRequest>, cancel: oneshot::Sender<()>) {
        let header = UploadRequest {
            msg: Some(upload_request::Msg::Header(self.header.clone())),
        };
        if tx.send(header).await.is_err() {
            return;
        }
        let mut off = 0;
        let mut paused = false;
        while off < self.size {
            if self.cancel_after.is_some_and(|c| off >= c) {
                let _ = cancel.send(());
                return hold_open(tx).await;
            }
            if let Some((at, ms)) = self.pause
                && !paused
                && off >= at
            {
                paused = true;
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let abandoned = self.lock().abandoned;
            if abandoned {
                return hold_open(tx).await;
            }
            let mut end = (off + self.piece).min(self.size);
            for stop in [self.pause.map(|p| p.0), self.cancel_after]
                .into_iter()
                .flatten()
            {
                if off < stop && stop < end {
                    end = stop;
                }
            }
            let bytes = Bytes::from(self.data.bytes(off, (end - off) as usize));
            let msg = UploadRequest {
                msg: Some(upload_request::Msg::Data(bytes)),
            };
            if tx.send(msg).await.is_err() {
                return;
            }
            off = end;
            self.lock().sent = off;
        }
        let ended = {
            let mut s = self.lock();
            s.sent_all = !s.abandoned;
            s.sent_all
        };
        if ended {
            drop(tx); // ends the stream: the node may now commit
        } else {
            hold_open(tx).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FeedState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Keeps an abandoned upload's stream open until the connection is gone, so
/// it can never end normally.
async fn hold_open(tx: mpsc::Sender<UploadRequest>) {
    if tokio::time::timeout(Duration::from_secs(120), tx.closed())
        .await
        .is_err()
    {
        std::mem::forget(tx);
    }
}

async fn list(
    storage: &mut StorageClient<Channel>,
    prefix: &str,
    ev: &mut Event,
) -> Result<(), Status> {
    let mut all = Vec::new();
    let mut token = String::new();
    for _ in 0..1000 {
        let page = storage
            .list(ListRequest {
                prefix: prefix.to_owned(),
                page_size: 100,
                page_token: token,
            })
            .await?
            .into_inner();
        all.extend(page.objects.iter().map(Seen::from_info));
        ev.list = Some(all.clone());
        if page.next_page_token.is_empty() {
            return Ok(());
        }
        token = page.next_page_token;
    }
    Err(Status::internal("list did not end within 1000 pages"))
}

/// A range to read from an object of (last known) `size`: mostly inside,
/// sometimes to the end, one in ten past the end.
pub fn draw_range(size: u64, a: u64, b: u64) -> (u64, u64) {
    if b.is_multiple_of(10) {
        return (size + 1 + a % 1000, 1 + (b >> 8) % 1000);
    }
    let offset = a % (size + 1);
    let rest = size - offset;
    let length = if b.is_multiple_of(5) || rest == 0 {
        0
    } else {
        1 + (b >> 8) % rest
    };
    (offset, length)
}
