//! The data dir's lock: one store at a time on a data dir.
//!
//! **Owns**: [`DataDirLock`], an exclusive `flock` on `statehouse.lock` in the data dir, taken
//! before the store touches anything else there and held until the store is dropped. sled
//! has a lock of its own on `state/`, but the store writes the journal directory before sled
//! has opened (the first segment is prepared meanwhile, and stale `.prep` files are deleted),
//! so a second server must be refused before that. The kernel drops the lock when the process
//! dies, so a crash never leaves a data dir locked.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;
use std::time::{Duration, Instant};

use super::fsync::io_error;
use super::StoreError;

/// The lock file's name in the data dir.
pub const LOCK_FILE_NAME: &str = "statehouse.lock";

/// How long opening waits for the lock, and then for sled's: a store of this process
/// dropped a moment ago may still be finishing (sled's I/O threads outlive its handle
/// briefly; sled's own tests block on its lock for the same reason).
pub(crate) const LOCK_WAIT: Duration = Duration::from_secs(5);

/// The error of a data dir another store holds, with what the lock said, if anything.
pub(crate) fn in_use(data_dir: &Path, detail: Option<&dyn std::fmt::Display>) -> StoreError {
    let detail = detail.map(|d| format!(": {d}")).unwrap_or_default();
    StoreError::Metadata(format!(
        "the data dir {} is in use by another process (is another statehouse-server running on it?){detail}",
        data_dir.display()
    ))
}

/// Held while a store is open on the data dir; dropping it unlocks.
#[derive(Debug)]
pub(crate) struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Locks `data_dir` (which exists), waiting up to `wait` for another holder to let go.
    pub(crate) fn acquire(data_dir: &Path, wait: Duration) -> Result<DataDirLock, StoreError> {
        let path = data_dir.join(LOCK_FILE_NAME);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io_error(format!("opening the lock file {}", path.display()), e))?;
        let started = Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(DataDirLock { _file: file }),
                Err(TryLockError::WouldBlock) if started.elapsed() < wait => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(TryLockError::WouldBlock) => return Err(in_use(data_dir, None)),
                Err(TryLockError::Error(e)) => {
                    return Err(io_error(format!("locking {}", path.display()), e))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_locked_data_dir_is_refused_until_its_holder_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let held = DataDirLock::acquire(dir.path(), Duration::ZERO).unwrap();
        let refused = DataDirLock::acquire(dir.path(), Duration::from_millis(50)).unwrap_err();
        assert!(
            refused.to_string().contains("in use by another process"),
            "{refused}"
        );
        drop(held);
        DataDirLock::acquire(dir.path(), Duration::ZERO).unwrap();
    }

    #[test]
    fn the_lock_waits_for_a_holder_that_lets_go_soon() {
        let dir = tempfile::tempdir().unwrap();
        let held = DataDirLock::acquire(dir.path(), Duration::ZERO).unwrap();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(held);
        });
        DataDirLock::acquire(dir.path(), Duration::from_secs(5)).unwrap();
        releaser.join().unwrap();
    }
}
