//! `GET /v1/stream`: a subscription as Server-Sent Events — the cursor as each frame's `id`, the
//! action as its `event`, a `retry:` hint, keep-alive comments, and a last `disconnect` event.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use futures::stream;
use tokio::sync::mpsc;
use tokio::time::{Interval, MissedTickBehavior};

use crate::gateway::http::ApiError;
use crate::gateway::session::Outgoing;
use crate::gateway::streams::{
    self, ConnectionGauge, FrameMeter, SessionTask, SseEvents, StreamQuery,
};
use crate::gateway::subscriptions::Attachment;
use crate::gateway::Gateway;

/// How long a browser waits before reconnecting (the `retry:` hint), in milliseconds.
const RETRY_MS: u32 = 2000;

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
    let (session, mut frames) = streams::start(
        gateway.sessions.clone(),
        request,
        &gateway.auth,
        principal,
        gateway.shutdown.clone(),
    );
    if let Some(attachment) = attachment {
        frames = attachment.track(frames);
    }
    let keep_alive = {
        let period = gateway.settings.keep_alive;
        let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        interval
    };
    let writer = SseWriter {
        session: Some(session),
        frames,
        names,
        keep_alive,
        batch: Vec::with_capacity(streams::WRITE_BATCH),
        first: true,
        ended: false,
        meter: FrameMeter::new("sse"),
        _gauge: ConnectionGauge::open("sse"),
    };
    let chunks = stream::unfold(writer, |mut writer| async move {
        let chunk = writer.next_chunk().await?;
        Some((Ok::<_, Infallible>(chunk), writer))
    });
    let mut response = Body::from_stream(chunks).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Proxies (nginx) must pass frames through as they come.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// One connection's frames as SSE text. Every frame waiting in the queue goes into one chunk, so
/// a client that has several gets one socket write; the keep-alive is a fixed-period timer, not
/// one re-armed per frame.
struct SseWriter {
    /// Driven here until it ends; its frames arrive on `frames`.
    session: Option<SessionTask>,
    frames: mpsc::Receiver<Outgoing>,
    names: SseEvents,
    keep_alive: Interval,
    batch: Vec<Outgoing>,
    first: bool,
    ended: bool,
    meter: FrameMeter,
    _gauge: ConnectionGauge,
}

impl SseWriter {
    /// The next chunk to write; `None` when the stream is over.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.ended {
            return None;
        }
        let mut text = BytesMut::new();
        loop {
            tokio::select! {
                // The session first: what it queues now is written in this same round.
                biased;
                () = drive(&mut self.session), if self.session.is_some() => self.session = None,
                received = self.frames.recv_many(&mut self.batch, streams::WRITE_BATCH) => {
                    if received == 0 {
                        return None;
                    }
                    self.meter.count(&self.batch);
                    for item in self.batch.drain(..) {
                        self.ended |= matches!(item, Outgoing::End { .. });
                        write_frame(&mut text, item, self.names);
                    }
                    break;
                }
                _ = self.keep_alive.tick() => {
                    text.put_slice(b":keep-alive\n\n");
                    break;
                }
            }
        }
        // The hint rides after the first frame (the start position), in a block of its own.
        if std::mem::take(&mut self.first) {
            text.put_slice(format!("retry: {RETRY_MS}\n\n").as_bytes());
        }
        Some(text.freeze())
    }
}

/// Polls a session that has not ended (the caller checks it is there).
async fn drive(session: &mut Option<SessionTask>) {
    if let Some(session) = session {
        session.await;
    }
}

/// One frame: `id:`, `event:` and one `data:` line (the event's JSON is one line: event.rs).
fn write_frame(text: &mut BytesMut, item: Outgoing, names: SseEvents) {
    let mut field = |name: &str, value: &str| {
        text.reserve(name.len() + value.len() + 3);
        text.put_slice(name.as_bytes());
        text.put_slice(b": ");
        text.put_slice(value.as_bytes());
        text.put_u8(b'\n');
    };
    match (item, names) {
        (Outgoing::Event { event, id }, names) => {
            field("id", &id);
            if names == SseEvents::Actions {
                field("event", event.event_name());
            }
            field("data", &event.json);
        }
        // An id with no data moves the browser's Last-Event-ID without firing an event.
        (Outgoing::Position { id }, SseEvents::Actions) => field("id", &id),
        (Outgoing::Position { id }, SseEvents::Message) => {
            field("id", &id);
            field("event", "position");
            field("data", &serde_json::json!({ "id": id }).to_string());
        }
        (Outgoing::Notice { kind, message }, _) => {
            field("event", "notice");
            field(
                "data",
                &serde_json::json!({ "kind": kind, "message": message }).to_string(),
            );
        }
        (Outgoing::End { code, reason }, _) => {
            field("event", "disconnect");
            field(
                "data",
                &serde_json::json!({ "code": code, "reason": reason }).to_string(),
            );
        }
    }
    text.put_u8(b'\n');
}
