//! One sandboxed Luau VM with a script loaded, and the guarded way to call into it.
//!
//! **Owns**: building a VM (sandbox, prelude, limits, the script's top level, the check of its
//! functions), the `ctx` functions and the per-turn log they write to, and [`Vm::call`], the
//! single path by which Rust runs script code: metered, refusals told apart from crashes,
//! broken limits named, a VM that broke one marked poisoned so the pool drops it.
//! **Calls**: [`super::convert`] and [`super::limits`] only.
//!
//! The sandbox: Luau's sandbox mode (read-only libraries and globals, a fresh global table
//! per script) over a VM that has only `coroutine`, `table`, `string`, `utf8`, `bit32`,
//! `math` and an `os` cut down to `clock` and `time`. There is no `io`, `debug`, `require`,
//! `load`/`loadstring` (so no bytecode can be loaded), `getfenv`/`setfenv`, `collectgarbage`
//! or `newproxy`. `print` goes to the server's log at debug level. After the script's top
//! level has run, its globals are frozen: a handler cannot keep state in a global.

use std::sync::Arc;

use mlua::{
    ChunkMode, Function, IntoLuaMulti, Lua, LuaOptions, MultiValue, StdLib, Table,
    Value as LuaValue, VmState,
};
use parking_lot::Mutex;

use super::convert::{self, ToLua, ToLuaError};
use super::error::LuaError;
use super::limits::{LuaLimits, Meter, Tripped};
use crate::address::EntityId;
use crate::behaviour::{Effect, TimerDue, Value, TIMER_NAME_BYTES_MAX};

/// The most events one turn may emit.
pub const EVENTS_PER_TURN_MAX: usize = 1024;
/// The most effects (monitors, timers, sends, requests) one turn may ask for.
pub const EFFECTS_PER_TURN_MAX: usize = 1024;
/// The longest line `print` logs; longer ones are cut.
const PRINT_BYTES_MAX: usize = 4096;

/// Trusted Lua run before the sandbox closes: defines `print` and `array`, and returns the
/// runner every call goes through. The runner calls the script function under `pcall` and
/// tags the outcome: `"ok", results…`, `"invalid", reason` for `error({invalid = reason})`,
/// or `"memory"` when the VM ran out of memory; any other error is raised again unchanged, so
/// Rust sees the original error object.
const PRELUDE: &str = r##"
local log, array_metatable = ...
local pcall, error, type, rawget, tostring, select, setmetatable =
    pcall, error, type, rawget, tostring, select, setmetatable
local concat = table.concat

function print(...)
    local parts = {}
    for i = 1, select("#", ...) do
        parts[i] = tostring((select(i, ...)))
    end
    log(concat(parts, "\t"))
end

function array(t)
    if t == nil then
        t = {}
    elseif type(t) ~= "table" then
        error("array() expects a table or nothing, got a " .. type(t), 2)
    end
    return setmetatable(t, array_metatable)
end

local function finish(ok, ...)
    if ok then
        return "ok", ...
    end
    local e = ...
    if e == "not enough memory" then
        -- Luau's out-of-memory message. Raising it again could itself fail for want of
        -- memory and lose the message, so it is reported as a tag.
        return "memory"
    end
    if type(e) == "table" then
        local reason = rawget(e, "invalid")
        if reason ~= nil then
            return "invalid", tostring(reason)
        end
        error("the script raised a table without an `invalid` field (to refuse a message, use error({invalid = \"reason\"}))", 0)
    end
    error(e, 0)
end

return function(f, ...)
    return finish(pcall(f, ...))
end
"##;

/// A compiled script and the bounds it runs under: what every VM of a behaviour loads.
#[derive(Debug)]
pub(super) struct Script {
    pub(super) type_name: String,
    pub(super) version: u32,
    pub(super) source: String,
    /// Luau bytecode compiled by the engine from `source` (never bytecode from outside).
    pub(super) bytecode: Vec<u8>,
    pub(super) limits: LuaLimits,
}

