//! The `SERVICE:ACTION` filter language shared by the store, the gateway and flow control: one
//! parser (one-line errors naming the filter) and one matcher over an event's sender and type.
//!
//! A filter is `SERVICE:ACTION`, either side `*`; several filters are ORed. The five
//! subscription kinds: `lk:*` (one sender), `*:create_user` (a type from anyone),
//! `lk:create_user` + `arm:update_user`, `lk:*` + `arm:*` (several senders), `*:*` (everything).
//! An event's sender and type come from its `service`/`action` headers when present (no parse),
//! else from its envelope.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

/// One side of a filter: a name, or `*` for any.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Part {
    Any,
    Name(String),
}

impl Part {
    fn matches(&self, value: &str) -> bool {
        match self {
            Part::Any => true,
            Part::Name(name) => name == value,
        }
    }

    /// Some value both sides match: `*` meets anything, two names only themselves.
    fn overlaps(&self, other: &Part) -> bool {
        match (self, other) {
            (Part::Any, _) | (_, Part::Any) => true,
            (Part::Name(a), Part::Name(b)) => a == b,
        }
    }

    /// The name, or `None` for `*`.
    pub fn name(&self) -> Option<&str> {
        match self {
            Part::Any => None,
            Part::Name(name) => Some(name),
        }
    }
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Part::Any => f.write_str("*"),
            Part::Name(name) => f.write_str(name),
        }
    }
}

/// `SERVICE:ACTION`, either side `*`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Filter {
    pub service: Part,
    pub action: Part,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("filter {filter:?}: {reason}")]
pub struct FilterError {
    pub filter: String,
    pub reason: String,
}

/// The longest service or action name a filter accepts (longer ones are a mistake).
const MAX_NAME_BYTES: usize = 249;

fn parse_part(text: &str, side: &str, filter: &str) -> Result<Part, FilterError> {
    let error = |reason: String| FilterError {
        filter: filter.to_string(),
        reason,
    };
    if text == "*" {
        return Ok(Part::Any);
    }
    if text.is_empty() {
        return Err(error(format!("the {side} is empty (use * for any {side})")));
    }
    if text.len() > MAX_NAME_BYTES {
        return Err(error(format!(
            "the {side} is longer than {MAX_NAME_BYTES} bytes"
        )));
    }
    if let Some(bad) = text
        .chars()
        .find(|c| !(c.is_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(error(format!(
            "the {side} {text:?} contains {bad:?}: names are letters, digits, '_', '-' and '.', or * alone"
        )));
    }
    Ok(Part::Name(text.to_string()))
}

impl FromStr for Filter {
    type Err = FilterError;
    fn from_str(text: &str) -> Result<Filter, FilterError> {
        let trimmed = text.trim();
        let Some((service, action)) = trimmed.split_once(':') else {
            return Err(FilterError {
                filter: text.to_string(),
                reason: "expected SERVICE:ACTION, either side * (e.g. lk:*, *:create_user)".into(),
            });
        };
        if action.contains(':') {
            return Err(FilterError {
                filter: text.to_string(),
                reason: "more than one ':' (expected SERVICE:ACTION)".into(),
            });
        }
        Ok(Filter {
            service: parse_part(service, "service", text)?,
            action: parse_part(action, "action", text)?,
        })
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.service, self.action)
    }
}

impl Filter {
    pub fn matches(&self, service: &str, action: &str) -> bool {
        self.service.matches(service) && self.action.matches(action)
    }

    pub fn is_everything(&self) -> bool {
        self.service == Part::Any && self.action == Part::Any
    }

    /// Some event matches both: `lk:*` and `*:update_user` share `lk:update_user`.
    pub fn overlaps(&self, other: &Filter) -> bool {
        self.service.overlaps(&other.service) && self.action.overlaps(&other.action)
    }
}

/// Several filters, ORed. Parsed from any number of arguments, each one filter or a
/// comma-separated list of them; at least one filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterSet {
    filters: Vec<Filter>,
}

