//! Loading the configuration in layers, each overriding the one before:
//! built-in defaults → one TOML file → `TANDEM_*` environment variables → command-line flags.
//!
//! Loading is plain data: it reads the file and the environment and nothing else. A misspelt key
//! anywhere is an error that names the key and where it was set, never silence.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use config::{Config, Environment, File, FileFormat, Value};

use super::DaemonConfig;
use crate::offload::HttpsCloudConfig;

/// The file read when `--config` is not given (skipped when it does not exist).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/tandem/tandemd.toml";

/// Environment variables starting with this set configuration keys, with `__` between nesting
/// levels: `TANDEM_SERVER__LISTEN=0.0.0.0:9000` sets `server.listen`.
pub const ENV_PREFIX: &str = "TANDEM_";

/// Separates nesting levels in environment variable names.
const ENV_SEPARATOR: &str = "__";

/// Model name sent to a cloud given only by `--cloud-url`.
const CLOUD_URL_DEFAULT_MODEL: &str = "default";

/// Which configuration file to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigFile {
    /// None: defaults, environment and flags only.
    None,
    /// Read when it exists, else skipped (the default path).
    IfExists(PathBuf),
    /// Must exist (`--config FILE`).
    Required(PathBuf),
}

/// Settings given as command-line flags, the last layer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CliOverrides {
    /// `--model DIR`: sets `model_dir`.
    pub model_dir: Option<PathBuf>,
    /// `--listen ADDR`: sets `server.listen`.
    pub listen: Option<SocketAddr>,
    /// `--cloud-url URL`: sets `cloud.https.url`, creating `cloud.https` with `model = "default"`
    /// when the other layers configure none (an existing section keeps its model and API key).
    pub cloud_url: Option<String>,
}

/// Everything a configuration is loaded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSources {
    /// The TOML file.
    pub file: ConfigFile,
    /// `TANDEM_*` environment variables (others are ignored).
    pub env: Vec<(String, String)>,
    /// Command-line flags.
    pub overrides: CliOverrides,
}

impl ConfigSources {
    /// What the `tandemd` process reads: `config_file` (which must exist) or else
    /// [`DEFAULT_CONFIG_PATH`] when it exists, this process's `TANDEM_*` variables, and `overrides`.
    pub fn from_process(config_file: Option<PathBuf>, overrides: CliOverrides) -> Result<Self, ConfigError> {
        let file = match config_file {
            Some(path) => ConfigFile::Required(path),
            None => ConfigFile::IfExists(PathBuf::from(DEFAULT_CONFIG_PATH)),
        };
        let mut env = Vec::new();
        for (name, value) in std::env::vars_os() {
            let Some(name) = name.to_str().filter(|name| name.starts_with(ENV_PREFIX)) else {
                continue;
            };
            let value = value.into_string().map_err(|_| ConfigError::NonUnicodeEnv(name.to_string()))?;
            env.push((name.to_string(), value));
        }
        Ok(Self { file, env, overrides })
    }
}

/// Where a configuration value was set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigOrigin {
    /// In this TOML file.
    File(PathBuf),
    /// By this environment variable.
    Env(String),
    /// Could not be traced to one layer.
    Unknown,
}

impl fmt::Display for ConfigOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigOrigin::File(path) => write!(f, "{}", path.display()),
            ConfigOrigin::Env(name) => write!(f, "the environment variable {name}"),
            ConfigOrigin::Unknown => f.write_str("the configuration"),
        }
    }
}

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("the configuration file {} does not exist", .0.display())]
    FileNotFound(PathBuf),
    #[error("cannot read the configuration file {}: {source}", path.display())]
    FileUnreadable { path: PathBuf, source: std::io::Error },
    #[error("the configuration file {} is not valid TOML: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    #[error("unknown key `{key}` in {origin}; {expected}")]
    UnknownKey { key: String, origin: ConfigOrigin, expected: String },
    #[error("missing key `{key}` in {origin}")]
    MissingKey { key: String, origin: ConfigOrigin },
    #[error("invalid value for `{key}` in {origin}: {message}")]
    InvalidValue { key: String, origin: ConfigOrigin, message: String },
    #[error("invalid configuration: {0}")]
    Other(String),
    #[error("the environment variable {0} is not valid UTF-8")]
    NonUnicodeEnv(String),
}

