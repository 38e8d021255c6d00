//! kafkifyctl: what an operator of Kafkify asks at 3 a.m., answered from one command with the
//! services' own settings (environment, `.env`, flags; TLS and SASL included).
//!
//! Exit codes: 0 all is well; 1 something needs a person (a stalled source, a failed doctor
//! check, an incompatible schema); 2 a usage or configuration error; 3 Postgres, Kafka, the
//! registry or the relay could not be read.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod dlq;
mod doctor;
mod kafka;
mod replay;
mod skip;
mod status;
mod table;
mod tail;

#[derive(Debug, Parser)]
#[command(
    name = "kafkifyctl",
    version,
    about = "Operate Kafkify: every source's slot, checkpoint and lag; records decoded through the registry; a doctor for Postgres, Kafka and the registry."
)]
struct Cli {
    /// Print JSON instead of tables (one object; `tail` prints one per line).
    #[arg(long, global = true)]
    json: bool,

    /// The relay's ops endpoint: its /ready says why a source is stalled.
    #[arg(
        long,
        env = "KAFKIFY_RELAY_URL",
        default_value = "http://127.0.0.1:8091"
    )]
    relay_url: platform::config::HttpUrl,

    #[command(subcommand)]
    command: Command,

    /// The relay's own settings (DATABASE_URL of its role, RELAY_*, KAFKA_*, SCHEMA_REGISTRY_URL).
    #[command(flatten)]
    relay: cdc_relay::config::Config,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Per source: slot, checkpoint, lag in bytes and seconds, WAL retained and the headroom
    /// before max_slot_wal_keep_size, stalled or not and why; dead letters; consumer groups.
    Status,
    /// Follow a topic's records, Avro decoded to JSON, with key, partition, offset and headers.
    Tail(tail::TailArgs),
    /// Dead letters: list them with their reasons, show one, and redrive them (publish again,
    /// exactly once, from the outbox table into their real topic).
    Dlq {
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
    /// Publish a source's outbox rows still in its table again, from a time on: a backfill
    /// for a new consumer. Resumable (--resume RUN_ID).
    Replay(replay::ReplayArgs),
    /// Get a stalled source past one transaction: refused unless it is stalled at that LSN;
    /// its events are dead-lettered, and the skip is recorded (--list shows them).
    Skip(skip::SkipArgs),
    /// Check Postgres, Kafka and the registry against what the relay needs, and say how to fix.
    Doctor {
        /// Only the registry: is every local schema compatible with what is registered? For CI
        /// before a deploy (exit 1 on an incompatible change).
        #[arg(long)]
        schemas: bool,
        /// Read `<event type>.avsc` from this directory instead of the schemas built in.
        #[arg(long, value_name = "DIR")]
        schemas_dir: Option<PathBuf>,
    },
}

const NEEDS_A_PERSON: u8 = 1;
const USAGE: u8 = 2;
const UNREACHABLE: u8 = 3;

/// An error that ends the command with an exit code of its own rather than 3 (unreachable).
#[derive(Debug)]
pub struct Exit {
    pub code: u8,
    pub message: String,
}

impl Exit {
    /// Given something that cannot work (an unknown source, topic or run): exit 2, like a
    /// usage error.
    pub fn usage(message: impl Into<String>) -> Exit {
        Exit {
            code: USAGE,
            message: message.into(),
        }
    }