/// The script's entry points, checked when the VM is built.
pub(super) struct Functions {
    pub(super) init: Function,
    pub(super) handle_call: Function,
    pub(super) handle_cast: Option<Function>,
    pub(super) handle_info: Option<Function>,
    pub(super) apply: Option<Function>,
    pub(super) migrate: Option<Function>,
}

/// What `ctx.emit` and the effect functions of `ctx` recorded during one handler call.
#[derive(Debug, Default)]
pub(super) struct TurnLog {
    /// Whether a handler is running; `ctx` functions refuse outside one.
    open: bool,
    /// Whether `ctx.emit` is allowed: only scripts with `apply` emit events.
    emit_allowed: bool,
    pub(super) events: Vec<Value>,
    pub(super) effects: Vec<Effect>,
}

/// How a script call ended, when it did not crash.
pub(super) enum Outcome {
    /// The function returned these values.
    Returned(Vec<LuaValue>),
    /// The function refused with `error({invalid = reason})`.
    Refused(String),
}

/// How a script call crashed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum CallError {
    /// A limit was broken; the message names it. The VM is poisoned.
    Limit(String),
    /// Any other error, with Lua's message.
    Failed(String),
}

impl CallError {
    pub(super) fn message(self) -> String {
        match self {
            CallError::Limit(m) | CallError::Failed(m) => m,
        }
    }
}

/// One VM with the script loaded. Used by one thread at a time (the pool hands it out).
pub(super) struct Vm {
    script: Arc<Script>,
    // Declared before `lua` so the handles are released before the VM itself.
    pub(super) functions: Functions,
    runner: Function,
    array_metatable: Table,
    ctx_functions: CtxFunctions,
    meter: Arc<Meter>,
    turn_log: Arc<Mutex<TurnLog>>,
    /// Set when a call broke a limit: the VM may hold garbage near the memory limit or be
    /// mid-way through something; the pool drops it instead of reusing it.
    pub(super) poisoned: bool,
    lua: Lua,
}

