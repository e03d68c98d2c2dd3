//! Bad requests get exact status codes, store nothing, and leave the node
//! healthy.

mod common;

use bytes::Bytes;
use common::*;
use dfs::proto::{
    DeleteRequest, DownloadRequest, ObjectInfo, StatRequest, UploadHeader, UploadResponse,
    stat_request,
};
use tonic::{Code, Status, codegen::http::uri::PathAndQuery, transport::Channel};

#[tokio::test(flavor = "multi_thread")]
async fn keys_are_checked_for_length_emptiness_and_nul() {
    let node = TestNode::start(&[]).await;
    let mut storage = node.storage().await;
    let longest = "k".repeat(1024);
    let too_long = "k".repeat(1025);
    let info = upload(&mut storage, &longest, b"x", 10).await.unwrap();
    assert_eq!(info.key, longest, "a 1024-byte key is fine");
    // Multi-byte UTF-8 counts in bytes: 342 * 3 = 1026 bytes.
    let too_long_utf8 = "€".repeat(342);
    for (key, what) in [
        ("", "empty key"),
        (too_long.as_str(), "1025-byte key"),
        (too_long_utf8.as_str(), "1026-byte multi-byte key"),
        ("a\0b", "key with NUL"),
    ] {
        assert_code(
            upload(&mut storage, key, b"data", 10).await,
            Code::InvalidArgument,
            &format!("upload, {what}"),
        );
        assert_code(
            stat_key(&mut storage, key).await,
            Code::InvalidArgument,
            &format!("stat, {what}"),
        );
        assert_code(
            download(&mut storage, key_request(key, 0, 0)).await,
            Code::InvalidArgument,
            &format!("download, {what}"),
        );
        assert_code(
            storage
                .delete(DeleteRequest {
                    key: key.to_owned(),
                })
                .await,
            Code::InvalidArgument,
            &format!("delete, {what}"),
        );
    }
    let listed = storage
        .list(dfs::proto::ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.objects.len(), 1, "only the 1024-byte key was stored");
    node.assert_healthy().await;
}

