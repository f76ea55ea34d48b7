//! The journal frame: one [`EntityBatch`] as bytes on disk.
//!
//! **Owns**: the frame layout, its two checksums and the encoding of the operations.
//!
//! ```text
//! header (14 bytes): head_crc u32 | body_crc u32 | head_len u16 | body_len u32
//! head:              format u8 | shard u32 | type_len u16 | type | key_len u16 | key
//! body:              op_count u32 | op*
//! op:                tag u8 (1 event, 2 snapshot, 3 delete, 4 put record, 5 remove record,
//!                            6 put timer due, 7 remove timer due)
//!                    [event, snapshot: seq u64 | behaviour_version u32 | payload_len u32 | payload]
//!                    [put record:      kind u8 | name_len u16 | name | value_len u32 | value]
//!                    [remove record:   kind u8 | name_len u16 | name]
//!                    [timer due ops:   due_ms u64 | name_len u16 | name]
//! ```
//!
//! A record kind is written as its key's kind byte (`keys::record_kind_byte`). An unknown tag
//! or kind byte, or a name longer than [`RECORD_NAME_BYTES_MAX`], is a decode error.
//!
//! All integers are big-endian. `head_crc` is CRC32C over `head_len | body_len | body_crc |
//! head`, so a verified head vouches for both lengths and for the body's checksum: when only
//! the body is damaged the frame's entity and extent are still known, and recovery can mark
//! that one entity corrupt and carry on with the next frame. `body_crc` is CRC32C over the
//! body.

use crate::address::{EntityId, KEY_BYTES_MAX, TYPE_BYTES_MAX};

use super::super::codec::{put_len_u16, put_len_u32, Reader};
use super::super::keys::{record_kind_byte, record_kind_of_byte};
use super::super::{EntityBatch, Op, RECORD_NAME_BYTES_MAX};

/// The frame format this build writes and reads.
pub const FRAME_FORMAT_VERSION: u8 = 1;
/// Bytes of the fixed header.
pub const FRAME_HEADER_BYTES: usize = 4 + 4 + 2 + 4;
/// The shortest possible head: one-byte type and key.
pub const FRAME_HEAD_BYTES_MIN: usize = 1 + 4 + 2 + 1 + 2 + 1;
/// The longest possible head: type and key at their limits.
pub const FRAME_HEAD_BYTES_MAX: usize = 1 + 4 + 2 + TYPE_BYTES_MAX + 2 + KEY_BYTES_MAX;
/// The largest body (encoded operations of one batch) the journal accepts. A batch over it
/// is refused by `commit`; a head claiming more is not a head we wrote.
pub const FRAME_BODY_BYTES_MAX: usize = 32 * 1024 * 1024;

const TAG_EVENT: u8 = 1;
const TAG_SNAPSHOT: u8 = 2;
const TAG_DELETE: u8 = 3;
const TAG_PUT_RECORD: u8 = 4;
const TAG_REMOVE_RECORD: u8 = 5;
const TAG_PUT_TIMER_DUE: u8 = 6;
const TAG_REMOVE_TIMER_DUE: u8 = 7;

/// What a verified head says about its frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedHead {
    pub shard: u32,
    pub entity: EntityId,
    pub head_len: usize,
    pub body_len: usize,
    pub body_crc: u32,
}

impl VerifiedHead {
    /// Bytes from the frame's start to the body.
    pub fn body_offset(&self) -> usize {
        FRAME_HEADER_BYTES + self.head_len
    }

    /// The whole frame's length.
    pub fn frame_len(&self) -> usize {
        self.body_offset() + self.body_len
    }
}

/// The size of the body of `ops` once encoded.
pub fn body_len(ops: &[Op]) -> usize {
    4 + ops
        .iter()
        .map(|op| match op {
            Op::Event { payload, .. } | Op::Snapshot { payload, .. } => {
                1 + 8 + 4 + 4 + payload.len()
            }
            Op::Delete => 1,
            Op::PutRecord { name, value, .. } => 1 + 1 + 2 + name.len() + 4 + value.len(),
            Op::RemoveRecord { name, .. } => 1 + 1 + 2 + name.len(),
            Op::PutTimerDue { name, .. } | Op::RemoveTimerDue { name, .. } => {
                1 + 8 + 2 + name.len()
            }
        })
        .sum::<usize>()
}

