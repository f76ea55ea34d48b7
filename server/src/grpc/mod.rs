//! The gRPC surface: tonic services that translate wire ↔ domain and errors → `Status`.
//!
//! **Owns**: `EntityService` ([`entity_service`]), `AdminService` ([`admin_service`]), the
//! one mapping from domain errors to status codes ([`status`]), and reading the caller's
//! deadline ([`deadline`]).
//! **May call**: `shard/`, and `stats` for `ServerStats`. No logic lives here: protobuf types
//! stop at this folder.

mod admin_service;
pub mod deadline;
mod entity_service;
pub mod status;

pub use admin_service::AdminApi;
pub use entity_service::EntityApi;
