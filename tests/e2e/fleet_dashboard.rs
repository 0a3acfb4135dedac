//! The dashboard in headless Chromium against a fleet holding real data (six hours of a small
//! fleet, ingested over MQTT): the page renders the call ratio against the budget band, the
//! latency distributions and the device table, and its data endpoint says what was ingested.
//! `TANDEM_FLEET_SCREENSHOT=PATH` also saves the screenshot there (docs/fleet-dashboard.png).

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;
use tandem_core::protocol::{DeviceTopics, Route, TopicKind};

use crate::fleet_support::{
    FleetProcess, fleet_config, hash_password, loopback, now_ms, png_size, publish_v5, telemetry_event,
    telemetry_payload,
};

const TOKEN: &str = "dashboard-token-1";
const PASSWORD: &str = "a-device-password-for-all-of-them";
const CHROMIUM: &str = "chromium";

/// A deterministic stream of numbers in [0, 1).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The twelve devices: `dock-00`, `shelf-01`, `yard-02`, … (their group is the prefix).
fn device_name(d: usize) -> String {
    format!("{}-{d:02}", ["dock", "shelf", "yard"][d % 3])
}

/// Six hours of twelve devices in three groups: model m@1 asks the cloud too often (about 38 %),
/// m@2 replaces it after two hours (about 22 %), and a canary of m@3 runs on two devices for the
/// last two hours (about 14 %). Returns the number of events.
fn ingest_six_hours(mqtt_port: u16) -> usize {
    let mut random = Lcg(7);
    let now = now_ms();
    let start = now - 6 * 3_600_000;
    let mut total = 0;
    for d in 0..12 {
        let device = device_name(d);
        let mut events = Vec::new();
        let mut at = start + (random.next() * 60_000.0) as u64;
        while at < now - 30_000 {
            let hours = (at - start) as f64 / 3_600_000.0;
            let (model, ratio) = if d < 2 && hours >= 4.0 {
                ("m@3", 0.14)
            } else if hours >= 2.0 + d as f64 * 0.15 {
                ("m@2", 0.22)
            } else {
                ("m@1", 0.38)
            };
            let roll = random.next();
            let route = if roll < ratio {
                Route::Cloud
            } else if roll < ratio + 0.05 {
                Route::LocalFallback
            } else {
                Route::Local
            };
            let local_ms = (120.0 * (1.0 + 4.0 * random.next() * random.next())) as u32;
            let cloud_ms = if route == Route::Cloud {
                (700.0 + 2600.0 * random.next() * random.next()) as u32
            } else {
                0
            };
            events.push(telemetry_event(&device, model, at, route, local_ms, cloud_ms));
            at += 60_000 + (random.next() * 120_000.0) as u64;
        }
        total += events.len();
        let topics = DeviceTopics::new(&device).unwrap();
        let mut messages: Vec<_> = events
            .chunks(50)
            .map(|chunk| (topics.topic(TopicKind::Telemetry), telemetry_payload(&device, chunk)))
            .collect();
        let online = d != 7;
        messages.push((
            topics.topic(TopicKind::Status),
            format!("{{\"online\":{online},\"device_id\":\"{device}\"}}").into_bytes(),
        ));
        let reasons = publish_v5(mqtt_port, &device, Some((&device, PASSWORD)), &messages);
        assert!(reasons.iter().all(|r| r == "Success"), "{reasons:?}");
    }
    total
}

/// Runs headless Chromium with `args` on `url`.
fn chromium(args: &[&str], url: &str, profile: &Path) -> std::process::Output {
    Command::new(CHROMIUM)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{CHROMIUM} is needed (scripts/test-deps.sh installs it): {e}"))
}

#[test]
fn the_dashboard_renders_real_ingested_data_in_headless_chromium() {
    let work = tempfile::tempdir().unwrap();
    let (api, mqtt) = (loopback(), loopback());
    let token_file = work.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let hash = hash_password(PASSWORD);
    let devices: String = (0..12)
        .map(|d| {
            let (id, group) = (device_name(d), ["dock", "shelf", "yard"][d % 3]);
            format!("[[device]]\nid = \"{id}\"\ngroup = \"{group}\"\npassword = \"{hash}\"\n")
        })
        .collect();
    let devices_file = work.path().join("devices.toml");
    std::fs::write(&devices_file, devices).unwrap();
    let section =
        format!("[mqtt.embedded]\nlisten = \"{mqtt}\"\n[api.token]\nfile = \"{}\"\n", token_file.display());
    let config = format!(
        "devices_file = \"{}\"\n{}",
        devices_file.display(),
        fleet_config(work.path(), None, api, &section)
    );
    let fleet = FleetProcess::start(&work.path().join("fleet"), &config, api);
    let total = ingest_six_hours(mqtt.port());

    let data: Value = fleet.get("/v1/dashboard?window=6h", Some(TOKEN));
    assert_eq!(data["totals"]["queries"].as_u64().unwrap() as usize, total);
    let models: Vec<_> =
        data["series"].as_array().unwrap().iter().map(|s| s["model_version"].as_str().unwrap()).collect();
    assert_eq!(models, ["m@1", "m@2", "m@3"]);
    assert_eq!(data["devices"].as_array().unwrap().len(), 12);
    assert_eq!(data["devices"].as_array().unwrap().iter().filter(|d| d["status"] == "online").count(), 11);
    assert!(data["latency"]["cloud"]["percentiles"]["p50"].as_i64().unwrap() > 700);

    let url = format!("http://{api}/#token={TOKEN}&window=6h");
    let profile = work.path().join("chromium");
    let dom = chromium(&["--virtual-time-budget=10000", "--dump-dom"], &url, &profile);
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(dom.contains("data-ready=\"1\""), "the page did not finish rendering:\n{dom}");
    assert!(dom.contains(&total.to_string()), "the query count is shown");
    for text in ["m@3", "budget 30 %", "dock-00", "shelf", "offline", "<svg", "<polyline"] {
        assert!(dom.contains(text), "`{text}` is not on the page");
    }

    let screenshot = work.path().join("dashboard.png");
    let shot = chromium(
        &[
            "--virtual-time-budget=10000",
            "--window-size=1280,900",
            &format!("--screenshot={}", screenshot.display()),
        ],
        &url,
        &profile,
    );
    assert!(screenshot.is_file(), "no screenshot: {}", String::from_utf8_lossy(&shot.stderr));
    let blank = work.path().join("blank.png");
    chromium(
        &["--window-size=1280,900", &format!("--screenshot={}", blank.display())],
        "about:blank",
        &profile,
    );
    let (png, blank_png) = (std::fs::read(&screenshot).unwrap(), std::fs::read(&blank).unwrap());
    assert_eq!(png_size(&png), (1280, 900));
    assert!(
        png.len() > 40_000 && png.len() > 10 * blank_png.len(),
        "the screenshot ({} bytes) is not much more than a blank page ({} bytes)",
        png.len(),
        blank_png.len()
    );
    if let Some(path) = std::env::var_os("TANDEM_FLEET_SCREENSHOT") {
        std::fs::copy(&screenshot, path).unwrap();
    }
}
