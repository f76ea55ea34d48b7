//! The address of an entity: `(type, key)`.
//!
//! Every layer uses this one type; none of them interprets the strings beyond the limits
//! checked here.

use std::fmt;

use compact_str::CompactString;

/// The longest entity type name accepted, in bytes.
pub const TYPE_BYTES_MAX: usize = 128;
/// The longest entity key accepted, in bytes.
pub const KEY_BYTES_MAX: usize = 1024;

/// Addresses one entity: its behaviour type and its key within that type.
///
/// Both parts are [`CompactString`]s: up to 24 bytes they live inside the address itself,
/// so an address of a typical type and key is one allocation (one cache line in an `Arc`),
/// which is what a shard's directory compares on every message.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct EntityId {
    /// The behaviour type, e.g. `counter`.
    pub entity_type: CompactString,
    /// The key, any UTF-8 string of 1 to [`KEY_BYTES_MAX`] bytes.
    pub key: CompactString,
}

/// Why an address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("entity type is empty")]
    EmptyType,
    #[error("entity type is {0} bytes long; the limit is {TYPE_BYTES_MAX}")]
    TypeTooLong(usize),
    #[error("entity key is empty")]
    EmptyKey,
    #[error("entity key is {0} bytes long; the limit is {KEY_BYTES_MAX}")]
    KeyTooLong(usize),
}

impl EntityId {
    /// Builds an address, checking both parts against the limits.
    pub fn new(
        entity_type: impl Into<CompactString>,
        key: impl Into<CompactString>,
    ) -> Result<Self, AddressError> {
        let id = EntityId {
            entity_type: entity_type.into(),
            key: key.into(),
        };
        id.validate()?;
        Ok(id)
    }

    /// Checks both parts against the limits.
    pub fn validate(&self) -> Result<(), AddressError> {
        if self.entity_type.is_empty() {
            return Err(AddressError::EmptyType);
        }
        if self.entity_type.len() > TYPE_BYTES_MAX {
            return Err(AddressError::TypeTooLong(self.entity_type.len()));
        }
        if self.key.is_empty() {
            return Err(AddressError::EmptyKey);
        }
        if self.key.len() > KEY_BYTES_MAX {
            return Err(AddressError::KeyTooLong(self.key.len()));
        }
        Ok(())
    }
}

impl fmt::Display for EntityId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.entity_type, self.key)
    }
}
