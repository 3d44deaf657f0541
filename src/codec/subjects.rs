//! `eventpipe schemas register|check`: each topic's `value_schema` (topics/topics.toml) against
//! its subject `<topic>-value`, compatibility checked first, with a message naming the field.

use std::path::{Path, PathBuf};

use apache_avro::error::CompatibilityError;
use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;

use super::registry::{Registry, RegistryError};
use super::schemas::value_subject;

/// Compatibility levels as the Confluent API names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compatibility {
    None,
    Backward,
    BackwardTransitive,
    Forward,
    ForwardTransitive,
    Full,
    FullTransitive,
}

impl std::str::FromStr for Compatibility {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        Ok(match text.trim().to_ascii_uppercase().as_str() {
            "NONE" => Compatibility::None,
            "BACKWARD" => Compatibility::Backward,
            "BACKWARD_TRANSITIVE" => Compatibility::BackwardTransitive,
            "FORWARD" => Compatibility::Forward,
            "FORWARD_TRANSITIVE" => Compatibility::ForwardTransitive,
            "FULL" => Compatibility::Full,
            "FULL_TRANSITIVE" => Compatibility::FullTransitive,
            other => return Err(format!("unknown compatibility level {other:?}")),
        })
    }
}

impl Compatibility {
    pub fn name(self) -> &'static str {
        match self {
            Compatibility::None => "NONE",
            Compatibility::Backward => "BACKWARD",
            Compatibility::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Compatibility::Forward => "FORWARD",
            Compatibility::ForwardTransitive => "FORWARD_TRANSITIVE",
            Compatibility::Full => "FULL",
            Compatibility::FullTransitive => "FULL_TRANSITIVE",
        }
    }

    fn transitive(self) -> bool {
        matches!(
            self,
            Compatibility::BackwardTransitive
                | Compatibility::ForwardTransitive
                | Compatibility::FullTransitive
        )
    }

    /// Whether new readers must read old data, and old readers new data.
    fn directions(self) -> (bool, bool) {
        match self {
            Compatibility::None => (false, false),
            Compatibility::Backward | Compatibility::BackwardTransitive => (true, false),
            Compatibility::Forward | Compatibility::ForwardTransitive => (false, true),
            Compatibility::Full | Compatibility::FullTransitive => (true, true),
        }
    }
}

/// Why `candidate` may not follow the registered `versions` (oldest first) under `level`;
/// `None` when it may. The reason names the field, e.g. `Field 'trace_id' in reader schema
/// must have a default value`, and the direction that breaks.
pub fn incompatibility(
    candidate: &Schema,
    versions: &[(u32, Schema)],
    level: Compatibility,
) -> Option<String> {
    let (backward, forward) = level.directions();
    let checked: &[(u32, Schema)] = match (level.transitive(), versions.split_last()) {
        (_, None) => return None,
        (true, Some(_)) => versions,
        (false, Some((last, _))) => std::slice::from_ref(last),
    };
    for (version, existing) in checked.iter().rev() {
        if backward {
            if let Err(e) = SchemaCompatibility::can_read(existing, candidate) {
                return Some(format!(
                    "readers of the new schema cannot read records written with version {version}: {}",
                    describe(&e)
                ));
            }
        }
        if forward {
            if let Err(e) = SchemaCompatibility::can_read(candidate, existing) {
                return Some(format!(
                    "readers of version {version} cannot read records written with the new schema: {}",
                    describe(&e)
                ));
            }
        }
    }
    None
}

/// A compatibility error as one line naming the field by its full path (`payload.trace_id`).
fn describe(error: &CompatibilityError) -> String {
    describe_at(error, "")
}

fn describe_at(error: &CompatibilityError, path: &str) -> String {
    let join = |name: &str| match path {
        "" => name.to_string(),
        _ => format!("{path}.{name}"),
    };
    match error {
        CompatibilityError::FieldTypeMismatch(name, inner) => describe_at(inner, &join(name)),
        CompatibilityError::MissingDefaultValue(name) => format!(
            "field `{}` is not in those records and has no default",
            join(name)
        ),
        other if path.is_empty() => other.to_string(),
        other => format!("field `{path}`: {other}"),
    }
}

