//! The node as a service: bearer-token auth, health checking, graceful
//! shutdown, and garbage collection of unreferenced chunks with dedup.

mod common;

use std::time::{Duration, Instant};

use common::*;
use dfs::proto::{DeleteRequest, StatusRequest};
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

const TOKEN: &str = "s3cret-token";

async fn node_with_token() -> TestNode {
    let mut node = TestNode::new(&[]);
    let token_file = node.root().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    node.add_args(&["--auth-token-file", token_file.to_str().unwrap()]);
    node.launch().await;
    node
}

#[tokio::test(flavor = "multi_thread")]
async fn storage_and_cluster_calls_need_the_right_token() {
    let node = node_with_token().await;
    for token in [
        None,
        Some("wrong"),
        Some("s3cret-toke"),
        Some("s3cret-token-"),
    ] {
        let mut client = node.client(token).await;
        assert_code(
            client.stat("k").await,
            Code::Unauthenticated,
            &format!("stat with token {token:?}"),
        );
        assert_code(
            client
                .upload(
                    dfs::proto::UploadHeader {
                        key: "k".into(),
                        ..Default::default()
                    },
                    &b"data"[..],
                    |_| {},
                )
                .await,
            Code::Unauthenticated,
            &format!("upload with token {token:?}"),
        );
        assert_code(
            client.list_all("").await,
            Code::Unauthenticated,
            &format!("list with token {token:?}"),
        );
        assert_code(
            client.status().await,
            Code::Unauthenticated,
            &format!("cluster status with token {token:?}"),
        );
    }
    // The raw client sends no token at all.
    let mut raw = node.storage().await;
    assert_code(
        stat_key(&mut raw, "k").await,
        Code::Unauthenticated,
        "raw stat",
    );

    let mut client = node.client(Some(TOKEN)).await;
    let data = pseudo_random(200, CHUNK + 3);
    let info = client
        .upload(
            dfs::proto::UploadHeader {
                key: "k".into(),
                ..Default::default()
            },
            std::io::Cursor::new(data.clone()),
            |_| {},
        )
        .await
        .expect("upload with the right token");
    assert_eq!(info.sha1, sha1_hex(&data));
    let (_, sha, n, out) = client
        .download(dfs::client::Client::key_request("k"), Vec::new(), |_| {})
        .await
        .unwrap();
    assert_eq!(out, data);
    assert_eq!(n, data.len() as u64);
    assert_eq!(hex::encode(sha), info.sha1);
    assert_eq!(client.status().await.unwrap().object_count, 1);

    // Health needs no token.
    assert!(node.is_serving().await, "health check without a token");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_is_serving_while_up() {
    let node = TestNode::start(&[]).await;
    let mut health = node.health().await;
    for service in ["", "dfs.v1.Storage", "dfs.v1.Cluster"] {
        let resp = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|s| panic!("health of {service:?}: {s:?}"))
            .into_inner();
        assert_eq!(
            resp.status,
            ServingStatus::Serving as i32,
            "health of {service:?}"
        );
    }
    assert_code(
        health
            .check(HealthCheckRequest {
                service: "no.such.Service".into(),
            })
            .await,
        Code::NotFound,
        "health of an unknown service",
    );
    let status = node
        .cluster()
        .await
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.grpc_address, node.addr());
    assert_eq!(status.members.len(), 1);
    assert!(!status.node_id.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_exits_cleanly_and_quickly() {
    let mut node = TestNode::start(&[]).await;
    // An idle client connection must not hold the shutdown up.
    let mut storage = node.storage().await;
    upload(&mut storage, "x", b"x", 1).await.unwrap();
    let mut health = node.health().await;
    let started = Instant::now();
    let status = node.sigterm_within(Duration::from_secs(5)).await;
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        started.elapsed()
    );
    assert!(
        health
            .check(HealthCheckRequest {
                service: String::new()
            })
            .await
            .is_err(),
        "nothing answers after shutdown"
    );
    drop(storage);
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_removes_chunks_of_deleted_objects_and_keeps_shared_ones() {
    let node = TestNode::start(&["--gc-grace", "1s", "--gc-interval", "500ms"]).await;
    let mut storage = node.storage().await;

    let shared = pseudo_random(300, 4 * CHUNK + 1);
    upload(&mut storage, "a", &shared, CHUNK).await.unwrap();
    let after_a = status_chunk_count(&node).await;
    assert_eq!(after_a, 5);
    // Identical content under another key: dedup, no new chunks.
    upload(&mut storage, "b", &shared, CHUNK).await.unwrap();
    assert_eq!(status_chunk_count(&node).await, after_a, "dedup");
    assert_eq!(node.chunk_files().len(), 5);

    let shared_files = node.chunk_files();
    let unique = pseudo_random(301, 3 * CHUNK);
    upload(&mut storage, "c", &unique, CHUNK).await.unwrap();
    assert_eq!(status_chunk_count(&node).await, 8);
    let unique_files: Vec<_> = node
        .chunk_files()
        .into_iter()
        .filter(|f| !shared_files.contains(f))
        .collect();
    assert_eq!(unique_files.len(), 3);

    storage
        .delete(DeleteRequest { key: "c".into() })
        .await
        .unwrap();
    storage
        .delete(DeleteRequest { key: "a".into() })
        .await
        .unwrap();
    let collected = wait_until(Duration::from_secs(8), || {
        unique_files.iter().all(|f| !f.exists())
    })
    .await;
    assert!(collected, "chunks of the deleted object are still on disk");
    // Two more collector passes: the shared chunks must survive them.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(node.chunk_files(), shared_files, "shared chunks kept");
    assert_eq!(status_chunk_count(&node).await, 5);
    let (_, got) = download(&mut storage, key_request("b", 0, 0))
        .await
        .unwrap();
    assert!(got == shared, "the surviving object still downloads");

    // Once the last reference goes, the shared chunks go too.
    storage
        .delete(DeleteRequest { key: "b".into() })
        .await
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(8), || node.chunk_files().is_empty()).await,
        "chunks left: {:?}",
        node.chunk_files()
    );
    assert_eq!(status_chunk_count(&node).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_does_not_touch_chunks_of_an_upload_in_progress() {
    // With a grace shorter than the upload, only pinning protects the chunks
    // the upload has written but not yet committed.
    let node = TestNode::start(&["--gc-grace", "1s", "--gc-interval", "500ms"]).await;
    let data = pseudo_random(310, 12 * CHUNK);
    let addr = node.addr().to_owned();
    let payload = data.clone();
    let call = tokio::spawn(async move {
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut storage = dfs::proto::storage_client::StorageClient::new(channel);
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            tx.send(header_msg("slow")).await.unwrap();
            for part in payload.chunks(CHUNK / 2) {
                tokio::time::sleep(Duration::from_millis(130)).await;
                tx.send(data_msg(part)).await.unwrap();
            }
        });
        storage
            .upload(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    let resp = call.await.unwrap().expect("slow upload");
    assert_eq!(resp.into_inner().object.unwrap().size, data.len() as u64);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut storage = node.storage().await;
    let (_, got) = download(&mut storage, key_request("slow", 0, 0))
        .await
        .unwrap();
    assert!(
        got == data,
        "an object uploaded slower than the gc grace is whole"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_identical_uploads_store_each_chunk_once() {
    let node = TestNode::start(&[]).await;
    let data = std::sync::Arc::new(pseudo_random(320, 24 * CHUNK));
    let mut calls = Vec::new();
    for i in 0..4 {
        let channel = node.channel().await;
        let data = data.clone();
        calls.push(tokio::spawn(async move {
            let mut storage = dfs::proto::storage_client::StorageClient::new(channel);
            upload(&mut storage, &format!("same/{i}"), &data, CHUNK).await
        }));
    }
    for call in calls {
        let info = call.await.unwrap().expect("concurrent upload");
        assert_eq!(info.sha1, sha1_hex(&data));
    }
    assert_eq!(node.chunk_files().len(), 24);
    let status = node
        .cluster()
        .await
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.chunk_count, 24, "chunk count after concurrent dedup");
    let on_disk: u64 = node
        .chunk_files()
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    assert_eq!(
        status.bytes_stored, on_disk,
        "bytes_stored after concurrent dedup"
    );
    let mut storage = node.storage().await;
    for i in 0..4 {
        let (_, got) = download(&mut storage, key_request(&format!("same/{i}"), 0, 0))
            .await
            .unwrap();
        assert!(got == *data);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_lists_the_services_without_a_token() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let node = node_with_token().await;
    let mut reflection = ServerReflectionClient::new(node.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection needs no token")
        .into_inner();
    let response = responses.message().await.unwrap().expect("a response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response: {response:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for wanted in ["dfs.v1.Storage", "dfs.v1.Cluster", "grpc.health.v1.Health"] {
        assert!(names.contains(&wanted), "{wanted} missing from {names:?}");
    }
}
