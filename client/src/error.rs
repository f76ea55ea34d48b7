//! The one error type of the client library, [`ClientError`].
//!
//! Every failure keeps the gRPC [`Code`] a caller would branch on ([`ClientError::code`]) and a
//! message a person can act on. Failures that never reached the server (a malformed URL, a
//! refused connection) and replies a typed helper could not understand are mapped onto the
//! closest gRPC code, so callers have one thing to match on.

use serde_json::Value;
use tonic::Code;

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server URL could not be used (bad syntax, unsupported scheme).
    #[error("invalid server URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What was wrong with it.
        reason: String,
    },
    /// The message cannot be sent as it is, e.g. an integer the wire cannot carry exactly.
    #[error("invalid message: {reason}")]
    InvalidMessage {
        /// What is wrong with it, and where.
        reason: String,
    },
    /// A caller's request id is not 1..=128 bytes of printable ASCII.
    #[error("invalid request id {id:?}: {reason}")]
    InvalidRequestId {
        /// The id as given.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The arguments of a request do not fit together, e.g. a key filter without a type.
    #[error("invalid request: {reason}")]
    InvalidRequest {
        /// What is wrong.
        reason: String,
    },
    /// No connection could be made to the server.
    #[error("cannot connect to {url}: {reason}")]
    Connect {
        /// The URL the client tried.
        url: String,
        /// The transport's explanation, with its causes.
        reason: String,
    },
    /// The server (or the transport under the call) answered with a gRPC error status.
    #[error("{message}")]
    Status {
        /// The gRPC status code.
        code: Code,
        /// The status message, as the server wrote it.
        message: String,
    },
    /// The server answered, but with a value this client could not understand: a
    /// protobuf value with no JSON form, or a built-in's reply missing the fields it promises.
    #[error("unexpected reply to {request}: {reason} (reply: {reply})")]
    UnexpectedReply {
        /// What was asked, e.g. `counter incr`.
        request: String,
        /// What was wrong with the reply.
        reason: String,
        /// The reply as received (`null` when it could not be decoded at all).
        reply: Value,
    },
}

impl ClientError {
    /// The gRPC status code of this failure.
    ///
    /// Local failures map onto the closest code: a bad URL or message is `INVALID_ARGUMENT`, a refused
    /// connection `UNAVAILABLE`, a reply the client cannot read `INTERNAL`.
    pub fn code(&self) -> Code {
        match self {
            ClientError::InvalidUrl { .. }
            | ClientError::InvalidMessage { .. }
            | ClientError::InvalidRequestId { .. }
            | ClientError::InvalidRequest { .. } => Code::InvalidArgument,
            ClientError::Connect { .. } => Code::Unavailable,
            ClientError::Status { code, .. } => *code,
            ClientError::UnexpectedReply { .. } => Code::Internal,
        }
    }

    /// The canonical name of [`Self::code`], e.g. `INVALID_ARGUMENT`.
    pub fn code_name(&self) -> &'static str {
        code_name(self.code())
    }

    /// The human-readable message, without the code.
    pub fn message(&self) -> String {
        self.to_string()
    }

    /// Whether the failure happened before any request reached a server (a bad URL, a
    /// message that cannot be sent, a malformed request id), so retrying cannot help and the
    /// input must be fixed.
    pub fn is_local_input(&self) -> bool {
        matches!(
            self,
            ClientError::InvalidUrl { .. }
                | ClientError::InvalidMessage { .. }
                | ClientError::InvalidRequestId { .. }
                | ClientError::InvalidRequest { .. }
        )
    }
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        ClientError::Status {
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

/// The canonical upper-case name of a gRPC status code, as in the gRPC specification
/// (`OK`, `INVALID_ARGUMENT`, `DATA_LOSS`, …).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Renders a transport error with its chain of causes: tonic's top-level message alone
/// ("transport error") does not say what went wrong.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_keeps_code_and_message() {
        let err = ClientError::from(tonic::Status::invalid_argument("unknown op \"frob\""));
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(err.code_name(), "INVALID_ARGUMENT");
        assert_eq!(err.message(), "unknown op \"frob\"");
        assert!(!err.is_local_input());
    }

    #[test]
    fn local_failures_map_to_the_closest_code() {
        let url = ClientError::InvalidUrl {
            url: "::".into(),
            reason: "bad".into(),
        };
        assert_eq!(url.code_name(), "INVALID_ARGUMENT");
        assert!(url.is_local_input());
        let connect = ClientError::Connect {
            url: "http://127.0.0.1:1".into(),
            reason: "refused".into(),
        };
        assert_eq!(connect.code_name(), "UNAVAILABLE");
        let reply = ClientError::UnexpectedReply {
            request: "counter get".into(),
            reason: "no value".into(),
            reply: Value::Null,
        };
        assert_eq!(reply.code(), Code::Internal);
    }

    #[test]
    fn every_code_has_its_canonical_name() {
        for (number, name) in [
            (0, "OK"),
            (3, "INVALID_ARGUMENT"),
            (4, "DEADLINE_EXCEEDED"),
            (5, "NOT_FOUND"),
            (8, "RESOURCE_EXHAUSTED"),
            (10, "ABORTED"),
            (14, "UNAVAILABLE"),
            (15, "DATA_LOSS"),
        ] {
            assert_eq!(code_name(Code::from_i32(number)), name);
        }
    }

    #[test]
    fn error_chain_includes_causes() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let err = Outer(std::io::Error::other("connection refused"));
        assert_eq!(error_chain(&err), "outer: connection refused");
    }
}
