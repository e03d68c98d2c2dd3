//! Property tests: hostile bytes fed to the frame decoder, the message layer
//! and the accepting side of the handshake, over in-memory streams. Every
//! outcome must be a value or a typed protocol error (never a panic, never
//! an I/O error on an in-memory stream), and no read may allocate more than
//! `HEADER_LEN + cap` of the frame kind its header announced.

// Wrapped in a module so that `cargo test p2p` selects these tests by name.
mod p2p_fuzz {
    use std::net::SocketAddr;
    use std::time::Duration;

    use bytes::Bytes;
    use dfs::crypto::{ClusterSecret, Keys};
    use dfs::identity::NodeKey;
    use dfs::p2p::frame::{END_LEN, HEADER_LEN, MAX_DATA_LEN, MAX_ERROR_LEN, MAX_MESSAGE_LEN};
    use dfs::p2p::{
        Connection, Frame, FrameKind, HandshakeError, Identity, Incoming, P2pError, handshake,
    };
    use dfs::proto::{Auth, Hello, Member, PeerMessage, Ping, PutChunk, peer_message::Kind};
    use proptest::prelude::*;
    use tokio::io::{Join, Sink};

    type MemConnection<'a> = Connection<Join<&'a [u8], Sink>>;

    /// A connection that reads `input` and discards what it writes.
    fn reading(input: &[u8]) -> MemConnection<'_> {
        Connection::new(tokio::io::join(input, tokio::io::sink()))
    }

    fn block_on<F: Future>(fut: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(fut)
    }

    /// The largest cap of any kind: the bound for input of unknown shape.
    const MAX_ALLOC: usize = HEADER_LEN + MAX_MESSAGE_LEN;

    fn assert_typed(e: &P2pError) {
        assert!(
            !matches!(e, P2pError::Io(_) | P2pError::Timeout(_)),
            "an in-memory stream gave {e:?}"
        );
    }

    /// Reads frames until the end or the first error.
    fn read_all_frames(input: &[u8]) -> (Vec<Frame>, Option<P2pError>, usize) {
        block_on(async {
            let mut conn = reading(input);
            let mut frames = Vec::new();
            loop {
                match conn.read_frame().await {
                    Ok(Some(frame)) => frames.push(frame),
                    Ok(None) => return (frames, None, conn.peak_read_alloc()),
                    Err(e) => return (frames, Some(e), conn.peak_read_alloc()),
                }
            }
        })
    }

    /// Reads messages until the end or the first error.
    fn read_all_messages(input: &[u8], max_body: usize) -> (Vec<Incoming>, Option<P2pError>) {
        block_on(async {
            let mut conn = reading(input);
            let mut messages = Vec::new();
            let end = loop {
                match conn.read_message(max_body).await {
                    Ok(Some(m)) => messages.push(m),
                    Ok(None) => break None,
                    Err(e) => break Some(e),
                }
            };
            assert!(conn.peak_read_alloc() <= MAX_ALLOC);
            (messages, end)
        })
    }

    fn frame_bytes(frames: &[Frame]) -> Vec<u8> {
        frames
            .iter()
            .flat_map(|f| f.to_bytes().unwrap().to_vec())
            .collect()
    }

    /// A request as a sender would put it on the wire: MESSAGE, and when
    /// there is a body, DATA frames cut at `cuts` and an END.
    #[derive(Debug, Clone)]
    struct Wire {
        msg: PeerMessage,
        body: Option<Vec<u8>>,
        frames: Vec<Frame>,
    }

    fn arb_wire() -> impl Strategy<Value = Wire> {
        let ping = proptest::collection::vec(("[a-z0-9]{1,12}", "[0-9.:]{1,21}"), 0..4).prop_map(
            |members| {
                let members = members
                    .into_iter()
                    .map(|(node_id, addr)| Member { node_id, addr })
                    .collect();
                (
                    Kind::Ping(Ping {
                        members,
                        chunk_count: 3,
                        bytes_stored: 1 << 40,
                        ..Default::default()
                    }),
                    None,
                )
            },
        );
        let put = (
            proptest::collection::vec(any::<u8>(), 1..3000),
            proptest::collection::vec(1usize..1000, 0..5),
        )
            .prop_map(|(body, cuts)| {
                (
                    Kind::PutChunk(PutChunk {
                        chunk_id: Bytes::from_static(&[7; 20]),
                        lease: None,
                    }),
                    Some((body, cuts)),
                )
            });
        prop_oneof![ping, put].prop_map(|(kind, body)| {
            let msg = PeerMessage {
                has_body: body.is_some(),
                kind: Some(kind),
            };
            let mut frames = vec![Frame::message(&msg).unwrap()];
            let body = body.map(|(body, cuts)| {
                let mut at = 0usize;
                for cut in cuts.into_iter().chain([usize::MAX]) {
                    let end = at.saturating_add(cut).min(body.len());
                    if end > at {
                        frames.push(Frame::Data(Bytes::copy_from_slice(&body[at..end])));
                    }
                    at = end;
                }
                frames.push(Frame::end_of(&body));
                body
            });
            Wire { msg, body, frames }
        })
    }

    fn arb_stream() -> impl Strategy<Value = Vec<Wire>> {
        proptest::collection::vec(arb_wire(), 1..5)
    }

    fn cap_of(kind: u8) -> usize {
        FrameKind::from_byte(kind).map_or(0, FrameKind::cap)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn random_bytes_give_frames_or_a_typed_error(
            input in proptest::collection::vec(any::<u8>(), 0..2048)
        ) {
            let (_, err, peak) = read_all_frames(&input);
            if let Some(e) = &err {
                assert_typed(e);
            }
            prop_assert!(peak <= MAX_ALLOC);
        }

        #[test]
        fn a_header_allocates_nothing_beyond_its_kinds_cap(
            kind in 0u8..7,
            len in prop_oneof![any::<u32>(), 0u32..20, Just(MAX_DATA_LEN as u32 + 1),
                               Just(MAX_MESSAGE_LEN as u32 + 1), Just(MAX_ERROR_LEN as u32 + 1)],
            tail in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut input = vec![kind];
            input.extend_from_slice(&len.to_be_bytes());
            input.extend_from_slice(&tail);
            let (frames, err, peak) = read_all_frames(&input);
            let len = len as usize;
            let header_ok = FrameKind::from_byte(kind).is_some()
                && len <= cap_of(kind)
                && !(kind == 2 && len == 0)
                && (kind != 3 || len == END_LEN);
            if header_ok {
                // Exactly the announced payload, never more.
                prop_assert!(peak <= HEADER_LEN + len);
                prop_assert!(peak <= HEADER_LEN + cap_of(kind));
            } else {
                // Refused from the header alone: nothing allocated at all.
                prop_assert_eq!(peak, 0);
                prop_assert!(frames.is_empty());
                prop_assert!(err.is_some());
            }
            if let Some(e) = &err {
                assert_typed(e);
            }
        }

        #[test]
        fn valid_streams_decode_to_what_was_sent(wires in arb_stream()) {
            let input: Vec<u8> = wires.iter().flat_map(|w| frame_bytes(&w.frames)).collect();
            let (messages, err) = read_all_messages(&input, 1 << 20);
            prop_assert!(err.is_none(), "{:?}", err);
            prop_assert_eq!(messages.len(), wires.len());
            for (got, sent) in messages.iter().zip(&wires) {
                prop_assert_eq!(&got.msg, &sent.msg);
                prop_assert_eq!(got.body.as_deref(), sent.body.as_deref());
            }
        }

        #[test]
        fn truncated_streams_end_in_truncated_or_at_a_message_boundary(
            wires in arb_stream(),
            cut in any::<prop::sample::Index>(),
        ) {
            let input: Vec<u8> = wires.iter().flat_map(|w| frame_bytes(&w.frames)).collect();
            let cut = cut.index(input.len());
            let mut boundaries = vec![0];
            for w in &wires {
                boundaries.push(boundaries.last().unwrap() + frame_bytes(&w.frames).len());
            }
            let (messages, err) = read_all_messages(&input[..cut], 1 << 20);
            let whole = boundaries.iter().filter(|&&b| b > 0 && b <= cut).count();
            prop_assert_eq!(messages.len(), whole);
            if boundaries.contains(&cut) {
                prop_assert!(err.is_none());
            } else {
                prop_assert!(matches!(err, Some(P2pError::Truncated(_))), "{:?}", err);
            }
        }

        #[test]
        fn mutated_streams_never_panic_and_stay_typed(
            wires in arb_stream(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..6),
        ) {
            let mut input: Vec<u8> = wires.iter().flat_map(|w| frame_bytes(&w.frames)).collect();
            for (at, xor) in &flips {
                let at = at.index(input.len());
                input[at] ^= xor;
            }
            let (_, err) = read_all_messages(&input, 1 << 20);
            if let Some(e) = &err {
                assert_typed(e);
            }
        }

        #[test]
        fn one_corrupt_body_byte_is_caught_by_the_end_frame(
            body in proptest::collection::vec(any::<u8>(), 1..4000),
            at in any::<prop::sample::Index>(),
            xor in 1u8..=255,
        ) {
            let msg = PeerMessage { has_body: true, kind: Some(Kind::PutChunk(PutChunk::default())) };
            let end = Frame::end_of(&body);
            let mut corrupt = body.clone();
            corrupt[at.index(body.len())] ^= xor;
            let input = frame_bytes(&[Frame::message(&msg).unwrap(), Frame::Data(corrupt.into()), end]);
            let (messages, err) = read_all_messages(&input, 1 << 20);
            prop_assert!(messages.is_empty());
            prop_assert!(matches!(err, Some(P2pError::BodyMismatch { .. })), "{:?}", err);
        }

        #[test]
        fn end_frames_with_wrong_fields_are_rejected(
            body in proptest::collection::vec(any::<u8>(), 1..4000),
            len_delta in any::<u64>(),
            crc_xor in any::<u32>(),
        ) {
            prop_assume!(len_delta != 0 || crc_xor != 0);
            let msg = PeerMessage { has_body: true, kind: Some(Kind::PutChunk(PutChunk::default())) };
            let end = Frame::End {
                body_len: (body.len() as u64).wrapping_add(len_delta),
                crc32: crc32fast::hash(&body) ^ crc_xor,
            };
            let input = frame_bytes(&[Frame::message(&msg).unwrap(), Frame::Data(body.into()), end]);
            let (_, err) = read_all_messages(&input, 1 << 20);
            prop_assert!(matches!(err, Some(P2pError::BodyMismatch { .. })), "{:?}", err);
        }

        #[test]
        fn bodies_over_the_limit_are_refused(
            sizes in proptest::collection::vec(1usize..600, 1..8),
            max_body in 1usize..2000,
        ) {
            let total: usize = sizes.iter().sum();
            let body: Vec<u8> = (0..total).map(|i| i as u8).collect();
            let msg = PeerMessage { has_body: true, kind: Some(Kind::PutChunk(PutChunk::default())) };
            let mut frames = vec![Frame::message(&msg).unwrap()];
            let mut at = 0;
            for size in sizes {
                frames.push(Frame::Data(Bytes::copy_from_slice(&body[at..at + size])));
                at += size;
            }
            frames.push(Frame::end_of(&body));
            let (messages, err) = read_all_messages(&frame_bytes(&frames), max_body);
            if total <= max_body {
                prop_assert_eq!(messages.len(), 1);
                prop_assert!(err.is_none());
            } else {
                prop_assert!(matches!(err, Some(P2pError::BodyTooLarge { .. })), "{:?}", err);
            }
        }
    }

    // The accepting side of the handshake, fed by an attacker who holds
    // neither the cluster secret nor a node key.

    fn keys() -> Keys {
        Keys::derive(&ClusterSecret::generate())
    }

    fn remote() -> SocketAddr {
        "192.0.2.1:7000".parse().unwrap()
    }

    /// Runs the acceptor against `input`; returns its result and peak.
    fn accept(input: &[u8], keys: &Keys) -> (Result<(), P2pError>, usize) {
        block_on(async {
            let mut conn = reading(input);
            let me = Identity {
                key: NodeKey::generate(),
                advertised_addr: "127.0.0.1:7000".into(),
            };
            let result =
                handshake::accept(&mut conn, &me, keys, Duration::from_secs(1), remote()).await;
            (result.map(|_| ()), conn.peak_read_alloc())
        })
    }

    #[derive(Debug, Clone)]
    struct HelloFields {
        magic: String,
        version: u32,
        noise_len: usize,
        has_body: bool,
    }

    fn arb_hello() -> impl Strategy<Value = HelloFields> {
        (
            prop_oneof![3 => Just("dfs-peer".to_owned()), 1 => "[ -~]{0,12}"],
            prop_oneof![3 => Just(handshake::VERSION), 1 => any::<u32>()],
            prop_oneof![3 => Just(32usize), 1 => 0usize..100],
            prop_oneof![3 => Just(false), 1 => Just(true)],
        )
            .prop_map(|(magic, version, noise_len, has_body)| HelloFields {
                magic,
                version,
                noise_len,
                has_body,
            })
    }

    /// A dialer's Hello and a forged Auth (random bytes where Noise message
    /// 3 is due): what an attacker without the node keys can send.
    fn hello_then_auth(h: &HelloFields, auth_noise: &[u8]) -> Vec<u8> {
        let hello = PeerMessage {
            has_body: h.has_body,
            kind: Some(Kind::Hello(Hello {
                magic: h.magic.clone(),
                version: h.version,
                noise: vec![5; h.noise_len].into(),
            })),
        };
        let auth = PeerMessage {
            has_body: false,
            kind: Some(Kind::Auth(Auth {
                noise: Bytes::copy_from_slice(auth_noise),
            })),
        };
        frame_bytes(&[
            Frame::message(&hello).unwrap(),
            Frame::message(&auth).unwrap(),
        ])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn the_acceptor_refuses_random_bytes(
            input in proptest::collection::vec(any::<u8>(), 0..1024)
        ) {
            let (result, peak) = accept(&input, &keys());
            let err = result.expect_err("random bytes never authenticate");
            assert_typed(&err);
            prop_assert!(peak <= MAX_ALLOC);
        }

        #[test]
        fn the_acceptor_checks_every_hello_field_in_order(
            h in arb_hello(),
            forged in proptest::collection::vec(any::<u8>(), 0..120),
        ) {
            let (result, _) = accept(&hello_then_auth(&h, &forged), &keys());
            let err = result.expect_err("a forged message 3 never authenticates");
            // Noise message 1 is an ephemeral key (32 bytes, then a payload
            // in the clear); a forged message 3, whatever its length, fails
            // to decrypt.
            let expected = if h.has_body {
                "unexpected"
            } else if h.magic != "dfs-peer" {
                "magic"
            } else if h.version != handshake::VERSION {
                "version"
            } else if h.noise_len < 32 {
                "unexpected"
            } else {
                "auth"
            };
            let got = match &err {
                P2pError::Handshake(HandshakeError::Unexpected(_)) => "unexpected",
                P2pError::Handshake(HandshakeError::WrongMagic(_)) => "magic",
                P2pError::Handshake(HandshakeError::VersionMismatch { .. }) => "version",
                P2pError::Handshake(HandshakeError::AuthFailed) => "auth",
                other => panic!("untyped outcome {other:?}"),
            };
            prop_assert_eq!(got, expected, "{:?}", err);
        }

        #[test]
        fn the_acceptor_survives_mutated_handshakes(
            tag in proptest::collection::vec(any::<u8>(), 64..100),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let good = HelloFields {
                magic: "dfs-peer".into(),
                version: handshake::VERSION,
                noise_len: 32,
                has_body: false,
            };
            let mut input = hello_then_auth(&good, &tag);
            for (at, xor) in &flips {
                let at = at.index(input.len());
                input[at] ^= xor;
            }
            input.truncate(cut.index(input.len() + 1));
            let (result, peak) = accept(&input, &keys());
            let err = result.expect_err("without the secret there is no success");
            assert_typed(&err);
            prop_assert!(peak <= MAX_ALLOC);
        }
    }

    // The record layer after a real handshake: the bytes an honest dialer
    // sent, altered on the way. Whatever is altered, the acceptor delivers
    // exactly the messages before the altered one, then refuses.

    /// Fixed keys, so that a handshake replayed from captured bytes
    /// derives the same transport keys as the captured one.
    fn fixed_parties() -> (Identity, Identity, Keys) {
        static KEYS: std::sync::OnceLock<Keys> = std::sync::OnceLock::new();
        let keys = KEYS
            .get_or_init(|| Keys::derive(&ClusterSecret::generate()))
            .clone();
        let party = |b: u8| Identity {
            key: NodeKey::from_private([b; 32]),
            advertised_addr: format!("10.0.0.{b}:7000"),
        };
        (party(1), party(2), keys)
    }

    /// A stream that keeps a copy of everything read from it.
    struct Recorder {
        inner: tokio::io::DuplexStream,
        log: Vec<u8>,
    }

    impl tokio::io::AsyncRead for Recorder {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let before = buf.filled().len();
            let poll = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
            let fresh = buf.filled()[before..].to_vec();
            self.log.extend_from_slice(&fresh);
            poll
        }
    }

    impl tokio::io::AsyncWrite for Recorder {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
        }
        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// A dialer that handshakes and sends `wires`; returns its bytes as the
    /// acceptor received them: the two handshake frames, then the records.
    fn capture(wires: &[Wire]) -> (Vec<u8>, Vec<u8>) {
        use tokio::io::AsyncReadExt;
        let (dialer, acceptor, keys) = fixed_parties();
        block_on(async {
            let (a, b) = tokio::io::duplex(1 << 20);
            let mut d = Connection::new(a);
            let mut c = Connection::new(Recorder {
                inner: b,
                log: Vec::new(),
            });
            let (dialed, accepted) = tokio::join!(
                handshake::dial_with_fixed_ephemeral(&mut d, &dialer, &keys, remote(), &[3; 32]),
                handshake::accept_with_fixed_ephemeral(
                    &mut c,
                    &acceptor,
                    &keys,
                    remote(),
                    &[4; 32]
                ),
            );
            dialed.unwrap();
            accepted.unwrap();
            // Reads are exact: the log holds the handshake frames and no more.
            let handshake = std::mem::take(&mut c.get_mut().log);
            for w in wires {
                for f in &w.frames {
                    d.write_frame(f).await.unwrap();
                }
            }
            d.flush().await.unwrap();
            drop(d);
            let mut records = Vec::new();
            c.get_mut().read_to_end(&mut records).await.unwrap();
            (handshake, records)
        })
    }

    /// An acceptor that replays the captured handshake and then reads
    /// `records`: the messages it delivers, and how it stopped.
    fn replay(handshake: &[u8], records: &[u8]) -> (Vec<Incoming>, Option<P2pError>) {
        let (_, acceptor, keys) = fixed_parties();
        let input = [handshake, records].concat();
        block_on(async {
            let mut conn = reading(&input);
            handshake::accept_with_fixed_ephemeral(&mut conn, &acceptor, &keys, remote(), &[4; 32])
                .await
                .expect("the replayed handshake is the captured one");
            let mut messages = Vec::new();
            loop {
                match conn.read_message(1 << 20).await {
                    Ok(Some(m)) => messages.push(m),
                    Ok(None) => return (messages, None),
                    Err(e) => return (messages, Some(e)),
                }
            }
        })
    }

    /// Bytes a frame takes as records: a 23-byte header record, then its
    /// payload in records of at most 65519 bytes, each with a 2-byte prefix
    /// and a 16-byte tag.
    fn sealed_len(frame: &Frame) -> usize {
        let len = frame.payload_len();
        23 + len + len.div_ceil(65519) * 18
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn records_deliver_what_was_sent(wires in arb_stream()) {
            let (handshake, records) = capture(&wires);
            let (messages, err) = replay(&handshake, &records);
            prop_assert!(err.is_none(), "{:?}", err);
            prop_assert_eq!(messages.len(), wires.len());
        }

        #[test]
        fn an_altered_record_delivers_nothing_from_there_on(
            wires in arb_stream(),
            at in any::<prop::sample::Index>(),
            xor in 1u8..=255,
        ) {
            let (handshake, mut records) = capture(&wires);
            let at = at.index(records.len());
            records[at] ^= xor;
            let (messages, err) = replay(&handshake, &records);
            // Which message the altered byte belonged to.
            let mut ends = Vec::new();
            let mut total = 0;
            for w in &wires {
                total += w.frames.iter().map(sealed_len).sum::<usize>();
                ends.push(total);
            }
            prop_assert_eq!(total, records.len());
            let hit = ends.iter().position(|&end| at < end).unwrap();
            prop_assert_eq!(messages.len(), hit, "{:?}", err);
            for (got, sent) in messages.iter().zip(&wires) {
                prop_assert_eq!(&got.msg, &sent.msg);
                prop_assert_eq!(got.body.as_deref(), sent.body.as_deref());
            }
            prop_assert!(
                matches!(err, Some(P2pError::RecordAuth | P2pError::RecordLength { .. })),
                "{:?}", err
            );
        }
    }
}
