//! Frames: the unit of the peer wire.
//!
//! Every frame is `kind: u8 | len: u32 big-endian | payload[len]`. Each kind
//! has a hard cap on `len`, checked from the 5-byte header alone, so a reader
//! knows whether to accept a frame before it allocates a byte for it. The
//! byte-level specification is in `docs/PROTOCOL.md`, "The peer protocol".

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;

use super::P2pError;
use crate::proto::PeerMessage;

/// Length of a frame header: one kind byte and a big-endian `u32` length.
pub const HEADER_LEN: usize = 5;
/// Cap on a MESSAGE payload. Control messages are small; the largest are
/// index batches, which their senders page well below this.
pub const MAX_MESSAGE_LEN: usize = 4 * 1024 * 1024;
/// Cap on a DATA payload, and the size senders cut bodies into: large enough
/// that framing costs nothing, small enough to keep per-frame buffers modest.
pub const MAX_DATA_LEN: usize = 1024 * 1024;
/// The exact END payload: body length `u64` BE, then CRC-32 `u32` BE.
pub const END_LEN: usize = 12;
/// Cap on an ERROR reason: a sentence for a log line, not a document.
pub const MAX_ERROR_LEN: usize = 64 * 1024;

/// The kind byte of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// A protobuf `PeerMessage`.
    Message = 1,
    /// Raw body bytes.
    Data = 2,
    /// End of a body: its length and CRC-32.
    End = 3,
    /// A UTF-8 reason, sent before closing on a protocol error.
    Error = 4,
}

impl FrameKind {
    /// The kind for a wire byte, if it is one.
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Self::Message),
            2 => Some(Self::Data),
            3 => Some(Self::End),
            4 => Some(Self::Error),
            _ => None,
        }
    }

    /// The largest payload a frame of this kind may carry.
    pub const fn cap(self) -> usize {
        match self {
            Self::Message => MAX_MESSAGE_LEN,
            Self::Data => MAX_DATA_LEN,
            Self::End => END_LEN,
            Self::Error => MAX_ERROR_LEN,
        }
    }
}

impl fmt::Display for FrameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Message => "MESSAGE",
            Self::Data => "DATA",
            Self::End => "END",
            Self::Error => "ERROR",
        })
    }
}

/// One decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// The encoded `PeerMessage`, kept as bytes: the handshake hashes the
    /// exact payload, and decoding is the message layer's business.
    Message(Bytes),
    /// A piece of a body; never empty.
    Data(Bytes),
    /// The end of a body.
    End { body_len: u64, crc32: u32 },
    /// The peer's reason for closing.
    Error(String),
}

impl Frame {
    /// A MESSAGE frame holding `msg`; fails if the encoding passes the cap.
    pub fn message(msg: &PeerMessage) -> Result<Self, P2pError> {
        let len = msg.encoded_len();
        check_len(FrameKind::Message, len)?;
        Ok(Self::Message(Bytes::from(msg.encode_to_vec())))
    }

    /// The END frame that closes `body`.
    pub fn end_of(body: &[u8]) -> Self {
        Self::End {
            body_len: body.len() as u64,
            crc32: crc32fast::hash(body),
        }
    }

    /// An ERROR frame with `reason`, cut at a character boundary to fit the
    /// cap: the reason is advice for a human, and must never itself be the
    /// cause of a failure.
    pub fn error(reason: &str) -> Self {
        let mut end = reason.len().min(MAX_ERROR_LEN);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        Self::Error(reason[..end].to_owned())
    }

    /// This frame's kind.
    pub fn kind(&self) -> FrameKind {
        match self {
            Self::Message(_) => FrameKind::Message,
            Self::Data(_) => FrameKind::Data,
            Self::End { .. } => FrameKind::End,
            Self::Error(_) => FrameKind::Error,
        }
    }

