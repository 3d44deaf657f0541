//! The `eventpipe` binary against the real stack: topics apply/list, produce, generate, check,
//! and the one-line errors a user gets for bad configuration.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{run_eventpipe, stderr, stdout};
use rdkafka::message::Message;

/// The stack's settings as environment variables for the child process.
fn stack_env() -> Vec<(&'static str, String)> {
    let settings = common::settings();
    vec![
        (
            "KAFKA_BOOTSTRAP_SERVERS",
            settings.kafka.bootstrap_servers.clone(),
        ),
        ("ELASTICSEARCH_URL", settings.elasticsearch_url.to_string()),
        (
            "SCHEMA_REGISTRY_URL",
            settings.schema_registry_url.to_string(),
        ),
        (
            "POSTGRES_CONNECTION_STRING",
            settings.postgres_url.to_string(),
        ),
    ]
}

fn run(args: &[&str], stdin: Option<&[u8]>) -> std::process::Output {
    let env = stack_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    run_eventpipe(args, &env, stdin)
}

fn assert_one_line_error(output: &std::process::Output, code: i32, needle: &str) {
    let err = stderr(output);
    assert_eq!(output.status.code(), Some(code), "stderr: {err}");
    let error_lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(error_lines.len(), 1, "exactly one error line in: {err}");
    assert!(
        error_lines[0].contains(needle),
        "{:?} should mention {needle}",
        error_lines[0]
    );
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

#[tokio::test]
async fn topics_apply_creates_then_is_idempotent_then_grows_and_never_deletes() {
    let base = common::unique("apply");
    let dir = std::env::temp_dir().join(&base);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("topics.toml");
    let write = |partitions: u32| {
        std::fs::write(
            &file,
            format!(
                "[defaults]\npartitions = 2\n\n[[topics]]\nname = \"{base}-in\"\ndead_letter = true\npartitions = {partitions}\nconfig = {{ \"retention.ms\" = \"3600000\" }}\n\n[[topics]]\nname = \"{base}-out\"\n"
            ),
        )
        .unwrap();
    };
    write(2);
    let path = file.to_str().unwrap();

    let first = run(&["topics", "apply", "--file", path], None);
    let out = stdout(&first);
    assert!(first.status.success(), "{out}{}", stderr(&first));
    for name in [
        format!("{base}-in"),
        format!("{base}-in.dlq"),
        format!("{base}-out"),
    ] {
        assert!(
            out.contains(&format!("create  {name} (partitions=2")),
            "{out}"
        );
    }
    assert!(
        out.contains("3 topics defined, 3 changes applied, 0 failed"),
        "{out}"
    );

    let second = run(&["topics", "apply", "--file", path], None);
    let out = stdout(&second);
    assert!(second.status.success(), "{out}");
    assert!(
        out.contains("3 topics defined, 0 changes applied, 0 failed"),
        "{out}"
    );
    assert_eq!(
        out.lines().filter(|l| l.starts_with("ok ")).count(),
        3,
        "{out}"
    );

    // Growing partitions is applied; the topic removed from the file is left alone.
    std::fs::write(
        &file,
        format!("[[topics]]\nname = \"{base}-in\"\npartitions = 4\nconfig = {{ \"retention.ms\" = \"7200000\" }}\n"),
    )
    .unwrap();
    let third = run(&["topics", "apply", "--file", path], None);
    let out = stdout(&third);
    assert!(third.status.success(), "{out}{}", stderr(&third));
    assert!(
        out.contains(&format!("alter   {base}-in: partitions 2 -> 4")),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "alter   {base}-in: retention.ms 3600000 -> 7200000"
        )),
        "{out}"
    );

    let list = run(&["topics", "list", "--json", "--file", path], None);
    assert!(list.status.success(), "{}", stderr(&list));
    let rows: Vec<serde_json::Value> = stdout(&list)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let row = |name: String| rows.iter().find(|r| r["name"] == name.as_str()).cloned();
    let input = row(format!("{base}-in")).expect("input topic listed");
    assert_eq!(input["partitions"], 4);
    assert_eq!(input["defined"], true);
    let output = row(format!("{base}-out")).expect("topic no longer defined still exists");
    assert_eq!(output["partitions"], 2);
    assert_eq!(output["defined"], false);
    assert!(row(format!("{base}-in.dlq")).is_some());

    // A shrink request is reported, not applied.
    write(1);
    let fourth = run(&["topics", "apply", "--file", path], None);
    assert!(
        stdout(&fourth).contains("has 4 partitions, definition says 1"),
        "{}",
        stdout(&fourth)
    );
}

#[tokio::test]
async fn the_repository_topics_file_applies_cleanly() {
    let dry = run(&["topics", "apply", "--dry-run"], None);
    assert!(dry.status.success(), "{}", stderr(&dry));
    let applied = run(&["topics", "apply"], None);
    assert!(
        applied.status.success(),
        "{}{}",
        stdout(&applied),
        stderr(&applied)
    );
    let again = run(&["topics", "apply"], None);
    let out = stdout(&again);
    assert!(out.contains("0 changes applied, 0 failed"), "{out}");
    for name in [
        "create_user_in",
        "create_user_in.dlq",
        "info_in",
        "events_in",
        "events_aggregated",
        "service_metrics",
        "worker_done_orm",
    ] {
        assert!(
            out.contains(&format!("ok      {name}\n")),
            "{name} missing in {out}"
        );
    }
}

