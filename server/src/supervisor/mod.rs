//! Supervision, the pure part: what a supervisor decides when one of its children exits.
//!
//! This module owns the rules of Erlang/OTP's `supervisor` behaviour (DESIGN §6) as plain,
//! deterministic data and functions. It performs no I/O, spawns no tasks and never reads the
//! clock: every function that needs the time takes an [`Instant`](std::time::Instant) argument,
//! so tests use synthetic instants and never sleep. The runtime (entity crash handling, the
//! shard supervisors, the root) calls into it and carries out the [`Decision`]s it returns.
//!
//! # Layout
//!
//! - [`policy`]: [`Strategy`] (`one_for_one`, `one_for_all`, `rest_for_one`), [`RestartPolicy`]
//!   (`permanent`, `transient`, `temporary`) and [`ExitReason`].
//! - [`intensity`]: [`Intensity`] (OTP's MaxR in MaxT) and [`RestartWindow`], the sliding window
//!   that says when restarts must escalate.
//! - [`backoff`]: [`Backoff`], the exponential delay between restarts of whole shards.
//! - [`static_supervisor`]: [`ChildSpec`], [`Decision`] and [`SupervisorCore`], the state
//!   machine of a supervisor whose children are fixed at start.
//! - [`tree`]: [`TreeNode`] and [`NodeKind`], the supervision tree as the admin API shows it.
//!
//! **Invariant**: knows nothing about entities, storage, tokio or protobuf; it may call only `std`
//! and `serde`.

pub mod backoff;
pub mod intensity;
pub mod policy;
pub mod root;
pub mod static_supervisor;
pub mod tree;

pub use backoff::Backoff;
pub use intensity::{Intensity, RestartWindow};
pub use policy::{ExitReason, RestartPolicy, Strategy};
pub use root::RootSupervisor;
pub use static_supervisor::{ChildSpec, ChildState, Decision, SupervisorCore};
pub use tree::{NodeKind, TreeNode};
