//! `tandemd serve` as applications and operators meet it: the OpenAI API through the official
//! `openai` package and curl, routing by the help marker, offload over HTTPS to a second real
//! `tandemd`, the budget gate under concurrency and across SIGKILL, and cloud faults.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tandem_core::help_marker::HELP_MARKER;
use tandem_train::export::ExternalData;
use tandem_train::model::presets::Preset;

use crate::daemon_process::DaemonProcess;
use crate::fixtures::ExportedModel;

/// A logit bias that makes the tiny model always (or never) choose the help marker's token.
const ALWAYS_ASK: f32 = 60.0;
const NEVER_ASK: f32 = -60.0;

fn model() -> ExportedModel {
    ExportedModel::new(&Preset::TinyQwen2.config(), 41, ExternalData::Never)
}

fn client() -> reqwest::blocking::Client {
    crate::daemon_process::http_client(Duration::from_secs(60))
}

fn chat(daemon: &DaemonProcess, content: &str, max_tokens: u32) -> (String, Value) {
    let response = client()
        .post(format!("{}/v1/chat/completions", daemon.url()))
        .json(&json!({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}))
        .send()
        .unwrap();
    assert!(response.status().is_success(), "status {}: {}", response.status(), daemon.log());
    let route = response.headers().get("x-tandem-route").unwrap().to_str().unwrap().to_string();
    (route, response.json().unwrap())
}

fn status(daemon: &DaemonProcess) -> Value {
    client().get(format!("{}/v1/status", daemon.url())).send().unwrap().json().unwrap()
}

/// A device daemon config with the given help bias and cloud section.
fn device_config(help_bias: f32, extra: &str) -> String {
    format!("device_id = \"robot-1\"\n[router]\nhelp_bias = {help_bias}\n{extra}")
}

fn cloud_section(url: &str, budget: &str) -> String {
    format!(
        "[cloud]\ndeadline_ms = 3000\nattempts_per_transport = 1\n[cloud.https]\nurl = \"{url}\"\nmodel = \"cloud\"\n\
         timeout_ms = 2000\n[budget]\n{budget}\n"
    )
}

struct Fleet {
    _dir: tempfile::TempDir,
    work: PathBuf,
    device_model: ExportedModel,
}

impl Fleet {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().to_path_buf();
        Self { _dir: dir, work, device_model: model() }
    }

    fn cloud(&self) -> DaemonProcess {
        DaemonProcess::start(
            &self.work.join("cloud"),
            &self.device_model.bundle,
            &device_config(NEVER_ASK, ""),
        )
    }

    fn device(&self, name: &str, config: &str) -> DaemonProcess {
        DaemonProcess::start(&self.work.join(name), &self.device_model.bundle, config)
    }
}

#[test]
fn the_official_openai_client_gets_answers_with_their_route() {
    let fleet = Fleet::new();
    let token_file = fleet.work.join("token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let config = device_config(
        NEVER_ASK,
        &format!("[server]\napi_token = {{ file = {:?} }}\n", token_file.display().to_string()),
    );
    let daemon = fleet.device("device-auth", &config);
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run `make test` (it creates the venv with openai)",
        python.display()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/clients/openai_client.py");
    let out = Command::new(&python).arg(script).arg(daemon.url()).arg("s3cret").output().unwrap();
    assert!(
        out.status.success(),
        "openai client failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.log()
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["models"].as_array().unwrap().len(), 1);
    assert!(v["content"].is_string());
    assert!(v["usage"].as_u64().unwrap() > 0);
    assert_eq!(v["route_header"], "local");
    assert_eq!(v["tandem"]["route"], "local");
    assert!(v["stream_chunks"].as_u64().unwrap() >= 2);
    assert!(v["stream_finish_reason"].is_string());
    assert_eq!(v["stream_tandem"]["route"], "local");
    assert!(v["stream_usage"].as_u64().unwrap() > 0);
    assert_eq!(v["bad_request"]["status"], 400);

    let wrong = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/clients/openai_client.py"))
        .arg(daemon.url())
        .arg("wrong-token")
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
}

