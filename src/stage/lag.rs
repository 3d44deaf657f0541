//! Consumer lag per owned partition, from librdkafka's statistics, as Prometheus gauges that
//! disappear when their partition is revoked (the `metrics` registry cannot remove a series).

use std::collections::BTreeMap;
use std::sync::Mutex;

use rdkafka::statistics::Statistics;
use rdkafka::TopicPartitionList;

/// Lag by metric name, then by (topic, partition).
type LagTable = BTreeMap<&'static str, BTreeMap<(String, i32), i64>>;

/// Kept here rather than in the `metrics` registry because a series must disappear when its
/// partition is revoked; `render` appends these to /metrics.
static LAG: Mutex<LagTable> = Mutex::new(BTreeMap::new());

fn lag_table() -> std::sync::MutexGuard<'static, LagTable> {
    LAG.lock().unwrap_or_else(|p| p.into_inner())
}

/// Replaces `metric`'s series with the partitions this member owns in `statistics`. The lag is
/// counted from the consumer's position, not from its last commit: librdkafka's own
/// `consumer_lag` is stale under exactly once (offsets are committed through the transaction) and
/// missing for a group that has never committed. `read_committed` readers end at the last stable
/// offset.
pub fn record(metric: &'static str, statistics: &Statistics, read_committed: bool) {
    let mut owned = BTreeMap::new();
    for (topic, stats) in &statistics.topics {
        for (partition, p) in &stats.partitions {
            // Revoked partitions linger in the statistics with their last figures; only those
            // being fetched are owned (partition -1 is librdkafka's internal one).
            if *partition < 0 || p.fetch_state != "active" {
                continue;
            }
            if let Some(lag) = position_lag(p, read_committed) {
                owned.insert((topic.clone(), *partition), lag);
            }
        }
    }
    lag_table().insert(metric, owned);
}

/// Records between the position (the next offset the stage gets; before the first record, the
/// committed offset, or the beginning) and the end of the partition; `None` while unknown.
fn position_lag(p: &rdkafka::statistics::Partition, read_committed: bool) -> Option<i64> {
    let end = if read_committed && p.ls_offset >= 0 {
        p.ls_offset
    } else {
        p.hi_offset
    };
    let position = [p.app_offset, p.committed_offset, p.lo_offset]
        .into_iter()
        .find(|offset| *offset >= 0)?;
    (end >= 0).then(|| (end - position).max(0))
}

/// Drops revoked partitions from every lag metric at once, without waiting for the next report.
pub fn forget(partitions: &TopicPartitionList) {
    let mut table = lag_table();
    for series in table.values_mut() {
        for element in partitions.elements() {
            series.remove(&(element.topic().to_string(), element.partition()));
        }
    }
}

/// The lag gauges in Prometheus text format, for the /metrics endpoint.
pub fn render() -> String {
    use std::fmt::Write;
    let mut text = String::new();
    for (metric, series) in lag_table().iter() {
        let _ = writeln!(text, "# HELP {metric} Records between the consumer position and the high watermark, per owned partition.");
        let _ = writeln!(text, "# TYPE {metric} gauge");
        for ((topic, partition), lag) in series {
            let topic = topic.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = writeln!(
                text,
                "{metric}{{topic=\"{topic}\",partition=\"{partition}\"}} {lag}"
            );
        }
    }
    text
}
