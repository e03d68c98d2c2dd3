//! The binary's memory allocator: the system's, tuned per role, with large
//! blocks aligned to the device block in a node.
//!
//! Chunk files are written with `O_DIRECT` (see `store::direct`), which
//! needs the source address aligned to the device's logical block. A
//! chunk's bytes sit at the start of a large buffer (a chunk being sealed
//! at the gateway, a copy received from a peer), and glibc places a large
//! block 16 bytes past a page boundary, so every direct write first copied
//! the chunk into a bounce buffer: 12% of a receiving replica's CPU and 4%
//! of a gateway's in an R=3 upload's profile. In a node
//! ([`tune_for_node`]), every block of at least [`LARGE`] bytes is aligned
//! to [`ALIGN`], so those buffers go to the disk as they are. Smaller
//! blocks, most of them, are the system allocator's as before; growing a
//! large block keeps `realloc`'s fast path (glibc moves a mapped block with
//! `mremap`, which keeps its offset within the page, so the alignment) and
//! copies into a fresh aligned block only when the result is not aligned.
//!
//! The client commands ([`tune_for_client`]) keep freed memory for reuse
//! instead: `dfs get` receives megabyte HTTP/2 frames, and handing each
//! buffer back to the kernel cost it a page fault per 4 KiB of every frame
//! (client system time 0.6 s per GiB downloaded, 0.2 s with the buffers
//! kept).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicBool, Ordering},
};

/// A node's mmap threshold: blocks this large or larger are mapped, and
/// handed back to the kernel when freed, so the resident size does not
/// creep up with every thread that ever held a chunk buffer.
const NODE_MMAP_THRESHOLD: usize = 128 << 10;
/// Blocks of at least this many bytes are aligned to [`ALIGN`] in a node:
/// its mapped blocks, so an aligned block costs one page more of address
/// space and never fragments the heap. Chunks smaller than this (chunk
/// sizes under 128 KiB) still go to the disk through a bounce buffer.
pub const LARGE: usize = NODE_MMAP_THRESHOLD;
/// The client's mmap threshold (glibc's largest): a freed frame buffer is
/// kept in the heap for the next one.
const CLIENT_MMAP_THRESHOLD: usize = 32 << 20;
/// Free memory at the top of the client's heap beyond which glibc returns
/// it to the kernel.
const CLIENT_TRIM_THRESHOLD: usize = 64 << 20;

/// Whether large blocks are aligned (set by [`tune_for_node`]).
static ALIGN_LARGE: AtomicBool = AtomicBool::new(false);
/// The alignment of large blocks: direct I/O's.
pub const ALIGN: usize = crate::store::direct::ALIGN;
/// The alignment the system's `malloc` gives every block on the platforms
/// dfs runs on (64-bit Linux).
const MIN_ALIGN: usize = 16;

/// The system allocator, aligning blocks of [`LARGE`] bytes or more to
/// [`ALIGN`]. Installed by the `dfs` binary.
pub struct BlockAligned;

/// Tunes the allocator for a node: large blocks aligned for direct I/O and
/// handed back to the kernel when freed. Call before any thread starts.
pub fn tune_for_node() {
    ALIGN_LARGE.store(true, Ordering::Relaxed);
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator tuning; called before any threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, NODE_MMAP_THRESHOLD as libc::c_int);
    }
}

/// Tunes the allocator for the client commands: freed buffers are kept for
/// reuse. Call before any thread starts.
pub fn tune_for_client() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator tuning; called before any threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, CLIENT_MMAP_THRESHOLD as libc::c_int);
        libc::mallopt(libc::M_TRIM_THRESHOLD, CLIENT_TRIM_THRESHOLD as libc::c_int);
    }
}

/// The layout a block is really allocated with.
fn widened(layout: Layout) -> Layout {
    if layout.size() >= LARGE && layout.align() < ALIGN && ALIGN_LARGE.load(Ordering::Relaxed) {
        // Fails only for a size within ALIGN of isize::MAX, which no
        // allocation reaches; such a layout keeps its own alignment.
        Layout::from_size_align(layout.size(), ALIGN).unwrap_or(layout)
    } else {
        layout
    }
}

