//! Listing the entities of a type without an existence index.
//!
//! **Owns**: finding, in one shard's [`View`], the keys of the entities of a type that start
//! with a prefix and sort after a given key, from the entities' own snapshot and event keys.
//!
//! An entity exists while it has a snapshot or events (`keys`: `s type key`, `j type key
//! seq`). The type and the key are each written after their length, so within a type and a
//! kind the entities sort by key length first, then by key bytes. A listing therefore walks
//! the key lengths that occur, shortest first, and within one length scans the entities whose
//! key starts with the prefix ([`keys::keys_of_length`]), skipping from each entity straight
//! to the next ([`keys::prefix_successor`]) however many events it has. Each length costs two
//! seeks plus one per entity listed; an entity with both a snapshot and events is found twice
//! and kept once.
//!
//! Keys are returned in byte order (what `String`'s `Ord` is), which is not the stored order:
//! [`Listing`] keeps the `limit` smallest seen across lengths, kinds and shards, and a scan
//! stops early once its keys can no longer make the cut.

use std::collections::BTreeSet;
use std::ops::Bound;

use super::fsync::sled_error;
use super::keys;
use super::overlay::View;
use super::StoreError;

/// The smallest `limit` entity keys found so far, in byte order, without duplicates.
pub(crate) struct Listing {
    keys: BTreeSet<String>,
    limit: usize,
}

impl Listing {
    /// An empty listing that keeps at most `limit` keys.
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            keys: BTreeSet::new(),
            limit,
        }
    }

    /// Whether a key `candidate` could still make the cut (a full listing takes only keys
    /// below its largest).
    fn wants(&self, candidate: &[u8]) -> bool {
        self.keys.len() < self.limit
            || self
                .keys
                .last()
                .is_some_and(|largest| candidate < largest.as_bytes())
    }

    fn offer(&mut self, key: String) {
        if self.keys.insert(key) && self.keys.len() > self.limit {
            self.keys.pop_last();
        }
    }

    /// The keys kept, in byte order.
    pub(crate) fn into_keys(self) -> Vec<String> {
        self.keys.into_iter().collect()
    }
}

/// What to list: the entities of `entity_type` whose key starts with `key_prefix` and sorts
/// strictly after `start_after` (in byte order) when given.
pub(crate) struct ListQuery<'a> {
    pub entity_type: &'a str,
    pub key_prefix: &'a str,
    pub start_after: Option<&'a str>,
}

/// Offers `listing` every entity of `query` in the shard of `view` (as far as the listing
/// still wants them). `shard` names the shard in errors.
pub(crate) fn list_shard(
    view: &View<'_>,
    shard: usize,
    query: &ListQuery<'_>,
    listing: &mut Listing,
) -> Result<(), StoreError> {
    for kind in [keys::KIND_SNAPSHOT, keys::KIND_EVENT] {
        let type_prefix = keys::type_prefix(kind, query.entity_type);
        let mut shortest = query.key_prefix.len();
        while let Some(key_len) = next_key_length(view, shard, &type_prefix, shortest)? {
            list_length(
                view,
                shard,
                query,
                kind,
                type_prefix.len(),
                key_len,
                listing,
            )?;
            shortest = key_len + 1;
        }
    }
    Ok(())
}

/// The length of the shortest entity key of at least `shortest` bytes among the keys that
/// start with `type_prefix`, `None` if there is none.
fn next_key_length(
    view: &View<'_>,
    shard: usize,
    type_prefix: &[u8],
    shortest: usize,
) -> Result<Option<usize>, StoreError> {
    let Ok(shortest_u16) = u16::try_from(shortest) else {
        return Ok(None);
    };
    let mut lower = type_prefix.to_vec();
    lower.extend_from_slice(&shortest_u16.to_be_bytes());
    let Some(key) = first_key_from(view, shard, Bound::Included(lower))? else {
        return Ok(None);
    };
    if !key.starts_with(type_prefix) {
        return Ok(None);
    }
    let entity_key = keys::key_after_type_prefix(&key, type_prefix.len())
        .ok_or_else(|| malformed(shard, &key))?;
    Ok(Some(entity_key.len()))
}

/// Offers `listing` the entities of `query` whose key is `key_len` bytes long, in the keys of
/// `kind`, in order, while the listing wants them.
fn list_length(
    view: &View<'_>,
    shard: usize,
    query: &ListQuery<'_>,
    kind: u8,
    type_prefix_len: usize,
    key_len: usize,
    listing: &mut Listing,
) -> Result<(), StoreError> {
    let group = keys::keys_of_length(
        kind,
        query.entity_type,
        key_len,
        query.key_prefix.as_bytes(),
    );
    let mut lower = group.clone();
    if let Some(after) = query.start_after {
        match first_after(kind, query.entity_type, key_len, after.as_bytes()) {
            Some(after_lower) => lower = lower.max(after_lower),
            None => return Ok(()),
        }
    }
    loop {
        let Some(key) = first_key_from(view, shard, Bound::Included(lower))? else {
            return Ok(());
        };
        if !key.starts_with(&group) {
            return Ok(());
        }
        let entity_key = keys::key_after_type_prefix(&key, type_prefix_len)
            .ok_or_else(|| malformed(shard, &key))?;
        if !listing.wants(entity_key) {
            // Keys of this length only grow from here.
            return Ok(());
        }
        let text = std::str::from_utf8(entity_key).map_err(|_| malformed(shard, &key))?;
        listing.offer(text.to_owned());
        // Past every key of this entity (its events may be many).
        let entity_end = type_prefix_len + 2 + entity_key.len();
        match keys::prefix_successor(&key[..entity_end]) {
            Some(next) => lower = next,
            None => return Ok(()),
        }
    }
}

/// The lowest key of `kind` of an entity of `entity_type` with a `key_len`-byte key that
/// sorts strictly after `after` (compared as byte strings), `None` if no such key sorts
/// after it.
///
/// A key `k` of `key_len` bytes sorts after `after` exactly when: `after` is shorter and `k`
/// starts with `after` or more (`k >= after`, as the longer of two equal starts sorts
/// last); or `after` is as long or longer and `k` sorts after `after`'s first `key_len`
/// bytes (if `k` equals them it is a prefix of `after`, so not after it).
fn first_after(kind: u8, entity_type: &str, key_len: usize, after: &[u8]) -> Option<Vec<u8>> {
    if after.len() < key_len {
        return Some(keys::keys_of_length(kind, entity_type, key_len, after));
    }
    let equal_start = keys::keys_of_length(kind, entity_type, key_len, &after[..key_len]);
    keys::prefix_successor(&equal_start)
}

/// The first key at or after `lower` in the view.
fn first_key_from(
    view: &View<'_>,
    shard: usize,
    lower: Bound<Vec<u8>>,
) -> Result<Option<Vec<u8>>, StoreError> {
    match view.range_from(lower).next() {
        None => Ok(None),
        Some(Ok((key, _))) => Ok(Some(key)),
        Some(Err(e)) => Err(sled_error(format!("listing shard {shard}"), e)),
    }
}

fn malformed(shard: usize, key: &[u8]) -> StoreError {
    StoreError::Metadata(format!(
        "a key of {} bytes in shard {shard} names no entity (a cut-short or non-UTF-8 entity key)",
        key.len()
    ))
}
