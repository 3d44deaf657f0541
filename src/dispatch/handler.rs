//! What a handler is: the trait, what it sees of an input record and what it asks the stage to
//! emit. The registry binds handlers to actions; the built-in handlers implement the trait.

use std::borrow::Cow;
use std::sync::Arc;

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::envelope::EnvelopeRef;

/// What a handler sees of one input record.
pub struct Inbound<'a> {
    pub envelope: &'a EnvelopeRef<'a>,
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// An output's `payload.data`: the input's raw JSON copied through untouched (the fast path),
/// or a value a handler built or edited.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum OutData<'a> {
    Raw(Option<&'a RawValue>),
    Value(Value),
}

impl OutData<'_> {
    /// The data as a JSON tree (for tests and handlers that inspect it).
    pub fn to_value(&self) -> Value {
        match self {
            OutData::Raw(raw) => raw
                .and_then(|r| serde_json::from_str(r.get()).ok())
                .unwrap_or(Value::Null),
            OutData::Value(value) => value.clone(),
        }
    }
}

/// Equal when the JSON they hold is equal, whichever form it is in.
impl PartialEq for OutData<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.to_value() == other.to_value()
    }
}

/// One record a handler asks the stage to emit. The stage adds what every output carries:
/// the dispatcher's service name, a fresh timestamp, the input's key and the `source` trace.
#[derive(Debug, Clone)]
pub struct Outbound<'a> {
    pub topic: Arc<str>,
    pub action: Cow<'a, str>,
    pub message: Cow<'a, str>,
    pub data: OutData<'a>,
}

/// A handler failed for this record; it is dead-lettered with this reason.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HandlerError(pub String);

/// Turns one decoded envelope into zero or more outputs. Pure: no I/O, so it is unit-testable
/// and the stage alone owns delivery guarantees.
pub trait Handler: Send + Sync {
    fn handle<'a>(&self, input: &Inbound<'a>) -> Result<Vec<Outbound<'a>>, HandlerError>;
}
