//! Keeps `docs/PROTOCOL.md` ("The peer protocol") true: its hex examples
//! must be exactly what the encoder produces (the handshake and record
//! examples from a handshake run with the fixed keys the document names),
//! and its numbers and reason texts must be the ones in the code.

// Wrapped in a module so that `cargo test p2p` selects these tests by name.
mod p2p_protocol_doc {
    use std::io::Cursor;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use dfs::crypto::{ClusterSecret, Keys};
    use dfs::identity::NodeKey;
    use dfs::p2p::frame::{MAX_DATA_LEN, MAX_ERROR_LEN, MAX_MESSAGE_LEN};
    use dfs::p2p::noise::{MAX_RECORD_PLAINTEXT, NOISE_PARAMS};
    use dfs::p2p::{AUTH_FAILED_REASON, Connection, Frame, HandshakeError, Identity, handshake};
    use dfs::proto::{Member, PeerMessage, Ping, PutChunk, peer_message::Kind};
    use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};

    fn doc() -> String {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md");
        let text = std::fs::read_to_string(path).expect("docs/PROTOCOL.md");
        let start = text
            .find("## The peer protocol")
            .expect("a peer protocol section");
        let rest = &text[start + 1..];
        let end = rest.find("\n## ").map_or(rest.len(), |i| i + 1);
        rest[..end].to_owned()
    }

    /// The bytes of the example between `<!-- p2p-example: name -->` and
    /// `<!-- /p2p-example -->`: hex pairs, `#` starting a comment.
    fn example(name: &str) -> Vec<u8> {
        let doc = doc();
        let open = format!("<!-- p2p-example: {name} -->");
        let start = doc
            .find(&open)
            .unwrap_or_else(|| panic!("no example {name}"))
            + open.len();
        let len = doc[start..]
            .find("<!-- /p2p-example -->")
            .expect("closing marker");
        let mut bytes = Vec::new();
        for line in doc[start..start + len].lines() {
            if line.starts_with("```") {
                continue;
            }
            let data = line.split('#').next().unwrap_or("");
            for token in data.split_whitespace() {
                let byte = u8::from_str_radix(token, 16)
                    .unwrap_or_else(|_| panic!("{name}: {token:?} is not a hex byte"));
                assert_eq!(token.len(), 2, "{name}: {token:?}");
                bytes.push(byte);
            }
        }
        assert!(!bytes.is_empty(), "{name}: no bytes");
        bytes
    }

    fn ping() -> PeerMessage {
        PeerMessage {
            has_body: false,
            kind: Some(Kind::Ping(Ping {
                members: vec![Member {
                    node_id: "n1".into(),
                    addr: "10.0.0.2:7000".into(),
                }],
                chunk_count: 3,
                ..Default::default()
            })),
        }
    }

    fn put_chunk() -> PeerMessage {
        PeerMessage {
            has_body: false,
            kind: Some(Kind::PutChunk(PutChunk {
                chunk_id: Bytes::from_static(&[0xab; 20]),
                lease: None,
            })),
        }
    }

    #[tokio::test]
    async fn the_ping_example_is_what_the_encoder_produces() {
        let wire = Frame::message(&ping()).unwrap().to_bytes().unwrap();
        assert_eq!(hex::encode(&wire), hex::encode(example("ping-message")));
        let bytes = example("ping-message");
        let mut conn = Connection::new(Cursor::new(bytes));
        let incoming = conn.read_message(1024).await.unwrap().unwrap();
        assert_eq!(incoming.msg, ping());
        assert!(incoming.body.is_none());
    }

    #[tokio::test]
    async fn the_put_chunk_example_is_what_the_encoder_produces() {
        let mut conn = Connection::new(Cursor::new(Vec::new()));
        let body = Bytes::from_static(b"hello");
        conn.write_message(&mut put_chunk(), Some(&body))
            .await
            .unwrap();
        let written = conn.get_ref().get_ref().clone();
        assert_eq!(
            hex::encode(&written),
            hex::encode(example("put-chunk-request"))
        );
        let mut conn = Connection::new(Cursor::new(example("put-chunk-request")));
        let incoming = conn.read_message(1024).await.unwrap().unwrap();
        assert!(incoming.msg.has_body);
        assert_eq!(incoming.body.as_deref(), Some(&b"hello"[..]));
    }

    #[test]
    fn the_documented_numbers_and_reasons_are_the_codes() {
        let doc = doc();
        for needle in [
            format!("4 MiB ({MAX_MESSAGE_LEN})"),
            format!("1 MiB ({MAX_DATA_LEN})"),
            format!("64 KiB ({MAX_ERROR_LEN})"),
            format!(
                "magic: \"{}\", version: {}",
                handshake::MAGIC,
                handshake::VERSION
            ),
            NOISE_PARAMS.to_owned(),
            format!("{MAX_RECORD_PLAINTEXT} bytes"),
            format!("{} bytes", handshake::MAX_HANDSHAKE_FRAME),
            "\"dfs peer noise psk v2\"".to_owned(),
            "\"dfs node id v1\"".to_owned(),
            AUTH_FAILED_REASON.to_owned(),
            HandshakeError::VersionMismatch { theirs: 1, ours: 2 }.to_string(),
            HandshakeError::IdMismatch {
                claimed: "<claimed>".into(),
                derived: "<derived>".into(),
            }
            .to_string(),
            HandshakeError::WrongMagic("<magic>".into()).to_string(),
        ] {
            // Compared with whitespace collapsed: the doc wraps long lines.
            let flat = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
            assert!(
                flat(&doc).contains(&flat(&needle)),
                "the doc does not say {needle:?}"
            );
        }
    }

    /// A stream that copies everything written through it into a log.
    struct Tee {
        inner: DuplexStream,
        log: Arc<Mutex<Vec<u8>>>,
    }

    impl AsyncRead for Tee {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Tee {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
            if let Poll::Ready(Ok(n)) = &poll {
                self.log.lock().unwrap().extend_from_slice(&buf[..*n]);
            }
            poll
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    fn key32(hex_text: &str) -> [u8; 32] {
        let mut k = [0u8; 32];
        hex::decode_to_slice(hex_text, &mut k).unwrap();
        k
    }

    /// The fixed inputs the document names: RFC 7748's Alice (dialer) and
    /// Bob (acceptor) as static keys, ephemerals 0x11.. and 0x22.., the
    /// cluster secret 00 01 .. 1f.
    fn fixed_run() -> (Vec<u8>, Vec<u8>, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let secret_file = dir.path().join("cluster.key");
        let secret: String = (0u8..32).map(|b| format!("{b:02x}")).collect();
        std::fs::write(&secret_file, secret).unwrap();
        let keys = Keys::derive(&ClusterSecret::read_file(&secret_file).unwrap());
        let dialer = Identity {
            key: NodeKey::from_private(key32(
                "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
            )),
            advertised_addr: "10.0.0.1:7000".into(),
        };
        let acceptor = Identity {
            key: NodeKey::from_private(key32(
                "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
            )),
            advertised_addr: "10.0.0.2:7000".into(),
        };
        let (a, b) = tokio::io::duplex(1 << 20);
        let (dial_log, accept_log) = (Arc::default(), Arc::default());
        let mut d = Connection::new(Tee {
            inner: a,
            log: Arc::clone(&dial_log),
        });
        let mut c = Connection::new(Tee {
            inner: b,
            log: Arc::clone(&accept_log),
        });
        let remote = "192.0.2.1:1".parse().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let (dialed, accepted) = tokio::join!(
                handshake::dial_with_fixed_ephemeral(&mut d, &dialer, &keys, remote, &[0x11; 32]),
                handshake::accept_with_fixed_ephemeral(
                    &mut c,
                    &acceptor,
                    &keys,
                    remote,
                    &[0x22; 32]
                ),
            );
            let (dialed, accepted) = (dialed.unwrap(), accepted.unwrap());
            assert_eq!(dialed.node_id, acceptor.node_id());
            assert_eq!(accepted.node_id, dialer.node_id());
            d.write_message(&mut ping(), None).await.unwrap();
            let got = c.read_message(1024).await.unwrap().unwrap();
            assert_eq!(got.msg, ping());
        });
        let dial_bytes = dial_log.lock().unwrap().clone();
        let accept_bytes = accept_log.lock().unwrap().clone();
        (
            dial_bytes,
            accept_bytes,
            dialer.node_id().to_owned(),
            acceptor.node_id().to_owned(),
        )
    }

    /// Splits a capture into its frames (`kind u8 | len u32`) for the first
    /// `frames` frames, then the rest.
    fn split_frames(mut bytes: &[u8], frames: usize) -> (Vec<Vec<u8>>, Vec<u8>) {
        let mut out = Vec::new();
        for _ in 0..frames {
            let len = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
            out.push(bytes[..5 + len].to_vec());
            bytes = &bytes[5 + len..];
        }
        (out, bytes.to_vec())
    }

    #[test]
    fn the_handshake_and_record_examples_are_what_the_code_sends() {
        let (dialer, acceptor, dialer_id, acceptor_id) = fixed_run();
        let (d_frames, d_records) = split_frames(&dialer, 2);
        let (a_frames, a_rest) = split_frames(&acceptor, 2);
        assert!(
            a_rest.is_empty(),
            "the acceptor sent nothing after its Auth"
        );
        let examples = [
            ("hello-dialer", &d_frames[0]),
            ("hello-acceptor", &a_frames[0]),
            ("auth-dialer", &d_frames[1]),
            ("auth-acceptor", &a_frames[1]),
            ("ping-records", &d_records),
        ];
        // `DFS_DUMP_EXAMPLES=1 cargo test --test p2p_protocol_doc` prints the
        // examples, for updating the document after a deliberate change.
        if std::env::var_os("DFS_DUMP_EXAMPLES").is_some() {
            eprintln!("dialer {dialer_id}, acceptor {acceptor_id}");
            for (name, bytes) in examples {
                eprintln!("<!-- p2p-example: {name} -->");
                for line in bytes.chunks(16) {
                    let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
                    eprintln!("{}", hex.join(" "));
                }
            }
        }
        for (name, bytes) in examples {
            assert_eq!(
                hex::encode(bytes),
                hex::encode(example(name)),
                "example {name}"
            );
        }
        let doc = doc();
        for id in [dialer_id, acceptor_id] {
            assert!(doc.contains(&id), "the doc names node id {id}");
        }
    }
}
