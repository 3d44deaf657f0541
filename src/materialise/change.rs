//! One change record read and checked (pure): its key, its version and the state it sets, or why
//! it must be dead-lettered; and a batch as rounds that apply it in order, stale ones left out.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::store::row::json_problem;

/// What a change record must satisfy, beyond being a JSON object with a Kafka key.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    /// The top-level field holding the version: an integer, 0 or more; newer is larger.
    pub version_field: String,
    /// Top-level fields that, when present, must be numbers 0 or more (a price, a stock).
    pub non_negative: Vec<String>,
    /// Larger values are dead-lettered (the row's jsonb would grow without bound).
    pub max_value_bytes: usize,
}

/// A valid change: the row it sets (merged over the row's current state when newer).
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub key: String,
    pub version: i64,
    /// The record's JSON object, as text (PostgreSQL parses it into jsonb).
    pub state: String,
}

/// Why a record cannot be applied: its dead letter's kind (low cardinality) and reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Invalid {
    #[error("the record has no key (the key names the row)")]
    MissingKey,
    #[error("the key is not UTF-8")]
    BadKey,
    #[error("{0}")]
    MalformedJson(String),
    #[error("the value is JSON but not an object")]
    NotAnObject,
    #[error("the field {0:?} (the version) is missing")]
    MissingVersion(String),
    #[error("the version {field:?} is {value}; it must be an integer, 0 or more")]
    BadVersion { field: String, value: String },
    #[error("{field:?} is {value}; it must be 0 or more")]
    Negative { field: String, value: String },
    #[error("{field:?} is {value}; it must be a number")]
    NotANumber { field: String, value: String },
}

impl Invalid {
    /// The dead letter's `eventpipe.error.kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            Invalid::MissingKey | Invalid::BadKey => "bad_key",
            Invalid::MalformedJson(_) | Invalid::NotAnObject => "malformed_json",
            Invalid::MissingVersion(_) => "missing_version",
            Invalid::BadVersion { .. } => "bad_version",
            Invalid::Negative { .. } | Invalid::NotANumber { .. } => "invalid_value",
        }
    }
}

/// Reads one record into a change, or says why it is refused.
pub fn parse(key: Option<&[u8]>, payload: &[u8], rules: &Rules) -> Result<Change, Invalid> {
    let key = match key {
        None | Some([]) => return Err(Invalid::MissingKey),
        Some(key) => std::str::from_utf8(key).map_err(|_| Invalid::BadKey)?,
    };
    // Not UTF-8, not JSON, too large, or a \u0000 jsonb cannot hold: refused here, because a
    // batch PostgreSQL refuses would be retried for ever.
    if let Some(problem) = json_problem(payload, rules.max_value_bytes) {
        return Err(Invalid::MalformedJson(problem));
    }
    let object: Map<String, Value> = match serde_json::from_slice(payload) {
        Ok(Value::Object(object)) => object,
        Ok(_) => return Err(Invalid::NotAnObject),
        Err(error) => return Err(Invalid::MalformedJson(error.to_string())),
    };
    let field = &rules.version_field;
    let version = match object.get(field) {
        None | Some(Value::Null) => return Err(Invalid::MissingVersion(field.clone())),
        Some(value) => value
            .as_i64()
            .filter(|v| *v >= 0)
            .ok_or_else(|| Invalid::BadVersion {
                field: field.clone(),
                value: value.to_string(),
            })?,
    };
    for field in &rules.non_negative {
        match object.get(field) {
            None => {}
            Some(Value::Number(n)) if n.as_f64().is_some_and(|n| n >= 0.0) => {}
            Some(Value::Number(n)) => {
                return Err(Invalid::Negative {
                    field: field.clone(),
                    value: n.to_string(),
                })
            }
            Some(other) => {
                return Err(Invalid::NotANumber {
                    field: field.clone(),
                    value: other.to_string(),
                })
            }
        }
    }
    Ok(Change {
        key: key.to_string(),
        version,
        state: String::from_utf8(payload.to_vec()).expect("checked UTF-8 above"),
    })
}

