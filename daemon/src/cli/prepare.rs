//! `tandemd prepare`: builds the TensorRT engines and timing cache for the configured model ahead of
//! time, so that no request ever waits minutes for an engine build.
//!
//! Like `serve`, it first checks the bundle against the configured `trusted_bundle_keys`
//! ([`tandemd::bundle_trust::check_before_loading`]) and refuses an unsigned or altered one before
//! anything reads the model, on any machine, GPU or not.
//!
//! It loads the model with the configured providers (TensorRT required), its engine cache pointed at
//! the directory keyed by model, ONNX Runtime, TensorRT, GPU and precision
//! ([`tandemd::engine::tensorrt_cache`]), then runs forward passes at both ends of every dynamic
//! dimension of the profile: the configured one (`profile_max_tokens`), which `serve` uses too, else
//! one up to the model's context length or `--max-tokens`. Each step is reported on stdout and to systemd (`STATUS=`), and extends systemd's start
//! timeout (`EXTEND_TIMEOUT_USEC=`) when run as the unit's `ExecStartPre=`. A finished directory is
//! recorded in `prepared.json`; running again returns at once.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use sd_notify::NotifyState;
use tandemd::bundle_trust::{check_before_loading, load_trusted_keys};
use tandemd::config::{CliOverrides, ConfigSources, DaemonConfig, load};
use tandemd::engine::tensorrt_cache::{KeyedEngineConfig, PreparedCache, TrtCacheKey, resolve_cache_dirs};
use tandemd::engine::tensorrt_profile::{DEFAULT_OPT_TOKENS, ShapePass, TrtProfile};
use tandemd::engine::{
    Engine, EngineError, ForwardInput, LogitsScope, ModelDir, OrtRuntime, ProviderConfig, load_ort,
};
use tandemd::updater::Slots;

/// How long systemd waits for each step before giving up (EXTEND_TIMEOUT_USEC holds a u32 of
/// microseconds, so at most about 71 minutes). A step that needs longer is run by hand once:
/// outside systemd nothing times out.
const STEP_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// Token fed during preparation; any id inside the vocabulary gives the same shapes.
const PREPARE_TOKEN: i64 = 0;