impl Vm {
    /// Builds a sandboxed VM and runs the script's top level in it.
    pub(super) fn new(script: Arc<Script>) -> Result<Vm, LuaError> {
        let vm_error = |e: mlua::Error| LuaError::Vm(e.to_string());
        let libs = StdLib::COROUTINE
            | StdLib::TABLE
            | StdLib::OS
            | StdLib::STRING
            | StdLib::UTF8
            | StdLib::BIT
            | StdLib::MATH;
        // A Rust panic in a callback must unwind through a script's pcall, not be caught by it.
        let lua =
            Lua::new_with(libs, LuaOptions::new().catch_rust_panics(false)).map_err(vm_error)?;
        lua.set_memory_limit(script.limits.memory_bytes_max)
            .map_err(vm_error)?;

        let globals = lua.globals();
        for name in [
            "require",
            "load",
            "loadstring",
            "dofile",
            "loadfile",
            "getfenv",
            "setfenv",
            "collectgarbage",
            "gcinfo",
            "newproxy",
            "debug",
        ] {
            globals.raw_set(name, LuaValue::Nil).map_err(vm_error)?;
        }
        let os: Table = globals.raw_get("os").map_err(vm_error)?;
        let safe_os = lua.create_table().map_err(vm_error)?;
        for name in ["clock", "time"] {
            let f: LuaValue = os.raw_get(name).map_err(vm_error)?;
            safe_os.raw_set(name, f).map_err(vm_error)?;
        }
        globals.raw_set("os", safe_os).map_err(vm_error)?;
        globals.raw_set("null", LuaValue::NULL).map_err(vm_error)?;

        let array_metatable = lua.create_table().map_err(vm_error)?;
        array_metatable.set_readonly(true);
        let type_name = script.type_name.clone();
        let log = lua
            .create_function(move |_, line: mlua::String| {
                let line = line.to_string_lossy();
                let line = truncate(&line, PRINT_BYTES_MAX);
                tracing::debug!(target: "statehouse::lua", entity_type = %type_name, "{line}");
                Ok(())
            })
            .map_err(vm_error)?;
        let runner: Function = lua
            .load(PRELUDE)
            .set_name("=statehouse")
            .call((log, array_metatable.clone()))
            .map_err(vm_error)?;

        let meter = Arc::new(Meter::new());
        let interrupt_meter = Arc::clone(&meter);
        let limits = script.limits;
        lua.set_interrupt(move |_| match interrupt_meter.interrupt() {
            Ok(()) => Ok(VmState::Continue),
            Err(tripped) => Err(mlua::Error::runtime(limit_message(tripped, &limits))),
        });

        let turn_log = Arc::new(Mutex::new(TurnLog::default()));
        let ctx_functions = ctx_functions(&lua, &turn_log, &array_metatable).map_err(vm_error)?;

        lua.sandbox(true).map_err(vm_error)?;

        let chunk = lua
            .load(&script.bytecode[..])
            .set_name(format!("={}", script.type_name))
            .set_mode(ChunkMode::Binary)
            .into_function()
            .map_err(vm_error)?;
        // The top level runs with an inert `functions` placeholder: the real ones are only
        // known after it ran.
        let loader = Loader {
            lua: &lua,
            runner: &runner,
            meter: &meter,
            limits: &script.limits,
            type_name: &script.type_name,
        };
        match loader.call("the top level", &chunk, ()) {
            Ok(Outcome::Returned(_)) => {}
            Ok(Outcome::Refused(reason)) => {
                return Err(LuaError::Load(format!("refused: {reason}")))
            }
            Err(CallError::Limit(m)) => return Err(LuaError::Limit(m)),
            Err(CallError::Failed(m)) => return Err(LuaError::Load(m)),
        }
        let script_globals = lua.globals();
        script_globals.set_readonly(true);
        let functions = Functions {
            init: required(&script_globals, "init")?,
            handle_call: required(&script_globals, "handle_call")?,
            handle_cast: optional(&script_globals, "handle_cast")?,
            handle_info: optional(&script_globals, "handle_info")?,
            apply: optional(&script_globals, "apply")?,
            migrate: optional(&script_globals, "migrate")?,
        };
        Ok(Vm {
            script,
            functions,
            runner,
            array_metatable,
            ctx_functions,
            meter,
            turn_log,
            poisoned: false,
            lua,
        })
    }

    /// The script this VM runs.
    pub(super) fn script_arc(&self) -> &Arc<Script> {
        &self.script
    }

    /// Runs a full collection when garbage from earlier calls fills more than half the
    /// memory limit. Luau collects incrementally and has no emergency collection on a failed
    /// allocation, so without this a call could fail only because of earlier calls' garbage.
    pub(super) fn collect_garbage_if_crowded(&mut self) {
        if self.lua.used_memory() > self.script.limits.memory_bytes_max / 2 {
            if let Err(error) = self.lua.gc_collect() {
                tracing::debug!(%error, "Lua garbage collection failed; dropping the VM");
                self.poisoned = true;
            }
        }
    }

    /// Calls a script function (`what` names it in messages) under the limits.
    pub(super) fn call(
        &mut self,
        what: &str,
        function: &Function,
        args: impl IntoLuaMulti,
    ) -> Result<Outcome, CallError> {
        let loader = Loader {
            lua: &self.lua,
            runner: &self.runner,
            meter: &self.meter,
            limits: &self.script.limits,
            type_name: &self.script.type_name,
        };
        let result = loader.call(what, function, args);
        if let Err(CallError::Limit(_)) = result {
            self.poisoned = true;
        }
        result
    }

