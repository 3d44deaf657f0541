//! Resumable positions: a `Cursor` is the next offset to deliver for each partition a subscription
//! reads, sent as every frame's opaque id; `Start` is where a new stream begins.
//!
//! The id is base64url of `topic@partition.offset@…;topic@…` — opaque to clients, readable to us,
//! and versioned by its first byte so the format can change without breaking stored positions.
//! Under flow control it also says what a pause holds (`~pause@topic@partition.first_held`) and
//! how far a history injection got (`!pause.seq`, `!pause.done`): see `gateway::holds`.

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
    /// Flow control: per partition, the pauses holding events there and the first offset each
    /// holds. Below `next`, the events such a pause matches from `first_held` on were not
    /// delivered: the position moved past them, the hold keeps them owed.
    holds: BTreeMap<(String, i32), BTreeMap<String, i64>>,
    /// History injections of pauses: how far each got.
    injections: BTreeMap<String, Injected>,
}

/// How far a pause's history injection got in this stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injected {
    /// Delivered up to this store `seq` (inclusive).
    UpTo(i64),
    /// All of it.
    Done,
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
            ..Cursor::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.positions.values().all(BTreeMap::is_empty)
    }

    /// Whether it carries flow-control state (holds or injections): never on the hot path of a
    /// stream no pause touches.
    pub fn has_flow_state(&self) -> bool {
        !self.holds.is_empty() || !self.injections.is_empty()
    }

    /// The first offset `pause` holds in a partition, if it holds there.
    pub fn held_from(&self, topic: &str, partition: i32, pause: &str) -> Option<i64> {
        self.holds
            .get(&(topic.to_string(), partition))?
            .get(pause)
            .copied()
    }

    /// Records that `pause` holds the event at `offset` (the first one it holds here stays).
    pub fn hold(&mut self, topic: &str, partition: i32, pause: &str, offset: i64) {
        self.holds
            .entry((topic.to_string(), partition))
            .or_default()
            .entry(pause.to_string())
            .or_insert(offset);
    }

    /// Moves a hold's start (released up to there), or drops it (`None`: all released).
    pub fn set_held_from(&mut self, topic: &str, partition: i32, pause: &str, first: Option<i64>) {
        let key = (topic.to_string(), partition);
        let Some(holds) = self.holds.get_mut(&key) else {
            return;
        };
        match first {
            Some(first) => {
                holds.insert(pause.to_string(), first);
            }
            None => {
                holds.remove(pause);
            }
        }
        if holds.is_empty() {
            self.holds.remove(&key);
        }
    }

    /// `(topic, partition, pause, first_held)` of every hold.
    pub fn holds(&self) -> impl Iterator<Item = (&str, i32, &str, i64)> {
        self.holds.iter().flat_map(|((topic, partition), pauses)| {
            pauses
                .iter()
                .map(move |(pause, first)| (topic.as_str(), *partition, pause.as_str(), *first))
        })
    }

    /// The pauses named by a hold or an injection.
    pub fn flow_pauses(&self) -> std::collections::BTreeSet<&str> {
        self.holds
            .values()
            .flat_map(|pauses| pauses.keys())
            .chain(self.injections.keys())
            .map(String::as_str)
            .collect()
    }

    pub fn injected(&self, pause: &str) -> Option<Injected> {
        self.injections.get(pause).copied()
    }

    pub fn set_injected(&mut self, pause: &str, injected: Option<Injected>) {
        match injected {
            Some(injected) => self.injections.insert(pause.to_string(), injected),
            None => self.injections.remove(pause),
        };
    }

    /// Takes over the flow-control state of `other` (a client's cursor, resolved afresh).
    pub fn take_flow_state(&mut self, other: &Cursor) {
        self.holds = other.holds.clone();
        self.injections = other.injections.clone();
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
        if self.has_flow_state() {
            self.encode_flow_state(&mut text);
        }
        URL_SAFE_NO_PAD.encode(text)
    }

    /// `;~pause@topic@partition.first` per hold, `;!pause.seq` or `;!pause.done` per injection
    /// (a topic name never starts with `~` or `!`).
    fn encode_flow_state(&self, text: &mut Vec<u8>) {
        for (topic, partition, pause, first) in self.holds() {
            text.extend_from_slice(format!(";~{pause}@{topic}@{partition}.{first}").as_bytes());
        }
        for (pause, injected) in &self.injections {
            match injected {
                Injected::UpTo(seq) => {
                    text.extend_from_slice(format!(";!{pause}.{seq}").as_bytes())
                }
                Injected::Done => text.extend_from_slice(format!(";!{pause}.done").as_bytes()),
            }
        }
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
        let pause_id = |text: &str| {
            (!text.is_empty()
                && text.len() <= 64
                && text.bytes().all(|b| b.is_ascii_alphanumeric()))
            .then(|| text.to_string())
            .ok_or_else(|| bad("malformed pause id"))
        };
        for entry in body.split(';').filter(|e| !e.is_empty()) {
            if let Some(hold) = entry.strip_prefix('~') {
                let mut parts = hold.splitn(3, '@');
                let (Some(pause), Some(topic), Some(position)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    return Err(bad("malformed hold"));
                };
                let (partition, first) = position
                    .split_once('.')
                    .ok_or_else(|| bad("malformed hold"))?;
                let partition: i32 = partition.parse().map_err(|_| bad("malformed hold"))?;
                let first: i64 = first.parse().map_err(|_| bad("malformed hold"))?;
                if !crate::settings::valid_topic_name(topic) || partition < 0 || first < 0 {
                    return Err(bad("malformed hold"));
                }
                cursor.hold(topic, partition, &pause_id(pause)?, first);
                continue;
            }
            if let Some(injection) = entry.strip_prefix('!') {
                let (pause, progress) = injection
                    .split_once('.')
                    .ok_or_else(|| bad("malformed injection"))?;
                let injected = match progress {
                    "done" => Injected::Done,
                    seq => Injected::UpTo(seq.parse().map_err(|_| bad("malformed injection"))?),
                };
                cursor.set_injected(&pause_id(pause)?, Some(injected));
                continue;
            }
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
    fn holds_and_injections_round_trip_and_a_plain_cursor_is_unchanged() {
        let mut cursor = Cursor::default();
        cursor.set("task_in", 0, 12);
        let plain = cursor.encode();
        cursor.hold("task_in", 0, "0a1b2c3d4e5f", 7);
        cursor.hold("task_in", 0, "0a1b2c3d4e5f", 9);
        cursor.set_injected("ffff00001111", Some(Injected::UpTo(41)));
        cursor.set_injected("abcdabcdabcd", Some(Injected::Done));
        let decoded = Cursor::decode(&cursor.encode()).unwrap();
        assert_eq!(decoded, cursor);
        assert_eq!(decoded.held_from("task_in", 0, "0a1b2c3d4e5f"), Some(7));
        cursor.set_held_from("task_in", 0, "0a1b2c3d4e5f", None);
        cursor.set_injected("ffff00001111", None);
        cursor.set_injected("abcdabcdabcd", None);
        assert!(!cursor.has_flow_state());
        assert_eq!(cursor.encode(), plain);
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
