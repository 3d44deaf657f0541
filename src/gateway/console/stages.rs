//! The console's view of the stages: each configured stage's `/metrics` scraped every two
//! seconds, turned into events in and out per second, consumer lag and dead letters by kind.
//!
//! The gateway scrapes the stages itself, so the console works without Prometheus; rates come
//! from successive scrapes, and a stage that does not answer is shown as down with the reason.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::redact_url;

/// How often every stage is scraped.
pub const SCRAPE_EVERY: Duration = Duration::from_secs(2);
/// How long one scrape may take before its stage counts as down.
const SCRAPE_TIMEOUT: Duration = Duration::from_millis(1500);
/// Rate samples kept per stage: ten minutes at one every two seconds.
const HISTORY: usize = 300;

/// Where a stage's metrics are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// This gateway's own recorder, read in process (its /metrics port may be chosen at bind).
    Local,
    Url(url::Url),
}

/// One `--console-stage NAME=URL` (URL `self`: this gateway).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageTarget {
    pub name: String,
    pub source: Source,
}

/// The stages scraped when none are configured: scripts/demo's ports (deploy/prometheus.yml
/// scrapes the same), and this gateway itself.
pub const DEFAULT_STAGES: &[&str] = &[
    "dispatch=http://127.0.0.1:19464/metrics",
    "log=http://127.0.0.1:19465/metrics",
    "aggregate=http://127.0.0.1:19466/metrics",
    "store=http://127.0.0.1:19467/metrics",
    "gateway=self",
];

impl StageTarget {
    /// `NAME=URL` (`http(s)://...`, or `self`), or why not.
    pub fn parse(text: &str) -> Result<StageTarget, String> {
        let (name, source) = text
            .split_once('=')
            .ok_or("expected NAME=URL, e.g. dispatch=http://127.0.0.1:19464/metrics")?;
        let name = name.trim();
        let valid_name = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !valid_name {
            return Err(format!("stage name {name:?}: 1 to 64 of A-Z a-z 0-9 - _ ."));
        }
        let source = match source.trim() {
            "self" => Source::Local,
            url => {
                let parsed =
                    url::Url::parse(url).map_err(|e| format!("{}: {e}", redact_url(url)))?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    return Err(format!("{}: expected an http(s) URL", redact_url(url)));
                }
                Source::Url(parsed)
            }
        };
        Ok(StageTarget {
            name: name.to_string(),
            source,
        })
    }

    /// Where it is read, as the console may show it (no password).
    fn shown_source(&self) -> String {
        match &self.source {
            Source::Local => "this gateway".into(),
            Source::Url(url) => redact_url(url.as_str()),
        }
    }
}

/// One series of a scrape: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The samples of a Prometheus text exposition; lines it cannot read are skipped (a scrape is
/// for looking at, and one odd line should not hide a stage).
pub fn parse_exposition(text: &str) -> Vec<Sample> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices();
        let mut current = String::new();
        let mut key = String::new();
        let close;
        loop {
            let (i, c) = chars.next()?;
            match c {
                '}' => {
                    close = i;
                    break;
                }
                '=' => key = std::mem::take(&mut current).trim().trim_matches(',').into(),
                '"' => {
                    let mut value = String::new();
                    loop {
                        let (_, c) = chars.next()?;
                        match c {
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            '"' => break,
                            other => value.push(other),
                        }
                    }
                    labels.push((std::mem::take(&mut key), value));
                }
                ',' => {}
                other => current.push(other),
            }
        }
        rest = &inner[close + 1..];
    }
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        number => number.parse().ok()?,
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Which series mean what for one kind of stage.
struct Kind {
    name: &'static str,
    /// Summed: records that entered the stage.
    inputs: &'static [Series],
    /// Summed: what the stage delivered downstream.
    outputs: &'static [Series],
    /// Bad input set aside, each with the label naming its kind (or a fixed kind).
    dead_letters: &'static [DeadLetters],
    /// Summed gauge: records behind.
    lag: Option<&'static str>,
}

struct Series {
    metric: &'static str,
    /// Only the series with this label value.
    only: Option<(&'static str, &'static str)>,
}

const fn all(metric: &'static str) -> Series {
    Series { metric, only: None }
}

struct DeadLetters {
    metric: &'static str,
    kind: KindFrom,
    only: Option<(&'static str, &'static str)>,
}

