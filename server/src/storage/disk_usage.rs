//! How much disk a data dir takes: the sled state directory and the journal's segments.
//!
//! **Owns**: walking those directories and summing file sizes, for the server's stats. It
//! reads metadata only, on the blocking path (the store's `usage` runs it there).

use std::path::Path;

use super::fsync::io_error;
use super::StoreError;

/// Bytes a data dir takes on disk, by part.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskUsage {
    /// The sled state directory: entity snapshots, events and records checkpointed so far,
    /// with sled's own garbage not yet reclaimed.
    pub state_bytes: u64,
    /// Journal segments, preallocated ones included.
    pub journal_bytes: u64,
    /// How many journal segment files there are.
    pub journal_segments: u64,
}

/// Measures the state directory and the journal directory.
pub(crate) fn measure(state_dir: &Path, journal_dir: &Path) -> Result<DiskUsage, StoreError> {
    let segments = super::journal::segment::list_segments(journal_dir)?;
    let mut journal_bytes = 0;
    for (_, path) in &segments {
        journal_bytes += file_len(path)?;
    }
    Ok(DiskUsage {
        state_bytes: tree_bytes(state_dir)?,
        journal_bytes,
        journal_segments: segments.len() as u64,
    })
}

fn file_len(path: &Path) -> Result<u64, StoreError> {
    match std::fs::metadata(path) {
        Ok(metadata) => Ok(metadata.len()),
        // Deleted by a checkpoint since it was listed: it takes nothing any more.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io_error(
            format!("reading the size of {}", path.display()),
            e,
        )),
    }
}

/// The sizes of every file under `dir`, recursively (sled keeps blobs in a subdirectory).
fn tree_bytes(dir: &Path) -> Result<u64, StoreError> {
    let context = || format!("measuring {}", dir.display());
    let mut total = 0;
    for entry in std::fs::read_dir(dir).map_err(|e| io_error(context(), e))? {
        let entry = entry.map_err(|e| io_error(context(), e))?;
        let kind = entry.file_type().map_err(|e| io_error(context(), e))?;
        if kind.is_dir() {
            total += tree_bytes(&entry.path())?;
        } else if kind.is_file() {
            total += file_len(&entry.path())?;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_state_files_recursively_and_journal_segments_only() {
        let dir = tempfile::tempdir().unwrap();
        let (state, journal) = (dir.path().join("state"), dir.path().join("journal"));
        std::fs::create_dir_all(state.join("blobs")).unwrap();
        std::fs::create_dir_all(&journal).unwrap();
        std::fs::write(state.join("db"), vec![0; 1000]).unwrap();
        std::fs::write(state.join("blobs/1"), vec![0; 24]).unwrap();
        let segment = super::super::journal::segment_file_name(7);
        std::fs::write(journal.join(segment), vec![0; 4096]).unwrap();
        std::fs::write(journal.join("notes.txt"), vec![0; 5]).unwrap();

        let usage = measure(&state, &journal).unwrap();
        assert_eq!(
            usage,
            DiskUsage {
                state_bytes: 1024,
                journal_bytes: 4096,
                journal_segments: 1,
            }
        );
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = measure(&dir.path().join("state"), dir.path()).unwrap_err();
        assert!(err.to_string().contains("state"), "{err}");
    }
}
