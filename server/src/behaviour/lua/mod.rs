//! Lua behaviours: entity types written in Luau, compiled at run time, run sandboxed and bounded.
//!
//! **Owns**: [`LuaBehaviour`] (a compiled, checked script that implements [`Behaviour`]),
//! [`LuaLimits`], [`LuaError`] and the rules below.
//! **Knows nothing about** storage, deployment, versions history or protobuf: it turns a source
//! text into a behaviour; what to do with old versions is the caller's business.
//!
//! Layout: `vm.rs` builds one sandboxed VM and is the only path into script code;
//! `pool.rs` shares VMs between entities; `turn.rs` maps the script's entry points to
//! turns; `convert.rs` is the JSON ↔ Lua mapping; `limits.rs` the CPU/time/memory bounds;
//! `error.rs` the compile errors. `examples/` holds the shopping cart used by the tests and
//! the README.
//!
//! # Script shape
//!
//! A script defines global functions, gen_server-style:
//!
//! - `init(key, arg)` → the initial state (required; must not return `nil`). `arg` is `nil`
//!   when the engine creates an entity through [`Behaviour::initial_state`].
//! - `handle_call(msg, state, ctx)` → `reply, new_state` (required).
//! - `handle_cast(msg, state, ctx)` → `new_state` (optional; without it a cast runs
//!   `handle_call` and drops the reply).
//! - `handle_info(info, state, ctx)` → `new_state` (optional; without it info messages, such
//!   as a monitor's `DOWN`, are ignored).
//! - `apply(state, event)` → the new state (optional).
//! - `migrate(from_version, state)` → the state in this version's shape (optional; identity
//!   when absent).
//!
//! **Without `apply`**, the new state *is* the event: the handler returns it (or changes the
//! `state` table in place and returns nothing for it), and when it differs from the old state
//! the turn commits exactly one event holding the whole new state; replay takes it as is.
//! **With `apply`**, state changes only through events: the handler calls `ctx.emit(event)`
//! (any number of times, up to [`EVENTS_PER_TURN_MAX`]) and returns only the reply; the
//! `state` it receives is frozen, so changing it in place is an error, not a silent loss.
//! The engine folds the committed events with `apply`, for live turns and for replay alike.
//! `apply` and `migrate` may return the new state or change their `state` argument in place
//! and return nothing.
//!
//! `ctx` is read-only and holds `ctx.key`, `ctx.now` (milliseconds since the Unix epoch, read
//! once per turn; the same for every read within a turn; handlers are never replayed, only
//! events are, so `apply` must not read clocks: put the time in the event) and functions that
//! record what the turn does. [`Effect`](crate::behaviour::Effect)s run once the turn is
//! durable, and timers, sends and requests are written atomically with its events:
//!
//! - `ctx.emit(event)`: an event (scripts with `apply` only);
//! - `ctx.monitor(type, key)`, `ctx.demonitor(type, key)`: watch another entity (a `DOWN`
//!   info message when it ends);
//! - `ctx.set_timer(name, after_ms, payload?)`, `ctx.set_timer_at(name, at_unix_ms, payload?)`:
//!   a durable timer, replacing a pending one of that name; when due, `handle_info` receives
//!   `{info = "timer", name = N, payload = P, due_ms = D}` (see
//!   [`timer_message`](crate::behaviour::timer_message)). Names are 1 to
//!   [`TIMER_NAME_BYTES_MAX`](crate::behaviour::TIMER_NAME_BYTES_MAX) bytes;
//!   times are whole, non-negative milliseconds;
//! - `ctx.cancel_timer(name)`: cancels a pending timer (nothing if there is none);
//! - `ctx.send(type, key, message)`: a cast to another entity, delivered exactly once;
//! - `ctx.request(type, key, message, tag)`: a call to another entity whose reply comes back
//!   to `handle_info` as `{info = "reply", tag = T, from = {type, key}, reply = R}` (or
//!   `error = {code, message}`; see [`reply_message`](crate::behaviour::reply_message)). `tag`
//!   is any JSON value that tells the replies apart.
//!
//! A bad argument to a `ctx` function (an empty or too long name, a negative time, an invalid
//! address, a value that is not JSON) raises a Lua error naming the function and the problem,
//! e.g. `ctx.set_timer: timer name is empty`: a crash of the turn unless the script catches it.
//! At most [`EFFECTS_PER_TURN_MAX`] effects per turn.
//!
//! A handler refuses a bad message with `error({invalid = "reason"})`: the caller gets
//! [`BehaviourError::InvalidMessage`] and nothing changes. Any other error is a crash of the
//! turn ([`BehaviourError::Failed`] with Lua's message, e.g. `cart:12: attempt to index nil`).
//!
//! Globals are frozen once the script's top level has run, so entities cannot share state
//! through them. Top-level `local` variables are per VM, and an entity's calls may run on
//! different VMs: treat them as constants.
//!
//! Values cross the boundary as JSON; the mapping (empty table → `{}` unless marked with
//! `array()`, `null` sentinel for nulls inside arrays, numbers exact up to 2^53) is documented
//! in `convert.rs`.
//!
//! # Limits and sandbox
//!
//! See [`LuaLimits`] (CPU budget per call by interrupt, wall-clock backstop, memory per VM) and
//! the `vm` module (what the sandbox leaves out). Breaking a limit is a
//! [`BehaviourError::Failed`] naming the limit, which the supervisor treats as a crash; the VM
//! that broke it is dropped and the behaviour carries on with fresh ones.
//!
//! # Sharing
//!
//! No VM per entity: each `LuaBehaviour` keeps a small pool of VMs with the script loaded once
//! (see `pool`), and an entity is only its state value ([`ErasedState`] holding JSON). Each
//! call converts the state into a VM and the result back, so a call costs O(state size).

