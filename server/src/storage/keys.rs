//! sled key layout (DESIGN §4).
//!
//! **Owns**: how an entity's records are named inside its shard's tree. Nothing else builds
//! sled keys.
//!
//! Every key starts with a kind byte. Snapshot, event, marker and record keys continue with
//! the entity type and key, each prefixed by its length as a big-endian `u16` (written
//! `type key` below), so the bytes that name one entity are never a prefix of another
//! entity's: an entity's records of one kind are exactly one contiguous range, whatever
//! bytes follow.
//!
//! | kind | key | value |
//! |---|---|---|
//! | `s` | `s` type key | the entity's one snapshot (its seq is in the value) |
//! | `j` | `j` type key seq(u64 BE) | one event; big-endian seq sorts numerically |
//! | `j` | `j` type key last(u64 BE) 0x01 first(u64 BE) | a run of events first..=last (`event_runs`) |
//! | `x` | `x` type key | human-readable detail: the entity is corrupt |
//! | `d` `i` `l` `o` `p` `r` `u` | kind type key name | one [`RecordKind`] record (`record::encode_value` with seq 0, version 0) |
//! | `t` | `t` due_ms(u64 BE) type key name | the shard's timer index: `encode_value` of nothing |
//!
//! There is no existence index: an entity exists while it has a snapshot or events, and
//! `list` finds entities by skipping from one entity's snapshot or event keys to the next
//! (`storage::listing`). Because the key's length comes before its bytes, entities of one
//! type sort by key length first; a listing walks the lengths in turn, and within one length
//! a key prefix is a byte prefix ([`keys_of_length`]).
//!
//! Record names are the unprefixed tail of their key, so one entity's records of one kind
//! sort by name bytes, and a shard-wide prefix scan of a kind yields them by entity (type,
//! then key, each compared as `u16` length first, then bytes) and then name. The timer index
//! sorts by due time first, then in the same entity and name order.

use crate::address::EntityId;

use super::codec::{put_len_u16, Reader};
use super::{DueTimer, RecordKind};

/// Kind byte of an entity's snapshot.
pub const KIND_SNAPSHOT: u8 = b's';
/// Kind byte of an entity's events since the snapshot.
pub const KIND_EVENT: u8 = b'j';
/// Kind byte of the existence index of format version 2 and older (an empty value per
/// entity). Format version 3 dropped it; the migration to it removes these keys, and no
/// key of any other kind starts with this byte.
pub const KIND_RETIRED_EXISTS: u8 = statehouse_migrations::EXISTENCE_INDEX_KIND;
/// Kind byte of a corruption marker.
pub const KIND_CORRUPT: u8 = b'x';
/// Kind byte of the shard's timer index.
pub const KIND_TIMER_INDEX: u8 = b't';

/// The kind byte of a [`RecordKind`]'s keys (also its tag in journal frames).
pub fn record_kind_byte(kind: RecordKind) -> u8 {
    match kind {
        RecordKind::Dedup => b'd',
        RecordKind::Timer => b'u',
        RecordKind::Inbox => b'i',
        RecordKind::Receipt => b'r',
        RecordKind::SendSeq => b'p',
        RecordKind::Outbox => b'o',
        RecordKind::DeadLetter => b'l',
    }
}

/// The [`RecordKind`] of a kind byte, `None` if it is not one.
pub fn record_kind_of_byte(byte: u8) -> Option<RecordKind> {
    RecordKind::ALL
        .into_iter()
        .find(|kind| record_kind_byte(*kind) == byte)
}

/// `kind` then the length-prefixed type and key.
fn entity_key(kind: u8, entity: &EntityId) -> Vec<u8> {
    let key = entity.key.as_bytes();
    // Room for the key and an event's seq, so an event key is one allocation.
    let mut out = type_prefix_with_room(kind, &entity.entity_type, 2 + key.len() + 8);
    put_len_u16(&mut out, key.len());
    out.extend_from_slice(key);
    out
}

/// The key of the entity's snapshot.
pub fn snapshot_key(entity: &EntityId) -> Vec<u8> {
    entity_key(KIND_SNAPSHOT, entity)
}

/// The prefix every event key of the entity starts with.
pub fn event_prefix(entity: &EntityId) -> Vec<u8> {
    entity_key(KIND_EVENT, entity)
}

