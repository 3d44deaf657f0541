//! Schema-guided conversion between Avro values and the JSON the stages process, both ways.
//! Pure (no I/O): the codec wraps it with the Confluent framing and the registry.
//!
//! The mapping is the one a person reading the JSON would expect, not Avro's JSON encoding:
//! unions are unwrapped (`null` or the branch's value), `timestamp-millis` longs are RFC 3339
//! text, and a string field marked `"eventpipe.format": "json"` carries embedded JSON (the
//! services' free-form `payload.data`) that becomes a JSON value again.

use apache_avro::schema::{RecordField, Schema, UnionSchema};
use apache_avro::types::Value as Avro;
use chrono::{DateTime, SecondsFormat};
use std::cell::RefCell;
use std::collections::HashMap;

use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::Value as Json;

use crate::envelope::parse_timestamp;

/// The custom field attribute that marks a string as embedded JSON text.
pub const FORMAT_ATTRIBUTE: &str = "eventpipe.format";

/// Why a value does not fit its schema; `path` names the field (`payload.data`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("field `{path}`: {reason}")]
pub struct TranscodeError {
    pub path: String,
    pub reason: String,
}

fn error(path: &Path<'_>, reason: impl Into<String>) -> TranscodeError {
    TranscodeError {
        path: path.to_string(),
        reason: reason.into(),
    }
}

/// Where a value sits in the record, built on the stack as the walk descends and rendered only
/// for an error (a string per field would cost more than the conversion itself).
#[derive(Clone, Copy)]
enum Path<'a> {
    Root,
    Field(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl std::fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Path::Root => f.write_str("<root>"),
            Path::Field(Path::Root, name) => f.write_str(name),
            Path::Field(parent, name) => write!(f, "{parent}.{name}"),
            Path::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

fn is_json_text(field: &RecordField) -> bool {
    field
        .custom_attributes
        .get(FORMAT_ATTRIBUTE)
        .and_then(|v| v.as_str())
        == Some("json")
}

/// An Avro value (already resolved to `schema`, the reader's) as JSON.
pub fn avro_to_json(value: &Avro, schema: &Schema) -> Result<Json, TranscodeError> {
    let failure = RefCell::new(None);
    serde_json::to_value(AsJson::root(value, schema, &failure)).map_err(|e| take(&failure, e))
}

/// `avro_to_json` written straight to bytes, without building a JSON tree (the hot path).
pub fn avro_to_json_bytes(value: &Avro, schema: &Schema) -> Result<Vec<u8>, TranscodeError> {
    let failure = RefCell::new(None);
    serde_json::to_vec(&AsJson::root(value, schema, &failure)).map_err(|e| take(&failure, e))
}

fn take(failure: &RefCell<Option<TranscodeError>>, e: serde_json::Error) -> TranscodeError {
    failure
        .take()
        .unwrap_or_else(|| error(&Path::Root, e.to_string()))
}

/// Serializes an Avro value as the JSON the stages process; the first defect is kept with its
/// path in `failure` (serde's error type cannot carry it).
struct AsJson<'a> {
    value: &'a Avro,
    schema: &'a Schema,
    path: &'a Path<'a>,
    json_text: bool,
    failure: &'a RefCell<Option<TranscodeError>>,
}

impl<'a> AsJson<'a> {
    fn root(
        value: &'a Avro,
        schema: &'a Schema,
        failure: &'a RefCell<Option<TranscodeError>>,
    ) -> AsJson<'a> {
        AsJson {
            value,
            schema,
            path: &Path::Root,
            json_text: false,
            failure,
        }
    }

    fn fail<E: serde::ser::Error>(&self, reason: String) -> E {
        let defect = error(self.path, reason);
        let message = defect.to_string();
        self.failure.borrow_mut().get_or_insert(defect);
        E::custom(message)
    }
}

