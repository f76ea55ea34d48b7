//! Event runs: consecutive events of one entity stored in sled as one value.
//!
//! **Owns**: the run value format, reading events back from a single-event value or a run,
//! and [`RunWriter`], which groups a layer's event writes into runs when a checkpoint writes
//! them to sled.
//!
//! Why: an entity that commits often (a counter) writes one event key per turn. Put in sled
//! one by one, they cost a tree insert each and most of the checkpoint's time; written as one
//! run per entity per checkpoint, they cost one.
//!
//! Layout. A single event keeps the `record` value format (version 1) under its own key
//! `j(seq)`, so data dirs written before runs read unchanged. A run of two or more lives under
//! its **last** event's key followed by [`keys::EVENT_RUN_MARKER`] and its first seq
//! (`j(last) 0x01 first`):
//! `RUN_FORMAT_VERSION u8 | crc32c u32 | count u32 | (len u32 | event value)*`, where each
//! event value is a version-1 `record` value checksummed over its own key `j(seq)`, seqs
//! strictly increase, and the CRC covers the run's key and every byte after the CRC field.
//!
//! Invariants:
//! - The overlay only ever holds single events; runs exist only in sled. A run's key never
//!   equals an event's key, so an event the overlay holds never hides a run in sled.
//! - Keyed after its last seq, a run is removed by a snapshot's trim (up to
//!   `j(seq) 0x01 u64::MAX`) exactly when the snapshot covers all of it; a run that straddles
//!   the snapshot stays, and `load` drops its events at or below the snapshot's seq.
//! - Replay after a crash can put events again that sled already holds (frames after the
//!   checkpoint position that the checkpoint wrote too). Written again, they form a run that
//!   overlaps the stored one: under the same key only if it holds exactly the same events
//!   (one seq of one incarnation is one event; `Delete` clears every event key), so writing
//!   never reads sled and never loses a stored event; readers drop duplicate seqs.

use super::codec::Reader;
use super::keys;
use super::record::{decode_value, VALUE_HEADER_BYTES};
use super::StoredRecord;

/// The first byte of a run value (a single event's value starts with `record`'s version 1).
pub const RUN_FORMAT_VERSION: u8 = 2;

/// Bytes before a run's first event.
const RUN_HEADER_BYTES: usize = 1 + 4 + 4;

fn run_checksum(key: &[u8], after_crc: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(key), after_crc)
}

