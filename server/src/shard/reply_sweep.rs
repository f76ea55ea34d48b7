//! The stored-reply sweep: forgets the expired stored replies of entities that are not active.
//!
//! **Owns**: finding them. A call or cast that carries a request id leaves its reply stored
//! (a `Dedup` record) for `dedup_window`, so a retry gets it instead of running again. An
//! active entity forgets its expired replies as it goes, but one that passivated keeps them
//! on disk until it next activates, which may be never: every entity ever called with a
//! request id would keep a sled key for good. Every quarter window (at least
//! [`SWEEP_EVERY_MIN`], at most [`SWEEP_EVERY_MAX`]) this task reads each shard's stored
//! replies in pages and asks every entity that is not active and holds an expired one to
//! forget them ([`Request::ForgetExpiredReplies`]): the entity activates, writes the
//! removals in a batch of its own, and passivates again.
//!
//! The entity removes its own records, so the removal is ordered with everything else it
//! writes: a reply stored again under the same request id in the meantime is never lost,
//! which a removal written from outside could not promise. A stored reply that fails its
//! checksum (or does not decode) is left alone: a retry of its request answers `DATA_LOSS`,
//! which forgetting it would turn into running the request again.
//!
//! Each entity asked costs an activation, a batch and a passivation: unpaced, 16 at a time,
//! a sweep forgot 30,000 replies a second on two cores and took 1.6 of them. So a pass asks
//! at most [`ASKS_PER_SECOND_MAX`] entities a second, [`IN_FLIGHT_MAX`] at a time: measured
//! at a fifth of one core, and a pass over a million entities takes ~8 minutes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::address::EntityId;
use crate::behaviour::now_unix_ms;
use crate::entity::records::{self, DedupStamp};
use crate::entity::{Envelope, Request};
use crate::storage::RecordKind;

use super::directory::ShardContext;
use super::record_pages::RecordPages;

/// The shortest time between two sweeps.
pub const SWEEP_EVERY_MIN: Duration = Duration::from_secs(1);
/// The longest time between two sweeps.
pub const SWEEP_EVERY_MAX: Duration = Duration::from_secs(600);
/// Stored replies read per page.
const PAGE: usize = 1024;
/// Entities asked to forget at once, at most.
const IN_FLIGHT_MAX: usize = 16;
/// Entities asked to forget per second, at most.
pub const ASKS_PER_SECOND_MAX: u32 = 2_000;

/// How long the sweep waits between two passes for a retention window of `window`.
pub fn sweep_every(window: Duration) -> Duration {
    (window / 4).clamp(SWEEP_EVERY_MIN, SWEEP_EVERY_MAX)
}

/// Sweeps every shard every [`sweep_every`] of the retention window, until `cancel`.
pub(super) async fn run(context: Arc<ShardContext>, cancel: CancellationToken) {
    let every = sweep_every(context.entities.config.dedup_window);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let forgotten = sweep(&context, &cancel).await;
        if forgotten > 0 {
            tracing::debug!(forgotten, "expired stored replies forgotten");
        }
    }
}

/// One pass over every shard, until done or `cancel`; returns how many stored replies the
/// entities forgot.
pub(super) async fn sweep(context: &Arc<ShardContext>, cancel: &CancellationToken) -> u64 {
    let mut pace = Pace::new();
    let mut forgotten = 0;
    for shard in 0..context.entities.store.shard_count() {
        forgotten += sweep_shard(context, shard, &mut pace, cancel).await;
    }
    forgotten
}

/// Spaces the asks of one pass [`ASKS_PER_SECOND_MAX`] a second apart on average.
struct Pace {
    started: tokio::time::Instant,
    asked: u32,
}

impl Pace {
    fn new() -> Self {
        Pace {
            started: tokio::time::Instant::now(),
            asked: 0,
        }
    }

