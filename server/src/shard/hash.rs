//! The stable mapping from an entity address to its shard.
//!
//! `shard = xxh3_64(u16_be(len(type)) ‖ type ‖ key) mod shard_count`, with xxh3 as specified
//! by the xxHash project (seed 0). The length prefix keeps `("ab","c")` and `("a","bc")` apart.
//! This function decides where data lives on disk: changing it would strand every existing
//! entity, so the golden values in the tests below must never change.

use xxhash_rust::xxh3::Xxh3;

use crate::address::EntityId;

/// The shard, in `0..shard_count`, that owns `id`. `shard_count` must be at least 1.
pub fn shard_of(id: &EntityId, shard_count: u32) -> u32 {
    debug_assert!(shard_count > 0, "a data dir has at least one shard");
    let mut hasher = Xxh3::new();
    // Types are at most TYPE_BYTES_MAX (128) bytes, so the length always fits in u16.
    hasher.update(&(id.entity_type.len() as u16).to_be_bytes());
    hasher.update(id.entity_type.as_bytes());
    hasher.update(id.key.as_bytes());
    (hasher.digest() % u64::from(shard_count.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(t: &str, k: &str) -> EntityId {
        EntityId::new(t, k).unwrap()
    }

    #[test]
    fn golden_values_never_change() {
        let got: Vec<u32> = [
            ("counter", "a"),
            ("counter", "b"),
            ("kv", "user:42"),
            ("register", "x"),
        ]
        .iter()
        .map(|(t, k)| shard_of(&id(t, k), 1024))
        .collect();
        assert_eq!(got, GOLDEN);
    }

    // Cross-checked with Python's `xxhash.xxh3_64_intdigest` over the same bytes.
    // A change here is a data-format change.
    const GOLDEN: [u32; 4] = [510, 295, 926, 134];

    #[test]
    fn length_prefix_separates_type_from_key() {
        let spread = (0..64).filter(|n| {
            shard_of(&id("ab", &format!("c{n}")), 4096)
                != shard_of(&id("abc", &n.to_string()), 4096)
        });
        assert!(spread.count() > 60);
    }

    #[test]
    fn spreads_keys_evenly() {
        let shards = 8;
        let mut counts = vec![0u32; shards as usize];
        for n in 0..80_000 {
            counts[shard_of(&id("counter", &format!("key-{n}")), shards) as usize] += 1;
        }
        for count in counts {
            assert!((9_000..11_000).contains(&count), "uneven shard: {count}");
        }
    }

    #[test]
    fn one_shard_takes_everything() {
        assert_eq!(shard_of(&id("counter", "anything"), 1), 0);
    }
}
