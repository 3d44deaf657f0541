//! Resumable positions: a `Cursor` is the next offset to deliver for each partition a subscription
//! reads, sent as every frame's opaque id; `Start` is where a new stream begins.
//!
//! The id is base64url of `topic@partition.offset@…;topic@…` — opaque to clients, readable to us,
//! and versioned by its first byte so the format can change without breaking stored positions.

use std::collections::BTreeMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chrono::{DateTime, Utc};

/// The version tag every encoded cursor starts with.
const VERSION: char = '1';

/// Next offset to deliver, per topic and partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    positions: BTreeMap<String, BTreeMap<i32, i64>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad cursor: {0}")]
pub struct CursorError(pub String);

impl Cursor {
    pub fn get(&self, topic: &str, partition: i32) -> Option<i64> {
        self.positions.get(topic)?.get(&partition).copied()
    }

    pub fn set(&mut self, topic: &str, partition: i32, next_offset: i64) {
        match self.positions.get_mut(topic) {
            Some(partitions) => {
                partitions.insert(partition, next_offset);
            }
            None => {
                self.positions.insert(
                    topic.to_string(),
                    BTreeMap::from([(partition, next_offset)]),
                );
            }
        }
    }

    /// Moves a partition past `offset` (never backwards).
    pub fn advance(&mut self, topic: &str, partition: i32, offset: i64) {
        let next = offset + 1;
        if self
            .get(topic, partition)
            .is_none_or(|current| current < next)
        {
            self.set(topic, partition, next);
        }
    }

    /// `(topic, partition, next offset)` for every partition, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, i32, i64)> {
        self.positions.iter().flat_map(|(topic, partitions)| {
            partitions
                .iter()
                .map(move |(partition, offset)| (topic.as_str(), *partition, *offset))
        })
    }

    pub fn topics(&self) -> impl Iterator<Item = &str> {
        self.positions.keys().map(String::as_str)
    }

    /// Only the partitions of `topics`.
    pub fn restricted_to(&self, topics: &[String]) -> Cursor {
        Cursor {
            positions: self
                .positions
                .iter()
                .filter(|(topic, _)| topics.contains(topic))
                .map(|(t, p)| (t.clone(), p.clone()))
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.positions.values().all(BTreeMap::is_empty)
    }

    /// The opaque id clients echo back. Made for every frame of every connection, so it is
    /// written without the formatting machinery and base64-encoded into one allocation.
    pub fn encode(&self) -> String {
        let mut text = Vec::with_capacity(16 + 24 * self.positions.len());
        let mut digits = itoa::Buffer::new();
        text.push(VERSION as u8);
        for (index, (topic, partitions)) in self.positions.iter().enumerate() {
            if index > 0 {
                text.push(b';');
            }
            text.extend_from_slice(topic.as_bytes());
            for (partition, offset) in partitions {
                text.push(b'@');
                text.extend_from_slice(digits.format(*partition).as_bytes());
                text.push(b'.');
                text.extend_from_slice(digits.format(*offset).as_bytes());
            }
        }
        URL_SAFE_NO_PAD.encode(text)
    }

    pub fn decode(id: &str) -> Result<Cursor, CursorError> {
        let bad = |why: &str| CursorError(format!("{why} (send back an id the gateway gave you)"));
        if id.len() > 64 * 1024 {
            return Err(bad("longer than any the gateway makes"));
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(id.trim())
            .map_err(|_| bad("not base64url"))?;
        let text = String::from_utf8(bytes).map_err(|_| bad("not text"))?;
        let body = text
            .strip_prefix(VERSION)
            .ok_or_else(|| bad("unknown cursor version"))?;
        let mut cursor = Cursor::default();
        for entry in body.split(';').filter(|e| !e.is_empty()) {
            let mut parts = entry.split('@');
            let topic = parts.next().unwrap_or_default();
            if !crate::settings::valid_topic_name(topic) {
                return Err(bad("a topic name is not valid"));
            }
            for position in parts {
                let (partition, offset) = position
                    .split_once('.')
                    .ok_or_else(|| bad("malformed position"))?;
                let partition: i32 = partition.parse().map_err(|_| bad("malformed partition"))?;
                let offset: i64 = offset.parse().map_err(|_| bad("malformed offset"))?;
                if partition < 0 || offset < 0 {
                    return Err(bad("negative position"));
                }
                cursor.set(topic, partition, offset);
            }
        }
        Ok(cursor)
    }
}

/// Where a stream begins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Only what arrives from now on.
    Now,
    /// The oldest events Kafka still holds.
    Earliest,
    /// Events with a Kafka time at or after this (from the event store when Kafka no longer
    /// holds them).
    Time(DateTime<Utc>),
    /// Right after the events a client already has.
    After(Cursor),
}

impl Start {
    /// `now`, `earliest`, a time (as history takes it: RFC 3339, ISO 8601 in UTC, a date, or
    /// before now: `-10m`, `-2h`), or a cursor id.
    pub fn parse(text: &str) -> Result<Start, CursorError> {
        match text.trim() {
            "" | "now" => Ok(Start::Now),
            "earliest" => Ok(Start::Earliest),
            text => {
                // A time has digits and - : T, a cursor is base64url: try the time first.
                if let Ok(time) = crate::store::history::parse_time(text, Utc::now()) {
                    return Ok(Start::Time(time));
                }
                Cursor::decode(text).map(Start::After).map_err(|_| {
                    CursorError(format!(
                        "{text:?} is neither now, earliest, a time (2026-12-01T09:00:00Z, -10m) \
                         nor an event id the gateway gave you"
                    ))
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_only_move_forward() {
        let mut cursor = Cursor::default();
        cursor.set("create_user_in", 0, 15);
        cursor.set("create_user_in", 2, 0);
        cursor.advance("task_in", 1, 41);
        cursor.advance("task_in", 1, 7);
        assert_eq!(cursor.get("task_in", 1), Some(42));
        let id = cursor.encode();
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(Cursor::decode(&id).unwrap(), cursor);
        assert_eq!(
            cursor.iter().collect::<Vec<_>>(),
            [
                ("create_user_in", 0, 15),
                ("create_user_in", 2, 0),
                ("task_in", 1, 42)
            ]
        );
        assert_eq!(cursor.restricted_to(&["task_in".into()]).iter().count(), 1);
    }

    #[test]
    fn bad_cursors_and_starts_are_errors_that_say_why() {
        for bad in ["!!!", "bm90IGEgY3Vyc29y", &URL_SAFE_NO_PAD.encode("1t@x.1")] {
            let error = Cursor::decode(bad).unwrap_err();
            assert!(error.to_string().starts_with("bad cursor"), "{error}");
        }
        assert_eq!(Start::parse("now").unwrap(), Start::Now);
        assert_eq!(Start::parse("earliest").unwrap(), Start::Earliest);
        assert!(matches!(
            Start::parse("2026-12-01T09:00:00Z").unwrap(),
            Start::Time(_)
        ));
        assert!(Start::parse("yesterday")
            .unwrap_err()
            .to_string()
            .contains("yesterday"));
    }
}
