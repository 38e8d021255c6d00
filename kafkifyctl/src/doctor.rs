//! `kafkifyctl doctor`: whether Postgres, Kafka and the schema registry are set up the way the
//! relay needs, each finding with how to fix it. Facts are read first (`*Facts`); the checks
//! over them are pure.

use std::collections::BTreeMap;
use std::time::Duration;

use cdc_relay::config::{Config, Delivery};
use rdkafka::admin::{AdminOptions, ResourceSpecifier};
use serde::Serialize;

use crate::table::Table;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    pub area: &'static str,
    pub check: String,
    pub level: Level,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn finding(
    area: &'static str,
    check: impl Into<String>,
    level: Level,
    detail: impl Into<String>,
) -> Finding {
    Finding {
        area,
        check: check.into(),
        level,
        detail: detail.into(),
        fix: None,
    }
}

impl Finding {
    fn fix(mut self, fix: impl Into<String>) -> Finding {
        self.fix = Some(fix.into());
        self
    }
}

pub fn render(findings: &[Finding]) -> String {
    let mut t = Table::new(["AREA", "CHECK", "RESULT", "DETAIL"]);
    for f in findings {
        let level = match f.level {
            Level::Ok => "ok",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        t.row(vec![
            f.area.into(),
            f.check.clone(),
            level.into(),
            f.detail.clone(),
        ]);
    }
    let mut out = t.render();
    let fixes: Vec<&Finding> = findings.iter().filter(|f| f.fix.is_some()).collect();
    if !fixes.is_empty() {
        out.push_str("\nHow to fix:\n");
        for f in fixes {
            out.push_str(&format!(
                "  {} / {}: {}\n",
                f.area,
                f.check,
                f.fix.as_deref().unwrap_or("")
            ));
        }
    }
    let fails = findings.iter().filter(|f| f.level == Level::Fail).count();
    let warns = findings.iter().filter(|f| f.level == Level::Warn).count();
    out.push_str(&format!(
        "\n{fails} failed, {warns} warnings, {} checks\n",
        findings.len()
    ));
    out
}

// ---------------------------------------------------------------- Postgres

/// Server settings, read once.
#[derive(Clone, Debug, Default)]
pub struct ServerFacts {
    pub wal_level: String,
    pub max_replication_slots: i64,
    pub slots_in_use: i64,
    pub max_wal_senders: i64,
    pub senders_in_use: i64,
    /// MB; -1 unlimited.
    pub max_slot_wal_keep_size_mb: i64,
    pub version_num: i64,
}

/// One source database's publication and the relay role's rights there.
#[derive(Clone, Debug, Default)]
pub struct SourceDbFacts {
    pub source: String,
    pub slot_exists: bool,
    /// `None`: no such publication.
    pub publication: Option<PublicationFacts>,
    pub role_replication: bool,
    pub role_reads_outbox: bool,
}

#[derive(Clone, Debug, Default)]
pub struct PublicationFacts {
    pub insert: bool,
    pub update: bool,
    pub delete: bool,
    pub truncate: bool,
    /// `schema.table` of every table it publishes.
    pub tables: Vec<String>,
}

pub fn check_server(s: &ServerFacts, config: &Config, missing_slots: i64) -> Vec<Finding> {
    let mut out = Vec::new();
    out.push(if s.wal_level == "logical" {
        finding("postgres", "wal_level", Level::Ok, "logical")
    } else {
        finding("postgres", "wal_level", Level::Fail, format!("{}: logical decoding is off", s.wal_level))
            .fix("ALTER SYSTEM SET wal_level = logical; then restart Postgres (RDS: rds.logical_replication = 1; Cloud SQL: cloudsql.logical_decoding = on)")
    });
    let free = s.max_replication_slots - s.slots_in_use;
    out.push(if free >= missing_slots {
        finding(
            "postgres",
            "max_replication_slots",
            Level::Ok,
            format!(
                "{} ({} in use, {} of the relay's to create)",
                s.max_replication_slots, s.slots_in_use, missing_slots
            ),
        )
    } else {
        finding(
            "postgres",
            "max_replication_slots",
            Level::Fail,
            format!(
                "{} with {} in use: no room for the relay's {} missing slots",
                s.max_replication_slots, s.slots_in_use, missing_slots
            ),
        )
        .fix(format!(
            "ALTER SYSTEM SET max_replication_slots = {}; then restart",
            s.slots_in_use + missing_slots + 2
        ))
    });
    let wanted = config.sources.len() as i64;
    // One more than the sources: a relay taking over, or a standby, needs a sender too.
    out.push(if s.senders_in_use <= s.max_wal_senders && s.max_wal_senders > wanted {
        finding(
            "postgres",
            "max_wal_senders",
            Level::Ok,
            format!("{} ({} in use; the relay takes one per source, {wanted})", s.max_wal_senders, s.senders_in_use),
        )
    } else {
        finding(
            "postgres",
            "max_wal_senders",
            Level::Fail,
            format!("{}: the relay takes one per source ({wanted}), and a standby or a second relay takes more", s.max_wal_senders),
        )
        .fix(format!("ALTER SYSTEM SET max_wal_senders = {}; then restart", wanted + 4))
    });
    out.push(if s.max_slot_wal_keep_size_mb < 0 {
        finding(
            "postgres",
            "max_slot_wal_keep_size",
            Level::Warn,
            "unlimited: a slot whose relay is down keeps WAL until the disk is full",
        )
        .fix("ALTER SYSTEM SET max_slot_wal_keep_size = '50GB' (what the disk can spare; a reload is enough), and alert on kafkifyctl status's HEADROOM")
    } else {
        finding(
            "postgres",
            "max_slot_wal_keep_size",
            Level::Ok,
            format!("{} MB: a slot further behind loses its WAL (the relay then reports it)", s.max_slot_wal_keep_size_mb),
        )
    });
    if config.delivery == Delivery::ExactlyOnce && s.version_num < 170000 {
        out.push(
            finding(
                "postgres",
                "failover slots",
                Level::Warn,
                format!("PostgreSQL {}: slots are not kept on standbys, so a promotion needs an operator", s.version_num / 10000),
            )
            .fix("see the README's Failover section (PostgreSQL 15 and 16: RELAY_MISSING_SLOT=create after checking what may be missing); PostgreSQL 17+ gets failover slots"),
        );
    }
    out
}

pub fn check_source_db(f: &SourceDbFacts, publication: &str) -> Vec<Finding> {
    let area = "postgres";
    let name = |c: &str| format!("{c} ({})", f.source);
    let mut out = Vec::new();
    match &f.publication {
        None => out.push(
            finding(area, name("publication"), Level::Fail, format!("{publication} does not exist in database {}", f.source))
                .fix(format!("CREATE PUBLICATION {publication} FOR TABLE outbox_events WITH (publish = 'insert'); (the services' migrate does it)")),
        ),
        Some(p) => {
            let mut extra = Vec::new();
            for (on, what) in [(p.update, "update"), (p.delete, "delete"), (p.truncate, "truncate")] {
                if on {
                    extra.push(what);
                }
            }
            out.push(if !p.insert {
                finding(area, name("publication operations"), Level::Fail, "inserts are not published: no event reaches the relay")
                    .fix(format!("ALTER PUBLICATION {publication} SET (publish = 'insert')"))
            } else if !extra.is_empty() {
                finding(
                    area,
                    name("publication operations"),
                    Level::Fail,
                    format!("publishes {} too: the outbox pruner's deletes and any update go through the relay's decoder", extra.join(", ")),
                )
                .fix(format!("ALTER PUBLICATION {publication} SET (publish = 'insert')"))
            } else {
                finding(area, name("publication operations"), Level::Ok, "inserts only")
            });
            let others: Vec<&String> = p.tables.iter().filter(|t| !t.ends_with(".outbox_events")).collect();
            out.push(if !p.tables.iter().any(|t| t.ends_with(".outbox_events")) {
                finding(area, name("publication tables"), Level::Fail, "outbox_events is not in the publication")
                    .fix(format!("ALTER PUBLICATION {publication} SET TABLE outbox_events"))
            } else if !others.is_empty() {
                finding(
                    area,
                    name("publication tables"),
                    Level::Fail,
                    format!("publishes other tables too ({}): their rows are sent to the relay, which drops them", others.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")),
                )
                .fix(format!("ALTER PUBLICATION {publication} SET TABLE outbox_events"))
            } else {
                finding(area, name("publication tables"), Level::Ok, "outbox_events only")
            });
        }
    }
    out.push(if f.role_replication {
        finding(area, name("relay role"), if f.role_reads_outbox { Level::Ok } else { Level::Warn }, if f.role_reads_outbox {
            "REPLICATION, and SELECT on outbox_events".to_string()
        } else {
            "REPLICATION, but no SELECT on outbox_events (kafkifyctl status cannot tell how long rows wait)".to_string()
        })
        .fix_if(!f.role_reads_outbox, "GRANT SELECT ON outbox_events TO <the relay's role>")
    } else {
        finding(area, name("relay role"), Level::Fail, "the relay's role lacks REPLICATION")
            .fix("ALTER ROLE <the relay's role> REPLICATION (RDS: GRANT rds_replication TO …)")
    });
    if !f.slot_exists {
        out.push(finding(area, name("slot"), Level::Warn, "no slot yet: the relay creates it when it first starts, or refuses when Kafka holds a checkpoint for it (kafkifyctl status says)"));
    }
    out
}

impl Finding {
    fn fix_if(self, cond: bool, fix: &str) -> Finding {
        if cond {
            self.fix(fix)
        } else {
            self
        }
    }
}

// ---------------------------------------------------------------- Kafka

#[derive(Clone, Debug, Default)]
pub struct TopicFacts {
    pub name: String,
    /// `None`: the topic does not exist.
    pub partitions: Option<usize>,
    pub replication_factor: usize,
    pub configs: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default)]
pub struct KafkaFacts {
    pub brokers: usize,
    pub broker_configs: BTreeMap<String, String>,
    pub topics: Vec<TopicFacts>,
    /// The `__transaction_state` topic's replication factor, when it exists.
    pub transaction_log_replicas: Option<usize>,
}

pub fn check_kafka(k: &KafkaFacts, config: &Config) -> Vec<Finding> {
    let area = "kafka";
    let mut out = Vec::new();
    let limit = u64::from(config.max_record_bytes);
    let redundant = k.brokers >= 3;
    out.push(if redundant {
        finding(area, "brokers", Level::Ok, format!("{} brokers", k.brokers))
    } else {
        finding(
            area,
            "brokers",
            Level::Warn,
            format!(
                "{} broker(s): losing one stops the pipeline (fine on a laptop)",
                k.brokers
            ),
        )
    });
    let config_of = |t: &TopicFacts, name: &str| t.configs.get(name).cloned();
    for t in &k.topics {
        let Some(partitions) = t.partitions else {
            out.push(finding(
                area,
                format!("topic {}", t.name),
                Level::Warn,
                "missing: the relay creates it at start-up",
            ));
            continue;
        };
        let is_checkpoint = t.name == config.checkpoint_topic;
        if is_checkpoint {
            out.push(if partitions == 1 {
                finding(area, format!("topic {} partitions", t.name), Level::Ok, "1")
            } else {
                finding(
                    area,
                    format!("topic {} partitions", t.name),
                    Level::Fail,
                    format!("{partitions}: a source's checkpoints spread over partitions, and the one read back after a restart may be an old one (the relay refuses to start)"),
                )
                .fix(format!("with every relay stopped: delete the topic and create it with --partitions 1 --config cleanup.policy=compact (kafka-topics.sh --create --topic {} …); the relay then re-publishes from its slots' positions", t.name))
            });
            let policy = config_of(t, "cleanup.policy").unwrap_or_default();
            out.push(if policy.split(',').any(|p| p.trim() == "compact") {
                finding(area, format!("topic {} cleanup.policy", t.name), Level::Ok, policy)
            } else {
                finding(area, format!("topic {} cleanup.policy", t.name), Level::Fail, format!("{policy}: checkpoints would be deleted by age, and a relay idle longer than the retention would start over"))
                    .fix(format!("kafka-configs.sh --alter --entity-type topics --entity-name {} --add-config cleanup.policy=compact", t.name))
            });
        }
        let max = config_of(t, "max.message.bytes").and_then(|v| v.parse::<u64>().ok());
        if let Some(max) = max.filter(|m| *m < limit) {
            out.push(
                finding(area, format!("topic {} max.message.bytes", t.name), Level::Fail, format!("{max}, below RELAY_MAX_RECORD_BYTES ({limit}): the relay refuses to start"))
                    .fix(format!("kafka-configs.sh --alter --entity-type topics --entity-name {} --add-config max.message.bytes={limit}", t.name)),
            );
        }
        let min_isr = config_of(t, "min.insync.replicas")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(1);
        if redundant && (t.replication_factor < 3 || min_isr < 2) {
            out.push(
                finding(area, format!("topic {} replication", t.name), Level::Warn, format!("replication factor {}, min.insync.replicas {min_isr}: an acknowledged record can be lost with one broker", t.replication_factor))
                    .fix(format!("kafka-reassign-partitions.sh to 3 replicas, and kafka-configs.sh --alter --entity-type topics --entity-name {} --add-config min.insync.replicas=2", t.name)),
            );
        }
    }
    let existing = k.topics.iter().filter(|t| t.partitions.is_some()).count();
    if !out.iter().any(|f| f.check.ends_with(" max.message.bytes")) {
        out.push(finding(
            area,
            "topics max.message.bytes",
            Level::Ok,
            format!("the {existing} existing topics take RELAY_MAX_RECORD_BYTES ({limit})"),
        ));
    }
    if redundant && !out.iter().any(|f| f.check.ends_with(" replication")) {
        out.push(finding(
            area,
            "topic replication",
            Level::Ok,
            "every existing topic has 3 replicas or more",
        ));
    }
    if config.delivery == Delivery::ExactlyOnce {
        let rf = k
            .broker_configs
            .get("transaction.state.log.replication.factor")
            .and_then(|v| v.parse::<usize>().ok());
        let isr = k
            .broker_configs
            .get("transaction.state.log.min.isr")
            .and_then(|v| v.parse::<usize>().ok());
        let actual = k.transaction_log_replicas.or(rf).unwrap_or(0);
        out.push(if !redundant || (actual >= 3 && isr.unwrap_or(0) >= 2) {
            finding(area, "transaction state log", Level::Ok, format!("replication factor {actual}, min.isr {}", isr.map_or("?".into(), |i| i.to_string())))
        } else {
            finding(area, "transaction state log", Level::Warn, format!("replication factor {actual}, min.isr {}: a broker's loss can stop every transactional producer", isr.map_or("?".into(), |i| i.to_string())))
                .fix("brokers: transaction.state.log.replication.factor=3 and transaction.state.log.min.isr=2 (before __transaction_state is first created)")
        });
        let max = k
            .broker_configs
            .get("transaction.max.timeout.ms")
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis);
        out.push(
            match cdc_relay::topics::check_transaction_timeout(config.transaction_timeout, max) {
                Ok(()) => finding(
                    area,
                    "transaction timeout",
                    Level::Ok,
                    format!(
                        "RELAY_TRANSACTION_TIMEOUT {:?} within transaction.max.timeout.ms {}",
                        config.transaction_timeout,
                        max.map_or("?".into(), |m| format!("{m:?}"))
                    ),
                ),
                Err(e) => finding(area, "transaction timeout", Level::Fail, e),
            },
        );
    }
    out
}

