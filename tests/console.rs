//! The console (`/console`) on a real gateway: its data endpoint refuses strangers (401) and
//! non-admins (403); in headless Chromium the admin logs in, sees a real `eventpipe dispatch`
//! and the gateway with non-zero rates while traffic runs, the counts they show equal to the
//! events posted and dead-lettered, a down stage as down, and creates a subscription, a user and
//! a key that the APIs then list.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::browser::Chromium;
use common::gateway::{envelope, Api, GatewayProcess, SseClient, ADMIN};
use common::{create_topic, fresh_database_url, settings, unique, wait_until, StageProcess};
use reqwest::Method;
use serde_json::{json, Value};

/// Bounds each wait for the page (a hang, never a pace).
const PAGE_TIMEOUT: Duration = Duration::from_secs(60);
/// A stage nobody serves: connection refused.
const DOWN_STAGE: &str = "log=http://127.0.0.1:9/metrics";

fn screenshot_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.png"))
}

/// A gateway serving `topics`, its console showing `stages` and itself.
async fn start_gateway(topics: &[String], stages: &[String]) -> GatewayProcess {
    let settings = settings();
    let (_pool, database_url) = fresh_database_url(&settings).await;
    let mut args: Vec<&str> = Vec::new();
    for stage in stages {
        args.extend(["--console-stage", stage]);
    }
    args.extend(["--console-stage", "gateway=self"]);
    GatewayProcess::start(topics, &database_url, &args).await
}

/// `eventpipe dispatch` from `input` to `info` (routes.toml's, pointed at it), dead letters to
/// `input.dlq`.
async fn start_dispatch(input: &str, info: &str) -> StageProcess {
    let settings = settings();
    create_topic(&settings, input, 3).await;
    create_topic(&settings, info, 3).await;
    create_topic(&settings, &format!("{input}.dlq"), 1).await;
    let worker = format!("{info}-worker");
    create_topic(&settings, &worker, 1).await;
    let routes =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/topics/routes.toml"))
            .unwrap()
            .replace("\"info_in\"", &format!("\"{info}\""))
            .replace("\"worker_start_orm\"", &format!("\"{worker}\""));
    let routes_file = std::env::temp_dir().join(format!("{input}-routes.toml"));
    std::fs::write(&routes_file, routes).unwrap();
    let group = format!("{input}-group");
    StageProcess::start(
        &[
            "dispatch",
            "--input-topics",
            input,
            "--routes-file",
            routes_file.to_str().unwrap(),
            "--group-id",
            &group,
        ],
        &[],
    )
}

/// Every this many events, one has an action no route knows (the dispatcher dead-letters it).
const UNKNOWN_EVERY: u64 = 20;

/// What was posted: every event Kafka acknowledged, and those of an unknown action.
#[derive(Debug, Default)]
struct Posted {
    events: u64,
    unknown: u64,
}

