//! Numbered on-disk format migrations for statehouse data directories.
//!
//! **Owns**: the `format_version` key of the sled `meta` tree. Nothing else reads or writes
//! it; the server calls [`prepare`] once at start-up, before it touches any other data.
//!
//! A data dir's format version says which layout its sled trees and journal use. A
//! [`Migration`] takes a data dir from version `N` to `N + 1`. [`prepare`] brings a data dir to
//! [`CURRENT_FORMAT_VERSION`]: a fresh one is stamped with it directly, an older one is stepped
//! forward one version at a time (the version reached is recorded and flushed after every
//! step, so a failure leaves the last good version on disk), and a newer one is refused.
//!
//! Invariants:
//! - The recorded version only grows, one step at a time.
//! - A data dir whose version is newer than this build knows is never modified.

use tracing::info;

/// The format version this build reads and writes. Version 1 is the initial layout; version 2
/// may store several events of an entity as one run value; version 3 has no existence index
/// (see [`migrations`]).
pub const CURRENT_FORMAT_VERSION: u32 = 3;

/// The sled tree holding data-dir metadata.
pub const META_TREE: &str = "meta";

/// The key of the format version in [`META_TREE`]; its value is a big-endian `u32`.
pub const FORMAT_VERSION_KEY: &[u8] = b"format_version";

/// Why a data dir could not be brought to the current format.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("data dir format version {found} is newer than this server supports ({supported}); use a newer statehouse-server")]
    TooNew { found: u32, supported: u32 },
    /// No step is known that leaves `from`; the list of migrations has a gap.
    #[error("no migration step from format version {from} (target {target})")]
    MissingStep { from: u32, target: u32 },
    /// The recorded version is not a 4-byte big-endian integer.
    #[error("the recorded format version is malformed: {0}")]
    Malformed(String),
    /// A migration step failed; the data dir stays at version `from`.
    #[error("migration from format version {from} to {} ({description}) failed: {detail}", from + 1)]
    StepFailed {
        from: u32,
        description: &'static str,
        detail: String,
    },
    /// sled reported an error while reading or recording the version.
    #[error("{context}: {source}")]
    Sled {
        context: String,
        #[source]
        source: sled::Error,
    },
}

/// One step of the on-disk format: from `from_version` to `from_version + 1`.
#[derive(Clone, Copy)]
pub struct Migration {
    /// The version this step starts from.
    pub from_version: u32,
    /// What the step changes, for the log and for error messages.
    pub description: &'static str,
    /// The step itself. It must be safe to run again if it fails or is interrupted part
    /// way, because the version is only recorded after it returns `Ok`.
    pub step: fn(&sled::Db) -> Result<(), MigrationError>,
}

impl Migration {
    /// The version the data dir has after this step.
    pub fn to_version(&self) -> u32 {
        self.from_version + 1
    }
}

impl std::fmt::Debug for Migration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migration")
            .field("from_version", &self.from_version)
            .field("description", &self.description)
            .finish_non_exhaustive()
    }
}

/// What [`prepare`] (or [`run_with`]) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrepareOutcome {
    /// The data dir was new; it was stamped with `version`.
    Created { version: u32 },
    /// The data dir was already at `version`.
    UpToDate { version: u32 },
    /// The data dir was migrated from `from` to `to`.
    Migrated { from: u32, to: u32 },
}

/// The known migration steps, in order.
pub fn migrations() -> Vec<Migration> {
    vec![
        Migration {
            from_version: 1,
            description: "events may be stored as runs (value format 2) under their last event's key",
            // Every version-1 value is a valid version-2 value: nothing to rewrite. The step
            // exists so that a build that cannot read runs refuses the data dir as a whole
            // (format too new) instead of reporting entities corrupt one by one.
            step: |_| Ok(()),
        },
        Migration {
            from_version: 2,
            description: "the existence index is dropped: entities are listed from their snapshot and event keys",
            step: drop_existence_index,
        },
    ]
}

/// The prefix of every shard tree's name (`shard-N`).
const SHARD_TREE_PREFIX: &[u8] = b"shard-";

/// The first byte of every existence index key of format version 2 (`e`, then the entity
/// type and key, with an empty value). No other key of a shard tree starts with it.
pub const EXISTENCE_INDEX_KIND: u8 = b'e';

/// How many keys one sled batch of [`drop_existence_index`] removes.
const REMOVAL_BATCH_KEYS: usize = 10_000;

/// [`drop_existence_index`] logs its progress every this many keys removed.
const PROGRESS_EVERY_KEYS: u64 = 1_000_000;

