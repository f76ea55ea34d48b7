//! An activation's view of its durable records besides state: pending timers, the stored
//! replies of request ids, the durable inbox, and caches of message receipts and send
//! counters. Every change here is made together with the ops that make it durable, which the
//! turn commits in its batch.
//!
//! **Owns**: turning timer effects and idempotency records into storage ops, and the
//! retention of stored replies (bounded by count and age per entity).

use std::collections::{HashMap, VecDeque};

use crate::address::EntityId;
use crate::behaviour::TIMER_NAME_BYTES_MAX;
use crate::storage::{Op, RecordKind, StoredEntry};

use super::records::{self, DedupRecord, DedupStamp, InboxItem, TimerRecord};
use super::stored_replies::StoredReplies;
use super::{EntityConfig, EntityError};

/// The longest client request id, in bytes.
pub const REQUEST_ID_BYTES_MAX: usize = 128;

/// Checks a client request id: 1 to [`REQUEST_ID_BYTES_MAX`] bytes of printable ASCII.
pub fn validate_request_id(request_id: &str) -> Result<(), String> {
    if request_id.is_empty() || request_id.len() > REQUEST_ID_BYTES_MAX {
        return Err(format!(
            "request id is {} bytes; it must be 1 to {REQUEST_ID_BYTES_MAX}",
            request_id.len()
        ));
    }
    if !request_id.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err("request id must be printable ASCII without spaces".into());
    }
    Ok(())
}

/// The durable records an activation keeps in memory. Most entities have none: then this
/// is two null pointers, each allocated on first use. Stored replies have their own
/// ([`StoredReplies`]), since with the clients' default request ids nearly every entity
/// has one.
#[derive(Default)]
pub(super) struct Durables {
    records: Option<Box<Records>>,
    replies: Option<Box<StoredReplies>>,
}

/// What [`Durables`] holds once an entity has any durable record.
#[derive(Default)]
pub(super) struct Records {
    /// Pending timers by name.
    pub timers: HashMap<String, TimerRecord>,
    /// Last message sequence number accepted per sender (loaded on first use).
    pub receipts: HashMap<EntityId, u64>,
    /// Last message sequence number sent per target (loaded on first use).
    pub send_seqs: HashMap<EntityId, u64>,
    /// Accepted durable messages not yet handled, in order.
    pub inbox: VecDeque<(u64, InboxItem)>,
    next_inbox_seq: u64,
    /// Removals owed for stored replies found expired at activation, written with the next
    /// batch.
    forget: Vec<Op>,
}

impl Durables {
    /// The records of an activation, from what storage loaded.
    pub fn load(
        id: &EntityId,
        records: &[StoredEntry],
        now_ms: u64,
        config: &EntityConfig,
    ) -> Result<Self, EntityError> {
        let mut durables = Durables::default();
        if records.is_empty() {
            return Ok(durables);
        }
        let (loaded, replies) = Records::load(id, records)?;
        if !loaded.is_empty() {
            durables.records = Some(Box::new(loaded));
        }
        if !replies.is_empty() {
            let mut stored = StoredReplies::default();
            for (request_id, at_ms, encoded) in replies {
                stored.remember(&request_id, at_ms, encoded);
            }
            let mut forget = Vec::new();
            let (window_ms, max) = retention(config);
            stored.prune(now_ms, window_ms, max, &mut forget);
            if !forget.is_empty() {
                durables.records_mut().forget = forget;
            }
            if stored.len() > 0 {
                durables.replies = Some(Box::new(stored));
            }
        }
        Ok(durables)
    }

    /// Ops owed from activation (expired stored replies), to add to the next batch.
    pub fn take_owed(&mut self) -> Vec<Op> {
        match &mut self.records {
            Some(records) => std::mem::take(&mut records.forget),
            None => Vec::new(),
        }
    }

