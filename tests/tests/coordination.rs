//! The coordination built-ins through the real binary: `lease` (fencing tokens, expiry by a
//! durable timer), `queue` (FIFO with visibility timeouts) and `rate_limiter` (token bucket),
//! across SIGKILLs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use statehouse_client::Client;
use statehouse_tests::TestServer;

const PATIENCE: Duration = Duration::from_secs(30);

async fn call(client: &Client, entity_type: &str, key: &str, message: Value) -> Value {
    client
        .call(entity_type, key, message.clone())
        .await
        .unwrap_or_else(|e| panic!("{entity_type}/{key} {message}: {e}"))
        .reply
}

/// Waits until the entity's committed state satisfies `done`.
async fn until_state(client: &Client, entity_type: &str, key: &str, done: impl Fn(&Value) -> bool) {
    let started = Instant::now();
    loop {
        let state = client.get(entity_type, key).await.unwrap().state;
        if done(&state) {
            return;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "{entity_type}/{key} stayed {state}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_tokens_only_increase_across_expiry_and_restarts() {
    let mut server = TestServer::start();
    let client = server.client().await;
    let acquire =
        |holder: &str, ttl_ms: u64| json!({"op": "acquire", "holder": holder, "ttl_ms": ttl_ms});
    let mut tokens = Vec::new();

    let first = call(&client, "lease", "db", acquire("a", 200)).await;
    assert_eq!(first["acquired"], json!(true));
    tokens.push(first["token"].as_u64().unwrap());
    let refused = call(&client, "lease", "db", acquire("b", 60_000)).await;
    assert_eq!(
        (refused["acquired"].clone(), refused["holder"].clone()),
        (json!(false), json!("a"))
    );
    // The expiry timer frees it in the durable state, without anyone asking.
    until_state(&client, "lease", "db", |s| s["held"].is_null()).await;
    let second = call(&client, "lease", "db", acquire("b", 60_000)).await;
    assert_eq!(second["acquired"], json!(true));
    tokens.push(second["token"].as_u64().unwrap());

    server.kill();
    server.restart();
    let client = server.client().await;
    let got = call(&client, "lease", "db", json!({"op": "get"})).await;
    assert_eq!(got["holder"], json!("b"));
    assert_eq!(got["token"].as_u64(), tokens.last().copied());
    let released = call(
        &client,
        "lease",
        "db",
        json!({"op": "release", "holder": "b", "token": tokens[1]}),
    )
    .await;
    assert_eq!(released["released"], json!(true));
    let third = call(&client, "lease", "db", acquire("c", 300)).await;
    tokens.push(third["token"].as_u64().unwrap());

    // Expiry while the server is down: the timer fires at recovery.
    server.kill();
    std::thread::sleep(Duration::from_millis(400));
    server.restart();
    let client = server.client().await;
    until_state(&client, "lease", "db", |s| s["held"].is_null()).await;
    let fourth = call(&client, "lease", "db", acquire("d", 60_000)).await;
    tokens.push(fourth["token"].as_u64().unwrap());
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "fencing tokens must strictly increase: {tokens:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_items_are_never_lost_or_duplicated_across_sigkills() {
    let mut server = TestServer::start();
    let client = server.client().await;
    // Producers push while the server is killed under them.
    let acked: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut producers = Vec::new();
    for p in 0..4 {
        let client = client.clone();
        let acked = acked.clone();
        let stop = stop.clone();
        producers.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            for n in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let item = format!("p{p}-{n}");
                sent.push(item.clone());
                match client
                    .call("queue", "jobs", json!({"op": "push", "item": item}))
                    .await
                {
                    Ok(_) => {
                        acked.lock().unwrap().insert(item);
                    }
                    Err(_) => break,
                }
            }
            sent
        }));
    }
    let started = Instant::now();
    while acked.lock().unwrap().len() < 300 {
        assert!(started.elapsed() < PATIENCE, "pushes too slow");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill();
    stop.store(true, Ordering::Relaxed);
    let mut sent = BTreeSet::new();
    for producer in producers {
        sent.extend(producer.await.unwrap());
    }
    server.restart();
    let client = server.client().await;

    // Take some with a visibility timeout and never ack them; kill again: they must come back.
    for _ in 0..20 {
        let popped = call(
            &client,
            "queue",
            "jobs",
            json!({"op": "pop", "visibility_ms": 300}),
        )
        .await;
        assert!(!popped["item"].is_null());
    }
    server.kill();
    server.restart();
    let client = server.client().await;

    // Drain: pop with visibility and ack each; every item exactly once.
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    let started = Instant::now();
    loop {
        let popped = call(
            &client,
            "queue",
            "jobs",
            json!({"op": "pop", "visibility_ms": 60_000}),
        )
        .await;
        if popped["item"].is_null() {
            let length = call(&client, "queue", "jobs", json!({"op": "length"})).await;
            if length == json!({"length": 0, "in_flight": 0}) {
                break;
            }
            // Items whose visibility timed out are on their way back.
            assert!(started.elapsed() < PATIENCE, "queue stuck at {length}");
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let ack = call(
            &client,
            "queue",
            "jobs",
            json!({"op": "ack", "id": popped["id"]}),
        )
        .await;
        assert_eq!(ack["acked"], json!(true));
        *seen
            .entry(popped["item"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    let acked = acked.lock().unwrap();
    for item in acked.iter() {
        assert_eq!(
            seen.get(item),
            Some(&1),
            "acknowledged push {item} lost or duplicated"
        );
    }
    for (item, times) in &seen {
        assert_eq!(*times, 1, "{item} delivered {times} times");
        assert!(sent.contains(item), "{item} was never sent");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limiter_holds_its_rate() {
    let server = TestServer::start();
    let client = server.client().await;
    let (rate, burst) = (50.0_f64, 10.0_f64);
    let allowed = Arc::new(Mutex::new(0u64));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let client = client.clone();
        let allowed = allowed.clone();
        tasks.push(tokio::spawn(async move {
            while started.elapsed() < Duration::from_millis(1500) {
                let reply = client
                    .call(
                        "rate_limiter",
                        "api",
                        json!({"op": "acquire", "rate_per_sec": rate, "burst": burst}),
                    )
                    .await
                    .unwrap()
                    .reply;
                if reply["allowed"] == json!(true) {
                    *allowed.lock().unwrap() += 1;
                } else {
                    assert!(reply["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0));
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let allowed = *allowed.lock().unwrap() as f64;
    // A token bucket never allows more than its burst plus what refilled; hammered this hard,
    // it allows close to that.
    let ceiling = burst + rate * elapsed + 1.0;
    assert!(
        allowed <= ceiling,
        "{allowed} allowed in {elapsed:.2} s, over {ceiling:.1}"
    );
    assert!(
        allowed >= 0.8 * rate * elapsed,
        "{allowed} allowed in {elapsed:.2} s, far under the rate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_client_has_typed_handles_for_the_coordination_built_ins() {
    use statehouse_client::Acquired;

    let server = TestServer::start();
    let client = server.client().await;

    let queue = client.queue("typed");
    let first = queue.push(json!({"job": 1})).await.unwrap();
    let second = queue.push(json!({"job": 2})).await.unwrap();
    assert!(second > first);
    let popped = queue
        .pop(Some(Duration::from_secs(60)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((popped.id, popped.item.clone()), (first, json!({"job": 1})));
    assert!(popped.deadline_ms.is_some());
    assert_eq!(queue.peek().await.unwrap().map(|i| i.id), Some(second));
    let length = queue.length().await.unwrap();
    assert_eq!((length.length, length.in_flight), (1, 1));
    assert!(queue.nack(first).await.unwrap());
    let again = queue.pop(None).await.unwrap().unwrap();
    assert_eq!(again.id, first, "a nacked item is back at the head");
    assert!(
        !queue.ack(first).await.unwrap(),
        "popped without visibility: nothing to ack"
    );

    let lease = client.lease("typed");
    let Acquired::Granted { token, .. } =
        lease.acquire("a", Duration::from_secs(60)).await.unwrap()
    else {
        panic!("a free lease is granted");
    };
    match lease.acquire("b", Duration::from_secs(60)).await.unwrap() {
        Acquired::Held { holder, .. } => assert_eq!(holder, "a"),
        other => panic!("held by a, got {other:?}"),
    }
    assert!(lease
        .renew("a", token, Duration::from_secs(30))
        .await
        .unwrap()
        .is_ok());
    assert!(lease
        .renew("b", token, Duration::from_secs(30))
        .await
        .unwrap()
        .is_err());
    assert!(lease.release("a", token).await.unwrap());
    let state = lease.get().await.unwrap();
    assert_eq!((state.holder, state.last_token), (None, token));

    let limiter = client.rate_limiter("typed");
    let first = limiter.acquire(1, 1.0, 1).await.unwrap();
    assert!(first.allowed);
    let second = limiter.acquire(1, 1.0, 1).await.unwrap();
    assert!(!second.allowed && second.retry_after_ms > 0, "{second:?}");
}
