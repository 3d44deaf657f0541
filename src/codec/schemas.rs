//! The Avro schemas under schemas/, compiled into the binary: what each stage reads and writes.
//! Topics name their schema in topics/topics.toml (`value_schema`); subjects are `<topic>-value`.

use std::sync::OnceLock;

use apache_avro::Schema;

/// Every record the pipeline reads or writes, by its file under schemas/.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchemaName {
    /// What services publish to the dispatcher's inputs.
    Envelope,
    /// The dispatcher's enriched output (info_in and routed topics), the log stage's input.
    Event,
    /// The aggregator's input.
    AggregateEvent,
    /// The aggregator's output, one per window.
    Aggregate,
    /// A stage's own totals on service_metrics.
    Metrics,
}

impl SchemaName {
    pub const ALL: [SchemaName; 5] = [
        SchemaName::Envelope,
        SchemaName::Event,
        SchemaName::AggregateEvent,
        SchemaName::Aggregate,
        SchemaName::Metrics,
    ];

    /// The file stem under schemas/ (also the `value_schema` value in topics.toml).
    pub fn file_stem(self) -> &'static str {
        match self {
            SchemaName::Envelope => "envelope",
            SchemaName::Event => "event",
            SchemaName::AggregateEvent => "aggregate_event",
            SchemaName::Aggregate => "aggregate",
            SchemaName::Metrics => "metrics",
        }
    }

    pub fn from_stem(stem: &str) -> Option<SchemaName> {
        SchemaName::ALL.into_iter().find(|s| s.file_stem() == stem)
    }

    /// The schema text this binary was built with.
    pub fn text(self) -> &'static str {
        match self {
            SchemaName::Envelope => include_str!("../../schemas/envelope.avsc"),
            SchemaName::Event => include_str!("../../schemas/event.avsc"),
            SchemaName::AggregateEvent => include_str!("../../schemas/aggregate_event.avsc"),
            SchemaName::Aggregate => include_str!("../../schemas/aggregate.avsc"),
            SchemaName::Metrics => include_str!("../../schemas/metrics.avsc"),
        }
    }

    /// The parsed schema; the files are part of the build and tested to parse.
    pub fn parse(self) -> Schema {
        Schema::parse_str(self.text()).expect("schemas/*.avsc are valid Avro (unit-tested)")
    }

    /// The parsed schema, once per process (codecs borrow it for their cached readers).
    pub fn parsed(self) -> &'static Schema {
        static PARSED: OnceLock<Vec<Schema>> = OnceLock::new();
        let all = PARSED.get_or_init(|| SchemaName::ALL.iter().map(|s| s.parse()).collect());
        let index = SchemaName::ALL
            .iter()
            .position(|s| *s == self)
            .expect("ALL lists every schema");
        &all[index]
    }
}

/// The TopicNameStrategy subject for a topic's record values.
pub fn value_subject(topic: &str) -> String {
    format!("{topic}-value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schema_parses_and_names_its_file() {
        for name in SchemaName::ALL {
            let schema = Schema::parse_str(name.text()).unwrap();
            assert!(matches!(schema, Schema::Record(_)), "{name:?}");
            assert_eq!(SchemaName::from_stem(name.file_stem()), Some(name));
        }
        assert_eq!(value_subject("info_in"), "info_in-value");
    }
}