    /// Forgets the stored replies past their retention window at `now_ms`, and returns the
    /// removals owed: theirs and those of replies found expired at activation.
    pub fn forget_expired_replies(&mut self, now_ms: u64, config: &EntityConfig) -> Vec<Op> {
        let mut ops = self.take_owed();
        if let Some(replies) = &mut self.replies {
            let (window_ms, max) = retention(config);
            replies.prune(now_ms, window_ms, max, &mut ops);
            if replies.len() == 0 {
                self.replies = None;
            }
        }
        ops
    }

    /// The records, allocated on first use: setting timers, storing replies and accepting
    /// inbox items go through here.
    pub fn records_mut(&mut self) -> &mut Records {
        self.records.get_or_insert_with(Box::default)
    }

    /// Whether a reply is stored for `request_id` (within the retention window).
    pub fn has_stored_reply(&self, request_id: &str) -> bool {
        self.replies
            .as_ref()
            .is_some_and(|replies| replies.get(request_id).is_some())
    }

    /// The stored reply of `request_id`, if it is within the retention window; an error if
    /// it does not decode.
    pub fn stored_reply(
        &self,
        id: &EntityId,
        request_id: &str,
    ) -> Option<Result<DedupRecord, EntityError>> {
        let encoded = self.replies.as_ref()?.get(request_id)?;
        let what = format!("stored reply of request {request_id:?}");
        Some(records::decode(id, &what, encoded))
    }

    /// Records the reply of a committed turn under `request_id` and forgets stored replies
    /// past the count or age bound, adding the ops to `ops`.
    pub fn store_reply(
        &mut self,
        id: &EntityId,
        request_id: &str,
        record: DedupRecord,
        config: &EntityConfig,
        ops: &mut Vec<Op>,
    ) -> Result<(), EntityError> {
        let encoded = records::encode(id, &record)?;
        ops.push(Op::PutRecord {
            kind: RecordKind::Dedup,
            name: request_id.as_bytes().to_vec(),
            value: encoded.clone(),
        });
        let replies = self.replies.get_or_insert_with(Box::default);
        replies.remember(request_id, record.at_ms, encoded.into_boxed_slice());
        let (window_ms, max) = retention(config);
        replies.prune(record.at_ms, window_ms, max, ops);
        Ok(())
    }

    /// The pending timer `name`.
    pub fn timer(&self, name: &str) -> Option<&TimerRecord> {
        self.records.as_ref()?.timers.get(name)
    }

    /// Cancels (or consumes, when it fires) timer `name`; nothing if it is not pending.
    pub fn cancel_timer(&mut self, name: &str, ops: &mut Vec<Op>) -> Option<TimerRecord> {
        self.records.as_mut()?.cancel_timer(name, ops)
    }

    /// The oldest accepted inbox item not yet handled.
    pub fn inbox_front(&self) -> Option<&(u64, InboxItem)> {
        self.records.as_ref()?.inbox.front()
    }

    /// Forgets the oldest inbox item (its turn removes it durably).
    pub fn pop_inbox(&mut self) {
        if let Some(records) = &mut self.records {
            records.inbox.pop_front();
        }
    }

    /// Whether accepted inbox items wait to be handled.
    pub fn has_inbox(&self) -> bool {
        self.inbox_front().is_some()
    }

    /// The cached sequence number of a peer (`Receipt` or `SendSeq`).
    pub fn cached_seq(&self, kind: RecordKind, peer: &EntityId) -> Option<u64> {
        let records = self.records.as_ref()?;
        match kind {
            RecordKind::Receipt => records.receipts.get(peer).copied(),
            _ => records.send_seqs.get(peer).copied(),
        }
    }

    /// Caches the sequence number of a peer (`Receipt` or `SendSeq`).
    pub fn cache_seq(&mut self, kind: RecordKind, peer: EntityId, seq: u64) {
        let records = self.records_mut();
        match kind {
            RecordKind::Receipt => records.receipts.insert(peer, seq),
            _ => records.send_seqs.insert(peer, seq),
        };
    }

