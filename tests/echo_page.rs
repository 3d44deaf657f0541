//! The echo clients of examples/clients on a real gateway: the page in headless Chromium (over
//! SSE and WebSocket with tickets) and the two Node scripts show every event produced after they
//! are live exactly once, and when their gateway is killed and started again they reconnect by
//! themselves with their cursors, losing nothing.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::browser::Chromium;
use common::gateway::{envelope, Api, GatewayProcess, ADMIN};
use common::{create_topic, fresh_database_url, settings, unique, wait_until};
use serde::Deserialize;
use serde_json::Value;

/// Bounds each wait for the page (a hang, never a pace).
const PAGE_TIMEOUT: Duration = Duration::from_secs(60);
const TRANSPORTS: [&str; 2] = ["sse", "ws"];
const SENDERS: [&str; 3] = ["lk", "arm", "ops"];
const ACTIONS: [&str; 2] = ["create_user", "update_user"];

/// What one transport's panel shows a person.
#[derive(Debug, Deserialize)]
struct Panel {
    state: String,
    detail: String,
    /// `topic/partition/offset` of each listed event, newest first.
    keys: Vec<String>,
    /// `service:action` of each.
    senders: Vec<String>,
    messages: Vec<String>,
    events: String,
    reconnects: String,
    repeats: String,
    /// The page's problem line (empty while hidden).
    problem: String,
}

/// Every panel as JSON text.
const READ_PANELS: &str = r#"JSON.stringify(Object.fromEntries(["sse", "ws"].map((id) => {
  const panel = document.getElementById(id);
  const text = (selector) => panel.querySelector(selector)?.textContent ?? "";
  const rows = [...panel.querySelectorAll(".events li")];
  return [id, {
    state: panel.dataset.state,
    detail: text(".detail"),
    keys: rows.map((row) => row.dataset.key),
    senders: rows.map((row) => row.querySelector(".sender").textContent),
    messages: rows.map((row) => row.querySelector(".message").textContent),
    events: text(".events-count"),
    reconnects: text(".reconnects"),
    repeats: text(".repeats"),
    problem: document.getElementById("problem").hidden ? "" : document.getElementById("problem").textContent,
  }];
})))"#;

fn read_panels(value: &Value) -> Result<BTreeMap<String, Panel>, String> {
    let text = value.as_str().ok_or_else(|| format!("not text: {value}"))?;
    serde_json::from_str(text).map_err(|e| format!("{e}: {text}"))
}

/// Waits until every panel passes `accept`; returns the panels.
async fn wait_for_panels(
    browser: &mut Chromium,
    what: &str,
    accept: impl Fn(&Panel) -> bool,
) -> BTreeMap<String, Panel> {
    browser
        .wait_for(PAGE_TIMEOUT, what, READ_PANELS, |value| {
            let panels = read_panels(value)?;
            if panels.values().all(&accept) {
                Ok(panels)
            } else {
                Err(format!("{panels:#?}"))
            }
        })
        .await
}

/// Where a screenshot of the page goes: the tests' directory under target/.
fn screenshot_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.png"))
}

/// An event the page should list: what its row says.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Row {
    key: String,
    sender: String,
    message: String,
}

/// Posts `count` envelopes from every sender, numbered from `first`, through `gateway`'s
/// ingress; returns the rows of those the page's filters (`lk:*`, `arm:*`) select.
async fn produce(gateway: &Api, topic: &str, first: u64, count: u64) -> BTreeSet<Row> {
    let numbered: Vec<(u64, &str, &str)> = (first..first + count)
        .map(|n| {
            let service = SENDERS[(n % 3) as usize];
            (n, service, ACTIONS[((n / 3) % 2) as usize])
        })
        .collect();
    let lines: Vec<String> = numbered
        .iter()
        .map(|(n, service, action)| envelope(service, action, n % 7, *n))
        .collect();
    let (status, answer) = gateway.post_lines(topic, &lines, ADMIN).await;
    assert_eq!(status, 200, "{answer}");
    let results = answer["results"].as_array().expect("a result per line");
    numbered
        .iter()
        .zip(results)
        .filter(|((_, service, _), _)| *service != "ops")
        .map(|((n, service, action), result)| Row {
            key: format!("{topic}/{}/{}", result["partition"], result["offset"]),
            sender: format!("{service}:{action}"),
            message: format!("event {n}"),
        })
        .collect()
}