/// Encodes a batch as one frame. The caller has validated the entity address and the record
/// names (at most [`RECORD_NAME_BYTES_MAX`] bytes) and checked [`body_len`] against
/// [`FRAME_BODY_BYTES_MAX`].
pub fn encode_frame(batch: &EntityBatch) -> Vec<u8> {
    let entity_type = batch.entity.entity_type.as_bytes();
    let key = batch.entity.key.as_bytes();
    let head_len = 1 + 4 + 2 + entity_type.len() + 2 + key.len();
    let body_len = body_len(&batch.ops);
    debug_assert!(head_len <= FRAME_HEAD_BYTES_MAX);
    debug_assert!(body_len <= FRAME_BODY_BYTES_MAX);

    let mut frame = vec![0u8; FRAME_HEADER_BYTES];
    frame.reserve(head_len + body_len);
    frame.push(FRAME_FORMAT_VERSION);
    frame.extend_from_slice(&batch.shard.to_be_bytes());
    put_len_u16(&mut frame, entity_type.len());
    frame.extend_from_slice(entity_type);
    put_len_u16(&mut frame, key.len());
    frame.extend_from_slice(key);

    put_len_u32(&mut frame, batch.ops.len());
    for op in &batch.ops {
        match op {
            Op::Event {
                seq,
                behaviour_version,
                payload,
            }
            | Op::Snapshot {
                seq,
                behaviour_version,
                payload,
            } => {
                let tag = if matches!(op, Op::Event { .. }) {
                    TAG_EVENT
                } else {
                    TAG_SNAPSHOT
                };
                frame.push(tag);
                frame.extend_from_slice(&seq.to_be_bytes());
                frame.extend_from_slice(&behaviour_version.to_be_bytes());
                put_len_u32(&mut frame, payload.len());
                frame.extend_from_slice(payload);
            }
            Op::Delete => frame.push(TAG_DELETE),
            Op::PutRecord { kind, name, value } => {
                frame.push(TAG_PUT_RECORD);
                frame.push(record_kind_byte(*kind));
                put_len_u16(&mut frame, name.len());
                frame.extend_from_slice(name);
                put_len_u32(&mut frame, value.len());
                frame.extend_from_slice(value);
            }
            Op::RemoveRecord { kind, name } => {
                frame.push(TAG_REMOVE_RECORD);
                frame.push(record_kind_byte(*kind));
                put_len_u16(&mut frame, name.len());
                frame.extend_from_slice(name);
            }
            Op::PutTimerDue { due_ms, name } | Op::RemoveTimerDue { due_ms, name } => {
                let tag = if matches!(op, Op::PutTimerDue { .. }) {
                    TAG_PUT_TIMER_DUE
                } else {
                    TAG_REMOVE_TIMER_DUE
                };
                frame.push(tag);
                frame.extend_from_slice(&due_ms.to_be_bytes());
                put_len_u16(&mut frame, name.len());
                frame.extend_from_slice(name);
            }
        }
    }
    debug_assert_eq!(frame.len(), FRAME_HEADER_BYTES + head_len + body_len);

    let body_crc = crc32c::crc32c(&frame[FRAME_HEADER_BYTES + head_len..]);
    let head_crc = head_checksum(
        head_len as u16,
        body_len as u32,
        body_crc,
        &frame[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + head_len],
    );
    frame[0..4].copy_from_slice(&head_crc.to_be_bytes());
    frame[4..8].copy_from_slice(&body_crc.to_be_bytes());
    frame[8..10].copy_from_slice(&(head_len as u16).to_be_bytes());
    frame[10..14].copy_from_slice(&(body_len as u32).to_be_bytes());
    frame
}

fn head_checksum(head_len: u16, body_len: u32, body_crc: u32, head: &[u8]) -> u32 {
    let mut crc = crc32c::crc32c(&head_len.to_be_bytes());
    crc = crc32c::crc32c_append(crc, &body_len.to_be_bytes());
    crc = crc32c::crc32c_append(crc, &body_crc.to_be_bytes());
    crc32c::crc32c_append(crc, head)
}

