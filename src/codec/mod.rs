//! Record formats on the wire, chosen per topic: `json` (what services send today) or `avro`
//! (Confluent framing: magic byte 0, 4-byte schema id, Avro body), against the schema registry.
//!
//! Stages process JSON; a codec sits at each edge, like a Kafka Connect converter: Avro input is
//! decoded with the writer's registered schema, resolved to the stage's reader schema (so any
//! registered version reads, new fields taking their defaults), and handed on as JSON; JSON
//! output is encoded with the stage's writer schema under `<topic>-value`. Dead letters keep the
//! original bytes. A record that cannot be decoded is the record's fault (dead-lettered with a
//! kind); a registry that cannot be reached is not (the stage waits and retries).

pub mod registry;
pub mod schemas;
pub mod subjects;
pub mod transcode;

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema::ResolvedSchema;
use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use tokio_util::sync::CancellationToken;

pub use crate::config::{CodecSettings, Format};
pub use registry::{Registry, RegistryError};
pub use schemas::{value_subject, SchemaName};

/// The Confluent wire format's first byte.
const MAGIC_BYTE: u8 = 0;
const HEADER_BYTES: usize = 5;
/// Waiting for the registry backs off up to this.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// A record's own defect: dead-letter it with `kind` (metric label and header) and `reason`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{reason}")]
pub struct RecordError {
    pub kind: &'static str,
    pub reason: String,
}

/// Why a record could not be decoded or encoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    /// The record's fault.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// The registry's fault: wait and retry, never dead-letter.
    #[error("{0}")]
    Unavailable(String),
}

fn record_error(kind: &'static str, reason: impl Into<String>) -> CodecError {
    CodecError::Record(RecordError {
        kind,
        reason: reason.into(),
    })
}

/// One stage's codec for one record type (its schema): decodes what it reads, encodes what it
/// writes. Cheap to clone; clones share the registry caches.
#[derive(Clone)]
pub struct Codec {
    settings: Arc<CodecSettings>,
    registry: Option<Arc<Registry>>,
    /// Names the schema in messages: `schemas/<stem>.avsc` for the built-in ones.
    label: Arc<str>,
    text: Arc<str>,
    schema: &'static Schema,
    /// Built once: building one resolves the schema's names, too slow to do per record.
    datum_writer: Arc<GenericDatumWriter<'static>>,
    /// Per writer schema id: how to read it (or why it cannot be read as `schema`).
    plans: Arc<Mutex<HashMap<u32, PlanOrReason>>>,
    /// Per output topic: the id of `schema` under the topic's subject.
    writer_ids: Arc<Mutex<HashMap<String, u32>>>,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec")
            .field("schema", &self.label)
            .field("settings", &self.settings)
            .finish()
    }
}

type PlanOrReason = Result<Arc<ReadPlan>, String>;

/// How to read records of one writer schema: a reader built once, and the reader schema's
/// names when the writer's schema differs (another version: resolution needed).
struct ReadPlan {
    writer: &'static Schema,
    datum_reader: GenericDatumReader<'static>,
    resolve_to: Option<ResolvedSchema<'static>>,
}

impl Codec {
    /// `registry` may be `None` only when no topic is Avro.
    pub fn new(
        settings: Arc<CodecSettings>,
        registry: Option<Arc<Registry>>,
        schema_name: SchemaName,
    ) -> Codec {
        Codec::build(
            settings,
            registry,
            format!("schemas/{}.avsc", schema_name.file_stem()).into(),
            schema_name.text().into(),
            schema_name.parsed(),
        )
        .expect("the built-in schemas build writers (unit-tested)")
    }

    fn build(
        settings: Arc<CodecSettings>,
        registry: Option<Arc<Registry>>,
        label: Arc<str>,
        text: Arc<str>,
        schema: &'static Schema,
    ) -> Result<Codec, apache_avro::Error> {
        Ok(Codec {
            settings,
            registry,
            label,
            text,
            schema,
            // Values are built by walking the schema (transcode::json_bytes_to_avro), so the writer's
            // own validation pass would only repeat that walk.
            datum_writer: Arc::new(
                GenericDatumWriter::builder(schema)
                    .validate(false)
                    .build()?,
            ),
            plans: Arc::default(),
            writer_ids: Arc::default(),
        })
    }

