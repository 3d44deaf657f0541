//! `eventpipe gateway`: the one authenticated entry point — events in over HTTP, live and durable
//! subscriptions out over SSE and WebSocket, history over HTTP, and the admin API.
//!
//! Layout: `ingress` (POST events) → Kafka; Kafka → `kafka::run_reader` → `fanout::Hub` → one
//! `session` per connection (catch-up, then live) → `sse` / `ws`; `auth` decides who may do what;
//! `cursor` is the resumable position every frame carries; `holds` is flow control in a stream
//! (pauses, held events, history injection); `console` is the operators' page.

pub mod auth;
pub mod console;
pub mod cursor;
pub mod event;
pub mod fanout;
pub mod flows;
pub mod history;
pub mod holds;
pub mod http;
pub mod ingress;
pub mod kafka;
pub mod metrics;
pub mod pages;
pub mod products;
pub mod session;
pub mod settings;
pub mod sse;
pub mod streams;
pub mod subscriptions;
pub mod tls;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::DefaultBodyLimit;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::Router;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::codec::{Codec, SchemaName};
use crate::config::{redact_url, Settings};
use crate::kafka::PipelineContext;
use crate::log::bulk::Backoff;
use crate::telemetry::Readiness;
use auth::{Authenticator, Principal};
use http::ApiError;
use session::{SessionContext, SessionRequest};
pub use settings::{FileGateway, GatewayArgs, GatewaySettings};
use streams::StreamQuery;

/// Connections to PostgreSQL (credentials, subscriptions, history, catch-up from the store).
const POOL_CONNECTIONS: u32 = 8;

/// Everything a request handler needs.
pub struct Gateway {
    pub settings: GatewaySettings,
    pub sessions: Arc<SessionContext>,
    pub auth: Authenticator,
    pub ingress: ingress::Ingress,
    pub pool: PgPool,
    /// Flow control's pauses (`/v1/admin/flows`).
    pub flows: crate::flows::FlowStore,
    pub shutdown: CancellationToken,
    pub console: console::Console,
    /// The product photos' cache (`/v1/products/{id}/photo`).
    pub photos: products::PhotoCache,
}

impl Gateway {
    /// A stream request checked against the caller's credential.
    pub async fn authorize_stream(
        &self,
        headers: &HeaderMap,
        query: &StreamQuery,
    ) -> Result<(Principal, SessionRequest), ApiError> {
        let side = &self.sessions.side;
        streams::authorize(&self.auth, &|topic| side.serves(topic), headers, query).await
    }
}

/// The gateway's routes.
pub fn router(gateway: Arc<Gateway>) -> Router {
    let max_body = gateway.settings.max_body_bytes;
    Router::new()
        .route("/v1/topics/{topic}/events", post(ingress::post_events))
        .route("/v1/stream", get(sse::stream))
        .route("/v1/ws", get(ws::stream))
        .route("/v1/history", get(history::history))
        .with_state(gateway.clone())
        .merge(auth::routes(gateway.auth.clone()))
        .merge(flows::routes(gateway.auth.clone(), gateway.flows.clone()))
        .merge(subscriptions::routes(gateway.clone()))
        .merge(pages::routes())
        .merge(console::routes(gateway.clone()))
        .merge(products::routes(gateway.clone()))
        .fallback(|| async { ApiError::not_found("no_route", "no such route (see /v1/...)") })
        .layer(axum::middleware::from_fn(http::json_errors))
        .layer(axum::middleware::from_fn(http::count_requests))
        // Over the limit: 413 before the body is read.
        .layer(DefaultBodyLimit::max(max_body))
}

