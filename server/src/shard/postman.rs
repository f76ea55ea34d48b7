//! The postman: delivers the messages entities send each other, exactly once.
//!
//! **Owns**: getting every outbox record to its target. A sender's turn writes the message
//! (with its per-target sequence number) to its outbox in the turn's own batch; once that is
//! durable the sender hands it here. The postman delivers each sender→target pair's messages
//! in sequence order, one at a time; the target handles a message and writes its receipt
//! (the sender's sequence number) in the same batch, so a redelivery is recognised and only
//! acknowledged. On an acknowledgement the postman removes the outbox record. At start-up it
//! reads every outbox record back, so messages survive crashes of either side.
//!
//! Failed deliveries (full mailbox, quarantined or crashing target, unknown type, shutting
//! down) are retried with exponential backoff, forever: a message is never dropped. One that
//! keeps crashing its target becomes a dead letter there (the target decides, see `entity/`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::address::EntityId;
use crate::entity::records::{self, OutboxMessage};
use crate::entity::{DeliveryAck, Envelope, Request};
use crate::storage::{EntityBatch, Op, RecordKind};

use super::directory::ShardContext;
use super::record_pages::RecordPages;

/// The first retry delay of a failed delivery; it doubles up to [`RETRY_DELAY_MAX`].
const RETRY_DELAY_MIN: Duration = Duration::from_millis(10);
const RETRY_DELAY_MAX: Duration = Duration::from_secs(5);
/// How long one delivery attempt waits for the target's answer.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// Outbox records read per page at start-up.
const SWEEP_PAGE: usize = 1024;
/// Deliveries in flight at once, at most (one per pair in any case).
pub const DELIVERIES_IN_FLIGHT_MAX: usize = 1024;

/// What the postman's task is told.
#[derive(Debug)]
pub(super) enum Mail {
    /// `from` durably sent `message`.
    Post {
        from: EntityId,
        message: OutboxMessage,
    },
    /// The pair's message in flight was delivered.
    Delivered { pair: Pair, pair_seq: u64 },
    /// Delivering the pair's message in flight failed and its backoff is over: it goes back
    /// among the waiting ones, and the lowest waiting is tried next (a target that reported
    /// a gap gets the earlier message first).
    Failed {
        pair: Pair,
        message: OutboxMessage,
        reason: String,
    },
}

/// A sender and a target.
pub(super) type Pair = (EntityId, EntityId);

/// The handle entities post through.
#[derive(Clone)]
pub(super) struct Postman {
    mail: mpsc::UnboundedSender<Mail>,
}

impl Postman {
    /// Starts the postman's task; it reads every shard's outbox first, then takes posts.
    pub fn start(context: &Arc<ShardContext>, cancel: CancellationToken) -> Postman {
        let (mail, inbox) = mpsc::unbounded_channel();
        let postman = Postman { mail: mail.clone() };
        let task = PostmanTask {
            context: context.clone(),
            mail,
            pairs: HashMap::new(),
            deliveries: Arc::new(Semaphore::new(DELIVERIES_IN_FLIGHT_MAX)),
        };
        tokio::spawn(task.run(inbox, cancel));
        postman
    }

    /// Hands over a durably sent message.
    pub fn post(&self, from: &EntityId, message: OutboxMessage) {
        // A closed channel means the server is stopping; the outbox record stays and is
        // delivered after the next start.
        let _ = self.mail.send(Mail::Post {
            from: from.clone(),
            message,
        });
    }
}

/// The messages of one pair not yet acknowledged.
#[derive(Default)]
struct PairQueue {
    waiting: BTreeMap<u64, OutboxMessage>,
    /// Sequence numbers at or below this were acknowledged.
    acknowledged: u64,
    /// The sequence number being delivered (taken out of `waiting`).
    in_flight: Option<u64>,
    /// Failed attempts since the last delivery: the backoff exponent.
    failures: u32,
}

struct PostmanTask {
    context: Arc<ShardContext>,
    mail: mpsc::UnboundedSender<Mail>,
    pairs: HashMap<Pair, PairQueue>,
    /// Bounds the deliveries in flight.
    deliveries: Arc<Semaphore>,
}

