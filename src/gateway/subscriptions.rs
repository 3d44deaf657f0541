//! Durable subscriptions: named filter sets whose position is kept in PostgreSQL, so a client
//! that comes back — to any instance — gets everything it missed while the subscription slept.
//!
//! `PUT/GET/DELETE /v1/subscriptions/{name}`, `GET /v1/subscriptions` (state, position, lag) and
//! `GET /v1/subscriptions/{name}/stream|ws` to attach. An attached session saves the id of the
//! last frame it wrote (or, over WebSocket with `ack=client`, the last id the client
//! acknowledged) every second and keeps a heartbeat; a newer attachment (or a deletion) ends the
//! older one. A client's own cursor (`Last-Event-ID`, `from`) wins over the stored one.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::sync::{mpsc, watch};

use crate::filter::FilterSet;
use crate::gateway::auth::Principal;
use crate::gateway::cursor::{Cursor, Start};
use crate::gateway::http::ApiError;
use crate::gateway::session::{resolve_start, Outgoing, SessionRequest};
use crate::gateway::streams::{self, Acks, StreamQuery};
use crate::gateway::{sse, ws, Gateway};

/// How often an attached session saves its position and heartbeat.
const SAVE_INTERVAL: Duration = Duration::from_secs(1);
/// A subscription whose heartbeat is older than this is asleep (its session died with its
/// gateway).
const ACTIVE_WITHIN_SECS: f64 = 10.0;

pub fn routes(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v1/subscriptions", get(list))
        .route(
            "/v1/subscriptions/{name}",
            get(show).put(put).delete(delete),
        )
        .route("/v1/subscriptions/{name}/stream", get(attach_sse))
        .route("/v1/subscriptions/{name}/ws", get(attach_ws))
        .with_state(gateway)
}

/// The body of `PUT /v1/subscriptions/{name}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionSpec {
    pub filters: Vec<String>,
    #[serde(default)]
    pub topics: Vec<String>,
    /// Where a new subscription starts: `now` (default), `earliest`, a time or a cursor id.
    /// Ignored when updating one (its position stays).
    #[serde(default)]
    pub start: Option<String>,
}

/// A subscription as listed.
#[derive(Debug, Serialize)]
pub struct SubscriptionView {
    pub name: String,
    pub owner: String,
    pub filters: Vec<String>,
    pub topics: Vec<String>,
    /// `active` (a client is attached) or `sleeping`.
    pub state: &'static str,
    pub position: String,
    /// Events on its partitions after its position, as this instance's reader sees them (an
    /// upper bound of what it has still to deliver: its filters select some of them).
    pub lag: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct Row {
    name: String,
    owner: String,
    filters: Vec<String>,
    topics: Vec<String>,
    position: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    active: bool,
}

const SELECT: &str = "SELECT name, owner, filters, topics, position, created_at, updated_at, \
     (session_id IS NOT NULL AND heartbeat_at > now() - make_interval(secs => $1)) AS active \
     FROM gateway_subscriptions";

fn postgres(error: sqlx::Error) -> ApiError {
    tracing::warn!(%error, "subscriptions: PostgreSQL");
    ApiError::unavailable(
        "postgres_unavailable",
        "the subscription store (PostgreSQL) is unavailable; retry",
        2,
    )
}

fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "bad_name",
            format!("subscription name {name:?}: 1 to 200 of A-Z a-z 0-9 . _ -"),
        ))
    }
}

async fn find(pool: &PgPool, name: &str) -> Result<Option<Row>, ApiError> {
    sqlx::query_as::<_, Row>(&format!("{SELECT} WHERE name = $2"))
        .bind(ACTIVE_WITHIN_SECS)
        .bind(name)
        .fetch_optional(pool)
        .await
        .map_err(postgres)
}

async fn load(pool: &PgPool, name: &str) -> Result<Row, ApiError> {
    find(pool, name).await?.ok_or_else(|| {
        ApiError::not_found("unknown_subscription", format!("no subscription {name:?}"))
    })
}

