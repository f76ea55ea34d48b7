//! Lua behaviours driven through the erased [`Behaviour`] trait, as the engine drives them:
//! `handle` → commit → `apply` each event → `state_to_value`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::*;
use crate::address::EntityId;
use crate::behaviour::{Effect, TimerDue};

const CART_V1: &str = include_str!("examples/cart_v1.lua");
const CART_V2: &str = include_str!("examples/cart_v2.lua");
const CART_PLAIN: &str = include_str!("examples/cart_plain.lua");

fn compile(source: &str) -> LuaBehaviour {
    match LuaBehaviour::compile("cart", 1, source, LuaLimits::default()) {
        Ok(behaviour) => behaviour,
        Err(error) => panic!("script does not compile: {error}"),
    }
}

fn compile_error(source: &str) -> LuaError {
    match LuaBehaviour::compile("cart", 1, source, LuaLimits::default()) {
        Ok(_) => panic!("script compiled, but should have been refused"),
        Err(error) => error,
    }
}

/// Limits small enough that a runaway script is stopped quickly in a debug build.
fn tight_limits() -> LuaLimits {
    LuaLimits {
        instructions_max: 200_000,
        memory_bytes_max: 8 * 1024 * 1024,
        call_timeout: Duration::from_secs(5),
    }
}

/// One entity as the engine runs it: the committed state, the committed events.
struct Entity<'a> {
    behaviour: &'a LuaBehaviour,
    key: String,
    state: ErasedState,
    journal: Vec<Value>,
}

impl<'a> Entity<'a> {
    fn new(behaviour: &'a LuaBehaviour, key: &str) -> Self {
        Entity {
            behaviour,
            key: key.to_owned(),
            state: behaviour.initial_state(key),
            journal: Vec::new(),
        }
    }

    fn commit(&mut self, turn: Turn) -> Result<Turn, BehaviourError> {
        for event in &turn.events {
            self.behaviour.apply(&mut self.state, event)?;
            self.journal.push(event.clone());
        }
        Ok(turn)
    }

    fn turn(&mut self, message: Value) -> Result<Turn, BehaviourError> {
        let turn = self.behaviour.handle(&self.key, &self.state, message)?;
        self.commit(turn)
    }

    fn call(&mut self, message: Value) -> Result<Value, BehaviourError> {
        self.turn(message).map(|turn| turn.reply)
    }

    fn cast(&mut self, message: Value) -> Result<Turn, BehaviourError> {
        let turn = self
            .behaviour
            .handle_cast(&self.key, &self.state, message)?;
        self.commit(turn)
    }

    fn value(&self) -> Value {
        match self.behaviour.state_to_value(&self.state) {
            Ok(value) => value,
            Err(error) => panic!("state does not convert: {error}"),
        }
    }

    /// Recovery: the initial state and the journal replayed through `apply`.
    fn replayed(&self) -> Value {
        let mut state = self.behaviour.initial_state(&self.key);
        for event in &self.journal {
            self.behaviour.apply(&mut state, event).unwrap();
        }
        self.behaviour.state_to_value(&state).unwrap()
    }
}

fn failed(result: Result<impl std::fmt::Debug, BehaviourError>) -> String {
    match result {
        Err(BehaviourError::Failed(message)) => message,
        other => panic!("expected Failed, got {other:?}"),
    }
}

fn invalid(result: Result<impl std::fmt::Debug, BehaviourError>) -> String {
    match result {
        Err(BehaviourError::InvalidMessage(message)) => message,
        other => panic!("expected InvalidMessage, got {other:?}"),
    }
}

// --- The cart, version 1 (with apply) ---

#[test]
fn cart_v1_adds_removes_totals_and_checks_out() {
    let cart = compile(CART_V1);
    assert_eq!(cart.type_name(), "cart");
    assert_eq!(cart.version(), 1);
    assert!(cart.has_apply());
    assert_eq!(cart.source(), CART_V1);
    let mut alice = Entity::new(&cart, "alice");
    assert_eq!(alice.value(), json!({"items": {}, "status": "open"}));

    let reply = alice.call(json!({"op": "add", "sku": "apple", "price": 0.5, "qty": 2}));
    assert_eq!(reply, Ok(json!({"sku": "apple", "qty": 2})));
    let reply = alice.call(json!({"op": "add", "sku": "pear", "price": 1.25}));
    assert_eq!(reply, Ok(json!({"sku": "pear", "qty": 1})));
    let reply = alice.call(json!({"op": "add", "sku": "apple", "price": 0.5}));
    assert_eq!(reply, Ok(json!({"sku": "apple", "qty": 3})));
    assert_eq!(
        alice.call(json!({"op": "total"})),
        Ok(json!({"total": 2.75, "count": 4}))
    );
    let reply = alice.call(json!({"op": "remove", "sku": "apple", "qty": 2}));
    assert_eq!(reply, Ok(json!({"sku": "apple", "qty": 1})));
    assert_eq!(
        alice.value(),
        json!({
            "items": {"apple": {"qty": 1, "price": 0.5}, "pear": {"qty": 1, "price": 1.25}},
            "status": "open",
        })
    );
    // Each decision is one event; a read is none.
    let turn = alice.turn(json!({"op": "total"})).unwrap();
    assert!(turn.events.is_empty());
    assert_eq!(alice.journal.len(), 4);
    assert_eq!(
        alice.journal[3],
        json!({"type": "removed", "sku": "apple", "qty": 2})
    );

    let checkout = cart
        .handle_at(
            LuaMessageKind::Call,
            "alice",
            &alice.state,
            json!({"op": "checkout"}),
            1_700_000_000_123,
        )
        .unwrap();
    assert_eq!(
        checkout.reply,
        json!({"total": 1.75, "count": 2, "at": 1_700_000_000_123_u64})
    );
    alice.commit(checkout).unwrap();
    assert_eq!(alice.value()["status"], "checked_out");
    assert_eq!(alice.value()["checked_out_at"], 1_700_000_000_123_u64);

    // Refusals change nothing.
    let before = alice.value();
    let refused = invalid(alice.call(json!({"op": "add", "sku": "fig", "price": 1})));
    assert_eq!(refused, "the cart is checked out");
    assert_eq!(alice.value(), before);
    assert_eq!(alice.replayed(), before);
}

