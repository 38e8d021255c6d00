//! `kafkifyctl skip`: gets a stalled source past one transaction. Refused unless the relay
//! says the source is stalled at that LSN. The skip is a record on the relay's skips topic
//! (see `cdc_relay::operator`), which stays there for anyone to list; the relay's next session
//! dead-letters the transaction's events (without payload; their rows stay in the outbox for
//! `dlq redrive`) and logs and counts the skip.

use std::time::{Duration, Instant};

use cdc_relay::config::Config;
use cdc_relay::operator;
use cdc_relay::pgoutput::Lsn;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::Message;
use serde::Serialize;

use crate::table::{self, Table};
use crate::{kafka, Exit};

#[derive(Debug, clap::Args)]
pub struct SkipArgs {
    /// The stalled source (one of RELAY_SOURCES).
    #[arg(long, required_unless_present = "list")]
    pub source: Option<String>,
    /// The LSN the source is stalled at, as `status` and the relay's /ready name it.
    #[arg(long, required_unless_present = "list")]
    pub lsn: Option<Lsn>,
    /// Why, for whoever lists skips later.
    #[arg(long, required_unless_present = "list")]
    pub reason: Option<String>,
    /// Return once the skip is recorded, without waiting for the relay to get past.
    #[arg(long)]
    pub no_wait: bool,
    /// List the recorded skips instead.
    #[arg(long, conflicts_with_all = ["source", "lsn", "reason"])]
    pub list: bool,
}

/// Whether the relay's check of a source says it is stalled at `lsn`. Pure.
pub fn stalled_at(check: Option<&str>, slot: &str, lsn: Lsn) -> bool {
    check.is_some_and(|c| c.starts_with(&format!("slot {slot} stalled at {lsn}:")))
}

#[derive(Debug, Serialize)]
pub struct Recorded {
    pub source: String,
    pub lsn: String,
    pub reason: String,
    pub by: String,
    pub topic: String,
    /// The relay got past it (`None`: not waited for).
    pub passed: Option<bool>,
}

pub async fn skip(config: &Config, relay_url: &str, args: &SkipArgs) -> anyhow::Result<Recorded> {
    let (Some(name), Some(lsn), Some(reason)) = (&args.source, args.lsn, &args.reason) else {
        return Err(Exit::usage("--source, --lsn and --reason are required").into());
    };
    let source = crate::source(config, name)?;
    if reason.trim().is_empty() {
        return Err(Exit::usage("--reason: say why, for whoever reads the skips later").into());
    }
    let slot = config.slot(&source);
    let check = relay_check(relay_url, name).await?;
    if !stalled_at(check.as_deref(), &slot, lsn) {
        return Err(Exit::refused(format!(
            "refused: the relay does not say that source {name} is stalled at {lsn} (its /ready says: {})",
            check.as_deref().unwrap_or("nothing of this source")
        ))
        .into());
    }
    let client = platform::db::connect(&config.source_url(&source)).await?;
    let system_id: String = client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .map_err(|e| anyhow::anyhow!(platform::db::describe(&e)))?
        .get(0);
    let identity = config.identity(&source, system_id);
    let by = std::env::var("USER")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let topic = operator::topic(&config.checkpoint_topic);
    kafka::ensure_compacted(config, &topic).await?;
    let producer: FutureProducer = config
        .kafka
        .client_config("kafkifyctl-skip")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()?;
    let key = operator::key(&identity, lsn);
    let value = operator::value(&identity, name, lsn, reason, &by);
    producer
        .send(
            FutureRecord::to(&topic).key(&key).payload(&value),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)?;
    producer.flush(Duration::from_secs(30))?;
    eprintln!("kafkifyctl: skip of {name} at {lsn} recorded on {topic}");
    let passed = if args.no_wait {
        None
    } else {
        // The relay retries a stalled source with back-off (at most 30 s between sessions).
        let start = Instant::now();
        let mut passed = false;
        while start.elapsed() < Duration::from_secs(120) {
            let check = relay_check(relay_url, name).await.ok().flatten();
            if !stalled_at(check.as_deref(), &identity.slot, lsn) && check.as_deref() == Some("ok")
            {
                passed = true;
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Some(passed)
    };
    Ok(Recorded {
        source: name.clone(),
        lsn: lsn.to_string(),
        reason: reason.clone(),
        by,
        topic,
        passed,
    })
}

/// The relay's `/ready` check of the source.
async fn relay_check(relay_url: &str, source: &str) -> anyhow::Result<Option<String>> {
    let ready = crate::status::relay_ready(relay_url)
        .await
        .map_err(|e| anyhow::anyhow!("the relay's /ready ({relay_url}): {e}"))?;
    Ok(ready["checks"][format!("source {source}")]
        .as_str()
        .map(str::to_string))
}

/// Every recorded skip, oldest first.
pub async fn list(config: &Config) -> anyhow::Result<Vec<serde_json::Value>> {
    let topic = operator::topic(&config.checkpoint_topic);
    kafka::read_all(config, &topic, Vec::new(), |out, msg| {
        if let Some(v) = msg.payload().and_then(|p| serde_json::from_slice(p).ok()) {
            out.push(v);
        }
    })
    .await
}

pub fn render_list(skips: &[serde_json::Value]) -> String {
    let mut t = Table::new(["AT", "SOURCE", "SLOT", "LSN", "BY", "REASON"]);
    for s in skips {
        let field = |k: &str| table::or_dash(s[k].as_str());
        t.row(vec![
            field("at"),
            field("source"),
            field("slot"),
            field("lsn"),
            field("by"),
            field("reason"),
        ]);
    }
    format!("{}{} skips\n", t.render(), skips.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_stall_at_that_very_lsn_allows_a_skip() {
        let check = "slot kafkify_rest stalled at 0/16B3748: 3 sessions in a row failed without progress; last error: x";
        let lsn: Lsn = "0/16B3748".parse().unwrap();
        assert!(stalled_at(Some(check), "kafkify_rest", lsn));
        assert!(!stalled_at(
            Some(check),
            "kafkify_rest",
            "0/16B3740".parse().unwrap()
        ));
        assert!(!stalled_at(Some(check), "kafkify_grpc", lsn));
        assert!(!stalled_at(Some("ok"), "kafkify_rest", lsn));
        assert!(!stalled_at(None, "kafkify_rest", lsn));
        // Stalled before reading any transaction: there is none to skip.
        let before = "slot kafkify_rest stalled at its slot's confirmed position: 3 sessions…";
        assert!(!stalled_at(Some(before), "kafkify_rest", lsn));
    }
}
