//! `queue`: a FIFO of JSON items with visibility timeouts, like SQS.
//!
//! **Owns**: the queue's state, messages and events, and the visibility-timer rules.
//!
//! Every pushed item gets an `id` (1, 2, …) that is never reused. State:
//! `{"items": [{"id": N, "item": V}, …], "in_flight": {N: {"item": V, "deadline_ms": D}},
//! "last_id": N}`.
//!
//! Messages:
//! - `{"op":"push","item":V}` → `{"id":N,"length":L}` (`length`: items waiting, after the push);
//!   refused when the queue holds [`ITEMS_MAX`] items, waiting and in flight;
//! - `{"op":"pop"}` → `{"item":V,"id":N}`, or `{"item":null}` when empty;
//! - `{"op":"pop","visibility_ms":T}` (T > 0) → `{"item":V,"id":N,"deadline_ms":D}`: the item
//!   moves to in-flight instead of being removed, and a durable timer `visibility:<id>`
//!   (payload `{"id":N}`) is set for the deadline. Unless acked first, it then goes back at the
//!   head of the queue, so it is popped next;
//! - `{"op":"ack","id":N}` → `{"acked":bool}`: removes an in-flight item, cancels its timer;
//! - `{"op":"nack","id":N}` → `{"nacked":bool}`: puts an in-flight item back at the head now;
//! - `{"op":"peek"}` → like `pop`, without change;
//! - `{"op":"length"}` → `{"length":L,"in_flight":F}`.
//!
//! The timer is set for the absolute deadline (`AtUnixMs(D)`), so its `due_ms` equals the
//! item's `deadline_ms`: a timer from an earlier delivery of the same item (nacked, popped
//! again) is told apart from the current one and ignored. Returning an item is a move, so an
//! item is never in the queue twice and never lost: it is always waiting or in flight until
//! popped without visibility or acked.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{timer_info, Clocked};
use crate::behaviour::{
    now_unix_ms, BehaviourError, Effect, TimerDue, TypedBehaviour, TypedTurn, Value,
};

/// The `queue` behaviour.
pub struct Queue;

