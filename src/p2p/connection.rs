//! A peer connection: a byte stream that speaks only in frames and messages.
//!
//! During the handshake frames travel in the clear (`kind | len | payload`).
//! Once [`Connection::secure`] is called with the handshake's cipher states,
//! every frame travels in Noise transport records, `len u16 BE | ciphertext`
//! with a 16-byte tag: first one record holding the 5-byte frame header, then
//! the payload cut into records of at most 65,519 bytes (the last shorter).
//! Record sizes are fixed by the frame header, so a receiver knows each
//! record's length before it arrives and refuses any other.
//!
//! Reads are exact: the header first, then exactly the payload it announces,
//! into a buffer allocated for that payload alone after the header passed its
//! cap check. So a connection never holds more than one frame, never reads
//! ahead into the next one, and never allocates more than `HEADER_LEN + cap`
//! for any frame, whatever the peer sends. The DATA frames of a body are read,
//! record by record, straight into the body's pooled buffer and decrypted
//! there in place (no scratch copy, no joining copy); `max_body` bounds the
//! body before each frame's bytes are read, and the body's buffer is paid
//! from a [`BodyBudget`] when the reader has one. Writes go through a small
//! buffer flushed once per message, so a MESSAGE, its DATA and its END leave
//! in as few segments as the socket allows.

use std::time::Duration;

use bytes::{BufMut, Bytes};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;

use super::frame::{Frame, FrameKind, HEADER_LEN, MAX_DATA_LEN};
use super::noise::{CipherState, MAX_RECORD_PLAINTEXT, TAG_LEN};
use super::{BodyBudget, BodyPermit, P2pError};
use crate::proto::PeerMessage;

/// How long a closing side waits, after its ERROR frame, for the peer to read
/// it and close. Closing with unread input makes the kernel send a reset,
/// which can destroy the ERROR frame before the peer reads it.
const LINGER: Duration = Duration::from_millis(500);
/// Bytes of a record's length prefix.
const PREFIX_LEN: usize = 2;
/// A header record on the wire: prefix, the sealed 5-byte header, its tag.
const HEADER_RECORD_LEN: usize = PREFIX_LEN + HEADER_LEN + TAG_LEN;

/// A message and its body, as received.
#[derive(Debug)]
pub struct Incoming {
    pub msg: PeerMessage,
    pub body: Option<Bytes>,
}

/// The record layer's state once the handshake is done.
struct Secure {
    send: CipherState,
    recv: CipherState,
    /// Where outgoing records are sealed: one record, prefix to tag. Grows
    /// to at most one full record (64 KiB).
    out: Vec<u8>,
}

/// A framed connection over any byte stream (a `TcpStream` in production, an
/// in-memory pipe in tests).
pub struct Connection<S> {
    stream: BufWriter<S>,
    secure: Option<Secure>,
    /// The largest read allocation so far (header plus payload buffer), kept
    /// so tests can prove the bound in the module doc.
    peak_read_alloc: usize,
}

