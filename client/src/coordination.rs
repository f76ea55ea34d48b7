//! Typed calls to the coordination built-ins: [`Queue`] (`queue`), [`Lease`] (`lease`) and
//! [`RateLimiter`] (`rate_limiter`). Their messages and replies are in the README's
//! "Built-in entity types"; these handles only shape them into Rust types.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ClientError;
use crate::reply::parse;
use crate::Client;

/// The entity type of the built-in queue.
pub const QUEUE_TYPE: &str = "queue";
/// The entity type of the built-in lease.
pub const LEASE_TYPE: &str = "lease";
/// The entity type of the built-in rate limiter.
pub const RATE_LIMITER_TYPE: &str = "rate_limiter";

async fn call<T: for<'de> Deserialize<'de>>(
    client: &Client,
    entity_type: &str,
    key: &str,
    op: &str,
    message: Value,
) -> Result<T, ClientError> {
    let outcome = client.call(entity_type, key, message).await?;
    parse(&format!("{entity_type} {op}"), outcome.reply)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A handle on one `queue` entity. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Queue {
    client: Client,
    key: String,
}

/// An item taken from (or looked at in) a queue.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct QueueItem {
    pub id: u64,
    pub item: Value,
    /// With a visibility timeout: when the item goes back to the queue unless acked (Unix ms).
    pub deadline_ms: Option<u64>,
}

#[derive(Deserialize)]
struct MaybeItem {
    item: Value,
    id: Option<u64>,
    deadline_ms: Option<u64>,
}

impl MaybeItem {
    fn into_item(self) -> Option<QueueItem> {
        let id = self.id?;
        Some(QueueItem {
            id,
            item: self.item,
            deadline_ms: self.deadline_ms,
        })
    }
}

/// How many items wait and how many are in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct QueueLength {
    pub length: u64,
    pub in_flight: u64,
}

impl Queue {
    pub(crate) fn new(client: Client, key: String) -> Queue {
        Queue { client, key }
    }

    /// Appends `item`; returns its id.
    pub async fn push(&self, item: Value) -> Result<u64, ClientError> {
        #[derive(Deserialize)]
        struct Pushed {
            id: u64,
        }
        let pushed: Pushed = self.op("push", json!({"op": "push", "item": item})).await?;
        Ok(pushed.id)
    }

    /// Takes the oldest item. With a visibility timeout it stays in flight until acked, and
    /// goes back to the head of the queue if it is not acked in time.
    pub async fn pop(
        &self,
        visibility: Option<Duration>,
    ) -> Result<Option<QueueItem>, ClientError> {
        let message = match visibility {
            Some(visibility) => json!({"op": "pop", "visibility_ms": millis(visibility)}),
            None => json!({"op": "pop"}),
        };
        let popped: MaybeItem = self.op("pop", message).await?;
        Ok(popped.into_item())
    }

    /// The oldest item, left in place.
    pub async fn peek(&self) -> Result<Option<QueueItem>, ClientError> {
        let peeked: MaybeItem = self.op("peek", json!({"op": "peek"})).await?;
        Ok(peeked.into_item())
    }

    /// Removes an in-flight item; false if it is not in flight (acked, or back in the queue).
    pub async fn ack(&self, id: u64) -> Result<bool, ClientError> {
        #[derive(Deserialize)]
        struct Acked {
            acked: bool,
        }
        let acked: Acked = self.op("ack", json!({"op": "ack", "id": id})).await?;
        Ok(acked.acked)
    }

    /// Puts an in-flight item back at the head now; false if it is not in flight.
    pub async fn nack(&self, id: u64) -> Result<bool, ClientError> {
        #[derive(Deserialize)]
        struct Nacked {
            nacked: bool,
        }
        let nacked: Nacked = self.op("nack", json!({"op": "nack", "id": id})).await?;
        Ok(nacked.nacked)
    }

    /// Items waiting and in flight.
    pub async fn length(&self) -> Result<QueueLength, ClientError> {
        self.op("length", json!({"op": "length"})).await
    }

    async fn op<T: for<'de> Deserialize<'de>>(
        &self,
        op: &str,
        message: Value,
    ) -> Result<T, ClientError> {
        call(&self.client, QUEUE_TYPE, &self.key, op, message).await
    }
}

/// A handle on one `lease` entity. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Lease {
    client: Client,
    key: String,
}

/// The answer to an acquire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// Held by the caller: `token` is larger than any earlier grant's (fencing).
    Granted { token: u64, expires_at_ms: u64 },
    /// Held by someone else until `expires_at_ms` (Unix ms).
    Held { holder: String, expires_at_ms: u64 },
}

/// A lease's state.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct LeaseState {
    pub holder: Option<String>,
    pub token: Option<u64>,
    pub expires_at_ms: Option<u64>,
    /// The last token ever granted (0: never).
    pub last_token: u64,
}

impl Lease {
    pub(crate) fn new(client: Client, key: String) -> Lease {
        Lease { client, key }
    }

