//! The Prometheus registry every binary exposes on `/metrics`.
//!
//! Names follow `kafkify_<service>_…` with the unit in the name; the registry prefix gives the
//! first part so call sites name only what they measure.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

/// A registry prefixed `kafkify_<service>`, with `build_info` and `start_time_seconds` already in.
pub fn registry(service: &str) -> Registry {
    let mut registry = Registry::with_prefix(format!("kafkify_{}", service.replace('-', "_")));

    let build: Family<BuildLabels, Gauge> = Family::default();
    build
        .get_or_create(&BuildLabels {
            version: env!("CARGO_PKG_VERSION").to_string(),
        })
        .set(1);
    registry.register(
        "build_info",
        "Build version of this binary (always 1)",
        build,
    );

    let started: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default();
    started.set(now);
    registry.register(
        "start_time_seconds",
        "Process start time since the epoch",
        started,
    );
    registry.register_collector(Box::new(ProcessCollector));
    registry
}

/// CPU, memory, threads and open files of this process, read from /proc at each scrape (zero
/// where /proc is missing, i.e. off Linux).
#[derive(Debug)]
struct ProcessCollector;

/// Linux reports CPU time in clock ticks, 100 a second on every architecture we ship for.
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

#[derive(Debug, Default, PartialEq)]
struct ProcessStats {
    cpu_seconds: f64,
    resident_bytes: i64,
    virtual_bytes: i64,
    threads: i64,
}

/// Parses /proc/self/stat (CPU time, threads, virtual size) and the `VmRSS` line of
/// /proc/self/status (resident memory, in kB, so no page size is needed).
fn parse_proc(stat: &str, status: &str) -> ProcessStats {
    // The command name (field 2) may hold spaces; the fields after its closing ')' do not.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // `fields[0]` is field 3 (state): utime is field 14, stime 15, threads 20, vsize 23.
    let field = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(0);
    ProcessStats {
        cpu_seconds: (field(14) + field(15)) as f64 / CLOCK_TICKS_PER_SECOND,
        resident_bytes: rss_kb * 1024,
        virtual_bytes: field(23) as i64,
        threads: field(20) as i64,
    }
}

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let p = parse_proc(&read("/proc/self/stat"), &read("/proc/self/status"));
        let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as i64);

        let cpu = ConstCounter::new(p.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time of this process",
            None,
            cpu.metric_type(),
        )?)?;
        for (name, help, value) in [
            (
                "process_resident_memory_bytes",
                "Resident memory of this process",
                p.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size of this process",
                p.virtual_bytes,
            ),
            ("process_threads", "Threads of this process", p.threads),
            (
                "process_open_fds",
                "Open file descriptors of this process",
                open_fds,
            ),
        ] {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        Ok(())
    }
}

/// Renders the registry in the Prometheus text format (OpenMetrics flavour).
pub fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(4096);
    // Writing into a String cannot fail.
    let _ = encode(&mut out, registry);
    out
}

/// The content type matching [`render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_and_status_parse() {
        // Captured from a running api-rest, with a space and a ')' in the command name.
        let stat = "4242 (api rest) x) S 1 4242 4242 0 -1 4194560 2517 0 0 0 153 47 0 0 20 0 9 0 \
                    61735 1127813120 4093 18446744073709551615 1 1 0 0 0 0 0 4096 17638 0 0 0 17 \
                    1 0 0 0 0 0";
        let status = "Name:\tapi-rest\nVmPeak:\t 1101380 kB\nVmRSS:\t   16372 kB\nThreads:\t9\n";
        assert_eq!(
            parse_proc(stat, status),
            ProcessStats {
                cpu_seconds: 2.0,
                resident_bytes: 16372 * 1024,
                virtual_bytes: 1127813120,
                threads: 9,
            }
        );
        assert_eq!(parse_proc("", ""), ProcessStats::default());
    }

    #[test]
    fn process_metrics_are_exported_under_the_prefix() {
        let text = render(&registry("api-rest"));
        for name in [
            "kafkify_api_rest_process_cpu_seconds_total",
            "kafkify_api_rest_process_resident_memory_bytes",
            "kafkify_api_rest_process_open_fds",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(name)),
                "{name} missing:\n{text}"
            );
        }
    }

    #[test]
    fn names_carry_the_service_prefix() {
        let text = render(&registry("cdc-relay"));
        assert!(
            text.contains("kafkify_cdc_relay_build_info{version=\""),
            "{text}"
        );
        assert!(
            text.contains("kafkify_cdc_relay_start_time_seconds "),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
