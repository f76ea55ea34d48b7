//! sled key layout (DESIGN §4).
//!
//! **Owns**: how an entity's records are named inside its shard's tree. Nothing else builds
//! sled keys.
//!
//! Every key starts with a kind byte. Snapshot, event and marker keys continue with the
//! entity type and key, each prefixed by its length as a big-endian `u16`, so the bytes that
//! name one entity are never a prefix of another entity's: an entity's records of one kind
//! are exactly one contiguous range.
//!
//! | kind | key | value |
//! |---|---|---|
//! | `s` | `s` type key | the entity's one snapshot (its seq is in the value) |
//! | `j` | `j` type key seq(u64 BE) | one event; big-endian seq sorts numerically |
//! | `e` | `e` len(type) type key-bytes | empty: the existence index `list` scans |
//! | `x` | `x` type key | human-readable detail: the entity is corrupt |
//!
//! The existence key leaves the entity key unprefixed so that a key prefix is a byte prefix:
//! listing `(type, "ab")` is one prefix scan of `e len type ab`.

use crate::address::EntityId;

use super::codec::put_len_u16;

/// Kind byte of an entity's snapshot.
pub const KIND_SNAPSHOT: u8 = b's';
/// Kind byte of an entity's events since the snapshot.
pub const KIND_EVENT: u8 = b'j';
/// Kind byte of the existence index.
pub const KIND_EXISTS: u8 = b'e';
/// Kind byte of a corruption marker.
pub const KIND_CORRUPT: u8 = b'x';

/// `kind` then the length-prefixed type and key.
fn entity_key(kind: u8, entity: &EntityId) -> Vec<u8> {
    let entity_type = entity.entity_type.as_bytes();
    let key = entity.key.as_bytes();
    let mut out = Vec::with_capacity(1 + 2 + entity_type.len() + 2 + key.len() + 8);
    out.push(kind);
    put_len_u16(&mut out, entity_type.len());
    out.extend_from_slice(entity_type);
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

/// The key of the entity's corruption marker.
pub fn corrupt_key(entity: &EntityId) -> Vec<u8> {
    entity_key(KIND_CORRUPT, entity)
}

/// The prefix every existence key of `entity_type` whose key starts with `key_prefix`
/// starts with.
pub fn exists_prefix(entity_type: &str, key_prefix: &str) -> Vec<u8> {
    let type_bytes = entity_type.as_bytes();
    let mut out = Vec::with_capacity(1 + 2 + type_bytes.len() + key_prefix.len());
    out.push(KIND_EXISTS);
    put_len_u16(&mut out, type_bytes.len());
    out.extend_from_slice(type_bytes);
    out.extend_from_slice(key_prefix.as_bytes());
    out
}

/// The entity's existence key.
pub fn exists_key(entity: &EntityId) -> Vec<u8> {
    exists_prefix(&entity.entity_type, &entity.key)
}

/// The number of bytes before the entity key in an existence key of `entity_type`.
pub fn exists_key_offset(entity_type: &str) -> usize {
    1 + 2 + entity_type.len()
}

#[cfg(test)]
mod tests {
    use super::*;
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
    fn entity_ranges_never_interleave() {
        // Entities chosen to tempt a naive concatenation: "a"+"bc" vs "ab"+"c", prefixes of
        // each other, and random ones. Sorted keys must keep each entity's keys contiguous.
        let seed: u64 = rand::random();
        println!("seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut entities = vec![
            id("a", "bc"),
            id("ab", "c"),
            id("a", "b"),
            id("a", "b\u{0}"),
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
    fn existence_keys_list_by_key_prefix() {
        let keys = ["user-1", "user-10", "user-2", "u", "userx", "admin"];
        let mut index: Vec<Vec<u8>> = keys.iter().map(|k| exists_key(&id("t", k))).collect();
        // Another type whose name extends this one must not show up.
        index.push(exists_key(&id("tt", "user-3")));
        index.sort();
        let prefix = exists_prefix("t", "user-");
        let listed: Vec<&str> = index
            .iter()
            .filter(|k| k.starts_with(&prefix))
            .map(|k| std::str::from_utf8(&k[exists_key_offset("t")..]).unwrap())
            .collect();
        assert_eq!(listed, vec!["user-1", "user-10", "user-2"]);
        let all_of_t = index
            .iter()
            .filter(|k| k.starts_with(&exists_prefix("t", "")))
            .count();
        assert_eq!(all_of_t, keys.len());
    }

    #[test]
    fn kinds_do_not_share_keys() {
        let e = id("t", "k");
        let all = [
            snapshot_key(&e),
            event_key(&e, 1),
            exists_key(&e),
            corrupt_key(&e),
        ];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a[0], b[0]);
            }
        }
    }
}