/// A batch as rounds of upserts that apply it as if one change at a time, in the order read: a
/// change is dropped when an earlier one of its key in the batch has its version or a newer one
/// (stale whatever the table holds); round `n` holds the `n`th remaining change of each key, so
/// one statement touches a row once, and a row's changes apply oldest first, each merging over
/// the one before.
pub fn rounds<'a>(changes: impl IntoIterator<Item = &'a Change>) -> Vec<Vec<&'a Change>> {
    let mut rounds: Vec<Vec<&Change>> = Vec::new();
    // Per key: the newest version kept so far and how many of its changes are kept.
    let mut kept: HashMap<&str, (i64, usize)> = HashMap::new();
    for change in changes {
        let round = match kept.get_mut(change.key.as_str()) {
            Some((newest, _)) if *newest >= change.version => continue,
            Some((newest, count)) => {
                *newest = change.version;
                *count += 1;
                *count - 1
            }
            None => {
                kept.insert(&change.key, (change.version, 1));
                0
            }
        };
        if rounds.len() == round {
            rounds.push(Vec::new());
        }
        rounds[round].push(change);
    }
    rounds
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            version_field: "version".into(),
            non_negative: vec!["price_cents".into(), "stock".into()],
            max_value_bytes: 1024,
        }
    }

    fn kind_of(key: Option<&[u8]>, payload: &str) -> &'static str {
        parse(key, payload.as_bytes(), &rules()).unwrap_err().kind()
    }

    #[test]
    fn a_valid_change_keeps_its_key_version_and_object() {
        let payload = r#"{"id": 7, "version": 3, "price_cents": 1999, "stock": 0}"#;
        let change = parse(Some(b"7"), payload.as_bytes(), &rules()).unwrap();
        assert_eq!(change.key, "7");
        assert_eq!(change.version, 3);
        assert_eq!(change.state, payload);
    }

    #[test]
    fn bad_records_say_why() {
        assert_eq!(kind_of(None, r#"{"version": 1}"#), "bad_key");
        assert_eq!(kind_of(Some(b"1"), "{not json"), "malformed_json");
        assert_eq!(kind_of(Some(b"1"), "[1, 2]"), "malformed_json");
        assert_eq!(kind_of(Some(b"1"), r#"{"a": "\u0000"}"#), "malformed_json");
        assert_eq!(kind_of(Some(b"1"), r#"{"stock": 1}"#), "missing_version");
        assert_eq!(kind_of(Some(b"1"), r#"{"version": -1}"#), "bad_version");
        assert_eq!(kind_of(Some(b"1"), r#"{"version": "2"}"#), "bad_version");
        assert_eq!(kind_of(Some(b"1"), r#"{"version": 1.5}"#), "bad_version");
        let negative = parse(Some(b"1"), br#"{"version": 1, "stock": -2}"#, &rules()).unwrap_err();
        assert_eq!(negative.kind(), "invalid_value");
        assert_eq!(
            negative.to_string(),
            r#""stock" is -2; it must be 0 or more"#
        );
        assert_eq!(
            kind_of(Some(b"1"), r#"{"version": 1, "price_cents": "free"}"#),
            "invalid_value"
        );
        let huge = format!(r#"{{"version": 1, "name": "{}"}}"#, "x".repeat(2000));
        assert_eq!(kind_of(Some(b"1"), &huge), "malformed_json");
    }

    #[test]
    fn rounds_apply_each_key_in_the_order_read_without_its_stale_changes() {
        let change = |key: &str, version, state: &str| Change {
            key: key.into(),
            version,
            state: state.into(),
        };
        let batch = [
            change("a", 1, "a1"),
            change("b", 5, "b5"),
            change("a", 3, "a3"),
            change("a", 2, "a2"),
            change("b", 5, "b5 again"),
        ];
        let rounds: Vec<Vec<&str>> = rounds(&batch)
            .iter()
            .map(|round| round.iter().map(|c| c.state.as_str()).collect())
            .collect();
        assert_eq!(rounds, [vec!["a1", "b5"], vec!["a3"]]);
    }
}