#[test]
fn cart_v1_refuses_bad_messages() {
    let cart = compile(CART_V1);
    let mut bob = Entity::new(&cart, "bob");
    assert_eq!(invalid(bob.call(json!({"op": "fly"}))), "unknown op: fly");
    assert_eq!(
        invalid(bob.call(json!({"op": "add", "sku": "apple", "price": 1, "qty": 1.5}))),
        "qty must be a positive integer"
    );
    assert_eq!(
        invalid(bob.call(json!({"op": "remove", "sku": "kiwi"}))),
        "no such item: kiwi"
    );
    assert_eq!(
        invalid(bob.call(json!({"op": "checkout"}))),
        "the cart is empty"
    );
    assert!(bob.journal.is_empty());
}

#[test]
fn cart_v1_replay_rebuilds_the_live_state() {
    let cart = compile(CART_V1);
    let mut carol = Entity::new(&cart, "carol");
    for (sku, price) in [("a", 1.0), ("b", 2.5), ("c", 0.25), ("a", 1.5)] {
        carol
            .call(json!({"op": "add", "sku": sku, "price": price}))
            .unwrap();
    }
    carol.call(json!({"op": "remove", "sku": "b"})).unwrap();
    assert_eq!(carol.replayed(), carol.value());
    // A snapshot round trip (state_to_value → state_from_value) changes nothing either.
    let restored = cart.state_from_value(carol.value()).unwrap();
    assert_eq!(cart.state_to_value(&restored).unwrap(), carol.value());
}

#[test]
fn cart_v1_handles_casts_without_a_reply() {
    let cart = compile(CART_V1);
    let mut dave = Entity::new(&cart, "dave");
    let turn = dave
        .cast(json!({"op": "add", "sku": "apple", "price": 0.5}))
        .unwrap();
    assert_eq!(turn.reply, Value::Null);
    assert_eq!(turn.events.len(), 1);
    assert_eq!(dave.value()["items"]["apple"]["qty"], 1);
    // A refused cast is a refusal too.
    invalid(dave.cast(json!({"op": "nope"})));
}

// --- Version 2 and migrate ---

#[test]
fn cart_v2_migrates_a_v1_state_and_carries_on() {
    let v1 = compile(CART_V1);
    let v2 = LuaBehaviour::compile("cart", 2, CART_V2, LuaLimits::default()).unwrap();
    assert_eq!(v2.version(), 2);
    let mut old = Entity::new(&v1, "erin");
    old.call(json!({"op": "add", "sku": "pear", "price": 1.25, "qty": 2}))
        .unwrap();
    old.call(json!({"op": "add", "sku": "apple", "price": 0.5}))
        .unwrap();
    let before = old.value();

    let migrated = v2.migrate(1, &old.state).unwrap();
    // The old state is untouched and still readable by the old version.
    assert_eq!(v1.state_to_value(&old.state).unwrap(), before);
    let mut new = Entity {
        behaviour: &v2,
        key: "erin".into(),
        state: migrated,
        journal: Vec::new(),
    };
    assert_eq!(
        new.value(),
        json!({
            "lines": [
                {"sku": "apple", "qty": 1, "unit_cents": 50},
                {"sku": "pear", "qty": 2, "unit_cents": 125},
            ],
            "status": "open",
        })
    );
    assert_eq!(
        new.call(json!({"op": "total"})),
        Ok(json!({"total_cents": 300, "count": 3}))
    );
    new.call(json!({"op": "add", "sku": "banana", "unit_cents": 20, "qty": 5}))
        .unwrap();
    new.call(json!({"op": "remove", "sku": "apple"})).unwrap();
    assert_eq!(
        new.value()["lines"],
        json!([
            {"sku": "banana", "qty": 5, "unit_cents": 20},
            {"sku": "pear", "qty": 2, "unit_cents": 125},
        ])
    );
    // v1 messages are now refused with v2's reasons.
    assert_eq!(
        invalid(new.call(json!({"op": "add", "sku": "fig", "price": 1}))),
        "add needs unit_cents"
    );
}

