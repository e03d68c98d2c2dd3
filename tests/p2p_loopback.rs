//! The peer protocol over real loopback sockets: a server from `p2p::serve`
//! and a `PeerPool` (or a hand-driven connection, for what a well-behaved
//! pool never sends), both in this process.

// Wrapped in a module so that `cargo test p2p` selects these tests by name.
mod p2p_loopback {

    use std::collections::HashSet;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use dfs::crypto::{ClusterSecret, Keys};
    use dfs::identity::NodeKey;
    use dfs::p2p::{
        self, BodyBudget, Connection, Frame, HandshakeError, Identity, Limits, P2pError,
        PeerHandler, PeerInfo, PeerPool, handshake,
    };
    use dfs::proto::{
        GetChunk, Hello, Member, PeerError, PeerMessage, Ping, Pong, PutChunk, PutChunkReply,
        peer_message::Kind,
    };
    use prost::Message;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;
    use tokio::task::JoinHandle;

    /// Answers Ping with Pong (same members), PutChunk with a reply that echoes
    /// the body back, anything else with a PeerError; records who asked and how
    /// many requests ran at once.
    #[derive(Default)]
    struct TestHandler {
        delay: Duration,
        remotes: Mutex<Vec<SocketAddr>>,
        active: AtomicUsize,
        max_active: AtomicUsize,
    }

    impl TestHandler {
        fn slow(delay: Duration) -> Self {
            Self {
                delay,
                ..Self::default()
            }
        }

        fn distinct_remotes(&self) -> usize {
            let remotes = self.remotes.lock().unwrap();
            remotes.iter().collect::<HashSet<_>>().len()
        }
    }

    impl PeerHandler for TestHandler {
        async fn handle(
            &self,
            peer: &PeerInfo,
            msg: PeerMessage,
            body: Option<Bytes>,
        ) -> (PeerMessage, Option<Bytes>) {
            self.remotes.lock().unwrap().push(peer.remote);
            let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_active.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            self.active.fetch_sub(1, Ordering::SeqCst);
            let kind = match msg.kind {
                Some(Kind::Ping(ping)) => Kind::Pong(Pong {
                    members: ping.members,
                    chunk_count: 42,
                    ..Default::default()
                }),
                Some(Kind::PutChunk(_)) => Kind::PutChunkReply(PutChunkReply {
                    stored: body.is_some(),
                }),
                _ => Kind::Error(PeerError {
                    code: 12,
                    message: "unimplemented".into(),
                }),
            };
            (
                PeerMessage {
                    has_body: false,
                    kind: Some(kind),
                },
                body,
            )
        }
    }

    fn keys() -> Keys {
        Keys::derive(&ClusterSecret::generate())
    }

    /// A fresh node identity (a new key pair) advertising `name`.
    fn identity(name: &str) -> Identity {
        Identity {
            key: NodeKey::generate(),
            advertised_addr: format!("{name}.test:7000"),
        }
    }

    fn ping(members: &[(&str, &str)]) -> PeerMessage {
        PeerMessage {
            has_body: false,
            kind: Some(Kind::Ping(Ping {
                members: members
                    .iter()
                    .map(|(id, addr)| Member {
                        node_id: (*id).into(),
                        addr: (*addr).into(),
                    })
                    .collect(),
                ..Default::default()
            })),
        }
    }

    fn put_chunk() -> PeerMessage {
        PeerMessage {
            has_body: false, // the pool sets it from the body
            kind: Some(Kind::PutChunk(PutChunk {
                chunk_id: Bytes::from_static(&[0xab; 20]),
                lease: None,
            })),
        }
    }

    /// Deterministic, non-repeating bytes, so a misplaced frame shows.
    fn pattern(len: usize) -> Bytes {
        let mut x = 0x1234_5678u32;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect::<Vec<u8>>()
            .into()
    }

    struct Server {
        addr: String,
        identity: Identity,
        stop: watch::Sender<bool>,
        task: JoinHandle<()>,
        handler: Arc<TestHandler>,
    }

