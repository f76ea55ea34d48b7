//! `counter`: a signed 64-bit integer.
//!
//! Messages: `{"op":"incr","by":N}` (`by` defaults to 1), `{"op":"decr","by":N}`,
//! `{"op":"get"}`, `{"op":"reset"}`. Every reply, and the state, is `{"value": N}`.
//! An increment that would overflow is refused and changes nothing.

use serde::{Deserialize, Serialize};

use crate::behaviour::{BehaviourError, TypedBehaviour, TypedTurn};

/// The `counter` behaviour.
pub struct Counter;

/// The counter's state, which is also every reply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CounterState {
    pub value: i64,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum CounterCommand {
    Incr {
        #[serde(default = "one")]
        by: i64,
    },
    Decr {
        #[serde(default = "one")]
        by: i64,
    },
    Get,
    Reset,
}

fn one() -> i64 {
    1
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum CounterEvent {
    Added { by: i64 },
    Reset,
}

impl TypedBehaviour for Counter {
    type State = CounterState;
    type Command = CounterCommand;
    type Event = CounterEvent;
    type Reply = CounterState;

    const TYPE_NAME: &'static str = "counter";

    fn init(&self, _key: &str) -> CounterState {
        CounterState::default()
    }

    fn handle(
        &self,
        state: &CounterState,
        command: CounterCommand,
    ) -> Result<TypedTurn<CounterEvent, CounterState>, BehaviourError> {
        let by = match command {
            CounterCommand::Get => return Ok(TypedTurn::reply(*state)),
            CounterCommand::Reset if state.value == 0 => return Ok(TypedTurn::reply(*state)),
            CounterCommand::Reset => {
                return Ok(TypedTurn::with_events(
                    CounterState { value: 0 },
                    vec![CounterEvent::Reset],
                ))
            }
            CounterCommand::Incr { by } => by,
            CounterCommand::Decr { by } => by
                .checked_neg()
                .ok_or_else(|| overflow(state.value, "decrement", by))?,
        };
        if by == 0 {
            return Ok(TypedTurn::reply(*state));
        }
        let value = state
            .value
            .checked_add(by)
            .ok_or_else(|| overflow(state.value, "add", by))?;
        Ok(TypedTurn::with_events(
            CounterState { value },
            vec![CounterEvent::Added { by }],
        ))
    }

    fn apply(&self, state: &mut CounterState, event: CounterEvent) {
        match event {
            // handle() only emits additions that fit; wrapping keeps replay total regardless.
            CounterEvent::Added { by } => state.value = state.value.wrapping_add(by),
            CounterEvent::Reset => state.value = 0,
        }
    }
}

fn overflow(value: i64, verb: &str, by: i64) -> BehaviourError {
    BehaviourError::InvalidMessage(format!(
        "counter: {verb} {by} to {value} would overflow a 64-bit integer"
    ))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::behaviour::builtin::harness::Entity;
    use crate::behaviour::Typed;

    #[test]
    fn increments_decrements_and_resets() {
        let counter = Typed(Counter);
        let mut e = Entity::new(&counter);
        assert_eq!(e.send(json!({"op": "incr"})).unwrap(), json!({"value": 1}));
        assert_eq!(
            e.send(json!({"op": "incr", "by": 5})).unwrap(),
            json!({"value": 6})
        );
        assert_eq!(
            e.send(json!({"op": "decr", "by": 2})).unwrap(),
            json!({"value": 4})
        );
        assert_eq!(e.send(json!({"op": "decr"})).unwrap(), json!({"value": 3}));
        assert_eq!(e.send(json!({"op": "get"})).unwrap(), json!({"value": 3}));
        assert_eq!(e.send(json!({"op": "reset"})).unwrap(), json!({"value": 0}));
        assert_eq!(e.state(), json!({"value": 0}));
        assert_eq!(e.events, 4 + 1);
    }

    #[test]
    fn reads_and_no_ops_write_nothing() {
        let counter = Typed(Counter);
        let mut e = Entity::new(&counter);
        e.send(json!({"op": "get"})).unwrap();
        e.send(json!({"op": "reset"})).unwrap();
        e.send(json!({"op": "incr", "by": 0})).unwrap();
        assert_eq!(e.events, 0);
    }

    #[test]
    fn refuses_bad_messages() {
        let counter = Typed(Counter);
        let mut e = Entity::new(&counter);
        for bad in [
            json!({"op": "explode"}),
            json!({"op": "incr", "by": 1.5}),
            json!({"op": "incr", "by": "2"}),
            json!({"op": "incr", "by": 1, "extra": true}),
            json!({"by": 1}),
            json!("incr"),
            json!(["incr", 5]),
            json!(null),
        ] {
            let err = e.send(bad.clone()).unwrap_err();
            assert!(
                matches!(err, BehaviourError::InvalidMessage(_)),
                "{bad} gave {err:?}"
            );
        }
        assert_eq!(e.events, 0);
    }

    #[test]
    fn refuses_overflow() {
        let counter = Typed(Counter);
        let mut e = Entity::new(&counter);
        e.send(json!({"op": "incr", "by": i64::MAX})).unwrap();
        let err = e.send(json!({"op": "incr"})).unwrap_err();
        assert!(err.to_string().contains("overflow"), "{err}");
        assert!(e.send(json!({"op": "decr", "by": i64::MIN})).is_err());
        assert_eq!(e.state(), json!({"value": i64::MAX}));
    }
}
