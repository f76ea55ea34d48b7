//! `Pipeline`: many calls in flight on one stream, answered in completion order with the
//! semantics and errors of `Call`; and durability under pipelined load with SIGKILL.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::json;
use statehouse_client::Code;
use statehouse_tests::TestServer;

#[tokio::test(flavor = "multi_thread")]
async fn many_calls_in_flight_with_errors_mid_stream() {
    let server = TestServer::start();
    let client = server.client().await;
    let (sender, mut receiver) = client.pipeline().await.unwrap();
    let mut expected_errors = HashMap::new();
    for n in 0..500u64 {
        let id = sender
            .send("counter", &format!("p{}", n % 10), json!({"op": "incr"}))
            .await
            .unwrap();
        if n % 100 == 50 {
            let bad = sender
                .send("counter", "p0", json!({"op": "explode"}))
                .await
                .unwrap();
            expected_errors.insert(bad, Code::InvalidArgument);
            let unknown = sender
                .send("nosuch", "x", json!({"op": "get"}))
                .await
                .unwrap();
            expected_errors.insert(unknown, Code::NotFound);
        }
        assert!(id < 1000);
    }
    drop(sender);
    let (mut ok, mut errors) = (0, HashMap::new());
    while let Some(result) = receiver.next().await {
        let result = result.expect("the stream itself does not fail");
        match result.outcome {
            Ok(outcome) => {
                assert!(outcome.reply["value"].as_i64().unwrap() >= 1);
                ok += 1;
            }
            Err(err) => {
                errors.insert(result.id, err.code());
            }
        }
    }
    assert_eq!(ok, 500);
    assert_eq!(errors, expected_errors);
    for key in 0..10 {
        assert_eq!(client.counter(format!("p{key}")).get().await.unwrap(), 50);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_under_pipeline_load_loses_no_acknowledged_increment() {
    let mut server = TestServer::start_with(&["--snapshot-every-events", "50"]);
    let client = server.client().await;
    let keys = 64usize;
    let mut sent = vec![0u64; keys];
    let mut acked = vec![0u64; keys];
    let (sender, mut receiver) = client.pipeline().await.unwrap();
    let mut key_of = HashMap::new();
    let mut next_key = 0usize;
    let started = Instant::now();
    // Keep up to 256 calls in flight; kill once enough are acknowledged.
    let mut in_flight = 0usize;
    let total_acked = loop {
        while in_flight < 256 {
            let key = next_key % keys;
            next_key += 1;
            let id = sender
                .send("counter", &format!("k{key}"), json!({"op": "incr"}))
                .await
                .unwrap();
            key_of.insert(id, key);
            sent[key] += 1;
            in_flight += 1;
        }
        let result = receiver
            .next()
            .await
            .expect("an answer")
            .expect("the stream holds");
        in_flight -= 1;
        result.outcome.expect("no call fails before the kill");
        acked[key_of[&result.id]] += 1;
        let total: u64 = acked.iter().sum();
        if total >= 3000 || started.elapsed() > Duration::from_secs(20) {
            break total;
        }
    };
    assert!(total_acked > 0);
    server.kill();
    // Answers already on the wire may still arrive; they are acknowledgements too.
    while let Some(Ok(result)) = receiver.next().await {
        if result.outcome.is_ok() {
            acked[key_of[&result.id]] += 1;
        }
    }
    server.restart();
    let client = server.client().await;
    for key in 0..keys {
        let value = match client.counter(format!("k{key}")).get().await {
            Ok(value) => value as u64,
            Err(err) if err.code() == Code::NotFound => 0,
            Err(err) => panic!("k{key}: {err}"),
        };
        assert!(
            acked[key] <= value && value <= sent[key],
            "k{key}: acked {}, value {value}, sent {}",
            acked[key],
            sent[key]
        );
    }
}
