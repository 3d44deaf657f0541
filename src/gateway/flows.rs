//! `/v1/admin/flows`: flow control's pauses over HTTP, behind the admin credential — pause (202
//! with the pause and where to poll it), list, one pause with per-partition progress, resume (202).

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRef, Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::auth::routes::AdminCaller;
use super::auth::Authenticator;
use super::http::ApiError;
use crate::filter::FilterSet;
use crate::flows::store::{FlowError, FlowStore, Injection, PauseRequest, MIN_INJECT_WINDOW};
use crate::flows::Scope;

#[derive(Clone)]
struct FlowsState {
    auth: Authenticator,
    store: FlowStore,
}

impl FromRef<FlowsState> for Authenticator {
    fn from_ref(state: &FlowsState) -> Authenticator {
        state.auth.clone()
    }
}

/// The routes, with their state inside.
pub fn routes(auth: Authenticator, store: FlowStore) -> Router {
    Router::new()
        .route("/v1/admin/flows", get(list).post(pause))
        .route("/v1/admin/flows/inject", post(inject))
        .route("/v1/admin/flows/{id}", get(show))
        .route("/v1/admin/flows/{id}/resume", post(resume))
        .with_state(FlowsState { auth, store })
}

impl From<FlowError> for ApiError {
    fn from(error: FlowError) -> ApiError {
        let message = error.to_string();
        match error {
            FlowError::BadFilter(_) => ApiError::bad_request("bad_filter", message),
            FlowError::BadScope(_) => ApiError::bad_request("bad_scope", message),
            FlowError::BadInjection(_) => ApiError::bad_request("bad_parameter", message),
            FlowError::NoSubscription(_) => ApiError::not_found("unknown_subscription", message),
            FlowError::Conflict { .. } => {
                ApiError::new(StatusCode::CONFLICT, "conflicting_pause", message)
            }
            FlowError::NotFound(_) | FlowError::NoneMatching(_) => {
                ApiError::not_found("not_found", message)
            }
            ref unavailable if unavailable.is_unavailable() => ApiError::unavailable(
                "postgres_unavailable",
                "the flow control database is unavailable",
                1,
            ),
            _ => ApiError::internal(message),
        }
    }
}

/// Counts the request by outcome (the error's code, or `ok`).
fn counted<T>(operation: &'static str, result: Result<T, ApiError>) -> Result<T, ApiError> {
    crate::flows::metrics::request(
        operation,
        match &result {
            Ok(_) => "ok",
            Err(error) => error.code,
        },
    );
    result
}

fn status_url(id: &str) -> String {
    format!("/v1/admin/flows/{id}")
}

/// 202: accepted, and obeyed by every instance within a second; poll the status URL.
fn accepted(view: serde_json::Value, id: &str) -> Response {
    let mut body = view;
    body["status_url"] = status_url(id).into();
    let mut response = (StatusCode::ACCEPTED, Json(body)).into_response();
    if let Ok(location) = HeaderValue::from_str(&status_url(id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewPause {
    filters: Vec<String>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    reason: String,
}

async fn pause(
    caller: Result<AdminCaller, ApiError>,
    State(state): State<FlowsState>,
    body: Result<Json<NewPause>, JsonRejection>,
) -> Result<Response, ApiError> {
    counted(
        "pause",
        async {
            let AdminCaller(principal) = caller?;
            let Json(body) = body
                .map_err(|rejection| ApiError::bad_request("bad_request", rejection.body_text()))?;
            let filters = FilterSet::parse(&body.filters).map_err(FlowError::from)?;
            let scope = body
                .scope
                .as_deref()
                .unwrap_or("dispatch")
                .parse::<Scope>()
                .map_err(FlowError::BadScope)?;
            let pause = state
                .store
                .pause(PauseRequest {
                    filters,
                    scope,
                    reason: body.reason,
                    by: principal.id.clone(),
                    inject: None,
                })
                .await?;
            Ok(accepted(pause.view(), &pause.id))
        }
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewInjection {
    filters: Vec<String>,
    scope: String,
    #[serde(default)]
    reason: String,
    /// The store selection's filters (the pause's when none).
    #[serde(default)]
    store_filters: Vec<String>,
    #[serde(default)]
    last: Option<u64>,
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    until: Option<String>,
    /// How long the flow stays paused before it resumes by itself (`1s`, `5m`; at least 1s).
    #[serde(default)]
    resume_after: Option<String>,
}

/// History injection: 202 with the pause (paused, carrying the selection) and where to poll
/// it; it resumes by itself after `resume_after`.
async fn inject(
    caller: Result<AdminCaller, ApiError>,
    State(state): State<FlowsState>,
    body: Result<Json<NewInjection>, JsonRejection>,
) -> Result<Response, ApiError> {
    counted(
        "inject",
        async {
            let AdminCaller(principal) = caller?;
            let Json(body) = body
                .map_err(|rejection| ApiError::bad_request("bad_request", rejection.body_text()))?;
            let filters = FilterSet::parse(&body.filters).map_err(FlowError::from)?;
            let scope = body.scope.parse::<Scope>().map_err(FlowError::BadScope)?;
            let injection = Injection::parse(
                &filters,
                &body.store_filters,
                body.last,
                body.since.as_deref(),
                body.until.as_deref(),
                |field| field.replace('-', "_"),
            )?;
            let window = match body.resume_after.as_deref() {
                None => MIN_INJECT_WINDOW,
                Some(text) => crate::store::settings::parse_duration(text).map_err(|why| {
                    FlowError::BadInjection(format!("resume_after: {text:?}: {why}"))
                })?,
            };
            let request = PauseRequest {
                filters,
                scope,
                reason: body.reason,
                by: principal.id.clone(),
                inject: None,
            };
            let (pause, _resume) = state.store.inject(request, injection, window).await?;
            Ok(accepted(pause.view(), &pause.id))
        }
        .await,
    )
}

#[derive(Deserialize)]
struct ListQuery {
    /// Resumed pauses too.
    #[serde(default)]
    all: bool,
}

async fn list(
    caller: Result<AdminCaller, ApiError>,
    State(state): State<FlowsState>,
    Query(query): Query<ListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    counted(
        "list",
        async {
            caller?;
            let pauses = state.store.list(query.all).await?;
            let views: Vec<_> = pauses.iter().map(|p| p.view()).collect();
            Ok(Json(json!({ "pauses": views })))
        }
        .await,
    )
}

async fn show(
    caller: Result<AdminCaller, ApiError>,
    State(state): State<FlowsState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    counted(
        "get",
        async {
            caller?;
            Ok(Json(state.store.get(&id).await?.view()))
        }
        .await,
    )
}

async fn resume(
    caller: Result<AdminCaller, ApiError>,
    State(state): State<FlowsState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    counted(
        "resume",
        async {
            let AdminCaller(principal) = caller?;
            let pause = state.store.resume(&id, &principal.id).await?;
            Ok(accepted(pause.view(), &pause.id))
        }
        .await,
    )
}
