//! The write-back layer in front of sled: committed writes that no checkpoint has put in sled
//! yet, and the reads that see them.
//!
//! **Owns**: [`Layer`] (the point writes and cleared ranges of one period between checkpoints),
//! [`Overlay`] (a shard's active layer plus the frozen layers a checkpoint is writing to sled)
//! and [`View`] (reads that merge the layers over the shard's sled tree).
//!
//! Why: the journal already makes a batch durable; sled only has to hold it by the next
//! checkpoint. Applying every batch to sled as it commits cost more than everything else on
//! the commit path together (sled's inserts, and its log writing ~10x the journal's bytes).
//! Kept in memory until a checkpoint, the writes of a period are applied to sled once, in key
//! order, by the checkpointer, and an event that a snapshot trims before then never reaches
//! sled at all. Replay at start-up fills the active layer the same way, without reading sled.
//!
//! Invariants:
//! - Layers are ordered newest first: the active layer, the frozen ones, then sled. For a key,
//!   the newest layer with a point write answers; a cleared range hides that key in every
//!   older layer and in sled. Clearing a range also drops the layer's own points in it, so a
//!   point inside a layer's cleared range was written after the clear.
//! - A frozen layer never changes. A checkpoint writes it to sled (clears first, then points)
//!   and drops it only once sled is flushed; a read that consults it before sled gets the
//!   same answer whether sled holds its writes yet or not.
//! - The writer applies a shard's share of a round under the write lock; a [`View`] holds the
//!   read lock for as long as it lives, so a read never sees part of a batch.

mod points;

use std::collections::BTreeMap;
use std::iter::Peekable;
use std::ops::Bound;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{RwLock, RwLockReadGuard};

use self::points::{PointRange, Points};
use super::apply::SledOp;
use super::event_runs::RunWriter;

/// What an entry costs besides its key and value bytes (tree node share, allocation headers):
/// an estimate, for the layer's size.
const ENTRY_OVERHEAD_BYTES: usize = 64;

/// Writes applied to sled per sled batch when a checkpoint writes a layer. Small on purpose:
/// sled holds on to the pages of a large batch (16 Ki writes per batch left RSS at 1.7 GB
/// for 300k active counters, 256 at 0.6 GB, measured with `bench --workload incr --keys
/// 300000 --requests 900000`), and the batches need not be atomic (see [`Layer::write_to`]).
const SLED_BATCH_WRITES: usize = 256;

/// The end of a cleared range, exclusive; `None` reaches past every key.
type RangeEnd = Option<Vec<u8>>;

/// Disjoint, non-adjacent key ranges `[start, end)`, by start.
#[derive(Debug, Default)]
struct ClearedRanges {
    ranges: BTreeMap<Vec<u8>, RangeEnd>,
}

/// Whether `key` is below the upper bound `end`.
fn below_end(end: Bound<&[u8]>, key: &[u8]) -> bool {
    match end {
        Bound::Included(end) => key <= end,
        Bound::Excluded(end) => key < end,
        Bound::Unbounded => true,
    }
}

fn end_bound(end: &RangeEnd) -> Bound<&[u8]> {
    match end {
        Some(end) => Bound::Excluded(end.as_slice()),
        None => Bound::Unbounded,
    }
}

impl ClearedRanges {
    fn covers(&self, key: &[u8]) -> bool {
        self.ranges
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()
            .is_some_and(|(_, end)| below_end(end_bound(end), key))
    }

    /// Adds `[start, end)`, merging it with every range it overlaps or touches.
    fn insert(&mut self, mut start: Vec<u8>, mut end: RangeEnd) {
        let upper = match &end {
            Some(end) => Bound::Included(end.as_slice()),
            None => Bound::Unbounded,
        };
        // Ranges are disjoint, so their ends grow with their starts: walking back from the
        // last one starting within reach, the first one that ends before `start` ends the walk.
        let absorbed: Vec<Vec<u8>> = self
            .ranges
            .range::<[u8], _>((Bound::Unbounded, upper))
            .rev()
            .take_while(|(_, other_end)| other_end.as_deref().is_none_or(|e| e >= &start[..]))
            .map(|(other_start, _)| other_start.clone())
            .collect();
        for other_start in absorbed {
            let other_end = self.ranges.remove(&other_start).flatten();
            if other_start < start {
                start = other_start;
            }
            end = match (end, other_end) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
        }
        self.ranges.insert(start, end);
    }