impl FilterSet {
    pub fn parse<S: AsRef<str>>(arguments: &[S]) -> Result<FilterSet, FilterError> {
        let mut filters: Vec<Filter> = Vec::new();
        for argument in arguments {
            for text in argument.as_ref().split(',') {
                if text.trim().is_empty() {
                    continue;
                }
                let filter: Filter = text.parse()?;
                if !filters.contains(&filter) {
                    filters.push(filter);
                }
            }
        }
        if filters.is_empty() {
            return Err(FilterError {
                filter: arguments
                    .iter()
                    .map(|a| a.as_ref())
                    .collect::<Vec<_>>()
                    .join(","),
                reason: "no filter given (use *:* for everything)".into(),
            });
        }
        Ok(FilterSet { filters })
    }

    /// Everything (`*:*`).
    pub fn everything() -> FilterSet {
        FilterSet {
            filters: vec![Filter {
                service: Part::Any,
                action: Part::Any,
            }],
        }
    }

    pub fn filters(&self) -> &[Filter] {
        &self.filters
    }

    pub fn matches(&self, service: &str, action: &str) -> bool {
        self.filters.iter().any(|f| f.matches(service, action))
    }

    pub fn is_everything(&self) -> bool {
        self.filters.iter().any(Filter::is_everything)
    }

    /// Some event matches both sets (flow control refuses two such pauses in one scope, so an
    /// event is held by at most one): one filter of each that overlap.
    pub fn overlaps(&self, other: &FilterSet) -> bool {
        self.filters
            .iter()
            .any(|a| other.filters.iter().any(|b| a.overlaps(b)))
    }
}

impl fmt::Display for FilterSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let texts: Vec<String> = self.filters.iter().map(Filter::to_string).collect();
        f.write_str(&texts.join(","))
    }
}

/// An event's sender and type: what filters match on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SenderAndType<'a> {
    pub service: Cow<'a, str>,
    pub action: Cow<'a, str>,
}

/// Just the envelope fields that name its sender and type; anything else in the value is
/// skipped without being parsed into a tree.
#[derive(Deserialize)]
struct EnvelopeNames<'a> {
    #[serde(borrow, default)]
    service: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    action: Option<Cow<'a, str>>,
}

