//! Reading a node's file-system syscalls, as `strace` recorded them, to check
//! that everything an acknowledgement depends on was durable before it.
//!
//! The node runs under
//! `strace -f -ttt -y -qq -s 0 --seccomp-bpf -e trace=<FS_SYSCALLS> -o FILE`:
//! one line per call, `PID SECONDS.MICROS call(args) = ret`, file descriptors
//! shown with their paths (`3</data/index.redb>`), a call interrupted by
//! another thread's line split into `... <unfinished ...>` and
//! `<... name resumed> ...) = ret`.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

/// The syscalls traced: everything that writes, syncs or names a file.
pub const FS_SYSCALLS: &str = "openat,open,creat,write,pwrite64,writev,pwritev,pwritev2,\
fsync,fdatasync,sync_file_range,syncfs,sync,rename,renameat,renameat2,mkdir,mkdirat,\
link,linkat,unlink,unlinkat,ftruncate,fallocate";

/// The `strace` command line (ending in `--`) that records into `out`.
pub fn strace_wrapper(out: &Path) -> Vec<String> {
    [
        "strace",
        "-f",
        "-ttt",
        "-y",
        "-qq",
        "-s",
        "0",
        "--seccomp-bpf",
        "-e",
        &format!("trace={FS_SYSCALLS}"),
        "-o",
        out.to_str().expect("utf-8 trace path"),
        "--",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Microseconds since the Unix epoch: the clock strace's `-ttt` prints.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// One completed, successful syscall.
#[derive(Debug, Clone)]
pub struct Call {
    pub pid: u32,
    /// When it was entered and when it returned, in µs since the epoch.
    pub start: u64,
    pub end: u64,
    pub name: String,
    /// Paths it names, in argument order: quoted path arguments and the
    /// paths strace shows for file-descriptor arguments.
    pub paths: Vec<PathBuf>,
    /// The raw argument text, for flags.
    pub args: String,
    /// The path of the file descriptor it returned (openat).
    pub returned: Option<PathBuf>,
}

impl Call {
    /// Whether this call writes file data.
    pub fn is_write(&self) -> bool {
        matches!(
            self.name.as_str(),
            "write" | "pwrite64" | "writev" | "pwritev" | "pwritev2" | "ftruncate" | "fallocate"
        )
    }

    /// Whether this call makes a file's data durable.
    pub fn is_sync(&self) -> bool {
        matches!(self.name.as_str(), "fsync" | "fdatasync")
    }

    /// Whether this call renames.
    pub fn is_rename(&self) -> bool {
        self.name.starts_with("rename")
    }
}

/// Parses a whole trace file. Failed calls (`= -1 ...`) are dropped.
pub fn parse(text: &str) -> Vec<Call> {
    let mut pending: HashMap<u32, (u64, String)> = HashMap::new();
    let mut calls = Vec::new();
    for line in text.lines() {
        // strace pads the pid column: "2967  1795820020.275855 openat(...)".
        let Some((pid, rest)) = line.trim_start().split_once(' ') else {
            continue;
        };
        let Some((ts, rest)) = rest.trim_start().split_once(' ') else {
            continue;
        };
        let (Ok(pid), Some(ts)) = (pid.parse::<u32>(), parse_ts(ts)) else {
            continue;
        };
        if let Some(head) = rest.strip_suffix(" <unfinished ...>") {
            pending.insert(pid, (ts, head.to_owned()));
            continue;
        }
        let (start, text) = match rest.strip_prefix("<... ") {
            Some(resumed) => {
                let Some((start, head)) = pending.remove(&pid) else {
                    continue;
                };
                let tail = resumed.split_once(" resumed>").map_or("", |(_, t)| t);
                (start, format!("{head}{tail}"))
            }
            None => (ts, rest.to_owned()),
        };
        if let Some(call) = parse_call(pid, start, ts, &text) {
            calls.push(call);
        }
    }
    calls
}

fn parse_ts(ts: &str) -> Option<u64> {
    let (secs, micros) = ts.split_once('.')?;
    Some(secs.parse::<u64>().ok()? * 1_000_000 + micros.parse::<u64>().ok()?)
}

fn parse_call(pid: u32, start: u64, end: u64, text: &str) -> Option<Call> {
    let (name, rest) = text.split_once('(')?;
    let (args, ret) = rest.rsplit_once(") = ")?;
    if ret.starts_with('-') || ret.starts_with('?') {
        return None;
    }
    Some(Call {
        pid,
        start,
        end,
        name: name.to_owned(),
        paths: arg_paths(args),
        args: args.to_owned(),
        returned: ret
            .split_once('<')
            .and_then(|(_, p)| p.strip_suffix('>'))
            .map(PathBuf::from),
    })
}

/// Quoted strings and `fd<path>` annotations, in order; the `AT_FDCWD<cwd>`
/// annotation is not an argument path.
fn arg_paths(args: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let bytes = args.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                let end = args[i + 1..].find('"').map_or(bytes.len(), |e| i + 1 + e);
                out.push(PathBuf::from(&args[i + 1..end]));
                i = end + 1;
            }
            b'<' if i > 0 && bytes[i - 1].is_ascii_digit() => {
                let end = args[i + 1..].find('>').map_or(bytes.len(), |e| i + 1 + e);
                out.push(PathBuf::from(&args[i + 1..end]));
                i = end + 1;
            }
            b'<' => {
                // AT_FDCWD</cwd>: skip.
                i = args[i + 1..].find('>').map_or(bytes.len(), |e| i + 2 + e);
            }
            _ => i += 1,
        }
    }
    out
}

/// The rules an acknowledgement at `ack` (µs) must satisfy, checked against
/// one node's trace. Each returns a list of violations (empty: the rule
/// holds), worded for a failure message.
pub struct Durability<'a> {
    pub calls: &'a [Call],
    pub ack: u64,
}

