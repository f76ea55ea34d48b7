//! Reading the replies of the built-in behaviours into typed values.
//!
//! Each typed helper asks for a plain serde struct; a reply that does not fit becomes a
//! [`ClientError::UnexpectedReply`] naming the request, the reason and the reply itself.

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::ClientError;

/// Deserializes `reply` into `T`, or explains why it does not fit.
pub(crate) fn parse<T: DeserializeOwned>(request: &str, reply: Value) -> Result<T, ClientError> {
    // Cloning keeps the reply for the error message; replies of built-ins are small.
    serde_json::from_value(reply.clone()).map_err(|err| ClientError::UnexpectedReply {
        request: request.to_owned(),
        reason: err.to_string(),
        reply,
    })
}

/// Checks that a reply names the field that was asked about.
pub(crate) fn expect_field(request: &str, asked: &str, answered: &str) -> Result<(), ClientError> {
    if asked == answered {
        return Ok(());
    }
    Err(ClientError::UnexpectedReply {
        request: request.to_owned(),
        reason: format!("the reply is about field {answered:?}, not {asked:?}"),
        reply: Value::Null,
    })
}