#[test]
fn cart_v2_starts_with_an_empty_list_not_an_empty_map() {
    let v2 = LuaBehaviour::compile("cart", 2, CART_V2, LuaLimits::default()).unwrap();
    let mut fresh = Entity::new(&v2, "frank");
    assert_eq!(fresh.value(), json!({"lines": [], "status": "open"}));
    // An emptied list stays a list through apply: it came from JSON as an array.
    fresh
        .call(json!({"op": "add", "sku": "a", "unit_cents": 1}))
        .unwrap();
    fresh.call(json!({"op": "remove", "sku": "a"})).unwrap();
    assert_eq!(fresh.value()["lines"], json!([]));
    assert_eq!(fresh.replayed(), fresh.value());
}

#[test]
fn a_failing_migrate_is_a_crash_and_leaves_the_state_alone() {
    let v1 = compile(CART_V1);
    let v2 = LuaBehaviour::compile("cart", 2, CART_V2, LuaLimits::default()).unwrap();
    let mut old = Entity::new(&v1, "gail");
    old.call(json!({"op": "add", "sku": "a", "price": 1}))
        .unwrap();
    let before = old.value();
    let message = failed(v2.migrate(7, &old.state));
    assert!(
        message.contains("cart v2 cannot migrate from version 7"),
        "{message}"
    );
    assert_eq!(v1.state_to_value(&old.state).unwrap(), before);
}

#[test]
fn migrate_is_the_identity_without_a_migrate_function() {
    let v1 = compile(CART_V1);
    let mut old = Entity::new(&v1, "hal");
    old.call(json!({"op": "add", "sku": "a", "price": 1}))
        .unwrap();
    let same = v1.migrate(1, &old.state).unwrap();
    assert_eq!(v1.state_to_value(&same).unwrap(), old.value());
}

#[test]
fn migrate_refuses_a_state_from_another_kind_of_behaviour() {
    let v1 = compile(CART_V1);
    let foreign: ErasedState = Box::new(42_u32);
    assert!(failed(v1.migrate(1, &foreign)).contains("not created by a Lua behaviour"));
}

// --- Without apply: the new state is the event ---

#[test]
fn without_apply_the_new_state_is_the_event() {
    let cart = compile(CART_PLAIN);
    assert!(!cart.has_apply());
    let mut ivy = Entity::new(&cart, "ivy");
    let turn = ivy
        .turn(json!({"op": "add", "sku": "apple", "price": 0.5, "qty": 2}))
        .unwrap();
    assert_eq!(turn.reply, json!({"sku": "apple", "qty": 2}));
    assert_eq!(
        turn.events,
        vec![json!({"items": {"apple": {"qty": 2, "price": 0.5}}, "status": "open"})]
    );
    // A read returns no new state: no event.
    let turn = ivy.turn(json!({"op": "total"})).unwrap();
    assert_eq!(turn.reply, json!({"total": 1, "count": 2}));
    assert!(turn.events.is_empty());
    // `remove` changes the table in place and returns only the reply: that is the new state.
    let turn = ivy
        .turn(json!({"op": "remove", "sku": "apple", "qty": 1}))
        .unwrap();
    assert_eq!(turn.events.len(), 1);
    assert_eq!(ivy.value()["items"]["apple"]["qty"], 1);
    // Without handle_cast a cast runs handle_call and drops the reply.
    let turn = ivy
        .cast(json!({"op": "add", "sku": "pear", "price": 2}))
        .unwrap();
    assert_eq!(turn.reply, Value::Null);
    assert_eq!(ivy.value()["items"]["pear"]["qty"], 1);
    // Replay is "take the last state".
    assert_eq!(ivy.replayed(), ivy.value());
    assert_eq!(ivy.journal.len(), 3);
}

#[test]
fn without_apply_emit_is_refused() {
    let cart = compile(
        r#"
        function init() return {} end
        function handle_call(msg, state, ctx) ctx.emit({x = 1}) return 1 end
        "#,
    );
    let mut entity = Entity::new(&cart, "k");
    let message = failed(entity.call(json!({})));
    assert!(message.contains("ctx.emit needs an apply"), "{message}");
}

#[test]
fn with_apply_returning_a_state_or_changing_it_in_place_is_refused() {
    let source = r#"
        function init() return {n = 0} end
        function apply(state, event) state.n += event.by end
        function handle_call(msg, state, ctx)
            if msg.op == "return" then return "ok", {n = 5} end
            state.n = 5
            return "ok"
        end
    "#;
    let behaviour = compile(source);
    let mut entity = Entity::new(&behaviour, "k");
    let message = failed(entity.call(json!({"op": "return"})));
    assert!(message.contains("returned a new state"), "{message}");
    let message = failed(entity.call(json!({"op": "in place"})));
    assert!(message.contains("readonly"), "{message}");
    assert_eq!(entity.value(), json!({"n": 0}));
}

// --- ctx, info, effects ---

