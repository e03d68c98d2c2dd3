//! Opening a node's data directory: private to its owner, and held by one
//! node process at a time.

use std::{
    fs,
    io::ErrorKind,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::Path,
};

use super::NodeError;

/// Name of the lock file in the data directory.
const LOCK_FILE: &str = "lock";

/// Creates the data directory (mode 0700: the index holds object names and
/// sizes) if needed and takes an exclusive lock on it, released when the
/// returned file is dropped or the process exits. Fails, touching nothing
/// else, when another process holds it.
pub fn open_locked(dir: &Path) -> Result<fs::File, NodeError> {
    let internal = |what: &str, e: std::io::Error| {
        NodeError::Internal(format!("{what} {}: {e}", dir.display()))
    };
    create_durably(dir).map_err(|e| internal("create", e))?;
    let mode = fs::metadata(dir)
        .map_err(|e| internal("stat", e))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        tracing::warn!(dir = %dir.display(), mode = format!("{:o}", mode & 0o777),
            "the data directory is readable by other users; it holds object names and sizes (chmod 700 it)");
    }
    let path = dir.join(LOCK_FILE);
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| internal("open lock file in", e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(NodeError::InvalidArgument(format!(
            "data directory {} is in use by another dfs node; refusing to start",
            dir.display()
        ))),
        Err(fs::TryLockError::Error(e)) => Err(internal("lock", e)),
    }
}

/// Creates `dir` (mode 0700) and its missing parents, and fsyncs the parent
/// of each one created, so that a crash cannot lose the data directory
/// itself after a write in it was acknowledged.
fn create_durably(dir: &Path) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut next = Some(dir);
    while let Some(d) = next.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        missing.push(d.to_owned());
        next = d.parent();
    }
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    for created in missing {
        crate::fsutil::sync_parent(&created)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_open_is_refused_until_the_first_lock_is_dropped() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("data");
        let first = open_locked(&dir).unwrap();
        let mode = fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let err = open_locked(&dir).unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
        drop(first);
        open_locked(&dir).unwrap();
    }
}