/// `shown` is exactly `expected`, each row once.
fn assert_shows(client: &str, shown: &[Row], expected: &BTreeSet<Row>) {
    let distinct: BTreeSet<Row> = shown.iter().cloned().collect();
    assert_eq!(shown.len(), distinct.len(), "{client}: a row twice");
    assert_eq!(&distinct, expected, "{client} shows what was produced");
}

/// Both lists show exactly `expected`, each row once, and the page counted no repeat.
fn assert_lists_show(panels: &BTreeMap<String, Panel>, expected: &BTreeSet<Row>) {
    for (transport, panel) in panels {
        let rows: Vec<Row> = (0..panel.keys.len())
            .map(|i| Row {
                key: panel.keys[i].clone(),
                sender: panel.senders[i].clone(),
                message: panel.messages[i].clone(),
            })
            .collect();
        assert_shows(&format!("the page's {transport} list"), &rows, expected);
        assert_eq!(panel.events, expected.len().to_string(), "{transport}");
        assert_eq!(panel.repeats, "0", "{transport}: the gateway repeated none");
    }
}

/// One of the Node echo scripts (`sse` or `ws`) as a child process, its output in files; killed
/// when dropped.
struct NodeEcho {
    transport: &'static str,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl NodeEcho {
    /// `node examples/clients/<transport>-echo.mjs`, filtering `lk:*` and `arm:*`.
    fn start(transport: &'static str, gateway: &Api, key: &str) -> NodeEcho {
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("examples/clients/{transport}-echo.mjs"));
        let files = std::env::temp_dir().join(unique(&format!("{transport}-echo")));
        let (stdout, stderr) = (files.with_extension("out"), files.with_extension("err"));
        let mut command = Command::new("node");
        if transport == "ws" {
            command.arg("--experimental-websocket");
        }
        let child = command
            .arg(&script)
            .args(["--filter", "lk:*", "--filter", "arm:*"])
            .env("EVENTPIPE_GATEWAY", &gateway.base)
            .env("EVENTPIPE_KEY", key)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("node does not start ({e}): examples/clients needs Node.js 20")
            });
        NodeEcho {
            transport,
            child,
            stdout,
            stderr,
        }
    }

    /// What it said about its connections.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// How many connections went live.
    fn times_live(&self) -> usize {
        self.log()
            .matches(&format!("{}: live", self.transport))
            .count()
    }

    /// The events it printed, one line each: `sse lk:create_user topic/2@17 key=3 "event 5"`.
    fn rows(&self) -> Vec<Row> {
        let text = std::fs::read_to_string(&self.stdout).unwrap_or_default();
        text.lines()
            .map(|line| {
                let mut words = line.splitn(4, ' ');
                let (_, sender, at) = (words.next(), words.next(), words.next());
                let (topic_partition, offset) =
                    at.and_then(|at| at.rsplit_once('@')).unwrap_or_default();
                let quoted = line
                    .find(" \"")
                    .map(|start| &line[start + 1..])
                    .unwrap_or_default();
                Row {
                    key: format!("{topic_partition}/{offset}"),
                    sender: sender.unwrap_or_default().to_string(),
                    message: serde_json::from_str(quoted).unwrap_or_else(|_| line.to_string()),
                }
            })
            .collect()
    }

    /// Waits until it printed `expected`'s many events; then they must be exactly those.
    async fn wait_for(&self, expected: &BTreeSet<Row>) {
        let client = format!("{}-echo.mjs", self.transport);
        wait_until(
            PAGE_TIMEOUT,
            &format!("{client} printing {} events", expected.len()),
            async || {
                let rows = self.rows();
                if rows.len() >= expected.len() {
                    Ok(rows)
                } else {
                    Err(format!("{rows:#?}\n{}", self.log()))
                }
            },
        )
        .await;
        assert_shows(&client, &self.rows(), expected);
    }
}

impl Drop for NodeEcho {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stdout);
        let _ = std::fs::remove_file(&self.stderr);
    }
}

