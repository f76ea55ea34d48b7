//! Conversion between `serde_json::Value` (the domain's JSON-like value) and
//! `google.protobuf.Value` (the wire's).
//!
//! Protobuf numbers are doubles. A double that holds an integer in the `i64` range becomes a
//! JSON integer, so counters and versions stay integers in the server; other finite doubles
//! stay floating point. NaN and infinities have no JSON form and are refused.

use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value as ProtoValue};
use serde_json::{Map, Number, Value as JsonValue};

/// Why a protobuf value could not become JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// A number was NaN or infinite.
    #[error("number {0} is not finite; JSON numbers must be finite")]
    NonFiniteNumber(String),
    /// Lists and structs nest deeper than [`MAX_DEPTH`].
    #[error("value nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

/// The deepest nesting of lists and structs accepted from the wire.
pub const MAX_DEPTH: usize = 64;

/// Converts a protobuf value into JSON. A value without a kind is `null`.
pub fn proto_to_json(value: ProtoValue) -> Result<JsonValue, ValueError> {
    proto_to_json_at(value, 0)
}

fn proto_to_json_at(value: ProtoValue, depth: usize) -> Result<JsonValue, ValueError> {
    if depth > MAX_DEPTH {
        return Err(ValueError::TooDeep);
    }
    Ok(match value.kind {
        None | Some(Kind::NullValue(_)) => JsonValue::Null,
        Some(Kind::BoolValue(b)) => JsonValue::Bool(b),
        Some(Kind::StringValue(s)) => JsonValue::String(s),
        Some(Kind::NumberValue(n)) => JsonValue::Number(number_from_f64(n)?),
        Some(Kind::ListValue(list)) => JsonValue::Array(
            list.values
                .into_iter()
                .map(|v| proto_to_json_at(v, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        Some(Kind::StructValue(s)) => JsonValue::Object(
            s.fields
                .into_iter()
                .map(|(k, v)| Ok((k, proto_to_json_at(v, depth + 1)?)))
                .collect::<Result<Map<_, _>, ValueError>>()?,
        ),
    })
}

/// Converts JSON into a protobuf value. Integers beyond 2^53 lose precision on the wire.
pub fn json_to_proto(value: JsonValue) -> ProtoValue {
    let kind = match value {
        JsonValue::Null => Kind::NullValue(0),
        JsonValue::Bool(b) => Kind::BoolValue(b),
        JsonValue::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        JsonValue::String(s) => Kind::StringValue(s),
        JsonValue::Array(items) => Kind::ListValue(ListValue {
            values: items.into_iter().map(json_to_proto).collect(),
        }),
        JsonValue::Object(map) => Kind::StructValue(Struct {
            fields: map
                .into_iter()
                .map(|(k, v)| (k, json_to_proto(v)))
                .collect(),
        }),
    };
    ProtoValue { kind: Some(kind) }
}

/// The JSON number for a double: an integer when it is one and fits `i64`.
fn number_from_f64(n: f64) -> Result<Number, ValueError> {
    // 2^63 as f64; every integral double strictly inside (-2^63, 2^63) converts exactly.
    const I64_BOUND: f64 = 9_223_372_036_854_775_808.0;
    if n.is_finite() && n.fract() == 0.0 && n > -I64_BOUND && n < I64_BOUND {
        return Ok(Number::from(n as i64));
    }
    Number::from_f64(n).ok_or_else(|| ValueError::NonFiniteNumber(n.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trips_json_documents() {
        let doc =
            json!({"op": "put", "n": 3, "f": 1.5, "neg": -7, "list": [true, null, "x"], "o": {}});
        assert_eq!(proto_to_json(json_to_proto(doc.clone())).unwrap(), doc);
    }

    #[test]
    fn integral_doubles_become_integers() {
        let v = proto_to_json(ProtoValue {
            kind: Some(Kind::NumberValue(42.0)),
        })
        .unwrap();
        assert!(v.is_i64());
        assert_eq!(v, json!(42));
    }

    #[test]
    fn non_finite_numbers_are_refused() {
        let err = proto_to_json(ProtoValue {
            kind: Some(Kind::NumberValue(f64::NAN)),
        })
        .unwrap_err();
        assert!(matches!(err, ValueError::NonFiniteNumber(_)));
    }

    #[test]
    fn missing_kind_is_null() {
        assert_eq!(
            proto_to_json(ProtoValue { kind: None }).unwrap(),
            JsonValue::Null
        );
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut v = json!(1);
        for _ in 0..(MAX_DEPTH + 2) {
            v = json!([v]);
        }
        assert_eq!(
            proto_to_json(json_to_proto(v)).unwrap_err(),
            ValueError::TooDeep
        );
    }
}
