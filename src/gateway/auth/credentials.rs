//! The credential tables' operations, shared by the admin HTTP API and the `users`/`keys`
//! commands: validated requests, then add/list/remove users, issue/list/revoke keys, tickets.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use super::secret::{self, IssuedToken, PasswordHashError, Secret, TokenKind};
use super::{covers, CredentialRef};
use crate::filter::{FilterError, FilterSet};
use crate::gateway::http::ApiError;

/// Passwords shorter than this are refused: a gateway user reads events of other services.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Longer passwords are refused: argon2 work grows with them, a cheap way to load the gateway.
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// The longest user name or service name.
const MAX_NAME_CHARS: usize = 128;
/// The longest key description.
const MAX_DESCRIPTION_CHARS: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error(transparent)]
    BadFilter(#[from] FilterError),
    #[error("{0}")]
    Invalid(String),
    #[error("user {0} already exists")]
    DuplicateUser(String),
    #[error("no user {0}")]
    NoSuchUser(String),
    #[error("no user {0}: a consumer key belongs to an existing user (add it first)")]
    UnknownOwner(String),
    #[error("no key {0}")]
    NoSuchKey(String),
    #[error(transparent)]
    Hashing(#[from] PasswordHashError),
    #[error("{0}")]
    Internal(String),
    #[error("PostgreSQL")]
    Postgres(#[from] sqlx::Error),
}

impl From<CredentialError> for ApiError {
    fn from(error: CredentialError) -> ApiError {
        let message = error.to_string();
        match error {
            CredentialError::BadFilter(_) => ApiError::bad_request("bad_filter", message),
            CredentialError::Invalid(_) | CredentialError::UnknownOwner(_) => {
                ApiError::bad_request("bad_request", message)
            }
            CredentialError::DuplicateUser(_) => {
                ApiError::new(axum::http::StatusCode::CONFLICT, "user_exists", message)
            }
            CredentialError::NoSuchUser(_) | CredentialError::NoSuchKey(_) => {
                ApiError::not_found("not_found", message)
            }
            CredentialError::Hashing(_) | CredentialError::Internal(_) => {
                ApiError::internal(message)
            }
            CredentialError::Postgres(error) => postgres_error(&error),
        }
    }
}

/// A PostgreSQL failure as an answer: 503 (retry) when the database is out of reach, else 500.
pub fn postgres_error(error: &sqlx::Error) -> ApiError {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
            ApiError::unavailable(
                "postgres_unavailable",
                "the credential database is unavailable",
                1,
            )
        }
        _ => ApiError::internal(format!("credential database: {error}")),
    }
}

/// A user to add; `password: None` has one generated (and returned once).
#[derive(Debug, Clone, Default)]
pub struct UserRequest {
    pub name: String,
    pub password: Option<Secret>,
    pub filters: Vec<String>,
    pub topics: Vec<String>,
}

/// A user as listed: never the password or its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct UserRow {
    pub name: String,
    pub filters: Vec<String>,
    pub topics: Vec<String>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug)]
pub struct AddedUser {
    pub user: UserRow,
    /// The password made for a request that gave none: shown once, stored only as a hash.
    pub generated_password: Option<Secret>,
}

/// Whom a key is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOwner {
    /// Sends as this service.
    Producer { service: String },
    /// Reads within this user's filters.
    Consumer { user: String },
}

/// A key to issue.
#[derive(Debug, Clone)]
pub struct KeyRequest {
    pub owner: KeyOwner,
    /// Consumer keys only: narrower than the user's (empty: the user's).
    pub filters: Vec<String>,
    /// Producer: the topics it may send to; consumer: narrower than the user's. Empty: any.
    pub topics: Vec<String>,
    pub expires_in: Option<Duration>,
    pub description: String,
}