    fn len(&self) -> usize {
        self.ranges.len()
    }
}

/// The smallest key greater than every key that starts with `prefix` (`None`: there is none).
fn prefix_end(prefix: &[u8]) -> RangeEnd {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// The writes of one period between checkpoints, for one shard.
#[derive(Debug, Default)]
pub(crate) struct Layer {
    /// Puts (`Some`) and removals (`None`) by key.
    points: Points,
    cleared: ClearedRanges,
    /// An estimate of the memory the layer holds.
    bytes: usize,
}

impl Layer {
    /// Applies one write. Never reads sled.
    pub(crate) fn apply(&mut self, write: SledOp) {
        match write {
            SledOp::Put { key, value } => self.point(key, Some(value)),
            SledOp::Remove { key } => self.point(key, None),
            SledOp::RemoveRange {
                from,
                mut to_inclusive,
            } => {
                // An empty range clears nothing (and must not enter the disjoint ranges).
                if from <= to_inclusive {
                    // The key right after `to_inclusive` in byte order.
                    to_inclusive.push(0);
                    self.clear(from, Some(to_inclusive));
                }
            }
            SledOp::RemovePrefix { prefix } => {
                let end = prefix_end(&prefix);
                self.clear(prefix, end);
            }
        }
    }

    fn point(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        let value_len = value.as_ref().map_or(0, Vec::len);
        let key_len = key.len();
        match self.points.insert(key, value) {
            Some(old) => self.bytes = self.bytes + value_len - old.map_or(0, |v| v.len()),
            None => self.bytes += key_len + value_len + ENTRY_OVERHEAD_BYTES,
        }
    }

    fn clear(&mut self, start: Vec<u8>, end: RangeEnd) {
        let mut freed = 0;
        self.points
            .remove_range(&start, end_bound(&end), |key, value| {
                freed += key.len() + value.as_ref().map_or(0, Vec::len) + ENTRY_OVERHEAD_BYTES;
            });
        self.bytes -= freed;
        let added = start.len() + end.as_ref().map_or(0, Vec::len) + ENTRY_OVERHEAD_BYTES;
        let before = self.cleared.len();
        self.cleared.insert(start, end);
        if self.cleared.len() > before {
            self.bytes += added;
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.points.is_empty() && self.cleared.len() == 0
    }

    /// Writes the layer to `tree`: its cleared ranges first, then its points, an entity's
    /// events as one run ([`super::event_runs`]). Not atomic: readers consult the layer
    /// before sled until it is dropped, so they never see the difference.
    pub(crate) fn write_to(&self, tree: &sled::Tree) -> sled::Result<()> {
        let mut batch = sled::Batch::default();
        let mut writes = 0;
        let flush_if_full = |batch: &mut sled::Batch, writes: &mut usize| {
            *writes += 1;
            if *writes >= SLED_BATCH_WRITES {
                *writes = 0;
                tree.apply_batch(std::mem::take(batch))
            } else {
                Ok(())
            }
        };
        for (start, end) in &self.cleared.ranges {
            let range = (Bound::Included(start.as_slice()), end_bound(end));
            for item in tree.range::<&[u8], _>(range) {
                let (key, _) = item?;
                batch.remove(key);
                flush_if_full(&mut batch, &mut writes)?;
            }
        }
        // The removals above are applied before the points below, which may re-put keys in
        // those ranges.
        tree.apply_batch(std::mem::take(&mut batch))?;
        writes = 0;
        let mut runs = RunWriter::new();
        for (key, value) in self.points.iter() {
            match value {
                Some(value) => {
                    if let Some((key, value)) = runs.push(&mut batch, key, value) {
                        batch.insert(key, value);
                    }
                }
                None => {
                    runs.finish(&mut batch);
                    batch.remove(key.as_slice());
                }
            }
            flush_if_full(&mut batch, &mut writes)?;
        }
        runs.finish(&mut batch);
        tree.apply_batch(batch)
    }
}

/// A shard's layers: the active one the writer applies to and the frozen ones (oldest first)
/// a checkpoint is writing to sled.
#[derive(Debug, Default)]
pub(crate) struct Layers {
    active: Layer,
    frozen: Vec<Arc<Layer>>,
}

/// One shard's writes not yet in sled.
#[derive(Debug, Default)]
pub(crate) struct Overlay {
    layers: RwLock<Layers>,
    /// The layers' size, kept next to the lock so that reading it never waits for it.
    bytes: AtomicUsize,
}

impl Layers {
    fn bytes(&self) -> usize {
        self.active.bytes + self.frozen.iter().map(|l| l.bytes).sum::<usize>()
    }
}

impl Overlay {
    /// Applies batches of writes, in order, as one step for readers.
    pub(crate) fn apply(&self, batches: impl IntoIterator<Item = Vec<SledOp>>) {
        let mut layers = self.layers.write();
        for writes in batches {
            for write in writes {
                layers.active.apply(write);
            }
        }
        self.bytes.store(layers.bytes(), Ordering::Relaxed);
    }

    /// Freezes the active layer (if it holds anything) and returns every frozen layer, oldest
    /// first: what a checkpoint must write to sled. Layers an earlier, failed checkpoint froze
    /// are still there and come first.
    pub(crate) fn freeze(&self) -> Vec<Arc<Layer>> {
        let mut layers = self.layers.write();
        if !layers.active.is_empty() {
            let active = std::mem::take(&mut layers.active);
            layers.frozen.push(Arc::new(active));
        }
        layers.frozen.clone()
    }

    /// Drops the `count` oldest frozen layers: sled holds them now.
    pub(crate) fn release(&self, count: usize) {
        let mut layers = self.layers.write();
        let count = count.min(layers.frozen.len());
        layers.frozen.drain(..count);
        self.bytes.store(layers.bytes(), Ordering::Relaxed);
    }

    /// The memory the layers hold (an estimate). Never waits.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// A consistent read view over the layers and `tree`. Holds the read lock while it lives,
    /// which keeps the writer out: keep views short.
    pub(crate) fn view<'a>(&'a self, tree: &'a sled::Tree) -> View<'a> {
        View {
            layers: self.layers.read(),
            tree,
        }
    }
}

/// Reads of one shard as of one point between batches.
pub(crate) struct View<'a> {
    layers: RwLockReadGuard<'a, Layers>,
    tree: &'a sled::Tree,
}

/// One key and its value, as a scan yields them.
pub(crate) type Entry = (Vec<u8>, Vec<u8>);

impl View<'_> {
    fn newest_first(&self) -> impl Iterator<Item = &Layer> {
        std::iter::once(&self.layers.active).chain(self.layers.frozen.iter().rev().map(|l| &**l))
    }

    pub(crate) fn get(&self, key: &[u8]) -> sled::Result<Option<Vec<u8>>> {
        for layer in self.newest_first() {
            if let Some(value) = layer.points.get(key) {
                return Ok(value.clone());
            }
            if layer.cleared.covers(key) {
                return Ok(None);
            }
        }
        Ok(self.tree.get(key)?.map(|value| value.to_vec()))
    }

    /// Every key from `lower` on, in order, with its value.
    pub(crate) fn range_from(&self, lower: Bound<Vec<u8>>) -> Merged<'_> {
        let layers: Vec<&Layer> = self.newest_first().collect();
        let heads = layers
            .iter()
            .map(|layer| {
                let lower = lower.as_ref().map(Vec::as_slice);
                layer.points.range(lower, Bound::Unbounded).peekable()
            })
            .collect();
        Merged {
            layers,
            heads,
            sled: self
                .tree
                .range::<Vec<u8>, _>((lower, Bound::Unbounded))
                .peekable(),
        }
    }

    /// Every key that starts with `prefix`, in order, with its value.
    pub(crate) fn scan_prefix<'p>(
        &'p self,
        prefix: &'p [u8],
    ) -> impl Iterator<Item = sled::Result<Entry>> + 'p {
        self.range_from(Bound::Included(prefix.to_vec()))
            .take_while(move |item| {
                item.as_ref()
                    .map_or(true, |(key, _)| key.starts_with(prefix))
            })
    }
}

