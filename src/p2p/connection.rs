//! A peer connection: a byte stream that speaks only in frames and messages.
//!
//! Reads are exact: the 5-byte header first, then exactly the payload it
//! announces, into a buffer allocated for that payload alone after the header
//! passed its cap check. So a connection never holds more than one frame,
//! never reads ahead into the next one, and never allocates more than
//! `HEADER_LEN + cap` for any frame, whatever the peer sends (the DATA frames
//! of a body are read straight into the body's buffer, which `max_body`
//! bounds, checked before each frame's bytes are read). Writes go
//! through a small buffer flushed once per message, so a MESSAGE, its DATA and
//! its END leave in as few segments as the socket allows.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;

use super::P2pError;
use super::frame::{Frame, FrameKind, HEADER_LEN, MAX_DATA_LEN};
use crate::proto::PeerMessage;

/// How long a closing side waits, after its ERROR frame, for the peer to read
/// it and close. Closing with unread input makes the kernel send a reset,
/// which can destroy the ERROR frame before the peer reads it.
const LINGER: Duration = Duration::from_millis(500);

/// A message and its body, as received.
#[derive(Debug)]
pub struct Incoming {
    pub msg: PeerMessage,
    pub body: Option<Bytes>,
}

/// A framed connection over any byte stream (a `TcpStream` in production, an
/// in-memory pipe in tests).
#[derive(Debug)]
pub struct Connection<S> {
    stream: BufWriter<S>,
    /// The largest read allocation so far (header plus payload buffer), kept
    /// so tests can prove the bound in the module doc.
    peak_read_alloc: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Wraps a stream. The write buffer is 8 KiB: room for any small message
    /// and the header of the DATA frame that follows it.
    pub fn new(stream: S) -> Self {
        Self {
            stream: BufWriter::with_capacity(8 * 1024, stream),
            peak_read_alloc: 0,
        }
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        self.stream.get_ref()
    }

    /// The underlying stream, mutably: for tests and tools that must write
    /// around the frame layer (a misbehaving peer, say). Anything written
    /// here bypasses the write buffer, so flush first.
    pub fn get_mut(&mut self) -> &mut S {
        self.stream.get_mut()
    }

    /// The largest buffer (header included) this connection has allocated to
    /// read a frame. Never more than `HEADER_LEN + kind.cap()`.
    pub fn peak_read_alloc(&self) -> usize {
        self.peak_read_alloc
    }

