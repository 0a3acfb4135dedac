//! `tandemd serve` as a real process on loopback: start it with a config, wait until it is healthy,
//! stop it with SIGTERM or kill it with SIGKILL.

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::fixtures::tandemd_binary;

/// A running `tandemd serve`.
pub struct DaemonProcess {
    child: Option<Child>,
    pub addr: SocketAddr,
    log_path: PathBuf,
}

/// An HTTP client for the tests (ring is the TLS crypto provider, as in tandemd).
pub fn http_client(timeout: Duration) -> reqwest::blocking::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::blocking::Client::builder().timeout(timeout).build().unwrap()
}

/// A free loopback port (bound and released; fine for tests on one machine).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl DaemonProcess {
    /// Starts `tandemd serve --model MODEL --listen 127.0.0.1:PORT --config CONFIG` where CONFIG is
    /// `config_toml` written into `work_dir` (which also holds the state dir and the log).
    pub fn start(work_dir: &Path, model: &Path, config_toml: &str) -> Self {
        Self::start_on(work_dir, model, config_toml, free_port())
    }

    /// As [`DaemonProcess::start`], on a given port (to restart a daemon where it was).
    pub fn start_on(work_dir: &Path, model: &Path, config_toml: &str, port: u16) -> Self {
        std::fs::create_dir_all(work_dir).unwrap();
        let state_dir = work_dir.join("state");
        let config_path = work_dir.join("tandemd.toml");
        let config = format!("state_dir = {:?}\n{config_toml}", state_dir.display().to_string());
        std::fs::write(&config_path, config).unwrap();
        let log_path = work_dir.join(format!("tandemd-{port}.log"));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut command = Command::new(tandemd_binary());
        // Every TANDEM_* variable is configuration: none may leak in from the test's environment.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TANDEM_") {
                command.env_remove(key);
            }
        }
        let child = command
            .args(["serve", "--model"])
            .arg(model)
            .args(["--listen", &addr.to_string(), "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut daemon = Self { child: Some(child), addr, log_path };
        daemon.wait_healthy(Duration::from_secs(30));
        daemon
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log_path) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    fn wait_healthy(&mut self, limit: Duration) {
        let client = http_client(Duration::from_secs(2));
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("tandemd exited with {status} before becoming healthy:\n{}", self.log());
            }
            if client.get(format!("{}/healthz", self.url())).send().is_ok_and(|r| r.status().is_success()) {
                return;
            }
            assert!(start.elapsed() < limit, "tandemd not healthy after {limit:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the exit; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else { return false };
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.success();
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                panic!("tandemd did not stop within 30 s of SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}