// ---------------------------------------------------------------- registry

#[derive(Clone, Debug)]
pub struct SubjectFacts {
    pub subject: String,
    pub registered: bool,
    pub compatibility: Option<String>,
    /// The registry's verdict on the local schema: `None` when it could not be asked.
    pub compatible: Option<bool>,
    pub messages: Vec<String>,
}

pub fn check_registry(subjects: &[SubjectFacts]) -> Vec<Finding> {
    let area = "registry";
    let mut out = Vec::new();
    for s in subjects {
        if !s.registered {
            out.push(finding(
                area,
                format!("subject {}", s.subject),
                Level::Warn,
                "not registered yet: the relay registers it at start-up",
            ));
            continue;
        }
        let level = s.compatibility.as_deref().unwrap_or("?");
        out.push(if level == "NONE" {
            finding(area, format!("subject {} compatibility", s.subject), Level::Warn, "NONE: any change is accepted, and old consumers may not read new events")
                .fix(format!("curl -X PUT -H 'Content-Type: application/json' --data '{{\"compatibility\":\"BACKWARD\"}}' $SCHEMA_REGISTRY_URL/config/{}", s.subject))
        } else {
            finding(area, format!("subject {} compatibility", s.subject), Level::Ok, level)
        });
        out.push(match s.compatible {
            Some(true) => finding(area, format!("subject {} local schema", s.subject), Level::Ok, "compatible with the latest registered version"),
            Some(false) => finding(
                area,
                format!("subject {} local schema", s.subject),
                Level::Fail,
                format!("incompatible with the latest registered version: {}", if s.messages.is_empty() { "(the registry gave no reason)".to_string() } else { s.messages.join("; ") }),
            )
            .fix("change the schema in schemas/ so it is compatible (add fields with defaults), or register it under a new topic"),
            None => finding(area, format!("subject {} local schema", s.subject), Level::Fail, "the registry could not check it"),
        });
    }
    out
}