/// What became of one subject.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Already registered as version `version`.
    Unchanged {
        version: u32,
    },
    /// Compatible; `check` stops here.
    Compatible,
    Registered {
        id: u32,
    },
    Incompatible {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct SubjectReport {
    pub subject: String,
    pub file: PathBuf,
    pub outcome: Outcome,
}

impl std::fmt::Display for SubjectReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let file = self.file.display();
        match &self.outcome {
            Outcome::Unchanged { version } => {
                write!(f, "{}: {file} unchanged (version {version})", self.subject)
            }
            Outcome::Compatible => write!(f, "{}: {file} compatible", self.subject),
            Outcome::Registered { id } => {
                write!(f, "{}: {file} registered (schema id {id})", self.subject)
            }
            Outcome::Incompatible { reason } => write!(
                f,
                "{}: {file} is INCOMPATIBLE and was not registered: {reason}",
                self.subject
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SubjectsError {
    #[error("{file}: {reason}")]
    File { file: PathBuf, reason: String },
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// Checks (and with `register`, registers) one topic's schema file against its subject.
pub async fn apply_subject(
    registry: &Registry,
    topic: &str,
    file: &Path,
    level: Compatibility,
    register: bool,
) -> Result<SubjectReport, SubjectsError> {
    let file_error = |reason: String| SubjectsError::File {
        file: file.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(file).map_err(|e| file_error(e.to_string()))?;
    let candidate =
        Schema::parse_str(&text).map_err(|e| file_error(format!("not valid Avro: {e}")))?;
    let subject = value_subject(topic);
    let report = |outcome| SubjectReport {
        subject: subject.clone(),
        file: file.to_path_buf(),
        outcome,
    };
    let mut versions = Vec::new();
    for (version, existing) in registry.versions(&subject).await? {
        let existing = Schema::parse_str(&existing)
            .map_err(|e| file_error(format!("{subject} version {version} does not parse: {e}")))?;
        if existing.canonical_form() == candidate.canonical_form() {
            return Ok(report(Outcome::Unchanged { version }));
        }
        versions.push((version, existing));
    }
    if let Some(reason) = incompatibility(&candidate, &versions, level) {
        return Ok(report(Outcome::Incompatible {
            reason: format!("{} check: {reason}", level.name()),
        }));
    }
    if !register {
        return Ok(report(Outcome::Compatible));
    }
    // The registry enforces the same level from now on, for every writer, not only us.
    registry
        .set_compatibility_level(&subject, level.name())
        .await?;
    match registry.register(&subject, &text).await {
        Ok(id) => Ok(report(Outcome::Registered { id })),
        Err(RegistryError::Refused(reason)) => Ok(report(Outcome::Incompatible {
            reason: format!("the registry refused it: {reason}"),
        })),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(fields: &str) -> Schema {
        Schema::parse_str(&format!(
            r#"{{"type":"record","name":"T","namespace":"x","fields":[{fields}]}}"#
        ))
        .unwrap()
    }

    #[test]
    fn a_field_added_with_a_default_is_compatible_both_ways() {
        let v1 = schema(r#"{"name":"a","type":"string"}"#);
        let v2 = schema(r#"{"name":"a","type":"string"},{"name":"b","type":"int","default":0}"#);
        for level in [
            Compatibility::Backward,
            Compatibility::Forward,
            Compatibility::Full,
        ] {
            assert_eq!(
                incompatibility(&v2, &[(1, v1.clone())], level),
                None,
                "{level:?}"
            );
        }
    }

    #[test]
    fn a_field_added_without_a_default_is_refused_naming_the_field() {
        let v1 = schema(r#"{"name":"a","type":"string"}"#);
        let v2 = schema(r#"{"name":"a","type":"string"},{"name":"trace_id","type":"string"}"#);
        let reason = incompatibility(&v2, &[(1, v1.clone())], Compatibility::Backward).unwrap();
        assert!(
            reason.contains("field `trace_id` is not in those records and has no default"),
            "{reason}"
        );
        assert!(reason.contains("version 1"), "{reason}");
        // Forward only: old readers ignore the new field, so it is allowed.
        assert_eq!(
            incompatibility(&v2, &[(1, v1)], Compatibility::Forward),
            None
        );
    }

    #[test]
    fn a_changed_type_names_the_field_and_transitive_checks_every_version() {
        let v1 = schema(r#"{"name":"a","type":"string"}"#);
        let v2 = schema(r#"{"name":"a","type":"string"},{"name":"n","type":"int","default":0}"#);
        let v3 =
            schema(r#"{"name":"a","type":"string"},{"name":"n","type":"string","default":""}"#);
        let reason = incompatibility(
            &v3,
            &[(1, v1.clone()), (2, v2.clone())],
            Compatibility::Backward,
        )
        .unwrap();
        assert!(reason.contains("field `n`"), "{reason}");
        // Dropping a field without a default: fine backward, refused forward.
        let v4 = schema(r#"{"name":"n","type":"int","default":0}"#);
        assert_eq!(
            incompatibility(&v4, &[(2, v2.clone())], Compatibility::Backward),
            None
        );
        let reason = incompatibility(&v4, &[(2, v2.clone())], Compatibility::Full).unwrap();
        assert!(reason.contains("field `a`"), "{reason}");
        // Transitive: v4 against v1 too (v1 has no `n`, but it has a default: fine).
        assert_eq!(
            incompatibility(&v4, &[(1, v1), (2, v2)], Compatibility::BackwardTransitive),
            None
        );
        assert_eq!("full_transitive".parse(), Ok(Compatibility::FullTransitive));
    }
}
