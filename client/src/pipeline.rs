//! `Pipeline`: many calls in flight on one bidirectional stream, for throughput.
//!
//! [`Client::pipeline`](crate::Client::pipeline) opens a stream and returns its two halves:
//! a [`PipelineSender`] (cloneable; each [`send`](PipelineSender::send) returns the call's id)
//! and a [`PipelineReceiver`] yielding [`PipelineResult`]s in completion order. Each call has
//! the semantics and errors of `Call`; one call's error does not end the stream.
//!
//! Pipelined calls are not retried by the client (a broken stream fails them all). To make a
//! call safe to resend on a new stream, give it a request id with
//! [`send_with`](PipelineSender::send_with): the server then answers a resend of a committed
//! call with the stored reply ([`CallOutcome::deduplicated`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::Value;
use statehouse_proto::v1::{PipelineRequest, PipelineResponse};
use statehouse_proto::value::json_to_proto;
use tokio::sync::mpsc;
use tonic::{Code, Streaming};

use crate::client::{check_exact_integers, decode_value, CallOutcome};
use crate::error::ClientError;
use crate::request_id;

/// Requests buffered in the client before `send` waits.
pub const PIPELINE_SEND_BUFFER: usize = 1024;

/// The sending half of a pipeline.
#[derive(Debug, Clone)]
pub struct PipelineSender {
    requests: mpsc::Sender<PipelineRequest>,
    next_id: Arc<AtomicU64>,
}

/// The receiving half of a pipeline.
#[derive(Debug)]
pub struct PipelineReceiver {
    responses: Streaming<PipelineResponse>,
}

/// The answer to one pipelined call.
#[derive(Debug)]
pub struct PipelineResult {
    /// The id [`PipelineSender::send`] returned for the call.
    pub id: u64,
    /// What `Call` would have returned.
    pub outcome: Result<CallOutcome, ClientError>,
}

impl PipelineSender {
    pub(crate) fn new(requests: mpsc::Sender<PipelineRequest>) -> Self {
        PipelineSender {
            requests,
            next_id: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Sends a call without a request id; returns its id. Waits while the client's buffer
    /// is full.
    pub async fn send(
        &self,
        entity_type: &str,
        key: &str,
        message: Value,
    ) -> Result<u64, ClientError> {
        self.send_with(entity_type, key, message, None).await
    }

    /// Sends a call carrying `request_id` (an idempotency key of 1..=128 bytes of
    /// printable ASCII, checked here) when given; returns the call's pipeline id.
    pub async fn send_with(
        &self,
        entity_type: &str,
        key: &str,
        message: Value,
        request_id: Option<&str>,
    ) -> Result<u64, ClientError> {
        check_exact_integers(&message)?;
        if let Some(request_id) = request_id {
            request_id::validate(request_id)?;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let request = PipelineRequest {
            id,
            r#type: entity_type.to_owned(),
            key: key.to_owned(),
            message: Some(json_to_proto(message)),
            request_id: request_id.unwrap_or_default().to_owned(),
        };
        self.requests
            .send(request)
            .await
            .map_err(|_| ClientError::Status {
                code: Code::Unavailable,
                message: "the pipeline stream is closed".into(),
            })?;
        Ok(id)
    }
}

impl PipelineReceiver {
    pub(crate) fn new(responses: Streaming<PipelineResponse>) -> Self {
        PipelineReceiver { responses }
    }

    /// The next answer, in completion order; `None` once every sender is dropped and every
    /// call is answered. An `Err` means the stream itself failed.
    pub async fn next(&mut self) -> Option<Result<PipelineResult, ClientError>> {
        match self.responses.message().await {
            Ok(Some(response)) => Some(Ok(result_of(response))),
            Ok(None) => None,
            Err(status) => Some(Err(status.into())),
        }
    }
}

fn result_of(response: PipelineResponse) -> PipelineResult {
    let id = response.id;
    let outcome = if response.code == 0 {
        decode_value(response.reply, || format!("pipelined call {id}")).map(|reply| CallOutcome {
            reply,
            seq: response.seq,
            deduplicated: response.deduplicated,
        })
    } else {
        Err(ClientError::Status {
            code: Code::from_i32(response.code),
            message: response.error,
        })
    };
    PipelineResult { id, outcome }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_the_calls_code_and_message() {
        let response = PipelineResponse {
            id: 7,
            reply: None,
            seq: 0,
            code: Code::NotFound as i32,
            error: "no such type".into(),
            deduplicated: false,
        };
        let result = result_of(response);
        assert_eq!(result.id, 7);
        let err = result.outcome.unwrap_err();
        assert_eq!(
            (err.code(), err.to_string().contains("no such type")),
            (Code::NotFound, true)
        );
    }

    #[test]
    fn replies_decode_to_json() {
        let reply = json_to_proto(serde_json::json!({"value": 3}));
        let response = PipelineResponse {
            id: 1,
            reply: Some(reply),
            seq: 3,
            code: 0,
            error: String::new(),
            deduplicated: true,
        };
        let outcome = result_of(response).outcome.unwrap();
        assert_eq!(
            (outcome.reply, outcome.seq, outcome.deduplicated),
            (serde_json::json!({"value": 3}), 3, true)
        );
    }
}
