//! The `enrich` handler: for each output of its route, start from the input payload, set the
//! message and action, then apply copy, rename, set and remove on dot paths inside the payload.

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::dispatch::registry::{Handler, HandlerError, Inbound, Outbound};
use crate::dispatch::routes::{OutputSpec, RouteSpec};

pub struct Enrich {
    outputs: Vec<OutputSpec>,
    /// `set` values converted from TOML once, not per record.
    set_values: Vec<Vec<(String, Value)>>,
}

pub fn factory(route: &RouteSpec) -> Result<Arc<dyn Handler>, String> {
    let set_values = route
        .outputs
        .iter()
        .map(|output| {
            output
                .set
                .iter()
                .map(|(path, value)| {
                    serde_json::to_value(value)
                        .map(|v| (path.clone(), v))
                        .map_err(|e| format!("set {path}: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Arc::new(Enrich {
        outputs: route.outputs.clone(),
        set_values,
    }))
}

impl Handler for Enrich {
    fn handle(&self, input: &Inbound<'_>) -> Result<Vec<Outbound>, HandlerError> {
        let envelope = input.envelope;
        self.outputs
            .iter()
            .zip(&self.set_values)
            .map(|(output, set_values)| {
                // Operate on a payload-shaped object so paths read `data.x`, `message`.
                let mut payload = Value::Object(Map::from_iter([
                    (
                        "message".to_string(),
                        Value::String(envelope.payload.message.clone()),
                    ),
                    ("data".to_string(), envelope.payload.data.clone()),
                ]));
                if let Some(message) = &output.message {
                    payload["message"] = Value::String(message.clone());
                }
                for (target, source) in &output.copy {
                    let value = get(&payload, source).cloned().ok_or_else(|| {
                        HandlerError(format!("copy {target} <- {source}: {source} is missing"))
                    })?;
                    put(&mut payload, target, value)?;
                }
                for (from, to) in &output.rename {
                    if let Some(value) = take(&mut payload, from) {
                        put(&mut payload, to, value)?;
                    }
                }
                for (path, value) in set_values {
                    put(&mut payload, path, value.clone())?;
                }
                for path in &output.remove {
                    take(&mut payload, path);
                }
                let message = match payload.get("message") {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                    None => String::new(),
                };
                Ok(Outbound {
                    topic: output.topic.clone(),
                    action: output
                        .action
                        .clone()
                        .unwrap_or_else(|| envelope.action.clone()),
                    message,
                    data: payload
                        .get_mut("data")
                        .map(Value::take)
                        .unwrap_or(Value::Null),
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
    use crate::envelope::Envelope;

    fn run(routes: &str, envelope: &str) -> Result<Vec<Outbound>, HandlerError> {
        let route = &parse(routes).unwrap()[0];
        let handler = factory(route).unwrap();
        let envelope: Envelope = serde_json::from_str(envelope).unwrap();
        handler.handle(&Inbound {
            envelope: &envelope,
            topic: "in",
            partition: 0,
            offset: 7,
        })
    }

    const TASK: &str = r#"{"service":"lk","action":"start_task","payload":{"message":"It is start_task","timestamp":"2024-05-01T12:00:00","data":{"task_id":"t-1","user_id":42,"secret":"x"}}}"#;

    #[test]
    fn sets_message_keeps_data_and_fans_out() {
        let outputs = run(
            "[[routes]]\naction = \"start_task\"\n[[routes.outputs]]\ntopic = \"info_in\"\nmessage = \"Task started\"\n[[routes.outputs]]\ntopic = \"worker_start_orm\"\n",
            TASK,
        )
        .unwrap();
        assert_eq!(outputs.len(), 2);
        assert_eq!(outputs[0].topic, "info_in");
        assert_eq!(outputs[0].message, "Task started");
        assert_eq!(outputs[0].action, "start_task");
        assert_eq!(
            outputs[0].data,
            serde_json::json!({"task_id":"t-1","user_id":42,"secret":"x"})
        );
        assert_eq!(
            outputs[1].message, "It is start_task",
            "input message kept when not set"
        );
    }

    #[test]
    fn copy_rename_set_remove_in_order() {
        let outputs = run(
            r#"[[routes]]
action = "start_task"
[[routes.outputs]]
topic = "worker"
action = "run_task"
copy = { "data.owner.id" = "data.user_id" }
rename = { "data.task_id" = "data.id" }
set = { "data.queue" = "orm", "data.retries" = 3 }
remove = ["data.secret", "data.user_id"]
"#,
            TASK,
        )
        .unwrap();
        assert_eq!(outputs[0].action, "run_task");
        assert_eq!(
            outputs[0].data,
            serde_json::json!({"id":"t-1","owner":{"id":42},"queue":"orm","retries":3})
        );
    }

    #[test]
    fn copying_a_missing_field_is_a_handler_error() {
        let err = run(
            "[[routes]]\naction = \"start_task\"\n[[routes.outputs]]\ntopic = \"t\"\ncopy = { \"data.a\" = \"data.nope\" }\n",
            TASK,
        )
        .unwrap_err();
        assert!(err.0.contains("data.nope is missing"));
    }
}
