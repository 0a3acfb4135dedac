//! What the fleet end-to-end tests share: `tandem-fleet serve` as a real process (started, killed
//! with SIGKILL, restarted on the same ports), its API over HTTP or HTTPS, a Mosquitto that keeps its
//! sessions on disk, a private PostgreSQL cluster, and the load generator as a child process.

use std::collections::BTreeSet;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub use crate::daemon_process::free_port;

/// The cluster helper is shared with `fleet/tests` (it is one file in that crate).
#[path = "../../fleet/tests/support/postgres.rs"]
pub mod postgres;

/// The `tandem-fleet` binary of this build.
pub fn fleet_binary() -> PathBuf {
    let tandemd = crate::fixtures::tandemd_binary();
    let binary = tandemd.with_file_name("tandem-fleet");
    assert!(
        binary.is_file(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`; `make test` does)",
        binary.display()
    );
    binary
}

/// A running `tandem-fleet serve`.
pub struct FleetProcess {
    child: Option<Child>,
    pub dir: PathBuf,
    pub api: SocketAddr,
    config: String,
    starts: u32,
    /// CA certificates trusted for an API served over HTTPS (`[api.tls]`); empty: plain HTTP.
    https_ca: Vec<reqwest::Certificate>,
}

impl FleetProcess {
    /// Starts `tandem-fleet serve` in `dir` with `config` (TOML; must set `api.listen`, which is
    /// also how the test reaches it) and waits until `/healthz` says ok.
    pub fn start(dir: &Path, config: &str, api: SocketAddr) -> Self {
        Self::start_with(dir, config, api, Vec::new())
    }

    /// As [`FleetProcess::start`] for a `config` with `[api.tls]`: the test reaches the API over
    /// HTTPS, trusting the CA certificates in the PEM file `ca`.
    pub fn start_https(dir: &Path, config: &str, api: SocketAddr, ca: &Path) -> Self {
        let ca = reqwest::Certificate::from_pem_bundle(&std::fs::read(ca).unwrap()).unwrap();
        Self::start_with(dir, config, api, ca)
    }

    fn start_with(dir: &Path, config: &str, api: SocketAddr, https_ca: Vec<reqwest::Certificate>) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let config = config.to_string();
        let mut fleet = Self { child: None, dir: dir.to_path_buf(), api, config, starts: 0, https_ca };
        fleet.start_again();
        fleet
    }

    /// A client for the API (trusting the CA when it speaks HTTPS).
    pub fn client(&self) -> reqwest::blocking::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(30))
            .tls_certs_merge(self.https_ca.iter().cloned())
            .build()
            .unwrap()
    }

    /// Starts it again (same configuration, same ports, same database).
    pub fn start_again(&mut self) {
        self.kill9();
        self.starts += 1;
        let config_path = self.dir.join("fleet.toml");
        std::fs::write(&config_path, &self.config).unwrap();
        let log = std::fs::File::create(self.log_path()).unwrap();
        let child = Command::new(fleet_binary())
            .args(["serve", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("tandem-fleet exited with {status}:\n{}", self.log());
            }
            let healthy =
                self.client().get(self.url("/healthz")).send().ok().and_then(|r| r.json::<Value>().ok());
            if healthy.is_some_and(|h| h["status"] == "ok") {
                return;
            }
            assert!(Instant::now() < deadline, "tandem-fleet not healthy after 30 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self, path: &str) -> String {
        let scheme = if self.https_ca.is_empty() { "http" } else { "https" };
        format!("{scheme}://{}{path}", self.api)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("fleet-{}.log", self.starts))
    }

    /// The log of the current (or last) run.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(self.log_path()) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }

    /// GET `path` (bearer `token`) as JSON; panics unless 200.
    pub fn get(&self, path: &str, token: Option<&str>) -> Value {
        let mut request = self.client().get(self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.log()));
        let status = response.status();
        let text = response.text().unwrap();
        assert!(status.is_success(), "GET {path}: {status}\n{text}");
        serde_json::from_str(&text).unwrap()
    }

    /// Every stored event id, through `/v1/events` keyset paging; panics on a repeated id.
    pub fn all_event_ids(&self, token: Option<&str>) -> BTreeSet<String> {
        let mut ids = BTreeSet::new();
        let mut after: Option<String> = None;
        loop {
            let path = match &after {
                Some(after) => format!("/v1/events?limit=1000&after={after}"),
                None => "/v1/events?limit=1000".to_string(),
            };
            let page = self.get(&path, token);
            for event in page["events"].as_array().unwrap() {
                let id = event["id"].as_str().unwrap().to_string();
                assert!(ids.insert(id.clone()), "event {id} is stored twice");
            }
            match page["next_after"].as_str() {
                Some(next) => after = Some(next.to_string()),
                None => return ids,
            }
        }
    }

    /// The value of a Prometheus sample (`name{labels}`), 0 when absent.
    pub fn metric(&self, sample: &str) -> f64 {
        let text = self.client().get(self.url("/metrics")).send().unwrap().text().unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(sample).and_then(|rest| rest.trim().parse().ok()))
            .unwrap_or(0.0)
    }
}

impl Drop for FleetProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn http() -> reqwest::blocking::Client {
    crate::daemon_process::http_client(Duration::from_secs(30))
}

/// The base of a fleet configuration: SQLite in `dir` (or `store_url`), the API on `api`, and the
/// given MQTT section.
pub fn fleet_config(dir: &Path, store_url: Option<&str>, api: SocketAddr, mqtt: &str) -> String {
    let store =
        store_url.map_or_else(|| format!("sqlite://{}", dir.join("fleet.db").display()), String::from);
    format!("[store]\nurl = \"{store}\"\n[api]\nlisten = \"{api}\"\n{mqtt}")
}

/// `127.0.0.1:PORT` on a free port.
pub fn loopback() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()))
}

/// Starts `tandem-fleet loadgen` with `args` in the background.
fn spawn_loadgen(args: &[&str]) -> Child {
    Command::new(fleet_binary())
        .arg("loadgen")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the load generator starts")
}

/// How the load generator's simulated devices publish telemetry.
pub struct TelemetryLoad<'a> {
    pub broker: &'a str,
    pub devices: u32,
    /// Events per second over all devices; 0: as fast as the broker acknowledges.
    pub rate: u32,
    /// Events per message.
    pub batch: u32,
    pub seconds: u32,
    /// Where the ids of the events the broker acknowledged are written.
    pub acked: &'a Path,
}

impl TelemetryLoad<'_> {
    /// Starts the load generator with this load and `extra` arguments, in the background.
    pub fn spawn(&self, extra: &[&str]) -> Child {
        let numbers = [self.devices, self.rate, self.batch, self.seconds].map(|n| n.to_string());
        let acked = self.acked.to_str().expect("a UTF-8 path");
        let mut args = vec!["--url", self.broker, "--acked-ids", acked];
        for (flag, value) in ["--devices", "--rate", "--batch", "--duration"].iter().zip(&numbers) {
            args.extend([*flag, value.as_str()]);
        }
        args.extend(extra);
        spawn_loadgen(&args)
    }
}

/// Waits for a background load generator; returns its report.
pub fn finish_loadgen(child: Child) -> Value {
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "loadgen failed:\n{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("a JSON report")
}

/// The lines of a file of ids.
pub fn read_ids(path: &Path) -> BTreeSet<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(String::from).collect()
}

/// Calls `check` until it returns true, for at most `limit`.
pub fn eventually(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A Mosquitto broker that keeps sessions and queued messages on disk (`persistence true`, saved
/// on a clean stop) and queues without limit for offline persistent sessions, as a fleet needs it.
pub struct PersistentMosquitto {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
    starts: u32,
}

impl PersistentMosquitto {
    /// Anonymous access, or `(passwords file, acl file)` when given.
    pub fn start(access: Option<(&Path, &Path)>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut config = format!(
            "listener {port} 127.0.0.1\npersistence true\npersistence_location {}/\nautosave_interval 1\n\
             user root\nlog_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n\
             max_queued_messages 0\nmax_queued_bytes 0\nmax_inflight_messages 0\n",
            dir.path().display()
        );
        match access {
            None => config.push_str("allow_anonymous true\n"),
            Some((passwords, acl)) => config.push_str(&format!(
                "allow_anonymous false\npassword_file {}\nacl_file {}\n",
                passwords.display(),
                acl.display()
            )),
        }
        std::fs::write(dir.path().join("mosquitto.conf"), config).unwrap();
        let mut broker = Self { dir, port, child: None, starts: 0 };
        broker.start_again();
        broker
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// SIGTERM (Mosquitto saves its sessions), then starts it again on the same port.
    pub fn restart(&mut self) {
        self.terminate();
        self.start_again();
    }

    fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let _ = child.wait();
        }
    }

    fn start_again(&mut self) {
        self.starts += 1;
        let log =
            std::fs::File::create(self.dir.path().join(format!("mosquitto-{}.log", self.starts))).unwrap();
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mosquitto is installed (scripts/test-deps.sh)");
        self.child = Some(child);
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        eventually("mosquitto listens", Duration::from_secs(10), || {
            TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok()
        });
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("mosquitto-{}.log", self.starts)))
            .unwrap_or_default()
    }
}

impl Drop for PersistentMosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The `[mqtt]` section of a fleet that is a client of the broker at `url`.
pub fn external_mqtt(url: &str, client_id: &str, credentials: Option<(&str, &Path)>) -> String {
    let mut section = format!(
        "[mqtt]\nmode = \"external\"\n[mqtt.external]\nurl = \"{url}\"\nclient_id = \"{client_id}\"\n"
    );
    if let Some((user, password_file)) = credentials {
        section.push_str(&format!(
            "username = \"{user}\"\npassword = {{ file = \"{}\" }}\n",
            password_file.display()
        ));
    }
    section
}

/// `(width, height)` of a PNG file, from its IHDR chunk.
pub fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert!(bytes.len() > 24 && bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG file");
    assert_eq!(&bytes[12..16], b"IHDR");
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    (width, height)
}

/// Publishes each `(topic, payload)` with QoS 1 over MQTT 5 as `client_id` (with `credentials`),
/// one at a time; returns each PUBACK's reason (`Success`, `NotAuthorized`, …).
pub fn publish_v5(
    port: u16,
    client_id: &str,
    credentials: Option<(&str, &str)>,
    messages: &[(String, Vec<u8>)],
) -> Vec<String> {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(5)).set_max_packet_size(Some(16 << 20));
        if let Some((user, password)) = credentials {
            options.set_credentials(user, password);
        }
        let (client, mut events) = AsyncClient::new(options, 16);
        let mut reasons = Vec::new();
        let mut queued = messages.iter();
        loop {
            let event = tokio::time::timeout(Duration::from_secs(10), events.poll()).await;
            match event.expect("the broker answers in time") {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {}
                Ok(Event::Incoming(Packet::PubAck(ack))) => reasons.push(format!("{:?}", ack.reason)),
                Ok(_) => continue,
                Err(error) => panic!("the MQTT connection of {client_id} failed: {error}"),
            }
            match queued.next() {
                Some((topic, payload)) => {
                    client.publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone()).await.unwrap()
                }
                None => break,
            }
        }
        let _ = client.disconnect().await;
        reasons
    })
}

/// A telemetry event of `device` as JSON-ready protocol data.
pub fn telemetry_event(
    device: &str,
    model: &str,
    at_ms: u64,
    route: tandem_core::protocol::Route,
    local_ms: u32,
    cloud_ms: u32,
) -> tandem_core::protocol::TelemetryEvent {
    use tandem_core::protocol::{Route, TelemetryBudget, TokenCounts, Transport};
    let cloud = route == Route::Cloud;
    tandem_core::protocol::TelemetryEvent {
        id: uuid::Uuid::now_v7(),
        device_id: device.into(),
        model_version: model.into(),
        at_ms,
        route,
        help_requested: route != Route::Local,
        help_probability: Some(if route == Route::Local { 0.1 } else { 0.8 }),
        local_tokens: TokenCounts { prompt: 12, completion: 24 },
        local_latency_ms: local_ms,
        cloud_tokens: if cloud { TokenCounts { prompt: 12, completion: 40 } } else { TokenCounts::default() },
        cloud_latency_ms: cloud_ms,
        transport: cloud.then_some(Transport::Mqtt),
        budget: TelemetryBudget { cloud_share: 0.25, calls_available: 2 },
        error_class: (route == Route::LocalFallback).then(|| "budget_ratio".to_string()),
        prompt: None,
        local_answer: None,
        cloud_answer: None,
    }
}

/// The JSON of a `TelemetryBatch` of `device`.
pub fn telemetry_payload(device: &str, events: &[tandem_core::protocol::TelemetryEvent]) -> Vec<u8> {
    let batch = tandem_core::protocol::TelemetryBatch {
        v: tandem_core::protocol::PROTOCOL_VERSION,
        device_id: device.into(),
        events: events.to_vec(),
    };
    serde_json::to_vec(&batch).unwrap()
}

/// `sha256$…` for `password`, from `tandem-fleet hash-password`.
pub fn hash_password(password: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(fleet_binary())
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(format!("{password}\n").as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

/// Now, Unix ms.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}