// ---------------------------------------------------------------- reading the facts

pub async fn postgres(config: &Config) -> Result<Vec<Finding>, String> {
    let mut sources = Vec::new();
    let mut server = None;
    for source in &config.sources {
        let client = platform::db::connect(&config.source_url(source))
            .await
            .map_err(|e| format!("Postgres ({}): {e}", source.0))?;
        let d = |e: tokio_postgres::Error| platform::db::describe(&e);
        if server.is_none() {
            let r = client
                .query_one(
                    "SELECT current_setting('wal_level'),
                            current_setting('max_replication_slots')::bigint,
                            (SELECT count(*) FROM pg_replication_slots),
                            current_setting('max_wal_senders')::bigint,
                            (SELECT count(*) FROM pg_stat_replication),
                            (SELECT setting::bigint FROM pg_settings WHERE name = 'max_slot_wal_keep_size'),
                            current_setting('server_version_num')::bigint",
                    &[],
                )
                .await
                .map_err(d)?;
            server = Some(ServerFacts {
                wal_level: r.get(0),
                max_replication_slots: r.get(1),
                slots_in_use: r.get(2),
                max_wal_senders: r.get(3),
                senders_in_use: r.get(4),
                max_slot_wal_keep_size_mb: r.get(5),
                version_num: r.get(6),
            });
        }
        let slot = config.slot(source);
        let r = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1),
                        (SELECT rolreplication FROM pg_roles WHERE rolname = current_user),
                        coalesce(has_table_privilege(to_regclass('outbox_events'), 'SELECT'), false)",
                &[&slot],
            )
            .await
            .map_err(d)?;
        let publication = client
            .query_opt(
                "SELECT pubinsert, pubupdate, pubdelete, pubtruncate,
                        ARRAY(SELECT schemaname || '.' || tablename FROM pg_publication_tables t
                               WHERE t.pubname = p.pubname ORDER BY 1)
                   FROM pg_publication p WHERE pubname = $1",
                &[&config.publication.0],
            )
            .await
            .map_err(d)?
            .map(|p| PublicationFacts {
                insert: p.get(0),
                update: p.get(1),
                delete: p.get(2),
                truncate: p.get(3),
                tables: p.get(4),
            });
        sources.push(SourceDbFacts {
            source: source.0.clone(),
            slot_exists: r.get(0),
            role_replication: r.get(1),
            role_reads_outbox: r.get(2),
            publication,
        });
    }
    let missing = sources.iter().filter(|s| !s.slot_exists).count() as i64;
    let mut out = server.map_or_else(Vec::new, |s| check_server(&s, config, missing));
    for s in &sources {
        out.extend(check_source_db(s, &config.publication.0));
    }
    Ok(out)
}