/// A layer's points in a scanned range, with the next one at hand.
type Head<'a> = Peekable<PointRange<'a>>;

/// A scan merging the layers (newest first) over sled.
pub(crate) struct Merged<'a> {
    layers: Vec<&'a Layer>,
    /// Each layer's points in the scanned range, parallel to `layers`.
    heads: Vec<Head<'a>>,
    sled: Peekable<sled::Iter>,
}

impl Iterator for Merged<'_> {
    type Item = sled::Result<Entry>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if matches!(self.sled.peek(), Some(Err(_))) {
                if let Some(Err(e)) = self.sled.next() {
                    return Some(Err(e));
                }
            }
            let mut smallest: Option<&[u8]> = match self.sled.peek() {
                Some(Ok((key, _))) => Some(key),
                _ => None,
            };
            for head in &mut self.heads {
                if let Some((key, _)) = head.peek() {
                    if smallest.is_none_or(|s| key.as_slice() < s) {
                        smallest = Some(key);
                    }
                }
            }
            let key = smallest?.to_vec();

            // The newest layer that has the key or clears it decides; sled only if none does.
            let mut decided: Option<Option<Vec<u8>>> = None;
            for (layer, head) in self.layers.iter().zip(&mut self.heads) {
                let point = head.next_if(|(k, _)| k.as_slice() == key.as_slice());
                if decided.is_none() {
                    if let Some((_, value)) = point {
                        decided = Some(value.clone());
                    } else if layer.cleared.covers(&key) {
                        decided = Some(None);
                    }
                }
            }
            let in_sled = match self.sled.next_if(|item| {
                item.as_ref()
                    .is_ok_and(|(k, _)| k.as_ref() == key.as_slice())
            }) {
                Some(Ok((_, value))) => Some(value.to_vec()),
                _ => None,
            };
            if let Some(value) = decided.unwrap_or(in_sled) {
                return Some(Ok((key, value)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &[u8], value: &[u8]) -> SledOp {
        SledOp::Put {
            key: key.to_vec(),
            value: value.to_vec(),
        }
    }

    fn remove(key: &[u8]) -> SledOp {
        SledOp::Remove { key: key.to_vec() }
    }

    fn range(from: &[u8], to_inclusive: &[u8]) -> SledOp {
        SledOp::RemoveRange {
            from: from.to_vec(),
            to_inclusive: to_inclusive.to_vec(),
        }
    }

    fn prefix(prefix: &[u8]) -> SledOp {
        SledOp::RemovePrefix {
            prefix: prefix.to_vec(),
        }
    }

    fn scan(view: &View<'_>) -> Vec<(String, String)> {
        view.range_from(Bound::Unbounded)
            .map(|item| {
                let (k, v) = item.unwrap();
                (String::from_utf8(k).unwrap(), String::from_utf8(v).unwrap())
            })
            .collect()
    }

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn tree() -> sled::Tree {
        let db = sled::Config::new().temporary(true).open().unwrap();
        db.open_tree("t").unwrap()
    }

    /// A reference model: a plain map that every write is applied to directly.
    fn model_apply(model: &mut BTreeMap<Vec<u8>, Vec<u8>>, write: &SledOp) {
        match write {
            SledOp::Put { key, value } => {
                model.insert(key.clone(), value.clone());
            }
            SledOp::Remove { key } => {
                model.remove(key);
            }
            SledOp::RemoveRange { from, to_inclusive } => {
                model.retain(|k, _| k < from || k > to_inclusive);
            }
            SledOp::RemovePrefix { prefix } => model.retain(|k, _| !k.starts_with(prefix)),
        }
    }

    #[test]
    fn cleared_ranges_merge_what_overlaps_or_touches() {
        let mut cleared = ClearedRanges::default();
        cleared.insert(b"c".to_vec(), Some(b"e".to_vec()));
        cleared.insert(b"g".to_vec(), Some(b"i".to_vec()));
        assert_eq!(cleared.len(), 2);
        assert!(cleared.covers(b"c") && cleared.covers(b"d") && cleared.covers(b"dzz"));
        assert!(!cleared.covers(b"e") && !cleared.covers(b"b") && !cleared.covers(b"f"));
        cleared.insert(b"e".to_vec(), Some(b"g".to_vec()));
        assert_eq!(
            cleared.len(),
            1,
            "touching ranges merge: {:?}",
            cleared.ranges
        );
        assert!(cleared.covers(b"f") && cleared.covers(b"h") && !cleared.covers(b"i"));
        cleared.insert(b"a".to_vec(), None);
        assert_eq!(cleared.len(), 1);
        assert!(cleared.covers(b"zzzz") && cleared.covers(b"a"));
    }

    #[test]
    fn prefix_end_is_the_first_key_after_the_prefix() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
    }

    #[test]
    fn layers_answer_newest_first_and_clears_hide_older_keys() {
        let tree = tree();
        for key in ["a1", "a2", "b1", "c1"] {
            tree.insert(key, "sled").unwrap();
        }
        let overlay = Overlay::default();
        overlay.apply([vec![put(b"a2", b"old"), put(b"a3", b"old")]]);
        let frozen = overlay.freeze();
        assert_eq!(frozen.len(), 1);
        overlay.apply([vec![prefix(b"a"), put(b"a3", b"new"), remove(b"c1")]]);
        let view = overlay.view(&tree);
        assert_eq!(
            scan(&view),
            pairs(&[("a3", "new"), ("b1", "sled")]),
            "the prefix clear hides a1 (sled) and a2 (frozen); a3 was put after it"
        );
        assert_eq!(view.get(b"a1").unwrap(), None);
        assert_eq!(view.get(b"a3").unwrap(), Some(b"new".to_vec()));
        assert_eq!(view.get(b"b1").unwrap(), Some(b"sled".to_vec()));
        assert_eq!(view.get(b"c1").unwrap(), None);
        let b: Vec<_> = view.scan_prefix(b"b").map(|item| item.unwrap().0).collect();
        assert_eq!(b, vec![b"b1".to_vec()]);
    }

    #[test]
    fn writing_a_frozen_layer_to_sled_changes_no_answer() {
        let tree = tree();
        for key in ["j1", "j2", "j3", "s"] {
            tree.insert(key, "sled").unwrap();
        }
        let overlay = Overlay::default();
        overlay.apply([vec![
            range(b"j0", b"j2"),
            put(b"j2", b"again"),
            put(b"s", b"new"),
        ]]);
        let before = scan(&overlay.view(&tree));
        assert_eq!(
            before,
            pairs(&[("j2", "again"), ("j3", "sled"), ("s", "new")])
        );
        let frozen = overlay.freeze();
        for layer in &frozen {
            layer.write_to(&tree).unwrap();
        }
        assert_eq!(scan(&overlay.view(&tree)), before, "while still frozen");
        overlay.release(frozen.len());
        assert_eq!(scan(&overlay.view(&tree)), before, "from sled alone");
        assert_eq!(overlay.bytes(), 0);
    }

    /// Random writes through two layers and sled agree with a plain map at every step.
    #[test]
    fn random_writes_read_like_a_plain_map() {
        // A small deterministic generator (xorshift), so failures reproduce.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let tree = tree();
        let overlay = Overlay::default();
        let mut model = BTreeMap::new();
        let key = |n: u64| format!("k{}{}", n / 10, n % 10).into_bytes();
        for step in 0..3000 {
            let write = match next(10) {
                0..=4 => put(&key(next(60)), format!("v{step}").as_bytes()),
                5 | 6 => remove(&key(next(60))),
                7 | 8 => {
                    let (a, b) = (key(next(60)), key(next(60)));
                    range(&a.clone().min(b.clone()), &a.max(b))
                }
                _ => prefix(&key(next(60))[..2]),
            };
            model_apply(&mut model, &write);
            overlay.apply([vec![write]]);
            match step % 500 {
                200 => {
                    overlay.freeze();
                }
                400 => {
                    let frozen = overlay.freeze();
                    for layer in &frozen {
                        layer.write_to(&tree).unwrap();
                    }
                    overlay.release(frozen.len());
                }
                _ => {}
            }
            if step % 50 == 0 {
                let view = overlay.view(&tree);
                let expected: Vec<(Vec<u8>, Vec<u8>)> =
                    model.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                let got: Vec<(Vec<u8>, Vec<u8>)> = view
                    .range_from(Bound::Unbounded)
                    .map(Result::unwrap)
                    .collect();
                assert_eq!(got, expected, "scan at step {step}");
                for n in 0..60 {
                    assert_eq!(
                        view.get(&key(n)).unwrap(),
                        model.get(&key(n)).cloned(),
                        "get at step {step}"
                    );
                }
                let lower = key(next(60));
                let from: Vec<Vec<u8>> = view
                    .range_from(Bound::Excluded(lower.clone()))
                    .map(|item| item.unwrap().0)
                    .collect();
                let expected_from: Vec<Vec<u8>> = model
                    .range::<Vec<u8>, _>((Bound::Excluded(lower), Bound::Unbounded))
                    .map(|(k, _)| k.clone())
                    .collect();
                assert_eq!(from, expected_from, "range at step {step}");
            }
        }
    }
}