/// The caller and the subscription it names, if the caller may use it.
async fn owned(
    gateway: &Gateway,
    headers: &HeaderMap,
    ticket: Option<&str>,
    name: &str,
) -> Result<(Principal, Row), ApiError> {
    let principal = gateway.auth.authenticate(headers, ticket).await?;
    let row = load(&gateway.pool, name).await?;
    check_owner(&principal, &row)?;
    Ok((principal, row))
}

/// Only the credential that made a subscription, or the admin, may use it.
fn check_owner(principal: &Principal, row: &Row) -> Result<(), ApiError> {
    if principal.is_admin() || principal.id == row.owner {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "subscription {:?} belongs to another credential",
            row.name
        )))
    }
}

impl Row {
    fn view(&self, gateway: &Gateway) -> SubscriptionView {
        let position = Cursor::decode(&self.position).unwrap_or_default();
        let live = gateway.sessions.hub.positions(&self.topics);
        let lag = live
            .iter()
            .map(|(topic, partition, end)| {
                (end - position.get(topic, partition).unwrap_or(end)).max(0) as u64
            })
            .sum();
        SubscriptionView {
            name: self.name.clone(),
            owner: self.owner.clone(),
            filters: self.filters.clone(),
            topics: self.topics.clone(),
            state: if self.active { "active" } else { "sleeping" },
            position: self.position.clone(),
            lag,
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

/// Every subscription, by name (the gauges and the console).
pub async fn all(gateway: &Gateway) -> Result<Vec<SubscriptionView>, sqlx::Error> {
    let rows = sqlx::query_as::<_, Row>(&format!("{SELECT} ORDER BY name"))
        .bind(ACTIVE_WITHIN_SECS)
        .fetch_all(&gateway.pool)
        .await?;
    Ok(rows.iter().map(|row| row.view(gateway)).collect())
}

/// Active and sleeping subscriptions and the largest lag, for the gauges.
pub async fn summary(gateway: &Gateway) -> Result<(u64, u64, u64), sqlx::Error> {
    let views = all(gateway).await?;
    let active = views.iter().filter(|v| v.state == "active").count() as u64;
    let max_lag = views.iter().map(|v| v.lag).max().unwrap_or(0);
    Ok((active, views.len() as u64 - active, max_lag))
}

async fn list(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = gateway.auth.authenticate(&headers, None).await?;
    let rows = sqlx::query_as::<_, Row>(&format!("{SELECT} WHERE $2 OR owner = $3 ORDER BY name"))
        .bind(ACTIVE_WITHIN_SECS)
        .bind(principal.is_admin())
        .bind(&principal.id)
        .fetch_all(&gateway.pool)
        .await
        .map_err(postgres)?;
    let views: Vec<SubscriptionView> = rows.iter().map(|row| row.view(&gateway)).collect();
    Ok(Json(views).into_response())
}

async fn show(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (_, row) = owned(&gateway, &headers, None, &name).await?;
    Ok(Json(row.view(&gateway)).into_response())
}

async fn put(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let principal = gateway.auth.authenticate(&headers, None).await?;
    check_name(&name)?;
    let spec: SubscriptionSpec = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "bad_body",
            format!("expected {{\"filters\": [\"SERVICE:ACTION\", ...], \"topics\": [...], \"start\": \"now\"}}: {e}"),
        )
    })?;
    let filters = FilterSet::parse(&spec.filters)
        .map_err(|e| ApiError::bad_request("bad_filter", e.to_string()))?;
    if let Some(unknown) = spec
        .topics
        .iter()
        .find(|t| !gateway.sessions.side.serves(t))
    {
        return Err(ApiError::not_found(
            "unknown_topic",
            format!("topic {unknown} is not served by this gateway"),
        ));
    }
    principal.may_read(&filters, &spec.topics)?;
    let filter_texts: Vec<String> = filters.filters().iter().map(|f| f.to_string()).collect();
    if let Some(existing) = find(&gateway.pool, &name).await? {
        check_owner(&principal, &existing)?;
        sqlx::query(
            "UPDATE gateway_subscriptions SET filters = $2, topics = $3, updated_at = now() \
             WHERE name = $1",
        )
        .bind(&name)
        .bind(&filter_texts)
        .bind(&spec.topics)
        .execute(&gateway.pool)
        .await
        .map_err(postgres)?;
        let row = load(&gateway.pool, &name).await?;
        return Ok(Json(row.view(&gateway)).into_response());
    }
    let start = Start::parse(spec.start.as_deref().unwrap_or("now"))
        .map_err(|e| ApiError::bad_request("bad_cursor", e.to_string()))?;
    let request = SessionRequest {
        filters,
        topics: spec.topics.clone(),
        start,
        subscription: None,
    };
    let (position, _) = resolve_start(&gateway.sessions, &request)
        .await
        .map_err(|_| {
            ApiError::unavailable("kafka_unavailable", "cannot read Kafka's offsets; retry", 2)
        })?;
    let inserted = sqlx::query(
        "INSERT INTO gateway_subscriptions (name, owner, filters, topics, position) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO NOTHING",
    )
    .bind(&name)
    .bind(&principal.id)
    .bind(&filter_texts)
    .bind(&spec.topics)
    .bind(position.encode())
    .execute(&gateway.pool)
    .await
    .map_err(postgres)?;
    if inserted.rows_affected() == 0 {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("subscription {name:?} was created meanwhile; PUT again to update it"),
        ));
    }
    let row = load(&gateway.pool, &name).await?;
    Ok((StatusCode::CREATED, Json(row.view(&gateway))).into_response())
}

