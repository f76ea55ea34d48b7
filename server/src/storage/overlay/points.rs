//! A layer's point writes: an ordered map from key to put (`Some`) or removal (`None`), with
//! an entity's events, and its records of each kind, grouped under one entry.
//!
//! **Owns**: [`Points`] and its in-order iterator [`PointRange`].
//!
//! Why grouped: between two checkpoints a shard's layer holds every event committed since,
//! hundreds of thousands of keys that share long prefixes. In one flat ordered map each insert
//! walked ~20 long-key comparisons down a deep tree, and that was half of the journal
//! writer's time under load (and most of replay's). Here keys are grouped by their *group*:
//! the entity prefix of an event or record key (`keys::entity_prefix_len`), or the whole key
//! for any other. (Records matter as much: every call with a request id stores its reply under
//! a new record key, which as a group of its own cost an ordered-set insert of a long name.)
//! Groups are found by hash; only a new group is inserted into the ordered set of group names
//! that ranges walk. Each group is a vector sorted by key, so an entity's next event is a
//! hash lookup, a comparison of its sequence number with the last one (kept in the map's
//! entry, so the last key itself is not read) and a push, and a snapshot's trim of everything
//! before it is one drain.
//!
//! Invariant (what makes the grouping order-preserving): entity prefixes are never a prefix
//! of one another, and every key that starts with one belongs to its group. So comparing two
//! keys is comparing their groups, then, within a group, the keys: iterating groups in order
//! and each group's keys in order yields all keys in byte order. A range starting at `start`
//! begins at `start`'s own group (every smaller group only holds smaller keys).

use std::collections::{btree_set, BTreeSet, HashMap};
use std::ops::Bound;

use super::below_end;
use crate::storage::keys;

/// A key's write: `Some(value)` puts, `None` removes.
pub(crate) type Write = Option<Vec<u8>>;

/// One group's writes, sorted by key.
#[derive(Debug, Default)]
struct Group {
    writes: Vec<(Vec<u8>, Write)>,
    /// The sequence number of the last key ([`sequence_of`]), if it has one: then a new event
    /// key of the group is checked against it here, in the map's entry, without reading the
    /// last key (two cache misses on the writer's hot path: the vector's end and the key).
    last_sequence: Option<u64>,
}

impl Group {
    /// Recomputes `last_sequence` after a removal changed the last key.
    fn refresh_last_sequence(&mut self, name_len: usize) {
        self.last_sequence = self
            .writes
            .last()
            .and_then(|(key, _)| sequence_of(key, name_len));
    }
}

