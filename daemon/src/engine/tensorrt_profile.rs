//! The TensorRT optimisation profile: the range of sequence lengths one engine accepts, and the
//! `trt_profile_{min,opt,max}_shapes` strings that give ONNX Runtime that range input by input.
//!
//! A decoder with a KV cache has three dynamic sequence dimensions: the new tokens (`input_ids`,
//! `position_ids`: one while decoding, the whole prompt in a prefill), the attention mask (past plus
//! new) and the past length of every `past_key_values.*` input. Serving needs each from its smallest
//! value (one token, an empty cache) up to the longest sequence, so the only choices are that longest
//! sequence (`profile_max_tokens`) and the context length TensorRT tunes its kernels for
//! (`profile_opt_tokens`). The shapes are rendered from the graph's own input names ([`IoLayout`]).

use serde::{Deserialize, Serialize};

use super::config::{EngineConfig, ProviderConfig};
use super::io_layout::IoLayout;

/// Context length the decode step is optimised for when the profile does not say.
pub const DEFAULT_OPT_TOKENS: usize = 512;

/// Why a TensorRT profile cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrtProfileError {
    #[error("the longest sequence, {max_tokens} tokens, must be at least 2 (a prefill and one decode step)")]
    TooShort { max_tokens: usize },
    #[error(
        "the context length to optimise for, {opt_tokens} tokens, must be between 1 and the longest \
         sequence ({max_tokens} tokens)"
    )]
    OptOutOfRange { opt_tokens: usize, max_tokens: usize },
    #[error(
        "the longest sequence, {max_tokens} tokens, exceeds the model's context length of \
         {context_length} tokens; use {context_length} or less"
    )]
    BeyondContext { max_tokens: usize, context_length: usize },
    #[error(
        "profile_opt_tokens is set without profile_max_tokens; set the longest sequence the engine is \
         built for as well, or remove both for ONNX Runtime's implicit profile"
    )]
    OptWithoutMax,
}

/// The sequence lengths an engine is prepared for. Serving decodes one token at a time, so the
/// smallest shape is always one new token with no past; the largest a full-context prefill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrtProfile {
    /// Longest prompt plus generation (the model's context length, or less to save build memory).
    pub max_tokens: usize,
    /// Past length TensorRT optimises the decode step for.
    pub opt_tokens: usize,
}

/// One forward pass during preparation: `new_tokens` fed on top of a cache of `past_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShapePass {
    /// Tokens in `input_ids` (sequence dimension).
    pub new_tokens: usize,
    /// Positions already in the KV cache.
    pub past_tokens: usize,
}

/// ONNX Runtime's `trt_profile_{min,opt,max}_shapes` strings for a profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileShapes {
    /// `trt_profile_min_shapes`.
    pub min: String,
    /// `trt_profile_opt_shapes`.
    pub opt: String,
    /// `trt_profile_max_shapes`.
    pub max: String,
}

impl TrtProfile {
    /// A profile up to `max_tokens`, optimised for decoding at `opt_tokens` of context.
    pub fn new(max_tokens: usize, opt_tokens: usize) -> Result<TrtProfile, TrtProfileError> {
        if max_tokens < 2 {
            return Err(TrtProfileError::TooShort { max_tokens });
        }
        if opt_tokens == 0 || opt_tokens > max_tokens {
            return Err(TrtProfileError::OptOutOfRange { opt_tokens, max_tokens });
        }
        Ok(TrtProfile { max_tokens, opt_tokens })
    }

    /// The explicit profile a provider entry asks for: `None` for other providers and for a
    /// `tensorrt` entry without `profile_max_tokens` (ONNX Runtime then widens an implicit profile
    /// as shapes grow, rebuilding the engine each time). The model's `context_length`, when known,
    /// bounds it.
    pub fn configured(
        provider: &ProviderConfig,
        context_length: Option<usize>,
    ) -> Result<Option<TrtProfile>, TrtProfileError> {
        let ProviderConfig::TensorRt { profile_max_tokens, profile_opt_tokens, .. } = provider else {
            return Ok(None);
        };
        let Some(max_tokens) = *profile_max_tokens else {
            return match profile_opt_tokens {
                Some(_) => Err(TrtProfileError::OptWithoutMax),
                None => Ok(None),
            };
        };
        if let Some(context_length) = context_length
            && max_tokens > context_length
        {
            return Err(TrtProfileError::BeyondContext { max_tokens, context_length });
        }
        TrtProfile::new(max_tokens, profile_opt_tokens.unwrap_or(DEFAULT_OPT_TOKENS.min(max_tokens)))
            .map(Some)
    }