enum KindFrom {
    Label(&'static str),
    Fixed(&'static str),
}

/// The stages of this repository and the metrics each records (src/*/metrics.rs).
const KINDS: &[Kind] = &[
    Kind {
        name: "dispatch",
        inputs: &[all("eventpipe_dispatch_consumed_total")],
        outputs: &[all("eventpipe_dispatch_produced_total")],
        dead_letters: &[DeadLetters {
            metric: "eventpipe_dispatch_dead_lettered_total",
            kind: KindFrom::Label("kind"),
            only: None,
        }],
        lag: Some("eventpipe_dispatch_consumer_lag_messages"),
    },
    Kind {
        name: "log",
        inputs: &[all("eventpipe_log_consumed_total")],
        outputs: &[all("eventpipe_log_indexed_total")],
        dead_letters: &[DeadLetters {
            metric: "eventpipe_log_dead_lettered_total",
            kind: KindFrom::Label("kind"),
            only: None,
        }],
        lag: Some("eventpipe_log_consumer_lag_messages"),
    },
    Kind {
        name: "aggregate",
        inputs: &[
            all("eventpipe_aggregate_aggregated_events_total"),
            all("eventpipe_aggregate_failed_events_total"),
        ],
        outputs: &[all("eventpipe_aggregate_emitted_windows_total")],
        dead_letters: &[
            DeadLetters {
                metric: "eventpipe_aggregate_failed_events_total",
                kind: KindFrom::Label("reason"),
                only: None,
            },
            DeadLetters {
                metric: "eventpipe_aggregate_late_events_total",
                kind: KindFrom::Fixed("late"),
                only: Some(("outcome", "dead_lettered")),
            },
        ],
        lag: Some("eventpipe_aggregate_consumer_lag_messages"),
    },
    Kind {
        name: "store",
        inputs: &[all("eventpipe_store_rows_total")],
        outputs: &[Series {
            metric: "eventpipe_store_rows_total",
            only: Some(("outcome", "stored")),
        }],
        // The store keeps bad input as raw rows rather than dead-lettering it.
        dead_letters: &[
            DeadLetters {
                metric: "eventpipe_store_raw_rows_total",
                kind: KindFrom::Fixed("stored_raw"),
                only: None,
            },
            DeadLetters {
                metric: "eventpipe_store_refused_rows_total",
                kind: KindFrom::Fixed("refused"),
                only: None,
            },
        ],
        lag: Some("eventpipe_store_consumer_lag_messages"),
    },
    Kind {
        name: "gateway",
        inputs: &[all("eventpipe_gateway_events_accepted_total")],
        outputs: &[all("eventpipe_gateway_frames_sent_total")],
        dead_letters: &[DeadLetters {
            metric: "eventpipe_gateway_events_rejected_total",
            kind: KindFrom::Fixed("rejected"),
            only: None,
        }],
        lag: Some("eventpipe_gateway_subscription_lag_max_events"),
    },
];

/// The kind of stage a scrape comes from: the configured name when it is a kind whose metrics
/// are there, else the first kind with any `eventpipe_<kind>_` series (so `dispatch-2` works).
fn kind_of<'k>(name: &str, samples: &[Sample]) -> Option<&'k Kind> {
    let present = |kind: &Kind| {
        let prefix = format!("eventpipe_{}_", kind.name);
        samples.iter().any(|s| s.name.starts_with(&prefix))
    };
    KINDS
        .iter()
        .find(|k| k.name == name && present(k))
        .or_else(|| KINDS.iter().find(|k| present(k)))
}

fn matches(sample: &Sample, metric: &str, only: Option<(&str, &str)>) -> bool {
    sample.name == metric && only.is_none_or(|(label, value)| sample.label(label) == Some(value))
}

fn sum(samples: &[Sample], series: &[Series]) -> f64 {
    series
        .iter()
        .flat_map(|s| samples.iter().filter(move |x| matches(x, s.metric, s.only)))
        .map(|x| x.value)
        .sum()
}

/// What one scrape says, reduced to what the console shows.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Reading {
    pub kind: Option<&'static str>,
    pub events_in: f64,
    pub events_out: f64,
    pub dead_letters: BTreeMap<String, f64>,
    pub lag: Option<f64>,
}

pub fn read(name: &str, samples: &[Sample]) -> Reading {
    let Some(kind) = kind_of(name, samples) else {
        return Reading::default();
    };
    let mut dead_letters = BTreeMap::new();
    for d in kind.dead_letters {
        for sample in samples.iter().filter(|s| matches(s, d.metric, d.only)) {
            let label = match d.kind {
                KindFrom::Label(label) => sample.label(label).unwrap_or("unknown"),
                KindFrom::Fixed(kind) => kind,
            };
            *dead_letters.entry(label.to_string()).or_insert(0.0) += sample.value;
        }
    }
    let lag = kind.lag.and_then(|metric| {
        let series: Vec<f64> = samples
            .iter()
            .filter(|s| s.name == metric)
            .map(|s| s.value)
            .collect();
        (!series.is_empty()).then(|| series.iter().sum())
    });
    Reading {
        kind: Some(kind.name),
        events_in: sum(samples, kind.inputs),
        events_out: sum(samples, kind.outputs),
        dead_letters,
        lag,
    }
}

/// Per second from `before` to `now` over `seconds`; a counter that went down was reset (the
/// stage restarted), so everything it counts now is new.
fn rate(before: f64, now: f64, seconds: f64) -> f64 {
    if seconds <= 0.0 {
        return 0.0;
    }
    let delta = if now >= before { now - before } else { now };
    delta / seconds
}

/// One point of a stage's chart.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Point {
    /// Unix milliseconds.
    pub at: i64,
    #[serde(rename = "in")]
    pub events_in: f64,
    #[serde(rename = "out")]
    pub events_out: f64,
    pub dead_letters: f64,
}

