//! `lease`: a named lock with a time to live and fencing tokens.
//!
//! **Owns**: the lease's state, messages and events, and its expiry rules.
//!
//! Every grant of the lease gets a `token` larger than any before it (`last_token` is kept for
//! the lease's whole life, never reset by expiry or release), so a resource guarded by the
//! lease can refuse writes carrying an older token. A lease is held while
//! `now < expires_at_ms`; a durable timer `expiry` frees it in the state when it runs out.
//! State: `{"held": {"holder": H, "token": N, "expires_at_ms": E} | null, "last_token": M}`.
//!
//! Messages (`ttl_ms` from 1 to 24 h; `holder` a non-empty string):
//! - `{"op":"acquire","holder":H,"ttl_ms":T}` → `{"acquired":true,"token":N,"holder":H,
//!   "expires_at_ms":E}` when free or expired (a new token), or when `H` already holds it (a
//!   renewal keeping its token); `{"acquired":false,"holder":OTHER,"expires_at_ms":E}` when
//!   someone else holds it;
//! - `{"op":"renew","holder":H,"token":N,"ttl_ms":T}` → `{"renewed":true,"expires_at_ms":E}` or
//!   `{"renewed":false,"reason":R}` (not held, held by another, wrong token, expired);
//! - `{"op":"release","holder":H,"token":N}` → `{"released":bool}`;
//! - `{"op":"get"}` → `{"holder":H|null,"token":N|null,"expires_at_ms":E|null,"last_token":M}`
//!   (nulls when free or expired).

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{timer_info, Clocked};
use crate::behaviour::{
    now_unix_ms, BehaviourError, Effect, TimerDue, TypedBehaviour, TypedTurn, Value,
};

/// The `lease` behaviour.
pub struct Lease;