    /// Converts a JSON value into this VM, frozen or not. `root` names it in messages.
    pub(super) fn lua_value(
        &mut self,
        value: &Value,
        freeze: bool,
        root: &str,
    ) -> Result<LuaValue, ConversionFailure> {
        let to_lua = ToLua {
            lua: &self.lua,
            array_metatable: &self.array_metatable,
            freeze,
        };
        match to_lua.convert(value) {
            Ok(value) => Ok(value),
            Err(ToLuaError::Value(e)) => Err(ConversionFailure::Value(e.describe(root))),
            Err(ToLuaError::Lua(e)) => Err(ConversionFailure::Vm(self.vm_failure(&e))),
        }
    }

    /// Converts a Lua value the script produced to JSON. `root` names it in messages.
    pub(super) fn to_json(&self, value: &LuaValue, root: &str) -> Result<Value, String> {
        convert::to_json(value, self.array_metatable.to_pointer()).map_err(|e| e.describe(root))
    }

    /// A VM-level failure outside a script call (converting into the VM ran out of memory).
    fn vm_failure(&mut self, error: &mlua::Error) -> CallError {
        let failure = classify(error, &self.script.limits, &self.script.type_name);
        if let CallError::Limit(_) = failure {
            self.poisoned = true;
        }
        failure
    }

    /// The `ctx` table a handler receives.
    pub(super) fn ctx(&mut self, key: &str, now_ms: u64) -> Result<LuaValue, CallError> {
        let build = || -> mlua::Result<Table> {
            let ctx = self
                .lua
                .create_table_with_capacity(0, 2 + CTX_FUNCTIONS.len())?;
            ctx.raw_set("key", key)?;
            // Milliseconds fit a double exactly until the year 287,396.
            ctx.raw_set("now", now_ms as f64)?;
            for (name, function) in CTX_FUNCTIONS.iter().zip(&self.ctx_functions) {
                ctx.raw_set(*name, function.clone())?;
            }
            ctx.set_readonly(true);
            Ok(ctx)
        };
        match build() {
            Ok(ctx) => Ok(LuaValue::Table(ctx)),
            Err(e) => Err(self.vm_failure(&e)),
        }
    }

    /// Opens the turn log for a handler call.
    pub(super) fn open_turn(&self, emit_allowed: bool) {
        let mut log = self.turn_log.lock();
        *log = TurnLog {
            open: true,
            emit_allowed,
            ..TurnLog::default()
        };
    }

    /// Closes the turn log and takes what the handler recorded.
    pub(super) fn close_turn(&self) -> TurnLog {
        let mut log = self.turn_log.lock();
        std::mem::take(&mut *log)
    }
}

/// Why a JSON value could not be converted into the VM.
pub(super) enum ConversionFailure {
    /// The value itself (its path and problem are in the message).
    Value(String),
    /// The VM (out of memory).
    Vm(CallError),
}

/// The parts of a VM a call needs, borrowed so the top level can run before `Vm` exists.
struct Loader<'a> {
    lua: &'a Lua,
    runner: &'a Function,
    meter: &'a Meter,
    limits: &'a LuaLimits,
    type_name: &'a str,
}

impl Loader<'_> {
    fn call(
        &self,
        what: &str,
        function: &Function,
        args: impl IntoLuaMulti,
    ) -> Result<Outcome, CallError> {
        let mut args = args
            .into_lua_multi(self.lua)
            .map_err(|e| classify(&e, self.limits, self.type_name))?;
        args.push_front(LuaValue::Function(function.clone()));
        self.meter.arm(self.limits);
        let result = self.runner.call::<MultiValue>(args);
        let tripped = self.meter.disarm();
        // A broken CPU limit wins over whatever the script did after (a pcall that caught it).
        if let Some(tripped) = tripped {
            return Err(CallError::Limit(format!(
                "{what}: {}",
                limit_message(tripped, self.limits)
            )));
        }
        let mut values = match result {
            Ok(values) => values.into_vec(),
            Err(e) => {
                return Err(match classify(&e, self.limits, self.type_name) {
                    CallError::Limit(m) => CallError::Limit(format!("{what}: {m}")),
                    CallError::Failed(m) => CallError::Failed(format!("{what} failed: {m}")),
                })
            }
        };
        if values.is_empty() {
            return Err(CallError::Failed(format!(
                "{what}: the runner returned nothing"
            )));
        }
        let tag = values.remove(0);
        match tag {
            LuaValue::String(s) if s == "memory" => Err(CallError::Limit(format!(
                "{what}: {}",
                memory_message(self.limits, self.type_name)
            ))),
            LuaValue::String(s) if s == "invalid" => {
                let reason = match values.first() {
                    Some(LuaValue::String(reason)) => reason.to_string_lossy(),
                    _ => String::from("refused"),
                };
                Ok(Outcome::Refused(reason))
            }
            _ => Ok(Outcome::Returned(values)),
        }
    }
}