/// A key as listed: never the secret or its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct KeyRow {
    pub id: String,
    pub kind: String,
    pub service: Option<String>,
    #[sqlx(rename = "user_name")]
    pub user: Option<String>,
    pub filters: Vec<String>,
    pub topics: Vec<String>,
    pub description: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl KeyRow {
    /// `active`, `revoked` or `expired` at `now`.
    pub fn status(&self, now: DateTime<Utc>) -> &'static str {
        if self.revoked_at.is_some() {
            "revoked"
        } else if self.expires_at.is_some_and(|at| at <= now) {
            "expired"
        } else {
            "active"
        }
    }

    /// The service a producer key sends as, or the user a consumer key reads for.
    pub fn owner(&self) -> &str {
        self.service
            .as_deref()
            .or(self.user.as_deref())
            .unwrap_or_default()
    }
}

/// A key just issued: `key` is the only time its secret is seen.
#[derive(Debug)]
pub struct IssuedKey {
    pub row: KeyRow,
    pub key: Secret,
}

/// A name people type and logs show: no separators of Basic credentials (`:`), no spaces or
/// control characters.
fn check_name(what: &str, name: &str) -> Result<(), CredentialError> {
    if name.is_empty() {
        return Err(CredentialError::Invalid(format!("the {what} is empty")));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(CredentialError::Invalid(format!(
            "the {what} is longer than {MAX_NAME_CHARS} characters"
        )));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '@')))
    {
        return Err(CredentialError::Invalid(format!(
            "the {what} {name:?} contains {bad:?}: use letters, digits, '_', '-', '.' and '@'"
        )));
    }
    Ok(())
}

fn check_topics(topics: &[String]) -> Result<(), CredentialError> {
    match topics
        .iter()
        .find(|t| !crate::settings::valid_topic_name(t))
    {
        Some(bad) => Err(CredentialError::Invalid(format!(
            "{bad:?} is not a valid topic name"
        ))),
        None => Ok(()),
    }
}

fn check_password(password: &Secret) -> Result<(), CredentialError> {
    let text = password.expose();
    if text.chars().count() < MIN_PASSWORD_CHARS {
        return Err(CredentialError::Invalid(format!(
            "the password is shorter than {MIN_PASSWORD_CHARS} characters"
        )));
    }
    if text.len() > MAX_PASSWORD_BYTES {
        return Err(CredentialError::Invalid(format!(
            "the password is longer than {MAX_PASSWORD_BYTES} bytes"
        )));
    }
    Ok(())
}

/// The filters as stored: parsed (so a bad one is refused with its reason), then written back
/// in their one spelling.
fn normalized_filters(filters: &[String]) -> Result<(FilterSet, Vec<String>), CredentialError> {
    let set = FilterSet::parse(filters)?;
    let texts = set.filters().iter().map(ToString::to_string).collect();
    Ok((set, texts))
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if e.is_unique_violation())
}

fn is_foreign_key_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if e.is_foreign_key_violation())
}

pub async fn add_user(pool: &PgPool, request: UserRequest) -> Result<AddedUser, CredentialError> {
    check_name("user name", &request.name)?;
    let (_, filters) = normalized_filters(&request.filters)?;
    check_topics(&request.topics)?;
    let (password, generated_password) = match request.password {
        Some(password) => {
            check_password(&password)?;
            (password, None)
        }
        None => {
            let password = secret::generate_password();
            (password.clone(), Some(password))
        }
    };
    let password_hash = tokio::task::spawn_blocking(move || secret::hash_password(&password))
        .await
        .map_err(|e| CredentialError::Internal(format!("hashing the password: {e}")))??;
    let inserted = sqlx::query_as::<_, UserRow>(
        "INSERT INTO gateway_users (name, password_hash, filters, topics) VALUES ($1, $2, $3, $4)
         RETURNING name, filters, topics, created_at",
    )
    .bind(&request.name)
    .bind(&password_hash)
    .bind(&filters)
    .bind(&request.topics)
    .fetch_one(pool)
    .await;
    match inserted {
        Ok(user) => Ok(AddedUser {
            user,
            generated_password,
        }),
        Err(error) if is_unique_violation(&error) => {
            Err(CredentialError::DuplicateUser(request.name))
        }
        Err(error) => Err(error.into()),
    }
}

