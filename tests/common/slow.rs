//! Uploads that the test paces: still running while the test interferes.

use std::time::Duration;

use dfs::proto::{ObjectInfo, UploadHeader, UploadRequest, storage_client::StorageClient};
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, transport::Channel};

use super::{TestNode, data_msg, header_msg_with};

/// One Upload call whose data messages the test sends when it chooses, on
/// its own connection. Dropping it without [`SlowUpload::finish`] leaves the
/// call open until the test ends or the node goes away.
pub struct SlowUpload {
    tx: Option<mpsc::Sender<UploadRequest>>,
    call: JoinHandle<Result<ObjectInfo, Status>>,
}

impl SlowUpload {
    /// Opens an Upload call to `node` and sends the header for `key`.
    pub async fn start(node: &TestNode, key: &str) -> Self {
        Self::start_with(
            node,
            UploadHeader {
                key: key.to_owned(),
                ..Default::default()
            },
        )
        .await
    }

    /// Like [`SlowUpload::start`] with a whole header.
    pub async fn start_with(node: &TestNode, header: UploadHeader) -> Self {
        let channel = node.channel().await;
        let (tx, rx) = mpsc::channel::<UploadRequest>(1);
        tx.send(header_msg_with(header))
            .await
            .expect("queue the header");
        let call = tokio::spawn(async move {
            let mut storage = StorageClient::new(channel);
            let resp = storage.upload(ReceiverStream::new(rx)).await?;
            resp.into_inner()
                .object
                .ok_or_else(|| Status::internal("no object info in the response"))
        });
        Self { tx: Some(tx), call }
    }

    /// Sends `data` as one data message; false once the call has ended
    /// (the node failed it or went away).
    pub async fn send(&self, data: &[u8]) -> bool {
        match &self.tx {
            Some(tx) => tx.send(data_msg(data)).await.is_ok(),
            None => false,
        }
    }

    /// Sends `data` in messages of `msg` bytes with `pause` before each.
    pub async fn send_paced(&self, data: &[u8], msg: usize, pause: Duration) -> bool {
        for part in data.chunks(msg.max(1)) {
            tokio::time::sleep(pause).await;
            if !self.send(part).await {
                return false;
            }
        }
        true
    }

    /// Whether the call has ended (with a response or an error).
    pub fn is_finished(&self) -> bool {
        self.call.is_finished()
    }

    /// Ends the request stream and waits for the node's answer.
    pub async fn finish(mut self) -> Result<ObjectInfo, Status> {
        drop(self.tx.take());
        (&mut self.call)
            .await
            .unwrap_or_else(|e| Err(Status::internal(format!("upload task: {e}"))))
    }

    /// Waits for the call's end without ending the request stream (for a
    /// call the node or a kill is expected to end).
    pub async fn outcome(mut self, timeout: Duration) -> Result<ObjectInfo, Status> {
        tokio::time::timeout(timeout, &mut self.call)
            .await
            .expect("the upload call ended")
            .unwrap_or_else(|e| Err(Status::internal(format!("upload task: {e}"))))
    }

    /// Cancels the call (the client goes away: RST_STREAM).
    pub async fn cancel(self) {
        self.call.abort();
        let _ = self.call.await;
    }
}

/// Uploads `data` under `key` in `msg`-byte messages with `pause` before
/// each, in the background, so that it is still running while the test
/// interferes. Returns the task; it ends with the call's outcome.
pub fn paced_upload(
    node: &TestNode,
    key: &str,
    data: Vec<u8>,
    msg: usize,
    pause: Duration,
) -> JoinHandle<Result<ObjectInfo, Status>> {
    let addr = node.addr().to_owned();
    let key = key.to_owned();
    tokio::spawn(async move {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("valid uri")
            .connect()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let (tx, rx) = mpsc::channel::<UploadRequest>(1);
        let header = UploadHeader {
            key,
            ..Default::default()
        };
        tokio::spawn(async move {
            if tx.send(header_msg_with(header)).await.is_err() {
                return;
            }
            for part in data.chunks(msg.max(1)) {
                tokio::time::sleep(pause).await;
                if tx.send(data_msg(part)).await.is_err() {
                    return;
                }
            }
        });
        let mut storage = StorageClient::new(channel);
        let resp = storage.upload(ReceiverStream::new(rx)).await?;
        Ok(resp.into_inner().object.unwrap_or_default())
    })
}