impl<'a> SenderAndType<'a> {
    /// From the `service`/`action` headers when both are present, else from the JSON envelope;
    /// a side that neither names is empty (it matches only `*`).
    pub fn of(
        service_header: Option<&'a [u8]>,
        action_header: Option<&'a [u8]>,
        json_value: Option<&'a [u8]>,
    ) -> SenderAndType<'a> {
        if let (Some(service), Some(action)) = (service_header, action_header) {
            return SenderAndType {
                service: String::from_utf8_lossy(service),
                action: String::from_utf8_lossy(action),
            };
        }
        let names = json_value
            .and_then(|value| serde_json::from_slice::<EnvelopeNames<'a>>(value).ok())
            .unwrap_or(EnvelopeNames {
                service: None,
                action: None,
            });
        SenderAndType {
            service: service_header
                .map(String::from_utf8_lossy)
                .or(names.service)
                .unwrap_or_default(),
            action: action_header
                .map(String::from_utf8_lossy)
                .or(names.action)
                .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(filters: &[&str]) -> FilterSet {
        FilterSet::parse(filters).unwrap()
    }

    #[test]
    fn the_five_subscription_kinds_match_what_they_say() {
        let events = [
            ("lk", "create_user"),
            ("lk", "update_user"),
            ("arm", "create_user"),
            ("arm", "update_user"),
            ("orm", "start_task"),
        ];
        /// The filters given, and the events they select.
        type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)]);
        let cases: [Case; 5] = [
            (&["lk:*"], &[("lk", "create_user"), ("lk", "update_user")]),
            (
                &["*:create_user", "*:update_user"],
                &[
                    ("lk", "create_user"),
                    ("lk", "update_user"),
                    ("arm", "create_user"),
                    ("arm", "update_user"),
                ],
            ),
            (
                &["lk:create_user", "arm:update_user"],
                &[("lk", "create_user"), ("arm", "update_user")],
            ),
            (
                &["lk:*,arm:*"],
                &[
                    ("lk", "create_user"),
                    ("lk", "update_user"),
                    ("arm", "create_user"),
                    ("arm", "update_user"),
                ],
            ),
            (&["*:*"], &events),
        ];
        for (filters, expected) in cases {
            let filters = set(filters);
            let matched: Vec<_> = events
                .iter()
                .copied()
                .filter(|(s, a)| filters.matches(s, a))
                .collect();
            assert_eq!(matched, expected, "{filters}");
        }
        assert!(set(&["*:*"]).is_everything());
        assert!(!set(&["lk:*"]).is_everything());
    }

    #[test]
    fn malformed_filters_are_one_line_errors_naming_them() {
        for (text, reason) in [
            ("lk", "expected SERVICE:ACTION"),
            (":create_user", "the service is empty"),
            ("lk:", "the action is empty"),
            ("lk:a:b", "more than one ':'"),
            ("l k:*", "contains ' '"),
            ("lk:cre*ate", "contains '*'"),
        ] {
            let error = FilterSet::parse(&[text]).unwrap_err();
            let message = error.to_string();
            assert!(message.contains(&format!("{text:?}")), "{message}");
            assert!(message.contains(reason), "{message}");
            assert!(!message.contains('\n'));
        }
        let error = FilterSet::parse::<&str>(&[]).unwrap_err();
        assert!(error.to_string().contains("no filter given"));
    }

    #[test]
    fn duplicates_and_blanks_are_dropped_and_display_round_trips() {
        let filters = set(&["lk:*, lk:*", "", "*:update_user"]);
        assert_eq!(filters.to_string(), "lk:*,*:update_user");
        assert_eq!(FilterSet::parse(&[filters.to_string()]).unwrap(), filters);
    }

    #[test]
    fn sets_overlap_when_some_event_matches_both() {
        let overlapping = [
            ("lk:*", "*:update_user"),
            ("lk:*", "lk:create_user"),
            ("lk:*", "lk:*"),
            ("*:*", "arm:update_user"),
            ("lk:create_user,arm:*", "arm:create_user"),
            ("*:create_user", "lk:*,orm:start_task"),
        ];
        for (a, b) in overlapping {
            assert!(set(&[a]).overlaps(&set(&[b])), "{a} overlaps {b}");
            assert!(set(&[b]).overlaps(&set(&[a])), "{b} overlaps {a}");
        }
        let disjoint = [
            ("lk:*", "arm:*"),
            ("lk:create_user", "lk:update_user"),
            ("*:create_user", "*:update_user"),
            (
                "lk:create_user,arm:update_user",
                "lk:update_user,arm:create_user",
            ),
        ];
        for (a, b) in disjoint {
            assert!(!set(&[a]).overlaps(&set(&[b])), "{a} is disjoint from {b}");
            assert!(!set(&[b]).overlaps(&set(&[a])), "{b} is disjoint from {a}");
        }
    }

    #[test]
    fn sender_and_type_prefer_headers_then_the_envelope() {
        let envelope = br#"{"service":"arm","action":"update_user","payload":{}}"#;
        let from_headers = SenderAndType::of(Some(b"lk"), Some(b"create_user"), Some(envelope));
        assert_eq!(
            (&*from_headers.service, &*from_headers.action),
            ("lk", "create_user")
        );
        let from_body = SenderAndType::of(None, None, Some(envelope));
        assert_eq!(
            (&*from_body.service, &*from_body.action),
            ("arm", "update_user")
        );
        let mixed = SenderAndType::of(Some(b"lk"), None, Some(envelope));
        assert_eq!((&*mixed.service, &*mixed.action), ("lk", "update_user"));
        let neither = SenderAndType::of(None, None, Some(b"\xff not json"));
        assert_eq!((&*neither.service, &*neither.action), ("", ""));
        let other_json = SenderAndType::of(None, None, Some(br#"[1,2]"#));
        assert_eq!((&*other_json.service, &*other_json.action), ("", ""));
    }
}
