//! Journal segment files: naming, listing, preparing, and the open segment the writer writes.
//!
//! **Owns**: the `DATA_DIR/journal/NNNNNNNNNNNNNNNNNNNN.wal` naming (a 20-digit, zero-padded,
//! increasing segment id), the `.prep` files segments are prepared under, and the life of a
//! segment file:
//!
//! 1. **Prepared**: created as `NNNNNNNNNNNNNNNNNNNN.prep`, filled with real zeros up to its
//!    preallocated size ([`preallocated_bytes`]), `fsync`ed with its directory. Written blocks
//!    (not `fallocate`d ones, which are unwritten extents and convert on first write) make a
//!    later overwrite a pure data write, so the writer's `fdatasync` need not commit the
//!    filesystem journal. [`list_segments`] ignores `.prep` files, so recovery never reads one.
//! 2. **Installed**: renamed to its `.wal` name and the directory `fsync`ed, just before the
//!    writer's first write to it ([`PreparedSegment::install`]).
//! 3. **Open**: the writer overwrites the zeros in place from offset 0; [`OpenSegment::len`]
//!    counts the bytes of data. A process killed now leaves a zero tail after the data.
//! 4. **Finished**: at a roll or a clean close the writer cuts the file to its data length and
//!    `fsync`s it ([`OpenSegment::finish`]) before it installs the next one. So every segment
//!    but the last has its exact length, and only the last can end in zeros.
//!
//! Stale `.prep` files (a process killed while preparing, or before installing) are deleted
//! at open ([`remove_prepared`]).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::super::fsync::{io_error, remove_files, sync_dir};
use super::super::StoreError;

/// The file name extension of journal segments.
pub const SEGMENT_EXTENSION: &str = "wal";

/// The file name extension of segments being prepared (not yet part of the journal).
pub const PREPARED_EXTENSION: &str = "prep";

/// Segments are preallocated up to their configured size but never past this: a larger
/// segment simply grows past its zeros.
pub const PREALLOCATE_BYTES_MAX: u64 = 1 << 30;

/// Zeros are written this many bytes at a time, so preparing a segment needs only this much
/// memory whatever its size.
const ZERO_CHUNK_BYTES: usize = 1 << 20;

/// The journal directory of a data dir.
pub fn journal_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("journal")
}

/// The file name of segment `id`.
pub fn segment_file_name(id: u64) -> String {
    format!("{id:020}.{SEGMENT_EXTENSION}")
}

/// The file name segment `id` is prepared under; `tag` tells apart preparations of the same
/// id (the background preparer's and the writer's own), so they never share a file.
pub(crate) fn prepared_file_name(id: u64, tag: &str) -> String {
    format!("{id:020}.{tag}.{PREPARED_EXTENSION}")
}