impl Posted {
    /// Posts the next `count` envelopes of `lk` in one batch, each acknowledged by Kafka.
    async fn post(&mut self, gateway: &Api, topic: &str, count: u64) {
        let numbers = self.events..self.events + count;
        let lines: Vec<String> = numbers
            .clone()
            .map(|n| {
                let action = if n % UNKNOWN_EVERY == 0 {
                    "no_such_action"
                } else {
                    "create_user"
                };
                envelope("lk", action, n % 11, n)
            })
            .collect();
        let (status, answer) = gateway.post_lines(topic, &lines, ADMIN).await;
        assert_eq!(
            (status, answer["accepted"].as_u64()),
            (200, Some(count)),
            "{answer}"
        );
        self.unknown += numbers.filter(|n| n % UNKNOWN_EVERY == 0).count() as u64;
        self.events += count;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_data_refuses_strangers_and_non_admins_with_json_reasons() {
    let topic = unique("console-auth");
    create_topic(&settings(), &topic, 3).await;
    let gateway = start_gateway(&[topic], &[DOWN_STAGE.to_string()]).await;
    let (_, consumer) = gateway.consumer_key(&unique("reader"), &["lk:*"]).await;
    // (method, path, credential, status and error code answered)
    let refused = [
        (Method::GET, "/v1/admin/overview", "", 401, "unauthorized"),
        (
            Method::GET,
            "/v1/admin/overview",
            &consumer,
            403,
            "forbidden",
        ),
        // A consumer key is not a login for the console either.
        (Method::POST, "/v1/login", &consumer, 401, "unauthorized"),
        (
            Method::GET,
            "/v1/admin/overview?history=maybe",
            ADMIN,
            400,
            "bad_query",
        ),
    ];
    for (method, path, token, status, code) in refused {
        let (answered, body) = gateway.call(method.clone(), path, None, token).await;
        assert_eq!(
            (answered, body["error"].as_str()),
            (status, Some(code)),
            "{method} {path}: {body}"
        );
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
    }
    let (status, body) = gateway
        .call(Method::GET, "/v1/admin/overview?history=false", None, ADMIN)
        .await;
    assert_eq!(status, 200, "{body}");
    let stages = body["stages"].as_array().expect("stages");
    assert_eq!(stages.len(), 2, "{body}");
    assert!(stages.iter().all(|s| s["history"] == json!([])), "{body}");

    // The console's login: the admin token buys an HttpOnly session cookie of an hour, which
    // reads the overview until it is logged out.
    let http = reqwest::Client::new();
    let login = http
        .post(gateway.url("/v1/login"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);
    let set_cookie = login.headers()["set-cookie"].to_str().unwrap().to_string();
    for attribute in [
        "ep_session=eps_",
        "HttpOnly",
        "SameSite=Strict",
        "Max-Age=3600",
    ] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    assert!(!set_cookie.contains(ADMIN));
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    let with_cookie = |method, path: &str| {
        http.request(method, gateway.url(path))
            .header("cookie", &cookie)
            .send()
    };
    let overview = with_cookie(Method::GET, "/v1/admin/overview")
        .await
        .unwrap();
    assert_eq!(overview.status(), 200);
    let logout = with_cookie(Method::POST, "/v1/logout").await.unwrap();
    assert_eq!(logout.status(), 204);
    let after = with_cookie(Method::GET, "/v1/admin/overview")
        .await
        .unwrap();
    assert_eq!(after.status(), 401);

    // The page is a shell anyone may load, under the strict policy.
    let page = reqwest::get(gateway.url("/console")).await.unwrap();
    assert_eq!(page.status(), 200);
    let policy = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("script-src 'self'"), "{policy}");
    assert!(page.text().await.unwrap().contains("console.js"));
}

/// What the page shows of one stage.
fn stage_card(name: &str) -> String {
    format!(
        r#"(() => {{
  const card = document.querySelector('[data-stage="{name}"]');
  if (!card) return null;
  return {{
    up: card.dataset.up === "true",
    in_per_sec: Number(card.dataset.inPerSec),
    in_total: Number(card.dataset.inTotal),
    out_total: Number(card.dataset.outTotal),
    in_rate_text: card.querySelector(".in-rate").textContent,
    dead_letters: Object.fromEntries([...card.querySelectorAll(".dead-letters li")]
      .map((li) => [li.dataset.kind, Number(li.dataset.count)])),
    error: card.querySelector(".error")?.textContent ?? "",
  }};
}})()"#
    )
}

/// Waits until `expression` is true in the page.
async fn until_true(browser: &mut Chromium, what: &str, expression: &str) {
    browser
        .wait_for(PAGE_TIMEOUT, what, expression, |v| {
            (v == true).then_some(()).ok_or(format!("{v}"))
        })
        .await
}

/// The secret the page shows once (a generated password, a key), dismissed after reading.
async fn shown_secret(browser: &mut Chromium) -> String {
    let secret = browser
        .wait_for(
            PAGE_TIMEOUT,
            "the secret shown once",
            "document.getElementById('secret').hidden ? '' : document.getElementById('secret-value').textContent",
            |v| v.as_str().filter(|t| !t.is_empty()).map(String::from).ok_or(format!("{v}")),
        )
        .await;
    browser
        .evaluate("document.getElementById('secret-dismiss').click()")
        .await;
    secret
}

/// The items `GET path` lists to the admin (under `field`; empty: the answer itself).
async fn listing(gateway: &Api, path: &str, field: &str) -> Result<Vec<Value>, String> {
    let (status, body) = gateway.call(Method::GET, path, None, ADMIN).await;
    let items = if field.is_empty() {
        &body
    } else {
        &body[field]
    };
    items.as_array().cloned().ok_or(format!("{status} {body}"))
}

/// Waits until `GET path` lists an item `matches` takes, and returns it.
async fn until_listed(
    gateway: &Api,
    path: &str,
    field: &str,
    matches: impl Fn(&Value) -> bool,
) -> Value {
    wait_until(
        PAGE_TIMEOUT,
        &format!("the item in GET {path}"),
        async || {
            let all = listing(gateway, path, field).await?;
            all.iter()
                .find(|item| matches(item))
                .cloned()
                .ok_or(format!("{all:?}"))
        },
    )
    .await
}

