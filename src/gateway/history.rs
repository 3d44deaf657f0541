//! `GET /v1/history`: the event store's selection (`filter`, `topics`, `since`, `until`,
//! `after_seq`, `last`, `limit`) streamed as JSON lines in chunks, memory bounded.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use futures::stream;

use crate::filter::FilterSet;
use crate::gateway::http::ApiError;
use crate::gateway::Gateway;
use crate::store::history::{parse_time, History, Selection, DEFAULT_CHUNK};

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
    for (name, value) in &pairs {
        match name.as_str() {
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
                    format!("unknown query parameter {other:?} (expected filter, topics, since, until, after_seq, last, limit)"),
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
    let body = stream::unfold((reader, first), |(mut reader, pending)| async move {
        let chunk = match pending {
            Some(chunk) => chunk,
            None => match reader.next_chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => return None,
                Err(error) => {
                    tracing::warn!(%error, "history stream cut");
                    return Some((
                        Err(std::io::Error::other(error.to_string())),
                        (reader, None),
                    ));
                }
            },
        };
        let mut text = Vec::with_capacity(chunk.len() * 400);
        for event in &chunk {
            if serde_json::to_writer(&mut text, event).is_ok() {
                text.push(b'\n');
            }
        }
        Some((Ok::<_, std::io::Error>(text), (reader, None)))
    });
    let mut response = Body::from_stream(body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(response)
}
