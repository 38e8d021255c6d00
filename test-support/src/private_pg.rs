//! A private PostgreSQL 15 cluster (its own data directory and port, from Debian's binaries),
//! for tests that change server settings or kill and promote servers without touching anyone
//! else's: optionally with a physical standby made by `pg_basebackup`. Stopped and deleted on
//! drop.

use std::path::PathBuf;

pub struct PrivatePostgres {
    dir: PathBuf,
    pub port: u16,
}

fn bin(name: &str) -> String {
    format!("/usr/lib/postgresql/15/bin/{name}")
}

/// Runs a Postgres command; as root, as the `postgres` user (Postgres refuses to run as root).
fn run(args: &[&str]) -> std::process::Output {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    let mut cmd = if root {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--"]);
        c.args(args);
        c
    } else {
        let mut c = std::process::Command::new(args[0]);
        c.args(&args[1..]);
        c
    };
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn new_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(crate::unique("pg"));
    std::fs::create_dir_all(&dir).unwrap();
    let _ = std::process::Command::new("chown")
        .args(["postgres:postgres", &dir.display().to_string()])
        .status();
    dir
}

impl PrivatePostgres {
    /// A new cluster with `wal_level = logical`, trust authentication on 127.0.0.1, and
    /// `settings` (postgresql.conf lines).
    pub fn start(settings: &str) -> PrivatePostgres {
        let dir = new_dir();
        let data = dir.join("data").display().to_string();
        run(&[
            &bin("initdb"),
            "-D",
            &data,
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
        ]);
        let pg = PrivatePostgres {
            dir,
            port: crate::service::free_port(),
        };
        pg.configure(&format!(
            "listen_addresses = '127.0.0.1'\nwal_level = logical\n{settings}\n"
        ));
        pg.pg_ctl_start();
        pg
    }

    /// A physical standby of `primary` (`pg_basebackup -R`, with its own replication slot on
    /// the primary and `hot_standby_feedback`), streaming when this returns.
    pub fn standby_of(primary: &PrivatePostgres) -> PrivatePostgres {
        let dir = new_dir();
        let data = dir.join("data").display().to_string();
        let slot = format!("standby_{}", std::process::id());
        run(&[
            &bin("pg_basebackup"),
            "-h",
            "127.0.0.1",
            "-p",
            &primary.port.to_string(),
            "-U",
            "postgres",
            "-D",
            &data,
            "-R",
            // An immediate checkpoint: the default spreads it over minutes.
            "-c",
            "fast",
            "-X",
            "stream",
            "-C",
            "-S",
            &slot,
        ]);
        let pg = PrivatePostgres {
            dir,
            port: crate::service::free_port(),
        };
        pg.configure("hot_standby_feedback = on\n");
        pg.pg_ctl_start();
        pg
    }

    /// Appends to postgresql.conf (later lines win) this cluster's port and socket directory.
    fn configure(&self, settings: &str) {
        let conf = self.dir.join("data/postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str(&format!(
            "\nport = {}\nunix_socket_directories = '{}'\n{settings}",
            self.port,
            self.dir.display()
        ));
        std::fs::write(&conf, text).unwrap();
    }

    fn pg_ctl_start(&self) {
        let data = self.dir.join("data").display().to_string();
        let log = self.dir.join("postgres.log").display().to_string();
        run(&[&bin("pg_ctl"), "-D", &data, "-l", &log, "-w", "start"]);
    }

    /// The postmaster and every backend SIGKILLed, as a crash of the machine would leave them.
    pub fn kill(&self) {
        let pid_file = self.dir.join("data/postmaster.pid");
        let pid = std::fs::read_to_string(&pid_file)
            .unwrap_or_else(|e| panic!("{}: {e}", pid_file.display()));
        let pid = pid.lines().next().unwrap().trim().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-STOP", &pid])
            .status();
        let _ = std::process::Command::new("pkill")
            .args(["-KILL", "-P", &pid])
            .status();
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status();
    }

    /// Promotes a standby; returns once it takes writes.
    pub fn promote(&self) {
        let data = self.dir.join("data").display().to_string();
        run(&[&bin("pg_ctl"), "-D", &data, "-w", "promote"]);
    }

    /// A URL for `user` on `db` (trust authentication, no password).
    pub fn url(&self, user: &str, db: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{db}", self.port)
    }

    /// The log of this cluster, for a failing test's message.
    pub fn log(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // A killed cluster has nothing left to stop.
        let running = std::fs::read_to_string(self.dir.join("data/postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().map(|l| l.trim().to_string()))
            .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
        if running {
            let data = self.dir.join("data").display().to_string();
            let _ = std::panic::catch_unwind(|| {
                run(&[&bin("pg_ctl"), "-D", &data, "-m", "immediate", "-w", "stop"])
            });
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
