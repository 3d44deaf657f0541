//! `eventpipe dispatch`: consumes the services' input topics, routes each envelope by action
//! through the handler registry, and emits enriched envelopes, at least once, with dead letters.

pub mod handlers;
pub mod metrics;
pub mod pipeline;
pub mod registry;
pub mod routes;
pub mod transactional;
pub mod transform;

use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, DispatchSettings, KafkaSettings};
use crate::telemetry::Readiness;
pub use pipeline::{DispatchError, DispatchSummary};
use registry::HandlerRegistry;
use transform::{DispatchCodecs, Transformer};

use crate::codec;

/// Loads the routes, binds handlers from `registry`, and runs until `shutdown`.
pub async fn run(
    kafka: &KafkaSettings,
    settings: &DispatchSettings,
    codecs: DispatchCodecs,
    registry: &HandlerRegistry,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<DispatchSummary> {
    let invalid_routes = |reason: String| ConfigError::File {
        path: settings.routes_file.clone(),
        reason,
    };
    metrics::describe();
    crate::codec::describe_metrics("dispatch");
    let routes = routes::load(&settings.routes_file).map_err(|e| invalid_routes(e.reason))?;
    let router = registry.build(&routes).map_err(invalid_routes)?;
    // A missing writer-schema registration shows at start-up, not at the first record.
    let outputs = router.output_topics().to_vec();
    match codec::until_available("dispatch", &shutdown, || {
        codecs.output.prepare_outputs(&outputs)
    })
    .await
    {
        Some(Ok(())) => {}
        Some(Err(error)) => return Err(error.into()),
        None => return Ok(DispatchSummary::default()),
    }
    let transformer = Transformer {
        codecs,
        router,
        service: settings.service.clone(),
        dead_letter_suffix: settings.dead_letter_suffix.clone(),
        max_envelope_bytes: settings.max_envelope_bytes,
    };
    if settings.exactly_once {
        return Ok(transactional::run(
            kafka,
            &settings.input,
            &settings.group_id,
            &settings.transactional_id,
            transformer,
            readiness,
            shutdown,
        )
        .await?);
    }
    Ok(pipeline::run(
        kafka,
        &settings.input,
        &settings.group_id,
        settings.drain_timeout,
        transformer,
        readiness,
        shutdown,
    )
    .await?)
}