/// A stage as the console shows it.
#[derive(Debug, Clone, Serialize)]
pub struct StageView {
    pub name: String,
    pub kind: Option<&'static str>,
    pub source: String,
    pub up: bool,
    /// Why it is down (or not scraped yet).
    pub error: Option<String>,
    pub in_per_sec: f64,
    pub out_per_sec: f64,
    pub in_total: f64,
    pub out_total: f64,
    pub lag: Option<f64>,
    pub dead_letters: BTreeMap<String, f64>,
    pub dead_letters_per_sec: f64,
    pub history: VecDeque<Point>,
}

struct Stage {
    target: StageTarget,
    view: StageView,
    last: Option<(Instant, Reading)>,
}

/// Every configured stage's latest state; scraped by [`Stages::run`].
pub struct Stages {
    stages: RwLock<Vec<Stage>>,
    http: reqwest::Client,
}

impl Stages {
    pub fn new(targets: &[StageTarget]) -> Arc<Stages> {
        let stages = targets
            .iter()
            .map(|target| Stage {
                view: StageView {
                    name: target.name.clone(),
                    kind: None,
                    source: target.shown_source(),
                    up: false,
                    error: Some("not scraped yet".into()),
                    in_per_sec: 0.0,
                    out_per_sec: 0.0,
                    in_total: 0.0,
                    out_total: 0.0,
                    lag: None,
                    dead_letters: BTreeMap::new(),
                    dead_letters_per_sec: 0.0,
                    history: VecDeque::new(),
                },
                target: target.clone(),
                last: None,
            })
            .collect();
        let http = reqwest::Client::builder()
            .timeout(SCRAPE_TIMEOUT)
            .build()
            .unwrap_or_default();
        Arc::new(Stages {
            stages: RwLock::new(stages),
            http,
        })
    }

    pub fn views(&self) -> Vec<StageView> {
        let stages = self.stages.read().unwrap_or_else(|p| p.into_inner());
        stages.iter().map(|s| s.view.clone()).collect()
    }

    /// Scrapes every stage every [`SCRAPE_EVERY`] until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(SCRAPE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.scrape_all().await;
        }
    }

    /// One round: every stage at once, so a slow one delays none of the others.
    pub async fn scrape_all(&self) {
        let targets: Vec<StageTarget> = {
            let stages = self.stages.read().unwrap_or_else(|p| p.into_inner());
            stages.iter().map(|s| s.target.clone()).collect()
        };
        let scrapes = targets.iter().map(|target| async {
            let result = self.scrape(target).await;
            // When this stage answered: a rate divides by its own interval, not by the
            // slowest stage's.
            (Instant::now(), result)
        });
        let results = futures::future::join_all(scrapes).await;
        let at = Utc::now().timestamp_millis();
        let mut stages = self.stages.write().unwrap_or_else(|p| p.into_inner());
        for (stage, (answered, result)) in stages.iter_mut().zip(results) {
            stage.update(result, answered, at);
        }
    }

    async fn scrape(&self, target: &StageTarget) -> Result<Reading, String> {
        let text = match &target.source {
            Source::Local => local_exposition(),
            Source::Url(url) => {
                let response = self
                    .http
                    .get(url.clone())
                    .send()
                    .await
                    .map_err(|e| describe_error(&e))?;
                if !response.status().is_success() {
                    return Err(format!("answered {}", response.status()));
                }
                response.text().await.map_err(|e| describe_error(&e))?
            }
        };
        let samples = parse_exposition(&text);
        let reading = read(&target.name, &samples);
        if reading.kind.is_none() {
            return Err("answers, but with no eventpipe stage metrics".into());
        }
        Ok(reading)
    }
}

