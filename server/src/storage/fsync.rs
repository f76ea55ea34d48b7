//! The `fsync`s of files and directories, and the `StoreError`s for failed I/O.
//!
//! **Owns**: the `fsync`s that make sled's files and our directory entries power-loss
//! durable. sled's own `flush()` ends in `sync_file_range` on Linux (sled issue 1452), which
//! writes pages out but does not flush the drive's cache, so a checkpoint follows it with an
//! `fsync` of every file and directory under the state dir. Also the durable removal of
//! files from a directory (journal segments, stale prepared segments).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use super::StoreError;

/// Builds a [`StoreError::Io`] with a context naming what was being done.
pub(crate) fn io_error(context: impl Into<String>, source: io::Error) -> StoreError {
    StoreError::Io {
        context: context.into(),
        source,
    }
}

/// Builds a [`StoreError::Sled`] with a context naming what was being done.
pub(crate) fn sled_error(context: impl Into<String>, source: sled::Error) -> StoreError {
    StoreError::Sled {
        context: context.into(),
        source,
    }
}

/// `fsync`s a directory, making the creation, deletion or renaming of its entries durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(format!("syncing directory {}", dir.display()), e))
}

/// Removes `paths` (files in `dir`; one already gone is no error), then `fsync`s `dir` if
/// anything was removed, so the removals survive a power cut. Returns how many it removed.
/// `what` names the files in an error message.
pub(crate) fn remove_files(
    dir: &Path,
    paths: impl IntoIterator<Item = PathBuf>,
    what: &str,
) -> Result<usize, StoreError> {
    let mut removed = 0;
    for path in paths {
        match std::fs::remove_file(&path) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(format!("deleting {what} {}", path.display()), e)),
        }
    }
    if removed > 0 {
        sync_dir(dir)?;
    }
    Ok(removed)
}

/// `fsync`s every file and directory under `root` (and `root` itself) and returns how many.
///
/// A file that disappears between listing and opening is skipped: sled replaces its own
/// snapshot files, and a file that no longer exists needs no sync.
pub(crate) fn sync_tree(root: &Path) -> Result<usize, StoreError> {
    let mut synced = 0;
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error(format!("listing {}", dir.display()), e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| io_error(format!("listing {}", dir.display()), e))?;
            let path = entry.path();
            let file_type = entry
                .file_type()
                .map_err(|e| io_error(format!("inspecting {}", path.display()), e))?;
            if file_type.is_dir() {
                pending.push(path);
            } else if file_type.is_file() {
                match File::open(&path).and_then(|f| f.sync_all()) {
                    Ok(()) => synced += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_error(format!("syncing {}", path.display()), e)),
                }
            }
        }
        // The directory after its files, so new entries are durable with their contents.
        match File::open(&dir).and_then(|d| d.sync_all()) {
            Ok(()) => synced += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(format!("syncing {}", dir.display()), e)),
        }
    }
    Ok(synced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_tree_visits_nested_files_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/f"), b"x").unwrap();
        std::fs::write(dir.path().join("g"), b"y").unwrap();
        // root, a, a/b, f, g
        assert_eq!(sync_tree(dir.path()).unwrap(), 5);
        assert_eq!(sync_tree(&dir.path().join("missing")).unwrap(), 0);
    }
}
