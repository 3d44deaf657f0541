//! The credential routes the gateway merges into its router: the admin API over users and keys,
//! and the browsers' short-lived tickets and cookie sessions; `Caller` authenticates a request.

use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRef, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::authenticator::SESSION_COOKIE;
use super::credentials::{self, KeyOwner, KeyRequest, KeyRow, UserRequest};
use super::secret::Secret;
use super::{Authenticator, Principal};
use crate::gateway::http::ApiError;

/// The authenticated caller of a route, from its headers, `?ticket=` or session cookie; the
/// rejection is the 401/403 [`ApiError`].
#[derive(Debug, Clone)]
pub struct Caller(pub Principal);

impl<S> FromRequestParts<S> for Caller
where
    Authenticator: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Caller, ApiError> {
        let auth = Authenticator::from_ref(state);
        let ticket = ticket_parameter(parts.uri.query());
        auth.authenticate(&parts.headers, ticket.as_deref())
            .await
            .map(Caller)
    }
}

/// A caller holding the admin credential; anyone else is refused with 403.
#[derive(Debug, Clone)]
pub struct AdminCaller(pub Principal);

impl<S> FromRequestParts<S> for AdminCaller
where
    Authenticator: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<AdminCaller, ApiError> {
        let Caller(principal) = Caller::from_request_parts(parts, state).await?;
        if !principal.is_admin() {
            return Err(ApiError::forbidden(format!(
                "credential {} may not administer the gateway: that takes the admin token",
                principal.id
            )));
        }
        Ok(AdminCaller(principal))
    }
}

/// The `ticket` query parameter, decoded.
pub fn ticket_parameter(query: Option<&str>) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(name, _)| name == "ticket")
        .map(|(_, value)| value.into_owned())
}

/// Routes of tickets, login/logout and `/v1/admin/{users,keys}`, with their state inside.
pub fn routes(auth: Authenticator) -> Router {
    Router::new()
        .route("/v1/tickets", post(issue_ticket))
        .route("/v1/login", post(login))
        .route("/v1/logout", post(logout))
        .route("/v1/admin/users", get(list_users).post(add_user))
        .route("/v1/admin/users/{name}", delete(remove_user))
        .route("/v1/admin/keys", get(list_keys).post(issue_key))
        .route("/v1/admin/keys/{id}", delete(revoke_key))
        .with_state(auth)
}

/// A JSON body, or 400 saying what is wrong with it (axum's own rejection is plain text).
fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(value)| value)
        .map_err(|rejection| ApiError::bad_request("bad_request", rejection.body_text()))
}

/// An answer carrying a secret: never stored by a cache on the way.
fn no_store(status: StatusCode, body: serde_json::Value) -> Response {
    let mut response = (status, Json(body)).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn issue_ticket(
    State(auth): State<Authenticator>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Result<Response, ApiError> {
    let ticket = ticket_parameter(uri.query());
    let (ticket, ttl) = auth.issue_ticket(&headers, ticket.as_deref()).await?;
    Ok(no_store(
        StatusCode::OK,
        json!({"ticket": ticket.expose(), "expires_in": ttl.as_secs()}),
    ))
}

fn session_cookie_header(value: &str, max_age: Duration) -> Result<HeaderValue, ApiError> {
    // No `Secure`: the gateway may be served over plain HTTP on a private network (browsers
    // treat localhost as secure either way); behind TLS a proxy may add it.
    HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        max_age.as_secs()
    ))
    .map_err(|_| ApiError::internal("building the session cookie"))
}

async fn login(
    State(auth): State<Authenticator>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (principal, session, ttl) = auth.start_session(&headers).await?;
    let mut response = no_store(
        StatusCode::OK,
        json!({"user": principal.id, "expires_in": ttl.as_secs()}),
    );
    response.headers_mut().insert(
        header::SET_COOKIE,
        session_cookie_header(session.expose(), ttl)?,
    );
    Ok(response)
}

async fn logout(
    State(auth): State<Authenticator>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth.end_session(&headers).await?;
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        session_cookie_header("", Duration::ZERO)?,
    );
    Ok(response)
}

