//! The `Authenticator`: turns a request's credential into a `Principal` from an in-memory snapshot
//! of the credential tables, refreshed when their change counter moves; tells streams when to end.
//!
//! One refresher task per instance polls `gateway_auth_state.version` (one integer) every 250 ms
//! and reloads the snapshot when it moved, so revoking or removing a credential anywhere takes
//! effect on every instance within a second, while a request with an API key costs a hash and a
//! map lookup. Passwords cost argon2, so a verified one is remembered (by a digest) until the
//! snapshot changes; tickets and sessions are read from PostgreSQL once per snapshot version.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::http::{header, HeaderMap};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::{watch, Semaphore};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::credentials::{self, postgres_error, TicketRow};
use super::secret::{self, PresentedToken, Secret, TokenError, TokenKind};
use super::snapshot::Snapshot;
use super::{presented_secret, CredentialRef, Principal, PrincipalKind};
use crate::gateway::http::ApiError;

/// The browser session cookie.
pub const SESSION_COOKIE: &str = "ep_session";
/// Verified logins and looked-up tickets remembered per snapshot version, at most; a full cache
/// starts over (a flood of distinct credentials costs lookups, not memory).
const CACHE_CAPACITY: usize = 10_000;
/// How long the admin's own login session lasts at most.
const ADMIN_SESSION_TTL: Duration = Duration::from_secs(3600);
/// The shortest polling period of the change counter.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_millis(10);
/// How often expired tickets and sessions are deleted, and how long after expiry they are kept
/// (so a late request hears "expired" rather than "unknown").
const PURGE_INTERVAL: Duration = Duration::from_secs(600);
const PURGE_GRACE: Duration = Duration::from_secs(3600);

/// Timings of credentials and of noticing changes.
#[derive(Debug, Clone)]
pub struct AuthOptions {
    /// How long a browser ticket (`POST /v1/tickets`) is valid.
    pub ticket_ttl: Duration,
    /// How long a login session (`POST /v1/login`) is valid.
    pub session_ttl: Duration,
    /// How often the change counter is polled: a revocation takes effect within about this.
    pub refresh_interval: Duration,
}

impl Default for AuthOptions {
    fn default() -> AuthOptions {
        AuthOptions {
            ticket_ttl: Duration::from_secs(60),
            session_ttl: Duration::from_secs(12 * 3600),
            refresh_interval: Duration::from_millis(250),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the admin token is empty: give a long random one, or none")]
    EmptyAdminToken,
    #[error("migrating the gateway's credential tables")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("loading the gateway's credentials from PostgreSQL")]
    Load(#[from] sqlx::Error),
}

/// How a request proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof {
    AdminToken,
    ApiKey,
    Password,
    Ticket,
    Session,
}

/// Entries valid for one snapshot version: a newer version empties the cache, and an entry
/// learned under an older version is not kept (it may describe a credential since changed).
struct VersionedCache<K, V> {
    version: i64,
    entries: HashMap<K, V>,
}

impl<K: Eq + Hash, V: Clone> VersionedCache<K, V> {
    fn new() -> Self {
        VersionedCache {
            version: i64::MIN,
            entries: HashMap::new(),
        }
    }

    fn catch_up(&mut self, version: i64) {
        if version > self.version {
            self.version = version;
            self.entries.clear();
        }
    }

    fn get(&mut self, version: i64, key: &K) -> Option<V> {
        self.catch_up(version);
        match version == self.version {
            true => self.entries.get(key).cloned(),
            false => None,
        }
    }

    fn insert(&mut self, version: i64, key: K, value: V) {
        self.catch_up(version);
        if version != self.version {
            return;
        }
        if self.entries.len() >= CACHE_CAPACITY {
            self.entries.clear();
        }
        self.entries.insert(key, value);
    }

    fn remove(&mut self, key: &K) {
        self.entries.remove(key);
    }
}

fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a cache leaves at worst a stale entry set: keep going.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Inner {
    pool: PgPool,
    admin_sha256: Option<[u8; 32]>,
    options: AuthOptions,
    /// The current snapshot; the refresher and writes through this instance publish to it.
    snapshots: watch::Sender<Arc<Snapshot>>,
    shutdown: CancellationToken,
    /// Digests of `name:password` pairs verified under the cache's version.
    verified_logins: Mutex<VersionedCache<[u8; 32], ()>>,
    /// Ticket and session rows by id, as read under the cache's version.
    tickets: Mutex<VersionedCache<String, TicketRow>>,
    /// argon2 takes about 19 MiB and tens of milliseconds a check: at most one per core at a
    /// time, so a flood of Basic attempts queues instead of exhausting memory.
    password_checks: Semaphore,
}

/// Authenticates requests against the credentials in PostgreSQL, from memory; cheap to clone.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("version", &self.snapshot().version)
            .field("admin_token", &self.inner.admin_sha256.map(|_| "<set>"))
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

/// A hash to verify against when the user does not exist, so an unknown name takes as long to
/// refuse as a wrong password (and user names cannot be probed by timing).
fn stand_in_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| secret::hash_password(&secret::generate_password()).unwrap_or_default())
}

