//! The `enrich` handler: for each output of its route, start from the input payload, set the
//! message and action, then apply copy, rename, set and remove on dot paths inside the payload.

use std::borrow::Cow;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::dispatch::handler::{Handler, HandlerError, Inbound, OutData, Outbound};
use crate::dispatch::routes::{OutputSpec, RouteSpec};

pub struct Enrich {
    outputs: Vec<PreparedOutput>,
}

/// An output spec with everything per-record work needs computed once.
struct PreparedOutput {
    spec: OutputSpec,
    topic: Arc<str>,
    /// `set` values converted from TOML once, not per record.
    set_values: Vec<(String, Value)>,
    /// No copy/rename/set/remove: the input's data passes through as raw JSON.
    pass_through: bool,
}

pub fn factory(route: &RouteSpec) -> Result<Arc<dyn Handler>, String> {
    let outputs = route
        .outputs
        .iter()
        .map(|output| {
            let set_values = output
                .set
                .iter()
                .map(|(path, value)| {
                    serde_json::to_value(value)
                        .map(|v| (path.clone(), v))
                        .map_err(|e| format!("set {path}: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(PreparedOutput {
                topic: output.topic.as_str().into(),
                pass_through: output.copy.is_empty()
                    && output.rename.is_empty()
                    && output.set.is_empty()
                    && output.remove.is_empty(),
                spec: output.clone(),
                set_values,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Arc::new(Enrich { outputs }))
}

impl Handler for Enrich {
    fn handle<'a>(&self, input: &Inbound<'a>) -> Result<Vec<Outbound<'a>>, HandlerError> {
        let envelope = input.envelope;
        self.outputs
            .iter()
            .map(|output| {
                let action = match &output.spec.action {
                    Some(action) => Cow::Owned(action.clone()),
                    None => envelope.action.clone(),
                };
                if output.pass_through {
                    return Ok(Outbound {
                        topic: output.topic.clone(),
                        action,
                        message: match &output.spec.message {
                            Some(message) => Cow::Owned(message.clone()),
                            None => envelope.payload.message.clone(),
                        },
                        data: OutData::Raw(envelope.payload.data),
                    });
                }
                // Operate on a payload-shaped object so paths read `data.x`, `message`.
                let message = output
                    .spec
                    .message
                    .clone()
                    .unwrap_or_else(|| envelope.payload.message.to_string());
                let mut payload = Value::Object(Map::from_iter([
                    ("message".to_string(), Value::String(message)),
                    ("data".to_string(), envelope.data_value()),
                ]));
                for (target, source) in &output.spec.copy {
                    let value = get(&payload, source).cloned().ok_or_else(|| {
                        HandlerError(format!("copy {target} <- {source}: {source} is missing"))
                    })?;
                    put(&mut payload, target, value)?;
                }
                for (from, to) in &output.spec.rename {
                    if let Some(value) = take(&mut payload, from) {
                        put(&mut payload, to, value)?;
                    }
                }
                for (path, value) in &output.set_values {
                    put(&mut payload, path, value.clone())?;
                }
                for path in &output.spec.remove {
                    take(&mut payload, path);
                }
                let message = match payload.get("message") {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                    None => String::new(),
                };
                Ok(Outbound {
                    topic: output.topic.clone(),
                    action,
                    message: Cow::Owned(message),
                    data: OutData::Value(
                        payload
                            .get_mut("data")
                            .map(Value::take)
                            .unwrap_or(Value::Null),
                    ),
                })
            })
            .collect()
    }
}

fn get<'v>(value: &'v Value, path: &str) -> Option<&'v Value> {
    path.split('.').try_fold(value, |v, key| v.get(key))
}

fn take(value: &mut Value, path: &str) -> Option<Value> {
    let (parent, last) = match path.rsplit_once('.') {
        Some((parent, last)) => (
            parent.split('.').try_fold(value, |v, key| v.get_mut(key))?,
            last,
        ),
        None => (value, path),
    };
    parent.as_object_mut()?.remove(last)
}

fn put(value: &mut Value, path: &str, new: Value) -> Result<(), HandlerError> {
    let mut current = value;
    let mut keys = path.split('.').peekable();
    while let Some(key) = keys.next() {
        if current.is_null() {
            *current = Value::Object(Map::new());
        }
        let object = current.as_object_mut().ok_or_else(|| {
            HandlerError(format!(
                "cannot set {path}: {key} is inside a non-object value"
            ))
        })?;
        if keys.peek().is_none() {
            object.insert(key.to_string(), new);
            return Ok(());
        }
        current = object.entry(key.to_string()).or_insert(Value::Null);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::routes::parse;
    use crate::envelope::EnvelopeRef;

    const TASK: &str = r#"{"service":"lk","action":"start_task","payload":{"message":"It is start_task","timestamp":"2024-05-01T12:00:00","data":{"task_id":"t-1","user_id":42,"secret":"x"}}}"#;

    /// Runs the route's handler on TASK; returns (topic, action, message, data) per output.
    fn run(routes: &str) -> Result<Vec<(String, String, String, Value)>, HandlerError> {
        let route = &parse(routes).unwrap()[0];
        let handler = factory(route).unwrap();
        let envelope = EnvelopeRef::decode(TASK.as_bytes(), 4096).unwrap();
        let outputs = handler.handle(&Inbound {
            envelope: &envelope,
            topic: "in",
            partition: 0,
            offset: 7,
        })?;
        Ok(outputs
            .into_iter()
            .map(|o| {
                (
                    o.topic.to_string(),
                    o.action.into_owned(),
                    o.message.into_owned(),
                    o.data.to_value(),
                )
            })
            .collect())
    }

    #[test]
    fn sets_message_keeps_data_and_fans_out() {
        let outputs = run(
            "[[routes]]\naction = \"start_task\"\n[[routes.outputs]]\ntopic = \"info_in\"\nmessage = \"Task started\"\n[[routes.outputs]]\ntopic = \"worker_start_orm\"\n",
        )
        .unwrap();
        assert_eq!(outputs.len(), 2);
        let (topic, action, message, data) = &outputs[0];
        assert_eq!(
            (topic.as_str(), action.as_str(), message.as_str()),
            ("info_in", "start_task", "Task started")
        );
        assert_eq!(
            *data,
            serde_json::json!({"task_id":"t-1","user_id":42,"secret":"x"})
        );
        assert_eq!(
            outputs[1].2, "It is start_task",
            "input message kept when not set"
        );
    }

    #[test]
    fn copy_rename_set_remove_in_order() {
        let outputs = run(r#"[[routes]]
action = "start_task"
[[routes.outputs]]
topic = "worker"
action = "run_task"
copy = { "data.owner.id" = "data.user_id" }
rename = { "data.task_id" = "data.id" }
set = { "data.queue" = "orm", "data.retries" = 3 }
remove = ["data.secret", "data.user_id"]
"#)
        .unwrap();
        assert_eq!(outputs[0].1, "run_task");
        assert_eq!(
            outputs[0].3,
            serde_json::json!({"id":"t-1","owner":{"id":42},"queue":"orm","retries":3})
        );
    }

    #[test]
    fn copying_a_missing_field_is_a_handler_error() {
        let err = run(
            "[[routes]]\naction = \"start_task\"\n[[routes.outputs]]\ntopic = \"t\"\ncopy = { \"data.a\" = \"data.nope\" }\n",
        )
        .unwrap_err();
        assert!(err.0.contains("data.nope is missing"));
    }
}