    /// The ops that remove every timer index entry of the entity (before a `Delete`).
    pub fn timer_index_removals(&self) -> Vec<Op> {
        self.records
            .as_ref()
            .map(|records| records.timer_index_removals())
            .unwrap_or_default()
    }
}

/// A stored reply as loaded: request id, commit time, encoded record.
type LoadedReply = (String, u64, Box<[u8]>);

impl Records {
    /// Timers and inbox items, and the stored replies oldest first (only their commit time
    /// is decoded).
    fn load(
        id: &EntityId,
        records: &[StoredEntry],
    ) -> Result<(Self, Vec<LoadedReply>), EntityError> {
        let mut durables = Records::default();
        let mut replies: Vec<LoadedReply> = Vec::new();
        for entry in records {
            let name = || String::from_utf8_lossy(&entry.name).into_owned();
            match entry.kind {
                RecordKind::Timer => {
                    let what = format!("timer {:?}", name());
                    let timer: TimerRecord = records::decode(id, &what, &entry.value)?;
                    durables.timers.insert(name(), timer);
                }
                RecordKind::Dedup => {
                    let what = format!("stored reply of request {:?}", name());
                    let stamp: DedupStamp = records::decode(id, &what, &entry.value)?;
                    let encoded = entry.value.clone().into_boxed_slice();
                    replies.push((name(), stamp.at_ms, encoded));
                }
                RecordKind::Inbox => {
                    let seq = records::parse_inbox_name(&entry.name).ok_or_else(|| {
                        EntityError::Corrupt {
                            entity: id.clone(),
                            detail: format!("inbox record name of {} bytes", entry.name.len()),
                        }
                    })?;
                    let item = records::decode(id, &format!("inbox item {seq}"), &entry.value)?;
                    durables.inbox.push_back((seq, item));
                    durables.next_inbox_seq = durables.next_inbox_seq.max(seq + 1);
                }
                _ => {}
            }
        }
        replies.sort_by_key(|(_, at_ms, _)| *at_ms);
        Ok((durables, replies))
    }

    /// Whether nothing was loaded: no timers, no inbox items.
    fn is_empty(&self) -> bool {
        self.timers.is_empty() && self.inbox.is_empty()
    }

    /// Sets (or replaces) timer `name`.
    pub fn set_timer(
        &mut self,
        id: &EntityId,
        name: String,
        record: TimerRecord,
        ops: &mut Vec<Op>,
    ) -> Result<(), EntityError> {
        if name.is_empty() || name.len() > TIMER_NAME_BYTES_MAX {
            return Err(EntityError::Crashed {
                entity: id.clone(),
                reason: format!(
                    "timer name is {} bytes; it must be 1 to {TIMER_NAME_BYTES_MAX}",
                    name.len()
                ),
            });
        }
        self.cancel_timer(&name, ops);
        ops.push(Op::PutRecord {
            kind: RecordKind::Timer,
            name: name.as_bytes().to_vec(),
            value: records::encode(id, &record)?,
        });
        ops.push(Op::PutTimerDue {
            due_ms: record.due_ms,
            name: name.as_bytes().to_vec(),
        });
        self.timers.insert(name, record);
        Ok(())
    }

    /// Cancels (or consumes, when it fires) timer `name`; nothing if it is not pending.
    pub fn cancel_timer(&mut self, name: &str, ops: &mut Vec<Op>) -> Option<TimerRecord> {
        let record = self.timers.remove(name)?;
        ops.push(Op::RemoveRecord {
            kind: RecordKind::Timer,
            name: name.as_bytes().to_vec(),
        });
        ops.push(Op::RemoveTimerDue {
            due_ms: record.due_ms,
            name: name.as_bytes().to_vec(),
        });
        Some(record)
    }

    /// Accepts a message into the inbox; returns its inbox sequence number.
    pub fn accept_into_inbox(
        &mut self,
        id: &EntityId,
        item: InboxItem,
        ops: &mut Vec<Op>,
    ) -> Result<u64, EntityError> {
        let seq = self.next_inbox_seq;
        ops.push(Op::PutRecord {
            kind: RecordKind::Inbox,
            name: records::inbox_name(seq),
            value: records::encode(id, &item)?,
        });
        self.next_inbox_seq += 1;
        self.inbox.push_back((seq, item));
        Ok(seq)
    }

