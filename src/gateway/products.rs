//! `GET /v1/products/{id}` (a product's current state from the materialised table) and
//! `GET /v1/products/{id}/photo` (its photo, PostgreSQL the truth, cached aside in Redis).
//!
//! The cache holds copies only: a miss reads PostgreSQL and fills Redis with a TTL; Redis down
//! or slow means the photo is served from PostgreSQL, slower but never failing, and
//! `eventpipe_gateway_photo_cache_total{outcome="error"}` says so. Redis's own `maxmemory` and
//! `allkeys-lru` bound the cache.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::filter::FilterSet;
use crate::gateway::http::ApiError;
use crate::gateway::Gateway;

/// A Redis call slower than this counts as Redis being down: the photo comes from PostgreSQL.
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);
/// What products are, to a consumer's filters: the catalogue's changes.
const PRODUCTS_FILTER: &str = "catalogue:product_change";

/// The photo cache: a connection to Redis once one was made (it reconnects by itself after).
pub struct PhotoCache {
    connection: Arc<OnceLock<ConnectionManager>>,
    ttl: Duration,
    prefix: String,
}

impl PhotoCache {
    /// Connects (a first attempt before returning, so a gateway started with Redis up caches
    /// from its first request), then in the background, retrying until it succeeds or
    /// `shutdown`: meanwhile photos come from PostgreSQL.
    pub async fn start(
        url: &str,
        ttl: Duration,
        prefix: String,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<PhotoCache> {
        let client = redis::Client::open(url)?;
        let connection: Arc<OnceLock<ConnectionManager>> = Arc::default();
        let shown = crate::config::redact_url(url);
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT * 4))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_max_delay(Duration::from_secs(2));
        let connect =
            async move || ConnectionManager::new_with_config(client.clone(), config.clone()).await;
        match connect().await {
            Ok(manager) => {
                let _ = connection.set(manager);
                tracing::info!(url = shown, "photo cache connected");
            }
            Err(error) => {
                tracing::warn!(%error, url = shown, "photo cache: Redis unreachable; photos come from PostgreSQL meanwhile");
                let (slot, shutdown) = (connection.clone(), shutdown.clone());
                tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                            _ = shutdown.cancelled() => return,
                        }
                        if let Ok(manager) = connect().await {
                            let _ = slot.set(manager);
                            tracing::info!(url = shown, "photo cache connected");
                            return;
                        }
                    }
                });
            }
        }
        Ok(PhotoCache {
            connection,
            ttl,
            prefix,
        })
    }

    fn key(&self, id: &str) -> String {
        format!("{}{id}", self.prefix)
    }

    /// The cached photo, `Ok(None)` on a miss, `Err` when Redis cannot answer now.
    async fn get(&self, id: &str) -> Result<Option<Photo>, String> {
        let mut connection = self.connection.get().ok_or("not connected")?.clone();
        let cached: Option<Vec<u8>> = tokio::time::timeout(
            REDIS_TIMEOUT,
            redis::cmd("GET")
                .arg(self.key(id))
                .query_async(&mut connection),
        )
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
        Ok(cached.and_then(|bytes| Photo::decode(&bytes)))
    }

    async fn put(&self, id: &str, photo: &Photo) -> Result<(), String> {
        let mut connection = self.connection.get().ok_or("not connected")?.clone();
        tokio::time::timeout(
            REDIS_TIMEOUT,
            redis::cmd("SET")
                .arg(self.key(id))
                .arg(photo.encode())
                .arg("EX")
                .arg(self.ttl.as_secs())
                .query_async::<()>(&mut connection),
        )
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())
    }
}

/// A photo as served: its bytes, content type and ETag.
#[derive(Debug, Clone, PartialEq)]
struct Photo {
    content_type: String,
    etag: String,
    bytes: Vec<u8>,
}

