//! Registering the configured execution providers on a session, in order, and reporting which one
//! runs the model.
//!
//! ONNX Runtime falls back silently when a provider cannot be registered. Here every fallback is
//! logged, and with `strict_providers` it is an error instead.

use std::path::Path;

use ort::session::builder::SessionBuilder;
use serde::Serialize;

use super::config::{EngineConfig, ProviderConfig};
use super::error::EngineError;
use super::io_layout::IoLayout;

/// Which providers were asked for and which one runs the model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProviderReport {
    /// The configured providers, in order.
    pub requested: Vec<String>,
    /// The first provider that registered; `cpu` when none of the others did.
    pub active: String,
}

/// Whether registering `config`'s providers needs the graph's input layout first: a `tensorrt`
/// entry with an explicit profile names every input in its shapes. Without the `gpu` feature no GPU
/// provider is registered, so nothing needs it.
pub(crate) fn needs_layout(config: &EngineConfig) -> bool {
    cfg!(feature = "gpu")
        && config
            .execution_providers
            .iter()
            .take_while(|provider| !matches!(provider, ProviderConfig::Cpu {}))
            .any(|provider| matches!(provider, ProviderConfig::TensorRt { profile_max_tokens: Some(_), .. }))
}

/// Registers `config.execution_providers` on `builder` in order. `layout` is the graph's input
/// layout, read beforehand when [`needs_layout`] says so.
pub(crate) fn register_providers(
    mut builder: SessionBuilder,
    config: &EngineConfig,
    layout: Option<&IoLayout>,
) -> Result<(SessionBuilder, ProviderReport), EngineError> {
    let requested: Vec<String> = config.execution_providers.iter().map(|p| p.name().to_string()).collect();
    let mut active: Option<&'static str> = None;
    for provider in plan_gpu_providers(config, cfg!(feature = "gpu"))? {
        let (next, registered) = register_gpu_provider(builder, provider, config.strict_providers, layout)?;
        builder = next;
        if registered {
            active.get_or_insert(provider.name());
        }
    }
    let report = ProviderReport { requested, active: active.unwrap_or("cpu").to_string() };
    Ok((builder, report))
}

/// The GPU providers to try, in order. CPU needs no registration: ONNX Runtime always runs what no
/// other provider took on the CPU, so a `cpu` entry ends the list. Without the `gpu` feature GPU
/// providers are skipped with a warning, or refused when `strict_providers` is set.
fn plan_gpu_providers(config: &EngineConfig, gpu_built: bool) -> Result<Vec<&ProviderConfig>, EngineError> {
    let mut planned = Vec::new();
    for (index, provider) in config.execution_providers.iter().enumerate() {
        if let ProviderConfig::Cpu {} = provider {
            let rest = &config.execution_providers[index + 1..];
            if !rest.is_empty() {
                tracing::warn!(
                    ignored = ?rest.iter().map(ProviderConfig::name).collect::<Vec<_>>(),
                    "providers listed after `cpu` are never used; put them before it"
                );
            }
            break;
        }
        if !gpu_built {
            let missing = EngineError::GpuSupportNotBuilt { provider: provider.name().to_string() };
            if config.strict_providers {
                return Err(missing);
            }
            tracing::warn!("{missing}; skipping it");
            continue;
        }
        planned.push(provider);
    }
    Ok(planned)
}

/// Without the `gpu` feature nothing reaches here: `plan_gpu_providers` skipped every GPU provider.
#[cfg(not(feature = "gpu"))]
fn register_gpu_provider(
    builder: SessionBuilder,
    _provider: &ProviderConfig,
    _strict: bool,
    _layout: Option<&IoLayout>,
) -> Result<(SessionBuilder, bool), EngineError> {
    Ok((builder, false))
}