    /// The ops that remove every timer index entry of the entity (before a `Delete`).
    pub fn timer_index_removals(&self) -> Vec<Op> {
        self.timers
            .iter()
            .map(|(name, record)| Op::RemoveTimerDue {
                due_ms: record.due_ms,
                name: name.as_bytes().to_vec(),
            })
            .collect()
    }
}

/// How long stored replies are kept, and how many per entity.
fn retention(config: &EntityConfig) -> (u64, usize) {
    let window_ms = u64::try_from(config.dedup_window.as_millis()).unwrap_or(u64::MAX);
    (window_ms, config.dedup_per_entity_max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn config(max: usize, window_ms: u64) -> EntityConfig {
        EntityConfig {
            idle_timeout: Duration::from_secs(1),
            hibernate_after: Duration::ZERO,
            snapshot_every_events: 0,
            mailbox_capacity: 1,
            dedup_window: Duration::from_millis(window_ms),
            dedup_per_entity_max: max,
            dead_letter_after_crashes: 3,
        }
    }

    fn reply(at_ms: u64) -> DedupRecord {
        DedupRecord {
            at_ms,
            seq: 1,
            reply: json!(at_ms),
        }
    }

    #[test]
    fn request_ids_are_checked() {
        assert!(validate_request_id("abc-123_X").is_ok());
        assert!(validate_request_id("").is_err());
        assert!(validate_request_id("has space").is_err());
        assert!(validate_request_id(&"x".repeat(129)).is_err());
        assert!(validate_request_id("é").is_err());
    }

    #[test]
    fn stored_replies_are_bounded_by_count_and_age() {
        let id = EntityId::new("t", "k").unwrap();
        let config = config(2, 1000);
        let mut durables = Durables::default();
        let mut ops = Vec::new();
        durables
            .store_reply(&id, "a", reply(10), &config, &mut ops)
            .unwrap();
        durables
            .store_reply(&id, "b", reply(20), &config, &mut ops)
            .unwrap();
        ops.clear();
        durables
            .store_reply(&id, "c", reply(30), &config, &mut ops)
            .unwrap();
        assert!(durables.stored_reply(&id, "a").is_none());
        assert!(ops.contains(&Op::RemoveRecord {
            kind: RecordKind::Dedup,
            name: b"a".to_vec()
        }));
        ops.clear();
        // Past the window: b and c go when d is stored.
        durables
            .store_reply(&id, "d", reply(1031), &config, &mut ops)
            .unwrap();
        assert!(durables.stored_reply(&id, "b").is_none());
        assert!(durables.stored_reply(&id, "c").is_none());
        let stored = durables.stored_reply(&id, "d").unwrap().unwrap();
        assert_eq!((stored.reply, stored.at_ms), (json!(1031), 1031));
    }

    #[test]
    fn a_reply_is_kept_encoded_and_a_corrupt_one_is_an_error() {
        let id = EntityId::new("t", "k").unwrap();
        let config = config(10, 1000);
        let mut durables = Durables::default();
        let mut ops = Vec::new();
        let record = DedupRecord {
            at_ms: 5,
            seq: 7,
            reply: json!({"value": 3, "items": ["a", "b"]}),
        };
        durables
            .store_reply(&id, "r", record.clone(), &config, &mut ops)
            .unwrap();
        // What is kept is what storage gets.
        let stored = durables.replies.as_ref().unwrap().get("r").unwrap();
        assert_eq!(
            ops,
            vec![Op::PutRecord {
                kind: RecordKind::Dedup,
                name: b"r".to_vec(),
                value: stored.to_vec(),
            }]
        );
        assert_eq!(durables.stored_reply(&id, "r").unwrap().unwrap(), record);
        // Storing the same id again replaces it in place.
        let again = DedupRecord { seq: 8, ..record };
        durables
            .store_reply(&id, "r", again.clone(), &config, &mut ops)
            .unwrap();
        assert_eq!(durables.stored_reply(&id, "r").unwrap().unwrap(), again);
        assert_eq!(durables.replies.as_ref().unwrap().len(), 1);

        // 0xc1 is never valid MessagePack.
        durables
            .replies
            .as_mut()
            .unwrap()
            .remember("r", 5, Box::new([0xc1]));
        let err = durables.stored_reply(&id, "r").unwrap().unwrap_err();
        assert!(matches!(err, EntityError::Corrupt { .. }), "{err}");
    }

    /// The stored reply record `name` of `id`, committed at `at_ms`, as storage holds it.
    fn stored_reply_entry(id: &EntityId, name: &str, at_ms: u64) -> StoredEntry {
        StoredEntry {
            kind: RecordKind::Dedup,
            name: name.as_bytes().to_vec(),
            value: records::encode(id, &reply(at_ms)).unwrap(),
        }
    }

    /// The removal of stored reply `name`.
    fn forget(name: &str) -> Op {
        Op::RemoveRecord {
            kind: RecordKind::Dedup,
            name: name.as_bytes().to_vec(),
        }
    }

    #[test]
    fn loading_forgets_expired_replies_with_the_next_batch() {
        let id = EntityId::new("t", "k").unwrap();
        let config = config(10, 100);
        let entry = |name: &str, at_ms| stored_reply_entry(&id, name, at_ms);
        let mut durables =
            Durables::load(&id, &[entry("old", 1), entry("new", 950)], 1000, &config).unwrap();
        assert!(durables.stored_reply(&id, "old").is_none());
        assert!(!durables.has_stored_reply("old") && durables.has_stored_reply("new"));
        assert_eq!(
            durables.stored_reply(&id, "new").unwrap().unwrap(),
            reply(950)
        );
        assert_eq!(durables.take_owed(), vec![forget("old")]);
    }

    #[test]
    fn forgetting_expired_replies_owes_the_loaded_and_the_since_expired_ones() {
        let id = EntityId::new("t", "k").unwrap();
        let config = config(10, 100);
        let entry = |name: &str, at_ms| stored_reply_entry(&id, name, at_ms);
        let loaded = [entry("old", 1), entry("later", 950), entry("new", 990)];
        let mut durables = Durables::load(&id, &loaded, 1000, &config).unwrap();
        // At 1060, "later" has expired since activation; "new" has not.
        assert_eq!(
            durables.forget_expired_replies(1060, &config),
            vec![forget("old"), forget("later")]
        );
        assert!(durables.has_stored_reply("new") && !durables.has_stored_reply("later"));
        assert!(durables.forget_expired_replies(1060, &config).is_empty());
        assert_eq!(
            durables.forget_expired_replies(1100, &config),
            vec![forget("new")]
        );
        assert!(durables.replies.is_none(), "an empty list is dropped");
    }

    #[test]
    fn a_replaced_timer_leaves_no_stale_index_entry() {
        let id = EntityId::new("t", "k").unwrap();
        let mut durables = Durables::default();
        let mut ops = Vec::new();
        let timer = |due_ms| TimerRecord {
            due_ms,
            payload: json!(null),
        };
        durables
            .records_mut()
            .set_timer(&id, "t".into(), timer(10), &mut ops)
            .unwrap();
        ops.clear();
        durables
            .records_mut()
            .set_timer(&id, "t".into(), timer(20), &mut ops)
            .unwrap();
        assert!(ops.contains(&Op::RemoveTimerDue {
            due_ms: 10,
            name: b"t".to_vec()
        }));
        assert!(ops.contains(&Op::PutTimerDue {
            due_ms: 20,
            name: b"t".to_vec()
        }));
        assert_eq!(durables.timer("t").map(|t| t.due_ms), Some(20));
        assert!(durables
            .records_mut()
            .set_timer(&id, String::new(), timer(1), &mut ops)
            .is_err());
    }
}