#[test]
fn ctx_gives_key_now_and_effects() {
    let source = r#"
        function init(key) return {seen = array()} end
        function handle_call(msg, state, ctx)
            if msg.op == "watch" then
                ctx.monitor("cart", msg.key)
            elseif msg.op == "unwatch" then
                ctx.demonitor("cart", msg.key)
            end
            return {key = ctx.key, now = ctx.now}
        end
        function handle_info(info, state, ctx)
            table.insert(state.seen, info.key)
            return state
        end
    "#;
    let behaviour = compile(source);
    let state = behaviour.initial_state("w");
    let turn = behaviour
        .handle_at(
            LuaMessageKind::Call,
            "w",
            &state,
            json!({"op": "watch", "key": "alice"}),
            42,
        )
        .unwrap();
    assert_eq!(turn.reply, json!({"key": "w", "now": 42}));
    let alice = EntityId::new("cart", "alice").unwrap();
    assert_eq!(turn.effects, vec![Effect::Monitor(alice.clone())]);
    let turn = behaviour
        .handle("w", &state, json!({"op": "unwatch", "key": "alice"}))
        .unwrap();
    assert_eq!(turn.effects, vec![Effect::Demonitor(alice.clone())]);
    // `now` defaults to the wall clock.
    assert!(turn.reply["now"].as_u64().unwrap() > 1_600_000_000_000);

    let down = crate::behaviour::down_message(&alice, "crashed", "boom");
    let turn = behaviour.handle_info("w", &state, down).unwrap();
    assert_eq!(turn.events, vec![json!({"seen": ["alice"]})]);

    let message = failed(behaviour.handle("w", &state, json!({"op": "watch", "key": ""})));
    assert!(
        message.contains("ctx.monitor: entity key is empty"),
        "{message}"
    );
}

#[test]
fn ctx_timer_send_and_request_functions_record_effects() {
    let source = r#"
        function init(key) return {} end
        function handle_call(msg, state, ctx)
            ctx.set_timer("tick", 1500, {n = 1})
            ctx.set_timer_at("deadline", ctx.now + 60000)
            ctx.cancel_timer("old")
            ctx.send("counter", "c1", {op = "incr", by = 2})
            ctx.request("kv", "profile", {op = "get", field = "name"}, {step = "lookup", n = 7})
            ctx.request("kv", "profile", {op = "fields"}, "plain tag")
            return "ok"
        end
    "#;
    let behaviour = compile(source);
    let state = behaviour.initial_state("k");
    let turn = behaviour
        .handle_at(LuaMessageKind::Call, "k", &state, json!({}), 1_000)
        .unwrap();
    assert_eq!(turn.reply, json!("ok"));
    assert!(turn.events.is_empty());
    assert_eq!(
        turn.effects,
        vec![
            Effect::SetTimer {
                name: "tick".into(),
                due: TimerDue::AfterMs(1500),
                payload: json!({"n": 1}),
            },
            Effect::SetTimer {
                name: "deadline".into(),
                due: TimerDue::AtUnixMs(61_000),
                payload: Value::Null,
            },
            Effect::CancelTimer { name: "old".into() },
            Effect::Send {
                to: EntityId::new("counter", "c1").unwrap(),
                message: json!({"op": "incr", "by": 2}),
            },
            Effect::Request {
                to: EntityId::new("kv", "profile").unwrap(),
                message: json!({"op": "get", "field": "name"}),
                tag: json!({"step": "lookup", "n": 7}),
            },
            Effect::Request {
                to: EntityId::new("kv", "profile").unwrap(),
                message: json!({"op": "fields"}),
                tag: json!("plain tag"),
            },
        ]
    );
}

/// A reminder: `remind` sets a timer and records it; the timer's info message fires it.
const REMINDER: &str = r#"
    function init(key) return {pending = {}, fired = array()} end
    function apply(state, event)
        if event.type == "scheduled" then
            state.pending[event.name] = event.text
        elseif event.type == "fired" then
            state.pending[event.name] = nil
            table.insert(state.fired, {name = event.name, text = event.text, due = event.due})
        end
    end
    function handle_call(msg, state, ctx)
        if msg.op ~= "remind" then error({invalid = "unknown op"}) end
        local name = "remind:" .. msg.id
        ctx.set_timer(name, msg.after_ms, {text = msg.text})
        ctx.emit({type = "scheduled", name = name, text = msg.text})
        return {name = name}
    end
    function handle_info(info, state, ctx)
        if info.info == "timer" and state.pending[info.name] ~= nil then
            ctx.emit({type = "fired", name = info.name, text = info.payload.text,
                      due = info.due_ms})
            ctx.send("log", "reminders", {op = "append", text = info.payload.text})
        end
    end
"#;

#[test]
fn a_timer_set_by_a_handler_fires_through_handle_info() {
    let behaviour = compile(REMINDER);
    let mut entity = Entity::new(&behaviour, "r");
    let now = 1_700_000_000_000;
    let turn = behaviour
        .handle_at(
            LuaMessageKind::Call,
            "r",
            &entity.state,
            json!({"op": "remind", "id": 1, "after_ms": 250, "text": "tea"}),
            now,
        )
        .unwrap();
    let turn = entity.commit(turn).unwrap();
    assert_eq!(turn.reply, json!({"name": "remind:1"}));
    let [Effect::SetTimer { name, due, payload }] = &turn.effects[..] else {
        panic!("expected one timer, got {:?}", turn.effects);
    };
    assert_eq!(*due, TimerDue::AfterMs(250));
    assert_eq!(entity.value()["pending"], json!({"remind:1": "tea"}));

    // The engine delivers the due timer as an info message.
    let info = crate::behaviour::timer_message(name, payload.clone(), due.at(now));
    let turn = behaviour
        .handle_info("r", &entity.state, info.clone())
        .unwrap();
    let turn = entity.commit(turn).unwrap();
    assert_eq!(
        turn.effects,
        vec![Effect::Send {
            to: EntityId::new("log", "reminders").unwrap(),
            message: json!({"op": "append", "text": "tea"}),
        }]
    );
    assert_eq!(
        entity.value(),
        json!({"pending": {}, "fired": [{"name": "remind:1", "text": "tea", "due": now + 250}]})
    );
    assert_eq!(entity.replayed(), entity.value());
    // A second delivery of the same timer finds nothing pending: no event, no effect.
    let turn = behaviour.handle_info("r", &entity.state, info).unwrap();
    assert!(turn.events.is_empty() && turn.effects.is_empty());
}