/// Encodes the event values `events` (seq, version-1 value), seqs strictly increasing, as a
/// run stored under `key` (the last event's key).
fn encode_run<'a>(key: &[u8], events: impl ExactSizeIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(events.len() as u32).to_be_bytes());
    for value in events {
        body.extend_from_slice(&(value.len() as u32).to_be_bytes());
        body.extend_from_slice(value);
    }
    let mut out = Vec::with_capacity(RUN_HEADER_BYTES + body.len());
    out.push(RUN_FORMAT_VERSION);
    out.extend_from_slice(&run_checksum(key, &body).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// The seq a version-1 value says it has, without verifying it (the caller verifies).
fn value_seq(value: &[u8]) -> Option<u64> {
    let mut reader = Reader::new(value);
    reader.take(1 + 4)?;
    reader.u64()
}

/// The events stored under event key `key` (one, or a run), by seq, each verified against
/// its own key. `prefix_len` is the length of the entity's event prefix. The error is a
/// detail for `StoreError::CorruptEntity`.
pub(crate) fn decode_events(
    key: &[u8],
    prefix_len: usize,
    value: &[u8],
) -> Result<Vec<StoredRecord>, String> {
    let tail = key.get(prefix_len..).unwrap_or_default();
    let first_seq = match tail {
        [_, _, _, _, _, _, _, _] => None,
        [_, _, _, _, _, _, _, _, keys::EVENT_RUN_MARKER, first @ ..] if first.len() == 8 => {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(first);
            Some(u64::from_be_bytes(bytes))
        }
        _ => return Err(format!("an event key of {} bytes is malformed", key.len())),
    };
    let Some(key_seq) = keys::event_seq(&key[..prefix_len + 8], prefix_len) else {
        return Err(format!("an event key of {} bytes is malformed", key.len()));
    };
    let Some(first_seq) = first_seq else {
        let record = decode_value(key, value).map_err(|d| format!("event seq {key_seq}: {d}"))?;
        if record.seq != key_seq {
            return Err(format!(
                "event stored under seq {key_seq} says it is seq {}",
                record.seq
            ));
        }
        return Ok(vec![record]);
    };
    let malformed = |what: &str| format!("the run of events ending at seq {key_seq} {what}");
    let mut reader = Reader::new(value);
    let (Some(format), Some(stored_crc)) = (reader.u8(), reader.u32()) else {
        return Err(malformed("is shorter than its header"));
    };
    let body = &value[1 + 4..];
    if run_checksum(key, body) != stored_crc {
        return Err(malformed("failed its CRC32C check"));
    }
    if format != RUN_FORMAT_VERSION {
        return Err(malformed(&format!(
            "has format {format}, this server reads {RUN_FORMAT_VERSION}"
        )));
    }
    let Some(count) = reader.u32() else {
        return Err(malformed("is shorter than its header"));
    };
    let mut events = Vec::with_capacity(count as usize);
    let mut event_key = key[..prefix_len].to_vec();
    for _ in 0..count {
        let Some(event) = reader.u32().and_then(|len| reader.take(len as usize)) else {
            return Err(malformed("ends inside an event"));
        };
        let Some(seq) = value_seq(event) else {
            return Err(malformed(&format!(
                "holds an event of {} bytes, shorter than its {VALUE_HEADER_BYTES}-byte header",
                event.len()
            )));
        };
        if events
            .last()
            .is_some_and(|last: &StoredRecord| last.seq >= seq)
        {
            return Err(malformed("holds seqs out of order"));
        }
        event_key.truncate(prefix_len);
        event_key.extend_from_slice(&seq.to_be_bytes());
        events.push(decode_value(&event_key, event).map_err(|d| format!("event seq {seq}: {d}"))?);
    }
    if reader.take(1).is_some() {
        return Err(malformed("has bytes after its last event"));
    }
    if events.last().map(|e| e.seq) != Some(key_seq)
        || events.first().map(|e| e.seq) != Some(first_seq)
    {
        return Err(malformed("does not hold the seqs its key names"));
    }
    Ok(events)
}

/// The entity prefix length of an event key, `None` for any other key.
fn event_prefix_len(key: &[u8]) -> Option<usize> {
    (key.first() == Some(&keys::KIND_EVENT) && key.len() > 8).then(|| key.len() - 8)
}

/// Groups a layer's event puts, met in key order, into runs, one per entity; anything that is
/// not an event put goes straight through.
pub(crate) struct RunWriter<'a> {
    /// The current entity's consecutive event puts: (key, value).
    pending: Vec<(&'a [u8], &'a [u8])>,
}

impl<'a> RunWriter<'a> {
    pub(crate) fn new() -> Self {
        RunWriter {
            pending: Vec::new(),
        }
    }

    /// Takes a put of the layer, in key order. Returns the put back if it is not an event's.
    pub(crate) fn push(
        &mut self,
        batch: &mut sled::Batch,
        key: &'a [u8],
        value: &'a [u8],
    ) -> Option<(&'a [u8], &'a [u8])> {
        let Some(prefix_len) = event_prefix_len(key) else {
            self.finish(batch);
            return Some((key, value));
        };
        if self.pending.first().is_some_and(|(first, _)| {
            first.len() != key.len() || first[..prefix_len] != key[..prefix_len]
        }) {
            self.finish(batch);
        }
        self.pending.push((key, value));
        None
    }

