//! The fleet's API over HTTPS with real processes: `tandem-fleet serve` with `[api.tls]` (a
//! certificate from a private test CA, no `public_url`) and one `tandemd serve` that follows its
//! assignments only by polling `https://` (`updater.mqtt = false`) and trusts the CA through
//! `[updater] ca_file`. A rollout of v2 reaches it: the poll, the manifest and the files all cross
//! TLS, and the device ends up serving v2.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::daemon_process::{DaemonProcess, http_client};
use crate::fleet_support::{FleetProcess, hash_password, loopback};

/// The test CA and certificates are made as in the fleet's own tests.
#[allow(dead_code)]
#[path = "../../fleet/tests/support/pki.rs"]
mod pki;

const DEVICE: &str = "device-https";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

#[test]
fn fleet_https_a_device_trusting_the_private_ca_polls_downloads_and_serves_the_rolled_out_version() {
    let pki = pki::TestPki::generate();
    let work = tempfile::tempdir().unwrap();
    let root = work.path();
    let (api, mqtt) = (loopback(), loopback());
    let token = uuid::Uuid::now_v7().simple().to_string();
    std::fs::write(root.join("api-token"), &token).unwrap();
    let password = uuid::Uuid::now_v7().simple().to_string();
    let devices = format!("[[device]]\nid = \"{DEVICE}\"\npassword = \"{}\"\n", hash_password(&password));
    std::fs::write(root.join("devices.toml"), devices).unwrap();
    let key = repo().join("models/keys/demo.pub");
    let path = |p: &Path| p.display().to_string();
    let config = format!(
        "devices_file = {devices:?}\n\
         [store]\nurl = \"sqlite://{db}\"\n\
         [mqtt.embedded]\nlisten = \"{mqtt}\"\n\
         [api]\nlisten = \"{api}\"\ntoken = {{ file = {token_file:?} }}\n\
         [api.tls]\ncert_file = {cert:?}\nkey_file = {key_file:?}\n\
         [registry]\ndir = {registry:?}\ntrusted_keys = [{key:?}]\n\
         [rollouts]\nevaluate_interval_ms = 200\n",
        devices = path(&root.join("devices.toml")),
        db = root.join("fleet.db").display(),
        token_file = path(&root.join("api-token")),
        cert = path(&pki.server_cert),
        key_file = path(&pki.server_key),
        registry = path(&root.join("registry")),
        key = path(&key),
    );
    let fleet = FleetProcess::start_https(&root.join("fleet"), &config, api, &pki.ca);
    let post = |route: &str, body: Value| -> Value {
        let response = fleet.client().post(fleet.url(route)).bearer_auth(&token).json(&body).send().unwrap();
        let status = response.status();
        let text = response.text().unwrap();
        assert!(status.is_success(), "POST {route}: {status}\n{text}");
        serde_json::from_str(&text).unwrap()
    };
    // v1 too: a rollout needs a version to roll back to.
    for version in ["1", "2"] {
        let bundle = repo().join(format!("models/countdown-tiny-v{version}"));
        let registered = post("/v1/models", json!({ "path": bundle }));
        assert_eq!(registered["version"], version, "{registered}");
    }

    let dir = root.join(DEVICE);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("mqtt-password"), &password).unwrap();
    let device_config = format!(
        "device_id = \"{DEVICE}\"\n\
         trusted_bundle_keys = [{key:?}]\n\
         [engine]\nintra_threads = 1\n\
         [mqtt]\nurl = \"mqtt://{mqtt}\"\npassword_file = {password_file:?}\n\
         reconnect_min_ms = 100\nreconnect_max_ms = 500\n\
         [updater]\nenabled = true\nmqtt = false\npoll_url = \"https://{api}\"\npoll_interval_secs = 1\n\
         ca_file = {ca:?}\nprobe_timeout_secs = 60\n",
        key = path(&key),
        password_file = path(&dir.join("mqtt-password")),
        ca = path(&pki.ca),
    );
    let daemon = DaemonProcess::start(&dir, &repo().join("models/countdown-tiny-v1"), &device_config);
    let device = || fleet.get("/v1/devices", Some(&token))["devices"][0].clone();
    let online = wait_for(Duration::from_secs(60), || {
        let device = device();
        device["status"] == "online" && device["reported_version"] == "1"
    });
    assert!(online, "the device is not online on version 1: {}\n{}", device(), daemon.log());

    let stages = json!([{ "percent": 100, "soak_secs": 1 }]);
    let rollout =
        post("/v1/rollouts", json!({ "model": "countdown-tiny", "version": "2", "stages": stages }));
    assert_eq!(rollout["status"], "running", "{rollout}");
    let serving = || {
        let status = http_client(Duration::from_secs(10)).get(format!("{}/v1/status", daemon.url())).send();
        status.ok().and_then(|r| r.json::<Value>().ok()).map(|s| s["model"]["version"].clone())
    };
    let updated = wait_for(Duration::from_secs(120), || serving().is_some_and(|version| version == "2"));
    assert!(updated, "the device does not serve version 2:\n{}\nfleet:\n{}", daemon.log(), fleet.log());
    let log = daemon.log();
    assert!(log.contains("new model assignment"), "the assignment came by an HTTPS poll:\n{log}");
    assert!(!fleet.log().contains("TLS handshake with an API client failed"), "{}", fleet.log());
}

/// Whether `check` passes within `limit`.
fn wait_for(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !check() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    true
}
