//! The script's entry points as operations on a VM: `init`, one handler turn, `apply`,
//! `migrate`. Each converts its JSON inputs into the VM, calls through [`Vm::call`], and
//! converts the results back, applying the script-shape rules (see the parent module).
//!
//! **Owns**: those rules: what a handler's return values mean with and without `apply`, when
//! a turn has an event, how a refusal and a crash are reported.
//! **Calls**: [`Vm`] only.

use mlua::{Function, Value as LuaValue};

use super::vm::{CallError, ConversionFailure, Outcome, Vm};
use super::LuaMessageKind;
use crate::behaviour::{BehaviourError, Turn, Value};

impl Vm {
    /// Runs `init(key, arg)` and returns the initial state.
    pub(super) fn init(&mut self, key: &str, arg: &Value) -> Result<Value, CallError> {
        let arg = self.lua_value(arg, false, "arg").map_err(|e| match e {
            ConversionFailure::Value(m) => CallError::Failed(m),
            ConversionFailure::Vm(e) => e,
        })?;
        let init = self.functions.init.clone();
        let values = match self.call("init", &init, (key, arg))? {
            Outcome::Returned(values) => values,
            Outcome::Refused(reason) => {
                return Err(CallError::Failed(format!("init refused: {reason}")))
            }
        };
        let state = first(values);
        if state.is_nil() {
            return Err(CallError::Failed(
                "init returned nil; it must return the initial state, e.g. {}".into(),
            ));
        }
        self.to_json(&state, "state")
            .map_err(|m| CallError::Failed(format!("init returned an invalid state: {m}")))
    }

    /// Runs the handler for one message against `state` and builds the turn.
    pub(super) fn handle(
        &mut self,
        kind: LuaMessageKind,
        key: &str,
        state: &Value,
        message: &Value,
        now_ms: u64,
    ) -> Result<Turn, BehaviourError> {
        let with_apply = self.functions.apply.is_some();
        // Which function runs, and whether it returns a reply before the state.
        let (function, name, returns_reply) = match kind {
            LuaMessageKind::Call => (self.functions.handle_call.clone(), "handle_call", true),
            LuaMessageKind::Cast => match &self.functions.handle_cast {
                Some(f) => (f.clone(), "handle_cast", false),
                // Without handle_cast a cast runs handle_call and its reply is dropped.
                None => (self.functions.handle_call.clone(), "handle_call", true),
            },
            LuaMessageKind::Info => match &self.functions.handle_info {
                Some(f) => (f.clone(), "handle_info", false),
                None => return Ok(Turn::reply(Value::Null)),
            },
        };
        let root = match kind {
            LuaMessageKind::Info => "info",
            _ => "message",
        };
        let message = self.lua_value(message, false, root).map_err(|e| match e {
            ConversionFailure::Value(m) => BehaviourError::InvalidMessage(m),
            ConversionFailure::Vm(e) => BehaviourError::Failed(e.message()),
        })?;
        // With apply, state changes only through events: the handler gets a frozen state so a
        // change in place fails loudly instead of being silently lost.
        let state_table = self
            .lua_value(state, with_apply, "state")
            .map_err(|e| match e {
                ConversionFailure::Value(m) => {
                    BehaviourError::Failed(format!("the stored state does not fit Lua: {m}"))
                }
                ConversionFailure::Vm(e) => BehaviourError::Failed(e.message()),
            })?;
        let ctx = self.ctx(key, now_ms).map_err(failed)?;

        self.open_turn(with_apply);
        let result = self.call(name, &function, (message, state_table.clone(), ctx));
        let log = self.close_turn();
        let mut values = match result.map_err(failed)? {
            Outcome::Returned(values) => values.into_iter(),
            Outcome::Refused(reason) => return Err(BehaviourError::InvalidMessage(reason)),
        };
        let reply = if returns_reply {
            values.next().unwrap_or(LuaValue::Nil)
        } else {
            LuaValue::Nil
        };
        let returned_state = values.next().unwrap_or(LuaValue::Nil);

        let reply = match kind {
            LuaMessageKind::Call => self
                .to_json(&reply, "reply")
                .map_err(|m| BehaviourError::Failed(format!("{name} returned {m}")))?,
            _ => Value::Null,
        };
        let events = if with_apply {
            if !returned_state.is_nil() {
                return Err(BehaviourError::Failed(format!(
                    "{name} returned a new state, but the script defines apply: change the state \
                     with ctx.emit(event) and return {}",
                    if returns_reply {
                        "only the reply"
                    } else {
                        "nothing"
                    }
                )));
            }
            log.events
        } else {
            // The new state is the one returned, or else the state table as the handler left it.
            let new_state = if returned_state.is_nil() {
                state_table
            } else {
                returned_state
            };
            let new_state = self
                .to_json(&new_state, "state")
                .map_err(|m| BehaviourError::Failed(format!("{name} left an invalid {m}")))?;
            // Without apply the whole new state is the event; an unchanged state writes nothing.
            if new_state == *state {
                Vec::new()
            } else {
                vec![new_state]
            }
        };
        Ok(Turn {
            reply,
            events,
            effects: log.effects,
        })
    }

    /// Runs `apply(state, event)` and returns the new state.
    pub(super) fn apply(
        &mut self,
        apply: &Function,
        state: &Value,
        event: &Value,
    ) -> Result<Value, BehaviourError> {
        self.fold(
            "apply",
            apply,
            state,
            (event, "event"),
            StateArgument::First,
        )
    }

    /// Runs `migrate(from_version, state)` and returns the migrated state.
    pub(super) fn migrate(
        &mut self,
        migrate: &Function,
        from_version: u32,
        state: &Value,
    ) -> Result<Value, BehaviourError> {
        let from_version = Value::from(from_version);
        self.fold(
            "migrate",
            migrate,
            state,
            (&from_version, "from_version"),
            StateArgument::Second,
        )
    }

    /// `apply` and `migrate` share a shape: `(state, x)` for apply, `(x, state)` for migrate,
    /// returning the new state or, when they return nothing, the state table as they left it.
    fn fold(
        &mut self,
        name: &str,
        function: &Function,
        state: &Value,
        (other, other_root): (&Value, &str),
        position: StateArgument,
    ) -> Result<Value, BehaviourError> {
        let conversion = |e| match e {
            ConversionFailure::Value(m) => BehaviourError::Failed(format!("{name}: {m}")),
            ConversionFailure::Vm(e) => BehaviourError::Failed(e.message()),
        };
        let state_table = self.lua_value(state, false, "state").map_err(conversion)?;
        let other = self
            .lua_value(other, false, other_root)
            .map_err(conversion)?;
        let args = match position {
            StateArgument::First => (state_table.clone(), other),
            StateArgument::Second => (other, state_table.clone()),
        };
        let returned = match self.call(name, function, args).map_err(failed)? {
            Outcome::Returned(values) => first(values),
            Outcome::Refused(reason) => {
                return Err(BehaviourError::Failed(format!("{name} refused: {reason}")))
            }
        };
        let new_state = if returned.is_nil() {
            state_table
        } else {
            returned
        };
        self.to_json(&new_state, "state")
            .map_err(|m| BehaviourError::Failed(format!("{name} returned an invalid {m}")))
    }
}

/// Where the state goes in a fold's arguments.
enum StateArgument {
    First,
    Second,
}

fn first(values: Vec<LuaValue>) -> LuaValue {
    values.into_iter().next().unwrap_or(LuaValue::Nil)
}

fn failed(error: CallError) -> BehaviourError {
    BehaviourError::Failed(error.message())
}
