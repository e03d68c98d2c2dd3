//! Nothing unverified between peers: real nodes (the real peer handler) with
//! bad or missing chunk files on disk, a client of the peer protocol sending
//! bad copies, and a lying peer serving them.

mod common;

use std::{fs, time::Duration};

use bytes::Bytes;
use common::{
    cluster::members_up,
    metrics::{enable_metrics, metrics_addr, scrape},
    peer::{LyingPeer, cluster_keys, peer_pool, peer_request},
    *,
};
use dfs::{
    crypto::IV_LEN,
    proto::{PutChunk, peer_message::Kind},
};
use tonic::Code;

/// `google.rpc.Code` DATA_LOSS, as a peer error carries it.
const PEER_DATA_LOSS: u32 = 15;

fn verification_failures(s: &common::metrics::Scrape, source: &str) -> f64 {
    s.require(
        "dfs_chunk_verification_failures_total",
        &[&format!("source=\"{source}\"")],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn put_chunk_refuses_a_copy_that_does_not_verify() {
    let mut node = TestNode::new(&[]);
    let key_file = node.use_key_file(500);
    enable_metrics(&mut node);
    node.launch().await;
    let keys = cluster_keys(&key_file);
    let pool = peer_pool(&key_file, "127.0.0.1:9");
    let p2p = node.p2p_addr().await;

    let seal = |plain: &[u8]| {
        let mut buf = vec![0u8; IV_LEN];
        buf.extend_from_slice(plain);
        let id = keys.seal_in_place(&mut buf);
        (id, buf)
    };
    let (id, good) = seal(&pseudo_random(501, 3000));
    let (_, other) = seal(&pseudo_random(502, 3000));
    let mut flipped = good.clone();
    flipped[IV_LEN + 1500] ^= 0x04;
    let mut iv_flipped = good.clone();
    iv_flipped[0] ^= 0x01;
    let bad_copies = [
        ("a flipped ciphertext bit", flipped),
        ("a flipped IV bit", iv_flipped),
        ("another chunk's valid sealing", other),
        ("a truncated copy", good[..good.len() - 1].to_vec()),
        ("less than an IV", good[..5].to_vec()),
    ];
    let dest = chunk_path(&node.data_dir(), &id);
    let put = |body: Vec<u8>| {
        let kind = Kind::PutChunk(PutChunk {
            chunk_id: id.0.to_vec().into(),
            lease: None,
        });
        peer_request(&pool, &p2p, kind, Some(Bytes::from(body)))
    };
    for (what, body) in &bad_copies {
        let reply = put(body.clone()).await;
        match reply.msg.kind {
            Some(Kind::Error(e)) => {
                assert_eq!(e.code, PEER_DATA_LOSS, "{what}: {e:?}");
                assert!(e.message.contains(&id.to_hex()), "{what}: {e:?}");
            }
            other => panic!("{what}: the node answered {other:?}, not DATA_LOSS"),
        }
        assert!(!dest.exists(), "{what}: a refused copy was stored");
    }
    assert!(node.tmp_files().is_empty(), "{:?}", node.tmp_files());
    let after = scrape(&metrics_addr(&node)).await;
    assert_eq!(
        verification_failures(&after, "incoming"),
        bad_copies.len() as f64,
        "{}",
        after.body
    );

    // The good copy is accepted and stored exactly as sent.
    let reply = put(good.clone()).await;
    assert!(
        matches!(reply.msg.kind, Some(Kind::PutChunkReply(r)) if r.stored),
        "{:?}",
        reply.msg
    );
    assert_eq!(fs::read(&dest).expect("stored copy"), good);
    assert_eq!(status_chunk_count(&node).await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_or_missing_local_copy_is_read_from_a_peer_and_restored() {
    // No repair pass after start-up: the reads below must do the work.
    let c = TestCluster::start(2, 2, &["--repair-interval", "1h"]).await;
    let data = pseudo_random(510, 6 * CHUNK + 9);
    common::cluster::put(&c.nodes[0], "obj", &data).await;
    let ids = chunk_ids(&c.key_file, &data);
    c.wait_copies(&data, 2, Duration::from_secs(10)).await;
    let (bad, gone) = (ids[2], ids[4]);
    damage_file(&c.chunk_file(0, &bad), None, Damage::FlipByte);
    damage_file(&c.chunk_file(0, &gone), None, Damage::Delete);

    let got = common::cluster::get(&c.nodes[0], "obj")
        .await
        .expect("the download falls back to the peer's copies");
    assert!(got == data, "bytes differ");
    let quarantined = c.nodes[0].quarantine_files();
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert!(
        quarantined[0]
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&bad.to_hex())),
        "{quarantined:?}"
    );
    // Node 0 owns both chunks: it puts back the copies it read from node 1,
    // the same sealed bytes.
    for id in [bad, gone] {
        let (mine, theirs) = (c.chunk_file(0, &id), c.chunk_file(1, &id));
        poll_until(
            Duration::from_secs(20),
            &format!("node 0 restores its copy of {id}"),
            async || fs::read(&mine).ok() == fs::read(&theirs).ok(),
        )
        .await;
    }
    assert!(c.nodes[1].quarantine_files().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_never_serves_a_copy_that_fails_verification() {
    // No repair pass after start-up: the reads below must do the work.
    let c = TestCluster::start(2, 2, &["--repair-interval", "1h"]).await;
    let data = pseudo_random(520, 5 * CHUNK);
    common::cluster::put(&c.nodes[0], "obj", &data).await;
    c.wait_copies(&data, 2, Duration::from_secs(10)).await;
    let id = chunk_ids(&c.key_file, &data)[2];
    damage_file(&c.chunk_file(0, &id), None, Damage::Delete);
    damage_file(&c.chunk_file(1, &id), None, Damage::FlipIv);

    let mut storage = c.nodes[0].storage().await;
    let d = download_partial(&mut storage, key_request("obj", 0, 0)).await;
    assert_eq!(
        d.end.as_ref().expect_err("no good copy exists").code(),
        Code::DataLoss,
        "{:?}",
        d.end
    );
    assert!(d.bytes.len() <= 2 * CHUNK, "{} bytes", d.bytes.len());
    assert!(
        d.bytes == data[..d.bytes.len()],
        "delivered bytes are not the object's"
    );
    // Node 1 checked its copy before sending it, found it bad, and moved it
    // aside; node 0 got nothing to put back.
    let q = c.nodes[1].quarantine_files();
    assert_eq!(q.len(), 1, "{q:?}");
    assert!(!c.chunk_file(1, &id).exists());
    assert!(!c.chunk_file(0, &id).exists(), "a bad copy was restored");
}

#[tokio::test(flavor = "multi_thread")]
async fn copies_from_a_lying_peer_are_rejected_and_never_reach_the_client() {
    let mut node = TestNode::new(&["--replicas", "2", "--dead-after", "30s"]);
    let key_file = node.use_key_file(530);
    enable_metrics(&mut node);
    node.launch().await;
    let data = pseudo_random(531, 5 * CHUNK);
    upload(&mut node.storage().await, "obj", &data, CHUNK)
        .await
        .expect("upload while alone");
    let liar = LyingPeer::start(&key_file, CHUNK + IV_LEN, &node.p2p_addr().await).await;
    poll_until(
        Duration::from_secs(10),
        "the node counts the liar as up",
        async || members_up(&node).await == 1,
    )
    .await;
    let id = chunk_ids(&key_file, &data)[2];
    let local = chunk_path(&node.data_dir(), &id);
    damage_file(&local, None, Damage::Delete);

    let mut storage = node.storage().await;
    let d = download_partial(&mut storage, key_request("obj", 0, 0)).await;
    assert_eq!(
        d.end.as_ref().expect_err("only a bad copy exists").code(),
        Code::DataLoss,
        "{:?}",
        d.end
    );
    assert!(d.bytes.len() <= 2 * CHUNK, "{} bytes", d.bytes.len());
    assert!(
        d.bytes == data[..d.bytes.len()],
        "bad bytes reached the client"
    );
    // Proof the liar was asked and its copy refused.
    assert!(
        liar.stats
            .bad_copies_sent
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 1
    );
    let after = scrape(&metrics_addr(&node)).await;
    assert!(
        verification_failures(&after, "fetched") >= 1.0,
        "{}",
        after.body
    );
    assert!(
        node.log()
            .contains("peer sent a chunk that does not verify"),
        "{}",
        node.log()
    );
    assert!(!local.exists(), "the liar's copy was stored");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copy_counts_only_when_the_peer_says_it_stored_it() {
    // R = 2 with two members up: W = 2. The other member answers every
    // PutChunk with `stored: false`, so only one copy exists: no object.
    let mut node = TestNode::new(&["--replicas", "2", "--dead-after", "30s"]);
    let key_file = node.use_key_file(540);
    node.launch().await;
    let liar =
        LyingPeer::start_with(&key_file, CHUNK + IV_LEN, &node.p2p_addr().await, false).await;
    poll_until(
        Duration::from_secs(10),
        "the node counts the other member as up",
        async || members_up(&node).await == 1,
    )
    .await;
    let data = pseudo_random(541, 3 * CHUNK);
    let mut storage = node.storage().await;
    let result = upload(&mut storage, "one-copy", &data, CHUNK).await;
    let asked = liar
        .stats
        .puts_answered
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        asked >= 1,
        "the other member was never asked to store a copy"
    );
    assert_code(result, Code::Unavailable, "one stored copy when W = 2");
    assert_code(
        stat_key(&mut storage, "one-copy").await,
        Code::NotFound,
        "no object",
    );
}
