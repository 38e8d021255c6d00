//! Typed configuration from environment variables and flags.
//!
//! Every binary declares one `clap::Parser` struct whose fields carry `env = "…"` and a default,
//! so `--help` lists every setting, flags override the environment, and a `.env` file in the
//! working directory is read first for local development.

use std::fmt;
use std::str::FromStr;

use clap::Parser;

/// Parses the binary's configuration, or prints one line naming the bad setting and exits.
///
/// `--help` and `--version` print as usual and exit 0.
pub fn load<T: Parser>() -> T {
    load_from(std::env::args_os())
}

/// Like [`load`], with explicit arguments (tests).
pub fn load_from<T, I, A>(args: I) -> T
where
    T: Parser,
    I: IntoIterator<Item = A>,
    A: Into<std::ffi::OsString> + Clone,
{
    // A missing .env is the normal case outside local development; a broken one is not. Only
    // the working directory's file counts: a .env found in some parent directory would be a
    // surprise.
    if let Err(err) = dotenvy::from_path(".env") {
        if !err.not_found() {
            eprintln!("config error: .env: {err}");
            std::process::exit(2);
        }
    }
    match T::try_parse_from(args) {
        Ok(config) => config,
        Err(err) => match err.kind() {
            clap::error::ErrorKind::DisplayHelp
            | clap::error::ErrorKind::DisplayVersion
            | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => err.exit(),
            _ => {
                eprintln!("config error: {}", describe::<T>(&err));
                std::process::exit(2);
            }
        },
    }
}

/// Stops start-up with one line naming the setting, for checks that span several settings.
pub fn fail(message: impl fmt::Display) -> ! {
    eprintln!("config error: {message}");
    std::process::exit(2);
}

/// One line for a parse error, naming the environment variable behind the flag when there is
/// one: in a deployment the setting was almost always given through the environment.
pub fn describe<T: clap::CommandFactory>(err: &clap::Error) -> String {
    let line = one_line(&err.render().to_string());
    let Some(clap::error::ContextValue::String(arg)) =
        err.get(clap::error::ContextKind::InvalidArg)
    else {
        return line;
    };
    let long = arg
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .trim_start_matches("--");
    let env = T::command()
        .get_arguments()
        .find(|a| a.get_long() == Some(long))
        .and_then(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned());
    match env {
        Some(env) => format!("{line} (environment variable {env})"),
        None => line,
    }
}

/// Folds clap's multi-line message into one line, dropping the usage and help hints: operators
/// grep start-up failures out of log collectors line by line.
pub fn one_line(rendered: &str) -> String {
    rendered
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information")
        })
        .map(|l| l.strip_prefix("error: ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `LOG_FORMAT`: JSON lines for deployments, readable lines for a terminal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// Settings every binary has, flattened into its own config struct.
#[derive(Clone, Debug, clap::Args)]
pub struct CommonArgs {
    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "pretty")]
    pub log_format: LogFormat,

    /// Log filter in `tracing` syntax, e.g. `info` or `info,cdc_relay=debug`.
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// How long in-flight work may take to finish after SIGTERM before the process exits anyway.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "25s", value_parser = parse_duration)]
    pub shutdown_timeout: std::time::Duration,
}

/// A comma-separated list of Kafka bootstrap servers, checked to be `host:port` pairs so a typo
/// fails at start-up rather than as a librdkafka retry loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Brokers(pub String);

impl FromStr for Brokers {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let list: Vec<&str> = s
            .split(',')
            .map(str::trim)
            .filter(|b| !b.is_empty())
            .collect();
        if list.is_empty() {
            return Err("expected host:port[,host:port…]".into());
        }
        for broker in &list {
            let Some((host, port)) = broker.rsplit_once(':') else {
                return Err(format!("`{broker}` is not host:port"));
            };
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(format!("`{broker}` is not host:port"));
            }
        }
        Ok(Brokers(list.join(",")))
    }
}

impl fmt::Display for Brokers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An `http://` or `https://` base URL without a trailing slash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpUrl(pub String);

impl FromStr for HttpUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("http://")
            .or_else(|| s.strip_prefix("https://"))
            .ok_or_else(|| "expected an http:// or https:// URL".to_string())?;
        if rest.is_empty() || rest.starts_with('/') {
            return Err("the URL has no host".into());
        }
        Ok(HttpUrl(s.trim_end_matches('/').to_string()))
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Durations as `250ms`, `30s`, `5m` or `1h`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    use std::time::Duration;
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 500ms, 30s, 5m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!(
            "`{s}` has an unknown unit `{unit}` (use ms, s, m or h)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[derive(Debug, Parser)]
    struct Demo {
        #[arg(
            long,
            env = "KAFKIFY_TEST_DEMO_BROKERS",
            default_value = "127.0.0.1:9092"
        )]
        brokers: Brokers,
        #[command(flatten)]
        common: CommonArgs,
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn brokers_are_checked() {
        assert_eq!("a:1, b:2".parse::<Brokers>().unwrap().0, "a:1,b:2");
        assert!("localhost".parse::<Brokers>().is_err());
        assert!(":9092".parse::<Brokers>().is_err());
        assert!("host:99999".parse::<Brokers>().is_err());
        assert!("".parse::<Brokers>().is_err());
    }

    #[test]
    fn urls_are_checked() {
        assert_eq!(
            "http://x:8081/".parse::<HttpUrl>().unwrap().0,
            "http://x:8081"
        );
        assert!("x:8081".parse::<HttpUrl>().is_err());
        assert!("http://".parse::<HttpUrl>().is_err());
    }

    #[test]
    fn a_bad_setting_is_named_on_one_line() {
        let err = Demo::try_parse_from(["demo", "--brokers", "nope"]).unwrap_err();
        let line = describe::<Demo>(&err);
        assert!(!line.contains('\n'));
        assert!(line.contains("--brokers <BROKERS>"), "{line}");
        assert!(line.contains("`nope` is not host:port"), "{line}");
        assert!(
            line.ends_with("(environment variable KAFKIFY_TEST_DEMO_BROKERS)"),
            "{line}"
        );
    }

    #[test]
    fn defaults_apply() {
        let demo = Demo::try_parse_from(["demo"]).unwrap();
        assert_eq!(demo.brokers.0, "127.0.0.1:9092");
        assert_eq!(demo.common.log_format, LogFormat::Pretty);
        assert_eq!(demo.common.shutdown_timeout, Duration::from_secs(25));
    }
}
