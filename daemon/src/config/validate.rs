//! Checks that a loaded configuration can run, with messages that say why it cannot and what to
//! change. Reads secrets, looks at paths and reads the model directory's metadata; never binds a
//! port or loads a model.

use std::fmt;

use tandem_core::protocol::Transport;

use super::{DaemonConfig, is_device_id_char};
use crate::bundle_trust::load_trusted_keys;
use crate::engine::tensorrt_profile::TrtProfile;
use crate::engine::{ModelDir, ProviderConfig};
use crate::offload::read_secret;
use crate::telemetry::TelemetryTransport;

/// Smallest `server.max_body_bytes` that fits a short chat request.
const MIN_BODY_BYTES: usize = 1024;

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The key at fault, e.g. `server.max_queue`.
    pub key: String,
    /// Why it cannot work and how to fix it.
    pub message: String,
}

/// Everything wrong with a configuration, found in one pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationError {
    /// At least one problem.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.problems.as_slice() {
            [one] => write!(f, "invalid configuration: `{}`: {}", one.key, one.message),
            many => {
                write!(f, "invalid configuration ({} problems):", many.len())?;
                for problem in many {
                    write!(f, "\n  - `{}`: {}", problem.key, problem.message)?;
                }
                Ok(())
            }
        }
    }
}

impl DaemonConfig {
    /// The configured model's context length, when its directory says (only the metadata is read).
    /// A directory that cannot be inspected is left for loading to report.
    fn model_context_length(&self) -> Option<usize> {
        let needed =
            self.engine.execution_providers.iter().any(|provider| {
                matches!(provider, ProviderConfig::TensorRt { profile_max_tokens: Some(_), .. })
            });
        if !needed {
            return None;
        }
        ModelDir::inspect(self.model_dir.as_deref()?).ok()?.context_length
    }

    /// Checks everything `tandemd serve` will rely on; lists every problem found.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let mut problems = Vec::new();
        let mut problem =
            |key: &str, message: String| problems.push(Problem { key: key.to_string(), message });

        if self.device_id.is_empty() || !self.device_id.chars().all(is_device_id_char) {
            problem(
                "device_id",
                format!(
                    "`{}` is not a usable device id: it appears in MQTT topics, so use only letters, digits, \
                     `.`, `_` and `-`",
                    self.device_id
                ),
            );
        }
        match &self.model_dir {
            None => problem(
                "model_dir",
                "no model is configured: pass `--model DIR`, set `model_dir = \"/path/to/model\"` in the \
                 configuration file, or set TANDEM_MODEL_DIR"
                    .to_string(),
            ),
            Some(dir) if !dir.exists() => problem(
                "model_dir",
                format!("{} does not exist; give the directory holding model.onnx", dir.display()),
            ),
            Some(dir) if !dir.is_dir() => problem(
                "model_dir",
                format!("{} is a file; give the directory holding model.onnx instead", dir.display()),
            ),
            Some(_) => {}
        }
        if let Err(error) = load_trusted_keys(&self.trusted_bundle_keys) {
            problem("trusted_bundle_keys", error.to_string());
        }

        let server = &self.server;
        if server.max_queue == 0 {
            problem(
                "server.max_queue",
                "0 would refuse every chat request; use at least 1 (the default is 16)".to_string(),
            );
        }
        if server.max_body_bytes < MIN_BODY_BYTES {
            problem(
                "server.max_body_bytes",
                format!(
                    "{} bytes is too small for a chat request; use at least {MIN_BODY_BYTES} (the default is \
                     1048576)",
                    server.max_body_bytes
                ),
            );
        }
        if server.request_timeout_secs == 0 {
            problem(
                "server.request_timeout_secs",
                "0 would time out every request; use at least 1 (the default is 300)".to_string(),
            );
        }
        if let Some(source) = &server.api_token
            && let Err(error) = read_secret(source)
        {
            problem("server.api_token", format!("{error}; without it no client could authenticate"));
        }

