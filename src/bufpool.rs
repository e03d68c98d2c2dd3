//! A small process-wide pool of large byte buffers.
//!
//! Chunk-sized buffers are allocated by fresh mappings (the node sets a fixed
//! mmap threshold so freed ones go back to the kernel). A new mapping costs a
//! page fault and a zeroed page per 4 KiB, which profiling showed as a tenth
//! of the CPU of a chunk's trip through a node. Reusing a few idle buffers
//! avoids that without letting idle memory grow: at most `POOLED` are kept.

use std::sync::Mutex;

use bytes::Bytes;

/// Idle buffers kept, process-wide.
const POOLED: usize = 6;
/// Buffers smaller than this are not worth pooling.
const MIN_CAPACITY: usize = 1 << 20;
/// Pooled buffers are allocated in multiples of this.
const SIZE_STEP: usize = 64 << 10;

/// A set of idle buffers. The node uses one process-wide instance.
struct Pool(Mutex<Vec<Vec<u8>>>);

static POOL: Pool = Pool::new();

impl Pool {
    const fn new() -> Self {
        Self(Mutex::new(Vec::new()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        // A Vec of Vecs cannot be left half-updated by a panic.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self, capacity: usize) -> Vec<u8> {
        if capacity >= MIN_CAPACITY {
            let mut pool = self.lock();
            if let Some(i) = pool
                .iter()
                .position(|b| b.capacity() >= capacity && b.capacity() <= 2 * capacity)
            {
                let mut buf = pool.swap_remove(i);
                buf.clear();
                return buf;
            }
            // Rounded up, so that requests a few bytes apart (a chunk to seal,
            // a chunk to read at an aligned offset) can reuse each other's.
            return Vec::with_capacity(capacity.next_multiple_of(SIZE_STEP));
        }
        Vec::with_capacity(capacity)
    }

    fn give(&self, buf: Vec<u8>) {
        if buf.capacity() < MIN_CAPACITY {
            return;
        }
        let mut pool = self.lock();
        if pool.len() < POOLED {
            pool.push(buf);
        }
    }
}

/// An empty buffer with room for at least `capacity` bytes (and at most
/// twice that, so a small request does not take a large buffer).
pub fn take(capacity: usize) -> Vec<u8> {
    POOL.take(capacity)
}

/// Returns a buffer to the pool (or frees it when the pool is full).
pub fn give(buf: Vec<u8>) {
    POOL.give(buf)
}

/// A buffer lent out as [`Bytes`], with something that must live exactly as
/// long as it (a budget permit, say).
struct Lent<G> {
    data: Vec<u8>,
    pool: &'static Pool,
    _guard: G,
}

impl<G> AsRef<[u8]> for Lent<G> {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl<G> Drop for Lent<G> {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.data));
    }
}

/// Shares `data` as [`Bytes`]; when the last reference is dropped, `guard`
/// is dropped and the buffer goes back to the pool.
pub fn lend<G: Send + 'static>(data: Vec<u8>, guard: G) -> Bytes {
    lend_to(&POOL, data, guard)
}

fn lend_to<G: Send + 'static>(pool: &'static Pool, data: Vec<u8>, guard: G) -> Bytes {
    Bytes::from_owner(Lent {
        data,
        pool,
        _guard: guard,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lent_buffers_come_back_for_reuse() {
        // A pool of its own: the node-wide one is shared with other tests.
        static LOCAL: Pool = Pool::new();
        let mut buf = LOCAL.take(3 << 20);
        buf.extend_from_slice(&[7u8; 100]);
        let ptr = buf.as_ptr();
        let guard = std::sync::Arc::new(());
        let bytes = lend_to(&LOCAL, buf, guard.clone());
        let slice = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(&slice[..], &[7u8; 10]);
        assert_eq!(
            std::sync::Arc::strong_count(&guard),
            2,
            "held while a slice lives"
        );
        drop(slice);
        assert_eq!(
            std::sync::Arc::strong_count(&guard),
            1,
            "released with the last slice"
        );
        let again = LOCAL.take(3 << 20);
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), ptr, "the lent buffer is reused");
        assert!(again.capacity() >= 3 << 20);
        // Too large a buffer for the request is not handed out.
        LOCAL.give(again);
        let small = LOCAL.take(1 << 20);
        assert_ne!(small.as_ptr(), ptr, "more than twice the request");
        let large = LOCAL.take(3 << 20);
        assert_eq!(large.as_ptr(), ptr);
    }

    #[test]
    fn the_pool_keeps_few_and_only_large_buffers() {
        static LOCAL: Pool = Pool::new();
        LOCAL.give(Vec::with_capacity(100));
        assert!(LOCAL.lock().is_empty(), "small buffers are not pooled");
        for _ in 0..POOLED + 3 {
            LOCAL.give(Vec::with_capacity(MIN_CAPACITY));
        }
        assert_eq!(LOCAL.lock().len(), POOLED, "idle buffers are bounded");
        assert!(take(100).capacity() >= 100);
    }
}
