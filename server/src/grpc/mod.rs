//! The gRPC surface: tonic services that translate wire ↔ domain and errors → `Status`.
//!
//! **Owns**: `EntityService` ([`entity_service`]), the one mapping from domain errors to status
//! codes ([`status`]), and reading the caller's deadline ([`deadline`]).
//! **May call**: `shard/` only. No logic lives here: protobuf types stop at this folder.

pub mod deadline;
mod entity_service;
pub mod status;

pub use entity_service::EntityApi;