/// Each event was printed to the console once per transport.
fn assert_console_shows(browser: &Chromium, expected: &BTreeSet<Row>) {
    for transport in TRANSPORTS {
        let lines: Vec<&str> = browser
            .console
            .iter()
            .filter(|line| line.kind == "log" && line.text.starts_with(&format!("{transport} ")))
            .map(|line| line.text.as_str())
            .collect();
        for row in expected {
            let (topic_partition, offset) = row.key.rsplit_once('/').unwrap();
            let coordinates = format!(" {topic_partition}@{offset} ");
            let printed: Vec<&&str> = lines
                .iter()
                .filter(|line| line.contains(&coordinates))
                .collect();
            assert_eq!(
                printed.len(),
                1,
                "{transport}: {row:?} printed once: {printed:?}"
            );
            let line = printed[0];
            assert!(
                line.starts_with(&format!("{transport} {} ", row.sender))
                    && line.ends_with(&format!("\"{}\"", row.message)),
                "{transport}: {line} for {row:?}"
            );
        }
        assert_eq!(lines.len(), expected.len(), "{transport}: {lines:#?}");
    }
}

#[tokio::test]
async fn the_echo_clients_show_every_event_once_across_a_gateway_restart() {
    let started = Instant::now();
    let mut browser = Chromium::launch(1400, 1000).await;
    let topic = unique("echo-page");
    create_topic(&settings(), &topic, 3).await;
    let (_, database) = fresh_database_url(&settings()).await;
    let topics = vec![topic.clone()];
    // The page's gateway, and a second instance on the same topics and credentials that the
    // producers use while the first is down.
    let (gateway, ingress) = tokio::join!(
        GatewayProcess::start(&topics, &database, &[]),
        GatewayProcess::start(&topics, &database, &[]),
    );
    let (_, key) = gateway
        .consumer_key("echo-reader", &["lk:*", "arm:*"])
        .await;

    browser
        .navigate(&gateway.url(&format!(
            "/echo?filter=lk:*&filter=arm:*&autostart=1#credential={key}"
        )))
        .await;
    let scripts = [
        NodeEcho::start("sse", &gateway, &key),
        NodeEcho::start("ws", &gateway, &key),
    ];
    wait_for_panels(&mut browser, "both transports live", |panel| {
        panel.state == "live"
    })
    .await;
    for script in &scripts {
        wait_until(
            PAGE_TIMEOUT,
            "the Node scripts live",
            async || match script.times_live() {
                1 => Ok(()),
                _ => Err(script.log()),
            },
        )
        .await;
    }
    let address_bar = browser.evaluate("location.href").await;
    assert!(
        !address_bar.as_str().unwrap_or_default().contains(&key),
        "the page took the key out of the address bar: {address_bar}"
    );

    // Live: what is produced now appears once in both lists.
    let mut expected = produce(&gateway, &topic, 0, 30).await;
    let panels = wait_for_panels(&mut browser, "the first 20 events listed", |panel| {
        panel.keys.len() >= expected.len()
    })
    .await;
    assert_lists_show(&panels, &expected);
    for script in &scripts {
        script.wait_for(&expected).await;
    }

    // The clients' gateway dies: both panels say so and retry.
    let address = gateway.address().to_string();
    let GatewayProcess { process, .. } = gateway;
    process.kill9();
    wait_for_panels(&mut browser, "both transports retrying", |panel| {
        panel.state == "retrying" && panel.detail.contains("reconnecting in")
    })
    .await;
    browser.screenshot(&screenshot_path("echo_page_down")).await;

    // Produced meanwhile through the other instance, then the gateway is back where it was.
    expected.extend(produce(&ingress, &topic, 30, 30).await);
    let restarted = GatewayProcess::start_on(&address, &topics, &database, &[]).await;
    let panels = wait_for_panels(
        &mut browser,
        "all 40 events listed after the restart",
        |panel| panel.state == "live" && panel.keys.len() >= expected.len(),
    )
    .await;
    assert_lists_show(&panels, &expected);
    for (transport, panel) in &panels {
        assert_ne!(panel.reconnects, "0", "{transport} reconnected by itself");
    }
    for script in &scripts {
        script.wait_for(&expected).await;
        assert!(script.times_live() >= 2, "{}", script.log());
    }

    // Live again on the new instance.
    expected.extend(produce(&restarted, &topic, 60, 30).await);
    let panels = wait_for_panels(&mut browser, "all 60 events listed", |panel| {
        panel.keys.len() >= expected.len()
    })
    .await;
    assert_lists_show(&panels, &expected);
    assert_console_shows(&browser, &expected);
    for script in &scripts {
        script.wait_for(&expected).await;
    }

    // Only tickets went into the streams' URLs, a fresh one for each connection, with the
    // cursor on every reconnect.
    let streams: Vec<&String> = browser
        .requests
        .iter()
        .filter(|url| url.contains("/v1/stream") || url.contains("/v1/ws"))
        .collect();
    assert!(streams.len() >= 4, "{streams:#?}");
    for url in &browser.requests {
        assert!(!url.contains(&key), "the key in a request's URL: {url}");
    }
    let mut tickets = BTreeSet::new();
    for url in &streams {
        let url = url::Url::parse(url).unwrap();
        let ticket = url
            .query_pairs()
            .find(|(name, _)| name == "ticket")
            .map(|(_, value)| value.into_owned())
            .unwrap_or_else(|| panic!("no ticket in {url}"));
        tickets.insert(ticket);
    }
    assert_eq!(
        tickets.len(),
        streams.len(),
        "a fresh ticket for each connection: {streams:#?}"
    );
    for transport in ["/v1/stream", "/v1/ws"] {
        let last = streams
            .iter()
            .rev()
            .find(|url| url.contains(&format!("{transport}?")))
            .unwrap();
        let cursor = if transport == "/v1/ws" {
            "from="
        } else {
            "last_event_id="
        };
        assert!(last.contains(cursor), "a reconnect resumes: {last}");
    }

    let problems: Vec<_> = browser
        .console
        .iter()
        .filter(|line| line.text.contains("Content Security Policy"))
        .collect();
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(browser.exceptions.is_empty(), "{:#?}", browser.exceptions);

    let screenshot = screenshot_path("echo_page");
    browser.screenshot(&screenshot).await;
    println!(
        "echo clients: {} events on each across a restart in {:?}; screenshot {}",
        expected.len(),
        started.elapsed(),
        screenshot.display()
    );
}

