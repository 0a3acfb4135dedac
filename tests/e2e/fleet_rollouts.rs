//! Staged rollouts with real processes only: `tandem-fleet serve` (SQLite, registry, embedded MQTT
//! broker, per-device passwords from its devices file) and 20 `tandemd serve` devices, each with its
//! own state directory and `[updater] enabled`, following their assignments over MQTT, downloading
//! the signed bundle from the fleet's registry, probing it in a second session and swapping it in.
//!
//! Every device starts on the committed `models/countdown-tiny-v1`; what is rolled out is the
//! committed v2, a validly signed bundle whose model cannot answer the probe, or v2 altered in the
//! registry after it was registered. The fleet is also killed with SIGKILL in the middle of a
//! stage's soak and restarted on the same database and registry.
//!
//! The four tests run one after another (a lock), since each has 21 processes on a machine of a few
//! cores.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::daemon_process::{DaemonProcess, http_client};
use crate::fixtures::tandemd_binary;
use crate::fleet_support::{FleetProcess, hash_password, http, loopback};

const DEVICES: usize = 20;
const MODEL: &str = "countdown-tiny";

/// One fleet of 20 devices at a time.
static ONE_FLEET_AT_A_TIME: Mutex<()> = Mutex::new(());

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn demo_public_key() -> PathBuf {
    repo().join("models/keys/demo.pub")
}

fn v1() -> PathBuf {
    repo().join("models/countdown-tiny-v1")
}

fn v2() -> PathBuf {
    repo().join("models/countdown-tiny-v2")
}

/// One `tandemd serve` of the fleet.
struct Device {
    id: String,
    daemon: DaemonProcess,
}

impl Device {
    /// The daemon's own `GET /v1/status`.
    fn status(&self) -> Value {
        let response = http_client(Duration::from_secs(10))
            .get(format!("{}/v1/status", self.daemon.url()))
            .send()
            .unwrap_or_else(|e| panic!("{}: GET /v1/status: {e}\n{}", self.id, self.daemon.log()));
        assert!(response.status().is_success(), "{}: /v1/status answered {}", self.id, response.status());
        response.json().unwrap()
    }

    /// The version the daemon says it serves.
    fn serving(&self) -> String {
        self.status()["model"]["version"].as_str().unwrap_or_default().to_string()
    }

    /// Whether it answers a chat request.
    fn answers(&self) -> bool {
        ask(&http_client(Duration::from_secs(60)), &self.daemon.url())
    }
}

/// One short chat request (the answer is a telemetry event of the version serving it).
fn ask(client: &reqwest::blocking::Client, url: &str) -> bool {
    client
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "Using the numbers [3, 5], reach 8."}], "max_tokens": 2}))
        .send()
        .is_ok_and(|r| r.status().is_success())
}

/// The fleet process, its registry and API token, and its devices.
struct Rig {
    devices: Vec<Device>,
    fleet: FleetProcess,
    token: String,
    registry: PathBuf,
    work: tempfile::TempDir,
    _one_at_a_time: MutexGuard<'static, ()>,
}