/// The length of the entity prefix (`j type key`) that `key` starts with, if it is an event
/// key (or a run's, or the prefix itself); `None` for every other key.
///
/// Entity prefixes are never a prefix of one another (the lengths are spelled out), so all
/// keys that start with one form one contiguous range, between the keys before the prefix
/// and those after it: the overlay groups an entity's events by it.
pub fn event_prefix_len(key: &[u8]) -> Option<usize> {
    entity_prefix_len_of(key, |kind| kind == KIND_EVENT)
}

/// The length of `kind type key` at the start of `key` if its kind byte is one `accept`s.
fn entity_prefix_len_of(key: &[u8], accept: impl Fn(u8) -> bool) -> Option<usize> {
    let mut reader = Reader::new(key);
    if !accept(reader.u8()?) {
        return None;
    }
    for _part in ["type", "key"] {
        let len = reader.u16()?;
        reader.take(usize::from(len))?;
    }
    Some(key.len() - reader.remaining())
}

/// The length of the entity prefix (`kind type key`) that `key` starts with, if it is an
/// event key or a record key of any kind (or such a prefix itself); `None` for every other
/// key. Like [`event_prefix_len`]'s, these prefixes are never a prefix of one another, so all
/// keys that start with one form one contiguous range: the overlay groups an entity's events,
/// and its records of each kind, by it.
pub fn entity_prefix_len(key: &[u8]) -> Option<usize> {
    entity_prefix_len_of(key, |kind| {
        kind == KIND_EVENT || record_kind_of_byte(kind).is_some()
    })
}

