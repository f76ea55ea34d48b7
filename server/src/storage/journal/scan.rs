//! Reading a segment back: which frames it holds and how it ends.
//!
//! **Owns**: the classification recovery relies on. Walking from a frame boundary, every
//! frame whose head verifies is reported (with whether its body checks out), and the walk ends
//! in one of three ways:
//! - [`ScanEnd::Clean`]: the last frame ends exactly at the end of the segment;
//! - [`ScanEnd::Torn`]: at some offset no head verifies, and no head verifies at any later
//!   offset either: what an interrupted append (or zeros after it) leaves;
//! - [`ScanEnd::Incomplete`]: a verified head whose frame runs past the end of the segment;
//! - [`ScanEnd::Damaged`]: at some offset no head verifies, but a head verifies further on:
//!   a record in the middle of the log is damaged, which is never cut silently.

use super::frame::{body_crc_ok, verify_head, VerifiedHead, FRAME_HEADER_BYTES};

/// A frame whose head verified.
#[derive(Debug, Clone)]
pub(crate) struct ScannedFrame {
    /// Offset of the frame in the segment.
    pub offset: u64,
    pub head: VerifiedHead,
    /// Whether the body matched its checksum.
    pub body_ok: bool,
}

/// How a scan ended; see the module doc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ScanEnd {
    Clean,
    Torn {
        offset: u64,
        detail: String,
    },
    Incomplete {
        offset: u64,
        detail: String,
    },
    Damaged {
        offset: u64,
        next_valid: u64,
        detail: String,
    },
}

/// The frames of a segment from a starting offset on, and how the segment ends.
#[derive(Debug, Clone)]
pub(crate) struct Scan {
    pub frames: Vec<ScannedFrame>,
    pub end: ScanEnd,
}

/// Scans `bytes` (a whole segment) from `start`, which must be a frame boundary.
pub(crate) fn scan(bytes: &[u8], start: usize) -> Scan {
    let mut frames = Vec::new();
    let mut at = start;
    let end = loop {
        if at == bytes.len() {
            break ScanEnd::Clean;
        }
        let head = match verify_head(bytes, at) {
            Ok(head) => head,
            Err(detail) => {
                break match next_verifying_head(bytes, at + 1) {
                    Some(next_valid) => ScanEnd::Damaged {
                        offset: at as u64,
                        next_valid: next_valid as u64,
                        detail,
                    },
                    None => ScanEnd::Torn {
                        offset: at as u64,
                        detail,
                    },
                }
            }
        };
        let frame_end = at + head.frame_len();
        let Some(body) = bytes.get(at + head.body_offset()..frame_end) else {
            break ScanEnd::Incomplete {
                offset: at as u64,
                detail: format!(
                    "frame of {} bytes runs past the end of the segment ({} bytes)",
                    head.frame_len(),
                    bytes.len()
                ),
            };
        };
        let body_ok = body_crc_ok(&head, body);
        frames.push(ScannedFrame {
            offset: at as u64,
            head,
            body_ok,
        });
        at = frame_end;
    };
    Scan { frames, end }
}

/// The first offset at or after `from` where a frame head verifies.
fn next_verifying_head(bytes: &[u8], from: usize) -> Option<usize> {
    let last = bytes.len().checked_sub(FRAME_HEADER_BYTES)?;
    (from..=last).find(|at| verify_head(bytes, *at).is_ok())
}

#[cfg(test)]
mod tests {
    use super::super::frame::encode_frame;
    use super::*;
    use crate::address::EntityId;
    use crate::storage::{EntityBatch, Op};

    fn frame(key: &str, seq: u64) -> Vec<u8> {
        encode_frame(&EntityBatch {
            shard: 0,
            entity: EntityId::new("t", key).unwrap(),
            ops: vec![Op::Event {
                seq,
                behaviour_version: 1,
                payload: vec![seq as u8; 40],
            }],
        })
    }

    fn segment() -> (Vec<u8>, Vec<usize>) {
        let mut bytes = Vec::new();
        let mut offsets = Vec::new();
        for i in 0..5 {
            offsets.push(bytes.len());
            bytes.extend(frame(&format!("k{i}"), i + 1));
        }
        (bytes, offsets)
    }

    #[test]
    fn a_clean_segment_yields_every_frame() {
        let (bytes, offsets) = segment();
        let scan = scan(&bytes, 0);
        assert_eq!(scan.end, ScanEnd::Clean);
        let found: Vec<usize> = scan.frames.iter().map(|f| f.offset as usize).collect();
        assert_eq!(found, offsets);
        assert!(scan.frames.iter().all(|f| f.body_ok));
        // From a later boundary, only the frames after it.
        assert_eq!(super::scan(&bytes, offsets[3]).frames.len(), 2);
        assert_eq!(super::scan(&[], 0).end, ScanEnd::Clean);
    }

    #[test]
    fn a_cut_at_any_byte_of_the_last_frame_is_torn() {
        let (bytes, offsets) = segment();
        for len in offsets[4] + 1..bytes.len() {
            let scan = scan(&bytes[..len], 0);
            assert_eq!(scan.frames.len(), 4, "len {len}");
            assert!(
                matches!(scan.end, ScanEnd::Torn { offset, .. } | ScanEnd::Incomplete { offset, .. }
                    if offset as usize == offsets[4]),
                "len {len}: {:?}",
                scan.end
            );
        }
    }

    #[test]
    fn zeros_or_garbage_after_the_last_frame_are_torn() {
        let (mut bytes, _) = segment();
        let clean_len = bytes.len();
        bytes.extend(vec![0u8; 4096]);
        assert!(
            matches!(scan(&bytes, 0).end, ScanEnd::Torn { offset, .. } if offset as usize == clean_len)
        );
        bytes.truncate(clean_len);
        bytes.extend((0..5000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
        assert!(
            matches!(scan(&bytes, 0).end, ScanEnd::Torn { offset, .. } if offset as usize == clean_len)
        );
    }

    #[test]
    fn a_damaged_head_before_good_frames_is_damage() {
        let (mut bytes, offsets) = segment();
        bytes[offsets[2] + 1] ^= 0x40;
        let scan = scan(&bytes, 0);
        assert_eq!(scan.frames.len(), 2);
        assert!(
            matches!(scan.end, ScanEnd::Damaged { offset, next_valid, .. }
                if offset as usize == offsets[2] && next_valid as usize == offsets[3]),
            "{:?}",
            scan.end
        );
    }

    #[test]
    fn a_frame_running_past_the_end_is_incomplete() {
        let (bytes, offsets) = segment();
        // Keep the last frame's header and head, drop part of its body.
        let scan = scan(&bytes[..bytes.len() - 5], 0);
        assert!(
            matches!(scan.end, ScanEnd::Incomplete { offset, .. } if offset as usize == offsets[4])
        );
    }

    #[test]
    fn a_damaged_body_is_reported_and_the_walk_goes_on() {
        let (mut bytes, offsets) = segment();
        let last = bytes.len() - 1;
        bytes[offsets[2] + 60] ^= 1;
        bytes[last] ^= 1;
        let scan = scan(&bytes, 0);
        assert_eq!(scan.end, ScanEnd::Clean);
        let ok: Vec<bool> = scan.frames.iter().map(|f| f.body_ok).collect();
        assert_eq!(ok, vec![true, true, false, true, false]);
        assert_eq!(scan.frames[2].head.entity.key, "k2");
    }
}