/// Wire-compatible stand-ins for the API messages whose string fields are
/// `bytes` here, so a test can send a key that is not UTF-8.
mod raw {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyOnly {
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct UploadRequest {
        #[prost(message, optional, tag = "1")]
        pub header: Option<KeyOnly>,
    }
}

async fn raw_unary<Resp: prost::Message + Default + Send + 'static>(
    channel: Channel,
    path: &'static str,
    msg: raw::KeyOnly,
) -> Result<Resp, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("channel ready");
    let codec = tonic_prost::ProstCodec::<raw::KeyOnly, Resp>::default();
    grpc.unary(
        tonic::Request::new(msg),
        PathAndQuery::from_static(path),
        codec,
    )
    .await
    .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_that_are_not_utf8_are_invalid_arguments() {
    let node = TestNode::start(&[]).await;
    let bad = raw::KeyOnly {
        key: vec![b'a', 0xff, 0xfe, b'z'],
    };
    assert_code(
        raw_unary::<ObjectInfo>(node.channel().await, "/dfs.v1.Storage/Stat", bad.clone()).await,
        Code::InvalidArgument,
        "stat with a non-UTF-8 key",
    );
    assert_code(
        raw_unary::<dfs::proto::DeleteResponse>(
            node.channel().await,
            "/dfs.v1.Storage/Delete",
            bad.clone(),
        )
        .await,
        Code::InvalidArgument,
        "delete with a non-UTF-8 key",
    );
    // Upload: a header whose key field is not UTF-8.
    let mut grpc = tonic::client::Grpc::new(node.channel().await);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<raw::UploadRequest, UploadResponse>::default();
    let msgs = vec![raw::UploadRequest { header: Some(bad) }];
    let result = grpc
        .client_streaming(
            tonic::Request::new(tokio_stream::iter(msgs)),
            PathAndQuery::from_static("/dfs.v1.Storage/Upload"),
            codec,
        )
        .await;
    assert_code(result, Code::InvalidArgument, "upload with a non-UTF-8 key");
    node.assert_healthy().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_upload_streams_are_invalid_arguments() {
    let node = TestNode::start(&[]).await;
    let mut storage = node.storage().await;
    assert_code(
        upload_raw(&mut storage, vec![data_msg(b"data first"), header_msg("k")]).await,
        Code::InvalidArgument,
        "data before the header",
    );
    assert_code(
        upload_raw(
            &mut storage,
            vec![header_msg("k"), data_msg(b"abc"), header_msg("k2")],
        )
        .await,
        Code::InvalidArgument,
        "two headers",
    );
    assert_code(
        upload_raw(&mut storage, vec![header_msg("k"), header_msg("k")]).await,
        Code::InvalidArgument,
        "two headers back to back",
    );
    assert_code(
        upload_raw(&mut storage, vec![]).await,
        Code::InvalidArgument,
        "no messages at all",
    );
    assert_code(
        upload_raw(
            &mut storage,
            vec![header_msg("k"), dfs::proto::UploadRequest { msg: None }],
        )
        .await,
        Code::InvalidArgument,
        "a message with neither header nor data",
    );
    for key in ["k", "k2"] {
        assert_code(
            stat_key(&mut storage, key).await,
            Code::NotFound,
            "nothing stored",
        );
    }
    node.assert_healthy().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn expected_sha1_is_enforced() {
    let node = TestNode::start(&[]).await;
    let mut storage = node.storage().await;
    let data = pseudo_random(8, 3 * CHUNK + 1);
    let header = |key: &str, sha: &str| UploadHeader {
        key: key.to_owned(),
        expected_sha1: sha.to_owned(),
        ..Default::default()
    };

    let wrong = sha1_hex(b"something else");
    assert_code(
        upload_raw(
            &mut storage,
            upload_messages(header("m", &wrong), &data, CHUNK),
        )
        .await,
        Code::DataLoss,
        "expected_sha1 mismatch",
    );
    assert_code(
        stat_key(&mut storage, "m").await,
        Code::NotFound,
        "nothing committed",
    );
    assert_code(
        download(&mut storage, sha1_request(&sha1_hex(&data))).await,
        Code::NotFound,
        "nothing committed under the real sha1 either",
    );

    for bad in ["xyz", "abcd", &"g".repeat(40), &"a".repeat(41)] {
        assert_code(
            upload_raw(
                &mut storage,
                upload_messages(header("m", bad), &data, CHUNK),
            )
            .await,
            Code::InvalidArgument,
            &format!("malformed expected_sha1 {bad:?}"),
        );
    }
    assert_code(
        stat_key(&mut storage, "m").await,
        Code::NotFound,
        "nothing committed",
    );

    let right = sha1_hex(&data);
    let info = upload_raw(
        &mut storage,
        upload_messages(header("m", &right), &data, CHUNK),
    )
    .await
    .expect("a matching expected_sha1 stores the object");
    assert_eq!(info.sha1, right);

    // A failed overwrite keeps the previous version.
    let other = pseudo_random(9, 100);
    assert_code(
        upload_raw(
            &mut storage,
            upload_messages(header("m", &wrong), &other, 7),
        )
        .await,
        Code::DataLoss,
        "mismatching overwrite",
    );
    let (_, got) = download(&mut storage, key_request("m", 0, 0))
        .await
        .unwrap();
    assert!(
        got == data,
        "the previous version survives a failed overwrite"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_without_a_target_or_with_a_bad_sha1_are_invalid_arguments() {
    let node = TestNode::start(&[]).await;
    let mut storage = node.storage().await;
    assert_code(
        download(
            &mut storage,
            DownloadRequest {
                target: None,
                offset: 0,
                length: 0,
            },
        )
        .await,
        Code::InvalidArgument,
        "download with no target",
    );
    assert_code(
        storage.stat(StatRequest { target: None }).await,
        Code::InvalidArgument,
        "stat with no target",
    );
    for bad in ["", "zz", "0123"] {
        assert_code(
            download(&mut storage, sha1_request(bad)).await,
            Code::InvalidArgument,
            &format!("download by malformed sha1 {bad:?}"),
        );
        assert_code(
            storage
                .stat(StatRequest {
                    target: Some(stat_request::Target::Sha1(bad.into())),
                })
                .await,
            Code::InvalidArgument,
            &format!("stat by malformed sha1 {bad:?}"),
        );
    }
    node.assert_healthy().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn disk_full_is_resource_exhausted_and_stores_nothing() {
    let node = TestNode::start(&["--capacity", "1MiB"]).await;
    let mut storage = node.storage().await;
    let early = pseudo_random(30, 5 * CHUNK);
    upload(&mut storage, "early", &early, CHUNK).await.unwrap();
    let big = pseudo_random(31, 20 * CHUNK);
    assert_code(
        upload(&mut storage, "big", &big, CHUNK).await,
        Code::ResourceExhausted,
        "upload beyond capacity",
    );
    assert_code(
        stat_key(&mut storage, "big").await,
        Code::NotFound,
        "no partial object",
    );
    assert_code(
        download(&mut storage, sha1_request(&sha1_hex(&big))).await,
        Code::NotFound,
        "no partial object by sha1",
    );
    let (_, got) = download(&mut storage, key_request("early", 0, 0))
        .await
        .unwrap();
    assert!(got == early, "earlier objects are intact");
    assert!(
        wait_until(std::time::Duration::from_secs(5), || node
            .tmp_files()
            .is_empty())
        .await,
        "tmp/ holds leftovers: {:?}",
        node.tmp_files()
    );
    let status = node
        .cluster()
        .await
        .status(dfs::proto::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(status.bytes_stored <= 1 << 20, "capacity was respected");
    assert_eq!(status.object_count, 1);
    assert!(node.is_serving().await);
    // Small objects that still fit are accepted.
    upload(&mut storage, "tiny", b"t", 1).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_messages_are_rejected_and_the_node_keeps_serving() {
    let node = TestNode::start(&[]).await;
    let mut storage = node.storage().await;
    let huge = vec![7u8; (4 << 20) + 1];
    let result = upload_raw(
        &mut storage,
        vec![
            header_msg("huge"),
            dfs::proto::UploadRequest {
                msg: Some(dfs::proto::upload_request::Msg::Data(Bytes::from(huge))),
            },
        ],
    )
    .await;
    assert_code(result, Code::ResourceExhausted, "a data message over 4 MiB");
    assert_code(
        stat_key(&mut storage, "huge").await,
        Code::NotFound,
        "nothing stored",
    );

    // A header carrying more than 4 MiB of metadata.
    let mut header = UploadHeader {
        key: "huge-header".into(),
        ..Default::default()
    };
    header
        .metadata
        .insert("blob".into(), "m".repeat((4 << 20) + 1));
    assert_code(
        upload_raw(&mut storage, vec![header_msg_with(header)]).await,
        Code::ResourceExhausted,
        "a header over 4 MiB",
    );
    // The same connection and a new one still work.
    upload(&mut storage, "after", b"still here", 3)
        .await
        .unwrap();
    node.assert_healthy().await;
}
