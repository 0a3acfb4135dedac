//! Faults under sustained load from the load generator (simulated devices that keep what was not
//! acknowledged and send it again, as `tandemd`'s spool does): the fleet killed with SIGKILL, with
//! its embedded broker and as a client of Mosquitto, and Mosquitto restarted. Afterwards every
//! event the devices had acknowledged (PUBACK) is in the database, exactly once.

use std::path::Path;
use std::thread::sleep;
use std::time::Duration;

use serde_json::Value;

use crate::fleet_support::{
    FleetProcess, PersistentMosquitto, TelemetryLoad, eventually, external_mqtt, finish_loadgen,
    fleet_config, loopback, read_ids,
};

/// 40 devices, 2000 events/s in batches of 5, for 8 s; acknowledged ids go to `acked`.
fn load(broker: &str, acked: &Path) -> std::process::Child {
    TelemetryLoad { broker, devices: 40, rate: 2000, batch: 5, seconds: 8, acked }.spawn(&["--drain", "40"])
}

/// Every acknowledged event is stored once (`all_event_ids` fails on a repeated id), and nothing
/// else is.
fn check_nothing_acknowledged_was_lost(fleet: &FleetProcess, acked: &Path, report: &Value) {
    assert_eq!(report["messages_unacked"], 0, "{report}");
    let acked = read_ids(acked);
    assert_eq!(acked.len() as u64, report["events_acked"].as_u64().unwrap());
    assert!(acked.len() > 4000, "too little load to mean anything: {report}");
    eventually("every acknowledged event is stored", Duration::from_secs(60), || {
        fleet.all_event_ids(None).is_superset(&acked)
    });
    let stored = fleet.all_event_ids(None);
    let missing = acked.difference(&stored).count();
    assert_eq!(missing, 0);
    assert_eq!(stored, acked, "only acknowledged events were sent more than once, and all are stored once");
}

#[test]
fn a_sigkill_of_the_fleet_with_its_embedded_broker_loses_no_acknowledged_event() {
    let work = tempfile::tempdir().unwrap();
    let (api, mqtt) = (loopback(), loopback());
    let section = format!("[mqtt.embedded]\nlisten = \"{mqtt}\"\nallow_anonymous = true\n");
    let mut fleet = FleetProcess::start(work.path(), &fleet_config(work.path(), None, api, &section), api);
    let acked = work.path().join("acked.txt");
    let load = load(&format!("mqtt://{mqtt}"), &acked);
    sleep(Duration::from_secs(3));
    fleet.kill9();
    sleep(Duration::from_secs(1));
    fleet.start_again();
    let report = finish_loadgen(load);
    assert!(report["reconnects"].as_u64().unwrap() >= 40, "every device reconnected: {report}");
    check_nothing_acknowledged_was_lost(&fleet, &acked, &report);
}

#[test]
fn a_sigkill_of_the_fleet_behind_mosquitto_loses_no_acknowledged_event() {
    let work = tempfile::tempdir().unwrap();
    let broker = PersistentMosquitto::start(None);
    let api = loopback();
    let config = fleet_config(work.path(), None, api, &external_mqtt(&broker.url(), "fleet-1", None));
    let mut fleet = FleetProcess::start(work.path(), &config, api);
    let acked = work.path().join("acked.txt");
    let load = load(&broker.url(), &acked);
    sleep(Duration::from_secs(3));
    fleet.kill9();
    // Mosquitto keeps acknowledging the devices and queues for the fleet's session meanwhile.
    sleep(Duration::from_secs(2));
    fleet.start_again();
    let report = finish_loadgen(load);
    check_nothing_acknowledged_was_lost(&fleet, &acked, &report);
    assert!(fleet.metric("tandem_fleet_ingest_events_total{result=\"stored\"}") > 0.0, "{}", broker.log());
}

#[test]
fn a_mosquitto_restart_during_sustained_ingest_loses_no_acknowledged_event() {
    let work = tempfile::tempdir().unwrap();
    let mut broker = PersistentMosquitto::start(None);
    let api = loopback();
    let config = fleet_config(work.path(), None, api, &external_mqtt(&broker.url(), "fleet-1", None));
    let fleet = FleetProcess::start(work.path(), &config, api);
    let acked = work.path().join("acked.txt");
    let load = load(&broker.url(), &acked);
    sleep(Duration::from_secs(3));
    broker.restart();
    let report = finish_loadgen(load);
    assert!(report["reconnects"].as_u64().unwrap() >= 40, "every device reconnected: {report}");
    check_nothing_acknowledged_was_lost(&fleet, &acked, &report);
    let _ = broker.log();
}