/// Loads the configuration from `sources`. Only the file and the given variables are read.
pub fn load(sources: &ConfigSources) -> Result<DaemonConfig, ConfigError> {
    let file = match &sources.file {
        ConfigFile::None => None,
        ConfigFile::IfExists(path) => path.exists().then(|| path.clone()),
        ConfigFile::Required(path) if !path.exists() => return Err(ConfigError::FileNotFound(path.clone())),
        ConfigFile::Required(path) => Some(path.clone()),
    };
    // The file on its own too: errors say which layer set the key at fault.
    let file_layer = match &file {
        Some(path) => {
            let values = Config::builder().add_source(toml_file(path)?).build().map_err(|e| match e {
                config::ConfigError::FileParse { cause, .. } => {
                    ConfigError::Syntax { path: path.clone(), message: cause.to_string() }
                }
                other => ConfigError::Other(other.to_string()),
            })?;
            Some(Layer { path: path.clone(), values })
        }
        None => None,
    };
    let mut builder = Config::builder();
    if let Some(path) = &file {
        builder = builder.add_source(toml_file(path)?);
    }
    let env: config::Map<String, String> = sources.env.iter().cloned().collect();
    builder = builder.add_source(
        Environment::with_prefix(ENV_PREFIX.trim_end_matches('_'))
            .prefix_separator("_")
            .separator(ENV_SEPARATOR)
            .ignore_empty(true)
            .source(Some(env)),
    );
    let merged = builder.build().map_err(|e| ConfigError::Other(e.to_string()))?;
    let mut config: DaemonConfig =
        merged.try_deserialize().map_err(|e| explain(e, file_layer.as_ref(), &sources.env))?;
    apply_overrides(&mut config, &sources.overrides)?;
    Ok(config)
}

/// The values of one configuration file.
struct Layer {
    path: PathBuf,
    values: Config,
}

/// A TOML file source, after checking it can be read so that the error says why.
fn toml_file(path: &Path) -> Result<File<config::FileSourceFile, FileFormat>, ConfigError> {
    std::fs::File::open(path)
        .map_err(|source| ConfigError::FileUnreadable { path: path.to_path_buf(), source })?;
    Ok(File::from(path).format(FileFormat::Toml).required(true))
}

fn apply_overrides(config: &mut DaemonConfig, overrides: &CliOverrides) -> Result<(), ConfigError> {
    if let Some(dir) = &overrides.model_dir {
        config.model_dir = Some(dir.clone());
    }
    if let Some(listen) = overrides.listen {
        config.server.listen = listen;
    }
    if let Some(url) = &overrides.cloud_url {
        match &mut config.cloud.https {
            Some(https) => https.url.clone_from(url),
            None => {
                let https: HttpsCloudConfig = serde_json::from_value(serde_json::json!({
                    "url": url,
                    "model": CLOUD_URL_DEFAULT_MODEL,
                }))
                .map_err(|e| ConfigError::Other(format!("--cloud-url: {e}")))?;
                config.cloud.https = Some(https);
            }
        }
    }
    Ok(())
}

/// Turns the `config` crate's deserialisation error into one that names the key and its origin.
fn explain(error: config::ConfigError, file: Option<&Layer>, env: &[(String, String)]) -> ConfigError {
    let origin = |key: &str| origin_of(key, file, env);
    match error {
        config::ConfigError::At { error, key, .. } => {
            let message = error.to_string();
            match (unknown_field(&message), key) {
                (Some((field, expected)), Some(parent)) => {
                    let key = format!("{parent}.{field}");
                    ConfigError::UnknownKey { origin: origin(&key), key, expected }
                }
                (Some((field, expected)), None) => {
                    ConfigError::UnknownKey { origin: origin(&field), key: field, expected }
                }
                (None, Some(key)) => ConfigError::InvalidValue { origin: origin(&key), key, message },
                (None, None) => ConfigError::Other(message),
            }
        }
        config::ConfigError::Message(message) => match unknown_field(&message) {
            Some((field, expected)) => {
                ConfigError::UnknownKey { origin: origin(&field), key: field, expected }
            }
            None => ConfigError::Other(message),
        },
        config::ConfigError::Type { unexpected, expected, key: Some(key), .. } => ConfigError::InvalidValue {
            origin: origin(&key),
            message: format!("got {unexpected}, expected {expected}"),
            key,
        },
        config::ConfigError::NotFound(key) => {
            let parent = key.rsplit_once('.').map_or("", |(parent, _)| parent);
            ConfigError::MissingKey { origin: origin(parent), key }
        }
        other => ConfigError::Other(other.to_string()),
    }
}