    /// Acquires the lease for `holder` for `ttl` (the same holder again renews it, keeping
    /// its token).
    pub async fn acquire(&self, holder: &str, ttl: Duration) -> Result<Acquired, ClientError> {
        #[derive(Deserialize)]
        struct Reply {
            acquired: bool,
            token: Option<u64>,
            holder: String,
            expires_at_ms: u64,
        }
        let message = json!({"op": "acquire", "holder": holder, "ttl_ms": millis(ttl)});
        let reply: Reply = self.op("acquire", message.clone()).await?;
        match (reply.acquired, reply.token) {
            (true, Some(token)) => Ok(Acquired::Granted {
                token,
                expires_at_ms: reply.expires_at_ms,
            }),
            (false, _) => Ok(Acquired::Held {
                holder: reply.holder,
                expires_at_ms: reply.expires_at_ms,
            }),
            (true, None) => Err(ClientError::UnexpectedReply {
                request: format!("{LEASE_TYPE} acquire"),
                reason: "a granted lease without a token".into(),
                reply: message,
            }),
        }
    }

    /// Extends the caller's lease by `ttl` from now; `Err(reason)` inside `Ok` when it is not
    /// the caller's (any more).
    pub async fn renew(
        &self,
        holder: &str,
        token: u64,
        ttl: Duration,
    ) -> Result<Result<u64, String>, ClientError> {
        #[derive(Deserialize)]
        struct Reply {
            renewed: bool,
            expires_at_ms: Option<u64>,
            reason: Option<String>,
        }
        let message =
            json!({"op": "renew", "holder": holder, "token": token, "ttl_ms": millis(ttl)});
        let reply: Reply = self.op("renew", message).await?;
        Ok(match (reply.renewed, reply.expires_at_ms) {
            (true, Some(expires_at_ms)) => Ok(expires_at_ms),
            _ => Err(reply.reason.unwrap_or_else(|| "not renewed".into())),
        })
    }

    /// Releases the caller's lease; false if it was not the caller's.
    pub async fn release(&self, holder: &str, token: u64) -> Result<bool, ClientError> {
        #[derive(Deserialize)]
        struct Reply {
            released: bool,
        }
        let message = json!({"op": "release", "holder": holder, "token": token});
        let reply: Reply = self.op("release", message).await?;
        Ok(reply.released)
    }

    /// Who holds it, until when, and the last token granted.
    pub async fn get(&self) -> Result<LeaseState, ClientError> {
        self.op("get", json!({"op": "get"})).await
    }

    async fn op<T: for<'de> Deserialize<'de>>(
        &self,
        op: &str,
        message: Value,
    ) -> Result<T, ClientError> {
        call(&self.client, LEASE_TYPE, &self.key, op, message).await
    }
}

/// A handle on one `rate_limiter` entity. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    client: Client,
    key: String,
}

/// A rate limiter's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct RateDecision {
    pub allowed: bool,
    /// Whole tokens left.
    pub remaining: u64,
    /// When denied, how long until the cost is available.
    pub retry_after_ms: u64,
}

impl RateLimiter {
    pub(crate) fn new(client: Client, key: String) -> RateLimiter {
        RateLimiter { client, key }
    }

    /// Takes `cost` tokens from a bucket of `burst` refilled at `rate_per_sec` (the settings
    /// are recorded; a change applies from now).
    pub async fn acquire(
        &self,
        cost: u64,
        rate_per_sec: f64,
        burst: u64,
    ) -> Result<RateDecision, ClientError> {
        let message =
            json!({"op": "acquire", "cost": cost, "rate_per_sec": rate_per_sec, "burst": burst});
        call(
            &self.client,
            RATE_LIMITER_TYPE,
            &self.key,
            "acquire",
            message,
        )
        .await
    }
}

impl Client {
    /// A typed handle on the built-in `queue` entity `key`.
    pub fn queue(&self, key: impl Into<String>) -> Queue {
        Queue::new(self.clone(), key.into())
    }

    /// A typed handle on the built-in `lease` entity `key`.
    pub fn lease(&self, key: impl Into<String>) -> Lease {
        Lease::new(self.clone(), key.into())
    }

    /// A typed handle on the built-in `rate_limiter` entity `key`.
    pub fn rate_limiter(&self, key: impl Into<String>) -> RateLimiter {
        RateLimiter::new(self.clone(), key.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_full_pops_read_as_options() {
        let empty: MaybeItem = serde_json::from_value(json!({"item": null})).unwrap();
        assert_eq!(empty.into_item(), None);
        let full: MaybeItem =
            serde_json::from_value(json!({"item": "a", "id": 3, "deadline_ms": 9})).unwrap();
        assert_eq!(
            full.into_item(),
            Some(QueueItem {
                id: 3,
                item: json!("a"),
                deadline_ms: Some(9)
            })
        );
    }

    #[test]
    fn durations_become_milliseconds() {
        assert_eq!(millis(Duration::from_millis(1500)), 1500);
        assert_eq!(millis(Duration::MAX), u64::MAX);
    }
}
