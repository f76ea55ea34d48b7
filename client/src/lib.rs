//! statehouse-client: an async Rust client for a statehouse server, with typed helpers for
//! the built-in behaviours.
//!
//! ```no_run
//! # async fn demo() -> Result<(), statehouse_client::ClientError> {
//! use std::time::Duration;
//! use statehouse_client::Client;
//!
//! let client = Client::connect("http://127.0.0.1:50051")
//!     .await?
//!     .with_timeout(Duration::from_secs(5));
//! let visits = client.counter("visits").incr(1).await?;
//! let outcome = client
//!     .call("counter", "visits", serde_json::json!({"op": "get"}))
//!     .await?;
//! assert_eq!(outcome.reply["value"], visits);
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! - [`client`]: [`Client`], the connection and the `EntityService` calls on JSON values, with
//!   per-call options ([`CallOptions`], [`CastOptions`]), and the admin calls.
//! - [`request_id`]: idempotency keys, generated or the caller's, checked before sending.
//! - [`retry`]: [`RetryPolicy`], how `UNAVAILABLE` is retried with the same request id.
//! - [`admin`]: the supervision tree as [`admin::TreeNode`], dead letters as
//!   [`admin::DeadLetter`], and their renderings for people.
//! - [`pipeline`]: many calls in flight on one `Pipeline` stream.
//! - [`watch`]: a stream of an entity's committed turns.
//! - [`error`]: [`ClientError`], which keeps the gRPC code and message of every failure.
//! - [`counter`], [`register`], [`kv`]: typed handles on the built-in behaviours, and the
//!   parsers of their replies.
//! - [`bench`]: `statehouse bench`, the load generator (workloads, key distributions, the
//!   latency report).
//! - `reply` (private): turning a built-in's JSON reply into a typed value.
//!
//! The `statehouse` command-line tool (`src/main.rs`) is built on this library.

pub mod admin;
pub mod bench;
pub mod client;
pub mod coordination;
pub mod counter;
pub mod error;
pub mod kv;
pub mod pipeline;
pub mod register;
mod reply;
pub mod request_id;
pub mod retry;
pub mod watch;

pub use admin::{DeadLetter, DeadLetterPage, ServerStats};
pub use client::{
    CallOptions, CallOutcome, CastOptions, CastOutcome, Client, EntityState, ListPage,
};
pub use coordination::{
    Acquired, Lease, LeaseState, Queue, QueueItem, QueueLength, RateDecision, RateLimiter,
};
pub use counter::Counter;
pub use error::{code_name, ClientError};
pub use kv::{Kv, KvCas, KvField};
pub use register::{Register, RegisterCas, Versioned};
pub use retry::RetryPolicy;
pub use tonic::Code;
