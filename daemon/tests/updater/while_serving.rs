//! Updates while serving: a real `tandemd serve` with `[updater] enabled` follows assignments it
//! polls from a loopback "fleet" endpoint or receives as a retained message from Mosquitto,
//! downloads the bundle from the Range file server, probes it in a second session and swaps it in
//! while requests run — a streaming answer started before the swap ends normally. A tampered bundle
//! is refused with a `failed` report while the old model keeps serving, a daemon killed right
//! after the swap comes back serving the new, verified slot on probation, and one killed at random
//! points of a live update (download, verification, probe, swap, probation) always restarts on a
//! complete, verified model.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use tandem_core::bundle::FileDigest;
use tandem_core::protocol::{DeviceStatus, DeviceTopics, ModelAssignment, PROTOCOL_VERSION, TopicKind};

use super::mosquitto::Mosquitto;
use super::*;

const DEVICE: &str = "edge-1";

/// The prompt of the long streamed answer.
const STORY: &str = "tell me a long story";

/// The assignment of version `version`, published in the file server's `dir`.
fn assignment(files: &FileServer, dir: &str, version: &str) -> ModelAssignment {
    let manifest = std::fs::read(published().root.join(dir).join(MANIFEST_FILE)).unwrap();
    ModelAssignment {
        v: PROTOCOL_VERSION,
        rollout_id: Some("rollout-test".into()),
        bundle_name: "updater-tiny".into(),
        version: version.into(),
        manifest_sha256: FileDigest::of_bytes(&manifest).sha256,
        url: files.url(dir).to_string(),
        assigned_at_ms: 1,
    }
}

// ---------------------------------------------------------------------------------------------
// A loopback fleet answering `GET /v1/devices/{id}/assignment`

/// The assignment, and the `Authorization` header the endpoint requires (401 otherwise) when set.
#[derive(Default)]
struct FleetState {
    assignment: Option<ModelAssignment>,
    required: Option<String>,
}

type Assigned = Arc<Mutex<FleetState>>;