/// Removes every existence index key from every shard tree, a batch at a time. Running it
/// again after an interruption removes what is left.
fn drop_existence_index(db: &sled::Db) -> Result<(), MigrationError> {
    let failed = |detail: String| MigrationError::StepFailed {
        from: 2,
        description: "dropping the existence index",
        detail,
    };
    let mut removed: u64 = 0;
    for name in db.tree_names() {
        if !name.starts_with(SHARD_TREE_PREFIX) {
            continue;
        }
        let tree_name = String::from_utf8_lossy(&name).into_owned();
        let tree = db
            .open_tree(&name)
            .map_err(|e| failed(format!("opening tree {tree_name}: {e}")))?;
        loop {
            let mut batch = sled::Batch::default();
            let mut in_batch = 0;
            for key in tree
                .scan_prefix([EXISTENCE_INDEX_KIND])
                .keys()
                .take(REMOVAL_BATCH_KEYS)
            {
                let key = key.map_err(|e| failed(format!("scanning tree {tree_name}: {e}")))?;
                batch.remove(key);
                in_batch += 1;
            }
            if in_batch == 0 {
                break;
            }
            tree.apply_batch(batch)
                .map_err(|e| failed(format!("removing keys from tree {tree_name}: {e}")))?;
            let before = removed;
            removed += in_batch as u64;
            // A large data dir takes a while (about 200,000 keys a second): show progress.
            if removed / PROGRESS_EVERY_KEYS > before / PROGRESS_EVERY_KEYS {
                info!(removed, tree = %tree_name, "dropping the existence index");
            }
        }
    }
    info!(removed, "existence index dropped");
    Ok(())
}

/// Brings the data dir in `db` to [`CURRENT_FORMAT_VERSION`] with the steps of [`migrations`].
pub fn prepare(db: &sled::Db) -> Result<PrepareOutcome, MigrationError> {
    run_with(db, &migrations(), CURRENT_FORMAT_VERSION)
}

/// Reads the recorded format version, `None` for a data dir that has none (a fresh one).
pub fn recorded_version(db: &sled::Db) -> Result<Option<u32>, MigrationError> {
    let meta = open_meta(db)?;
    let value = meta
        .get(FORMAT_VERSION_KEY)
        .map_err(|source| MigrationError::Sled {
            context: "reading the format version".into(),
            source,
        })?;
    match value {
        None => Ok(None),
        Some(bytes) => {
            let array: [u8; 4] = bytes.as_ref().try_into().map_err(|_| {
                MigrationError::Malformed(format!("expected 4 bytes, found {}", bytes.len()))
            })?;
            Ok(Some(u32::from_be_bytes(array)))
        }
    }
}

/// Brings the data dir in `db` to `target` using `steps` (which need not be sorted, but must
/// contain exactly one step from every version between the recorded one and `target`).
///
/// A fresh data dir is stamped with `target` without running any step: it is created in the
/// current layout. Tests use this with synthetic steps; the server uses [`prepare`].
pub fn run_with(
    db: &sled::Db,
    steps: &[Migration],
    target: u32,
) -> Result<PrepareOutcome, MigrationError> {
    let found = match recorded_version(db)? {
        None => {
            record_version(db, target)?;
            info!(version = target, "new data dir: format version recorded");
            return Ok(PrepareOutcome::Created { version: target });
        }
        Some(found) => found,
    };
    if found > target {
        return Err(MigrationError::TooNew {
            found,
            supported: target,
        });
    }
    if found == target {
        return Ok(PrepareOutcome::UpToDate { version: found });
    }
    // Check the whole path exists before running anything, so a gap is reported without
    // leaving the data dir half way.
    for version in found..target {
        if !steps.iter().any(|s| s.from_version == version) {
            return Err(MigrationError::MissingStep {
                from: version,
                target,
            });
        }
    }
    let mut version = found;
    while version < target {
        let Some(migration) = steps.iter().find(|s| s.from_version == version) else {
            return Err(MigrationError::MissingStep {
                from: version,
                target,
            });
        };
        info!(
            from = version,
            to = migration.to_version(),
            description = migration.description,
            "running format migration"
        );
        (migration.step)(db)?;
        version = migration.to_version();
        record_version(db, version)?;
    }
    Ok(PrepareOutcome::Migrated {
        from: found,
        to: target,
    })
}

fn open_meta(db: &sled::Db) -> Result<sled::Tree, MigrationError> {
    db.open_tree(META_TREE)
        .map_err(|source| MigrationError::Sled {
            context: "opening the meta tree".into(),
            source,
        })
}