    async fn start(keys: Keys, limits: Limits, handler: TestHandler) -> Server {
        start_with_budget(keys, limits, handler, None).await
    }

    async fn start_with_budget(
        keys: Keys,
        limits: Limits,
        handler: TestHandler,
        budget: Option<Arc<dyn BodyBudget>>,
    ) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = watch::channel(false);
        let handler = Arc::new(handler);
        let identity = identity("server");
        let task = tokio::spawn(p2p::serve(
            listener,
            identity.clone(),
            keys,
            limits,
            handler.clone(),
            budget,
            stopped,
        ));
        Server {
            addr,
            identity,
            stop,
            task,
            handler,
        }
    }

    fn quick_limits() -> Limits {
        Limits {
            handshake_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            ..Limits::default()
        }
    }

    /// An authenticated connection driven by hand.
    async fn raw_dial(addr: &str, keys: &Keys) -> Connection<TcpStream> {
        let stream = TcpStream::connect(addr).await.unwrap();
        let remote = stream.peer_addr().unwrap();
        let mut conn = Connection::new(stream);
        handshake::dial(
            &mut conn,
            &identity("raw"),
            keys,
            Duration::from_secs(2),
            remote,
        )
        .await
        .unwrap();
        conn
    }

    /// Reads until the peer closes; returns the ERROR reason if it sent one.
    /// Fails the test if the peer keeps the connection open.
    async fn closed_with(conn: &mut Connection<TcpStream>) -> Option<String> {
        let mut reason = None;
        loop {
            let next = tokio::time::timeout(Duration::from_secs(5), conn.read_frame())
                .await
                .expect("the peer should close the connection");
            match next {
                Ok(Some(Frame::Error(r))) => reason = Some(r),
                Ok(Some(other)) => panic!("unexpected frame {other:?}"),
                Ok(None) | Err(_) => return reason,
            }
        }
    }

    #[tokio::test]
    async fn ping_gets_pong_without_a_body() {
        let keys = keys();
        let server = start(keys.clone(), quick_limits(), TestHandler::default()).await;
        let pool = PeerPool::new(identity("client"), keys, quick_limits());
        let reply = pool
            .request(&server.addr, ping(&[("n1", "127.0.0.1:7001")]), None)
            .await
            .unwrap();
        let Some(Kind::Pong(pong)) = reply.msg.kind else {
            panic!("expected a pong, got {:?}", reply.msg)
        };
        assert_eq!(pong.members.len(), 1);
        assert_eq!(pong.members[0].addr, "127.0.0.1:7001");
        assert_eq!(pong.chunk_count, 42);
        assert!(reply.body.is_none() && !reply.msg.has_body);
        assert_eq!(reply.peer.node_id, server.identity.node_id());
        assert_eq!(&reply.peer.public_key, server.identity.key.public());
        assert_eq!(reply.peer.advertised_addr, "server.test:7000");
        assert_eq!(reply.peer.remote.to_string(), server.addr);
    }

    #[tokio::test]
    async fn bodies_round_trip_byte_exact_small_and_5_mib() {
        let keys = keys();
        let server = start(keys.clone(), quick_limits(), TestHandler::default()).await;
        let pool = PeerPool::new(identity("client"), keys, quick_limits());
        for len in [1, 16, 1024 * 1024, 1024 * 1024 + 1, 5 * 1024 * 1024 + 7] {
            let body = pattern(len);
            let reply = pool
                .request(&server.addr, put_chunk(), Some(body.clone()))
                .await
                .unwrap();
            assert!(reply.msg.has_body);
            assert!(matches!(
                reply.msg.kind,
                Some(Kind::PutChunkReply(PutChunkReply { stored: true }))
            ));
            assert_eq!(reply.body.as_deref(), Some(&body[..]), "{len}-byte body");
        }
    }

    #[tokio::test]
    async fn a_5_mib_body_travels_as_1_mib_data_frames_then_end() {
        let keys = keys();
        let server = start(keys.clone(), quick_limits(), TestHandler::default()).await;
        let mut conn = raw_dial(&server.addr, &keys).await;
        let body = pattern(5 * 1024 * 1024);
        conn.write_message(&mut put_chunk(), Some(&body))
            .await
            .unwrap();
        let Some(Frame::Message(reply)) = conn.read_frame().await.unwrap() else {
            panic!("expected the reply MESSAGE")
        };
        assert!(PeerMessage::decode(reply).unwrap().has_body);
        let mut received = Vec::new();
        let mut data_frames = 0;
        loop {
            match conn.read_frame().await.unwrap().unwrap() {
                Frame::Data(piece) => {
                    assert!(piece.len() <= 1024 * 1024);
                    data_frames += 1;
                    received.extend_from_slice(&piece);
                }
                Frame::End { body_len, crc32 } => {
                    assert_eq!(body_len, body.len() as u64);
                    assert_eq!(crc32, crc32fast::hash(&body));
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(data_frames, 5);
        assert_eq!(received, body);
    }

    #[tokio::test]
    async fn different_cluster_secrets_refuse_each_other_on_both_sides() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let acceptor = tokio::spawn(async move {
            let (stream, remote) = listener.accept().await.unwrap();
            let mut conn = Connection::new(stream);
            let result = handshake::accept(
                &mut conn,
                &identity("server"),
                &keys(),
                Duration::from_secs(2),
                remote,
            )
            .await;
            if let Err(e) = &result {
                conn.close_after(e).await;
            }
            result
        });
        let pool = PeerPool::new(identity("client"), keys(), quick_limits());
        let dialer = pool.request(&addr, ping(&[]), None).await;
        assert!(
            matches!(dialer, Err(P2pError::Handshake(HandshakeError::AuthFailed))),
            "dialer: {dialer:?}"
        );
        let acceptor = acceptor.await.unwrap();
        assert!(
            matches!(
                acceptor,
                Err(P2pError::Handshake(HandshakeError::AuthFailed))
            ),
            "acceptor: {acceptor:?}"
        );
    }

    #[tokio::test]
    async fn a_pool_with_another_secret_is_refused_by_a_running_server() {
        let server = start(keys(), quick_limits(), TestHandler::default()).await;
        let pool = PeerPool::new(identity("client"), keys(), quick_limits());
        let result = pool.request(&server.addr, ping(&[]), None).await;
        assert!(matches!(
            result,
            Err(P2pError::Handshake(HandshakeError::AuthFailed))
        ));
        assert!(server.handler.remotes.lock().unwrap().is_empty());
    }

    /// Sends a Hello with the given magic and version by hand; returns the
    /// reason of the ERROR frame the server answers with before closing.
    async fn refused_hello(magic: &str, version: u32) -> String {
        let server = start(keys(), quick_limits(), TestHandler::default()).await;
        let stream = TcpStream::connect(&server.addr).await.unwrap();
        let mut conn = Connection::new(stream);
        let hello = PeerMessage {
            has_body: false,
            kind: Some(Kind::Hello(Hello {
                magic: magic.into(),
                version,
                noise: Bytes::from_static(&[9; 32]),
            })),
        };
        conn.write_frame(&Frame::message(&hello).unwrap())
            .await
            .unwrap();
        conn.flush().await.unwrap();
        closed_with(&mut conn).await.expect("an ERROR frame")
    }

    #[tokio::test]
    async fn wrong_version_is_refused_with_the_reason_in_an_error_frame() {
        // Version 1 is the plaintext protocol before Noise: a node of that
        // version is told why in words its operator can act on.
        assert_eq!(
            refused_hello("dfs-peer", 1).await,
            "protocol version 1 is not supported (this node speaks 2)"
        );
        assert_eq!(
            refused_hello("dfs-peer", 3).await,
            "protocol version 3 is not supported (this node speaks 2)"
        );
    }

    #[tokio::test]
    async fn wrong_magic_is_refused_with_the_reason_in_an_error_frame() {
        let reason = refused_hello("not-dfs", 2).await;
        assert!(reason.contains("bad magic \"not-dfs\""), "{reason}");
    }

    #[tokio::test]
    async fn a_node_refuses_a_connection_to_itself() {
        let keys = keys();
        let server = start(keys.clone(), quick_limits(), TestHandler::default()).await;
        let pool = PeerPool::new(server.identity.clone(), keys, quick_limits());
        match pool.request(&server.addr, ping(&[]), None).await {
            Err(P2pError::Handshake(HandshakeError::SelfConnection(id))) => {
                assert_eq!(id, server.identity.node_id())
            }
            other => panic!("{other:?}"),
        }
    }

    /// Frames a misbehaving peer sends (header, payload, unchecked), and a
    /// piece of the reason the server must close with.
    const BAD_FRAMES: &[(&str, [u8; 5], &[u8], &str)] = &[
        (
            "unknown kind",
            [9, 0, 0, 0, 1],
            &[0],
            "unknown frame kind 9",
        ),
        (
            "oversized length",
            [1, 0xff, 0xff, 0xff, 0xff],
            &[],
            "exceeds the",
        ),
        (
            "bad protobuf",
            [1, 0, 0, 0, 3],
            &[0xff, 0xff, 0xff],
            "bad peer message",
        ),
        (
            "DATA before any message",
            [2, 0, 0, 0, 1],
            &[7],
            "unexpected DATA frame",
        ),
        (
            "END of the wrong size",
            [3, 0, 0, 0, 5],
            &[0; 5],
            "END frame of 5 bytes",
        ),
    ];

    /// A record of the right size for a frame header, not sealed by the
    /// peer's key.
    const FORGED_RECORD: [u8; 23] = {
        let mut r = [0x55u8; 23];
        r[0] = 0;
        r[1] = 21;
        r
    };

    /// Bytes written straight to the socket, around the record layer.
    const RAW_BYTES: &[(&str, &[u8])] = &[
        ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("a plaintext frame", &[1, 0, 0, 0, 2, 0x22, 0x00]),
        ("a forged header record", &FORGED_RECORD),
    ];

    /// Reads what the server sends until it closes: its ERROR reason, if any.
    /// Proves the server acted on the attack (it closed this connection).
    async fn attack_outcome(conn: &mut Connection<TcpStream>) -> Option<String> {
        closed_with(conn).await
    }

    #[tokio::test]
    async fn malformed_frames_before_and_after_the_handshake_close_only_their_connection() {
        let keys = keys();
        let server = start(keys.clone(), quick_limits(), TestHandler::default()).await;
        let pool = PeerPool::new(identity("client"), keys.clone(), quick_limits());
        pool.request(&server.addr, ping(&[]), None).await.unwrap();
        assert_eq!(pool.idle_connections(&server.addr), 1);
        for authenticated in [false, true] {
            for (what, header, payload, reason) in BAD_FRAMES {
                let mut conn = if authenticated {
                    raw_dial(&server.addr, &keys).await
                } else {
                    Connection::new(TcpStream::connect(&server.addr).await.unwrap())
                };
                eprintln!("attack {what} (authenticated: {authenticated})");
                conn.write_unchecked(*header, payload).await.unwrap();
                conn.flush().await.unwrap();
                let got = attack_outcome(&mut conn).await;
                let got = got.unwrap_or_else(|| panic!("{what} ({authenticated}): no ERROR"));
                assert!(got.contains(reason), "{what} ({authenticated}): {got}");
                // The pooled connection opened before is still served.
                pool.request(&server.addr, ping(&[]), None).await.unwrap();
            }
        }
        for (what, bytes) in RAW_BYTES {
            eprintln!("raw attack {what}");
            let mut conn = raw_dial(&server.addr, &keys).await;
            conn.get_mut().write_all(bytes).await.unwrap();
            conn.get_mut().flush().await.unwrap();
            let got = attack_outcome(&mut conn).await;
            let got = got.unwrap_or_else(|| panic!("{what}: no ERROR"));
            assert!(
                got.contains("record of") || got.contains("failed authentication"),
                "{what}: {got}"
            );
            pool.request(&server.addr, ping(&[]), None).await.unwrap();
        }
        // Cut off inside a frame, before and after the handshake: closed
        // without a reply (there is nobody left to read one).
        for authenticated in [false, true] {
            let mut conn = if authenticated {
                raw_dial(&server.addr, &keys).await
            } else {
                Connection::new(TcpStream::connect(&server.addr).await.unwrap())
            };
            conn.get_mut().write_all(&[1, 0, 0]).await.unwrap();
            conn.get_mut().shutdown().await.unwrap();
            attack_outcome(&mut conn).await;
        }
        // Every request the handler saw came over the pool's one connection.
        assert_eq!(server.handler.distinct_remotes(), 1);
        let served = server.handler.remotes.lock().unwrap().len();
        assert_eq!(served, 1 + BAD_FRAMES.len() * 2 + RAW_BYTES.len());
    }

    async fn send_body_with_end(
        addr: &str,
        keys: &Keys,
        body: &[u8],
        end: Frame,
    ) -> Option<String> {
        let mut conn = raw_dial(addr, keys).await;
        let mut msg = put_chunk();
        msg.has_body = true;
        conn.write_frame(&Frame::message(&msg).unwrap())
            .await
            .unwrap();
        conn.write_frame(&Frame::Data(Bytes::copy_from_slice(body)))
            .await
            .unwrap();
        conn.write_frame(&end).await.unwrap();
        conn.flush().await.unwrap();
        closed_with(&mut conn).await
    }

    #[tokio::test]
    async fn a_body_that_does_not_match_its_end_frame_is_rejected() {
        let keys = keys();
        let server = start(keys.clone(), quick_limits(), TestHandler::default()).await;
        let body = b"sealed chunk bytes";
        let crc = crc32fast::hash(body);
        let bad_crc = Frame::End {
            body_len: body.len() as u64,
            crc32: crc ^ 1,
        };
        let bad_len = Frame::End {
            body_len: body.len() as u64 + 1,
            crc32: crc,
        };
        for end in [bad_crc, bad_len] {
            let reason = send_body_with_end(&server.addr, &keys, body, end).await;
            let reason = reason.expect("an ERROR frame");
            assert!(reason.contains("does not match its END"), "{reason}");
        }
        assert!(server.handler.remotes.lock().unwrap().is_empty());
        // The good END is accepted on the same server.
        let mut conn = raw_dial(&server.addr, &keys).await;
        conn.write_message(&mut put_chunk(), Some(&Bytes::from_static(body)))
            .await
            .unwrap();
        let reply = conn.read_message(1024).await.unwrap().unwrap();
        assert_eq!(reply.body.as_deref(), Some(&body[..]));
    }

    #[tokio::test]
    async fn a_reply_body_that_does_not_match_its_end_frame_fails_the_request() {
        let keys = keys();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server_keys = keys.clone();
        tokio::spawn(async move {
            let (stream, remote) = listener.accept().await.unwrap();
            let mut conn = Connection::new(stream);
            let server = identity("server");
            handshake::accept(
                &mut conn,
                &server,
                &server_keys,
                Duration::from_secs(2),
                remote,
            )
            .await
            .unwrap();
            conn.read_message(1024).await.unwrap().unwrap();
            let mut reply = put_chunk();
            reply.has_body = true;
            conn.write_frame(&Frame::message(&reply).unwrap())
                .await
                .unwrap();
            conn.write_frame(&Frame::Data(Bytes::from_static(b"abc")))
                .await
                .unwrap();
            conn.write_frame(&Frame::End {
                body_len: 3,
                crc32: 0,
            })
            .await
            .unwrap();
            conn.flush().await.unwrap();
            closed_with(&mut conn).await
        });
        let pool = PeerPool::new(identity("client"), keys, quick_limits());
        let result = pool.request(&addr, ping(&[]), None).await;
        assert!(
            matches!(
                result,
                Err(P2pError::BodyMismatch {
                    expected_len: 3,
                    actual_len: 3,
                    ..
                })
            ),
            "{result:?}"
        );
        assert_eq!(
            pool.idle_connections(&addr),
            0,
            "a failed connection is dropped"
        );
    }

    #[tokio::test]
    async fn a_body_over_max_body_is_refused_before_it_ends() {
        let keys = keys();
        let limits = Limits {
            max_body: 1000,
            ..quick_limits()
        };
        let server = start(keys.clone(), limits, TestHandler::default()).await;
        // By hand: two 600-byte DATA frames and no END; the server answers
        // after the second frame without waiting for the rest.
        let mut conn = raw_dial(&server.addr, &keys).await;
        let mut msg = put_chunk();
        msg.has_body = true;
        conn.write_frame(&Frame::message(&msg).unwrap())
            .await
            .unwrap();
        for _ in 0..2 {
            conn.write_frame(&Frame::Data(pattern(600))).await.unwrap();
        }
        conn.flush().await.unwrap();
        let reason = closed_with(&mut conn).await.expect("an ERROR frame");
        assert_eq!(reason, "body exceeds the 1000-byte limit");
        // Through the pool: the server's ERROR frame becomes a Remote error.
        let pool = PeerPool::new(identity("client"), keys, quick_limits());
        let result = pool
            .request(&server.addr, put_chunk(), Some(pattern(1001)))
            .await;
        assert!(
            matches!(&result, Err(P2pError::Remote(r)) if r.contains("1000-byte")),
            "{result:?}"
        );
        let ok = pool
            .request(&server.addr, put_chunk(), Some(pattern(1000)))
            .await;
        assert_eq!(ok.unwrap().body.unwrap().len(), 1000);
    }

    #[tokio::test]
    async fn the_pool_reuses_one_connection_for_sequential_requests() {
        let keys = keys();
        let server = start(keys.clone(), quick_limits(), TestHandler::default()).await;
        let pool = PeerPool::new(identity("client"), keys, quick_limits());
        for _ in 0..10 {
            pool.request(&server.addr, ping(&[]), None).await.unwrap();
        }
        assert_eq!(server.handler.remotes.lock().unwrap().len(), 10);
        assert_eq!(server.handler.distinct_remotes(), 1);
        assert_eq!(pool.idle_connections(&server.addr), 1);
        pool.forget(&server.addr);
        assert_eq!(pool.idle_connections(&server.addr), 0);
        pool.request(&server.addr, ping(&[]), None).await.unwrap();
        assert_eq!(server.handler.distinct_remotes(), 2);
    }

    #[tokio::test]
    async fn the_pool_opens_at_most_per_peer_connections_for_concurrent_requests() {
        let keys = keys();
        let handler = TestHandler::slow(Duration::from_millis(50));
        let server = start(keys.clone(), quick_limits(), handler).await;
        let limits = Limits {
            per_peer_connections: 3,
            ..quick_limits()
        };
        let pool = PeerPool::new(identity("client"), keys, limits);
        let requests = (0..12).map(|_| {
            let pool = pool.clone();
            let addr = server.addr.clone();
            tokio::spawn(async move { pool.request(&addr, ping(&[]), None).await })
        });
        for request in requests.collect::<Vec<_>>() {
            request.await.unwrap().unwrap();
        }
        assert_eq!(server.handler.distinct_remotes(), 3);
        assert_eq!(server.handler.max_active.load(Ordering::SeqCst), 3);
        assert_eq!(pool.idle_connections(&server.addr), 3);
    }

    #[tokio::test]
    async fn the_request_timeout_fires_against_a_slow_handler() {
        let keys = keys();
        let handler = TestHandler::slow(Duration::from_secs(30));
        let server = start(keys.clone(), quick_limits(), handler).await;
        let limits = Limits {
            request_timeout: Duration::from_millis(300),
            ..quick_limits()
        };
        let pool = PeerPool::new(identity("client"), keys, limits);
        let started = Instant::now();
        let result = pool.request(&server.addr, ping(&[]), None).await;
        assert!(matches!(result, Err(P2pError::Timeout(_))), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(pool.idle_connections(&server.addr), 0);
    }

    #[tokio::test]
    async fn the_server_closes_idle_connections_and_the_pool_notices() {
        let keys = keys();
        let limits = Limits {
            idle_timeout: Duration::from_millis(200),
            ..quick_limits()
        };
        let server = start(keys.clone(), limits, TestHandler::default()).await;
        let pool = PeerPool::new(identity("client"), keys, quick_limits());
        pool.request(&server.addr, ping(&[]), None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        // The idle connection was closed by the server; the pool dials anew.
        pool.request(&server.addr, ping(&[]), None).await.unwrap();
        assert_eq!(server.handler.distinct_remotes(), 2);
    }

    #[tokio::test]
    async fn the_server_stops_on_shutdown() {
        let keys = keys();
        let server = start(keys.clone(), quick_limits(), TestHandler::default()).await;
        let pool = PeerPool::new(identity("client"), keys, quick_limits());
        pool.request(&server.addr, ping(&[]), None).await.unwrap();
        server.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(3), server.task)
            .await
            .expect("serve returns after shutdown")
            .unwrap();
        // Nothing listens any more, and the pooled connection was closed.
        assert!(TcpStream::connect(&server.addr).await.is_err());
        assert!(pool.request(&server.addr, ping(&[]), None).await.is_err());
    }

    #[tokio::test]
    async fn an_unknown_request_kind_reaches_the_handler() {
        let keys = keys();
        let server = start(keys.clone(), quick_limits(), TestHandler::default()).await;
        let pool = PeerPool::new(identity("client"), keys.clone(), quick_limits());
        let get = PeerMessage {
            has_body: false,
            kind: Some(Kind::GetChunk(GetChunk::default())),
        };
        let reply = pool.request(&server.addr, get, None).await.unwrap();
        assert!(matches!(
            reply.msg.kind,
            Some(Kind::Error(PeerError { code: 12, .. }))
        ));
        // A kind unknown to this build decodes as `kind: None`, also handled.
        let mut conn = raw_dial(&server.addr, &keys).await;
        conn.write_frame(&Frame::Message(Bytes::from_static(&[0xfa, 0x01, 0x00])))
            .await
            .unwrap();
        conn.flush().await.unwrap();
        let reply = conn.read_message(1024).await.unwrap().unwrap();
        assert!(matches!(reply.msg.kind, Some(Kind::Error(_))));
    }

    #[tokio::test]
    async fn an_address_that_refuses_connections_is_an_io_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let pool = PeerPool::new(identity("client"), keys(), quick_limits());
        let result = pool.request(&addr, ping(&[]), None).await;
        assert!(matches!(result, Err(P2pError::Io(_))), "{result:?}");
    }

    #[tokio::test]
    async fn a_reused_connection_closed_by_the_peer_is_retried_once_on_a_new_one() {
        let keys = keys();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server_keys = keys.clone();
        // Connection 1 answers one request, then takes the next one and
        // closes without a reply (a close racing the reuse); connection 2
        // answers normally.
        let server = tokio::spawn(async move {
            let mut answered = 0;
            for first_conn in [true, false] {
                let (stream, remote) = listener.accept().await.unwrap();
                let mut conn = Connection::new(stream);
                let me = identity("server");
                handshake::accept(&mut conn, &me, &server_keys, Duration::from_secs(2), remote)
                    .await
                    .unwrap();
                conn.read_message(1024).await.unwrap().unwrap();
                let mut pong = PeerMessage {
                    has_body: false,
                    kind: Some(Kind::Pong(Pong::default())),
                };
                conn.write_message(&mut pong, None).await.unwrap();
                answered += 1;
                if first_conn {
                    conn.read_message(1024).await.unwrap().unwrap();
                }
            }
            answered
        });
        let pool = PeerPool::new(identity("client"), keys, quick_limits());
        pool.request(&addr, ping(&[]), None).await.unwrap();
        pool.request(&addr, ping(&[]), None).await.unwrap();
        assert_eq!(server.await.unwrap(), 2);
    }
}
