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
    node.use_token(TOKEN);
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
    let mtime = |f: &std::path::PathBuf| std::fs::metadata(f).unwrap().modified().unwrap();
    let shared_refreshed = shared_files.iter().map(mtime).max().unwrap();
    let unique_written = unique_files.iter().map(mtime).min().unwrap();

    // "a" goes first: any pass that later deletes a chunk of "c" ran
    // after the shared chunks lost every reference but "b"'s.
    storage
        .delete(DeleteRequest { key: "a".into() })
        .await
        .unwrap();
    storage
        .delete(DeleteRequest { key: "c".into() })
        .await
        .unwrap();
    let collected = wait_until(Duration::from_secs(8), || {
        unique_files.iter().all(|f| !f.exists())
    })
    .await;
    assert!(collected, "chunks of the deleted object are still on disk");
    // Proof the shared chunks had their chance to go: they are no younger
    // than "c"'s chunks (written, or refreshed by "b"'s dedup, before them),
    // so the pass that found "c"'s chunks past the grace found them past it
    // too, unreferenced but for "b".
    assert!(
        shared_refreshed <= unique_written,
        "shared chunks refreshed at {shared_refreshed:?}, c written at {unique_written:?}"
    );
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
    // With a grace shorter than the upload, only the upload's lease
    // protects the chunks it has written but not yet committed.
    let node = TestNode::start(&["--gc-grace", "3s", "--gc-interval", "300ms"]).await;
    let data = pseudo_random(310, 12 * CHUNK);
    let (first, rest) = data.split_at(6 * CHUNK);
    // A decoy: garbage made before the slow upload begins. A lease spares
    // what was written since its upload began (less 2 s of slack), so the
    // decoy is written 2.5 s before; it is still inside its grace then, so
    // its collection proves a pass ran while the upload was in progress.
    let decoy = pseudo_random(311, CHUNK);
    let mut storage = node.storage().await;
    upload(&mut storage, "decoy", &decoy, CHUNK).await.unwrap();
    storage
        .delete(DeleteRequest {
            key: "decoy".into(),
        })
        .await
        .unwrap();
    let decoy_files = node.chunk_files();
    assert_eq!(decoy_files.len(), 1, "{decoy_files:?}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let slow = SlowUpload::start(&node, "slow").await;
    for piece in first.chunks(CHUNK / 2) {
        assert!(slow.send(piece).await, "the node ended the upload");
    }
    assert!(
        wait_until(Duration::from_secs(20), || node.chunk_files().len() == 7).await,
        "the first half's chunks are not on disk"
    );
    let written: Vec<_> = node
        .chunk_files()
        .into_iter()
        .filter(|f| !decoy_files.contains(f))
        .collect();
    let started = std::time::Instant::now();
    assert!(
        wait_until(Duration::from_secs(20), || !decoy_files[0].exists()).await,
        "the collector never took the decoy"
    );
    // Past the grace for the upload's own chunks too.
    if started.elapsed() < Duration::from_secs(4) {
        tokio::time::sleep(Duration::from_secs(4) - started.elapsed()).await;
    }
    assert!(!slow.is_finished(), "the upload is still in progress");
    for f in &written {
        assert!(f.exists(), "{f:?}: collected while its upload ran");
    }
    for piece in rest.chunks(CHUNK / 2) {
        assert!(slow.send(piece).await, "the node ended the upload");
    }
    let info = slow.finish().await.expect("slow upload");
    assert_eq!(info.size, data.len() as u64);
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
