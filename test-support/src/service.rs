//! Runs a real service binary as a child process, the way `./kafkify up` and Kubernetes do, and
//! talks to it over HTTP.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A workspace binary built beside the running test (target/<profile>/<name>). Cargo gives a
/// test only its own package's binaries; the pipeline tests need all four, which
/// `cargo test --workspace` builds before any test runs.
pub fn workspace_bin(name: &str) -> String {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build -p {name}` (or the whole workspace's tests)",
        path.display()
    );
    path.to_string_lossy().into_owned()
}

/// A port that was free a moment ago on 127.0.0.1: for an address nothing should answer on.
/// A service under test binds port 0 instead and says where it listens ([`Service::addr`]), so
/// no other process can take its port between the choice and the bind.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Where a test's child processes write their output.
pub fn log_path(name: &str) -> PathBuf {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/test-logs"));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{}.log", crate::unique(name)))
}

/// A running service binary.
pub struct Service {
    child: Child,
    /// `http://<addr>` of its ops (or API) HTTP port, once its log said it.
    base: std::sync::OnceLock<String>,
    pub log: PathBuf,
}

impl Service {
    /// Starts `bin` with `env` (on top of a clean environment plus PATH) and `HTTP_ADDR` on port 0
    /// of 127.0.0.1 (`env` may say otherwise).
    pub fn spawn(bin: &str, env: &[(&str, String)]) -> Service {
        let log = log_path(bin.rsplit('/').next().unwrap_or(bin));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin)
            .current_dir(log.parent().unwrap())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HTTP_ADDR", "127.0.0.1:0")
            .env("LOG_FORMAT", "json")
            .env("API_KEYS", crate::API_KEY)
            .envs(env.iter().map(|(k, v)| match *k {
                // A quieter level must still let the line that names the address through.
                "LOG_LEVEL" => (*k, format!("{v},{}=info", platform::ops::LISTENING)),
                _ => (*k, v.clone()),
            }))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {bin}: {e}"));
        Service {
            child,
            base: std::sync::OnceLock::new(),
            log,
        }
    }

    /// The address in `field` (`http_addr`, `grpc_addr`) of the line every binary logs once it
    /// listens, if it has logged it.
    pub fn addr(&self, field: &str) -> Option<String> {
        let text = std::fs::read_to_string(&self.log).ok()?;
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| {
                v["message"]
                    .as_str()
                    .is_some_and(|m| m.ends_with(" listening"))
            })
            .and_then(|v| v[field].as_str().map(String::from))
    }

    /// `http://<addr>` of its HTTP port, waiting (up to 60 s) for the service to listen.
    pub fn base(&self) -> String {
        if let Some(base) = self.base.get() {
            return base.clone();
        }
        let start = Instant::now();
        loop {
            if let Some(addr) = self.addr("http_addr") {
                return self.base.get_or_init(|| format!("http://{addr}")).clone();
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the service never said where it listens; log:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id (for signals).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// GET `path`; returns the status and body (or status 0 if nothing answered).
    pub async fn get(&self, path: &str) -> (u16, String) {
        // Not listening yet: nothing answered.
        let Some(base) = self
            .base
            .get()
            .cloned()
            .or_else(|| self.addr("http_addr").map(|a| format!("http://{a}")))
        else {
            return (0, String::new());
        };
        let _ = self.base.set(base.clone());
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        match client.get(format!("{base}{path}")).send().await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(_) => (0, String::new()),
        }
    }

    /// Waits until `path` answers `status`; panics with the log's tail after `limit`.
    pub async fn wait_for(&mut self, path: &str, status: u16, limit: Duration) -> String {
        let start = Instant::now();
        loop {
            let (got, body) = self.get(path).await;
            if got == status {
                return body;
            }
            if let Ok(Some(exit)) = self.child.try_wait() {
                panic!(
                    "service exited ({exit}) before {path} answered {status}; log:\n{}",
                    self.log_tail()
                );
            }
            if start.elapsed() > limit {
                panic!(
                    "{path} answered {got} {body:?}, not {status}, for {limit:?}; log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then the exit status; panics if the process has not exited within `limit`.
    pub async fn terminate(mut self, limit: Duration) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM failed");
        let start = Instant::now();
        loop {
            if let Some(exit) = self.child.try_wait().unwrap() {
                return exit;
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                panic!(
                    "no exit within {limit:?} of SIGTERM; log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // A failed test must not leave a server behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `bin` to completion (e.g. `migrate`, or a bad config); returns status and stderr+stdout.
pub fn run(bin: &str, args: &[&str], env: &[(&str, String)]) -> (ExitStatus, String) {
    let out = Command::new(bin)
        .args(args)
        .current_dir(log_path("run").parent().unwrap())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LOG_FORMAT", "json")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {bin}: {e}"));
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stdout));
    (out.status, text)
}

/// The ops contract every binary keeps: `/ready` turns 200 with the stack up, `/health` is 200,
/// `/metrics` carries `<metric_prefix>_build_info`, and SIGTERM ends the process with status 0.
pub async fn check_ops_contract(bin: &str, env: &[(&str, String)], metric_prefix: &str) {
    let mut service = Service::spawn(bin, env);
    let ready = service
        .wait_for("/ready", 200, Duration::from_secs(30))
        .await;
    assert!(
        ready.starts_with(r#"{"checks":{"#) && ready.contains(r#""status":"ready""#),
        "{ready}"
    );
    assert_eq!(
        service.get("/health").await,
        (200, r#"{"status":"ok"}"#.to_string())
    );
    let (status, metrics) = service.get("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains(&format!("{metric_prefix}_build_info{{version=\"")),
        "{metrics}"
    );
    assert!(metrics.ends_with("# EOF\n"), "{metrics}");
    let exit = service.terminate(Duration::from_secs(30)).await;
    assert!(exit.success(), "exit after SIGTERM: {exit}");
}

/// A bad setting stops start-up with exit status 2 and one line naming the variable.
pub fn check_bad_setting(bin: &str, env: &[(&str, String)], variable: &str) {
    let (status, output) = run(bin, &[], env);
    assert_eq!(status.code(), Some(2), "{output}");
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines.len(), 1, "one line, got: {output}");
    assert!(lines[0].starts_with("config error: "), "{output}");
    assert!(lines[0].contains(variable), "names {variable}: {output}");
}