    /// Writes the pending events: a lone event as itself, more as one run.
    pub(crate) fn finish(&mut self, batch: &mut sled::Batch) {
        match self.pending.as_slice() {
            [] => {}
            [(key, value)] => batch.insert(*key, *value),
            [(first_key, _), .., (last_key, _)] => {
                let prefix_len = last_key.len() - 8;
                let first_seq = keys::event_seq(first_key, prefix_len).unwrap_or_default();
                let run_key = keys::event_run_key(last_key, first_seq);
                let value = encode_run(&run_key, self.pending.iter().map(|(_, value)| *value));
                batch.insert(run_key, value);
            }
        }
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::EntityId;
    use crate::storage::record::encode_value;

    fn entity() -> EntityId {
        EntityId::new("counter", "k").unwrap()
    }

    fn event(seq: u64) -> (Vec<u8>, Vec<u8>) {
        let key = keys::event_key(&entity(), seq);
        let value = encode_value(&key, seq, 1, format!("payload {seq}").as_bytes());
        (key, value)
    }

    fn seqs(key: &[u8], value: &[u8]) -> Vec<u64> {
        let prefix_len = keys::event_prefix(&entity()).len();
        decode_events(key, prefix_len, value)
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect()
    }

    fn write(tree: &sled::Tree, events: &[(Vec<u8>, Vec<u8>)]) {
        let mut batch = sled::Batch::default();
        let mut runs = RunWriter::new();
        for (key, value) in events {
            assert!(runs.push(&mut batch, key, value).is_none());
        }
        runs.finish(&mut batch);
        tree.apply_batch(batch).unwrap();
    }

    /// What sled holds: (seq of the key, whether it is a run, the seqs it holds).
    fn stored(tree: &sled::Tree) -> Vec<(u64, bool, Vec<u64>)> {
        let prefix_len = keys::event_prefix(&entity()).len();
        tree.iter()
            .map(|item| {
                let (key, value) = item.unwrap();
                let seq = keys::event_seq(&key[..prefix_len + 8], prefix_len).unwrap();
                assert!(key.len() == prefix_len + 8 || key.len() == prefix_len + 17);
                (seq, key.len() > prefix_len + 8, seqs(&key, &value))
            })
            .collect()
    }

    fn tree() -> sled::Tree {
        sled::Config::new()
            .temporary(true)
            .open()
            .unwrap()
            .open_tree("t")
            .unwrap()
    }

    #[test]
    fn consecutive_events_become_one_run_after_the_last_key() {
        let tree = tree();
        write(&tree, &(1..=5).map(event).collect::<Vec<_>>());
        assert_eq!(stored(&tree), vec![(5, true, vec![1, 2, 3, 4, 5])]);
        write(&tree, &[event(6)]);
        assert_eq!(
            stored(&tree),
            vec![(5, true, vec![1, 2, 3, 4, 5]), (6, false, vec![6])]
        );
        let (key, value) = event(6);
        assert_eq!(
            tree.get(&key).unwrap().unwrap(),
            value,
            "a single event keeps format 1 under its own key"
        );
    }

    #[test]
    fn events_written_again_overlap_and_lose_nothing() {
        let tree = tree();
        write(&tree, &(1..=5).map(event).collect::<Vec<_>>());
        // Replay after a crash puts 3..=5 again: a run of its own, next to the first.
        write(&tree, &(3..=5).map(event).collect::<Vec<_>>());
        // The same events again: the same key, the same value.
        write(&tree, &(1..=5).map(event).collect::<Vec<_>>());
        // A lone 5 is a single event next to the runs, never in place of one.
        write(&tree, &[event(5)]);
        assert_eq!(
            stored(&tree),
            vec![
                (5, false, vec![5]),
                (5, true, vec![1, 2, 3, 4, 5]),
                (5, true, vec![3, 4, 5])
            ]
        );
    }

    #[test]
    fn damage_is_reported_not_skipped() {
        let key = keys::event_run_key(&event(3).0, 1);
        let events: Vec<_> = (1..=3).map(event).collect();
        let run = encode_run(&key, events.iter().map(|(_, v)| v.as_slice()));
        let prefix_len = keys::event_prefix(&entity()).len();
        assert_eq!(seqs(&key, &run), vec![1, 2, 3]);
        for at in [1, 6, 12, run.len() - 1] {
            let mut bad = run.clone();
            bad[at] ^= 0x10;
            assert!(
                decode_events(&key, prefix_len, &bad).is_err(),
                "flip at {at}"
            );
        }
        let other_key = keys::event_run_key(&event(4).0, 1);
        let err = decode_events(&other_key, prefix_len, &run).unwrap_err();
        assert!(
            err.contains("CRC32C"),
            "a run under another key fails: {err}"
        );
        let truncated = &run[..run.len() - 3];
        assert!(decode_events(&key, prefix_len, truncated).is_err());
        let err = decode_events(&event(3).0, prefix_len, &run).unwrap_err();
        assert!(
            err.contains("event seq 3"),
            "a run under an event's key: {err}"
        );
    }

    #[test]
    fn other_keys_pass_through() {
        let tree = tree();
        let mut batch = sled::Batch::default();
        let mut runs = RunWriter::new();
        let snapshot_key = keys::snapshot_key(&entity());
        let (k1, v1) = event(1);
        assert!(runs.push(&mut batch, &k1, &v1).is_none());
        let passed = runs.push(&mut batch, &snapshot_key, b"s");
        assert_eq!(passed, Some((&snapshot_key[..], &b"s"[..])));
        runs.finish(&mut batch);
        tree.apply_batch(batch).unwrap();
        assert_eq!(tree.get(&k1).unwrap().unwrap(), v1);
    }
}