/// The `ep_session` cookie's value, from any `Cookie` header.
pub fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == SESSION_COOKIE).then_some(value.trim())
        })
}

fn no_credential() -> ApiError {
    ApiError::unauthorized(
        "no credential: send Authorization: Bearer <API key> (or X-Api-Key), HTTP Basic, a \
         ?ticket= or the ep_session cookie",
    )
}

fn wrong_password() -> ApiError {
    ApiError::unauthorized("wrong user name or password")
}

impl Authenticator {
    /// Applies the credential schema, loads the snapshot and starts the refresher, which stops
    /// with `shutdown`.
    pub async fn start(
        pool: PgPool,
        admin_token: Option<String>,
        shutdown: CancellationToken,
    ) -> Result<Authenticator, AuthError> {
        Self::start_with(pool, admin_token, AuthOptions::default(), shutdown).await
    }

    /// Like [`Authenticator::start`], with other timings (tests shorten the ticket's life).
    pub async fn start_with(
        pool: PgPool,
        admin_token: Option<String>,
        options: AuthOptions,
        shutdown: CancellationToken,
    ) -> Result<Authenticator, AuthError> {
        let admin_token = admin_token.map(Secret::new);
        let admin_sha256 = match &admin_token {
            Some(token) if token.expose().is_empty() => return Err(AuthError::EmptyAdminToken),
            Some(token) => {
                if token.expose().len() < 16 {
                    tracing::warn!(
                        "the gateway's admin token is shorter than 16 characters: easy to guess"
                    );
                }
                Some(secret::sha256(token.expose().as_bytes()))
            }
            None => None,
        };
        super::schema::migrator().run(&pool).await?;
        let snapshot = Snapshot::load(&pool).await?;
        let password_checks =
            std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
        let authenticator = Authenticator {
            inner: Arc::new(Inner {
                pool,
                admin_sha256,
                options,
                snapshots: watch::Sender::new(Arc::new(snapshot)),
                shutdown,
                verified_logins: Mutex::new(VersionedCache::new()),
                tickets: Mutex::new(VersionedCache::new()),
                password_checks: Semaphore::new(password_checks),
            }),
        };
        tokio::spawn(refresh(authenticator.clone()));
        Ok(authenticator)
    }

    /// Reloads the snapshot now if the counter moved: a write through this instance (the admin
    /// API) is in effect here before its answer, not a poll later. A failure leaves it to the
    /// refresher.
    pub async fn refresh_now(&self) {
        let loaded = self.snapshot().version;
        match refresh_once(&self.inner.pool, loaded).await {
            Ok(Some(snapshot)) => self.publish(snapshot),
            Ok(None) => {}
            Err(error) => tracing::warn!(%error, "reloading the gateway's credentials"),
        }
    }

    /// Publishes `snapshot` unless a newer one already is (the refresher and `refresh_now` may
    /// race: the counter only grows, so the higher version is the newer truth).
    fn publish(&self, snapshot: Snapshot) {
        self.inner.snapshots.send_if_modified(|current| {
            let newer = snapshot.version > current.version;
            if newer {
                tracing::debug!(
                    version = snapshot.version,
                    "gateway credentials changed: reloaded"
                );
                *current = Arc::new(snapshot);
            }
            newer
        });
    }

    /// The pool of the credential database (the admin routes write through it).
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    pub fn options(&self) -> &AuthOptions {
        &self.inner.options
    }