struct FleetEndpoint {
    addr: SocketAddr,
    assigned: Assigned,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FleetEndpoint {
    fn start() -> Self {
        let assigned: Assigned = Arc::default();
        let state = assigned.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let app =
                    Router::new().route("/v1/devices/{id}/assignment", get(assignment_of)).with_state(state);
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        Self { addr: addr_rx.recv().unwrap(), assigned, stop: Some(stop), thread: Some(thread) }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn assign(&self, assignment: ModelAssignment) {
        self.assigned.lock().unwrap().assignment = Some(assignment);
    }

    /// Answers only requests with `Authorization: {authorization}` from now on.
    fn require(&self, authorization: &str) {
        self.assigned.lock().unwrap().required = Some(authorization.to_string());
    }
}

impl Drop for FleetEndpoint {
    fn drop(&mut self) {
        let _ = self.stop.take().unwrap().send(());
        let _ = self.thread.take().unwrap().join();
    }
}

async fn assignment_of(
    State(assigned): State<Assigned>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let state = assigned.lock().unwrap();
    let presented = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if state.required.as_deref().is_some_and(|required| presented != Some(required)) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    match state.assignment.clone() {
        Some(assignment) if id == DEVICE => axum::Json(assignment).into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

// ---------------------------------------------------------------------------------------------
// `tandemd serve` with the updater on

struct Daemon {
    child: Option<Child>,
    addr: SocketAddr,
    log: PathBuf,
    client: reqwest::Client,
}

/// The configuration: v0 as the configured model, the trusted key, `[updater]` plus `extra`.
/// [`config`], following assignments polled from `fleet` every second, with `updater_extra`
/// lines in `[updater]`.
fn polling_config(dir: &Path, extra: &str, fleet: &FleetEndpoint, updater_extra: &str) -> PathBuf {
    let path = config(dir, extra);
    let text = std::fs::read_to_string(&path).unwrap()
        + &format!("poll_url = {:?}\npoll_interval_secs = 1\n{updater_extra}", fleet.url());
    std::fs::write(&path, text).unwrap();
    path
}

fn config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("tandemd.toml");
    let text = format!(
        "device_id = {DEVICE:?}\nmodel_dir = {:?}\nstate_dir = {:?}\ntrusted_bundle_keys = [{:?}]\n{extra}\n\
         [updater]\nenabled = true\nprobe_max_tokens = 4\nhealth_probe_interval_secs = 3600\n",
        arg(&published().root.join("v0")),
        arg(&dir.join("state")),
        arg(&published().trusted_key),
    );
    std::fs::write(&path, text).unwrap();
    path
}

impl Daemon {
    async fn start(config: &Path, port: u16) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let log = config.with_file_name(format!("tandemd-{port}-{}.log", std::process::id()));
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tandemd"))
            .args(["serve", "--config", arg(config), "--listen", &addr.to_string()])
            .env("RUST_LOG", "info,ort=warn")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        let _already_installed = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(120)).build().unwrap();
        let mut daemon = Self { child: Some(child), addr, log, client };
        daemon.wait_for("the daemon to answer", Duration::from_secs(60), |_| true).await;
        daemon
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn get(&self, path: &str) -> Option<reqwest::Response> {
        let response = self.client.get(format!("http://{}{path}", self.addr)).send().await.ok()?;
        response.status().is_success().then_some(response)
    }

    async fn status(&self) -> Value {
        self.get("/v1/status").await.expect("/v1/status answers").json().await.unwrap()
    }

    async fn metrics(&self) -> String {
        self.get("/metrics").await.expect("/metrics answers").text().await.unwrap()
    }

    /// Polls `/v1/status` until `done` holds; returns that status.
    async fn wait_for(&mut self, what: &str, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            if let Some(response) = self.get("/v1/status").await {
                let status: Value = response.json().await.unwrap();
                if done(&status) {
                    return status;
                }
                assert!(
                    start.elapsed() < limit,
                    "waited {limit:?} for {what}; last status {status:#}\n{}",
                    self.log()
                );
            } else {
                assert!(start.elapsed() < limit, "waited {limit:?} for {what}\n{}", self.log());
            }
            if let Some(exit) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("tandemd exited with {exit} while waiting for {what}:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A non-streaming chat answer's content (the request must succeed).
    async fn chat(&self, prompt: &str, max_tokens: u32) -> String {
        let response = self
            .client
            .post(format!("http://{}/v1/chat/completions", self.addr))
            .json(&json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{:?}", response.status());
        let body: Value = response.json().await.unwrap();
        body["choices"][0]["message"]["content"].as_str().unwrap().to_string()
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn version(status: &Value) -> &str {
    status["model"]["version"].as_str().unwrap_or_default()
}

fn update_state(status: &Value) -> (&str, &str) {
    let update = &status["update"];
    (update["version"].as_str().unwrap_or_default(), update["state"].as_str().unwrap_or_default())
}

fn multi_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// What a streamed answer was made of.
#[derive(Debug, Default)]
struct Streamed {
    chunks: usize,
    text: String,
    finish_reason: Option<String>,
    done: bool,
}

/// Streams one long answer.
async fn stream_answer(client: reqwest::Client, url: String) -> Streamed {
    let response = client
        .post(url)
        .json(&json!({
            "messages": [{"role": "user", "content": STORY}],
            "max_tokens": 400,
            "stream": true,
        }))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{:?}", response.status());
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    let mut streamed = Streamed::default();
    while let Some(bytes) = body.next().await {
        buffer.push_str(&String::from_utf8_lossy(&bytes.expect("the stream is not cut")));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else { continue };
            if data == "[DONE]" {
                streamed.done = true;
                continue;
            }
            let chunk: Value = serde_json::from_str(data).unwrap();
            streamed.chunks += 1;
            let choice = &chunk["choices"][0];
            streamed.text.push_str(choice["delta"]["content"].as_str().unwrap_or_default());
            if let Some(reason) = choice["finish_reason"].as_str() {
                streamed.finish_reason = Some(reason.to_string());
            }
        }
    }
    streamed
}

// ---------------------------------------------------------------------------------------------
// The tests

#[test]
fn a_polled_assignment_is_downloaded_probed_and_swapped_in_without_cutting_a_running_stream() {
    let files = FileServer::start(Faults::None);
    let fleet = FleetEndpoint::start();
    let dir = tempfile::tempdir().unwrap();
    let config = polling_config(dir.path(), "[server]\nmax_queue = 64\n", &fleet, "");

    multi_thread_runtime().block_on(async {
        let mut daemon = Daemon::start(&config, free_port()).await;
        let on_v0 = daemon.chat(STORY, 400).await;
        let status = daemon.status().await;
        assert_eq!(version(&status), "0");
        assert_eq!(status["update"]["enabled"], true, "{status:#}");

        // Requests running on v0 when the assignment arrives: the old engine works through them
        // one at a time, the stream last, while v1 is downloaded, loaded and probed beside it (and
        // swapped in: the stream then runs on v0 after the swap).
        let background: Vec<_> = (0..48)
            .map(|_| {
                let daemon_client = daemon.client.clone();
                let url = format!("http://{}/v1/chat/completions", daemon.addr);
                tokio::spawn(async move {
                    daemon_client
                        .post(url)
                        .json(&json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 400}))
                        .send()
                        .await
                        .map(|r| r.status())
                })
            })
            .collect();
        // Every answered request left a telemetry event in the spool: admitted = answered + queued.
        let admitted =
            |s: &Value| s["spool"]["events"].as_u64().unwrap() + s["queue"]["depth"].as_u64().unwrap();
        daemon.wait_for("the requests to be admitted", Duration::from_secs(10), |s| admitted(s) == 49).await;
        let stream = tokio::spawn(stream_answer(
            daemon.client.clone(),
            format!("http://{}/v1/chat/completions", daemon.addr),
        ));
        let queued = daemon
            .wait_for("the stream to be admitted", Duration::from_secs(10), |s| admitted(s) == 50)
            .await;
        assert!(
            queued["queue"]["depth"].as_u64().unwrap() > 10,
            "the stream waits behind others: {queued:#}"
        );

        fleet.assign(assignment(&files, "v1", "1"));
        let swapped =
            daemon.wait_for("the swap to v1", Duration::from_secs(120), |s| version(s) == "1").await;
        let stream_still_running = !stream.is_finished();
        let streamed = stream.await.unwrap();
        assert!(
            stream_still_running,
            "the stream ended before the swap, so this run did not test an in-flight request: {} chunks\n{}",
            streamed.chunks,
            daemon.log()
        );
        assert!(streamed.done && streamed.finish_reason.is_some(), "the stream was cut: {streamed:?}");
        assert_eq!(streamed.text, on_v0, "the stream was answered by the model it started on");
        for request in background {
            assert!(request.await.unwrap().unwrap().is_success(), "a request running during the swap failed");
        }

        let update = &swapped["update"];
        assert_eq!(update_state(&swapped), ("1", "active"), "{swapped:#}");
        assert_eq!(update["on_probation"], true, "{swapped:#}");
        assert_eq!(update["model_version"], "1");
        assert!(matches!(update["slot"].as_str(), Some("a" | "b")), "{swapped:#}");
        assert_eq!(update["outcomes"]["activated"], 1);
        assert_ne!(daemon.chat(STORY, 400).await, on_v0, "new requests are answered by v1");

        let metrics = daemon.metrics().await;
        assert!(metrics.contains("tandem_model_updates_total{outcome=\"activated\"} 1"), "{metrics}");
        assert!(metrics.contains("tandem_model_on_probation 1"), "{metrics}");
        let info = metrics.lines().find(|l| l.starts_with("tandem_model_info{")).unwrap_or_default();
        assert!(info.contains("version=\"1\""), "{metrics}");
        let log = daemon.log();
        assert!(log.contains("the new model answered its probe"), "{log}");
    });
}

#[test]
fn a_tampered_bundle_is_refused_reported_failed_and_the_old_model_keeps_serving() {
    let files = FileServer::start(Faults::None);
    let fleet = FleetEndpoint::start();
    let dir = tempfile::tempdir().unwrap();
    let config = polling_config(dir.path(), "", &fleet, "");
    fleet.assign(assignment(&files, "v2-tampered", "2"));

    multi_thread_runtime().block_on(async {
        let mut daemon = Daemon::start(&config, free_port()).await;
        let failed = daemon
            .wait_for("the tampered bundle to fail", Duration::from_secs(120), |s| {
                update_state(s) == ("2", "failed")
            })
            .await;
        assert_eq!(version(&failed), "0", "the old model keeps serving");
        let detail = failed["update"]["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("sha256"), "the reason names the mismatch: {failed:#}");
        assert_eq!(failed["update"]["outcomes"]["failed"], 1);
        daemon.chat(STORY, 4).await;
        let metrics = daemon.metrics().await;
        assert!(metrics.contains("tandem_model_updates_total{outcome=\"failed\"} 1"), "{metrics}");

        tokio::time::sleep(Duration::from_secs(3)).await;
        let later = daemon.status().await;
        assert_eq!(
            later["update"]["outcomes"]["failed"], 1,
            "a refused build is not fetched again at every poll"
        );
        assert_eq!(version(&later), "0");
    });
}

/// Publishes a retained message with QoS 1 and waits for the broker's PUBACK.
async fn publish_retained(broker: &Mosquitto, topic: &str, payload: Vec<u8>) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let (client, mut events) =
        AsyncClient::new(MqttOptions::new("fleet-test", "127.0.0.1", broker.port()), 10);
    client.publish(topic, QoS::AtLeastOnce, true, payload).await.unwrap();
    let acked = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::PubAck(_)) = events.poll().await.expect("broker reachable") {
                return;
            }
        }
    })
    .await;
    assert!(acked.is_ok(), "the broker did not acknowledge the assignment");
}

/// The device's retained status as a fresh subscriber receives it.
async fn retained_status(broker: &Mosquitto) -> DeviceStatus {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let (client, mut events) =
        AsyncClient::new(MqttOptions::new("fleet-watch", "127.0.0.1", broker.port()), 10);
    let topic = DeviceTopics::new(DEVICE).unwrap().topic(TopicKind::Status);
    client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::Publish(publish)) = events.poll().await.expect("broker reachable")
            {
                return serde_json::from_slice::<DeviceStatus>(&publish.payload).unwrap();
            }
        }
    })
    .await
    .expect("a retained status");
    let _ = client.disconnect().await;
    status
}

