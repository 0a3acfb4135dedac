//! The decoder's configuration, read from a Hugging Face `config.json` in either the classic form
//! or the transformers-5 form (`rope_parameters`, `dtype`, `sliding_window: null`).

use serde::{Deserialize, Serialize};

/// Errors reading a `config.json`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config.json is not valid JSON or misses a required field: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("config.json: model_type {0:?} is not supported; Tandem runs the qwen2 and llama families")]
    UnsupportedFamily(String),
    #[error("config.json: {0} is not supported by Tandem's decoder")]
    Unsupported(String),
    #[error("config.json: {0}")]
    Invalid(String),
}

/// The model families one decoder implementation covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFamily {
    /// Qwen2/Qwen2.5: bias on q/k/v, none on o.
    Qwen2,
    /// Llama 2/3 style: no biases unless `attention_bias`.
    Llama,
}

impl ModelFamily {
    /// The Hugging Face `model_type` string.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelFamily::Qwen2 => "qwen2",
            ModelFamily::Llama => "llama",
        }
    }
}

/// Decoder hyper-parameters, in Hugging Face naming.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelConfig {
    pub model_type: ModelFamily,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// Llama only: bias on q/k/v/o.
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// `config.json` as found on disk: a superset of both generations of the format.
#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: usize,
    rope_theta: Option<f64>,
    rope_parameters: Option<serde_json::Value>,
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_rms_norm_eps")]
    rms_norm_eps: f64,
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    use_sliding_window: bool,
    hidden_act: Option<String>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

impl ModelConfig {
    /// Parses a Hugging Face `config.json` (classic or transformers-5 form).
    pub fn from_hf_json(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_json::from_str(text)?;
        let model_type = match raw.model_type.as_str() {
            "qwen2" => ModelFamily::Qwen2,
            "llama" => ModelFamily::Llama,
            other => return Err(ConfigError::UnsupportedFamily(other.to_string())),
        };
        if raw.mlp_bias {
            return Err(ConfigError::Unsupported("mlp_bias = true".into()));
        }
        if raw.use_sliding_window {
            return Err(ConfigError::Unsupported("use_sliding_window = true".into()));
        }
        if let Some(act) = raw.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(ConfigError::Unsupported(format!("hidden_act = {act:?} (only silu)")));
        }
        let rope_parameters = raw.rope_parameters.as_ref().filter(|v| !v.is_null());
        for scaling in [raw.rope_scaling.as_ref(), rope_parameters].into_iter().flatten() {
            let kind = scaling.get("rope_type").or_else(|| scaling.get("type")).and_then(|t| t.as_str());
            if let Some(kind) = kind.filter(|k| *k != "default") {
                return Err(ConfigError::Unsupported(format!("rope scaling {kind:?}")));
            }
        }
        let rope_theta = raw
            .rope_theta
            .or_else(|| rope_parameters.and_then(|p| p.get("rope_theta")).and_then(|t| t.as_f64()))
            .unwrap_or(10_000.0);
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1));
        // Both families' transformers configs default to an untied head.
        let tie_word_embeddings = raw.tie_word_embeddings.unwrap_or(false);
        let eos_token_ids = match raw.eos_token_id {
            None => vec![],
            Some(OneOrMany::One(id)) => vec![id],
            Some(OneOrMany::Many(ids)) => ids,
        };
        let config = Self {
            model_type,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: raw.max_position_embeddings,
            rope_theta,
            rms_norm_eps: raw.rms_norm_eps,
            tie_word_embeddings,
            attention_bias: raw.attention_bias,
            bos_token_id: raw.bos_token_id,
            eos_token_ids,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the dimensions fit together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return bad("attention head counts must be positive".into());
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return bad(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim ({}) must be even for rotary embeddings", self.head_dim));
        }
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_hidden_layers == 0 {
            return bad("vocab_size, hidden_size and num_hidden_layers must be positive".into());
        }
        Ok(())
    }

    /// Whether q/k/v projections carry a bias.
    pub fn qkv_bias(&self) -> bool {
        match self.model_type {
            ModelFamily::Qwen2 => true,
            ModelFamily::Llama => self.attention_bias,
        }
    }

    /// Whether the output projection of attention carries a bias.
    pub fn o_bias(&self) -> bool {
        match self.model_type {
            ModelFamily::Qwen2 => false,
            ModelFamily::Llama => self.attention_bias,
        }
    }

    /// The classic-form `config.json` Tandem writes next to saved weights.
    pub fn to_hf_json(&self) -> String {
        let mut v = serde_json::json!({
            "architectures": [match self.model_type {
                ModelFamily::Qwen2 => "Qwen2ForCausalLM",
                ModelFamily::Llama => "LlamaForCausalLM",
            }],
            "model_type": self.model_type.as_str(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        if self.model_type == ModelFamily::Llama {
            v["attention_bias"] = self.attention_bias.into();
            v["mlp_bias"] = false.into();
        } else {
            v["use_sliding_window"] = false.into();
            v["sliding_window"] = self.max_position_embeddings.into();
        }
        if let Some(bos) = self.bos_token_id {
            v["bos_token_id"] = bos.into();
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => v["eos_token_id"] = (*one).into(),
            many => v["eos_token_id"] = many.into(),
        }
        serde_json::to_string_pretty(&v).expect("config serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLASSIC_QWEN2: &str = r#"{
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
        "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "tie_word_embeddings": true,
        "sliding_window": 32768, "use_sliding_window": false, "hidden_act": "silu",
        "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151643}"#;

    const TRANSFORMERS5_LLAMA: &str = r#"{
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": null,
        "max_position_embeddings": 512, "dtype": "float32",
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
        "sliding_window": null, "eos_token_id": [2, 3], "tie_word_embeddings": false}"#;

    #[test]
    fn classic_qwen2_config_parses_with_its_rope_theta() {
        let c = ModelConfig::from_hf_json(CLASSIC_QWEN2).unwrap();
        assert_eq!(c.model_type, ModelFamily::Qwen2);
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.rope_theta, 1_000_000.0);
        assert!(c.tie_word_embeddings && c.qkv_bias() && !c.o_bias());
        assert_eq!(c.eos_token_ids, vec![151643]);
    }

    #[test]
    fn transformers5_config_takes_rope_theta_from_rope_parameters() {
        let c = ModelConfig::from_hf_json(TRANSFORMERS5_LLAMA).unwrap();
        assert_eq!(c.rope_theta, 500_000.0, "must not silently fall back to 10000");
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.eos_token_ids, vec![2, 3]);
        assert!(!c.qkv_bias());
    }

    #[test]
    fn written_config_parses_back_to_the_same_config() {
        let c = ModelConfig::from_hf_json(TRANSFORMERS5_LLAMA).unwrap();
        assert_eq!(ModelConfig::from_hf_json(&c.to_hf_json()).unwrap(), c);
    }

    #[test]
    fn scaled_rope_is_refused_rather_than_silently_ignored() {
        let text = CLASSIC_QWEN2.replace(
            r#""rope_theta": 1000000.0"#,
            r#""rope_theta": 1000000.0, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}"#,
        );
        let err = ModelConfig::from_hf_json(&text).unwrap_err();
        assert!(err.to_string().contains("yarn"), "{err}");
    }

    #[test]
    fn other_families_are_refused_by_name() {
        let err = ModelConfig::from_hf_json(&CLASSIC_QWEN2.replace("\"qwen2\"", "\"mistral\"")).unwrap_err();
        assert!(err.to_string().contains("mistral"), "{err}");
    }
}
