//! Telemetry from real `tandemd` processes into `tandem-fleet`: through the embedded broker into
//! SQLite, and through Mosquitto (with the ACL `tandem-fleet mosquitto-acl` writes) into
//! PostgreSQL; the statistics API on a known workload on both databases; and bad messages.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tandem_core::protocol::{DeviceTopics, Route, TopicKind};
use tandem_train::export::ExternalData;
use tandem_train::model::presets::Preset;

use crate::daemon_process::{DaemonProcess, http_client};
use crate::fixtures::ExportedModel;
use crate::fleet_support::{
    FleetProcess, eventually, external_mqtt, fleet_binary, fleet_config, hash_password, loopback, now_ms,
    postgres::TestPostgres, publish_v5, telemetry_event, telemetry_payload,
};
use crate::support::mosquitto::{Access, Mosquitto};

const NEVER_ASK: f32 = -60.0;

/// A device daemon sending telemetry over MQTT to `broker_url` as `device` with `password`.
fn device_config(device: &str, broker_url: &str, password_file: &Path) -> String {
    format!(
        "device_id = \"{device}\"\n[router]\nhelp_bias = {NEVER_ASK}\n[mqtt]\nurl = \"{broker_url}\"\n\
         password_file = \"{}\"\nkeep_alive_secs = 5\nreconnect_min_ms = 50\nreconnect_max_ms = 500\n\
         [telemetry]\ntransport = {{ kind = \"mqtt\" }}\nflush_interval_ms = 50\n",
        password_file.display()
    )
}

/// Asks `daemon` `n` questions; the telemetry event id of each answer.
fn ask(daemon: &DaemonProcess, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let response = http_client(Duration::from_secs(60))
                .post(format!("{}/v1/chat/completions", daemon.url()))
                .json(&json!({"messages": [{"role": "user", "content": format!("question {i}")}], "max_tokens": 4}))
                .send()
                .unwrap();
            assert!(response.status().is_success(), "{}", daemon.log());
            let body: Value = response.json().unwrap();
            body["tandem"]["event_id"].as_str().expect("an event id").to_string()
        })
        .collect()
}

fn write_secret(dir: &Path, name: &str, secret: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{secret}\n")).unwrap();
    path
}

#[test]
fn real_devices_publish_telemetry_through_the_embedded_broker_into_sqlite() {
    let work = tempfile::tempdir().unwrap();
    let (api, mqtt) = (loopback(), loopback());
    let passwords = [("robot-a", "robot-a-password-0123456789"), ("robot-b", "robot-b-password-0123456789")];
    let devices_file = work.path().join("devices.toml");
    let mut devices = String::new();
    for ((device, password), group) in passwords.iter().zip(["north", "south"]) {
        devices.push_str(&format!(
            "[[device]]\nid = \"{device}\"\ngroup = \"{group}\"\npassword = \"{}\"\n\n",
            hash_password(password)
        ));
    }
    std::fs::write(&devices_file, devices).unwrap();
    let config = format!(
        "devices_file = \"{}\"\n{}",
        devices_file.display(),
        fleet_config(work.path(), None, api, &format!("[mqtt.embedded]\nlisten = \"{mqtt}\"\n"))
    );
    let fleet = FleetProcess::start(&work.path().join("fleet"), &config, api);

    let model = ExportedModel::new(&Preset::TinyQwen2.config(), 61, ExternalData::Never);
    let mut answered = BTreeSet::new();
    let mut daemons = Vec::new();
    for (device, password) in passwords {
        let secret = write_secret(work.path(), &format!("{device}.pw"), password);
        let config = device_config(device, &format!("mqtt://{mqtt}"), &secret);
        let daemon = DaemonProcess::start(&work.path().join(device), &model.bundle, &config);
        answered.extend(ask(&daemon, 3));
        daemons.push(daemon);
    }
    eventually("every answered query reaches the fleet", Duration::from_secs(30), || {
        fleet.all_event_ids(None).is_superset(&answered)
    });
    assert_eq!(fleet.all_event_ids(None), answered, "exactly the answered queries, once each");

    let stats = fleet.get("/v1/stats?group_by=group", None);
    let rows: Vec<_> =
        stats["rows"].as_array().unwrap().iter().map(|r| (r["key"].clone(), r["queries"].clone())).collect();
    assert_eq!(rows, vec![(json!("north"), json!(3)), (json!("south"), json!(3))]);
    assert_eq!(stats["totals"]["local"], 6);
    eventually("both devices are online with their model version", Duration::from_secs(10), || {
        let devices = fleet.get("/v1/devices", None);
        devices["devices"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["status"] == "online" && d["model_version"].is_string())
    });
    drop(daemons);
}

