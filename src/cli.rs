//! The command-line edge: clap subcommands, settings loading, and the mapping of errors to
//! one-line messages and exit codes (2 for bad configuration, 1 for everything else).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::aggregate::{AggregateArgs, AggregateSettings, FileAggregate};
use crate::config::{
    redact_url, ElasticsearchArgs, MetricsArgs, PostgresArgs, Settings, SettingsArgs,
};
use crate::dispatch::settings::FileDispatch;
use crate::dispatch::{DispatchArgs, DispatchSettings};
use crate::gateway::{FileGateway, GatewayArgs, GatewaySettings};
use crate::generate::{self, GenerateOptions, TrafficKind};
use crate::log::{FileLog, LogArgs, LogSettings};
use crate::materialise::{FileMaterialise, MaterialiseArgs, MaterialiseSettings};
use crate::produce::{self, ProduceOptions};
use crate::settings::ConfigError;
use crate::store::history::SelectionArgs;
use crate::store::{FileStore, StoreArgs, StoreSettings};
use crate::topics::admin::{topic_rows, Admin};
use crate::{shutdown, telemetry, topics};

#[derive(Debug, Parser)]
#[command(
    name = "eventpipe",
    version,
    about = "Kafka-native stream processing pipeline"
)]
pub struct Cli {
    #[command(flatten)]
    pub settings: SettingsArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Route envelopes by action through the handler registry, at least once, with dead letters.
    Dispatch {
        #[command(flatten)]
        args: DispatchArgs,
        /// PostgreSQL of flow control's pauses (with --flows true).
        #[command(flatten)]
        postgres: PostgresArgs,
        #[command(flatten)]
        metrics: MetricsArgs,
    },
    /// Ship info_in to Elasticsearch as documents for Kibana.
    Log {
        #[command(flatten)]
        args: LogArgs,
        #[command(flatten)]
        elasticsearch: ElasticsearchArgs,
        #[command(flatten)]
        metrics: MetricsArgs,
    },
    /// Windowed aggregation by name, function and interval, to Kafka or PostgreSQL.
    Aggregate {
        #[command(flatten)]
        args: AggregateArgs,
        #[command(flatten)]
        postgres: PostgresArgs,
        #[command(flatten)]
        metrics: MetricsArgs,
    },
    /// Keep every record of the stored topics in PostgreSQL, once each, for history and replay
    /// (`store verify`: compare the store with Kafka).
    #[command(args_conflicts_with_subcommands = true)]
    Store {
        #[command(subcommand)]
        command: Option<StoreCommand>,
        #[command(flatten)]
        args: StoreArgs,
        #[command(flatten)]
        postgres: PostgresArgs,
        #[command(flatten)]
        metrics: MetricsArgs,
    },
    /// Keep a topic's latest state per key in a PostgreSQL table, moved only by newer versions
    /// (default: product_changes into products).
    Materialise {
        #[command(flatten)]
        args: MaterialiseArgs,
        #[command(flatten)]
        postgres: PostgresArgs,
        #[command(flatten)]
        metrics: MetricsArgs,
    },
    /// The one authenticated entry point: events in over HTTP, subscriptions out over SSE and
    /// WebSocket (live, resumable by cursor), history over HTTP, the admin API.
    Gateway {
        #[command(flatten)]
        args: GatewayArgs,
        #[command(flatten)]
        postgres: PostgresArgs,
        #[command(flatten)]
        metrics: MetricsArgs,
    },
    /// Stored events as JSON lines in sequence order, streamed: `--filter lk:* --last 10`.
    History {
        #[command(flatten)]
        selection: SelectionArgs,
        #[command(flatten)]
        postgres: PostgresArgs,
    },
    /// Re-publish stored events (same selection as history) with replay headers.
    Replay {
        #[command(flatten)]
        selection: SelectionArgs,
        /// Send everything here instead of to each event's original topic.
        #[arg(long, value_name = "TOPIC")]
        to_topic: Option<String>,
        /// Events per second; 0 = as fast as Kafka confirms them.
        #[arg(long, default_value_t = 0)]
        rate: u64,
        #[command(flatten)]
        postgres: PostgresArgs,
    },
    /// Create and inspect the topics defined under topics/.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
    /// Send envelopes from JSON lines (a file or stdin) with service/action headers and a key.
    Produce {
        #[arg(long)]
        topic: String,
        /// JSON lines file; stdin if absent or `-`.
        #[arg(long)]
        input: Option<PathBuf>,
        /// JSON pointer to the field used as the record key.
        #[arg(long, default_value = "/payload/data/user_id")]
        key_field: String,
        /// Send lines unchecked (to exercise dead-letter handling).
        #[arg(long)]
        raw: bool,
    },
    /// Produce synthetic traffic at a given rate and count (`generate products`: the catalogue's
    /// price and stock changes).
    #[command(args_conflicts_with_subcommands = true)]
    Generate {
        #[command(subcommand)]
        command: Option<GenerateCommand>,
        #[arg(long, value_enum, default_value = "envelopes")]
        kind: TrafficKind,
        #[arg(long, default_value_t = 1000)]
        count: u64,
        /// Records per second; 0 = as fast as possible.
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Send everything to this topic instead of the default per kind/action.
        #[arg(long)]
        topic: Option<String>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Distinct user ids (record keys) for envelopes.
        #[arg(long, default_value_t = 1000)]
        users: u64,
        /// Distinct series names for aggregator events.
        #[arg(long, default_value_t = 100)]
        series: u64,
    },
    /// Print a topic's records as JSON lines (key, headers, value), without a consumer group.
    Tail {
        topic: String,
        #[arg(long, default_value_t = 10)]
        count: usize,
        /// Start at the newest records instead of the oldest.
        #[arg(long)]
        from_end: bool,
        /// Stop when nothing arrives for this many seconds.
        #[arg(long, default_value_t = 5)]
        idle_secs: u64,
    },
    /// Check that Kafka, Elasticsearch, the schema registry and PostgreSQL answer.
    Check {
        #[command(flatten)]
        elasticsearch: ElasticsearchArgs,
        #[command(flatten)]
        postgres: PostgresArgs,
    },
    /// Avro schemas under schemas/ against the registry's `<topic>-value` subjects.
    Schemas {
        #[command(subcommand)]
        command: SchemasCommand,
    },
    /// The gateway's users (password, the filters they may read), straight on PostgreSQL.
    Users {
        #[command(subcommand)]
        command: crate::gateway::auth::cli::UsersCommand,
        #[command(flatten)]
        postgres: PostgresArgs,
    },
    /// The gateway's API keys (producer: bound to a service; consumer: under a user).
    Keys {
        #[command(subcommand)]
        command: crate::gateway::auth::cli::KeysCommand,
        #[command(flatten)]
        postgres: PostgresArgs,
    },
    /// Pause and resume flows by sender and type (`flows pause --filter lk:*`), straight on
    /// PostgreSQL; every instance of a stage obeys within a second.
    Flows {
        #[command(subcommand)]
        command: crate::flows::cli::FlowsCommand,
        #[command(flatten)]
        postgres: PostgresArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum GenerateCommand {
    /// Create the seeded product catalogue in PostgreSQL if missing (names, prices, stock, a
    /// photo each), then publish price and stock changes keyed by product id, each with a newer
    /// version, on a timer.
    Products {
        /// How many products the catalogue holds (ids 1..=N).
        #[arg(long, default_value_t = 100)]
        products: u64,
        /// Changes to send; 0 = until stopped.
        #[arg(long, default_value_t = 0)]
        count: u64,
        /// Changes per second; 0 = as fast as Kafka acknowledges.
        #[arg(long, default_value_t = 10)]
        rate: u64,
        /// How often a burst of changes goes out: `250ms`, `1s` (the rate is the mean).
        #[arg(long, default_value = "100ms")]
        interval: String,
        /// The same seed gives the same catalogue and the same changes.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = crate::catalogue::CHANGES_TOPIC)]
        topic: String,
        /// The products' table (the one `eventpipe materialise --table` keeps).
        #[arg(long, default_value = "products")]
        table: String,
        #[command(flatten)]
        postgres: PostgresArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Compare the store with what a read_committed consumer finds in Kafka, per partition;
    /// prints missing, unexpected and duplicated records by range, exits 1 on any of them.
    Verify {
        /// Only these topics (repeatable or comma-separated); default: the stored topics.
        #[arg(long, value_delimiter = ',')]
        topic: Vec<String>,
        /// The store's consumer group: records it has not consumed yet are pending, not missing
        /// [env: EVENTPIPE_STORE_GROUP_ID] (default: eventpipe-store).
        #[arg(long)]
        group_id: Option<String>,
        #[command(flatten)]
        postgres: PostgresArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum SchemasCommand {
    /// Check compatibility first, then register each topic's value schema; refuses an
    /// incompatible change and says which field breaks it.
    Register {
        #[command(flatten)]
        args: SchemasArgs,
    },
    /// The same checks without registering anything (for CI).
    Check {
        #[command(flatten)]
        args: SchemasArgs,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct SchemasArgs {
    /// Topic definitions naming each topic's `value_schema`.
    #[arg(long, default_value = "topics/topics.toml")]
    pub topics_file: PathBuf,
    /// Where the `<value_schema>.avsc` files are.
    #[arg(long, default_value = "schemas")]
    pub schemas_dir: PathBuf,
    /// Compatibility level to check against and to set on each subject.
    #[arg(long, default_value = "BACKWARD")]
    pub compatibility: String,
    /// Only these topics (comma-separated); all topics with a value_schema by default.
    #[arg(long, value_delimiter = ',')]
    pub topic: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum TopicsCommand {
    /// Create missing topics, grow partitions, set configs; never deletes. Idempotent.
    Apply {
        #[arg(
            long,
            default_value = "topics/topics.toml",
            env = "EVENTPIPE_TOPICS_FILE"
        )]
        file: PathBuf,
        /// Print the plan without changing anything.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show topics with partitions and replication (no lag: see the stages' metrics for that).
    List {
        #[arg(
            long,
            default_value = "topics/topics.toml",
            env = "EVENTPIPE_TOPICS_FILE"
        )]
        file: PathBuf,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
}

impl Command {
    /// The global settings' flags with this command's own flags for them on top.
    fn settings_args(&self, global: &SettingsArgs) -> SettingsArgs {
        let (elasticsearch, postgres, metrics) = match self {
            Command::Dispatch {
                postgres, metrics, ..
            } => (None, Some(postgres), Some(metrics)),
            Command::Log {
                elasticsearch,
                metrics,
                ..
            } => (Some(elasticsearch), None, Some(metrics)),
            Command::Aggregate {
                postgres, metrics, ..
            }
            | Command::Store {
                command: None,
                postgres,
                metrics,
                ..
            }
            | Command::Materialise {
                postgres, metrics, ..
            }
            | Command::Gateway {
                postgres, metrics, ..
            } => (None, Some(postgres), Some(metrics)),
            Command::Store {
                command: Some(StoreCommand::Verify { postgres, .. }),
                ..
            }
            | Command::History { postgres, .. }
            | Command::Replay { postgres, .. }
            | Command::Users { postgres, .. }
            | Command::Keys { postgres, .. }
            | Command::Flows { postgres, .. }
            | Command::Generate {
                command: Some(GenerateCommand::Products { postgres, .. }),
                ..
            } => (None, Some(postgres), None),
            Command::Check {
                elasticsearch,
                postgres,
            } => (Some(elasticsearch), Some(postgres), None),
            _ => (None, None, None),
        };
        global.with_command_flags(elasticsearch, postgres, metrics)
    }
}

/// Parses arguments, runs the command and turns any error into one line on stderr.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = cli.command.settings_args(&cli.settings);
    run_main(&args, |settings| run(cli.command, settings))
}

/// The edge every eventpipe binary shares (`eventpipe`, `eventpipe-bench`): loads the settings
/// from `args`, starts tracing and the runtime, runs `command`, and turns any error into one line
/// on stderr with its exit code.
pub fn run_main<F>(args: &SettingsArgs, command: impl FnOnce(Settings) -> F) -> ExitCode
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let settings = match Settings::load(args).and_then(check_stage_tables) {
        Ok(settings) => settings,
        Err(error) => return report(&anyhow::Error::new(error)),
    };
    telemetry::init_tracing(&settings.telemetry);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => return report(&anyhow::Error::new(error).context("starting the runtime")),
    };
    match runtime.block_on(command(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => report(&error),
    }
}

/// A mistake in any stage's table of the config file fails every command, as one in a global
/// table does: a typo does not wait for the stage it concerns to start.
fn check_stage_tables(settings: Settings) -> Result<Settings, ConfigError> {
    settings.file.table::<FileDispatch>()?;
    settings.file.table::<FileLog>()?;
    settings.file.table::<FileAggregate>()?;
    settings.file.table::<FileStore>()?;
    settings.file.table::<FileMaterialise>()?;
    settings.file.table::<FileGateway>()?;
    Ok(settings)
}

/// `eventpipe schemas register|check`: one line per subject, an error if any is incompatible.
async fn run_schemas(
    settings: &Settings,
    args: &SchemasArgs,
    register: bool,
) -> anyhow::Result<()> {
    use crate::codec::subjects::{apply_subject, Compatibility, Outcome};
    let level: Compatibility =
        args.compatibility
            .parse()
            .map_err(|reason| ConfigError::Invalid {
                setting: "--compatibility".into(),
                value: args.compatibility.clone(),
                reason,
            })?;
    let specs = topics::load(&args.topics_file)?;
    let selected: Vec<_> = specs
        .iter()
        .filter_map(|spec| spec.value_schema.map(|schema| (spec.name.as_str(), schema)))
        .filter(|(name, _)| args.topic.is_empty() || args.topic.iter().any(|t| t == name))
        .collect();
    if selected.is_empty() {
        anyhow::bail!(
            "no topic in {} has a value_schema{}",
            args.topics_file.display(),
            if args.topic.is_empty() {
                ""
            } else {
                " among --topic"
            }
        );
    }
    let registry = crate::codec::Registry::new(&settings.schema_registry_url)?;
    let mut incompatible = 0;
    for (topic, schema) in &selected {
        let file = args
            .schemas_dir
            .join(format!("{}.avsc", schema.file_stem()));
        let report = apply_subject(&registry, topic, &file, level, register)
            .await
            .with_context(|| format!("schema registry at {}", redact_url(registry.url())))?;
        if matches!(report.outcome, Outcome::Incompatible { .. }) {
            incompatible += 1;
        }
        println!("{report}");
    }
    if incompatible > 0 {
        anyhow::bail!(
            "{incompatible} of {} subjects incompatible ({}); nothing was registered for them",
            selected.len(),
            level.name()
        );
    }
    Ok(())
}

fn report(error: &anyhow::Error) -> ExitCode {
    // `{:#}` joins the context chain on one line: no backtrace for a user's mistake.
    eprintln!("error: {error:#}");
    let config_error = error.chain().any(|e| {
        e.downcast_ref::<ConfigError>().is_some()
            || matches!(
                e.downcast_ref::<crate::kafka::KafkaError>(),
                Some(crate::kafka::KafkaError::Config(_))
            )
    });
    ExitCode::from(if config_error { 2 } else { 1 })
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Dispatch { args, .. } => {
            let dispatch = DispatchSettings::load(&args, &settings)?;
            let (readiness, shutdown) = start_stage(&settings).await?;
            let registry = crate::dispatch::registry::HandlerRegistry::with_builtins();
            let (formats, schema_registry) = crate::codec::shared(&settings)?;
            let codecs = crate::dispatch::transform::DispatchCodecs::new(formats, schema_registry);
            let summary = crate::dispatch::run(
                &settings.kafka,
                &dispatch,
                settings.postgres_url.as_str(),
                codecs,
                &registry,
                readiness,
                shutdown,
            )
            .await?;
            println!(
                "dispatch stopped: consumed {}, routed {}, dead-lettered {}",
                summary.consumed, summary.routed, summary.dead_lettered
            );
            Ok(())
        }
        Command::Log { args, .. } => {
            let log = LogSettings::load(&args, &settings)?;
            let (readiness, shutdown) = start_stage(&settings).await?;
            crate::log::run(&settings, log, readiness, shutdown).await
        }
        Command::Aggregate { args, .. } => {
            let aggregate = AggregateSettings::load(&args, &settings)?;
            let (readiness, shutdown) = start_stage(&settings).await?;
            crate::aggregate::run(&settings, aggregate, readiness, shutdown).await
        }
        Command::Store {
            command: Some(StoreCommand::Verify {
                topic, group_id, ..
            }),
            args,
            ..
        } => store_verify(&settings, &args, topic, group_id).await,
        Command::Store { args, .. } => {
            let store = StoreSettings::load(&args, &settings)?;
            let (readiness, shutdown) = start_stage(&settings).await?;
            crate::store::run(&settings, store, readiness, shutdown).await
        }
        Command::Materialise { args, .. } => {
            let materialise = MaterialiseSettings::load(&args, &settings)?;
            let (readiness, shutdown) = start_stage(&settings).await?;
            crate::materialise::run(&settings, materialise, readiness, shutdown).await
        }
        Command::Gateway { args, .. } => {
            let gateway = GatewaySettings::load(&args, &settings)?;
            let (readiness, shutdown) = start_stage(&settings).await?;
            crate::gateway::run(&settings, gateway, readiness, shutdown).await
        }
        Command::History { selection, .. } => {
            crate::store::history::print(&settings, &selection).await
        }
        Command::Replay {
            selection,
            to_topic,
            rate,
            ..
        } => crate::store::replay::run_command(&settings, &selection, to_topic, rate).await,
        Command::Topics { command } => run_topics(command, &settings).await,
        Command::Produce {
            topic,
            input,
            key_field,
            raw,
        } => {
            let started = Instant::now();
            let count = produce::run(
                &settings.kafka,
                ProduceOptions {
                    topic: topic.clone(),
                    input,
                    key_pointer: key_field,
                    raw,
                    codec: crate::codec::Codec::from_settings(
                        &settings,
                        crate::codec::SchemaName::Envelope,
                    )?,
                },
            )
            .await?;
            println!(
                "produced {count} records to {topic} in {:.2}s",
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Generate {
            command: Some(command),
            ..
        } => generate_products(command, &settings).await,
        Command::Generate {
            command: None,
            kind,
            count,
            rate,
            topic,
            seed,
            users,
            series,
            ..
        } => {
            let shutdown = shutdown::install_signal_handlers();
            let started = Instant::now();
            // Records in their topics' formats: `--output-format avro` generates Avro.
            let codec = crate::codec::Codec::from_settings(&settings, kind.schema())?;
            let delivered = generate::run_encoded(
                &settings.kafka,
                GenerateOptions {
                    kind,
                    count,
                    rate,
                    seed,
                    users,
                    series,
                    topic,
                },
                &codec,
                shutdown,
            )
            .await?;
            let seconds = started.elapsed().as_secs_f64();
            println!(
                "generated {delivered} records in {seconds:.2}s ({:.0}/s)",
                delivered as f64 / seconds.max(1e-9)
            );
            Ok(())
        }
        Command::Tail {
            topic,
            count,
            from_end,
            idle_secs,
        } => {
            // Only asked when a record looks like Confluent-framed Avro.
            let registry = crate::codec::Registry::new(&settings.schema_registry_url).ok();
            crate::tail::run(
                &settings.kafka,
                registry.as_ref(),
                crate::tail::TailOptions {
                    topic,
                    count,
                    from_end,
                    idle: Duration::from_secs(idle_secs),
                },
            )
            .await?;
            Ok(())
        }
        Command::Check { .. } => check(&settings).await,
        Command::Schemas { command } => match command {
            SchemasCommand::Register { args } => run_schemas(&settings, &args, true).await,
            SchemasCommand::Check { args } => run_schemas(&settings, &args, false).await,
        },
        Command::Users { command, .. } => {
            crate::gateway::auth::cli::run_users(command, &settings).await
        }
        Command::Flows { command, .. } => crate::flows::cli::run(command, &settings).await,
        Command::Keys { command, .. } => {
            crate::gateway::auth::cli::run_keys(command, &settings).await
        }
    }
}

/// `eventpipe generate products`: the catalogue created if missing, then its changes.
async fn generate_products(command: GenerateCommand, settings: &Settings) -> anyhow::Result<()> {
    let GenerateCommand::Products {
        products,
        count,
        rate,
        interval,
        seed,
        topic,
        table,
        ..
    } = command;
    let invalid = |flag: &str, value: &str, reason: String| ConfigError::Invalid {
        setting: flag.into(),
        value: value.into(),
        reason,
    };
    if products == 0 {
        return Err(invalid("--products", "0", "must be 1 or more".into()).into());
    }
    if !crate::settings::valid_topic_name(&topic) {
        return Err(invalid("--topic", &topic, "not a valid topic name".into()).into());
    }
    let options = crate::catalogue::GenerateProducts {
        products,
        count: (count > 0).then_some(count),
        rate,
        interval: crate::catalogue::parse_interval(&interval)
            .map_err(|reason| invalid("--interval", &interval, reason))?,
        seed,
        topic,
        table: crate::materialise::table::TableName::parse(&table)
            .map_err(|reason| invalid("--table", &table, reason))?,
    };
    let shutdown = shutdown::install_signal_handlers();
    let started = Instant::now();
    let generated = crate::catalogue::generate(settings, &options, shutdown).await?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "catalogue of {products} products ({} created now); generated {} changes in {seconds:.2}s ({:.0}/s)",
        generated.created,
        generated.changes,
        generated.changes as f64 / seconds.max(1e-9)
    );
    Ok(())
}

/// `eventpipe store verify`: one line per topic-partition, a summary, exit 1 on any gap.
async fn store_verify(
    settings: &Settings,
    args: &StoreArgs,
    topics: Vec<String>,
    group_id: Option<String>,
) -> anyhow::Result<()> {
    let mut args = args.clone();
    if group_id.is_some() {
        args.group_id = group_id;
    }
    let store = StoreSettings::load(&args, settings)?;
    let topics = match (topics.is_empty(), &store.inputs) {
        (false, _) => topics,
        (true, crate::stage::InputTopics::Names(names)) => names.clone(),
        // A pattern: whatever topics the store holds.
        (true, crate::stage::InputTopics::Pattern(_)) => Vec::new(),
    };
    let pool = crate::store::history::connect(settings.postgres_url.as_str()).await?;
    let reports =
        crate::store::verify::verify(&settings.kafka, &pool, &topics, &store.group_id).await?;
    let total = crate::store::verify::Totals::of(&reports);
    for report in &reports {
        println!("{report}");
    }
    println!("{total}");
    let (missing, unexpected, duplicated) = (total.missing, total.unexpected, total.duplicated);
    if missing + unexpected + duplicated > 0 {
        anyhow::bail!(
            "the store differs from Kafka: {missing} missing, {unexpected} unexpected, {duplicated} duplicated"
        );
    }
    Ok(())
}

/// What every long-running stage starts with: signal handling and the telemetry endpoint.
async fn start_stage(
    settings: &Settings,
) -> anyhow::Result<(telemetry::Readiness, tokio_util::sync::CancellationToken)> {
    let shutdown = shutdown::install_signal_handlers();
    let readiness = telemetry::Readiness::default();
    telemetry::serve(
        settings.telemetry.metrics_address,
        readiness.clone(),
        crate::stage::lag::render,
        shutdown.clone(),
    )
    .await?;
    Ok((readiness, shutdown))
}

async fn run_topics(command: TopicsCommand, settings: &Settings) -> anyhow::Result<()> {
    match command {
        TopicsCommand::Apply { file, dry_run } => {
            let specs = topics::load(&file)?;
            let admin = Admin::connect(&settings.kafka)?;
            let (mut changed, mut failed) = (0, 0);
            if dry_run {
                let existing = admin.existing(&specs).await?;
                for change in topics::plan(&specs, &existing) {
                    println!("{change}");
                }
                return Ok(());
            }
            for applied in admin.apply(&specs).await? {
                match &applied.error {
                    Some(error) => {
                        failed += 1;
                        println!("FAILED  {}: {error}", applied.change);
                    }
                    None => {
                        if !matches!(
                            applied.change,
                            topics::TopicChange::Unchanged { .. }
                                | topics::TopicChange::Drift { .. }
                        ) {
                            changed += 1;
                        }
                        println!("{}", applied.change);
                    }
                }
            }
            println!(
                "{} topics defined, {changed} changes applied, {failed} failed",
                specs.len()
            );
            if failed > 0 {
                anyhow::bail!("{failed} topic changes failed");
            }
            Ok(())
        }
        TopicsCommand::List { file, json } => {
            // The definitions only mark which topics are ours; a missing file is not an error.
            let specs = topics::load(&file).unwrap_or_default();
            let admin = Admin::connect(&settings.kafka)?;
            let rows = topic_rows(&admin.metadata()?, &specs);
            if json {
                for row in rows {
                    println!("{}", serde_json::to_string(&row)?);
                }
            } else {
                println!(
                    "{:<32} {:>10} {:>11} {:>16} {:>8}",
                    "TOPIC", "PARTITIONS", "REPLICATION", "UNDER-REPLICATED", "DEFINED"
                );
                for row in rows {
                    println!(
                        "{:<32} {:>10} {:>11} {:>16} {:>8}",
                        row.name,
                        row.partitions,
                        row.replication_factor,
                        row.under_replicated,
                        if row.defined { "yes" } else { "no" }
                    );
                }
            }
            Ok(())
        }
    }
}

/// Probes each dependency with a bounded wait and prints one line per dependency.
async fn check(settings: &Settings) -> anyhow::Result<()> {
    let mut failures = Vec::new();
    let kafka = Admin::connect(&settings.kafka).and_then(|admin| admin.metadata());
    match kafka {
        Ok(metadata) => println!(
            "ok      kafka {} ({} brokers, {} topics)",
            settings.kafka.bootstrap_servers,
            metadata.brokers().len(),
            metadata.topics().len()
        ),
        Err(error) => failures.push(format!("kafka: {error}")),
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .context("building the HTTP client")?;
    for (name, url) in [
        // The cluster health API: the root endpoint is absent from some distributions.
        (
            "elasticsearch",
            settings.elasticsearch_url.join("_cluster/health")?,
        ),
        (
            "schema-registry",
            settings.schema_registry_url.join("subjects")?,
        ),
    ] {
        match http
            .get(url.clone())
            .send()
            .await
            .and_then(|r| r.error_for_status())
        {
            Ok(response) => println!("ok      {name} {url} (HTTP {})", response.status().as_u16()),
            Err(error) => failures.push(format!("{name} {url}: {error}")),
        }
    }
    let postgres = tokio::time::timeout(Duration::from_secs(5), async {
        let mut connection =
            <sqlx::PgConnection as sqlx::Connection>::connect(settings.postgres_url.as_str())
                .await?;
        sqlx::query_scalar::<_, String>("SELECT version()")
            .fetch_one(&mut connection)
            .await
    })
    .await;
    let shown = redact_url(settings.postgres_url.as_str());
    match postgres {
        Ok(Ok(version)) => println!(
            "ok      postgres {shown} ({})",
            version.split(',').next().unwrap_or(&version)
        ),
        Ok(Err(error)) => failures.push(format!("postgres {shown}: {error}")),
        Err(_) => failures.push(format!("postgres {shown}: no answer within 5s")),
    }
    for failure in &failures {
        println!("FAILED  {failure}");
    }
    if !failures.is_empty() {
        anyhow::bail!("{} of 4 dependencies unreachable", failures.len());
    }
    Ok(())
}
