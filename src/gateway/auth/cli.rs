//! `eventpipe users` and `eventpipe keys`: the gateway's credentials managed straight on
//! PostgreSQL, without a gateway running; a secret is printed once, alone on stdout.
//!
//! What accompanies a secret (what it is, that it is shown once) goes to stderr, so
//! `KEY=$(eventpipe keys issue --producer lk)` captures the key and nothing else.

use std::io::Read;

use anyhow::Context;
use chrono::{DateTime, SecondsFormat, Utc};
use clap::{ArgGroup, Subcommand};

use super::credentials::{self, KeyOwner, KeyRequest, UserRequest};
use super::schema;
use super::secret::Secret;
use crate::config::Settings;
use crate::settings::ConfigError;

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Add a user who may read what the filters select. The password is read from stdin with
    /// --password-stdin; otherwise one is generated and printed once.
    Add {
        name: String,
        /// What the user may read: SERVICE:ACTION, either side `*` (repeatable or
        /// comma-separated).
        #[arg(long = "filter", value_name = "SERVICE:ACTION", required = true)]
        filters: Vec<String>,
        /// Topics the user may read (repeatable or comma-separated; default: any).
        #[arg(long = "topic", value_name = "TOPIC", value_delimiter = ',')]
        topics: Vec<String>,
        /// Read the password from stdin (its first line) instead of generating one.
        #[arg(long)]
        password_stdin: bool,
    },
    /// List the users (no passwords).
    List {
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a user with their consumer keys and sessions.
    Remove { name: String },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Issue an API key: a producer's bound to the service it sends as, or a consumer's under a
    /// user (reading within the user's filters). The key is printed once.
    Issue(IssueArgs),
    /// List the keys (no secrets) with their status.
    List {
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key: every gateway refuses it within a second.
    Revoke { id: String },
}

#[derive(Debug, clap::Args)]
#[command(group(ArgGroup::new("owner").required(true).args(["producer", "consumer"])))]
pub struct IssueArgs {
    /// A producer key sending as this service.
    #[arg(long, value_name = "SERVICE")]
    pub producer: Option<String>,
    /// A consumer key reading for this user.
    #[arg(long, value_name = "USER")]
    pub consumer: Option<String>,
    /// Consumer keys: narrower than the user's filters (default: the user's).
    #[arg(long = "filter", value_name = "SERVICE:ACTION", requires = "consumer")]
    pub filters: Vec<String>,
    /// Producer: topics it may send to; consumer: narrower than the user's (default: any).
    #[arg(long = "topic", value_name = "TOPIC", value_delimiter = ',')]
    pub topics: Vec<String>,
    /// Expire after `30d`, `12h`, `90m` or seconds (default: never).
    #[arg(long, value_name = "DURATION")]
    pub expires: Option<String>,
    /// What the key is for, shown in listings.
    #[arg(long, default_value = "")]
    pub description: String,
}

async fn connect(settings: &Settings) -> anyhow::Result<sqlx::PgPool> {
    Ok(schema::connect(settings.postgres_url.as_str(), 2).await?)
}

/// The first line of stdin, without its line ending.
fn password_from_stdin() -> anyhow::Result<Secret> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .context("reading the password from stdin")?;
    let line = text.lines().next().unwrap_or_default();
    Ok(Secret::new(line))
}

fn shown_time(time: Option<DateTime<Utc>>) -> String {
    time.map_or_else(
        || "never".into(),
        |t| t.to_rfc3339_opts(SecondsFormat::Secs, true),
    )
}

fn shown_list(items: &[String], empty: &str) -> String {
    match items.is_empty() {
        true => empty.to_string(),
        false => items.join(","),
    }
}