/// The segment id a file name stands for, `None` for any other file.
pub fn parse_segment_id(file_name: &str) -> Option<u64> {
    let digits = file_name.strip_suffix(".wal")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// How many bytes of zeros a segment of `segment_bytes` is prepared with.
pub(crate) fn preallocated_bytes(segment_bytes: u64) -> u64 {
    segment_bytes.min(PREALLOCATE_BYTES_MAX)
}

/// The segments in `journal_dir`, by increasing id. Other files (`.prep` ones included) are
/// ignored.
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

/// Deletes every `.prep` file in `journal_dir` (what a process killed while preparing a
/// segment, or before installing it, leaves) and returns how many. Called at open, before the
/// writer and its preparer start.
pub(crate) fn remove_prepared(journal_dir: &Path) -> Result<usize, StoreError> {
    let context = || format!("listing prepared segments in {}", journal_dir.display());
    let mut prepared = Vec::new();
    for entry in std::fs::read_dir(journal_dir).map_err(|e| io_error(context(), e))? {
        let path = entry.map_err(|e| io_error(context(), e))?.path();
        if path.extension().and_then(|e| e.to_str()) == Some(PREPARED_EXTENSION) {
            prepared.push(path);
        }
    }
    remove_files(journal_dir, prepared, "stale prepared segment")
}

/// A segment file full of synced zeros under its `.prep` name, not yet part of the journal.
#[derive(Debug)]
pub(crate) struct PreparedSegment {
    pub id: u64,
    pub path: PathBuf,
    file: File,
}

impl PreparedSegment {
    /// Prepares segment `id` as `prepared_file_name(id, tag)`: `size` bytes of zeros, written
    /// [`ZERO_CHUNK_BYTES`] at a time, then the file and the directory `fsync`ed. An existing
    /// file of that name is replaced. Returns `None` (and removes the file) if `cancel` is set
    /// before it is done.
    pub(crate) fn prepare(
        journal_dir: &Path,
        id: u64,
        size: u64,
        tag: &str,
        cancel: &AtomicBool,
    ) -> Result<Option<PreparedSegment>, StoreError> {
        let path = journal_dir.join(prepared_file_name(id, tag));
        let context = || format!("preparing journal segment {}", path.display());
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| io_error(context(), e))?;
        let zeros = vec![0u8; ZERO_CHUNK_BYTES.min(usize::try_from(size).unwrap_or(usize::MAX))];
        let mut written = 0u64;
        while written < size {
            if cancel.load(Ordering::Relaxed) {
                drop(file);
                remove_quietly(&path);
                return Ok(None);
            }
            let n = zeros
                .len()
                .min(usize::try_from(size - written).unwrap_or(usize::MAX));
            file.write_all(&zeros[..n])
                .map_err(|e| io_error(context(), e))?;
            written += n as u64;
        }
        file.sync_all().map_err(|e| io_error(context(), e))?;
        sync_dir(journal_dir)?;
        if cancel.load(Ordering::Relaxed) {
            drop(file);
            remove_quietly(&path);
            return Ok(None);
        }
        Ok(Some(PreparedSegment { id, path, file }))
    }

    /// Makes the prepared file segment `id` of the journal: renames it to its `.wal` name and
    /// `fsync`s the directory. Refuses to replace an existing segment.
    pub(crate) fn install(self, journal_dir: &Path) -> Result<OpenSegment, StoreError> {
        let path = journal_dir.join(segment_file_name(self.id));
        let context = || {
            format!(
                "installing prepared journal segment {} as {}",
                self.path.display(),
                path.display()
            )
        };
        match std::fs::symlink_metadata(&path) {
            Ok(_) => {
                return Err(io_error(
                    context(),
                    std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "the segment exists already; segments are never reused",
                    ),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(context(), e)),
        }
        std::fs::rename(&self.path, &path).map_err(|e| io_error(context(), e))?;
        sync_dir(journal_dir)?;
        Ok(OpenSegment {
            id: self.id,
            path,
            file: self.file,
            len: 0,
        })
    }

    /// Deletes the prepared file (a preparation nobody will install).
    pub(crate) fn discard(self) {
        drop(self.file);
        remove_quietly(&self.path);
    }
}

/// Removes a file whose removal is only tidying: a failure is logged, and the file is a
/// `.prep` one that the next open deletes anyway.
fn remove_quietly(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "could not delete a prepared journal segment; the next open deletes it")
        }
    }
}

/// The segment the writer writes to.
pub(crate) struct OpenSegment {
    pub id: u64,
    pub path: PathBuf,
    file: File,
    /// Bytes of data written so far: the offset of the next frame. The file may be longer
    /// (its prepared zeros) until [`OpenSegment::finish`].
    pub len: u64,
}

