//! `GET /v1/history`: the event store's selection (`filter`, `topics`, `since`, `until`,
//! `after_seq`, `last`, `limit`) streamed in chunks, memory bounded: as JSON lines, or as
//! Server-Sent Events (`Accept: text/event-stream` or `format=sse`) whose ids are the events'
//! `seq`, so a reconnecting `EventSource` resumes after the last one, and which end with `end`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use futures::stream;

use crate::filter::FilterSet;
use crate::gateway::event::{one_line, sse_event_name};
use crate::gateway::http::ApiError;
use crate::gateway::Gateway;
use crate::store::history::{parse_time, History, Selection, StoredEvent, DEFAULT_CHUNK};

pub async fn history(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    let mut filters = Vec::new();
    let mut ticket = None;
    let mut selection = Selection::of(FilterSet::everything());
    let number = |name: &str, value: &str| {
        value.parse::<u64>().map_err(|_| {
            ApiError::bad_request(
                "bad_parameter",
                format!("{name}={value:?} is not a whole number"),
            )
        })
    };
    let now = Utc::now();
    let mut sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    for (name, value) in &pairs {
        match name.as_str() {
            "format" => {
                sse = match value.as_str() {
                    "sse" => true,
                    "ndjson" => false,
                    other => {
                        return Err(ApiError::bad_request(
                            "bad_parameter",
                            format!("format={other:?}: expected ndjson or sse"),
                        ))
                    }
                }
            }
            "filter" => filters.push(value.clone()),
            "topic" | "topics" => selection
                .topics
                .extend(value.split(',').filter(|t| !t.is_empty()).map(String::from)),
            "since" => {
                selection.since = Some(parse_time(value, now).map_err(|e| {
                    ApiError::bad_request("bad_parameter", format!("since={value:?}: {e}"))
                })?)
            }
            "until" => {
                selection.until = Some(parse_time(value, now).map_err(|e| {
                    ApiError::bad_request("bad_parameter", format!("until={value:?}: {e}"))
                })?)
            }
            "after_seq" => selection.after_seq = Some(number(name, value)? as i64),
            "last" => selection.last = Some(number(name, value)?),
            "limit" => selection.limit = Some(number(name, value)?),
            "ticket" => ticket = Some(value.clone()),
            other => {
                return Err(ApiError::bad_request(
                    "unknown_parameter",
                    format!("unknown query parameter {other:?} (expected filter, topics, since, until, after_seq, last, limit, format)"),
                ))
            }
        }
    }
    let principal = gateway
        .auth
        .authenticate(&headers, ticket.as_deref())
        .await?;
    if filters.is_empty() {
        return Err(ApiError::bad_request(
            "bad_filter",
            "name what to read with filter= (SERVICE:ACTION, either side *; *:* for everything)",
        ));
    }
    // A reconnecting EventSource says where it stopped: after that seq.
    if let Some(last) = sse.then(|| headers.get("last-event-id")).flatten() {
        let last = last
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
            .ok_or_else(|| {
                ApiError::bad_request(
                    "bad_cursor",
                    "Last-Event-ID of a history stream is the seq of its last event",
                )
            })?;
        selection.after_seq = Some(selection.after_seq.map_or(last, |given| given.max(last)));
    }
    selection.filters = FilterSet::parse(&filters)
        .map_err(|e| ApiError::bad_request("bad_filter", e.to_string()))?;
    principal.may_read(&selection.filters, &selection.topics)?;
    let mut reader = History::open(gateway.pool.clone(), &selection, DEFAULT_CHUNK)
        .await
        .map_err(|e| ApiError::unavailable("store_unavailable", e.to_string(), 2))?;
    // The first chunk is read before answering, so a broken store is a status, not a cut stream.
    let first = reader
        .next_chunk()
        .await
        .map_err(|e| ApiError::unavailable("store_unavailable", e.to_string(), 2))?;
    let state = Streamed {
        reader,
        pending: first,
        sse,
        sent: 0,
        done: false,
    };
    let body = stream::unfold(state, |mut state| async move {
        let chunk = state.next().await?;
        Some((chunk, state))
    });
    let mut response = Body::from_stream(body).into_response();
    let content_type = if sse {
        "text/event-stream"
    } else {
        "application/x-ndjson"
    };
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(response)
}

/// The stream of one history answer.
struct Streamed {
    reader: History,
    /// The first chunk, read before answering.
    pending: Option<Vec<StoredEvent>>,
    sse: bool,
    sent: u64,
    done: bool,
}

impl Streamed {
    /// The next chunk of the body; `None` when it is over.
    async fn next(&mut self) -> Option<Result<Vec<u8>, std::io::Error>> {
        if self.done {
            return None;
        }
        let chunk = match self.pending.take() {
            Some(chunk) => Some(chunk),
            None => match self.reader.next_chunk().await {
                Ok(chunk) => chunk,
                Err(error) => {
                    tracing::warn!(%error, "history stream cut");
                    self.done = true;
                    return Some(Err(std::io::Error::other(error.to_string())));
                }
            },
        };
        let Some(chunk) = chunk else {
            self.done = true;
            // An EventSource reconnects when a stream ends: `end` tells it this one is complete.
            return self.sse.then(|| {
                Ok(format!("event: end\ndata: {{\"events\":{}}}\n\n", self.sent).into_bytes())
            });
        };
        let mut text = Vec::with_capacity(chunk.len() * 400);
        for event in &chunk {
            let Ok(json) = serde_json::to_string(event) else {
                continue;
            };
            self.sent += 1;
            if self.sse {
                let name = sse_event_name(&event.action);
                text.extend_from_slice(
                    format!("id: {}\nevent: {name}\ndata: ", event.seq).as_bytes(),
                );
                text.extend_from_slice(one_line(json).as_bytes());
                text.extend_from_slice(b"\n\n");
            } else {
                text.extend_from_slice(json.as_bytes());
                text.push(b'\n');
            }
        }
        Some(Ok(text))
    }
}
