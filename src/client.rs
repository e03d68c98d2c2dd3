//! A small Rust client for a dfs node, used by the CLI, the demo and the
//! benchmark. Streams files in both directions with bounded buffers.

use std::path::Path;

use bytes::Bytes;
use sha1::{Digest, Sha1};
use tokio::{
    io::{AsyncRead, AsyncReadExt},
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Request, Status,
    metadata::MetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};

use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::grpc::tls::ClientTlsFiles;
use crate::proto::{
    DeleteRequest, DownloadRequest, ListRequest, ObjectInfo, StatRequest, StatusRequest,
    StatusResponse, UploadHeader, UploadRequest, cluster_client::ClusterClient, download_request,
    download_response, stat_request, storage_client::StorageClient, upload_request,
};

/// Bytes per upload data message: big enough to amortise per-message costs,
/// small enough to stay far below every server's message limit.
pub const UPLOAD_MESSAGE_BYTES: usize = 1 << 20;
/// Received messages a download queues for its hashing and writing thread
/// (a node sends at most 1 MiB per message, so at most 4 MiB).
pub const SINK_QUEUE: usize = 4;

/// A download's sink: the SHA-1 of everything received, and the writes, in
/// order. Returns the digest, the byte count and the writer.
fn hash_and_write<W: std::io::Write>(
    mut rx: mpsc::Receiver<Bytes>,
    mut out: W,
) -> std::io::Result<([u8; 20], u64, W)> {
    let mut sha1 = Sha1::new();
    let mut written = 0u64;
    while let Some(bytes) = rx.blocking_recv() {
        sha1.update(&bytes);
        out.write_all(&bytes)?;
        written += bytes.len() as u64;
    }
    out.flush()?;
    Ok((sha1.finalize().into(), written, out))
}

/// Adds `authorization: Bearer <token>` when a token is set.
#[derive(Clone)]
pub struct TokenAuth(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for TokenAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Authed = InterceptedService<Channel, TokenAuth>;

/// A connection to one node.
#[derive(Clone)]
pub struct Client {
    storage: StorageClient<Authed>,
    cluster: ClusterClient<Authed>,
    health: HealthClient<Channel>,
}

/// How to reach a node: the token to send and, for TLS, the files to use.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    pub token: Option<String>,
    pub tls: ClientTlsFiles,
}

/// The URI for a node's address and whether it speaks TLS: an `https://`
/// address or any TLS option means TLS; `http://` with TLS options is a
/// contradiction worth refusing rather than guessing.
fn endpoint_uri(addr: &str, tls: &ClientTlsFiles) -> anyhow::Result<(String, bool)> {
    if addr.starts_with("https://") {
        return Ok((addr.to_owned(), true));
    }
    if addr.starts_with("http://") {
        anyhow::ensure!(
            !tls.any(),
            "node address {addr} says http:// (plaintext) but TLS options are set"
        );
        return Ok((addr.to_owned(), false));
    }
    if tls.any() {
        Ok((format!("https://{addr}"), true))
    } else {
        Ok((format!("http://{addr}"), false))
    }
}

/// Opens a channel to a node, over TLS when the address or options say so.
pub async fn connect_channel(addr: &str, tls: &ClientTlsFiles) -> anyhow::Result<Channel> {
    crate::grpc::tls::install_crypto_provider();
    let (uri, secure) = endpoint_uri(addr, tls)?;
    let mut endpoint = Endpoint::from_shared(uri)
        .map_err(|e| anyhow::anyhow!("invalid node address {addr:?}: {e}"))?;
    if secure {
        endpoint = endpoint.tls_config(tls.load()?)?;
    }
    endpoint
        .connect_timeout(std::time::Duration::from_secs(5))
        .tcp_nodelay(true)
        .initial_stream_window_size(crate::grpc::STREAM_WINDOW_BYTES)
        .initial_connection_window_size(crate::grpc::CONNECTION_WINDOW_BYTES)
        .max_frame_size(1 << 20)
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to node at {addr}: {}", error_chain(&e)))
}

/// An error and its sources on one line: tonic's transport errors say
/// little at the top ("transport error") and the reason (a certificate
/// the client does not trust, say) several sources down.
fn error_chain(e: &dyn std::error::Error) -> String {
    with_sources(e.to_string(), e.source())
}

