//! The mapping between JSON values (messages, replies, events, states) and Lua values.
//!
//! **Owns**: both directions of the conversion and their rules; nothing else.
//! **Calls**: only mlua's value API.
//!
//! JSON → Lua:
//! - `null` → `nil` at the top and as an object field (the field is simply absent, so
//!   `msg.x == nil` holds whether `x` was `null` or missing); an array element `null` becomes
//!   the `null` sentinel global, so arrays keep their length and `ipairs` sees every element.
//! - booleans and strings as themselves; numbers become Lua numbers (doubles). An integer
//!   beyond ±2^53 has no exact double and is refused rather than silently rounded.
//! - an array becomes a sequence table `{[1]=…, [n]=…}` marked with the array metatable (the
//!   one `array()` sets), so an *empty* array comes back as `[]`.
//! - an object becomes a table with string keys.
//!
//! Lua → JSON:
//! - `nil` and the `null` sentinel → `null`, except that an object field set to `null` is
//!   left out, as on the way in: a null field and an absent one are the same thing, so a
//!   value converted back and forth does not change (an unchanged state is not an event).
//! - booleans as themselves.
//! - a number with no fraction and |n| ≤ 2^53 → a JSON integer; other finite numbers → a JSON
//!   float; NaN and ±infinity are refused (JSON has none).
//! - a string → a JSON string if it is valid UTF-8, refused otherwise.
//! - a table whose keys are exactly `1..n` → an array; a table whose keys are all strings →
//!   an object (keys sorted); an **empty table → `{}`** unless it carries the array
//!   metatable (`array()`, or it came from a JSON array), then `[]`. A table mixing both kinds
//!   of keys, with gaps, or with other keys (`3.5`, `true`) is refused.
//! - functions, coroutines, userdata, buffers and vectors are refused.
//! - nesting deeper than [`DEPTH_MAX`] is refused both ways; it also stops a table that
//!   contains itself.
//!
//! Every refusal names where in the value it happened, e.g. `state.items[2].price`.

use std::ffi::c_void;
use std::fmt;

use mlua::{Lua, Table, Value as LuaValue};
use serde_json::{Map, Number};

use crate::behaviour::Value;

/// The deepest nesting accepted, as the wire's `google.protobuf.Value` conversion allows.
pub const DEPTH_MAX: usize = 64;

/// The largest integer magnitude a Lua number (a double) holds exactly.
pub const EXACT_INTEGER_MAX: i64 = 1 << 53;

/// A value that cannot cross the JSON ↔ Lua boundary, and where in it the problem is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ConvertError {
    /// Path segments from the innermost outwards, pushed while the recursion unwinds.
    path_reversed: Vec<String>,
    problem: String,
}

impl ConvertError {
    fn new(problem: impl Into<String>) -> Self {
        ConvertError {
            path_reversed: Vec::new(),
            problem: problem.into(),
        }
    }

    fn at(mut self, segment: String) -> Self {
        self.path_reversed.push(segment);
        self
    }

    /// The message, with the path rooted at `root` (e.g. `state`).
    pub(super) fn describe(&self, root: &str) -> String {
        let mut path = root.to_owned();
        for segment in self.path_reversed.iter().rev() {
            path.push_str(segment);
        }
        format!("{path}: {}", self.problem)
    }
}

/// Why a JSON value could not become a Lua value: its content, or the VM (out of memory).
#[derive(Debug)]
pub(super) enum ToLuaError {
    Value(ConvertError),
    Lua(mlua::Error),
}

impl From<mlua::Error> for ToLuaError {
    fn from(error: mlua::Error) -> Self {
        ToLuaError::Lua(error)
    }
}

impl fmt::Display for ToLuaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ToLuaError::Value(e) => f.write_str(&e.describe("value")),
            ToLuaError::Lua(e) => write!(f, "{e}"),
        }
    }
}

/// What JSON → Lua needs from the VM: the array metatable and whether tables come frozen.
pub(super) struct ToLua<'a> {
    pub(super) lua: &'a Lua,
    pub(super) array_metatable: &'a Table,
    /// Make every table read-only (Luau's `table.freeze`), so a handler cannot change the
    /// state it was given in place.
    pub(super) freeze: bool,
}

