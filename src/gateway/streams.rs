//! What SSE and WebSocket streams share: reading a subscription request from the query string
//! and headers, checking it against the caller's credential, and running its session in a task
//! that ends it for the gateway's own reasons (shutdown, a revoked credential) with a last frame.

use std::sync::Arc;

use axum::http::HeaderMap;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::filter::FilterSet;
use crate::gateway::auth::{Authenticator, Principal};
use crate::gateway::cursor::Start;
use crate::gateway::http::ApiError;
use crate::gateway::session::{self, Outgoing, SessionContext, SessionRequest};

/// Frames buffered between a session and its connection's writer; the real buffer is the
/// session's live queue (`--client-queue`).
const WRITER_QUEUE: usize = 16;

/// The query parameters of a stream, in any order, repeatable where lists are allowed.
#[derive(Debug, Default, Clone)]
pub struct StreamQuery {
    pub filters: Vec<String>,
    pub topics: Vec<String>,
    /// `from` (WebSocket and SSE) or `last_event_id` (SSE's first connect).
    pub from: Option<String>,
    pub ticket: Option<String>,
    /// How SSE names its frames (`sse_events=`); WebSocket frames always carry the action.
    pub sse_events: SseEvents,
    /// What moves a durable subscription's stored position (`ack=`).
    pub acks: Acks,
}

/// What moves a durable subscription's stored position.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Acks {
    /// Each frame handed to the connection (the default): frames still in the network when the
    /// client goes away are past the stored position, so a client that comes back without its
    /// own last id skips them.
    #[default]
    Delivery,
    /// Only what the client acknowledged (`{"type":"ack","id":...}` over WebSocket): nothing it
    /// did not confirm is ever skipped; what it received but had not confirmed comes again.
    Client,
}

/// The `event:` names of an SSE stream.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum SseEvents {
    /// Each event frame named by its action; positions as id-only frames (the default).
    #[default]
    Actions,
    /// For a browser's EventSource, which only sees the names it listens for and never an
    /// id-only frame: events as `message` (the action stays in the data) and positions as
    /// `position` events, so a page learns every cursor without knowing the actions in advance.
    Message,
}

impl StreamQuery {
    pub fn parse(pairs: &[(String, String)]) -> Result<StreamQuery, ApiError> {
        let mut query = StreamQuery::default();
        for (name, value) in pairs {
            match name.as_str() {
                "filter" => query.filters.push(value.clone()),
                "topic" | "topics" => query.topics.extend(
                    value
                        .split(',')
                        .map(str::trim)
                        .filter(|t| !t.is_empty())
                        .map(String::from),
                ),
                "from" | "last_event_id" | "lastEventId" => query.from = Some(value.clone()),
                "ticket" => query.ticket = Some(value.clone()),
                "ack" => {
                    query.acks = match value.as_str() {
                        "delivery" => Acks::Delivery,
                        "client" => Acks::Client,
                        other => {
                            return Err(ApiError::bad_request(
                                "bad_parameter",
                                format!("ack={other:?}: expected delivery or client"),
                            ))
                        }
                    }
                }
                "sse_events" => {
                    query.sse_events = match value.as_str() {
                        "action" => SseEvents::Actions,
                        "message" => SseEvents::Message,
                        other => {
                            return Err(ApiError::bad_request(
                                "bad_parameter",
                                format!("sse_events={other:?}: expected action or message"),
                            ))
                        }
                    }
                }
                other => {
                    return Err(ApiError::bad_request(
                        "unknown_parameter",
                        format!("unknown query parameter {other:?} (expected filter, topics, from, last_event_id, ticket, sse_events, ack)"),
                    ))
                }
            }
        }
        Ok(query)
    }
}

/// Reads and authorizes a stream request: who asks, and what for. A `Last-Event-ID` header (an
/// SSE reconnect) wins over the query's start position.
pub async fn authorize(
    auth: &Authenticator,
    served: &(dyn Fn(&str) -> bool + Sync),
    headers: &HeaderMap,
    query: &StreamQuery,
) -> Result<(Principal, SessionRequest), ApiError> {
    let principal = auth.authenticate(headers, query.ticket.as_deref()).await?;
    if query.acks == Acks::Client {
        return Err(client_acks_need_a_subscription());
    }
    let filters = if query.filters.is_empty() {
        return Err(ApiError::bad_request(
            "bad_filter",
            "name what to receive with filter= (SERVICE:ACTION, either side *; *:* for everything)",
        ));
    } else {
        FilterSet::parse(&query.filters)
            .map_err(|e| ApiError::bad_request("bad_filter", e.to_string()))?
    };
    if let Some(unknown) = query.topics.iter().find(|t| !served(t)) {
        return Err(ApiError::not_found(
            "unknown_topic",
            format!("topic {unknown} is not served by this gateway"),
        ));
    }
    principal.may_read(&filters, &query.topics)?;
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.trim().is_empty());
    let start = match last_event_id.or(query.from.as_deref()) {
        Some(text) => {
            Start::parse(text).map_err(|e| ApiError::bad_request("bad_cursor", e.to_string()))?
        }
        None => Start::Now,
    };
    Ok((
        principal,
        SessionRequest {
            filters,
            topics: query.topics.clone(),
            start,
            subscription: None,
        },
    ))
}