    /// The payload length on the wire.
    pub fn payload_len(&self) -> usize {
        match self {
            Self::Message(b) | Self::Data(b) => b.len(),
            Self::End { .. } => END_LEN,
            Self::Error(s) => s.len(),
        }
    }

    /// The header of this frame, after checking that the frame is one a peer
    /// would accept: a sender never puts on the wire what the receiver must
    /// refuse.
    pub fn header(&self) -> Result<[u8; HEADER_LEN], P2pError> {
        let len = self.payload_len();
        check_len(self.kind(), len)?;
        let mut header = [0u8; HEADER_LEN];
        header[0] = self.kind() as u8;
        // check_len bounds len by a cap far below u32::MAX.
        header[1..].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(header)
    }

    /// The whole frame, header and payload, as one buffer.
    pub fn to_bytes(&self) -> Result<Bytes, P2pError> {
        let mut out = BytesMut::with_capacity(HEADER_LEN + self.payload_len());
        out.put_slice(&self.header()?);
        match self {
            Self::Message(b) | Self::Data(b) => out.put_slice(b),
            Self::End { body_len, crc32 } => {
                out.put_u64(*body_len);
                out.put_u32(*crc32);
            }
            Self::Error(s) => out.put_slice(s.as_bytes()),
        }
        Ok(out.freeze())
    }

    /// Validates a header; returns the kind and payload length. This is the
    /// only gate between the wire and an allocation, so every size rule that
    /// can be judged from the header is judged here.
    pub fn parse_header(header: [u8; HEADER_LEN]) -> Result<(FrameKind, usize), P2pError> {
        let kind = FrameKind::from_byte(header[0]).ok_or(P2pError::UnknownFrameKind(header[0]))?;
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        check_len(kind, len)?;
        Ok((kind, len))
    }

    /// Builds a frame from a validated header's kind and its full payload.
    pub fn from_payload(kind: FrameKind, payload: Bytes) -> Result<Self, P2pError> {
        check_len(kind, payload.len())?;
        Ok(match kind {
            FrameKind::Message => Self::Message(payload),
            FrameKind::Data => Self::Data(payload),
            FrameKind::End => {
                let (len, crc) = payload.split_at(8);
                Self::End {
                    body_len: u64::from_be_bytes(len.try_into().map_err(|_| P2pError::BadEnd(8))?),
                    crc32: u32::from_be_bytes(crc.try_into().map_err(|_| P2pError::BadEnd(8))?),
                }
            }
            FrameKind::Error => Self::Error(
                String::from_utf8(payload.to_vec()).map_err(|_| P2pError::BadErrorText)?,
            ),
        })
    }
}