/// Arguments of `tandemd prepare`.
#[derive(Debug, Args)]
pub struct PrepareArgs {
    /// Configuration file (TOML); must exist. Without it /etc/tandem/tandemd.toml is read when it
    /// exists. TANDEM_* environment variables override the file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Model directory to prepare (overrides `model_dir`).
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Longest prompt plus generation to build for (default: the tensorrt provider's
    /// profile_max_tokens, else the model's context length). Without profile_max_tokens, longer
    /// requests make ONNX Runtime rebuild the engine while they wait.
    #[arg(long, value_name = "TOKENS")]
    max_tokens: Option<usize>,
    /// Context length the decode step is optimised for (default: the provider's profile_opt_tokens,
    /// else 512, or --max-tokens if smaller).
    #[arg(long, value_name = "TOKENS")]
    opt_tokens: Option<usize>,
    /// Build again even when the cache directory records a finished preparation.
    #[arg(long)]
    force: bool,
}

pub fn run(args: PrepareArgs) -> anyhow::Result<()> {
    let overrides = CliOverrides { model_dir: args.model.clone(), ..CliOverrides::default() };
    let config = load(&ConfigSources::from_process(args.config.clone(), overrides)?)?;
    config.validate()?;
    if !has_tensorrt(&config) {
        println!("nothing to prepare: the configuration lists no `tensorrt` execution provider");
        return Ok(());
    }
    require_cache_dirs(&config)?;
    // The model `serve` will load: the installed slot when there is one (verified in full here),
    // else the configured directory.
    let keys = load_trusted_keys(&config.trusted_bundle_keys)?;
    let model_dir = match Slots::peek_current(&config.state_dir, &keys) {
        Some(view) => {
            println!(
                "installed slot {}: bundle {} v{} verified",
                view.slot, view.bundle.name, view.bundle.version
            );
            view.dir
        }
        None => {
            let model_dir = config.model_dir.clone().context("no model directory is configured")?;
            if let Some(bundle) = check_before_loading(&model_dir, &config.trusted_bundle_keys)? {
                println!(
                    "bundle {} v{} verified (signed by key {})",
                    bundle.name, bundle.version, bundle.key_id
                );
            }
            model_dir
        }
    };
    require_gpu_build().context("cannot prepare TensorRT engines")?;

    let started = Instant::now();
    let mut progress = Progress::new(5);
    progress.step("loading ONNX Runtime and reading the model directory");
    let runtime = load_ort(config.engine.ort_library.as_deref())?;
    require_tensorrt(&runtime)?;
    let model = ModelDir::inspect(&model_dir)?;
    let configured =
        TrtProfile::of_engine(&config.engine, model.context_length).map_err(EngineError::TrtProfile)?;
    let profile = profile_for(&args, &model, configured)?;
    let KeyedEngineConfig { config: mut engine_config, caches } =
        resolve_cache_dirs(&config.engine, &model, &runtime)?;
    for (key, dir) in &caches {
        println!("engine cache: {} ({})", dir.display(), describe(key));
    }
    if !args.force
        && caches.iter().all(|(key, dir)| {
            PreparedCache::read(dir).is_some_and(|p| p.covers(key, &profile, configured.is_some()))
        })
    {
        println!("already prepared for up to {} tokens; nothing to build", profile.max_tokens);
        return Ok(());
    }

    // Falling back to CUDA or the CPU here would silently build nothing.
    engine_config.strict_providers = true;
    progress.step(if configured.is_some() {
        "creating the TensorRT session (the engine for the configured profile is built now)"
    } else {
        "creating the TensorRT session (static-shape engines are built now)"
    });
    let mut engine = Engine::load(&model_dir, &engine_config)
        .with_context(|| format!("could not load {} with TensorRT", model_dir.display()))?;
    let shapes = profile.shapes(engine.layout());
    for pass in profile.passes() {
        progress.step(&describe_pass(pass));
        let pass_started = Instant::now();
        run_pass(&mut engine, pass).with_context(|| format!("the pass {} failed", describe_pass(pass)))?;
        println!("  done in {:.1} s", pass_started.elapsed().as_secs_f64());
    }

    let seconds = started.elapsed().as_secs_f64();
    for (key, dir) in &caches {
        let record = PreparedCache {
            key: key.clone(),
            profile,
            explicit: configured.is_some(),
            shapes: shapes.clone(),
            model_dir: model.root.clone(),
            tandemd_version: env!("CARGO_PKG_VERSION").to_string(),
            seconds,
        };
        record.write(dir)?;
        println!("prepared {} in {seconds:.0} s", dir.display());
    }
    notify(&[NotifyState::Status("TensorRT engines prepared")]);
    Ok(())
}

fn has_tensorrt(config: &DaemonConfig) -> bool {
    config.engine.execution_providers.iter().any(|p| matches!(p, ProviderConfig::TensorRt { .. }))
}

/// Every TensorRT provider needs a cache directory: without one there is nowhere to prepare into.
fn require_cache_dirs(config: &DaemonConfig) -> Result<(), EngineError> {
    let missing = config
        .engine
        .execution_providers
        .iter()
        .any(|p| matches!(p, ProviderConfig::TensorRt { engine_cache_dir: None, .. }));
    if missing {
        return Err(EngineError::Config(
            "the tensorrt execution provider has no engine_cache_dir, so engines cannot be prepared: set \
             `engine_cache_dir = \"/var/cache/tandem/trt\"` in its entry of engine.execution_providers"
                .to_string(),
        ));
    }
    Ok(())
}

fn require_gpu_build() -> Result<(), EngineError> {
    if cfg!(feature = "gpu") {
        Ok(())
    } else {
        Err(EngineError::GpuSupportNotBuilt { provider: "tensorrt".to_string() })
    }
}

/// Whether the loaded ONNX Runtime was built with the TensorRT execution provider.
#[cfg(feature = "gpu")]
fn require_tensorrt(runtime: &OrtRuntime) -> anyhow::Result<()> {
    use ort::ep::{ExecutionProvider, TensorRT};

    match TensorRT::is_available() {
        Ok(true) => Ok(()),
        Ok(false) => anyhow::bail!(
            "TensorRT is not available in the loaded ONNX Runtime ({}, version {}): it was built without \
             the TensorRT execution provider. Install a JetPack-matched onnxruntime-gpu (its \
             libonnxruntime.so with libonnxruntime_providers_tensorrt.so next to it) and point ORT_DYLIB_PATH \
             or engine.ort_library at it; see /usr/share/doc/tandemd/deploy-jetson.md",
            runtime.library().display(),
            runtime.version()
        ),
        Err(error) => Err(anyhow::anyhow!(
            "could not ask the loaded ONNX Runtime ({}) whether it has TensorRT: {error}",
            runtime.library().display()
        )),
    }
}

#[cfg(not(feature = "gpu"))]
fn require_tensorrt(_runtime: &OrtRuntime) -> anyhow::Result<()> {
    Err(EngineError::GpuSupportNotBuilt { provider: "tensorrt".to_string() }.into())
}

/// The configured explicit profile, which `serve` builds its engine for too, else the one the flags
/// and the model's context length give.
fn profile_for(
    args: &PrepareArgs,
    model: &ModelDir,
    configured: Option<TrtProfile>,
) -> Result<TrtProfile, EngineError> {
    if let Some(profile) = configured {
        let differs = args.max_tokens.is_some_and(|max| max != profile.max_tokens)
            || args.opt_tokens.is_some_and(|opt| opt != profile.opt_tokens);
        if differs {
            return Err(EngineError::Config(format!(
                "the configuration fixes the TensorRT profile (profile_max_tokens = {}, profile_opt_tokens = \
                 {}), and `serve` would not use an engine built for other lengths; drop --max-tokens and \
                 --opt-tokens, or change the profile in the configuration",
                profile.max_tokens, profile.opt_tokens
            )));
        }
        return Ok(profile);
    }
    let max_tokens = match (args.max_tokens, model.context_length) {
        (Some(max), _) => max,
        (None, Some(context)) => context,
        (None, None) => {
            return Err(EngineError::Config(format!(
                "{} does not say the model's context length; give the longest prompt plus generation to \
                 build for with --max-tokens",
                model.root.display()
            )));
        }
    };
    TrtProfile::new(max_tokens, args.opt_tokens.unwrap_or(DEFAULT_OPT_TOKENS.min(max_tokens)))
        .map_err(|error| EngineError::Config(format!("--max-tokens / --opt-tokens: {error}")))
}

/// One forward pass with `pass.new_tokens` on top of a cache of `pass.past_tokens` (filled by a
/// prefill first, which stays inside the shapes the earlier passes covered).
fn run_pass(engine: &mut Engine, pass: ShapePass) -> Result<(), EngineError> {
    let mut cache = engine.empty_cache(1)?;
    if pass.past_tokens > 0 {
        let (_, filled) = forward(engine, 0, pass.past_tokens, cache)?;
        cache = filled;
    }
    forward(engine, pass.past_tokens, pass.new_tokens, cache).map(|_| ())
}

fn forward(
    engine: &mut Engine,
    past: usize,
    new: usize,
    cache: tandemd::engine::KvCache,
) -> Result<(tandemd::engine::Logits, tandemd::engine::KvCache), EngineError> {
    let ids = vec![PREPARE_TOKEN; new];
    let mask = vec![1_i64; past + new];
    let positions: Vec<i64> = (past..past + new).map(|p| p as i64).collect();
    let input = ForwardInput { batch: 1, input_ids: &ids, attention_mask: &mask, position_ids: &positions };
    engine.forward(&input, cache, LogitsScope::LastPosition)
}

fn describe_pass(pass: ShapePass) -> String {
    match (pass.new_tokens, pass.past_tokens) {
        (1, 0) => "smallest shapes: one token, empty cache".to_string(),
        (new, 0) => format!("prefill of {new} tokens"),
        (new, past) => format!("decoding {new} token after {past} cached tokens"),
    }
}

fn describe(key: &TrtCacheKey) -> String {
    format!(
        "model {}, ONNX Runtime {}, TensorRT {}, {}, {}",
        &key.model_sha256[..key.model_sha256.len().min(16)],
        key.ort_version,
        key.tensorrt_version,
        key.gpu,
        key.precision.name()
    )
}

/// Numbered steps on stdout and in `systemctl status`, each granting systemd's start timeout
/// another [`STEP_TIMEOUT`].
struct Progress {
    step: usize,
    steps: usize,
}

impl Progress {
    fn new(steps: usize) -> Self {
        Self { step: 0, steps }
    }

