//! Reading a segment back: which frames it holds and how it ends.
//!
//! **Owns**: the classification recovery relies on. Walking from a frame boundary, every
//! frame whose head verifies is reported (with whether its body checks out), and the walk ends
//! in one of these ways:
//! - [`ScanEnd::Clean`]: the last frame ends exactly at the end of the segment;
//! - [`ScanEnd::ZeroTail`]: after the last frame, every byte to the end of the segment is
//!   zero: the preallocated space a killed writer had not reached yet;
//! - [`ScanEnd::Torn`]: at some offset no head verifies, the bytes there are not all zero,
//!   and no head verifies at any later offset either: what an interrupted append leaves;
//! - [`ScanEnd::Incomplete`]: a verified head whose frame runs past the end of the segment;
//! - [`ScanEnd::Damaged`]: at some offset no head verifies, but a head verifies further on:
//!   a record in the middle of the log is damaged, which is never cut silently.
//!
//! The search for a later head stops where the zero tail starts (no head can verify inside
//! zeros: a head length of 0 is out of bounds), so a 64 MiB segment with a few frames and a
//! zero tail scans in one pass over the bytes, not a head check at every offset.

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
    ZeroTail {
        offset: u64,
    },
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
                let data_end = data_end(bytes);
                if at >= data_end {
                    break ScanEnd::ZeroTail { offset: at as u64 };
                }
                break match next_verifying_head(bytes, at + 1, data_end) {
                    Some(next_valid) => ScanEnd::Damaged {
                        offset: at as u64,
                        next_valid: next_valid as u64,
                        detail,
                    },
                    None => ScanEnd::Torn {
                        offset: at as u64,
                        detail,
                    },
                };
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

/// The first offset at or after `from` and before `data_end` where a frame head verifies.
/// Offsets at or after `data_end` (where only zeros are left) cannot hold one.
fn next_verifying_head(bytes: &[u8], from: usize, data_end: usize) -> Option<usize> {
    let last = bytes.len().checked_sub(FRAME_HEADER_BYTES)?;
    (from..=last.min(data_end.saturating_sub(1))).find(|at| verify_head(bytes, *at).is_ok())
}

/// The offset just after the last non-zero byte of `bytes` (0 if every byte is zero).
/// Works backwards a block at a time with an OR the compiler vectorises.
pub(crate) fn data_end(bytes: &[u8]) -> usize {
    const BLOCK: usize = 4096;
    let mut end = bytes.len();
    while end > 0 {
        let start = end.saturating_sub(BLOCK);
        let block = &bytes[start..end];
        if block.iter().fold(0u8, |acc, b| acc | b) != 0 {
            return start + block.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
        }
        end = start;
    }
    0
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
    fn zeros_after_the_last_frame_are_a_zero_tail_and_garbage_is_torn() {
        let (mut bytes, _) = segment();
        let clean_len = bytes.len();
        bytes.extend(vec![0u8; 4096]);
        assert_eq!(
            scan(&bytes, 0).end,
            ScanEnd::ZeroTail {
                offset: clean_len as u64
            }
        );
        // A segment with nothing written yet is all zero tail.
        assert_eq!(scan(&[0u8; 100], 0).end, ScanEnd::ZeroTail { offset: 0 });
        // Garbage then zeros (an append cut short in preallocated space) is torn where the
        // garbage starts.
        bytes.truncate(clean_len);
        bytes.extend([7u8, 1, 2, 3, 0, 0, 9]);
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
    fn a_head_cut_short_by_zeros_is_torn_and_a_body_cut_short_is_a_bad_last_frame() {
        let (mut bytes, offsets) = segment();
        let full = bytes.clone();
        // The last frame's first 20 bytes, then zeros.
        bytes.truncate(offsets[4] + 20);
        bytes.extend(vec![0u8; 8192]);
        let scanned = scan(&bytes, 0);
        assert_eq!(scanned.frames.len(), 4);
        assert!(
            matches!(scanned.end, ScanEnd::Torn { offset, .. } if offset as usize == offsets[4]),
            "{:?}",
            scanned.end
        );
        // The last frame without its final bytes: its head verifies, its body does not, and
        // zeros follow.
        let mut bytes = full[..full.len() - 3].to_vec();
        bytes.extend(vec![0u8; 8192]);
        let scanned = scan(&bytes, 0);
        assert_eq!(scanned.frames.len(), 5);
        assert!(!scanned.frames[4].body_ok);
        assert!(
            matches!(scanned.end, ScanEnd::ZeroTail { offset } if offset as usize == full.len()),
            "{:?}",
            scanned.end
        );
    }

    #[test]
    fn a_large_zero_tail_scans_quickly() {
        let (mut bytes, offsets) = segment();
        let clean_len = bytes.len();
        bytes.resize(64 << 20, 0);
        let started = std::time::Instant::now();
        let scanned = scan(&bytes, 0);
        let took = started.elapsed();
        assert_eq!(scanned.frames.len(), offsets.len());
        assert_eq!(
            scanned.end,
            ScanEnd::ZeroTail {
                offset: clean_len as u64
            }
        );
        // A head check at every offset of 64 MiB takes seconds; one pass over the bytes
        // (even unoptimised) well under that.
        assert!(took < std::time::Duration::from_secs(2), "{took:?}");
        // Garbage right after the frames, then 64 MiB of zeros: torn, also quickly.
        bytes[clean_len] = 0x55;
        bytes[clean_len + 100] = 0x66;
        let started = std::time::Instant::now();
        let scanned = scan(&bytes, 0);
        assert!(
            matches!(scanned.end, ScanEnd::Torn { offset, .. } if offset as usize == clean_len)
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn data_end_finds_the_last_non_zero_byte() {
        assert_eq!(data_end(&[]), 0);
        assert_eq!(data_end(&[0; 10_000]), 0);
        let mut bytes = vec![0u8; 10_000];
        for at in [0, 1, 4095, 4096, 4097, 5904, 9999] {
            bytes.fill(0);
            bytes[at] = 1;
            assert_eq!(data_end(&bytes), at + 1, "{at}");
        }
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
