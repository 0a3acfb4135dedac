//! Building blocks: tiny models exported as bundles, the engine on ONNX Runtime, the binaries.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use tandem_train::export::{ExportOptions, ExternalData, export_bundle};
use tandem_train::model::presets::Preset;
use tandem_train::model::{Decoder, KvCache, Mode, ModelConfig, TrainableModel};
use tandem_train::tokenizer_training::{DEFAULT_CORPUS, train_bpe_tokenizer};
use tandemd::engine::{Engine, EngineConfig};

/// Peaked logits (std 0.2) so that greedy decoding never sits on a near-tie between the runtimes.
pub const PARITY_INIT_STD: f64 = 0.2;

/// A random model saved as a checkpoint and exported as a bundle, in a temporary folder.
pub struct ExportedModel {
    _dir: tempfile::TempDir,
    /// The Hugging Face checkpoint folder the bundle was exported from.
    pub checkpoint: PathBuf,
    pub bundle: PathBuf,
    pub model: TrainableModel,
}

impl ExportedModel {
    pub fn new(config: &ModelConfig, seed: u64, external_data: ExternalData) -> Self {
        Self::with_options(
            config,
            seed,
            ExportOptions { external_data, ..ExportOptions::new("test-model", "1") },
        )
    }

    /// Exports with `options` (attention variant, external data, ...).
    pub fn with_options(config: &ModelConfig, seed: u64, options: ExportOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let checkpoint = dir.path().join("checkpoint");
        let bundle = dir.path().join("bundle");
        let model = TrainableModel::random(config, PARITY_INIT_STD, seed, &Device::Cpu).unwrap();
        model.save(&checkpoint).unwrap();
        train_bpe_tokenizer(DEFAULT_CORPUS, config.vocab_size.min(512), &checkpoint.join("tokenizer.json"))
            .unwrap();
        export_bundle(&checkpoint, &bundle, &options).unwrap();
        Self { _dir: dir, checkpoint, bundle, model }
    }

    pub fn preset(preset: Preset, seed: u64) -> Self {
        Self::new(&preset.config(), seed, ExternalData::Auto)
    }
}

/// The engine config of the tests: the CPU provider, ONNX Runtime from `ORT_DYLIB_PATH`.
pub fn cpu_config() -> EngineConfig {
    assert!(
        std::env::var_os("ORT_DYLIB_PATH").is_some(),
        "ORT_DYLIB_PATH is not set: run the tests with `make test`, which fetches ONNX Runtime into .ort/"
    );
    EngineConfig { intra_threads: 1, ..EngineConfig::default() }
}

pub fn load_engine(dir: &Path) -> Engine {
    Engine::load(dir, &cpu_config()).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
}

/// The `tandemd` binary of this build (`make test` builds the binaries before the tests).
pub fn tandemd_binary() -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    let profile_dir = deps.parent().and_then(Path::parent).unwrap();
    let binary = profile_dir.join("tandemd");
    assert!(
        binary.is_file(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`; `make test` does)",
        binary.display()
    );
    binary
}

/// Row-major contents of a candle tensor.
pub fn to_vec(t: &candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared logits differ in size");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Candle's greedy continuation of one unpadded prompt.
pub fn candle_greedy(model: &Decoder, prompt: &[u32], steps: usize) -> Vec<u32> {
    let mut cache = KvCache::new(model.config().num_hidden_layers);
    let mut tokens = prompt.to_vec();
    let mut generated = Vec::new();
    let mut input = prompt.to_vec();
    for _ in 0..steps {
        let start = tokens.len() - input.len();
        let ids = Tensor::new(input.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let mask = Tensor::ones((1, tokens.len()), DType::U32, &Device::Cpu).unwrap();
        let pos =
            Tensor::arange(start as u32, tokens.len() as u32, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let hidden = model.forward(&ids, &mask, &pos, Some(&mut cache), Mode::Infer).unwrap();
        let logits = model.logits(&hidden).unwrap().i((0, input.len() - 1)).unwrap();
        let next = argmax(&to_vec(&logits));
        generated.push(next);
        tokens.push(next);
        input = vec![next];
    }
    generated
}
