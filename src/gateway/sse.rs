//! `GET /v1/stream`: a subscription as Server-Sent Events — the cursor as each frame's `id`, the
//! action as its `event`, a `retry:` hint, keep-alive comments, and a last `disconnect` event.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream;

use crate::gateway::http::ApiError;
use crate::gateway::session::Outgoing;
use crate::gateway::streams::{self, ConnectionGauge, SseEvents, StreamQuery};
use crate::gateway::subscriptions::Attachment;
use crate::gateway::Gateway;

/// How long a browser waits before reconnecting (the `retry:` hint).
const RETRY: std::time::Duration = std::time::Duration::from_secs(2);

pub async fn stream(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    let query = StreamQuery::parse(&pairs)?;
    let (principal, request) = gateway.authorize_stream(&headers, &query).await?;
    Ok(open_with(
        &gateway,
        request,
        &principal,
        None,
        query.sse_events,
    ))
}

/// The SSE response of a session, its frames named as `names` says; an attachment to a durable
/// subscription tracks its position.
pub fn open_with(
    gateway: &Arc<Gateway>,
    request: crate::gateway::session::SessionRequest,
    principal: &crate::gateway::auth::Principal,
    attachment: Option<Attachment>,
    names: SseEvents,
) -> Response {
    let mut frames = streams::spawn(
        gateway.sessions.clone(),
        request,
        &gateway.auth,
        principal,
        gateway.shutdown.clone(),
    );
    if let Some(attachment) = attachment {
        frames = attachment.track(frames);
    }
    let gauge = ConnectionGauge::open("sse");
    let mut first = true;
    let events = stream::unfold((frames, gauge, false), move |(mut frames, gauge, ended)| {
        let retry = std::mem::take(&mut first);
        async move {
            if ended {
                return None;
            }
            let item = frames.recv().await?;
            streams::count_frame("sse", &item);
            let is_end = matches!(item, Outgoing::End { .. });
            let mut event = frame(item, names);
            if retry {
                event = event.retry(RETRY);
            }
            Some((Ok::<_, Infallible>(event), (frames, gauge, is_end)))
        }
    });
    let mut response = Sse::new(events)
        .keep_alive(
            KeepAlive::new()
                .interval(gateway.settings.keep_alive)
                .text("keep-alive"),
        )
        .into_response();
    // Proxies (nginx) must pass frames through as they come.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

fn frame(item: Outgoing, names: SseEvents) -> SseEvent {
    match (item, names) {
        (Outgoing::Event { event, id }, SseEvents::Actions) => SseEvent::default()
            .id(id)
            .event(event.event_name())
            .data(&*event.json),
        (Outgoing::Event { event, id }, SseEvents::Message) => {
            SseEvent::default().id(id).data(&*event.json)
        }
        // An id with no data moves the browser's Last-Event-ID without firing an event.
        (Outgoing::Position { id }, SseEvents::Actions) => SseEvent::default().id(id),
        (Outgoing::Position { id }, SseEvents::Message) => SseEvent::default()
            .event("position")
            .data(serde_json::json!({ "id": id }).to_string())
            .id(id),
        (Outgoing::Notice { kind, message }, _) => SseEvent::default()
            .event("notice")
            .data(serde_json::json!({ "kind": kind, "message": message }).to_string()),
        (Outgoing::End { code, reason }, _) => SseEvent::default()
            .event("disconnect")
            .data(serde_json::json!({ "code": code, "reason": reason }).to_string()),
    }
}