/// The key of the entity's event `seq`.
pub fn event_key(entity: &EntityId, seq: u64) -> Vec<u8> {
    let mut key = event_prefix(entity);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// The sequence number at the end of an event key that starts with a prefix of
/// `prefix_len` bytes, or `None` if the key is not prefix + 8 bytes.
pub fn event_seq(key: &[u8], prefix_len: usize) -> Option<u64> {
    let tail: [u8; 8] = key.get(prefix_len..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

/// The byte after the seq in the key of an event run (see `event_runs`): a run's key sorts
/// right after its last event's own key, and never equals a single event's key.
pub const EVENT_RUN_MARKER: u8 = 1;

/// The key of a run of the entity's events from `first_seq` to the seq of `last_event_key`:
/// the last event's key, the marker, then `first_seq` (u64 BE).
pub fn event_run_key(last_event_key: &[u8], first_seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(last_event_key.len() + 9);
    key.extend_from_slice(last_event_key);
    key.push(EVENT_RUN_MARKER);
    key.extend_from_slice(&first_seq.to_be_bytes());
    key
}

/// The key of the entity's corruption marker.
pub fn corrupt_key(entity: &EntityId) -> Vec<u8> {
    entity_key(KIND_CORRUPT, entity)
}

/// `kind` then the length-prefixed `entity_type`: the start of every key of `kind` of an
/// entity of this type (for the entity-keyed kinds: snapshot, event, corruption marker and
/// records). The entity key's length (`u16` BE) and bytes follow.
pub fn type_prefix(kind: u8, entity_type: &str) -> Vec<u8> {
    type_prefix_with_room(kind, entity_type, 2)
}

/// [`type_prefix`] in a vector with room for `room` more bytes.
fn type_prefix_with_room(kind: u8, entity_type: &str, room: usize) -> Vec<u8> {
    let type_bytes = entity_type.as_bytes();
    let mut out = Vec::with_capacity(1 + 2 + type_bytes.len() + room);
    out.push(kind);
    put_len_u16(&mut out, type_bytes.len());
    out.extend_from_slice(type_bytes);
    out
}

/// [`type_prefix`] then `key_len` and `key_start`: the start of every key of `kind` of the
/// entities of `entity_type` whose key is `key_len` bytes long and starts with `key_start`
/// (`key_start` must not be longer than `key_len`).
pub fn keys_of_length(kind: u8, entity_type: &str, key_len: usize, key_start: &[u8]) -> Vec<u8> {
    debug_assert!(key_start.len() <= key_len, "a start longer than the key");
    let mut out = type_prefix(kind, entity_type);
    put_len_u16(&mut out, key_len);
    out.extend_from_slice(key_start);
    out
}

/// The entity key of a key that starts with a type prefix (see [`type_prefix`]) of
/// `type_prefix_len` bytes; `None` if the key is cut short.
pub fn key_after_type_prefix(key: &[u8], type_prefix_len: usize) -> Option<&[u8]> {
    let mut reader = Reader::new(key.get(type_prefix_len..)?);
    let len = reader.u16()?;
    reader.take(usize::from(len))
}

/// The smallest key greater than every key that starts with `prefix` (its last byte below
/// 0xFF incremented, what follows it dropped), `None` when no key is: `prefix` is empty or
/// all 0xFF.
pub fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let last = prefix.iter().rposition(|byte| *byte != u8::MAX)?;
    let mut successor = prefix[..=last].to_vec();
    successor[last] += 1;
    Some(successor)
}

/// The prefix every record key of `kind` of the entity starts with: exactly the entity's
/// records of that kind (no other entity's key range starts with it).
pub fn record_prefix(kind: RecordKind, entity: &EntityId) -> Vec<u8> {
    entity_key(record_kind_byte(kind), entity)
}

/// The prefix every record key of `kind` starts with, across entities.
pub fn record_kind_prefix(kind: RecordKind) -> [u8; 1] {
    [record_kind_byte(kind)]
}

/// The key of the entity's record `name` of `kind`.
pub fn record_key(kind: RecordKind, entity: &EntityId, name: &[u8]) -> Vec<u8> {
    let mut key = record_prefix(kind, entity);
    key.extend_from_slice(name);
    key
}

/// Reads `len16 type | type | len16 key | key` and checks the address.
fn read_entity(reader: &mut Reader<'_>) -> Option<EntityId> {
    let type_len = usize::from(reader.u16()?);
    let entity_type = std::str::from_utf8(reader.take(type_len)?).ok()?;
    let key_len = usize::from(reader.u16()?);
    let key = std::str::from_utf8(reader.take(key_len)?).ok()?;
    EntityId::new(entity_type, key).ok()
}

/// The kind, entity and name a record key names, `None` if it is not a well-formed record
/// key.
pub fn decode_record_key(key: &[u8]) -> Option<(RecordKind, EntityId, Vec<u8>)> {
    let mut reader = Reader::new(key);
    let kind = record_kind_of_byte(reader.u8()?)?;
    let entity = read_entity(&mut reader)?;
    let name = reader.take(reader.remaining())?.to_vec();
    Some((kind, entity, name))
}

/// The prefix of every timer index key.
pub const TIMER_INDEX_PREFIX: [u8; 1] = [KIND_TIMER_INDEX];

/// The timer index key of `(due_ms, entity, name)`.
pub fn timer_index_key(due_ms: u64, entity: &EntityId, name: &[u8]) -> Vec<u8> {
    let entity_type = entity.entity_type.as_bytes();
    let key = entity.key.as_bytes();
    let mut out = Vec::with_capacity(1 + 8 + 2 + entity_type.len() + 2 + key.len() + name.len());
    out.push(KIND_TIMER_INDEX);
    out.extend_from_slice(&due_ms.to_be_bytes());
    put_len_u16(&mut out, entity_type.len());
    out.extend_from_slice(entity_type);
    put_len_u16(&mut out, key.len());
    out.extend_from_slice(key);
    out.extend_from_slice(name);
    out
}

/// The entry a timer index key names, `None` if it is not a well-formed timer index key.
pub fn decode_timer_index_key(key: &[u8]) -> Option<DueTimer> {
    let mut reader = Reader::new(key);
    if reader.u8()? != KIND_TIMER_INDEX {
        return None;
    }
    let due_ms = reader.u64()?;
    let entity = read_entity(&mut reader)?;
    let name = reader.take(reader.remaining())?.to_vec();
    Some(DueTimer {
        due_ms,
        entity,
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::RECORD_NAME_BYTES_MAX;
    use rand::{Rng, SeedableRng};

    fn id(t: &str, k: &str) -> EntityId {
        EntityId::new(t, k).unwrap()
    }

    #[test]
    fn events_of_an_entity_sort_by_sequence_number() {
        let e = id("counter", "a");
        let seqs = [
            0u64,
            1,
            2,
            9,
            10,
            255,
            256,
            65_535,
            65_536,
            u64::MAX - 1,
            u64::MAX,
        ];
        let mut keys: Vec<Vec<u8>> = seqs.iter().rev().map(|s| event_key(&e, *s)).collect();
        keys.sort();
        let decoded: Vec<u64> = keys
            .iter()
            .map(|k| event_seq(k, event_prefix(&e).len()).unwrap())
            .collect();
        assert_eq!(decoded, seqs);
    }

    #[test]
    fn the_event_prefix_of_an_event_key_is_found_and_of_others_not() {
        let e = id("counter", "a-key");
        let prefix = event_prefix(&e);
        let event = event_key(&e, 7);
        assert_eq!(event_prefix_len(&event), Some(prefix.len()));
        assert_eq!(event_prefix_len(&prefix), Some(prefix.len()));
        let run = event_run_key(&event, 3);
        assert_eq!(event_prefix_len(&run), Some(prefix.len()));
        assert_eq!(event_prefix_len(&snapshot_key(&e)), None);
        assert_eq!(event_prefix_len(&corrupt_key(&e)), None);
        assert_eq!(event_prefix_len(b""), None);
        // Cut short anywhere inside the prefix: not an event key.
        for len in 0..prefix.len() {
            assert_eq!(event_prefix_len(&prefix[..len]), None, "{len} bytes");
        }
    }

    #[test]
    fn entity_ranges_never_interleave() {
        // Entities chosen to tempt a naive concatenation: "a"+"bc" vs "ab"+"c", prefixes of
        // each other, and random ones. Sorted keys must keep each entity's keys contiguous.
        let seed: u64 = rand::random();
        println!("seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let entities = tempting_entities(&mut rng);
        let mut keys: Vec<(Vec<u8>, usize)> = Vec::new();
        for (index, e) in entities.iter().enumerate() {
            for seq in [1u64, 2, 300, u64::MAX] {
                keys.push((event_key(e, seq), index));
            }
            keys.push((snapshot_key(e), index));
        }
        keys.sort();
        for kind in [KIND_EVENT, KIND_SNAPSHOT] {
            let owners: Vec<usize> = keys
                .iter()
                .filter(|(k, _)| k[0] == kind)
                .map(|(_, o)| *o)
                .collect();
            let mut seen = std::collections::HashSet::new();
            let mut last = None;
            for owner in owners {
                if last != Some(owner) {
                    assert!(seen.insert(owner), "entity {owner} interleaved");
                    last = Some(owner);
                }
            }
        }
        // And a prefix scan of one entity finds exactly its own events.
        for (index, e) in entities.iter().enumerate() {
            let prefix = event_prefix(e);
            let found = keys
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix))
                .all(|(_, o)| *o == index);
            assert!(found, "prefix of {e} matched another entity");
        }
    }

    #[test]
    fn keys_of_one_length_list_by_key_prefix() {
        let keys = [
            "user-1", "user-10", "user-2", "u", "userx", "admin", "user-",
        ];
        let mut sorted: Vec<Vec<u8>> = keys.iter().map(|k| snapshot_key(&id("t", k))).collect();
        // Another type whose name extends this one must not show up.
        sorted.push(snapshot_key(&id("tt", "user-3")));
        sorted.sort();
        let type_len = type_prefix(KIND_SNAPSHOT, "t").len();
        let listed = |len: usize, start: &str| -> Vec<&str> {
            let group = keys_of_length(KIND_SNAPSHOT, "t", len, start.as_bytes());
            sorted
                .iter()
                .filter(|k| k.starts_with(&group))
                .map(|k| std::str::from_utf8(key_after_type_prefix(k, type_len).unwrap()).unwrap())
                .collect()
        };
        assert_eq!(listed(6, "user-"), vec!["user-1", "user-2"]);
        assert_eq!(listed(7, "user-"), vec!["user-10"]);
        assert_eq!(listed(5, "user-"), vec!["user-"]);
        assert_eq!(listed(5, ""), vec!["admin", "user-", "userx"]);
        let all_of_t = sorted
            .iter()
            .filter(|k| k.starts_with(&type_prefix(KIND_SNAPSHOT, "t")))
            .count();
        assert_eq!(all_of_t, keys.len());
    }

    #[test]
    fn the_entity_key_follows_the_type_prefix() {
        let e = id("counter", "k\u{0}ey");
        let type_len = type_prefix(KIND_EVENT, "counter").len();
        assert_eq!(
            key_after_type_prefix(&event_key(&e, 9), type_len),
            Some("k\u{0}ey".as_bytes())
        );
        let snapshot = snapshot_key(&e);
        assert_eq!(
            key_after_type_prefix(&snapshot, type_len),
            Some("k\u{0}ey".as_bytes())
        );
        assert_eq!(
            key_after_type_prefix(&snapshot[..snapshot.len() - 1], type_len),
            None
        );
        assert_eq!(
            key_after_type_prefix(&snapshot[..type_len + 1], type_len),
            None
        );
    }

    #[test]
    fn a_prefix_successor_is_past_every_key_with_the_prefix_and_no_further() {
        assert_eq!(prefix_successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_successor(&[1, 0xFF, 0xFF]), Some(vec![2]));
        assert_eq!(prefix_successor(&[0xFF, 0xFF]), None);
        assert_eq!(prefix_successor(b""), None);
        let prefix = event_prefix(&id("t", "k"));
        let successor = prefix_successor(&prefix).unwrap();
        let e = id("t", "k");
        for key in [
            event_key(&e, u64::MAX),
            event_run_key(&event_key(&e, u64::MAX), 1),
        ] {
            assert!(key < successor);
        }
        // The next entity of the same key length sorts at or after it.
        assert!(event_key(&id("t", "l"), 0) >= successor);
    }

    #[test]
    fn kinds_do_not_share_keys() {
        let e = id("t", "k");
        let mut all = vec![
            snapshot_key(&e),
            event_key(&e, 1),
            corrupt_key(&e),
            timer_index_key(1, &e, b"n"),
        ];
        all.extend(RecordKind::ALL.map(|kind| record_key(kind, &e, b"n")));
        for (i, a) in all.iter().enumerate() {
            assert_ne!(
                a[0], KIND_RETIRED_EXISTS,
                "a live kind reuses the retired byte"
            );
            for b in &all[i + 1..] {
                assert_ne!(a[0], b[0]);
            }
        }
    }

    #[test]
    fn record_kinds_have_their_letters_and_all_is_in_key_order() {
        let letters: Vec<u8> = RecordKind::ALL.map(record_kind_byte).to_vec();
        assert_eq!(letters, b"dilopru".to_vec());
        for kind in RecordKind::ALL {
            assert_eq!(record_kind_of_byte(record_kind_byte(kind)), Some(kind));
        }
        for byte in [
            KIND_SNAPSHOT,
            KIND_EVENT,
            KIND_RETIRED_EXISTS,
            KIND_CORRUPT,
            KIND_TIMER_INDEX,
            0,
        ] {
            assert_eq!(record_kind_of_byte(byte), None);
        }
        for kind in RecordKind::LOADED {
            assert!(RecordKind::ALL.contains(&kind));
        }
    }

    fn tempting_entities(rng: &mut rand::rngs::StdRng) -> Vec<EntityId> {
        let mut entities = vec![
            id("a", "bc"),
            id("ab", "c"),
            id("a", "b"),
            id("a", "b\u{0}"),
            id("a", "b\u{ff}"),
            id("a", "ba"),
            id("b", "a"),
        ];
        for _ in 0..50 {
            let t: String = (0..rng.gen_range(1..4))
                .map(|_| rng.gen_range(b'a'..=b'c') as char)
                .collect();
            let k: String = (0..rng.gen_range(1..4))
                .map(|_| rng.gen_range(b'a'..=b'c') as char)
                .collect();
            entities.push(id(&t, &k));
        }
        entities.sort();
        entities.dedup();
        entities
    }

    #[test]
    fn record_ranges_never_interleave_whatever_the_names() {
        let seed: u64 = rand::random();
        println!("seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let entities = tempting_entities(&mut rng);
        // Names that look like the start of another entity's type or key, empty ones, 0xFF.
        let names: Vec<Vec<u8>> = vec![
            vec![],
            vec![0],
            vec![0, 1, b'c'],
            vec![0xff; 3],
            b"name".to_vec(),
            vec![0xff; RECORD_NAME_BYTES_MAX],
        ];
        let mut keys: Vec<(Vec<u8>, RecordKind, usize)> = Vec::new();
        for (index, e) in entities.iter().enumerate() {
            for kind in RecordKind::ALL {
                for name in &names {
                    keys.push((record_key(kind, e, name), kind, index));
                }
            }
        }
        keys.sort();
        for kind in RecordKind::ALL {
            let mut seen = std::collections::HashSet::new();
            let mut last = None;
            for (_, _, owner) in keys.iter().filter(|(_, k, _)| *k == kind) {
                if last != Some(*owner) {
                    assert!(
                        seen.insert(*owner),
                        "entity {owner} interleaved in {kind:?}"
                    );
                    last = Some(*owner);
                }
            }
            // A shard-wide prefix scan of the kind is exactly that kind's records.
            let scanned = keys
                .iter()
                .filter(|(k, _, _)| k.starts_with(&record_kind_prefix(kind)))
                .count();
            assert_eq!(scanned, entities.len() * names.len());
        }
        // An entity's prefix of a kind covers exactly its records of that kind.
        for (index, e) in entities.iter().enumerate() {
            for kind in RecordKind::ALL {
                let prefix = record_prefix(kind, e);
                let matched: Vec<_> = keys
                    .iter()
                    .filter(|(k, _, _)| k.starts_with(&prefix))
                    .collect();
                assert_eq!(matched.len(), names.len());
                assert!(matched.iter().all(|(_, k, o)| *k == kind && *o == index));
            }
        }
    }

    #[test]
    fn record_and_timer_keys_decode_back() {
        let e = id("counter", "user-\u{e9}");
        for name in [&b""[..], b"x", &[0xff, 0, 7][..]] {
            for kind in RecordKind::ALL {
                assert_eq!(
                    decode_record_key(&record_key(kind, &e, name)),
                    Some((kind, e.clone(), name.to_vec()))
                );
            }
            for due_ms in [0, 1, u64::MAX] {
                assert_eq!(
                    decode_timer_index_key(&timer_index_key(due_ms, &e, name)),
                    Some(DueTimer {
                        due_ms,
                        entity: e.clone(),
                        name: name.to_vec()
                    })
                );
            }
        }
    }

    #[test]
    fn malformed_keys_decode_to_none() {
        let e = id("counter", "a");
        let record = record_key(RecordKind::Inbox, &e, b"n");
        let timer = timer_index_key(5, &e, b"n");
        // Cut inside the entity part: never a panic, never a wrong answer.
        for len in 0..record_prefix(RecordKind::Inbox, &e).len() {
            assert_eq!(decode_record_key(&record[..len]), None, "len {len}");
        }
        for len in 0..(1 + 8 + 2 + 7 + 2 + 1) {
            assert_eq!(decode_timer_index_key(&timer[..len]), None, "len {len}");
        }
        // Wrong kind bytes.
        assert_eq!(decode_record_key(&timer), None);
        assert_eq!(decode_timer_index_key(&record), None);
        assert_eq!(decode_record_key(&event_key(&e, 1)), None);
        // Not UTF-8, empty type.
        assert_eq!(decode_record_key(b"d\x00\x01\xff\x00\x01k"), None);
        assert_eq!(decode_record_key(b"d\x00\x00\x00\x01k"), None);
        // A length running past the end.
        assert_eq!(decode_record_key(b"d\x00\x09t\x00\x01k"), None);
    }

    #[test]
    fn the_timer_index_sorts_by_due_time_first() {
        let a = id("a", "z");
        let b = id("b", "a");
        let mut keys = [
            timer_index_key(300, &a, b"x"),
            timer_index_key(2, &b, b""),
            timer_index_key(256, &a, b"y"),
            timer_index_key(2, &a, b"z"),
            timer_index_key(2, &a, b"a"),
        ];
        keys.sort();
        let decoded: Vec<(u64, String, Vec<u8>)> = keys
            .iter()
            .map(|k| {
                let t = decode_timer_index_key(k).unwrap();
                (t.due_ms, t.entity.entity_type.to_string(), t.name)
            })
            .collect();
        assert_eq!(
            decoded,
            vec![
                (2, "a".into(), b"a".to_vec()),
                (2, "a".into(), b"z".to_vec()),
                (2, "b".into(), vec![]),
                (256, "a".into(), b"y".to_vec()),
                (300, "a".into(), b"x".to_vec()),
            ]
        );
    }
}