impl ToLua<'_> {
    /// Converts a JSON value to a Lua value.
    pub(super) fn convert(&self, value: &Value) -> Result<LuaValue, ToLuaError> {
        self.convert_at(value, 0)
    }

    fn convert_at(&self, value: &Value, depth: usize) -> Result<LuaValue, ToLuaError> {
        Ok(match value {
            Value::Null => LuaValue::Nil,
            Value::Bool(b) => LuaValue::Boolean(*b),
            Value::Number(n) => LuaValue::Number(number_to_lua(n).map_err(ToLuaError::Value)?),
            Value::String(s) => LuaValue::String(self.lua.create_string(s)?),
            Value::Array(items) => {
                let table = self.nested(depth, items.len(), 0)?;
                for (index, item) in items.iter().enumerate() {
                    let element = match item {
                        Value::Null => LuaValue::NULL,
                        item => self
                            .convert_at(item, depth + 1)
                            .map_err(|e| at(e, format!("[{}]", index + 1)))?,
                    };
                    table.raw_set(index + 1, element)?;
                }
                table.set_metatable(Some(self.array_metatable.clone()))?;
                self.finish(table)
            }
            Value::Object(fields) => {
                let table = self.nested(depth, 0, fields.len())?;
                for (key, field) in fields {
                    if field.is_null() {
                        continue;
                    }
                    let field = self
                        .convert_at(field, depth + 1)
                        .map_err(|e| at(e, key_segment(key)))?;
                    table.raw_set(key.as_str(), field)?;
                }
                self.finish(table)
            }
        })
    }

    fn nested(&self, depth: usize, array: usize, record: usize) -> Result<Table, ToLuaError> {
        if depth >= DEPTH_MAX {
            return Err(ToLuaError::Value(too_deep()));
        }
        Ok(self.lua.create_table_with_capacity(array, record)?)
    }

    fn finish(&self, table: Table) -> LuaValue {
        if self.freeze {
            table.set_readonly(true);
        }
        LuaValue::Table(table)
    }
}

fn at(error: ToLuaError, segment: String) -> ToLuaError {
    match error {
        ToLuaError::Value(e) => ToLuaError::Value(e.at(segment)),
        lua => lua,
    }
}

fn number_to_lua(n: &Number) -> Result<f64, ConvertError> {
    if let Some(i) = n.as_i64() {
        if i.unsigned_abs() > EXACT_INTEGER_MAX.unsigned_abs() {
            return Err(inexact(&i.to_string()));
        }
        // Exact: |i| ≤ 2^53.
        return Ok(i as f64);
    }
    if let Some(u) = n.as_u64() {
        // Only integers above i64::MAX reach here.
        return Err(inexact(&u.to_string()));
    }
    n.as_f64()
        .ok_or_else(|| ConvertError::new(format!("number {n} is not representable")))
}

fn inexact(n: &str) -> ConvertError {
    ConvertError::new(format!(
        "integer {n} has no exact Lua number (integers must be within ±2^53); send it as a string"
    ))
}

fn too_deep() -> ConvertError {
    ConvertError::new(format!(
        "nested deeper than {DEPTH_MAX} levels (or a table contains itself)"
    ))
}

/// `.name` for identifier-like keys, `["some key"]` otherwise.
fn key_segment(key: &str) -> String {
    let identifier = key
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if identifier {
        format!(".{key}")
    } else {
        format!("[{key:?}]")
    }
}

/// Converts a Lua value to JSON. `array_metatable` identifies tables marked as arrays.
pub(super) fn to_json(
    value: &LuaValue,
    array_metatable: *const c_void,
) -> Result<Value, ConvertError> {
    to_json_at(value, array_metatable, 0)
}

fn to_json_at(
    value: &LuaValue,
    array_metatable: *const c_void,
    depth: usize,
) -> Result<Value, ConvertError> {
    match value {
        LuaValue::Nil => Ok(Value::Null),
        LuaValue::LightUserData(p) if p.0.is_null() => Ok(Value::Null),
        LuaValue::Boolean(b) => Ok(Value::Bool(*b)),
        LuaValue::Integer(i) => Ok(float_to_json(*i as f64)?),
        LuaValue::Number(n) => float_to_json(*n),
        LuaValue::String(s) => match s.to_str() {
            Ok(s) => Ok(Value::String(s.to_owned())),
            Err(_) => Err(ConvertError::new(
                "string is not valid UTF-8; binary data must be encoded (e.g. as hex) first",
            )),
        },
        LuaValue::Table(table) => table_to_json(table, array_metatable, depth),
        other => Err(ConvertError::new(format!(
            "a {} cannot be stored in a JSON value",
            other.type_name()
        ))),
    }
}