    fn step(&mut self, what: &str) {
        self.step += 1;
        let line = format!("[{}/{}] {what}", self.step, self.steps);
        println!("{line}");
        let timeout_usec = u32::try_from(STEP_TIMEOUT.as_micros()).unwrap_or(u32::MAX);
        notify(&[NotifyState::ExtendTimeoutUsec(timeout_usec), NotifyState::Status(&line)]);
    }
}

/// Outside systemd (no NOTIFY_SOCKET) this does nothing.
fn notify(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "could not notify systemd");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_with_context(context_length: Option<usize>) -> ModelDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.onnx"), b"graph").unwrap();
        let mut model = ModelDir::inspect(dir.path()).unwrap();
        model.context_length = context_length;
        model
    }

    fn args(max_tokens: Option<usize>, opt_tokens: Option<usize>) -> PrepareArgs {
        PrepareArgs { config: None, model: None, max_tokens, opt_tokens, force: false }
    }

    #[test]
    fn the_profile_defaults_to_the_models_context_length() {
        let profile = profile_for(&args(None, None), &model_with_context(Some(4096)), None).unwrap();
        assert_eq!(profile, TrtProfile { max_tokens: 4096, opt_tokens: 512 });
        let short = profile_for(&args(None, None), &model_with_context(Some(256)), None).unwrap();
        assert_eq!(short, TrtProfile { max_tokens: 256, opt_tokens: 256 });
        let capped =
            profile_for(&args(Some(2048), Some(128)), &model_with_context(Some(4096)), None).unwrap();
        assert_eq!(capped, TrtProfile { max_tokens: 2048, opt_tokens: 128 });
    }

    #[test]
    fn a_model_without_a_context_length_needs_max_tokens() {
        let text = profile_for(&args(None, None), &model_with_context(None), None).unwrap_err().to_string();
        assert!(text.contains("--max-tokens"), "{text}");
        assert!(profile_for(&args(Some(1024), None), &model_with_context(None), None).is_ok());
    }

    #[test]
    fn a_configured_profile_is_prepared_and_flags_may_only_repeat_it() {
        let configured = TrtProfile { max_tokens: 2048, opt_tokens: 256 };
        let model = model_with_context(Some(4096));
        assert_eq!(profile_for(&args(None, None), &model, Some(configured)).unwrap(), configured);
        assert_eq!(profile_for(&args(Some(2048), Some(256)), &model, Some(configured)).unwrap(), configured);
        let text = profile_for(&args(Some(4096), None), &model, Some(configured)).unwrap_err().to_string();
        assert!(text.contains("profile_max_tokens = 2048") && text.contains("--max-tokens"), "{text}");
    }

    #[test]
    fn every_step_fits_in_one_systemd_timeout_extension() {
        assert!(STEP_TIMEOUT.as_micros() <= u128::from(u32::MAX));
    }
}