/// The per-kind length rules.
fn check_len(kind: FrameKind, len: usize) -> Result<(), P2pError> {
    match kind {
        FrameKind::End if len != END_LEN => Err(P2pError::BadEnd(len)),
        FrameKind::Data if len == 0 => Err(P2pError::EmptyData),
        _ if len > kind.cap() => Err(P2pError::FrameTooLarge {
            kind,
            len,
            cap: kind.cap(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Ping, peer_message::Kind};

    fn decode(wire: &[u8]) -> Result<Frame, P2pError> {
        let header: [u8; HEADER_LEN] = wire[..HEADER_LEN].try_into().unwrap();
        let (kind, len) = Frame::parse_header(header)?;
        assert_eq!(wire.len(), HEADER_LEN + len, "test input holds one frame");
        Frame::from_payload(kind, Bytes::copy_from_slice(&wire[HEADER_LEN..]))
    }

    fn header(kind: u8, len: u32) -> [u8; HEADER_LEN] {
        let mut h = [kind, 0, 0, 0, 0];
        h[1..].copy_from_slice(&len.to_be_bytes());
        h
    }

    #[test]
    fn every_kind_round_trips() {
        let msg = PeerMessage {
            has_body: false,
            kind: Some(Kind::Ping(Ping::default())),
        };
        let frames = [
            Frame::message(&msg).unwrap(),
            Frame::Message(Bytes::new()),
            Frame::Data(Bytes::from_static(b"body bytes")),
            Frame::end_of(b"body bytes"),
            Frame::error("protocol version 2 is not supported (this node speaks 1)"),
            Frame::error(""),
        ];
        for frame in frames {
            let wire = frame.to_bytes().unwrap();
            assert_eq!(wire[0], frame.kind() as u8);
            assert_eq!(decode(&wire).unwrap(), frame);
        }
    }

    #[test]
    fn end_frame_is_length_then_crc_big_endian() {
        let wire = Frame::end_of(b"hello").to_bytes().unwrap();
        let mut expected = vec![3, 0, 0, 0, 12];
        expected.extend_from_slice(&5u64.to_be_bytes());
        expected.extend_from_slice(&0x3610_a686u32.to_be_bytes()); // CRC-32("hello")
        assert_eq!(&wire[..], &expected[..]);
    }

    #[test]
    fn lengths_at_the_cap_pass_and_one_more_fails() {
        for kind in [FrameKind::Message, FrameKind::Data, FrameKind::Error] {
            let cap = kind.cap();
            assert_eq!(
                Frame::parse_header(header(kind as u8, cap as u32)).unwrap(),
                (kind, cap)
            );
            match Frame::parse_header(header(kind as u8, cap as u32 + 1)) {
                Err(P2pError::FrameTooLarge {
                    kind: k,
                    len,
                    cap: c,
                }) => {
                    assert_eq!((k, len, c), (kind, cap + 1, cap));
                }
                other => panic!("{kind}: {other:?}"),
            }
        }
        assert!(matches!(
            Frame::parse_header(header(2, u32::MAX)),
            Err(P2pError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn end_must_be_exactly_twelve_bytes() {
        assert!(Frame::parse_header(header(3, 12)).is_ok());
        for len in [0, 11, 13, u32::MAX] {
            assert!(matches!(
                Frame::parse_header(header(3, len)),
                Err(P2pError::BadEnd(_))
            ));
        }
    }

    #[test]
    fn unknown_kinds_are_refused() {
        for kind in [0u8, 5, 9, 255] {
            assert!(matches!(
                Frame::parse_header(header(kind, 1)),
                Err(P2pError::UnknownFrameKind(k)) if k == kind
            ));
        }
    }

    #[test]
    fn zero_length_data_is_refused_both_ways() {
        assert!(matches!(
            Frame::parse_header(header(2, 0)),
            Err(P2pError::EmptyData)
        ));
        assert!(matches!(
            Frame::Data(Bytes::new()).to_bytes(),
            Err(P2pError::EmptyData)
        ));
    }

    #[test]
    fn encoder_refuses_what_the_decoder_would() {
        let big = Bytes::from(vec![7u8; MAX_DATA_LEN + 1]);
        assert!(matches!(
            Frame::Data(big).to_bytes(),
            Err(P2pError::FrameTooLarge { .. })
        ));
        let exact = Bytes::from(vec![7u8; MAX_DATA_LEN]);
        assert_eq!(
            Frame::Data(exact).to_bytes().unwrap().len(),
            HEADER_LEN + MAX_DATA_LEN
        );
    }

    #[test]
    fn error_reason_must_be_utf8_and_is_truncated_to_fit() {
        assert!(matches!(
            Frame::from_payload(FrameKind::Error, Bytes::from_static(&[0xff, 0xfe])),
            Err(P2pError::BadErrorText)
        ));
        let long = "é".repeat(MAX_ERROR_LEN);
        let Frame::Error(cut) = Frame::error(&long) else {
            unreachable!()
        };
        assert!(cut.len() <= MAX_ERROR_LEN && cut.len() >= MAX_ERROR_LEN - 1);
        assert!(Frame::Error(cut).to_bytes().is_ok());
    }
}
