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

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

fn pool() -> std::sync::MutexGuard<'static, Vec<Vec<u8>>> {
    // A Vec of Vecs cannot be left half-updated by a panic.
    POOL.lock().unwrap_or_else(|p| p.into_inner())
}

/// An empty buffer with room for at least `capacity` bytes (and at most
/// twice that, so a small request does not take a large buffer).
pub fn take(capacity: usize) -> Vec<u8> {
    if capacity >= MIN_CAPACITY {
        let mut pool = pool();
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

/// Returns a buffer to the pool (or frees it when the pool is full).
pub fn give(buf: Vec<u8>) {
    if buf.capacity() < MIN_CAPACITY {
        return;
    }
    let mut pool = pool();
    if pool.len() < POOLED {
        pool.push(buf);
    }
}

/// A buffer lent out as [`Bytes`], with something that must live exactly as
/// long as it (a budget permit, say).
struct Lent<G> {
    data: Vec<u8>,
    _guard: G,
}

impl<G> AsRef<[u8]> for Lent<G> {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl<G> Drop for Lent<G> {
    fn drop(&mut self) {
        give(std::mem::take(&mut self.data));
    }
}

/// Shares `data` as [`Bytes`]; when the last reference is dropped, `guard`
/// is dropped and the buffer goes back to the pool.
pub fn lend<G: Send + 'static>(data: Vec<u8>, guard: G) -> Bytes {
    Bytes::from_owner(Lent {
        data,
        _guard: guard,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lent_buffers_come_back_for_reuse() {
        let mut buf = take(3 << 20);
        buf.extend_from_slice(&[7u8; 100]);
        let ptr = buf.as_ptr();
        let bytes = lend(buf, ());
        let slice = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(&slice[..], &[7u8; 10]);
        drop(slice);
        // Other tests share the pool; the buffer is back unless one took it.
        let again = take(3 << 20);
        assert!(again.is_empty());
        if again.as_ptr() == ptr {
            assert!(again.capacity() >= 3 << 20);
        }
        assert!(take(100).capacity() >= 100, "small requests are not pooled");
    }
}