/// The most items a queue holds, waiting and in flight together.
pub const ITEMS_MAX: usize = 100_000;
/// The longest visibility timeout: 24 hours.
pub const VISIBILITY_MS_MAX: u64 = 24 * 60 * 60 * 1000;
/// The prefix of the visibility timers' names; the item's id follows.
pub const VISIBILITY_TIMER_PREFIX: &str = "visibility:";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Item {
    pub id: u64,
    pub item: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InFlight {
    pub item: Value,
    pub deadline_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueState {
    /// Waiting items, head first.
    pub items: VecDeque<Item>,
    /// Popped with a visibility timeout and not yet acked, by id.
    pub in_flight: BTreeMap<u64, InFlight>,
    /// The last id given; ids are never reused.
    pub last_id: u64,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum QueueCommand {
    Push {
        item: Value,
    },
    Pop {
        #[serde(default)]
        visibility_ms: Option<u64>,
    },
    Ack {
        id: u64,
    },
    Nack {
        id: u64,
    },
    Peek,
    Length,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum QueueEvent {
    /// An item joined the tail with this id.
    Pushed { id: u64, item: Value },
    /// The head item `id` was removed.
    Popped { id: u64 },
    /// The head item `id` moved to in-flight until `deadline_ms`.
    InFlight { id: u64, deadline_ms: u64 },
    /// The in-flight item `id` was acknowledged and removed.
    Acked { id: u64 },
    /// The in-flight item `id` went back to the head (nack or visibility timeout).
    Returned { id: u64 },
}

impl TypedBehaviour for Queue {
    type State = QueueState;
    type Command = QueueCommand;
    type Event = QueueEvent;
    type Reply = Value;

    const TYPE_NAME: &'static str = "queue";

    fn init(&self, _key: &str) -> QueueState {
        QueueState::default()
    }

    fn handle(
        &self,
        state: &QueueState,
        command: QueueCommand,
    ) -> Result<TypedTurn<QueueEvent, Value>, BehaviourError> {
        self.handle_at(state, command, now_unix_ms())
    }

    fn handle_info(
        &self,
        state: &QueueState,
        info: Value,
    ) -> Result<TypedTurn<QueueEvent, Value>, BehaviourError> {
        self.handle_info_at(state, info, now_unix_ms())
    }

    fn apply(&self, state: &mut QueueState, event: QueueEvent) {
        // handle() only emits events that fit the state; unknown ids are ignored so replay
        // stays total regardless.
        match event {
            QueueEvent::Pushed { id, item } => {
                state.last_id = state.last_id.max(id);
                state.items.push_back(Item { id, item });
            }
            QueueEvent::Popped { id } => {
                take_waiting(state, id);
            }
            QueueEvent::InFlight { id, deadline_ms } => {
                if let Some(Item { item, .. }) = take_waiting(state, id) {
                    state.in_flight.insert(id, InFlight { item, deadline_ms });
                }
            }
            QueueEvent::Acked { id } => {
                state.in_flight.remove(&id);
            }
            QueueEvent::Returned { id } => {
                if let Some(InFlight { item, .. }) = state.in_flight.remove(&id) {
                    state.items.push_front(Item { id, item });
                }
            }
        }
    }
}

impl Clocked for Queue {
    fn handle_at(
        &self,
        state: &QueueState,
        command: QueueCommand,
        now_ms: u64,
    ) -> Result<TypedTurn<QueueEvent, Value>, BehaviourError> {
        Ok(match command {
            QueueCommand::Length => TypedTurn::reply(json!({
                "length": state.items.len(),
                "in_flight": state.in_flight.len(),
            })),
            QueueCommand::Peek => TypedTurn::reply(match state.items.front() {
                Some(head) => json!({"item": head.item, "id": head.id}),
                None => json!({"item": null}),
            }),
            QueueCommand::Push { item } => {
                if state.items.len() + state.in_flight.len() >= ITEMS_MAX {
                    return Err(invalid(format!(
                        "the queue is full: it holds at most {ITEMS_MAX} items, waiting and in \
                         flight"
                    )));
                }
                let id = state
                    .last_id
                    .checked_add(1)
                    .ok_or_else(|| BehaviourError::Failed("queue: item ids exhausted".into()))?;
                let reply = json!({"id": id, "length": state.items.len() + 1});
                TypedTurn::with_events(reply, vec![QueueEvent::Pushed { id, item }])
            }
            QueueCommand::Pop { visibility_ms } => {
                if let Some(ms) = visibility_ms {
                    if ms == 0 || ms > VISIBILITY_MS_MAX {
                        return Err(invalid(format!(
                            "visibility_ms must be between 1 and {VISIBILITY_MS_MAX} (24 h), \
                             got {ms}"
                        )));
                    }
                }
                let Some(head) = state.items.front() else {
                    return Ok(TypedTurn::reply(json!({"item": null})));
                };
                let id = head.id;
                match visibility_ms {
                    None => TypedTurn::with_events(
                        json!({"item": head.item, "id": id}),
                        vec![QueueEvent::Popped { id }],
                    ),
                    Some(ms) => {
                        let deadline_ms = now_ms.saturating_add(ms);
                        TypedTurn::with_events(
                            json!({"item": head.item, "id": id, "deadline_ms": deadline_ms}),
                            vec![QueueEvent::InFlight { id, deadline_ms }],
                        )
                        .effect(Effect::SetTimer {
                            name: visibility_timer(id),
                            due: TimerDue::AtUnixMs(deadline_ms),
                            payload: json!({"id": id}),
                        })
                    }
                }
            }
            QueueCommand::Ack { id } => {
                if !state.in_flight.contains_key(&id) {
                    TypedTurn::reply(json!({"acked": false}))
                } else {
                    TypedTurn::with_events(json!({"acked": true}), vec![QueueEvent::Acked { id }])
                        .effect(Effect::CancelTimer {
                            name: visibility_timer(id),
                        })
                }
            }
            QueueCommand::Nack { id } => {
                if !state.in_flight.contains_key(&id) {
                    TypedTurn::reply(json!({"nacked": false}))
                } else {
                    TypedTurn::with_events(
                        json!({"nacked": true}),
                        vec![QueueEvent::Returned { id }],
                    )
                    .effect(Effect::CancelTimer {
                        name: visibility_timer(id),
                    })
                }
            }
        })
    }

    /// A visibility timer: the item goes back at the head if it is still in flight under the
    /// delivery that set this timer; a stale timer (acked, nacked, or an earlier delivery) is a
    /// turn that changes nothing.
    fn handle_info_at(
        &self,
        state: &QueueState,
        info: Value,
        _now_ms: u64,
    ) -> Result<TypedTurn<QueueEvent, Value>, BehaviourError> {
        let timer = timer_info(Self::TYPE_NAME, info)?;
        let Some(id) = timer.name.strip_prefix(VISIBILITY_TIMER_PREFIX) else {
            return Err(invalid(format!("unknown timer {:?}", timer.name)));
        };
        let id: u64 = id
            .parse()
            .map_err(|_| invalid(format!("timer {:?} does not name an item id", timer.name)))?;
        Ok(match state.in_flight.get(&id) {
            Some(in_flight) if in_flight.deadline_ms <= timer.due_ms => {
                TypedTurn::with_events(Value::Null, vec![QueueEvent::Returned { id }])
            }
            _ => TypedTurn::reply(Value::Null),
        })
    }
}

/// The name of item `id`'s visibility timer.
pub fn visibility_timer(id: u64) -> String {
    format!("{VISIBILITY_TIMER_PREFIX}{id}")
}

/// Removes waiting item `id` (the head, as handle() emits it).
fn take_waiting(state: &mut QueueState, id: u64) -> Option<Item> {
    let position = state.items.iter().position(|item| item.id == id)?;
    state.items.remove(position)
}

fn invalid(text: String) -> BehaviourError {
    BehaviourError::InvalidMessage(format!("queue: {text}"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::behaviour::builtin::harness::{Entity, PendingTimer, Sim};
    use crate::behaviour::{timer_message, Typed};

    const T0: u64 = 1_700_000_000_000;

    #[test]
    fn pushes_and_pops_in_order_with_increasing_ids() {
        let mut q = Sim::new(&Queue, T0);
        assert_eq!(q.send(json!({"op": "pop"})).unwrap(), json!({"item": null}));
        assert_eq!(
            q.send(json!({"op": "push", "item": "a"})).unwrap(),
            json!({"id": 1, "length": 1})
        );
        assert_eq!(
            q.send(json!({"op": "push", "item": {"n": 2}})).unwrap(),
            json!({"id": 2, "length": 2})
        );
        assert_eq!(
            q.send(json!({"op": "peek"})).unwrap(),
            json!({"item": "a", "id": 1})
        );
        assert_eq!(
            q.send(json!({"op": "pop"})).unwrap(),
            json!({"item": "a", "id": 1})
        );
        assert_eq!(
            q.send(json!({"op": "pop"})).unwrap(),
            json!({"item": {"n": 2}, "id": 2})
        );
        assert_eq!(q.send(json!({"op": "pop"})).unwrap(), json!({"item": null}));
        // Ids are never reused, even once the queue is empty.
        assert_eq!(
            q.send(json!({"op": "push", "item": null})).unwrap(),
            json!({"id": 3, "length": 1})
        );
        assert_eq!(q.replayed(), q.state());
    }

    #[test]
    fn reads_write_nothing() {
        let mut q = Sim::new(&Queue, T0);
        q.send(json!({"op": "push", "item": 1})).unwrap();
        let before = q.journal.len();
        for read in [
            json!({"op": "peek"}),
            json!({"op": "length"}),
            json!({"op": "ack", "id": 1}),
            json!({"op": "nack", "id": 1}),
        ] {
            let turn = q.turn(read).unwrap();
            assert!(turn.events.is_empty() && turn.effects.is_empty());
        }
        assert_eq!(q.journal.len(), before);
        assert_eq!(
            q.send(json!({"op": "length"})).unwrap(),
            json!({"length": 1, "in_flight": 0})
        );
    }

    #[test]
    fn pop_with_visibility_sets_a_timer_and_ack_cancels_it() {
        let mut q = Sim::new(&Queue, T0);
        q.send(json!({"op": "push", "item": "a"})).unwrap();
        q.send(json!({"op": "push", "item": "b"})).unwrap();
        let turn = q
            .turn(json!({"op": "pop", "visibility_ms": 30_000}))
            .unwrap();
        assert_eq!(
            turn.reply,
            json!({"item": "a", "id": 1, "deadline_ms": T0 + 30_000})
        );
        assert_eq!(
            turn.effects,
            vec![Effect::SetTimer {
                name: "visibility:1".into(),
                due: TimerDue::AtUnixMs(T0 + 30_000),
                payload: json!({"id": 1}),
            }]
        );
        assert_eq!(
            q.send(json!({"op": "length"})).unwrap(),
            json!({"length": 1, "in_flight": 1})
        );
        // An in-flight item is not visible.
        assert_eq!(
            q.send(json!({"op": "peek"})).unwrap(),
            json!({"item": "b", "id": 2})
        );
        let turn = q.turn(json!({"op": "ack", "id": 1})).unwrap();
        assert_eq!(turn.reply, json!({"acked": true}));
        assert_eq!(
            turn.effects,
            vec![Effect::CancelTimer {
                name: "visibility:1".into()
            }]
        );
        assert!(q.timers.is_empty());
        assert_eq!(
            q.send(json!({"op": "ack", "id": 1})).unwrap(),
            json!({"acked": false})
        );
        assert_eq!(
            q.send(json!({"op": "length"})).unwrap(),
            json!({"length": 1, "in_flight": 0})
        );
        assert_eq!(q.replayed(), q.state());
    }

    #[test]
    fn an_expired_item_goes_back_at_the_head_once() {
        let mut q = Sim::new(&Queue, T0);
        for item in ["a", "b"] {
            q.send(json!({"op": "push", "item": item})).unwrap();
        }
        q.send(json!({"op": "pop", "visibility_ms": 1000})).unwrap();
        assert!(q.advance(999).is_empty());
        let fired = q.advance(1);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].events, vec![json!({"event": "returned", "id": 1})]);
        assert_eq!(
            q.send(json!({"op": "length"})).unwrap(),
            json!({"length": 2, "in_flight": 0})
        );
        // It is popped next, with its id.
        assert_eq!(
            q.send(json!({"op": "pop"})).unwrap(),
            json!({"item": "a", "id": 1})
        );
        assert_eq!(
            q.send(json!({"op": "pop"})).unwrap(),
            json!({"item": "b", "id": 2})
        );
        assert_eq!(q.send(json!({"op": "pop"})).unwrap(), json!({"item": null}));
        assert_eq!(q.replayed(), q.state());
    }

    #[test]
    fn nack_returns_at_once_and_cancels_the_timer() {
        let mut q = Sim::new(&Queue, T0);
        q.send(json!({"op": "push", "item": "a"})).unwrap();
        q.send(json!({"op": "push", "item": "b"})).unwrap();
        q.send(json!({"op": "pop", "visibility_ms": 1000})).unwrap();
        let turn = q.turn(json!({"op": "nack", "id": 1})).unwrap();
        assert_eq!(turn.reply, json!({"nacked": true}));
        assert!(q.timers.is_empty());
        assert_eq!(
            q.send(json!({"op": "peek"})).unwrap(),
            json!({"item": "a", "id": 1})
        );
        assert_eq!(
            q.send(json!({"op": "nack", "id": 1})).unwrap(),
            json!({"nacked": false})
        );
        assert!(q.advance(5000).is_empty());
        assert_eq!(
            q.send(json!({"op": "length"})).unwrap(),
            json!({"length": 2, "in_flight": 0})
        );
    }

    #[test]
    fn stale_timers_change_nothing() {
        let mut q = Sim::new(&Queue, T0);
        q.send(json!({"op": "push", "item": "a"})).unwrap();
        q.send(json!({"op": "pop", "visibility_ms": 1000})).unwrap();
        q.send(json!({"op": "ack", "id": 1})).unwrap();
        // A timer that fired before the ack's cancel took effect arrives after it.
        let turn = q
            .info(timer_message("visibility:1", json!({"id": 1}), T0 + 1000))
            .unwrap();
        assert!(turn.events.is_empty() && turn.effects.is_empty());

        // An earlier delivery's timer does not return the item of a later delivery.
        q.send(json!({"op": "push", "item": "b"})).unwrap();
        q.send(json!({"op": "pop", "visibility_ms": 1000})).unwrap();
        q.send(json!({"op": "nack", "id": 2})).unwrap();
        q.now += 10;
        q.send(json!({"op": "pop", "visibility_ms": 1000})).unwrap();
        let turn = q
            .info(timer_message("visibility:2", json!({"id": 2}), T0 + 1000))
            .unwrap();
        assert!(turn.events.is_empty());
        assert_eq!(
            q.send(json!({"op": "length"})).unwrap(),
            json!({"length": 0, "in_flight": 1})
        );
        assert_eq!(
            q.timers.get("visibility:2"),
            Some(&PendingTimer {
                due_ms: T0 + 1010,
                payload: json!({"id": 2})
            })
        );
        assert_eq!(q.advance(1000).len(), 1);
        assert_eq!(
            q.send(json!({"op": "length"})).unwrap(),
            json!({"length": 1, "in_flight": 0})
        );
        assert_eq!(q.replayed(), q.state());
    }

    #[test]
    fn items_are_never_lost_or_duplicated() {
        // Many deliveries, some acked, some nacked, some left to time out.
        let mut q = Sim::new(&Queue, T0);
        for i in 0..20 {
            q.send(json!({"op": "push", "item": i})).unwrap();
        }
        let mut acked = Vec::new();
        for round in 0..200u64 {
            let reply = q
                .send(json!({"op": "pop", "visibility_ms": 50 + round % 7}))
                .unwrap();
            if let Some(id) = reply["id"].as_u64() {
                match round % 3 {
                    0 => {
                        q.send(json!({"op": "ack", "id": id})).unwrap();
                        acked.push(reply["item"].as_u64().unwrap());
                    }
                    1 => {
                        q.send(json!({"op": "nack", "id": id})).unwrap();
                    }
                    _ => {}
                }
            }
            q.advance(13);
        }
        q.advance(1000);
        let mut left = Vec::new();
        while let Some(item) = q.send(json!({"op": "pop"})).unwrap()["item"].as_u64() {
            left.push(item);
        }
        assert_eq!(
            q.send(json!({"op": "length"})).unwrap(),
            json!({"length": 0, "in_flight": 0})
        );
        let mut all: Vec<u64> = acked.into_iter().chain(left).collect();
        all.sort_unstable();
        assert_eq!(all, (0..20).collect::<Vec<_>>());
        assert_eq!(q.replayed(), q.state());
    }

    #[test]
    fn refuses_bad_messages_and_infos() {
        let mut q = Sim::new(&Queue, T0);
        for bad in [
            json!({"op": "push"}),
            json!({"op": "pop", "visibility_ms": 0}),
            json!({"op": "pop", "visibility_ms": -5}),
            json!({"op": "pop", "visibility_ms": VISIBILITY_MS_MAX + 1}),
            json!({"op": "ack"}),
            json!({"op": "ack", "id": "1"}),
            json!({"op": "shift"}),
            json!([1]),
        ] {
            let err = q.turn(bad.clone()).unwrap_err();
            assert!(
                matches!(err, BehaviourError::InvalidMessage(_)),
                "{bad} gave {err:?}"
            );
        }
        let err = q
            .send(json!({"op": "pop", "visibility_ms": 0}))
            .unwrap_err();
        assert!(err.to_string().contains("visibility_ms"), "{err}");
        for bad in [
            json!({"info": "down", "type": "x", "key": "y"}),
            timer_message("other", json!(null), T0),
            timer_message("visibility:x", json!(null), T0),
        ] {
            let err = q.info(bad.clone()).unwrap_err();
            assert!(
                matches!(err, BehaviourError::InvalidMessage(_)),
                "{bad} gave {err:?}"
            );
        }
        assert!(q.journal.is_empty());
    }

    #[test]
    fn a_full_queue_refuses_pushes() {
        let mut q = Sim::new(&Queue, T0);
        q.state.items = (1..=ITEMS_MAX as u64)
            .map(|id| Item {
                id,
                item: Value::Null,
            })
            .collect();
        q.state.last_id = ITEMS_MAX as u64;
        let err = q.send(json!({"op": "push", "item": 1})).unwrap_err();
        assert!(err.to_string().contains("queue is full"), "{err}");
        q.send(json!({"op": "pop", "visibility_ms": 10})).unwrap();
        assert!(q.send(json!({"op": "push", "item": 1})).is_err());
        q.send(json!({"op": "ack", "id": 1})).unwrap();
        assert_eq!(
            q.send(json!({"op": "push", "item": 1})).unwrap()["id"],
            json!(ITEMS_MAX + 1)
        );
    }

    #[test]
    fn runs_through_the_erased_interface() {
        let queue = Typed(Queue);
        let mut e = Entity::new(&queue);
        e.send(json!({"op": "push", "item": "a"})).unwrap();
        let turn = e.turn(json!({"op": "pop", "visibility_ms": 10})).unwrap();
        let due = turn.reply["deadline_ms"].as_u64().unwrap();
        assert!(due > T0);
        let turn = e
            .info(timer_message("visibility:1", json!({"id": 1}), due))
            .unwrap();
        assert_eq!(turn.events.len(), 1);
        assert_eq!(
            e.state(),
            json!({"items": [{"id": 1, "item": "a"}], "in_flight": {}, "last_id": 1})
        );
    }
}