/// Checks whether a frame head we wrote starts at `bytes[at..]`: header and head present,
/// lengths within bounds, head CRC correct, head well-formed. The body is not looked at.
/// The error says why not, for logs and [`super::super::StoreError::CorruptJournal`].
pub fn verify_head(bytes: &[u8], at: usize) -> Result<VerifiedHead, String> {
    let Some(rest) = bytes.get(at..) else {
        return Err("offset past the end of the segment".into());
    };
    let mut header = Reader::new(rest);
    let (Some(head_crc), Some(body_crc), Some(head_len), Some(body_len)) =
        (header.u32(), header.u32(), header.u16(), header.u32())
    else {
        return Err(format!(
            "{} bytes left, fewer than a {FRAME_HEADER_BYTES}-byte frame header",
            rest.len()
        ));
    };
    let head_len = usize::from(head_len);
    let body_len = body_len as usize;
    // Cheap checks first: recovery calls this at every offset of a damaged tail.
    if !(FRAME_HEAD_BYTES_MIN..=FRAME_HEAD_BYTES_MAX).contains(&head_len) {
        return Err(format!("head length {head_len} is out of bounds"));
    }
    if body_len > FRAME_BODY_BYTES_MAX {
        return Err(format!(
            "body length {body_len} is over the limit {FRAME_BODY_BYTES_MAX}"
        ));
    }
    let Some(head) = header.take(head_len) else {
        return Err(format!(
            "the segment ends inside a {head_len}-byte frame head"
        ));
    };
    if head[0] != FRAME_FORMAT_VERSION {
        return Err(format!(
            "frame format {} is not {FRAME_FORMAT_VERSION}",
            head[0]
        ));
    }
    let computed = head_checksum(head_len as u16, body_len as u32, body_crc, head);
    if computed != head_crc {
        return Err(format!(
            "frame head failed its CRC32C check (stored {head_crc:#010x}, computed {computed:#010x})"
        ));
    }
    let (shard, entity) = decode_head(head)?;
    Ok(VerifiedHead {
        shard,
        entity,
        head_len,
        body_len,
        body_crc,
    })
}

fn decode_head(head: &[u8]) -> Result<(u32, EntityId), String> {
    let mut reader = Reader::new(head);
    let malformed = || "frame head is malformed".to_string();
    let _version = reader.u8().ok_or_else(malformed)?;
    let shard = reader.u32().ok_or_else(malformed)?;
    let type_len = usize::from(reader.u16().ok_or_else(malformed)?);
    let entity_type = reader.take(type_len).ok_or_else(malformed)?;
    let key_len = usize::from(reader.u16().ok_or_else(malformed)?);
    let key = reader.take(key_len).ok_or_else(malformed)?;
    if reader.remaining() != 0 {
        return Err(malformed());
    }
    let entity_type =
        std::str::from_utf8(entity_type).map_err(|_| "frame head type is not UTF-8".to_string())?;
    let key = std::str::from_utf8(key).map_err(|_| "frame head key is not UTF-8".to_string())?;
    let entity = EntityId::new(entity_type, key).map_err(|e| format!("frame head address: {e}"))?;
    Ok((shard, entity))
}

/// Whether `body` matches the checksum its verified head carries.
pub fn body_crc_ok(head: &VerifiedHead, body: &[u8]) -> bool {
    body.len() == head.body_len && crc32c::crc32c(body) == head.body_crc
}

/// Decodes a body whose checksum was verified. An error here means a frame we wrote cannot
/// be read back (a bug or a format mismatch), reported as corruption of the entity.
pub fn decode_body(body: &[u8]) -> Result<Vec<Op>, String> {
    let mut reader = Reader::new(body);
    let truncated = || "frame body ends early".to_string();
    let count = reader.u32().ok_or_else(truncated)? as usize;
    // Each op is at least one byte, so a count beyond the bytes left is damage, and
    // capping the allocation by it keeps a bad count from allocating gigabytes.
    if count > reader.remaining() {
        return Err(format!("frame body claims {count} operations"));
    }
    let mut ops = Vec::with_capacity(count);
    for _ in 0..count {
        let op = match reader.u8().ok_or_else(truncated)? {
            tag @ (TAG_EVENT | TAG_SNAPSHOT) => {
                let seq = reader.u64().ok_or_else(truncated)?;
                let behaviour_version = reader.u32().ok_or_else(truncated)?;
                let len = reader.u32().ok_or_else(truncated)? as usize;
                let payload = reader.take(len).ok_or_else(truncated)?.to_vec();
                if tag == TAG_EVENT {
                    Op::Event {
                        seq,
                        behaviour_version,
                        payload,
                    }
                } else {
                    Op::Snapshot {
                        seq,
                        behaviour_version,
                        payload,
                    }
                }
            }
            TAG_DELETE => Op::Delete,
            tag @ (TAG_PUT_RECORD | TAG_REMOVE_RECORD) => {
                let kind_byte = reader.u8().ok_or_else(truncated)?;
                let kind = record_kind_of_byte(kind_byte)
                    .ok_or_else(|| format!("unknown record kind {kind_byte} in frame body"))?;
                let name = read_name(&mut reader)?;
                if tag == TAG_PUT_RECORD {
                    let len = reader.u32().ok_or_else(truncated)? as usize;
                    let value = reader.take(len).ok_or_else(truncated)?.to_vec();
                    Op::PutRecord { kind, name, value }
                } else {
                    Op::RemoveRecord { kind, name }
                }
            }
            tag @ (TAG_PUT_TIMER_DUE | TAG_REMOVE_TIMER_DUE) => {
                let due_ms = reader.u64().ok_or_else(truncated)?;
                let name = read_name(&mut reader)?;
                if tag == TAG_PUT_TIMER_DUE {
                    Op::PutTimerDue { due_ms, name }
                } else {
                    Op::RemoveTimerDue { due_ms, name }
                }
            }
            other => return Err(format!("unknown operation tag {other} in frame body")),
        };
        ops.push(op);
    }
    if reader.remaining() != 0 {
        return Err(format!(
            "{} bytes after the last operation of the frame body",
            reader.remaining()
        ));
    }
    Ok(ops)
}

