//! Keeps `docs/PROTOCOL.md` ("The peer protocol") true: its hex examples
//! must be exactly what the encoder produces, and its numbers and reason
//! texts must be the ones in the code.

// Wrapped in a module so that `cargo test p2p` selects these tests by name.
mod p2p_protocol_doc {
    use std::io::Cursor;

    use bytes::Bytes;
    use dfs::p2p::frame::{MAX_DATA_LEN, MAX_ERROR_LEN, MAX_MESSAGE_LEN};
    use dfs::p2p::{AUTH_FAILED_REASON, Connection, Frame, HandshakeError, handshake};
    use dfs::proto::{Member, PeerMessage, Ping, PutChunk, peer_message::Kind};

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
            "\"dfs-peer-auth-v1\"".to_owned(),
            "\"dialer\" || transcript".to_owned(),
            "\"acceptor\" || transcript".to_owned(),
            AUTH_FAILED_REASON.to_owned(),
            HandshakeError::VersionMismatch { theirs: 2, ours: 1 }.to_string(),
            HandshakeError::WrongMagic("<magic>".into()).to_string(),
        ] {
            // Compared with whitespace collapsed: the doc wraps long lines.
            let flat = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
            assert!(
                flat(&doc).contains(&flat(&needle)),
                "the doc does not say {needle:?}"
            );
        }
        let transcript = handshake::transcript(b"D", b"A");
        assert_eq!(transcript, b"dfs-peer-auth-v1\0\0\0\x01D\0\0\0\x01A");
    }
}
