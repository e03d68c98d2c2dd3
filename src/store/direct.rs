//! Chunk file I/O around the page cache (`O_DIRECT`), where the filesystem
//! allows it.
//!
//! Why: on the project's VM, a buffered write of a chunk cost 0.4 to 2.7
//! CPU-seconds per GiB (a copy into freshly allocated page-cache pages, the
//! largest item in an upload's profile), and a buffered read of a chunk not
//! in the cache 1.8 s per GiB; with `O_DIRECT` the same write cost 0.2 s
//! and the read 0.05 s, and the device's throughput is the same or better.
//! A node reads a chunk when a client asks for it: it keeps no cache of
//! chunk data and leaves the page cache to the index. Chunks smaller than
//! [`MIN_DIRECT`] (small objects) still go through the page cache, where a
//! copy costs nothing worth saving.
//!
//! Direct I/O needs file offsets, lengths and memory addresses aligned to
//! the device's logical block; [`ALIGN`] (4 KiB) covers 512-byte and 4 KiB
//! devices. Writes go straight from the caller's buffer when it is aligned
//! (the `dfs` binary's allocator aligns every large block, see
//! [`crate::alloc`]), else through an aligned bounce buffer; the last
//! partial block is written buffered (the fsync that follows covers both).
//! At most [`BOUNCES`] bounce buffers exist at once, and a write that finds
//! none free goes through the page cache, so their memory stays bounded
//! however many chunks are written at once. Reads land at an
//! aligned offset inside the caller's buffer, which is why they return
//! where the data starts. A filesystem that refuses `O_DIRECT` (tmpfs
//! before Linux 6.6, some network filesystems) or its alignment gets
//! buffered I/O, with the same results.

use std::{
    fs::File,
    io::{self, Read},
    os::unix::{
        fs::{FileExt, OpenOptionsExt},
        io::AsRawFd,
    },
    path::Path,
    sync::Mutex,
};

/// Alignment of direct I/O: offsets, lengths and buffer addresses.
pub const ALIGN: usize = 4096;
/// Chunks at least this large are written and read with direct I/O.
pub const MIN_DIRECT: usize = 64 << 10;
/// Extra capacity a read buffer needs beyond the file's length: room to
/// start at an aligned address, to read whole blocks, and one block more.
pub const READ_SLACK: usize = 3 * ALIGN;
/// Bytes copied to the bounce buffer and written per system call: large
/// enough that the device's throughput is reached (1 MiB writes ran as
/// fast as 4 MiB ones here), small enough to stay in the CPU's cache.
const BOUNCE: usize = 1 << 20;
/// Bounce buffers that may exist at once (each [`BOUNCE`] bytes and a
/// block): enough for the writes two cores keep busy. Chunk writes run on
/// the blocking pool, up to hundreds at once; one buffer per thread would
/// hold memory outside the buffer budget for every thread that ever wrote.
pub const BOUNCES: usize = 4;

/// The bounce buffers: idle ones, and how many exist in all.
static BOUNCE_POOL: Mutex<BouncePool> = Mutex::new(BouncePool {
    idle: Vec::new(),
    made: 0,
});

struct BouncePool {
    idle: Vec<Vec<u8>>,
    made: usize,
}

fn bounce_pool() -> std::sync::MutexGuard<'static, BouncePool> {
    // A Vec and a count cannot be left half-updated by a panic.
    BOUNCE_POOL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A bounce buffer lent to one write; back to the pool when dropped.
struct Bounce(Vec<u8>);

impl Bounce {
    /// An idle buffer, a new one while fewer than [`BOUNCES`] exist, or
    /// none (the caller writes through the page cache).
    fn take() -> Option<Self> {
        let mut pool = bounce_pool();
        if let Some(buf) = pool.idle.pop() {
            return Some(Self(buf));
        }
        if pool.made >= BOUNCES {
            return None;
        }
        pool.made += 1;
        drop(pool);
        Some(Self(vec![0u8; BOUNCE + ALIGN]))
    }

    /// The aligned [`BOUNCE`] bytes inside the buffer.
    fn aligned(&mut self) -> &mut [u8] {
        let start = aligned_start(self.0.as_ptr());
        &mut self.0[start..start + BOUNCE]
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        bounce_pool().idle.push(std::mem::take(&mut self.0));
    }
}