/// This process's own metrics, as its /metrics serves them.
fn local_exposition() -> String {
    let mut text = crate::telemetry::install_metrics_recorder().render();
    text.push_str(&crate::stage::lag::render());
    text
}

/// This process's own samples.
pub fn local_samples() -> Vec<Sample> {
    parse_exposition(&local_exposition())
}

/// The values of `metric`'s series summed by their `label`.
pub fn by_label(samples: &[Sample], metric: &str, label: &str) -> BTreeMap<String, f64> {
    let mut sums = BTreeMap::new();
    for sample in samples.iter().filter(|s| s.name == metric) {
        let key = sample.label(label).unwrap_or("unknown").to_string();
        *sums.entry(key).or_insert(0.0) += sample.value;
    }
    sums
}

/// reqwest's error without the URL (which may hold a password).
fn describe_error(error: &reqwest::Error) -> String {
    let what = if error.is_timeout() {
        "no answer within the scrape timeout"
    } else if error.is_connect() {
        "not reachable (connection refused or no route)"
    } else if error.is_decode() || error.is_body() {
        "a broken answer"
    } else {
        "the request failed"
    };
    what.to_string()
}

impl Stage {
    fn update(&mut self, result: Result<Reading, String>, now: Instant, at: i64) {
        let view = &mut self.view;
        match result {
            Err(error) => {
                view.up = false;
                view.error = Some(error);
                view.in_per_sec = 0.0;
                view.out_per_sec = 0.0;
                view.dead_letters_per_sec = 0.0;
                // The next answer's rates count from there, not across the outage.
                self.last = None;
            }
            Ok(reading) => {
                let dead_total: f64 = reading.dead_letters.values().sum();
                if let Some((then, before)) = &self.last {
                    let seconds = now.duration_since(*then).as_secs_f64();
                    let before_dead: f64 = before.dead_letters.values().sum();
                    view.in_per_sec = rate(before.events_in, reading.events_in, seconds);
                    view.out_per_sec = rate(before.events_out, reading.events_out, seconds);
                    view.dead_letters_per_sec = rate(before_dead, dead_total, seconds);
                    if view.history.len() == HISTORY {
                        view.history.pop_front();
                    }
                    view.history.push_back(Point {
                        at,
                        events_in: view.in_per_sec,
                        events_out: view.out_per_sec,
                        dead_letters: view.dead_letters_per_sec,
                    });
                }
                view.up = true;
                view.error = None;
                view.kind = reading.kind;
                view.in_total = reading.events_in;
                view.out_total = reading.events_out;
                view.lag = reading.lag;
                view.dead_letters = reading.dead_letters.clone();
                self.last = Some((now, reading));
            }
        }
    }
}

