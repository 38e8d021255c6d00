//! `cargo build --release -p cdc-relay && cargo bench -p worker --bench pipeline [-- --events N
//! --size BYTES --runs R --rates 1000,5000,20000 --seconds S --batch-size B --lane-capacity C]`
//!
//! The pipeline as a user sizes it, by its slowest stage: the real relay and worker (release
//! builds) against the local stack (`./kafkify up --infra`). Prints what it measured:
//! - drain, R runs: a backlog of N outbox events (1,000 per transaction) is written while the
//!   relay and the worker are stopped; the relay is started and a read_committed consumer
//!   times the relay's exactly-once drain (first to last record); then the worker is started
//!   and its drain is timed from its own rows (first to last `processed_at`). The relay's
//!   drain is the ceiling the worker's is compared with;
//! - fixed offered rates, everything running: events committed at each rate for S seconds
//!   (one transaction every 10 ms); commit → worker row latency (`processed_at − commit_ts`,
//!   both Postgres clocks: `processed_at` is taken at the insert, just before the worker's
//!   commit) p50 and p99, next to commit → visible to a read_committed consumer (the relay's
//!   part, which the pipeline cannot beat), and the events not yet in the worker's table when
//!   the writing stops (the lag). A rate is sustained if that lag is under one second's worth
//!   of its events. The writer is one connection; at the top rates it may offer less than
//!   asked, and the offered rate printed is what it managed.
//!
//! Numbers, not assertions. Everything shares this machine's cores: Postgres, Kafka, the
//! registry, the relay, the worker and this writer.

use std::time::{Duration, Instant};

use test_support::bench::{
    drain, drain_positioned, histogram_mean, metric_sum, outbox_insert_sql, percentile,
};
use test_support::service::{workspace_bin, Service};
use test_support::{consumer_group, stack, unique, Source, TestDb};

const WORKER: &str = env!("CARGO_BIN_EXE_worker");