impl Rig {
    /// The fleet with `bundles` registered, and 20 devices on v1, all online.
    fn start(bundles: &[&Path]) -> Self {
        let one_at_a_time = ONE_FLEET_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let work = tempfile::tempdir().unwrap();
        let root = work.path();
        let (api, mqtt) = (loopback(), loopback());
        let token = uuid::Uuid::now_v7().simple().to_string();
        std::fs::write(root.join("api-token"), &token).unwrap();

        let ids: Vec<String> = (0..DEVICES).map(|i| format!("device-{i:02}")).collect();
        let passwords: Vec<String> = ids.iter().map(|_| uuid::Uuid::now_v7().simple().to_string()).collect();
        let hashes: Vec<String> = std::thread::scope(|scope| {
            let hashing: Vec<_> = passwords.iter().map(|p| scope.spawn(move || hash_password(p))).collect();
            hashing.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut devices_file = String::new();
        for (id, hash) in ids.iter().zip(&hashes) {
            devices_file
                .push_str(&format!("[[device]]\nid = \"{id}\"\ngroup = \"e2e\"\npassword = \"{hash}\"\n\n"));
        }
        std::fs::write(root.join("devices.toml"), devices_file).unwrap();

        let registry = root.join("registry");
        let config = format!(
            "devices_file = {devices:?}\n\
             [store]\nurl = \"sqlite://{db}\"\n\
             [mqtt.embedded]\nlisten = \"{mqtt}\"\n\
             [api]\nlisten = \"{api}\"\ntoken = {{ file = {token_file:?} }}\n\
             [registry]\ndir = {registry:?}\ntrusted_keys = [{key:?}]\npublic_url = \"http://{api}\"\n\
             [rollouts]\nevaluate_interval_ms = 200\n",
            devices = root.join("devices.toml").display().to_string(),
            db = root.join("fleet.db").display(),
            token_file = root.join("api-token").display().to_string(),
            registry = registry.display().to_string(),
            key = demo_public_key().display().to_string(),
        );
        let fleet = FleetProcess::start(&root.join("fleet"), &config, api);
        let mut rig =
            Self { devices: Vec::new(), fleet, token, registry, work, _one_at_a_time: one_at_a_time };
        for bundle in bundles {
            let registered = rig.post("/v1/models", &json!({ "path": bundle }));
            assert_eq!(registered["name"], MODEL, "{registered}");
        }

        // Every device at once: they load v1 in parallel.
        let root = rig.work.path();
        rig.devices = std::thread::scope(|scope| {
            let starting: Vec<_> = ids
                .iter()
                .zip(&passwords)
                .map(|(id, password)| {
                    scope.spawn(move || {
                        let dir = root.join(id);
                        std::fs::create_dir_all(&dir).unwrap();
                        let password_file = dir.join("mqtt-password");
                        std::fs::write(&password_file, password).unwrap();
                        let config = format!(
                            "device_id = \"{id}\"\n\
                             trusted_bundle_keys = [{key:?}]\n\
                             [engine]\nintra_threads = 1\n\
                             [mqtt]\nurl = \"mqtt://{mqtt}\"\npassword_file = {password_file:?}\n\
                             reconnect_min_ms = 100\nreconnect_max_ms = 500\n\
                             [telemetry]\ntransport = {{ kind = \"mqtt\" }}\nflush_interval_ms = 100\n\
                             [updater]\nenabled = true\nprobe_timeout_secs = 60\npoll_interval_secs = 2\n",
                            key = demo_public_key().display().to_string(),
                            password_file = password_file.display().to_string(),
                        );
                        Device { id: id.clone(), daemon: DaemonProcess::start(&dir, &v1(), &config) }
                    })
                })
                .collect();
            starting.into_iter().map(|d| d.join().unwrap()).collect()
        });
        rig.wait_for("every device online on version 1", Duration::from_secs(60), |rig| {
            let devices = rig.fleet_devices();
            devices.len() == DEVICES
                && devices.values().all(|d| d["status"] == "online" && d["reported_version"] == "1")
        });
        rig
    }

    fn get(&self, path: &str) -> Value {
        self.fleet.get(path, Some(&self.token))
    }

    fn post(&self, path: &str, body: &Value) -> Value {
        let response = http()
            .post(self.fleet.url(path))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .unwrap_or_else(|e| panic!("POST {path}: {e}\n{}", self.fleet.log()));
        let status = response.status();
        let text = response.text().unwrap();
        assert!(status.is_success(), "POST {path} {body}: {status}\n{text}");
        serde_json::from_str(&text).unwrap()
    }

    /// The fleet's view of every device (`GET /v1/devices`), by id.
    fn fleet_devices(&self) -> BTreeMap<String, Value> {
        let listed = self.get("/v1/devices");
        listed["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| (d["id"].as_str().unwrap().to_string(), d.clone()))
            .collect()
    }

    /// Starts a rollout of `version` through `stages` of `(percent, soak_secs)`; returns its id.
    fn start_rollout(&self, version: &str, stages: &[(u32, u64)]) -> String {
        let stages: Vec<Value> =
            stages.iter().map(|(percent, soak)| json!({"percent": percent, "soak_secs": soak})).collect();
        let created =
            self.post("/v1/rollouts", &json!({"model": MODEL, "version": version, "stages": stages}));
        assert_eq!(created["status"], "running", "{created}");
        assert_eq!(created["stage"], 0, "{created}");
        created["id"].as_str().unwrap().to_string()
    }

    fn rollout(&self, id: &str) -> Value {
        self.get(&format!("/v1/rollouts/{id}"))
    }

    /// Polls the rollout until it is no longer running; `observe` sees every poll.
    fn wait_until_settled(&self, id: &str, limit: Duration, mut observe: impl FnMut(&Value)) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let rollout = self.rollout(id);
            observe(&rollout);
            if rollout["status"] != "running" {
                return rollout;
            }
            assert!(
                Instant::now() < deadline,
                "the rollout still runs after {limit:?}: {rollout}\n{}",
                self.diagnosis()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_for(&self, what: &str, limit: Duration, mut check: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + limit;
        while !check(self) {
            assert!(Instant::now() < deadline, "{what}: not within {limit:?}\n{}", self.diagnosis());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What the fleet knows of its devices, and the end of the fleet's log, for a failure message.
    fn diagnosis(&self) -> String {
        let devices = self.fleet_devices();
        let mut text = String::from("devices as the fleet sees them:\n");
        for (id, d) in &devices {
            text.push_str(&format!(
                "  {id}: {} serving {} update {}\n",
                d["status"], d["reported_version"], d["update"]
            ));
        }
        let log = self.fleet.log();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        text.push_str("fleet log (end):\n");
        for line in tail.into_iter().rev() {
            text.push_str(line);
            text.push('\n');
        }
        text
    }

    fn device(&self, id: &str) -> &Device {
        self.devices.iter().find(|d| d.id == id).unwrap()
    }
}

/// Requests to every device, one after another, until dropped: the new version's telemetry is what
/// makes a device healthy for the fleet.
struct Traffic {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(rig: &Rig) -> Self {
        let urls: Vec<String> = rig.devices.iter().map(|d| d.daemon.url()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let client = http_client(Duration::from_secs(30));
            while !stopping.load(Ordering::Relaxed) {
                for url in &urls {
                    ask(&client, url);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Self { stop, thread: Some(thread) }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The devices a rollout reached: id → (assigned at, rolled back at).
fn reached(rollout: &Value) -> BTreeMap<String, (i64, Option<i64>)> {
    rollout["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let id = d["id"].as_str().unwrap().to_string();
            (id, (d["assigned_at_ms"].as_i64().unwrap(), d["rolled_back_ms"].as_i64()))
        })
        .collect()
}

/// The devices of each stage, in order: those assigned at the same moment.
fn stage_groups(rollout: &Value) -> Vec<(i64, BTreeSet<String>)> {
    let mut groups: BTreeMap<i64, BTreeSet<String>> = BTreeMap::new();
    for (id, (at, _)) in reached(rollout) {
        groups.entry(at).or_default().insert(id);
    }
    groups.into_iter().collect()
}

/// Copies `bundle` into `dir`.
fn copy_bundle(bundle: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for entry in std::fs::read_dir(bundle).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
}

/// v1's model and files as version 2, whose manifest says the model has a context of 8 tokens:
/// signed with the demo key, so the registry and the devices accept it, but the probe's prompt does
/// not fit, so no device can get an answer from it.
fn unanswerable_v2(dir: &Path) -> PathBuf {
    let bundle = dir.join("unanswerable-v2");
    copy_bundle(&v1(), &bundle);
    let path = bundle.join("manifest.json");
    let mut manifest: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    manifest["version"] = json!("2");
    manifest["architecture"]["context_length"] = json!(8);
    manifest.as_object_mut().unwrap().remove("signature");
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
    let output = Command::new(tandemd_binary().with_file_name("tandem-train"))
        .args(["sign", "--key"])
        .arg(repo().join("models/keys/demo.key"))
        .arg("--bundle")
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(output.status.success(), "tandem-train sign: {}", String::from_utf8_lossy(&output.stderr));
    bundle
}

/// The assignment the fleet serves a device (`GET /v1/devices/{id}/assignment`, as the operator):
/// the version, or `None` on 404.
fn assignment_of(rig: &Rig, id: &str) -> Option<String> {
    let response = http()
        .get(rig.fleet.url(&format!("/v1/devices/{id}/assignment")))
        .bearer_auth(&rig.token)
        .send()
        .unwrap();
    if response.status() == reqwest::StatusCode::NOT_FOUND {
        return None;
    }
    assert!(response.status().is_success(), "{}", response.status());
    let assignment: Value = response.json().unwrap();
    Some(assignment["version"].as_str().unwrap().to_string())
}

/// Every device serves v1, says so to the fleet, and still answers.
fn assert_every_device_serves_v1(rig: &Rig) {
    rig.wait_for("every device reports version 1 to the fleet", Duration::from_secs(30), |rig| {
        rig.fleet_devices().values().all(|d| d["reported_version"] == "1")
    });
    for device in &rig.devices {
        assert_eq!(device.serving(), "1", "{} serves another version:\n{}", device.id, device.daemon.log());
        assert!(device.answers(), "{} no longer answers:\n{}", device.id, device.daemon.log());
    }
}

/// A halted rollout that reached only its canary stage: returns the canaries.
fn assert_halted_at_the_canary(rollout: &Value, expected_reason: &[&str]) -> BTreeSet<String> {
    assert_eq!(rollout["status"], "halted", "{rollout}");
    assert_eq!(rollout["stage"], 0, "halted in the canary stage: {rollout}");
    let reason = rollout["reason"].as_str().unwrap_or_else(|| panic!("a halt records its reason: {rollout}"));
    for text in expected_reason {
        assert!(reason.contains(text), "the reason should say `{text}`: {reason}");
    }
    let groups = stage_groups(rollout);
    assert_eq!(groups.len(), 1, "only the canary stage was assigned: {rollout}");
    let canaries = groups[0].1.clone();
    assert!(!canaries.is_empty() && canaries.len() < DEVICES / 2, "a 10 % canary of {DEVICES}: {canaries:?}");
    for (id, (_, rolled_back)) in reached(rollout) {
        assert!(rolled_back.is_some(), "{id} was reached, so it is rolled back: {rollout}");
    }
    canaries
}

/// Each of `canaries` reported `version` failed and, once the fleet assigned v1 back, stays on v1:
/// it does not try the abandoned version again (its retry interval, `poll_interval_secs`, is 2 s).
fn assert_canaries_stay_off(rig: &Rig, canaries: &BTreeSet<String>, version: &str) {
    for id in canaries {
        assert_eq!(assignment_of(rig, id).as_deref(), Some("1"), "{id} is assigned v1 back");
    }
    let failures: BTreeMap<&String, Value> = canaries
        .iter()
        .map(|id| (id, rig.device(id).status()["update"]["outcomes"]["failed"].clone()))
        .collect();
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        for device in canaries.iter().map(|id| rig.device(id)) {
            let status = device.status();
            let update = &status["update"];
            assert_eq!(
                (update["version"].as_str(), update["state"].as_str()),
                (Some(version), Some("failed")),
                "{} went back to the version rolled back: {status}",
                device.id
            );
            assert_eq!(update["outcomes"]["failed"], failures[&device.id], "{status}");
            assert_eq!(status["model"]["version"], "1", "{status}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Devices outside `canaries` never heard of the rollout: no assignment, no update report.
fn assert_untouched_outside(rig: &Rig, canaries: &BTreeSet<String>) {
    let fleet = rig.fleet_devices();
    for device in rig.devices.iter().filter(|d| !canaries.contains(&d.id)) {
        assert_eq!(assignment_of(rig, &device.id), None, "{} was never assigned anything", device.id);
        let status = device.status();
        assert!(status["update"]["version"].is_null(), "{} got no update: {status}", device.id);
        assert_eq!(status["update"]["outcomes"]["failed"], 0, "{status}");
        assert!(fleet[&device.id]["update"].is_null(), "{}: {}", device.id, fleet[&device.id]);
    }
}

#[test]
fn a_staged_rollout_reaches_the_canaries_first_then_every_real_device_serves_v2() {
    let started = Instant::now();
    let rig = Rig::start(&[&v1(), &v2()]);
    let _traffic = Traffic::start(&rig);
    let id = rig.start_rollout("2", &[(10, 1), (50, 1), (100, 1)]);
    // While the canary stage runs, nobody else may get v2.
    let mut v2_during_canary: BTreeSet<String> = BTreeSet::new();
    let mut canary_during_canary: BTreeSet<String> = BTreeSet::new();
    let mut stages_seen: Vec<u64> = Vec::new();
    let rollout = rig.wait_until_settled(&id, Duration::from_secs(180), |rollout| {
        let stage = rollout["stage"].as_u64().unwrap();
        if stages_seen.last() != Some(&stage) {
            stages_seen.push(stage);
        }
        if stage == 0 && rollout["status"] == "running" {
            let serving_v2: Vec<String> = rig
                .fleet_devices()
                .into_iter()
                .filter(|(_, seen)| seen["reported_version"] == "2")
                .map(|(device, _)| device)
                .collect();
            // Only what was seen while the canary stage still ran before and after counts.
            if rig.rollout(&id)["stage"] == 0 {
                canary_during_canary.extend(reached(rollout).into_keys());
                v2_during_canary.extend(serving_v2);
            }
        }
    });
    assert_eq!(rollout["status"], "completed", "{rollout}\n{}", rig.diagnosis());
    assert_eq!(rollout["stage"], 2, "{rollout}");
    assert!(
        stages_seen.windows(2).all(|w| w[0] < w[1]) && stages_seen[0] == 0,
        "stages in order: {stages_seen:?}"
    );

    let groups = stage_groups(&rollout);
    assert_eq!(groups.len(), 3, "canary, larger, all: three stages assigned at three moments: {rollout}");
    let (canary_at, canaries) = &groups[0];
    assert!(canaries.len() < DEVICES / 2, "a 10 % canary of {DEVICES} devices: {canaries:?}");
    assert!(groups[1].1.len() + canaries.len() < DEVICES, "the 50 % stage is not everyone: {rollout}");
    assert_eq!(&canary_during_canary, canaries, "the canary stage assigned exactly the canaries");
    assert!(v2_during_canary.is_subset(canaries), "{v2_during_canary:?} served v2 in the canary stage");
    let all: BTreeSet<String> = groups.iter().flat_map(|(_, ids)| ids.iter().cloned()).collect();
    assert_eq!(all.len(), DEVICES, "every device was reached: {rollout}");

    // Each stage's devices ran v2 (the daemon's own report of its activation) before the next stage
    // was assigned, and nobody activated it before being assigned.
    let fleet = rig.fleet_devices();
    for (stage, (assigned_at, ids)) in groups.iter().enumerate() {
        assert!(*assigned_at >= canary_at + 1000 * stage as i64, "stage {stage} waited for the soak");
        for device in ids.iter().map(|id| rig.device(id)) {
            let status = device.status();
            let update = &status["update"];
            assert_eq!(status["model"]["version"], "2", "{}: {status}", device.id);
            assert_eq!(
                (update["version"].as_str(), update["state"].as_str()),
                (Some("2"), Some("active")),
                "{status}"
            );
            assert_eq!(update["outcomes"]["activated"], 1, "{status}");
            let activated_at = update["at_ms"].as_i64().unwrap();
            assert!(
                activated_at >= *assigned_at,
                "{} activated v2 before its assignment: {status}",
                device.id
            );
            if let Some((next_at, _)) = groups.get(stage + 1) {
                assert!(
                    activated_at < *next_at,
                    "{} (stage {}) was not on v2 before the next stage",
                    device.id,
                    stage + 1
                );
            }
            let seen = &fleet[&device.id];
            assert_eq!(seen["reported_version"], "2", "{seen}");
            assert_eq!(
                (seen["update"]["version"].as_str(), seen["update"]["state"].as_str()),
                (Some("2"), Some("active")),
                "{seen}"
            );
        }
    }
    eprintln!("rollout to {DEVICES} real devices: {:.1} s in all", started.elapsed().as_secs_f64());
}

#[test]
fn a_signed_bundle_that_fails_the_device_probe_halts_at_the_canary_and_every_device_keeps_v1() {
    let scratch = tempfile::tempdir().unwrap();
    let unanswerable = unanswerable_v2(scratch.path());
    let rig = Rig::start(&[&v1(), &unanswerable]);
    let id = rig.start_rollout("2", &[(10, 1), (50, 1), (100, 1)]);
    let rollout = rig.wait_until_settled(&id, Duration::from_secs(120), |_| {});
    let canaries = assert_halted_at_the_canary(&rollout, &["reported failed for version 2", "probe"]);

    for device in canaries.iter().map(|id| rig.device(id)) {
        let status = device.status();
        let update = &status["update"];
        assert_eq!(
            (update["version"].as_str(), update["state"].as_str()),
            (Some("2"), Some("failed")),
            "{status}"
        );
        assert!(update["detail"].as_str().unwrap_or_default().contains("probe"), "{status}");
        assert_eq!(update["outcomes"]["activated"], 0, "{status}");
    }
    assert_canaries_stay_off(&rig, &canaries, "2");
    assert_untouched_outside(&rig, &canaries);
    assert_every_device_serves_v1(&rig);
}

#[test]
fn a_bundle_tampered_in_the_registry_is_refused_by_every_device_it_reaches_and_the_rollout_halts() {
    let rig = Rig::start(&[&v1(), &v2()]);
    // After registration: the file devices download no longer has the bytes the signed manifest
    // lists.
    let model = rig.registry.join(MODEL).join("2").join("model.onnx");
    let mut bytes = std::fs::read(&model).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&model, bytes).unwrap();

    let id = rig.start_rollout("2", &[(10, 1), (50, 1), (100, 1)]);
    // The fleet refuses to serve a stored file that no longer matches (HTTP 409, not retried), so a
    // device reports the update failed at once; a device that got the bytes would refuse them itself.
    let rollout = rig.wait_until_settled(&id, Duration::from_secs(60), |_| {});
    let canaries = assert_halted_at_the_canary(&rollout, &["reported failed for version 2", "model.onnx"]);

    for device in canaries.iter().map(|id| rig.device(id)) {
        rig.wait_for(&format!("{} reports v2 failed", device.id), Duration::from_secs(60), |_| {
            device.status()["update"]["state"] == "failed"
        });
        let status = device.status();
        let update = &status["update"];
        assert_eq!(update["version"], "2", "{status}");
        let detail = update["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("model.onnx"), "{status}");
        assert_eq!(update["outcomes"]["activated"], 0, "{status}");
        let seen = &rig.fleet_devices()[&device.id];
        assert_eq!(seen["update"]["state"], "failed", "the fleet has its report: {seen}");
    }
    assert_canaries_stay_off(&rig, &canaries, "2");
    assert_untouched_outside(&rig, &canaries);
    assert_every_device_serves_v1(&rig);
}

#[test]
fn a_rollout_resumes_where_it_was_after_a_sigkill_of_the_fleet_mid_soak_and_completes() {
    const SOAK_MS: i64 = 8000;
    let mut rig = Rig::start(&[&v1(), &v2()]);
    let _traffic = Traffic::start(&rig);
    let id = rig.start_rollout("2", &[(10, 1), (50, SOAK_MS as u64 / 1000), (100, 1)]);
    let deadline = Instant::now() + Duration::from_secs(120);
    let before = loop {
        let rollout = rig.rollout(&id);
        assert_eq!(rollout["status"], "running", "{rollout}\n{}", rig.diagnosis());
        if rollout["stage"] == 1 && rollout["waiting"].as_str().is_some_and(|w| w.contains("soaking")) {
            break rollout;
        }
        assert!(Instant::now() < deadline, "the second stage never soaked: {rollout}\n{}", rig.diagnosis());
        std::thread::sleep(Duration::from_millis(100));
    };

    rig.fleet.kill9();
    assert!(http().get(rig.fleet.url("/healthz")).send().is_err(), "the fleet is gone");
    std::thread::sleep(Duration::from_secs(1));
    let restarted_at = crate::fleet_support::now_ms() as i64;
    rig.fleet.start_again();

    // The restarted fleet goes on from the recorded stage and soak clock: still in the second stage,
    // or in the third when the soak ran out meanwhile, never back at the canary.
    let after = rig.rollout(&id);
    let started_ms = |r: &Value| r["stage_started_ms"].as_i64().unwrap();
    match after["stage"].as_u64() {
        Some(1) => assert_eq!(started_ms(&after), started_ms(&before), "the recorded soak clock: {after}"),
        Some(2) => assert!(started_ms(&after) >= started_ms(&before) + SOAK_MS, "{before}\n{after}"),
        _ => panic!("the rollout went back to another stage after the restart: {after}"),
    }
    let reached_before = reached(&before);
    let reached_after = reached(&after);
    for (device, at) in &reached_before {
        assert_eq!(reached_after.get(device), Some(at), "{device} keeps its recorded assignment: {after}");
    }

    let rollout = rig.wait_until_settled(&id, Duration::from_secs(120), |_| {});
    assert_eq!(rollout["status"], "completed", "{rollout}\n{}", rig.diagnosis());
    let reached_at_end = reached(&rollout);
    assert_eq!(reached_at_end.len(), DEVICES, "{rollout}");
    let after_restart: Vec<&String> =
        reached_at_end.iter().filter(|(_, (at, _))| *at >= restarted_at).map(|(id, _)| id).collect();
    assert!(!after_restart.is_empty(), "the last stage was assigned by the restarted fleet: {rollout}");
    assert_eq!(reached_at_end.len(), reached_before.len() + after_restart.len(), "no device assigned twice");

    rig.wait_for("every device reports v2 to the fleet", Duration::from_secs(30), |rig| {
        rig.fleet_devices().values().all(|d| d["reported_version"] == "2" && d["status"] == "online")
    });
    for device in &rig.devices {
        let status = device.status();
        assert_eq!(status["model"]["version"], "2", "{}: {status}", device.id);
        assert_eq!(status["update"]["outcomes"]["activated"], 1, "updated exactly once: {status}");
    }
}
