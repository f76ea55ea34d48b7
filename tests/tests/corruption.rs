//! A byte flipped on disk in one entity's journal record: the server reports that entity's
//! data as lost (`DATA_LOSS`, naming it) instead of serving something wrong, and keeps
//! serving every other entity.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};

use statehouse_client::Code;
use statehouse_server::storage::journal::{locate_frames, segment_paths};
use statehouse_tests::TestServer;

const VICTIM: &str = "victim";
const BYSTANDERS: usize = 20;

fn bystander(index: usize) -> String {
    format!("bystander-{index:02}")
}

#[tokio::test]
async fn a_flipped_byte_in_a_journal_record_is_data_loss_for_that_entity_only() {
    // No checkpoint during the test: every record stays in the journal, where the flip goes.
    let mut server = TestServer::start_with(&["--checkpoint-interval-ms", "3600000"]);
    let client = server.client().await;
    assert_eq!(client.counter(VICTIM).incr(7).await.unwrap(), 7);
    // Records after the victim's, so its record sits in the middle of the journal.
    for index in 0..BYSTANDERS {
        let value = index as i64 + 1;
        assert_eq!(
            client.counter(bystander(index)).incr(value).await.unwrap(),
            value
        );
    }
    drop(client);
    server.kill();

    // Find the victim's record and flip one byte in the middle of its body.
    let mut victim_frames = Vec::new();
    let mut frames_total = 0;
    for segment in segment_paths(server.data_dir()).expect("list journal segments") {
        let frames = locate_frames(&segment).expect("read journal frames");
        frames_total += frames.len();
        for (position, frame) in frames.iter().enumerate() {
            if frame.entity.entity_type == "counter" && frame.entity.key == VICTIM {
                victim_frames.push((segment.clone(), position, frames.len(), frame.clone()));
            }
        }
    }
    assert_eq!(
        victim_frames.len(),
        1,
        "one journal record for the victim among {frames_total}: {victim_frames:#?}"
    );
    let (segment, position, frames_in_segment, frame) = victim_frames.remove(0);
    assert!(
        position + 1 < frames_in_segment,
        "the victim's record is frame {position} of {frames_in_segment}: not in the middle"
    );
    assert!(frame.body_len > 0, "{frame:?}");
    let at = frame.body_offset + frame.body_len / 2;
    flip_byte(&segment, at);

    server.restart();
    let client = server.client().await;

    let err = client.counter(VICTIM).incr(1).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "call on the victim: {err}");
    assert!(
        err.to_string().contains(VICTIM),
        "the error names the entity: {err}"
    );
    let err = client.get("counter", VICTIM).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "get on the victim: {err}");
    assert!(
        err.to_string().contains(VICTIM),
        "the error names the entity: {err}"
    );

    for index in 0..BYSTANDERS {
        let key = bystander(index);
        let value = index as i64 + 1;
        assert_eq!(
            client.counter(key.as_str()).get().await.unwrap(),
            value,
            "{key}"
        );
        assert_eq!(
            client.counter(key.as_str()).incr(1).await.unwrap(),
            value + 1,
            "{key}"
        );
    }
}

/// Inverts every bit of the byte at `offset` in `path`.
fn flip_byte(path: &std::path::Path, offset: u64) {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open the journal segment");
    let mut byte = [0u8; 1];
    file.seek(SeekFrom::Start(offset)).unwrap();
    file.read_exact(&mut byte).unwrap();
    byte[0] ^= 0xff;
    file.seek(SeekFrom::Start(offset)).unwrap();
    file.write_all(&byte).unwrap();
    file.sync_all().unwrap();
}
