//! Storing and reading objects over gRPC against a real node: round trips
//! at the chunk-size edges, range reads, reads by SHA-1, stat, list,
//! delete and overwrite.

mod common;

use std::collections::HashMap;

use common::*;
use dfs::proto::{DeleteRequest, ListRequest, StatRequest, UploadHeader, stat_request};
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn round_trips_are_byte_exact_at_chunk_edges() {
    let node = TestNode::start(&[]).await;
    let mut storage = node.storage().await;
    let sizes = [
        0,
        1,
        CHUNK - 1,
        CHUNK,
        CHUNK + 1,
        2 * CHUNK,
        40 * CHUNK + 123,
    ];
    for (i, &size) in sizes.iter().enumerate() {
        let data = pseudo_random(i as u64, size);
        let key = format!("edge/{size}");
        let info = upload(&mut storage, &key, &data, 64 * 1024)
            .await
            .unwrap_or_else(|s| panic!("upload of {size} bytes: {s:?}"));
        assert_eq!(info.key, key);
        assert_eq!(info.size, size as u64);
        assert_eq!(info.sha1, sha1_hex(&data), "sha1 of {size} bytes");
        assert_eq!(info.chunk_size as usize, CHUNK);
        assert_eq!(info.chunk_count as usize, size.div_ceil(CHUNK));
        let (got_info, got) = download(&mut storage, key_request(&key, 0, 0))
            .await
            .unwrap_or_else(|s| panic!("download of {size} bytes: {s:?}"));
        assert_eq!(got_info.sha1, info.sha1);
        assert_eq!(got.len(), size, "downloaded length for {size}");
        assert!(got == data, "downloaded bytes differ for size {size}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reported_sha1_matches_sha1sum_of_the_input() {
    let node = TestNode::start(&[]).await;
    let mut storage = node.storage().await;
    let data = pseudo_random(7, 3 * CHUNK + 17);
    let path = node.root().join("input.bin");
    std::fs::write(&path, &data).unwrap();
    let out = std::process::Command::new("sha1sum")
        .arg(&path)
        .output()
        .expect("run sha1sum");
    assert!(out.status.success());
    let sha1sum = String::from_utf8(out.stdout).unwrap();
    let sha1sum = sha1sum.split_whitespace().next().unwrap().to_owned();
    let info = upload(&mut storage, "sum", &data, CHUNK).await.unwrap();
    assert_eq!(info.sha1, sha1sum);
    // The empty file too.
    let info = upload(&mut storage, "empty", &[], CHUNK).await.unwrap();
    assert_eq!(info.sha1, "da39a3ee5e6b4b0d3255bfef95601890afd80709");
}

#[tokio::test(flavor = "multi_thread")]
async fn upload_message_sizes_do_not_matter() {
    let node = TestNode::start(&[]).await;
    let mut storage = node.storage().await;
    let data = pseudo_random(11, 5 * CHUNK + 999);
    let mut infos = Vec::new();
    for msg_size in [7, 4096, 100_001, CHUNK, 1 << 20] {
        let key = format!("msg/{msg_size}");
        let info = upload(&mut storage, &key, &data, msg_size)
            .await
            .unwrap_or_else(|s| panic!("upload in {msg_size}-byte messages: {s:?}"));
        let (_, got) = download(&mut storage, key_request(&key, 0, 0))
            .await
            .unwrap();
        assert!(got == data, "bytes differ with {msg_size}-byte messages");
        infos.push(info);
    }
    for info in &infos {
        assert_eq!(info.sha1, sha1_hex(&data));
        assert_eq!(info.size, data.len() as u64);
        assert_eq!(info.chunk_count, 6);
    }
    // Empty data messages in the middle are harmless too.
    let mut msgs = upload_messages(
        UploadHeader {
            key: "msg/empty-parts".into(),
            ..Default::default()
        },
        &data,
        50_000,
    );
    msgs.insert(3, data_msg(&[]));
    msgs.push(data_msg(&[]));
    let info = upload_raw(&mut storage, msgs).await.unwrap();
    assert_eq!(info.sha1, sha1_hex(&data));
}

#[tokio::test(flavor = "multi_thread")]
async fn range_reads_return_exactly_the_requested_bytes() {
    let node = TestNode::start(&[]).await;
    let mut storage = node.storage().await;
    let size = 5 * CHUNK + 321;
    let data = pseudo_random(3, size);
    upload(&mut storage, "r", &data, 100_000).await.unwrap();
    let c = CHUNK as u64;
    let s = size as u64;
    let cases: &[(u64, u64)] = &[
        (0, 0),          // whole object
        (0, 1),          // first byte
        (10, 100),       // inside one chunk
        (c - 1, 2),      // across the first boundary
        (c, c),          // exactly the second chunk
        (c - 10, 3 * c), // spanning four chunks
        (c + 5, 0),      // from inside chunk 1 to the end
        (s - 1, 1),      // last byte
        (s - 1, 0),      // last byte, length 0 = to the end
        (5 * c, 321),    // exactly the short last chunk
        (s, 0),          // offset at the end, length 0: empty
        (0, s),          // the whole object, explicitly
    ];
    for &(offset, length) in cases {
        let (info, got) = download(&mut storage, key_request("r", offset, length))
            .await
            .unwrap_or_else(|e| panic!("range {offset}+{length}: {e:?}"));
        assert_eq!(info.size, s, "info carries the whole object's size");
        let end = if length == 0 { s } else { offset + length };
        let want = &data[offset as usize..end as usize];
        assert!(
            got == want,
            "range {offset}+{length}: got {} bytes, want {}",
            got.len(),
            want.len()
        );
    }
    // The empty object: only the empty range exists.
    upload(&mut storage, "empty", &[], 1).await.unwrap();
    let (_, got) = download(&mut storage, key_request("empty", 0, 0))
        .await
        .unwrap();
    assert!(got.is_empty());
    assert_code(
        download(&mut storage, key_request("empty", 0, 1)).await,
        Code::OutOfRange,
        "one byte of the empty object",
    );
    for (offset, length) in [(s + 1, 0), (s, 1), (s - 1, 2), (0, s + 1), (1, u64::MAX)] {
        let r = download(&mut storage, key_request("r", offset, length)).await;
        assert_code(r, Code::OutOfRange, &format!("range {offset}+{length}"));
    }
    node.assert_healthy().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn objects_are_found_by_sha1_for_download_and_stat() {
    let node = TestNode::start(&[]).await;
    let mut storage = node.storage().await;
    let data = pseudo_random(21, 2 * CHUNK + 5);
    let mut header = UploadHeader {
        key: "by-sha".into(),
        content_type: "application/x-test".into(),
        ..Default::default()
    };
    header.metadata = HashMap::from([("owner".to_string(), "tests".to_string())]);
    let info = upload_raw(&mut storage, upload_messages(header, &data, 9000))
        .await
        .unwrap();
    let sha = sha1_hex(&data);

    let (got_info, got) = download(&mut storage, sha1_request(&sha)).await.unwrap();
    assert_eq!(got_info.key, "by-sha");
    assert!(got == data);

    let by_sha = storage
        .stat(StatRequest {
            target: Some(stat_request::Target::Sha1(sha.clone())),
        })
        .await
        .unwrap()
        .into_inner();
    let by_key = stat_key(&mut storage, "by-sha").await.unwrap();
    assert_eq!(by_sha, by_key);
    assert_eq!(by_key, info, "stat returns what the upload returned");
    assert_eq!(by_key.size, data.len() as u64);
    assert_eq!(by_key.sha1, sha);
    assert_eq!(by_key.chunk_count, 3);
    assert_eq!(by_key.content_type, "application/x-test");
    assert_eq!(
        by_key.metadata.get("owner").map(String::as_str),
        Some("tests")
    );
    assert!(by_key.version.is_some());
    assert!(by_key.created_unix_ms > 0);

    // Two keys with the same content: deleting one keeps the content
    // reachable by sha1 through the other.
    upload(&mut storage, "by-sha-twin", &data, CHUNK)
        .await
        .unwrap();
    storage
        .delete(DeleteRequest {
            key: "by-sha".into(),
        })
        .await
        .unwrap();
    let (twin_info, got) = download(&mut storage, sha1_request(&sha)).await.unwrap();
    assert_eq!(twin_info.key, "by-sha-twin");
    assert!(got == data);

    // Unknown sha1 and unknown key.
    let unknown = sha1_hex(b"never stored");
    assert_code(
        download(&mut storage, sha1_request(&unknown)).await,
        Code::NotFound,
        "download of an unknown sha1",
    );
    assert_code(
        storage
            .stat(StatRequest {
                target: Some(stat_request::Target::Sha1(unknown)),
            })
            .await,
        Code::NotFound,
        "stat of an unknown sha1",
    );
    assert_code(
        download(&mut storage, key_request("nope", 0, 0)).await,
        Code::NotFound,
        "download of an unknown key",
    );
    assert_code(
        stat_key(&mut storage, "nope").await,
        Code::NotFound,
        "stat of an unknown key",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn list_pages_by_prefix_and_hides_deleted_keys() {
    let node = TestNode::start(&[]).await;
    let mut storage = node.storage().await;
    for key in ["p/a", "p/b", "p/c", "p/d", "p/e", "q/x", "p/gone"] {
        upload(&mut storage, key, key.as_bytes(), 100)
            .await
            .unwrap();
    }
    storage
        .delete(DeleteRequest {
            key: "p/gone".into(),
        })
        .await
        .unwrap();

    let mut keys = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = storage
            .list(ListRequest {
                prefix: "p/".into(),
                page_size: 2,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.objects.len() <= 2, "page larger than page_size");
        keys.extend(page.objects.iter().map(|o| o.key.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(keys, ["p/a", "p/b", "p/c", "p/d", "p/e"]);
    assert_eq!(pages, 3, "5 objects in pages of 2");

    let all = storage
        .list(ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    let all: Vec<_> = all.objects.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(all, ["p/a", "p/b", "p/c", "p/d", "p/e", "q/x"]);
    assert!(!all.contains(&"p/gone"));

    let none = storage
        .list(ListRequest {
            prefix: "zzz".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.objects.is_empty());
    assert!(none.next_page_token.is_empty());

    assert_code(
        storage
            .list(ListRequest {
                prefix: String::new(),
                page_size: 2,
                page_token: "not-a-token!".into(),
            })
            .await,
        Code::InvalidArgument,
        "list with a forged page token",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_hides_the_object_and_unknown_keys_are_not_found() {
    let node = TestNode::start(&[]).await;
    let mut storage = node.storage().await;
    let data = pseudo_random(5, CHUNK + 1);
    upload(&mut storage, "d", &data, CHUNK).await.unwrap();
    let resp = storage
        .delete(DeleteRequest { key: "d".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.version.is_some());
    assert_code(
        stat_key(&mut storage, "d").await,
        Code::NotFound,
        "stat after delete",
    );
    assert_code(
        download(&mut storage, key_request("d", 0, 0)).await,
        Code::NotFound,
        "download after delete",
    );
    assert_code(
        download(&mut storage, sha1_request(&sha1_hex(&data))).await,
        Code::NotFound,
        "download by sha1 after delete",
    );
    assert_code(
        storage.delete(DeleteRequest { key: "d".into() }).await,
        Code::NotFound,
        "second delete",
    );
    assert_code(
        storage
            .delete(DeleteRequest {
                key: "never-was".into(),
            })
            .await,
        Code::NotFound,
        "delete of an unknown key",
    );
    // The key can be used again after a delete.
    upload(&mut storage, "d", b"again", 10).await.unwrap();
    let (_, got) = download(&mut storage, key_request("d", 0, 0))
        .await
        .unwrap();
    assert_eq!(got, b"again");
}

#[tokio::test(flavor = "multi_thread")]
async fn overwrite_replaces_the_object_last_writer_wins() {
    let node = TestNode::start(&[]).await;
    let mut storage = node.storage().await;
    let v1 = pseudo_random(1, 3 * CHUNK);
    let v2 = pseudo_random(2, CHUNK / 2);
    let i1 = upload(&mut storage, "o", &v1, CHUNK).await.unwrap();
    let i2 = upload(&mut storage, "o", &v2, CHUNK).await.unwrap();
    let (h1, h2) = (i1.version.unwrap(), i2.version.unwrap());
    assert!(h2.hlc > h1.hlc, "the later write has the larger version");
    let (info, got) = download(&mut storage, key_request("o", 0, 0))
        .await
        .unwrap();
    assert!(got == v2);
    assert_eq!(info.sha1, sha1_hex(&v2));
    assert_eq!(
        stat_key(&mut storage, "o").await.unwrap().size,
        v2.len() as u64
    );
    // The old content is no longer reachable by its sha1.
    assert_code(
        download(&mut storage, sha1_request(&sha1_hex(&v1))).await,
        Code::NotFound,
        "old sha1 after overwrite",
    );
    let list = storage
        .list(ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.objects.len(), 1, "one key, one listing entry");
    let status = node
        .cluster()
        .await
        .status(dfs::proto::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.object_count, 1, "an overwrite is still one object");
}
