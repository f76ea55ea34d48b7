//! `rate_limiter`: a token bucket.
//!
//! **Owns**: the bucket's state, messages and events, and the refill arithmetic.
//!
//! The bucket holds up to `burst` tokens and starts full; it refills continuously at
//! `rate_per_sec` tokens per second. A request costing `cost` tokens is allowed when that many
//! are there, and takes them. State: `{"config": {"rate_per_sec": R, "burst": B} | null,
//! "tokens": T, "updated_ms": U}` (`tokens` as of `updated_ms`, the time of the last change).
//!
//! Messages (`rate_per_sec` > 0, `burst` ≥ 1, 1 ≤ `cost` ≤ `burst`):
//! - `{"op":"acquire","cost":C,"rate_per_sec":R,"burst":B}` (`cost` defaults to 1;
//!   `rate_per_sec` and `burst` are needed until the bucket is configured, optional after, and
//!   a change is recorded) → `{"allowed":true,"remaining":F,"retry_after_ms":0}` or
//!   `{"allowed":false,"remaining":F,"retry_after_ms":N}`, `F` the whole tokens left and `N`
//!   the time until `C` tokens are there. Only an allowed request writes an event (a denied
//!   one writes nothing but a configuration change, if it carried one);
//! - `{"op":"configure","rate_per_sec":R,"burst":B}` → `{"rate_per_sec":R,"burst":B,
//!   "tokens":T}` (lowering `burst` drops tokens above it);
//! - `{"op":"get"}` → `{"tokens":T,"rate_per_sec":R,"burst":B}` (nulls before configuration).
//!
//! Events carry the time of the decision, so replay computes the same refills.

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::Clocked;
use crate::behaviour::{now_unix_ms, BehaviourError, TypedBehaviour, TypedTurn, Value};

/// The `rate_limiter` behaviour.
pub struct RateLimiter;

/// The highest rate accepted, in tokens per second.
pub const RATE_PER_SEC_MAX: f64 = 1e9;
/// The largest bucket accepted (tokens stay exact as doubles far beyond it).
pub const BURST_MAX: u64 = 1_000_000_000_000;
/// Tolerance for the float refill arithmetic: a bucket this close to `cost` has it.
const EPSILON: f64 = 1e-9;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub rate_per_sec: f64,
    pub burst: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterState {
    pub config: Option<Config>,
    /// Tokens as of `updated_ms`.
    pub tokens: f64,
    pub updated_ms: u64,
}

impl RateLimiterState {
    /// The tokens in the bucket at `now_ms` (no refill for a clock that went backwards).
    pub fn tokens_at(&self, now_ms: u64) -> f64 {
        let Some(config) = self.config else {
            return 0.0;
        };
        let elapsed_ms = now_ms.saturating_sub(self.updated_ms) as f64;
        (self.tokens + elapsed_ms * config.rate_per_sec / 1000.0).min(config.burst as f64)
    }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum RateLimiterCommand {
    Acquire {
        #[serde(default = "one")]
        cost: u64,
        #[serde(default)]
        rate_per_sec: Option<f64>,
        #[serde(default)]
        burst: Option<u64>,
    },
    Configure {
        rate_per_sec: f64,
        burst: u64,
    },
    Get,
}

fn one() -> u64 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum RateLimiterEvent {
    /// The bucket's rate and size from `at_ms` on (a new bucket starts full).
    Configured {
        rate_per_sec: f64,
        burst: u64,
        at_ms: u64,
    },
    /// An allowed request took `cost` tokens at `at_ms`.
    Acquired { cost: u64, at_ms: u64 },
}

impl TypedBehaviour for RateLimiter {
    type State = RateLimiterState;
    type Command = RateLimiterCommand;
    type Event = RateLimiterEvent;
    type Reply = Value;

    const TYPE_NAME: &'static str = "rate_limiter";

    fn init(&self, _key: &str) -> RateLimiterState {
        RateLimiterState::default()
    }

    fn handle(
        &self,
        state: &RateLimiterState,
        command: RateLimiterCommand,
    ) -> Result<TypedTurn<RateLimiterEvent, Value>, BehaviourError> {
        self.handle_at(state, command, now_unix_ms())
    }

