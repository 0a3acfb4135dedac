//! Offload over MQTT end to end: a device `tandemd` that always asks for help sends its query over
//! MQTT to the fleet's gateway, which asks a second `tandemd` playing the cloud over HTTP and
//! answers on the device's response topic; the device answers with route `cloud`, and its
//! telemetry says so in the fleet. Through the fleet's embedded broker, and through Mosquitto over
//! TLS with client certificates, where the fleet is a client like the device.

use std::time::Duration;

use serde_json::{Value, json};
use tandem_train::export::ExternalData;
use tandem_train::model::presets::Preset;

use crate::daemon_process::{DaemonProcess, http_client};
use crate::fixtures::ExportedModel;
use crate::fleet_support::{FleetProcess, eventually, external_mqtt, fleet_config, loopback};
use crate::support::mosquitto::{Access, Mosquitto, TestPki};

const ALWAYS_ASK: f32 = 60.0;
const NEVER_ASK: f32 = -60.0;

#[test]
fn an_offload_goes_from_the_device_through_the_gateway_to_a_cloud_tandemd_and_back() {
    let mqtt = loopback();
    let fleet_mqtt = format!("[mqtt.embedded]\nlisten = \"{mqtt}\"\nallow_anonymous = true\n");
    offload_round_trip(&fleet_mqtt, &format!("[mqtt]\nurl = \"mqtt://{mqtt}\"\n"));
}

#[test]
fn an_offload_goes_through_mosquitto_over_tls_with_client_certificates_to_a_fleet_behind_it() {
    let pki = TestPki::generate();
    let broker = Mosquitto::start_with(Access::MutualTls { pki: &pki });
    let tls = format!(
        "ca_file = {:?}\nclient_cert_file = {:?}\nclient_key_file = {:?}\n",
        pki.ca, pki.client_cert, pki.client_key
    );
    let fleet_mqtt = format!("{}{tls}", external_mqtt(&broker.tls_url(), "fleet-1", None));
    offload_round_trip(&fleet_mqtt, &format!("[mqtt]\nurl = \"{}\"\n{tls}", broker.tls_url()));
}

/// A fleet with `fleet_mqtt` (its `[mqtt…]` sections) and a gateway to a cloud `tandemd`, and a
/// device that reaches it with `device_mqtt` and always asks for help: one question goes device →
/// fleet → cloud → fleet → device, and its telemetry reaches the fleet.
fn offload_round_trip(fleet_mqtt: &str, device_mqtt: &str) {
    let work = tempfile::tempdir().unwrap();
    let model = ExportedModel::new(&Preset::TinyQwen2.config(), 71, ExternalData::Never);
    let cloud = DaemonProcess::start(
        &work.path().join("cloud"),
        &model.bundle,
        &format!("device_id = \"cloud-1\"\n[router]\nhelp_bias = {NEVER_ASK}\n"),
    );

    let api = loopback();
    let section = format!(
        "{fleet_mqtt}[[gateway.upstream]]\nurl = \"{}\"\nmodel = \"cloud-model\"\ntimeout_ms = 20000\n\
         [gateway.device_budget]\ncloud_fraction = 0.5\nburst = 3\n",
        cloud.url()
    );
    let fleet =
        FleetProcess::start(&work.path().join("fleet"), &fleet_config(work.path(), None, api, &section), api);

    let device_config = format!(
        "device_id = \"robot-7\"\n[router]\nhelp_bias = {ALWAYS_ASK}\n{device_mqtt}\
         [cloud]\nmqtt = true\ndeadline_ms = 30000\n[budget]\ncloud_fraction = 0.5\nburst = 3\n\
         [telemetry]\ntransport = {{ kind = \"mqtt\" }}\nflush_interval_ms = 50\n"
    );
    let device = DaemonProcess::start(&work.path().join("device"), &model.bundle, &device_config);
    let response = http_client(Duration::from_secs(60))
        .post(format!("{}/v1/chat/completions", device.url()))
        .json(&json!({"messages": [{"role": "user", "content": "What is 6 * 7?"}], "max_tokens": 8}))
        .send()
        .unwrap();
    assert!(response.status().is_success(), "{}", device.log());
    let route = response.headers().get("x-tandem-route").unwrap().to_str().unwrap().to_string();
    let body: Value = response.json().unwrap();
    assert_eq!(route, "cloud", "{body}\n--- device\n{}\n--- fleet\n{}", device.log(), fleet.log());
    assert!(body["tandem"]["cloud_model"].is_string(), "{body}");
    assert!(!body["choices"][0]["message"]["content"].as_str().unwrap().contains("<unknown>"));
    assert_eq!(fleet.metric("tandem_fleet_gateway_requests_total{outcome=\"answer\"}"), 1.0);

    let event_id = body["tandem"]["event_id"].as_str().unwrap().to_string();
    eventually("the cloud answer's telemetry reaches the fleet", Duration::from_secs(20), || {
        fleet.all_event_ids(None).contains(&event_id)
    });
    let events = fleet.get("/v1/events?device=robot-7&route=cloud", None);
    let event = &events["events"][0];
    assert_eq!(
        (event["route"].as_str(), event["transport"].as_str()),
        (Some("cloud"), Some("mqtt")),
        "{event}"
    );
    assert!(event["cloud_tokens"]["completion"].as_u64().unwrap() > 0, "{event}");
    let budget = fleet.get("/v1/budget", None);
    assert_eq!(budget["devices"][0]["device"], "robot-7");
    assert_eq!(budget["devices"][0]["budget"]["cloud"], 1, "{budget}");
}
