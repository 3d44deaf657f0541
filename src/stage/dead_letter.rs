//! Dead-letter records: the original key, headers and bytes, untouched, plus headers that say
//! why and where from, so a person (or a replay tool) can act on them. The one builder.

use std::borrow::Cow;

use super::output::OutputRecord;
use super::{DeadLetter, Record};

/// Header names on every dead-lettered record.
pub const HEADER_KIND: &str = "eventpipe.error.kind";
pub const HEADER_REASON: &str = "eventpipe.error.reason";
pub const HEADER_STAGE: &str = "eventpipe.stage";
pub const HEADER_SOURCE_TOPIC: &str = "eventpipe.source.topic";
pub const HEADER_SOURCE_PARTITION: &str = "eventpipe.source.partition";
pub const HEADER_SOURCE_OFFSET: &str = "eventpipe.source.offset";
pub const HEADER_SOURCE_TIMESTAMP: &str = "eventpipe.source.timestamp_ms";

/// Reasons are capped so a huge parser message cannot bloat a header.
const MAX_REASON_BYTES: usize = 1024;

/// Where a dead-lettered record came from.
#[derive(Debug, Clone, PartialEq)]
pub struct SourcePosition<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
}

/// The dead-letter topic of an input topic: `<topic><suffix>`.
pub fn dead_letter_topic(topic: &str, suffix: &str) -> String {
    format!("{topic}{suffix}")
}

/// Headers to add (after the original record's own headers) when dead-lettering.
pub fn headers(
    stage: &str,
    kind: &str,
    reason: &str,
    source: &SourcePosition<'_>,
) -> Vec<(&'static str, String)> {
    let mut reason = reason.replace(['\n', '\r'], " ");
    if reason.len() > MAX_REASON_BYTES {
        let mut cut = MAX_REASON_BYTES;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
        reason.push('…');
    }
    let mut headers = vec![
        (HEADER_KIND, kind.to_string()),
        (HEADER_REASON, reason),
        (HEADER_STAGE, stage.to_string()),
        (HEADER_SOURCE_TOPIC, source.topic.to_string()),
        (HEADER_SOURCE_PARTITION, source.partition.to_string()),
        (HEADER_SOURCE_OFFSET, source.offset.to_string()),
    ];
    if let Some(ms) = source.timestamp_ms {
        headers.push((HEADER_SOURCE_TIMESTAMP, ms.to_string()));
    }
    headers
}

/// The dead-letter record of `record`, bound for `topic`.
pub fn record(
    stage: &str,
    dead_letter: &DeadLetter,
    record: &Record<'_>,
    topic: &str,
) -> OutputRecord {
    let source = SourcePosition {
        topic: record.topic,
        partition: record.partition,
        offset: record.offset,
        timestamp_ms: record.timestamp_ms,
    };
    let added = headers(stage, dead_letter.kind, &dead_letter.reason, &source);
    let mut all: Vec<(Cow<'static, str>, Vec<u8>)> =
        Vec::with_capacity(record.headers.len() + added.len() + dead_letter.extra_headers.len());
    all.extend(
        record
            .headers
            .iter()
            .map(|(k, v)| (Cow::Owned(k.to_string()), v.to_vec())),
    );
    all.extend(
        added
            .into_iter()
            .chain(dead_letter.extra_headers.iter().cloned())
            .map(|(k, v)| (Cow::Borrowed(k), v.into_bytes())),
    );
    OutputRecord {
        topic: topic.into(),
        key: record.key.map(<[u8]>::to_vec),
        value: record.payload.to_vec(),
        headers: all,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_name_kind_reason_and_position_on_one_line() {
        let source = SourcePosition {
            topic: "task_in",
            partition: 2,
            offset: 99,
            timestamp_ms: Some(5),
        };
        let h = headers(
            "dispatch",
            "malformed_json",
            "expected value\nat line 1",
            &source,
        );
        let get = |name: &str| h.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str());
        assert_eq!(get(HEADER_KIND), Some("malformed_json"));
        assert_eq!(get(HEADER_REASON), Some("expected value at line 1"));
        assert_eq!(get(HEADER_SOURCE_TOPIC), Some("task_in"));
        assert_eq!(get(HEADER_SOURCE_PARTITION), Some("2"));
        assert_eq!(get(HEADER_SOURCE_OFFSET), Some("99"));
        assert_eq!(get(HEADER_SOURCE_TIMESTAMP), Some("5"));
        assert_eq!(dead_letter_topic("task_in", ".dlq"), "task_in.dlq");
    }

    #[test]
    fn long_reasons_are_cut_at_a_char_boundary() {
        let source = SourcePosition {
            topic: "t",
            partition: 0,
            offset: 0,
            timestamp_ms: None,
        };
        let reason = "é".repeat(2000);
        let h = headers("dispatch", "k", &reason, &source);
        assert!(h[1].1.len() <= MAX_REASON_BYTES + 3);
        assert!(h[1].1.ends_with('…'));
    }
}