pub async fn list_users(pool: &PgPool) -> Result<Vec<UserRow>, CredentialError> {
    Ok(sqlx::query_as::<_, UserRow>(
        "SELECT name, filters, topics, created_at FROM gateway_users ORDER BY name",
    )
    .fetch_all(pool)
    .await?)
}

/// Removes a user and, with them, their consumer keys, tickets and sessions.
pub async fn remove_user(pool: &PgPool, name: &str) -> Result<(), CredentialError> {
    let removed = sqlx::query("DELETE FROM gateway_users WHERE name = $1")
        .bind(name)
        .execute(pool)
        .await?;
    match removed.rows_affected() {
        0 => Err(CredentialError::NoSuchUser(name.to_string())),
        _ => Ok(()),
    }
}

/// What a consumer key may be narrowed to: the user's filters and topics.
#[derive(sqlx::FromRow)]
struct OwnerScope {
    filters: Vec<String>,
    topics: Vec<String>,
}

/// Refuses a consumer key asking for more than its user may read, naming what is beyond.
fn check_within_owner(
    user: &str,
    owner: &OwnerScope,
    filters: Option<&FilterSet>,
    topics: &[String],
) -> Result<(), CredentialError> {
    if let Some(filters) = filters {
        let allowed = FilterSet::parse(&owner.filters)?;
        if let Some(beyond) = filters.filters().iter().find(|f| !covers(&allowed, f)) {
            return Err(CredentialError::Invalid(format!(
                "filter {beyond} is not within what user {user} may read ({allowed})"
            )));
        }
    }
    if !owner.topics.is_empty() {
        if let Some(beyond) = topics.iter().find(|t| !owner.topics.contains(t)) {
            return Err(CredentialError::Invalid(format!(
                "topic {beyond} is not among those user {user} may read ({})",
                owner.topics.join(",")
            )));
        }
    }
    Ok(())
}

pub async fn issue_key(pool: &PgPool, request: KeyRequest) -> Result<IssuedKey, CredentialError> {
    check_topics(&request.topics)?;
    if request.description.chars().count() > MAX_DESCRIPTION_CHARS {
        return Err(CredentialError::Invalid(format!(
            "the description is longer than {MAX_DESCRIPTION_CHARS} characters"
        )));
    }
    let expires_in_secs = request
        .expires_in
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX).max(1));
    let (kind, service, user, filters) = match &request.owner {
        KeyOwner::Producer { service } => {
            check_name("service", service)?;
            if !request.filters.is_empty() {
                return Err(CredentialError::Invalid(
                    "a producer key reads nothing: filters are for consumer keys".into(),
                ));
            }
            ("producer", Some(service.as_str()), None, Vec::new())
        }
        KeyOwner::Consumer { user } => {
            check_name("user name", user)?;
            let narrowed = match request.filters.is_empty() {
                true => None,
                false => Some(normalized_filters(&request.filters)?),
            };
            let owner = sqlx::query_as::<_, OwnerScope>(
                "SELECT filters, topics FROM gateway_users WHERE name = $1",
            )
            .bind(user)
            .fetch_optional(pool)
            .await?
            .ok_or_else(|| CredentialError::UnknownOwner(user.clone()))?;
            check_within_owner(
                user,
                &owner,
                narrowed.as_ref().map(|(set, _)| set),
                &request.topics,
            )?;
            let texts = narrowed.map(|(_, texts)| texts).unwrap_or_default();
            ("consumer", None, Some(user.as_str()), texts)
        }
    };
    loop {
        let token = secret::issue(TokenKind::ApiKey);
        // A consumer principal whose id equals its user's name is that user logged in (see
        // `CredentialRef::of`): a key never takes its own user's name as its id.
        if user == Some(token.id.as_str()) {
            continue;
        }
        let inserted = sqlx::query_as::<_, KeyRow>(
            "INSERT INTO gateway_keys
                 (id, secret_sha256, kind, service, user_name, filters, topics, description,
                  expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now() + make_interval(secs => $9))
             RETURNING id, kind, service, user_name, filters, topics, description, created_at,
                       expires_at, revoked_at",
        )
        .bind(&token.id)
        .bind(&token.secret_sha256[..])
        .bind(kind)
        .bind(service)
        .bind(user)
        .bind(&filters)
        .bind(&request.topics)
        .bind(&request.description)
        .bind(expires_in_secs.map(|secs| secs as f64))
        .fetch_one(pool)
        .await;
        match inserted {
            Ok(row) => {
                return Ok(IssuedKey {
                    row,
                    key: token.text,
                })
            }
            // Two random ids of 62 bits met: draw again.
            Err(error) if is_unique_violation(&error) => continue,
            // The user went between the check and the insert.
            Err(error) if is_foreign_key_violation(&error) => {
                return Err(CredentialError::UnknownOwner(
                    user.unwrap_or_default().to_string(),
                ))
            }
            Err(error) => return Err(error.into()),
        }
    }
}

