//! Routes are data: topics/routes.toml maps each action to a handler and its outputs, with
//! field operations (copy, rename, set, remove) so enrichment and fan-out need no recompile.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
#[error("routes file {path}: {reason}")]
pub struct RoutesError {
    pub path: String,
    pub reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutesFile {
    #[serde(default)]
    routes: Vec<RouteSpec>,
}

/// One action's route.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub action: String,
    /// Registered handler name; `enrich` (the default) applies `outputs` as written.
    #[serde(default = "default_handler")]
    pub handler: String,
    #[serde(default)]
    pub outputs: Vec<OutputSpec>,
}

fn default_handler() -> String {
    "enrich".into()
}

/// One record a route emits. Paths are dot-separated inside the payload, e.g. `data.user_id`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    pub topic: String,
    /// New payload.message; the input's message when absent.
    pub message: Option<String>,
    /// New action; the input's action when absent.
    pub action: Option<String>,
    /// target path ← source path, applied first.
    #[serde(default)]
    pub copy: BTreeMap<String, String>,
    /// old path → new path.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// path = constant value.
    #[serde(default)]
    pub set: BTreeMap<String, toml::Value>,
    /// paths to drop, applied last.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// Loads and checks the routes file: one route per action, each output names a valid topic.
pub fn load(path: &Path) -> Result<Vec<RouteSpec>, RoutesError> {
    let error = |reason: String| RoutesError {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    parse(&text).map_err(error)
}

pub fn parse(text: &str) -> Result<Vec<RouteSpec>, String> {
    let file: RoutesFile = toml::from_str(text).map_err(|e| {
        let message = e.message().replace('\n', " ");
        match e.span() {
            Some(span) => format!(
                "line {}: {message}",
                text[..span.start.min(text.len())].matches('\n').count() + 1
            ),
            None => message,
        }
    })?;
    let mut actions = std::collections::HashSet::new();
    for route in &file.routes {
        if route.action.trim().is_empty() {
            return Err("a route has an empty action".into());
        }
        if !actions.insert(route.action.as_str()) {
            return Err(format!("action {:?} is routed twice", route.action));
        }
        for output in &route.outputs {
            if !crate::settings::valid_topic_name(&output.topic) {
                return Err(format!(
                    "action {:?}: output topic {:?} is not a valid topic name",
                    route.action, output.topic
                ));
            }
            for path in output
                .copy
                .iter()
                .flat_map(|(a, b)| [a, b])
                .chain(output.rename.iter().flat_map(|(a, b)| [a, b]))
                .chain(output.set.keys())
                .chain(output.remove.iter())
            {
                if path.split('.').any(str::is_empty) {
                    return Err(format!(
                        "action {:?}: bad field path {path:?}",
                        route.action
                    ));
                }
            }
        }
    }
    Ok(file.routes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_outputs_with_field_operations() {
        let routes = parse(
            r#"
[[routes]]
action = "start_task"
[[routes.outputs]]
topic = "info_in"
message = "Task started"
[[routes.outputs]]
topic = "worker_start_orm"
rename = { "data.task_id" = "data.id" }
set = { "data.queue" = "orm", "data.priority" = 3 }
remove = ["data.secret"]
"#,
        )
        .unwrap();
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].handler, "enrich");
        assert_eq!(routes[0].outputs[1].rename["data.task_id"], "data.id");
        assert_eq!(
            routes[0].outputs[1].set["data.priority"],
            toml::Value::Integer(3)
        );
    }

    #[test]
    fn rejects_duplicates_bad_topics_and_paths() {
        let twice = "[[routes]]\naction = \"a\"\n[[routes]]\naction = \"a\"\n";
        assert!(parse(twice).unwrap_err().contains("routed twice"));
        let topic = "[[routes]]\naction = \"a\"\n[[routes.outputs]]\ntopic = \"bad topic\"\n";
        assert!(parse(topic).unwrap_err().contains("not a valid topic"));
        let path = "[[routes]]\naction = \"a\"\n[[routes.outputs]]\ntopic = \"t\"\nremove = [\"data..x\"]\n";
        assert!(parse(path).unwrap_err().contains("bad field path"));
        let unknown = "[[routes]]\naction = \"a\"\nouputs = []\n";
        assert!(parse(unknown)
            .unwrap_err()
            .starts_with("line 3: unknown field `ouputs`"));
    }

    #[test]
    fn the_repository_routes_file_is_valid() {
        let routes = load(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/topics/routes.toml"
        )))
        .unwrap();
        let actions: Vec<_> = routes.iter().map(|r| r.action.as_str()).collect();
        for action in ["create_user", "update_user", "start_task"] {
            assert!(actions.contains(&action), "{action} routed");
        }
    }
}