/// Names the broken CPU limit.
fn limit_message(tripped: Tripped, limits: &LuaLimits) -> String {
    match tripped {
        Tripped::Instructions => format!(
            "instruction budget exceeded: more than {} steps (calls and loop iterations) in one \
             call (limit instructions_max)",
            limits.instructions_max
        ),
        Tripped::Time => format!(
            "call timeout exceeded: ran longer than {:?} (limit call_timeout)",
            limits.call_timeout
        ),
    }
}

/// Turns an mlua error into a crash message, recognising a broken memory limit.
fn classify(error: &mlua::Error, limits: &LuaLimits, type_name: &str) -> CallError {
    if is_memory_error(error) {
        return CallError::Limit(memory_message(limits, type_name));
    }
    CallError::Failed(lua_message(error))
}

/// Names the broken memory limit.
fn memory_message(limits: &LuaLimits, type_name: &str) -> String {
    format!(
        "memory limit exceeded: a Lua VM for {type_name} may use at most {} bytes (limit \
         memory_bytes_max)",
        limits.memory_bytes_max
    )
}

fn is_memory_error(error: &mlua::Error) -> bool {
    match error {
        mlua::Error::MemoryError(_) => true,
        // A memory error caught by a pcall and raised again arrives as its message.
        mlua::Error::RuntimeError(m) => m.starts_with("not enough memory"),
        mlua::Error::CallbackError { cause, .. } => is_memory_error(cause),
        mlua::Error::WithContext { cause, .. } => is_memory_error(cause),
        _ => false,
    }
}

/// The message of an mlua error without mlua's framing or the stack traceback.
fn lua_message(error: &mlua::Error) -> String {
    let text = match error {
        mlua::Error::RuntimeError(m) => m.clone(),
        mlua::Error::CallbackError { cause, .. } => return lua_message(cause),
        mlua::Error::WithContext { cause, .. } => return lua_message(cause),
        mlua::Error::ExternalError(e) => e.to_string(),
        other => other.to_string(),
    };
    match text.find("\nstack traceback:") {
        Some(end) => text[..end].trim_end().to_owned(),
        None => text.trim_end().to_owned(),
    }
}

