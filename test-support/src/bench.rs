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

/// One API closed-loop run and the pgbench run that followed it. The two share two cores with
/// the database, so one pair is noisy (ratios from 70% to 80% were seen on the same commit);
/// the benchmarks alternate several pairs and judge by the median.
pub struct Round {
    pub api: Run,
    pub pg_tps: f64,
}

impl Round {
    pub fn ratio(&self) -> f64 {
        self.api.rate / self.pg_tps
    }
}

/// The round with the median API/pgbench ratio.
pub fn median_round(rounds: &[Round]) -> &Round {
    let mut order: Vec<&Round> = rounds.iter().collect();
    order.sort_by(|a, b| a.ratio().total_cmp(&b.ratio()));
    order[order.len() / 2]
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
            "  round {}: API {:.0} {unit}/s, pgbench {:.0} tps, ratio {:.0}%",
            i + 1,
            r.api.rate,
            r.pg_tps,
            100.0 * r.ratio()
        );
    }
    let m = median_round(rounds);
    println!(
        "  median round: {:.0} {unit}/s, {}",
        m.api.rate,
        quantiles(&m.api)
    );
    println!("  pgbench, same transaction: {:.0} tps", m.pg_tps);
    println!("  API / pgbench (median): {:.0}%", 100.0 * m.ratio());
    println!(
        "  at half its peak ({:.0}/s offered, {:.0}/s done): {}",
        m.api.rate / 2.0,
        half.rate,
        quantiles(half)
    );
}
