//! Data dirs written by older builds, through the real binary: the format migration at
//! start-up, and what the migrated data dir serves.

use serde_json::json;
use statehouse_migrations::{
    CURRENT_FORMAT_VERSION, EXISTENCE_INDEX_KIND, FORMAT_VERSION_KEY, META_TREE,
};
use statehouse_tests::{open_stopped_state, shard_trees, TestServer};

/// Format version 2 kept an existence index: an `e` key (type, then the bare key) per entity.
fn existence_key(entity_type: &str, key: &str) -> Vec<u8> {
    let mut out = vec![EXISTENCE_INDEX_KIND];
    out.extend_from_slice(&(entity_type.len() as u16).to_be_bytes());
    out.extend_from_slice(entity_type.as_bytes());
    out.extend_from_slice(key.as_bytes());
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_format_2_data_dir_loses_its_existence_index_and_lists_the_same() {
    let mut server = TestServer::start();
    let client = server.client().await;
    let keys = ["a", "a-1", "a-22", "b", "bb-7", "é-3"];
    for (n, key) in keys.iter().enumerate() {
        client.counter(*key).incr(n as i64 + 1).await.unwrap();
    }
    client.counter("gone").incr(1).await.unwrap();
    client.delete("counter", "gone").await.unwrap();
    server.terminate();

    // Make it look like version 2 wrote it: the index of every entity it had (and a stale
    // entry of the deleted one, which no listing may show), and the version.
    {
        let db = open_stopped_state(&server);
        let shards = shard_trees(&db);
        assert!(!shards.is_empty());
        for (n, key) in keys.iter().chain(&["gone"]).enumerate() {
            shards[n % shards.len()]
                .insert(existence_key("counter", key), b"")
                .unwrap();
        }
        db.open_tree(META_TREE)
            .unwrap()
            .insert(FORMAT_VERSION_KEY, &2u32.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }

    server.restart();
    assert!(
        server.log().contains("running format migration"),
        "no migration logged:\n{}",
        server.log()
    );
    let client = server.client().await;
    assert_eq!(client.list_all("counter", "", 2).await.unwrap(), keys);
    assert_eq!(
        client.list_all("counter", "a-", 0).await.unwrap(),
        vec!["a-1", "a-22"]
    );
    for (n, key) in keys.iter().enumerate() {
        let got = client.get("counter", key).await.unwrap();
        assert_eq!(got.state, json!({"value": n + 1}), "{key}");
    }
    server.terminate();

    let db = open_stopped_state(&server);
    for tree in shard_trees(&db) {
        assert_eq!(
            tree.scan_prefix([EXISTENCE_INDEX_KIND]).count(),
            0,
            "an index key survived"
        );
    }
    let version = db
        .open_tree(META_TREE)
        .unwrap()
        .get(FORMAT_VERSION_KEY)
        .unwrap();
    assert_eq!(
        version.as_deref(),
        Some(CURRENT_FORMAT_VERSION.to_be_bytes().as_slice())
    );
}
