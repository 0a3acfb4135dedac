//! `EngineConfig`: how the engine finds ONNX Runtime, which execution providers it asks for, and how
//! many threads it may use. Plain data; nothing here touches ONNX Runtime.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::error::EngineError;

/// Settings of the ONNX Runtime inference engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// Path of `libonnxruntime.so`. When unset, `ORT_DYLIB_PATH` is used, then `libonnxruntime.so` next to
    /// the tandemd executable.
    #[serde(default)]
    pub ort_library: Option<PathBuf>,
    /// Execution providers in order of preference, for example `[{ kind = "tensorrt" }, { kind = "cuda" },
    /// { kind = "cpu" }]`. The first one that registers runs the model; CPU is always the last resort.
    #[serde(default = "default_execution_providers")]
    pub execution_providers: Vec<ProviderConfig>,
    /// Fail instead of falling back when a requested GPU provider cannot be used.
    #[serde(default)]
    pub strict_providers: bool,
    /// Threads inside one operator (0 lets ONNX Runtime pick, usually one per core). Set it to the cores
    /// tandemd may use when other work shares the CPU.
    #[serde(default)]
    pub intra_threads: usize,
    /// Threads running independent operators in parallel; 1 keeps execution sequential.
    #[serde(default = "default_inter_threads")]
    pub inter_threads: usize,
    /// Let idle ONNX Runtime worker threads spin-wait. Faster on a dedicated CPU, much slower when the
    /// CPU is shared with other work (a Jetson also running vision), so off by default.
    #[serde(default)]
    pub allow_spinning: bool,
    /// Graph optimisations ONNX Runtime applies when it loads the model.
    #[serde(default)]
    pub optimization_level: OptimizationLevel,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            ort_library: None,
            execution_providers: default_execution_providers(),
            strict_providers: false,
            intra_threads: 0,
            inter_threads: default_inter_threads(),
            allow_spinning: false,
            optimization_level: OptimizationLevel::default(),
        }
    }
}

fn default_execution_providers() -> Vec<ProviderConfig> {
    vec![ProviderConfig::Cpu {}]
}

const fn default_inter_threads() -> usize {
    1
}

/// How much ONNX Runtime rewrites the graph before running it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizationLevel {
    /// No rewrites.
    Disable,
    /// Constant folding and redundant-node removal.
    Basic,
    /// Basic plus operator fusions.
    Extended,
    /// Everything, including layout optimisations.
    #[default]
    All,
}

/// One execution provider and its options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ProviderConfig {
    /// NVIDIA TensorRT (needs a GPU build of ONNX Runtime and the TensorRT libraries).
    #[serde(rename = "tensorrt")]
    TensorRt {
        /// Build fp16 engines (much faster on Jetson; the model's outputs change slightly).
        #[serde(default = "default_true")]
        fp16: bool,
        /// Where built TensorRT engines and the timing cache are kept. Building takes minutes on a
        /// Jetson, so set this to a persistent directory; without it every start rebuilds.
        #[serde(default)]
        engine_cache_dir: Option<PathBuf>,
        /// CUDA device index.
        #[serde(default)]
        device_id: i32,
        /// Longest sequence (prompt plus generated tokens) the engine is built for, at most the
        /// model's context length. Set, TensorRT builds one engine with an explicit optimisation
        /// profile covering every length from one token up to this, and longer requests are refused
        /// as over the context; unset, ONNX Runtime widens an implicit profile as requests grow and
        /// rebuilds the engine each time (`tandemd prepare` then builds ahead).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        profile_max_tokens: Option<usize>,
        /// Context length the explicit profile's kernels are tuned for (decoding at this length is
        /// fastest): between 1 and `profile_max_tokens`, which it needs. Default: 512, or
        /// `profile_max_tokens` when that is smaller.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        profile_opt_tokens: Option<usize>,
    },
    /// NVIDIA CUDA (needs a GPU build of ONNX Runtime, CUDA and cuDNN).
    Cuda {
        /// CUDA device index.
        #[serde(default)]
        device_id: i32,
    },
    /// The CPU provider; always available.
    Cpu {},
}

const fn default_true() -> bool {
    true
}

/// The provider names `ProviderConfig` accepts, in the order they are usually preferred.
pub const KNOWN_PROVIDERS: [&str; 3] = ["tensorrt", "cuda", "cpu"];

impl ProviderConfig {
    /// The provider's name as written in configs and on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            ProviderConfig::TensorRt { .. } => "tensorrt",
            ProviderConfig::Cuda { .. } => "cuda",
            ProviderConfig::Cpu {} => "cpu",
        }
    }

    /// Parses a comma-separated list such as `tensorrt,cuda,cpu` into providers with default options.
    pub fn parse_list(list: &str) -> Result<Vec<ProviderConfig>, EngineError> {
        let providers = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::parse)
            .collect::<Result<Vec<_>, _>>()?;
        if providers.is_empty() {
            return Err(EngineError::Config(format!(
                "the provider list is empty; give one or more of {}",
                KNOWN_PROVIDERS.join(", ")
            )));
        }
        Ok(providers)
    }
}

