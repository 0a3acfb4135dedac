//! The configuration as the real binary sees it: file, environment overrides, flags, unknown keys,
//! and the `check-config` / `print-config` subcommands with their exit codes.

use std::path::Path;
use std::process::{Command, Output};

use tandemd::config::DaemonConfig;

fn tandemd(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tandemd"));
    // A clean environment: no stray TANDEM_* variable from the machine running the tests.
    command.env_clear().args(args);
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("tandemd runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("tandemd.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn check_config_accepts_a_valid_file_and_summarises_what_will_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().display().to_string();
    let config = write_config(
        dir.path(),
        &format!(
            "device_id = \"robot-7\"\nmodel_dir = \"{model}\"\n[server]\nlisten = \"127.0.0.1:9100\"\n\
             [cloud.https]\nurl = \"https://cloud.example\"\nmodel = \"big\"\n"
        ),
    );
    let output = tandemd(&["check-config", "--config", &config], &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.starts_with("configuration OK\n"), "{text}");
    for expected in ["robot-7", &model, "127.0.0.1:9100", "https://cloud.example", "big"] {
        assert!(text.contains(expected), "missing {expected} in:\n{text}");
    }
}

#[test]
fn check_config_rejects_an_unknown_key_naming_it_and_the_file_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "[server]\nlisten = \"127.0.0.1:9100\"\nmax_qeue = 3\n");
    let output = tandemd(&["check-config", "--config", &config], &[]);
    assert_eq!(output.status.code(), Some(2));
    let text = stderr(&output);
    assert!(text.contains("server.max_qeue") && text.contains(&config), "{text}");
}

#[test]
fn an_unknown_environment_key_is_an_error_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let output = tandemd(
        &["check-config", "--model", &dir.path().display().to_string()],
        &[("TANDEM_SERVER__LISTN", "0.0.0.0:1")],
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("TANDEM_SERVER__LISTN"), "{}", stderr(&output));
}

#[test]
fn check_config_explains_a_missing_model_and_an_impossible_budget_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "[budget]\ncloud_fraction = 1.5\n");
    let output = tandemd(&["check-config", "--config", &config], &[]);
    assert_eq!(output.status.code(), Some(2));
    let text = stderr(&output);
    assert!(text.contains("--model") && text.contains("cloud_fraction"), "{text}");
    assert!(stdout(&output).is_empty());
}

#[test]
fn a_missing_config_file_given_with_config_is_exit_2() {
    let output = tandemd(&["check-config", "--config", "/nonexistent/tandemd.toml"], &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("/nonexistent/tandemd.toml"));
}

#[test]
fn print_config_shows_file_environment_and_flags_merged_as_parseable_toml() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "device_id = \"from-file\"\n[server]\nlisten = \"127.0.0.1:9100\"\nmax_queue = 3\n[budget]\ncloud_fraction = 0.1\n",
    );
    let output = tandemd(
        &[
            "print-config",
            "--config",
            &config,
            "--model",
            "/models/tiny",
            "--cloud-url",
            "http://127.0.0.1:8000",
        ],
        &[("TANDEM_SERVER__LISTEN", "0.0.0.0:9000"), ("TANDEM_BUDGET__CLOUD_FRACTION", "0.2")],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let printed: DaemonConfig =
        toml::from_str(&stdout(&output)).unwrap_or_else(|e| panic!("{e}\n{}", stdout(&output)));
    assert_eq!(printed.device_id, "from-file");
    assert_eq!(printed.server.listen.to_string(), "0.0.0.0:9000", "the environment overrides the file");
    assert_eq!(printed.server.max_queue, 3, "the file overrides the defaults");
    assert_eq!(printed.budget.cloud_fraction, 0.2);
    assert_eq!(printed.model_dir.as_deref(), Some(Path::new("/models/tiny")), "flags override everything");
    let https = printed.cloud.https.expect("--cloud-url enables HTTPS offload");
    assert_eq!((https.url.as_str(), https.model.as_str()), ("http://127.0.0.1:8000", "default"));
}

#[test]
fn serve_refuses_to_start_without_a_model_with_exit_2() {
    let output = tandemd(&["serve", "--listen", "127.0.0.1:0"], &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("--model"), "{}", stderr(&output));
}
