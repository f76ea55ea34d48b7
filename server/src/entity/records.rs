//! The values and names of an entity's durable records besides its events and snapshot:
//! timers, stored replies of request ids, the durable inbox, message receipts and send
//! counters, the outbox, and dead letters (storage's [`RecordKind`]s).
//!
//! **Owns**: how each record is named and encoded (MessagePack of the structs here). The
//! store treats names and values as opaque, checksummed bytes.
//!
//! [`RecordKind`]: crate::storage::RecordKind

use serde::{Deserialize, Serialize};

use crate::address::EntityId;
use crate::behaviour::Value;

use super::EntityError;

/// A pending timer (record kind `Timer`, named by the timer's name).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimerRecord {
    /// Unix milliseconds.
    pub due_ms: u64,
    pub payload: Value,
}

/// The stored reply of a committed turn that carried a client request id (kind `Dedup`,
/// named by the request id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DedupRecord {
    /// When the turn committed, Unix milliseconds: the retention window counts from here.
    pub at_ms: u64,
    /// The entity's sequence number after the turn.
    pub seq: u64,
    pub reply: Value,
}

/// The commit time of a [`DedupRecord`], read without decoding its reply: what loading an
/// entity's stored replies needs (the reply is decoded only if a retry asks for it).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct DedupStamp {
    pub at_ms: u64,
}

/// How a message is handled by the entity that receives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MessageKind {
    /// Through the behaviour's cast handler; any reply is dropped.
    Cast,
    /// Through the behaviour's call handler; the reply goes back to `reply_to` as the info
    /// message `reply_message(self, tag, reply)`.
    Call { reply_to: EntityId, tag: Value },
    /// Through the behaviour's info handler.
    Info,
}

/// A message in an entity's durable inbox (kind `Inbox`, named by the inbox sequence
/// number, big-endian): a durable cast, or a re-driven dead letter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InboxItem {
    pub kind: MessageKind,
    pub message: Value,
    /// Who sent it, for dead letters: `client`, `type/key` of an entity, or `timer:NAME`.
    pub origin: String,
}

/// A message an entity sent that its target has not yet accepted (kind `Outbox`, named by
/// [`outbox_name`]). Also what the postman carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxMessage {
    pub to: EntityId,
    /// The sender's sequence number for messages to `to`: 1, 2, 3, …
    pub pair_seq: u64,
    pub kind: MessageKind,
    pub message: Value,
}

/// A durable message that crashed its entity too often, kept for an operator (kind
/// `DeadLetter`, named by its id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetterRecord {
    /// `timer`, `send`, `request`, `reply` or `durable_cast`.
    pub kind: String,
    /// What re-driving it puts in the inbox.
    pub item: InboxItem,
    /// The last crash (or why it could not be delivered).
    pub reason: String,
    pub attempts: u32,
    pub dead_at_ms: u64,
}

/// Encodes a record value.
pub fn encode<T: Serialize>(entity: &EntityId, value: &T) -> Result<Vec<u8>, EntityError> {
    rmp_serde::to_vec_named(value).map_err(|e| EntityError::Crashed {
        entity: entity.clone(),
        reason: format!("record does not encode: {e}"),
    })
}

/// Decodes a record value; `what` names the record in the error.
pub fn decode<T: for<'de> Deserialize<'de>>(
    entity: &EntityId,
    what: &str,
    bytes: &[u8],
) -> Result<T, EntityError> {
    rmp_serde::from_slice(bytes).map_err(|e| EntityError::Corrupt {
        entity: entity.clone(),
        detail: format!("{what} does not decode: {e}"),
    })
}