async fn delete(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    owned(&gateway, &headers, None, &name).await?;
    sqlx::query("DELETE FROM gateway_subscriptions WHERE name = $1")
        .bind(&name)
        .execute(&gateway.pool)
        .await
        .map_err(postgres)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The session request of an attachment: the stored selection, from the client's cursor when
/// it sends one, else from the stored position.
async fn attachment(
    gateway: &Gateway,
    name: &str,
    headers: &HeaderMap,
    pairs: &[(String, String)],
) -> Result<(Principal, SessionRequest, Attachment), ApiError> {
    let query = StreamQuery::parse(pairs)?;
    if !query.filters.is_empty() || !query.topics.is_empty() {
        return Err(ApiError::bad_request(
            "unknown_parameter",
            "a subscription's filters and topics are its own: change them with PUT",
        ));
    }
    let (principal, row) = owned(gateway, headers, query.ticket.as_deref(), name).await?;
    let filters = FilterSet::parse(&row.filters)
        .map_err(|e| ApiError::internal(format!("stored filters: {e}")))?;
    // Its owner's rights may have narrowed since it was made.
    principal.may_read(&filters, &row.topics)?;
    let client_cursor = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.trim().is_empty())
        .map(String::from)
        .or(query.from);
    let start = Start::parse(client_cursor.as_deref().unwrap_or(&row.position))
        .map_err(|e| ApiError::bad_request("bad_cursor", e.to_string()))?;
    let session_id = format!("{:016x}", rand::random::<u64>());
    let taken = sqlx::query(
        "UPDATE gateway_subscriptions SET session_id = $2, heartbeat_at = now() WHERE name = $1",
    )
    .bind(name)
    .bind(&session_id)
    .execute(&gateway.pool)
    .await
    .map_err(postgres)?;
    if taken.rows_affected() == 0 {
        return Err(ApiError::not_found(
            "unknown_subscription",
            format!("no subscription {name:?}"),
        ));
    }
    metrics::counter!("eventpipe_gateway_subscription_attaches_total").increment(1);
    Ok((
        principal,
        SessionRequest {
            filters,
            topics: row.topics,
            start,
            subscription: Some(name.to_string()),
        },
        Attachment {
            name: name.to_string(),
            session_id,
            pool: gateway.pool.clone(),
            acked: None,
        },
    ))
}

async fn attach_sse(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    let query = StreamQuery::parse(&pairs)?;
    if query.acks == Acks::Client {
        return Err(streams::client_acks_need_a_subscription());
    }
    let names = query.sse_events;
    let (principal, request, attachment) = attachment(&gateway, &name, &headers, &pairs).await?;
    Ok(sse::open_with(
        &gateway,
        request,
        &principal,
        Some(attachment),
        names,
    ))
}