    /// Waits until the next ask is due; false if `cancel` came first.
    async fn next(&mut self, cancel: &CancellationToken) -> bool {
        let due = self.started + Duration::from_secs(1) * self.asked / ASKS_PER_SECOND_MAX;
        self.asked = self.asked.saturating_add(1);
        tokio::select! {
            () = cancel.cancelled() => false,
            () = tokio::time::sleep_until(due) => true,
        }
    }
}

/// One pass over one shard's stored replies.
async fn sweep_shard(
    context: &Arc<ShardContext>,
    shard: u32,
    pace: &mut Pace,
    cancel: &CancellationToken,
) -> u64 {
    let window_ms =
        u64::try_from(context.entities.config.dedup_window.as_millis()).unwrap_or(u64::MAX);
    let mut pages = RecordPages::new(shard, RecordKind::Dedup);
    let mut forgotten = 0;
    while !cancel.is_cancelled() {
        let Some(page) = pages.next(&context.entities.store, PAGE).await else {
            break;
        };
        let now_ms = now_unix_ms();
        let mut holders: Vec<EntityId> = Vec::new();
        for (entity, entry) in page {
            // A reply that does not decode is left to its entity: a retry of it answers
            // DATA_LOSS, which forgetting it would turn into running the request again.
            let Ok(stamp) = records::decode::<DedupStamp>(&entity, "stored reply", &entry.value)
            else {
                continue;
            };
            let expired = stamp.at_ms.saturating_add(window_ms) < now_ms;
            if expired && holders.last() != Some(&entity) && !context.is_active(&entity) {
                holders.push(entity);
            }
        }
        forgotten += ask_to_forget(context, holders, pace, cancel).await;
    }
    forgotten
}

/// Asks each entity to forget its expired stored replies, at `pace` and [`IN_FLIGHT_MAX`]
/// at a time (none more once `cancel` comes), and returns how many they forgot in all.
async fn ask_to_forget(
    context: &Arc<ShardContext>,
    holders: Vec<EntityId>,
    pace: &mut Pace,
    cancel: &CancellationToken,
) -> u64 {
    let mut holders = holders.into_iter();
    let mut in_flight = FuturesUnordered::new();
    let mut forgotten = 0;
    loop {
        while in_flight.len() < IN_FLIGHT_MAX {
            let Some(entity) = holders.next() else { break };
            if !pace.next(cancel).await {
                break;
            }
            in_flight.push(ask(context, entity));
        }
        match in_flight.next().await {
            Some(count) => forgotten += count,
            None => return forgotten,
        }
    }
}

/// Asks one entity; its failures (unknown type, quarantine, shutdown, storage) only mean its
/// replies wait for a later sweep.
async fn ask(context: &Arc<ShardContext>, entity: EntityId) -> u64 {
    let (reply, answer) = oneshot::channel();
    let envelope = Envelope {
        request: Request::ForgetExpiredReplies { reply },
        deadline: None,
    };
    if let Err(error) = context.route(&entity, envelope) {
        tracing::debug!(%entity, %error, "could not ask an entity to forget its expired replies");
        return 0;
    }
    match answer.await {
        Ok(Ok(count)) => {
            let count = count as u64;
            context
                .replies_forgotten
                .fetch_add(count, Ordering::Relaxed);
            count
        }
        Ok(Err(error)) => {
            tracing::debug!(%entity, %error, "an entity could not forget its expired replies");
            0
        }
        // The activation ended without answering (a crash, a shard restart).
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_come_a_quarter_window_apart_within_bounds() {
        assert_eq!(
            sweep_every(Duration::from_secs(3600)),
            Duration::from_secs(600)
        );
        assert_eq!(
            sweep_every(Duration::from_secs(400)),
            Duration::from_secs(100)
        );
        assert_eq!(sweep_every(Duration::from_millis(100)), SWEEP_EVERY_MIN);
        assert_eq!(sweep_every(Duration::from_secs(86_400)), SWEEP_EVERY_MAX);
    }
}
