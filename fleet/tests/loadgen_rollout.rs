//! The load generator's devices following a staged rollout of the committed signed bundles
//! (`models/countdown-tiny-v1`, `-v2`) through the real fleet: they download every file from the
//! registry, verify it, report `downloading` → `verifying` → `active`, and send telemetry from the
//! new version, which is what lets the rollout complete. (A file that differs from its manifest,
//! and a transfer resumed with a range request, are unit tests in `fleet/src/loadgen/update.rs`.)

mod support;

use std::path::PathBuf;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tandem_core::bundle::signature::parse_public_key;
use tandem_fleet::loadgen::{FollowOptions, LoadOptions, LoadReport, run_load_until};
use tokio_util::sync::CancellationToken;

use support::bundle::registry_trusting;
use support::fleet::{TestFleet, http};
use support::wait::wait_until;

const DEVICES: usize = 6;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn bundle_bytes(version: &str) -> u64 {
    std::fs::read_dir(repo().join(format!("models/countdown-tiny-v{version}")))
        .unwrap()
        .map(|entry| entry.unwrap().metadata().unwrap().len())
        .sum()
}

async fn fleet() -> TestFleet {
    let fleet = TestFleet::start(|config, dir| {
        config.registry = Some(registry_trusting(dir, vec![repo().join("models/keys/demo.pub")]));
        config.rollouts.evaluate_interval_ms = 100;
    })
    .await;
    for version in ["1", "2"] {
        let path = repo().join(format!("models/countdown-tiny-v{version}"));
        let response =
            http().post(fleet.api_url("/v1/models")).json(&json!({ "path": path })).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED, "{}", response.text().await.unwrap());
    }
    fleet
}

/// `DEVICES` load-generator devices on version 1, following their assignments; stopped by `stop`.
fn devices(fleet: &TestFleet, stop: &CancellationToken) -> tokio::task::JoinHandle<LoadReport> {
    let key = std::fs::read_to_string(repo().join("models/keys/demo.pub")).unwrap();
    let options = LoadOptions {
        broker: fleet.mqtt.unwrap().to_string(),
        devices: DEVICES,
        device_prefix: "lg-".into(),
        password: None,
        rate: 20.0,
        batch: 2,
        duration: Duration::from_secs(300),
        drain: Duration::from_secs(5),
        max_in_flight: 16,
        offload_rate: 0.0,
        model_version: "1".into(),
        follow: Some(FollowOptions {
            download: true,
            download_concurrency: 2,
            trusted_keys: vec![parse_public_key(&key).unwrap()],
        }),
        acked_ids: None,
    };
    let stop = stop.clone();
    tokio::spawn(async move { run_load_until(options, stop).await.unwrap() })
}

async fn online(fleet: &TestFleet) -> Vec<Value> {
    let listed = fleet.get("/v1/devices", None).await;
    listed["devices"].as_array().unwrap().iter().filter(|d| d["status"] == "online").cloned().collect()
}

async fn start_rollout(fleet: &TestFleet) -> String {
    let body = json!({
        "model": "countdown-tiny", "version": "2",
        "stages": [{ "percent": 20, "soak_secs": 1 }, { "percent": 100 }],
    });
    let response = http().post(fleet.api_url("/v1/rollouts")).json(&body).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let rollout: Value = response.json().await.unwrap();
    rollout["id"].as_str().unwrap().to_string()
}

async fn wait_for_status(fleet: &TestFleet, id: &str, status: &str) -> Value {
    wait_until(&format!("rollout {id} is {status}"), || async {
        let rollout = fleet.get(&format!("/v1/rollouts/{id}"), None).await;
        assert!(
            rollout["status"] == status || rollout["status"] == "running",
            "rollout {id} is {} ({}), not {status}",
            rollout["status"],
            rollout["reason"]
        );
        rollout["status"] == status
    })
    .await;
    fleet.get(&format!("/v1/rollouts/{id}"), None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_devices_download_verify_and_activate_a_staged_rollout() {
    let fleet = fleet().await;
    let stop = CancellationToken::new();
    let load = devices(&fleet, &stop);
    wait_until("every device is online on version 1", || async {
        let online = online(&fleet).await;
        online.len() == DEVICES && online.iter().all(|d| d["reported_version"] == "1")
    })
    .await;

    let id = start_rollout(&fleet).await;
    let rollout = wait_for_status(&fleet, &id, "completed").await;
    assert_eq!(rollout["devices"].as_array().unwrap().len(), DEVICES);
    for device in online(&fleet).await {
        assert_eq!(
            (device["reported_version"].as_str(), device["update"]["state"].as_str()),
            (Some("2"), Some("active")),
            "{device}"
        );
    }
    stop.cancel();
    let report = load.await.unwrap();
    let updates = report.updates.expect("an updates report");
    assert_eq!(
        (updates.assignments, updates.downloads, updates.failures),
        (DEVICES as u64, DEVICES as u64, 0)
    );
    assert_eq!(updates.serving.get("2"), Some(&(DEVICES as u64)), "{:?}", updates.serving);
    assert_eq!(updates.bytes_downloaded, DEVICES as u64 * bundle_bytes("2"), "every file, once per device");
}