pub async fn list_keys(pool: &PgPool) -> Result<Vec<KeyRow>, CredentialError> {
    Ok(sqlx::query_as::<_, KeyRow>(
        "SELECT id, kind, service, user_name, filters, topics, description, created_at,
                expires_at, revoked_at
         FROM gateway_keys ORDER BY created_at, id",
    )
    .fetch_all(pool)
    .await?)
}

/// Revokes a key (kept, marked, so a listing and a refused request can say so); revoking a
/// revoked key keeps its first revocation time.
pub async fn revoke_key(pool: &PgPool, id: &str) -> Result<DateTime<Utc>, CredentialError> {
    sqlx::query_scalar::<_, DateTime<Utc>>(
        "UPDATE gateway_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1
         RETURNING revoked_at",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| CredentialError::NoSuchKey(id.to_string()))
}

/// A ticket or session row: what it was issued for and until when.
#[derive(Debug, Clone)]
pub struct TicketRow {
    pub kind: TokenKind,
    pub secret_sha256: Vec<u8>,
    pub credential: CredentialRef,
    pub expires_at: DateTime<Utc>,
}

fn ticket_kind_name(kind: TokenKind) -> &'static str {
    match kind {
        TokenKind::Session => "session",
        _ => "ticket",
    }
}

/// Stores a new ticket or session for `credential`, valid for `ttl`; returns its text (shown
/// once) and expiry.
pub async fn issue_ticket(
    pool: &PgPool,
    kind: TokenKind,
    credential: &CredentialRef,
    ttl: Duration,
) -> Result<(Secret, DateTime<Utc>), CredentialError> {
    let (key_id, user_name) = match credential {
        CredentialRef::Admin => (None, None),
        CredentialRef::Key(id) => (Some(id.as_str()), None),
        CredentialRef::User(name) => (None, Some(name.as_str())),
    };
    loop {
        let IssuedToken {
            id,
            text,
            secret_sha256,
        } = secret::issue(kind);
        let inserted = sqlx::query_scalar::<_, DateTime<Utc>>(
            "INSERT INTO gateway_tickets (id, secret_sha256, kind, key_id, user_name, expires_at)
             VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6))
             RETURNING expires_at",
        )
        .bind(&id)
        .bind(&secret_sha256[..])
        .bind(ticket_kind_name(kind))
        .bind(key_id)
        .bind(user_name)
        .bind(ttl.as_secs_f64())
        .fetch_one(pool)
        .await;
        match inserted {
            Ok(expires_at) => return Ok((text, expires_at)),
            Err(error) if is_unique_violation(&error) => continue,
            Err(error) => return Err(error.into()),
        }
    }
}

/// A `gateway_tickets` row as read.
#[derive(sqlx::FromRow)]
struct TicketColumns {
    kind: String,
    secret_sha256: Vec<u8>,
    key_id: Option<String>,
    user_name: Option<String>,
    expires_at: DateTime<Utc>,
}

