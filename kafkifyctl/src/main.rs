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

/// A command given something that cannot work (an unknown source, a run that does not
/// exist): exit 2, like a usage error.
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// A command refused because the deployment is not in the state it requires (a skip of a
/// source that is not stalled there): exit 1.
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

const USAGE: u8 = 2;
const NEEDS_A_PERSON: u8 = 1;
const UNREACHABLE: u8 = 3;

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
            ExitCode::from(if e.downcast_ref::<Usage>().is_some() {
                USAGE
            } else if e.downcast_ref::<Refused>().is_some() {
                NEEDS_A_PERSON
            } else {
                UNREACHABLE
            })
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = &cli.relay;
    match &cli.command {
        Command::Status => {
            let report = status::gather(config, cli.relay_url.0.trim_end_matches('/')).await;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
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
                if cli.json {
                    println!("{}", serde_json::to_string_pretty(&letters)?);
                } else {
                    print!("{}", dlq::render_list(&letters));
                }
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
                if cli.json {
                    println!("{}", serde_json::to_string_pretty(&letters)?);
                } else {
                    for d in &letters {
                        print!("{}", dlq::render_one(d));
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            dlq::DlqCommand::Redrive {
                filter,
                dry_run,
                batch,
            } => {
                let results = dlq::redrive(config, filter, *dry_run, *batch).await?;
                if cli.json {
                    println!("{}", serde_json::to_string_pretty(&results)?);
                } else {
                    print!("{}", dlq::render_redrive(&results, *dry_run));
                }
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
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                println!(
                    "replay {}: {} published, {} skipped (they would be dead-lettered){}",
                    summary.run,
                    summary.published,
                    summary.skipped,
                    if summary.done { "" } else { ", not finished" }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Skip(args) if args.list => {
            let skips = skip::list(config).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&skips)?);
            } else {
                print!("{}", skip::render_list(&skips));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Skip(args) => {
            let recorded = skip::skip(config, cli.relay_url.0.trim_end_matches('/'), args).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&recorded)?);
            } else {
                println!(
                    "skip of {} at {} recorded on {}{}",
                    recorded.source,
                    recorded.lsn,
                    recorded.topic,
                    match recorded.passed {
                        None => "",
                        Some(true) => "; the relay got past it",
                        Some(false) => "; the relay has not got past it within 120 s (kafkifyctl status says why)",
                    }
                );
            }
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
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&findings)?);
            } else {
                print!("{}", doctor::render(&findings));
            }
            Ok(if findings.iter().any(|f| f.level == doctor::Level::Fail) {
                ExitCode::from(NEEDS_A_PERSON)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}
