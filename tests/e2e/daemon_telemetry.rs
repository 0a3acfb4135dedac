//! The whole device path over MQTT with a real Mosquitto broker and real `tandemd serve`
//! processes: telemetry that survives SIGKILL and arrives exactly once after de-duplication,
//! offload through the fleet gateway, and a SIGTERM that drains in-flight work.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tandem_core::protocol::{DeviceTopics, TelemetryBatch, TopicKind};
use tandem_train::export::ExternalData;
use tandem_train::model::presets::Preset;
use uuid::Uuid;

use crate::daemon_process::{DaemonProcess, http_client};
use crate::fixtures::ExportedModel;
use crate::mqtt::{FleetClient, Gateway};
use crate::support::mosquitto::Mosquitto;

fn mqtt_device_config(broker: &Mosquitto, help_bias: f32, extra: &str) -> String {
    format!(
        "device_id = \"robot-7\"\n[router]\nhelp_bias = {help_bias}\n[mqtt]\nurl = \"{}\"\n\
         [telemetry]\ntransport = {{ kind = \"mqtt\" }}\nflush_interval_ms = 50\n{extra}",
        broker.url()
    )
}

/// POSTs one chat request; the route and the telemetry event id when it was answered.
fn ask(url: &str, content: &str, max_tokens: u32) -> Option<(String, Value)> {
    let response = http_client(Duration::from_secs(30))
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}))
        .send()
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    let route = response.headers().get("x-tandem-route")?.to_str().ok()?.to_string();
    Some((route, response.json().ok()?))
}

/// Telemetry events the fleet received, by id, with how many times each arrived.
async fn drain_events(fleet: &mut FleetClient, seen: &mut HashMap<Uuid, u32>, wait: Duration) {
    let deadline = Instant::now() + wait;
    while let Ok(Some(publish)) = tokio::time::timeout_at(deadline.into(), fleet.inbox.recv()).await {
        let batch: TelemetryBatch = serde_json::from_slice(&publish.payload).expect("a telemetry batch");
        assert_eq!(batch.device_id, "robot-7");
        for event in batch.events {
            *seen.entry(event.id).or_default() += 1;
        }
    }
}

