//! `Watch`: a stream of an entity's committed turns.
//!
//! [`Client::watch`](crate::Client::watch) starts it; [`Watch::next`] yields
//! [`WatchUpdate`]s. The stream ends with an error when the watcher fell behind
//! (`RESOURCE_EXHAUSTED`) or the entity stopped (`UNAVAILABLE`); both messages say the
//! sequence number to resubscribe from.

use serde::Serialize;
use serde_json::Value;
use statehouse_proto::v1::WatchEvent;
use tonic::Streaming;

use crate::client::decode_value;
use crate::error::ClientError;

/// One message of a watch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WatchUpdate {
    /// The entity's sequence number after this turn (or of this state).
    pub seq: u64,
    /// The events the turn committed (empty for a state message).
    pub events: Vec<Value>,
    /// The state after the turn; `None` for events replayed from storage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<Value>,
    /// Said when it matters, e.g. that older events were compacted into a snapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// An open watch.
#[derive(Debug)]
pub struct Watch {
    updates: Streaming<WatchEvent>,
}

impl Watch {
    pub(crate) fn new(updates: Streaming<WatchEvent>) -> Self {
        Watch { updates }
    }

    /// The next update; `None` when the server closed the stream cleanly.
    pub async fn next(&mut self) -> Option<Result<WatchUpdate, ClientError>> {
        let event = match self.updates.message().await {
            Ok(Some(event)) => event,
            Ok(None) => return None,
            Err(status) => return Some(Err(status.into())),
        };
        let seq = event.seq;
        let decode = |value| decode_value(Some(value), || format!("watch update {seq}"));
        let events = match event
            .events
            .into_iter()
            .map(decode)
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(events) => events,
            Err(err) => return Some(Err(err)),
        };
        let state = match event.state.map(decode).transpose() {
            Ok(state) => state,
            Err(err) => return Some(Err(err)),
        };
        let note = (!event.note.is_empty()).then_some(event.note);
        Some(Ok(WatchUpdate {
            seq,
            events,
            state,
            note,
        }))
    }
}
