//! Numbered on-disk format migrations for statehouse data directories.

/// Why a data dir could not be brought to the current format.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("data dir format version {found} is newer than this server supports ({supported}); use a newer statehouse-server")]
    TooNew { found: u32, supported: u32 },
}