mod convert;
mod error;
mod limits;
mod pool;
mod turn;
mod vm;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use mlua::Compiler;

pub use convert::{DEPTH_MAX, EXACT_INTEGER_MAX};
pub use error::LuaError;
pub use limits::LuaLimits;
pub use vm::{EFFECTS_PER_TURN_MAX, EVENTS_PER_TURN_MAX};

use super::{Behaviour, BehaviourCompiler, BehaviourError, ErasedState, Turn, Value};
use pool::Pool;
use vm::{CallError, Script, Vm};

/// The largest script source accepted, in bytes.
pub const SOURCE_BYTES_MAX: usize = 1024 * 1024;

/// The key the dry `init` at compile time runs with.
pub const DRY_RUN_KEY: &str = "dry-run";

/// Which handler a message is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LuaMessageKind {
    /// `handle_call`: the reply goes back to the caller.
    Call,
    /// `handle_cast` (or `handle_call` without a reply when the script has no `handle_cast`).
    Cast,
    /// `handle_info` (ignored when the script has none).
    Info,
}

/// A compiled and checked Lua script serving one entity type at one version.
pub struct LuaBehaviour {
    pool: Pool,
    /// Whether the script defines `apply`; without it `apply` needs no VM.
    has_apply: bool,
}

impl std::fmt::Debug for LuaBehaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let script = self.pool.script();
        f.debug_struct("LuaBehaviour")
            .field("type_name", &script.type_name)
            .field("version", &script.version)
            .field("has_apply", &self.has_apply)
            .field("limits", &script.limits)
            .finish_non_exhaustive()
    }
}

/// An entity's state under a Lua behaviour: the JSON form of the script's state, or why
/// `init` failed for this key (reported by every later call, as a crash).
#[derive(Debug, Clone, PartialEq)]
enum LuaState {
    Ready(Value),
    InitFailed(String),
}