#[tokio::test]
async fn produce_sends_envelopes_with_headers_and_keys() {
    let settings = common::settings();
    let topic = common::unique("produce");
    common::create_topic(&settings, &topic, 3).await;
    let lines: String = (0..50)
        .map(|i| {
            format!(
                "{{\"service\":\"lk\",\"action\":\"{}\",\"payload\":{{\"message\":\"m{i}\",\"timestamp\":\"2024-05-01T12:00:00\",\"data\":{{\"user_id\":{}}}}}}}\n",
                if i % 2 == 0 { "create_user" } else { "update_user" },
                i % 7
            )
        })
        .collect();
    let output = run(&["produce", "--topic", &topic], Some(lines.as_bytes()));
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains(&format!("produced 50 records to {topic}")));

    let messages = common::read_to_end(&settings, &topic);
    assert_eq!(messages.len(), 50);
    let mut seen = HashSet::new();
    for message in &messages {
        let body = common::json(message);
        let headers = common::headers(message);
        assert_eq!(headers["service"], "lk");
        assert_eq!(headers["action"], body["action"].as_str().unwrap());
        assert_eq!(
            common::key(message),
            body["payload"]["data"]["user_id"].to_string()
        );
        assert!(seen.insert(body["payload"]["message"].as_str().unwrap().to_string()));
    }

    let bad = run(
        &["produce", "--topic", &topic],
        Some(b"{\"service\":\"lk\",\"action\":\"a\",\"payload\":{\"message\":\"m\",\"timestamp\":\"t\"}}\n{\"service\":\"lk\"}\n"),
    );
    assert_one_line_error(&bad, 1, "stdin line 2: missing field `action`");
}

#[tokio::test]
async fn generate_produces_the_requested_count_of_valid_envelopes() {
    let settings = common::settings();
    let topic = common::unique("generate");
    common::create_topic(&settings, &topic, 3).await;
    let output = run(
        &[
            "generate", "--count", "500", "--rate", "2000", "--topic", &topic, "--users", "20",
        ],
        None,
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("generated 500 records"),
        "{}",
        stdout(&output)
    );
    let messages = common::read_to_end(&settings, &topic);
    assert_eq!(messages.len(), 500);
    let mut seqs = HashSet::new();
    for message in &messages {
        let envelope = eventpipe::envelope::Envelope::decode(message.payload().unwrap(), 1 << 20)
            .expect("generated envelopes are valid");
        assert_eq!(common::headers(message)["action"], envelope.action);
        assert!(seqs.insert(envelope.payload.data["seq"].as_u64().unwrap()));
    }
    assert_eq!(seqs.len(), 500, "each sequence number once");

    let events = common::unique("generate-events");
    common::create_topic(&settings, &events, 1).await;
    let output = run(
        &[
            "generate", "--kind", "events", "--count", "100", "--topic", &events, "--series", "5",
        ],
        None,
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let messages = common::read_to_end(&settings, &events);
    assert_eq!(messages.len(), 100);
    let names: HashSet<String> = messages.iter().map(common::key).collect();
    assert!(names.len() <= 5 && !names.is_empty());
}

#[test]
fn check_reports_every_dependency_of_the_stack() {
    let output = run(&["check"], None);
    let out = stdout(&output);
    assert!(output.status.success(), "{out}{}", stderr(&output));
    for name in ["kafka", "elasticsearch", "schema-registry", "postgres"] {
        assert!(out.contains(&format!("ok      {name}")), "{out}");
    }
}

#[test]
fn bad_configuration_is_one_line_naming_the_setting() {
    let dir = std::env::temp_dir().join(common::unique("config"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("eventpipe.toml");
    std::fs::write(&config, "[kafka]\nbootstrap_server = \"x:1\"\n").unwrap();
    let output = run_eventpipe(
        &["--config", config.to_str().unwrap(), "topics", "list"],
        &[],
        None,
    );
    assert_one_line_error(&output, 2, "line 2: unknown field `bootstrap_server`");

    let output = run_eventpipe(
        &["check"],
        &[("ELASTICSEARCH_URL", "localhost:9200/x y")],
        None,
    );
    assert_one_line_error(&output, 2, "ELASTICSEARCH_URL");

    // A stage's own setting, checked before the stage connects to anything.
    let output = run_eventpipe(&["aggregate"], &[("STORAGE_TYPE", "mongo")], None);
    assert_one_line_error(&output, 2, "STORAGE_TYPE");

    let output = run_eventpipe(&["topics", "list", "-X", "no.such.property=1"], &[], None);
    assert_one_line_error(&output, 2, "no.such.property");

    // An unreachable broker fails after the bounded wait, not never.
    let started = std::time::Instant::now();
    let output = run_eventpipe(
        &["topics", "list", "--connect-timeout-secs", "2"],
        &[("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")],
        None,
    );
    assert_one_line_error(&output, 1, "cannot reach Kafka at 127.0.0.1:1");
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn producing_to_a_missing_topic_says_so() {
    let topic = common::unique("missing");
    let output = run(&["produce", "--topic", &topic], Some(b""));
    assert_one_line_error(&output, 1, &format!("topic \"{topic}\" does not exist"));
}

#[tokio::test]
async fn tail_prints_records_as_json_lines_without_a_group() {
    let settings = common::settings();
    let topic = common::unique("tail");
    common::create_topic(&settings, &topic, 2).await;
    let records: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| (format!("k{i}"), format!("{{\"n\":{i}}}").into_bytes()))
        .collect();
    common::produce_all(&settings, &topic, &records).await;
    let output = run(&["tail", &topic, "--count", "6", "--idle-secs", "10"], None);
    assert!(output.status.success(), "{}", stderr(&output));
    let mut seen: Vec<i64> = stdout(&output)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["topic"], topic.as_str());
            assert_eq!(v["key"], format!("k{}", v["value"]["n"]));
            v["value"]["n"].as_i64().unwrap()
        })
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, vec![0, 1, 2, 3, 4, 5]);
}
