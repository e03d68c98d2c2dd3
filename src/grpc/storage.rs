//! `dfs.v1.Storage`: translates between protobuf and the node's pipelines.

use std::{pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::{limits::IdleLimited, node_status, status_error};
use crate::{
    node::{Node, NodeError, Target, UploadMeta, object_info},
    proto::{
        DeleteRequest, DeleteResponse, DownloadRequest, DownloadResponse, ListRequest,
        ListResponse, ObjectInfo, StatRequest, UploadRequest, UploadResponse, download_request,
        download_response, stat_request, storage_server::Storage, upload_request,
    },
};

/// Page size when the client asks for 0.
const DEFAULT_PAGE: usize = 100;
/// Largest page, so one List call is bounded in memory and time.
const MAX_PAGE: usize = 1000;

/// The Storage service over one node.
pub struct StorageService {
    node: Arc<Node>,
    /// An upload whose client sends nothing this long is cancelled.
    idle: Duration,
}

impl StorageService {
    pub fn new(node: Arc<Node>, idle: Duration) -> Self {
        Self { node, idle }
    }
}

type DownloadStream = Pin<Box<dyn Stream<Item = Result<DownloadResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Storage for StorageService {
    async fn upload(
        &self,
        request: Request<Streaming<UploadRequest>>,
    ) -> Result<Response<UploadResponse>, Status> {
        let mut stream = request.into_inner();
        let first = tokio::time::timeout(self.idle, stream.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "no upload header within {:?} (--idle-timeout)",
                    self.idle
                ))
            })?
            .map_err(|s| node_status(status_error(s)))?;
        let header = match first {
            Some(UploadRequest {
                msg: Some(upload_request::Msg::Header(h)),
            }) => h,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the first upload message must be a header",
                ));
            }
            None => return Err(Status::invalid_argument("upload has no header")),
        };
        let meta = UploadMeta {
            key: header.key,
            content_type: header.content_type,
            expected_sha1: header.expected_sha1,
            metadata: header.metadata,
        };
        let key = meta.key.clone();
        let data = stream.map(|item| match item {
            Ok(UploadRequest {
                msg: Some(upload_request::Msg::Data(bytes)),
            }) => Ok(bytes),
            Ok(UploadRequest {
                msg: Some(upload_request::Msg::Header(_)),
            }) => Err(NodeError::InvalidArgument(
                "an upload has exactly one header, as its first message".into(),
            )),
            Ok(UploadRequest { msg: None }) => Err(NodeError::InvalidArgument(
                "upload message has neither header nor data".into(),
            )),
            Err(status) => Err(status_error(status)),
        });
        let data = IdleLimited::new(Box::pin(data), self.idle);
        let record = self.node.upload(meta, data).await.map_err(|e| {
            tracing::warn!(key = %key, error = %e, "upload failed");
            node_status(e)
        })?;
        tracing::info!(key = %record.key, size = record.size, chunks = record.chunk_count(),
            sha1 = %hex::encode(&record.sha1), "stored object");
        Ok(Response::new(UploadResponse {
            object: Some(object_info(&record)),
        }))
    }

    type DownloadStream = DownloadStream;

    async fn download(
        &self,
        request: Request<DownloadRequest>,
    ) -> Result<Response<DownloadStream>, Status> {
        let req = request.into_inner();
        let target = download_target(req.target)?;
        let download = self
            .node
            .download(&target, req.offset, req.length)
            .await
            .map_err(node_status)?;
        let info = DownloadResponse {
            msg: Some(download_response::Msg::Info(object_info(&download.record))),
        };
        let key = download.record.key.clone();
        let data = SplitMessages::new(download.data).map(move |item| match item {
            Ok(bytes) => Ok(data_message(bytes)),
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "download failed");
                Err(node_status(e))
            }
        });
        let stream = tokio_stream::once(Ok(info)).chain(data);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn stat(&self, request: Request<StatRequest>) -> Result<Response<ObjectInfo>, Status> {
        let target = match request.into_inner().target {
            Some(stat_request::Target::Key(k)) => Target::Key(k),
            Some(stat_request::Target::Sha1(s)) => Target::Sha1(s),
            None => return Err(Status::invalid_argument("give a key or a sha1 to stat")),
        };
        let record = self.node.resolve(&target).await.map_err(node_status)?;
        Ok(Response::new(object_info(&record)))
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let req = request.into_inner();
        let limit = match req.page_size as usize {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let after = match req.page_token.as_str() {
            "" => None,
            token => Some(
                hex::decode(token)
                    .ok()
                    .and_then(|raw| String::from_utf8(raw).ok())
                    .ok_or_else(|| {
                        Status::invalid_argument("page_token is not one this node issued")
                    })?,
            ),
        };
        let node = self.node.clone();
        // A redb read may wait for the disk: keep it off the async threads.
        let page = tokio::task::spawn_blocking(move || {
            node.index().list(&req.prefix, after.as_deref(), limit)
        })
        .await
        .map_err(|e| Status::internal(format!("list stopped: {e}")))?
        .map_err(|e| node_status(e.into()))?;
        let next_page_token = match (page.more, page.records.last()) {
            (true, Some(last)) => hex::encode(last.key.as_bytes()),
            _ => String::new(),
        };
        Ok(Response::new(ListResponse {
            objects: page.records.iter().map(object_info).collect(),
            next_page_token,
        }))
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let key = request.into_inner().key;
        let version = self.node.delete(&key).await.map_err(node_status)?;
        tracing::info!(key = %key, "deleted object");
        Ok(Response::new(DeleteResponse {
            version: Some(version),
        }))
    }
}

/// What a download is of.
pub(super) fn download_target(target: Option<download_request::Target>) -> Result<Target, Status> {
    match target {
        Some(download_request::Target::Key(k)) => Ok(Target::Key(k)),
        Some(download_request::Target::Sha1(s)) => Ok(Target::Sha1(s)),
        None => Err(Status::invalid_argument("give a key or a sha1 to download")),
    }
}

/// Largest data message sent to a client, as the node's own download path
/// (`super::download`) sends them.
const SENT_MESSAGE_BYTES: usize = super::download::MESSAGE_BYTES;

/// Cuts the node's data into messages of at most [`SENT_MESSAGE_BYTES`]
/// (slices of the same buffers: no copy). The node serves downloads
/// through `super::download`, which also skips tonic's encoding copy; this
/// path answers when the generated service is used on its own.
struct SplitMessages<S> {
    inner: S,
    rest: Bytes,
}

impl<S> SplitMessages<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            rest: Bytes::new(),
        }
    }
}

impl<S> Stream for SplitMessages<S>
where
    S: Stream<Item = Result<Bytes, NodeError>> + Unpin,
{
    type Item = Result<Bytes, NodeError>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if self.rest.is_empty() {
            match std::task::ready!(Pin::new(&mut self.inner).poll_next(cx)) {
                Some(Ok(bytes)) => self.rest = bytes,
                other => return std::task::Poll::Ready(other),
            }
        }
        let n = self.rest.len().min(SENT_MESSAGE_BYTES);
        std::task::Poll::Ready(Some(Ok(self.rest.split_to(n))))
    }
}

fn data_message(bytes: Bytes) -> DownloadResponse {
    DownloadResponse {
        msg: Some(download_response::Msg::Data(bytes)),
    }
}