    /// A codec for another schema (another version of a built-in one, say); `label` names it
    /// in messages.
    pub fn with_schema(
        settings: Arc<CodecSettings>,
        registry: Option<Arc<Registry>>,
        label: &str,
        text: &str,
    ) -> Result<Codec, apache_avro::Error> {
        // Leaked like registry schemas: a few per process (other versions, in tools and tests).
        let schema: &'static Schema = Box::leak(Box::new(Schema::parse_str(text)?));
        Codec::build(settings, registry, label.into(), text.into(), schema)
    }

    /// The one codec of a tool or stage that needs one: formats and registry from `settings`.
    pub fn from_settings(
        settings: &crate::config::Settings,
        schema_name: SchemaName,
    ) -> Result<Codec, RegistryError> {
        let (formats, registry) = shared(settings)?;
        Ok(Codec::new(formats, registry, schema_name))
    }

    /// A JSON-only codec (tests, tools that never see Avro).
    pub fn json(schema_name: SchemaName) -> Codec {
        Codec::new(Arc::new(CodecSettings::default()), None, schema_name)
    }

    pub fn settings(&self) -> &CodecSettings {
        &self.settings
    }

    fn registry(&self) -> Result<&Registry, CodecError> {
        self.registry
            .as_deref()
            .ok_or_else(|| CodecError::Unavailable("no schema registry configured".into()))
    }

    /// A consumed record's value as JSON bytes (borrowed as-is for JSON topics).
    pub async fn decode<'a>(
        &self,
        topic: &str,
        bytes: &'a [u8],
    ) -> Result<Cow<'a, [u8]>, CodecError> {
        if self.settings.input_format(topic) == Format::Json {
            return Ok(Cow::Borrowed(bytes));
        }
        let (id, body) = split_frame(bytes)?;
        let writer = writer_schema(self.registry()?, id).await?;
        let plan = self.plan(id, writer)?;
        let written = read_body(&plan.datum_reader, plan.writer, body, id)?;
        let value = match &plan.resolve_to {
            None => written,
            Some(names) => written
                .resolve_with_names(self.schema, names.get_names())
                .map_err(|e| {
                    record_error(
                        "avro_incompatible_schema",
                        format!(
                            "writer schema id {id} does not resolve to {}: {e}",
                            self.label
                        ),
                    )
                })?,
        };
        let json = transcode::avro_to_json_bytes(&value, self.schema)
            .map_err(|e| record_error("avro_body", e.to_string()))?;
        Ok(Cow::Owned(json))
    }

    /// The cached way to read `writer`'s records as `schema`, or why they cannot be.
    fn plan(&self, id: u32, writer: &'static Schema) -> Result<Arc<ReadPlan>, CodecError> {
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        let plan = plans.entry(id).or_insert_with(|| {
            SchemaCompatibility::can_read(writer, self.schema).map_err(|e| e.to_string())?;
            let same = writer.canonical_form() == self.schema.canonical_form();
            Ok(Arc::new(ReadPlan {
                writer,
                datum_reader: GenericDatumReader::builder(writer)
                    .build()
                    .map_err(|e| e.to_string())?,
                resolve_to: if same {
                    None
                } else {
                    Some(ResolvedSchema::try_from(self.schema).map_err(|e| e.to_string())?)
                },
            }))
        });
        plan.clone().map_err(|reason| {
            record_error(
                "avro_incompatible_schema",
                format!(
                    "writer schema id {id} cannot be read as {}: {reason}",
                    self.label
                ),
            )
        })
    }

    /// A JSON value the stage built, in `topic`'s format.
    pub async fn encode(&self, topic: &str, json: Vec<u8>) -> Result<Vec<u8>, CodecError> {
        if self.settings.output_format(topic) == Format::Json {
            return Ok(json);
        }
        let id = self.writer_id(topic).await?;
        let avro = transcode::json_bytes_to_avro(&json, self.schema).map_err(|e| {
            record_error(
                "avro_encode",
                format!("output does not fit {}: {e}", self.label),
            )
        })?;
        let mut framed = Vec::with_capacity(HEADER_BYTES + json.len());
        framed.push(MAGIC_BYTE);
        framed.extend_from_slice(&id.to_be_bytes());
        self.datum_writer
            .write_value(&mut framed, avro)
            .map_err(|e| record_error("avro_encode", e.to_string()))?;
        Ok(framed)
    }

    async fn writer_id(&self, topic: &str) -> Result<u32, CodecError> {
        if let Some(id) = self
            .writer_ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(topic)
        {
            return Ok(*id);
        }
        let registry = self.registry()?;
        let subject = value_subject(topic);
        let text = &*self.text;
        let id = match registry.lookup_id(&subject, text).await {
            Ok(id) => id,
            Err(RegistryError::NotRegistered { .. }) if self.settings.auto_register => registry
                .register(&subject, text)
                .await
                .map_err(|e| CodecError::Unavailable(e.to_string()))?,
            // A missing registration is configuration, not the record's fault: wait (loudly)
            // until someone runs `eventpipe schemas register`.
            Err(e) => return Err(CodecError::Unavailable(e.to_string())),
        };
        self.writer_ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(topic.to_string(), id);
        Ok(id)
    }

    /// Resolves what every output topic needs (its writer schema id) before work starts, so a
    /// missing registration is reported at start-up rather than at the first record.
    pub async fn prepare_outputs(&self, topics: &[String]) -> Result<(), CodecError> {
        for topic in topics {
            if self.settings.output_format(topic) == Format::Avro {
                self.writer_id(topic).await?;
            }
        }
        Ok(())
    }
}

