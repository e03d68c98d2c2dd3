//! The gRPC calls tests make, in their raw form: exact upload messages,
//! downloads that keep what arrived before a failure, status checks.

use bytes::Bytes;
use dfs::proto::{
    DownloadRequest, ObjectInfo, StatRequest, UploadHeader, UploadRequest, download_request,
    download_response, stat_request, storage_client::StorageClient, upload_request,
};
use tonic::{Code, Status, transport::Channel};

/// A header message.
pub fn header_msg(key: &str) -> UploadRequest {
    header_msg_with(UploadHeader {
        key: key.to_owned(),
        ..Default::default()
    })
}

/// A header message from a full header.
pub fn header_msg_with(header: UploadHeader) -> UploadRequest {
    UploadRequest {
        msg: Some(upload_request::Msg::Header(header)),
    }
}

/// A data message.
pub fn data_msg(bytes: &[u8]) -> UploadRequest {
    UploadRequest {
        msg: Some(upload_request::Msg::Data(Bytes::copy_from_slice(bytes))),
    }
}

/// A header then `data` cut into messages of `msg_size` bytes.
pub fn upload_messages(header: UploadHeader, data: &[u8], msg_size: usize) -> Vec<UploadRequest> {
    let mut msgs = vec![header_msg_with(header)];
    msgs.extend(data.chunks(msg_size.max(1)).map(data_msg));
    msgs
}

/// Sends exactly `msgs` as one Upload call.
pub async fn upload_raw(
    storage: &mut StorageClient<Channel>,
    msgs: Vec<UploadRequest>,
) -> Result<ObjectInfo, Status> {
    let resp = storage.upload(tokio_stream::iter(msgs)).await?;
    resp.into_inner()
        .object
        .ok_or_else(|| Status::internal("no object info in the response"))
}

/// Uploads `data` under `key` in messages of `msg_size` bytes.
pub async fn upload(
    storage: &mut StorageClient<Channel>,
    key: &str,
    data: &[u8],
    msg_size: usize,
) -> Result<ObjectInfo, Status> {
    let header = UploadHeader {
        key: key.to_owned(),
        ..Default::default()
    };
    upload_raw(storage, upload_messages(header, data, msg_size)).await
}

/// A download request by key with a range.
pub fn key_request(key: &str, offset: u64, length: u64) -> DownloadRequest {
    DownloadRequest {
        target: Some(download_request::Target::Key(key.to_owned())),
        offset,
        length,
    }
}

/// A download request by whole-file SHA-1.
pub fn sha1_request(sha1: &str) -> DownloadRequest {
    DownloadRequest {
        target: Some(download_request::Target::Sha1(sha1.to_owned())),
        offset: 0,
        length: 0,
    }
}

/// What a download delivered before it ended, and how it ended.
pub struct Delivered {
    pub info: Option<ObjectInfo>,
    pub bytes: Vec<u8>,
    pub end: Result<(), Status>,
}

/// Downloads, keeping whatever arrived even if the stream fails midway.
/// Checks that the first message (and only it) is the object info.
pub async fn download_partial(
    storage: &mut StorageClient<Channel>,
    req: DownloadRequest,
) -> Delivered {
    let mut out = Delivered {
        info: None,
        bytes: Vec::new(),
        end: Ok(()),
    };
    let mut stream = match storage.download(req).await {
        Ok(r) => r.into_inner(),
        Err(s) => {
            out.end = Err(s);
            return out;
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(m)) => match m.msg {
                Some(download_response::Msg::Info(info)) => {
                    assert!(out.info.is_none(), "second info message");
                    out.info = Some(info);
                }
                Some(download_response::Msg::Data(data)) => {
                    assert!(out.info.is_some(), "data before the info message");
                    out.bytes.extend_from_slice(&data);
                }
                None => panic!("empty download message"),
            },
            Ok(None) => return out,
            Err(s) => {
                out.end = Err(s);
                return out;
            }
        }
    }
}

/// Downloads a whole stream; any failure is the error.
pub async fn download(
    storage: &mut StorageClient<Channel>,
    req: DownloadRequest,
) -> Result<(ObjectInfo, Vec<u8>), Status> {
    let d = download_partial(storage, req).await;
    d.end?;
    let info = d.info.ok_or_else(|| Status::internal("no info message"))?;
    Ok((info, d.bytes))
}

/// Stat by key.
pub async fn stat_key(
    storage: &mut StorageClient<Channel>,
    key: &str,
) -> Result<ObjectInfo, Status> {
    storage
        .stat(StatRequest {
            target: Some(stat_request::Target::Key(key.to_owned())),
        })
        .await
        .map(|r| r.into_inner())
}

/// Asserts that `result` failed with `code`.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, what: &str) {
    match result {
        Ok(v) => panic!("{what}: expected {code:?}, got OK: {v:?}"),
        Err(s) => assert_eq!(s.code(), code, "{what}: wrong status: {s:?}"),
    }
}