/// A gateway serving in this process (tests, `eventpipe run`).
pub struct RunningGateway {
    pub address: SocketAddr,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Connects everything, binds the listener and serves until `shutdown`.
pub async fn start(
    settings: &Settings,
    gateway_settings: GatewaySettings,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningGateway> {
    crate::codec::describe_metrics("gateway");
    metrics::describe();
    readiness.register("kafka");
    readiness.register("postgres");
    let pool = connect_postgres(settings.postgres_url.as_str(), &shutdown).await?;
    readiness.set("postgres", true);
    let auth = Authenticator::start(
        pool.clone(),
        gateway_settings.admin_token.clone(),
        shutdown.clone(),
    )
    .await
    .context("gateway credentials")?;
    // Pauses: the admin API, and their gauges from this instance's view of them.
    let flows = crate::flows::FlowStore::on(pool.clone())
        .await
        .context("flow control")?;
    // One watcher per instance: every stream takes its pauses from it (`holds`).
    let flow_watch = crate::flows::watch::start(flows.clone(), shutdown.clone())
        .await
        .context("flow control")?;
    holds::describe();
    let (formats, registry) = crate::codec::shared(settings)?;
    let kafka_settings = settings.kafka.clone();
    let topics = gateway_settings.topics.clone();
    let side = {
        let formats = formats.clone();
        let registry = registry.clone();
        tokio::task::spawn_blocking(move || {
            kafka::KafkaSide::connect(&kafka_settings, &topics, formats, registry)
        })
        .await??
    };
    let side = Arc::new(side);
    let hub = fanout::Hub::new(gateway_settings.client_queue);
    let reader = kafka::LiveReader::position(side.clone(), hub.clone()).await?;
    readiness.set("kafka", true);
    let reader = tokio::spawn(reader.run(shutdown.clone()));

    let mut producer_settings = settings.kafka.clone();
    producer_settings
        .properties
        .entry("message.timeout.ms".into())
        .or_insert_with(|| gateway_settings.produce_timeout.as_millis().to_string());
    let producer =
        crate::kafka::acks::AckingProducer::create(&producer_settings, PipelineContext::default())?;
    // The gateway writes the topics others read: each topic's input format is what it holds.
    let mut ingress_formats = (*formats).clone();
    ingress_formats.output = ingress_formats.input;
    let ingress = ingress::Ingress {
        producer,
        in_flight: Arc::new(Semaphore::new(gateway_settings.max_in_flight)),
        max_in_flight: gateway_settings.max_in_flight,
        codec: Codec::new(Arc::new(ingress_formats), registry, SchemaName::Envelope),
        key_field: gateway_settings.key_field.clone(),
        produce_timeout: gateway_settings.produce_timeout,
    };
    let sessions = Arc::new(SessionContext {
        side,
        hub,
        store: Some(pool.clone()),
        catch_ups: Arc::new(Semaphore::new(gateway_settings.max_catch_ups)),
        write_timeout: gateway_settings.write_timeout,
        live_margin: (gateway_settings.client_queue / 2).max(1) as u64,
        flows: Some(holds::FlowContext::start(flow_watch, flows.clone())),
    });
    let listen = gateway_settings.listen;
    // Loaded before binding: a bad certificate is a start-up error naming the setting.
    let acceptor = match &gateway_settings.tls {
        Some((cert, key)) => Some(tls::acceptor(cert, key)?),
        None => None,
    };
    // Without an admin token nobody can open the console: scrape nothing then.
    let console_stages = match gateway_settings.admin_token {
        Some(_) => gateway_settings.console_stages.as_slice(),
        None => &[],
    };
    let console = console::Console::start(console_stages, &settings.kafka, &shutdown);
    products::describe_metrics();
    let photos = products::PhotoCache::start(
        &gateway_settings.redis_url,
        gateway_settings.photo_cache_ttl,
        gateway_settings.photo_cache_prefix.clone(),
        &shutdown,
    )
    .await
    .context("gateway.redis_url")?;
    let gateway = Arc::new(Gateway {
        settings: gateway_settings,
        sessions,
        auth,
        ingress,
        pool,
        flows,
        shutdown: shutdown.clone(),
        console,
        photos,
    });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on gateway.listen {listen}"))?;
    let address = listener.local_addr()?;
    let scheme = if acceptor.is_some() { "https" } else { "http" };
    tracing::info!(%address, scheme, topics = ?gateway.settings.topics, "gateway listening");
    tokio::spawn(metrics::subscription_gauges(
        gateway.clone(),
        shutdown.clone(),
    ));
    let app = router(gateway.clone());
    let stopping = shutdown.clone();
    let graceful = async move { stopping.cancelled().await };
    let task = tokio::spawn(async move {
        let served = async {
            match acceptor {
                Some(acceptor) => {
                    let listener = tls::TlsListener::new(listener, acceptor, shutdown.clone());
                    axum::serve(listener, app)
                        .with_graceful_shutdown(graceful)
                        .await
                }
                None => {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(graceful)
                        .await
                }
            }
        };
        tokio::select! {
            served = served => served.context("gateway listener")?,
            read = reader => {
                // The live reader only ends with shutdown; anything else is fatal.
                read.context("live reader")?.context("live reader")?;
            }
        }
        Ok(())
    });
    Ok(RunningGateway { address, task })
}

/// Runs the gateway until `shutdown`.
pub async fn run(
    settings: &Settings,
    gateway_settings: GatewaySettings,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let running = start(settings, gateway_settings, readiness, shutdown.clone()).await?;
    println!("gateway listening on {}", running.address);
    let result = running.task.await.context("gateway")?;
    println!("gateway stopped");
    result
}

/// Connects to PostgreSQL, waiting while it is unreachable.
async fn connect_postgres(url: &str, shutdown: &CancellationToken) -> anyhow::Result<PgPool> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match PgPoolOptions::new()
            .max_connections(POOL_CONNECTIONS)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await
        {
            Ok(pool) => return Ok(pool),
            Err(error @ (sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut)) => {
                let delay = backoff.next_delay(rand::random());
                tracing::warn!(%error, url = redact_url(url), delay_ms = delay.as_millis() as u64, "waiting for PostgreSQL");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => anyhow::bail!("stopped while waiting for PostgreSQL"),
                }
            }
            Err(error) => {
                return Err(error).with_context(|| format!("PostgreSQL at {}", redact_url(url)))
            }
        }
    }
}
