//! [`Counter`]: typed calls to the built-in `counter` behaviour.
//!
//! Messages: `{"op":"incr","by":N}` (by defaults to 1), `{"op":"decr","by":N}`, `{"op":"get"}`,
//! `{"op":"reset"}`. Every reply, and the state, is `{"value": N}` with an integer `N`.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ClientError;
use crate::reply::parse;
use crate::Client;

/// The entity type of the built-in counter.
pub const COUNTER_TYPE: &str = "counter";

/// A handle on one `counter` entity. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Counter {
    client: Client,
    key: String,
}

/// Every reply of a counter, and its state.
#[derive(Debug, Deserialize)]
struct CounterReply {
    value: i64,
}

impl Counter {
    pub(crate) fn new(client: Client, key: String) -> Counter {
        Counter { client, key }
    }

    /// The entity key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Adds `by` and returns the new value.
    pub async fn incr(&self, by: i64) -> Result<i64, ClientError> {
        self.op("incr", json!({"op": "incr", "by": by})).await
    }

    /// Subtracts `by` and returns the new value.
    pub async fn decr(&self, by: i64) -> Result<i64, ClientError> {
        self.op("decr", json!({"op": "decr", "by": by})).await
    }

    /// Returns the current value (through the entity's mailbox, after earlier messages).
    pub async fn get(&self) -> Result<i64, ClientError> {
        self.op("get", json!({"op": "get"})).await
    }

    /// Sets the value to 0 and returns it.
    pub async fn reset(&self) -> Result<i64, ClientError> {
        self.op("reset", json!({"op": "reset"})).await
    }

    async fn op(&self, op: &str, message: Value) -> Result<i64, ClientError> {
        let outcome = self.client.call(COUNTER_TYPE, &self.key, message).await?;
        parse_counter_reply(op, outcome.reply)
    }
}

/// Reads `{"value": N}`, the reply to every counter op and its state.
pub fn parse_counter_reply(op: &str, reply: Value) -> Result<i64, ClientError> {
    let reply: CounterReply = parse(&format!("{COUNTER_TYPE} {op}"), reply)?;
    Ok(reply.value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_integer_values() {
        assert_eq!(
            parse_counter_reply("incr", json!({"value": 42})).unwrap(),
            42
        );
        assert_eq!(
            parse_counter_reply("decr", json!({"value": -3})).unwrap(),
            -3
        );
    }

    #[test]
    fn refuses_replies_without_an_integer_value() {
        for reply in [
            json!({}),
            json!({"value": 1.5}),
            json!({"value": "1"}),
            json!(7),
        ] {
            let err = parse_counter_reply("get", reply.clone()).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Internal);
            assert!(err.to_string().contains("counter get"), "{err}");
            assert!(
                matches!(&err, ClientError::UnexpectedReply { reply: r, .. } if *r == reply),
                "{err:?}"
            );
        }
    }
}
