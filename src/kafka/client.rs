//! Builds librdkafka clients from settings: eventpipe's safe defaults per client kind, then the
//! user's pass-through properties; a context that routes librdkafka logs into `tracing`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::consumer::ConsumerContext;
use rdkafka::metadata::Metadata;
use rdkafka::producer::ProducerContext;

use crate::config::KafkaSettings;

/// Failures talking to Kafka, phrased for the operator who must fix a setting.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error(
        "cannot reach Kafka at {servers} (KAFKA_BOOTSTRAP_SERVERS) within {timeout:?}: {reason}"
    )]
    Unreachable {
        servers: String,
        timeout: Duration,
        reason: String,
    },
    #[error("topic {topic:?} does not exist on {servers} (create it with `eventpipe topics apply`, or check the topic setting)")]
    MissingTopic { topic: String, servers: String },
    #[error("invalid Kafka client configuration: {0} (check kafka.properties / -X)")]
    Config(String),
    #[error("kafka: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
}

/// What a client is for; each kind gets defaults suited to eventpipe's delivery guarantees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    /// Idempotent, acks=all: no loss and no duplicates from producer retries.
    Producer,
    /// Manual offset store: offsets are stored only after the output is acknowledged.
    Consumer,
    Admin,
}

/// Assembles the librdkafka configuration: eventpipe's defaults first, user properties last.
pub fn client_config(settings: &KafkaSettings, kind: ClientKind) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &settings.bootstrap_servers);
    config.set("client.id", "eventpipe");
    // TCP_NODELAY, as the Java client does: Nagle's algorithm holds small requests back and
    // shows up as tens of milliseconds in the latency tail.
    config.set("socket.nagle.disable", "true");
    match kind {
        ClientKind::Producer => {
            config
                .set("enable.idempotence", "true")
                .set("acks", "all")
                // 1 ms: batches still form under load (measured: no throughput loss against
                // 5 ms), and the median latency halves (BENCHMARKS.md).
                .set("linger.ms", "1")
                .set("compression.type", "lz4")
                .set("message.timeout.ms", "300000");
        }
        ClientKind::Consumer => {
            config
                // Stages commit acknowledged offsets themselves (stage::commit): never a
                // librdkafka auto-commit of offsets whose outputs are still in flight.
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                .set("auto.offset.reset", "earliest")
                // Bounded prefetch: backpressure instead of an unbounded in-memory backlog.
                .set("queued.max.messages.kbytes", "65536");
        }
        ClientKind::Admin => {}
    }
    for (key, value) in &settings.properties {
        config.set(key, value);
    }
    config
}

/// Creates any librdkafka client with the logging context, mapping config errors to one line.
/// Keep a clone of `context` to ask it about connection state later.
pub fn create_client<C, X>(
    settings: &KafkaSettings,
    kind: ClientKind,
    context: X,
) -> Result<C, KafkaError>
where
    X: ClientContext,
    C: FromClientConfigAndContext<X>,
{
    client_config(settings, kind)
        .create_with_context(context)
        .map_err(|e| match e {
            rdkafka::error::KafkaError::ClientConfig(_, desc, key, value) => {
                KafkaError::Config(format!("{key}={value}: {desc}"))
            }
            other => KafkaError::Client(other),
        })
}

/// Routes librdkafka's logs and errors into `tracing`. Until the first successful metadata
/// request, transport errors are only debug: `wait_for_broker` turns them into one clear error.
/// Cheap to clone: clones share one state.
#[derive(Clone, Default)]
pub struct PipelineContext {
    state: Arc<ContextState>,
}

#[derive(Default)]
struct ContextState {
    connected: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl PipelineContext {
    pub fn mark_connected(&self) {
        self.state.connected.store(true, Ordering::Relaxed);
    }

    pub fn is_connected(&self) -> bool {
        self.state.connected.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.state.last_error.lock().ok().and_then(|e| e.clone())
    }
}

impl ClientContext for PipelineContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        let connected = self.is_connected();
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
                if connected =>
            {
                tracing::error!(target: "librdkafka", facility, "{message}")
            }
            RDKafkaLogLevel::Warning if connected => {
                tracing::warn!(target: "librdkafka", facility, "{message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", facility, "{message}")
            }
            _ => tracing::debug!(target: "librdkafka", facility, "{message}"),
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        // The end of a partition, asked for with `enable.partition.eof`: news, not an error.
        if error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF) {
            return;
        }
        if let Ok(mut last) = self.state.last_error.lock() {
            *last = Some(reason.to_string());
        }
        if self.is_connected() {
            tracing::warn!(target: "librdkafka", %error, reason, "kafka client error");
        } else {
            tracing::debug!(target: "librdkafka", %error, reason, "kafka client error before connecting");
        }
    }
}

/// `ClientContext` for a producer context that logs as its `log: PipelineContext` field does
/// (the contexts that also count or route delivery reports).
macro_rules! logs_through_pipeline_context {
    ($context:ty) => {
        impl rdkafka::client::ClientContext for $context {
            fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
                rdkafka::client::ClientContext::log(&self.log, level, facility, message);
            }
            fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
                rdkafka::client::ClientContext::error(&self.log, error, reason);
            }
        }
    };
}
pub(crate) use logs_through_pipeline_context;

impl ProducerContext for PipelineContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

impl ConsumerContext for PipelineContext {}

/// Fetches cluster metadata (all topics) within the configured bound, or says why not.
/// Blocking: call it at start-up, before the client is handed to async work.
pub fn wait_for_broker<C: ClientContext>(
    client: &rdkafka::client::Client<C>,
    context: &PipelineContext,
    settings: &KafkaSettings,
) -> Result<Metadata, KafkaError> {
    let timeout = settings.connect_timeout;
    match client.fetch_metadata(None, timeout) {
        Ok(metadata) => {
            context.mark_connected();
            Ok(metadata)
        }
        Err(error) => Err(KafkaError::Unreachable {
            servers: settings.bootstrap_servers.clone(),
            timeout,
            reason: context.last_error().unwrap_or_else(|| error.to_string()),
        }),
    }
}

/// Fails with `MissingTopic` unless every topic exists in `metadata`.
pub fn require_topics(
    metadata: &Metadata,
    topics: &[&str],
    settings: &KafkaSettings,
) -> Result<(), KafkaError> {
    for topic in topics {
        let exists = metadata
            .topics()
            .iter()
            .any(|t| t.name() == *topic && t.error().is_none() && !t.partitions().is_empty());
        if !exists {
            return Err(KafkaError::MissingTopic {
                topic: topic.to_string(),
                servers: settings.bootstrap_servers.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn user_properties_override_defaults() {
        let settings = KafkaSettings {
            bootstrap_servers: "h:1".into(),
            properties: BTreeMap::from([("linger.ms".to_string(), "50".to_string())]),
            connect_timeout: Duration::from_secs(1),
        };
        let producer = client_config(&settings, ClientKind::Producer);
        assert_eq!(producer.get("linger.ms"), Some("50"));
        assert_eq!(producer.get("enable.idempotence"), Some("true"));
        let consumer = client_config(&settings, ClientKind::Consumer);
        assert_eq!(consumer.get("enable.auto.commit"), Some("false"));
        assert_eq!(consumer.get("bootstrap.servers"), Some("h:1"));
    }
}