fn truncate(text: &str, bytes_max: usize) -> &str {
    if text.len() <= bytes_max {
        return text;
    }
    let mut end = bytes_max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The names of the `ctx` functions, in the order of [`CtxFunctions`].
const CTX_FUNCTIONS: [&str; 8] = [
    "emit",
    "monitor",
    "demonitor",
    "set_timer",
    "set_timer_at",
    "cancel_timer",
    "send",
    "request",
];

/// The `ctx` functions, built once per VM, named by [`CTX_FUNCTIONS`].
type CtxFunctions = [Function; 8];

/// Builds the `ctx` functions, which write to the turn log: `emit` records events, the others
/// [`Effect`]s.
fn ctx_functions(
    lua: &Lua,
    turn_log: &Arc<Mutex<TurnLog>>,
    array_metatable: &Table,
) -> mlua::Result<CtxFunctions> {
    // The pointer, not the table: a table captured in a VM's own callback would keep the VM
    // alive. The metatable lives as long as the VM (the prelude holds it), so it is stable.
    let array_metatable = array_metatable.to_pointer() as usize;
    let log = Arc::clone(turn_log);
    let emit = lua.create_function(move |_, event: LuaValue| {
        let json = convert::to_json(&event, array_metatable as *const std::ffi::c_void)
            .map_err(|e| mlua::Error::runtime(format!("ctx.emit: {}", e.describe("event"))))?;
        let mut log = log.lock();
        if !log.open {
            return Err(mlua::Error::runtime(
                "ctx.emit may only be called while a handler runs",
            ));
        }
        if !log.emit_allowed {
            return Err(mlua::Error::runtime(
                "ctx.emit needs an apply(state, event) function; without apply, return the new \
                 state from the handler instead",
            ));
        }
        if log.events.len() >= EVENTS_PER_TURN_MAX {
            return Err(mlua::Error::runtime(format!(
                "ctx.emit: a turn may emit at most {EVENTS_PER_TURN_MAX} events"
            )));
        }
        log.events.push(json);
        Ok(())
    })?;
    let json = move |name: &str, what: &str, value: &LuaValue| {
        convert::to_json(value, array_metatable as *const std::ffi::c_void)
            .map_err(|e| arg_error(name, &e.describe(what)))
    };
    let monitor = effect_function(lua, turn_log, "monitor", |name, (entity_type, key)| {
        Ok(Effect::Monitor(address(name, entity_type, key)?))
    })?;
    let demonitor = effect_function(lua, turn_log, "demonitor", |name, (entity_type, key)| {
        Ok(Effect::Demonitor(address(name, entity_type, key)?))
    })?;
    let set_timer = effect_function(
        lua,
        turn_log,
        "set_timer",
        move |name, (timer, after_ms, payload): (LuaValue, LuaValue, LuaValue)| {
            Ok(Effect::SetTimer {
                name: timer_name(name, timer)?,
                due: TimerDue::AfterMs(millis(name, "after_ms", after_ms)?),
                payload: json(name, "payload", &payload)?,
            })
        },
    )?;
    let set_timer_at = effect_function(
        lua,
        turn_log,
        "set_timer_at",
        move |name, (timer, at_ms, payload): (LuaValue, LuaValue, LuaValue)| {
            Ok(Effect::SetTimer {
                name: timer_name(name, timer)?,
                due: TimerDue::AtUnixMs(millis(name, "at_unix_ms", at_ms)?),
                payload: json(name, "payload", &payload)?,
            })
        },
    )?;
    let cancel_timer = effect_function(lua, turn_log, "cancel_timer", |name, timer| {
        Ok(Effect::CancelTimer {
            name: timer_name(name, timer)?,
        })
    })?;
    let send = effect_function(
        lua,
        turn_log,
        "send",
        move |name, (entity_type, key, message): (LuaValue, LuaValue, LuaValue)| {
            Ok(Effect::Send {
                to: address(name, entity_type, key)?,
                message: json(name, "message", &message)?,
            })
        },
    )?;
    let request = effect_function(
        lua,
        turn_log,
        "request",
        move |name, (entity_type, key, message, tag): (LuaValue, LuaValue, LuaValue, LuaValue)| {
            Ok(Effect::Request {
                to: address(name, entity_type, key)?,
                message: json(name, "message", &message)?,
                tag: json(name, "tag", &tag)?,
            })
        },
    )?;
    Ok([
        emit,
        monitor,
        demonitor,
        set_timer,
        set_timer_at,
        cancel_timer,
        send,
        request,
    ])
}

/// A `ctx.<name>` function that checks its arguments with `make` and records the effect.
fn effect_function<A: mlua::FromLuaMulti + 'static>(
    lua: &Lua,
    turn_log: &Arc<Mutex<TurnLog>>,
    name: &'static str,
    make: impl Fn(&str, A) -> mlua::Result<Effect> + Send + 'static,
) -> mlua::Result<Function> {
    let log = Arc::clone(turn_log);
    lua.create_function(move |_, args: A| {
        let effect = make(name, args)?;
        let mut log = log.lock();
        if !log.open {
            return Err(mlua::Error::runtime(format!(
                "ctx.{name} may only be called while a handler runs"
            )));
        }
        if log.effects.len() >= EFFECTS_PER_TURN_MAX {
            return Err(mlua::Error::runtime(format!(
                "ctx.{name}: a turn may ask for at most {EFFECTS_PER_TURN_MAX} effects"
            )));
        }
        log.effects.push(effect);
        Ok(())
    })
}

