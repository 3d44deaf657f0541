//! The index template installed at start-up: explicit mappings (keyword for what people filter
//! on, text for what they search in), ECS aliases, and a `data` field that cannot explode.

use serde_json::{json, Value};

/// How `data` (arbitrary service payloads) is stored; every choice avoids mapping explosions
/// and type conflicts between services that use the same key for different types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataMapping {
    /// Elasticsearch `flattened`: one field, leaves searchable as keywords (`data.user_id: 42`).
    Flattened,
    /// OpenSearch 2.7+ `flat_object`: the same idea under OpenSearch's name.
    FlatObject,
    /// Kept in `_source` only, not searchable; works on every distribution.
    Disabled,
}

impl DataMapping {
    pub fn parse(raw: &str) -> Option<DataMapping> {
        match raw.trim().to_ascii_lowercase().as_str() {
            "flattened" => Some(DataMapping::Flattened),
            "flat_object" => Some(DataMapping::FlatObject),
            "disabled" => Some(DataMapping::Disabled),
            _ => None,
        }
    }

    fn mapping(self) -> Value {
        match self {
            // Nesting deeper than the limit is rejected for good (and dead-lettered): a payload
            // that deep is almost certainly a bug, and the limit keeps documents cheap.
            DataMapping::Flattened => {
                json!({"type": "flattened", "depth_limit": 20, "ignore_above": 1024})
            }
            DataMapping::FlatObject => json!({"type": "flat_object"}),
            DataMapping::Disabled => json!({"type": "object", "enabled": false}),
        }
    }
}

/// Index-level settings of the template.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateOptions {
    pub index_wildcard: String,
    pub shards: u32,
    pub replicas: u32,
    pub data: DataMapping,
    /// Composable templates with equal priority and overlapping patterns are refused.
    pub priority: u32,
}

/// The body of `PUT _index_template/<name>` (composable templates: ES 7.8+, OpenSearch 1+).
pub fn index_template(options: &TemplateOptions) -> Value {
    let keyword = json!({"type": "keyword", "ignore_above": 1024});
    let date = json!({"type": "date"});
    json!({
        "index_patterns": [options.index_wildcard],
        "priority": options.priority,
        "_meta": {"managed_by": "eventpipe log"},
        "template": {
            "settings": {
                "number_of_shards": options.shards,
                "number_of_replicas": options.replicas,
            },
            "mappings": {
                // Unknown fields stay in _source without touching the mapping.
                "dynamic": false,
                "properties": {
                    "@timestamp": date,
                    "service": keyword,
                    "executer": keyword,
                    "action": keyword,
                    "level": keyword,
                    // Full text for searching, plus a keyword for exact filters and aggregations.
                    "message": {"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 256}}},
                    "data": options.data.mapping(),
                    "tags": keyword,
                    "timestamp_raw": keyword,
                    "kafka": {"properties": {
                        "topic": keyword,
                        "partition": {"type": "integer"},
                        "offset": {"type": "long"},
                        "key": keyword,
                        "timestamp": date,
                    }},
                    "origin": {"properties": {
                        "service": keyword,
                        "action": keyword,
                        "topic": keyword,
                        "partition": {"type": "integer"},
                        "offset": {"type": "long"},
                        "key": keyword,
                        "timestamp": date,
                        "timestamp_raw": keyword,
                    }},
                    // ECS names as aliases: ECS dashboards work without storing anything twice.
                    "log": {"properties": {"level": {"type": "alias", "path": "level"}}},
                    "event": {"properties": {"action": {"type": "alias", "path": "action"}}},
                },
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_maps_filters_as_keywords_and_message_as_text() {
        let t = index_template(&TemplateOptions {
            index_wildcard: "logger-service-*".into(),
            shards: 1,
            replicas: 0,
            data: DataMapping::Flattened,
            priority: 200,
        });
        assert_eq!(t["index_patterns"], json!(["logger-service-*"]));
        let settings = &t["template"]["settings"];
        assert_eq!(settings["number_of_replicas"], 0);
        let p = &t["template"]["mappings"]["properties"];
        for field in ["service", "executer", "action", "level"] {
            assert_eq!(p[field]["type"], "keyword", "{field}");
        }
        assert_eq!(p["message"]["type"], "text");
        assert_eq!(p["@timestamp"]["type"], "date");
        assert_eq!(p["data"]["type"], "flattened");
        assert_eq!(p["log"]["properties"]["level"]["path"], "level");
    }

    #[test]
    fn data_mapping_names() {
        assert_eq!(
            DataMapping::parse("Flattened"),
            Some(DataMapping::Flattened)
        );
        assert_eq!(
            DataMapping::parse("flat_object"),
            Some(DataMapping::FlatObject)
        );
        assert_eq!(DataMapping::parse("disabled"), Some(DataMapping::Disabled));
        assert_eq!(DataMapping::parse("nested"), None);
        assert_eq!(DataMapping::Disabled.mapping()["enabled"], false);
    }
}