pub async fn kafka(config: &Config) -> Result<Vec<Finding>, String> {
    let admin = config.kafka.admin("kafkifyctl")?;
    let names: Vec<String> = cdc_relay::topics::wanted(config)
        .into_iter()
        .map(|(n, _, _)| n)
        .collect();
    let (metadata, admin) = tokio::task::spawn_blocking(move || {
        let m = admin.inner().fetch_metadata(None, Duration::from_secs(10));
        (m, admin)
    })
    .await
    .map_err(|e| e.to_string())?;
    let metadata = metadata.map_err(|e| format!("Kafka metadata: {e}"))?;
    let mut facts = KafkaFacts {
        brokers: metadata.brokers().len(),
        ..KafkaFacts::default()
    };
    let existing: BTreeMap<&str, (usize, usize)> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| {
            (
                t.name(),
                (
                    t.partitions().len(),
                    t.partitions().first().map_or(0, |p| p.replicas().len()),
                ),
            )
        })
        .collect();
    facts.transaction_log_replicas = existing.get("__transaction_state").map(|(_, rf)| *rf);
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let to_map = |r: &rdkafka::admin::ConfigResource| -> BTreeMap<String, String> {
        r.entries
            .iter()
            .filter_map(|e| e.value.clone().map(|v| (e.name.clone(), v)))
            .collect()
    };
    for name in &names {
        let Some((partitions, rf)) = existing.get(name.as_str()) else {
            facts.topics.push(TopicFacts {
                name: name.clone(),
                ..TopicFacts::default()
            });
            continue;
        };
        let described = admin
            .describe_configs(&[ResourceSpecifier::Topic(name)], &options)
            .await
            .map_err(|e| format!("configuration of topic {name}: {e}"))?;
        let configs = described
            .first()
            .and_then(|r| r.as_ref().ok())
            .map(to_map)
            .unwrap_or_default();
        facts.topics.push(TopicFacts {
            name: name.clone(),
            partitions: Some(*partitions),
            replication_factor: *rf,
            configs,
        });
    }
    if let Some(broker) = metadata.brokers().first() {
        let described = admin
            .describe_configs(&[ResourceSpecifier::Broker(broker.id())], &options)
            .await
            .map_err(|e| format!("configuration of broker {}: {e}", broker.id()))?;
        facts.broker_configs = described
            .first()
            .and_then(|r| r.as_ref().ok())
            .map(to_map)
            .unwrap_or_default();
    }
    Ok(check_kafka(&facts, config))
}

