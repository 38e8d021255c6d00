//! What the benchmarks share: arguments, percentiles, and pgbench as the baseline.

use crate::{stack, TestDb};

/// `--name N` from the command line, or `default`.
pub fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number"))
        })
        .unwrap_or(default)
}

/// The `p` quantile (0–1) of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs pgbench with `script` against `db` as its owning role, `clients` connections for
/// `seconds`, prepared statements; returns transactions per second.
pub fn pgbench(db: &TestDb, script: &str, clients: u64, seconds: u64) -> f64 {
    let path = std::env::temp_dir().join(format!("kafkify-pgbench-{}.sql", db.name));
    std::fs::write(&path, script).unwrap();
    let role = db.source.role();
    let out = std::process::Command::new("/usr/lib/postgresql/15/bin/pgbench")
        .args([
            "-n",
            "-M",
            "prepared",
            "-h",
            "127.0.0.1",
            "-p",
            &stack().pg_port.to_string(),
        ])
        .args([
            "-U",
            &format!("kafkify_{role}"),
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-T",
            &seconds.to_string(),
            "-f",
        ])
        .arg(&path)
        .arg(&db.name)
        .env("PGPASSWORD", stack().password(role))
        .output()
        .expect("pgbench runs (package postgresql)");
    assert!(
        out.status.success(),
        "pgbench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// One load run: completions per second, sorted latencies (ms), failed calls.
pub struct Run {
    pub rate: f64,
    pub latencies_ms: Vec<f64>,
    pub errors: usize,
}

impl From<(f64, Vec<f64>, usize)> for Run {
    fn from((rate, latencies_ms, errors): (f64, Vec<f64>, usize)) -> Run {
        Run {
            rate,
            latencies_ms,
            errors,
        }
    }
}

fn quantiles(run: &Run) -> String {
    let l = &run.latencies_ms;
    format!(
        "p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms ({} errors)",
        percentile(l, 0.5),
        percentile(l, 0.95),
        percentile(l, 0.99),
        run.errors
    )
}

/// One API closed-loop run and the pgbench runs that followed it. The two share two cores with
/// the database, so one pair is noisy (ratios from 70% to 80% were seen on the same commit);
/// the benchmarks alternate several pairs and judge by the median.
pub struct Round {
    pub api: Run,
    /// pgbench, one round trip per statement.
    pub pg_tps: f64,
    /// pgbench with the transaction pipelined (one write, as both APIs send it): the ceiling.
    pub pg_pipelined_tps: f64,
}

impl Round {
    /// The API's rate as a share of its ceiling, the pipelined pgbench.
    pub fn ratio(&self) -> f64 {
        self.api.rate / self.pg_pipelined_tps
    }
}

/// `script` (a BEGIN … END transaction) sent as one pipeline: what the APIs do, so the ceiling
/// they are held to.
pub fn pipelined(script: &str) -> String {
    script
        .replace("BEGIN;", "\\startpipeline\nBEGIN;")
        .replace("END;", "END;\n\\endpipeline")
}

/// `--rounds` (default 3) rounds of `api_run` (a closed-loop run of the API) each followed by
/// pgbench running `script`, as it is and pipelined, with the same clients and seconds.
pub async fn alternate_with_pgbench<F, Fut>(
    db: &TestDb,
    script: &str,
    clients: u64,
    seconds: u64,
    mut api_run: F,
) -> Vec<Round>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Run>,
{
    let ceiling = pipelined(script);
    let mut rounds = Vec::new();
    for _ in 0..arg("--rounds", 3) {
        let api = api_run().await;
        let pg_tps = pgbench(db, script, clients, seconds);
        let pg_pipelined_tps = pgbench(db, &ceiling, clients, seconds);
        rounds.push(Round {
            api,
            pg_tps,
            pg_pipelined_tps,
        });
    }
    rounds
}

/// The round with the median API/ceiling ratio.
pub fn median_round(rounds: &[Round]) -> &Round {
    let mut order: Vec<&Round> = rounds.iter().collect();
    order.sort_by(|a, b| a.ratio().total_cmp(&b.ratio()));
    order[order.len() / 2]
}

/// A share of a ceiling, or, past 100%, the verdict that the ceiling is wrong: a ceiling the
/// thing under test beats measures something else.
pub fn share_of_ceiling(ratio: f64) -> String {
    if ratio > 1.0 {
        format!(
            "{:.0}%, above the ceiling: the ceiling is wrong, not a result",
            100.0 * ratio
        )
    } else {
        format!("{:.0}%", 100.0 * ratio)
    }
}

/// The API-next-to-pgbench report both API benchmarks print.
pub fn report_against_pgbench(
    what: &str,
    unit: &str,
    clients: usize,
    seconds: u64,
    rounds: &[Round],
    half: &Run,
) {
    println!(
        "{what} benchmark ({clients} clients, {seconds} s each, {} alternating rounds, same database)",
        rounds.len()
    );
    for (i, r) in rounds.iter().enumerate() {
        println!(
            "  round {}: API {:.0} {unit}/s, pgbench {:.0} tps, pgbench pipelined {:.0} tps, API / pipelined {}",
            i + 1,
            r.api.rate,
            r.pg_tps,
            r.pg_pipelined_tps,
            share_of_ceiling(r.ratio())
        );
    }
    let m = median_round(rounds);
    println!(
        "  median round: {:.0} {unit}/s, {}",
        m.api.rate,
        quantiles(&m.api)
    );
    println!(
        "  pgbench, same transaction: {:.0} tps (a statement per round trip; not a ceiling)",
        m.pg_tps
    );
    println!(
        "  pgbench, same transaction pipelined (the ceiling): {:.0} tps",
        m.pg_pipelined_tps
    );
    println!("  API / ceiling (median): {}", share_of_ceiling(m.ratio()));
    println!(
        "  at half its peak ({:.0}/s offered, {:.0}/s done): {}",
        m.api.rate / 2.0,
        half.rate,
        quantiles(half)
    );
}

/// SQL inserting `n` outbox rows whose JSON payload is about `size` bytes, in one statement
/// (one transaction); keys cycle through 100 aggregates, and the payload's `created_at` is the
/// inserting transaction's clock in µs. The events pass the worker's domain rules, so the
/// whole pipeline can be measured with them.
pub fn outbox_insert_sql(n: usize, size: usize, offset: usize) -> String {
    // The fixed part of the payload is ~230 bytes; the description pads it to `size`.
    let pad = size.saturating_sub(230).max(1);
    // Event ids time-ordered as the services' UUIDv7 are (milliseconds first, then random
    // bits), so the worker's primary key grows at its end as in production, not at random
    // places.
    format!(
        "INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
         SELECT (lpad(to_hex((extract(epoch from clock_timestamp()) * 1000)::bigint), 12, '0')
                 || '7' || substr(md5(random()::text), 1, 3)
                 || '8' || substr(md5(random()::text), 1, 15))::uuid,
                'resource', 'k' || (i % 100), 'resource.created',
                jsonb_build_object('resource_id', gen_random_uuid()::text, 'name', 'bench-' || i,
                  'description', repeat('x', {pad}), 'attributes', jsonb_build_object('n', i::text),
                  'version', 1, 'created_at', (extract(epoch from clock_timestamp()) * 1000000)::bigint)
         FROM generate_series({}, {}) AS i",
        offset + 1,
        offset + n
    )
}

/// A `Key: <n> kB` line of a /proc file (`/proc/meminfo`, `/proc/PID/status`), in KiB.
pub fn proc_kib(file: &str, key: &str) -> Option<f64> {
    std::fs::read_to_string(file)
        .ok()?
        .lines()
        .find(|l| l.strip_prefix(key).is_some_and(|r| r.starts_with(':')))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The sum of a metric's samples in a Prometheus text exposition: every series of `name` that
/// carries each of `labels` (`outcome="applied"`).
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The mean of a histogram (`_sum` ÷ `_count`) in a Prometheus text exposition; NaN if it is
/// not there.
pub fn histogram_mean(text: &str, histogram: &str) -> f64 {
    let count = metric_sum(text, &format!("{histogram}_count"), &[]);
    if count == 0.0 {
        return f64::NAN;
    }
    metric_sum(text, &format!("{histogram}_sum"), &[]) / count
}

/// Peak resident memory (VmHWM) of a process, in MiB.
pub fn rss_peak_mib(pid: u32) -> f64 {
    proc_kib(&format!("/proc/{pid}/status"), "VmHWM").map_or(f64::NAN, |kib| kib / 1024.0)
}

/// Whether `topic` exists with partitions.
fn topic_exists(topic: &str) -> bool {
    stack()
        .kafka_admin()
        .inner()
        .fetch_metadata(Some(topic), std::time::Duration::from_secs(5))
        .map(|md| {
            md.topics()
                .first()
                .is_some_and(|t| t.error().is_none() && !t.partitions().is_empty())
        })
        .unwrap_or(false)
}

/// Waits until `topic` exists (a service creates it), failing after `limit`.
pub async fn wait_topic(topic: &str, limit: std::time::Duration) {
    let deadline = std::time::Instant::now() + limit;
    while !topic_exists(topic) {
        assert!(
            std::time::Instant::now() < deadline,
            "{topic} did not appear within {limit:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

fn now_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_micros() as f64 / 1000.0)
}

/// The commit time (ms) a record carries: the relay's `commit_ts` header (µs), or else the
/// `created_at` (µs) of a plain JSON payload (Debezium's outbox router has no such header).
fn commit_ms(msg: &rdkafka::message::BorrowedMessage<'_>) -> Option<f64> {
    use rdkafka::message::Headers;
    use rdkafka::Message;
    if let Some(v) = msg
        .headers()
        .and_then(|h| h.iter().find(|h| h.key == "commit_ts"))
        .and_then(|h| h.value)
    {
        return std::str::from_utf8(v)
            .ok()?
            .parse::<f64>()
            .ok()
            .map(|us| us / 1000.0);
    }
    let v: serde_json::Value = serde_json::from_slice(msg.payload()?).ok()?;
    let v = match v {
        serde_json::Value::String(s) => serde_json::from_str(&s).ok()?,
        v => v,
    };
    v["created_at"].as_f64().map(|us| us / 1000.0)
}

/// What [`drain`] saw.
pub struct Drained {
    pub arrivals: Vec<std::time::Instant>,
    /// Commit to arrival at this read_committed consumer, ms, for records that carry a commit
    /// time.
    pub latencies_ms: Vec<f64>,
    pub bytes: usize,
}

impl Drained {
    /// Records per second between the first and the last arrival.
    pub fn rate(&self) -> f64 {
        match (self.arrivals.first(), self.arrivals.last()) {
            (Some(f), Some(l)) if self.arrivals.len() > 1 => {
                (self.arrivals.len() - 1) as f64 / (*l - *f).as_secs_f64()
            }
            _ => f64::NAN,
        }
    }
}

/// Reads `topic` with a read_committed consumer (assigned, so no group join delays it), from
/// its start or its current end, until `n` records arrived or `limit` passed.
pub async fn drain(topic: &str, n: usize, limit: std::time::Duration, from_end: bool) -> Drained {
    drain_positioned(topic, n, limit, from_end, tokio::sync::oneshot::channel().0).await
}

/// [`drain`], telling `positioned` once the consumer's start offsets are fixed: a writer that
/// waits for it cannot write a record before the end it reads from.
pub async fn drain_positioned(
    topic: &str,
    n: usize,
    limit: std::time::Duration,
    from_end: bool,
    positioned: tokio::sync::oneshot::Sender<()>,
) -> Drained {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use std::time::{Duration, Instant};
    let consumer: StreamConsumer = stack()
        .kafka_config()
        .set("group.id", crate::consumer_group("bench"))
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        let offset = if from_end {
            let (_, high) = consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .unwrap();
            rdkafka::Offset::Offset(high)
        } else {
            rdkafka::Offset::Beginning
        };
        tpl.add_partition_offset(topic, p.id(), offset).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let _ = positioned.send(());
    let mut out = Drained {
        arrivals: Vec::with_capacity(n),
        latencies_ms: Vec::with_capacity(n),
        bytes: 0,
    };
    let deadline = Instant::now() + limit;
    while out.arrivals.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(msg) = tokio::time::timeout(left, consumer.recv()).await else {
            eprintln!(
                "time limit on {topic}: {} of {n} records arrived",
                out.arrivals.len()
            );
            break;
        };
        let msg = msg.unwrap();
        let now = now_ms();
        out.arrivals.push(Instant::now());
        out.bytes += msg.payload_len();
        if let Some(c) = commit_ms(&msg) {
            out.latencies_ms.push((now - c).max(0.0));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_read_from_the_text_exposition() {
        let text = "# HELP x_total X\nx_total{outcome=\"recorded\",topic=\"a\"} 3\n\
                    x_total{outcome=\"recorded\",topic=\"b\"} 4\nx_total{outcome=\"duplicate\"} 9\n\
                    h_sum 12.5\nh_count 5\nh_bucket{le=\"1\"} 2\n";
        assert_eq!(metric_sum(text, "x_total", &["outcome=\"recorded\""]), 7.0);
        assert_eq!(metric_sum(text, "x_total", &[]), 16.0);
        assert_eq!(metric_sum(text, "x", &[]), 0.0);
        assert_eq!(histogram_mean(text, "h"), 2.5);
        assert!(histogram_mean(text, "missing").is_nan());
    }

    #[test]
    fn the_ceiling_is_the_transaction_pipelined() {
        assert_eq!(
            pipelined("\\set n 1\nBEGIN;\nINSERT 1;\nEND;\n"),
            "\\set n 1\n\\startpipeline\nBEGIN;\nINSERT 1;\nEND;\n\\endpipeline\n"
        );
    }

    #[test]
    fn a_share_past_the_ceiling_says_the_ceiling_is_wrong() {
        assert_eq!(share_of_ceiling(0.814), "81%");
        assert!(share_of_ceiling(1.22).contains("the ceiling is wrong"));
    }
}
