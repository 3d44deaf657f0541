//! The schema registry (Confluent-compatible API) through schema_registry_converter: schemas by
//! id (cached forever, ids are immutable), subject lookups, registration and compatibility.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use apache_avro::Schema;
use schema_registry_converter::async_impl::schema_registry::{
    get_all_versions, get_schema_by_id, get_schema_by_subject_and_version, is_compatible_schema,
    perform_sr_call, post_schema, SrSettings,
};
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{SchemaType, SrCall, SuppliedSchema};

/// How long one registry call may take before it counts as the registry being unavailable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RegistryError {
    /// Unreachable, timing out or answering 5xx: worth waiting for, never a record's fault.
    #[error("schema registry unavailable: {0}")]
    Unavailable(String),
    #[error("schema id {0} is not in the registry")]
    UnknownSchemaId(u32),
    #[error("subject {subject} has no version with this schema; run `eventpipe schemas register`")]
    NotRegistered { subject: String },
    #[error("schema id {id} is not a usable Avro schema: {reason}")]
    InvalidSchema { id: u32, reason: String },
    /// The registry answered with a refusal (e.g. 409 incompatible, 422 invalid).
    #[error("schema registry refused: {0}")]
    Refused(String),
}

impl RegistryError {
    fn from_src(error: SRCError) -> RegistryError {
        let text = error.to_string();
        if error.retriable || text.contains("status 5") {
            RegistryError::Unavailable(text)
        } else {
            RegistryError::Refused(text)
        }
    }

    fn is_not_found(error: &SRCError) -> bool {
        error.to_string().contains("status 404")
    }
}

/// A registry client with the schema-by-id cache every decoder shares.
pub struct Registry {
    settings: SrSettings,
    http: reqwest::Client,
    base_url: String,
    /// Leaked on purpose: ids are immutable and few, each fetched once and kept for the
    /// process's life, and `'static` lets decoders cache readers that borrow them.
    by_id: RwLock<HashMap<u32, &'static Schema>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("url", &self.base_url)
            .finish()
    }
}