impl<S> std::fmt::Debug for Connection<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("secure", &self.secure.is_some())
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Wraps a stream. The write buffer is 8 KiB: room for any small message
    /// and the header of the DATA frame that follows it.
    pub fn new(stream: S) -> Self {
        Self {
            stream: BufWriter::with_capacity(8 * 1024, stream),
            secure: None,
            peak_read_alloc: 0,
        }
    }

    /// Switches to records: from now on every frame is sealed with `send`
    /// and every frame read must open with `recv`. Called by the handshake.
    pub fn secure(&mut self, send: CipherState, recv: CipherState) {
        self.secure = Some(Secure {
            send,
            recv,
            out: Vec::new(),
        });
    }

    /// True once the handshake has switched the connection to records.
    pub fn is_secure(&self) -> bool {
        self.secure.is_some()
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        self.stream.get_ref()
    }

    /// The underlying stream, mutably: for tests and tools that must write
    /// around the frame layer (a misbehaving peer, say). Anything written
    /// here bypasses the write buffer and the record layer, so flush first.
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
        self.read_frame_within(usize::MAX).await
    }

    /// Reads one frame whose payload may be at most `cap` bytes (and within
    /// its kind's cap): the handshake reads with a small cap, so that a peer
    /// that has proved nothing cannot make this node allocate much.
    pub async fn read_frame_within(&mut self, cap: usize) -> Result<Option<Frame>, P2pError> {
        match self.read_header().await? {
            None => Ok(None),
            Some((kind, len)) if len > cap => Err(P2pError::FrameTooLarge { kind, len, cap }),
            Some((kind, len)) => self.read_payload(kind, len).await.map(Some),
        }
    }

    /// Reads and checks a frame header (a known kind, a length within the
    /// kind's cap). `Ok(None)` on a clean end of stream.
    async fn read_header(&mut self) -> Result<Option<(FrameKind, usize)>, P2pError> {
        let header: [u8; HEADER_LEN] = if self.secure.is_some() {
            // The prefix is judged before the rest is read: a record of the
            // wrong size is refused at once, not after waiting for it.
            let mut record = [0u8; HEADER_RECORD_LEN];
            let (prefix, rest) = record.split_at_mut(PREFIX_LEN);
            if !self.read_exact_or_eof(prefix, "record").await? {
                return Ok(None);
            }
            check_prefix(prefix, HEADER_LEN)?;
            self.read_exact(rest, "record").await?;
            let (header, tag) = rest.split_at_mut(HEADER_LEN);
            self.recv()?.open(header, &tag_of(tag))?;
            header.try_into().expect("5-byte header")
        } else {
            let mut header = [0u8; HEADER_LEN];
            if !self.read_exact_or_eof(&mut header, "frame header").await? {
                return Ok(None);
            }
            header
        };
        Frame::parse_header(header).map(Some)
    }

    /// Reads the payload a checked header announced into a buffer of exactly
    /// that size: the cap check came first, so this is the bound.
    async fn read_payload(&mut self, kind: FrameKind, len: usize) -> Result<Frame, P2pError> {
        let mut payload = Vec::with_capacity(len);
        self.peak_read_alloc = self.peak_read_alloc.max(HEADER_LEN + payload.capacity());
        self.read_payload_into(&mut payload, len).await?;
        Frame::from_payload(kind, Bytes::from(payload))
    }

    /// Appends exactly `len` payload bytes to `dst`, which has room for them:
    /// in the clear, or as records opened in place inside `dst`.
    async fn read_payload_into(&mut self, dst: &mut Vec<u8>, len: usize) -> Result<(), P2pError> {
        if self.secure.is_none() {
            return self.read_into(dst, len, "frame payload").await;
        }
        let mut left = len;
        while left > 0 {
            let n = left.min(MAX_RECORD_PLAINTEXT);
            let mut prefix = [0u8; PREFIX_LEN];
            self.read_exact(&mut prefix, "record").await?;
            check_prefix(&prefix, n)?;
            let start = dst.len();
            self.read_into(dst, n, "record").await?;
            let mut tag = [0u8; TAG_LEN];
            self.read_exact(&mut tag, "record").await?;
            self.recv()?.open(&mut dst[start..], &tag)?;
            left -= n;
        }
        Ok(())
    }

    /// Appends exactly `n` bytes from the stream to `dst` (which the caller
    /// sized), never reading past them.
    async fn read_into(
        &mut self,
        dst: &mut Vec<u8>,
        n: usize,
        what: &'static str,
    ) -> Result<(), P2pError> {
        dst.reserve_exact(n);
        let end = dst.len() + n;
        while dst.len() < end {
            let missing = end - dst.len();
            if self.stream.read_buf(&mut dst.limit(missing)).await? == 0 {
                return Err(P2pError::Truncated(what));
            }
        }
        Ok(())
    }

    async fn read_exact(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), P2pError> {
        if self.read_exact_or_eof(buf, what).await? {
            Ok(())
        } else {
            Err(P2pError::Truncated(what))
        }
    }

    /// Fills `buf`; `Ok(false)` when the stream ended before its first byte.
    async fn read_exact_or_eof(
        &mut self,
        buf: &mut [u8],
        what: &'static str,
    ) -> Result<bool, P2pError> {
        let mut got = 0;
        while got < buf.len() {
            let n = self.stream.read(&mut buf[got..]).await?;
            if n == 0 {
                return if got == 0 {
                    Ok(false)
                } else {
                    Err(P2pError::Truncated(what))
                };
            }
            got += n;
        }
        Ok(true)
    }

    fn recv(&mut self) -> Result<&mut CipherState, P2pError> {
        self.secure
            .as_mut()
            .map(|s| &mut s.recv)
            .ok_or(P2pError::Closed)
    }

    /// Writes one frame into the write buffer; call `flush` to send it.
    pub async fn write_frame(&mut self, frame: &Frame) -> Result<(), P2pError> {
        let header = frame.header()?;
        self.write_part(&header).await?;
        match frame {
            Frame::Message(b) | Frame::Data(b) => self.write_part(b).await,
            Frame::End { body_len, crc32 } => {
                let mut end = [0u8; 12];
                end[..8].copy_from_slice(&body_len.to_be_bytes());
                end[8..].copy_from_slice(&crc32.to_be_bytes());
                self.write_part(&end).await
            }
            Frame::Error(reason) => self.write_part(reason.as_bytes()).await,
        }
    }

    /// Writes a frame's header or payload: as is during the handshake, else
    /// as records of at most `MAX_RECORD_PLAINTEXT` bytes each.
    async fn write_part(&mut self, mut plain: &[u8]) -> Result<(), P2pError> {
        let Some(secure) = self.secure.as_mut() else {
            self.stream.write_all(plain).await?;
            return Ok(());
        };
        while !plain.is_empty() {
            let n = plain.len().min(MAX_RECORD_PLAINTEXT);
            let out = &mut secure.out;
            out.clear();
            // n + TAG_LEN <= 65535: the record cap is the Noise message cap.
            out.extend_from_slice(&((n + TAG_LEN) as u16).to_be_bytes());
            out.extend_from_slice(&plain[..n]);
            let tag = secure.send.seal(&mut out[PREFIX_LEN..])?;
            out.extend_from_slice(&tag);
            self.stream.write_all(out).await?;
            plain = &plain[n..];
        }
        Ok(())
    }

    /// Writes a frame without the sender-side checks of [`Frame::header`]
    /// (in the clear before the handshake, sealed in records after it), for
    /// tests that play a peer breaking the frame rules inside a valid
    /// channel. Call `flush` to send it.
    #[doc(hidden)]
    pub async fn write_unchecked(
        &mut self,
        header: [u8; HEADER_LEN],
        payload: &[u8],
    ) -> Result<(), P2pError> {
        self.write_part(&header).await?;
        self.write_part(payload).await
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

    /// Reads one message and its body (unpaid: see [`Connection::finish_message`]).
    /// `Ok(None)` means the peer closed the connection cleanly before the
    /// message began.
    pub async fn read_message(&mut self, max_body: usize) -> Result<Option<Incoming>, P2pError> {
        match self.read_frame().await? {
            None => Ok(None),
            Some(first) => self.finish_message(first, max_body, None).await.map(Some),
        }
    }

    /// Completes a message whose first frame has been read already (the
    /// server reads that frame under its idle timeout, the rest under the
    /// request timeout). A body's buffer is paid from `budget` when given.
    /// An ERROR frame here is the peer's goodbye.
    pub async fn finish_message(
        &mut self,
        first: Frame,
        max_body: usize,
        budget: Option<&dyn BodyBudget>,
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
            Some(self.read_body(max_body, budget).await?)
        } else {
            None
        };
        Ok(Incoming { msg, body })
    }

    /// Reads DATA frames up to END and checks the body against END. The
    /// limit is enforced as each frame's header arrives, before its bytes
    /// are read. DATA payloads go straight into one body buffer (from the
    /// process-wide pool, so a chunk-sized body costs no fresh mapping and no
    /// joining copy), which returns to the pool when the body is dropped,
    /// together with the budget it was paid from.
    async fn read_body(
        &mut self,
        max_body: usize,
        budget: Option<&dyn BodyBudget>,
    ) -> Result<Bytes, P2pError> {
        let mut body = BodyBuffer::default();
        let mut crc = crc32fast::Hasher::new();
        loop {
            let (kind, len) = self
                .read_header()
                .await?
                .ok_or(P2pError::Truncated("body"))?;
            if kind == FrameKind::Data {
                let start = body.buf.len();
                if start + len > max_body {
                    return Err(P2pError::BodyTooLarge { max: max_body });
                }
                body.make_room(len, max_body, budget).await;
                self.read_payload_into(&mut body.buf, len).await?;
                crc.update(&body.buf[start..]);
                continue;
            }
            match self.read_payload(kind, len).await? {
                Frame::End { body_len, crc32 } => {
                    let actual_crc = crc.finalize();
                    if body.buf.is_empty() {
                        return Err(P2pError::UnexpectedFrame {
                            expected: "DATA",
                            got: FrameKind::End,
                        });
                    }
                    if body_len != body.buf.len() as u64 || crc32 != actual_crc {
                        return Err(P2pError::BodyMismatch {
                            expected_len: body_len,
                            actual_len: body.buf.len() as u64,
                            expected_crc: crc32,
                            actual_crc,
                        });
                    }
                    return Ok(crate::bufpool::lend(body.buf, body.permits));
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

/// A body being received: its pooled buffer and the budget paid for it.
#[derive(Default)]
struct BodyBuffer {
    buf: Vec<u8>,
    permits: Vec<BodyPermit>,
}

impl BodyBuffer {
    /// Makes room for `len` more bytes, paying `budget` for the growth
    /// before allocating it. The first allocation is one default-size sealed
    /// chunk (or the whole limit, if smaller); later ones double, up to the
    /// limit, so a large chunk costs a few reallocations, not one per frame.
    async fn make_room(&mut self, len: usize, max_body: usize, budget: Option<&dyn BodyBudget>) {
        const BODY_GUESS: usize = (4 << 20) + 16;
        let needed = self.buf.len() + len;
        let capacity = self.buf.capacity();
        if needed <= capacity {
            return;
        }
        let target = if capacity == 0 {
            needed.max(BODY_GUESS.min(max_body))
        } else {
            needed.max((capacity * 2).min(max_body))
        };
        if let Some(budget) = budget {
            self.permits.push(budget.acquire(target - capacity).await);
        }
        if capacity == 0 {
            self.buf = crate::bufpool::take(target);
        } else {
            self.buf.reserve_exact(target - self.buf.len());
        }
    }
}

fn check_prefix(prefix: &[u8], plaintext: usize) -> Result<(), P2pError> {
    let got = u16::from_be_bytes([prefix[0], prefix[1]]) as usize;
    let expected = plaintext + TAG_LEN;
    if got != expected {
        return Err(P2pError::RecordLength { expected, got });
    }
    Ok(())
}

fn tag_of(bytes: &[u8]) -> [u8; TAG_LEN] {
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(bytes);
    tag
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