pub async fn find_ticket(pool: &PgPool, id: &str) -> Result<Option<TicketRow>, sqlx::Error> {
    let row = sqlx::query_as::<_, TicketColumns>(
        "SELECT kind, secret_sha256, key_id, user_name, expires_at
         FROM gateway_tickets WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|row| TicketRow {
        kind: match row.kind.as_str() {
            "session" => TokenKind::Session,
            _ => TokenKind::Ticket,
        },
        secret_sha256: row.secret_sha256,
        credential: match (row.key_id, row.user_name) {
            (Some(id), _) => CredentialRef::Key(id),
            (None, Some(name)) => CredentialRef::User(name),
            (None, None) => CredentialRef::Admin,
        },
        expires_at: row.expires_at,
    }))
}

/// Ends a session (logout) or ticket.
pub async fn delete_ticket(pool: &PgPool, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM gateway_tickets WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await
        .map(|_| ())
}

/// Drops tickets and sessions that expired more than `grace` ago (kept that long so a late
/// request hears "expired" rather than "unknown").
pub async fn purge_expired_tickets(pool: &PgPool, grace: Duration) -> Result<u64, sqlx::Error> {
    sqlx::query("DELETE FROM gateway_tickets WHERE expires_at < now() - make_interval(secs => $1)")
        .bind(grace.as_secs_f64())
        .execute(pool)
        .await
        .map(|done| done.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(filters: &[&str], topics: &[&str]) -> OwnerScope {
        OwnerScope {
            filters: filters.iter().map(|f| f.to_string()).collect(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
        }
    }

    #[test]
    fn names_are_refused_with_the_reason() {
        assert!(check_name("user name", "alice.b-c_d@x").is_ok());
        for (bad, reason) in [
            ("", "empty"),
            ("a:b", "':'"),
            ("a b", "' '"),
            ("a\nb", "'\\n'"),
        ] {
            let error = check_name("user name", bad).unwrap_err().to_string();
            assert!(error.contains(reason), "{bad:?}: {error}");
        }
        assert!(check_name("service", &"x".repeat(129)).is_err());
    }

    #[test]
    fn passwords_must_be_of_a_sensible_length() {
        assert!(check_password(&Secret::new("12345678")).is_ok());
        assert!(check_password(&Secret::new("1234567")).is_err());
        assert!(check_password(&Secret::new("x".repeat(1025))).is_err());
    }

    #[test]
    fn a_consumer_key_stays_within_its_user() {
        let owner = scope(&["lk:*", "*:update_user"], &[]);
        let within = FilterSet::parse(&["lk:create_user", "arm:update_user"]).unwrap();
        assert!(check_within_owner("u", &owner, Some(&within), &[]).is_ok());
        let beyond = FilterSet::parse(&["lk:*", "arm:*"]).unwrap();
        let error = check_within_owner("u", &owner, Some(&beyond), &[])
            .unwrap_err()
            .to_string();
        assert!(error.contains("filter arm:*"), "{error}");
        let topical = scope(&["*:*"], &["task_in"]);
        assert!(check_within_owner("u", &topical, None, &["task_in".into()]).is_ok());
        let error = check_within_owner("u", &topical, None, &["info_in".into()])
            .unwrap_err()
            .to_string();
        assert!(error.contains("topic info_in"), "{error}");
    }

    #[test]
    fn key_status_reads_revocation_before_expiry() {
        let now = Utc::now();
        let mut row = KeyRow {
            id: "k".into(),
            kind: "producer".into(),
            service: Some("lk".into()),
            user: None,
            filters: vec![],
            topics: vec![],
            description: String::new(),
            created_at: now,
            expires_at: None,
            revoked_at: None,
        };
        assert_eq!(row.status(now), "active");
        row.expires_at = Some(now);
        assert_eq!(row.status(now), "expired");
        row.revoked_at = Some(now);
        assert_eq!(row.status(now), "revoked");
        assert_eq!(row.owner(), "lk");
    }
}
