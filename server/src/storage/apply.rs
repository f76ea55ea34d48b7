//! Turning a batch's operations into sled writes, and applying them.
//!
//! **Owns**: what each [`Op`] does to the keys of [`super::keys`]. The same [`plan`] serves the
//! live path (computed in the committing task, applied by the writer thread) and replay
//! (computed from frames read back), so a recovered entity cannot differ from the live one.
//!
//! Every write is a blind put or remove; a range removal removes whatever is in the range when
//! it runs. Applying the plans of a journal suffix again therefore leaves the same state,
//! which is what makes replay after a checkpoint idempotent.
//!
//! | op | writes |
//! |---|---|
//! | `Event{seq}` | put `j(seq)` |
//! | `Snapshot{seq}` | put `s`, remove `j(0..=seq)` (and runs ending at `seq`) |
//! | `Delete` | remove `s`, `x`, every `j` (events and runs) and every record of every [`RecordKind`] |
//! | `PutRecord{kind,name}` | put `kind type key name` (value checksummed over the key) |
//! | `RemoveRecord{kind,name}` | remove `kind type key name` |
//! | `PutTimerDue{due_ms,name}` | put `t due_ms type key name` (checksummed empty value) |
//! | `RemoveTimerDue{due_ms,name}` | remove `t due_ms type key name` |
//!
//! `Delete` leaves the shard's timer index alone: its entries are not under the entity's
//! keys, and the entity removes them with `RemoveTimerDue` in the same batch.

use crate::address::EntityId;

use super::keys;
use super::record::encode_value;
use super::{Op, RecordKind};

/// One sled write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SledOp {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Remove {
        key: Vec<u8>,
    },
    /// Removes every key from `from` to `to_inclusive`.
    RemoveRange {
        from: Vec<u8>,
        to_inclusive: Vec<u8>,
    },
    /// Removes every key that starts with `prefix`.
    RemovePrefix {
        prefix: Vec<u8>,
    },
}