/// The longest time to live: 24 hours.
pub const TTL_MS_MAX: u64 = 24 * 60 * 60 * 1000;
/// The longest holder name, in bytes.
pub const HOLDER_BYTES_MAX: usize = 1024;
/// The name of the timer that frees an expired lease.
pub const EXPIRY_TIMER: &str = "expiry";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Held {
    pub holder: String,
    pub token: u64,
    pub expires_at_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseState {
    /// The current grant, until released or freed by the expiry timer. It may have expired
    /// already (`now >= expires_at_ms`): then the lease is free.
    pub held: Option<Held>,
    /// The largest token ever given.
    pub last_token: u64,
}

impl LeaseState {
    /// The grant still in force at `now_ms`.
    pub fn holder_at(&self, now_ms: u64) -> Option<&Held> {
        self.held.as_ref().filter(|h| now_ms < h.expires_at_ms)
    }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum LeaseCommand {
    Acquire {
        holder: String,
        ttl_ms: u64,
    },
    Renew {
        holder: String,
        token: u64,
        ttl_ms: u64,
    },
    Release {
        holder: String,
        token: u64,
    },
    Get,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum LeaseEvent {
    /// A new grant with a new token.
    Acquired {
        holder: String,
        token: u64,
        expires_at_ms: u64,
    },
    /// The current grant now runs until `expires_at_ms`.
    Renewed { expires_at_ms: u64 },
    /// The holder gave the lease up.
    Released,
    /// The expiry timer freed the lease.
    Expired,
}

impl TypedBehaviour for Lease {
    type State = LeaseState;
    type Command = LeaseCommand;
    type Event = LeaseEvent;
    type Reply = Value;

    const TYPE_NAME: &'static str = "lease";

    fn init(&self, _key: &str) -> LeaseState {
        LeaseState::default()
    }

    fn handle(
        &self,
        state: &LeaseState,
        command: LeaseCommand,
    ) -> Result<TypedTurn<LeaseEvent, Value>, BehaviourError> {
        self.handle_at(state, command, now_unix_ms())
    }

    fn handle_info(
        &self,
        state: &LeaseState,
        info: Value,
    ) -> Result<TypedTurn<LeaseEvent, Value>, BehaviourError> {
        self.handle_info_at(state, info, now_unix_ms())
    }

    fn apply(&self, state: &mut LeaseState, event: LeaseEvent) {
        match event {
            LeaseEvent::Acquired {
                holder,
                token,
                expires_at_ms,
            } => {
                state.last_token = state.last_token.max(token);
                state.held = Some(Held {
                    holder,
                    token,
                    expires_at_ms,
                });
            }
            LeaseEvent::Renewed { expires_at_ms } => {
                if let Some(held) = &mut state.held {
                    held.expires_at_ms = expires_at_ms;
                }
            }
            LeaseEvent::Released | LeaseEvent::Expired => state.held = None,
        }
    }
}

impl Clocked for Lease {
    fn handle_at(
        &self,
        state: &LeaseState,
        command: LeaseCommand,
        now_ms: u64,
    ) -> Result<TypedTurn<LeaseEvent, Value>, BehaviourError> {
        Ok(match command {
            LeaseCommand::Get => TypedTurn::reply(match state.holder_at(now_ms) {
                Some(held) => json!({
                    "holder": held.holder,
                    "token": held.token,
                    "expires_at_ms": held.expires_at_ms,
                    "last_token": state.last_token,
                }),
                None => json!({
                    "holder": null,
                    "token": null,
                    "expires_at_ms": null,
                    "last_token": state.last_token,
                }),
            }),
            LeaseCommand::Acquire { holder, ttl_ms } => {
                check_holder(&holder)?;
                let expires_at_ms = expiry(now_ms, ttl_ms)?;
                match state.holder_at(now_ms) {
                    Some(held) if held.holder != holder => TypedTurn::reply(json!({
                        "acquired": false,
                        "holder": held.holder,
                        "expires_at_ms": held.expires_at_ms,
                    })),
                    Some(held) => TypedTurn::with_events(
                        json!({
                            "acquired": true,
                            "token": held.token,
                            "holder": holder,
                            "expires_at_ms": expires_at_ms,
                        }),
                        vec![LeaseEvent::Renewed { expires_at_ms }],
                    )
                    .effect(expiry_timer(expires_at_ms)),
                    None => {
                        let token = state.last_token.checked_add(1).ok_or_else(|| {
                            BehaviourError::Failed("lease: fencing tokens exhausted".into())
                        })?;
                        TypedTurn::with_events(
                            json!({
                                "acquired": true,
                                "token": token,
                                "holder": holder,
                                "expires_at_ms": expires_at_ms,
                            }),
                            vec![LeaseEvent::Acquired {
                                holder,
                                token,
                                expires_at_ms,
                            }],
                        )
                        .effect(expiry_timer(expires_at_ms))
                    }
                }
            }
            LeaseCommand::Renew {
                holder,
                token,
                ttl_ms,
            } => {
                check_holder(&holder)?;
                let expires_at_ms = expiry(now_ms, ttl_ms)?;
                let refused = |reason: &str| {
                    Ok(TypedTurn::reply(
                        json!({"renewed": false, "reason": reason}),
                    ))
                };
                let Some(held) = &state.held else {
                    return refused("not held");
                };
                if held.holder != holder {
                    return refused("held by another holder");
                }
                if held.token != token {
                    return refused("wrong token");
                }
                if now_ms >= held.expires_at_ms {
                    return refused("expired");
                }
                TypedTurn::with_events(
                    json!({"renewed": true, "expires_at_ms": expires_at_ms}),
                    vec![LeaseEvent::Renewed { expires_at_ms }],
                )
                .effect(expiry_timer(expires_at_ms))
            }
            LeaseCommand::Release { holder, token } => match &state.held {
                // An expired grant not yet freed by its timer is still the holder's to release.
                Some(held) if held.holder == holder && held.token == token => {
                    TypedTurn::with_events(json!({"released": true}), vec![LeaseEvent::Released])
                        .effect(Effect::CancelTimer {
                            name: EXPIRY_TIMER.into(),
                        })
                }
                _ => TypedTurn::reply(json!({"released": false})),
            },
        })
    }

    /// The expiry timer frees the lease if the grant it was set for ran out by the timer's
    /// due time; after a renewal (a later expiry) it changes nothing.
    fn handle_info_at(
        &self,
        state: &LeaseState,
        info: Value,
        _now_ms: u64,
    ) -> Result<TypedTurn<LeaseEvent, Value>, BehaviourError> {
        let timer = timer_info(Self::TYPE_NAME, info)?;
        if timer.name != EXPIRY_TIMER {
            return Err(invalid(format!("unknown timer {:?}", timer.name)));
        }
        Ok(match &state.held {
            Some(held) if held.expires_at_ms <= timer.due_ms => {
                TypedTurn::with_events(Value::Null, vec![LeaseEvent::Expired])
            }
            _ => TypedTurn::reply(Value::Null),
        })
    }
}

fn expiry_timer(expires_at_ms: u64) -> Effect {
    Effect::SetTimer {
        name: EXPIRY_TIMER.into(),
        due: TimerDue::AtUnixMs(expires_at_ms),
        payload: Value::Null,
    }
}

/// When a grant of `ttl_ms` made at `now_ms` expires, after checking the ttl.
fn expiry(now_ms: u64, ttl_ms: u64) -> Result<u64, BehaviourError> {
    if ttl_ms == 0 || ttl_ms > TTL_MS_MAX {
        return Err(invalid(format!(
            "ttl_ms must be between 1 and {TTL_MS_MAX} (24 h), got {ttl_ms}"
        )));
    }
    Ok(now_ms.saturating_add(ttl_ms))
}

fn check_holder(holder: &str) -> Result<(), BehaviourError> {
    if holder.is_empty() {
        return Err(invalid("holder is empty".into()));
    }
    if holder.len() > HOLDER_BYTES_MAX {
        return Err(invalid(format!(
            "holder is {} bytes long; the limit is {HOLDER_BYTES_MAX}",
            holder.len()
        )));
    }
    Ok(())
}

fn invalid(text: String) -> BehaviourError {
    BehaviourError::InvalidMessage(format!("lease: {text}"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::behaviour::builtin::harness::{Entity, PendingTimer, Sim};
    use crate::behaviour::{timer_message, Typed};

    const T0: u64 = 1_700_000_000_000;

    fn acquire(holder: &str, ttl_ms: u64) -> Value {
        json!({"op": "acquire", "holder": holder, "ttl_ms": ttl_ms})
    }

    #[test]
    fn acquire_sets_the_expiry_timer_and_refuses_others() {
        let mut l = Sim::new(&Lease, T0);
        assert_eq!(
            l.send(json!({"op": "get"})).unwrap(),
            json!({"holder": null, "token": null, "expires_at_ms": null, "last_token": 0})
        );
        let turn = l.turn(acquire("a", 1000)).unwrap();
        assert_eq!(
            turn.reply,
            json!({"acquired": true, "token": 1, "holder": "a", "expires_at_ms": T0 + 1000})
        );
        assert_eq!(
            turn.effects,
            vec![Effect::SetTimer {
                name: "expiry".into(),
                due: TimerDue::AtUnixMs(T0 + 1000),
                payload: Value::Null,
            }]
        );
        l.now += 100;
        let turn = l.turn(acquire("b", 1000)).unwrap();
        assert_eq!(
            turn.reply,
            json!({"acquired": false, "holder": "a", "expires_at_ms": T0 + 1000})
        );
        assert!(turn.events.is_empty() && turn.effects.is_empty());
        assert_eq!(
            l.send(json!({"op": "get"})).unwrap(),
            json!({"holder": "a", "token": 1, "expires_at_ms": T0 + 1000, "last_token": 1})
        );
    }

    #[test]
    fn the_same_holder_acquiring_again_renews_with_its_token() {
        let mut l = Sim::new(&Lease, T0);
        l.send(acquire("a", 1000)).unwrap();
        l.now += 500;
        assert_eq!(
            l.send(acquire("a", 2000)).unwrap(),
            json!({"acquired": true, "token": 1, "holder": "a", "expires_at_ms": T0 + 2500})
        );
        assert_eq!(l.timers["expiry"].due_ms, T0 + 2500);
        assert_eq!(l.replayed(), l.state());
    }

    #[test]
    fn tokens_strictly_increase_across_expiry_and_release() {
        let mut l = Sim::new(&Lease, T0);
        let token = |reply: Value| reply["token"].as_u64().unwrap();
        assert_eq!(token(l.send(acquire("a", 1000)).unwrap()), 1);
        // Expired (the timer has not fired yet): free for anyone, with a new token.
        l.now += 1000;
        assert_eq!(l.send(json!({"op": "get"})).unwrap()["holder"], Value::Null);
        assert_eq!(token(l.send(acquire("a", 1000)).unwrap()), 2);
        assert_eq!(
            l.send(json!({"op": "release", "holder": "a", "token": 2}))
                .unwrap(),
            json!({"released": true})
        );
        assert!(l.timers.is_empty());
        assert_eq!(token(l.send(acquire("b", 1000)).unwrap()), 3);
        // The expiry timer frees it; the token count stays.
        let fired = l.advance(1000);
        assert_eq!(fired[0].events, vec![json!({"event": "expired"})]);
        assert_eq!(
            l.send(json!({"op": "get"})).unwrap(),
            json!({"holder": null, "token": null, "expires_at_ms": null, "last_token": 3})
        );
        assert_eq!(token(l.send(acquire("c", 1000)).unwrap()), 4);
        assert_eq!(l.replayed(), l.state());
    }

    #[test]
    fn renew_checks_holder_token_and_expiry() {
        let mut l = Sim::new(&Lease, T0);
        let renew = |holder: &str, token: u64| json!({"op": "renew", "holder": holder, "token": token, "ttl_ms": 1000});
        assert_eq!(
            l.send(renew("a", 1)).unwrap(),
            json!({"renewed": false, "reason": "not held"})
        );
        l.send(acquire("a", 1000)).unwrap();
        assert_eq!(
            l.send(renew("b", 1)).unwrap(),
            json!({"renewed": false, "reason": "held by another holder"})
        );
        assert_eq!(
            l.send(renew("a", 7)).unwrap(),
            json!({"renewed": false, "reason": "wrong token"})
        );
        l.now += 600;
        let turn = l.turn(renew("a", 1)).unwrap();
        assert_eq!(
            turn.reply,
            json!({"renewed": true, "expires_at_ms": T0 + 1600})
        );
        assert_eq!(
            l.timers["expiry"],
            PendingTimer {
                due_ms: T0 + 1600,
                payload: Value::Null
            }
        );
        l.now += 1000;
        assert_eq!(
            l.send(renew("a", 1)).unwrap(),
            json!({"renewed": false, "reason": "expired"})
        );
    }

    #[test]
    fn a_timer_set_before_a_renewal_frees_nothing() {
        let mut l = Sim::new(&Lease, T0);
        l.send(acquire("a", 1000)).unwrap();
        l.now += 500;
        l.send(json!({"op": "renew", "holder": "a", "token": 1, "ttl_ms": 1000}))
            .unwrap();
        // The first timer, had it fired before the renewal replaced it.
        let turn = l
            .info(timer_message("expiry", Value::Null, T0 + 1000))
            .unwrap();
        assert!(turn.events.is_empty());
        assert!(l.advance(999).is_empty());
        assert_eq!(l.advance(1)[0].events.len(), 1);
        assert_eq!(l.state()["held"], Value::Null);
        // A timer after a release finds nothing to free.
        let turn = l
            .info(timer_message("expiry", Value::Null, T0 + 9000))
            .unwrap();
        assert!(turn.events.is_empty());
    }

    #[test]
    fn release_needs_the_holder_and_its_token() {
        let mut l = Sim::new(&Lease, T0);
        let release =
            |holder: &str, token: u64| json!({"op": "release", "holder": holder, "token": token});
        assert_eq!(l.send(release("a", 1)).unwrap(), json!({"released": false}));
        l.send(acquire("a", 1000)).unwrap();
        for (holder, token) in [("b", 1), ("a", 2)] {
            let turn = l.turn(release(holder, token)).unwrap();
            assert_eq!(turn.reply, json!({"released": false}));
            assert!(turn.events.is_empty() && turn.effects.is_empty());
        }
        let turn = l.turn(release("a", 1)).unwrap();
        assert_eq!(turn.reply, json!({"released": true}));
        assert_eq!(
            turn.effects,
            vec![Effect::CancelTimer {
                name: "expiry".into()
            }]
        );
    }

    #[test]
    fn refuses_bad_messages() {
        let mut l = Sim::new(&Lease, T0);
        for bad in [
            acquire("", 1000),
            acquire("a", 0),
            acquire("a", TTL_MS_MAX + 1),
            acquire(&"h".repeat(HOLDER_BYTES_MAX + 1), 1000),
            json!({"op": "acquire", "holder": "a"}),
            json!({"op": "acquire", "holder": "a", "ttl_ms": -1}),
            json!({"op": "renew", "holder": "a", "token": 1, "ttl_ms": 0}),
            json!({"op": "release", "holder": "a"}),
            json!({"op": "steal"}),
        ] {
            let err = l.turn(bad.clone()).unwrap_err();
            assert!(
                matches!(err, BehaviourError::InvalidMessage(_)),
                "{bad} gave {err:?}"
            );
        }
        let err = l.send(acquire("a", 0)).unwrap_err();
        assert!(err.to_string().contains("ttl_ms"), "{err}");
        let err = l.info(timer_message("other", Value::Null, T0)).unwrap_err();
        assert!(err.to_string().contains("unknown timer"), "{err}");
        assert!(l.journal.is_empty());
    }

    #[test]
    fn runs_through_the_erased_interface() {
        let lease = Typed(Lease);
        let mut e = Entity::new(&lease);
        let reply = e.send(acquire("a", 60_000)).unwrap();
        assert_eq!(reply["token"], json!(1));
        let expires = reply["expires_at_ms"].as_u64().unwrap();
        assert!(expires > T0);
        assert_eq!(
            e.send(acquire("b", 1000)).unwrap()["acquired"],
            json!(false)
        );
        let turn = e
            .info(timer_message("expiry", Value::Null, expires))
            .unwrap();
        assert_eq!(turn.events, vec![json!({"event": "expired"})]);
        assert_eq!(e.state(), json!({"held": null, "last_token": 1}));
    }
}