/// `(field, "expected …")` from serde's "unknown field `x`, expected …" message.
fn unknown_field(message: &str) -> Option<(String, String)> {
    let rest = message.split_once("unknown field `")?.1;
    let (field, rest) = rest.split_once('`')?;
    let expected = rest.trim_start_matches(',').trim();
    let expected =
        if expected.is_empty() { "no keys are allowed here".to_string() } else { expected.to_string() };
    Some((field.to_string(), expected))
}

/// Which layer set `key` (or something under it): the environment, which is applied last, or the file.
fn origin_of(key: &str, file: Option<&Layer>, env: &[(String, String)]) -> ConfigOrigin {
    if let Some(name) = env_var_for(key, env) {
        return ConfigOrigin::Env(name);
    }
    match file {
        Some(layer) if key.is_empty() || layer.values.get::<Value>(key).is_ok() => {
            ConfigOrigin::File(layer.path.clone())
        }
        _ => ConfigOrigin::Unknown,
    }
}

/// The environment variable that set `key`, or one under it.
fn env_var_for(key: &str, env: &[(String, String)]) -> Option<String> {
    env.iter()
        .map(|(name, _)| name)
        .filter(|name| name.starts_with(ENV_PREFIX))
        .find(|name| {
            let path = name[ENV_PREFIX.len()..].to_lowercase().replace(ENV_SEPARATOR, ".");
            path == key || path.starts_with(&format!("{key}."))
        })
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(file: Option<&Path>, env: &[(&str, &str)]) -> ConfigSources {
        ConfigSources {
            file: file.map_or(ConfigFile::None, |p| ConfigFile::Required(p.to_path_buf())),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            overrides: CliOverrides::default(),
        }
    }

    fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let path = dir.path().join("tandemd.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn nothing_at_all_gives_the_defaults() {
        assert_eq!(load(&sources(None, &[])).unwrap(), DaemonConfig::default());
    }

    #[test]
    fn environment_variables_override_the_file_with_double_underscore_nesting() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "device_id = \"robot-1\"\n[server]\nlisten = \"127.0.0.1:7000\"\nmax_queue = 4\n\
             [budget]\ncloud_fraction = 0.1\n",
        );
        let config = load(&sources(
            Some(&path),
            &[
                ("TANDEM_SERVER__LISTEN", "0.0.0.0:9000"),
                ("TANDEM_BUDGET__CLOUD_FRACTION", "0.2"),
                ("TANDEM_BUDGET__MAX_CALLS_PER_HOUR", "12"),
                ("TANDEM_ROUTER__INCLUDE_LOCAL_ATTEMPT_IN_ANSWER", "true"),
                ("TANDEM_DEVICE_ID", "0042"),
            ],
        ))
        .unwrap();
        assert_eq!(config.server.listen.to_string(), "0.0.0.0:9000");
        assert_eq!(config.server.max_queue, 4);
        assert_eq!(config.budget.cloud_fraction, 0.2);
        assert_eq!(config.budget.max_calls_per_hour, Some(12));
        assert!(config.router.include_local_attempt_in_answer);
        assert_eq!(config.device_id, "0042");
    }

    #[test]
    fn command_line_flags_override_everything_and_cloud_url_enables_https_offload() {
        let mut sources = sources(None, &[("TANDEM_SERVER__LISTEN", "0.0.0.0:9000")]);
        sources.overrides = CliOverrides {
            model_dir: Some("/models/tiny".into()),
            listen: Some("127.0.0.1:1234".parse().unwrap()),
            cloud_url: Some("http://127.0.0.1:8000".into()),
        };
        let config = load(&sources).unwrap();
        assert_eq!(config.model_dir, Some(PathBuf::from("/models/tiny")));
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:1234");
        let https = config.cloud.https.expect("https offload");
        assert_eq!((https.url.as_str(), https.model.as_str()), ("http://127.0.0.1:8000", "default"));
    }

    #[test]
    fn cloud_url_keeps_the_configured_model_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path =
            write(&dir, "[cloud.https]\nurl = \"https://a\"\nmodel = \"big\"\napi_key = { env = \"K\" }\n");
        let mut sources = sources(Some(&path), &[]);
        sources.overrides.cloud_url = Some("https://b".into());
        let https = load(&sources).unwrap().cloud.https.unwrap();
        assert_eq!((https.url.as_str(), https.model.as_str()), ("https://b", "big"));
        assert!(https.api_key.is_some());
    }

    #[test]
    fn an_unknown_key_in_the_file_names_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "[server]\nlisten = \"127.0.0.1:7000\"\nmax_qeue = 4\n");
        let err = load(&sources(Some(&path), &[])).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ConfigError::UnknownKey { .. }), "{text}");
        assert!(text.contains("`server.max_qeue`"), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("max_queue"), "the valid keys are listed: {text}");
    }

    #[test]
    fn an_unknown_top_level_key_names_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "modle_dir = \"/x\"\n");
        let text = load(&sources(Some(&path), &[])).unwrap_err().to_string();
        assert!(text.contains("`modle_dir`") && text.contains(&path.display().to_string()), "{text}");
    }

    #[test]
    fn an_unknown_key_in_the_environment_names_the_variable() {
        let text = load(&sources(None, &[("TANDEM_SERVER__LISTN", "0.0.0.0:1")])).unwrap_err().to_string();
        assert!(text.contains("`server.listn`"), "{text}");
        assert!(text.contains("TANDEM_SERVER__LISTN"), "{text}");
    }

    #[test]
    fn an_invalid_value_names_the_key_and_where_it_was_set() {
        let text = load(&sources(None, &[("TANDEM_SERVER__LISTEN", "nonsense")])).unwrap_err().to_string();
        assert!(text.contains("`server.listen`") && text.contains("TANDEM_SERVER__LISTEN"), "{text}");
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "[server]\nmax_queue = \"many\"\n");
        let text = load(&sources(Some(&path), &[])).unwrap_err().to_string();
        assert!(text.contains("`server.max_queue`") && text.contains(&path.display().to_string()), "{text}");
    }

    #[test]
    fn a_missing_required_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "[cloud.https]\nurl = \"https://a\"\n");
        let text = load(&sources(Some(&path), &[])).unwrap_err().to_string();
        assert!(text.contains("cloud.https.model"), "{text}");
    }

    #[test]
    fn a_syntax_error_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "[server\n");
        let err = load(&sources(Some(&path), &[])).unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn a_missing_config_file_is_an_error_only_when_it_was_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        let err = load(&sources(Some(&missing), &[])).unwrap_err();
        assert!(matches!(err, ConfigError::FileNotFound(_)), "{err}");
        let optional = ConfigSources { file: ConfigFile::IfExists(missing), ..sources(None, &[]) };
        assert_eq!(load(&optional).unwrap(), DaemonConfig::default());
    }

    #[test]
    fn nested_sections_owned_elsewhere_are_loaded_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "[engine]\nexecution_providers = [{ kind = \"cuda\", device_id = 1 }, { kind = \"cpu\" }]\n\
             [mqtt]\nurl = \"mqtt://broker:1883\"\n[telemetry]\ntransport = { kind = \"mqtt\" }\n\
             [server]\napi_token = { file = \"/etc/tandem/token\" }\n",
        );
        let config = load(&sources(Some(&path), &[])).unwrap();
        assert_eq!(config.engine.execution_providers.len(), 2);
        assert_eq!(config.mqtt.unwrap().url, "mqtt://broker:1883");
        assert_eq!(config.telemetry.transport, crate::telemetry::TelemetryTransport::Mqtt);
        assert!(config.server.api_token.is_some());

        let path = write(&dir, "[engine]\nexecution_providers = [{ kind = \"cuda\", device = 1 }]\n");
        let text = load(&sources(Some(&path), &[])).unwrap_err().to_string();
        assert!(text.contains("device") && text.contains(&path.display().to_string()), "{text}");
    }
}