/// Fills the form `id` with `fields` (by input name) and submits it as a person would.
fn submit(id: &str, fields: &[(&str, &str)]) -> String {
    let sets: String = fields
        .iter()
        .map(|(name, value)| format!("form.elements[{}].value = {};", json!(name), json!(value)))
        .collect();
    format!("(() => {{ const form = document.getElementById({}); {sets} form.requestSubmit(); return true; }})()", json!(id))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_sees_the_pipeline_live_and_manages_it_from_the_page() {
    let topic = unique("console-page");
    let info = format!("{topic}-info");
    let dispatch = start_dispatch(&topic, &info).await;
    let dispatch_metrics = format!(
        "dispatch=http://{}/metrics",
        dispatch.metrics_address().await
    );
    dispatch.wait_ready().await;
    let gateway = start_gateway(
        &[topic.clone(), info.clone()],
        &[dispatch_metrics, DOWN_STAGE.to_string()],
    )
    .await;
    let mut browser = Chromium::launch(1400, 1700).await;
    browser.navigate(&gateway.url("/console")).await;
    until_true(
        &mut browser,
        "the login form",
        "!document.getElementById('login').hidden",
    )
    .await;
    // A wrong token is refused on the form.
    browser.evaluate("document.getElementById('token').value = 'not-the-token'; document.getElementById('login-form').requestSubmit()").await;
    browser
        .wait_for(
            PAGE_TIMEOUT,
            "the refusal",
            "document.getElementById('login-error').textContent",
            |v| {
                v.as_str()
                    .filter(|t| t.contains("admin token"))
                    .map(String::from)
                    .ok_or(format!("{v}"))
            },
        )
        .await;
    browser.screenshot(&screenshot_path("console-login")).await;
    browser
        .evaluate(&format!(
            "document.getElementById('token').value = {}; document.getElementById('login-form').requestSubmit()",
            json!(ADMIN)
        ))
        .await;
    until_true(
        &mut browser,
        "the console after logging in",
        "!document.getElementById('console').hidden",
    )
    .await;
    // The page keeps no secret where its scripts could read it.
    let kept = browser
        .evaluate(&format!(
            "[document.getElementById('token').value, JSON.stringify(sessionStorage), JSON.stringify(localStorage), document.cookie].join('|').includes({})",
            json!(ADMIN)
        ))
        .await;
    assert_eq!(kept, json!(false));
    let cookie = browser.evaluate("document.cookie").await;
    assert!(
        !cookie.as_str().unwrap_or("").contains("ep_session"),
        "HttpOnly: {cookie}"
    );

    // A stage that does not answer is shown as down, with the reason.
    let down = browser
        .wait_for(
            PAGE_TIMEOUT,
            "the log stage shown down",
            &stage_card("log"),
            |v| {
                (v["up"] == json!(false)
                    && v["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("not reachable")))
                .then(|| v.clone())
                .ok_or(format!("{v}"))
            },
        )
        .await;
    assert_eq!(down["in_per_sec"], json!(0));

    // A subscription and a user made on the page are what the APIs list.
    let subscription = unique("from-the-page");
    browser
        .evaluate(&submit(
            "subscription-form",
            &[
                ("name", &subscription),
                ("filters", "lk:*"),
                ("topics", &topic),
            ],
        ))
        .await;
    let listed = until_listed(&gateway, "/v1/subscriptions", "", |s| {
        s["name"] == json!(subscription)
    })
    .await;
    assert_eq!(listed["filters"], json!(["lk:*"]));
    assert_eq!(listed["topics"], json!([topic]));
    let user = unique("carol");
    browser
        .evaluate(&submit(
            "user-form",
            &[("name", &user), ("filters", "arm:*,lk:create_user")],
        ))
        .await;
    let added = until_listed(&gateway, "/v1/admin/users", "users", |u| {
        u["name"] == json!(user)
    })
    .await;
    assert_eq!(added["filters"], json!(["arm:*", "lk:create_user"]));
    // Its generated password is shown once.
    let password = shown_secret(&mut browser).await;
    assert!(password.len() >= 16, "{password}");
    browser
        .evaluate(&submit(
            "key-form",
            &[
                ("kind", "consumer"),
                ("owner", &user),
                ("description", "from the console"),
            ],
        ))
        .await;
    let key = until_listed(&gateway, "/v1/admin/keys", "keys", |k| {
        k["user"] == json!(user) && k["description"] == "from the console"
    })
    .await;
    let shown = shown_secret(&mut browser).await;
    let id = key["id"].as_str().unwrap();
    assert!(shown.starts_with(&format!("ep_{id}_")), "{shown}");

    // A pause made on the page is what the flows API lists; its resume (two clicks) takes.
    let paused_sender = unique("svc");
    let filter = format!("{paused_sender}:*");
    browser
        .evaluate(&submit(
            "pause-form",
            &[("filters", &filter), ("reason", "from the console")],
        ))
        .await;
    let pause = until_listed(&gateway, "/v1/admin/flows?all=true", "pauses", |p| {
        p["filters"] == json!([filter])
    })
    .await;
    assert_eq!(
        (&pause["status"], &pause["scope"], &pause["reason"]),
        (
            &json!("paused"),
            &json!("dispatch"),
            &json!("from the console")
        )
    );
    let pause_id = pause["id"].as_str().unwrap().to_string();
    let shown = format!(
        "document.querySelector('#pauses tr[data-pause={}]')?.dataset.status === 'paused'",
        json!(pause_id)
    );
    until_true(&mut browser, "the pause listed on the page", &shown).await;
    let resume = format!(
        "(() => {{ document.querySelector('#pauses tr[data-pause={}] button').click(); return true; }})()",
        json!(pause_id)
    );
    browser.evaluate(&resume).await;
    browser.evaluate(&resume).await;
    until_listed(&gateway, "/v1/admin/flows?all=true", "pauses", |p| {
        p["id"] == json!(pause_id) && p["status"] != "paused"
    })
    .await;

    // A tail the gateway refuses says why.
    browser
        .evaluate(&submit(
            "tail-form",
            &[("filter", "lk"), ("topics", &topic), ("grep", "")],
        ))
        .await;
    browser
        .wait_for(
            PAGE_TIMEOUT,
            "the refused tail's reason",
            "document.getElementById('tail-state').textContent",
            |v| {
                v.as_str()
                    .filter(|t| t.starts_with("refused") && t.contains("SERVICE:ACTION"))
                    .map(String::from)
                    .ok_or(format!("{v}"))
            },
        )
        .await;
    // The live tail follows the gateway's own SSE with the session cookie.
    browser
        .evaluate(&submit(
            "tail-form",
            &[("filter", "lk:*"), ("topics", &topic), ("grep", "")],
        ))
        .await;
    let live = "document.getElementById('tail-state').dataset.state === 'live'";
    until_true(&mut browser, "the tail to go live", live).await;

    // A client attached to the subscription made on the page, reading all it gets.
    let attach = gateway.url(&format!("/v1/subscriptions/{subscription}/stream"));
    let mut attached = SseClient::connect(&attach, None, ADMIN).await;
    assert_eq!(attached.status, 200, "{}", attached.error_body);
    let reader = tokio::spawn(async move { while attached.next().await.is_some() {} });

    // Traffic through the gateway's ingress, which the dispatcher routes: batches until the
    // page has shown a rate above zero for both stages, then more, for as long as a screenshot
    // wants a chart (EVENTPIPE_CONSOLE_TRAFFIC_SECS, default 5).
    let mut posted = Posted::default();
    for stage in ["gateway", "dispatch"] {
        let shown = loop {
            posted.post(&gateway, &topic, 40).await;
            let card = browser.evaluate(&stage_card(stage)).await;
            if card["in_per_sec"].as_f64().is_some_and(|rate| rate > 0.0) {
                break card;
            }
            assert!(
                posted.events < 40_000,
                "{stage}: no rate shown after {posted:?}: {card}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(shown["up"], json!(true), "{shown}");
        assert_ne!(shown["in_rate_text"], json!("0"), "{shown}");
        // A rate is what arrived between two answers of the stage: rounds start at least 2 s
        // apart and an answer takes at most 1.5 s, so they are at least 0.5 s apart, and the
        // rate is at most twice what was posted in all.
        let rate = shown["in_per_sec"].as_f64().unwrap();
        let events = posted.events as f64;
        assert!(
            rate <= 2.0 * events,
            "{stage}: rate {rate}/s from {events} events"
        );
    }
    let traffic_secs: u64 = std::env::var("EVENTPIPE_CONSOLE_TRAFFIC_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let until = std::time::Instant::now() + Duration::from_secs(traffic_secs);
    let mut round = 0;
    while std::time::Instant::now() < until {
        // A rate that changes, so the chart has a shape.
        round += 1;
        posted.post(&gateway, &topic, 20 + (round % 8) * 10).await;
        // Reads what DevTools sent meanwhile (a network event per streamed event), so it
        // never piles up behind the next command.
        browser.evaluate("true").await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let rows = "document.querySelectorAll('#tail li').length >= 150";
    until_true(&mut browser, "the tail to show the events", rows).await;
    // The attached subscription is shown active, with its connection's queue.
    let row = format!(
        "(() => {{ const row = document.querySelector('#subscriptions tr[data-name={}]'); \
         return row?.dataset.state === 'active' && /^\\d+\\/1024$/.test(row.cells[6].textContent); }})()",
        json!(subscription)
    );
    until_true(&mut browser, "the subscription active with its queue", &row).await;
    // This test's topics only, so the screenshot is not a list of every test's.
    browser
        .evaluate(&format!(
            "(() => {{ const f = document.getElementById('topic-filter'); f.value = {}; f.dispatchEvent(new Event('input')); return true; }})()",
            json!(topic)
        ))
        .await;
    browser.screenshot(&screenshot_path("console")).await;
    // A consumer that goes away is counted as dropped once the gateway next writes to it.
    let gone = "Number(document.getElementById('connections-count').dataset.gone)";
    let before = browser.evaluate(gone).await;
    assert_eq!(before, json!(0), "nothing dropped before");
    reader.abort();
    posted.post(&gateway, &topic, 1).await;
    let dropped = format!("{gone} === 1");
    until_true(&mut browser, "the attached client shown dropped", &dropped).await;

    // Every posted event is in the topic's row once a scan has seen it (the gateway's
    // idempotent producer leaves no holes: records = offsets), with its three partitions.
    let topic_row = format!(
        "(() => {{ const row = document.querySelector('#topics tr[data-topic={}]'); \
         return row ? [row.cells[1].textContent, row.cells[2].textContent] : null; }})()",
        json!(topic)
    );
    let records = posted.events.to_string();
    browser
        .wait_for(PAGE_TIMEOUT, "the topic's records", &topic_row, |v| {
            let shown = v[1].as_str().unwrap_or("").replace(',', "");
            (v[0] == "3" && shown == records)
                .then_some(())
                .ok_or(format!("{v} (posted {records})"))
        })
        .await;

    // Once the traffic stopped, the totals the page shows are exactly what Kafka acknowledged:
    // the gateway accepted each event once, the dispatcher consumed each, routed the known
    // ones and dead-lettered the others as unknown_action.
    let events = posted.events as f64;
    let unknown = posted.unknown as f64;
    browser
        .wait_for(
            PAGE_TIMEOUT,
            "the gateway's total to reach the events posted",
            &stage_card("gateway"),
            |v| {
                (v["in_total"].as_f64() == Some(events))
                    .then_some(())
                    .ok_or(format!("{v} (posted {posted:?})"))
            },
        )
        .await;
    browser
        .wait_for(
            PAGE_TIMEOUT,
            "the dispatcher's totals to reach the events posted",
            &stage_card("dispatch"),
            |v| {
                let done = v["in_total"].as_f64() == Some(events)
                && v["dead_letters"]["unknown_action"].as_f64() == Some(unknown)
                // Its outputs: one routed event each, and the dead letters it produced.
                && v["out_total"].as_f64() == Some(events);
                done.then_some(()).ok_or(format!("{v} (posted {posted:?})"))
            },
        )
        .await;

    // Deleting takes two clicks; then the API no longer lists it.
    let button = format!(
        "document.querySelector('#subscriptions tr[data-name={}] button').click()",
        json!(subscription)
    );
    browser.evaluate(&button).await;
    browser.evaluate(&button).await;
    wait_until(PAGE_TIMEOUT, "the subscription deleted", async || {
        let all = listing(&gateway, "/v1/subscriptions", "").await?;
        match all.iter().any(|s| s["name"] == json!(subscription)) {
            false => Ok(()),
            true => Err(format!("{all:?}")),
        }
    })
    .await;

    // Logging out brings the login back, and the page no longer reads the overview.
    browser
        .evaluate("document.getElementById('logout').click()")
        .await;
    until_true(
        &mut browser,
        "the login form after logging out",
        "!document.getElementById('login').hidden",
    )
    .await;
    let status = browser
        .evaluate("fetch('/v1/admin/overview').then((r) => r.status)")
        .await;
    assert_eq!(status, json!(401));
    assert!(browser.exceptions.is_empty(), "{:#?}", browser.exceptions);
    let errors: Vec<_> = browser
        .console
        .iter()
        .filter(|line| line.kind == "error" || line.text.contains("Content Security Policy"))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
}
