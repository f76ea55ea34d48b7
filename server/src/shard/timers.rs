//! A shard's timer service: fires the durable timers of the shard's entities on time.
//!
//! **Owns**: watching the shard's time-ordered timer index (storage keeps it, written in the
//! same batches as the turns that set timers) and delivering each due timer to its entity,
//! activating it if it is passive. Pending timers cost no memory and no task here: the
//! service reads only the due entries, a page at a time, and sleeps until the next one is
//! due or an entity sets an earlier one.
//!
//! A delivered timer stays in the index until the entity's firing turn removes it, so the
//! service delivers it again if it is still there [`REDELIVERY_AFTER`] later (the entity
//! crashed on it, or its mailbox was full). The entity ignores a delivery of a timer it no
//! longer has pending, so redeliveries are harmless; one that keeps crashing its entity
//! becomes a dead letter there.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::behaviour::now_unix_ms;
use crate::entity::{EntityError, Envelope, Request};
use crate::storage::DueTimer;

use super::directory::ShardContext;

/// How long a delivered timer may stay due before it is delivered again.
pub const REDELIVERY_AFTER: Duration = Duration::from_secs(1);
/// Index entries read per page.
const PAGE: usize = 512;
/// Timers delivered and not yet handled, at most: after a long downtime, due timers are
/// fired as fast as their entities handle them, not all at once.
pub const FIRINGS_IN_FLIGHT_MAX: usize = 1024;
/// How soon a delivery refused for a full mailbox is tried again (other refusals wait
/// [`REDELIVERY_AFTER`]).
const BUSY_RETRY: Duration = Duration::from_millis(20);
/// How soon the service tries again after storage failed to answer.
const ERROR_RETRY: Duration = Duration::from_secs(1);

/// What entities tell the service: a timer was set, possibly earlier than its plan.
#[derive(Debug)]
pub(super) struct TimerAlarm {
    /// The Unix ms the service plans to wake at; 0 while it is awake scanning.
    planned: AtomicU64,
    /// The earliest due time set since the service's scan began.
    earliest: AtomicU64,
    notify: Notify,
}

impl TimerAlarm {
    pub fn new() -> Arc<Self> {
        Arc::new(TimerAlarm {
            planned: AtomicU64::new(0),
            earliest: AtomicU64::new(u64::MAX),
            notify: Notify::new(),
        })
    }

    /// A timer due at `due_ms` was durably set: wake the service if it plans to sleep past it.
    pub fn set(&self, due_ms: u64) {
        self.earliest.fetch_min(due_ms, Ordering::AcqRel);
        if due_ms < self.planned.load(Ordering::Acquire) {
            self.notify.notify_one();
        }
    }
}

/// Runs the timer service of `shard` until `cancel`.
pub(super) async fn run(
    context: Arc<ShardContext>,
    shard: u32,
    alarm: Arc<TimerAlarm>,
    cancel: CancellationToken,
) {
    // Delivered entries and when: not offered again before `REDELIVERY_AFTER`.
    let mut delivered: HashMap<DueTimer, Instant> = HashMap::new();
    let in_flight = Arc::new(Semaphore::new(FIRINGS_IN_FLIGHT_MAX));
    loop {
        let now_ms = now_unix_ms();
        // Timers set from here on are seen after the scan through `earliest`.
        alarm.planned.store(0, Ordering::Release);
        alarm.earliest.store(u64::MAX, Ordering::Release);
        let mut after: Option<DueTimer> = None;
        let mut next_due: Option<u64> = None;
        let mut retry_soon = None;
        let now = Instant::now();
        delivered.retain(|_, at| now.duration_since(*at) < REDELIVERY_AFTER);
        loop {
            let page = match context
                .entities
                .store
                .due_timers(shard, after.clone(), now_ms, PAGE)
                .await
            {
                Ok(page) => page,
                Err(error) => {
                    tracing::error!(shard, %error, "reading the timer index failed");
                    retry_soon = Some(ERROR_RETRY);
                    break;
                }
            };
            let full = page.due.len() == PAGE;
            for timer in &page.due {
                if delivered.contains_key(timer) {
                    continue;
                }
                let permit = tokio::select! {
                    () = cancel.cancelled() => return,
                    permit = in_flight.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        // The service owns the semaphore and never closes it.
                        Err(_) => return,
                    },
                };
                match fire(&context, timer, permit) {
                    Ok(()) => {
                        delivered.insert(timer.clone(), Instant::now());
                    }
                    Err(EntityError::ShuttingDown) => return,
                    Err(error) => {
                        // A full mailbox frees up soon; a quarantined entity or a shard in
                        // backoff takes longer.
                        let retry = match error {
                            EntityError::MailboxFull { .. } => BUSY_RETRY,
                            _ => REDELIVERY_AFTER,
                        };
                        tracing::debug!(shard, entity = %timer.entity, %error, ?retry, "timer delivery refused; retrying");
                        retry_soon = Some(retry_soon.map_or(retry, |d: Duration| d.min(retry)));
                    }
                }
            }
            after = page.due.last().cloned();
            if !full {
                next_due = page.next_due_ms;
                break;
            }
        }
        // Sleep until the next timer is due, a delivered one may need redelivery, or an
        // entity sets an earlier timer.
        let mut wake_ms = next_due.unwrap_or(u64::MAX);
        if !delivered.is_empty() {
            wake_ms = wake_ms.min(now_ms + REDELIVERY_AFTER.as_millis() as u64);
        }
        if let Some(delay) = retry_soon {
            wake_ms = wake_ms.min(now_ms + delay.as_millis() as u64);
        }
        // From here on an earlier timer notifies; one set during the scan is in `earliest`.
        alarm.planned.store(wake_ms, Ordering::Release);
        wake_ms = wake_ms.min(alarm.earliest.load(Ordering::Acquire));
        let sleep_ms = wake_ms.saturating_sub(now_unix_ms());
        if sleep_ms == 0 {
            continue;
        }
        let sleep = tokio::time::sleep(Duration::from_millis(sleep_ms.min(3_600_000)));
        tokio::select! {
            () = cancel.cancelled() => return,
            () = sleep => {}
            () = alarm.notify.notified() => {}
        }
    }
}

/// Offers a due timer to its entity's mailbox.
fn fire(
    context: &Arc<ShardContext>,
    timer: &DueTimer,
    permit: OwnedSemaphorePermit,
) -> Result<(), EntityError> {
    let name = String::from_utf8(timer.name.clone()).map_err(|_| EntityError::Corrupt {
        entity: timer.entity.clone(),
        detail: "a timer name in the index is not UTF-8".into(),
    })?;
    let envelope = Envelope {
        request: Request::Timer {
            name,
            due_ms: timer.due_ms,
            permit: Some(permit),
        },
        deadline: None,
    };
    context.route(&timer.entity, envelope)
}