    /// The credentials as this instance sees them now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.snapshots.borrow().clone()
    }

    fn admin_enabled(&self) -> bool {
        self.inner.admin_sha256.is_some()
    }

    /// Who the request is: 401 when it carries no credential or one that is unknown, wrong,
    /// expired or revoked (saying which, never echoing a secret); 403 when a valid credential
    /// may no longer do anything.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        ticket: Option<&str>,
    ) -> Result<Principal, ApiError> {
        self.identify(headers, ticket)
            .await
            .map(|(principal, _)| principal)
    }

    /// Like [`Authenticator::authenticate`], also saying how the request proved it.
    pub async fn identify(
        &self,
        headers: &HeaderMap,
        ticket: Option<&str>,
    ) -> Result<(Principal, Proof), ApiError> {
        let authorization = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok());
        if let Some(value) = authorization {
            let scheme = value.trim_start().get(..6);
            if scheme.is_some_and(|scheme| scheme.eq_ignore_ascii_case("basic ")) {
                let (name, password) = secret::basic_credentials(value).ok_or_else(|| {
                    ApiError::unauthorized(
                        "malformed Basic credentials: expected base64(name:password)",
                    )
                })?;
                let principal = self.login(&name, &password).await?;
                return Ok((principal, Proof::Password));
            }
        }
        if let Some(text) = presented_secret(headers, ticket) {
            return self.by_secret(text).await;
        }
        if let Some(text) = session_cookie(headers) {
            let token = secret::parse(text)
                .ok()
                .filter(|token| token.kind == TokenKind::Session)
                .ok_or_else(|| {
                    ApiError::unauthorized("malformed ep_session cookie: log in again")
                })?;
            return self.by_ticket(&token).await.map(|p| (p, Proof::Session));
        }
        Err(no_credential())
    }

    /// Whether `text` is the admin token (compared by digest, in constant time).
    fn is_admin_token(&self, text: &str) -> bool {
        self.inner
            .admin_sha256
            .as_ref()
            .is_some_and(|admin| secret::digests_equal(&secret::sha256(text.as_bytes()), admin))
    }

    async fn by_secret(&self, text: &str) -> Result<(Principal, Proof), ApiError> {
        if self.is_admin_token(text) {
            return Ok((Principal::admin(), Proof::AdminToken));
        }
        let token = secret::parse(text).map_err(|error| match error {
            TokenError::UnknownPrefix => ApiError::unauthorized(
                "invalid credential: neither an API key (ep_...), a ticket nor the admin token",
            ),
            malformed => ApiError::unauthorized(malformed.to_string()),
        })?;
        match token.kind {
            TokenKind::ApiKey => self.by_key(&token).map(|p| (p, Proof::ApiKey)),
            TokenKind::Ticket => self.by_ticket(&token).await.map(|p| (p, Proof::Ticket)),
            TokenKind::Session => self.by_ticket(&token).await.map(|p| (p, Proof::Session)),
        }
    }

    fn by_key(&self, token: &PresentedToken<'_>) -> Result<Principal, ApiError> {
        let snapshot = self.snapshot();
        let key = snapshot
            .key(token.id)
            .ok_or_else(|| ApiError::unauthorized(format!("unknown API key {}", token.id)))?;
        // The secret first: a wrong one learns nothing about the key's state.
        if !token.matches(&key.secret_sha256) {
            return Err(ApiError::unauthorized(format!(
                "invalid API key {}: the secret does not match",
                token.id
            )));
        }
        snapshot.key_principal(token.id, Utc::now())
    }

    /// A ticket or session: its row from the cache or PostgreSQL, then the credential it was
    /// issued for, as the current snapshot has it.
    async fn by_ticket(&self, token: &PresentedToken<'_>) -> Result<Principal, ApiError> {
        let noun = token.kind.noun();
        let row = self.ticket_row(token.id).await?.ok_or_else(|| {
            ApiError::unauthorized(format!("unknown {noun} (or one expired long ago)"))
        })?;
        if row.kind != token.kind || !token.matches(&row.secret_sha256) {
            return Err(ApiError::unauthorized(format!("invalid {noun}")));
        }
        let now = Utc::now();
        if row.expires_at <= now {
            let again = match token.kind {
                TokenKind::Session => "log in again (POST /v1/login)",
                _ => "ask POST /v1/tickets for a new one",
            };
            return Err(ApiError::unauthorized(format!(
                "{noun} expired at {}: {again}",
                row.expires_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            )));
        }
        self.snapshot()
            .principal(&row.credential, self.admin_enabled(), now)
            .map_err(|error| ApiError {
                message: format!("the {noun}'s credential: {}", error.message),
                ..error
            })
    }

    async fn ticket_row(&self, id: &str) -> Result<Option<TicketRow>, ApiError> {
        // The version before the read: a logout after it bumps the version past it, so the row
        // read here is never served after the logout is seen.
        let version = self.snapshot().version;
        if let Some(row) = locked(&self.inner.tickets).get(version, &id.to_string()) {
            return Ok(Some(row));
        }
        let row = credentials::find_ticket(&self.inner.pool, id)
            .await
            .map_err(|error| postgres_error(&error))?;
        if let Some(row) = &row {
            locked(&self.inner.tickets).insert(version, id.to_string(), row.clone());
        }
        Ok(row)
    }

    /// A user by name and password (argon2, off the async threads; remembered while the
    /// snapshot stays the same).
    async fn login(&self, name: &str, password: &Secret) -> Result<Principal, ApiError> {
        let snapshot = self.snapshot();
        let digest = secret::login_digest(name, password.expose());
        if locked(&self.inner.verified_logins)
            .get(snapshot.version, &digest)
            .is_some()
        {
            return snapshot.user_principal(name);
        }
        let stored = snapshot.user(name).map(|user| user.password_hash.clone());
        let _permit = self
            .inner
            .password_checks
            .acquire()
            .await
            .map_err(|_| ApiError::internal("password checks stopped"))?;
        let password = password.clone();
        let verified = tokio::task::spawn_blocking(move || {
            let hash = stored.as_deref().unwrap_or_else(|| stand_in_hash());
            secret::verify_password(password.expose(), hash) && stored.is_some()
        })
        .await
        .map_err(|error| ApiError::internal(format!("checking the password: {error}")))?;
        if !verified {
            return Err(wrong_password());
        }
        locked(&self.inner.verified_logins).insert(snapshot.version, digest, ());
        snapshot.user_principal(name)
    }

    /// A ticket for the request's credential (`POST /v1/tickets`): consumers and the admin only,
    /// and not in exchange for a ticket (a leaked URL would otherwise live for ever).
    pub async fn issue_ticket(
        &self,
        headers: &HeaderMap,
        ticket: Option<&str>,
    ) -> Result<(Secret, Duration), ApiError> {
        let (principal, proof) = self.identify(headers, ticket).await?;
        if proof == Proof::Ticket {
            return Err(ApiError::forbidden(
                "a ticket cannot be exchanged for another: authenticate with the credential itself",
            ));
        }
        if let PrincipalKind::Producer { .. } = principal.kind {
            return Err(ApiError::forbidden(format!(
                "credential {} is a producer's: tickets are for reading streams",
                principal.id
            )));
        }
        let ttl = self.inner.options.ticket_ttl;
        let (text, _) = credentials::issue_ticket(
            &self.inner.pool,
            TokenKind::Ticket,
            &CredentialRef::of(&principal),
            ttl,
        )
        .await?;
        Ok((text, ttl))
    }

    /// A session (`POST /v1/login`) for a user logging in with Basic credentials, or for the
    /// admin presenting the admin token as a bearer credential (the console's login: the page
    /// then holds an HttpOnly cookie, never the token).
    pub async fn start_session(
        &self,
        headers: &HeaderMap,
    ) -> Result<(Principal, Secret, Duration), ApiError> {
        let basic = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(secret::basic_credentials);
        let (principal, credential, ttl) = match basic {
            Some((name, password)) => {
                let principal = self.login(&name, &password).await?;
                (
                    principal,
                    CredentialRef::User(name),
                    self.inner.options.session_ttl,
                )
            }
            None => {
                let text = presented_secret(headers, None).ok_or_else(|| {
                    ApiError::unauthorized(
                        "log in with HTTP Basic (Authorization: Basic base64(name:password)), \
                         or as the admin with Authorization: Bearer <admin token>",
                    )
                })?;
                if !self.is_admin_token(text) {
                    return Err(ApiError::unauthorized(
                        "a bearer login takes the admin token; users log in with HTTP Basic",
                    ));
                }
                // Shorter than a user's: an admin session outlives a change of the admin
                // token until it expires (or its holder logs out).
                let ttl = self.inner.options.session_ttl.min(ADMIN_SESSION_TTL);
                (Principal::admin(), CredentialRef::Admin, ttl)
            }
        };
        let (text, _) =
            credentials::issue_ticket(&self.inner.pool, TokenKind::Session, &credential, ttl)
                .await?;
        Ok((principal, text, ttl))
    }

    /// Ends the request's session, if it carries a valid one (`POST /v1/logout`); the other
    /// instances drop it when the change counter moves.
    pub async fn end_session(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(token) = session_cookie(headers)
            .and_then(|text| secret::parse(text).ok())
            .filter(|token| token.kind == TokenKind::Session)
        else {
            return Ok(());
        };
        let Some(row) = self.ticket_row(token.id).await? else {
            return Ok(());
        };
        // Only the holder of the session may end it (its id alone is not a credential).
        if token.matches(&row.secret_sha256) {
            credentials::delete_ticket(&self.inner.pool, token.id)
                .await
                .map_err(|error| postgres_error(&error))?;
            locked(&self.inner.tickets).remove(&token.id.to_string());
        }
        Ok(())
    }

    /// Resolves when `principal`'s credential stops granting exactly what it granted: revoked,
    /// expired, removed, or its rights changed (and when the gateway shuts down). An open stream
    /// selects on it to close within a second of the change.
    pub fn revoked(&self, principal: &Principal) -> impl Future<Output = ()> + Send + 'static {
        let mut snapshots = self.inner.snapshots.subscribe();
        let shutdown = self.inner.shutdown.clone();
        let credential = CredentialRef::of(principal);
        let principal = principal.clone();
        let admin_enabled = self.admin_enabled();
        let watch = async move {
            loop {
                let expires_at = {
                    let snapshot = snapshots.borrow_and_update();
                    match snapshot.principal(&credential, admin_enabled, Utc::now()) {
                        Ok(current) if current == principal => snapshot.expires_at(&credential),
                        _ => return,
                    }
                };
                match expires_at {
                    Some(at) => {
                        tokio::select! {
                            changed = snapshots.changed() => if changed.is_err() { return },
                            _ = tokio::time::sleep(until(at)) => {}
                        }
                    }
                    None => {
                        if snapshots.changed().await.is_err() {
                            return;
                        }
                    }
                }
            }
        };
        async move {
            tokio::select! {
                _ = watch => {}
                _ = shutdown.cancelled() => {}
            }
        }
    }
}

