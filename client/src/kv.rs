//! [`Kv`]: typed calls to the built-in `kv` behaviour, a map of fields with per-field
//! versions.
//!
//! State: `{"fields": {F: {"value": V, "version": N}}, "revision": R}`. A field's version is
//! the entity's revision when the field was written, so versions only grow. Messages:
//! `get`, `put`, `delete`, `cas` (expected version 0 means "must be absent") on a `field`,
//! and `fields` (the sorted field names).

use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ClientError;
use crate::reply::{expect_field, parse};
use crate::Client;

/// The entity type of the built-in kv map.
pub const KV_TYPE: &str = "kv";

/// A handle on one `kv` entity. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Kv {
    client: Client,
    key: String,
}

/// A field's value and the version that wrote it.
#[derive(Debug, Clone, PartialEq)]
pub struct KvField {
    /// The field's value.
    pub value: Value,
    /// The entity revision that wrote it.
    pub version: u64,
}

/// The outcome of a compare-and-set on a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCas {
    /// Whether the expected version matched and the value was written.
    pub ok: bool,
    /// The field's version now: the new one if `ok`, else the current one (0: absent).
    pub version: u64,
}

#[derive(Debug, Deserialize)]
struct GetReply {
    field: String,
    found: bool,
    #[serde(default)]
    value: Value,
    version: u64,
}

#[derive(Debug, Deserialize)]
struct PutReply {
    field: String,
    version: u64,
}

#[derive(Debug, Deserialize)]
struct DeleteReply {
    field: String,
    deleted: bool,
}

#[derive(Debug, Deserialize)]
struct CasReply {
    ok: bool,
    field: String,
    version: u64,
}

#[derive(Debug, Deserialize)]
struct FieldsReply {
    fields: Vec<String>,
}

impl Kv {
    pub(crate) fn new(client: Client, key: String) -> Kv {
        Kv { client, key }
    }

    /// The entity key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Returns the field's value and version, or `None` if the field is absent.
    pub async fn get(&self, field: &str) -> Result<Option<KvField>, ClientError> {
        let reply = self.call(json!({"op": "get", "field": field})).await?;
        parse_kv_get(field, reply)
    }

    /// Writes the field; returns its new version.
    pub async fn put(&self, field: &str, value: impl Into<Value>) -> Result<u64, ClientError> {
        let message = json!({"op": "put", "field": field, "value": value.into()});
        let reply = self.call(message).await?;
        parse_kv_put(field, reply)
    }

    /// Removes the field; returns whether it existed.
    pub async fn delete(&self, field: &str) -> Result<bool, ClientError> {
        let reply = self.call(json!({"op": "delete", "field": field})).await?;
        parse_kv_delete(field, reply)
    }

    /// Writes the field only if its version is `expected_version` (0: only if absent).
    pub async fn cas(
        &self,
        field: &str,
        expected_version: u64,
        value: impl Into<Value>,
    ) -> Result<KvCas, ClientError> {
        let message = json!({
            "op": "cas",
            "field": field,
            "expected_version": expected_version,
            "value": value.into(),
        });
        let reply = self.call(message).await?;
        parse_kv_cas(field, reply)
    }

    /// Returns the names of all fields, sorted.
    pub async fn fields(&self) -> Result<Vec<String>, ClientError> {
        let reply = self.call(json!({"op": "fields"})).await?;
        parse_kv_fields(reply)
    }

    async fn call(&self, message: Value) -> Result<Value, ClientError> {
        Ok(self.client.call(KV_TYPE, &self.key, message).await?.reply)
    }
}

/// Reads the reply to `get` on `field`.
pub fn parse_kv_get(field: &str, reply: Value) -> Result<Option<KvField>, ClientError> {
    let request = format!("{KV_TYPE} get {field:?}");
    let reply: GetReply = parse(&request, reply)?;
    expect_field(&request, field, &reply.field)?;
    Ok(reply.found.then_some(KvField {
        value: reply.value,
        version: reply.version,
    }))
}

/// Reads the reply to `put` on `field`: the new version.
pub fn parse_kv_put(field: &str, reply: Value) -> Result<u64, ClientError> {
    let request = format!("{KV_TYPE} put {field:?}");
    let reply: PutReply = parse(&request, reply)?;
    expect_field(&request, field, &reply.field)?;
    Ok(reply.version)
}

/// Reads the reply to `delete` on `field`: whether it existed.
pub fn parse_kv_delete(field: &str, reply: Value) -> Result<bool, ClientError> {
    let request = format!("{KV_TYPE} delete {field:?}");
    let reply: DeleteReply = parse(&request, reply)?;
    expect_field(&request, field, &reply.field)?;
    Ok(reply.deleted)
}

/// Reads the reply to `cas` on `field`.
pub fn parse_kv_cas(field: &str, reply: Value) -> Result<KvCas, ClientError> {
    let request = format!("{KV_TYPE} cas {field:?}");
    let reply: CasReply = parse(&request, reply)?;
    expect_field(&request, field, &reply.field)?;
    Ok(KvCas {
        ok: reply.ok,
        version: reply.version,
    })
}

/// Reads the reply to `fields`: the sorted field names.
pub fn parse_kv_fields(reply: Value) -> Result<Vec<String>, ClientError> {
    let reply: FieldsReply = parse(&format!("{KV_TYPE} fields"), reply)?;
    Ok(reply.fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_distinguishes_found_from_absent() {
        let found = parse_kv_get(
            "f",
            json!({"field": "f", "found": true, "value": [1], "version": 4}),
        )
        .unwrap();
        assert_eq!(
            found,
            Some(KvField {
                value: json!([1]),
                version: 4
            })
        );
        let absent = parse_kv_get(
            "f",
            json!({"field": "f", "found": false, "value": null, "version": 0}),
        )
        .unwrap();
        assert_eq!(absent, None);
    }

    #[test]
    fn put_delete_cas_and_fields_parse() {
        assert_eq!(
            parse_kv_put("f", json!({"field": "f", "version": 7})).unwrap(),
            7
        );
        assert!(parse_kv_delete("f", json!({"field": "f", "deleted": true})).unwrap());
        assert_eq!(
            parse_kv_cas("f", json!({"ok": false, "field": "f", "version": 3})).unwrap(),
            KvCas {
                ok: false,
                version: 3
            }
        );
        assert_eq!(
            parse_kv_fields(json!({"fields": ["a", "b"]})).unwrap(),
            vec!["a".to_owned(), "b".to_owned()]
        );
    }

    #[test]
    fn replies_about_another_field_are_refused() {
        let err = parse_kv_put("f", json!({"field": "g", "version": 1})).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal);
        assert!(err.to_string().contains("\"g\""), "{err}");
    }

    #[test]
    fn malformed_replies_are_refused() {
        assert!(parse_kv_get("f", json!({"field": "f"})).is_err());
        assert!(parse_kv_fields(json!({"fields": "a"})).is_err());
        assert!(parse_kv_delete("f", json!(null)).is_err());
    }
}
