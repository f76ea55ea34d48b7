//! The segment preparer: prepares the next journal segment on a background thread while the
//! writer fills the current one.
//!
//! **Owns**: the background preparations and their clean-up. The writer calls
//! [`SegmentPreparer::start`] for segment N+1 as soon as it starts writing segment N, and
//! [`SegmentPreparer::take`] when it rolls. `take` never waits for the background thread: if
//! the preparation is not done (or failed), it is cancelled and the writer prepares the
//! segment itself, under another `.prep` name so the two never share a file. Cancelled
//! preparations delete their file; one that finished anyway is deleted when it is reaped (at
//! the next `take` or at `stop`). Whatever a crash leaves is a `.prep` file, which the journal
//! ignores and the next open deletes.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::super::StoreError;
use super::segment::{preallocated_bytes, PreparedSegment};

type Preparation = JoinHandle<Result<Option<PreparedSegment>, StoreError>>;

/// One background preparation.
struct Job {
    id: u64,
    cancel: Arc<AtomicBool>,
    handle: Preparation,
}

impl Job {
    fn cancel(self) -> Preparation {
        self.cancel.store(true, Ordering::Relaxed);
        self.handle
    }
}

/// Prepares segments of one journal directory ahead of the writer.
pub(crate) struct SegmentPreparer {
    journal_dir: PathBuf,
    /// Bytes of zeros each segment is prepared with.
    size: u64,
    job: Option<Job>,
    /// Cancelled preparations not yet joined.
    abandoned: Vec<Preparation>,
}

impl SegmentPreparer {
    pub(crate) fn new(journal_dir: PathBuf, segment_bytes: u64) -> SegmentPreparer {
        SegmentPreparer {
            journal_dir,
            size: preallocated_bytes(segment_bytes),
            job: None,
            abandoned: Vec::new(),
        }
    }

    /// Starts preparing segment `id` on a new thread (a job for another id is cancelled). If
    /// the thread cannot be started, `take` prepares the segment when it is needed.
    pub(crate) fn start(&mut self, id: u64) {
        if self.job.as_ref().is_some_and(|job| job.id == id) {
            return;
        }
        if let Some(job) = self.job.take() {
            self.abandoned.push(job.cancel());
        }
        let cancel = Arc::new(AtomicBool::new(false));
        let journal_dir = self.journal_dir.clone();
        let size = self.size;
        let flag = Arc::clone(&cancel);
        let spawned = std::thread::Builder::new()
            .name("statehouse-segment-prep".into())
            .spawn(move || PreparedSegment::prepare(&journal_dir, id, size, "bg", &flag));
        match spawned {
            Ok(handle) => self.job = Some(Job { id, cancel, handle }),
            Err(e) => tracing::warn!(
                segment = id,
                error = %e,
                "could not start the journal segment preparer; the writer prepares the segment when it needs it"
            ),
        }
    }

    /// Segment `id`, prepared: the background preparation's if it is done and succeeded,
    /// otherwise prepared now on this thread. Never waits for the background thread.
    pub(crate) fn take(&mut self, id: u64) -> Result<PreparedSegment, StoreError> {
        self.reap(false);
        if let Some(job) = self.job.take() {
            if job.id == id && job.handle.is_finished() {
                if let Some(prepared) = joined(id, job.handle) {
                    return Ok(prepared);
                }
            } else {
                tracing::info!(
                    segment = id,
                    "the next journal segment is not prepared yet; the writer prepares it now"
                );
                self.abandoned.push(job.cancel());
            }
        }
        let cancel = AtomicBool::new(false);
        PreparedSegment::prepare(&self.journal_dir, id, self.size, "now", &cancel)?.ok_or_else(
            || {
                super::super::fsync::io_error(
                    format!("preparing journal segment {id}"),
                    std::io::Error::other("the preparation was cancelled"),
                )
            },
        )
    }

    /// Segment `id`, prepared: waits for the background preparation if it is of `id` (the
    /// store's first segment, prepared while sled opens, is worth the wait: the rest of it is
    /// shorter than starting over), otherwise cancels it and prepares `id` on this thread.
    pub(crate) fn take_waiting(&mut self, id: u64) -> Result<PreparedSegment, StoreError> {
        if let Some(job) = self.job.take_if(|job| job.id == id) {
            if let Some(prepared) = joined(id, job.handle) {
                return Ok(prepared);
            }
        }
        self.take(id)
    }

    /// Cancels any preparation, waits for the threads (each stops after at most one chunk
    /// of zeros) and deletes what they prepared. Called when the writer stops.
    pub(crate) fn stop(&mut self) {
        if let Some(job) = self.job.take() {
            self.abandoned.push(job.cancel());
        }
        self.reap(true);
    }