fn float_to_json(n: f64) -> Result<Value, ConvertError> {
    if !n.is_finite() {
        return Err(ConvertError::new(format!(
            "{n} is not a JSON number (NaN and infinities cannot be stored)"
        )));
    }
    if n.fract() == 0.0 && n.abs() <= EXACT_INTEGER_MAX as f64 {
        // Exact: integral and within ±2^53.
        return Ok(Value::Number(Number::from(n as i64)));
    }
    Number::from_f64(n)
        .map(Value::Number)
        .ok_or_else(|| ConvertError::new(format!("{n} is not a JSON number")))
}

fn table_to_json(
    table: &Table,
    array_metatable: *const c_void,
    depth: usize,
) -> Result<Value, ConvertError> {
    if depth >= DEPTH_MAX {
        return Err(too_deep());
    }
    let marked_array = table
        .metatable()
        .is_some_and(|mt| mt.to_pointer() == array_metatable);
    let mut entries = Vec::new();
    for pair in table.pairs::<LuaValue, LuaValue>() {
        let pair = pair.map_err(|e| ConvertError::new(format!("cannot read table: {e}")))?;
        entries.push(pair);
    }
    if entries.is_empty() {
        return Ok(if marked_array {
            Value::Array(Vec::new())
        } else {
            Value::Object(Map::new())
        });
    }
    let count = entries.len();
    let all_strings = entries
        .iter()
        .all(|(key, _)| matches!(key, LuaValue::String(_)));
    if all_strings && !marked_array {
        let mut object = Map::new();
        for (key, field) in &entries {
            let LuaValue::String(key) = key else {
                continue;
            };
            let key = key.to_str().map_err(|_| {
                ConvertError::new("a table key is not valid UTF-8; keys must be text")
            })?;
            if is_null(field) {
                continue;
            }
            let key = key.to_owned();
            let field = to_json_at(field, array_metatable, depth + 1)
                .map_err(|e| e.at(key_segment(&key)))?;
            object.insert(key, field);
        }
        return Ok(Value::Object(object));
    }
    let mut items = vec![Value::Null; count];
    for (key, item) in &entries {
        let Some(index) = array_index(key, count) else {
            return Err(ConvertError::new(bad_key_problem(key, count, all_strings)));
        };
        items[index - 1] =
            to_json_at(item, array_metatable, depth + 1).map_err(|e| e.at(format!("[{index}]")))?;
    }
    Ok(Value::Array(items))
}

/// Whether a table value is the `null` sentinel.
fn is_null(value: &LuaValue) -> bool {
    matches!(value, LuaValue::LightUserData(p) if p.0.is_null())
}

/// The key's position if it is an integer in `1..=count`. With `count` distinct keys all in
/// that range, the table is exactly the sequence `1..=count`.
fn array_index(key: &LuaValue, count: usize) -> Option<usize> {
    let n = match key {
        LuaValue::Integer(i) => *i as f64,
        LuaValue::Number(n) => *n,
        _ => return None,
    };
    if n.fract() != 0.0 || n < 1.0 || n > count as f64 {
        return None;
    }
    Some(n as usize)
}

fn bad_key_problem(key: &LuaValue, count: usize, all_strings: bool) -> String {
    match key {
        LuaValue::String(s) if all_strings => format!(
            "an array() table has the string key {:?}; arrays may only have keys 1..n",
            s.to_string_lossy()
        ),
        LuaValue::String(s) => format!(
            "table mixes array elements and the string key {:?}; use either keys 1..n (an \
             array) or string keys (an object)",
            s.to_string_lossy()
        ),
        LuaValue::Integer(_) | LuaValue::Number(_) => format!(
            "table key {} breaks the sequence 1..{count}: an array must have no gaps, and an \
             object needs string keys (use tostring)",
            display_number(key)
        ),
        other => format!(
            "a {} cannot be a key; object keys must be strings",
            other.type_name()
        ),
    }
}