impl Durability<'_> {
    fn syncs_of<'c>(&'c self, path: &'c Path) -> impl Iterator<Item = &'c Call> + 'c {
        self.calls
            .iter()
            .filter(move |c| c.is_sync() && c.paths.first().map(PathBuf::as_path) == Some(path))
    }

    /// A sync of `path` that starts at or after `after` and returns before
    /// the acknowledgement.
    fn synced_between(&self, path: &Path, after: u64, before: u64) -> bool {
        self.syncs_of(path)
            .any(|s| s.start >= after && s.end < before)
    }

    /// The chunk file `dest` was written under another name, that file was
    /// synced after its last write, then renamed to `dest`, and then the
    /// directory holding `dest` was synced, all before the acknowledgement.
    pub fn chunk_file(&self, dest: &Path) -> Vec<String> {
        let mut bad = Vec::new();
        let Some(rename) = self
            .calls
            .iter()
            .rev()
            .filter(|c| c.is_rename() && c.paths.get(1).map(PathBuf::as_path) == Some(dest))
            .find(|c| c.end < self.ack)
        else {
            return vec![format!(
                "{}: never renamed into place before the acknowledgement",
                dest.display()
            )];
        };
        let tmp = &rename.paths[0];
        let writes: Vec<&Call> = self
            .calls
            .iter()
            .filter(|c| c.is_write() && c.paths.first() == Some(tmp))
            .collect();
        let Some(last_write) = writes.iter().map(|w| w.end).max() else {
            return vec![format!(
                "{}: no write to its temporary file {} was seen",
                dest.display(),
                tmp.display()
            )];
        };
        if writes.iter().any(|w| w.start > rename.start) {
            bad.push(format!("{}: written after its rename", tmp.display()));
        }
        if !self.synced_between(tmp, last_write, rename.start + 1) {
            bad.push(format!(
                "{}: its data was not synced between its last write and its rename to {}",
                tmp.display(),
                dest.display()
            ));
        }
        bad.extend(self.entry_durable(dest, rename.end));
        bad
    }

    /// Whether the temporary file that was renamed to the chunk file `dest`
    /// was created with `flag` (say `O_DIRECT`) among its open flags.
    pub fn created_with(&self, dest: &Path, flag: &str) -> bool {
        let Some(rename) = self
            .calls
            .iter()
            .filter(|c| c.is_rename() && c.paths.get(1).map(PathBuf::as_path) == Some(dest))
            .find(|c| c.end < self.ack)
        else {
            return false;
        };
        let tmp = &rename.paths[0];
        self.calls.iter().any(|c| {
            c.name.starts_with("open")
                && c.paths.contains(tmp)
                && c.args.contains("O_CREAT")
                && c.args.split(['|', ',', ' ']).any(|f| f == flag)
        })
    }

    /// The directory entry for `path`, made at `made`, and the entries of
    /// every ancestor directory this trace saw created: each parent synced
    /// after the entry appeared and before the acknowledgement.
    pub fn entry_durable(&self, path: &Path, made: u64) -> Vec<String> {
        let mut bad = Vec::new();
        let Some(parent) = path.parent() else {
            return bad;
        };
        if !self.synced_between(parent, made, self.ack) {
            bad.push(format!(
                "{}: its directory {} was not synced after the entry appeared and before the \
                 acknowledgement",
                path.display(),
                parent.display()
            ));
        }
        if let Some(mkdir) = self.calls.iter().find(|c| {
            c.name.starts_with("mkdir") && c.paths.first().map(PathBuf::as_path) == Some(parent)
        }) {
            bad.extend(self.entry_durable(parent, mkdir.end));
        }
        bad
    }

    /// A file created by `openat(O_CREAT)` in this trace (the record
    /// database, a key file): its entry is durable before the
    /// acknowledgement, like a chunk's.
    pub fn created_file(&self, path: &Path) -> Vec<String> {
        match self.calls.iter().find(|c| {
            c.name.starts_with("open")
                && c.args.contains("O_CREAT")
                && c.paths.first().map(PathBuf::as_path) == Some(path)
        }) {
            Some(open) => self.entry_durable(path, open.end),
            None => vec![format!("{}: its creation was not seen", path.display())],
        }
    }

    /// A file that was renamed into place in this trace (`node.key`).
    pub fn renamed_file(&self, path: &Path) -> Vec<String> {
        match self
            .calls
            .iter()
            .find(|c| c.is_rename() && c.paths.get(1).map(PathBuf::as_path) == Some(path))
        {
            Some(rename) => self.entry_durable(path, rename.end),
            None => vec![format!(
                "{}: its rename into place was not seen",
                path.display()
            )],
        }
    }

    /// The record database `db`: written in the window `[from, ack)`, and
    /// every write to it before the acknowledgement is followed by a sync
    /// of it that returns before the acknowledgement.
    pub fn database(&self, db: &Path, from: u64) -> Vec<String> {
        let writes: Vec<&Call> = self
            .calls
            .iter()
            .filter(|c| c.is_write() && c.paths.first().map(PathBuf::as_path) == Some(db))
            .filter(|c| c.start < self.ack)
            .collect();
        if !writes.iter().any(|w| w.start >= from) {
            return vec![format!(
                "{}: not written between the request and its acknowledgement",
                db.display()
            )];
        }
        writes
            .iter()
            .filter(|w| !self.synced_between(db, w.end, self.ack))
            .map(|w| {
                format!(
                    "{}: a {} at {} is not followed by a sync before the acknowledgement at {}",
                    db.display(),
                    w.name,
                    w.start,
                    self.ack
                )
            })
            .collect()
    }
}
