//! Logs and traces. The log format is chosen by `LOG_FORMAT`; traces go over OTLP/HTTP when the
//! standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or `…_TRACES_ENDPOINT`) is set, and nowhere
//! otherwise. Spans and trace ids exist either way, so logs carry them and the outbox hands
//! them on even when nothing is exported.

use std::fmt;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{CommonArgs, LogFormat};

/// Keeps the tracer provider; [`Telemetry::shutdown`] sends the spans still queued.
pub struct Telemetry {
    provider: SdkTracerProvider,
    exporting: bool,
}

impl Telemetry {
    /// Flushes and stops the exporter; call once, last thing before exit.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            if self.exporting {
                eprintln!("telemetry: could not flush the last spans: {e}");
            }
        }
    }
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

/// Whether the standard variables ask for trace export.
fn export_wanted() -> bool {
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.eq_ignore_ascii_case("none"));
    !disabled
        && (env_set("OTEL_EXPORTER_OTLP_ENDPOINT") || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

fn provider(service: &str) -> anyhow::Result<(SdkTracerProvider, bool)> {
    // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over our default name.
    let resource = if env_set("OTEL_SERVICE_NAME") {
        Resource::builder().build()
    } else {
        Resource::builder()
            .with_service_name(service.to_string())
            .build()
    };
    let builder = SdkTracerProvider::builder().with_resource(resource);
    if !export_wanted() {
        return Ok((builder.build(), false));
    }
    for var in [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ] {
        if let Ok(v) = std::env::var(var) {
            let url = v.starts_with("http://") || v.starts_with("https://");
            if !v.trim().is_empty() && !url {
                anyhow::bail!("{var} `{v}` is not an http:// or https:// URL");
            }
        }
    }
    if std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").is_ok_and(|p| p != "http/protobuf") {
        anyhow::bail!("OTEL_EXPORTER_OTLP_PROTOCOL: only `http/protobuf` is supported (OTLP over HTTP, port 4318)");
    }
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()
        .map_err(|e| {
            anyhow::anyhow!("OTEL_EXPORTER_OTLP_ENDPOINT: cannot build the exporter: {e}")
        })?;
    Ok((builder.with_batch_exporter(exporter).build(), true))
}

/// Installs the global subscriber: log lines filtered by `LOG_LEVEL`, and the spans of target
/// [`crate::trace::TARGET`] to OpenTelemetry regardless of the log level. Fails naming
/// `LOG_LEVEL` or the `OTEL_*` variable that is wrong.
///
/// One global filter, no per-layer filters: with a per-layer filter on each layer, spans of
/// the relay were now and then created disabled under load (their context invalid, so the
/// trace broke at the relay), which a single filter does not do.
pub fn init(common: &CommonArgs, service: &str) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_new(&common.log_level)
        .and_then(|_| {
            EnvFilter::try_new(format!(
                "{},{}=trace",
                common.log_level,
                crate::trace::TARGET
            ))
        })
        .map_err(|e| {
            anyhow::anyhow!(
                "LOG_LEVEL `{}` is not a valid filter: {e}",
                common.log_level
            )
        })?;
    let (provider, exporting) = provider(service)?;
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("kafkify"))
        .with_location(false)
        .with_threads(false)
        .with_level(false)
        .with_target(false);
    // Colours only for a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let logs = match common.log_format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .fmt_fields(NoSpanFields)
            .event_format(JsonLines)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .compact()
            .with_target(true)
            .with_ansi(ansi)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(otel)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))?;
    Ok(Telemetry {
        provider,
        exporting,
    })
}

/// JSON lines name a span but do not print its fields, so the fmt layer need not format the
/// fields of every span when it opens: per request that was measurable (api-rest create
/// throughput, see the issue notes).
struct NoSpanFields;

impl<'w> FormatFields<'w> for NoSpanFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        _writer: Writer<'w>,
        _fields: R,
    ) -> fmt::Result {
        Ok(())
    }
}

/// One JSON object per line: time, level, target, the event's fields, the innermost span's
/// name, and the trace and span ids of the innermost traced span, so a log line leads to its
/// trace in Jaeger. The ids are found through the global dispatcher, which [`init`] installs.
pub struct JsonLines;

struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                .into(),
        );
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        event.record(&mut Fields(&mut line));
        if let Some(scope) = ctx.event_scope() {
            let mut named = false;
            for span in scope {
                if !named {
                    line.insert("span".into(), span.name().into());
                    named = true;
                }
                let ids = tracing::dispatcher::get_default(|d| {
                    tracing_opentelemetry::get_otel_context(&span.id(), d)
                })
                .map(|cx| cx.span().span_context().clone())
                .filter(|sc| sc.is_valid());
                if let Some(sc) = ids {
                    line.insert("trace_id".into(), sc.trace_id().to_string().into());
                    line.insert("span_id".into(), sc.span_id().to_string().into());
                    break;
                }
            }
        }
        writeln!(writer, "{}", Value::Object(line))
    }
}
