//! The handler registry (the services' HandlerFactory, done once at start-up): handler names map
//! to factories, and the routes file binds each action to a handler built by its factory.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::handler::Handler;
use super::handlers;
use super::routes::RouteSpec;

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
    use crate::dispatch::handler::{HandlerError, Inbound, OutData, Outbound};
    use crate::dispatch::routes::parse;
    use crate::envelope::EnvelopeRef;
    use serde_json::Value;

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
