//! Staged rollouts with the real fleet and 20 simulated devices (MQTT clients) that act on their
//! assignments the way `tandemd`'s updater reports: healthy ones report the new version `active`
//! and send telemetry from it; bad ones report `failed`, or send telemetry full of errors.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::{Value, json};
use tandem_core::protocol::{
    DeviceStatus, DeviceTopics, ModelAssignment, Route, TopicKind, UpdateReport, UpdateState,
};
use tandem_fleet::rollout::{DeviceObservation, stage_members};

use support::bundle::{key, public_key, registry_trusting, write_bundle};
use support::fleet::{TestFleet, http};
use support::postgres::TestPostgres;
use support::telemetry::{event, now_ms};
use support::wait::wait_until;

const DEVICES: usize = 20;

/// How a simulated device answers an assignment.
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    /// Installs it, reports `active`, sends telemetry from it.
    Healthy,
    /// Reports `failed` for this version (keeps serving the old one); installs the others.
    FailsOn(&'static str),
    /// Installs everything, but this version's telemetry is half errors.
    ErrorsOn(&'static str),
}

/// The simulated devices; what each received, by device, in order.
struct Devices {
    received: Arc<Mutex<HashMap<String, Vec<String>>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Devices {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Devices {
    fn ids() -> Vec<String> {
        (0..DEVICES).map(|i| format!("robot-{i:02}")).collect()
    }

    async fn start(fleet: &TestFleet, behaviour: Behaviour) -> Self {
        let received = Arc::new(Mutex::new(HashMap::new()));
        let broker = fleet.mqtt.unwrap();
        let tasks = Self::ids()
            .into_iter()
            .map(|id| tokio::spawn(device(id, broker, behaviour, received.clone())))
            .collect();
        let devices = Self { received, tasks };
        wait_until("every device is known and online", || async {
            let listed = fleet.get("/v1/devices", None).await;
            let online =
                listed["devices"].as_array().unwrap().iter().filter(|d| d["status"] == "online").count();
            online == DEVICES
        })
        .await;
        devices
    }

    fn received(&self, device: &str) -> Vec<String> {
        self.received.lock().unwrap().get(device).cloned().unwrap_or_default()
    }
}

/// One device: reconnects when the fleet restarts, subscribes to its assignment, and answers it.
async fn device(
    id: String,
    broker: SocketAddr,
    behaviour: Behaviour,
    received: Arc<Mutex<HashMap<String, Vec<String>>>>,
) {
    let topics = DeviceTopics::new(&id).unwrap();
    let mut options = MqttOptions::new(id.clone(), broker.ip().to_string(), broker.port());
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(options, 64);
    let mut serving = "1".to_string();
    let mut update: Option<UpdateReport> = None;
    let status = |serving: &str, update: &Option<UpdateReport>| {
        let status = DeviceStatus {
            online: true,
            device_id: id.clone(),
            model_version: Some(serving.to_string()),
            update: update.clone(),
        };
        status.to_payload()
    };
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                client.subscribe(topics.topic(TopicKind::Assignment), QoS::AtLeastOnce).await.unwrap();
                let payload = status(&serving, &update);
                client
                    .publish(topics.topic(TopicKind::Status), QoS::AtLeastOnce, true, payload)
                    .await
                    .unwrap();
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let assignment: ModelAssignment = serde_json::from_slice(&publish.payload).unwrap();
                received.lock().unwrap().entry(id.clone()).or_default().push(assignment.version.clone());
                let at_ms = now_ms();
                let refused = matches!(behaviour, Behaviour::FailsOn(v) if v == assignment.version);
                let state = if refused {
                    UpdateState::Failed
                } else {
                    serving = assignment.version.clone();
                    UpdateState::Active
                };
                update = Some(UpdateReport {
                    version: assignment.version.clone(),
                    state,
                    detail: refused.then(|| "probe failed".to_string()),
                    at_ms,
                });
                let payload = status(&serving, &update);
                client
                    .publish(topics.topic(TopicKind::Status), QoS::AtLeastOnce, true, payload)
                    .await
                    .unwrap();
                if !refused {
                    let errors = matches!(behaviour, Behaviour::ErrorsOn(v) if v == serving);
                    let batch: Vec<_> = (0..4)
                        .map(|i| {
                            let mut e = event(&id, &serving, at_ms + i, Route::Local, 120, 0);
                            if errors && i % 2 == 0 {
                                e.error_class = Some("timeout".into());
                            }
                            e
                        })
                        .collect();
                    let telemetry = support::telemetry::payload(&id, &batch);
                    client
                        .publish(topics.topic(TopicKind::Telemetry), QoS::AtLeastOnce, false, telemetry)
                        .await
                        .unwrap();
                }
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// A fleet with a registry holding `tiny` versions 1, 2 and 3, evaluating rollouts every 100 ms.
async fn fleet(store_url: Option<String>) -> TestFleet {
    let fleet = TestFleet::start(|config, dir| {
        if let Some(url) = store_url {
            config.store.url = url;
        }
        config.registry = Some(registry_trusting(dir, vec![public_key(dir, &key(1))]));
        config.rollouts.evaluate_interval_ms = 100;
    })
    .await;
    for version in ["1", "2", "3"] {
        let bundle = write_bundle(fleet.dir.path(), "tiny", version, version.as_bytes(), Some(&key(1)));
        let response =
            http().post(fleet.api_url("/v1/models")).json(&json!({ "path": bundle })).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    fleet
}

async fn post(fleet: &TestFleet, path: &str, body: Value) -> (StatusCode, Value) {
    let response = http().post(fleet.api_url(path)).json(&body).send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

async fn start_rollout(fleet: &TestFleet, body: Value) -> String {
    let (status, rollout) = post(fleet, "/v1/rollouts", body).await;
    assert_eq!(status, StatusCode::CREATED, "{rollout}");
    rollout["id"].as_str().unwrap().to_string()
}

async fn wait_for_status(fleet: &TestFleet, id: &str, status: &str) -> Value {
    wait_until(&format!("rollout {id} is {status}"), || async {
        fleet.get(&format!("/v1/rollouts/{id}"), None).await["status"] == status
    })
    .await;
    fleet.get(&format!("/v1/rollouts/{id}"), None).await
}

/// The devices of the stage of `percent`, as the fleet computes them.
fn members(rollout: &str, percent: f64) -> Vec<String> {
    let devices: Vec<DeviceObservation> = Devices::ids()
        .into_iter()
        .map(|id| DeviceObservation { id, assigned_at_ms: None, report: None, events: 0 })
        .collect();
    let mut ids: Vec<String> =
        stage_members(rollout, percent, &devices).into_iter().map(str::to_string).collect();
    ids.sort();
    ids
}

/// `(device, assigned_at_ms, rolled back)` of every device the rollout reached.
fn reached(rollout: &Value) -> Vec<(String, i64, bool)> {
    rollout["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["id"].as_str().unwrap().to_string(),
                d["assigned_at_ms"].as_i64().unwrap(),
                !d["rolled_back_ms"].is_null(),
            )
        })
        .collect()
}

async fn assignment(fleet: &TestFleet, device: &str) -> Option<Value> {
    let response =
        http().get(fleet.api_url(&format!("/v1/devices/{device}/assignment"))).send().await.unwrap();
    match response.status() {
        StatusCode::OK => Some(response.json().await.unwrap()),
        StatusCode::NOT_FOUND => None,
        other => panic!("{device}: {other}"),
    }
}

fn three_stages() -> Value {
    json!([{ "percent": 10, "soak_secs": 1 }, { "percent": 50, "soak_secs": 1 }, { "percent": 100 }])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_rollout_reaches_every_device_canary_first() {
    let fleet = fleet(None).await;
    let devices = Devices::start(&fleet, Behaviour::Healthy).await;
    let id =
        start_rollout(&fleet, json!({ "model": "tiny", "version": "2", "stages": three_stages() })).await;
    let canaries = members(&id, 10.0);
    assert!(!canaries.is_empty() && canaries.len() < DEVICES / 2, "{canaries:?}");
    let first: Vec<String> =
        reached(&fleet.get(&format!("/v1/rollouts/{id}"), None).await).into_iter().map(|d| d.0).collect();
    assert_eq!(first, canaries, "the first step assigns exactly the canaries");

    let rollout = wait_for_status(&fleet, &id, "completed").await;
    assert_eq!(rollout["rollback_version"], "1");
    assert_eq!(rollout["stage"], 2);
    let reached = reached(&rollout);
    assert_eq!(reached.len(), DEVICES);
    let second = members(&id, 50.0);
    let at = |device: &str| reached.iter().find(|d| d.0 == device).unwrap().1;
    for device in Devices::ids() {
        let stage = if canaries.contains(&device) {
            0
        } else if second.contains(&device) {
            1
        } else {
            2
        };
        for other in Devices::ids() {
            let other_stage = if canaries.contains(&other) {
                0
            } else if second.contains(&other) {
                1
            } else {
                2
            };
            if stage < other_stage {
                assert!(
                    at(&device) < at(&other),
                    "{device} (stage {stage}) before {other} (stage {other_stage})"
                );
            }
        }
        assert_eq!(devices.received(&device), ["2"], "{device}");
        let assignment = assignment(&fleet, &device).await.expect("an assignment");
        assert_eq!(assignment["version"], "2");
        assert_eq!(assignment["rollout_id"], id.as_str());
        let url = assignment["url"].as_str().unwrap();
        assert!(url.ends_with("/v1/registry/tiny/2/"), "{url}");
        let manifest = http().get(format!("{url}manifest.json")).send().await.unwrap().bytes().await.unwrap();
        assert_eq!(
            tandem_core::bundle::FileDigest::of_bytes(&manifest).sha256,
            assignment["manifest_sha256"]
        );
    }
    let listed = fleet.get("/v1/devices", None).await;
    assert!(
        listed["devices"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["reported_version"] == "2" && d["update"]["state"] == "active")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_appears_after_a_completed_rollout_gets_its_version() {
    let fleet = fleet(None).await;
    let devices = Devices::start(&fleet, Behaviour::Healthy).await;
    let id =
        start_rollout(&fleet, json!({ "model": "tiny", "version": "2", "stages": three_stages() })).await;
    wait_for_status(&fleet, &id, "completed").await;

    let late = "robot-late".to_string();
    let broker = fleet.mqtt.unwrap();
    let _late_device =
        tokio::spawn(device(late.clone(), broker, Behaviour::Healthy, devices.received.clone()));
    wait_until("the late device got version 2", || async { devices.received(&late) == ["2"] }).await;
    let rollout = fleet.get(&format!("/v1/rollouts/{id}"), None).await;
    assert_eq!(rollout["status"], "completed");
    let reached = reached(&rollout);
    assert_eq!(reached.len(), DEVICES + 1);
    assert!(reached.iter().any(|d| d.0 == late && !d.2), "{reached:?}");
    for device in Devices::ids() {
        assert_eq!(devices.received(&device), ["2"], "{device} was not assigned again");
    }
    let late_update = |dashboard: &Value| {
        let devices = dashboard["devices"].as_array().unwrap();
        devices.iter().find(|d| d["id"] == late.as_str()).map(|d| d["update"]["state"].clone())
    };
    wait_until("the dashboard shows the late device's update active", || async {
        late_update(&fleet.get("/v1/dashboard", None).await) == Some(json!("active"))
    })
    .await;
    let dashboard = fleet.get("/v1/dashboard", None).await;
    let shown = &dashboard["rollouts"][0];
    assert_eq!(
        (shown["id"].as_str(), shown["status"].as_str()),
        (Some(id.as_str()), Some("completed")),
        "{shown}"
    );
    assert_eq!(
        (shown["reached"].as_u64(), shown["rolled_back"].as_u64()),
        (Some(DEVICES as u64 + 1), Some(0))
    );
    let metrics = http().get(fleet.api_url("/metrics")).send().await.unwrap().text().await.unwrap();
    for line in [
        "tandem_fleet_rollout_transitions_total{transition=\"started\"} 1",
        "tandem_fleet_rollout_transitions_total{transition=\"stage_advanced\"} 2",
        "tandem_fleet_rollout_transitions_total{transition=\"completed\"} 1",
        &format!("tandem_fleet_rollout_assignments_total{{kind=\"new\"}} {DEVICES}"),
        "tandem_fleet_rollout_assignments_total{kind=\"late_device\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "no `{line}` in\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_canaries_halt_the_rollout_and_only_they_get_the_previous_version_back() {
    let fleet = fleet(None).await;
    let devices = Devices::start(&fleet, Behaviour::FailsOn("2")).await;
    let id =
        start_rollout(&fleet, json!({ "model": "tiny", "version": "2", "stages": three_stages() })).await;
    let rollout = wait_for_status(&fleet, &id, "halted").await;
    let reason = rollout["reason"].as_str().unwrap();
    assert!(reason.contains("reported failed for version 2: probe failed"), "{reason}");
    let canaries = members(&id, 10.0);
    let reached = reached(&rollout);
    assert_eq!(reached.iter().map(|d| d.0.clone()).collect::<Vec<_>>(), canaries);
    assert!(reached.iter().all(|d| d.2), "every canary is marked rolled back");
    for device in Devices::ids() {
        if canaries.contains(&device) {
            wait_until("the rollback reaches the canary", || async {
                devices.received(&device) == ["2", "1"]
            })
            .await;
            let assignment = assignment(&fleet, &device).await.unwrap();
            assert_eq!(
                (assignment["version"].as_str(), assignment["rollout_id"].as_str()),
                (Some("1"), Some(id.as_str()))
            );
        } else {
            assert!(devices.received(&device).is_empty(), "{device} was never touched");
            assert!(assignment(&fleet, &device).await.is_none());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_rate_above_the_gate_halts_at_the_canary_stage() {
    let fleet = fleet(None).await;
    let devices = Devices::start(&fleet, Behaviour::ErrorsOn("2")).await;
    let id = start_rollout(
        &fleet,
        json!({
            "model": "tiny", "version": "2",
            "stages": [{ "percent": 10, "soak_secs": 60 }, { "percent": 100 }],
            "gates": { "max_error_rate": 0.1, "min_events": 4 },
        }),
    )
    .await;
    let rollout = wait_for_status(&fleet, &id, "halted").await;
    let reason = rollout["reason"].as_str().unwrap();
    assert!(reason.contains("error rate") && reason.contains("max_error_rate 0.1"), "{reason}");
    assert_eq!(rollout["stage"], 0);
    let canaries = members(&id, 10.0);
    assert_eq!(reached(&rollout).iter().map(|d| d.0.clone()).collect::<Vec<_>>(), canaries);
    for device in &canaries {
        wait_until("the rollback reaches the canary", || async { devices.received(device) == ["2", "1"] })
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_pause_resume_supersede_and_abort() {
    let fleet = fleet(None).await;
    let devices = Devices::start(&fleet, Behaviour::Healthy).await;
    let slow = json!([{ "percent": 10, "soak_secs": 3600 }, { "percent": 100 }]);
    let first = start_rollout(&fleet, json!({ "model": "tiny", "version": "2", "stages": slow })).await;
    wait_until("the canaries are healthy", || async {
        let r = fleet.get(&format!("/v1/rollouts/{first}"), None).await;
        r["waiting"].as_str().is_some_and(|w| w.contains("soaking"))
    })
    .await;

    let (status, paused) = post(&fleet, &format!("/v1/rollouts/{first}/pause"), json!({})).await;
    assert_eq!((status, paused["status"].as_str()), (StatusCode::OK, Some("paused")));
    assert_eq!(post(&fleet, &format!("/v1/rollouts/{first}/pause"), json!({})).await.0, StatusCode::CONFLICT);
    let (status, resumed) = post(&fleet, &format!("/v1/rollouts/{first}/resume"), json!({})).await;
    assert_eq!((status, resumed["status"].as_str()), (StatusCode::OK, Some("running")));

    let newer = json!({ "model": "tiny", "version": "3", "stages": slow, "rollback_version": "1" });
    let (status, refused) = post(&fleet, "/v1/rollouts", newer.clone()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("supersede"), "{refused}");
    let mut superseding = newer;
    superseding["supersede"] = json!(true);
    let second = start_rollout(&fleet, superseding).await;
    let old = fleet.get(&format!("/v1/rollouts/{first}"), None).await;
    assert_eq!(
        (old["status"].as_str(), old["superseded_by"].as_str()),
        (Some("superseded"), Some(second.as_str()))
    );

    wait_until("the new canaries are healthy", || async {
        let r = fleet.get(&format!("/v1/rollouts/{second}"), None).await;
        r["waiting"].as_str().is_some_and(|w| w.contains("soaking"))
    })
    .await;
    let (status, aborted) = post(&fleet, &format!("/v1/rollouts/{second}/abort"), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{aborted}");
    assert_eq!(
        (aborted["status"].as_str(), aborted["reason"].as_str()),
        (Some("aborted"), Some("aborted by the operator"))
    );
    for device in members(&second, 10.0) {
        wait_until("the abort reaches the canary", || async {
            devices.received(&device).last().map(String::as_str) == Some("1")
        })
        .await;
        assert_eq!(assignment(&fleet, &device).await.unwrap()["version"], "1");
    }
    assert_eq!(
        post(&fleet, &format!("/v1/rollouts/{second}/abort"), json!({})).await.0,
        StatusCode::CONFLICT
    );
    let listed = fleet.get("/v1/rollouts", None).await;
    assert_eq!(listed["rollouts"].as_array().unwrap().len(), 2);
    let (status, _) =
        post(&fleet, "/v1/rollouts", json!({ "model": "tiny", "version": "9", "stages": slow })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "an unregistered version");
}

async fn restarted_fleet_resumes(store_url: Option<String>) {
    let mut fleet = fleet(store_url).await;
    let devices = Devices::start(&fleet, Behaviour::Healthy).await;
    let stages = json!([{ "percent": 10, "soak_secs": 2 }, { "percent": 100 }]);
    let id = start_rollout(&fleet, json!({ "model": "tiny", "version": "2", "stages": stages })).await;
    wait_until("the canaries are healthy", || async {
        let r = fleet.get(&format!("/v1/rollouts/{id}"), None).await;
        r["waiting"].as_str().is_some_and(|w| w.contains("soaking"))
    })
    .await;
    let before = reached(&fleet.get(&format!("/v1/rollouts/{id}"), None).await);
    assert_eq!(before.iter().map(|d| d.0.clone()).collect::<Vec<_>>(), members(&id, 10.0));

    fleet.restart().await;
    let rollout = wait_for_status(&fleet, &id, "completed").await;
    let after = reached(&rollout);
    assert_eq!(after.len(), DEVICES);
    for canary in &before {
        assert!(after.contains(canary), "{canary:?} kept its assignment across the restart");
    }
    for device in Devices::ids() {
        wait_until("every device got version 2", || async {
            devices.received(&device).contains(&"2".to_string())
        })
        .await;
        assert_eq!(assignment(&fleet, &device).await.unwrap()["version"], "2");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_fleet_resumes_the_rollout_from_its_record() {
    restarted_fleet_resumes(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_fleet_resumes_the_rollout_from_its_record_on_postgresql() {
    let postgres = TestPostgres::start();
    restarted_fleet_resumes(Some(postgres.url())).await;
}
