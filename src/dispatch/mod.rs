//! `eventpipe dispatch`: consumes the services' input topics, routes each envelope by action
//! through the handler registry, and emits enriched envelopes, at least once, with dead letters.

pub mod handler;
pub mod handlers;
pub mod metrics;
pub mod pipeline;
pub mod registry;
pub mod routes;
pub mod settings;
pub mod transform;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::KafkaSettings;
use crate::flows::gate::{Assignment, FlowHooks};
use crate::flows::{FlowGate, FlowStore, Scope};
use crate::settings::ConfigError;
use crate::stage::{
    DeadLetterTopic, InputTopics, NoHooks, OffsetPolicy, PartitionHooks, StageSpec,
};
use crate::telemetry::Readiness;
pub use pipeline::{DispatchStage, DispatchSummary};
use registry::HandlerRegistry;
pub use settings::{DispatchArgs, DispatchSettings};
use transform::{DispatchCodecs, Transformer};

use crate::codec;

/// How often acknowledged offsets are committed (at least once).
const COMMIT_INTERVAL: Duration = Duration::from_millis(100);
/// Exactly once: a transaction closes after this many inputs or this much time, whichever comes
/// first; larger batches amortise the commit, smaller ones bound latency and re-work after an abort.
const TRANSACTION_MAX_INPUTS: usize = 10_000;
const TRANSACTION_MAX_TIME: Duration = Duration::from_millis(100);

/// Loads the routes, binds handlers from `registry`, and runs until `shutdown`; with
/// `settings.flows`, obeys the pauses kept in PostgreSQL at `postgres_url`.
pub async fn run(
    kafka: &KafkaSettings,
    settings: &DispatchSettings,
    postgres_url: &str,
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
        max_envelope_bytes: settings.max_envelope_bytes,
    };
    let spec = stage_spec(kafka, settings, &transformer);
    tracing::info!(actions = ?transformer.router.actions(), exactly_once = settings.exactly_once, "dispatching");
    let (gate, hooks) = match settings.flows {
        true => {
            let (gate, hooks) = flow_gate(settings, postgres_url, &shutdown).await?;
            (Some(gate), hooks)
        }
        false => (None, Arc::new(NoHooks) as Arc<dyn PartitionHooks>),
    };
    let stage = crate::stage::run(kafka, spec, hooks, readiness, shutdown, |_| {
        DispatchStage::new(transformer).with_flows(gate)
    })
    .await?;
    let summary = stage.summary;
    tracing::info!(
        consumed = summary.consumed,
        routed = summary.routed,
        dead_lettered = summary.dead_lettered,
        "dispatcher stopped"
    );
    Ok(summary)
}

/// The dispatcher's flow control: its consumer group is the holder, pauses of scope `dispatch`
/// and `all` apply; the pauses are read before the first record.
async fn flow_gate(
    settings: &DispatchSettings,
    postgres_url: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<(FlowGate, Arc<dyn PartitionHooks>)> {
    let store = FlowStore::connect(postgres_url, 4).await?;
    let view = crate::flows::watch::start(store.clone(), shutdown.clone()).await?;
    let assignment = Arc::new(Assignment::default());
    let gate = FlowGate::new(
        store,
        settings.group_id.clone(),
        Scope::covers_dispatch,
        view,
        assignment.clone(),
    );
    tracing::info!(
        group_id = settings.group_id,
        "obeying flow control's pauses"
    );
    Ok((gate, Arc::new(FlowHooks(assignment))))
}

/// The dispatcher as the runtime sees it.
pub fn stage_spec(
    kafka: &KafkaSettings,
    settings: &DispatchSettings,
    transformer: &Transformer,
) -> StageSpec {
    let dead_letters = DeadLetterTopic::Suffix(settings.dead_letter_suffix.clone());
    // Every route's outputs and, for named inputs, the inputs and their dead-letter topics.
    // (A pattern's matches are not known in advance.)
    let mut required = transformer.router.output_topics().to_vec();
    if let InputTopics::Names(names) = &settings.input {
        for name in names {
            required.push(name.clone());
            required.push(dead_letters.for_input(name));
        }
    }
    let policy = if settings.exactly_once {
        OffsetPolicy::Transactional {
            transactional_id: settings.transactional_id.clone(),
            batch_size: TRANSACTION_MAX_INPUTS,
            batch_time: TRANSACTION_MAX_TIME,
        }
    } else {
        OffsetPolicy::AckedPrefix
    };
    StageSpec {
        name: "dispatch",
        inputs: settings.input.clone(),
        group_id: settings.group_id.clone(),
        required_topics: required,
        dead_letters,
        policy,
        drain_timeout: settings.drain_timeout,
        tick: COMMIT_INTERVAL,
        max_record_bytes: kafka.max_record_bytes(),
    }
}