/// `ack=client` where it means nothing: only a durable subscription keeps a position, and only
/// WebSocket carries a client's acknowledgements back.
pub fn client_acks_need_a_subscription() -> ApiError {
    ApiError::bad_request(
        "bad_parameter",
        "ack=client is for a durable subscription attached over WebSocket: GET /v1/subscriptions/{name}/ws?ack=client",
    )
}

/// A session to drive: the transport polls it beside its own writing, in the connection's own
/// task, so a live event wakes one task on its way to the socket, not two.
pub type SessionTask = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The session of a stream; its frames arrive on the returned receiver, the last one an
/// `Outgoing::End` saying why (unless the client is gone). Nothing happens until the task is
/// polled.
pub fn start(
    context: Arc<SessionContext>,
    request: SessionRequest,
    auth: &Authenticator,
    principal: &Principal,
    shutdown: CancellationToken,
) -> (SessionTask, mpsc::Receiver<Outgoing>) {
    let (out, frames) = mpsc::channel(WRITER_QUEUE);
    let revoked = auth.revoked(principal);
    let principal_id = principal.id.clone();
    let task = Box::pin(async move {
        // The transport drops the session when its client is gone: counted as such.
        let gone = CountedIfDropped("gone");
        let (code, reason) = tokio::select! {
            ended = session::run(&context, request, out.clone()) => {
                metrics::counter!("eventpipe_gateway_clients_dropped_total", "reason" => ended.code()).increment(1);
                (ended.code(), ended.reason().to_string())
            }
            _ = shutdown.cancelled() => ("shutdown", "the gateway is stopping; reconnect with your last event id to resume".to_string()),
            _ = revoked => {
                tracing::info!(credential = %principal_id, "closing a stream: its credential was revoked");
                ("revoked", "the credential of this stream was revoked or expired".to_string())
            }
        };
        std::mem::forget(gone);
        // Best effort: a client that is gone or stuck gets no last word.
        let _ = tokio::time::timeout(
            context.write_timeout,
            out.send(Outgoing::End { code, reason }),
        )
        .await;
    });
    (task, frames)
}

/// Counts a dropped client with this reason if it is dropped before it is forgotten.
struct CountedIfDropped(&'static str);

impl Drop for CountedIfDropped {
    fn drop(&mut self) {
        metrics::counter!("eventpipe_gateway_clients_dropped_total", "reason" => self.0)
            .increment(1);
    }
}

/// Counts a connection while it lives (`eventpipe_gateway_connections{transport}`).
pub struct ConnectionGauge(&'static str);

impl ConnectionGauge {
    pub fn open(transport: &'static str) -> ConnectionGauge {
        metrics::gauge!("eventpipe_gateway_connections", "transport" => transport).increment(1.0);
        metrics::counter!("eventpipe_gateway_connections_opened_total", "transport" => transport)
            .increment(1);
        ConnectionGauge(transport)
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        metrics::gauge!("eventpipe_gateway_connections", "transport" => self.0).decrement(1.0);
    }
}

/// How many frames a transport takes from its queue before it writes them out at once: a client
/// with several waiting gets one socket write for all of them, not one each.
pub const WRITE_BATCH: usize = 64;

/// A connection's frame counter and delivery-latency histogram, looked up once per connection
/// rather than once per frame (a labelled `metrics::counter!` is a registry look-up).
pub struct FrameMeter {
    frames: metrics::Counter,
    latency: metrics::Histogram,
}

impl FrameMeter {
    pub fn new(transport: &'static str) -> FrameMeter {
        FrameMeter {
            frames: metrics::counter!("eventpipe_gateway_frames_sent_total", "transport" => transport),
            latency: metrics::histogram!("eventpipe_gateway_delivery_latency_seconds", "transport" => transport),
        }
    }

    /// Counts the frames of one write and, for each event, how long after its Kafka time it left.
    pub fn count(&self, items: &[Outgoing]) {
        self.frames.increment(items.len() as u64);
        let mut now_ms = None;
        for item in items {
            if let Outgoing::Event { event, .. } = item {
                if let Some(ms) = event.timestamp_ms {
                    let now = *now_ms.get_or_insert_with(|| chrono::Utc::now().timestamp_millis());
                    self.latency.record((now - ms).max(0) as f64 / 1000.0);
                }
            }
        }
    }
}

/// `future`, given at most `limit`; a timer is armed only when it does not complete at once —
/// a write to a client that keeps up never touches the timer wheel.
pub async fn within<F: std::future::Future>(
    limit: std::time::Duration,
    future: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    let mut future = std::pin::pin!(future);
    if let std::task::Poll::Ready(output) = futures::poll!(future.as_mut()) {
        return Ok(output);
    }
    tokio::time::timeout(limit, future).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(query: &[(&str, &str)]) -> Vec<(String, String)> {
        query
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect()
    }

    #[test]
    fn sse_events_names_frames_by_action_unless_asked_for_message() {
        let parse = |query: &[(&str, &str)]| StreamQuery::parse(&pairs(query));
        assert_eq!(
            parse(&[("filter", "*:*")]).unwrap().sse_events,
            SseEvents::Actions
        );
        assert_eq!(
            parse(&[("sse_events", "message")]).unwrap().sse_events,
            SseEvents::Message
        );
        assert_eq!(
            parse(&[("sse_events", "action")]).unwrap().sse_events,
            SseEvents::Actions
        );
        let refused = parse(&[("sse_events", "all")]).unwrap_err();
        assert_eq!(
            (refused.status.as_u16(), refused.code),
            (400, "bad_parameter")
        );
    }
}
