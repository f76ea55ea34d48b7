//! Journal segment files: naming, listing and the open segment the writer appends to.
//!
//! **Owns**: the `DATA_DIR/journal/NNNNNNNNNNNNNNNNNNNN.wal` naming (a 20-digit, zero-padded,
//! increasing segment id) and the creation of segments, which is made durable by an `fsync`
//! of the journal directory.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::super::fsync::{io_error, sync_dir};
use super::super::StoreError;

/// The file name extension of journal segments.
pub const SEGMENT_EXTENSION: &str = "wal";

/// The journal directory of a data dir.
pub fn journal_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("journal")
}

/// The file name of segment `id`.
pub fn segment_file_name(id: u64) -> String {
    format!("{id:020}.{SEGMENT_EXTENSION}")
}

/// The segment id a file name stands for, `None` for any other file.
pub fn parse_segment_id(file_name: &str) -> Option<u64> {
    let digits = file_name.strip_suffix(".wal")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The segments in `journal_dir`, by increasing id. Other files are ignored.
pub(crate) fn list_segments(journal_dir: &Path) -> Result<Vec<(u64, PathBuf)>, StoreError> {
    let context = || format!("listing journal segments in {}", journal_dir.display());
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(journal_dir).map_err(|e| io_error(context(), e))? {
        let entry = entry.map_err(|e| io_error(context(), e))?;
        let name = entry.file_name();
        if let Some(id) = name.to_str().and_then(parse_segment_id) {
            segments.push((id, entry.path()));
        }
    }
    segments.sort();
    Ok(segments)
}

/// The segment the writer appends to.
pub(crate) struct OpenSegment {
    pub id: u64,
    pub path: PathBuf,
    file: File,
    /// Bytes written so far: the offset of the next frame.
    pub len: u64,
}

impl OpenSegment {
    /// Creates segment `id` (which must not exist) and makes its directory entry durable.
    pub(crate) fn create(journal_dir: &Path, id: u64) -> Result<OpenSegment, StoreError> {
        let path = journal_dir.join(segment_file_name(id));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io_error(format!("creating journal segment {}", path.display()), e))?;
        sync_dir(journal_dir)?;
        Ok(OpenSegment {
            id,
            path,
            file,
            len: 0,
        })
    }

    /// Wraps an already open file, for tests that need a failing one (e.g. `/dev/full`).
    #[cfg(test)]
    pub(crate) fn from_file(id: u64, path: PathBuf, file: File) -> OpenSegment {
        OpenSegment {
            id,
            path,
            file,
            len: 0,
        }
    }

    /// Appends `bytes` in one `write_all`.
    pub(crate) fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all(bytes)?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// `fdatasync`s the segment.
    pub(crate) fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_sort_numerically() {
        assert_eq!(segment_file_name(7), "00000000000000000007.wal");
        for id in [0, 1, 9, 10, u64::MAX] {
            assert_eq!(parse_segment_id(&segment_file_name(id)), Some(id));
        }
        assert_eq!(parse_segment_id("7.wal"), None);
        assert_eq!(parse_segment_id("0000000000000000000a.wal"), None);
        assert_eq!(parse_segment_id("00000000000000000007.tmp"), None);
        let mut names: Vec<String> = [10, 9, 100].iter().map(|i| segment_file_name(*i)).collect();
        names.sort();
        let ids: Vec<u64> = names.iter().filter_map(|n| parse_segment_id(n)).collect();
        assert_eq!(ids, vec![9, 10, 100]);
    }

    #[test]
    fn listing_ignores_other_files_and_orders_by_id() {
        let dir = tempfile::tempdir().unwrap();
        for id in [3u64, 1, 2] {
            OpenSegment::create(dir.path(), id).unwrap();
        }
        std::fs::write(dir.path().join("notes.txt"), b"").unwrap();
        let ids: Vec<u64> = list_segments(dir.path())
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, vec![1, 2, 3]);
        assert!(
            OpenSegment::create(dir.path(), 2).is_err(),
            "segments are never reopened"
        );
    }
}