async fn attach_ws(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Query(pairs): Query<Vec<(String, String)>>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let acks = StreamQuery::parse(&pairs)?.acks;
    let (principal, request, attachment) = attachment(&gateway, &name, &headers, &pairs).await?;
    let (attachment, client_acks) = match acks {
        Acks::Client => {
            let (attachment, sender) = attachment.with_client_acks();
            (attachment, Some(sender))
        }
        Acks::Delivery => (attachment, None),
    };
    Ok(ws::open_with(
        &gateway,
        upgrade,
        request,
        principal,
        Some(attachment),
        client_acks,
    ))
}

/// One session's hold on a subscription.
pub struct Attachment {
    name: String,
    session_id: String,
    pool: PgPool,
    /// With client acknowledgements: the last id the client confirmed (else the position is
    /// the last frame handed over).
    acked: Option<watch::Receiver<Option<String>>>,
}

impl Attachment {
    /// Makes the stored position follow the client's acknowledgements, which the transport
    /// sends through the returned half.
    pub fn with_client_acks(mut self) -> (Attachment, watch::Sender<Option<String>>) {
        let (acks, acked) = watch::channel(None);
        self.acked = Some(acked);
        (self, acks)
    }

    /// The position to keep: the client's last acknowledgement, or the last frame handed over.
    fn position(&self, handed_over: &Option<String>) -> Option<String> {
        match &self.acked {
            Some(acked) => acked.borrow().clone(),
            None => handed_over.clone(),
        }
    }

    /// Saves `position` and the heartbeat; `false` when the subscription was deleted or another
    /// session took it over.
    async fn save(&self, position: Option<&str>) -> Result<bool, sqlx::Error> {
        let updated = sqlx::query(
            "UPDATE gateway_subscriptions SET position = coalesce($3, position), \
             heartbeat_at = now(), updated_at = CASE WHEN $3 IS NULL THEN updated_at ELSE now() END \
             WHERE name = $1 AND session_id = $2",
        )
        .bind(&self.name)
        .bind(&self.session_id)
        .bind(position)
        .execute(&self.pool)
        .await?;
        Ok(updated.rows_affected() == 1)
    }

    async fn release(&self, position: Option<&str>) {
        let _ = sqlx::query(
            "UPDATE gateway_subscriptions SET position = coalesce($3, position), \
             session_id = NULL, heartbeat_at = NULL, updated_at = now() \
             WHERE name = $1 AND session_id = $2",
        )
        .bind(&self.name)
        .bind(&self.session_id)
        .bind(position)
        .execute(&self.pool)
        .await;
    }

    /// Passes a session's frames on to the transport, remembering the id of each one handed
    /// over and saving it every second; ends the stream when the subscription is deleted or
    /// taken over by a newer attachment.
    pub fn track(self, mut frames: mpsc::Receiver<Outgoing>) -> mpsc::Receiver<Outgoing> {
        let (out, tracked) = mpsc::channel(1);
        tokio::spawn(async move {
            let mut saved: Option<String> = None;
            let mut latest: Option<String> = None;
            let mut tick = tokio::time::interval(SAVE_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    // The client is gone: release now, not at the next frame.
                    _ = out.closed() => break,
                    item = frames.recv() => {
                        let Some(item) = item else { break };
                        let id = match &item {
                            Outgoing::Event { id, .. } | Outgoing::Position { id } => Some(id.clone()),
                            _ => None,
                        };
                        if out.send(item).await.is_err() {
                            break;
                        }
                        if id.is_some() {
                            latest = id;
                        }
                    }
                    _ = tick.tick() => {
                        let keep = self.position(&latest);
                        let position = keep.as_deref().filter(|l| saved.as_deref() != Some(*l));
                        match self.save(position).await {
                            Ok(true) => saved = keep,
                            Ok(false) => {
                                let _ = out
                                    .send(Outgoing::End {
                                        code: "replaced",
                                        reason: "the subscription was attached elsewhere or deleted".into(),
                                    })
                                    .await;
                                return;
                            }
                            Err(error) => {
                                tracing::warn!(%error, subscription = %self.name, "saving a subscription's position");
                            }
                        }
                    }
                }
            }
            // Whatever was handed over (or acknowledged) last is where the next attachment
            // resumes.
            let keep = self.position(&latest);
            self.release(keep.as_deref()).await;
        });
        tracked
    }
}