        if self.generation.max_tokens == 0 {
            problem(
                "generation.max_tokens",
                "0 would produce empty answers; use at least 1 (the default is 256)".to_string(),
            );
        }
        if let Some(t) = self.generation.temperature
            && !(t.is_finite() && t >= 0.0)
        {
            problem(
                "generation.temperature",
                format!("{t} is not a temperature; use a number >= 0, or remove it for greedy decoding"),
            );
        }
        if !self.router.help_bias.is_finite() {
            problem(
                "router.help_bias",
                "must be a finite number (0 keeps the trained behaviour)".to_string(),
            );
        }
        if let Err(error) = self.budget.validate() {
            problem("budget", error.to_string());
        }
        if self.engine.execution_providers.is_empty() {
            problem(
                "engine.execution_providers",
                "the list is empty; give at least `[{ kind = \"cpu\" }]`".to_string(),
            );
        }
        if let Err(error) = TrtProfile::of_engine(&self.engine, self.model_context_length()) {
            problem("engine.execution_providers", format!("the tensorrt profile does not fit: {error}"));
        }

        if self.mqtt.is_none() {
            if self.cloud.mqtt {
                problem(
                    "cloud.mqtt",
                    "offloading over MQTT needs the broker connection: add an `[mqtt]` section with \
                     `url = \"mqtts://broker:8883\"`, or set `cloud.mqtt = false`"
                        .to_string(),
                );
            }
            if self.telemetry.transport == TelemetryTransport::Mqtt {
                problem(
                    "telemetry.transport",
                    "telemetry over MQTT needs the broker connection: add an `[mqtt]` section with \
                     `url = \"mqtts://broker:8883\"`, or use `transport = { kind = \"https\", url = \"…\" }`"
                        .to_string(),
                );
            }
        }
        if let Some(mqtt) = &self.mqtt
            && !(mqtt.url.starts_with("mqtt://") || mqtt.url.starts_with("mqtts://"))
        {
            problem(
                "mqtt.url",
                format!(
                    "`{}` is not a broker address; write `mqtt://host:1883` or `mqtts://host:8883`",
                    mqtt.url
                ),
            );
        }
        if let Some(https) = &self.cloud.https {
            if !is_http_url(&https.url) {
                problem(
                    "cloud.https.url",
                    format!(
                        "`{}` is not an HTTP(S) URL; write the endpoint's base, e.g. `https://api.example.com`",
                        https.url
                    ),
                );
            }
            if https.model.trim().is_empty() {
                problem("cloud.https.model", "is empty; give the model name the endpoint serves".to_string());
            }
            if let Some(source) = &https.api_key
                && let Err(error) = read_secret(source)
            {
                problem("cloud.https.api_key", error.to_string());
            }
        }
        for transport in &self.cloud.order {
            let configured = match transport {
                Transport::Https => self.cloud.https.is_some(),
                Transport::Mqtt => self.cloud.mqtt,
            };
            if !configured {
                problem(
                    "cloud.order",
                    format!(
                        "lists {transport:?}, which is not configured; configure it (`cloud.https` or \
                         `cloud.mqtt = true`) or remove it from the list"
                    ),
                );
            }
        }
        if self.cloud.is_enabled() && self.cloud.attempts_per_transport == 0 {
            problem(
                "cloud.attempts_per_transport",
                "0 would never ask the cloud; use at least 1".to_string(),
            );
        }
        if let TelemetryTransport::Https { url } = &self.telemetry.transport
            && !is_http_url(url)
        {
            problem("telemetry.transport.url", format!("`{url}` is not an HTTP(S) URL"));
        }
        let updater = &self.updater;
        if updater.enabled {
            let mqtt = updater.mqtt && self.mqtt.is_some();
            if !mqtt && updater.poll_url.is_none() {
                problem(
                    "updater.enabled",
                    "the updater has no way to receive assignments: add an `[mqtt]` section (with                      `updater.mqtt = true`, the default) or set `updater.poll_url = \"https://fleet:8443\"`"
                        .to_string(),
                );
            }
            if self.trusted_bundle_keys.is_empty() {
                tracing::warn!(
                    "updater.enabled without trusted_bundle_keys: assigned bundles are checked against their                      manifests, but nobody vouches for the manifests"
                );
            }
        }
        if let Some(url) = &updater.poll_url
            && !is_http_url(url)
        {
            problem(
                "updater.poll_url",
                format!(
                    "`{url}` is not an HTTP(S) URL; write the fleet's base URL, e.g. `https://fleet:8443`"
                ),
            );
        }
        if updater.poll_interval_secs == 0 {
            problem(
                "updater.poll_interval_secs",
                "0 would poll without pause; use at least 1 (the default is 60)".to_string(),
            );
        }
        if let Some(source) = &updater.poll_token
            && let Err(error) = read_secret(source)
        {
            problem("updater.poll_token", format!("{error}; the fleet would refuse the polls"));
        }
        if let Some(path) = &updater.ca_file
            && let Err(error) = crate::offload::read_ca_file(path)
        {
            problem(
                "updater.ca_file",
                format!("{error}; polls and bundle downloads could not trust the fleet"),
            );
        }
        if updater.probe_prompt.trim().is_empty() {
            problem(
                "updater.probe_prompt",
                "an empty prompt cannot show that a model answers; write a short question".to_string(),
            );
        }
        if updater.probe_max_tokens == 0 {
            problem(
                "updater.probe_max_tokens",
                "the probe must generate at least 1 token (the default is 8)".to_string(),
            );
        }
        if updater.probe_timeout_secs == 0 {
            problem(
                "updater.probe_timeout_secs",
                "0 would fail every probe; use at least 1 (the default is 60)".to_string(),
            );
        }
        if updater.health_probe_interval_secs == 0 {
            problem(
                "updater.health_probe_interval_secs",
                "0 would probe without pause; use at least 1 (the default is 60)".to_string(),
            );
        }
        let probation = &updater.probation;
        for (key, value) in [
            ("updater.probation.max_unhealthy_starts", probation.max_unhealthy_starts),
            ("updater.probation.max_failed_probes", probation.max_failed_probes),
            ("updater.probation.probes_to_commit", probation.probes_to_commit),
            ("updater.probation.max_starts", probation.max_starts),
        ] {
            if value == 0 {
                problem(
                    key,
                    "0 would end probation before the new model was tried; use at least 1".to_string(),
                );
            }
        }
        if let Err(error) = tracing_subscriber::EnvFilter::try_new(&self.logging.level) {
            problem(
                "logging.level",
                format!(
                    "`{}` is not a log filter ({error}); use a level such as `info` or `warn,tandemd=debug`",
                    self.logging.level
                ),
            );
        }