/// How long from now until `at` (zero when past).
fn until(at: DateTime<Utc>) -> Duration {
    (at - Utc::now()).to_std().unwrap_or(Duration::ZERO)
}

/// Polls the change counter and publishes a new snapshot when it moved; while PostgreSQL is
/// unreachable the last snapshot keeps serving (said once, at warn).
async fn refresh(auth: Authenticator) {
    let shutdown = auth.inner.shutdown.clone();
    let pool = auth.inner.pool.clone();
    // A zero period would make `interval` panic (and poll PostgreSQL in a busy loop).
    let period = auth
        .inner
        .options
        .refresh_interval
        .max(MIN_REFRESH_INTERVAL);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failing = false;
    let mut next_purge = Instant::now() + PURGE_INTERVAL;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let loaded = auth.snapshot().version;
        let refreshed = tokio::select! {
            _ = shutdown.cancelled() => return,
            refreshed = refresh_once(&pool, loaded) => refreshed,
        };
        match refreshed {
            Ok(Some(snapshot)) => auth.publish(snapshot),
            Ok(None) => {}
            Err(error) => {
                if !failing {
                    tracing::warn!(%error, "cannot refresh the gateway's credentials; serving the last ones loaded");
                }
                failing = true;
                continue;
            }
        }
        if std::mem::take(&mut failing) {
            tracing::info!("gateway credentials refreshed again");
        }
        if Instant::now() >= next_purge {
            next_purge = Instant::now() + PURGE_INTERVAL;
            if let Err(error) = credentials::purge_expired_tickets(&pool, PURGE_GRACE).await {
                tracing::warn!(%error, "purging expired gateway tickets");
            }
        }
    }
}