impl LuaBehaviour {
    /// Compiles and checks a script: syntax (the error names the line), the required
    /// functions (`init`, `handle_call`), the optional ones (`handle_cast`, `handle_info`,
    /// `apply`, `migrate`) being functions if present, and a dry `init(DRY_RUN_KEY, nil)` whose
    /// result must be a valid state. The VM built for the check becomes the first of the pool.
    pub fn compile(
        type_name: &str,
        version: u32,
        source: &str,
        limits: LuaLimits,
    ) -> Result<LuaBehaviour, LuaError> {
        if source.len() > SOURCE_BYTES_MAX {
            return Err(LuaError::TooLarge {
                bytes: source.len(),
                limit: SOURCE_BYTES_MAX,
            });
        }
        // Debug level 1 keeps line numbers for error messages.
        let bytecode = Compiler::new()
            .set_optimization_level(1)
            .set_debug_level(1)
            .compile(source)
            .map_err(syntax_error)?;
        let script = Arc::new(Script {
            type_name: type_name.to_owned(),
            version,
            source: source.to_owned(),
            bytecode,
            limits,
        });
        let mut vm = Vm::new(script)?;
        match vm.init(DRY_RUN_KEY, &Value::Null) {
            Ok(_) => {}
            Err(CallError::Limit(m)) => return Err(LuaError::Limit(m)),
            Err(CallError::Failed(m)) => return Err(LuaError::BadInit(m)),
        }
        if vm.poisoned {
            return Err(LuaError::Vm(
                "the VM was left unusable by the dry run".into(),
            ));
        }
        let has_apply = vm.functions.apply.is_some();
        Ok(LuaBehaviour {
            pool: Pool::new(vm),
            has_apply,
        })
    }

    /// The script's source, as given to [`compile`](Self::compile).
    pub fn source(&self) -> &str {
        &self.pool.script().source
    }

    /// The limits every call runs under.
    pub fn limits(&self) -> LuaLimits {
        self.pool.script().limits
    }

    /// Whether the script defines `apply` (events come from `ctx.emit`) or not (the new state
    /// is the event).
    pub fn has_apply(&self) -> bool {
        self.has_apply
    }

    /// Runs the script's `migrate(from_version, state)` on a state made by this or another
    /// `LuaBehaviour` (identity if the script has no `migrate`). A failure leaves `state`
    /// untouched.
    pub fn migrate(
        &self,
        from_version: u32,
        state: &ErasedState,
    ) -> Result<ErasedState, BehaviourError> {
        let current = ready(state)?;
        let migrated = self.pool.with_vm(|vm| match vm.functions.migrate.clone() {
            Some(migrate) => vm.migrate(&migrate, from_version, current),
            None => Ok(current.clone()),
        })?;
        Ok(Box::new(LuaState::Ready(migrated)))
    }

    /// The initial state for `key`, with `init`'s second argument.
    pub fn init_state(&self, key: &str, arg: &Value) -> Result<ErasedState, BehaviourError> {
        let value = self.pool.with_vm(|vm| {
            vm.init(key, arg)
                .map_err(|e| BehaviourError::Failed(e.message()))
        })?;
        Ok(Box::new(LuaState::Ready(value)))
    }

    /// Handles a cast: `handle_cast`, or `handle_call` with its reply dropped.
    pub fn handle_cast(
        &self,
        key: &str,
        state: &ErasedState,
        message: Value,
    ) -> Result<Turn, BehaviourError> {
        self.handle_at(LuaMessageKind::Cast, key, state, message, now_ms())
    }

    /// Handles one message with an explicit `ctx.now` (milliseconds since the Unix epoch),
    /// for an engine that carries the time in the message envelope.
    pub fn handle_at(
        &self,
        kind: LuaMessageKind,
        key: &str,
        state: &ErasedState,
        message: Value,
        now_ms: u64,
    ) -> Result<Turn, BehaviourError> {
        let current = ready(state)?;
        self.pool
            .with_vm(|vm| vm.handle(kind, key, current, &message, now_ms))
    }
}

