//! The replies an entity keeps for the request ids of its committed turns, so a retry gets
//! the stored outcome instead of running again.
//!
//! **Owns**: [`StoredReplies`]: the replies oldest first, kept as storage holds them (encoded)
//! and decoded only when a retry asks for one, and their retention by count and age. With
//! the clients' default request ids nearly every entity has one, so a single stored reply
//! costs four small allocations (~0.2 KiB): the list, its first slot, the id, the bytes. An
//! entity with more than [`LINEAR_MAX`] also gets an index by id, so a hot entity with
//! hundreds of them does not compare ids one by one on every request.

use std::collections::{HashMap, VecDeque};

use crate::storage::{Op, RecordKind};

/// Replies looked up by scanning, at most; past this an index is kept as well.
pub const LINEAR_MAX: usize = 8;

/// The stored replies of one entity, oldest first.
#[derive(Default)]
pub struct StoredReplies {
    entries: VecDeque<StoredReply>,
    /// Request id → absolute number of its entry (`forgotten` + position), once there are
    /// more than [`LINEAR_MAX`] entries. Boxed: one word while absent instead of a map's six,
    /// which every entity with a stored reply would pay.
    #[allow(clippy::box_collection)]
    index: Option<Box<HashMap<Box<str>, u64>>>,
    /// Entries forgotten from the front so far: what turns positions into absolute numbers.
    forgotten: u64,
}

struct StoredReply {
    request_id: Box<str>,
    /// When the turn committed, Unix milliseconds: the retention window counts from here.
    at_ms: u64,
    /// The stored record as storage holds it.
    encoded: Box<[u8]>,
}

impl StoredReplies {
    /// The encoded reply of `request_id`, if kept.
    pub fn get(&self, request_id: &str) -> Option<&[u8]> {
        let position = self.position(request_id)?;
        Some(&self.entries[position].encoded)
    }

    /// Keeps `encoded` as the reply of `request_id`; a repeat replaces it in place (its
    /// place in the order stays).
    pub fn remember(&mut self, request_id: &str, at_ms: u64, encoded: Box<[u8]>) {
        if let Some(position) = self.position(request_id) {
            let entry = &mut self.entries[position];
            (entry.at_ms, entry.encoded) = (at_ms, encoded);
            return;
        }
        if self.entries.capacity() == 0 {
            // Most entities never store a second reply: room for one, not four.
            self.entries.reserve_exact(1);
        }
        let number = self.forgotten + self.entries.len() as u64;
        self.entries.push_back(StoredReply {
            request_id: request_id.into(),
            at_ms,
            encoded,
        });
        match &mut self.index {
            Some(index) => {
                index.insert(request_id.into(), number);
            }
            None if self.entries.len() > LINEAR_MAX => {
                let first = self.forgotten;
                let index = self
                    .entries
                    .iter()
                    .zip(first..)
                    .map(|(entry, number)| (entry.request_id.clone(), number))
                    .collect();
                self.index = Some(Box::new(index));
            }
            None => {}
        }
    }

    /// Forgets the replies older than `window_ms` at `now_ms`, and the oldest past `max`,
    /// adding the removals to `ops`.
    pub fn prune(&mut self, now_ms: u64, window_ms: u64, max: usize, ops: &mut Vec<Op>) {
        while let Some(oldest) = self.entries.front() {
            let expired = oldest.at_ms.saturating_add(window_ms) < now_ms;
            if !expired && self.entries.len() <= max {
                break;
            }
            let Some(oldest) = self.entries.pop_front() else {
                break;
            };
            self.forgotten += 1;
            if let Some(index) = &mut self.index {
                index.remove(&oldest.request_id);
            }
            ops.push(Op::RemoveRecord {
                kind: RecordKind::Dedup,
                name: oldest.request_id.into_boxed_bytes().into_vec(),
            });
        }
    }

    /// How many replies are kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    fn position(&self, request_id: &str) -> Option<usize> {
        match &self.index {
            Some(index) => {
                let number = *index.get(request_id)?;
                usize::try_from(number - self.forgotten).ok()
            }
            None => self
                .entries
                .iter()
                .position(|entry| &*entry.request_id == request_id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: u64) -> Box<[u8]> {
        n.to_be_bytes().into()
    }

    fn removed(ops: &[Op]) -> Vec<String> {
        ops.iter()
            .map(|op| match op {
                Op::RemoveRecord {
                    kind: RecordKind::Dedup,
                    name,
                } => String::from_utf8(name.clone()).unwrap(),
                other => panic!("unexpected op {other:?}"),
            })
            .collect()
    }

    #[test]
    fn replies_are_found_replaced_in_place_and_forgotten_oldest_first() {
        let mut replies = StoredReplies::default();
        replies.remember("a", 10, bytes(1));
        replies.remember("b", 20, bytes(2));
        replies.remember("a", 30, bytes(3));
        assert_eq!(replies.len(), 2);
        assert_eq!(replies.get("a"), Some(&bytes(3)[..]));
        assert_eq!(replies.get("c"), None);

        // "a" kept its place: it goes first, though it was stored again later.
        let mut ops = Vec::new();
        replies.prune(30, 1000, 1, &mut ops);
        assert_eq!(removed(&ops), ["a"]);
        assert_eq!(replies.get("b"), Some(&bytes(2)[..]));
        // Past the window.
        ops.clear();
        replies.prune(1021, 1000, 10, &mut ops);
        assert_eq!(removed(&ops), ["b"]);
        assert_eq!(replies.len(), 0);
    }

    #[test]
    fn one_reply_takes_one_slot() {
        assert_eq!(std::mem::size_of::<StoredReplies>(), 48);
        let mut replies = StoredReplies::default();
        replies.remember("only", 1, bytes(1));
        assert_eq!(replies.entries.capacity(), 1);
        assert!(replies.index.is_none());
    }

    /// Against a model: a map with an insertion order, through the switch to the index and
    /// pruning that moves the absolute numbers.
    #[test]
    fn the_index_agrees_with_a_scan_through_growth_and_pruning() {
        let mut replies = StoredReplies::default();
        let mut model: Vec<(String, u64)> = Vec::new();
        let mut ops = Vec::new();
        for step in 0..400u64 {
            let id = format!("r{}", (step * 7) % 53);
            match model.iter_mut().find(|(known, _)| *known == id) {
                Some(entry) => entry.1 = step,
                None => model.push((id.clone(), step)),
            }
            replies.remember(&id, step, bytes(step));
            if step % 5 == 0 {
                let max = 3 + (step as usize % 17);
                replies.prune(step, 1_000_000, max, &mut ops);
                let excess = model.len().saturating_sub(max);
                model.drain(..excess);
            }
            assert_eq!(replies.len(), model.len(), "step {step}");
            for (known, at) in &model {
                assert_eq!(
                    replies.get(known),
                    Some(&bytes(*at)[..]),
                    "step {step}: {known}"
                );
            }
            assert_eq!(replies.get("never"), None);
        }
        assert!(replies.index.is_some(), "the index was never built");
    }
}
