//! Request ids: the idempotency keys of `Call`, `Cast` and `Pipeline` requests.
//!
//! A retry that carries the same request id to the same entity within the server's retention
//! window gets the stored reply of the turn that already committed, without the handler
//! running again. That is what makes [`Client`](crate::Client)'s retries on `UNAVAILABLE`
//! safe. By default the client [`generate`]s one id per logical call; a caller may bring its
//! own (e.g. an order number), which [`validate`] checks before anything is sent.

use crate::error::ClientError;

/// The longest request id the server accepts, in bytes.
pub const REQUEST_ID_MAX_LEN: usize = 128;

/// A fresh request id: 128 random bits as 32 lower-case hex digits.
pub fn generate() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Checks a caller's request id: 1..=[`REQUEST_ID_MAX_LEN`] bytes of printable ASCII
/// (`' '..='~'`). Refused ids are [`ClientError::InvalidRequestId`], a local-input error.
pub fn validate(id: &str) -> Result<(), ClientError> {
    let invalid = |reason: String| ClientError::InvalidRequestId {
        id: id.to_owned(),
        reason,
    };
    if id.is_empty() {
        return Err(invalid("it is empty".to_owned()));
    }
    if id.len() > REQUEST_ID_MAX_LEN {
        return Err(invalid(format!(
            "it is {} bytes long; at most {REQUEST_ID_MAX_LEN} are allowed",
            id.len()
        )));
    }
    if let Some((at, c)) = id.char_indices().find(|(_, c)| !(' '..='~').contains(c)) {
        return Err(invalid(format!(
            "character {c:?} at byte {at} is not printable ASCII (' ' to '~')"
        )));
    }
    Ok(())
}

/// The id a request carries: the caller's (validated), or a fresh one.
pub(crate) fn resolve(id: Option<&str>) -> Result<String, ClientError> {
    match id {
        Some(id) => validate(id).map(|()| id.to_owned()),
        None => Ok(generate()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_32_hex_digits_and_distinct() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| generate()).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            assert_eq!(id.len(), 32, "{id}");
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
            assert!(validate(id).is_ok());
        }
    }

    #[test]
    fn valid_ids_are_1_to_128_printable_ascii_bytes() {
        for id in ["a", "order-42", " spaces are fine ~", &"x".repeat(128)] {
            assert!(validate(id).is_ok(), "{id:?}");
        }
        let all_printable: String = (' '..='~').collect();
        assert!(validate(&all_printable).is_ok());
    }

    #[test]
    fn invalid_ids_are_refused_saying_why() {
        let cases = [
            ("", "empty"),
            (&*"x".repeat(129), "129 bytes"),
            ("tab\there", "'\\t'"),
            ("new\nline", "'\\n'"),
            ("caf\u{e9}", "'é' at byte 3"),
            ("del\u{7f}", "'\\u{7f}'"),
        ];
        for (id, why) in cases {
            let err = validate(id).unwrap_err();
            assert!(err.is_local_input(), "{id:?}");
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            let text = err.to_string();
            assert!(text.starts_with("invalid request id"), "{text}");
            assert!(text.contains(why), "{id:?}: {text}");
        }
    }

    #[test]
    fn resolve_keeps_a_valid_id_and_generates_one_otherwise() {
        assert_eq!(resolve(Some("mine")).unwrap(), "mine");
        assert!(resolve(Some("")).is_err());
        assert_eq!(resolve(None).unwrap().len(), 32);
    }
}