fn start_device(work: &Path, model: &Path, config: &str, port: Option<u16>) -> DaemonProcess {
    match port {
        Some(port) => DaemonProcess::start_on(work, model, config, port),
        None => DaemonProcess::start(work, model, config),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answered_request_reaches_the_fleet_exactly_once_across_a_sigkill_during_a_burst() {
    let broker = Mosquitto::start();
    let mut fleet = FleetClient::connect(&broker, &DeviceTopics::all_devices(TopicKind::Telemetry)).await;
    let exported = ExportedModel::new(&Preset::TinyQwen2.config(), 51, ExternalData::Never);
    let work = tempfile::tempdir().unwrap();
    let config = mqtt_device_config(&broker, -60.0, "");
    let (work_dir, model) = (work.path().join("device"), exported.bundle.clone());

    let (c, w, m) = (config.clone(), work_dir.clone(), model.clone());
    let mut daemon = tokio::task::spawn_blocking(move || start_device(&w, &m, &c, None)).await.unwrap();
    let (url, port) = (daemon.url(), daemon.addr.port());

    // A burst from four clients; SIGKILL lands in the middle of it.
    let answered = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|client| {
            let (answered, stop, url) = (answered.clone(), stop.clone(), url.clone());
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    if let Some((_, body)) = ask(&url, &format!("client {client} query {i}"), 6) {
                        let id = body["tandem"]["event_id"]
                            .as_str()
                            .expect("an event id")
                            .parse::<Uuid>()
                            .unwrap();
                        answered.lock().unwrap().insert(id);
                    }
                    i += 1;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    daemon = tokio::task::spawn_blocking(move || {
        daemon.kill9();
        daemon
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().unwrap();
    }
    drop(daemon);
    let answered = answered.lock().unwrap().clone();
    assert!(answered.len() >= 10, "the burst answered only {} requests", answered.len());

    // Restarted on the same state directory, the daemon ships what the spool still holds.
    let daemon = tokio::task::spawn_blocking(move || start_device(&work_dir, &model, &config, Some(port)))
        .await
        .unwrap();
    let mut seen = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !answered.iter().all(|id| seen.contains_key(id)) && Instant::now() < deadline {
        drain_events(&mut fleet, &mut seen, Duration::from_millis(500)).await;
    }
    let missing: Vec<_> = answered.iter().filter(|id| !seen.contains_key(id)).collect();
    assert!(
        missing.is_empty(),
        "{} answered requests never reached the fleet: {missing:?}\n{}",
        missing.len(),
        daemon.log()
    );
    // De-duplicating by id leaves each event once; redelivery after the crash is allowed, loss is not.
    let unique: BTreeSet<_> = seen.keys().collect();
    assert_eq!(unique.len(), seen.len());
    assert!(seen.len() >= answered.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_help_request_is_offloaded_over_mqtt_through_the_fleet_gateway() {
    let broker = Mosquitto::start();
    let mut gateway = Gateway::start(&broker).await;
    let exported = ExportedModel::new(&Preset::TinyQwen2.config(), 52, ExternalData::Never);
    let work = tempfile::tempdir().unwrap();
    let config =
        mqtt_device_config(&broker, 60.0, "[cloud]\nmqtt = true\ndeadline_ms = 5000\n[budget]\nburst = 5\n");
    let (w, m) = (work.path().join("device"), exported.bundle.clone());
    let daemon = tokio::task::spawn_blocking(move || start_device(&w, &m, &config, None)).await.unwrap();
    let url = daemon.url();
    let (route, body) =
        tokio::task::spawn_blocking(move || ask(&url, "What is 6 * 7?", 8)).await.unwrap().expect("answered");
    assert_eq!(route, "cloud", "{body}\n{}", daemon.log());
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.ends_with("cloud says: What is 6 * 7?"), "{content}");
    assert_eq!(body["tandem"]["cloud_model"], "test-cloud");
    let seen = gateway.next_request().await;
    assert_eq!(seen.request.device_id, "robot-7");
    assert_eq!(seen.request.messages.last().unwrap().content, "What is 6 * 7?", "the original query is sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_request_finish_and_ships_its_telemetry() {
    let broker = Mosquitto::start();
    let mut fleet = FleetClient::connect(&broker, &DeviceTopics::all_devices(TopicKind::Telemetry)).await;
    // The cloud never answers, so the request is in flight until the 2 s offload deadline.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cloud_url = format!("http://{}", silent.local_addr().unwrap());
    let exported = ExportedModel::new(&Preset::TinyQwen2.config(), 53, ExternalData::Never);
    let work = tempfile::tempdir().unwrap();
    let extra = format!(
        "[cloud]\ndeadline_ms = 2000\n[cloud.https]\nurl = \"{cloud_url}\"\nmodel = \"m\"\ntimeout_ms = 2000\n\
         [budget]\nburst = 5\n"
    );
    let config = mqtt_device_config(&broker, 60.0, &extra);
    let (w, m) = (work.path().join("device"), exported.bundle.clone());
    let mut daemon = tokio::task::spawn_blocking(move || start_device(&w, &m, &config, None)).await.unwrap();
    let url = daemon.url();
    let request = tokio::task::spawn_blocking(move || ask(&url, "slow one", 6));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let exited_cleanly = tokio::task::spawn_blocking(move || (daemon.terminate(), daemon)).await.unwrap();
    let (route, body) = request.await.unwrap().expect("the in-flight request was answered, not cut");
    assert_eq!(route, "local_fallback");
    assert!(exited_cleanly.0, "tandemd exits 0 after SIGTERM:\n{}", exited_cleanly.1.log());
    let id: Uuid = body["tandem"]["event_id"].as_str().unwrap().parse().unwrap();
    let mut seen = HashMap::new();
    drain_events(&mut fleet, &mut seen, Duration::from_secs(3)).await;
    assert!(seen.contains_key(&id), "the event was flushed before exit:\n{}", exited_cleanly.1.log());
    drop(silent);
}
