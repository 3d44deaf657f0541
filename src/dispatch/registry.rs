//! The handler registry (the services' HandlerFactory, done once at start-up): handler names map
//! to factories, and the routes file binds each action to a handler built by its factory.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::handlers;
use super::routes::RouteSpec;
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

/// Builds a handler for one route (the route's outputs are its parameters).
pub type HandlerFactory = fn(&RouteSpec) -> Result<Arc<dyn Handler>, String>;

/// Handler names → factories. `with_builtins` has `enrich`; register custom Rust handlers here.
pub struct HandlerRegistry {
    factories: BTreeMap<String, HandlerFactory>,
}

impl HandlerRegistry {
    pub fn with_builtins() -> Self {
        let mut registry = HandlerRegistry {
            factories: BTreeMap::new(),
        };
        registry.register("enrich", handlers::enrich::factory);
        registry
    }

    pub fn register(&mut self, name: &str, factory: HandlerFactory) {
        self.factories.insert(name.to_string(), factory);
    }

    /// Binds every route's action to a handler; an unknown handler name is a start-up error.
    pub fn build(&self, routes: &[RouteSpec]) -> Result<Router, String> {
        let mut by_action = HashMap::new();
        for route in routes {
            let factory = self.factories.get(&route.handler).ok_or_else(|| {
                format!(
                    "action {:?} uses handler {:?}, which is not registered (known: {})",
                    route.action,
                    route.handler,
                    self.factories
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
            let handler = factory(route).map_err(|e| format!("action {:?}: {e}", route.action))?;
            by_action.insert(route.action.clone(), handler);
        }
        let output_topics = routes
            .iter()
            .flat_map(|r| r.outputs.iter().map(|o| o.topic.clone()))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        Ok(Router {
            by_action,
            output_topics,
        })
    }
}

/// Action → handler, built once; lookups are a hash probe per record.
pub struct Router {
    by_action: HashMap<String, Arc<dyn Handler>>,
    output_topics: Vec<String>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("actions", &self.actions())
            .field("output_topics", &self.output_topics)
            .finish()
    }
}

impl Router {
    pub fn handler(&self, action: &str) -> Option<&Arc<dyn Handler>> {
        self.by_action.get(action)
    }

    /// Every topic some route writes to, to check they exist at start-up.
    pub fn output_topics(&self) -> &[String] {
        &self.output_topics
    }

    pub fn actions(&self) -> Vec<&str> {
        let mut actions: Vec<&str> = self.by_action.keys().map(String::as_str).collect();
        actions.sort_unstable();
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::routes::parse;

    struct Shout;
    impl Handler for Shout {
        fn handle<'a>(&self, input: &Inbound<'a>) -> Result<Vec<Outbound<'a>>, HandlerError> {
            Ok(vec![Outbound {
                topic: "loud".into(),
                action: input.envelope.action.clone(),
                message: input.envelope.payload.message.to_uppercase().into(),
                data: OutData::Value(Value::Null),
            }])
        }
    }

    #[test]
    fn custom_handlers_register_behind_the_same_trait() {
        let routes = parse("[[routes]]\naction = \"yell\"\nhandler = \"shout\"\n").unwrap();
        let mut registry = HandlerRegistry::with_builtins();
        assert!(registry
            .build(&routes)
            .unwrap_err()
            .contains("not registered (known: enrich)"));
        registry.register("shout", |_| Ok(Arc::new(Shout)));
        let router = registry.build(&routes).unwrap();
        let bytes = br#"{"service":"s","action":"yell","payload":{"message":"hi","timestamp":"t","data":null}}"#;
        let envelope = EnvelopeRef::decode(bytes, 1024).unwrap();
        let outputs = router
            .handler("yell")
            .unwrap()
            .handle(&Inbound {
                envelope: &envelope,
                topic: "in",
                partition: 0,
                offset: 0,
            })
            .unwrap();
        assert_eq!(outputs[0].message, "HI");
        assert!(router.handler("whisper").is_none());
    }
}