/// Records `version` and flushes sled so the record is on disk before anything relies on it.
fn record_version(db: &sled::Db, version: u32) -> Result<(), MigrationError> {
    let meta = open_meta(db)?;
    meta.insert(FORMAT_VERSION_KEY, &version.to_be_bytes())
        .map_err(|source| MigrationError::Sled {
            context: format!("recording format version {version}"),
            source,
        })?;
    db.flush().map_err(|source| MigrationError::Sled {
        context: format!("flushing after recording format version {version}"),
        source,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_db() -> (tempfile::TempDir, sled::Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path().join("state"))
            .open()
            .unwrap();
        (dir, db)
    }

    fn set_version(db: &sled::Db, version: u32) {
        db.open_tree(META_TREE)
            .unwrap()
            .insert(FORMAT_VERSION_KEY, &version.to_be_bytes())
            .unwrap();
    }

    /// Appends `from` to the `log` key of the meta tree, so tests can see which steps ran.
    fn log_step(db: &sled::Db, from: u8) {
        let meta = db.open_tree(META_TREE).unwrap();
        let mut log = meta
            .get(b"log")
            .unwrap()
            .map(|v| v.to_vec())
            .unwrap_or_default();
        log.push(from);
        meta.insert(b"log", log).unwrap();
    }

    fn read_log(db: &sled::Db) -> Vec<u8> {
        db.open_tree(META_TREE)
            .unwrap()
            .get(b"log")
            .unwrap()
            .map(|v| v.to_vec())
            .unwrap_or_default()
    }

    fn step1(db: &sled::Db) -> Result<(), MigrationError> {
        log_step(db, 1);
        Ok(())
    }
    fn step2(db: &sled::Db) -> Result<(), MigrationError> {
        log_step(db, 2);
        Ok(())
    }
    fn step3(db: &sled::Db) -> Result<(), MigrationError> {
        log_step(db, 3);
        Ok(())
    }
    fn failing(_: &sled::Db) -> Result<(), MigrationError> {
        Err(MigrationError::StepFailed {
            from: 2,
            description: "fails",
            detail: "synthetic failure".into(),
        })
    }

    fn synthetic_steps() -> Vec<Migration> {
        // Deliberately out of order: the runner orders by version.
        vec![
            Migration {
                from_version: 3,
                description: "three to four",
                step: step3,
            },
            Migration {
                from_version: 1,
                description: "one to two",
                step: step1,
            },
            Migration {
                from_version: 2,
                description: "two to three",
                step: step2,
            },
        ]
    }

    #[test]
    fn a_version_1_data_dir_is_brought_to_the_current_version_unchanged() {
        let (_dir, db) = temp_db();
        open_meta(&db)
            .unwrap()
            .insert(FORMAT_VERSION_KEY, &1u32.to_be_bytes())
            .unwrap();
        let data = db.open_tree("shard-0").unwrap();
        data.insert(b"j-some-event", b"value").unwrap();
        assert_eq!(
            prepare(&db).unwrap(),
            PrepareOutcome::Migrated {
                from: 1,
                to: CURRENT_FORMAT_VERSION
            }
        );
        assert_eq!(data.get(b"j-some-event").unwrap().unwrap(), b"value");
    }

    #[test]
    fn version_2_loses_its_existence_index_and_keeps_everything_else() {
        let (_dir, db) = temp_db();
        set_version(&db, 2);
        let catalog = db.open_tree("catalog").unwrap();
        catalog.insert(b"e-not-a-shard-key", b"kept").unwrap();
        let mut kept = Vec::new();
        for shard in 0..3 {
            let tree = db.open_tree(format!("shard-{shard}")).unwrap();
            // More existence keys than one removal batch holds, in one of the shards.
            let entities = if shard == 1 {
                REMOVAL_BATCH_KEYS + 7
            } else {
                5
            };
            for n in 0..entities {
                let key = format!("k{n}");
                let mut exists = vec![EXISTENCE_INDEX_KIND, 0, 1, b't'];
                exists.extend_from_slice(key.as_bytes());
                tree.insert(exists, b"").unwrap();
                let snapshot = [b"s\x00\x01t\x00\x02".as_slice(), key.as_bytes()].concat();
                tree.insert(&snapshot, b"state").unwrap();
                kept.push((shard, snapshot));
            }
            tree.insert(b"d-record", b"r").unwrap();
            tree.insert(b"t-timer", b"t").unwrap();
            kept.push((shard, b"d-record".to_vec()));
            kept.push((shard, b"t-timer".to_vec()));
        }
        assert_eq!(
            prepare(&db).unwrap(),
            PrepareOutcome::Migrated {
                from: 2,
                to: CURRENT_FORMAT_VERSION
            }
        );
        for shard in 0..3 {
            let tree = db.open_tree(format!("shard-{shard}")).unwrap();
            assert_eq!(tree.scan_prefix([EXISTENCE_INDEX_KIND]).count(), 0);
            let mut expected: Vec<Vec<u8>> = kept
                .iter()
                .filter(|(s, _)| *s == shard)
                .map(|(_, key)| key.clone())
                .collect();
            expected.sort();
            let left: Vec<Vec<u8>> = tree.iter().keys().map(|k| k.unwrap().to_vec()).collect();
            assert_eq!(left, expected, "shard {shard}");
        }
        assert_eq!(catalog.get(b"e-not-a-shard-key").unwrap().unwrap(), b"kept");
        // Running the step again (an interrupted migration) finds nothing to do.
        drop_existence_index(&db).unwrap();
    }

    #[test]
    fn a_fresh_data_dir_is_stamped_with_the_current_version() {
        let (_dir, db) = temp_db();
        assert_eq!(recorded_version(&db).unwrap(), None);
        assert_eq!(
            prepare(&db).unwrap(),
            PrepareOutcome::Created {
                version: CURRENT_FORMAT_VERSION
            }
        );
        assert_eq!(recorded_version(&db).unwrap(), Some(CURRENT_FORMAT_VERSION));
    }

    #[test]
    fn a_fresh_data_dir_runs_no_steps() {
        let (_dir, db) = temp_db();
        assert_eq!(
            run_with(&db, &synthetic_steps(), 4).unwrap(),
            PrepareOutcome::Created { version: 4 }
        );
        assert!(read_log(&db).is_empty());
    }

    #[test]
    fn an_up_to_date_data_dir_is_left_alone() {
        let (_dir, db) = temp_db();
        prepare(&db).unwrap();
        assert_eq!(
            prepare(&db).unwrap(),
            PrepareOutcome::UpToDate {
                version: CURRENT_FORMAT_VERSION
            }
        );
        assert_eq!(recorded_version(&db).unwrap(), Some(CURRENT_FORMAT_VERSION));
    }

    #[test]
    fn steps_run_in_order_and_each_version_is_recorded() {
        let (_dir, db) = temp_db();
        set_version(&db, 1);
        assert_eq!(
            run_with(&db, &synthetic_steps(), 4).unwrap(),
            PrepareOutcome::Migrated { from: 1, to: 4 }
        );
        assert_eq!(read_log(&db), vec![1, 2, 3]);
        assert_eq!(recorded_version(&db).unwrap(), Some(4));
    }

    #[test]
    fn migration_stops_at_the_target() {
        let (_dir, db) = temp_db();
        set_version(&db, 2);
        assert_eq!(
            run_with(&db, &synthetic_steps(), 3).unwrap(),
            PrepareOutcome::Migrated { from: 2, to: 3 }
        );
        assert_eq!(read_log(&db), vec![2]);
        assert_eq!(recorded_version(&db).unwrap(), Some(3));
    }

    #[test]
    fn a_failing_step_stops_and_keeps_the_last_good_version() {
        let (_dir, db) = temp_db();
        set_version(&db, 1);
        let mut steps = synthetic_steps();
        for step in &mut steps {
            if step.from_version == 2 {
                step.step = failing;
            }
        }
        let err = run_with(&db, &steps, 4).unwrap_err();
        assert!(
            matches!(err, MigrationError::StepFailed { from: 2, .. }),
            "{err}"
        );
        assert_eq!(read_log(&db), vec![1], "the step after the failure ran");
        assert_eq!(recorded_version(&db).unwrap(), Some(2));
    }

    #[test]
    fn a_gap_in_the_steps_is_refused_before_anything_runs() {
        let (_dir, db) = temp_db();
        set_version(&db, 1);
        let steps: Vec<Migration> = synthetic_steps()
            .into_iter()
            .filter(|s| s.from_version != 2)
            .collect();
        let err = run_with(&db, &steps, 4).unwrap_err();
        assert!(
            matches!(err, MigrationError::MissingStep { from: 2, target: 4 }),
            "{err}"
        );
        assert!(read_log(&db).is_empty());
        assert_eq!(recorded_version(&db).unwrap(), Some(1));
    }

    #[test]
    fn a_newer_data_dir_is_refused_and_left_unchanged() {
        let (_dir, db) = temp_db();
        set_version(&db, CURRENT_FORMAT_VERSION + 1);
        let err = prepare(&db).unwrap_err();
        assert!(
            matches!(err, MigrationError::TooNew { found, supported }
                if found == CURRENT_FORMAT_VERSION + 1 && supported == CURRENT_FORMAT_VERSION),
            "{err}"
        );
        assert!(err.to_string().contains("newer than this server supports"));
        assert_eq!(
            recorded_version(&db).unwrap(),
            Some(CURRENT_FORMAT_VERSION + 1)
        );
    }

    #[test]
    fn a_malformed_version_is_an_error() {
        let (_dir, db) = temp_db();
        db.open_tree(META_TREE)
            .unwrap()
            .insert(FORMAT_VERSION_KEY, &[1u8, 2])
            .unwrap();
        assert!(matches!(
            prepare(&db).unwrap_err(),
            MigrationError::Malformed(_)
        ));
    }
}
