//! What a mailbox carries: a request and the caller's deadline.

use tokio::sync::{oneshot, OwnedSemaphorePermit};
use tokio::time::Instant;

use crate::address::EntityId;
use crate::behaviour::Value;

use super::records::OutboxMessage;
use super::EntityError;

/// The answer to a `Call`.
#[derive(Debug, Clone, PartialEq)]
pub struct CallReply {
    pub reply: Value,
    /// The entity's sequence number after the turn: the count of events it has committed.
    pub seq: u64,
    /// The reply is the stored one of an earlier request with the same request id: the
    /// handler did not run again.
    pub deduplicated: bool,
}

/// How the target of a message from another entity answered its delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryAck {
    /// Handled now, durably: the sender may forget it.
    Accepted,
    /// Handled before (a retry): the sender may forget it.
    Duplicate,
    /// It crashed the target too often and is now a dead letter there: the sender may forget it.
    DeadLettered,
    /// An earlier message of the same sender has not been accepted yet; send that first.
    Gap { expected: u64 },
}

/// One committed turn as watchers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchedTurn {
    /// The entity's sequence number after the turn.
    pub seq: u64,
    pub events: Vec<Value>,
    pub state: Value,
}

/// A new watcher's starting point and its feed of later turns.
#[derive(Debug)]
pub struct Subscription {
    /// The durable state when the subscription started, and its sequence number.
    pub seq: u64,
    pub state: Value,
    pub feed: tokio::sync::broadcast::Receiver<std::sync::Arc<WatchedTurn>>,
}

/// One request to an entity.
#[derive(Debug)]
pub enum Request {
    /// Handle the message and reply once the turn is durable.
    /// With a request id, a retry gets the stored reply of the committed turn instead.
    Call {
        message: Value,
        request_id: Option<String>,
        reply: oneshot::Sender<Result<CallReply, EntityError>>,
    },
    /// Handle the message; nobody waits for a reply.
    Cast {
        message: Value,
        request_id: Option<String>,
    },
    /// Accept the message into the durable inbox (the reply, once that is durable, says
    /// whether the request id was seen before), then handle it as a cast.
    DurableCast {
        message: Value,
        request_id: Option<String>,
        reply: oneshot::Sender<Result<bool, EntityError>>,
    },
    /// The timer `name` due at `due_ms` is due (ignored if it is no longer pending so).
    /// `permit` is released once the entity has handled it: the timer service bounds the
    /// firings in flight with it.
    Timer {
        name: String,
        due_ms: u64,
        permit: Option<OwnedSemaphorePermit>,
    },
    /// A message from another entity, delivered exactly once.
    Deliver {
        from: EntityId,
        message: Box<OutboxMessage>,
        reply: oneshot::Sender<Result<DeliveryAck, EntityError>>,
    },
    /// Nothing but activation: the entity loads, and handles what its durable inbox holds.
    Wake,
    /// From the shard's idle sweep: passivate if idle for `idle_timeout` with nothing waiting.
    Idle,
    /// From the shard's idle sweep: hibernate (give up the task, stay active) if nothing
    /// waits.
    Hibernate,
    /// Put dead letter `id` back into the durable inbox; the reply says whether it existed.
    Redrive {
        id: String,
        reply: oneshot::Sender<Result<bool, EntityError>>,
    },
    /// An info message (OTP's `handle_info`), such as a monitor's `DOWN`; no reply.
    Info { message: Value },
    /// Subscribe to the entity's committed turns: once everything before is durable, the
    /// reply carries the subscription and the state it starts from.
    Watch {
        reply: oneshot::Sender<Result<Subscription, EntityError>>,
    },
    /// Passivate. The reply says the entity was active (it always is, if it receives this).
    Stop {
        reply: Option<oneshot::Sender<bool>>,
    },
    /// Remove the entity and all its durable data; the reply says whether it had any.
    Delete {
        reply: oneshot::Sender<Result<bool, EntityError>>,
    },
    /// From the stored-reply sweep: durably forget the stored replies past their retention
    /// window, then passivate if nothing waits. The reply is how many were forgotten.
    ForgetExpiredReplies {
        reply: oneshot::Sender<Result<usize, EntityError>>,
    },
}

/// A request in a mailbox, with the instant after which nobody waits for its answer.
#[derive(Debug)]
pub struct Envelope {
    pub request: Request,
    pub deadline: Option<Instant>,
}

impl Envelope {
    /// Answers the request with an error without running it.
    pub fn fail(self, error: EntityError) {
        // A caller that gave up (dropped its receiver) needs no answer, so send errors are moot.
        match self.request {
            Request::Call { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Request::Delete { reply } => {
                let _ = reply.send(Err(error));
            }
            Request::ForgetExpiredReplies { reply } => {
                let _ = reply.send(Err(error));
            }
            Request::Stop { reply: Some(reply) } => {
                let _ = reply.send(false);
            }
            Request::Stop { reply: None } => {}
            Request::Watch { reply } => {
                let _ = reply.send(Err(error));
            }
            Request::DurableCast { reply, .. } | Request::Redrive { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Request::Deliver { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Request::Timer { name, .. } => {
                tracing::debug!(%error, timer = %name, "timer delivery dropped; it is retried")
            }
            Request::Cast { .. } => tracing::debug!(%error, "cast dropped"),
            Request::Wake | Request::Idle | Request::Hibernate => {}
            Request::Info { .. } => tracing::debug!(%error, "info message dropped"),
        }
    }

    /// Whether the caller's deadline has passed.
    pub fn expired(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}