/// The number a key of a group whose name is `name_len` bytes long ends with, if the key is
/// the name and eight bytes more (an event key: entity prefix, big-endian sequence number).
/// Two such keys of one group compare as their numbers do.
fn sequence_of(key: &[u8], name_len: usize) -> Option<u64> {
    let tail: [u8; 8] = key.get(name_len..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

/// Point writes by key.
#[derive(Debug, Default)]
pub(crate) struct Points {
    /// Every group by name; never an empty one.
    groups: HashMap<Vec<u8>, Group>,
    /// The names of `groups`, in byte order.
    order: BTreeSet<Vec<u8>>,
}

/// The group a key belongs to: its entity prefix if it is an event or record key, else
/// itself.
fn group_of(key: &[u8]) -> &[u8] {
    match keys::entity_prefix_len(key) {
        Some(len) => &key[..len],
        None => key,
    }
}

/// Where `key` is, or would go, in a sorted group.
fn position(group: &Group, key: &[u8]) -> Result<usize, usize> {
    group
        .writes
        .binary_search_by(|(k, _)| k.as_slice().cmp(key))
}

impl Points {
    pub(crate) fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    pub(crate) fn get(&self, key: &[u8]) -> Option<&Write> {
        let group = self.groups.get(group_of(key))?;
        position(group, key).ok().map(|at| &group.writes[at].1)
    }

    /// Sets `key`'s write, returning the one it replaces.
    pub(crate) fn insert(&mut self, key: Vec<u8>, write: Write) -> Option<Write> {
        let name_len = group_of(&key).len();
        let group = match self.groups.get_mut(&key[..name_len]) {
            Some(group) => group,
            None => {
                let name = key[..name_len].to_vec();
                self.order.insert(name.clone());
                self.groups.entry(name).or_default()
            }
        };
        // Events come in sequence order: almost always past the group's last key.
        let sequence = sequence_of(&key, name_len);
        let past_last = match (group.last_sequence, sequence) {
            (Some(last), Some(new)) => new > last,
            _ => group.writes.last().is_none_or(|(last, _)| *last < key),
        };
        if past_last {
            group.writes.push((key, write));
            group.last_sequence = sequence;
            return None;
        }
        match position(group, &key) {
            Ok(at) => Some(std::mem::replace(&mut group.writes[at].1, write)),
            // Not past the last key, so before it: the last key (and its sequence) stays.
            Err(at) => {
                debug_assert!(
                    at < group.writes.len(),
                    "the fast path takes keys past the last"
                );
                group.writes.insert(at, (key, write));
                None
            }
        }
    }

    /// Removes every write with a key from `start` to `end`, handing each to `removed`.
    pub(crate) fn remove_range(
        &mut self,
        start: &[u8],
        end_bound: Bound<&[u8]>,
        mut removed: impl FnMut(&[u8], &Write),
    ) {
        let mut emptied = Vec::new();
        let names = self
            .order
            .range::<[u8], _>((Bound::Included(group_of(start)), Bound::Unbounded));
        for name in names {
            // Every key of a group is at least its name.
            if !below_end(end_bound, name) {
                break;
            }
            let Some(group) = self.groups.get_mut(name) else {
                continue;
            };
            let from = group.writes.partition_point(|(k, _)| k.as_slice() < start);
            let to = group
                .writes
                .partition_point(|(k, _)| below_end(end_bound, k));
            if from < to {
                for (key, write) in group.writes.drain(from..to) {
                    removed(&key, &write);
                }
                if group.writes.is_empty() {
                    emptied.push(name.clone());
                } else {
                    group.refresh_last_sequence(name.len());
                }
            }
        }
        for name in emptied {
            self.groups.remove(&name);
            self.order.remove(&name);
        }
    }

    /// The writes with keys within `(start, end)`, in key order.
    pub(crate) fn range(&self, start: Bound<&[u8]>, end: Bound<&[u8]>) -> PointRange<'_> {
        let first_group = match start {
            Bound::Unbounded => Bound::Unbounded,
            Bound::Included(start) | Bound::Excluded(start) => Bound::Included(group_of(start)),
        };
        let mut range = PointRange {
            names: self.order.range::<[u8], _>((first_group, Bound::Unbounded)),
            groups: &self.groups,
            current: [].iter(),
            end: end.map(<[u8]>::to_vec),
            done: false,
        };
        // Only the first group can hold keys below `start`: a later one's name, and so each
        // of its keys, is past `start` (see the module's invariant).
        if let Some(group) = range.next_group() {
            let from = match start {
                Bound::Unbounded => 0,
                Bound::Included(start) => {
                    group.writes.partition_point(|(k, _)| k.as_slice() < start)
                }
                Bound::Excluded(start) => {
                    group.writes.partition_point(|(k, _)| k.as_slice() <= start)
                }
            };
            range.current = group.writes[from..].iter();
        }
        range
    }

    /// Every write, in key order.
    pub(crate) fn iter(&self) -> PointRange<'_> {
        self.range(Bound::Unbounded, Bound::Unbounded)
    }
}

/// The writes of a key range, in key order.
pub(crate) struct PointRange<'a> {
    names: btree_set::Range<'a, Vec<u8>>,
    groups: &'a HashMap<Vec<u8>, Group>,
    current: std::slice::Iter<'a, (Vec<u8>, Write)>,
    end: Bound<Vec<u8>>,
    /// Past `end`: nothing more.
    done: bool,
}

impl<'a> PointRange<'a> {
    /// The writes of the next group in order.
    fn next_group(&mut self) -> Option<&'a Group> {
        let groups = self.groups;
        self.names.find_map(|name| groups.get(name))
    }
}

