//! `Watch`: committed turns streamed to many watchers, resubscription from a sequence number
//! (also across a snapshot), a slow watcher ended without slowing the entity, and the end of
//! a watch when its entity stops.

use std::time::Duration;

use serde_json::json;
use statehouse_client::watch::{Watch, WatchUpdate};
use statehouse_client::{Client, Code};
use statehouse_tests::TestServer;

async fn next(watch: &mut Watch) -> WatchUpdate {
    tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("an update within 10 s")
        .expect("the watch is open")
        .expect("an update, not an error")
}

async fn incr(client: &Client, key: &str) {
    client.counter(key).incr(1).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn watchers_see_the_state_then_every_committed_turn() {
    let server = TestServer::start();
    let client = server.client().await;
    incr(&client, "w").await;
    let mut watchers = Vec::new();
    for _ in 0..3 {
        watchers.push(client.watch("counter", "w", None).await.unwrap());
    }
    for watch in &mut watchers {
        let first = next(watch).await;
        assert_eq!((first.seq, first.state), (1, Some(json!({"value": 1}))));
    }
    for _ in 0..3 {
        incr(&client, "w").await;
    }
    for watch in &mut watchers {
        for seq in 2..=4 {
            let update = next(watch).await;
            assert_eq!(update.seq, seq);
            assert_eq!(update.events, vec![json!({"event": "added", "by": 1})]);
            assert_eq!(update.state, Some(json!({"value": seq})));
        }
    }
    // A start ahead of the entity is refused.
    let ahead = client.watch("counter", "w", Some(99)).await;
    let err = match ahead {
        Ok(mut watch) => watch.next().await.unwrap().unwrap_err(),
        Err(err) => err,
    };
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn resubscribing_from_a_sequence_number_catches_up_across_a_snapshot() {
    let server = TestServer::start_with(&["--snapshot-every-events", "5"]);
    let client = server.client().await;
    for _ in 0..12 {
        incr(&client, "r").await;
    }
    // Events 11 and 12 are still stored one by one; 1..=10 were compacted into a snapshot.
    let mut recent = client.watch("counter", "r", Some(10)).await.unwrap();
    for seq in [11, 12] {
        let update = next(&mut recent).await;
        assert_eq!((update.seq, update.state, update.note), (seq, None, None));
        assert_eq!(update.events, vec![json!({"event": "added", "by": 1})]);
    }
    let mut old = client.watch("counter", "r", Some(3)).await.unwrap();
    let snapshot = next(&mut old).await;
    assert_eq!(
        (snapshot.seq, snapshot.state),
        (10, Some(json!({"value": 10})))
    );
    assert!(snapshot.note.unwrap().contains("compacted into a snapshot"));
    assert_eq!(next(&mut old).await.seq, 11);
    assert_eq!(next(&mut old).await.seq, 12);
    // Then live.
    incr(&client, "r").await;
    assert_eq!(next(&mut old).await.state, Some(json!({"value": 13})));
    assert_eq!(next(&mut recent).await.seq, 13);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_watcher_is_ended_without_slowing_the_entity() {
    // No snapshots: every event stays in storage for the resubscription below.
    let server = TestServer::start_with(&["--snapshot-every-events", "0"]);
    let client = server.client().await;
    // Large states (8 KB each) so the transport's buffers cannot hide a watcher that reads
    // nothing.
    let big = "x".repeat(8 * 1024);
    let put = json!({"op": "put", "field": "f", "value": big});
    client.call("kv", "big", put.clone()).await.unwrap();
    let mut slow = client.watch("kv", "big", None).await.unwrap();
    assert_eq!(next(&mut slow).await.seq, 1);
    // The watcher reads nothing while thousands of turns commit (256 in flight at a time,
    // below the mailbox's capacity).
    let (sender, mut receiver) = client.pipeline().await.unwrap();
    let turns: u64 = 4_000;
    let (mut sent, mut answered) = (0, 0);
    while answered < turns {
        while sent < turns && sent - answered < 256 {
            sender.send("kv", "big", put.clone()).await.unwrap();
            sent += 1;
        }
        receiver.next().await.unwrap().unwrap().outcome.unwrap();
        answered += 1;
    }
    assert_eq!(client.get("kv", "big").await.unwrap().seq, turns + 1);
    // Now it reads: what it got, then the end, saying where to resume.
    let mut last = 1;
    let err = loop {
        match tokio::time::timeout(Duration::from_secs(10), slow.next())
            .await
            .expect("no hang")
        {
            Some(Ok(update)) => {
                assert_eq!(update.seq, last + 1, "no gaps before the end");
                last = update.seq;
            }
            Some(Err(err)) => break err,
            None => panic!("the stream ended without saying why"),
        }
    };
    assert!(last < turns + 1, "the watcher lagged");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(
        err.to_string().contains(&format!("from_seq = {last}")),
        "{err}"
    );
    let mut again = client.watch("kv", "big", Some(last)).await.unwrap();
    assert_eq!(next(&mut again).await.seq, last + 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watch_ends_when_its_entity_stops() {
    let server = TestServer::start();
    let client = server.client().await;
    incr(&client, "s").await;
    let mut watch = client.watch("counter", "s", None).await.unwrap();
    assert_eq!(next(&mut watch).await.seq, 1);
    assert!(client.stop("counter", "s").await.unwrap());
    let err = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(err.to_string().contains("from_seq = 1"), "{err}");
}
