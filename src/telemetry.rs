//! Telemetry: the tracing subscriber (text or JSON lines) and the HTTP endpoint serving
//! Prometheus `/metrics`, liveness `/health` and readiness `/ready` for every long-running stage.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, TelemetrySettings};

/// Latency buckets in seconds: fine below 20 ms (the latency target), coarse above.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// An aggregate waits for its window to close (interval, allowed lateness): seconds to minutes.
const WINDOW_LATENCY_BUCKETS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// Installs the global tracing subscriber; logs go to stderr so stdout stays for command output.
pub fn init_tracing(settings: &TelemetrySettings) {
    let filter = EnvFilter::try_new(&settings.log_filter).unwrap_or_else(|error| {
        eprintln!(
            "warning: invalid log filter {:?} ({error}); using info",
            settings.log_filter
        );
        EnvFilter::new("info")
    });
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour only for people: log files and collectors get plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // try_init: tests may install a subscriber more than once in one process.
    let _ = match settings.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Named readiness checks (for example `kafka`, `elasticsearch`); `/ready` is 200 when all pass.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Arc<Mutex<BTreeMap<&'static str, bool>>>,
}

impl Readiness {
    /// Declares a check, initially failing, that the stage flips when its dependency answers.
    pub fn register(&self, name: &'static str) {
        self.lock().entry(name).or_insert(false);
    }

    pub fn set(&self, name: &'static str, ready: bool) {
        self.lock().insert(name, ready);
    }

    pub fn is_ready(&self) -> bool {
        let checks = self.lock();
        !checks.is_empty() && checks.values().all(|ok| *ok)
    }

    fn report(&self) -> String {
        let checks = self.lock();
        serde_json::to_string(&*checks).unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, bool>> {
        // A poisoned lock only means a panic elsewhere; the map itself is still consistent.
        self.checks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Installs the global Prometheus recorder (once per process) and returns its handle.
pub fn install_metrics_recorder() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .expect("bucket list is non-empty")
                .set_buckets_for_metric(
                    Matcher::Full("eventpipe_aggregate_end_to_end_seconds".into()),
                    WINDOW_LATENCY_BUCKETS,
                )
                .expect("bucket list is non-empty")
                .install_recorder()
                .expect("the metrics recorder is installed once per process")
        })
        .clone()
}

/// Binds the telemetry endpoint and serves it until `shutdown`; returns the bound address.
/// `/metrics` is the recorder's metrics followed by `more_metrics()` (metrics kept outside the
/// recorder, in Prometheus text format: the stage runtime's consumer lag).
pub async fn serve(
    address: SocketAddr,
    readiness: Readiness,
    more_metrics: fn() -> String,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let handle = install_metrics_recorder();
    let listener = tokio::net::TcpListener::bind(address).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on telemetry.metrics_address {address}: {e}"),
        )
    })?;
    let bound = listener.local_addr()?;

    let upkeep = handle.clone();
    let upkeep_shutdown = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = upkeep_shutdown.cancelled() => break,
                _ = tick.tick() => upkeep.run_upkeep(),
            }
        }
    });

    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let mut text = handle.render();
                text.push_str(&more_metrics());
                std::future::ready(text)
            }),
        )
        .route("/health", get(|| async { "ok\n" }))
        .route(
            "/ready",
            get(move || {
                let ready = readiness.is_ready();
                let body = readiness.report();
                async move {
                    let status = if ready {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    (status, body)
                }
            }),
        );
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "telemetry endpoint stopped");
        }
    });
    tracing::info!(address = %bound, "serving /metrics, /health and /ready");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_every_registered_check() {
        let readiness = Readiness::default();
        assert!(
            !readiness.is_ready(),
            "no checks registered yet means not ready"
        );
        readiness.register("kafka");
        readiness.register("elasticsearch");
        readiness.set("kafka", true);
        assert!(!readiness.is_ready());
        readiness.set("elasticsearch", true);
        assert!(readiness.is_ready());
        assert_eq!(readiness.report(), r#"{"elasticsearch":true,"kafka":true}"#);
    }
}