impl Photo {
    /// One Redis value: `content type \n etag \n bytes`.
    fn encode(&self) -> Vec<u8> {
        let mut value = Vec::with_capacity(self.bytes.len() + 64);
        value.extend_from_slice(self.content_type.as_bytes());
        value.push(b'\n');
        value.extend_from_slice(self.etag.as_bytes());
        value.push(b'\n');
        value.extend_from_slice(&self.bytes);
        value
    }

    /// `None` for a value this gateway did not write (read as a miss).
    fn decode(value: &[u8]) -> Option<Photo> {
        let mut parts = value.splitn(3, |b| *b == b'\n');
        let content_type = std::str::from_utf8(parts.next()?).ok()?.to_string();
        let etag = std::str::from_utf8(parts.next()?).ok()?.to_string();
        Some(Photo {
            content_type,
            etag,
            bytes: parts.next()?.to_vec(),
        })
    }
}

pub fn routes(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v1/products/{id}", get(product))
        .route("/v1/products/{id}/photo", get(photo))
        .with_state(gateway)
}

/// Products are read by the admin and by consumers whose filters cover the catalogue's changes.
async fn authorize(
    gateway: &Gateway,
    headers: &HeaderMap,
    ticket: Option<&str>,
) -> Result<(), ApiError> {
    let principal = gateway.auth.authenticate(headers, ticket).await?;
    let filters = FilterSet::parse(&[PRODUCTS_FILTER.to_string()]).expect("a valid filter");
    principal.may_read(&filters, &[])
}

#[derive(Debug, serde::Deserialize)]
struct ProductQuery {
    ticket: Option<String>,
}

/// A product request from a caller who may read products: the id of `/v1/products/{id}...`.
struct ProductRequest {
    id: String,
}

impl FromRequestParts<Arc<Gateway>> for ProductRequest {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        gateway: &Arc<Gateway>,
    ) -> Result<Self, ApiError> {
        let bad = |e: String| ApiError::bad_request("bad_parameter", e);
        let Path(id) = Path::<String>::from_request_parts(parts, gateway)
            .await
            .map_err(|e| bad(e.to_string()))?;
        let Query(query) = Query::<ProductQuery>::from_request_parts(parts, gateway)
            .await
            .map_err(|e| bad(e.to_string()))?;
        authorize(gateway, &parts.headers, query.ticket.as_deref()).await?;
        Ok(ProductRequest { id })
    }
}

/// The product's state: its fields, `version` and `updated_at`; 404 for an unknown id.
async fn product(
    State(gateway): State<Arc<Gateway>>,
    ProductRequest { id }: ProductRequest,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let table = &gateway.settings.products_table;
    let row: Option<(i64, String, String)> = sqlx::query_as(&format!(
        "SELECT version, state::text, to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') FROM {table} WHERE key = $1"
    ))
    .bind(&id)
    .fetch_optional(&gateway.pool)
    .await
    .or_else(missing_table_is_empty)
    .map_err(postgres_unavailable)?;
    let Some((version, state, updated_at)) = row else {
        return Err(unknown(&id));
    };
    let mut product: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&state).unwrap_or_default();
    product.insert("id".into(), serde_json::Value::String(id.clone()));
    product.insert("version".into(), version.into());
    product.insert("updated_at".into(), updated_at.into());
    product.insert("photo".into(), format!("/v1/products/{id}/photo").into());
    let etag = format!("\"v{version}\"");
    let mut response = if if_none_match(&headers, &etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        axum::Json(product).into_response()
    };
    let headers = response.headers_mut();
    headers.insert(header::ETAG, header_value(&etag));
    // A product changes at any time: revalidate each use (a 304 is cheap).
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-cache"),
    );
    Ok(response)
}