impl OpenSegment {
    /// Prepares segment `id` (which must not exist) on this thread and installs it (tests;
    /// the store prepares its segments with a [`super::prepare::SegmentPreparer`]).
    #[cfg(test)]
    pub(crate) fn create(
        journal_dir: &Path,
        id: u64,
        segment_bytes: u64,
    ) -> Result<OpenSegment, StoreError> {
        let prepared = PreparedSegment::prepare(
            journal_dir,
            id,
            preallocated_bytes(segment_bytes),
            "now",
            &AtomicBool::new(false),
        )?;
        match prepared {
            Some(prepared) => prepared.install(journal_dir),
            // Nobody else holds the flag, so this is not expected.
            None => Err(io_error(
                format!("preparing journal segment {id}"),
                std::io::Error::other("the preparation was cancelled"),
            )),
        }
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

    /// Writes `bytes` at offset `len` (over the prepared zeros, or past them) in one positioned
    /// write.
    pub(crate) fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(bytes, self.len)?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// `fdatasync`s the segment.
    pub(crate) fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Cuts the file to its data (dropping the prepared zeros after it) and `fsync`s it: the
    /// segment then has its exact length. Called at a roll and at a clean close.
    pub(crate) fn finish(&self) -> std::io::Result<()> {
        self.file.set_len(self.len)?;
        self.file.sync_all()
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
        assert_eq!(parse_segment_id(&prepared_file_name(7, "bg")), None);
        let mut names: Vec<String> = [10, 9, 100].iter().map(|i| segment_file_name(*i)).collect();
        names.sort();
        let ids: Vec<u64> = names.iter().filter_map(|n| parse_segment_id(n)).collect();
        assert_eq!(ids, vec![9, 10, 100]);
    }

    #[test]
    fn listing_ignores_other_files_and_orders_by_id() {
        let dir = tempfile::tempdir().unwrap();
        for id in [3u64, 1, 2] {
            OpenSegment::create(dir.path(), id, 4096).unwrap();
        }
        std::fs::write(dir.path().join("notes.txt"), b"").unwrap();
        let prepared = PreparedSegment::prepare(dir.path(), 4, 4096, "bg", &AtomicBool::new(false))
            .unwrap()
            .unwrap();
        let ids: Vec<u64> = list_segments(dir.path())
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(
            ids,
            vec![1, 2, 3],
            "a prepared segment is not in the journal"
        );
        assert!(
            OpenSegment::create(dir.path(), 2, 4096).is_err(),
            "segments are never reopened"
        );
        prepared.discard();
    }

    #[test]
    fn a_prepared_segment_has_its_full_size_in_zeros() {
        let dir = tempfile::tempdir().unwrap();
        // Not a multiple of the chunk, to check the last partial chunk.
        let size = 2 * ZERO_CHUNK_BYTES as u64 + 12_345;
        let prepared = PreparedSegment::prepare(dir.path(), 5, size, "bg", &AtomicBool::new(false))
            .unwrap()
            .unwrap();
        assert_eq!(
            prepared.path,
            dir.path().join("00000000000000000005.bg.prep")
        );
        let bytes = std::fs::read(&prepared.path).unwrap();
        assert_eq!(bytes.len() as u64, size);
        assert!(bytes.iter().all(|b| *b == 0));
        // Real blocks, not a sparse file.
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&prepared.path).unwrap();
        assert!(meta.blocks() * 512 >= size, "{} blocks", meta.blocks());

        let mut open = prepared.install(dir.path()).unwrap();
        assert_eq!(open.path, dir.path().join(segment_file_name(5)));
        assert_eq!(open.len, 0);
        assert!(!dir.path().join(prepared_file_name(5, "bg")).exists());
        assert_eq!(std::fs::metadata(&open.path).unwrap().len(), size);
        open.append(b"hello").unwrap();
        open.append(b" world").unwrap();
        open.sync().unwrap();
        let bytes = std::fs::read(&open.path).unwrap();
        assert_eq!(bytes.len() as u64, size, "written over the zeros in place");
        assert_eq!(&bytes[..11], b"hello world");
        assert!(bytes[11..].iter().all(|b| *b == 0));
        open.finish().unwrap();
        assert_eq!(std::fs::read(&open.path).unwrap(), b"hello world");
    }

    #[test]
    fn a_segment_grows_past_its_prepared_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let mut open = OpenSegment::create(dir.path(), 0, 8).unwrap();
        open.append(b"0123456789abcdef").unwrap();
        assert_eq!(open.len, 16);
        open.finish().unwrap();
        assert_eq!(std::fs::read(&open.path).unwrap(), b"0123456789abcdef");
    }

    #[test]
    fn a_cancelled_preparation_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cancelled = AtomicBool::new(true);
        let prepared = PreparedSegment::prepare(dir.path(), 1, 1 << 20, "bg", &cancelled).unwrap();
        assert!(prepared.is_none());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn stale_prepared_files_are_removed_and_segments_kept() {
        let dir = tempfile::tempdir().unwrap();
        OpenSegment::create(dir.path(), 1, 64).unwrap();
        std::fs::write(dir.path().join(prepared_file_name(2, "bg")), [0u8; 64]).unwrap();
        std::fs::write(dir.path().join(prepared_file_name(2, "now")), [0u8; 10]).unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"").unwrap();
        assert_eq!(remove_prepared(dir.path()).unwrap(), 2);
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec![segment_file_name(1), "notes.txt".to_string()]);
        assert_eq!(remove_prepared(dir.path()).unwrap(), 0);
    }

    #[test]
    fn preallocation_is_capped() {
        assert_eq!(preallocated_bytes(64 << 20), 64 << 20);
        assert_eq!(preallocated_bytes(u64::MAX), PREALLOCATE_BYTES_MAX);
    }
}