/// A Confluent-framed Avro record as JSON, read with its own writer schema (no reader schema:
/// for tools that show whatever a topic holds); the schema id with it.
pub async fn decode_with_writer_schema(
    registry: &Registry,
    bytes: &[u8],
) -> Result<(u32, serde_json::Value), CodecError> {
    let (id, body) = split_frame(bytes)?;
    let writer = writer_schema(registry, id).await?;
    let reader = GenericDatumReader::builder(writer)
        .build()
        .map_err(|e| record_error("avro_unknown_schema", e.to_string()))?;
    let value = read_body(&reader, writer, body, id)?;
    let json = transcode::avro_to_json(&value, writer)
        .map_err(|e| record_error("avro_body", e.to_string()))?;
    Ok((id, json))
}

/// The schema id and the Avro body of a Confluent-framed record.
fn split_frame(bytes: &[u8]) -> Result<(u32, &[u8]), CodecError> {
    if bytes.len() < HEADER_BYTES {
        return Err(record_error(
            "avro_magic",
            format!(
                "record is {} bytes, shorter than the 5-byte Confluent Avro header",
                bytes.len()
            ),
        ));
    }
    if bytes[0] != MAGIC_BYTE {
        return Err(record_error(
            "avro_magic",
            format!(
                "first byte is {:#04x}, not the Confluent Avro magic byte 0x00",
                bytes[0]
            ),
        ));
    }
    let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    Ok((id, &bytes[HEADER_BYTES..]))
}

/// The writer schema of `id`: unknown or unusable ids are the record's fault, anything else
/// the registry's.
async fn writer_schema(registry: &Registry, id: u32) -> Result<&'static Schema, CodecError> {
    registry.schema_by_id(id).await.map_err(|e| match e {
        RegistryError::UnknownSchemaId(_) | RegistryError::InvalidSchema { .. } => {
            record_error("avro_unknown_schema", e.to_string())
        }
        other => CodecError::Unavailable(other.to_string()),
    })
}

/// Reads one body with its writer's schema: all of it, and nothing cut off.
fn read_body(
    reader: &GenericDatumReader<'_>,
    writer: &Schema,
    mut body: &[u8],
    id: u32,
) -> Result<apache_avro::types::Value, CodecError> {
    let written = reader.read_value(&mut body).map_err(|e| {
        record_error(
            "avro_body",
            format!("body does not match writer schema id {id}: {e}"),
        )
    })?;
    if !body.is_empty() {
        return Err(record_error(
            "avro_body",
            format!(
                "{} bytes left after the record of writer schema id {id}",
                body.len()
            ),
        ));
    }
    // apache-avro reads a string cut short by the end of the record as null instead of
    // failing: a truncated body would pass as a record with missing text.
    if let Some(path) = transcode::null_in_place_of_value(&written, writer) {
        return Err(record_error(
            "avro_body",
            format!("body is truncated: field `{path}` of writer schema id {id} is cut off"),
        ));
    }
    Ok(written)
}