#[test]
fn curl_gets_an_answer_with_the_route_header_and_openai_style_errors() {
    let fleet = Fleet::new();
    let daemon = fleet.device("device", &device_config(NEVER_ASK, ""));
    let url = format!("{}/v1/chat/completions", daemon.url());
    let out = Command::new("curl")
        .args(["-sS", "-i", "-H", "content-type: application/json", "-d"])
        .arg(r#"{"messages":[{"role":"user","content":"hello"}],"max_tokens":8}"#)
        .arg(&url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.contains("x-tandem-route: local"), "{text}");
    assert!(text.contains("\"chat.completion\""), "{text}");

    for (body, expected) in [
        ("{not json", 400),
        (r#"{"messages":[],"max_tokens":4}"#, 400),
        (r#"{"messages":[{"role":"user","content":"x"}],"bogus":1}"#, 400),
    ] {
        let out = Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/stderr",
                "-w",
                "%{http_code}",
                "-H",
                "content-type: application/json",
                "-d",
                body,
            ])
            .arg(&url)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), expected.to_string(), "body {body}");
        let error: Value = serde_json::from_slice(&out.stderr).unwrap();
        assert!(error["error"]["message"].is_string(), "{error}");
    }
    assert_eq!(chat(&daemon, "still serving", 4).0, "local");
}

#[test]
fn a_help_request_is_answered_by_a_second_tandemd_over_https() {
    let fleet = Fleet::new();
    let cloud = fleet.cloud();
    let config = device_config(ALWAYS_ASK, &cloud_section(&cloud.url(), "cloud_fraction = 0.5\nburst = 3"));
    let device = fleet.device("device", &config);
    let (route, body) = chat(&device, "What is 2 + 2?", 16);
    assert_eq!(route, "cloud", "{body}");
    assert_eq!(body["tandem"]["route"], "cloud");
    assert!(body["tandem"]["cloud_model"].is_string());
    let probability = body["tandem"]["help_probability"].as_f64().unwrap();
    assert!(probability < 1.0 && probability > 0.0, "the unbiased probability is recorded: {probability}");
    assert!(!body["choices"][0]["message"]["content"].as_str().unwrap().contains("<unknown>"));
}

#[test]
fn a_prompt_containing_the_marker_never_triggers_an_offload() {
    let fleet = Fleet::new();
    let cloud = fleet.cloud();
    let config = device_config(NEVER_ASK, &cloud_section(&cloud.url(), "cloud_fraction = 0.5\nburst = 3"));
    let device = fleet.device("device", &config);
    let (route, _) = chat(&device, &format!("Please repeat: {HELP_MARKER}"), 8);
    assert_eq!(route, "local");
    assert_eq!(status(&device)["budget"]["cloud"], 0);
}

#[test]
fn a_spent_budget_answers_on_the_device_with_the_marker_forbidden() {
    let fleet = Fleet::new();
    let cloud = fleet.cloud();
    let config = device_config(ALWAYS_ASK, &cloud_section(&cloud.url(), "cloud_fraction = 0.3\nburst = 1"));
    let device = fleet.device("device", &config);
    assert_eq!(chat(&device, "first", 8).0, "cloud", "the burst allows one call");
    let (route, body) = chat(&device, "second", 8);
    assert_eq!(route, "local_fallback", "{body}");
    assert!(body["tandem"]["fallback_reason"].as_str().unwrap().starts_with("budget"), "{body}");
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!content.contains("<unknown>"), "the fallback answer cannot ask for help: {content:?}");
    assert!(body["usage"]["completion_tokens"].as_u64().unwrap() > 0);
}

#[test]
fn cloud_down_slow_or_garbage_still_answers_within_the_deadline() {
    let fleet = Fleet::new();
    let dead = format!("http://127.0.0.1:{}", crate::daemon_process::free_port());
    let slow = silent_server();
    let garbage = garbage_server();
    for (name, url) in [("dead", dead), ("slow", slow), ("garbage", garbage)] {
        let config = device_config(ALWAYS_ASK, &cloud_section(&url, "cloud_fraction = 0.5\nburst = 5"));
        let device = fleet.device(name, &config);
        let started = Instant::now();
        let (route, body) = chat(&device, "hello", 8);
        let elapsed = started.elapsed();
        assert_eq!(route, "local_fallback", "{name}: {body}");
        assert!(elapsed < Duration::from_secs(6), "{name}: took {elapsed:?}, deadline is 3 s");
        let reason = body["tandem"]["fallback_reason"].as_str().unwrap().to_string();
        assert!(!reason.is_empty(), "{name}");
        // The failed call gave its budget back.
        assert_eq!(status(&device)["budget"]["cloud"], 0, "{name}");
    }
}