async fn list_users(
    _: AdminCaller,
    State(auth): State<Authenticator>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let users = credentials::list_users(auth.pool()).await?;
    Ok(Json(json!({ "users": users })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    name: String,
    /// Absent: one is generated and returned once.
    #[serde(default)]
    password: Option<Secret>,
    filters: Vec<String>,
    #[serde(default)]
    topics: Vec<String>,
}

async fn add_user(
    _: AdminCaller,
    State(auth): State<Authenticator>,
    body: Result<Json<NewUser>, JsonRejection>,
) -> Result<Response, ApiError> {
    let body = json_body(body)?;
    let added = credentials::add_user(
        auth.pool(),
        UserRequest {
            name: body.name,
            password: body.password,
            filters: body.filters,
            topics: body.topics,
        },
    )
    .await?;
    auth.refresh_now().await;
    let mut answer = json!(added.user);
    if let Some(password) = &added.generated_password {
        answer["password"] = json!(password.expose());
    }
    Ok(no_store(StatusCode::CREATED, answer))
}

async fn remove_user(
    _: AdminCaller,
    State(auth): State<Authenticator>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    credentials::remove_user(auth.pool(), &name).await?;
    auth.refresh_now().await;
    Ok(StatusCode::NO_CONTENT)
}

/// A key as the API shows it: its row, its status now, and the key itself only when issued.
#[derive(Serialize)]
struct KeyView<'a> {
    #[serde(flatten)]
    row: &'a KeyRow,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
}

async fn list_keys(
    _: AdminCaller,
    State(auth): State<Authenticator>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let keys = credentials::list_keys(auth.pool()).await?;
    let now = Utc::now();
    let views: Vec<KeyView> = keys
        .iter()
        .map(|row| KeyView {
            row,
            status: row.status(now),
            key: None,
        })
        .collect();
    Ok(Json(json!({ "keys": views })))
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum KeyKind {
    Producer,
    Consumer,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    kind: KeyKind,
    /// Producer keys: the service they send as.
    service: Option<String>,
    /// Consumer keys: the user whose filters they read within.
    user: Option<String>,
    #[serde(default)]
    filters: Vec<String>,
    #[serde(default)]
    topics: Vec<String>,
    /// `30d`, `12h`, `90m` or seconds; absent: never.
    expires: Option<String>,
    #[serde(default)]
    description: String,
}

fn key_owner(body: &NewKey) -> Result<KeyOwner, ApiError> {
    let bad = |message: &str| ApiError::bad_request("bad_request", message);
    match (&body.kind, &body.service, &body.user) {
        (KeyKind::Producer, Some(service), None) => Ok(KeyOwner::Producer {
            service: service.clone(),
        }),
        (KeyKind::Producer, _, _) => Err(bad(
            "a producer key names the service it sends as (service), and no user",
        )),
        (KeyKind::Consumer, None, Some(user)) => Ok(KeyOwner::Consumer { user: user.clone() }),
        (KeyKind::Consumer, _, _) => Err(bad(
            "a consumer key names the user it reads for (user), and no service",
        )),
    }
}

async fn issue_key(
    _: AdminCaller,
    State(auth): State<Authenticator>,
    body: Result<Json<NewKey>, JsonRejection>,
) -> Result<Response, ApiError> {
    let body = json_body(body)?;
    let owner = key_owner(&body)?;
    let expires_in = body
        .expires
        .as_deref()
        .map(crate::store::settings::parse_duration)
        .transpose()
        .map_err(|reason| ApiError::bad_request("bad_request", format!("expires: {reason}")))?;
    let issued = credentials::issue_key(
        auth.pool(),
        KeyRequest {
            owner,
            filters: body.filters,
            topics: body.topics,
            expires_in,
            description: body.description,
        },
    )
    .await?;
    auth.refresh_now().await;
    let view = KeyView {
        row: &issued.row,
        status: issued.row.status(Utc::now()),
        key: Some(issued.key.expose()),
    };
    Ok(no_store(StatusCode::CREATED, json!(view)))
}

async fn revoke_key(
    _: AdminCaller,
    State(auth): State<Authenticator>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    credentials::revoke_key(auth.pool(), &id).await?;
    auth.refresh_now().await;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ticket_parameter_is_decoded_from_the_query() {
        assert_eq!(
            ticket_parameter(Some("filter=lk%3A*&ticket=ept_a%5Fb")),
            Some("ept_a_b".into())
        );
        assert_eq!(ticket_parameter(Some("filter=lk:*")), None);
        assert_eq!(ticket_parameter(None), None);
    }

    #[test]
    fn a_key_names_exactly_one_owner_of_its_kind() {
        let body = |kind, service: Option<&str>, user: Option<&str>| NewKey {
            kind,
            service: service.map(String::from),
            user: user.map(String::from),
            filters: vec![],
            topics: vec![],
            expires: None,
            description: String::new(),
        };
        assert!(key_owner(&body(KeyKind::Producer, Some("lk"), None)).is_ok());
        assert!(key_owner(&body(KeyKind::Consumer, None, Some("u"))).is_ok());
        assert_eq!(
            key_owner(&body(KeyKind::Producer, None, Some("u")))
                .unwrap_err()
                .status,
            400
        );
        assert!(key_owner(&body(KeyKind::Consumer, Some("lk"), Some("u"))).is_err());
    }
}