impl Behaviour for LuaBehaviour {
    fn type_name(&self) -> &str {
        &self.pool.script().type_name
    }

    fn version(&self) -> u32 {
        self.pool.script().version
    }

    fn initial_state(&self, key: &str) -> ErasedState {
        match self.init_state(key, &Value::Null) {
            Ok(state) => state,
            Err(error) => Box::new(LuaState::InitFailed(error.to_string())),
        }
    }

    /// Runs `handle_call` (see [`LuaBehaviour::handle_cast`] for casts).
    fn handle(
        &self,
        key: &str,
        state: &ErasedState,
        message: Value,
    ) -> Result<Turn, BehaviourError> {
        self.handle_at(LuaMessageKind::Call, key, state, message, now_ms())
    }

    fn handle_cast(
        &self,
        key: &str,
        state: &ErasedState,
        message: Value,
    ) -> Result<Turn, BehaviourError> {
        LuaBehaviour::handle_cast(self, key, state, message)
    }

    fn handle_info(
        &self,
        key: &str,
        state: &ErasedState,
        info: Value,
    ) -> Result<Turn, BehaviourError> {
        self.handle_at(LuaMessageKind::Info, key, state, info, now_ms())
    }

    /// The script's `migrate(from_version, state)` (identity without one).
    fn migrate(&self, from_version: u32, state: Value) -> Result<ErasedState, BehaviourError> {
        let state: ErasedState = Box::new(LuaState::Ready(state));
        LuaBehaviour::migrate(self, from_version, &state)
    }

    fn apply(&self, state: &mut ErasedState, event: &Value) -> Result<(), BehaviourError> {
        if !self.has_apply {
            // Without apply, the event is the whole new state.
            *state = Box::new(LuaState::Ready(event.clone()));
            return Ok(());
        }
        let current = ready(state)?;
        let next = self.pool.with_vm(|vm| match vm.functions.apply.clone() {
            Some(apply) => vm.apply(&apply, current, event),
            None => Err(BehaviourError::Failed("the script has no apply".into())),
        })?;
        *state = Box::new(LuaState::Ready(next));
        Ok(())
    }

    fn state_to_value(&self, state: &ErasedState) -> Result<Value, BehaviourError> {
        ready(state).cloned()
    }

    fn state_from_value(&self, value: Value) -> Result<ErasedState, BehaviourError> {
        Ok(Box::new(LuaState::Ready(value)))
    }
}

/// Compiles Lua scripts for deployment through the admin API.
#[derive(Debug, Clone, Copy, Default)]
pub struct LuaCompiler {
    pub limits: LuaLimits,
}

impl BehaviourCompiler for LuaCompiler {
    fn language(&self) -> &'static str {
        "lua"
    }

    fn compile(
        &self,
        name: &str,
        version: u32,
        source: &str,
    ) -> Result<Arc<dyn Behaviour>, String> {
        LuaBehaviour::compile(name, version, source, self.limits)
            .map(|behaviour| Arc::new(behaviour) as Arc<dyn Behaviour>)
            .map_err(|error| error.to_string())
    }
}

/// The state's value, or why it has none.
fn ready(state: &ErasedState) -> Result<&Value, BehaviourError> {
    match state.downcast_ref::<LuaState>() {
        Some(LuaState::Ready(value)) => Ok(value),
        Some(LuaState::InitFailed(reason)) => Err(BehaviourError::Failed(reason.clone())),
        None => Err(BehaviourError::Failed(
            "state was not created by a Lua behaviour".into(),
        )),
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A compile error from Luau, with its line when the message names one.
fn syntax_error(error: mlua::Error) -> LuaError {
    let text = match error {
        mlua::Error::SyntaxError { message, .. } => message,
        other => other.to_string(),
    };
    let (line, message) = error::split_line(&text);
    LuaError::Syntax { line, message }
}
