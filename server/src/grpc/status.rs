//! The one place where domain errors become gRPC status codes (DESIGN §7).

use tonic::{Code, Status};

use crate::behaviour::RegistryError;
use crate::deployment::DeployError;
use crate::entity::EntityError;
use crate::storage::StoreError;

/// The status code a client sees for each error.
pub fn code_of(error: &EntityError) -> Code {
    match error {
        EntityError::InvalidAddress(_)
        | EntityError::InvalidMessage { .. }
        | EntityError::InvalidPageToken(_) => Code::InvalidArgument,
        EntityError::UnknownType { .. } | EntityError::NotFound(_) => Code::NotFound,
        EntityError::MailboxFull { .. } | EntityError::WatchLagged { .. } => {
            Code::ResourceExhausted
        }
        EntityError::WatchEnded { .. } => Code::Unavailable,
        EntityError::WatchAhead { .. } => Code::InvalidArgument,
        EntityError::Crashed { .. } => Code::Aborted,
        EntityError::Quarantined { .. } => Code::FailedPrecondition,
        EntityError::ShardRestarting { .. } => Code::Unavailable,
        EntityError::Corrupt { .. } => Code::DataLoss,
        EntityError::RecoveryFailed { .. } | EntityError::Storage { .. } => Code::Internal,
        EntityError::StorageUnavailable { .. } | EntityError::ShuttingDown => Code::Unavailable,
        EntityError::DeadlineExceeded(_) => Code::DeadlineExceeded,
    }
}

impl From<EntityError> for Status {
    fn from(error: EntityError) -> Self {
        Status::new(code_of(&error), error.to_string())
    }
}

impl From<DeployError> for Status {
    fn from(error: DeployError) -> Self {
        let code = match &error {
            DeployError::NoEngine => Code::Unimplemented,
            DeployError::InvalidName(_) | DeployError::Compile(_) => Code::InvalidArgument,
            DeployError::Registry(RegistryError::Static(_)) => Code::InvalidArgument,
            DeployError::Registry(
                RegistryError::NotDeployed(_) | RegistryError::NoSuchVersion { .. },
            ) => Code::NotFound,
            DeployError::Registry(RegistryError::Duplicate(_)) => Code::AlreadyExists,
            DeployError::NoPreviousVersion(_) => Code::FailedPrecondition,
            DeployError::Catalog { .. } => Code::DataLoss,
            DeployError::Storage(error) => store_code(error),
        };
        Status::new(code, error.to_string())
    }
}

/// A closed store or a failed journal is unavailable (it comes back with the server); any
/// other storage failure is internal.
fn store_code(error: &StoreError) -> Code {
    match error {
        StoreError::Closed | StoreError::JournalFailed(_) => Code::Unavailable,
        _ => Code::Internal,
    }
}

impl From<StoreError> for Status {
    fn from(error: StoreError) -> Self {
        Status::new(store_code(&error), error.to_string())
    }
}

/// A request whose fields are malformed before any domain type could be built.
pub fn invalid_argument(message: impl Into<String>) -> Status {
    Status::invalid_argument(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::EntityId;

    #[test]
    fn messages_name_the_entity() {
        let entity = EntityId::new("counter", "k1").unwrap();
        let status = Status::from(EntityError::MailboxFull {
            entity,
            capacity: 8,
        });
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(
            status.message().contains("counter/k1"),
            "{}",
            status.message()
        );
    }
}
