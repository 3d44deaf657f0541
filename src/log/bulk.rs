//! The bulk API's pure side: request lines, per-item outcome classification (what is done, what
//! to retry, what is rejected for good), and the exponential backoff with jitter between retries.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

/// The action line plus document line of one bulk item, newline-terminated.
/// `create`: an existing `_id` answers 409 instead of being rewritten, so a replay after a crash
/// costs no reindexing, leaves `_version` at 1, and the 409 tells us the document is there.
pub fn bulk_lines(index: &str, id: &str, document: &[u8]) -> Vec<u8> {
    let action = serde_json::json!({"create": {"_index": index, "_id": id}});
    let mut lines = Vec::with_capacity(64 + document.len());
    // Serializing a Value into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut lines, &action);
    lines.push(b'\n');
    lines.extend_from_slice(document);
    lines.push(b'\n');
    lines
}

/// What happened to one bulk item.
#[derive(Debug, Clone, PartialEq)]
pub enum ItemOutcome {
    Indexed,
    /// 409 on `create` with our deterministic id: an earlier attempt already wrote it.
    AlreadyIndexed,
    /// Overload or a transient server fault: send the item again later.
    Retry {
        reason: String,
    },
    /// The document itself is refused (mapping or parse error): dead-letter it.
    Rejected {
        status: u16,
        error_type: String,
        reason: String,
    },
}

/// What to do about a whole bulk request that did not yield per-item results.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BulkError {
    /// Unreachable, timed out, 429 or 5xx: retry the whole batch after a backoff.
    #[error("{0}")]
    Retryable(String),
    /// Authentication, a request we built wrong or one too large: retrying cannot help.
    #[error("{0}")]
    Fatal(String),
}

/// Classifies a whole-request HTTP status when it is not 2xx.
pub fn classify_request_failure(status: u16, body: &str) -> BulkError {
    let body: String = body.chars().take(500).collect();
    match status {
        408 | 429 | 500..=599 => BulkError::Retryable(format!("HTTP {status}: {body}")),
        401 | 403 => BulkError::Fatal(format!(
            "HTTP {status}: Elasticsearch refused the credentials (check the username/password or API key): {body}"
        )),
        413 => BulkError::Fatal(format!(
            "HTTP 413: bulk request too large for Elasticsearch (lower log.batch_max_bytes): {body}"
        )),
        _ => BulkError::Fatal(format!("HTTP {status}: {body}")),
    }
}

#[derive(Deserialize)]
struct BulkResponse {
    #[serde(default)]
    errors: bool,
    items: Vec<std::collections::HashMap<String, BulkItem>>,
}

#[derive(Deserialize)]
struct BulkItem {
    status: u16,
    #[serde(default)]
    error: Option<Value>,
}

/// Parses a 2xx bulk response into one outcome per request item, in request order.
pub fn parse_response(body: &[u8], items: usize) -> Result<Vec<ItemOutcome>, BulkError> {
    let response: BulkResponse = serde_json::from_slice(body).map_err(|e| {
        BulkError::Retryable(format!(
            "unreadable bulk response ({e}); retrying the batch"
        ))
    })?;
    if response.items.len() != items {
        return Err(BulkError::Retryable(format!(
            "bulk response has {} items for {items} sent; retrying the batch",
            response.items.len()
        )));
    }
    Ok(response
        .items
        .into_iter()
        .map(|item| {
            // Each item is `{"<op_type>": {...}}`; only one key.
            let item = item.into_values().next();
            match item {
                Some(item) if !response.errors && item.error.is_none() => ItemOutcome::Indexed,
                Some(item) => classify_item(item.status, item.error.as_ref()),
                None => ItemOutcome::Retry {
                    reason: "empty bulk item".into(),
                },
            }
        })
        .collect())
}