impl Serialize for AsJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match (self.value, self.schema) {
            (Avro::Union(index, inner), Schema::Union(union)) => {
                let branch = union
                    .variants()
                    .get(*index as usize)
                    .ok_or_else(|| self.fail(format!("union branch {index} does not exist")))?;
                self.child(inner, branch, self.path, self.json_text)
                    .serialize(s)
            }
            (Avro::Record(fields), Schema::Record(record)) => {
                let mut object = s.serialize_map(Some(fields.len()))?;
                for (name, value) in fields {
                    let field = record
                        .lookup
                        .get(name)
                        .map(|&i| &record.fields[i])
                        .ok_or_else(|| self.fail(format!("field {name:?} is not in the schema")))?;
                    let path = Path::Field(self.path, name);
                    object.serialize_entry(
                        name,
                        &self.child(value, &field.schema, &path, is_json_text(field)),
                    )?;
                }
                object.end()
            }
            // Embedded JSON text goes out as it is, checked but not parsed into a tree.
            (Avro::String(text), _) if self.json_text => {
                let raw: &RawValue = serde_json::from_str(text)
                    .map_err(|e| self.fail(format!("embedded JSON text does not parse: {e}")))?;
                raw.serialize(s)
            }
            (Avro::Null, _) => s.serialize_unit(),
            (Avro::Boolean(b), _) => s.serialize_bool(*b),
            (Avro::Int(n), _) | (Avro::Date(n), _) | (Avro::TimeMillis(n), _) => {
                s.serialize_i32(*n)
            }
            (Avro::Long(n), _) | (Avro::TimeMicros(n), _) | (Avro::TimestampMicros(n), _) => {
                s.serialize_i64(*n)
            }
            (Avro::TimestampMillis(ms), _) | (Avro::LocalTimestampMillis(ms), _) => {
                match DateTime::from_timestamp_millis(*ms) {
                    Some(t) => s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true)),
                    None => s.serialize_i64(*ms),
                }
            }
            (Avro::Float(f), _) => self.finite(f64::from(*f), s),
            (Avro::Double(f), _) => self.finite(*f, s),
            (Avro::String(text), _) | (Avro::Enum(_, text), _) => s.serialize_str(text),
            (Avro::Uuid(u), _) => s.serialize_str(&u.to_string()),
            (Avro::Array(items), Schema::Array(array)) => {
                let mut list = s.serialize_seq(Some(items.len()))?;
                for (i, item) in items.iter().enumerate() {
                    let path = Path::Index(self.path, i);
                    list.serialize_element(&self.child(item, &array.items, &path, false))?;
                }
                list.end()
            }
            (Avro::Map(entries), Schema::Map(map)) => {
                let mut object = s.serialize_map(Some(entries.len()))?;
                for (key, value) in entries {
                    let path = Path::Field(self.path, key);
                    object.serialize_entry(key, &self.child(value, &map.types, &path, false))?;
                }
                object.end()
            }
            (other, _) => Err(self.fail(format!("Avro value {other:?} has no JSON mapping here"))),
        }
    }
}

impl AsJson<'_> {
    fn child<'b>(
        &'b self,
        value: &'b Avro,
        schema: &'b Schema,
        path: &'b Path<'b>,
        json_text: bool,
    ) -> AsJson<'b> {
        AsJson {
            value,
            schema,
            path,
            json_text,
            failure: self.failure,
        }
    }

    /// JSON has no NaN or infinity: such a value is a defect, not a silent null.
    fn finite<S: Serializer>(&self, f: f64, s: S) -> Result<S::Ok, S::Error> {
        if f.is_finite() {
            s.serialize_f64(f)
        } else {
            Err(self.fail(format!("{f} is not a finite number")))
        }
    }
}

/// The path of a value read as null where its schema has no null (apache-avro's reading of a
/// string cut off by the end of the input), if any; `value` as read with `schema`.
pub fn null_in_place_of_value(value: &Avro, schema: &Schema) -> Option<String> {
    find_null(value, schema, &Path::Root)
}