        if problems.is_empty() { Ok(()) } else { Err(ValidationError { problems }) }
    }
}

fn is_http_url(url: &str) -> bool {
    ["http://", "https://"]
        .iter()
        .any(|scheme| url.len() > scheme.len() && url[..scheme.len()].eq_ignore_ascii_case(scheme))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::SecretSource;

    fn runnable() -> (tempfile::TempDir, DaemonConfig) {
        let dir = tempfile::tempdir().unwrap();
        let config = DaemonConfig { model_dir: Some(dir.path().to_path_buf()), ..DaemonConfig::default() };
        (dir, config)
    }

    fn keys(config: &DaemonConfig) -> Vec<String> {
        config.validate().err().map(|e| e.problems.into_iter().map(|p| p.key).collect()).unwrap_or_default()
    }

    #[test]
    fn an_updater_without_a_way_to_receive_assignments_is_explained() {
        let (_dir, mut config) = runnable();
        config.updater.enabled = true;
        assert_eq!(keys(&config), ["updater.enabled"]);
        config.updater.poll_url = Some("fleet:8443".into());
        config.updater.probation.probes_to_commit = 0;
        assert_eq!(keys(&config), ["updater.poll_url", "updater.probation.probes_to_commit"]);
        config.updater.poll_url = Some("https://fleet:8443".into());
        config.updater.probation.probes_to_commit = 1;
        config.validate().unwrap();
    }

    #[test]
    fn an_updater_ca_file_must_hold_a_pem_certificate() {
        let (dir, mut config) = runnable();
        let ca = dir.path().join("fleet-ca.pem");
        config.updater.ca_file = Some(ca.clone());
        let text = config.validate().unwrap_err().to_string();
        assert!(text.contains("updater.ca_file") && text.contains(&ca.display().to_string()), "{text}");
        std::fs::write(&ca, "not a certificate\n").unwrap();
        assert!(config.validate().unwrap_err().to_string().contains("no usable PEM certificate"));
    }

    #[test]
    fn the_defaults_plus_a_model_directory_are_valid() {
        let (_dir, config) = runnable();
        config.validate().unwrap();
    }

    #[test]
    fn a_missing_model_directory_says_how_to_give_one() {
        let text = DaemonConfig::default().validate().unwrap_err().to_string();
        assert!(text.contains("`model_dir`") && text.contains("--model"), "{text}");
        let config = DaemonConfig { model_dir: Some("/does/not/exist".into()), ..DaemonConfig::default() };
        assert!(config.validate().unwrap_err().to_string().contains("does not exist"));
    }

    #[test]
    fn mqtt_offload_or_telemetry_without_a_broker_is_explained() {
        let (_dir, mut config) = runnable();
        config.cloud.mqtt = true;
        config.telemetry.transport = TelemetryTransport::Mqtt;
        let error = config.validate().unwrap_err();
        assert_eq!(keys(&config), ["cloud.mqtt", "telemetry.transport"]);
        assert!(error.to_string().contains("[mqtt]"), "{error}");
    }

    #[test]
    fn an_impossible_budget_is_reported_with_the_policy_message() {
        let (_dir, mut config) = runnable();
        config.budget.cloud_fraction = 1.5;
        let text = config.validate().unwrap_err().to_string();
        assert!(text.contains("cloud_fraction") && text.contains("[0, 1)"), "{text}");
    }

    #[test]
    fn an_unreadable_api_token_file_is_reported() {
        let (dir, mut config) = runnable();
        let missing = dir.path().join("no-token");
        config.server.api_token = Some(SecretSource::File(missing.clone()));
        let text = config.validate().unwrap_err().to_string();
        assert!(text.contains("server.api_token") && text.contains(&missing.display().to_string()), "{text}");
    }

    #[test]
    fn every_problem_is_listed_at_once() {
        let mut config = DaemonConfig::default();
        config.server.max_queue = 0;
        config.generation.max_tokens = 0;
        config.device_id = "a b".into();
        config.logging.level = "info,=[".into();
        assert_eq!(
            keys(&config),
            ["device_id", "model_dir", "server.max_queue", "generation.max_tokens", "logging.level"]
        );
    }

    fn with_tensorrt_profile(config: &mut DaemonConfig, max: Option<usize>, opt: Option<usize>) {
        config.engine.execution_providers = vec![ProviderConfig::TensorRt {
            fp16: true,
            engine_cache_dir: None,
            device_id: 0,
            profile_max_tokens: max,
            profile_opt_tokens: opt,
        }];
    }

    #[test]
    fn a_tensorrt_profile_whose_opt_length_exceeds_its_longest_is_refused() {
        let (_dir, mut config) = runnable();
        with_tensorrt_profile(&mut config, Some(512), Some(1024));
        let text = config.validate().unwrap_err().to_string();
        assert_eq!(keys(&config), ["engine.execution_providers"]);
        assert!(text.contains("1024") && text.contains("512"), "{text}");
        with_tensorrt_profile(&mut config, None, Some(256));
        assert!(config.validate().unwrap_err().to_string().contains("without profile_max_tokens"));
        with_tensorrt_profile(&mut config, Some(2048), Some(512));
        config.validate().unwrap();
    }

    #[test]
    fn a_tensorrt_profile_beyond_the_models_context_is_refused_when_the_model_says_it() {
        let (dir, mut config) = runnable();
        with_tensorrt_profile(&mut config, Some(4096), None);
        config.validate().unwrap();
        std::fs::write(dir.path().join("model.onnx"), b"graph").unwrap();
        std::fs::write(dir.path().join("config.json"), br#"{"max_position_embeddings": 2048}"#).unwrap();
        let text = config.validate().unwrap_err().to_string();
        assert!(text.contains("4096") && text.contains("context length of 2048"), "{text}");
        with_tensorrt_profile(&mut config, Some(2048), None);
        config.validate().unwrap();
    }

    #[test]
    fn cloud_urls_must_be_http() {
        let (_dir, mut config) = runnable();
        config.cloud.https = Some(
            serde_json::from_value(serde_json::json!({"url": "ftp://x", "model": "m"}))
                .expect("https config"),
        );
        assert_eq!(keys(&config), ["cloud.https.url"]);
    }
}