/// Describes the codec's metric and starts it at zero for `stage`, so dashboards and alerts see
/// a series (0 = healthy) before the first failure.
pub fn describe_metrics(stage: &'static str) {
    metrics::describe_counter!(
        "eventpipe_schema_registry_errors_total",
        "Schema registry calls that failed because it was unreachable, timing out or answering 5xx (records wait, none are dead-lettered), by stage."
    );
    metrics::counter!("eventpipe_schema_registry_errors_total", "stage" => stage).absolute(0);
}

/// Runs `op` until it succeeds or fails for a reason other than the registry being
/// unavailable, backing off between attempts; `None` if shutdown came first.
/// A codec result in the stage runtime's terms: the registry being unavailable makes the runtime
/// hold the record and retry it (pausing consumption meanwhile); a record's own defect is
/// returned for the stage to dead-letter.
pub fn available<T>(
    stage: &'static str,
    result: Result<T, CodecError>,
) -> Result<Result<T, RecordError>, crate::stage::StageError> {
    match result {
        Ok(value) => Ok(Ok(value)),
        Err(CodecError::Record(error)) => Ok(Err(error)),
        Err(CodecError::Unavailable(reason)) => {
            metrics::counter!("eventpipe_schema_registry_errors_total", "stage" => stage)
                .increment(1);
            Err(crate::stage::StageError::Unavailable {
                dependency: "schema_registry",
                reason,
            })
        }
    }
}

pub async fn until_available<T, F, Fut>(
    stage: &'static str,
    shutdown: &CancellationToken,
    mut op: F,
) -> Option<Result<T, RecordError>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, CodecError>>,
{
    let mut delay = Duration::from_millis(100);
    let mut attempts = 0u64;
    loop {
        match op().await {
            Err(CodecError::Unavailable(reason)) => {
                attempts += 1;
                metrics::counter!("eventpipe_schema_registry_errors_total", "stage" => stage)
                    .increment(1);
                if attempts == 1 || attempts % 10 == 0 {
                    tracing::warn!(%reason, attempts, "schema registry unavailable; waiting");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(MAX_RETRY_DELAY);
            }
            Err(CodecError::Record(error)) => return Some(Err(error)),
            Ok(value) => return Some(Ok(value)),
        }
    }
}

/// A stage's formats and its registry client (if any topic is Avro), shared by its codecs so
/// they share the schema cache.
pub fn shared(
    settings: &crate::config::Settings,
) -> Result<(Arc<CodecSettings>, Option<Arc<Registry>>), RegistryError> {
    let registry = match settings.codec.uses_avro() {
        true => Some(Arc::new(Registry::new(&settings.schema_registry_url)?)),
        false => None,
    };
    Ok((Arc::new(settings.codec.clone()), registry))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn avro_settings() -> Arc<CodecSettings> {
        Arc::new(CodecSettings {
            input: Format::Avro,
            output: Format::Avro,
            ..CodecSettings::default()
        })
    }

    #[tokio::test]
    async fn json_topics_pass_bytes_through_untouched() {
        let codec = Codec::json(SchemaName::Envelope);
        let bytes = br#"{"anything": true}"#;
        assert!(matches!(
            codec.decode("t", bytes).await.unwrap(),
            Cow::Borrowed(_)
        ));
        assert_eq!(codec.encode("t", bytes.to_vec()).await.unwrap(), bytes);
    }

    #[tokio::test]
    async fn framing_defects_are_the_records_fault_without_asking_the_registry() {
        let codec = Codec::new(avro_settings(), None, SchemaName::Envelope);
        for bad in [&b"{\"a\":1}"[..], &[0, 0, 1][..]] {
            match codec.decode("t", bad).await {
                Err(CodecError::Record(e)) => assert_eq!(e.kind, "avro_magic"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn per_topic_formats_override_the_defaults() {
        let settings = CodecSettings {
            input: Format::Json,
            output: Format::Avro,
            topics: BTreeMap::from([("task_in".to_string(), Format::Avro)]),
            auto_register: false,
        };
        assert_eq!(settings.input_format("task_in"), Format::Avro);
        assert_eq!(settings.input_format("create_user_in"), Format::Json);
        assert_eq!(settings.output_format("info_in"), Format::Avro);
        assert!(settings.uses_avro());
        assert!(!CodecSettings::default().uses_avro());
        assert_eq!("AVRO".parse::<Format>(), Ok(Format::Avro));
        assert!("xml".parse::<Format>().is_err());
    }
}