#[test]
fn a_retained_mqtt_assignment_triggers_the_update_and_the_retained_status_reports_it() {
    let files = FileServer::start(Faults::None);
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &format!("[mqtt]\nurl = {:?}\n", broker.url()));

    multi_thread_runtime().block_on(async {
        let topic = DeviceTopics::new(DEVICE).unwrap().topic(TopicKind::Assignment);
        publish_retained(&broker, &topic, assignment(&files, "v1", "1").to_payload()).await;

        let mut daemon = Daemon::start(&config, free_port()).await;
        let swapped =
            daemon.wait_for("the swap to v1", Duration::from_secs(120), |s| version(s) == "1").await;
        assert_eq!(update_state(&swapped), ("1", "active"), "{swapped:#}");

        let start = Instant::now();
        loop {
            let status = retained_status(&broker).await;
            let reported = status.update.as_ref().map(|u| (u.version.as_str(), u.state));
            if status.online
                && status.model_version.as_deref() == Some("1")
                && reported == Some(("1", tandem_core::protocol::UpdateState::Active))
            {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "the retained status says {status:?}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
}

#[test]
fn a_daemon_killed_right_after_the_swap_restarts_on_the_new_verified_slot_on_probation() {
    let files = FileServer::start(Faults::None);
    let fleet = FleetEndpoint::start();
    let dir = tempfile::tempdir().unwrap();
    let config = polling_config(dir.path(), "", &fleet, "");
    fleet.assign(assignment(&files, "v1", "1"));

    multi_thread_runtime().block_on(async {
        let port = free_port();
        let mut daemon = Daemon::start(&config, port).await;
        daemon.wait_for("the swap to v1", Duration::from_secs(120), |s| version(s) == "1").await;
        daemon.kill9();

        let mut restarted = Daemon::start(&config, port).await;
        let status = restarted.status().await;
        assert_eq!(version(&status), "1", "the restarted daemon serves the new version");
        assert_eq!(status["update"]["on_probation"], true, "{status:#}");
        assert_eq!(status["update"]["outcomes"]["failed"], 0, "nothing is fetched again: {status:#}");
        restarted.kill9();
    });
    let slots = Slots::open(&dir.path().join("state"), trusted()).unwrap();
    let probation = slots.probation().expect("still on probation");
    assert_eq!(probation.unhealthy_starts, 0, "both starts became healthy: {probation:?}");
    drop(slots);
    assert_eq!(store_versions(&dir.path().join("state")).0.as_deref(), Some("1"), "a verified slot");
}

#[test]
fn a_serving_daemon_killed_at_random_points_of_a_live_update_always_restarts_on_a_verified_model() {
    let files = FileServer::start(Faults::None);
    let fleet = FleetEndpoint::start();
    let dir = tempfile::tempdir().unwrap();
    // A slow download (the bundle is ~470 kB: over 1.5 s), so the kills land in it as well as in
    // verification, the probe, the swap and the probation after it.
    let config = polling_config(dir.path(), "", &fleet, "bandwidth_limit = 300000\n");
    fleet.assign(assignment(&files, "v1", "1"));
    let state = dir.path().join("state");
    let mut rng = Rng(0x5eed_1e55);
    let mut trials = Vec::new();
    multi_thread_runtime().block_on(async {
        let port = free_port();
        for trial in 0..6 {
            let mut daemon = Daemon::start(&config, port).await;
            let served = version(&daemon.status().await).to_string();
            // The first kill surely lands in the download; the others anywhere.
            let delay = if trial == 0 { 300 } else { rng.below(2500) };
            tokio::time::sleep(Duration::from_millis(delay)).await;
            daemon.kill9();
            // Never a mix: whatever the slots hold verifies (store_versions checks every file and
            // the signature), and the daemon served v0 or v1 whole.
            let (current, previous) = store_versions(&state);
            assert!(matches!(current.as_deref(), None | Some("1")), "{current:?}");
            assert!(previous.is_none(), "{previous:?}");
            assert!(served == "0" || served == "1", "{served}");
            trials.push((delay, served, current));
        }
        // Then it settles: on v1, or, when the kills came while v1 was on probation often enough,
        // reverted to v0 with v1 refused from then on (repeated crashes after a swap revert).
        let mut daemon = Daemon::start(&config, port).await;
        let settled = daemon
            .wait_for("the update to settle", Duration::from_secs(120), |s| {
                version(s) == "1" || update_state(s).1 == "failed"
            })
            .await;
        let served = version(&settled).to_string();
        daemon.kill9();
        let current = store_versions(&state).0;
        match served.as_str() {
            "1" => assert_eq!(current.as_deref(), Some("1"), "{trials:?}"),
            _ => {
                assert_eq!((served.as_str(), current), ("0", None), "{trials:?}");
                let detail = settled["update"]["detail"].as_str().unwrap_or_default();
                assert!(detail.contains("rolled back on this device before"), "{settled:#}");
            }
        }
    });
    let killed_while_serving_v1 = trials.iter().filter(|(_, served, _)| served == "1").count();
    let killed_before_any_slot = trials.iter().filter(|(_, _, current)| current.is_none()).count();
    assert!(killed_before_any_slot > 0, "no kill landed before the swap: {trials:?}");
    assert!(killed_while_serving_v1 > 0, "no kill landed after the swap: {trials:?}");
}

#[test]
fn polls_and_downloads_carry_the_devices_broker_password() {
    let files = FileServer::start(Faults::None);
    let fleet = FleetEndpoint::start();
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("mqtt-password");
    std::fs::write(&password, "edge-one-password-0123\n").unwrap();
    // The broker is not there: the credentials still come from its section, and polling works alone.
    let mqtt =
        format!("[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\npassword_file = {:?}\n", free_port(), arg(&password));
    let config = polling_config(dir.path(), &mqtt, &fleet, "");
    // base64("edge-1:edge-one-password-0123")
    let basic = "Basic ZWRnZS0xOmVkZ2Utb25lLXBhc3N3b3JkLTAxMjM=";
    fleet.require(basic);
    fleet.assign(assignment(&files, "v1", "1"));

    multi_thread_runtime().block_on(async {
        let mut daemon = Daemon::start(&config, free_port()).await;
        daemon.wait_for("the swap to v1", Duration::from_secs(120), |s| version(s) == "1").await;
        daemon.kill9();
    });
    let authorizations = files.authorizations();
    assert!(!authorizations.is_empty());
    assert!(
        authorizations.iter().all(|a| a.as_deref() == Some(basic)),
        "every download carried the device's credentials: {authorizations:?}"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