/// `text`, then every cause from `source` down that it does not already say.
pub(crate) fn with_sources(
    mut text: String,
    mut source: Option<&(dyn std::error::Error + 'static)>,
) -> String {
    while let Some(cause) = source {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
        source = cause.source();
    }
    text
}

impl Client {
    /// Connects to `addr` (`host:port`) in plaintext, sending `token` on
    /// every call.
    pub async fn connect(addr: &str, token: Option<String>) -> anyhow::Result<Self> {
        let opts = ConnectOptions {
            token,
            ..Default::default()
        };
        Self::connect_with(addr, &opts).await
    }

    /// Connects to `addr` with a token and TLS as `opts` say.
    pub async fn connect_with(addr: &str, opts: &ConnectOptions) -> anyhow::Result<Self> {
        let channel = connect_channel(addr, &opts.tls).await?;
        let value = match &opts.token {
            Some(t) => Some(format!("Bearer {}", t.trim()).parse().map_err(|_| {
                anyhow::anyhow!("token contains characters not allowed in a header")
            })?),
            None => None,
        };
        let auth = TokenAuth(value);
        Ok(Self {
            storage: StorageClient::with_interceptor(channel.clone(), auth.clone())
                .max_decoding_message_size(crate::grpc::MAX_MESSAGE_BYTES),
            cluster: ClusterClient::with_interceptor(channel.clone(), auth),
            health: HealthClient::new(channel),
        })
    }

    /// The node's grpc.health.v1 status for `service` ("" for the whole
    /// node, "liveness" for whether the process runs).
    pub async fn health(&mut self, service: &str) -> Result<ServingStatus, Status> {
        let reply = self
            .health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await?
            .into_inner();
        Ok(ServingStatus::try_from(reply.status).unwrap_or(ServingStatus::Unknown))
    }

    /// Uploads everything `reader` yields under `key`. `progress` is called
    /// with each message's size as it is queued.
    pub async fn upload<R>(
        &mut self,
        header: UploadHeader,
        mut reader: R,
        progress: impl Fn(u64) + Send + 'static,
    ) -> Result<ObjectInfo, Status>
    where
        R: AsyncRead + Unpin + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(4);
        let (err_tx, err_rx) = tokio::sync::oneshot::channel::<std::io::Error>();
        let first = UploadRequest {
            msg: Some(upload_request::Msg::Header(header)),
        };
        tokio::spawn(async move {
            if tx.send(first).await.is_err() {
                return;
            }
            loop {
                let mut buf = vec![0u8; UPLOAD_MESSAGE_BYTES];
                let mut filled = 0;
                while filled < buf.len() {
                    match reader.read(&mut buf[filled..]).await {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) => {
                            // Ending the stream now would commit a truncated
                            // object: report the error and keep the stream
                            // open until the caller cancels the call.
                            let _ = err_tx.send(e);
                            tx.closed().await;
                            return;
                        }
                    }
                }
                if filled == 0 {
                    return;
                }
                buf.truncate(filled);
                progress(filled as u64);
                let msg = UploadRequest {
                    msg: Some(upload_request::Msg::Data(Bytes::from(buf))),
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        });
        let mut storage = self.storage.clone();
        let call = storage.upload(ReceiverStream::new(rx));
        tokio::select! {
            response = call => response?
                .into_inner()
                .object
                .ok_or_else(|| Status::internal("node returned no object info")),
            Ok(e) = err_rx => Err(Status::aborted(format!(
                "reading the input failed, upload cancelled: {e}"
            ))),
        }
    }

    /// Uploads a local file.
    pub async fn upload_file(
        &mut self,
        header: UploadHeader,
        path: &Path,
        progress: impl Fn(u64) + Send + 'static,
    ) -> anyhow::Result<ObjectInfo> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
        Ok(self.upload(header, file, progress).await?)
    }

    /// Streams an object (or a range of it) into `out`. Returns the object's
    /// info, the SHA-1 of the bytes written, their count, and `out`.
    ///
    /// The SHA-1 and the writes run on a blocking thread while this task
    /// receives the next messages (handed over without copying, at most
    /// [`SINK_QUEUE`] of them), so hashing overlaps the transfer instead of
    /// following it: with the node's verified reads faster than SHA-1, the
    /// client's hash is what bounds a download.
    pub async fn download<W>(
        &mut self,
        request: DownloadRequest,
        out: W,
        progress: impl Fn(u64),
    ) -> Result<(ObjectInfo, [u8; 20], u64, W), Status>
    where
        W: std::io::Write + Send + 'static,
    {
        let mut stream = self.storage.download(request).await?.into_inner();
        let info = match stream.message().await? {
            Some(m) => match m.msg {
                Some(download_response::Msg::Info(info)) => info,
                _ => return Err(Status::internal("node sent data before the object info")),
            },
            None => {
                return Err(Status::internal(
                    "node ended the download without object info",
                ));
            }
        };
        let (tx, rx) = mpsc::channel::<Bytes>(SINK_QUEUE);
        let sink = tokio::task::spawn_blocking(move || hash_and_write(rx, out));
        let received = async {
            while let Some(m) = stream.message().await? {
                let Some(download_response::Msg::Data(bytes)) = m.msg else {
                    return Err(Status::internal("node sent a second object info"));
                };
                let n = bytes.len() as u64;
                if tx.send(bytes).await.is_err() {
                    break; // the sink failed; its error is reported below
                }
                progress(n);
            }
            Ok(())
        }
        .await;
        drop(tx);
        let written = sink
            .await
            .map_err(|e| Status::internal(format!("download writer stopped: {e}")))?;
        received?;
        let (sha1, n, out) =
            written.map_err(|e| Status::aborted(format!("writing the output failed: {e}")))?;
        Ok((info, sha1, n, out))
    }

    /// A download request for a whole object by key.
    pub fn key_request(key: &str) -> DownloadRequest {
        DownloadRequest {
            target: Some(download_request::Target::Key(key.to_owned())),
            offset: 0,
            length: 0,
        }
    }

    /// Describes an object by key.
    pub async fn stat(&mut self, key: &str) -> Result<ObjectInfo, Status> {
        let req = StatRequest {
            target: Some(stat_request::Target::Key(key.to_owned())),
        };
        Ok(self.storage.stat(req).await?.into_inner())
    }

    /// Every object under `prefix`, fetched page by page.
    pub async fn list_all(&mut self, prefix: &str) -> Result<Vec<ObjectInfo>, Status> {
        let mut all = Vec::new();
        let mut token = String::new();
        loop {
            let page = self
                .storage
                .list(ListRequest {
                    prefix: prefix.to_owned(),
                    page_size: 1000,
                    page_token: token,
                })
                .await?
                .into_inner();
            all.extend(page.objects);
            if page.next_page_token.is_empty() {
                return Ok(all);
            }
            token = page.next_page_token;
        }
    }

    /// Deletes an object by key.
    pub async fn delete(&mut self, key: &str) -> Result<(), Status> {
        self.storage
            .delete(DeleteRequest {
                key: key.to_owned(),
            })
            .await?;
        Ok(())
    }

    /// Waits until the node sees at least `peers` other members up.
    pub async fn wait_for_peers_up(
        &mut self,
        peers: usize,
        timeout: std::time::Duration,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let status = self.status().await?;
            let up = status.members.iter().filter(|m| m.state == "up").count();
            if up >= peers {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "node {} sees {up} of {peers} peers up after {timeout:?}",
                status.node_id
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// The node's status.
    pub async fn status(&mut self) -> Result<StatusResponse, Status> {
        Ok(self.cluster.status(StatusRequest {}).await?.into_inner())
    }

    /// Removes a dead member from the cluster for good.
    pub async fn forget_member(&mut self, node_id: &str) -> Result<(), Status> {
        self.cluster
            .forget_member(crate::proto::ForgetMemberRequest {
                node_id: node_id.to_owned(),
            })
            .await?;
        Ok(())
    }
}

impl Client {
    /// Downloads and discards an object, counting bytes: for benchmarks,
    /// where hashing on the client would measure the client, not the node.
    pub async fn download_discard(
        &mut self,
        request: DownloadRequest,
    ) -> Result<(ObjectInfo, u64), Status> {
        let mut stream = self.storage.download(request).await?.into_inner();
        let mut info = None;
        let mut bytes = 0u64;
        while let Some(m) = stream.message().await? {
            match m.msg {
                Some(download_response::Msg::Info(i)) => info = Some(i),
                Some(download_response::Msg::Data(d)) => bytes += d.len() as u64,
                None => {}
            }
        }
        let info = info.ok_or_else(|| Status::internal("node sent no object info"))?;
        Ok((info, bytes))
    }
}