/// An entity address as a record name: `len u16 | type | len u16 | key`, so names of
/// different addresses never prefix each other.
pub fn address_name(id: &EntityId) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + id.entity_type.len() + id.key.len());
    for part in [id.entity_type.as_bytes(), id.key.as_bytes()] {
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// The address a name made by [`address_name`] starts with, and the bytes after it.
pub fn parse_address_name(name: &[u8]) -> Option<(EntityId, &[u8])> {
    let mut rest = name;
    let mut parts = Vec::with_capacity(2);
    for _ in 0..2 {
        let len = usize::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?));
        let part = std::str::from_utf8(rest.get(2..2 + len)?).ok()?;
        parts.push(part.to_owned());
        rest = &rest[2 + len..];
    }
    let key = parts.pop()?;
    let entity_type = parts.pop()?;
    Some((
        EntityId {
            entity_type: entity_type.into(),
            key: key.into(),
        },
        rest,
    ))
}

/// The outbox name of the message `pair_seq` to `to`: ordered by target, then sequence.
pub fn outbox_name(to: &EntityId, pair_seq: u64) -> Vec<u8> {
    let mut name = address_name(to);
    name.extend_from_slice(&pair_seq.to_be_bytes());
    name
}

/// The inbox name of inbox sequence number `seq`.
pub fn inbox_name(seq: u64) -> Vec<u8> {
    seq.to_be_bytes().to_vec()
}

/// The sequence number of an inbox name.
pub fn parse_inbox_name(name: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(name.try_into().ok()?))
}

/// A sequence number stored as a record value (receipts, send counters).
pub fn encode_seq(seq: u64) -> Vec<u8> {
    seq.to_be_bytes().to_vec()
}

/// The sequence number of a record value made by [`encode_seq`].
pub fn decode_seq(entity: &EntityId, what: &str, bytes: &[u8]) -> Result<u64, EntityError> {
    let array: [u8; 8] = bytes.try_into().map_err(|_| EntityError::Corrupt {
        entity: entity.clone(),
        detail: format!("{what} is {} bytes, expected 8", bytes.len()),
    })?;
    Ok(u64::from_be_bytes(array))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn id(t: &str, k: &str) -> EntityId {
        EntityId::new(t, k).unwrap()
    }

    #[test]
    fn address_names_round_trip_and_never_prefix_each_other() {
        let a = id("a", "bc");
        let b = id("ab", "c");
        assert_ne!(address_name(&a), address_name(&b));
        assert!(!address_name(&b).starts_with(&address_name(&a)));
        let name = outbox_name(&a, 7);
        let (parsed, rest) = parse_address_name(&name).unwrap();
        assert_eq!(parsed, a);
        assert_eq!(rest, 7u64.to_be_bytes());
        assert!(parse_address_name(&[0, 5, b'a']).is_none());
    }

    #[test]
    fn outbox_names_sort_by_target_then_sequence() {
        let t = id("t", "k");
        let mut names = [
            outbox_name(&t, 256),
            outbox_name(&t, 2),
            outbox_name(&t, 10),
        ];
        names.sort();
        let seqs: Vec<u64> = names
            .iter()
            .map(|n| u64::from_be_bytes(parse_address_name(n).unwrap().1.try_into().unwrap()))
            .collect();
        assert_eq!(seqs, vec![2, 10, 256]);
    }

    #[test]
    fn records_round_trip() {
        let e = id("t", "k");
        let item = InboxItem {
            kind: MessageKind::Call {
                reply_to: id("s", "1"),
                tag: json!({"n": 1}),
            },
            message: json!({"op": "incr"}),
            origin: "s/1".into(),
        };
        let bytes = encode(&e, &item).unwrap();
        assert_eq!(decode::<InboxItem>(&e, "inbox 1", &bytes).unwrap(), item);
        let timer = TimerRecord {
            due_ms: 5,
            payload: json!([1, "x", null]),
        };
        let bytes = encode(&e, &timer).unwrap();
        assert_eq!(decode::<TimerRecord>(&e, "timer", &bytes).unwrap(), timer);
        let err = decode::<TimerRecord>(&e, "timer t1", &[0xc1]).unwrap_err();
        assert!(err.to_string().contains("timer t1"), "{err}");
        assert_eq!(decode_seq(&e, "receipt", &encode_seq(9)).unwrap(), 9);
        assert!(decode_seq(&e, "receipt", &[1, 2]).is_err());
    }
}