impl Registry {
    pub fn new(url: &url::Url) -> Result<Registry, RegistryError> {
        let base_url = url.as_str().trim_end_matches('/').to_string();
        let settings = SrSettings::new_builder(base_url.clone())
            .set_timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| RegistryError::Refused(e.to_string()))?;
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| RegistryError::Refused(e.to_string()))?;
        Ok(Registry {
            settings,
            http,
            base_url,
            by_id: RwLock::new(HashMap::new()),
        })
    }

    pub fn url(&self) -> &str {
        &self.base_url
    }

    /// A schema already fetched: the hot path of decoding, no await.
    pub fn cached(&self, id: u32) -> Option<&'static Schema> {
        self.by_id
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .copied()
    }

    /// The writer schema of a record by the id in its framing.
    pub async fn schema_by_id(&self, id: u32) -> Result<&'static Schema, RegistryError> {
        if let Some(schema) = self.cached(id) {
            return Ok(schema);
        }
        let registered = get_schema_by_id(id, &self.settings).await.map_err(|e| {
            match RegistryError::is_not_found(&e) {
                true => RegistryError::UnknownSchemaId(id),
                false => RegistryError::from_src(e),
            }
        })?;
        if registered.schema_type != SchemaType::Avro {
            return Err(RegistryError::InvalidSchema {
                id,
                reason: format!("it is a {:?} schema", registered.schema_type),
            });
        }
        let schema =
            Schema::parse_str(&registered.schema).map_err(|e| RegistryError::InvalidSchema {
                id,
                reason: e.to_string(),
            })?;
        let mut by_id = self.by_id.write().unwrap_or_else(|e| e.into_inner());
        // Another task may have fetched it meanwhile: keep one copy per id.
        let schema: &'static Schema = by_id
            .entry(id)
            .or_insert_with(|| Box::leak(Box::new(schema)));
        Ok(schema)
    }

    /// The id of `schema` under `subject` if it is registered there (no registration).
    pub async fn lookup_id(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let body = serde_json::json!({ "schema": schema, "schemaType": "AVRO" }).to_string();
        match perform_sr_call(&self.settings, SrCall::PostForVersion(subject, &body)).await {
            Ok(raw) => raw.id.ok_or_else(|| {
                RegistryError::Refused(format!("no id in the lookup answer for {subject}"))
            }),
            Err(e) if RegistryError::is_not_found(&e) => Err(RegistryError::NotRegistered {
                subject: subject.to_string(),
            }),
            Err(e) => Err(RegistryError::from_src(e)),
        }
    }

    /// Registers `schema` under `subject` (idempotent: an existing version's id is returned).
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let supplied = SuppliedSchema::new(None, SchemaType::Avro, schema.to_string());
        post_schema(&self.settings, subject.to_string(), supplied)
            .await
            .map(|registered| registered.id)
            .map_err(RegistryError::from_src)
    }

    /// The registry's own verdict for `schema` against `subject` under its compatibility level.
    pub async fn is_compatible(&self, subject: &str, schema: &str) -> Result<bool, RegistryError> {
        let supplied = SuppliedSchema::new(None, SchemaType::Avro, schema.to_string());
        is_compatible_schema(&self.settings, subject.to_string(), supplied)
            .await
            .map_err(RegistryError::from_src)
    }

    /// Every version of `subject`, oldest first, as (version, schema text); empty if none.
    pub async fn versions(&self, subject: &str) -> Result<Vec<(u32, String)>, RegistryError> {
        let numbers = match get_all_versions(&self.settings, subject.to_string()).await {
            Ok(numbers) => numbers,
            Err(e) if RegistryError::is_not_found(&e) => return Ok(Vec::new()),
            Err(e) => return Err(RegistryError::from_src(e)),
        };
        let mut versions = Vec::with_capacity(numbers.len());
        for number in numbers {
            let registered =
                get_schema_by_subject_and_version(&self.settings, subject, Some(number))
                    .await
                    .map_err(RegistryError::from_src)?;
            versions.push((number, registered.schema));
        }
        Ok(versions)
    }

    /// The subject's compatibility level, falling back to the registry's global one.
    pub async fn compatibility_level(&self, subject: &str) -> Result<String, RegistryError> {
        for path in [format!("config/{subject}"), "config".to_string()] {
            let response = self
                .http
                .get(format!("{}/{path}", self.base_url))
                .send()
                .await
                .map_err(|e| RegistryError::Unavailable(e.to_string()))?;
            if response.status().as_u16() == 404 {
                continue;
            }
            let body: serde_json::Value = self.answer(response).await?;
            if let Some(level) = body
                .get("compatibilityLevel")
                .or_else(|| body.get("compatibility"))
                .and_then(|v| v.as_str())
            {
                return Ok(level.to_string());
            }
        }
        Ok("BACKWARD".into())
    }

    /// Sets the subject's compatibility level (BACKWARD, FULL, ...).
    pub async fn set_compatibility_level(
        &self,
        subject: &str,
        level: &str,
    ) -> Result<(), RegistryError> {
        let response = self
            .http
            .put(format!("{}/config/{subject}", self.base_url))
            .json(&serde_json::json!({ "compatibility": level }))
            .send()
            .await
            .map_err(|e| RegistryError::Unavailable(e.to_string()))?;
        self.answer::<serde_json::Value>(response).await.map(|_| ())
    }

    async fn answer<T: serde::de::DeserializeOwned>(
        &self,
        response: reqwest::Response,
    ) -> Result<T, RegistryError> {
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| RegistryError::Unavailable(e.to_string()))?;
        if status.is_server_error() {
            return Err(RegistryError::Unavailable(format!("{status}: {text}")));
        }
        if !status.is_success() {
            return Err(RegistryError::Refused(format!("{status}: {text}")));
        }
        serde_json::from_str(&text).map_err(|e| RegistryError::Refused(format!("{e}: {text}")))
    }
}
