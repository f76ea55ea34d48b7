//! statehouse-server: entities, their journal and their supervisors, served over gRPC.
//!
//! # Layout
//!
//! - [`grpc`]: tonic services; wire ↔ domain and errors → status codes. No logic.
//! - [`shard`]: address → shard hashing, each shard's directory of active entities, and
//!   [`shard::Shards`], the operations the API offers.
//! - [`entity`]: the process of one active entity: mailbox, turn loop, activation,
//!   passivation, recovery by replay.
//! - [`behaviour`]: the code of entity types: the traits, the registry, the built-ins.
//! - [`deployment`]: deploying behaviours at run time (compile, store durably, activate,
//!   roll back), reloaded at start-up.
//! - [`storage`]: the `Store` trait and its journal + sled implementation.
//! - [`supervisor`]: OTP supervision as pure logic: strategies, restart policies, intensity,
//!   backoff, the static supervisor's state machine and the tree the admin API shows; and
//!   the root supervisor, which counts its children's restarts and gives up past its intensity.
//! - [`stats`]: what the server reports about itself: entities, memory, disk.
//! - [`address`]: the `(type, key)` address every layer shares.
//! - [`cli`]: the command line (flags, logging, runtime), reusable by embedders.
//! - [`config`], [`server`] (wiring and ordered shutdown), [`shutdown`] (the signal).
//!
//! Dependencies point one way: `grpc → shard → entity → behaviour`, and `entity → storage`.
//! Nothing below `grpc` knows about protobuf.

pub mod address;
pub mod behaviour;
pub mod cli;
pub mod config;
pub mod deployment;
pub mod entity;
pub mod grpc;
pub mod server;
pub mod shard;
pub mod shutdown;
pub mod stats;
pub mod storage;
pub mod supervisor;