/// How many bounce buffers exist (idle or lent).
#[cfg(test)]
fn bounces_made() -> usize {
    bounce_pool().made
}

/// Creates `path` (which must not exist) for a chunk of `len` bytes:
/// direct when the chunk is large enough and the filesystem allows it.
pub fn create_new(path: &Path, len: usize) -> io::Result<File> {
    let open = |flags| {
        File::options()
            .write(true)
            .create_new(true)
            .custom_flags(flags)
            .open(path)
    };
    if len < MIN_DIRECT {
        return open(0);
    }
    match refuse::check(refuse::Step::Open).and_then(|()| open(libc::O_DIRECT)) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => open(0),
        other => other,
    }
}

/// Writes `bytes` at the start of `file` (made by [`create_new`]).
pub fn write_all(file: &File, bytes: &[u8]) -> io::Result<()> {
    if !is_direct(file)? {
        return file.write_all_at(bytes, 0);
    }
    let aligned = bytes.len() / ALIGN * ALIGN;
    match write_aligned(file, &bytes[..aligned]) {
        Ok(true) => {}
        // No bounce buffer free, or the filesystem took the flag but not
        // this alignment: write it all through the page cache instead.
        Ok(false) => {
            set_direct(file, false)?;
            return file.write_all_at(bytes, 0);
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            set_direct(file, false)?;
            return file.write_all_at(bytes, 0);
        }
        Err(e) => return Err(e),
    }
    if aligned < bytes.len() {
        set_direct(file, false)?;
        file.write_all_at(&bytes[aligned..], aligned as u64)?;
    }
    Ok(())
}

/// Writes whole blocks from offset 0 with direct I/O, from `bytes` itself
/// when it is aligned in memory, else through a bounce buffer. Returns
/// false, having written nothing, when no bounce buffer is free.
fn write_aligned(file: &File, bytes: &[u8]) -> io::Result<bool> {
    refuse::check(refuse::Step::Write)?;
    if (bytes.as_ptr() as usize).is_multiple_of(ALIGN) {
        return file.write_all_at(bytes, 0).map(|()| true);
    }
    let Some(mut owned) = Bounce::take() else {
        return Ok(false);
    };
    let bounce = owned.aligned();
    for (i, piece) in bytes.chunks(BOUNCE).enumerate() {
        bounce[..piece.len()].copy_from_slice(piece);
        file.write_all_at(&bounce[..piece.len()], (i * BOUNCE) as u64)?;
    }
    Ok(true)
}

/// Opens a chunk file for reading, direct when the filesystem allows it.
pub fn open_read(path: &Path) -> io::Result<File> {
    let direct = refuse::check(refuse::Step::Open).and_then(|()| {
        File::options()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
    });
    match direct {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => File::open(path),
        other => other,
    }
}

/// Reads `file`, whose length is `len`, into `buf` (cleared first; it
/// needs [`READ_SLACK`] bytes of capacity beyond `len` to avoid growing).
/// Returns where the bytes start in `buf`: they are `buf[start..]`.
pub fn read_all(file: &mut File, len: usize, buf: &mut Vec<u8>) -> io::Result<usize> {
    buf.clear();
    if len >= MIN_DIRECT && is_direct(file)? {
        match read_aligned(file, len, buf) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => buf.clear(),
            other => return other,
        }
    }
    set_direct(file, false)?;
    buf.reserve_exact(len);
    // One byte more than expected shows a file that grew meanwhile.
    file.take(len as u64 + 1).read_to_end(buf)?;
    Ok(0)
}

/// A direct read of whole blocks into `buf`, from an aligned offset. One
/// block more than `len` is asked for, so that a file longer than expected
/// reads longer, as a buffered read does.
fn read_aligned(file: &File, len: usize, buf: &mut Vec<u8>) -> io::Result<usize> {
    refuse::check(refuse::Step::Read)?;
    let span = len.div_ceil(ALIGN) * ALIGN + ALIGN;
    buf.reserve(span + ALIGN);
    let start = aligned_start(buf.as_ptr());
    buf.resize(start, 0);
    let mut done = 0;
    while done < span {
        let spare = &mut buf.spare_capacity_mut()[..span - done];
        // SAFETY: `spare` is writable memory of `span - done` bytes owned
        // by `buf`; pread writes at most that many bytes into it, and only
        // the bytes it reports written are counted as initialized below.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                spare.len(),
                done as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break; // end of file
        }
        // SAFETY: pread initialized the `n` bytes after the current length.
        unsafe { buf.set_len(buf.len() + n as usize) };
        done += n as usize;
        if !(n as usize).is_multiple_of(ALIGN) {
            break; // a short read happens only at the end of the file
        }
    }
    Ok(start)
}