struct Args {
    events: usize,
    size: usize,
    runs: usize,
    rates: Vec<usize>,
    seconds: u64,
    batch_size: Option<String>,
    lane_capacity: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        events: 200_000,
        size: 500,
        runs: 3,
        rates: vec![1_000, 5_000, 10_000, 20_000, 40_000],
        seconds: 10,
        batch_size: None,
        lane_capacity: None,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().unwrap_or_default();
        match flag.as_str() {
            "--events" => a.events = value().parse().expect("--events N"),
            "--size" => a.size = value().parse().expect("--size BYTES"),
            "--runs" => a.runs = value().parse().expect("--runs R"),
            "--rates" => {
                a.rates = value()
                    .split(',')
                    .map(|r| r.parse().expect("--rates 1000,5000"))
                    .collect()
            }
            "--seconds" => a.seconds = value().parse().expect("--seconds S"),
            "--batch-size" => a.batch_size = Some(value()),
            "--lane-capacity" => a.lane_capacity = Some(value()),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

struct Stack {
    source: TestDb,
    sink: TestDb,
    prefix: String,
    group: String,
    size: usize,
    batch_size: Option<String>,
    lane_capacity: Option<String>,
}

impl Stack {
    fn relay(&self) -> Service {
        Service::spawn(
            &workspace_bin("cdc-relay"),
            &[
                ("DATABASE_URL", self.source.relay_dsn()),
                ("RELAY_SOURCES", self.source.name.clone()),
                ("RELAY_TOPIC_PREFIX", self.prefix.clone()),
                (
                    "RELAY_CHECKPOINT_TOPIC",
                    format!("{}checkpoints", self.prefix),
                ),
                ("KAFKA_BROKERS", stack().kafka_brokers.clone()),
                ("SCHEMA_REGISTRY_URL", stack().schema_registry_url.clone()),
                ("LOG_LEVEL", "warn".into()),
            ],
        )
    }

    async fn worker(&self) -> Service {
        let mut env = vec![
            ("DATABASE_URL", self.sink.owner_dsn()),
            ("TOPIC_PREFIX", self.prefix.clone()),
            ("CONSUMER_GROUP", self.group.clone()),
            ("KAFKA_BROKERS", stack().kafka_brokers.clone()),
            ("SCHEMA_REGISTRY_URL", stack().schema_registry_url.clone()),
            ("LOG_LEVEL", "warn".into()),
        ];
        if let Some(b) = &self.batch_size {
            env.push(("BATCH_SIZE", b.clone()));
        }
        if let Some(c) = &self.lane_capacity {
            env.push(("LANE_CAPACITY", c.clone()));
        }
        let mut w = Service::spawn(WORKER, &env);
        w.wait_for("/ready", 200, Duration::from_secs(60)).await;
        w
    }

    async fn write(&self, n: usize, per_tx: usize, offset: usize) {
        let owner = self.source.owner().await;
        for i in (0..n).step_by(per_tx) {
            owner
                .batch_execute(&outbox_insert_sql(per_tx.min(n - i), self.size, offset + i))
                .await
                .unwrap();
        }
    }

    async fn sink_i64(&self, sql: &str) -> i64 {
        self.sink
            .owner()
            .await
            .query_one(sql, &[])
            .await
            .unwrap()
            .get(0)
    }

    async fn count_recorded(&self) -> i64 {
        self.sink_i64("SELECT count(*) FROM processed_events").await
    }
}

/// Events this worker process recorded, from its own counter. Waiting polls this, not
/// `count(*)`: a count every 100 ms scans a table growing by 200,000 rows a run, and those
/// scans took about a tenth of the machine's CPU from the worker being measured (perf, run 1).
async fn recorded(worker: &Service) -> i64 {
    let (status, text) = worker.get("/metrics").await;
    assert_eq!(status, 200, "the worker's /metrics answers");
    metric_sum(
        &text,
        "kafkify_worker_events_processed_total",
        &["outcome=\"recorded\""],
    ) as i64
}

/// Waits until `worker` has recorded `want` events (or `limit` passed); returns how many.
async fn wait_recorded(worker: &Service, want: i64, limit: Duration) -> i64 {
    let until = Instant::now() + limit;
    loop {
        let n = recorded(worker).await;
        if n >= want || Instant::now() > until {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn spread(xs: &[f64]) -> String {
    let mut s = xs.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    format!(
        "median {:.0}, min {:.0}, max {:.0} ({})",
        percentile(&s, 0.5),
        s[0],
        s[s.len() - 1],
        xs.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

#[tokio::main]
async fn main() {
    let a = args();
    let prefix = format!("{}.", unique("pipe"));
    let s = Stack {
        source: TestDb::create(Source::Rest).await,
        sink: TestDb::create(Source::Worker).await,
        group: consumer_group("bench-worker"),
        prefix,
        size: a.size,
        batch_size: a.batch_size.clone(),
        lane_capacity: a.lane_capacity.clone(),
    };
    let topic = format!("{}resource.created", s.prefix);
    // The relay creates the topics and the slot (ready = both exist); after that it may stop
    // and restart freely: the slot keeps what is written meanwhile.
    let mut relay = s.relay();
    relay.wait_for("/ready", 200, Duration::from_secs(60)).await;
    relay.terminate(Duration::from_secs(30)).await;

    println!(
        "pipeline bench: {} events per drain run, ~{} B payloads, worker BATCH_SIZE {}, LANE_CAPACITY {}",
        a.events,
        a.size,
        a.batch_size.as_deref().unwrap_or("default"),
        a.lane_capacity.as_deref().unwrap_or("default")
    );
    let (mut relay_rates, mut worker_rates) = (Vec::new(), Vec::new());
    let mut total = 0usize;
    for run in 1..=a.runs {
        s.write(a.events, 1000, total).await;
        total += a.events;
        // While the relay is stopped the topic's end cannot move, so the reader, placed at the
        // end first, sees exactly this run's records.
        let reader = tokio::spawn({
            let (topic, n) = (topic.clone(), a.events);
            async move { drain(&topic, n, Duration::from_secs(900), true).await }
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        let relay = s.relay();
        let relayed = reader.await.unwrap();
        relay.terminate(Duration::from_secs(30)).await;
        assert_eq!(
            relayed.arrivals.len(),
            a.events,
            "the relay delivered the backlog"
        );
        let since = s.count_recorded().await;
        let worker = s.worker().await;
        wait_recorded(&worker, a.events as i64, Duration::from_secs(900)).await;
        let per_tx = histogram_mean(
            &worker.get("/metrics").await.1,
            "kafkify_worker_batch_records",
        );
        // SIGTERM, not SIGKILL: a killed worker stays in the group until its session times
        // out, and the rebalance that follows stalled the next worker's partitions for about
        // 500 ms in the middle of the first offered rate (its p99 at 1,000/s: 190–300 ms).
        worker.terminate(Duration::from_secs(30)).await;
        assert_eq!(
            s.count_recorded().await,
            total as i64,
            "the worker recorded every event"
        );
        let secs: f64 = s
            .sink
            .owner()
            .await
            .query_one(
                "SELECT extract(epoch FROM max(processed_at) - min(processed_at))::float8
                 FROM (SELECT processed_at FROM processed_events ORDER BY processed_at OFFSET $1) r",
                &[&since],
            )
            .await
            .unwrap()
            .get(0);
        let worker_rate = (a.events - 1) as f64 / secs;
        println!(
            "  run {run}: relay drained {:.0} events/s, worker drained {:.0} events/s ({:.2} of the relay, {:.0} records per transaction)",
            relayed.rate(),
            worker_rate,
            worker_rate / relayed.rate(),
            per_tx
        );
        relay_rates.push(relayed.rate());
        worker_rates.push(worker_rate);
    }
    println!("  relay drain, events/s: {}", spread(&relay_rates));
    println!("  worker drain, events/s: {}", spread(&worker_rates));

    // Offered rates with everything running.
    let mut relay = s.relay();
    relay.wait_for("/ready", 200, Duration::from_secs(60)).await;
    let worker = s.worker().await;
    // One event through first: the worker has joined its group and been assigned.
    s.write(1, 1, total).await;
    total += 1;
    wait_recorded(&worker, 1, Duration::from_secs(120)).await;
    let mut sustained = None;
    println!(
        "  offered rate → commit→worker-row p50 / p99, lag when writing stopped, time to catch up"
    );
    for &rate in &a.rates {
        let start_count = recorded(&worker).await;
        let phase_start: chrono::DateTime<chrono::Utc> = s
            .source
            .owner()
            .await
            .query_one("SELECT clock_timestamp()", &[])
            .await
            .unwrap()
            .get(0);
        let owner = s.source.owner().await;
        let ticks = a.seconds * 100;
        let per_tick = (rate / 100).max(1);
        // The relay's part, for comparison: commit → visible to a read_committed consumer.
        let (positioned, ready) = tokio::sync::oneshot::channel();
        let kafka = tokio::spawn({
            let (topic, n) = (topic.clone(), ticks as usize * per_tick);
            async move {
                let limit = Duration::from_secs(a.seconds + 120);
                drain_positioned(&topic, n, limit, true, positioned).await
            }
        });
        // Placed at the end before the first write.
        ready.await.expect("the reader is positioned");
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let started = Instant::now();
        for k in 0..ticks as usize {
            tick.tick().await;
            owner
                .batch_execute(&outbox_insert_sql(per_tick, a.size, total + k * per_tick))
                .await
                .unwrap();
        }
        let n = ticks as usize * per_tick;
        let offered = n as f64 / started.elapsed().as_secs_f64();
        total += n;
        let at_stop = recorded(&worker).await;
        let lag = start_count + n as i64 - at_stop;
        let stopped = Instant::now();
        wait_recorded(&worker, start_count + n as i64, Duration::from_secs(600)).await;
        let catch_up = stopped.elapsed().as_secs_f64();
        assert_eq!(
            s.count_recorded().await,
            total as i64,
            "the worker recorded every event"
        );
        let rows = s
            .sink
            .owner()
            .await
            .query(
                "SELECT (extract(epoch FROM processed_at - commit_ts) * 1000)::float8
                 FROM processed_events WHERE commit_ts >= $1",
                &[&phase_start],
            )
            .await
            .unwrap();
        let mut lat: Vec<f64> = rows.iter().map(|r| r.get(0)).collect();
        lat.sort_by(|x, y| x.partial_cmp(y).unwrap());
        let mut visible = kafka.await.unwrap().latencies_ms;
        visible.sort_by(|x, y| x.partial_cmp(y).unwrap());
        let bounded = (lag as f64) < offered;
        println!(
            "  {:>6.0}/s ({} events): worker row p50 {:.1} ms, p99 {:.1} ms (on Kafka: p50 {:.1}, p99 {:.1}), lag {} events, caught up in {:.1} s{}",
            offered,
            lat.len(),
            percentile(&lat, 0.50),
            percentile(&lat, 0.99),
            percentile(&visible, 0.50),
            percentile(&visible, 0.99),
            lag,
            catch_up,
            if bounded { "" } else { "  ← not sustained" }
        );
        if bounded {
            sustained = Some(offered);
        }
    }
    match sustained {
        Some(r) => println!("  highest sustained offered rate: {r:.0} events/s"),
        None => println!("  no offered rate was sustained"),
    }
    drop(worker);
    drop(relay);
    test_support::delete_topics_with_prefix(&s.prefix).await;
    s.source.cleanup().await;
    s.sink.cleanup().await;
}
