//! The peer channel against a man in the middle: two real `dfs node`
//! processes that reach each other only through TCP relays this test
//! controls (each node advertises its relay's address). The relays see every
//! byte between the nodes, and can alter, drop, replay, reorder or inject
//! records after the handshake. Also: impostors and malformed frames
//! aimed at a real node.

mod common;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use common::*;
use dfs::proto::{
    IndexUpdate, ListRequest, ObjectRecord, PeerMessage, UploadHeader, Version, peer_message::Kind,
};
use prost::Message;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Which way an attack hits: the requests a node receives through its
/// relay, or the replies going back to the dialer.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Dir {
    ToNode,
    ToDialer,
}

/// What an armed relay does to the first frame-header record (21 bytes of
/// ciphertext) it sees after arming, once per connection, in the armed
/// direction.
#[derive(Clone, Debug)]
enum Attack {
    /// Flip one bit of the record.
    Flip,
    /// Leave the record out.
    Drop,
    /// Send the record twice.
    Replay,
    /// Send the record after the one that follows it.
    Reorder,
    /// Send these bytes first.
    Inject(Vec<u8>),
}

/// A TCP relay in front of one node.
struct Relay {
    addr: String,
    target: Arc<Mutex<Option<String>>>,
    /// Every byte relayed, both directions.
    seen: Arc<Mutex<Vec<u8>>>,
    attack: Arc<Mutex<Option<(Dir, Attack)>>>,
    /// Connections an attack was applied to, and those of them that then
    /// closed (both directions ended).
    attacked: Arc<AtomicUsize>,
    closed_after_attack: Arc<AtomicUsize>,
}