/// Whether `file` is open with `O_DIRECT`.
fn is_direct(file: &File) -> io::Result<bool> {
    Ok(flags(file)? & libc::O_DIRECT != 0)
}

fn flags(file: &File) -> io::Result<libc::c_int> {
    // SAFETY: F_GETFL on an open descriptor has no other effect.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(flags)
}

/// Turns direct I/O on or off for `file`.
fn set_direct(file: &File, on: bool) -> io::Result<()> {
    let old = flags(file)?;
    let new = if on {
        old | libc::O_DIRECT
    } else {
        old & !libc::O_DIRECT
    };
    if new == old {
        return Ok(());
    }
    // SAFETY: F_SETFL only changes the descriptor's status flags.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, new) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes from `ptr` to the next multiple of [`ALIGN`].
fn aligned_start(ptr: *const u8) -> usize {
    (ALIGN - ptr as usize % ALIGN) % ALIGN
}

/// Unit tests make this thread's direct I/O fail at one step with EINVAL,
/// as a filesystem that refuses it does (tmpfs before Linux 6.6 at open,
/// others at the first misaligned transfer): the fallbacks are otherwise
/// never taken on the filesystems tests run on. Outside unit tests every
/// check passes.
pub(crate) mod refuse {
    use std::io;

    /// Where direct I/O can be refused.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    #[cfg_attr(not(test), allow(dead_code))]
    pub enum Step {
        Open,
        Write,
        Read,
    }

    #[cfg(test)]
    thread_local! {
        static REFUSED: std::cell::Cell<Option<Step>> = const { std::cell::Cell::new(None) };
    }

    /// Refuses `step` on this thread until the returned guard is dropped.
    #[cfg(test)]
    pub fn refusing(step: Step) -> impl Drop {
        struct Reset;
        impl Drop for Reset {
            fn drop(&mut self) {
                REFUSED.with(|r| r.set(None));
            }
        }
        REFUSED.with(|r| r.set(Some(step)));
        Reset
    }

    #[cfg(test)]
    pub fn check(step: Step) -> io::Result<()> {
        if REFUSED.with(|r| r.get()) == Some(step) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(())
    }

    #[cfg(not(test))]
    #[inline(always)]
    pub fn check(_step: Step) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + i / 4096) as u8).collect()
    }

    #[test]
    fn every_length_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        for (i, len) in LENGTHS.into_iter().enumerate() {
            let path = dir.path().join(i.to_string());
            let data = pattern(len);
            let file = create_new(&path, len).unwrap();
            write_all(&file, &data).unwrap();
            file.sync_data().unwrap();
            drop(file);
            assert_eq!(std::fs::read(&path).unwrap(), data, "write, len {len}");
            let mut buf = Vec::with_capacity(len + READ_SLACK);
            let mut file = open_read(&path).unwrap();
            let start = read_all(&mut file, len, &mut buf).unwrap();
            assert_eq!(&buf[start..], &data[..], "read, len {len}");
        }
    }

    #[test]
    fn a_write_from_aligned_memory_needs_no_bounce() {
        let dir = tempfile::tempdir().unwrap();
        let mut owned = vec![0u8; 2 * MIN_DIRECT + ALIGN];
        let start = aligned_start(owned.as_ptr());
        let data = &mut owned[start..start + 2 * MIN_DIRECT];
        data.copy_from_slice(&pattern(2 * MIN_DIRECT));
        let path = dir.path().join("c");
        let file = create_new(&path, data.len()).unwrap();
        write_all(&file, data).unwrap();
        drop(file);
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }

    /// The lengths a chunk file can have around the direct I/O boundaries.
    const LENGTHS: [usize; 10] = [
        0,
        1,
        ALIGN - 1,
        ALIGN,
        MIN_DIRECT - 1,
        MIN_DIRECT,
        MIN_DIRECT + 1,
        BOUNCE,
        BOUNCE + ALIGN + 17,
        3 * BOUNCE + 5,
    ];

    /// Writes `data` as a chunk file, syncs it, and returns whether the
    /// descriptor was still direct after the write.
    fn write_file(path: &Path, data: &[u8]) -> bool {
        let file = create_new(path, data.len()).unwrap();
        write_all(&file, data).unwrap();
        file.sync_data().unwrap();
        is_direct(&file).unwrap()
    }

    fn read_file(path: &Path, len: usize) -> Vec<u8> {
        let mut buf = Vec::with_capacity(len + READ_SLACK);
        let cap = buf.capacity();
        let start = read_all(&mut open_read(path).unwrap(), len, &mut buf).unwrap();
        assert_eq!(buf.capacity(), cap, "READ_SLACK is enough: no growth");
        buf.split_off(start)
    }

    #[test]
    fn refused_direct_io_falls_back_to_the_page_cache_with_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        for step in [refuse::Step::Open, refuse::Step::Write, refuse::Step::Read] {
            for (i, len) in LENGTHS.into_iter().enumerate() {
                let path = dir.path().join(format!("{step:?}-{i}"));
                // Behind a one-byte offset: never aligned in memory.
                let owned = pattern(len + 1);
                let data = &owned[1..];
                let direct_after = {
                    let _refused = refuse::refusing(step);
                    write_file(&path, data)
                };
                assert_eq!(std::fs::read(&path).unwrap(), data, "{step:?}, len {len}");
                if matches!(step, refuse::Step::Open | refuse::Step::Write) {
                    assert!(!direct_after, "{step:?}, len {len}: fell back");
                }
                let read = {
                    let _refused = refuse::refusing(step);
                    read_file(&path, len)
                };
                assert_eq!(read, data, "{step:?} refused, read of len {len}");
                // And without refusal, the same file reads the same.
                assert_eq!(read_file(&path, len), data, "len {len}");
            }
        }
    }

    #[test]
    fn direct_io_is_taken_where_the_filesystem_allows_it() {
        // Proof that the tests above exercise both paths: the temporary
        // directory's filesystem (ext4 on CI) takes O_DIRECT.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        let file = create_new(&path, MIN_DIRECT).unwrap();
        assert!(
            is_direct(&file).unwrap(),
            "large chunks open direct (TMPDIR on a filesystem without O_DIRECT?)"
        );
        drop(file);
        let small = dir.path().join("s");
        assert!(!is_direct(&create_new(&small, MIN_DIRECT - 1).unwrap()).unwrap());
    }

    #[test]
    fn bounce_buffers_are_bounded_and_a_write_without_one_goes_buffered() {
        let dir = tempfile::tempdir().unwrap();
        // Hold every bounce buffer that can exist (other tests may hold
        // some meanwhile: together never more than BOUNCES).
        let mut held = Vec::new();
        while let Some(b) = Bounce::take() {
            held.push(b);
            assert!(held.len() <= BOUNCES);
        }
        assert!(bounces_made() <= BOUNCES);
        let owned = pattern(2 * BOUNCE + 101);
        let data = &owned[1..];
        let path = dir.path().join("c");
        assert!(!write_file(&path, data), "no bounce buffer: buffered");
        assert_eq!(std::fs::read(&path).unwrap(), data);
        drop(held);

        // Many writers at once share the few buffers, and every write is whole.
        let writers: Vec<_> = (0..3 * BOUNCES)
            .map(|i| {
                let path = dir.path().join(format!("w{i}"));
                std::thread::spawn(move || {
                    let owned = pattern(BOUNCE + 3 * ALIGN + i + 1);
                    write_file(&path, &owned[1..]);
                    assert_eq!(std::fs::read(&path).unwrap(), &owned[1..]);
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        assert!(bounces_made() <= BOUNCES, "{}", bounces_made());
    }

    #[test]
    fn a_file_longer_than_expected_reads_longer() {
        // The caller compares lengths and verifies: a read must not cut a
        // file that changed to the length it was told.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        std::fs::write(&path, pattern(MIN_DIRECT + 3 * ALIGN)).unwrap();
        let mut buf = Vec::new();
        let start = read_all(&mut open_read(&path).unwrap(), MIN_DIRECT, &mut buf).unwrap();
        assert!(buf.len() - start > MIN_DIRECT);
    }
}