#[test]
fn real_devices_publish_through_mosquitto_with_the_generated_acl_into_postgres() {
    let work = tempfile::tempdir().unwrap();
    let acl = std::process::Command::new(fleet_binary())
        .args(["mosquitto-acl", "--fleet-user", "fleet"])
        .output()
        .unwrap();
    let acl = String::from_utf8(acl.stdout).unwrap();
    let users =
        [("robot-a", "robot-a-password"), ("robot-b", "robot-b-password"), ("fleet", "fleet-password")];
    let broker = Mosquitto::start_with(Access::Acl { users: &users, acl: &acl });
    let postgres = TestPostgres::start();
    let api = loopback();
    let fleet_password = write_secret(work.path(), "fleet.pw", "fleet-password");
    let mqtt = external_mqtt(&broker.url(), "fleet-1", Some(("fleet", &fleet_password)));
    let config = format!(
        "{}[ingest]\nmax_message_bytes = 65536\n",
        fleet_config(work.path(), Some(&postgres.url()), api, &mqtt)
    );
    let fleet = FleetProcess::start(&work.path().join("fleet"), &config, api);

    let model = ExportedModel::new(&Preset::TinyQwen2.config(), 62, ExternalData::Never);
    let secret = write_secret(work.path(), "robot-a.pw", "robot-a-password");
    let daemon = DaemonProcess::start(
        &work.path().join("robot-a"),
        &model.bundle,
        &device_config("robot-a", &broker.url(), &secret),
    );
    let answered: BTreeSet<String> = ask(&daemon, 4).into_iter().collect();
    eventually("every answered query reaches PostgreSQL", Duration::from_secs(30), || {
        fleet.all_event_ids(None).is_superset(&answered)
    });

    // robot-b forges robot-a's telemetry: Mosquitto's ACL refuses it.
    let forged = telemetry_event("robot-a", "m@1", now_ms(), Route::Cloud, 10, 10);
    let robot_a_telemetry = DeviceTopics::new("robot-a").unwrap().topic(TopicKind::Telemetry);
    let reasons = publish_v5(
        broker.port(),
        "robot-b",
        Some(("robot-b", "robot-b-password")),
        &[(robot_a_telemetry.clone(), telemetry_payload("robot-a", std::slice::from_ref(&forged)))],
    );
    assert_eq!(reasons, ["NotAuthorized"]);

    // Bad messages on robot-a's own topic pass the broker and are counted and skipped by the fleet.
    let mut oversized = telemetry_event("robot-a", "m@1", now_ms(), Route::Local, 10, 0);
    oversized.prompt = Some("x".repeat(100_000));
    let good = telemetry_event("robot-a", "m@1", now_ms(), Route::Local, 10, 0);
    let messages = vec![
        (robot_a_telemetry.clone(), b"{not json".to_vec()),
        (robot_a_telemetry.clone(), br#"{"v":1,"device_id":"robot-a","events":[{"id":1}]}"#.to_vec()),
        (robot_a_telemetry.clone(), telemetry_payload("robot-a", &[oversized])),
        (robot_a_telemetry.clone(), telemetry_payload("robot-a", std::slice::from_ref(&good))),
    ];
    let reasons = publish_v5(broker.port(), "robot-a-tool", Some(("robot-a", "robot-a-password")), &messages);
    assert!(reasons.iter().all(|r| r == "Success"), "{reasons:?}");
    eventually("the good event arrives after the bad ones", Duration::from_secs(10), || {
        fleet.all_event_ids(None).contains(&good.id.to_string())
    });
    for reason in ["malformed", "schema", "oversized"] {
        assert_eq!(
            fleet.metric(&format!("tandem_fleet_bad_messages_total{{reason=\"{reason}\"}}")),
            1.0,
            "{reason}"
        );
    }
    let stored = fleet.all_event_ids(None);
    assert!(!stored.contains(&forged.id.to_string()), "the forged event was stored");
    let mut expected = answered.clone();
    expected.insert(good.id.to_string());
    assert_eq!(stored, expected);
    drop(daemon);
}

/// d1 (5 local at 100 ms, 3 cloud at local 200 ms / cloud 1500 ms) and d2 (2 local at 40 ms, 1
/// fallback) on model m1; d3 (4 local at 300 ms, 1 cloud at 800 ms) on m2; the first hour and the
/// second hour of a known day.
fn known_workload(t0: u64) -> Vec<(String, Vec<tandem_core::protocol::TelemetryEvent>)> {
    let hour = 3_600_000;
    let mut d1: Vec<_> = (0..5).map(|i| telemetry_event("d1", "m1", t0 + i, Route::Local, 100, 0)).collect();
    d1.extend((0..3).map(|i| telemetry_event("d1", "m1", t0 + 10 + i, Route::Cloud, 200, 1500)));
    let mut d2: Vec<_> = (0..2).map(|i| telemetry_event("d2", "m1", t0 + i, Route::Local, 40, 0)).collect();
    d2.push(telemetry_event("d2", "m1", t0 + 5, Route::LocalFallback, 40, 0));
    let mut d3: Vec<_> =
        (0..4).map(|i| telemetry_event("d3", "m2", t0 + hour + i, Route::Local, 300, 0)).collect();
    d3.push(telemetry_event("d3", "m2", t0 + hour + 9, Route::Cloud, 300, 800));
    vec![("d1".into(), d1), ("d2".into(), d2), ("d3".into(), d3)]
}

fn check_known_workload_stats(fleet: &FleetProcess, t0: u64) {
    let range = format!("from={t0}&to={}", t0 + 2 * 3_600_000);
    let totals = fleet.get(&format!("/v1/stats?{range}"), None)["totals"].clone();
    assert_eq!(
        [
            &totals["queries"],
            &totals["local"],
            &totals["cloud"],
            &totals["local_fallback"],
            &totals["help_requested"]
        ],
        [&json!(16), &json!(11), &json!(4), &json!(1), &json!(5)]
    );
    assert!((totals["call_ratio"].as_f64().unwrap() - 0.25).abs() < 1e-12);
    assert_eq!(totals["cloud_completion_tokens"], 160);
    // Local latencies sorted: 40×3, 100×5, 200×3, 300×5 → p50 is the 8th of 16 (100), p90 the 15th.
    assert_eq!(
        totals["local_latency_ms"],
        json!({"count": 16, "p50": 100, "p90": 300, "p99": 300, "max": 300})
    );
    assert_eq!(
        totals["cloud_latency_ms"],
        json!({"count": 4, "p50": 1500, "p90": 1500, "p99": 1500, "max": 1500})
    );

    let by_device = fleet.get(&format!("/v1/stats?{range}&group_by=device"), None);
    let rows: Vec<_> = by_device["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap().to_string(),
                r["queries"].as_i64().unwrap(),
                r["cloud"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(rows, vec![("d1".into(), 8, 3), ("d2".into(), 3, 0), ("d3".into(), 5, 1)]);

    let by_model = fleet.get(&format!("/v1/stats?{range}&group_by=model_version&bucket=1h"), None);
    let rows: Vec<_> = by_model["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["bucket_start_ms"].as_u64().unwrap() - t0,
                r["key"].as_str().unwrap().to_string(),
                r["queries"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(rows, vec![(0, "m1".into(), 11), (3_600_000, "m2".into(), 5)]);
    let d3_only = fleet.get(&format!("/v1/stats?{range}&device=d3"), None);
    assert!((d3_only["totals"]["call_ratio"].as_f64().unwrap() - 0.2).abs() < 1e-12);
}

#[test]
fn the_stats_api_returns_the_numbers_of_a_known_workload_on_sqlite_and_postgres() {
    let postgres = TestPostgres::start();
    for store in [None, Some(postgres.url())] {
        let work = tempfile::tempdir().unwrap();
        let (api, mqtt) = (loopback(), loopback());
        let section = format!("[mqtt.embedded]\nlisten = \"{mqtt}\"\nallow_anonymous = true\n");
        let fleet = FleetProcess::start(
            work.path(),
            &fleet_config(work.path(), store.as_deref(), api, &section),
            api,
        );
        // 2024-01-01T00:00:00Z, so the hours are the same wherever the test runs.
        let t0 = 1_704_067_200_000;
        for (device, events) in known_workload(t0) {
            let topic = DeviceTopics::new(&device).unwrap().topic(TopicKind::Telemetry);
            // Two messages per device, the second one repeating the first event (redelivery).
            let messages = vec![
                (topic.clone(), telemetry_payload(&device, &events)),
                (topic, telemetry_payload(&device, &events[..1])),
            ];
            let reasons = publish_v5(mqtt.port(), &device, Some((&device, "")), &messages);
            assert_eq!(reasons, ["Success", "Success"]);
        }
        check_known_workload_stats(&fleet, t0);
        assert_eq!(fleet.metric("tandem_fleet_ingest_events_total{result=\"duplicate\"}"), 3.0, "{store:?}");
    }
}

#[test]
fn two_fleet_instances_split_the_load_with_a_shared_subscription() {
    use crate::fleet_support::{PersistentMosquitto, TelemetryLoad, finish_loadgen, read_ids};
    let work = tempfile::tempdir().unwrap();
    let broker = PersistentMosquitto::start(None);
    let postgres = TestPostgres::start();
    let instances: Vec<_> = ["fleet-a", "fleet-b"]
        .iter()
        .map(|name| {
            let api = loopback();
            let mqtt =
                format!("{}shared_group = \"tandem-fleet\"\n", external_mqtt(&broker.url(), name, None));
            let config = fleet_config(work.path(), Some(&postgres.url()), api, &mqtt);
            FleetProcess::start(&work.path().join(name), &config, api)
        })
        .collect();
    let acked = work.path().join("acked.txt");
    let url = broker.url();
    let load = TelemetryLoad { broker: &url, devices: 20, rate: 1000, batch: 5, seconds: 4, acked: &acked }
        .spawn(&[]);
    let report = finish_loadgen(load);
    let acked = read_ids(&acked);
    assert!(acked.len() > 2000, "{report}");
    eventually("every acknowledged event is stored once", Duration::from_secs(30), || {
        instances[0].all_event_ids(None) == acked
    });
    let stored: Vec<f64> =
        instances.iter().map(|f| f.metric("tandem_fleet_ingest_events_total{result=\"stored\"}")).collect();
    assert!(stored.iter().all(|n| *n > 0.0), "both instances ingested: {stored:?}");
    assert_eq!(stored.iter().sum::<f64>() as usize, acked.len(), "{stored:?}");
}

#[test]
fn a_fleet_behind_a_flooding_broker_holds_no_more_than_its_receive_maximum_of_messages() {
    use crate::fleet_support::{PersistentMosquitto, TelemetryLoad, finish_loadgen, read_ids};
    const RECEIVE_MAXIMUM: f64 = 50.0;
    let work = tempfile::tempdir().unwrap();
    let broker = PersistentMosquitto::start(None);
    let api = loopback();
    let mqtt =
        format!("{}receive_maximum = {RECEIVE_MAXIMUM}\n", external_mqtt(&broker.url(), "fleet", None));
    let fleet =
        FleetProcess::start(&work.path().join("fleet"), &fleet_config(work.path(), None, api, &mqtt), api);
    let acked = work.path().join("acked.txt");
    // Flat out: the devices publish as fast as Mosquitto acknowledges, far faster than the fleet
    // commits, and Mosquitto hands the backlog on as fast as the fleet reads it.
    let url = broker.url();
    let load =
        TelemetryLoad { broker: &url, devices: 20, rate: 0, batch: 5, seconds: 2, acked: &acked }.spawn(&[]);
    let mut most_waiting: f64 = 0.0;
    let mut sample = || most_waiting = most_waiting.max(fleet.metric("tandem_fleet_ingest_queue_depth"));
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        sample();
        std::thread::sleep(Duration::from_millis(20));
    }
    let report = finish_loadgen(load);
    let acked = read_ids(&acked);
    eventually("every acknowledged event is stored once", Duration::from_secs(120), || {
        sample();
        fleet.metric("tandem_fleet_ingest_events_total{result=\"stored\"}") as usize >= acked.len()
    });
    assert_eq!(fleet.all_event_ids(None), acked, "{report}");
    assert!(
        most_waiting <= RECEIVE_MAXIMUM,
        "{most_waiting} messages were waiting to be written at once, more than the receive maximum: {report}"
    );
    assert!(
        most_waiting >= RECEIVE_MAXIMUM / 2.0,
        "the load never filled the window ({most_waiting}): {report}"
    );
}
