//! The write-ahead journal: segment files of CRC32C-framed records, one frame per
//! [`EntityBatch`](super::EntityBatch).
//!
//! **Owns**: the frame format ([`frame`]), segment files and their preallocation
//! ([`segment`]), preparing the next segment on a background thread (`prepare`), reading
//! segments back (`scan`), and the public helpers tools and end-to-end tests use to find
//! records on disk ([`segment_paths`], [`locate_frames`]). It knows nothing about sled; the
//! group-commit writer that writes to it lives in `storage::writer`.
//!
//! A segment file is its frames, back to back from offset 0, then — only in the last segment,
//! if the writer did not stop cleanly — zeros to its preallocated size.

pub mod frame;
pub(crate) mod prepare;
pub(crate) mod scan;
pub mod segment;

use std::path::{Path, PathBuf};

use crate::address::EntityId;

use super::fsync::io_error;
use super::StoreError;

pub use segment::{journal_dir, parse_segment_id, segment_file_name};

/// A position in the journal: a segment id and a byte offset in it. Positions order by
/// segment, then offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct JournalPosition {
    pub segment: u64,
    pub offset: u64,
}

impl std::fmt::Display for JournalPosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", segment_file_name(self.segment), self.offset)
    }
}

/// Where one frame sits in a segment file; offsets are from the start of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameLocation {
    /// Offset of the frame's first byte.
    pub offset: u64,
    /// Length of the whole frame.
    pub len: u64,
    /// Offset of the body's first byte.
    pub body_offset: u64,
    /// Length of the body.
    pub body_len: u64,
    pub shard: u32,
    pub entity: EntityId,
}

/// The journal segment files of a data dir, in segment order.
pub fn segment_paths(data_dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    Ok(segment::list_segments(&journal_dir(data_dir))?
        .into_iter()
        .map(|(_, path)| path)
        .collect())
}

/// The frames of a segment file whose heads verify, in file order, up to the first offset
/// where no head verifies (a preallocated zero tail ends the list). A frame whose body is
/// damaged is still listed.
pub fn locate_frames(segment: &Path) -> Result<Vec<FrameLocation>, StoreError> {
    let bytes = std::fs::read(segment)
        .map_err(|e| io_error(format!("reading journal segment {}", segment.display()), e))?;
    Ok(scan::scan(&bytes, 0)
        .frames
        .into_iter()
        .map(|frame| FrameLocation {
            offset: frame.offset,
            len: frame.head.frame_len() as u64,
            body_offset: frame.offset + frame.head.body_offset() as u64,
            body_len: frame.head.body_len as u64,
            shard: frame.head.shard,
            entity: frame.head.entity,
        })
        .collect())
}