/// The error a `ctx` function raises for a bad argument: `ctx.<name>: <problem>`.
fn arg_error(name: &str, problem: &str) -> mlua::Error {
    mlua::Error::runtime(format!("ctx.{name}: {problem}"))
}

/// A string argument; `what` names it.
fn string_arg(name: &str, what: &str, value: LuaValue) -> mlua::Result<String> {
    match value {
        LuaValue::String(s) => s
            .to_str()
            .map(|s| s.to_owned())
            .map_err(|_| arg_error(name, &format!("{what} is not valid UTF-8"))),
        other => Err(arg_error(
            name,
            &format!("{what} must be a string, got {}", lua_type_name(&other)),
        )),
    }
}

/// An entity address from `(type, key)` arguments, checked like any address.
fn address(name: &str, entity_type: LuaValue, key: LuaValue) -> mlua::Result<EntityId> {
    let entity_type = string_arg(name, "entity type", entity_type)?;
    let key = string_arg(name, "entity key", key)?;
    EntityId::new(entity_type, key).map_err(|e| arg_error(name, &e.to_string()))
}

/// A timer name: 1 to [`TIMER_NAME_BYTES_MAX`] bytes.
fn timer_name(name: &str, value: LuaValue) -> mlua::Result<String> {
    let timer = string_arg(name, "timer name", value)?;
    if timer.is_empty() {
        return Err(arg_error(name, "timer name is empty"));
    }
    if timer.len() > TIMER_NAME_BYTES_MAX {
        return Err(arg_error(
            name,
            &format!(
                "timer name is {} bytes long; the limit is {TIMER_NAME_BYTES_MAX}",
                timer.len()
            ),
        ));
    }
    Ok(timer)
}

/// A time in milliseconds: a whole, non-negative number (at most 2^53, where doubles stop
/// being exact).
fn millis(name: &str, what: &str, value: LuaValue) -> mlua::Result<u64> {
    let ms = match value {
        LuaValue::Integer(i) => i as f64,
        LuaValue::Number(n) => n,
        other => {
            return Err(arg_error(
                name,
                &format!("{what} must be a number, got {}", lua_type_name(&other)),
            ))
        }
    };
    if ms < 0.0 {
        return Err(arg_error(name, &format!("{what} is negative ({ms})")));
    }
    if !ms.is_finite() || ms.fract() != 0.0 || ms > convert::EXACT_INTEGER_MAX as f64 {
        return Err(arg_error(
            name,
            &format!("{what} must be a whole number of milliseconds, got {ms}"),
        ));
    }
    Ok(ms as u64)
}

fn required(globals: &Table, name: &'static str) -> Result<Function, LuaError> {
    optional(globals, name)?.ok_or(LuaError::MissingFunction(name))
}

fn optional(globals: &Table, name: &'static str) -> Result<Option<Function>, LuaError> {
    match globals.raw_get::<LuaValue>(name) {
        Ok(LuaValue::Nil) => Ok(None),
        Ok(LuaValue::Function(f)) => Ok(Some(f)),
        Ok(other) => Err(LuaError::NotAFunction {
            name,
            found: lua_type_name(&other).to_owned(),
        }),
        Err(e) => Err(LuaError::Vm(e.to_string())),
    }
}

/// The type name Lua's own `type()` gives (mlua tells integral numbers apart; Lua does not).
fn lua_type_name(value: &LuaValue) -> &'static str {
    match value {
        LuaValue::Integer(_) | LuaValue::Number(_) => "number",
        other => other.type_name(),
    }
}