impl PostmanTask {
    async fn run(mut self, mut inbox: mpsc::UnboundedReceiver<Mail>, cancel: CancellationToken) {
        let sweep = tokio::spawn(sweep_outboxes(self.context.clone(), self.mail.clone()));
        loop {
            let mail = tokio::select! {
                () = cancel.cancelled() => break,
                mail = inbox.recv() => mail,
            };
            let Some(mail) = mail else { break };
            match mail {
                Mail::Post { from, message } => {
                    let pair = (from, message.to.clone());
                    let queue = self.pairs.entry(pair.clone()).or_default();
                    if message.pair_seq > queue.acknowledged
                        && queue.in_flight != Some(message.pair_seq)
                    {
                        queue.waiting.insert(message.pair_seq, message);
                    }
                    self.dispatch(&pair, &cancel);
                }
                Mail::Delivered { pair, pair_seq } => self.delivered(pair, pair_seq, &cancel),
                Mail::Failed {
                    pair,
                    message,
                    reason,
                } => self.failed(pair, message, &reason, &cancel),
            }
        }
        sweep.abort();
    }

    /// The pair's head message was acknowledged: deliver the next one, if any.
    fn delivered(&mut self, pair: Pair, pair_seq: u64, cancel: &CancellationToken) {
        let Some(queue) = self.pairs.get_mut(&pair) else {
            return;
        };
        queue.in_flight = None;
        queue.failures = 0;
        queue.acknowledged = queue.acknowledged.max(pair_seq);
        queue.waiting.retain(|seq, _| *seq > pair_seq);
        if queue.waiting.is_empty() {
            self.pairs.remove(&pair);
            return;
        }
        self.dispatch(&pair, cancel);
    }

    /// The pair's message in flight failed (its backoff is over): try again, lowest first.
    fn failed(
        &mut self,
        pair: Pair,
        message: OutboxMessage,
        reason: &str,
        cancel: &CancellationToken,
    ) {
        let Some(queue) = self.pairs.get_mut(&pair) else {
            return;
        };
        queue.in_flight = None;
        queue.failures += 1;
        if queue.failures == 1 || queue.failures % 10 == 0 {
            tracing::info!(from = %pair.0, to = %pair.1, pair_seq = message.pair_seq, failures = queue.failures, %reason, "message delivery failed; retrying");
        }
        if message.pair_seq > queue.acknowledged {
            queue.waiting.insert(message.pair_seq, message);
        }
        self.dispatch(&pair, cancel);
    }

    /// Starts delivering the pair's first waiting message, unless one is in flight.
    fn dispatch(&mut self, pair: &Pair, cancel: &CancellationToken) {
        let Some(queue) = self.pairs.get_mut(pair) else {
            return;
        };
        if queue.in_flight.is_some() {
            return;
        }
        let Some((pair_seq, message)) = queue.waiting.pop_first() else {
            self.pairs.remove(pair);
            return;
        };
        queue.in_flight = Some(pair_seq);
        // Waited after a failure, before the message is handed back.
        let backoff = retry_delay(queue.failures + 1);
        let context = self.context.clone();
        let mail = self.mail.clone();
        let pair = pair.clone();
        let cancel = cancel.clone();
        let deliveries = self.deliveries.clone();
        tokio::spawn(async move {
            let outcome = tokio::select! {
                () = cancel.cancelled() => return,
                outcome = async {
                    // Held for the attempt, not for its backoff; never closed.
                    let _permit = deliveries.acquire().await;
                    deliver(&context, &pair.0, &message).await
                } => outcome,
            };
            let mail_back = match outcome {
                Ok(()) => Mail::Delivered { pair, pair_seq },
                Err(reason) => {
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    Mail::Failed {
                        pair,
                        message,
                        reason,
                    }
                }
            };
            let _ = mail.send(mail_back);
        });
    }
}

