//! The command line: `check-config` and `print-config` like tandemd's, `hash-password` and
//! `mosquitto-acl`, with the exit codes operators script against (2: fix your input), including
//! an `[api.tls]` certificate that cannot be loaded.

use std::io::Write;
use std::process::{Command, Output, Stdio};

mod support;

use support::bundle;

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
fn check_config_loads_the_apis_certificate_and_names_a_missing_or_mismatched_file() {
    let pki = support::pki::TestPki::generate();
    let dir = tempfile::tempdir().unwrap();
    let check = |cert: &std::path::Path, key: &std::path::Path| {
        let config = dir.path().join("fleet.toml");
        let tls = format!(
            "[api.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
            cert.to_str().unwrap(),
            key.to_str().unwrap()
        );
        std::fs::write(&config, format!("[mqtt.embedded]\nallow_anonymous = true\n{tls}")).unwrap();
        fleet(&["check-config", "--config", config.to_str().unwrap()], "")
    };
    let output = check(&pki.server_cert, &pki.server_key);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("api: https://127.0.0.1:8780"), "{}", text(&output.stdout));

    let missing = dir.path().join("missing.pem");
    let output = check(&missing, &pki.server_key);
    assert_eq!(output.status.code(), Some(2));
    let error = text(&output.stderr);
    assert!(error.contains("api.tls.cert_file") && error.contains(missing.to_str().unwrap()), "{error}");

    let output = check(&pki.server_cert, &pki.client_key);
    assert_eq!(output.status.code(), Some(2));
    let error = text(&output.stderr);
    assert!(error.contains("api.tls.key_file") && error.contains("client.key"), "{error}");
}

#[test]
fn the_shipped_configuration_passes_check_config_once_its_devices_file_exists() {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/tandem-fleet.toml"))
            .expect("configs/tandem-fleet.toml");
    // check-config reads the devices file, which exists only on a fleet host.
    let installed_devices = "\"/etc/tandem/fleet-devices.toml\"";
    assert!(shipped.contains(installed_devices), "the shipped devices_file moved: update this test");
    let dir = tempfile::tempdir().unwrap();
    let devices = dir.path().join("fleet-devices.toml");
    std::fs::write(&devices, "").unwrap();
    let config = dir.path().join("fleet.toml");
    std::fs::write(&config, shipped.replace(installed_devices, &format!("{:?}", devices.to_str().unwrap())))
        .unwrap();
    let output = fleet(&["check-config", "--config", config.to_str().unwrap()], "");
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("embedded broker"), "{}", text(&output.stdout));
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

/// `serve` under systemd's `Type=notify` with a watchdog (tandem-fleet.service): READY=1 once
/// listening, WATCHDOG=1 pings, STOPPING=1 on SIGTERM, and a clean exit.
#[test]
fn serve_tells_systemd_it_is_ready_pings_the_watchdog_and_says_when_it_stops() {
    use std::os::unix::net::UnixDatagram;
    use std::time::Duration;

    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let config = dir.path().join("fleet.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nurl = \"sqlite://{}\"\n[api]\nlisten = \"{}\"\n[mqtt.embedded]\nlisten = \"{}\"\nallow_anonymous = true\n",
            dir.path().join("fleet.db").display(),
            free(),
            free()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tandem-fleet"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "200000")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let mut wait_for = |wanted: &str, received: &mut Vec<String>| {
        while !received.iter().any(|m| m.lines().any(|l| l == wanted)) {
            let n =
                socket.recv(&mut buffer).unwrap_or_else(|e| panic!("no {wanted} (got {received:?}): {e}"));
            received.push(String::from_utf8_lossy(&buffer[..n]).into_owned());
        }
    };
    wait_for("READY=1", &mut received);
    wait_for("WATCHDOG=1", &mut received);
    let ready = received.iter().position(|m| m.contains("READY=1")).unwrap();
    let ping = received.iter().position(|m| m.contains("WATCHDOG=1")).unwrap();
    assert!(ready < ping, "ready before the first ping: {received:?}");
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    wait_for("STOPPING=1", &mut received);
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{status:?}: {stderr}");
}

#[test]
fn check_config_with_a_missing_devices_file_exits_2_and_says_so_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fleet.toml");
    let missing = dir.path().join("devices.toml");
    std::fs::write(
        &config,
        format!(
            "devices_file = \"{}\"\n[store]\nurl = \"sqlite://x.db\"\n[mqtt.embedded]\nallow_anonymous = true\n",
            missing.display()
        ),
    )
    .unwrap();
    let output = fleet(&["check-config", "--config", config.to_str().unwrap()], "");
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
    let errors = text(&output.stderr);
    assert!(errors.contains("devices.toml"), "{errors}");
    assert_eq!(errors.matches("No such file").count(), 1, "{errors}");
}

#[test]
fn registry_add_registers_a_signed_bundle_and_refuses_a_tampered_one() {
    let dir = tempfile::tempdir().unwrap();
    let key = bundle::public_key(dir.path(), &bundle::key(1));
    let config = dir.path().join("fleet.toml");
    std::fs::write(
        &config,
        format!(
            "[mqtt.embedded]\nallow_anonymous = true\n[store]\nurl = \"sqlite://{}\"\n[registry]\ndir = \"{}\"\ntrusted_keys = [\"{}\"]\n",
            dir.path().join("fleet.db").display(),
            dir.path().join("registry").display(),
            key.display()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let good = bundle::write_bundle(dir.path(), "tiny", "1", b"graph", Some(&bundle::key(1)));
    let output = fleet(&["registry", "add", "--config", config, "--bundle", good.to_str().unwrap()], "");
    assert!(output.status.success(), "{}", text(&output.stderr));
    let record: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!((record["name"].as_str(), record["created"].as_bool()), (Some("tiny"), Some(true)));

    let tampered = bundle::write_bundle(dir.path(), "tiny", "2", b"graph", Some(&bundle::key(1)));
    std::fs::write(tampered.join("tokenizer.json"), b"{}").unwrap();
    let output = fleet(&["registry", "add", "--config", config, "--bundle", tampered.to_str().unwrap()], "");
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("tokenizer.json"), "{}", text(&output.stderr));

    let output = fleet(&["registry", "list", "--config", config], "");
    assert!(output.status.success(), "{}", text(&output.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(listed["models"].as_array().unwrap().len(), 1);
}