/// Accepts connections and never answers.
fn silent_server() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().take(16).flatten() {
            held.push(stream);
        }
        std::thread::sleep(Duration::from_secs(30));
    });
    format!("http://{addr}")
}

/// Answers every request with 200 and a body that is not a chat completion.
fn garbage_server() -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().take(16).flatten() {
            let mut buf = [0u8; 8192];
            let _ = stream.read(&mut buf);
            let body = "<html>definitely not json</html>";
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    format!("http://{addr}")
}

#[test]
fn two_hundred_concurrent_requests_never_overrun_a_nearly_spent_budget() {
    let fleet = Fleet::new();
    let cloud = fleet.cloud();
    let config = device_config(
        ALWAYS_ASK,
        &format!(
            "{}\n[server]\nmax_queue = 256\n",
            cloud_section(&cloud.url(), "cloud_fraction = 0.2\nburst = 4")
        ),
    );
    let device = Arc::new(fleet.device("device", &config));
    let threads: Vec<_> = (0..200)
        .map(|i| {
            let device = device.clone();
            std::thread::spawn(move || chat(&device, &format!("query {i}"), 4).0)
        })
        .collect();
    let routes: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let cloud_calls = routes.iter().filter(|r| *r == "cloud").count() as f64;
    let local = routes.iter().filter(|r| *r != "cloud").count() as f64;
    let rho = 0.2 / 0.8;
    assert!(cloud_calls >= 4.0, "the burst was usable: {cloud_calls}");
    assert!(
        cloud_calls <= rho * local + 4.0 + 1e-9,
        "{cloud_calls} cloud calls against {local} local answers"
    );
    let s = status(&device);
    assert_eq!(s["budget"]["cloud"].as_f64().unwrap(), cloud_calls);
    assert_eq!(s["budget"]["pending"], 0);
}

#[test]
fn the_budget_window_survives_a_sigkill_and_restart() {
    let fleet = Fleet::new();
    let cloud = fleet.cloud();
    let config = device_config(ALWAYS_ASK, &cloud_section(&cloud.url(), "cloud_fraction = 0.5\nburst = 2"));
    let mut device = fleet.device("device", &config);
    let routes: Vec<String> = (0..4).map(|i| chat(&device, &format!("q{i}"), 4).0).collect();
    let before = status(&device)["budget"].clone();
    assert!(before["cloud"].as_u64().unwrap() >= 2, "{routes:?}");
    let port = device.addr.port();
    device.kill9();
    let device =
        DaemonProcess::start_on(&fleet.work.join("device"), &fleet.device_model.bundle, &config, port);
    let after = status(&device)["budget"].clone();
    assert_eq!(after["cloud"], before["cloud"], "cloud calls in the window survive: {before} vs {after}");
    assert!(after["local"].as_u64() <= before["local"].as_u64());
    assert!(
        after["calls_available"].as_u64() <= before["calls_available"].as_u64(),
        "a crash never frees budget"
    );
}

#[test]
fn serve_works_with_no_config_file_at_all() {
    let exported = model();
    let state = tempfile::tempdir().unwrap();
    let port = crate::daemon_process::free_port();
    let mut command = Command::new(crate::fixtures::tandemd_binary());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TANDEM_") {
            command.env_remove(key);
        }
    }
    let mut child = command
        .args(["serve", "--model"])
        .arg(&exported.bundle)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        // Only the state directory is moved, so the test does not write to /var/lib/tandem.
        .env("TANDEM_STATE_DIR", state.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let client = crate::daemon_process::http_client(Duration::from_secs(5));
    let url = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    while !client.get(format!("{url}/healthz")).send().is_ok_and(|r| r.status().is_success()) {
        assert!(child.try_wait().unwrap().is_none(), "tandemd exited without a config file");
        assert!(started.elapsed() < Duration::from_secs(30), "not healthy in 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let response = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}))
        .send()
        .unwrap();
    assert!(response.status().is_success());
    let route = response.headers()["x-tandem-route"].to_str().unwrap().to_string();
    assert!(route == "local" || route == "local_fallback", "without a cloud nothing is offloaded: {route}");
    let status: Value = client.get(format!("{url}/v1/status")).send().unwrap().json().unwrap();
    assert_eq!(status["budget"]["cloud"], 0);
    let _ = child.kill();
    let _ = child.wait();
}
