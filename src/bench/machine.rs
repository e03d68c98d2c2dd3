//! The machine's own limits, measured in the same run as the node: the
//! single-core cost of the crypto each path needs, done with the node's own
//! code (`crypto::Keys`) and timed by the thread's CPU clock (best of
//! three), the CPU one loopback TCP stream costs its sender and its
//! receiver per byte (each thread's CPU clock, best of three), and the
//! disk's sequential write + fdatasync (wall time). Every ratio the bench
//! prints divides by one of these; the loopback figures give the floor
//! under a ratio whose data crosses sockets (see [`MachineLimits::floor`]).

use std::{path::Path, time::Instant};

use aes::cipher::{KeyIvInit, StreamCipher};
use sha1::{Digest, Sha1};

use super::{MB, RandomReader};
use crate::crypto::{ClusterSecret, HEADER_LEN, IV_LEN, Keys};

/// Bytes per second, one core, unless noted.
pub(super) struct MachineLimits {
    pub sha1: f64,
    pub aes_ctr: f64,
    pub blake3: f64,
    /// What a verified read needs per byte: check a format 2 chunk's tag
    /// and decrypt it ("decrypt + verify").
    pub open: f64,
    /// What a replica, the scrubber or a dedup hit needs: the tag check.
    pub verify: f64,
    /// What an upload needs at the gateway: the whole-file SHA-1 and the
    /// seal (id, encryption, tag).
    pub seal: f64,
    /// The peer channel's AES-256-GCM (ring), paid once by the sender and
    /// once by the receiver of every byte between nodes.
    pub channel: f64,
    /// A format 1 read (AES-256-CTR, then HMAC-SHA1 of the plaintext): what
    /// a verified read needed before format 2, for comparison.
    pub open_v1: f64,
    /// One TCP stream over loopback, 1 MiB writes: bytes per CPU-second of
    /// the sending thread (which, on loopback, also runs most of the
    /// receiving side's protocol work).
    pub loopback_send: f64,
    /// The same stream's receiving thread, 1 MiB reads.
    pub loopback_recv: f64,
    pub disk_write_fdatasync: f64,
}

impl MachineLimits {
    /// Seconds of one core per GiB at `rate` bytes per second.
    pub fn secs_per_gib(rate: f64) -> f64 {
        (1u64 << 30) as f64 / rate
    }

    pub fn print(&self, disk_bytes: u64) {
        println!("machine (one core unless noted):");
        let line = |name: &str, rate: f64| println!("  {name:<46} {:>8.0} MB/s", rate / MB);
        line("SHA-1", self.sha1);
        line("AES-256-CTR", self.aes_ctr);
        line("keyed BLAKE3", self.blake3);
        line("read: tag check + decrypt (decrypt + verify)", self.open);
        line("replica, scrub: tag check", self.verify);
        line("upload: file SHA-1 + seal (id, encrypt, tag)", self.seal);
        line("peer channel: AES-256-GCM (ring)", self.channel);
        line("format 1 read: AES-256-CTR then HMAC-SHA1", self.open_v1);
        line("loopback TCP, one stream: sender", self.loopback_send);
        line("loopback TCP, one stream: receiver", self.loopback_recv);
        println!(
            "  {:<46} {:>8.0} MB/s  (4 MiB blocks, {} total)",
            "sequential write + fdatasync",
            self.disk_write_fdatasync / MB,
            crate::units::format_size(disk_bytes)
        );
    }

    /// The least CPU per GiB a path can cost on this machine: the crypto it
    /// needs (`crypto`, seconds per GiB) plus `sends` loopback sends and
    /// `recvs` loopback receives of every byte, which no user-space work
    /// avoids. A ratio target below `floor / crypto` cannot be met over
    /// loopback sockets, whatever the node does.
    pub fn floor(&self, crypto: f64, sends: f64, recvs: f64) -> f64 {
        crypto
            + sends * Self::secs_per_gib(self.loopback_send)
            + recvs * Self::secs_per_gib(self.loopback_recv)
    }
}

const CHUNK: usize = 4 << 20;
const ROUNDS: usize = 64; // 256 MiB per CPU figure