    /// Refused because the deployment is not in the state the command requires (a skip of a
    /// source that is not stalled there): exit 1.
    pub fn refused(message: impl Into<String>) -> Exit {
        Exit {
            code: NEEDS_A_PERSON,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

/// `--source`: one of the relay's sources (RELAY_SOURCES), or a usage error naming them.
pub fn source(
    config: &cdc_relay::config::Config,
    name: &str,
) -> Result<cdc_relay::config::Identifier, Exit> {
    let source: cdc_relay::config::Identifier = name
        .parse()
        .map_err(|e: String| Exit::usage(format!("--source: {e}")))?;
    if !config.sources.contains(&source) {
        let known: Vec<&str> = config.sources.iter().map(|s| s.0.as_str()).collect();
        return Err(Exit::usage(format!(
            "--source {name}: not one of RELAY_SOURCES ({})",
            known.join(", ")
        )));
    }
    Ok(source)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = platform::config::load();
    if let Err(e) = cli.relay.validate() {
        platform::config::fail(e);
    }
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kafkifyctl: {e:#}");
            ExitCode::from(e.downcast_ref::<Exit>().map_or(UNREACHABLE, |x| x.code))
        }
    }
}

/// Prints `value` as JSON with `--json`, else as the text `render` makes of it.
fn show<T: serde::Serialize>(
    json: bool,
    value: &T,
    render: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", render(value));
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = &cli.relay;
    let relay_url = cli.relay_url.0.trim_end_matches('/');
    match &cli.command {
        Command::Status => {
            let report = status::gather(config, relay_url).await;
            show(cli.json, &report, |report| report.render())?;
            Ok(if !report.healthy() {
                ExitCode::from(NEEDS_A_PERSON)
            } else if !report.errors.is_empty() {
                ExitCode::from(UNREACHABLE)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Tail(args) => {
            tail::run(config, args, cli.json).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq { command } => match command {
            dlq::DlqCommand::List(filter) => {
                let letters = dlq::read(config, filter).await?;
                show(cli.json, &letters, |letters| dlq::render_list(letters))?;
                Ok(ExitCode::SUCCESS)
            }
            dlq::DlqCommand::Show { event_id } => {
                let filter = dlq::Filter {
                    ids: vec![event_id.clone()],
                    reason: None,
                    since: None,
                    until: None,
                };
                let letters = dlq::read(config, &filter).await?;
                if letters.is_empty() {
                    eprintln!("kafkifyctl: no dead letter has event id {event_id}");
                    return Ok(ExitCode::from(NEEDS_A_PERSON));
                }
                show(cli.json, &letters, |letters| {
                    letters.iter().map(dlq::render_one).collect()
                })?;
                Ok(ExitCode::SUCCESS)
            }
            dlq::DlqCommand::Redrive {
                filter,
                dry_run,
                batch,
            } => {
                let results = dlq::redrive(config, filter, *dry_run, *batch).await?;
                show(cli.json, &results, |results| {
                    dlq::render_redrive(results, *dry_run)
                })?;
                // Events that could not be redriven need a person; those done before do not.
                let stuck = results.iter().any(|r| {
                    matches!(
                        r.outcome,
                        dlq::Outcome::NotInOutbox
                            | dlq::Outcome::StillFails(_)
                            | dlq::Outcome::DeliveredAlready
                    )
                });
                Ok(if stuck {
                    ExitCode::from(NEEDS_A_PERSON)
                } else {
                    ExitCode::SUCCESS
                })
            }
        },
        Command::Replay(args) => {
            let summary = replay::run(config, args).await?;
            show(cli.json, &summary, |s| {
                format!(
                    "replay {}: {} published, {} skipped (they would be dead-lettered){}\n",
                    s.run,
                    s.published,
                    s.skipped,
                    if s.done { "" } else { ", not finished" }
                )
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Skip(args) if args.list => {
            let skips = skip::list(config).await?;
            show(cli.json, &skips, |skips| skip::render_list(skips))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Skip(args) => {
            let recorded = skip::skip(config, relay_url, args).await?;
            show(cli.json, &recorded, |r| {
                format!(
                    "skip of {} at {} recorded on {}{}\n",
                    r.source,
                    r.lsn,
                    r.topic,
                    match r.passed {
                        None => "",
                        Some(true) => "; the relay got past it",
                        Some(false) => "; the relay has not got past it within 120 s (kafkifyctl status says why)",
                    }
                )
            })?;
            Ok(if recorded.passed == Some(false) {
                ExitCode::from(NEEDS_A_PERSON)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Doctor {
            schemas,
            schemas_dir,
        } => {
            let mut findings = Vec::new();
            if !schemas {
                findings.extend(doctor::postgres(config).await.map_err(anyhow::Error::msg)?);
                findings.extend(doctor::kafka(config).await.map_err(anyhow::Error::msg)?);
            }
            findings.extend(
                doctor::registry(config, schemas_dir.as_deref())
                    .await
                    .map_err(anyhow::Error::msg)?,
            );
            show(cli.json, &findings, |findings| doctor::render(findings))?;
            Ok(if findings.iter().any(|f| f.level == doctor::Level::Fail) {
                ExitCode::from(NEEDS_A_PERSON)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}