    /// Joins the abandoned preparations that are done (all of them with `wait`) and deletes
    /// any file one of them finished before it saw its cancellation.
    fn reap(&mut self, wait: bool) {
        let mut pending = Vec::new();
        for handle in std::mem::take(&mut self.abandoned) {
            if !wait && !handle.is_finished() {
                pending.push(handle);
                continue;
            }
            if let Ok(Ok(Some(prepared))) = handle.join() {
                prepared.discard();
            }
        }
        self.abandoned = pending;
    }
}

/// What the finished background preparation of segment `id` made; a failed one is logged
/// and, like a cancelled one, gives `None` (the caller prepares the segment itself).
fn joined(id: u64, preparation: Preparation) -> Option<PreparedSegment> {
    match preparation.join() {
        Ok(Ok(prepared)) => prepared,
        Ok(Err(e)) => {
            tracing::warn!(
                segment = id,
                error = %e,
                "preparing a journal segment in the background failed; preparing it now"
            );
            None
        }
        Err(_) => {
            tracing::warn!(
                segment = id,
                "the journal segment preparer panicked; preparing the segment now"
            );
            None
        }
    }
}

impl Drop for SegmentPreparer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::super::segment::list_segments;
    use super::*;

    fn files(dir: &std::path::Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_background_preparation_is_taken_once_done() {
        let dir = tempfile::tempdir().unwrap();
        let mut preparer = SegmentPreparer::new(dir.path().to_path_buf(), 3 << 20);
        preparer.start(7);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !preparer.job.as_ref().unwrap().handle.is_finished() {
            assert!(Instant::now() < deadline, "the preparation never finished");
            std::thread::sleep(Duration::from_millis(2));
        }
        let prepared = preparer.take(7).unwrap();
        assert_eq!(
            prepared.path.file_name().unwrap(),
            "00000000000000000007.bg.prep"
        );
        assert!(list_segments(dir.path()).unwrap().is_empty());
        let open = prepared.install(dir.path()).unwrap();
        assert_eq!(std::fs::metadata(&open.path).unwrap().len(), 3 << 20);
        preparer.stop();
        assert_eq!(files(dir.path()), vec!["00000000000000000007.wal"]);
    }

    #[test]
    fn without_a_preparation_the_caller_prepares_the_segment() {
        let dir = tempfile::tempdir().unwrap();
        let mut preparer = SegmentPreparer::new(dir.path().to_path_buf(), 4096);
        let prepared = preparer.take(3).unwrap();
        assert_eq!(
            prepared.path.file_name().unwrap(),
            "00000000000000000003.now.prep"
        );
        assert_eq!(std::fs::read(&prepared.path).unwrap(), vec![0u8; 4096]);
        prepared.discard();
        // A preparation of another id is cancelled, and its file goes.
        preparer.start(4);
        let prepared = preparer.take(5).unwrap();
        prepared.discard();
        preparer.stop();
        assert!(files(dir.path()).is_empty(), "{:?}", files(dir.path()));
    }

    #[test]
    fn taking_while_waiting_gets_the_background_preparation_of_that_id_only() {
        let dir = tempfile::tempdir().unwrap();
        // Large enough that the take comes before the preparation is done: it waits.
        let mut preparer = SegmentPreparer::new(dir.path().to_path_buf(), 64 << 20);
        preparer.start(1);
        let prepared = preparer.take_waiting(1).unwrap();
        assert_eq!(
            prepared.path.file_name().unwrap(),
            "00000000000000000001.bg.prep"
        );
        assert_eq!(std::fs::metadata(&prepared.path).unwrap().len(), 64 << 20);
        prepared.discard();
        // A preparation of another id is not waited for: it is cancelled and deleted, and
        // the asked-for segment is prepared on this thread.
        preparer.start(2);
        let prepared = preparer.take_waiting(3).unwrap();
        assert_eq!(
            prepared.path.file_name().unwrap(),
            "00000000000000000003.now.prep"
        );
        prepared.discard();
        preparer.stop();
        assert!(files(dir.path()).is_empty(), "{:?}", files(dir.path()));
    }

    #[test]
    fn stopping_cancels_and_deletes_the_preparation() {
        let dir = tempfile::tempdir().unwrap();
        let mut preparer = SegmentPreparer::new(dir.path().to_path_buf(), 64 << 20);
        preparer.start(1);
        preparer.stop();
        assert!(files(dir.path()).is_empty(), "{:?}", files(dir.path()));
        // Dropping stops too.
        let mut preparer = SegmentPreparer::new(dir.path().to_path_buf(), 1 << 20);
        preparer.start(2);
        drop(preparer);
        assert!(files(dir.path()).is_empty(), "{:?}", files(dir.path()));
    }
}