#[tokio::test]
async fn the_echo_page_says_why_it_is_refused_and_does_not_retry() {
    let mut browser = Chromium::launch(1400, 1000).await;
    let topic = unique("echo-refused");
    create_topic(&settings(), &topic, 1).await;
    let (_, database) = fresh_database_url(&settings()).await;
    let gateway = GatewayProcess::start(std::slice::from_ref(&topic), &database, &[]).await;
    let (_, key) = gateway.consumer_key("echo-lk-reader", &["lk:*"]).await;
    for (credential, filter, reason) in [
        // A key the gateway never issued: the ticket is refused.
        ("ep_made_up_secret", "lk:*", "unauthorized"),
        // A key asking for more than its user may read: the stream is refused.
        (key.as_str(), "arm:*", "forbidden"),
    ] {
        browser
            .navigate(&gateway.url(&format!(
                "/echo?filter={filter}&autostart=1#credential={credential}"
            )))
            .await;
        let panels = wait_for_panels(&mut browser, "both transports refused", |panel| {
            panel.state == "refused"
        })
        .await;
        for (transport, panel) in &panels {
            assert!(
                panel.detail.starts_with(&format!("Refused: {reason}"))
                    && panel.problem.starts_with(reason),
                "{transport}: {panel:?}"
            );
            assert_eq!(panel.reconnects, "0", "{transport} did not retry a refusal");
        }
        let buttons = browser
            .evaluate(r#"["connect", "disconnect"].map((id) => document.getElementById(id)).map((b) => b.disabled ? "disabled" : b.textContent).join(" ")"#)
            .await;
        assert_eq!(buttons, "Connect disabled", "nothing is being followed");
    }
    browser
        .screenshot(&screenshot_path("echo_page_refused"))
        .await;
}