    /// The explicit profile of the first `tensorrt` entry of `config` (the one ONNX Runtime tries
    /// first), after checking every entry's against `context_length`.
    pub fn of_engine(
        config: &EngineConfig,
        context_length: Option<usize>,
    ) -> Result<Option<TrtProfile>, TrtProfileError> {
        let mut first: Option<Option<TrtProfile>> = None;
        for provider in &config.execution_providers {
            let profile = TrtProfile::configured(provider, context_length)?;
            if matches!(provider, ProviderConfig::TensorRt { .. }) {
                first.get_or_insert(profile);
            }
        }
        Ok(first.flatten())
    }

    /// The passes that take every dynamic dimension to both ends of its range: one token with no
    /// past (all minima), a full prefill (longest `input_ids` and mask) and a decode step with the
    /// longest past. With ONNX Runtime's implicit profiles each pass that widens a range rebuilds the
    /// engine once (the timing cache makes the rebuilds quick), and the cached engine then covers
    /// every shape serving can produce.
    pub fn passes(&self) -> [ShapePass; 3] {
        [
            ShapePass { new_tokens: 1, past_tokens: 0 },
            ShapePass { new_tokens: self.max_tokens, past_tokens: 0 },
            ShapePass { new_tokens: 1, past_tokens: self.max_tokens - 1 },
        ]
    }

