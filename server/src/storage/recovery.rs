//! Recovery at open: replaying the journal after the last checkpoint into the shards'
//! overlays (the checkpoint that follows writes them to sled, in the background).
//!
//! **Owns**: deciding, segment by segment, what is a torn tail (cut off with a warning),
//! what is the zero tail of a killed writer's preallocated segment (cut off quietly), what is
//! damage (open fails with [`StoreError::CorruptJournal`]) and which entities a damaged record
//! makes corrupt (an `x` marker, so `load` refuses them by name). Stale prepared (`.prep`)
//! segment files are no business of recovery: they are not journal segments, never read here,
//! and `SledStore::open` deletes them.
//!
//! The rules, for the frames after the checkpoint position P:
//! - Only zero bytes from some offset to the end of the last segment: the normal end of a
//!   segment the writer was filling when the process died (segments are preallocated with
//!   zeros, see `journal::segment`). The segment is truncated there (logged at `info`). In a
//!   segment that is not the last, it is `CorruptJournal`: the writer cuts a segment to its
//!   data and syncs it before it starts the next.
//! - A head that does not verify, in the last segment, with no verifying head anywhere after
//!   it, or a frame running past the end of the last segment: a torn tail. The segment is
//!   truncated there.
//! - A head that does not verify with a verifying head later in the segment, or any bad head
//!   or short frame in a segment that is not the last: `CorruptJournal`.
//! - A verified head whose body fails its CRC: if it is the last frame of the last segment and
//!   nothing verifies after it, a torn tail (an append cut short inside the body, or followed
//!   by zeros a crash left); otherwise the entity gets an `x` marker and its later frames in
//!   this replay are skipped (applying them to state missing a batch would be wrong). A body
//!   that verifies but does not decode (an unknown operation tag or record kind) is treated
//!   the same way.
//!
//! Every operation, records and timer index entries included, replays through
//! [`super::apply::plan`], the same code the live path uses.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use crate::address::EntityId;

use super::apply::{plan, SledOp};
use super::fsync::io_error;
use super::journal::frame::decode_body;
use super::journal::scan::{scan, ScanEnd, ScannedFrame};
use super::journal::segment::list_segments;
use super::journal::JournalPosition;
use super::keys;
use super::state::State;
use super::StoreError;

/// What recovery found and did, for the start-up log and for tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The checkpoint replay started from, if the data dir had one.
    pub checkpoint: Option<JournalPosition>,
    /// Segments read.
    pub segments_replayed: usize,
    /// Frames replayed.
    pub frames_replayed: u64,
    /// Torn tails cut off: the segment and the offset it was truncated at.
    pub torn_tails: Vec<(PathBuf, u64)>,
    /// The preallocated zeros cut off the last segment (a writer killed while filling it):
    /// the segment and the offset it was truncated at, the end of its data.
    pub zero_tail: Option<(PathBuf, u64)>,
    /// Entities marked corrupt: shard, entity and the marker's detail.
    pub corrupt_entities: Vec<(u32, EntityId, String)>,
    /// The id of the segment the writer starts.
    pub next_segment: u64,
}

/// Replayed frames' writes, by shard, as they travel to an applier thread.
type ReplayChunk = Vec<(u32, Vec<SledOp>)>;

/// Frames whose writes travel to an applier thread together.
const REPLAY_CHUNK_FRAMES: usize = 1024;

/// Chunks of frames queued per applier; the reader waits when it is this far ahead.
const REPLAY_CHUNKS_QUEUED: usize = 8;

/// The most threads that apply replayed writes (one per core up to this).
const REPLAY_APPLIERS_MAX: usize = 4;

/// The writes of replayed frames, on their way to the threads that apply them to the
/// overlays. Reading, checking and decoding the journal (this thread) costs less than
/// inserting into the overlays' ordered maps, so several appliers share the shards (a shard
/// always goes to the same one, which applies its writes in journal order; frames of
/// different shards touch disjoint keys, so their relative order does not matter).
struct ReplaySink {
    /// Per applier, the frames not yet sent to it.
    chunks: Vec<ReplayChunk>,
    appliers: Vec<mpsc::SyncSender<ReplayChunk>>,
}

impl ReplaySink {
    fn push(&mut self, shard: u32, writes: Vec<SledOp>) {
        let n = shard as usize % self.appliers.len();
        self.chunks[n].push((shard, writes));
        if self.chunks[n].len() >= REPLAY_CHUNK_FRAMES {
            self.send(n);
        }
    }