pub async fn run_users(command: UsersCommand, settings: &Settings) -> anyhow::Result<()> {
    let pool = connect(settings).await?;
    match command {
        UsersCommand::Add {
            name,
            filters,
            topics,
            password_stdin,
        } => {
            let password = match password_stdin {
                true => Some(password_from_stdin()?),
                false => None,
            };
            let added = credentials::add_user(
                &pool,
                UserRequest {
                    name,
                    password,
                    filters,
                    topics,
                },
            )
            .await?;
            eprintln!(
                "added user {} (filters {}; topics {})",
                added.user.name,
                added.user.filters.join(","),
                shown_list(&added.user.topics, "any")
            );
            if let Some(password) = added.generated_password {
                eprintln!("its generated password, shown once (only its hash is stored):");
                println!("{}", password.expose());
            }
        }
        UsersCommand::List { json } => {
            let users = credentials::list_users(&pool).await?;
            if json {
                for user in &users {
                    println!("{}", serde_json::to_string(user)?);
                }
            } else {
                println!("{:<24} {:<40} {:<24} CREATED", "NAME", "FILTERS", "TOPICS");
                for user in &users {
                    println!(
                        "{:<24} {:<40} {:<24} {}",
                        user.name,
                        user.filters.join(","),
                        shown_list(&user.topics, "any"),
                        shown_time(Some(user.created_at))
                    );
                }
            }
        }
        UsersCommand::Remove { name } => {
            credentials::remove_user(&pool, &name).await?;
            eprintln!("removed user {name} with their keys and sessions");
        }
    }
    Ok(())
}

pub async fn run_keys(command: KeysCommand, settings: &Settings) -> anyhow::Result<()> {
    match command {
        KeysCommand::Issue(args) => issue(args, settings).await,
        KeysCommand::List { json } => {
            let pool = connect(settings).await?;
            let keys = credentials::list_keys(&pool).await?;
            let now = Utc::now();
            if json {
                for key in &keys {
                    let mut line = serde_json::to_value(key)?;
                    line["status"] = key.status(now).into();
                    println!("{line}");
                }
                return Ok(());
            }
            println!(
                "{:<12} {:<8} {:<20} {:<7} {:<28} {:<20} {:<20} DESCRIPTION",
                "ID", "KIND", "OWNER", "STATUS", "FILTERS", "TOPICS", "EXPIRES"
            );
            for key in &keys {
                println!(
                    "{:<12} {:<8} {:<20} {:<7} {:<28} {:<20} {:<20} {}",
                    key.id,
                    key.kind,
                    key.owner(),
                    key.status(now),
                    shown_list(
                        &key.filters,
                        if key.kind == "consumer" {
                            "(user's)"
                        } else {
                            "-"
                        }
                    ),
                    shown_list(&key.topics, "any"),
                    shown_time(key.expires_at),
                    key.description
                );
            }
            Ok(())
        }
        KeysCommand::Revoke { id } => {
            let pool = connect(settings).await?;
            let at = credentials::revoke_key(&pool, &id).await?;
            eprintln!("key {id} revoked at {}", shown_time(Some(at)));
            Ok(())
        }
    }
}

async fn issue(args: IssueArgs, settings: &Settings) -> anyhow::Result<()> {
    let expires_in = args
        .expires
        .as_deref()
        .map(|text| {
            crate::store::settings::parse_duration(text).map_err(|reason| ConfigError::Invalid {
                setting: "--expires".into(),
                value: text.into(),
                reason,
            })
        })
        .transpose()?;
    let owner = match (args.producer, args.consumer) {
        (Some(service), _) => KeyOwner::Producer { service },
        (None, Some(user)) => KeyOwner::Consumer { user },
        // clap's `owner` group requires one of them.
        (None, None) => anyhow::bail!("name --producer SERVICE or --consumer USER"),
    };
    let pool = connect(settings).await?;
    let issued = credentials::issue_key(
        &pool,
        KeyRequest {
            owner,
            filters: args.filters,
            topics: args.topics,
            expires_in,
            description: args.description,
        },
    )
    .await?;
    let row = &issued.row;
    let scope = match row.kind.as_str() {
        "producer" => format!(
            "sending as {} to topics {}",
            row.owner(),
            shown_list(&row.topics, "any")
        ),
        _ => format!(
            "reading for user {} within filters {}",
            row.owner(),
            shown_list(&row.filters, "(the user's)")
        ),
    };
    eprintln!(
        "issued {} key {} {scope}; expires {}",
        row.kind,
        row.id,
        shown_time(row.expires_at)
    );
    eprintln!("the key, shown once (only its SHA-256 is stored):");
    println!("{}", issued.key.expose());
    Ok(())
}
