//! The caller's deadline, from the `grpc-timeout` request header.
//!
//! The deadline travels with the message into the entity's mailbox: a message whose deadline
//! passed before its turn is skipped, and the RPC answers `DEADLINE_EXCEEDED` at the deadline.
//! tonic's transport also enforces `grpc-timeout` (answering `CANCELLED`), starting its clock
//! a little earlier than this handler can; the server's own deadline is therefore set a small
//! margin early so callers see `DEADLINE_EXCEEDED`, as the gRPC spec asks.

use std::time::Duration;

use tokio::time::Instant;
use tonic::metadata::MetadataMap;

/// The most the server's deadline is moved ahead of the caller's.
const MARGIN_MAX: Duration = Duration::from_millis(5);

/// The instant after which the caller no longer waits, if it sent a deadline.
pub fn from_metadata(metadata: &MetadataMap) -> Option<Instant> {
    let timeout = parse_grpc_timeout(metadata.get("grpc-timeout")?.to_str().ok()?)?;
    let margin = (timeout / 20).min(MARGIN_MAX);
    Some(Instant::now() + (timeout - margin))
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("10S"), Some(Duration::from_secs(10)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            parse_grpc_timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(parse_grpc_timeout("5n"), Some(Duration::from_nanos(5)));
    }

    #[test]
    fn refuses_malformed_values() {
        for bad in ["", "S", "10", "10s", "-1S", "123456789S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }
}