    fn send(&mut self, n: usize) {
        let chunk = std::mem::replace(&mut self.chunks[n], Vec::with_capacity(REPLAY_CHUNK_FRAMES));
        if !chunk.is_empty() {
            // An applier only stops once this sink is dropped.
            let _ = self.appliers[n].send(chunk);
        }
    }

    fn send_all(&mut self) {
        for n in 0..self.appliers.len() {
            self.send(n);
        }
    }
}

/// Replays the journal in `journal_dir` after the checkpoint recorded in `state` into the
/// shards' overlays, each shard's frames in journal order.
pub(crate) fn recover(state: &State, journal_dir: &Path) -> Result<RecoveryReport, StoreError> {
    let applier_count = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, REPLAY_APPLIERS_MAX);
    std::thread::scope(|scope| {
        let mut appliers = Vec::with_capacity(applier_count);
        let mut threads = Vec::with_capacity(applier_count);
        for n in 0..applier_count {
            let (chunks, queue) = mpsc::sync_channel::<ReplayChunk>(REPLAY_CHUNKS_QUEUED);
            let thread = std::thread::Builder::new()
                .name(format!("statehouse-replay-{n}"))
                .spawn_scoped(scope, move || {
                    for chunk in queue {
                        for (shard, writes) in chunk {
                            if let Some(shard) = state.shards.get(shard as usize) {
                                shard.overlay.apply([writes]);
                            }
                        }
                    }
                })
                .map_err(|e| io_error("starting a replay thread", e))?;
            appliers.push(chunks);
            threads.push(thread);
        }
        let mut sink = ReplaySink {
            chunks: vec![Vec::with_capacity(REPLAY_CHUNK_FRAMES); applier_count],
            appliers,
        };
        let replayed = replay_segments(state, journal_dir, &mut sink);
        sink.send_all();
        drop(sink);
        for thread in threads {
            if let Err(panic) = thread.join() {
                std::panic::resume_unwind(panic);
            }
        }
        replayed
    })
}

fn replay_segments(
    state: &State,
    journal_dir: &Path,
    sink: &mut ReplaySink,
) -> Result<RecoveryReport, StoreError> {
    let checkpoint = state.read_checkpoint()?;
    let start = checkpoint.unwrap_or_default();
    let segments = list_segments(journal_dir)?;
    let last_id = segments.last().map(|(id, _)| *id);
    let mut report = RecoveryReport {
        checkpoint,
        next_segment: last_id.unwrap_or(0).max(start.segment) + 1,
        ..RecoveryReport::default()
    };
    let mut skipped: HashSet<(u32, EntityId)> = HashSet::new();

    for (id, path) in segments {
        // Segments before the checkpoint's are covered by sled; a crash between recording a
        // checkpoint and deleting them leaves them behind, and the next checkpoint deletes them.
        if id < start.segment {
            continue;
        }
        let is_last = Some(id) == last_id;
        let bytes = std::fs::read(&path)
            .map_err(|e| io_error(format!("reading journal segment {}", path.display()), e))?;
        let from = if id == start.segment { start.offset } else { 0 };
        if from > bytes.len() as u64 {
            if is_last {
                // Possible with `Durability::Async`: sled was checkpointed with batches whose
                // journal bytes a power cut then lost. sled has them; nothing to replay.
                tracing::warn!(
                    segment = %path.display(),
                    checkpoint_offset = from,
                    len = bytes.len(),
                    "journal segment is shorter than the checkpoint position; nothing to replay in it"
                );
                continue;
            }
            return Err(StoreError::CorruptJournal {
                segment: path,
                offset: bytes.len() as u64,
                detail: format!("the segment ends before the checkpoint position (offset {from})"),
            });
        }
        report.segments_replayed += 1;
        let mut scanned = scan(&bytes, from as usize);

        let mut cut_at = match &scanned.end {
            ScanEnd::Clean => None,
            ScanEnd::Damaged {
                offset,
                next_valid,
                detail,
            } => {
                return Err(StoreError::CorruptJournal {
                    segment: path,
                    offset: *offset,
                    detail: format!(
                        "{detail}; a valid record follows at offset {next_valid}, so this is damage, not a torn tail"
                    ),
                });
            }
            ScanEnd::ZeroTail { offset } => {
                let offset = *offset;
                if !is_last {
                    return Err(StoreError::CorruptJournal {
                        segment: path,
                        offset,
                        detail: "only zero bytes from here to the end, in a segment that is not the last (a finished segment is cut to its data)".into(),
                    });
                }
                Some(Cut::ZeroTail(offset))
            }
            ScanEnd::Torn { offset, detail } | ScanEnd::Incomplete { offset, detail } => {
                let offset = *offset;
                if !is_last {
                    return Err(StoreError::CorruptJournal {
                        segment: path,
                        offset,
                        detail: format!("{detail}, in a segment that is not the last"),
                    });
                }
                tracing::warn!(segment = %path.display(), offset, detail = %detail, "torn journal tail");
                Some(Cut::Torn(offset))
            }
        };
        // A bad body is a torn tail only if nothing verifiable follows it, not even an
        // incomplete frame.
        let nothing_after = matches!(
            scanned.end,
            ScanEnd::Clean | ScanEnd::Torn { .. } | ScanEnd::ZeroTail { .. }
        );
        if is_last && nothing_after && scanned.frames.last().is_some_and(|f| !f.body_ok) {
            if let Some(frame) = scanned.frames.pop() {
                tracing::warn!(
                    segment = %path.display(),
                    offset = frame.offset,
                    entity = %frame.head.entity,
                    "the last journal record failed its body CRC32C check with nothing after it: torn tail"
                );
                cut_at = Some(Cut::Torn(frame.offset));
            }
        }

        for frame in &scanned.frames {
            replay_frame(state, &path, &bytes, frame, &mut skipped, &mut report, sink)?;
        }

        match cut_at {
            None => {}
            Some(Cut::Torn(offset)) => {
                truncate(&path, offset)?;
                tracing::warn!(segment = %path.display(), offset, "journal segment truncated at its torn tail");
                report.torn_tails.push((path, offset));
            }
            Some(Cut::ZeroTail(offset)) => {
                truncate(&path, offset)?;
                tracing::info!(
                    segment = %path.display(),
                    offset,
                    len = bytes.len(),
                    "the last journal segment ends in preallocated zeros (the writer stopped without closing it); truncated to its data"
                );
                report.zero_tail = Some((path, offset));
            }
        }
    }
    Ok(report)
}