/// The sled writes of one batch of `entity`, in order.
pub(crate) fn plan(entity: &EntityId, ops: &[Op]) -> Vec<SledOp> {
    let mut writes = Vec::with_capacity(ops.len() + 2);
    for op in ops {
        match op {
            Op::Event {
                seq,
                behaviour_version,
                payload,
            } => {
                let key = keys::event_key(entity, *seq);
                let value = encode_value(&key, *seq, *behaviour_version, payload);
                writes.push(SledOp::Put { key, value });
            }
            Op::Snapshot {
                seq,
                behaviour_version,
                payload,
            } => {
                let key = keys::snapshot_key(entity);
                let value = encode_value(&key, *seq, *behaviour_version, payload);
                writes.push(SledOp::Put { key, value });
                // Runs ending at `seq` too (their key follows the event's own).
                writes.push(SledOp::RemoveRange {
                    from: keys::event_key(entity, 0),
                    to_inclusive: keys::event_run_key(&keys::event_key(entity, *seq), u64::MAX),
                });
            }
            Op::Delete => {
                writes.push(SledOp::Remove {
                    key: keys::snapshot_key(entity),
                });
                writes.push(SledOp::Remove {
                    key: keys::corrupt_key(entity),
                });
                writes.push(SledOp::RemovePrefix {
                    prefix: keys::event_prefix(entity),
                });
                for kind in RecordKind::ALL {
                    writes.push(SledOp::RemovePrefix {
                        prefix: keys::record_prefix(kind, entity),
                    });
                }
            }
            Op::PutRecord { kind, name, value } => {
                let key = keys::record_key(*kind, entity, name);
                let value = encode_value(&key, 0, 0, value);
                writes.push(SledOp::Put { key, value });
            }
            Op::RemoveRecord { kind, name } => writes.push(SledOp::Remove {
                key: keys::record_key(*kind, entity, name),
            }),
            Op::PutTimerDue { due_ms, name } => {
                let key = keys::timer_index_key(*due_ms, entity, name);
                let value = encode_value(&key, 0, 0, &[]);
                writes.push(SledOp::Put { key, value });
            }
            Op::RemoveTimerDue { due_ms, name } => writes.push(SledOp::Remove {
                key: keys::timer_index_key(*due_ms, entity, name),
            }),
        }
    }
    writes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(k: &str) -> EntityId {
        EntityId::new("t", k).unwrap()
    }

    fn event(seq: u64) -> Op {
        Op::Event {
            seq,
            behaviour_version: 1,
            payload: vec![seq as u8],
        }
    }

    /// Applies the batch the way the store does: into an overlay layer, which a checkpoint
    /// then writes to sled.
    fn apply(tree: &sled::Tree, entity: &EntityId, ops: &[Op]) {
        let mut layer = crate::storage::overlay::Layer::default();
        for write in plan(entity, ops) {
            layer.apply(write);
        }
        layer.write_to(tree).unwrap();
    }

    fn kinds(tree: &sled::Tree) -> Vec<(u8, Option<u64>)> {
        tree.iter()
            .map(|item| {
                let (k, _) = item.unwrap();
                let seq = if k[0] == keys::KIND_EVENT {
                    keys::event_seq(&k, k.len() - 8)
                } else {
                    None
                };
                (k[0], seq)
            })
            .collect()
    }

    #[test]
    fn a_range_removal_sees_writes_staged_before_it() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("shard-0").unwrap();
        let a = id("a");
        apply(&tree, &a, &[event(1), event(2)]);
        // Event 3 and a snapshot at 3 in one batch: all events end up trimmed.
        apply(
            &tree,
            &a,
            &[
                event(3),
                Op::Snapshot {
                    seq: 3,
                    behaviour_version: 1,
                    payload: vec![],
                },
                event(4),
            ],
        );
        assert_eq!(kinds(&tree), vec![(b'j', Some(4)), (b's', None)]);
    }

    fn put(kind: RecordKind, name: &[u8]) -> Op {
        Op::PutRecord {
            kind,
            name: name.to_vec(),
            value: name.to_vec(),
        }
    }

    fn dump(tree: &sled::Tree) -> Vec<(Vec<u8>, Vec<u8>)> {
        tree.iter()
            .map(|i| {
                let (k, v) = i.unwrap();
                (k.to_vec(), v.to_vec())
            })
            .collect()
    }

    #[test]
    fn delete_removes_every_record_kind_of_the_entity_only() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("shard-0").unwrap();
        let a = id("a");
        // Entities whose keys extend `a`'s or whose names look like the rest of a key.
        let others = [id("ab"), id("a\u{0}"), EntityId::new("tt", "a").unwrap()];
        let names: [&[u8]; 4] = [b"", b"n", &[0xff, 0xff], &[0, 2, b'a', b'b']];
        let every_kind: Vec<Op> = RecordKind::ALL
            .iter()
            .flat_map(|kind| names.map(|name| put(*kind, name)))
            .collect();
        for other in &others {
            apply(&tree, other, &every_kind);
            apply(&tree, other, &[event(1)]);
        }
        let before_a = dump(&tree);
        apply(&tree, &a, &every_kind);
        apply(
            &tree,
            &a,
            &[
                event(1),
                Op::PutTimerDue {
                    due_ms: 5,
                    name: b"n".to_vec(),
                },
            ],
        );
        let timer = keys::timer_index_key(5, &a, b"n");
        assert!(tree
            .get(keys::record_key(RecordKind::Outbox, &a, &[0xff, 0xff]))
            .unwrap()
            .is_some());
        // Records put in the same batch as the delete are gone too.
        apply(&tree, &a, &[put(RecordKind::Timer, b"late"), Op::Delete]);
        let mut expected = before_a;
        let timer_value = tree.get(&timer).unwrap().unwrap().to_vec();
        expected.push((timer, timer_value));
        expected.sort();
        assert_eq!(
            dump(&tree),
            expected,
            "only a's timer index entry is left of a"
        );
    }

    #[test]
    fn record_values_are_checksummed_over_their_key() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("shard-0").unwrap();
        let a = id("a");
        apply(&tree, &a, &[put(RecordKind::Dedup, b"req")]);
        let key = keys::record_key(RecordKind::Dedup, &a, b"req");
        let value = tree.get(&key).unwrap().unwrap();
        assert_eq!(
            super::super::record::decode_value(&key, &value)
                .unwrap()
                .payload,
            b"req"
        );
        let other = keys::record_key(RecordKind::Dedup, &a, b"reQ");
        assert!(super::super::record::decode_value(&other, &value).is_err());
        apply(
            &tree,
            &a,
            &[Op::RemoveRecord {
                kind: RecordKind::Dedup,
                name: b"req".to_vec(),
            }],
        );
        assert!(tree.is_empty());
    }

    #[test]
    fn replaying_a_suffix_with_records_and_timers_is_idempotent() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("shard-0").unwrap();
        let a = id("a");
        let b = id("b");
        let due = |due_ms, name: &[u8]| Op::PutTimerDue {
            due_ms,
            name: name.to_vec(),
        };
        let batches: Vec<(EntityId, Vec<Op>)> = vec![
            (
                a.clone(),
                vec![event(1), put(RecordKind::Timer, b"t1"), due(10, b"t1")],
            ),
            (
                b.clone(),
                vec![put(RecordKind::Inbox, b"1"), put(RecordKind::Inbox, b"2")],
            ),
            (
                a.clone(),
                vec![
                    Op::RemoveRecord {
                        kind: RecordKind::Timer,
                        name: b"t1".to_vec(),
                    },
                    Op::RemoveTimerDue {
                        due_ms: 10,
                        name: b"t1".to_vec(),
                    },
                    put(RecordKind::Timer, b"t2"),
                    due(20, b"t2"),
                ],
            ),
            (b.clone(), vec![Op::Delete]),
            (b.clone(), vec![put(RecordKind::Inbox, b"3")]),
            (
                a.clone(),
                vec![
                    Op::RemoveRecord {
                        kind: RecordKind::Inbox,
                        name: b"absent".to_vec(),
                    },
                    put(RecordKind::Dedup, b"d"),
                ],
            ),
        ];
        for (entity, ops) in &batches {
            apply(&tree, entity, ops);
        }
        let expected = dump(&tree);
        assert_eq!(expected.len(), 5, "{expected:?}");
        for start in 0..batches.len() {
            for (entity, ops) in &batches[start..] {
                apply(&tree, entity, ops);
            }
            assert_eq!(dump(&tree), expected, "replay from batch {start}");
        }
    }

    #[test]
    fn replaying_a_suffix_is_idempotent() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("shard-0").unwrap();
        let a = id("a");
        let b = id("b");
        let batches: Vec<(EntityId, Vec<Op>)> = vec![
            (a.clone(), vec![event(1), event(2)]),
            (b.clone(), vec![event(1)]),
            (
                a.clone(),
                vec![Op::Snapshot {
                    seq: 2,
                    behaviour_version: 1,
                    payload: vec![9],
                }],
            ),
            (b.clone(), vec![Op::Delete]),
            (b.clone(), vec![event(1)]),
            (a.clone(), vec![event(3)]),
        ];
        for (entity, ops) in &batches {
            apply(&tree, entity, ops);
        }
        let dump = |t: &sled::Tree| -> Vec<(Vec<u8>, Vec<u8>)> {
            t.iter()
                .map(|i| {
                    let (k, v) = i.unwrap();
                    (k.to_vec(), v.to_vec())
                })
                .collect()
        };
        let expected = dump(&tree);
        for start in 0..batches.len() {
            for (entity, ops) in &batches[start..] {
                apply(&tree, entity, ops);
            }
            assert_eq!(dump(&tree), expected, "replay from batch {start}");
        }
    }

    #[test]
    fn delete_removes_every_record_of_the_entity_only() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("shard-0").unwrap();
        let a = id("a");
        let ab = id("ab");
        apply(&tree, &ab, &[event(1)]);
        apply(
            &tree,
            &a,
            &[
                event(1),
                Op::Snapshot {
                    seq: 1,
                    behaviour_version: 1,
                    payload: vec![],
                },
                event(2),
            ],
        );
        tree.insert(keys::corrupt_key(&a), b"x".to_vec()).unwrap();
        apply(&tree, &a, &[Op::Delete]);
        let left: Vec<Vec<u8>> = tree.iter().map(|i| i.unwrap().0.to_vec()).collect();
        assert_eq!(left, vec![keys::event_key(&ab, 1)]);
    }
}
