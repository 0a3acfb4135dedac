//! The command line: `check-config` and `print-config` like tandemd's, `hash-password` and
//! `mosquitto-acl`, with the exit codes operators script against (2: fix your input).

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn fleet(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tandem-fleet"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn check_config_accepts_a_valid_file_and_names_every_problem_of_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[mqtt.embedded]\nallow_anonymous = true\n[store]\nurl = \"sqlite://x.db\"\n")
        .unwrap();
    let output = fleet(&["check-config", "--config", good.to_str().unwrap()], "");
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("embedded broker"), "{}", text(&output.stdout));

    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "[ingest]\nmax_batch_event = 10\n").unwrap();
    let output = fleet(&["check-config", "--config", typo.to_str().unwrap()], "");
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("max_batch_event"), "{}", text(&output.stderr));

    let invalid = dir.path().join("invalid.toml");
    std::fs::write(&invalid, "[mqtt]\nmode = \"external\"\n[gateway.fleet_budget]\ncloud_fraction = 2.0\n")
        .unwrap();
    let output = fleet(&["check-config", "--config", invalid.to_str().unwrap()], "");
    assert_eq!(output.status.code(), Some(2));
    let errors = text(&output.stderr);
    assert!(errors.contains("[mqtt.external]") && errors.contains("fleet_budget"), "{errors}");
}

#[test]
fn print_config_prints_the_effective_configuration_as_toml() {
    let output = fleet(&["print-config", "--config", "/dev/null"], "");
    assert!(output.status.success(), "{}", text(&output.stderr));
    let printed = text(&output.stdout);
    let parsed: tandem_fleet::config::FleetConfig = toml::from_str(&printed).expect("valid TOML");
    assert_eq!(parsed, tandem_fleet::config::FleetConfig::default());
}

#[test]
fn hash_password_refuses_short_passwords_and_hashes_long_ones() {
    let output = fleet(&["hash-password"], "short\n");
    assert_eq!(output.status.code(), Some(2));
    let output = fleet(&["hash-password"], "a-long-enough-device-secret\n");
    assert!(output.status.success());
    assert!(text(&output.stdout).starts_with("sha256$"));
}

#[test]
fn mosquitto_acl_confines_devices_to_their_own_topics() {
    let output = fleet(&["mosquitto-acl", "--fleet-user", "fleet"], "");
    let acl = text(&output.stdout);
    assert!(acl.contains("user fleet\n"), "{acl}");
    assert!(acl.contains("pattern write tandem/v1/devices/%u/telemetry\n"), "{acl}");
}
