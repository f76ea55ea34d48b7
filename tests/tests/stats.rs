//! `AdminService.ServerStats` through the real binary (`statehouse stats`): entity counts
//! that follow hibernation and passivation, the process's memory with jemalloc's own
//! figures, and the journal and disk the data dir takes; and the memory setting
//! `--sled-cache-bytes`.

use std::time::{Duration, Instant};

use statehouse_tests::TestServer;

const COUNTERS: u64 = 20;

/// Polls `statehouse stats --json` (bounded) until `done` holds; returns those stats.
async fn wait_for_stats(
    server: &TestServer,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stats = server.cli(&["stats", "--json"]).json();
        if done(&stats) {
            return stats;
        }
        assert!(Instant::now() < deadline, "never {what}: {stats:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn number(stats: &serde_json::Value, field: &str) -> u64 {
    stats[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} is not a number: {stats:#}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_count_entities_memory_journal_and_disk() {
    let server = TestServer::start_with(&["--hibernate-after-ms", "50"]);
    let fresh = server.cli(&["stats", "--json"]).json();
    assert_eq!(number(&fresh, "entities_active"), 0);
    assert_eq!(number(&fresh, "shards"), 16);

    let client = server.client().await;
    for i in 0..COUNTERS {
        client.counter(format!("c{i}")).incr(1).await.unwrap();
    }
    let stats = wait_for_stats(&server, "all hibernating", |stats| {
        stats["entities_hibernating"] == COUNTERS
    })
    .await;
    assert_eq!(number(&stats, "entities_active"), COUNTERS);
    assert!(number(&stats, "commits") >= COUNTERS, "{stats:#}");
    assert!(number(&stats, "journal_fsyncs") >= 1, "{stats:#}");
    assert!(number(&stats, "journal_bytes_written") > 0, "{stats:#}");
    assert!(number(&stats, "journal_segments") >= 1, "{stats:#}");
    assert!(number(&stats, "journal_disk_bytes") > 0, "{stats:#}");
    assert!(number(&stats, "state_disk_bytes") > 0, "{stats:#}");
    // The binary reports the process's resident set and jemalloc's figures.
    let resident = number(&stats, "resident_bytes");
    let allocated = number(&stats, "allocated_bytes");
    assert!(allocated > 0 && allocated < resident, "{stats:#}");
    assert!(
        number(&stats, "allocator_resident_bytes") >= allocated,
        "{stats:#}"
    );
    assert!(number(&stats, "uptime_ms") >= number(&fresh, "uptime_ms"));

    // For people: a table with the cost per active entity.
    let table = server.cli(&["stats"]);
    assert!(table.output.status.success(), "{table:#?}");
    let text = table.stdout();
    assert!(
        text.lines()
            .any(|line| line.starts_with("entities active") && line.ends_with(" 20")),
        "{text}"
    );
    assert!(text.contains("per active entity"), "{text}");

    // Stopped entities leave the directory and the counts.
    for i in 0..COUNTERS {
        client.stop("counter", &format!("c{i}")).await.unwrap();
    }
    wait_for_stats(&server, "all passivated", |stats| {
        stats["entities_active"] == 0 && stats["entities_hibernating"] == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sled_cache_flag_is_taken_and_too_small_a_cache_refused() {
    let server = TestServer::start_with(&["--sled-cache-bytes", "2097152"]);
    let client = server.client().await;
    assert_eq!(client.counter("c").incr(2).await.unwrap(), 2);
    drop(server);

    let data_dir = tempfile::tempdir().unwrap();
    let refused = std::process::Command::new(statehouse_tests::server_bin())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--sled-cache-bytes",
            "1000",
            "--data-dir",
        ])
        .arg(data_dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("sled_cache_bytes"), "{stderr}");
}