#[cfg(feature = "gpu")]
fn register_gpu_provider(
    builder: SessionBuilder,
    provider: &ProviderConfig,
    strict: bool,
    layout: Option<&IoLayout>,
) -> Result<(SessionBuilder, bool), EngineError> {
    use ort::ep::{self, ExecutionProvider};

    use super::tensorrt_profile::TrtProfile;

    let (available, dispatch) = match provider {
        ProviderConfig::TensorRt { fp16, engine_cache_dir, device_id, .. } => {
            let mut trt = ep::TensorRT::default().with_device_id(*device_id).with_fp16(*fp16);
            // Checked against the model's context length when the engine loaded it.
            if let Some(profile) = TrtProfile::configured(provider, None).map_err(EngineError::TrtProfile)? {
                let layout = layout.ok_or_else(|| {
                    EngineError::Config(
                        "the tensorrt profile needs the graph's inputs, which were not read before the \
                         provider was registered"
                            .to_string(),
                    )
                })?;
                let shapes = profile.shapes(layout);
                tracing::info!(
                    max_tokens = profile.max_tokens,
                    opt_tokens = profile.opt_tokens,
                    "tensorrt builds one engine for an explicit profile"
                );
                trt = trt
                    .with_profile_min_shapes(shapes.min)
                    .with_profile_opt_shapes(shapes.opt)
                    .with_profile_max_shapes(shapes.max);
            }
            if let Some(dir) = engine_cache_dir {
                let dir = prepare_cache_dir(dir)?;
                trt = trt
                    .with_engine_cache(true)
                    .with_engine_cache_path(&dir)
                    .with_timing_cache(true)
                    .with_timing_cache_path(&dir);
            } else {
                tracing::warn!(
                    "tensorrt has no engine_cache_dir: TensorRT engines are rebuilt on every start (minutes on \
                     a Jetson); set one in the config"
                );
            }
            (ep::TensorRT::is_available(), trt.build())
        }
        ProviderConfig::Cuda { device_id } => {
            (ep::CUDA::is_available(), ep::CUDA::default().with_device_id(*device_id).build())
        }
        ProviderConfig::Cpu {} => return Ok((builder, true)),
    };
    let name = provider.name();
    let fail = |reason: String| -> Result<(), EngineError> {
        let error = EngineError::ProviderUnavailable { provider: name.to_string(), reason };
        if strict {
            return Err(error);
        }
        tracing::warn!("{error}");
        Ok(())
    };
    match available {
        Ok(true) => {}
        Ok(false) => {
            fail(format!("the loaded ONNX Runtime was built without the {name} execution provider"))?;
            return Ok((builder, false));
        }
        Err(e) => {
            fail(format!("could not ask ONNX Runtime which providers it has: {e}"))?;
            return Ok((builder, false));
        }
    }
    match builder.with_execution_providers([dispatch.error_on_failure()]) {
        Ok(builder) => {
            tracing::info!(provider = name, "execution provider registered");
            Ok((builder, true))
        }
        Err(e) => {
            fail(e.to_string())?;
            Ok((e.recover(), false))
        }
    }
}

/// The TensorRT caches need an existing, NUL-free directory (ONNX Runtime takes it as a C string).
#[cfg_attr(not(feature = "gpu"), allow(dead_code))]
fn prepare_cache_dir(dir: &Path) -> Result<String, EngineError> {
    let text = dir.to_str().filter(|s| !s.contains('\0')).ok_or_else(|| {
        EngineError::Config(format!("engine_cache_dir {} must be a valid UTF-8 path", dir.display()))
    })?;
    std::fs::create_dir_all(dir).map_err(|cause| EngineError::Io { path: dir.to_path_buf(), cause })?;
    Ok(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(list: &str, strict: bool) -> EngineConfig {
        EngineConfig {
            execution_providers: ProviderConfig::parse_list(list).unwrap(),
            strict_providers: strict,
            ..EngineConfig::default()
        }
    }

    fn names(planned: Vec<&ProviderConfig>) -> Vec<&'static str> {
        planned.into_iter().map(ProviderConfig::name).collect()
    }

    #[test]
    fn without_gpu_support_gpu_providers_are_skipped_unless_strict() {
        assert!(names(plan_gpu_providers(&config("tensorrt,cuda,cpu", false), false).unwrap()).is_empty());
        let err = plan_gpu_providers(&config("tensorrt,cuda,cpu", true), false).unwrap_err().to_string();
        assert!(err.contains("tensorrt") && err.contains("--features gpu"), "{err}");
    }

    #[test]
    fn with_gpu_support_gpu_providers_are_tried_in_order() {
        let config = config("tensorrt,cuda,cpu", true);
        assert_eq!(names(plan_gpu_providers(&config, true).unwrap()), ["tensorrt", "cuda"]);
    }

    #[test]
    fn providers_after_cpu_are_never_tried() {
        let config = config("cpu,cuda", true);
        assert!(plan_gpu_providers(&config, true).unwrap().is_empty());
    }

    #[test]
    fn a_cache_dir_is_created_when_missing() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("trt").join("cache");
        assert_eq!(prepare_cache_dir(&cache).unwrap(), cache.to_str().unwrap());
        assert!(cache.is_dir());
    }

    #[test]
    fn a_cache_dir_with_a_nul_byte_is_refused() {
        assert!(matches!(prepare_cache_dir(Path::new("/tmp/a\0b")), Err(EngineError::Config(_))));
    }
}
