//! statehouse-server: entities, their journal and their supervisors, served over gRPC.

pub mod address;
pub mod behaviour;
pub mod entity;
pub mod shard;
pub mod storage;