impl Relay {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay = Self {
            addr: listener.local_addr().unwrap().to_string(),
            target: Arc::default(),
            seen: Arc::default(),
            attack: Arc::default(),
            attacked: Arc::default(),
            closed_after_attack: Arc::default(),
        };
        let (target, seen, attack) = (
            relay.target.clone(),
            relay.seen.clone(),
            relay.attack.clone(),
        );
        let (attacked, closed) = (relay.attacked.clone(), relay.closed_after_attack.clone());
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                let Some(to) = target.lock().unwrap().clone() else {
                    continue; // the node is not up yet: refuse by closing
                };
                let Ok(outbound) = TcpStream::connect(&to).await else {
                    continue;
                };
                let ctx = PumpCtx {
                    seen: seen.clone(),
                    attack: attack.clone(),
                    attacked: attacked.clone(),
                };
                let closed = closed.clone();
                tokio::spawn(async move {
                    let (in_r, in_w) = inbound.into_split();
                    let (out_r, out_w) = outbound.into_split();
                    let hit = Arc::new(AtomicUsize::new(0));
                    let up = pump(in_r, out_w, ctx.clone(), Dir::ToNode, hit.clone());
                    let down = pump(out_r, in_w, ctx, Dir::ToDialer, hit.clone());
                    tokio::join!(up, down);
                    if hit.load(Ordering::SeqCst) > 0 {
                        closed.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        relay
    }

    fn set_target(&self, addr: &str) {
        *self.target.lock().unwrap() = Some(addr.to_owned());
    }

    fn arm(&self, attack: Option<(Dir, Attack)>) {
        *self.attack.lock().unwrap() = attack;
    }

    fn seen_bytes(&self) -> Vec<u8> {
        self.seen.lock().unwrap().clone()
    }
}

#[derive(Clone)]
struct PumpCtx {
    seen: Arc<Mutex<Vec<u8>>>,
    attack: Arc<Mutex<Option<(Dir, Attack)>>>,
    attacked: Arc<AtomicUsize>,
}

/// Reads one unit: during the handshake (the first two frames each way) a
/// cleartext frame, `kind u8 | len u32 BE | payload`; then a record,
/// `len u16 BE | ciphertext`.
async fn read_unit(r: &mut (impl AsyncRead + Unpin), frames_left: &mut usize) -> Option<Vec<u8>> {
    let head = if *frames_left > 0 { 5 } else { 2 };
    let mut unit = vec![0u8; head];
    r.read_exact(&mut unit).await.ok()?;
    let len = if *frames_left > 0 {
        *frames_left -= 1;
        u32::from_be_bytes(unit[1..5].try_into().unwrap()) as usize
    } else {
        u16::from_be_bytes([unit[0], unit[1]]) as usize
    };
    unit.resize(head + len, 0);
    r.read_exact(&mut unit[head..]).await.ok()?;
    Some(unit)
}

/// Relays one direction unit by unit, applying an attack armed for this
/// direction to the first header record after arming (once per connection:
/// `hit` is shared by both directions).
async fn pump(
    mut r: impl AsyncRead + Unpin,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    ctx: PumpCtx,
    dir: Dir,
    hit: Arc<AtomicUsize>,
) {
    let mut frames_left = 2;
    let mut held: Option<Vec<u8>> = None;
    while let Some(unit) = read_unit(&mut r, &mut frames_left).await {
        ctx.seen.lock().unwrap().extend_from_slice(&unit);
        let mut out = Vec::new();
        let armed = ctx.attack.lock().unwrap().clone();
        let armed = armed.and_then(|(d, attack)| (d == dir).then_some(attack));
        let is_header_record = frames_left == 0 && unit.len() == 2 + 21;
        match armed {
            _ if held.is_some() => {
                out.extend_from_slice(&unit);
                out.extend_from_slice(&held.take().unwrap());
            }
            Some(attack) if is_header_record && hit.load(Ordering::SeqCst) == 0 => {
                hit.fetch_add(1, Ordering::SeqCst);
                ctx.attacked.fetch_add(1, Ordering::SeqCst);
                match attack {
                    Attack::Flip => {
                        let mut u = unit.clone();
                        u[5] ^= 0x01;
                        out.extend_from_slice(&u);
                    }
                    Attack::Drop => {}
                    Attack::Replay => {
                        out.extend_from_slice(&unit);
                        out.extend_from_slice(&unit);
                    }
                    Attack::Reorder => held = Some(unit),
                    Attack::Inject(bytes) => {
                        out.extend_from_slice(&bytes);
                        out.extend_from_slice(&unit);
                    }
                }
            }
            _ => out.extend_from_slice(&unit),
        }
        if !out.is_empty() && w.write_all(&out).await.is_err() {
            break;
        }
    }
    let _ = w.shutdown().await;
}

/// The address a node's peer port is bound to, from its log line.
async fn bound_p2p_addr(node: &TestNode) -> String {
    let mut found = None;
    let seen = wait_until(Duration::from_secs(10), || {
        found = node
            .log()
            .lines()
            .filter(|l| l.contains("peer protocol listening"))
            .find_map(|l| {
                let at = l.find("p2p=")? + 4;
                l[at..].split_whitespace().next().map(str::to_owned)
            });
        found.is_some()
    })
    .await;
    assert!(seen, "no listening line in the log:\n{}", node.log());
    found.unwrap()
}

/// Two nodes (R = 2) that reach each other only through their relays.
struct Pair {
    a: TestNode,
    b: TestNode,
    relay_a: Relay,
    relay_b: Relay,
    key_file: PathBuf,
    _key_dir: tempfile::TempDir,
}

impl Pair {
    async fn start() -> Self {
        let key_dir = tempfile::tempdir().unwrap();
        let key_file = write_key_file(&key_dir.path().join("cluster.key"), 77);
        let (relay_a, relay_b) = (Relay::start().await, Relay::start().await);
        // Long sync and repair intervals: only the pushes under test move
        // records and chunks while the test looks. A failed write marks a
        // member down until its next ping (every dead-after / 5 = 2 s).
        let args = |advertise: &str, peer: &str| -> Vec<String> {
            [
                "--cluster-key-file",
                key_file.to_str().unwrap(),
                "--replicas",
                "2",
                "--dead-after",
                "10s",
                "--sync-interval",
                "1h",
                "--repair-interval",
                "1h",
                "--advertise-addr",
                advertise,
                "--peer",
                peer,
            ]
            .map(str::to_owned)
            .to_vec()
        };
        let a_args = args(&relay_a.addr, &relay_b.addr);
        let b_args = args(&relay_b.addr, &relay_a.addr);
        let a = TestNode::start(&a_args.iter().map(String::as_str).collect::<Vec<_>>()).await;
        relay_a.set_target(&bound_p2p_addr(&a).await);
        let b = TestNode::start(&b_args.iter().map(String::as_str).collect::<Vec<_>>()).await;
        relay_b.set_target(&bound_p2p_addr(&b).await);
        let pair = Self {
            a,
            b,
            relay_a,
            relay_b,
            key_file,
            _key_dir: key_dir,
        };
        pair.wait_for_each_other().await;
        pair
    }

    async fn wait_for_each_other(&self) {
        for node in [&self.a, &self.b] {
            let mut up = false;
            for _ in 0..300 {
                let members = node.status().await.members;
                if members.iter().filter(|m| m.state == "up").count() == 1 {
                    up = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(up, "the nodes never saw each other:\n{}", node.log());
        }
    }
}

/// Keys in a node's own index (List reads only the local index).
async fn local_keys(node: &TestNode) -> Vec<String> {
    let reply = node
        .storage()
        .await
        .list(ListRequest {
            prefix: String::new(),
            page_size: 1000,
            page_token: String::new(),
        })
        .await
        .expect("list")
        .into_inner();
    reply.objects.into_iter().map(|o| o.key).collect()
}

/// Members by id and address, as a node knows them.
async fn members(node: &TestNode) -> Vec<(String, String)> {
    let mut m: Vec<_> = node
        .status()
        .await
        .members
        .into_iter()
        .map(|m| (m.node_id, m.address))
        .collect();
    m.sort();
    m
}

async fn put_with_metadata(
    node: &TestNode,
    key: &str,
    metadata: HashMap<String, String>,
    data: &[u8],
) -> Result<dfs::proto::ObjectInfo, tonic::Status> {
    let header = UploadHeader {
        key: key.to_owned(),
        metadata,
        ..Default::default()
    };
    upload_raw(
        &mut node.storage().await,
        upload_messages(header, data, 100_000),
    )
    .await
}

async fn wait_for_key(node: &TestNode, key: &str) -> bool {
    for _ in 0..200 {
        if local_keys(node).await.iter().any(|k| k == key) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_between_two_nodes_sees_no_name_key_or_metadata() {
    let p = Pair::start().await;
    let key = "mitm-object-name-5e1f0c";
    let metadata = HashMap::from([(
        "mitm-meta-key-71aa".to_owned(),
        "mitm-meta-value-93a2".to_owned(),
    )]);
    let data = pseudo_random(5, 3 * CHUNK);
    put_with_metadata(&p.a, key, metadata, &data).await.unwrap();
    assert!(wait_for_key(&p.b, key).await, "the record reached B");
    assert_eq!(status_chunk_count(&p.b).await, 3, "B holds every chunk");
    let seen = [p.relay_a.seen_bytes(), p.relay_b.seen_bytes()].concat();
    // Proof the traffic went through the relays: the three chunks did.
    assert!(seen.len() > 3 * CHUNK, "only {} bytes relayed", seen.len());
    for needle in [
        key.as_bytes(),
        b"mitm-meta-key-71aa",
        b"mitm-meta-value-93a2",
        &dfs::crypto::ChunkId::to_hex(&chunk_ids(&p.key_file, &data)[0]).into_bytes(),
        &chunk_ids(&p.key_file, &data)[0].0,
        &data[..64],
    ] {
        assert!(
            !seen.windows(needle.len()).any(|w| w == needle),
            "the relay saw {:?}",
            String::from_utf8_lossy(needle)
        );
    }
    // The node ids are derived from keys and sent encrypted: not visible.
    let b_id = p.b.status().await.node_id;
    assert_eq!(b_id.len(), 32);
    assert!(!seen.windows(b_id.len()).any(|w| w == b_id.as_bytes()));
}

/// Arms `attack` on the relay in front of B, uploads through A (whose
/// chunk and record pushes to B must cross it), and checks that B took
/// nothing, that the connection was closed, and that all is well after.
async fn attack_requests_to_b(p: &Pair, attack: Attack, name: &str) {
    let before_chunks = status_chunk_count(&p.b).await;
    let before_members = (members(&p.a).await, members(&p.b).await);
    let before_attacked = p.relay_b.attacked.load(Ordering::SeqCst);
    let before_closed = p.relay_b.closed_after_attack.load(Ordering::SeqCst);
    p.relay_b.arm(Some((Dir::ToNode, attack.clone())));
    let key = format!("during-{name}");
    let data = pseudo_random(11, 2 * CHUNK);
    let result = put_with_metadata(&p.a, &key, HashMap::new(), &data).await;
    // Proof the attack happened and was acted on: an attacked connection
    // to B was closed by the nodes.
    let closed = wait_until(Duration::from_secs(20), || {
        p.relay_b.closed_after_attack.load(Ordering::SeqCst) > before_closed
    })
    .await;
    assert!(
        closed,
        "{name}: attacked {} connection(s), none closed",
        p.relay_b.attacked.load(Ordering::SeqCst) - before_attacked
    );
    assert!(
        result.is_err(),
        "{name}: the upload counted a copy B never took"
    );
    p.relay_b.arm(None);
    assert!(
        !local_keys(&p.b).await.contains(&key),
        "{name}: B applied a record"
    );
    assert_eq!(
        status_chunk_count(&p.b).await,
        before_chunks,
        "{name}: B stored a chunk"
    );
    assert_eq!(
        (members(&p.a).await, members(&p.b).await),
        before_members,
        "{name}: membership changed"
    );
    // With the relay honest again (and B back up in A's eyes: a failed
    // write marks a member down until its next ping), uploads go through.
    p.wait_for_each_other().await;
    let after = format!("after-{name}");
    put_with_metadata(&p.a, &after, HashMap::new(), &pseudo_random(12, CHUNK))
        .await
        .unwrap_or_else(|e| panic!("{name}: the cluster did not recover: {e}"));
    assert!(wait_for_key(&p.b, &after).await, "{name}: B missed {after}");
}

#[tokio::test(flavor = "multi_thread")]
async fn altered_dropped_replayed_or_reordered_records_close_the_connection_and_change_nothing() {
    let p = Pair::start().await;
    for (attack, name) in [
        (Attack::Flip, "flip"),
        (Attack::Drop, "drop"),
        (Attack::Replay, "replay"),
        (Attack::Reorder, "reorder"),
    ] {
        attack_requests_to_b(&p, attack, name).await;
    }
}

/// The tombstone a man in the middle of the version 1 protocol could
/// inject: it deleted the key everywhere, for ever.
fn forged_tombstone(key: &str) -> Vec<u8> {
    let record = ObjectRecord {
        key: key.to_owned(),
        deleted: true,
        version: Some(Version {
            hlc: u64::MAX,
            node_id: "zzzzzzzz".into(),
        }),
        ..Default::default()
    };
    let msg = PeerMessage {
        has_body: false,
        kind: Some(Kind::IndexUpdate(IndexUpdate {
            records: vec![record],
        })),
    };
    let payload = msg.encode_to_vec();
    let mut frame = vec![1u8];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    frame
}

#[tokio::test(flavor = "multi_thread")]
async fn an_injected_tombstone_is_refused_and_deletes_nothing() {
    let p = Pair::start().await;
    let data = pseudo_random(21, CHUNK);
    put_with_metadata(&p.a, "victim", HashMap::new(), &data)
        .await
        .unwrap();
    assert!(wait_for_key(&p.b, "victim").await);
    let plain = forged_tombstone("victim");
    // As a plaintext frame (the version 1 attack), and dressed as a record.
    let mut as_record = ((plain.len() + 16) as u16).to_be_bytes().to_vec();
    as_record.extend_from_slice(&plain);
    as_record.extend_from_slice(&[0u8; 16]);
    for (i, bytes) in [plain, as_record].into_iter().enumerate() {
        let before = p.relay_b.closed_after_attack.load(Ordering::SeqCst);
        p.relay_b.arm(Some((Dir::ToNode, Attack::Inject(bytes))));
        // Traffic from A to B for the injection to ride on.
        let _ = put_with_metadata(&p.a, &format!("carrier-{i}"), HashMap::new(), &data).await;
        let closed = wait_until(Duration::from_secs(20), || {
            p.relay_b.closed_after_attack.load(Ordering::SeqCst) > before
        })
        .await;
        assert!(closed, "injection {i}: no attacked connection was closed");
        p.relay_b.arm(None);
        assert!(
            local_keys(&p.b).await.contains(&"victim".to_owned()),
            "injection {i}: the victim was deleted on B"
        );
    }
    // The key stays writable and readable everywhere.
    p.wait_for_each_other().await;
    let again = pseudo_random(22, CHUNK);
    put_with_metadata(&p.b, "victim", HashMap::new(), &again)
        .await
        .unwrap();
    let (_, got) = download(&mut p.a.storage().await, key_request("victim", 0, 0))
        .await
        .unwrap();
    assert_eq!(got, again);
}

#[tokio::test(flavor = "multi_thread")]
async fn replies_altered_on_the_way_back_count_no_copy() {
    // B's replies to A's requests come back through the relay in front of
    // B (A dialed it). An altered reply (say, a forged "stored") must fail
    // A's exchange, so that A never counts a copy on the reply's word.
    let p = Pair::start().await;
    let before = p.relay_b.closed_after_attack.load(Ordering::SeqCst);
    p.relay_b.arm(Some((Dir::ToDialer, Attack::Flip)));
    let data = pseudo_random(31, 2 * CHUNK);
    let result = put_with_metadata(&p.a, "reply-forged", HashMap::new(), &data).await;
    let closed = wait_until(Duration::from_secs(20), || {
        p.relay_b.closed_after_attack.load(Ordering::SeqCst) > before
    })
    .await;
    assert!(closed, "no attacked connection was closed");
    assert!(
        result.is_err(),
        "A acknowledged an upload on replies it could not authenticate"
    );
    p.relay_b.arm(None);
    p.wait_for_each_other().await;
    put_with_metadata(&p.a, "reply-honest", HashMap::new(), &data)
        .await
        .unwrap();
    assert!(wait_for_key(&p.b, "reply-honest").await);
}

/// Reads frames until the peer closes; returns the reason of its ERROR.
async fn refusal_reason(conn: &mut dfs::p2p::Connection<TcpStream>) -> Option<String> {
    let mut reason = None;
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), conn.read_frame())
            .await
            .expect("the node must close the connection");
        match next {
            Ok(Some(dfs::p2p::Frame::Error(r))) => reason = Some(r),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return reason,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_with_the_cluster_key_cannot_claim_another_nodes_id() {
    use dfs::p2p::noise::Handshake;
    use dfs::proto::{Auth, Hello, NodeInfo};
    let p = Pair::start().await;
    let victim = p.a.status().await.node_id;
    let secret = dfs::crypto::ClusterSecret::read_file(&p.key_file).unwrap();
    let keys = dfs::crypto::Keys::derive(&secret);
    let impostor = dfs::identity::NodeKey::generate();
    let b_addr = bound_p2p_addr(&p.b).await;
    let mut conn = dfs::p2p::Connection::new(TcpStream::connect(&b_addr).await.unwrap());
    let mut noise = Handshake::new(&impostor, keys.peer_psk(), true, None).unwrap();
    let send = |kind: Kind| {
        dfs::p2p::Frame::message(&PeerMessage {
            has_body: false,
            kind: Some(kind),
        })
        .unwrap()
    };
    let hello = |noise: Vec<u8>| {
        Kind::Hello(Hello {
            magic: "dfs-peer".into(),
            version: dfs::p2p::handshake::VERSION,
            noise: noise.into(),
        })
    };
    conn.write_frame(&send(hello(noise.write(&[]).unwrap())))
        .await
        .unwrap();
    conn.flush().await.unwrap();
    let Some(dfs::p2p::Frame::Message(reply)) = conn.read_frame().await.unwrap() else {
        panic!("expected B's Hello")
    };
    let Some(Kind::Hello(theirs)) = PeerMessage::decode(reply).unwrap().kind else {
        panic!("expected B's Hello")
    };
    noise.read(&theirs.noise).unwrap();
    let claim = NodeInfo {
        node_id: victim.clone(),
        advertised_addr: p.relay_a.addr.clone(),
    };
    let m3 = noise.write(&claim.encode_to_vec()).unwrap();
    conn.write_frame(&send(Kind::Auth(Auth {
        noise: Bytes::from(m3),
    })))
    .await
    .unwrap();
    conn.flush().await.unwrap();
    let reason = refusal_reason(&mut conn).await.expect("an ERROR frame");
    assert_eq!(
        reason,
        format!(
            "the peer claims node id {victim} but its key is that of node {}",
            impostor.node_id()
        )
    );
    assert!(p.b.log().contains("claims node id"), "B logs the refusal");
    // B's view of A is unchanged: still A's own address.
    assert!(
        members(&p.b)
            .await
            .contains(&(victim, p.relay_a.addr.clone()))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_without_the_cluster_key_is_refused_by_a_real_node() {
    let p = Pair::start().await;
    let stranger_keys = dfs::crypto::Keys::derive(&dfs::crypto::ClusterSecret::generate());
    let identity = dfs::p2p::Identity {
        key: dfs::identity::NodeKey::generate(),
        advertised_addr: "127.0.0.1:1".into(),
    };
    let pool = dfs::p2p::PeerPool::new(identity, stranger_keys, dfs::p2p::Limits::default());
    let ping = PeerMessage {
        has_body: false,
        kind: Some(Kind::Ping(Default::default())),
    };
    let result = pool.request(&bound_p2p_addr(&p.b).await, ping, None).await;
    assert!(
        matches!(
            result,
            Err(dfs::p2p::P2pError::Handshake(
                dfs::p2p::HandshakeError::AuthFailed
            ))
        ),
        "{result:?}"
    );
    assert_eq!(members(&p.b).await.len(), 2, "B learned no member");
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_frames_before_and_after_the_handshake_close_only_their_connection_on_a_real_node()
 {
    let p = Pair::start().await;
    let b_addr = bound_p2p_addr(&p.b).await;
    let keys =
        dfs::crypto::Keys::derive(&dfs::crypto::ClusterSecret::read_file(&p.key_file).unwrap());
    // (header, payload, a piece of the reason B must close with)
    let attacks: [([u8; 5], &[u8], &str); 4] = [
        ([9, 0, 0, 0, 1], &[0], "unknown frame kind 9"),
        ([1, 0xff, 0xff, 0xff, 0xff], &[], "exceeds the"),
        ([1, 0, 0, 0, 3], &[0xff, 0xff, 0xff], "bad peer message"),
        ([2, 0, 0, 0, 1], &[7], "unexpected DATA frame"),
    ];
    for authenticated in [false, true] {
        for (header, payload, reason) in attacks {
            let stream = TcpStream::connect(&b_addr).await.unwrap();
            let remote = stream.peer_addr().unwrap();
            let mut conn = dfs::p2p::Connection::new(stream);
            if authenticated {
                let me = dfs::p2p::Identity {
                    key: dfs::identity::NodeKey::generate(),
                    advertised_addr: "127.0.0.1:1".into(),
                };
                dfs::p2p::handshake::dial(&mut conn, &me, &keys, Duration::from_secs(5), remote)
                    .await
                    .unwrap();
            }
            conn.write_unchecked(header, payload).await.unwrap();
            conn.flush().await.unwrap();
            let got = refusal_reason(&mut conn).await;
            let got = got.unwrap_or_else(|| panic!("{reason} ({authenticated}): no ERROR"));
            assert!(got.contains(reason), "{reason} ({authenticated}): {got}");
        }
    }
    // Garbage around the record layer after a real handshake.
    let stream = TcpStream::connect(&b_addr).await.unwrap();
    let remote = stream.peer_addr().unwrap();
    let mut conn = dfs::p2p::Connection::new(stream);
    let me = dfs::p2p::Identity {
        key: dfs::identity::NodeKey::generate(),
        advertised_addr: "127.0.0.1:1".into(),
    };
    dfs::p2p::handshake::dial(&mut conn, &me, &keys, Duration::from_secs(5), remote)
        .await
        .unwrap();
    conn.get_mut()
        .write_all(b"GET / HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let got = refusal_reason(&mut conn).await.expect("an ERROR frame");
    assert!(got.contains("record of"), "{got}");
    // B still takes copies from A, and A's view of B is what it was.
    p.wait_for_each_other().await;
    let data = pseudo_random(41, 3 * CHUNK);
    put_with_metadata(&p.a, "after-garbage", HashMap::new(), &data)
        .await
        .unwrap();
    assert!(wait_for_key(&p.b, "after-garbage").await);
    assert_eq!(members(&p.b).await.len(), 2, "the attackers joined nothing");
}
