//! The secure channel's limits over real loopback sockets: bodies paid from
//! a budget, the pre-authentication timeout and per-source cap, and
//! handshake messages and records reflected back at their sender.

// Wrapped in a module so that `cargo test p2p` selects these tests by name.
mod p2p_channel {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use dfs::crypto::{ClusterSecret, Keys};
    use dfs::identity::NodeKey;
    use dfs::p2p::noise::Handshake;
    use dfs::p2p::{
        self, BodyBudget, BodyPermit, Connection, Frame, HandshakeError, Identity, Limits,
        P2pError, PeerHandler, PeerInfo, PeerPool, handshake,
    };
    use dfs::proto::{Auth, Hello, PeerMessage, Ping, Pong, PutChunk, peer_message::Kind};
    use prost::Message;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpSocket, TcpStream};
    use tokio::sync::{Semaphore, watch};

    /// Answers every request with a Pong; counts requests, and records the
    /// budget held while a body was in its hands.
    #[derive(Default)]
    struct Handler {
        requests: AtomicUsize,
        budget_seen: AtomicUsize,
        budget: Option<Arc<CountingBudget>>,
    }

    impl PeerHandler for Handler {
        async fn handle(
            &self,
            _peer: &PeerInfo,
            _msg: PeerMessage,
            body: Option<Bytes>,
        ) -> (PeerMessage, Option<Bytes>) {
            self.requests.fetch_add(1, Ordering::SeqCst);
            if let (Some(_), Some(budget)) = (&body, &self.budget) {
                let held = budget.held.load(Ordering::SeqCst);
                self.budget_seen.store(held, Ordering::SeqCst);
            }
            let pong = PeerMessage {
                has_body: false,
                kind: Some(Kind::Pong(Pong::default())),
            };
            (pong, None)
        }
    }

    /// A byte budget with a gate: `acquire` waits for the gate's permits,
    /// and `held` counts the bytes out.
    struct CountingBudget {
        gate: Arc<Semaphore>,
        held: Arc<AtomicUsize>,
        /// Calls to `acquire` so far (granted or waiting).
        asked: AtomicUsize,
    }

    struct CountingPermit {
        _permit: tokio::sync::OwnedSemaphorePermit,
        bytes: usize,
        held: Arc<AtomicUsize>,
    }

    impl Drop for CountingPermit {
        fn drop(&mut self) {
            self.held.fetch_sub(self.bytes, Ordering::SeqCst);
        }
    }

    impl BodyBudget for CountingBudget {
        fn acquire(&self, bytes: usize) -> Pin<Box<dyn Future<Output = BodyPermit> + Send + '_>> {
            Box::pin(async move {
                self.asked.fetch_add(1, Ordering::SeqCst);
                let permit = self
                    .gate
                    .clone()
                    .acquire_many_owned(bytes as u32)
                    .await
                    .unwrap();
                self.held.fetch_add(bytes, Ordering::SeqCst);
                Box::new(CountingPermit {
                    _permit: permit,
                    bytes,
                    held: self.held.clone(),
                }) as BodyPermit
            })
        }
    }

    fn keys() -> Keys {
        Keys::derive(&ClusterSecret::generate())
    }

    fn identity(name: &str) -> Identity {
        Identity {
            key: NodeKey::generate(),
            advertised_addr: format!("{name}.test:7000"),
        }
    }

    fn ping() -> PeerMessage {
        PeerMessage {
            has_body: false,
            kind: Some(Kind::Ping(Ping::default())),
        }
    }

    fn put_chunk() -> PeerMessage {
        PeerMessage {
            has_body: false,
            kind: Some(Kind::PutChunk(PutChunk {
                chunk_id: Bytes::from_static(&[1; 20]),
                lease: None,
            })),
        }
    }

    fn limits() -> Limits {
        Limits {
            handshake_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            ..Limits::default()
        }
    }

    struct Server {
        addr: String,
        handler: Arc<Handler>,
        _stop: watch::Sender<bool>,
    }

    async fn serve(keys: Keys, limits: Limits, handler: Handler) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = watch::channel(false);
        let handler = Arc::new(handler);
        let budget = handler.budget.clone().map(|b| b as Arc<dyn BodyBudget>);
        tokio::spawn(p2p::serve(
            listener,
            identity("server"),
            keys,
            limits,
            handler.clone(),
            budget,
            stopped,
        ));
        Server {
            addr,
            handler,
            _stop: stop,
        }
    }

    async fn poll_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn request_bodies_are_paid_from_the_budget_until_dropped() {
        let keys = keys();
        let budget = Arc::new(CountingBudget {
            gate: Arc::new(Semaphore::new(64 << 20)),
            held: Arc::default(),
            asked: AtomicUsize::new(0),
        });
        let handler = Handler {
            budget: Some(budget.clone()),
            ..Handler::default()
        };
        let server = serve(keys.clone(), limits(), handler).await;
        let pool = PeerPool::new(identity("client"), keys, limits());
        let body = Bytes::from(vec![7u8; 5 << 20]);
        pool.request(&server.addr, put_chunk(), Some(body))
            .await
            .unwrap();
        let seen = server.handler.budget_seen.load(Ordering::SeqCst);
        assert!(seen >= 5 << 20, "the handler held a body paid {seen} bytes");
        poll_until("the budget to come back", || {
            budget.held.load(Ordering::SeqCst) == 0
        })
        .await;
    }

    #[tokio::test]
    async fn a_body_is_not_read_before_its_budget_is_granted() {
        let keys = keys();
        let gate = Arc::new(Semaphore::new(0));
        let budget = Arc::new(CountingBudget {
            gate: gate.clone(),
            held: Arc::default(),
            asked: AtomicUsize::new(0),
        });
        let handler = Handler {
            budget: Some(budget.clone()),
            ..Handler::default()
        };
        let server = serve(keys.clone(), limits(), handler).await;
        let pool = PeerPool::new(identity("client"), keys, limits());
        let request = {
            let (pool, addr) = (pool.clone(), server.addr.clone());
            tokio::spawn(async move {
                pool.request(&addr, put_chunk(), Some(Bytes::from(vec![1u8; 1 << 20])))
                    .await
            })
        };
        // The request is on the wire and waits for budget: proof it had its
        // chance to be handled, and was not.
        poll_until("the server to ask for budget", || {
            budget.asked.load(Ordering::SeqCst) == 1
        })
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(server.handler.requests.load(Ordering::SeqCst), 0);
        gate.add_permits(16 << 20);
        request.await.unwrap().unwrap();
        assert_eq!(server.handler.requests.load(Ordering::SeqCst), 1);
    }

    /// Reads until the peer closes; `Err` if it stays open for `limit`.
    async fn closes_within(stream: &mut TcpStream, limit: Duration) -> Result<(), ()> {
        let mut sink = [0u8; 256];
        let read_all = async { while stream.read(&mut sink).await.unwrap_or(0) > 0 {} };
        tokio::time::timeout(limit, read_all).await.map_err(|_| ())
    }

    #[tokio::test]
    async fn a_connection_that_never_completes_the_handshake_is_closed_in_time() {
        let limits = Limits {
            handshake_timeout: Duration::from_millis(300),
            ..limits()
        };
        let server = serve(keys(), limits, Handler::default()).await;
        let started = Instant::now();
        let mut idle = TcpStream::connect(&server.addr).await.unwrap();
        closes_within(&mut idle, Duration::from_secs(5))
            .await
            .expect("the server closes a silent connection");
        assert!(started.elapsed() >= Duration::from_millis(250));
        // One that sends a Hello and then stalls is closed the same way.
        let mut stalled = TcpStream::connect(&server.addr).await.unwrap();
        let hello = PeerMessage {
            has_body: false,
            kind: Some(Kind::Hello(Hello {
                magic: "dfs-peer".into(),
                version: handshake::VERSION,
                noise: Bytes::from(
                    Handshake::new(&NodeKey::generate(), &[0; 32], true, None)
                        .unwrap()
                        .write(&[])
                        .unwrap(),
                ),
            })),
        };
        let frame = Frame::message(&hello).unwrap().to_bytes().unwrap();
        stalled.write_all(&frame).await.unwrap();
        closes_within(&mut stalled, Duration::from_secs(5))
            .await
            .expect("the server closes a stalled handshake");
    }

    async fn connect_from(source: &str, addr: &str) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        socket.connect(addr.parse().unwrap()).await.unwrap()
    }

    #[tokio::test]
    async fn one_source_address_holds_at_most_its_unauthenticated_slots() {
        let keys = keys();
        let limits = Limits {
            max_unauthenticated_per_source: 2,
            handshake_timeout: Duration::from_secs(30),
            ..limits()
        };
        let server = serve(keys.clone(), limits, Handler::default()).await;
        let mut held = vec![
            connect_from("127.0.0.2", &server.addr).await,
            connect_from("127.0.0.2", &server.addr).await,
        ];
        // The third from the same address is closed at once, long before
        // the handshake timeout, while the first two stay open.
        let mut third = connect_from("127.0.0.2", &server.addr).await;
        closes_within(&mut third, Duration::from_secs(5))
            .await
            .expect("a third unauthenticated connection is closed at once");
        for stream in &held {
            let mut probe = [0u8; 1];
            assert!(
                matches!(stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
                "the first two are still open"
            );
        }
        // Another address is not affected.
        let pool = PeerPool::new(identity("client"), keys.clone(), Limits::default());
        pool.request(&server.addr, ping(), None).await.unwrap();
        // Slots come back when those connections end.
        held.clear();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stream = connect_from("127.0.0.2", &server.addr).await;
            let remote = stream.peer_addr().unwrap();
            let mut conn = Connection::new(stream);
            let me = identity("late");
            match handshake::dial(&mut conn, &me, &keys, Duration::from_secs(5), remote).await {
                Ok(_) => break,
                Err(e) => assert!(Instant::now() < deadline, "no slot came back: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A server that sends every frame it reads back to its sender.
    async fn mirror() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut conn = Connection::new(stream);
                    while let Ok(Some(frame)) = conn.read_frame().await {
                        if conn.write_frame(&frame).await.is_err() || conn.flush().await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_handshake_message_reflected_at_its_sender_is_refused() {
        // At the dialer: its own Hello comes back where the acceptor's is due.
        let pool = PeerPool::new(identity("client"), keys(), limits());
        let result = pool.request(&mirror().await, ping(), None).await;
        assert!(
            matches!(
                result,
                Err(P2pError::Handshake(
                    HandshakeError::AuthFailed | HandshakeError::Unexpected(_)
                ))
            ),
            "{result:?}"
        );
        // At the acceptor: its own message 2 comes back where message 3 is
        // due (the attacker holds no cluster key, but may hold the server's
        // own words).
        let keys = keys();
        let server = serve(keys.clone(), limits(), Handler::default()).await;
        let mut conn = Connection::new(TcpStream::connect(&server.addr).await.unwrap());
        let mut noise = Handshake::new(&NodeKey::generate(), &[0; 32], true, None).unwrap();
        let hello = |noise: Vec<u8>| PeerMessage {
            has_body: false,
            kind: Some(Kind::Hello(Hello {
                magic: "dfs-peer".into(),
                version: handshake::VERSION,
                noise: noise.into(),
            })),
        };
        conn.write_frame(&Frame::message(&hello(noise.write(&[]).unwrap())).unwrap())
            .await
            .unwrap();
        conn.flush().await.unwrap();
        let Some(Frame::Message(theirs)) = conn.read_frame().await.unwrap() else {
            panic!("expected the server's Hello")
        };
        let Some(Kind::Hello(theirs)) = PeerMessage::decode(theirs).unwrap().kind else {
            panic!("expected the server's Hello")
        };
        let reflected = PeerMessage {
            has_body: false,
            kind: Some(Kind::Auth(Auth {
                noise: theirs.noise,
            })),
        };
        conn.write_frame(&Frame::message(&reflected).unwrap())
            .await
            .unwrap();
        conn.flush().await.unwrap();
        let mut reason = None;
        while let Ok(Some(frame)) = conn.read_frame().await {
            if let Frame::Error(r) = frame {
                reason = Some(r);
            }
        }
        assert_eq!(reason.as_deref(), Some(p2p::AUTH_FAILED_REASON));
        assert_eq!(server.handler.requests.load(Ordering::SeqCst), 0);
    }

    /// Relays the handshake, then sends the dialer's records back to it
    /// instead of on to the acceptor.
    async fn record_reflector(target: String) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut dialer, _) = listener.accept().await.unwrap();
            let mut acceptor = TcpStream::connect(&target).await.unwrap();
            // Two cleartext frames each way, in turn.
            for _ in 0..2 {
                for dialer_speaks in [true, false] {
                    let (r, w) = if dialer_speaks {
                        (&mut dialer, &mut acceptor)
                    } else {
                        (&mut acceptor, &mut dialer)
                    };
                    let mut head = [0u8; 5];
                    r.read_exact(&mut head).await.unwrap();
                    let len = u32::from_be_bytes(head[1..].try_into().unwrap()) as usize;
                    let mut payload = vec![0u8; len];
                    r.read_exact(&mut payload).await.unwrap();
                    w.write_all(&head).await.unwrap();
                    w.write_all(&payload).await.unwrap();
                }
            }
            let mut buf = [0u8; 4096];
            loop {
                let n = dialer.read(&mut buf).await.unwrap_or(0);
                if n == 0 || dialer.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_record_reflected_at_its_sender_is_refused() {
        let keys = keys();
        let server = serve(keys.clone(), limits(), Handler::default()).await;
        let via = record_reflector(server.addr.clone()).await;
        let pool = PeerPool::new(identity("client"), keys, limits());
        let result = pool.request(&via, ping(), None).await;
        assert!(matches!(result, Err(P2pError::RecordAuth)), "{result:?}");
        assert_eq!(server.handler.requests.load(Ordering::SeqCst), 0);
    }
}