// SAFETY: every block comes from `System` (malloc, posix_memalign or
// realloc) with the caller's size and at least the caller's alignment, so
// it satisfies the caller's layout; every block is released by `System`'s
// `dealloc` or by `libc::free`, which on Unix are the same call whatever
// the layout.
unsafe impl GlobalAlloc for BlockAligned {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: `widened` keeps the size non-zero, as the caller's is.
        unsafe { System.alloc(widened(layout)) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        unsafe { System.alloc_zeroed(widened(layout)) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator with `layout`, so by
        // `System` with `widened(layout)`.
        unsafe { System.dealloc(ptr, widened(layout)) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let moved = if layout.align() <= MIN_ALIGN && layout.align() <= new_size {
            // SAFETY: `ptr` is a live block from `System` (malloc or
            // posix_memalign, both of which `realloc` takes), and
            // `new_size` is non-zero; the result is aligned to MIN_ALIGN,
            // which covers the caller's alignment.
            unsafe { libc::realloc(ptr.cast(), new_size).cast::<u8>() }
        } else {
            // SAFETY: as `dealloc`; `System` keeps the caller's alignment.
            unsafe { System.realloc(ptr, widened(layout), new_size) }
        };
        if moved.is_null()
            || new_size < LARGE
            || (moved as usize).is_multiple_of(ALIGN)
            || !ALIGN_LARGE.load(Ordering::Relaxed)
        {
            return moved;
        }
        // Large, but not aligned (a small block grown large, or a large
        // one the heap moved): copy it to an aligned block.
        // SAFETY: the caller's alignment with `new_size` is a valid layout,
        // and so is the same size with ALIGN (`widened` checked).
        let new = widened(unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) });
        // SAFETY: `new` has a non-zero size (at least LARGE).
        let aligned = unsafe { System.alloc(new) };
        if aligned.is_null() || !(aligned as usize).is_multiple_of(ALIGN) {
            // No memory for the copy (or no wider alignment to be had): the
            // block is still a valid answer for the caller, only slower to
            // write to disk.
            if !aligned.is_null() {
                // SAFETY: just allocated with `new`.
                unsafe { System.dealloc(aligned, new) };
            }
            return moved;
        }
        // SAFETY: both blocks are live, `new_size` bytes long, and distinct;
        // `moved` came from the system allocator, whose `free` needs no
        // layout.
        unsafe {
            std::ptr::copy_nonoverlapping(moved, aligned, new_size);
            libc::free(moved.cast());
        }
        aligned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aligned(ptr: *const u8) -> bool {
        (ptr as usize).is_multiple_of(ALIGN)
    }

    #[test]
    fn large_blocks_are_aligned_and_keep_their_bytes_when_they_grow_or_shrink() {
        // Only calls to `BlockAligned` itself see the flag: the tests'
        // global allocator is the system's.
        ALIGN_LARGE.store(true, Ordering::Relaxed);
        let a = BlockAligned;
        let small = Layout::from_size_align(100, 1).unwrap();
        let large = Layout::from_size_align(LARGE + 56, 1).unwrap();
        unsafe {
            let p = a.alloc(large);
            assert!(aligned(p), "a large block is aligned");
            for i in 0..large.size() {
                *p.add(i) = i as u8;
            }
            // Grow far (past glibc's mapping threshold) and back down.
            let q = a.realloc(p, large, 8 << 20);
            assert!(aligned(q), "a grown large block stays aligned");
            for i in 0..large.size() {
                assert_eq!(*q.add(i), i as u8);
            }
            let grown = Layout::from_size_align(8 << 20, 1).unwrap();
            let r = a.realloc(q, grown, 200);
            for i in 0..200 {
                assert_eq!(*r.add(i), i as u8);
            }
            a.dealloc(r, Layout::from_size_align(200, 1).unwrap());

            // A small block growing large.
            let s = a.alloc(small);
            for i in 0..small.size() {
                *s.add(i) = (i * 7) as u8;
            }
            let t = a.realloc(s, small, 3 << 20);
            assert!(aligned(t), "a small block grown large is aligned");
            for i in 0..small.size() {
                assert_eq!(*t.add(i), (i * 7) as u8);
            }
            a.dealloc(t, Layout::from_size_align(3 << 20, 1).unwrap());

            let z = a.alloc_zeroed(large);
            assert!(aligned(z));
            assert!((0..large.size()).all(|i| *z.add(i) == 0));
            a.dealloc(z, large);
        }
    }

    #[test]
    fn small_blocks_and_stronger_alignments_are_the_callers() {
        ALIGN_LARGE.store(true, Ordering::Relaxed);
        let a = BlockAligned;
        assert_eq!(
            widened(Layout::from_size_align(LARGE - 1, 8).unwrap()).align(),
            8
        );
        assert_eq!(
            widened(Layout::from_size_align(LARGE, 1 << 16).unwrap()).align(),
            1 << 16
        );
        let l = Layout::from_size_align(LARGE, 1 << 16).unwrap();
        unsafe {
            let p = a.alloc(l);
            assert!((p as usize).is_multiple_of(1 << 16));
            a.dealloc(p, l);
        }
    }
}