impl FromStr for ProviderConfig {
    type Err = EngineError;

    /// One provider name with default options.
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name.trim().to_ascii_lowercase().as_str() {
            "tensorrt" | "trt" => Ok(ProviderConfig::TensorRt {
                fp16: true,
                engine_cache_dir: None,
                device_id: 0,
                profile_max_tokens: None,
                profile_opt_tokens: None,
            }),
            "cuda" => Ok(ProviderConfig::Cuda { device_id: 0 }),
            "cpu" => Ok(ProviderConfig::Cpu {}),
            other => Err(EngineError::Config(format!(
                "unknown execution provider `{other}`; known providers: {}",
                KNOWN_PROVIDERS.join(", ")
            ))),
        }
    }
}

impl fmt::Display for ProviderConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_config_means_cpu_with_default_threads() {
        let config: EngineConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(config, EngineConfig::default());
        assert_eq!(config.execution_providers, vec![ProviderConfig::Cpu {}]);
        assert_eq!(config.inter_threads, 1);
        assert!(!config.allow_spinning && !config.strict_providers);
    }

    #[test]
    fn providers_parse_with_their_options_and_defaults() {
        let config: EngineConfig = serde_json::from_str(
            r#"{"execution_providers": [
                {"kind": "tensorrt", "engine_cache_dir": "/var/cache/tandem/trt"},
                {"kind": "cuda", "device_id": 1},
                {"kind": "cpu"}],
              "strict_providers": true, "intra_threads": 2, "optimization_level": "basic"}"#,
        )
        .unwrap();
        assert_eq!(
            config.execution_providers,
            vec![
                ProviderConfig::TensorRt {
                    fp16: true,
                    engine_cache_dir: Some("/var/cache/tandem/trt".into()),
                    device_id: 0,
                    profile_max_tokens: None,
                    profile_opt_tokens: None,
                },
                ProviderConfig::Cuda { device_id: 1 },
                ProviderConfig::Cpu {},
            ]
        );
        assert!(config.strict_providers);
        assert_eq!(config.optimization_level, OptimizationLevel::Basic);
    }

    #[test]
    fn a_tensorrt_profile_is_read_from_its_provider_entry() {
        let config: EngineConfig = toml::from_str(
            r#"execution_providers = [
                { kind = "tensorrt", profile_max_tokens = 2048, profile_opt_tokens = 512 },
            ]"#,
        )
        .unwrap();
        assert!(matches!(
            config.execution_providers.as_slice(),
            [ProviderConfig::TensorRt { profile_max_tokens: Some(2048), profile_opt_tokens: Some(512), .. }]
        ));
        let err = toml::from_str::<EngineConfig>(
            r#"execution_providers = [{ kind = "tensorrt", profile_min_token = 1 }]"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("profile_min_token"), "{err}");
    }

    #[test]
    fn an_unknown_provider_is_an_error_listing_the_known_ones() {
        let err = serde_json::from_str::<EngineConfig>(r#"{"execution_providers": [{"kind": "tpu"}]}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("tpu"), "{err}");
        for known in KNOWN_PROVIDERS {
            assert!(err.contains(known), "{err}");
        }
    }

    #[test]
    fn a_misspelt_key_is_an_error_not_silence() {
        let err = serde_json::from_str::<EngineConfig>(r#"{"intra_thread": 2}"#).unwrap_err().to_string();
        assert!(err.contains("intra_thread"), "{err}");
        let err = serde_json::from_str::<EngineConfig>(
            r#"{"execution_providers": [{"kind": "cuda", "device": 1}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("device"), "{err}");
    }

    #[test]
    fn config_round_trips_through_json() {
        let config = EngineConfig {
            execution_providers: ProviderConfig::parse_list("tensorrt,cuda,cpu").unwrap(),
            ..EngineConfig::default()
        };
        let text = serde_json::to_string(&config).unwrap();
        assert_eq!(serde_json::from_str::<EngineConfig>(&text).unwrap(), config);
    }

    #[test]
    fn a_provider_list_parses_in_order() {
        let list = ProviderConfig::parse_list("tensorrt, CUDA,cpu").unwrap();
        assert_eq!(list.iter().map(ProviderConfig::name).collect::<Vec<_>>(), KNOWN_PROVIDERS);
    }

    #[test]
    fn a_provider_list_with_an_unknown_name_says_which_and_lists_the_known_ones() {
        let err = ProviderConfig::parse_list("cuda,rocm").unwrap_err().to_string();
        assert!(err.contains("`rocm`") && err.contains("tensorrt, cuda, cpu"), "{err}");
        assert!(ProviderConfig::parse_list(" , ").is_err());
    }
}