/// Reads `name_len u16 | name`, refusing names over the limit.
fn read_name(reader: &mut Reader<'_>) -> Result<Vec<u8>, String> {
    let truncated = || "frame body ends early".to_string();
    let len = usize::from(reader.u16().ok_or_else(truncated)?);
    if len > RECORD_NAME_BYTES_MAX {
        return Err(format!(
            "record name of {len} bytes in frame body; the limit is {RECORD_NAME_BYTES_MAX}"
        ));
    }
    Ok(reader.take(len).ok_or_else(truncated)?.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::RecordKind;

    pub(crate) fn sample_batch() -> EntityBatch {
        EntityBatch {
            shard: 3,
            entity: EntityId::new("counter", "user-42").unwrap(),
            ops: vec![
                Op::Event {
                    seq: 7,
                    behaviour_version: 2,
                    payload: b"{\"op\":\"incr\"}".to_vec(),
                },
                Op::Snapshot {
                    seq: 7,
                    behaviour_version: 2,
                    payload: b"{\"value\":7}".to_vec(),
                },
                Op::Delete,
                Op::Event {
                    seq: 1,
                    behaviour_version: 2,
                    payload: Vec::new(),
                },
                Op::PutRecord {
                    kind: RecordKind::Inbox,
                    name: 7u64.to_be_bytes().to_vec(),
                    value: b"message".to_vec(),
                },
                Op::RemoveRecord {
                    kind: RecordKind::Dedup,
                    name: b"request-1".to_vec(),
                },
                Op::PutTimerDue {
                    due_ms: 1_700_000_000_000,
                    name: b"tick".to_vec(),
                },
                Op::RemoveTimerDue {
                    due_ms: u64::MAX,
                    name: Vec::new(),
                },
            ],
        }
    }

    /// One of each op, with every record kind and edge-sized names and values.
    fn every_op() -> Vec<Op> {
        let mut ops = sample_batch().ops;
        for kind in RecordKind::ALL {
            for name in [Vec::new(), vec![0xff; RECORD_NAME_BYTES_MAX]] {
                ops.push(Op::PutRecord {
                    kind,
                    name: name.clone(),
                    value: Vec::new(),
                });
                ops.push(Op::PutRecord {
                    kind,
                    name: name.clone(),
                    value: vec![kind as u8; 70_000],
                });
                ops.push(Op::RemoveRecord { kind, name });
            }
        }
        ops.push(Op::PutTimerDue {
            due_ms: 0,
            name: vec![0; RECORD_NAME_BYTES_MAX],
        });
        ops
    }

    fn decode_frame(frame: &[u8]) -> Result<(VerifiedHead, Vec<Op>), String> {
        let head = verify_head(frame, 0)?;
        let body = frame
            .get(head.body_offset()..head.frame_len())
            .ok_or("short")?;
        if !body_crc_ok(&head, body) {
            return Err("body crc".into());
        }
        Ok((head, decode_body(body)?))
    }

    #[test]
    fn round_trip() {
        let batch = sample_batch();
        let frame = encode_frame(&batch);
        assert_eq!(
            frame.len(),
            FRAME_HEADER_BYTES + 1 + 4 + 2 + 7 + 2 + 7 + body_len(&batch.ops)
        );
        let (head, ops) = decode_frame(&frame).unwrap();
        assert_eq!(head.shard, 3);
        assert_eq!(head.entity, batch.entity);
        assert_eq!(head.frame_len(), frame.len());
        assert_eq!(ops, batch.ops);
    }

    #[test]
    fn every_op_round_trips_and_truncated_bodies_are_refused() {
        let ops = every_op();
        let batch = EntityBatch {
            ops: ops.clone(),
            ..sample_batch()
        };
        let frame = encode_frame(&batch);
        let (head, decoded) = decode_frame(&frame).unwrap();
        assert_eq!(decoded, ops);
        assert_eq!(head.body_len, body_len(&ops));
        // Each op alone, and the body cut at every byte: an error, never a panic.
        for op in sample_batch().ops {
            let batch = EntityBatch {
                ops: vec![op.clone()],
                ..sample_batch()
            };
            let frame = encode_frame(&batch);
            let head = verify_head(&frame, 0).unwrap();
            let body = &frame[head.body_offset()..];
            assert_eq!(body.len(), body_len(&batch.ops));
            assert_eq!(decode_body(body).unwrap(), vec![op.clone()]);
            for len in 0..body.len() {
                assert!(decode_body(&body[..len]).is_err(), "{op:?} cut at {len}");
            }
        }
    }

    #[test]
    fn unknown_kinds_and_long_names_are_decode_errors() {
        let body = |op: &Op| {
            let frame = encode_frame(&EntityBatch {
                ops: vec![op.clone()],
                ..sample_batch()
            });
            let offset = verify_head(&frame, 0).unwrap().body_offset();
            frame[offset..].to_vec()
        };
        let put = Op::PutRecord {
            kind: RecordKind::Outbox,
            name: b"n".to_vec(),
            value: b"v".to_vec(),
        };
        let mut bad_kind = body(&put);
        // op_count u32, tag u8, then the kind byte.
        bad_kind[5] = b's';
        let err = decode_body(&bad_kind).unwrap_err();
        assert!(err.contains("record kind"), "{err}");
        let mut long_name = body(&Op::RemoveTimerDue {
            due_ms: 1,
            name: vec![1],
        });
        // op_count u32, tag u8, due u64, then the name length.
        long_name[13..15].copy_from_slice(&((RECORD_NAME_BYTES_MAX + 1) as u16).to_be_bytes());
        long_name.extend(vec![1; RECORD_NAME_BYTES_MAX]);
        let err = decode_body(&long_name).unwrap_err();
        assert!(err.contains("limit"), "{err}");
        assert!(decode_body(&[0, 0, 0, 1, 8]).is_err());
    }

    #[test]
    fn an_empty_batch_round_trips() {
        let batch = EntityBatch {
            ops: Vec::new(),
            ..sample_batch()
        };
        let (_, ops) = decode_frame(&encode_frame(&batch)).unwrap();
        assert!(ops.is_empty());
    }

    #[test]
    fn every_flipped_byte_is_caught_and_body_damage_keeps_the_entity() {
        let batch = sample_batch();
        let frame = encode_frame(&batch);
        let body_offset = verify_head(&frame, 0).unwrap().body_offset();
        for byte in 0..frame.len() {
            for bit in 0..8 {
                let mut damaged = frame.clone();
                damaged[byte] ^= 1 << bit;
                assert!(
                    decode_frame(&damaged).is_err(),
                    "flip of bit {bit} in byte {byte} not caught"
                );
                if byte >= body_offset {
                    // Only the body is damaged: the head still names the entity.
                    let head = verify_head(&damaged, 0).unwrap();
                    assert_eq!(head.entity, batch.entity);
                    assert!(!body_crc_ok(
                        &head,
                        &damaged[head.body_offset()..head.frame_len()]
                    ));
                } else {
                    assert!(verify_head(&damaged, 0).is_err(), "byte {byte} bit {bit}");
                }
            }
        }
    }

    #[test]
    fn truncated_frames_and_zeros_do_not_verify() {
        let frame = encode_frame(&sample_batch());
        let head = verify_head(&frame, 0).unwrap();
        for len in 0..head.body_offset() {
            assert!(verify_head(&frame[..len], 0).is_err(), "len {len}");
        }
        assert!(verify_head(&[0u8; 4096], 0).is_err());
        assert!(verify_head(&frame, frame.len() + 1).is_err());
    }

    #[test]
    fn malformed_bodies_are_errors() {
        assert!(decode_body(&[]).is_err());
        assert!(decode_body(&[0, 0, 0, 1]).is_err());
        assert!(decode_body(&[0, 0, 0, 1, 9]).is_err());
        assert!(decode_body(&[255, 255, 255, 255]).is_err());
        assert!(decode_body(&[0, 0, 0, 1, TAG_DELETE, 0]).is_err());
        assert_eq!(
            decode_body(&[0, 0, 0, 1, TAG_DELETE]).unwrap(),
            vec![Op::Delete]
        );
    }
}
