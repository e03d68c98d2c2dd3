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
//! devices. Writes go through a small aligned bounce buffer per writing
//! thread, except the last partial block, which is written buffered (the
//! fsync that follows covers both); reads land at an aligned offset inside
//! the caller's buffer, which is why they return where the data starts. A
//! filesystem that refuses `O_DIRECT` (tmpfs, some network filesystems) or
//! its alignment gets buffered I/O, with the same results.

use std::{
    cell::RefCell,
    fs::File,
    io::{self, Read},
    os::unix::{
        fs::{FileExt, OpenOptionsExt},
        io::AsRawFd,
    },
    path::Path,
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

thread_local! {
    /// Each writing thread's bounce buffer, allocated on its first direct
    /// write. Chunk writes run on the blocking pool, whose idle threads exit.
    static BOUNCE_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
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
    match open(libc::O_DIRECT) {
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
        Ok(()) => {}
        // The filesystem took the flag but not this alignment: write it
        // all through the page cache instead.
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
/// when it is aligned in memory, else through the bounce buffer.
fn write_aligned(file: &File, bytes: &[u8]) -> io::Result<()> {
    if (bytes.as_ptr() as usize).is_multiple_of(ALIGN) {
        return file.write_all_at(bytes, 0);
    }
    BOUNCE_BUF.with(|cell| {
        let mut owned = cell.borrow_mut();
        if owned.len() < BOUNCE + ALIGN {
            *owned = vec![0u8; BOUNCE + ALIGN];
        }
        let start = aligned_start(owned.as_ptr());
        let bounce = &mut owned[start..start + BOUNCE];
        for (i, piece) in bytes.chunks(BOUNCE).enumerate() {
            bounce[..piece.len()].copy_from_slice(piece);
            file.write_all_at(&bounce[..piece.len()], (i * BOUNCE) as u64)?;
        }
        Ok(())
    })
}

/// Opens a chunk file for reading, direct when the filesystem allows it.
pub fn open_read(path: &Path) -> io::Result<File> {
    match File::options()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + i / 4096) as u8).collect()
    }

    #[test]
    fn every_length_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let lengths = [
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
        for (i, len) in lengths.into_iter().enumerate() {
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