fn find_null(value: &Avro, schema: &Schema, path: &Path<'_>) -> Option<String> {
    match (value, schema) {
        (Avro::Null, Schema::Null) => None,
        (Avro::Null, _) => Some(path.to_string()),
        (Avro::Union(index, inner), Schema::Union(union)) => union
            .variants()
            .get(*index as usize)
            .and_then(|branch| find_null(inner, branch, path)),
        (Avro::Record(fields), Schema::Record(record)) => fields
            .iter()
            .zip(&record.fields)
            .find_map(|((name, v), field)| find_null(v, &field.schema, &Path::Field(path, name))),
        (Avro::Array(items), Schema::Array(array)) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| find_null(item, &array.items, &Path::Index(path, i))),
        (Avro::Map(entries), Schema::Map(map)) => entries
            .iter()
            .find_map(|(k, v)| find_null(v, &map.types, &Path::Field(path, k))),
        _ => None,
    }
}

/// JSON text as an Avro value of `schema` (the writer's), parsed lazily as the schema is
/// walked: no JSON tree is built, and embedded JSON text (`"eventpipe.format": "json"`) is taken
/// exactly as written. A field absent from the JSON takes the schema's default, or is an error
/// naming it.
pub fn json_bytes_to_avro(json: &[u8], schema: &Schema) -> Result<Avro, TranscodeError> {
    let raw: &RawValue =
        serde_json::from_slice(json).map_err(|e| error(&Path::Root, format!("not JSON: {e}")))?;
    to_avro(raw, schema, &Path::Root, false)
}

/// Parses one JSON value of an expected shape, or says what was found instead.
fn parse<'a, T: serde::Deserialize<'a>>(
    raw: &'a RawValue,
    path: &Path<'_>,
    expected: &str,
) -> Result<T, TranscodeError> {
    serde_json::from_str(raw.get()).map_err(|_| {
        error(
            path,
            format!("expected {expected}, found {}", json_kind(raw)),
        )
    })
}

fn to_avro(
    raw: &RawValue,
    schema: &Schema,
    path: &Path<'_>,
    json_text: bool,
) -> Result<Avro, TranscodeError> {
    Ok(match schema {
        Schema::Union(union) => union_branch(raw, union, path, json_text)?,
        Schema::Null => {
            parse::<()>(raw, path, "null")?;
            Avro::Null
        }
        Schema::String if json_text => Avro::String(raw.get().to_string()),
        Schema::String => Avro::String(parse(raw, path, "a string")?),
        Schema::Boolean => Avro::Boolean(parse(raw, path, "a boolean")?),
        Schema::Int => {
            let n: i64 = parse(raw, path, "an integer")?;
            Avro::Int(
                i32::try_from(n).map_err(|_| error(path, format!("{n} does not fit an int")))?,
            )
        }
        Schema::Long => Avro::Long(parse(raw, path, "an integer")?),
        Schema::Float => Avro::Float(parse::<f64>(raw, path, "a number")? as f32),
        Schema::Double => Avro::Double(parse(raw, path, "a number")?),
        Schema::TimestampMillis => Avro::TimestampMillis(match json_kind(raw) {
            "a string" => {
                let text: String = parse(raw, path, "a timestamp")?;
                parse_timestamp(&text)
                    .ok_or_else(|| error(path, format!("{text:?} is not an RFC 3339 timestamp")))?
                    .timestamp_millis()
            }
            _ => parse(raw, path, "a timestamp")?,
        }),
        Schema::Enum(e) => {
            let symbol: String = parse(raw, path, "a string")?;
            let index =
                e.symbols.iter().position(|s| *s == symbol).ok_or_else(|| {
                    error(path, format!("{symbol:?} is not one of {:?}", e.symbols))
                })?;
            Avro::Enum(index as u32, symbol)
        }
        Schema::Array(array) => {
            let items: Vec<&RawValue> = parse(raw, path, "an array")?;
            Avro::Array(
                items
                    .into_iter()
                    .enumerate()
                    .map(|(i, item)| to_avro(item, &array.items, &Path::Index(path, i), false))
                    .collect::<Result<_, _>>()?,
            )
        }
        Schema::Map(map) => {
            let entries: HashMap<String, &RawValue> = parse(raw, path, "an object")?;
            Avro::Map(
                entries
                    .into_iter()
                    .map(|(k, v)| {
                        let value = to_avro(v, &map.types, &Path::Field(path, &k), false)?;
                        Ok((k, value))
                    })
                    .collect::<Result<_, TranscodeError>>()?,
            )
        }
        Schema::Record(record) => {
            let object: HashMap<String, &RawValue> = parse(raw, path, "an object")?;
            let mut fields = Vec::with_capacity(record.fields.len());
            for field in &record.fields {
                let child = Path::Field(path, &field.name);
                let field_value = match object.get(&field.name) {
                    Some(v) => to_avro(v, &field.schema, &child, is_json_text(field))?,
                    None => match &field.default {
                        // A default is written in the JSON of the field's (first) type.
                        Some(default) => {
                            let text = default.to_string();
                            let default: &RawValue = serde_json::from_str(&text)
                                .map_err(|e| error(&child, format!("bad default: {e}")))?;
                            to_avro(default, &field.schema, &child, false)?
                        }
                        None => {
                            return Err(error(&child, "missing, and the schema has no default"))
                        }
                    },
                };
                fields.push((field.name.clone(), field_value));
            }
            Avro::Record(fields)
        }
        other => {
            return Err(error(
                path,
                format!("Avro type {other:?} is not supported by eventpipe's JSON mapping"),
            ))
        }
    })
}

