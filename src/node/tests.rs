//! Node-level tests: the pipelines against a real store and index in a
//! temporary directory, without gRPC.

use std::{path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use proptest::prelude::*;
use sha1::{Digest, Sha1};
use tokio_stream::StreamExt;

use super::*;
use crate::config::MIN_CHUNK_SIZE;

const CHUNK: usize = MIN_CHUNK_SIZE;

fn node_with(dir: &Path, tweak: impl FnOnce(&mut NodeConfig)) -> Arc<Node> {
    let mut cfg = NodeConfig::new(dir.to_owned());
    cfg.chunk_size = CHUNK;
    cfg.buffer_budget = 8 * CHUNK;
    tweak(&mut cfg);
    Arc::new(Node::open(cfg).unwrap())
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    let mut state = (seed as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Feeds `bytes` to an upload in pieces of `piece` bytes.
async fn put(
    node: &Node,
    key: &str,
    bytes: &[u8],
    piece: usize,
) -> Result<ObjectRecord, NodeError> {
    let pieces: Vec<Result<Bytes, NodeError>> = bytes
        .chunks(piece.max(1))
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let meta = UploadMeta {
        key: key.into(),
        ..Default::default()
    };
    node.upload(meta, tokio_stream::iter(pieces)).await
}

async fn get(node: &Arc<Node>, key: &str, offset: u64, len: u64) -> Result<Vec<u8>, NodeError> {
    let mut download = node.download(&Target::Key(key.into()), offset, len).await?;
    let mut out = Vec::new();
    while let Some(piece) = download.data.next().await {
        out.extend_from_slice(&piece?);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn chunking_round_trips_at_every_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_with(dir.path(), |_| {});
    for (len, chunks) in [
        (0, 0),
        (1, 1),
        (CHUNK - 1, 1),
        (CHUNK, 1),
        (CHUNK + 1, 2),
        (7 * CHUNK + 3, 8),
    ] {
        for piece in [1000, CHUNK, 3 * CHUNK + 7] {
            let bytes = data(len, (len % 251) as u8);
            let key = format!("k{len}-{piece}");
            let rec = put(&node, &key, &bytes, piece).await.unwrap();
            assert_eq!(rec.size, len as u64);
            assert_eq!(rec.chunk_count(), chunks, "len {len}");
            assert_eq!(&rec.sha1[..], Sha1::digest(&bytes).as_slice());
            assert_eq!(get(&node, &key, 0, 0).await.unwrap(), bytes, "len {len}");
        }
    }
    assert_eq!(
        node.budget().available(),
        8 * CHUNK,
        "every buffer returned to the budget"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn identical_chunks_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_with(dir.path(), |_| {});
    let block = data(CHUNK, 9);
    let doubled = [block.clone(), block].concat();
    let rec = put(&node, "twice", &doubled, CHUNK).await.unwrap();
    assert_eq!(rec.chunk_count(), 2);
    assert_eq!(node.store().usage().0, 1, "two equal chunks, one file");
    put(&node, "again", &doubled, 4096).await.unwrap();
    assert_eq!(node.store().usage().0, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn expected_sha1_mismatch_commits_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_with(dir.path(), |_| {});
    let meta = UploadMeta {
        key: "k".into(),
        expected_sha1: "0000000000000000000000000000000000000000".into(),
        ..Default::default()
    };
    let stream = tokio_stream::iter(vec![Ok(Bytes::from_static(b"hello"))]);
    assert!(matches!(
        node.upload(meta, stream).await,
        Err(NodeError::DataLoss(_))
    ));
    assert!(node.index().get("k").unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_stream_leaves_no_object_and_releases_its_lease() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_with(dir.path(), |_| {});
    let pieces = vec![
        Ok(Bytes::from(data(3 * CHUNK, 1))),
        Err(NodeError::Cancelled("client went away".into())),
    ];
    let meta = UploadMeta {
        key: "k".into(),
        ..Default::default()
    };
    assert!(matches!(
        node.upload(meta, tokio_stream::iter(pieces)).await,
        Err(NodeError::Cancelled(_))
    ));
    assert!(node.index().get("k").unwrap().is_none());
    assert_eq!(
        node.chunks().leases().count(),
        0,
        "the upload's lease is released"
    );
    assert_eq!(
        std::fs::read_dir(node.store().tmp_dir()).unwrap().count(),
        0
    );
}

/// Makes every chunk file look `age` old, as if written that long ago: the
/// collector's age test, without waiting for it.
fn age_chunks(node: &Node, age: Duration) {
    let then = std::time::SystemTime::now() - age;
    let mut ids = Vec::new();
    node.store()
        .for_each_chunk(|id, _, _| ids.push(id))
        .unwrap();
    for id in ids {
        let file = std::fs::File::options()
            .write(true)
            .open(node.store().path_of(&id))
            .unwrap();
        file.set_modified(then).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_collection_frees_only_unreferenced_old_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_with(dir.path(), |c| c.gc_grace = Duration::from_secs(3600));
    let shared = data(CHUNK, 3);
    put(
        &node,
        "a",
        &[shared.clone(), data(CHUNK, 4)].concat(),
        CHUNK,
    )
    .await
    .unwrap();
    put(&node, "b", &shared, CHUNK).await.unwrap();
    assert_eq!(node.store().usage().0, 2);
    node.delete("a").await.unwrap();
    // Within the grace period nothing goes, though the pass saw both chunks.
    let young = node.collect_garbage().unwrap();
    assert_eq!((young.scanned, young.deleted), (2, 0));
    // Once both are older than the grace, only the one no live object uses.
    age_chunks(&node, Duration::from_secs(7200));
    let report = node.collect_garbage().unwrap();
    assert_eq!((report.scanned, report.deleted), (2, 1));
    assert_eq!(node.store().usage().0, 1);
    assert_eq!(get(&node, "b", 0, 0).await.unwrap(), shared);
}

#[tokio::test(flavor = "multi_thread")]
async fn chunks_written_during_a_leased_upload_survive_collection() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_with(dir.path(), |c| c.gc_grace = Duration::ZERO);
    // An upload that began 10 s ago still holds its lease.
    let lease = [7; 16];
    node.chunks()
        .leases()
        .hold(lease, Duration::from_secs(10), Duration::from_secs(60));
    put(&node, "a", &data(CHUNK, 5), CHUNK).await.unwrap();
    node.delete("a").await.unwrap();
    let report = node.collect_garbage().unwrap();
    assert!(report.ran, "a standalone node has no start-up quiet period");
    assert_eq!(report.deleted, 0, "the lease keeps what was written since");
    node.chunks().leases().release(&lease);
    assert_eq!(node.collect_garbage().unwrap().deleted, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn ranges_read_only_what_they_cover() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_with(dir.path(), |_| {});
    let bytes = data(3 * CHUNK + 100, 6);
    let rec = put(&node, "r", &bytes, 5000).await.unwrap();
    // Remove the first chunk: a range that does not touch it still works.
    let first = rec.chunk_id_list().next().unwrap();
    std::fs::remove_file(node.store().path_of(&first)).unwrap();
    let (off, len) = (CHUNK as u64 + 10, CHUNK as u64);
    let got = get(&node, "r", off, len).await.unwrap();
    assert_eq!(got, &bytes[off as usize..(off + len) as usize]);
    assert!(matches!(
        get(&node, "r", 0, 10).await,
        Err(NodeError::DataLoss(_))
    ));
    assert!(matches!(
        node.download(&Target::Key("r".into()), bytes.len() as u64, 1)
            .await,
        Err(NodeError::OutOfRange(_))
    ));
}

proptest! {
    #[test]
    fn chunk_span_covers_exactly_the_range(
        chunk_size in 1u64..5000,
        size in 0u64..50_000,
        a in 0u64..60_000,
        b in 0u64..60_000,
    ) {
        let offset = a.min(size);
        let length = b % (size - offset + 1);
        let range = ByteRange::resolve(size, offset, length).unwrap();
        let mut pos = range.offset;
        let mut total = 0;
        for (i, from, to) in chunk_span(chunk_size, range) {
            prop_assert!(from < to, "no empty pieces");
            prop_assert!(to as u64 <= chunk_size);
            prop_assert_eq!(i as u64 * chunk_size + from as u64, pos, "contiguous");
            pos += (to - from) as u64;
            total += (to - from) as u64;
        }
        prop_assert_eq!(total, range.len);
        prop_assert!(range.offset + range.len <= size);
    }

    #[test]
    fn ranges_beyond_the_end_are_refused(size in 0u64..10_000, extra in 1u64..10_000) {
        prop_assert!(ByteRange::resolve(size, size + extra, 0).is_err());
        prop_assert!(ByteRange::resolve(size, 0, size + extra).is_err());
        prop_assert_eq!(ByteRange::resolve(size, 0, 0).unwrap().len, size);
    }
}