/// Runs every measurement; blocking.
pub(super) fn measure(dir: &Path, disk_bytes: u64) -> anyhow::Result<MachineLimits> {
    let mut plain = vec![0u8; CHUNK];
    RandomReader::new(0, 7).fill(&mut plain);
    let keys = Keys::derive(&ClusterSecret::generate());
    let key = [7u8; 32];
    let iv = [9u8; 16];

    let sha1 = rate(|| {
        let mut h = Sha1::new();
        for _ in 0..ROUNDS {
            h.update(&plain);
        }
        std::hint::black_box(h.finalize());
    });
    let mut buf = plain.clone();
    let aes_ctr = rate(|| {
        for _ in 0..ROUNDS {
            let mut c = ctr::Ctr128BE::<aes::Aes256>::new(&key.into(), &iv.into());
            c.apply_keystream(&mut buf);
        }
    });
    let blake3 = rate(|| {
        for _ in 0..ROUNDS {
            std::hint::black_box(blake3::keyed_hash(&key, &plain));
        }
    });
    let mut sealed = [&[0u8; HEADER_LEN][..], &plain].concat();
    let seal = rate(|| {
        let mut file = Sha1::new();
        for _ in 0..ROUNDS {
            file.update(&sealed[HEADER_LEN..]);
            std::hint::black_box(keys.seal_in_place(&mut sealed));
        }
        std::hint::black_box(file.finalize());
    });
    let id = keys.seal_in_place(&mut sealed);
    let verify = rate(|| {
        for _ in 0..ROUNDS {
            keys.verify_sealed(&sealed, &id)
                .expect("own chunk verifies");
        }
    });
    let open = rate_of_opens(&keys, &plain, HEADER_LEN, |k, b| k.seal_in_place(b));
    let open_v1 = rate_of_opens(&keys, &plain, IV_LEN, |k, b| k.seal_v1_in_place(b));
    let channel = {
        use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
        let gcm = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).expect("32-byte key"));
        rate(|| {
            for i in 0..ROUNDS {
                let nonce = Nonce::assume_unique_for_key([i as u8; 12]);
                let tag = gcm.seal_in_place_separate_tag(nonce, Aad::empty(), &mut buf);
                let _ = std::hint::black_box(tag.expect("sealed"));
            }
        })
    };
    let (loopback_send, loopback_recv) = loopback(&plain)?;
    Ok(MachineLimits {
        sha1,
        aes_ctr,
        blake3,
        open,
        verify,
        seal,
        channel,
        open_v1,
        loopback_send,
        loopback_recv,
        disk_write_fdatasync: disk(dir, disk_bytes, &plain)?,
    })
}

/// Bytes per second of `f`, which processes `ROUNDS` chunks: the best of
/// three runs, each timed by this thread's CPU clock, so that time the
/// thread spends preempted on a shared machine does not count.
fn rate(mut f: impl FnMut()) -> f64 {
    let best = (0..3)
        .map(|_| {
            let t = thread_cpu_seconds();
            f();
            thread_cpu_seconds() - t
        })
        .fold(f64::INFINITY, f64::min);
    (CHUNK * ROUNDS) as f64 / best
}

/// This thread's CPU time in seconds.
fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into the struct it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Opening decrypts in place, so every round opens a fresh sealing (made
/// outside the timed part).
fn rate_of_opens(
    keys: &Keys,
    plain: &[u8],
    header: usize,
    seal: impl Fn(&Keys, &mut [u8]) -> crate::crypto::ChunkId,
) -> f64 {
    let mut buf = vec![0u8; header + plain.len()];
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let mut spent = 0.0;
        for _ in 0..ROUNDS {
            buf[header..].copy_from_slice(plain);
            let id = seal(keys, &mut buf);
            let t = thread_cpu_seconds();
            let at = keys.open_in_place(&mut buf, &id).expect("own chunk opens");
            spent += thread_cpu_seconds() - t;
            std::hint::black_box(at);
        }
        best = best.min(spent);
    }
    (CHUNK * ROUNDS) as f64 / best
}

/// One TCP stream over 127.0.0.1: `LOOPBACK_BYTES` sent in 1 MiB writes
/// (the size of the node's download messages and peer DATA frames) and
/// read in 1 MiB reads. Returns bytes per CPU-second of the sender and of
/// the receiver, each the best of three runs by its own thread's clock.
fn loopback(block: &[u8]) -> anyhow::Result<(f64, f64)> {
    use std::io::{Read, Write};
    const LOOPBACK_BYTES: usize = 512 << 20;
    const PIECE: usize = 1 << 20;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let (mut send, mut recv) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..3 {
        let server = listener.try_clone()?;
        let receiver = std::thread::spawn(move || -> std::io::Result<(f64, usize)> {
            let (mut conn, _) = server.accept()?;
            let mut buf = vec![0u8; PIECE];
            let t = thread_cpu_seconds();
            let mut got = 0;
            loop {
                match conn.read(&mut buf)? {
                    0 => break,
                    n => got += n,
                }
            }
            Ok((thread_cpu_seconds() - t, got))
        });
        let mut conn = std::net::TcpStream::connect(addr)?;
        conn.set_nodelay(true)?;
        let t = thread_cpu_seconds();
        for i in 0..LOOPBACK_BYTES / PIECE {
            let at = i * PIECE % block.len();
            conn.write_all(&block[at..at + PIECE])?;
        }
        conn.shutdown(std::net::Shutdown::Write)?;
        send = send.min(thread_cpu_seconds() - t);
        let (spent, got) = receiver
            .join()
            .map_err(|_| anyhow::anyhow!("the loopback receiver panicked"))??;
        anyhow::ensure!(got == LOOPBACK_BYTES, "loopback: received {got} bytes");
        recv = recv.min(spent);
    }
    Ok((LOOPBACK_BYTES as f64 / send, LOOPBACK_BYTES as f64 / recv))
}

fn disk(dir: &Path, disk_bytes: u64, block: &[u8]) -> anyhow::Result<f64> {
    use std::io::Write;
    let path = dir.join("disk-test");
    let mut f = std::fs::File::create(&path)?;
    let blocks = (disk_bytes as usize).div_ceil(CHUNK).max(1);
    let t = Instant::now();
    for _ in 0..blocks {
        f.write_all(block)?;
        f.sync_data()?;
    }
    let r = (blocks * CHUNK) as f64 / t.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(r)
}