/// The photo's bytes with their content type, ETag and caching headers; 304 when the client's
/// copy is current.
async fn photo(
    State(gateway): State<Arc<Gateway>>,
    ProductRequest { id }: ProductRequest,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let cache = &gateway.photos;
    let (photo, source) = match cache.get(&id).await {
        Ok(Some(photo)) => {
            cache_outcome("hit");
            (photo, "redis")
        }
        outcome => {
            match &outcome {
                Ok(_) => cache_outcome("miss"),
                Err(error) => {
                    cache_outcome("error");
                    tracing::debug!(%error, "photo cache unavailable; reading PostgreSQL");
                }
            }
            let photo = load_photo(&gateway.pool, &id)
                .await
                .map_err(postgres_unavailable)?
                .ok_or_else(|| unknown(&id))?;
            if outcome.is_ok() {
                if let Err(error) = cache.put(&id, &photo).await {
                    cache_outcome("error");
                    tracing::debug!(%error, "photo cache: could not fill");
                }
            }
            (photo, "postgres")
        }
    };
    metrics::histogram!("eventpipe_gateway_photo_seconds", "source" => source)
        .record(started.elapsed().as_secs_f64());
    let mut response = if if_none_match(&headers, &photo.etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut response = photo.bytes.into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, header_value(&photo.content_type));
        response
    };
    let headers = response.headers_mut();
    headers.insert(header::ETAG, header_value(&photo.etag));
    // Behind a credential: browsers may keep it, shared caches may not.
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=300"),
    );
    headers.insert("x-photo-source", HeaderValue::from_static(source));
    Ok(response)
}

async fn load_photo(pool: &PgPool, id: &str) -> Result<Option<Photo>, sqlx::Error> {
    let row: Option<(String, String, Vec<u8>)> = sqlx::query_as(
        "SELECT content_type, etag, bytes FROM product_photos WHERE product_id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
    .or_else(missing_table_is_empty)?;
    Ok(row.map(|(content_type, etag, bytes)| Photo {
        content_type,
        etag,
        bytes,
    }))
}

fn cache_outcome(outcome: &'static str) {
    metrics::counter!("eventpipe_gateway_photo_cache_total", "outcome" => outcome).increment(1);
}

/// Help text of the catalogue's metrics, and their series from the start.
pub fn describe_metrics() {
    metrics::describe_counter!(
        "eventpipe_gateway_photo_cache_total",
        "Photo requests by cache outcome: hit (served from Redis), miss (read from PostgreSQL, then cached), error (Redis down or slow: served from PostgreSQL)."
    );
    metrics::describe_histogram!(
        "eventpipe_gateway_photo_seconds",
        metrics::Unit::Seconds,
        "Time to find a photo, by source (redis, postgres)."
    );
    for outcome in ["hit", "miss", "error"] {
        metrics::counter!("eventpipe_gateway_photo_cache_total", "outcome" => outcome).absolute(0);
    }
}

/// No catalogue yet (nobody created its tables): every product is unknown.
fn missing_table_is_empty<T: Default>(error: sqlx::Error) -> Result<T, sqlx::Error> {
    match error.as_database_error().and_then(|e| e.code()) {
        Some(code) if code == "42P01" => Ok(T::default()),
        _ => Err(error),
    }
}

fn postgres_unavailable(error: sqlx::Error) -> ApiError {
    ApiError::unavailable("postgres_unavailable", error.to_string(), 2)
}

fn unknown(id: &str) -> ApiError {
    ApiError::not_found("unknown_product", format!("no product {id:?}"))
}

fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|tag| tag.trim() == etag || tag.trim() == "*")
        })
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_photo_reads_back_and_a_foreign_value_is_a_miss() {
        let photo = Photo {
            content_type: "image/svg+xml".into(),
            etag: "\"abc\"".into(),
            bytes: b"<svg>\n</svg>".to_vec(),
        };
        assert_eq!(Photo::decode(&photo.encode()), Some(photo));
        assert_eq!(Photo::decode(b"just bytes"), None);
    }

    #[test]
    fn if_none_match_takes_lists_and_the_wildcard() {
        let mut headers = HeaderMap::new();
        assert!(!if_none_match(&headers, "\"a\""));
        headers.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"x\", \"a\""),
        );
        assert!(if_none_match(&headers, "\"a\""));
        headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static("*"));
        assert!(if_none_match(&headers, "\"b\""));
    }
}