/// Where the last segment is cut, and why.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// A torn tail: an interrupted append.
    Torn(u64),
    /// Preallocated zeros after the data.
    ZeroTail(u64),
}

fn replay_frame(
    state: &State,
    path: &Path,
    bytes: &[u8],
    frame: &ScannedFrame,
    skipped: &mut HashSet<(u32, EntityId)>,
    report: &mut RecoveryReport,
    sink: &mut ReplaySink,
) -> Result<(), StoreError> {
    let head = &frame.head;
    if head.shard >= state.shard_count() {
        return Err(StoreError::CorruptJournal {
            segment: path.to_path_buf(),
            offset: frame.offset,
            detail: format!(
                "the record names shard {} but this data dir has {} shards",
                head.shard,
                state.shard_count()
            ),
        });
    }
    let entity_key = (head.shard, head.entity.clone());
    if skipped.contains(&entity_key) {
        return Ok(());
    }
    let segment_name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let problem = if frame.body_ok {
        let start = frame.offset as usize + head.body_offset();
        let body = bytes.get(start..start + head.body_len);
        match body.map(decode_body) {
            Some(Ok(ops)) => {
                sink.push(head.shard, plan(&head.entity, &ops));
                report.frames_replayed += 1;
                return Ok(());
            }
            Some(Err(detail)) => format!(
                "journal record in segment {segment_name} at offset {} could not be decoded: {detail}",
                frame.offset
            ),
            None => format!(
                "journal record in segment {segment_name} at offset {} lies outside the segment",
                frame.offset
            ),
        }
    } else {
        format!(
            "journal record in segment {segment_name} at offset {} failed its CRC32C check",
            frame.offset
        )
    };
    tracing::error!(entity = %head.entity, shard = head.shard, detail = problem, "entity marked corrupt");
    sink.push(
        head.shard,
        vec![SledOp::Put {
            key: keys::corrupt_key(&head.entity),
            value: problem.clone().into_bytes(),
        }],
    );
    skipped.insert(entity_key);
    report
        .corrupt_entities
        .push((head.shard, head.entity.clone(), problem));
    Ok(())
}

