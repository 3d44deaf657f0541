//! `eventpipe-bench`: the benchmarks, a binary of their own over the eventpipe library; each
//! workload runs on the local stack next to a same-run baseline, printing a table and JSON lines.

mod aggregate;
mod broker;
mod dispatch;
mod gateway;
mod history;
mod log;
mod measure;
mod store;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use eventpipe::config::{Settings, SettingsArgs};

#[derive(Debug, Parser)]
#[command(
    name = "eventpipe-bench",
    version,
    about = "Benchmarks of eventpipe on the local stack, each next to a baseline measured in the same run"
)]
struct Cli {
    // eventpipe's own settings (brokers, Elasticsearch, registry, ...), read as eventpipe reads
    // them; the stages under test are started with the same addresses.
    #[command(flatten)]
    settings: SettingsArgs,
    /// The eventpipe binary whose stages are measured [default: `eventpipe` next to this binary].
    #[arg(long, global = true, env = "EVENTPIPE_BENCH_EVENTPIPE_BIN")]
    eventpipe_bin: Option<PathBuf>,
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Debug, Subcommand)]
enum Workload {
    /// Dispatcher throughput vs a raw rdkafka copy, exactly-once cost, latency at fixed rates.
    Dispatch(dispatch::DispatchBenchOptions),
    /// Documents per second into Elasticsearch vs a direct bulk load of the same documents.
    Log(log::LogBenchOptions),
    /// Aggregator throughput (1 s and 60 s windows) vs a raw consume of the same topic, and the
    /// window engine alone in memory; checks the emitted counts add up to the events.
    Aggregate(aggregate::AggregateBenchOptions),
    /// Kafka's own producer and consumer perf tools on this machine: the broker's ceiling.
    Broker(broker::BrokerBenchOptions),
    /// The event store read back: "last 10" latency on a million events, a filtered range
    /// streamed (rows/s, peak RSS), and replay vs a raw produce of the same records.
    History(history::HistoryBenchOptions),
    /// The gateway: NDJSON ingress vs a direct producer, single-event requests, and the live
    /// fan-out to 1,000 and 10,000 SSE/WebSocket clients (latency, CPU, RSS per connection).
    Gateway(gateway::GatewayBenchOptions),
    /// Rows per second of the event store into PostgreSQL vs one raw COPY of the same rows and a
    /// services-style Python consumer with psycopg, each into a fresh database.
    Store(store::StoreBenchOptions),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    eventpipe::cli::run_main(&cli.settings, |settings| {
        run(settings, cli.eventpipe_bin, cli.workload)
    })
}

/// Runs one workload and prints its results.
async fn run(
    settings: Settings,
    eventpipe_bin: Option<PathBuf>,
    workload: Workload,
) -> anyhow::Result<()> {
    let results = match workload {
        Workload::Dispatch(options) => {
            dispatch::run(&settings, &eventpipe(eventpipe_bin)?, options).await?
        }
        Workload::Log(options) => log::run(&settings, &eventpipe(eventpipe_bin)?, options).await?,
        Workload::Aggregate(options) => {
            aggregate::run(&settings, &eventpipe(eventpipe_bin)?, options).await?
        }
        Workload::Broker(options) => broker::run(&settings, options).await?,
        Workload::History(options) => {
            history::run(&settings, &eventpipe(eventpipe_bin)?, options).await?
        }
        Workload::Store(options) => {
            store::run(&settings, &eventpipe(eventpipe_bin)?, options).await?
        }
        Workload::Gateway(options) => {
            gateway::run(&settings, &eventpipe(eventpipe_bin)?, options).await?
        }
    };
    measure::report(&results);
    Ok(())
}

/// The eventpipe binary to start the stages from: `--eventpipe-bin`, else the `eventpipe` beside
/// this executable (where cargo and scripts/bench put it); it must exist before any work starts.
fn eventpipe(flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let path = match flag {
        Some(path) => path,
        None => std::env::current_exe()?.with_file_name("eventpipe"),
    };
    anyhow::ensure!(
        path.is_file(),
        "no eventpipe binary at {} (build it with `cargo build`, or pass --eventpipe-bin)",
        path.display()
    );
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn flags_keep_their_names_and_defaults() {
        let cli = Cli::try_parse_from([
            "eventpipe-bench",
            "--log-level",
            "warn",
            "dispatch",
            "--no-exactly-once",
            "--latency-rates",
            "1000,2000",
        ])
        .unwrap();
        let Workload::Dispatch(options) = cli.workload else {
            panic!("dispatch expected");
        };
        assert!(!options.exactly_once);
        assert!(options.avro);
        assert_eq!(options.latency_rates, [1000, 2000]);
        assert_eq!(options.records, 1_000_000);

        let cli =
            Cli::try_parse_from(["eventpipe-bench", "log", "--no-sequential-baseline"]).unwrap();
        let Workload::Log(options) = cli.workload else {
            panic!("log expected");
        };
        assert!(!options.sequential_baseline);
        assert_eq!((options.concurrency, options.batch_size), (2, 1000));
        assert!(
            Cli::try_parse_from(["eventpipe-bench", "log", "--bulk-concurrency", "17"]).is_err()
        );

        let cli = Cli::try_parse_from(["eventpipe-bench", "store", "--records", "1000"]).unwrap();
        let Workload::Store(options) = cli.workload else {
            panic!("store expected");
        };
        assert_eq!((options.records, options.partitions), (1000, 6));

        let cli = Cli::try_parse_from(["eventpipe-bench", "gateway", "--clients", "100"]).unwrap();
        let Workload::Gateway(options) = cli.workload else {
            panic!("gateway expected");
        };
        assert_eq!(options.clients, [100]);
        assert_eq!((options.events, options.rate), (200_000, 5_000));
        assert_eq!(options.parts.len(), 3);
    }

    #[test]
    fn a_missing_eventpipe_binary_is_named() {
        let missing = Path::new("/nonexistent/eventpipe");
        let error = eventpipe(Some(missing.to_path_buf())).unwrap_err();
        assert!(error.to_string().contains("/nonexistent/eventpipe"));
    }
}