/// Picks the union branch for a JSON value: `null` for null, otherwise the first non-null
/// branch the value fits.
fn union_branch(
    raw: &RawValue,
    union: &UnionSchema,
    path: &Path<'_>,
    json_text: bool,
) -> Result<Avro, TranscodeError> {
    let variants = union.variants();
    if json_kind(raw) == "null" {
        if let Some(index) = variants.iter().position(|s| matches!(s, Schema::Null)) {
            return Ok(Avro::Union(index as u32, Box::new(Avro::Null)));
        }
    }
    let mut last_error = None;
    for (index, branch) in variants.iter().enumerate() {
        if matches!(branch, Schema::Null) {
            continue;
        }
        match to_avro(raw, branch, path, json_text) {
            Ok(v) => return Ok(Avro::Union(index as u32, Box::new(v))),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        error(
            path,
            format!("{} fits no branch of the union", json_kind(raw)),
        )
    }))
}

/// What a JSON value is, from its first character (the text is valid JSON).
fn json_kind(raw: &RawValue) -> &'static str {
    match raw.get().trim_start().as_bytes().first() {
        Some(b'n') => "null",
        Some(b't' | b'f') => "a boolean",
        Some(b'"') => "a string",
        Some(b'[') => "an array",
        Some(b'{') => "an object",
        _ => "a number",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::schemas::SchemaName;
    use serde_json::json;

    fn json_to_avro(value: &Json, schema: &Schema) -> Result<Avro, TranscodeError> {
        json_bytes_to_avro(value.to_string().as_bytes(), schema)
    }

    fn round_trip(schema: SchemaName, value: Json) -> Json {
        let schema = schema.parse();
        let avro = json_to_avro(&value, &schema).unwrap();
        let bytes = apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
            .build()
            .unwrap()
            .write_value_to_vec(avro)
            .unwrap();
        let back = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
            .build()
            .unwrap()
            .read_value(&mut bytes.as_slice())
            .unwrap();
        avro_to_json(&back, &schema).unwrap()
    }

    #[test]
    fn envelopes_keep_free_form_data_as_json() {
        let envelope = json!({"service": "lk", "action": "create_user", "payload": {
            "message": "hi", "timestamp": "2024-05-01T12:00:00.123456",
            "data": {"user_id": 42, "tags": ["a", {"b": null}], "ratio": 0.1}}});
        assert_eq!(round_trip(SchemaName::Envelope, envelope.clone()), envelope);
        // Absent data takes the default (null).
        let bare =
            json!({"service": "lk", "action": "a", "payload": {"message": "m", "timestamp": "t"}});
        let back = round_trip(SchemaName::Envelope, bare);
        assert_eq!(back["payload"]["data"], Json::Null);
    }

    #[test]
    fn events_with_and_without_source() {
        let event = json!({"service": "eventpipe-dispatch", "action": "create_user", "payload": {
            "message": "m", "timestamp": "2026-11-23T18:00:00.123456Z", "data": {"x": 1}, "level": null},
            "source": {"service": "lk", "action": "create_user", "topic": "create_user_in",
            "partition": 2, "offset": 9_000_000_000_i64, "timestamp": "t", "key": "42"}});
        assert_eq!(round_trip(SchemaName::Event, event.clone()), event);
        let plain =
            json!({"service": "lk", "action": "a", "payload": {"message": "m", "timestamp": "t"}});
        let back = round_trip(SchemaName::Event, plain);
        assert_eq!(back["source"], Json::Null);
        assert_eq!(back["payload"]["level"], Json::Null);
    }

    #[test]
    fn timestamps_are_rfc3339_text_in_json_and_millis_in_avro() {
        let aggregate = json!({"name": "cpu", "function": "avg", "window_start": "2024-05-01T12:00:00.000Z",
            "window_end": "2024-05-01T12:01:00.000Z", "value": 0.5, "count": 3,
            "emitted_at": "2024-05-01T12:01:02.345Z"});
        assert_eq!(
            round_trip(SchemaName::Aggregate, aggregate.clone()),
            aggregate
        );
        let schema = SchemaName::Aggregate.parse();
        let Avro::Record(fields) = json_to_avro(&aggregate, &schema).unwrap() else {
            panic!("a record")
        };
        assert_eq!(fields[2].1, Avro::TimestampMillis(1_714_564_800_000));
    }

    #[test]
    fn a_string_cut_off_by_the_end_of_the_body_is_found() {
        let schema = SchemaName::Envelope.parse();
        let envelope = json!({"service": "lk", "action": "a", "payload": {"message": "m",
            "timestamp": "t", "data": {"user_id": 0}}});
        let avro = json_to_avro(&envelope, &schema).unwrap();
        let bytes = apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
            .build()
            .unwrap()
            .write_value_to_vec(avro)
            .unwrap();
        let read = |bytes: &[u8]| {
            apache_avro::reader::datum::GenericDatumReader::builder(&schema)
                .build()
                .unwrap()
                .read_value(&mut &bytes[..])
        };
        // apache-avro reads the cut string as null rather than failing: the check finds it.
        let cut = read(&bytes[..bytes.len() - 4]).expect("apache-avro accepts it");
        assert_eq!(
            null_in_place_of_value(&cut, &schema).as_deref(),
            Some("payload.data")
        );
        assert_eq!(
            null_in_place_of_value(&read(&bytes).unwrap(), &schema),
            None
        );
        // A real null in a nullable field is not a defect.
        let bare =
            json!({"service": "lk", "action": "a", "payload": {"message": "m", "timestamp": "t"}});
        let value = json_to_avro(&bare, &schema).unwrap();
        assert_eq!(null_in_place_of_value(&value, &schema), None);
    }

    #[test]
    fn mismatches_name_the_field() {
        let schema = SchemaName::Envelope.parse();
        let missing = json!({"service": "lk", "payload": {"message": "m", "timestamp": "t"}});
        let e = json_to_avro(&missing, &schema).unwrap_err();
        assert_eq!(e.path, "action");
        let wrong =
            json!({"service": "lk", "action": "a", "payload": {"message": 5, "timestamp": "t"}});
        let e = json_to_avro(&wrong, &schema).unwrap_err();
        assert_eq!(
            e.to_string(),
            "field `payload.message`: expected a string, found a number"
        );
        let schema = SchemaName::AggregateEvent.parse();
        let e = json_to_avro(
            &json!({"name": "n", "function": "sum", "value": "x", "timestamp": "t"}),
            &schema,
        )
        .unwrap_err();
        assert_eq!(e.path, "value");
    }
}
