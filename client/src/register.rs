//! [`Register`]: typed calls to the built-in `register` behaviour, a single value with a
//! version number for compare-and-set.
//!
//! State: `{"value": V, "version": N}`, initially `null` and 0. Messages: `{"op":"get"}`,
//! `{"op":"set","value":V}` (version + 1), `{"op":"cas","expected_version":N,"value":V}`.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ClientError;
use crate::reply::parse;
use crate::Client;

/// The entity type of the built-in register.
pub const REGISTER_TYPE: &str = "register";

/// A handle on one `register` entity. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Register {
    client: Client,
    key: String,
}

/// A register's value and the version that wrote it (0: never written).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Versioned {
    /// The value (`null` before the first write).
    #[serde(default)]
    pub value: Value,
    /// The number of writes so far.
    pub version: u64,
}

/// The outcome of a compare-and-set on a register.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RegisterCas {
    /// Whether the expected version matched and the value was written.
    pub ok: bool,
    /// The value now held: the new one if `ok`, else the current one.
    #[serde(default)]
    pub value: Value,
    /// The version now held.
    pub version: u64,
}

impl Register {
    pub(crate) fn new(client: Client, key: String) -> Register {
        Register { client, key }
    }

    /// The entity key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Returns the value and its version.
    pub async fn get(&self) -> Result<Versioned, ClientError> {
        let reply = self.call(json!({"op": "get"})).await?;
        parse_versioned("get", reply)
    }

    /// Writes `value` unconditionally; returns it with its new version.
    pub async fn set(&self, value: impl Into<Value>) -> Result<Versioned, ClientError> {
        let reply = self
            .call(json!({"op": "set", "value": value.into()}))
            .await?;
        parse_versioned("set", reply)
    }

    /// Writes `value` only if the current version is `expected_version`.
    pub async fn cas(
        &self,
        expected_version: u64,
        value: impl Into<Value>,
    ) -> Result<RegisterCas, ClientError> {
        let message =
            json!({"op": "cas", "expected_version": expected_version, "value": value.into()});
        let reply = self.call(message).await?;
        parse_register_cas(reply)
    }

    async fn call(&self, message: Value) -> Result<Value, ClientError> {
        Ok(self
            .client
            .call(REGISTER_TYPE, &self.key, message)
            .await?
            .reply)
    }
}

/// Reads `{"value": V, "version": N}`, the reply to `get` and `set` and the state.
pub fn parse_versioned(op: &str, reply: Value) -> Result<Versioned, ClientError> {
    parse(&format!("{REGISTER_TYPE} {op}"), reply)
}

/// Reads `{"ok": bool, "value": V, "version": N}`, the reply to `cas`.
pub fn parse_register_cas(reply: Value) -> Result<RegisterCas, ClientError> {
    parse(&format!("{REGISTER_TYPE} cas"), reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_values_and_versions() {
        let v = parse_versioned("get", json!({"value": null, "version": 0})).unwrap();
        assert_eq!(
            v,
            Versioned {
                value: Value::Null,
                version: 0
            }
        );
        let v = parse_versioned("set", json!({"value": {"a": [1]}, "version": 3})).unwrap();
        assert_eq!(v.value, json!({"a": [1]}));
        assert_eq!(v.version, 3);
    }

    #[test]
    fn reads_cas_outcomes() {
        let won = parse_register_cas(json!({"ok": true, "value": "x", "version": 2})).unwrap();
        assert!(won.ok);
        assert_eq!(won.version, 2);
        let lost = parse_register_cas(json!({"ok": false, "value": "y", "version": 5})).unwrap();
        assert!(!lost.ok);
        assert_eq!(lost.value, json!("y"));
    }

    #[test]
    fn refuses_replies_without_a_version() {
        let err = parse_versioned("get", json!({"value": 1})).unwrap_err();
        assert!(err.to_string().contains("register get"), "{err}");
        assert!(err.to_string().contains("version"), "{err}");
        let err = parse_register_cas(json!({"value": 1, "version": -1})).unwrap_err();
        assert!(err.to_string().contains("register cas"), "{err}");
    }
}