/// Classifies one item by status and error type.
pub fn classify_item(status: u16, error: Option<&Value>) -> ItemOutcome {
    let error_type = error
        .and_then(|e| e.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_string();
    let reason = error.map(describe_error).unwrap_or_default();
    match status {
        200..=299 => ItemOutcome::Indexed,
        409 if error_type == "version_conflict_engine_exception" => ItemOutcome::AlreadyIndexed,
        429 | 500..=599 => ItemOutcome::Retry { reason },
        _ if error_type == "es_rejected_execution_exception"
            || error_type == "rejected_execution_exception"
            || error_type == "circuit_breaking_exception" =>
        {
            ItemOutcome::Retry { reason }
        }
        _ => ItemOutcome::Rejected {
            status,
            error_type,
            reason,
        },
    }
}

/// `type: reason` of an error and of its causes, on one line.
fn describe_error(error: &Value) -> String {
    let mut parts = Vec::new();
    let mut current = Some(error);
    while let Some(e) = current {
        let kind = e.get("type").and_then(Value::as_str).unwrap_or("error");
        let reason = e.get("reason").and_then(Value::as_str).unwrap_or("");
        parts.push(format!("{kind}: {reason}"));
        current = e.get("caused_by");
        if parts.len() >= 4 {
            break;
        }
    }
    parts.join("; caused by ")
}

/// Exponential backoff with jitter: the n-th retry waits a random time in [d/2, d] with
/// d = min(initial × 2ⁿ, max), so many stages retrying at once do not hit Elasticsearch in step.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The next delay; `unit` in [0, 1) is the random draw (passed in to keep this pure).
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let exponent = self.attempt.min(30);
        self.attempt = self.attempt.saturating_add(1);
        let ceiling = self
            .initial
            .saturating_mul(1u32 << exponent.min(20))
            .min(self.max);
        ceiling.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }

    /// Progress was made: the next failure starts from the initial delay again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bulk_lines_are_two_ndjson_lines_with_create() {
        let document = serde_json::to_vec(&json!({"message": "a\nb"})).unwrap();
        let lines = bulk_lines("idx-2024.01.01", "info_in-0-1", &document);
        let text = String::from_utf8(lines).unwrap();
        let mut it = text.split_terminator('\n');
        let action: Value = serde_json::from_str(it.next().unwrap()).unwrap();
        assert_eq!(action["create"]["_id"], "info_in-0-1");
        assert_eq!(action["create"]["_index"], "idx-2024.01.01");
        let doc: Value = serde_json::from_str(it.next().unwrap()).unwrap();
        assert_eq!(doc["message"], "a\nb");
        assert!(it.next().is_none());
    }

    #[test]
    fn items_are_classified_by_status_and_type() {
        let body = json!({"errors": true, "items": [
            {"create": {"status": 201}},
            {"create": {"status": 409, "error": {"type": "version_conflict_engine_exception", "reason": "exists"}}},
            {"create": {"status": 429, "error": {"type": "es_rejected_execution_exception", "reason": "queue full"}}},
            {"create": {"status": 503, "error": {"type": "unavailable_shards_exception", "reason": "primary shard is not active"}}},
            {"create": {"status": 400, "error": {"type": "document_parsing_exception", "reason": "failed to parse field [data]",
                "caused_by": {"type": "illegal_argument_exception", "reason": "depth limit"}}}},
            {"index": {"status": 400, "error": {"type": "es_rejected_execution_exception", "reason": "odd status"}}},
        ]});
        let outcomes = parse_response(body.to_string().as_bytes(), 6).unwrap();
        assert_eq!(outcomes[0], ItemOutcome::Indexed);
        assert_eq!(outcomes[1], ItemOutcome::AlreadyIndexed);
        assert!(matches!(outcomes[2], ItemOutcome::Retry { .. }));
        assert!(matches!(outcomes[3], ItemOutcome::Retry { .. }));
        assert_eq!(
            outcomes[4],
            ItemOutcome::Rejected {
                status: 400,
                error_type: "document_parsing_exception".into(),
                reason: "document_parsing_exception: failed to parse field [data]; caused by illegal_argument_exception: depth limit".into(),
            }
        );
        assert!(matches!(outcomes[5], ItemOutcome::Retry { .. }));
    }

    #[test]
    fn mismatched_or_unreadable_responses_retry_the_batch() {
        let body = json!({"errors": false, "items": [{"create": {"status": 201}}]}).to_string();
        assert!(matches!(
            parse_response(body.as_bytes(), 2),
            Err(BulkError::Retryable(_))
        ));
        assert!(matches!(
            parse_response(b"<html>", 1),
            Err(BulkError::Retryable(_))
        ));
    }

    #[test]
    fn request_failures_split_into_retryable_and_fatal() {
        for status in [408, 429, 500, 502, 503, 504] {
            assert!(matches!(
                classify_request_failure(status, ""),
                BulkError::Retryable(_)
            ));
        }
        for status in [400, 401, 403, 404, 413] {
            assert!(matches!(
                classify_request_failure(status, ""),
                BulkError::Fatal(_)
            ));
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter_in_the_upper_half() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let ceilings = [100, 200, 400, 800, 1600, 2000, 2000];
        for ceiling in ceilings {
            let mut probe = b.clone();
            let low = probe.next_delay(0.0);
            let high = b.next_delay(1.0);
            assert_eq!(high, Duration::from_millis(ceiling));
            assert_eq!(low, Duration::from_millis(ceiling / 2));
        }
        b.reset();
        assert_eq!(b.next_delay(1.0), Duration::from_millis(100));
        assert_eq!(b.attempts(), 1);
    }
}