/// The local schemas: each event type's schema as compiled in, or `<topic>.avsc` from `dir`.
pub fn local_schemas(dir: Option<&std::path::Path>) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for event_type in schemas::EVENT_TYPES {
        let text = match dir {
            Some(d) => {
                let path = d.join(format!("{event_type}.avsc"));
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?
            }
            None => schemas::schema_text(event_type)
                .unwrap_or_default()
                .to_string(),
        };
        out.push((event_type.to_string(), text));
    }
    Ok(out)
}

pub async fn registry(
    config: &Config,
    schemas_dir: Option<&std::path::Path>,
) -> Result<Vec<Finding>, String> {
    let http = config.registry.http_client();
    let base = &config.registry.schema_registry_url.0;
    let mut facts = Vec::new();
    for (event_type, text) in local_schemas(schemas_dir)? {
        let subject = schemas::value_subject(&config.topic(&event_type));
        let get = |url: String| {
            let http = http.clone();
            async move {
                let resp = http
                    .get(&url)
                    .send()
                    .await
                    .map_err(|e| format!("GET {url}: {e}"))?;
                let status = resp.status();
                let body: serde_json::Value = resp.json().await.unwrap_or_default();
                Ok::<_, String>((status, body))
            }
        };
        let (status, _) = get(format!("{base}/subjects/{subject}/versions/latest")).await?;
        if status.as_u16() == 404 {
            facts.push(SubjectFacts {
                subject,
                registered: false,
                compatibility: None,
                compatible: Some(true),
                messages: vec![],
            });
            continue;
        }
        if !status.is_success() {
            return Err(format!(
                "GET {base}/subjects/{subject}/versions/latest: HTTP {status}"
            ));
        }
        let (_, config_body) = get(format!("{base}/config/{subject}?defaultToGlobal=true")).await?;
        let compatibility = config_body["compatibilityLevel"]
            .as_str()
            .map(str::to_string);
        let url = format!("{base}/compatibility/subjects/{subject}/versions/latest?verbose=true");
        let resp = http
            .post(&url)
            .header("Content-Type", "application/vnd.schemaregistry.v1+json")
            .json(&serde_json::json!({ "schema": text }))
            .send()
            .await
            .map_err(|e| format!("POST {url}: {e}"))?;
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        let compatible = body["is_compatible"].as_bool();
        let messages = body["messages"]
            .as_array()
            .map(|m| {
                m.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_else(|| {
                body["message"]
                    .as_str()
                    .map(|m| vec![m.to_string()])
                    .unwrap_or_default()
            });
        facts.push(SubjectFacts {
            subject,
            registered: true,
            compatibility,
            compatible,
            messages,
        });
    }
    Ok(check_registry(&facts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn config() -> Config {
        Config::try_parse_from([
            "cdc-relay",
            "--database-url",
            "postgres://relay@localhost/x",
        ])
        .unwrap()
    }

    fn levels(f: &[Finding]) -> Vec<(String, Level)> {
        f.iter().map(|f| (f.check.clone(), f.level)).collect()
    }

    #[test]
    fn a_publication_of_updates_or_other_tables_fails_with_the_alter_that_fixes_it() {
        let f = SourceDbFacts {
            source: "rest".into(),
            slot_exists: true,
            publication: Some(PublicationFacts {
                insert: true,
                update: true,
                delete: false,
                truncate: false,
                tables: vec!["public.outbox_events".into(), "public.resources".into()],
            }),
            role_replication: true,
            role_reads_outbox: true,
        };
        let out = check_source_db(&f, "kafkify_outbox");
        let ops = out
            .iter()
            .find(|f| f.check == "publication operations (rest)")
            .unwrap();
        assert_eq!(ops.level, Level::Fail);
        assert!(ops.detail.contains("update"), "{}", ops.detail);
        assert_eq!(
            ops.fix.as_deref(),
            Some("ALTER PUBLICATION kafkify_outbox SET (publish = 'insert')")
        );
        let tables = out
            .iter()
            .find(|f| f.check == "publication tables (rest)")
            .unwrap();
        assert_eq!(tables.level, Level::Fail);
        assert!(tables.detail.contains("public.resources"));
        assert_eq!(
            out.iter()
                .find(|f| f.check == "relay role (rest)")
                .unwrap()
                .level,
            Level::Ok
        );
    }

    #[test]
    fn the_outbox_publication_as_migrated_passes() {
        let f = SourceDbFacts {
            source: "rest".into(),
            slot_exists: true,
            publication: Some(PublicationFacts {
                insert: true,
                tables: vec!["public.outbox_events".into()],
                ..PublicationFacts::default()
            }),
            role_replication: true,
            role_reads_outbox: true,
        };
        assert!(check_source_db(&f, "p")
            .iter()
            .all(|f| f.level == Level::Ok));
    }

    #[test]
    fn server_settings_below_what_the_relay_needs_fail_and_name_the_setting() {
        let s = ServerFacts {
            wal_level: "replica".into(),
            max_replication_slots: 3,
            slots_in_use: 2,
            max_wal_senders: 10,
            senders_in_use: 1,
            max_slot_wal_keep_size_mb: -1,
            version_num: 150010,
        };
        let out = check_server(&s, &config(), 3);
        let l = levels(&out);
        assert!(l.contains(&("wal_level".into(), Level::Fail)));
        assert!(l.contains(&("max_replication_slots".into(), Level::Fail)));
        assert!(l.contains(&("max_wal_senders".into(), Level::Ok)));
        assert!(l.contains(&("max_slot_wal_keep_size".into(), Level::Warn)));
        assert!(l.contains(&("failover slots".into(), Level::Warn)));
    }

    #[test]
    fn a_checkpoint_topic_with_three_partitions_or_no_compaction_fails() {
        let c = config();
        let mut configs = BTreeMap::new();
        configs.insert("cleanup.policy".to_string(), "delete".to_string());
        configs.insert("max.message.bytes".to_string(), "1048588".to_string());
        let k = KafkaFacts {
            brokers: 1,
            topics: vec![TopicFacts {
                name: c.checkpoint_topic.clone(),
                partitions: Some(3),
                replication_factor: 1,
                configs,
            }],
            ..KafkaFacts::default()
        };
        let out = check_kafka(&k, &c);
        let l = levels(&out);
        assert!(
            l.contains(&(
                format!("topic {} partitions", c.checkpoint_topic),
                Level::Fail
            )),
            "{l:?}"
        );
        assert!(
            l.contains(&(
                format!("topic {} cleanup.policy", c.checkpoint_topic),
                Level::Fail
            )),
            "{l:?}"
        );
        assert!(l.contains(&("brokers".into(), Level::Warn)));
    }

    #[test]
    fn topics_below_the_relays_record_limit_fail_and_thin_replication_warns_on_a_cluster() {
        let c = config();
        let mut configs = BTreeMap::new();
        configs.insert("max.message.bytes".to_string(), "1000".to_string());
        configs.insert("min.insync.replicas".to_string(), "1".to_string());
        let k = KafkaFacts {
            brokers: 3,
            topics: vec![TopicFacts {
                name: "resource.created".into(),
                partitions: Some(6),
                replication_factor: 3,
                configs,
            }],
            ..KafkaFacts::default()
        };
        let l = levels(&check_kafka(&k, &c));
        assert!(
            l.contains(&(
                "topic resource.created max.message.bytes".into(),
                Level::Fail
            )),
            "{l:?}"
        );
        assert!(
            l.contains(&("topic resource.created replication".into(), Level::Warn)),
            "{l:?}"
        );
    }

    #[test]
    fn an_incompatible_local_schema_fails_with_the_registrys_reason() {
        let out = check_registry(&[SubjectFacts {
            subject: "resource.created-value".into(),
            registered: true,
            compatibility: Some("BACKWARD".into()),
            compatible: Some(false),
            messages: vec!["READER_FIELD_MISSING_DEFAULT_VALUE: size".into()],
        }]);
        let f = out.iter().find(|f| f.level == Level::Fail).unwrap();
        assert!(f.detail.contains("READER_FIELD_MISSING_DEFAULT_VALUE"));
    }
}