fn truncate(path: &Path, offset: u64) -> Result<(), StoreError> {
    let context = || format!("truncating journal segment {} at {offset}", path.display());
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| io_error(context(), e))?;
    file.set_len(offset).map_err(|e| io_error(context(), e))?;
    file.sync_all().map_err(|e| io_error(context(), e))
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use crate::address::EntityId;
    use crate::storage::journal::segment::{prepared_file_name, PREPARED_EXTENSION};
    use crate::storage::journal::{locate_frames, segment_paths};
    use crate::storage::{EntityBatch, Op, SledStore, Store, StoreConfig};

    fn config(data_dir: &Path, segment_bytes: u64) -> StoreConfig {
        StoreConfig {
            shard_count: 2,
            journal_segment_bytes: segment_bytes,
            commits_pending_max: 64,
            ..StoreConfig::for_tests(data_dir.to_path_buf())
        }
    }

    fn batch(key: &str, seq: u64) -> EntityBatch {
        EntityBatch {
            shard: 0,
            entity: EntityId::new("counter", key).unwrap(),
            ops: vec![Op::Event {
                seq,
                behaviour_version: 1,
                payload: vec![seq as u8; 100],
            }],
        }
    }

    /// Copies the journal and state as a SIGKILL would leave them (the store is idle).
    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let dest = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &dest);
            } else {
                std::fs::copy(entry.path(), &dest).unwrap();
            }
        }
    }

    fn prep_files(journal: &Path) -> Vec<String> {
        std::fs::read_dir(journal)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(PREPARED_EXTENSION))
            .collect()
    }

    async fn open(data_dir: &Path, segment_bytes: u64) -> Arc<SledStore> {
        SledStore::open(config(data_dir, segment_bytes)).unwrap()
    }

    #[tokio::test]
    async fn a_kill_mid_segment_replays_every_frame_and_cuts_the_zero_tail() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        let segment_bytes = 4 << 20;
        let store = open(&data, segment_bytes).await;
        for seq in 1..=50 {
            store.commit(batch("k", seq)).await.unwrap();
        }
        let copy = root.path().join("killed");
        copy_dir(&data, &copy);
        store.close().await.unwrap();

        let segment = segment_paths(&copy).unwrap().pop().unwrap();
        let frames = locate_frames(&segment).unwrap();
        assert_eq!(frames.len(), 50);
        let data_end = frames.last().map(|f| f.offset + f.len).unwrap();
        assert_eq!(
            std::fs::metadata(&segment).unwrap().len(),
            segment_bytes,
            "the killed writer's segment is preallocated"
        );
        // A stale preparation holding a copy of real frames, under the next segment's name:
        // never replayed, deleted at open.
        let journal = copy.join("journal");
        let stale = journal.join(prepared_file_name(u64::from(u32::MAX), "bg"));
        std::fs::copy(&segment, &stale).unwrap();

        let recovered = open(&copy, segment_bytes).await;
        let report = recovered.recovery_report().clone();
        assert_eq!(report.frames_replayed, 50);
        assert!(report.torn_tails.is_empty(), "{report:?}");
        assert_eq!(report.zero_tail, Some((segment.clone(), data_end)));
        assert_eq!(std::fs::metadata(&segment).unwrap().len(), data_end);
        assert!(!stale.exists(), "stale prepared files are deleted");
        assert!(
            report.next_segment < u64::from(u32::MAX),
            "a prepared file's id is not a segment id: {report:?}"
        );
        let loaded = recovered
            .load(0, &EntityId::new("counter", "k").unwrap())
            .await
            .unwrap();
        assert_eq!(loaded.events.len(), 50);
        recovered.close().await.unwrap();
        // A clean close leaves no preparation and the last segment cut to its data.
        assert!(
            prep_files(&journal).is_empty(),
            "{:?}",
            prep_files(&journal)
        );
        for segment in segment_paths(&copy).unwrap() {
            let frames = locate_frames(&segment).unwrap();
            let end = frames.last().map_or(0, |f| f.offset + f.len);
            assert_eq!(std::fs::metadata(&segment).unwrap().len(), end);
        }
    }

    #[tokio::test]
    async fn a_zero_tail_before_the_last_segment_is_corruption() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        // Every frame fills a segment, so each segment holds one frame.
        let store = open(&data, 100).await;
        for seq in 1..=3 {
            store.commit(batch("k", seq)).await.unwrap();
        }
        // The writer rolls after it answers; wait for the fourth segment, then "kill".
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while segment_paths(&data).unwrap().len() < 4 {
            assert!(std::time::Instant::now() < deadline, "no fourth segment");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let data_copy = root.path().join("killed");
        copy_dir(&data, &data_copy);
        store.close().await.unwrap();
        let data = data_copy;
        let segments = segment_paths(&data).unwrap();
        assert_eq!(segments.len(), 4, "{segments:?}");
        let first = &segments[0];
        let len = std::fs::metadata(first).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(first)
            .unwrap()
            .set_len(len + 4096)
            .unwrap();
        match SledStore::open(config(&data, 100)) {
            Err(crate::storage::StoreError::CorruptJournal {
                segment,
                offset,
                detail,
            }) => {
                assert_eq!(&segment, first);
                assert_eq!(offset, len);
                assert!(detail.contains("not the last"), "{detail}");
            }
            other => panic!("expected CorruptJournal, got {other:?}"),
        }
    }
}