fn display_number(key: &LuaValue) -> String {
    match key {
        LuaValue::Integer(i) => i.to_string(),
        LuaValue::Number(n) => n.to_string(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A bare VM with an array metatable, enough to exercise the mapping.
    fn vm() -> (Lua, Table) {
        let lua = Lua::new();
        let array_metatable = lua.create_table().unwrap();
        (lua, array_metatable)
    }

    fn round_trip(value: Value) -> Value {
        let (lua, mt) = vm();
        let to_lua = ToLua {
            lua: &lua,
            array_metatable: &mt,
            freeze: false,
        };
        let lua_value = to_lua.convert(&value).unwrap();
        to_json(&lua_value, mt.to_pointer()).unwrap()
    }

    fn eval(source: &str) -> Result<Value, String> {
        let (lua, mt) = vm();
        lua.globals().set("array_mt", mt.clone()).unwrap();
        let value: LuaValue = lua.load(source).eval().unwrap();
        to_json(&value, mt.to_pointer()).map_err(|e| e.describe("value"))
    }

    #[test]
    fn json_values_survive_a_round_trip() {
        for value in [
            json!(null),
            json!(true),
            json!(0),
            json!(-7),
            json!(1.5),
            json!(9007199254740992_i64),
            json!("héllo"),
            json!([]),
            json!({}),
            json!([1, "two", [3], {"four": 4}]),
            json!({"items": [], "meta": {}, "total": 12.25, "tags": ["a", "b"]}),
        ] {
            assert_eq!(round_trip(value.clone()), value);
        }
    }

    #[test]
    fn null_in_an_array_is_kept_and_in_an_object_is_dropped() {
        assert_eq!(round_trip(json!([1, null, 3])), json!([1, null, 3]));
        assert_eq!(round_trip(json!({"a": null, "b": 1})), json!({"b": 1}));
        let (lua, mt) = vm();
        let value: LuaValue = lua
            .load("local null = ... return {a = null, b = {null, 2}}")
            .call(LuaValue::NULL)
            .unwrap();
        assert_eq!(
            to_json(&value, mt.to_pointer()),
            Ok(json!({"b": [null, 2]}))
        );
    }

    #[test]
    fn empty_table_is_an_object_unless_marked_as_array() {
        assert_eq!(eval("return {}"), Ok(json!({})));
        assert_eq!(eval("return setmetatable({}, array_mt)"), Ok(json!([])));
        assert_eq!(eval("return {1, 2, 3}"), Ok(json!([1, 2, 3])));
        assert_eq!(eval("return {b = 1, a = {}}"), Ok(json!({"a": {}, "b": 1})));
    }

    #[test]
    fn numbers_map_to_integers_when_integral() {
        assert_eq!(eval("return 3"), Ok(json!(3)));
        assert_eq!(eval("return 3.0"), Ok(json!(3)));
        assert_eq!(eval("return 0.25"), Ok(json!(0.25)));
        assert_eq!(eval("return 2^60"), Ok(json!(2f64.powi(60))));
        assert!(eval("return 0/0").unwrap_err().contains("NaN"));
        assert!(eval("return math.huge").unwrap_err().contains("inf"));
    }

    #[test]
    fn large_integers_are_refused_on_the_way_in() {
        let (lua, mt) = vm();
        let to_lua = ToLua {
            lua: &lua,
            array_metatable: &mt,
            freeze: false,
        };
        let error = to_lua
            .convert(&json!({"n": [9007199254740993_i64]}))
            .unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("value.n[1]: integer 9007199254740993"),
            "{error}"
        );
        assert!(to_lua.convert(&json!(u64::MAX)).is_err());
    }

    #[test]
    fn refusals_name_the_path() {
        assert_eq!(
            eval("return {items = {{price = function() end}}}"),
            Err("value.items[1].price: a function cannot be stored in a JSON value".into())
        );
        assert!(eval("return {1, 2, x = 3}")
            .unwrap_err()
            .contains("mixes array elements"));
        assert!(eval("return {[1] = 1, [3] = 3}")
            .unwrap_err()
            .contains("breaks the sequence"));
        assert!(eval("return {[true] = 1}")
            .unwrap_err()
            .contains("cannot be a key"));
        assert!(eval("local t = {}; t.self = t; return t")
            .unwrap_err()
            .contains("nested deeper"));
        assert!(eval("return {[\"a b\"] = coroutine.create(print)}")
            .unwrap_err()
            .starts_with("value[\"a b\"]: a thread"));
    }

    #[test]
    fn frozen_tables_refuse_writes() {
        let (lua, mt) = vm();
        let to_lua = ToLua {
            lua: &lua,
            array_metatable: &mt,
            freeze: true,
        };
        let state = to_lua.convert(&json!({"items": {"a": 1}})).unwrap();
        let write: mlua::Function = lua
            .load("return function(s) s.items.a = 2 end")
            .eval()
            .unwrap();
        let error = write.call::<()>(state).unwrap_err().to_string();
        assert!(error.contains("readonly"), "{error}");
    }

    #[test]
    fn too_deep_json_is_refused() {
        let mut value = json!(1);
        for _ in 0..=DEPTH_MAX {
            value = json!([value]);
        }
        let (lua, mt) = vm();
        let to_lua = ToLua {
            lua: &lua,
            array_metatable: &mt,
            freeze: false,
        };
        assert!(to_lua
            .convert(&value)
            .unwrap_err()
            .to_string()
            .contains("nested deeper"));
    }
}
