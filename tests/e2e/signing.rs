//! Signed bundles end to end with the real binaries: `tandem-train keygen`, `export`, `sign` and
//! `verify`, then `tandemd serve` and `tandemd generate` loading only what a trusted key signed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::json;
use tandem_core::bundle::MODEL_FILE;

use crate::daemon_process::{DaemonProcess, free_port, http_client};
use crate::fixtures::tandemd_binary;

/// The `tandem-train` binary of this build, next to `tandemd`.
fn tandem_train_binary() -> PathBuf {
    let binary = tandemd_binary().with_file_name("tandem-train");
    assert!(
        binary.is_file(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`; `make test` does)",
        binary.display()
    );
    binary
}

/// A command with no `TANDEM_*` configuration leaking in from the test's environment.
fn command(binary: PathBuf) -> Command {
    let mut command = Command::new(binary);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TANDEM_") {
            command.env_remove(key);
        }
    }
    command
}

/// Runs `tandem-train ARGS`, asserting success; returns stdout.
fn train(args: &[&str]) -> String {
    let out = train_output(args);
    assert!(out.status.success(), "tandem-train {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn train_output(args: &[&str]) -> Output {
    command(tandem_train_binary()).args(args).output().unwrap()
}

fn arg(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// One bundle made by `tandem-train init` and `tandem-train export`; every test signs its own copy.
fn exported_bundle() -> &'static Path {
    static BUNDLE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, bundle) = BUNDLE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let checkpoint = dir.path().join("checkpoint");
        let bundle = dir.path().join("bundle");
        train(&["init", "--preset", "tiny-qwen2", "--out", arg(&checkpoint), "--seed", "61"]);
        train(&["export", "--from", arg(&checkpoint), "--out", arg(&bundle), "--name", "signed-tiny"]);
        (dir, bundle)
    });
    bundle
}

/// A scratch folder with its own copy of the exported bundle and key pairs made by `keygen`.
struct Workspace {
    dir: tempfile::TempDir,
    bundle: PathBuf,
}

impl Workspace {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("bundle");
        std::fs::create_dir(&bundle).unwrap();
        for entry in std::fs::read_dir(exported_bundle()).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), bundle.join(entry.file_name())).unwrap();
        }
        Self { dir, bundle }
    }

    /// `tandem-train keygen`: returns (secret key file, public key file, printed key id).
    fn keygen(&self, name: &str) -> (PathBuf, PathBuf, String) {
        let keys = self.dir.path().join("keys");
        let stdout = train(&["keygen", "--out", arg(&keys), "--name", name]);
        let key_id = stdout
            .lines()
            .find_map(|l| l.strip_prefix("key id "))
            .unwrap_or_else(|| panic!("keygen printed no key id: {stdout}"))
            .to_string();
        (keys.join(format!("{name}.key")), keys.join(format!("{name}.pub")), key_id)
    }

    fn sign(&self, key: &Path) {
        train(&["sign", "--key", arg(key), "--bundle", arg(&self.bundle)]);
    }

    /// A `tandemd` configuration trusting `keys`, with the state kept in the workspace.
    fn config(&self, keys: &[&Path]) -> PathBuf {
        let path = self.dir.path().join("tandemd.toml");
        let state = self.dir.path().join("state");
        std::fs::write(&path, format!("state_dir = {:?}\n{}", arg(&state), trusted_keys_line(keys))).unwrap();
        path
    }

    /// `tandemd serve` with `keys` trusted, expected to refuse the bundle and exit: returns the exit
    /// code and stderr.
    fn serve_refused(&self, keys: &[&Path]) -> (Option<i32>, String) {
        let log = self.dir.path().join("serve.log");
        let mut child = command(tandemd_binary())
            .args(["serve", "--model", arg(&self.bundle), "--listen", &format!("127.0.0.1:{}", free_port())])
            .arg("--config")
            .arg(self.config(keys))
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "tandemd kept running instead of refusing:\n{}",
                    std::fs::read_to_string(&log).unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        (status.code(), std::fs::read_to_string(&log).unwrap())
    }

    fn generate(&self, keys: &[&Path]) -> Output {
        let mut command = command(tandemd_binary());
        command.args(["generate", "--model", arg(&self.bundle), "--prompt", "Using the numbers"]);
        command.args(["--max-new-tokens", "4", "--json"]);
        for key in keys {
            command.args(["--trusted-key", arg(key)]);
        }
        command.output().unwrap()
    }
}

fn trusted_keys_line(keys: &[&Path]) -> String {
    let quoted = keys.iter().map(|k| format!("{:?}", arg(k))).collect::<Vec<_>>();
    format!("trusted_bundle_keys = [{}]\n", quoted.join(", "))
}

fn flip_a_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

/// Asserts the refusal is the configuration-class exit (2, which the unit does not restart on)
/// and that stderr says each of `expected`.
fn assert_refused((code, stderr): (Option<i32>, String), expected: &[&str]) {
    assert_eq!(code, Some(2), "refusal exits with 2:\n{stderr}");
    for text in expected {
        assert!(stderr.contains(text), "stderr should say `{text}`:\n{stderr}");
    }
}

#[test]
fn a_bundle_signed_with_a_trusted_key_is_verified_and_served() {
    let work = Workspace::new();
    let (secret, public, key_id) = work.keygen("release");
    work.sign(&secret);
    let verified = train(&["verify", "--key", arg(&public), "--bundle", arg(&work.bundle)]);
    assert!(verified.starts_with("OK:") && verified.contains(&key_id), "{verified}");

    let daemon =
        DaemonProcess::start(&work.dir.path().join("daemon"), &work.bundle, &trusted_keys_line(&[&public]));
    let response = http_client(Duration::from_secs(60))
        .post(format!("{}/v1/chat/completions", daemon.url()))
        .json(&json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}))
        .send()
        .unwrap();
    assert!(response.status().is_success(), "status {}: {}", response.status(), daemon.log());
    let log = daemon.log();
    assert!(log.contains("bundle signature and files verified") && log.contains(&key_id), "{log}");
    assert!(!log.contains("not verified"), "no warning when bundles are verified:\n{log}");
}

#[test]
fn without_trusted_keys_serve_loads_as_before_and_warns_that_nothing_is_verified() {
    let work = Workspace::new();
    let daemon = DaemonProcess::start(&work.dir.path().join("daemon"), &work.bundle, "");
    let log = daemon.log();
    assert_eq!(log.matches("model bundles are not verified").count(), 1, "warned exactly once:\n{log}");
}

#[test]
fn serve_refuses_an_unsigned_bundle() {
    let work = Workspace::new();
    let (_, public, _) = work.keygen("release");
    assert_refused(
        work.serve_refused(&[&public]),
        &["signed-tiny v1", arg(&work.bundle), "not signed", "tandem-train sign"],
    );
}

#[test]
fn serve_refuses_a_bundle_whose_model_changed_after_signing() {
    let work = Workspace::new();
    let (secret, public, _) = work.keygen("release");
    work.sign(&secret);
    flip_a_byte(&work.bundle.join(MODEL_FILE));
    assert_refused(work.serve_refused(&[&public]), &["signed-tiny v1", "model.onnx", "sha256"]);
}

#[test]
fn serve_refuses_a_bundle_signed_by_a_key_it_does_not_trust() {
    let work = Workspace::new();
    let (_, trusted, trusted_id) = work.keygen("release");
    let (stranger, _, stranger_id) = work.keygen("stranger");
    work.sign(&stranger);
    assert_refused(work.serve_refused(&[&trusted]), &["not trusted", &stranger_id, &trusted_id]);
}

#[test]
fn serve_refuses_a_model_directory_that_is_not_a_bundle_when_keys_are_trusted() {
    let work = Workspace::new();
    let (_, public, _) = work.keygen("release");
    std::fs::remove_file(work.bundle.join("manifest.json")).unwrap();
    assert_refused(work.serve_refused(&[&public]), &["only signed Tandem bundles can be loaded"]);
}

#[test]
fn serve_refuses_to_start_when_a_secret_key_is_configured_as_trusted() {
    let work = Workspace::new();
    let (secret, _, _) = work.keygen("release");
    work.sign(&secret);
    assert_refused(work.serve_refused(&[&secret]), &["trusted_bundle_keys", "secret signing key", ".pub"]);
}

#[test]
fn generate_with_a_trusted_key_runs_a_signed_bundle_and_refuses_an_unsigned_or_altered_one() {
    let work = Workspace::new();
    let (secret, public, _) = work.keygen("release");
    assert!(work.generate(&[]).status.success(), "without --trusted-key nothing is checked");
    let unsigned = work.generate(&[&public]);
    assert_eq!(unsigned.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unsigned.stderr).contains("not signed"));

    work.sign(&secret);
    let signed = work.generate(&[&public]);
    assert!(signed.status.success(), "stderr: {}", String::from_utf8_lossy(&signed.stderr));
    let v: serde_json::Value = serde_json::from_slice(&signed.stdout).unwrap();
    assert!(v["ids"].as_array().is_some_and(|ids| !ids.is_empty()));

    flip_a_byte(&work.bundle.join(MODEL_FILE));
    let altered = work.generate(&[&public]);
    assert_eq!(altered.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&altered.stderr);
    assert!(stderr.contains("model.onnx") && stderr.contains("sha256"), "{stderr}");
}

#[test]
fn tandem_train_refuses_to_sign_a_corrupted_bundle_and_verify_reports_tampering() {
    let work = Workspace::new();
    let (secret, public, _) = work.keygen("release");
    let model = work.bundle.join(MODEL_FILE);
    let original = std::fs::read(&model).unwrap();
    flip_a_byte(&model);
    let out = train_output(&["sign", "--key", arg(&secret), "--bundle", arg(&work.bundle)]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refusing to sign") && stderr.contains("model.onnx"), "{stderr}");

    std::fs::write(&model, original).unwrap();
    work.sign(&secret);
    std::fs::write(work.bundle.join("chat_template.jinja"), "{{ messages }}").unwrap();
    let out = train_output(&["verify", "--key", arg(&public), "--bundle", arg(&work.bundle)]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("chat_template.jinja") && stderr.contains("not in its manifest"), "{stderr}");
}