/// The delay before retry number `failures` (1, 2, …).
fn retry_delay(failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    RETRY_DELAY_MIN.saturating_mul(factor).min(RETRY_DELAY_MAX)
}

/// One delivery attempt: the target handles the message (or recognises it), then the
/// sender's outbox record goes. `Err` says why it must be tried again.
async fn deliver(
    context: &Arc<ShardContext>,
    from: &EntityId,
    message: &OutboxMessage,
) -> Result<(), String> {
    let to = message.to.clone();
    let name = records::outbox_name(&to, message.pair_seq);
    let (reply, answer) = oneshot::channel();
    let envelope = Envelope {
        request: Request::Deliver {
            from: from.clone(),
            message: Box::new(message.clone()),
            reply,
        },
        deadline: None,
    };
    context
        .route(&to, envelope)
        .map_err(|error| error.to_string())?;
    let ack = match tokio::time::timeout(DELIVERY_TIMEOUT, answer).await {
        Err(_) => return Err("the target did not answer in time".into()),
        Ok(Err(_)) => return Err("the target stopped before answering".into()),
        Ok(Ok(Err(error))) => return Err(error.to_string()),
        Ok(Ok(Ok(ack))) => ack,
    };
    if let DeliveryAck::Gap { expected } = ack {
        return Err(format!(
            "the target expects message {expected} of this sender first"
        ));
    }
    let batch = EntityBatch {
        shard: context.shard_index(from),
        entity: from.clone(),
        ops: vec![Op::RemoveRecord {
            kind: RecordKind::Outbox,
            name,
        }],
    };
    // Not waited for: if it is lost, the message is delivered again after a restart and the
    // target only acknowledges it.
    if let Err(error) = context.entities.store.submit(batch).await {
        tracing::warn!(sender = %from, %error, "removing a delivered message from the outbox failed");
    }
    Ok(())
}

/// Reads every shard's outbox and posts what it holds; wakes every entity whose durable
/// inbox holds messages, so they are handled without waiting for a new message.
async fn sweep_outboxes(context: Arc<ShardContext>, mail: mpsc::UnboundedSender<Mail>) {
    let store = &context.entities.store;
    let mut posted = 0usize;
    for shard in 0..store.shard_count() {
        let mut pages = RecordPages::new(shard, RecordKind::Outbox);
        while let Some(page) = pages.next(store, SWEEP_PAGE).await {
            for (from, entry) in &page {
                match records::decode::<OutboxMessage>(from, "outbox message", &entry.value) {
                    Ok(message) => {
                        posted += 1;
                        let _ = mail.send(Mail::Post {
                            from: from.clone(),
                            message,
                        });
                    }
                    Err(error) => {
                        tracing::error!(%error, "an outbox message does not decode; it is skipped")
                    }
                }
            }
        }
        wake_inboxes(&context, shard).await;
    }
    if posted > 0 {
        tracing::info!(messages = posted, "undelivered messages found in outboxes");
    }
}

/// Activates every entity of the shard with accepted but unhandled durable messages.
async fn wake_inboxes(context: &Arc<ShardContext>, shard: u32) {
    let mut pages = RecordPages::new(shard, RecordKind::Inbox);
    while let Some(page) = pages.next(&context.entities.store, SWEEP_PAGE).await {
        let mut last: Option<&EntityId> = None;
        for (entity, _) in &page {
            if last == Some(entity) {
                continue;
            }
            last = Some(entity);
            let envelope = Envelope {
                request: Request::Wake,
                deadline: None,
            };
            if let Err(error) = context.route(entity, envelope) {
                tracing::warn!(%entity, %error, "could not wake an entity with a durable inbox");
            }
        }
        // The last entity seen is woken: the next page starts after all its records.
        if let Some(entity) = last {
            pages.skip_entity(entity);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_grow_and_are_capped() {
        assert_eq!(retry_delay(1), Duration::from_millis(10));
        assert_eq!(retry_delay(2), Duration::from_millis(20));
        assert_eq!(retry_delay(5), Duration::from_millis(160));
        assert_eq!(retry_delay(40), RETRY_DELAY_MAX);
    }
}