    fn apply(&self, state: &mut RateLimiterState, event: RateLimiterEvent) {
        match event {
            RateLimiterEvent::Configured {
                rate_per_sec,
                burst,
                at_ms,
            } => {
                let tokens = match state.config {
                    None => burst as f64,
                    Some(_) => state.tokens_at(at_ms).min(burst as f64),
                };
                state.config = Some(Config {
                    rate_per_sec,
                    burst,
                });
                state.tokens = tokens;
                state.updated_ms = state.updated_ms.max(at_ms);
            }
            RateLimiterEvent::Acquired { cost, at_ms } => {
                state.tokens = (state.tokens_at(at_ms) - cost as f64).max(0.0);
                state.updated_ms = state.updated_ms.max(at_ms);
            }
        }
    }
}

impl Clocked for RateLimiter {
    fn handle_at(
        &self,
        state: &RateLimiterState,
        command: RateLimiterCommand,
        now_ms: u64,
    ) -> Result<TypedTurn<RateLimiterEvent, Value>, BehaviourError> {
        match command {
            RateLimiterCommand::Get => Ok(TypedTurn::reply(match state.config {
                Some(config) => json!({
                    "tokens": round_down(state.tokens_at(now_ms)),
                    "rate_per_sec": config.rate_per_sec,
                    "burst": config.burst,
                }),
                None => json!({"tokens": null, "rate_per_sec": null, "burst": null}),
            })),
            RateLimiterCommand::Configure {
                rate_per_sec,
                burst,
            } => {
                let config = check_config(Config {
                    rate_per_sec,
                    burst,
                })?;
                let (after, events) = self.configured(state, config, now_ms);
                let reply = json!({
                    "rate_per_sec": config.rate_per_sec,
                    "burst": config.burst,
                    "tokens": round_down(after.tokens_at(now_ms)),
                });
                Ok(TypedTurn::with_events(reply, events))
            }
            RateLimiterCommand::Acquire {
                cost,
                rate_per_sec,
                burst,
            } => {
                let config = match (state.config, rate_per_sec, burst) {
                    (_, Some(rate_per_sec), Some(burst)) => Config {
                        rate_per_sec,
                        burst,
                    },
                    (Some(current), rate_per_sec, burst) => Config {
                        rate_per_sec: rate_per_sec.unwrap_or(current.rate_per_sec),
                        burst: burst.unwrap_or(current.burst),
                    },
                    (None, _, _) => {
                        return Err(invalid(
                            "the bucket is not configured yet: give rate_per_sec and burst".into(),
                        ))
                    }
                };
                let config = check_config(config)?;
                if cost == 0 || cost > config.burst {
                    return Err(invalid(format!(
                        "cost must be between 1 and burst ({}), got {cost}: a cost above burst \
                         could never be allowed",
                        config.burst
                    )));
                }
                let (after, mut events) = self.configured(state, config, now_ms);
                let available = after.tokens_at(now_ms);
                let cost_f = cost as f64;
                let reply = if available + EPSILON >= cost_f {
                    events.push(RateLimiterEvent::Acquired {
                        cost,
                        at_ms: now_ms,
                    });
                    json!({
                        "allowed": true,
                        "remaining": whole(available - cost_f),
                        "retry_after_ms": 0,
                    })
                } else {
                    json!({
                        "allowed": false,
                        "remaining": whole(available),
                        "retry_after_ms": retry_after_ms(available, cost_f, config.rate_per_sec),
                    })
                };
                Ok(TypedTurn::with_events(reply, events))
            }
        }
    }
}

impl RateLimiter {
    /// The state after `config` takes effect at `now_ms`, and the event recording it (none
    /// when it is the current configuration).
    fn configured(
        &self,
        state: &RateLimiterState,
        config: Config,
        now_ms: u64,
    ) -> (RateLimiterState, Vec<RateLimiterEvent>) {
        let mut after = state.clone();
        if state.config == Some(config) {
            return (after, Vec::new());
        }
        let event = RateLimiterEvent::Configured {
            rate_per_sec: config.rate_per_sec,
            burst: config.burst,
            at_ms: now_ms,
        };
        self.apply(&mut after, event.clone());
        (after, vec![event])
    }
}

/// The milliseconds until a bucket holding `available` tokens has `cost`, at least 1.
pub fn retry_after_ms(available: f64, cost: f64, rate_per_sec: f64) -> u64 {
    let ms = ((cost - available) * 1000.0 / rate_per_sec).ceil();
    if ms.is_finite() && ms >= 1.0 {
        ms as u64
    } else {
        1
    }
}

fn check_config(config: Config) -> Result<Config, BehaviourError> {
    let Config {
        rate_per_sec,
        burst,
    } = config;
    if !(rate_per_sec > 0.0 && rate_per_sec <= RATE_PER_SEC_MAX) {
        return Err(invalid(format!(
            "rate_per_sec must be above 0 and at most {RATE_PER_SEC_MAX}, got {rate_per_sec}"
        )));
    }
    if burst == 0 || burst > BURST_MAX {
        return Err(invalid(format!(
            "burst must be between 1 and {BURST_MAX}, got {burst}"
        )));
    }
    Ok(config)
}

/// Whole tokens, for replies.
fn whole(tokens: f64) -> u64 {
    (tokens + EPSILON).floor().max(0.0) as u64
}

/// Tokens to a thousandth, rounded down, for `get`.
fn round_down(tokens: f64) -> f64 {
    ((tokens + EPSILON) * 1000.0).floor().max(0.0) / 1000.0
}

fn invalid(text: String) -> BehaviourError {
    BehaviourError::InvalidMessage(format!("rate_limiter: {text}"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::behaviour::builtin::harness::{Entity, Sim};
    use crate::behaviour::Typed;

    const T0: u64 = 1_700_000_000_000;

    fn acquire(cost: u64) -> Value {
        json!({"op": "acquire", "cost": cost})
    }

    #[test]
    fn starts_full_and_refills_continuously() {
        let mut r = Sim::new(&RateLimiter, T0);
        assert_eq!(
            r.send(json!({"op": "acquire", "rate_per_sec": 2, "burst": 3}))
                .unwrap(),
            json!({"allowed": true, "remaining": 2, "retry_after_ms": 0})
        );
        assert_eq!(
            r.send(acquire(2)).unwrap(),
            json!({"allowed": true, "remaining": 0, "retry_after_ms": 0})
        );
        let turn = r.turn(acquire(1)).unwrap();
        assert_eq!(
            turn.reply,
            json!({"allowed": false, "remaining": 0, "retry_after_ms": 500})
        );
        assert!(turn.events.is_empty());
        r.now += 499;
        assert_eq!(r.send(acquire(1)).unwrap()["allowed"], json!(false));
        r.now += 1;
        assert_eq!(r.send(acquire(1)).unwrap()["allowed"], json!(true));
        // Refill stops at burst.
        r.now += 60_000;
        assert_eq!(
            r.send(json!({"op": "get"})).unwrap(),
            json!({"tokens": 3.0, "rate_per_sec": 2.0, "burst": 3})
        );
        assert_eq!(r.replayed(), r.state());
    }

    #[test]
    fn retry_after_is_the_time_until_enough_tokens() {
        let mut r = Sim::new(&RateLimiter, T0);
        r.send(json!({"op": "configure", "rate_per_sec": 4, "burst": 10}))
            .unwrap();
        r.send(acquire(10)).unwrap();
        r.now += 100; // 0.4 tokens
        let reply = r.send(acquire(3)).unwrap();
        assert_eq!(
            reply,
            json!({"allowed": false, "remaining": 0, "retry_after_ms": 650})
        );
        r.now += 650;
        assert_eq!(
            r.send(acquire(3)).unwrap(),
            json!({"allowed": true, "remaining": 0, "retry_after_ms": 0})
        );
        assert_eq!(retry_after_ms(0.999_999_999_9, 1.0, 1.0), 1);
    }

    #[test]
    fn a_steady_stream_over_ten_seconds_gets_burst_plus_rate_times_ten() {
        for (rate, burst, every_ms) in [(5.0, 10, 10), (100.0, 1, 1), (0.5, 3, 7), (33.0, 50, 3)] {
            let mut r = Sim::new(&RateLimiter, T0);
            r.send(json!({"op": "configure", "rate_per_sec": rate, "burst": burst}))
                .unwrap();
            let mut allowed = 0u64;
            let end = T0 + 10_000;
            while r.now < end {
                if r.send(acquire(1)).unwrap()["allowed"] == json!(true) {
                    allowed += 1;
                }
                r.now += every_ms;
            }
            let expected = burst as f64 + rate * 10.0;
            assert!(
                (allowed as f64 - expected).abs() <= 2.0,
                "rate {rate} burst {burst}: {allowed} allowed, expected about {expected}"
            );
            assert_eq!(r.journal.len() as u64, allowed + 1);
            assert_eq!(r.replayed(), r.state());
        }
    }

    #[test]
    fn configuration_changes_are_recorded_and_clamp_tokens() {
        let mut r = Sim::new(&RateLimiter, T0);
        assert_eq!(
            r.send(json!({"op": "get"})).unwrap(),
            json!({"tokens": null, "rate_per_sec": null, "burst": null})
        );
        r.send(json!({"op": "configure", "rate_per_sec": 1, "burst": 10}))
            .unwrap();
        // The same configuration again writes nothing.
        let turn = r
            .turn(json!({"op": "configure", "rate_per_sec": 1, "burst": 10}))
            .unwrap();
        assert!(turn.events.is_empty());
        let turn = r
            .turn(json!({"op": "acquire", "rate_per_sec": 1, "burst": 10}))
            .unwrap();
        assert_eq!(turn.events.len(), 1);
        // A smaller burst drops tokens above it.
        let turn = r.turn(json!({"op": "acquire", "burst": 4})).unwrap();
        assert_eq!(
            turn.reply,
            json!({"allowed": true, "remaining": 3, "retry_after_ms": 0})
        );
        assert_eq!(turn.events.len(), 2);
        assert_eq!(
            r.send(json!({"op": "get"})).unwrap(),
            json!({"tokens": 3.0, "rate_per_sec": 1.0, "burst": 4})
        );
        // A denied request with a new rate records only the change.
        r.send(acquire(3)).unwrap();
        let turn = r
            .turn(json!({"op": "acquire", "cost": 2, "rate_per_sec": 10}))
            .unwrap();
        assert_eq!(
            turn.reply,
            json!({"allowed": false, "remaining": 0, "retry_after_ms": 200})
        );
        assert_eq!(
            turn.events,
            vec![json!({"event": "configured", "rate_per_sec": 10.0, "burst": 4, "at_ms": T0})]
        );
        assert_eq!(r.replayed(), r.state());
    }

    #[test]
    fn a_clock_going_backwards_refills_nothing() {
        let mut r = Sim::new(&RateLimiter, T0);
        r.send(json!({"op": "acquire", "cost": 2, "rate_per_sec": 1, "burst": 2}))
            .unwrap();
        r.now -= 5000;
        assert_eq!(r.send(acquire(1)).unwrap()["allowed"], json!(false));
        r.now = T0 + 1000;
        assert_eq!(r.send(acquire(1)).unwrap()["allowed"], json!(true));
        assert_eq!(r.replayed(), r.state());
    }

    #[test]
    fn refuses_bad_messages() {
        let mut r = Sim::new(&RateLimiter, T0);
        for bad in [
            json!({"op": "acquire"}),
            json!({"op": "acquire", "rate_per_sec": 1}),
            json!({"op": "acquire", "rate_per_sec": 0, "burst": 1}),
            json!({"op": "acquire", "rate_per_sec": -1, "burst": 1}),
            json!({"op": "acquire", "rate_per_sec": 1, "burst": 0}),
            json!({"op": "acquire", "rate_per_sec": 1, "burst": 5, "cost": 6}),
            json!({"op": "acquire", "rate_per_sec": 1, "burst": 5, "cost": 0}),
            json!({"op": "acquire", "rate_per_sec": 1, "burst": 5, "cost": 1.5}),
            json!({"op": "configure", "rate_per_sec": 1}),
            json!({"op": "configure", "rate_per_sec": 2e9, "burst": 1}),
            json!({"op": "refill"}),
        ] {
            let err = r.turn(bad.clone()).unwrap_err();
            assert!(
                matches!(err, BehaviourError::InvalidMessage(_)),
                "{bad} gave {err:?}"
            );
        }
        let err = r
            .send(json!({"op": "acquire", "rate_per_sec": 1, "burst": 5, "cost": 6}))
            .unwrap_err();
        assert!(err.to_string().contains("could never be allowed"), "{err}");
        let err = r.send(json!({"op": "acquire"})).unwrap_err();
        assert!(err.to_string().contains("not configured"), "{err}");
        assert!(r.journal.is_empty());
    }

    #[test]
    fn runs_through_the_erased_interface() {
        let limiter = Typed(RateLimiter);
        let mut e = Entity::new(&limiter);
        let first = json!({"op": "acquire", "rate_per_sec": 0.001, "burst": 2});
        assert_eq!(e.send(first).unwrap()["allowed"], json!(true));
        assert_eq!(e.send(acquire(1)).unwrap()["allowed"], json!(true));
        let denied = e.send(acquire(1)).unwrap();
        assert_eq!(denied["allowed"], json!(false));
        assert!(denied["retry_after_ms"].as_u64().unwrap() > 900_000);
        assert_eq!(e.events, 3);
    }
}