    /// Reads one frame. `Ok(None)` means the peer closed the stream cleanly
    /// between frames; a stream that ends inside a frame is `Truncated`.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, P2pError> {
        match self.read_header().await? {
            None => Ok(None),
            Some((kind, len)) => self.read_payload(kind, len).await.map(Some),
        }
    }

    /// Reads and checks a frame header (a known kind, a length within the
    /// kind's cap). `Ok(None)` on a clean end of stream.
    async fn read_header(&mut self) -> Result<Option<(FrameKind, usize)>, P2pError> {
        let mut header = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            let n = self.stream.read(&mut header[got..]).await?;
            if n == 0 {
                return if got == 0 {
                    Ok(None)
                } else {
                    Err(P2pError::Truncated("frame header"))
                };
            }
            got += n;
        }
        Frame::parse_header(header).map(Some)
    }

    /// Reads the payload a checked header announced into a buffer of exactly
    /// that size: the cap check came first, so this is the bound.
    async fn read_payload(&mut self, kind: FrameKind, len: usize) -> Result<Frame, P2pError> {
        let mut payload = BytesMut::with_capacity(len);
        self.peak_read_alloc = self.peak_read_alloc.max(HEADER_LEN + payload.capacity());
        while payload.len() < len {
            // Limited to what is still missing: never reads past the frame.
            let missing = len - payload.len();
            if self
                .stream
                .read_buf(&mut (&mut payload).limit(missing))
                .await?
                == 0
            {
                return Err(P2pError::Truncated("frame payload"));
            }
        }
        Frame::from_payload(kind, payload.freeze())
    }

    /// Writes one frame into the write buffer; call `flush` to send it.
    pub async fn write_frame(&mut self, frame: &Frame) -> Result<(), P2pError> {
        let header = frame.header()?;
        self.stream.write_all(&header).await?;
        match frame {
            Frame::Message(b) | Frame::Data(b) => self.stream.write_all(b).await?,
            Frame::End { body_len, crc32 } => {
                self.stream.write_all(&body_len.to_be_bytes()).await?;
                self.stream.write_all(&crc32.to_be_bytes()).await?;
            }
            Frame::Error(reason) => self.stream.write_all(reason.as_bytes()).await?,
        }
        Ok(())
    }

    /// Sends everything buffered.
    pub async fn flush(&mut self) -> Result<(), P2pError> {
        self.stream.flush().await.map_err(P2pError::from)
    }

    /// Sends `msg` and, if given, `body` as DATA frames of at most 1 MiB and
    /// an END frame. Sets `has_body` from `body`, so the flag can never
    /// disagree with what follows.
    pub async fn write_message(
        &mut self,
        msg: &mut PeerMessage,
        body: Option<&Bytes>,
    ) -> Result<(), P2pError> {
        if body.is_some_and(|b| b.is_empty()) {
            return Err(P2pError::EmptyBody);
        }
        msg.has_body = body.is_some();
        self.write_frame(&Frame::message(msg)?).await?;
        if let Some(body) = body {
            let mut at = 0;
            while at < body.len() {
                let end = (at + MAX_DATA_LEN).min(body.len());
                self.write_frame(&Frame::Data(body.slice(at..end))).await?;
                at = end;
            }
            self.write_frame(&Frame::end_of(body)).await?;
        }
        self.flush().await
    }

    /// Reads one message and its body. `Ok(None)` means the peer closed the
    /// connection cleanly before the message began.
    pub async fn read_message(&mut self, max_body: usize) -> Result<Option<Incoming>, P2pError> {
        match self.read_frame().await? {
            None => Ok(None),
            Some(first) => self.finish_message(first, max_body).await.map(Some),
        }
    }

    /// Completes a message whose first frame has been read already (the
    /// server reads that frame under its idle timeout, the rest under the
    /// request timeout). An ERROR frame here is the peer's goodbye.
    pub async fn finish_message(
        &mut self,
        first: Frame,
        max_body: usize,
    ) -> Result<Incoming, P2pError> {
        let payload = match first {
            Frame::Message(payload) => payload,
            Frame::Error(reason) => return Err(P2pError::Remote(reason)),
            other => {
                return Err(P2pError::UnexpectedFrame {
                    expected: "MESSAGE",
                    got: other.kind(),
                });
            }
        };
        let msg = decode_message(payload)?;
        let body = if msg.has_body {
            Some(self.read_body(max_body).await?)
        } else {
            None
        };
        Ok(Incoming { msg, body })
    }

    /// Reads DATA frames up to END and checks the body against END. The
    /// limit is enforced as each frame's header arrives, before its bytes
    /// are read. DATA payloads go straight into one body buffer (from the
    /// process-wide pool, so a chunk-sized body costs no fresh mapping and no
    /// joining copy), which returns to the pool when the body is dropped.
    async fn read_body(&mut self, max_body: usize) -> Result<Bytes, P2pError> {
        /// First allocation for a body: one default-size sealed chunk.
        const BODY_GUESS: usize = (4 << 20) + 16;
        let mut body: Option<Vec<u8>> = None;
        let mut crc = crc32fast::Hasher::new();
        loop {
            let (kind, len) = self
                .read_header()
                .await?
                .ok_or(P2pError::Truncated("body"))?;
            if kind == FrameKind::Data {
                let buf = body
                    .get_or_insert_with(|| crate::bufpool::take(len.max(BODY_GUESS.min(max_body))));
                if buf.len() + len > max_body {
                    return Err(P2pError::BodyTooLarge { max: max_body });
                }
                let start = buf.len();
                let read = (&mut self.stream).take(len as u64).read_to_end(buf).await?;
                if read < len {
                    return Err(P2pError::Truncated("frame payload"));
                }
                crc.update(&buf[start..]);
                continue;
            }
            match self.read_payload(kind, len).await? {
                Frame::End { body_len, crc32 } => {
                    let actual_crc = crc.finalize();
                    let Some(buf) = body else {
                        return Err(P2pError::UnexpectedFrame {
                            expected: "DATA",
                            got: FrameKind::End,
                        });
                    };
                    if body_len != buf.len() as u64 || crc32 != actual_crc {
                        return Err(P2pError::BodyMismatch {
                            expected_len: body_len,
                            actual_len: buf.len() as u64,
                            expected_crc: crc32,
                            actual_crc,
                        });
                    }
                    return Ok(crate::bufpool::lend(buf, ()));
                }
                Frame::Error(reason) => return Err(P2pError::Remote(reason)),
                other => {
                    return Err(P2pError::UnexpectedFrame {
                        expected: "DATA or END",
                        got: other.kind(),
                    });
                }
            }
        }
    }

    /// Ends the connection after a failure. When `err` is the peer's protocol
    /// violation, first sends it an ERROR frame with the reason, best-effort
    /// and bounded in time, then lingers briefly so the frame is read before
    /// the close (see `LINGER`).
    pub async fn close_after(mut self, err: &P2pError) {
        if err.is_protocol_violation() {
            let _ = self.send_error(&err.wire_reason()).await;
        }
        let _ = tokio::time::timeout(LINGER, self.stream.shutdown()).await;
    }

    /// Sends an ERROR frame, half-closes, and drains the peer's input until
    /// it closes or `LINGER` passes.
    pub async fn send_error(&mut self, reason: &str) -> Result<(), P2pError> {
        let linger = async {
            self.write_frame(&Frame::error(reason)).await?;
            self.flush().await?;
            self.stream.shutdown().await?;
            let mut sink = [0u8; 4096];
            while self.stream.read(&mut sink).await? > 0 {}
            Ok::<(), P2pError>(())
        };
        tokio::time::timeout(LINGER, linger)
            .await
            .map_err(|_| P2pError::Timeout("sending an ERROR frame"))?
    }
}

impl Connection<TcpStream> {
    /// True when an idle pooled connection still looks usable: nothing is
    /// waiting to be sent and the peer has neither closed it nor sent
    /// anything unasked (a server that timed the connection out).
    pub fn is_reusable(&self) -> bool {
        if !self.stream.buffer().is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        matches!(
            self.stream.get_ref().try_read(&mut probe),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        )
    }
}

/// Decodes a MESSAGE payload.
pub fn decode_message(payload: Bytes) -> Result<PeerMessage, P2pError> {
    PeerMessage::decode(payload).map_err(|e| P2pError::BadMessage(e.to_string()))
}
