//! The dispatcher as a stage of the runtime: decode (JSON or Avro), route through the handler
//! registry, encode the outputs; the runtime produces them at least once or exactly once.

use std::time::Instant;

use super::metrics::LoopMetrics;
use super::transform::{Disposition, InputRecord, OutputRecord, Transformer};
use crate::codec::{available, Codec, Format, RecordError};
use crate::envelope::now_timestamp;
use crate::flows::hold::Decision;
use crate::flows::{FlowError, FlowGate};
use crate::stage::{Handled, PartitionId, Record, Stage, StageError};

/// What a dispatcher run did, for the caller's summary line.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DispatchSummary {
    pub consumed: u64,
    pub routed: u64,
    pub dead_lettered: u64,
    /// Held by a pause (left in Kafka, routed when it resumes).
    pub held: u64,
}

/// The dispatcher's logic; the loop around it is the stage runtime's.
pub struct DispatchStage {
    pub transformer: Transformer,
    pub summary: DispatchSummary,
    metrics: LoopMetrics,
    /// Flow control, when the dispatcher obeys pauses.
    flows: Option<FlowGate>,
}

impl DispatchStage {
    pub fn new(transformer: Transformer) -> DispatchStage {
        DispatchStage {
            transformer,
            summary: DispatchSummary::default(),
            metrics: LoopMetrics::default(),
            flows: None,
        }
    }

    pub fn with_flows(self, flows: Option<FlowGate>) -> DispatchStage {
        DispatchStage { flows, ..self }
    }
}

/// Flow control's database, as the runtime sees a dependency that is down.
fn flows_unavailable(error: FlowError) -> StageError {
    StageError::Unavailable {
        dependency: "flow_control",
        reason: error.to_string(),
    }
}

impl Stage for DispatchStage {
    async fn handle(&mut self, record: &Record<'_>) -> Result<Handled, StageError> {
        if let Some(gate) = self.flows.as_mut().filter(|g| !g.is_idle()) {
            match gate.decide(record).await.map_err(flows_unavailable)? {
                Decision::Deliver => {}
                decision @ Decision::Release(_) => self.metrics.flow(decision),
                decision @ (Decision::Hold(_) | Decision::Skip) => {
                    if let Decision::Hold(_) = decision {
                        self.summary.held += 1;
                    }
                    self.metrics.flow(decision);
                    return Ok(Handled::Outputs(Vec::new()));
                }
            }
        }
        let codecs = &self.transformer.codecs;
        let decoded = available(
            "dispatch",
            codecs.input.decode(record.topic, record.payload).await,
        )?;
        self.summary.consumed += 1;
        self.metrics.consumed(record.topic);
        let started = Instant::now();
        let disposition = match &decoded {
            Ok(payload) => self.transformer.transform(
                &InputRecord {
                    record,
                    payload: payload.as_ref(),
                },
                &now_timestamp(),
            ),
            Err(error) => self.transformer.dead_letter(error.kind, &error.reason),
        };
        let disposition = match disposition {
            Disposition::Routed { action, outputs } => {
                match encode_outputs(outputs, &codecs.output).await? {
                    Ok(outputs) => Disposition::Routed { action, outputs },
                    Err(error) => self.transformer.dead_letter(error.kind, &error.reason),
                }
            }
            dead_letter => dead_letter,
        };
        Ok(match disposition {
            Disposition::Routed { action, outputs } => {
                self.metrics
                    .handler_seconds(&action, started.elapsed().as_secs_f64());
                self.summary.routed += 1;
                Handled::Outputs(outputs)
            }
            Disposition::DeadLetter(dead_letter) => {
                tracing::debug!(
                    kind = dead_letter.kind,
                    topic = %record.topic,
                    partition = record.partition,
                    offset = record.offset,
                    "dead-lettering"
                );
                self.metrics.dead_lettered(record.topic, dead_letter.kind);
                self.summary.dead_lettered += 1;
                Handled::DeadLetter(dead_letter)
            }
        })
    }

    async fn tick(&mut self) -> Result<(), StageError> {
        if let Some(gate) = self.flows.as_mut() {
            gate.tick().await;
        }
        Ok(())
    }

    fn rewinds(&mut self) -> Vec<PartitionId> {
        self.flows
            .as_ref()
            .map(FlowGate::rewinds)
            .unwrap_or_default()
    }

    async fn rewind_from(
        &mut self,
        partition: &PartitionId,
        position: i64,
    ) -> Result<Option<i64>, StageError> {
        match self.flows.as_mut() {
            Some(gate) => gate
                .rewind_from(partition, position)
                .await
                .map_err(flows_unavailable),
            None => Ok(None),
        }
    }
}

/// Outputs in their topics' formats (JSON outputs untouched); an output that does not fit its
/// schema fails the whole input, which is then dead-lettered.
async fn encode_outputs(
    mut outputs: Vec<OutputRecord>,
    codec: &Codec,
) -> Result<Result<Vec<OutputRecord>, RecordError>, StageError> {
    for output in &mut outputs {
        if codec.settings().output_format(&output.topic) == Format::Json {
            continue;
        }
        match available(
            "dispatch",
            codec.encode(&output.topic, output.value.clone()).await,
        )? {
            Ok(value) => output.value = value,
            Err(error) => return Ok(Err(error)),
        }
    }
    Ok(Ok(outputs))
}