impl<'a> Iterator for PointRange<'a> {
    type Item = (&'a Vec<u8>, &'a Write);

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            if let Some((key, write)) = self.current.next() {
                if below_end(self.end.as_ref().map(Vec::as_slice), key) {
                    return Some((key, write));
                }
                self.done = true;
            } else {
                match self.next_group() {
                    Some(group) => self.current = group.writes.iter(),
                    None => self.done = true,
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::address::EntityId;
    use crate::storage::RecordKind;

    /// Keys that exercise the grouping: events and runs of entities whose names tempt a naive
    /// concatenation ("a"+"bc" vs "ab"+"c"), their snapshots, bare prefixes, cut-short event
    /// keys, records of two kinds (whole and cut short), and other kinds around `j`.
    fn random_key(rng: &mut StdRng) -> Vec<u8> {
        let entities = [("t", "a"), ("t", "ab"), ("ta", "b"), ("t", "b"), ("u", "a")];
        let (entity_type, key) = entities[rng.gen_range(0..entities.len())];
        let entity = EntityId::new(entity_type, key).unwrap();
        let seq = rng.gen_range(0..40u64);
        match rng.gen_range(0..11) {
            0..=4 => keys::event_key(&entity, seq),
            5 => keys::event_run_key(&keys::event_key(&entity, seq), seq / 2),
            6 => keys::event_prefix(&entity),
            7 => {
                let prefix = keys::event_prefix(&entity);
                prefix[..rng.gen_range(0..prefix.len())].to_vec()
            }
            8 => keys::snapshot_key(&entity),
            9 => {
                // Records of two kinds, with names of any length (a prefix of another one's
                // included), and now and then a record prefix cut short.
                let kind = [RecordKind::Dedup, RecordKind::Outbox][rng.gen_range(0..2)];
                let name: Vec<u8> = (0..rng.gen_range(0..4))
                    .map(|_| rng.gen_range(b'a'..b'd'))
                    .collect();
                let record = keys::record_key(kind, &entity, &name);
                if rng.gen_range(0..8) == 0 {
                    record[..rng.gen_range(0..record.len())].to_vec()
                } else {
                    record
                }
            }
            _ => vec![b'j' + rng.gen_range(0..3) - 1, rng.gen()],
        }
    }

    fn bound(rng: &mut StdRng) -> Bound<Vec<u8>> {
        match rng.gen_range(0..5) {
            0 => Bound::Unbounded,
            1 | 2 => Bound::Included(random_key(rng)),
            _ => Bound::Excluded(random_key(rng)),
        }
    }

    fn as_slice(bound: &Bound<Vec<u8>>) -> Bound<&[u8]> {
        bound.as_ref().map(Vec::as_slice)
    }

    #[test]
    fn random_writes_read_like_a_flat_ordered_map() {
        let seed: u64 = rand::random();
        println!("seed {seed}");
        let mut rng = StdRng::seed_from_u64(seed);
        let mut points = Points::default();
        let mut model: BTreeMap<Vec<u8>, Write> = BTreeMap::new();
        for step in 0..20_000 {
            match rng.gen_range(0..10) {
                0..=5 => {
                    let key = random_key(&mut rng);
                    let write = rng.gen_bool(0.8).then(|| vec![rng.gen()]);
                    assert_eq!(
                        points.insert(key.clone(), write.clone()),
                        model.insert(key, write),
                        "insert at step {step}"
                    );
                }
                6 => {
                    let (a, b) = (random_key(&mut rng), random_key(&mut rng));
                    let (start, end) = (a.clone().min(b.clone()), a.max(b));
                    let end = rng.gen_bool(0.9).then_some(end);
                    let mut removed = Vec::new();
                    points.remove_range(
                        &start,
                        end.as_deref().map_or(Bound::Unbounded, Bound::Excluded),
                        |k, w| removed.push((k.to_vec(), w.clone())),
                    );
                    let range = (
                        Bound::Included(start),
                        end.map_or(Bound::Unbounded, Bound::Excluded),
                    );
                    let expected: Vec<(Vec<u8>, Write)> = model
                        .range::<Vec<u8>, _>(range.clone())
                        .map(|(k, w)| (k.clone(), w.clone()))
                        .collect();
                    for (key, _) in &expected {
                        model.remove(key);
                    }
                    assert_eq!(removed, expected, "remove_range at step {step}");
                }
                _ => {
                    let (start, end) = (bound(&mut rng), bound(&mut rng));
                    let got: Vec<(Vec<u8>, Write)> = points
                        .range(as_slice(&start), as_slice(&end))
                        .map(|(k, w)| (k.clone(), w.clone()))
                        .collect();
                    // BTreeMap::range panics on an empty range; a filter does not.
                    let expected: Vec<(Vec<u8>, Write)> = model
                        .iter()
                        .filter(|(k, _)| {
                            let above = match as_slice(&start) {
                                Bound::Included(s) => k.as_slice() >= s,
                                Bound::Excluded(s) => k.as_slice() > s,
                                Bound::Unbounded => true,
                            };
                            above && below_end(as_slice(&end), k)
                        })
                        .map(|(k, w)| (k.clone(), w.clone()))
                        .collect();
                    assert_eq!(got, expected, "range {start:?}..{end:?} at step {step}");
                    let key = random_key(&mut rng);
                    assert_eq!(points.get(&key), model.get(&key), "get at step {step}");
                }
            }
            assert_eq!(points.is_empty(), model.is_empty());
        }
        let all: Vec<&Vec<u8>> = points.iter().map(|(k, _)| k).collect();
        assert_eq!(all, model.keys().collect::<Vec<_>>());
    }
}