#[test]
fn ctx_effect_functions_name_themselves_and_the_problem() {
    for (call, expected) in [
        (
            r#"ctx.set_timer("", 10)"#,
            "ctx.set_timer: timer name is empty",
        ),
        (
            r#"ctx.set_timer(string.rep("x", 257), 10)"#,
            "ctx.set_timer: timer name is 257 bytes long; the limit is 256",
        ),
        (
            r#"ctx.set_timer(5, 10)"#,
            "ctx.set_timer: timer name must be a string, got number",
        ),
        (
            r#"ctx.set_timer("t", -1)"#,
            "ctx.set_timer: after_ms is negative",
        ),
        (
            r#"ctx.set_timer("t", 1.5)"#,
            "ctx.set_timer: after_ms must be a whole number",
        ),
        (
            r#"ctx.set_timer("t", 0/0)"#,
            "ctx.set_timer: after_ms must be a whole number",
        ),
        (
            r#"ctx.set_timer("t", "10")"#,
            "ctx.set_timer: after_ms must be a number, got string",
        ),
        (
            r#"ctx.set_timer("t")"#,
            "ctx.set_timer: after_ms must be a number, got nil",
        ),
        (
            r#"ctx.set_timer("t", 10, {f = print})"#,
            "ctx.set_timer: payload.f:",
        ),
        (
            r#"ctx.set_timer_at("t", -5)"#,
            "ctx.set_timer_at: at_unix_ms is negative",
        ),
        (
            r#"ctx.cancel_timer()"#,
            "ctx.cancel_timer: timer name must be a string, got nil",
        ),
        (
            r#"ctx.cancel_timer("")"#,
            "ctx.cancel_timer: timer name is empty",
        ),
        (r#"ctx.send("", "k", {})"#, "ctx.send: entity type is empty"),
        (r#"ctx.send("t", "k", {f = print})"#, "ctx.send: message.f:"),
        (
            r#"ctx.request("t", "", {}, 1)"#,
            "ctx.request: entity key is empty",
        ),
        (r#"ctx.request("t", "k", {}, print)"#, "ctx.request: tag:"),
        (
            r#"for i = 1, 1025 do ctx.set_timer("t" .. i, 1) end"#,
            "ctx.set_timer: a turn may ask for at most 1024 effects",
        ),
    ] {
        let source = format!(
            "function init() return {{}} end\n\
             function handle_call(msg, state, ctx) {call} return 1 end"
        );
        let behaviour = compile(&source);
        let state = behaviour.initial_state("k");
        let message = failed(behaviour.handle("k", &state, json!({})));
        assert!(message.contains(expected), "{call}: {message}");
    }
}

#[test]
fn info_without_handle_info_is_ignored() {
    let cart = compile(CART_V1);
    let state = cart.initial_state("k");
    let turn = cart
        .handle_info("k", &state, json!({"info": "down"}))
        .unwrap();
    assert_eq!(turn, Turn::reply(Value::Null));
}

#[test]
fn ctx_functions_fail_outside_a_handler() {
    let source = r#"
        local saved
        function init() return {} end
        function apply(state, event) saved.emit({}) end
        function handle_call(msg, state, ctx) saved = ctx ctx.emit({}) return 1 end
    "#;
    let behaviour = compile(source);
    let mut entity = Entity::new(&behaviour, "k");
    let message = failed(entity.call(json!({})));
    assert!(
        message.contains("only be called while a handler runs"),
        "{message}"
    );
}

// --- Values across the boundary ---

#[test]
fn messages_and_replies_follow_the_json_mapping() {
    let source = r#"
        function init() return {} end
        function handle_call(msg, state, ctx)
            if msg.op == "echo" then return msg.value end
            if msg.op == "empty_object" then return {} end
            if msg.op == "empty_array" then return array() end
            if msg.op == "nulls" then return {1, null, 3} end
            if msg.op == "count" then return #msg.value end
            if msg.op == "has" then return msg.value.x ~= nil end
            return nil
        end
    "#;
    let behaviour = compile(source);
    let state = behaviour.initial_state("k");
    let call = |message: Value| behaviour.handle("k", &state, message);
    let value = json!({"a": [1, 2.5, "x", true, [], {}], "b": {"c": [null, 1]}});
    assert_eq!(
        call(json!({"op": "echo", "value": value})).unwrap().reply,
        value
    );
    assert_eq!(
        call(json!({"op": "empty_object"})).unwrap().reply,
        json!({})
    );
    assert_eq!(call(json!({"op": "empty_array"})).unwrap().reply, json!([]));
    assert_eq!(
        call(json!({"op": "nulls"})).unwrap().reply,
        json!([1, null, 3])
    );
    assert_eq!(
        call(json!({"op": "count", "value": [1, null, 3]}))
            .unwrap()
            .reply,
        json!(3)
    );
    assert_eq!(
        call(json!({"op": "has", "value": {"x": null}}))
            .unwrap()
            .reply,
        json!(false)
    );
    assert_eq!(call(json!({"op": "nothing"})).unwrap().reply, Value::Null);
    let message = invalid(call(json!({"op": "echo", "value": 9007199254740993_u64})));
    assert!(message.starts_with("message.value: integer"), "{message}");
}

#[test]
fn a_reply_that_is_not_json_is_a_crash() {
    let source = r#"
        function init() return {} end
        function handle_call(msg, state, ctx)
            if msg.op == "function" then return {f = print} end
            if msg.op == "nan" then return 0/0 end
            return {[1] = "a", x = "b"}
        end
    "#;
    let behaviour = compile(source);
    let mut entity = Entity::new(&behaviour, "k");
    let message = failed(entity.call(json!({"op": "function"})));
    assert_eq!(
        message,
        "handle_call returned reply.f: a function cannot be stored in a JSON value"
    );
    assert!(failed(entity.call(json!({"op": "nan"}))).contains("NaN"));
    assert!(failed(entity.call(json!({"op": "mixed"}))).contains("mixes array elements"));
}

#[test]
fn lua_errors_are_crashes_with_the_line() {
    let source = "function init() return {} end\n\
                  function handle_call(msg, state, ctx)\n\
                  \x20 return state.missing.field\n\
                  end\n";
    let behaviour = compile(source);
    let mut entity = Entity::new(&behaviour, "k");
    let message = failed(entity.call(json!({})));
    assert!(
        message.starts_with("handle_call failed: cart:3:"),
        "{message}"
    );
    assert!(message.contains("attempt to index nil"), "{message}");
    assert!(!message.contains("stack traceback"), "{message}");

    let behaviour = compile(
        "function init() return {} end\n\
         function handle_call() error({code = 7}) end",
    );
    let mut entity = Entity::new(&behaviour, "k");
    assert!(failed(entity.call(json!({}))).contains("without an `invalid` field"));
}

#[test]
fn init_failing_for_one_key_crashes_that_entity_only() {
    let source = r#"
        function init(key)
            if key == "bad" then error("no carts for bad") end
            return {key = key}
        end
        function handle_call(msg, state, ctx) return state.key end
    "#;
    let behaviour = compile(source);
    let mut bad = Entity::new(&behaviour, "bad");
    assert!(failed(bad.call(json!({}))).contains("no carts for bad"));
    assert!(behaviour.state_to_value(&bad.state).is_err());
    let mut good = Entity::new(&behaviour, "good");
    assert_eq!(good.call(json!({})), Ok(json!("good")));
    let with_arg = behaviour.init_state("x", &json!({"a": 1})).unwrap();
    assert_eq!(
        behaviour.state_to_value(&with_arg).unwrap(),
        json!({"key": "x"})
    );
}

// --- Refused at compile time ---

#[test]
fn a_syntax_error_names_the_line() {
    let source = "function init() return {} end\n\
                  function handle_call(msg, state, ctx)\n\
                  \x20 if msg then\n\
                  \x20   return 1\n\
                  end\n";
    match compile_error(source) {
        LuaError::Syntax { line, message } => {
            assert!(line.is_some(), "{message}");
            assert!(message.contains("Expected"), "{message}");
        }
        other => panic!("expected a syntax error, got {other}"),
    }
    let error = compile_error("function init() return {} end\nlocal x = = 1\n");
    assert_eq!(
        error,
        LuaError::Syntax {
            line: Some(2),
            message: match &error {
                LuaError::Syntax { message, .. } => message.clone(),
                _ => String::new(),
            },
        }
    );
    assert!(
        error.to_string().starts_with("syntax error at line 2:"),
        "{error}"
    );
}

#[test]
fn missing_or_mistyped_functions_are_refused() {
    assert_eq!(
        compile_error("function init() return {} end"),
        LuaError::MissingFunction("handle_call")
    );
    assert_eq!(
        compile_error("function handle_call() end"),
        LuaError::MissingFunction("init")
    );
    // A local function is not visible to the engine.
    assert_eq!(
        compile_error("local function init() return {} end function handle_call() end"),
        LuaError::MissingFunction("init")
    );
    assert_eq!(
        compile_error("function init() return {} end function handle_call() end apply = 5"),
        LuaError::NotAFunction {
            name: "apply",
            found: "number".into()
        }
    );
    assert_eq!(
        compile_error("init = {} function handle_call() end"),
        LuaError::NotAFunction {
            name: "init",
            found: "table".into()
        }
    );
}

#[test]
fn a_bad_init_is_refused() {
    let handle = "function handle_call() end\n";
    let error = compile_error(&format!("{handle}function init() error('boom') end"));
    assert!(
        matches!(&error, LuaError::BadInit(m) if m.contains("cart:2: boom")),
        "{error}"
    );
    let error = compile_error(&format!(
        "{handle}function init() return function() end end"
    ));
    assert!(
        matches!(&error, LuaError::BadInit(m) if m.contains("state: a function cannot be stored")),
        "{error}"
    );
    let error = compile_error(&format!("{handle}function init() end"));
    assert!(
        matches!(&error, LuaError::BadInit(m) if m.contains("init returned nil")),
        "{error}"
    );
    let error = compile_error(&format!("{handle}function init() return {{1, x = 2}} end"));
    assert!(matches!(error, LuaError::BadInit(_)), "{error}");
}

#[test]
fn a_failing_top_level_and_an_oversized_script_are_refused() {
    let error = compile_error("local x = nil + 1\nfunction init() return {} end");
    assert!(
        matches!(&error, LuaError::Load(m) if m.contains("cart:1:")),
        "{error}"
    );
    let huge = format!("-- {}\n", "x".repeat(SOURCE_BYTES_MAX));
    assert!(matches!(compile_error(&huge), LuaError::TooLarge { .. }));
}

#[test]
fn limits_are_enforced_at_compile_time_too() {
    let run = |source: &str| LuaBehaviour::compile("cart", 1, source, tight_limits()).err();
    let error = run("while true do end");
    assert!(
        matches!(&error, Some(LuaError::Limit(m)) if m.contains("instruction budget exceeded")),
        "{error:?}"
    );
    let error = run("function handle_call() end function init() while true do end end");
    assert!(
        matches!(&error, Some(LuaError::Limit(m)) if m.starts_with("init: instruction budget")),
        "{error:?}"
    );
}

// --- Sandbox ---

/// A script whose `handle_call` runs `msg.code`'s named snippet, to try escapes from one VM.
const PROBE: &str = r#"
    local function dumped() return 1 end
    local probes = {
        os_execute = function() return os.execute("true") end,
        io_open = function() return io.open("/etc/passwd") end,
        require = function() return require("os") end,
        load_bytecode = function() return load(string.dump(dumped)) end,
        loadstring_bytecode = function() return loadstring("\27Lua") end,
        getfenv = function() return getfenv(1) end,
        debug = function() return debug.getinfo(1) end,
        collectgarbage = function() return collectgarbage("collect") end,
        set_global = function() leaked = 1 end,
        change_library = function() string.upper = nil end,
        infinite_loop = function() while true do end end,
        pcall_loop = function()
            while true do pcall(function() while true do end end) end
        end,
        recursion = function()
            local function f(n) return 1 + f(n + 1) end
            return f(1)
        end,
        string_rep = function() return #string.rep("x", 2^30) end,
        growing_table = function()
            local t = {}
            local i = 0
            while true do i += 1; t[i] = {i} end
        end,
        concat_loop = function()
            local s = "x"
            while true do s = s .. s end
        end,
        pattern = function()
            return string.find(string.rep("a", 20000), ".-.-.-.-.-b")
        end,
        clock = function() return os.clock() >= 0 and os.time() > 0 end,
    }
    function init() return {calls = 0} end
    function handle_call(msg, state, ctx)
        if msg.probe then return probes[msg.probe]() end
        state.calls += 1
        return state.calls, state
    end
"#;

fn probe(behaviour: &LuaBehaviour, name: &str) -> Result<Turn, BehaviourError> {
    let state = behaviour.initial_state("attacker");
    behaviour.handle("attacker", &state, json!({"probe": name}))
}

/// After whatever happened, another entity of the same behaviour still works.
fn still_serves(behaviour: &LuaBehaviour) {
    let mut other = Entity::new(behaviour, "bystander");
    assert_eq!(other.call(json!({})), Ok(json!(1)));
    assert_eq!(other.call(json!({})), Ok(json!(2)));
    assert_eq!(other.value(), json!({"calls": 2}));
}

#[test]
fn the_sandbox_has_no_os_io_require_load_or_debug() {
    let behaviour = LuaBehaviour::compile("cart", 1, PROBE, tight_limits()).unwrap();
    for (name, expected) in [
        ("os_execute", "attempt to call a nil value"),
        ("io_open", "attempt to index nil"),
        ("require", "attempt to call a nil value"),
        ("load_bytecode", "attempt to call a nil value"),
        ("loadstring_bytecode", "attempt to call a nil value"),
        ("getfenv", "attempt to call a nil value"),
        ("debug", "attempt to index nil"),
        ("collectgarbage", "attempt to call a nil value"),
        ("set_global", "readonly"),
        ("change_library", "readonly"),
    ] {
        let message = failed(probe(&behaviour, name));
        assert!(message.contains(expected), "{name}: {message}");
        still_serves(&behaviour);
    }
    assert_eq!(probe(&behaviour, "clock").unwrap().reply, json!(true));
}

#[test]
fn runaway_cpu_is_stopped_and_named() {
    let behaviour = LuaBehaviour::compile("cart", 1, PROBE, tight_limits()).unwrap();
    // Luau checks the interrupt inside pattern matching too.
    for name in ["infinite_loop", "pcall_loop", "pattern"] {
        let message = failed(probe(&behaviour, name));
        assert!(
            message.contains("instruction budget exceeded") && message.contains("200000"),
            "{name}: {message}"
        );
        still_serves(&behaviour);
    }
    // Recursion is stopped by the stack limit or the budget, whichever comes first.
    let message = failed(probe(&behaviour, "recursion"));
    assert!(
        message.contains("stack overflow") || message.contains("instruction budget"),
        "{message}"
    );
    still_serves(&behaviour);
}

#[test]
fn the_wall_clock_backstop_stops_a_slow_call() {
    let limits = LuaLimits {
        instructions_max: u64::MAX,
        call_timeout: Duration::from_millis(50),
        ..tight_limits()
    };
    let behaviour = LuaBehaviour::compile("cart", 1, PROBE, limits).unwrap();
    let message = failed(probe(&behaviour, "infinite_loop"));
    assert!(message.contains("call timeout exceeded"), "{message}");
    still_serves(&behaviour);
}

#[test]
fn runaway_memory_is_stopped_and_named() {
    let behaviour = LuaBehaviour::compile("cart", 1, PROBE, tight_limits()).unwrap();
    for name in ["string_rep", "growing_table", "concat_loop"] {
        let message = failed(probe(&behaviour, name));
        assert!(
            message.contains("memory limit exceeded") || message.contains("instruction budget"),
            "{name}: {message}"
        );
        still_serves(&behaviour);
    }
    // With a budget that cannot run out first, the memory limit is what stops the table.
    let limits = LuaLimits {
        instructions_max: u64::MAX,
        ..tight_limits()
    };
    let behaviour = LuaBehaviour::compile("cart", 1, PROBE, limits).unwrap();
    let message = failed(probe(&behaviour, "growing_table"));
    assert!(
        message.contains("memory limit exceeded") && message.contains("8388608"),
        "{message}"
    );
    still_serves(&behaviour);
}

#[test]
fn a_vm_that_broke_a_limit_is_not_reused() {
    let behaviour = LuaBehaviour::compile("cart", 1, PROBE, tight_limits()).unwrap();
    assert_eq!(behaviour.pool.idle_count(), 1);
    failed(probe(&behaviour, "infinite_loop"));
    assert_eq!(behaviour.pool.idle_count(), 0);
    still_serves(&behaviour);
    assert_eq!(behaviour.pool.idle_count(), 1);
    // An ordinary crash keeps the VM.
    failed(probe(&behaviour, "os_execute"));
    assert_eq!(behaviour.pool.idle_count(), 1);
}

#[test]
fn a_too_deep_state_is_refused() {
    let source = r#"
        function init() return {} end
        function handle_call(msg, state, ctx)
            local t = {}
            for i = 1, 100 do t = {t} end
            return t
        end
    "#;
    let behaviour = compile(source);
    let mut entity = Entity::new(&behaviour, "k");
    assert!(failed(entity.call(json!({}))).contains("nested deeper than 64"));
}

// --- Concurrency ---

#[test]
fn many_threads_share_one_behaviour() {
    let cart = Arc::new(compile(CART_V1));
    let threads = 8;
    let calls_per_thread = 50;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let cart = Arc::clone(&cart);
            std::thread::spawn(move || {
                let key = format!("shopper-{t}");
                let mut entity = Entity::new(&cart, &key);
                for i in 0..calls_per_thread {
                    let sku = format!("sku-{}", i % 5);
                    let reply = entity
                        .call(json!({"op": "add", "sku": sku, "price": t}))
                        .unwrap();
                    assert_eq!(reply["sku"], sku.as_str());
                }
                let total = entity.call(json!({"op": "total"})).unwrap();
                assert_eq!(entity.replayed(), entity.value());
                total
            })
        })
        .collect();
    for (t, handle) in handles.into_iter().enumerate() {
        let total = handle.join().unwrap();
        assert_eq!(
            total,
            json!({"total": t * calls_per_thread, "count": calls_per_thread})
        );
    }
    // VMs were created on demand and at most `idle_max` were kept.
    assert!(cart.pool.idle_count() >= 1);
}

#[test]
fn garbage_from_earlier_calls_does_not_break_later_ones() {
    let source = r#"
        function init() return {} end
        function handle_call(msg, state, ctx)
            local big = string.rep("x", 3 * 1024 * 1024)
            return #big
        end
    "#;
    let behaviour = LuaBehaviour::compile("cart", 1, source, tight_limits()).unwrap();
    let state = behaviour.initial_state("k");
    for _ in 0..20 {
        let turn = behaviour.handle("k", &state, json!({})).unwrap();
        assert_eq!(turn.reply, json!(3 * 1024 * 1024));
    }
}

#[test]
fn an_unchanged_state_writes_no_event() {
    // `null` in a field reads back as an absent field, so this state converts to itself.
    let source = r#"
        function init() return {a = 1, gone = null, list = array()} end
        function handle_call(msg, state, ctx)
            state.gone = null
            return "read", state
        end
    "#;
    let behaviour = compile(source);
    let mut entity = Entity::new(&behaviour, "k");
    assert_eq!(entity.value(), json!({"a": 1, "list": []}));
    let turn = entity.turn(json!({})).unwrap();
    assert!(turn.events.is_empty(), "{:?}", turn.events);
}
