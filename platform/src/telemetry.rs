//! Logging set-up. Traces over OTLP join here later; the log format is chosen by `LOG_FORMAT`.

use tracing_subscriber::{fmt, EnvFilter};

use crate::config::{CommonArgs, LogFormat};

/// Installs the global subscriber. Fails if the filter does not parse, naming `LOG_LEVEL`.
pub fn init(common: &CommonArgs) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&common.log_level).map_err(|e| {
        anyhow::anyhow!(
            "LOG_LEVEL `{}` is not a valid filter: {e}",
            common.log_level
        )
    })?;
    // Colours only for a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_ansi(ansi);
    let result = match common.log_format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))
}