/// A new snapshot when the counter is no longer `loaded`.
async fn refresh_once(pool: &PgPool, loaded: i64) -> Result<Option<Snapshot>, sqlx::Error> {
    if Snapshot::current_version(pool).await? == loaded {
        return Ok(None);
    }
    Snapshot::load(pool).await.map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1; b=2"));
        assert_eq!(session_cookie(&headers), None);
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("x=y;  ep_session=eps_abc ; z=1"),
        );
        assert_eq!(session_cookie(&headers), Some("eps_abc"));
    }

    #[test]
    fn caches_forget_on_a_new_version_and_refuse_stale_entries() {
        let mut cache = VersionedCache::new();
        cache.insert(3, "a", 1);
        assert_eq!(cache.get(3, &"a"), Some(1));
        // Learned under version 2, when the cache already holds version 3: not kept.
        cache.insert(2, "b", 2);
        assert_eq!(cache.get(3, &"b"), None);
        assert_eq!(cache.get(4, &"a"), None, "a new version starts empty");
        cache.insert(4, "a", 5);
        cache.remove(&"a");
        assert_eq!(cache.get(4, &"a"), None);
    }

    #[test]
    fn a_full_cache_starts_over_instead_of_growing() {
        let mut cache = VersionedCache::new();
        for n in 0..=CACHE_CAPACITY {
            cache.insert(1, n, ());
        }
        assert!(cache.entries.len() <= CACHE_CAPACITY);
    }

    #[test]
    fn the_revocation_wait_is_never_negative() {
        assert_eq!(
            until(Utc::now() - chrono::Duration::seconds(5)),
            Duration::ZERO
        );
        assert!(until(Utc::now() + chrono::Duration::seconds(5)) > Duration::from_secs(4));
    }
}
