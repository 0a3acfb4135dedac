//! A private PostgreSQL cluster for tests: `initdb` in a temporary directory, `pg_ctl start` on a
//! free loopback port, stopped (immediate mode) when dropped. PostgreSQL refuses to run as root,
//! so under root the cluster belongs to the `postgres` system user (the Debian package creates it)
//! and its commands run through `runuser`. Shared by `fleet/tests` and `tests/e2e` (by `#[path]`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const NOT_INSTALLED: &str =
    "PostgreSQL is not installed: run `make test` (scripts/test-deps.sh installs it with apt-get)";

/// A running cluster with trust authentication for the user `fleet`.
pub struct TestPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl TestPostgres {
    /// Creates and starts a cluster; returns once it accepts connections.
    pub fn start() -> Self {
        let bin = postgres_bin_dir();
        let dir = tempfile::tempdir().expect("temporary directory");
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let cluster = Self { dir, bin, port };
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(cluster.dir.path())
                .status()
                .expect("chown");
            assert!(status.success(), "cannot give {} to the postgres user", cluster.dir.path().display());
        }
        let data = cluster.data_dir();
        cluster.run(
            "initdb",
            &["-D", path_str(&data), "-U", "fleet", "-A", "trust", "--no-sync", "-E", "UTF8", "--locale=C"],
        );
        let options = format!(
            "-p {port} -k {socket} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            socket = path_str(cluster.dir.path())
        );
        let log = cluster.dir.path().join("postgres.log");
        cluster.run(
            "pg_ctl",
            &["-D", path_str(&data), "-o", &options, "-l", path_str(&log), "-w", "-t", "60", "start"],
        );
        cluster
    }

    /// `postgres://fleet@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://fleet@127.0.0.1:{}/postgres", self.port)
    }

    /// The server log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let binary = self.bin.join(tool);
        let mut command = if is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&binary);
            command
        } else {
            Command::new(&binary)
        };
        let output = command
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
        assert!(
            output.status.success(),
            "{tool} {args:?} failed:\n{}{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.log()
        );
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let binary = self.bin.join("pg_ctl");
        let data = self.data_dir();
        let mut command = if is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&binary);
            command
        } else {
            Command::new(&binary)
        };
        let _stopped = command
            .args(["-D", path_str(&data), "-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The newest `/usr/lib/postgresql/VERSION/bin`.
fn postgres_bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect(NOT_INSTALLED)
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).expect(NOT_INSTALLED)
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}