/// The targets by name, for the settings' check that no name repeats.
pub fn repeated_name(targets: &[StageTarget]) -> Option<&str> {
    let mut seen = HashMap::new();
    targets
        .iter()
        .find(|t| seen.insert(t.name.as_str(), ()).is_some())
        .map(|t| t.name.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DISPATCH: &str = r#"# HELP eventpipe_dispatch_consumed_total Records consumed
# TYPE eventpipe_dispatch_consumed_total counter
eventpipe_dispatch_consumed_total{topic="create_user_in"} 10
eventpipe_dispatch_consumed_total{topic="task_in"} 5
eventpipe_dispatch_produced_total{topic="info_in"} 12
eventpipe_dispatch_dead_lettered_total{topic="task_in",kind="malformed_json"} 2
eventpipe_dispatch_dead_lettered_total{topic="create_user_in",kind="malformed_json"} 1
eventpipe_dispatch_dead_lettered_total{topic="create_user_in",kind="unknown_action"} 1
eventpipe_dispatch_consumer_lag_messages{topic="create_user_in",partition="0"} 7
eventpipe_dispatch_consumer_lag_messages{topic="create_user_in",partition="1"} 3
eventpipe_dispatch_handler_seconds_bucket{le="+Inf"} 15
eventpipe_dispatch_paused 0
"#;

    #[test]
    fn the_exposition_is_read_with_labels_and_escapes() {
        let samples = parse_exposition(
            "a_total{x=\"1\",y=\"q\\\"uote\"} 3 1700000000\nb 2.5\nc{le=\"+Inf\"} +Inf\n# x\nbroken",
        );
        assert_eq!(samples.len(), 3);
        assert_eq!(samples[0].name, "a_total");
        assert_eq!(samples[0].label("y"), Some("q\"uote"));
        assert_eq!(samples[0].value, 3.0);
        assert_eq!(samples[1].value, 2.5);
        assert!(samples[2].value.is_infinite());
    }

    #[test]
    fn a_dispatch_scrape_reads_as_in_out_lag_and_dead_letters_by_kind() {
        let reading = read("dispatch-2", &parse_exposition(DISPATCH));
        assert_eq!(reading.kind, Some("dispatch"));
        assert_eq!(reading.events_in, 15.0);
        assert_eq!(reading.events_out, 12.0);
        assert_eq!(reading.lag, Some(10.0));
        assert_eq!(reading.dead_letters["malformed_json"], 3.0);
        assert_eq!(reading.dead_letters["unknown_action"], 1.0);
        assert_eq!(read("x", &parse_exposition("up 1")).kind, None);
    }

    #[test]
    fn series_sum_by_label() {
        let samples = parse_exposition(
            "d_total{reason=\"slow\",transport=\"sse\"} 2\n\
             d_total{reason=\"slow\",transport=\"ws\"} 1\n\
             d_total{reason=\"stalled\"} 4\nother{reason=\"x\"} 9\n",
        );
        let sums = by_label(&samples, "d_total", "reason");
        assert_eq!(sums.len(), 2);
        assert_eq!((sums["slow"], sums["stalled"]), (3.0, 4.0));
    }

    #[test]
    fn only_the_selected_series_count() {
        let store = "eventpipe_store_rows_total{outcome=\"stored\"} 8\n\
                     eventpipe_store_rows_total{outcome=\"already_stored\"} 2\n";
        let reading = read("store", &parse_exposition(store));
        assert_eq!((reading.events_in, reading.events_out), (10.0, 8.0));
        assert_eq!(reading.lag, None, "no lag series: unknown, not zero");
    }

    #[test]
    fn rates_survive_a_restart_and_outages_restart_them() {
        assert_eq!(rate(10.0, 30.0, 2.0), 10.0);
        assert_eq!(rate(100.0, 6.0, 2.0), 3.0, "a reset counts from zero");
        assert_eq!(rate(1.0, 2.0, 0.0), 0.0);
        let target = StageTarget::parse("dispatch=self").unwrap();
        let stages = Stages::new(&[target]);
        let mut all = stages.stages.write().unwrap();
        let stage = &mut all[0];
        let start = Instant::now();
        let reading = |n: f64| Reading {
            kind: Some("dispatch"),
            events_in: n,
            events_out: n,
            ..Reading::default()
        };
        stage.update(Ok(reading(10.0)), start, 0);
        assert!(stage.view.history.is_empty(), "one scrape has no rate");
        stage.update(Ok(reading(30.0)), start + Duration::from_secs(2), 2000);
        assert_eq!(stage.view.in_per_sec, 10.0);
        stage.update(Err("down".into()), start + Duration::from_secs(4), 4000);
        assert!(!stage.view.up && stage.view.in_per_sec == 0.0);
        stage.update(Ok(reading(50.0)), start + Duration::from_secs(6), 6000);
        assert_eq!(stage.view.history.len(), 1, "no rate across the outage");
    }

    #[test]
    fn targets_parse_or_say_why_not() {
        let target = StageTarget::parse("dispatch=http://u:secret@127.0.0.1:1/metrics").unwrap();
        assert!(!target.shown_source().contains("secret"));
        assert_eq!(
            StageTarget::parse("gateway=self").unwrap().source,
            Source::Local
        );
        for bad in [
            "dispatch",
            "=self",
            "a b=self",
            "x=ftp://h/m",
            "x=not a url",
        ] {
            assert!(StageTarget::parse(bad).is_err(), "{bad}");
        }
        let error = StageTarget::parse("x=ftp://u:secret@h/").unwrap_err();
        assert!(!error.contains("secret"), "{error}");
        let twice: Vec<StageTarget> = ["a=self", "b=self", "a=self"]
            .iter()
            .map(|t| StageTarget::parse(t).unwrap())
            .collect();
        assert_eq!(repeated_name(&twice), Some("a"));
        for default in DEFAULT_STAGES {
            StageTarget::parse(default).unwrap();
        }
    }
}