    /// The explicit optimisation profile for a batch of one, in ONNX Runtime's
    /// `name:dim1xdim2,...` syntax.
    pub fn shapes(&self, layout: &IoLayout) -> ProfileShapes {
        let render = |new: usize, total: usize, past: usize| {
            let mut parts = vec![
                format!("{}:1x{new}", tandem_core::kv_io::INPUT_IDS),
                format!("{}:1x{total}", tandem_core::kv_io::ATTENTION_MASK),
            ];
            if layout.has_position_ids {
                parts.push(format!("{}:1x{new}", tandem_core::kv_io::POSITION_IDS));
            }
            parts.extend(
                layout
                    .past_names
                    .iter()
                    .map(|name| format!("{name}:1x{}x{past}x{}", layout.kv_heads, layout.head_dim)),
            );
            parts.join(",")
        };
        // Each dimension's range on its own: the longest input and mask come with a prefill, the
        // longest past with a decode step.
        ProfileShapes {
            min: render(1, 1, 0),
            opt: render(1, self.opt_tokens, self.opt_tokens - 1),
            max: render(self.max_tokens, self.max_tokens, self.max_tokens - 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::engine::io_layout::FloatType;

    fn tensorrt(max: Option<usize>, opt: Option<usize>) -> ProviderConfig {
        ProviderConfig::TensorRt {
            fp16: true,
            engine_cache_dir: Some(PathBuf::from("/var/cache/tandem/trt")),
            device_id: 0,
            profile_max_tokens: max,
            profile_opt_tokens: opt,
        }
    }

    fn layout(layers: usize, has_position_ids: bool) -> IoLayout {
        let names = |prefix: &str| {
            (0..layers).flat_map(|l| [format!("{prefix}.{l}.key"), format!("{prefix}.{l}.value")]).collect()
        };
        IoLayout {
            layers,
            kv_heads: 2,
            head_dim: 16,
            kv_type: FloatType::F16,
            logits_type: FloatType::F32,
            has_position_ids,
            vocab_size: Some(512),
            past_names: names("past_key_values"),
            present_names: names("present"),
        }
    }

    #[test]
    fn the_passes_reach_both_ends_of_every_dynamic_dimension() {
        let profile = TrtProfile::new(4096, 512).unwrap();
        let passes = profile.passes();
        let new = passes.iter().map(|p| p.new_tokens);
        let past = passes.iter().map(|p| p.past_tokens);
        let total = passes.iter().map(|p| p.new_tokens + p.past_tokens);
        assert_eq!((new.clone().min(), new.max()), (Some(1), Some(4096)));
        assert_eq!((past.clone().min(), past.max()), (Some(0), Some(4095)));
        assert_eq!((total.clone().min(), total.max()), (Some(1), Some(4096)));
    }

    #[test]
    fn a_profile_outside_its_limits_is_refused() {
        assert!(TrtProfile::new(1, 1).is_err());
        assert!(TrtProfile::new(128, 0).is_err());
        assert!(TrtProfile::new(128, 129).is_err());
        assert!(TrtProfile::new(2, 1).is_ok());
    }

    #[test]
    fn profile_shapes_name_every_input_by_name() {
        let shapes = TrtProfile::new(256, 64).unwrap().shapes(&layout(1, true));
        assert_eq!(
            shapes.min,
            "input_ids:1x1,attention_mask:1x1,position_ids:1x1,past_key_values.0.key:1x2x0x16,\
             past_key_values.0.value:1x2x0x16"
        );
        assert!(shapes.opt.contains("attention_mask:1x64,") && shapes.opt.contains("key:1x2x63x16"));
        assert!(shapes.max.starts_with("input_ids:1x256,attention_mask:1x256,position_ids:1x256,"));
        assert!(shapes.max.ends_with("past_key_values.0.value:1x2x255x16"));
        assert!(!TrtProfile::new(256, 64).unwrap().shapes(&layout(1, false)).min.contains("position_ids"));
    }

    #[test]
    fn every_kv_input_gets_its_past_length_in_each_shape_string() {
        let shapes = TrtProfile::new(2048, 512).unwrap().shapes(&layout(2, false));
        for (shape, past) in [(&shapes.min, 0), (&shapes.opt, 511), (&shapes.max, 2047)] {
            let kv: Vec<&str> =
                shape.split(',').filter(|part| part.starts_with("past_key_values.")).collect();
            assert_eq!(kv.len(), 4, "{shape}");
            assert!(kv.iter().all(|part| part.ends_with(&format!(":1x2x{past}x16"))), "{shape}");
        }
        assert_eq!(
            shapes.max,
            "input_ids:1x2048,attention_mask:1x2048,past_key_values.0.key:1x2x2047x16,\
             past_key_values.0.value:1x2x2047x16,past_key_values.1.key:1x2x2047x16,\
             past_key_values.1.value:1x2x2047x16"
        );
    }

    #[test]
    fn a_tensorrt_entry_without_profile_fields_keeps_the_implicit_profile() {
        assert_eq!(TrtProfile::configured(&tensorrt(None, None), Some(4096)), Ok(None));
        assert_eq!(TrtProfile::configured(&ProviderConfig::Cuda { device_id: 0 }, None), Ok(None));
    }

    #[test]
    fn a_configured_profile_defaults_its_opt_length_to_512_or_the_longest() {
        let profile = TrtProfile::configured(&tensorrt(Some(2048), None), Some(4096)).unwrap();
        assert_eq!(profile, Some(TrtProfile { max_tokens: 2048, opt_tokens: 512 }));
        let short = TrtProfile::configured(&tensorrt(Some(256), None), None).unwrap();
        assert_eq!(short, Some(TrtProfile { max_tokens: 256, opt_tokens: 256 }));
        let set = TrtProfile::configured(&tensorrt(Some(1024), Some(128)), Some(1024)).unwrap();
        assert_eq!(set, Some(TrtProfile { max_tokens: 1024, opt_tokens: 128 }));
    }

    #[test]
    fn a_profile_longer_than_the_models_context_is_refused_naming_both_lengths() {
        let err = TrtProfile::configured(&tensorrt(Some(8192), None), Some(4096)).unwrap_err();
        assert_eq!(err, TrtProfileError::BeyondContext { max_tokens: 8192, context_length: 4096 });
        let text = err.to_string();
        assert!(text.contains("8192") && text.contains("4096"), "{text}");
        assert!(
            TrtProfile::configured(&tensorrt(Some(8192), None), None).is_ok(),
            "unknown context: unchecked"
        );
    }

    #[test]
    fn an_opt_length_outside_the_profile_or_without_a_longest_is_refused() {
        assert_eq!(
            TrtProfile::configured(&tensorrt(Some(512), Some(1024)), None),
            Err(TrtProfileError::OptOutOfRange { opt_tokens: 1024, max_tokens: 512 })
        );
        assert_eq!(
            TrtProfile::configured(&tensorrt(Some(512), Some(0)), None),
            Err(TrtProfileError::OptOutOfRange { opt_tokens: 0, max_tokens: 512 })
        );
        assert_eq!(
            TrtProfile::configured(&tensorrt(Some(1), None), None),
            Err(TrtProfileError::TooShort { max_tokens: 1 })
        );
        assert_eq!(
            TrtProfile::configured(&tensorrt(None, Some(256)), None),
            Err(TrtProfileError::OptWithoutMax)
        );
    }

    #[test]
    fn the_engines_profile_is_its_first_tensorrt_entrys_and_every_entry_is_checked() {
        let config = |providers: Vec<ProviderConfig>| EngineConfig {
            execution_providers: providers,
            ..EngineConfig::default()
        };
        let both = config(vec![tensorrt(Some(1024), None), ProviderConfig::Cuda { device_id: 0 }]);
        assert_eq!(TrtProfile::of_engine(&both, Some(4096)).unwrap().map(|p| p.max_tokens), Some(1024));
        let none = config(vec![ProviderConfig::Cuda { device_id: 0 }, ProviderConfig::Cpu {}]);
        assert_eq!(TrtProfile::of_engine(&none, Some(4096)), Ok(None));
        let second_bad = config(vec![tensorrt(None, None), tensorrt(Some(8192), None)]);
        assert!(TrtProfile::of_engine(&second_bad, Some(4096)).is_err());
    }
}
