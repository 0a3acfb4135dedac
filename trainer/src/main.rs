//! `tandem-train`: create models, export them as Tandem bundles (training lands here too).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use candle_core::Device;
use clap::{Parser, Subcommand, ValueEnum};
use tandem_train::export::{AttentionKind, ExportOptions, ExternalData, export_bundle};
use tandem_train::model::presets::Preset;
use tandem_train::model::{DEFAULT_INIT_STD, TrainableModel};
use tandem_train::tokenizer_training::{DEFAULT_CORPUS, tokenizer_config_json, train_bpe_tokenizer};

#[derive(Debug, Parser)]
#[command(
    name = "tandem-train",
    version,
    about = "Tandem's trainer: create, train and export on-device policies"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a model with random weights and a freshly trained tokenizer, as a Hugging Face folder.
    Init {
        /// The model's shape.
        #[arg(long, value_enum, default_value = "tiny-qwen2")]
        preset: Preset,
        /// Output folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json).
        #[arg(long)]
        out: PathBuf,
        /// Seed of the weight initialisation.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Standard deviation of the initial weights.
        #[arg(long, default_value_t = DEFAULT_INIT_STD)]
        init_std: f64,
        /// Tokens in the trained tokenizer (at most the model's vocabulary).
        #[arg(long, default_value_t = 512)]
        tokenizer_vocab: usize,
    },
    /// Export a Hugging Face checkpoint folder as a Tandem model bundle (ONNX, tokenizer, manifest).
    Export {
        /// Checkpoint folder: config.json, safetensors weights (single or sharded), tokenizer.json.
        #[arg(long)]
        from: PathBuf,
        /// Bundle folder to create.
        #[arg(long)]
        out: PathBuf,
        /// Model name recorded in the manifest (default: the checkpoint folder's name).
        #[arg(long)]
        name: Option<String>,
        /// Version recorded in the manifest.
        #[arg(long, default_value = "1")]
        version: String,
        /// Where the weights go: inside model.onnx, or model.onnx.data.
        #[arg(long, value_enum, default_value = "auto")]
        external_data: ExternalDataArg,
        /// Attention graph: portable standard ops, or onnxruntime-genai's fused GroupQueryAttention
        /// (batch-1 daemons only: wrong on left-padded batches).
        #[arg(long, value_enum, default_value = "standard")]
        attention: AttentionArg,
        /// Replace an existing bundle at --out.
        #[arg(long)]
        overwrite: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ExternalDataArg {
    /// External only when the weights would not fit a protobuf (above 1.5 GiB).
    Auto,
    /// Always write model.onnx.data.
    Always,
    /// Never; fails for models near 2 GiB.
    Never,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum AttentionArg {
    /// Standard opset-17 ops with position_ids; runs everywhere, exact on padded batches.
    Standard,
    /// com.microsoft GroupQueryAttention, genai-builder I/O (no position_ids); batch 1 only.
    Gqa,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init { preset, out, seed, init_std, tokenizer_vocab } => {
            let config = preset.config();
            anyhow::ensure!(
                tokenizer_vocab <= config.vocab_size,
                "--tokenizer-vocab {tokenizer_vocab} exceeds the model's vocabulary of {}",
                config.vocab_size
            );
            let model = TrainableModel::random(&config, init_std, seed, &Device::Cpu)
                .context("creating random weights")?;
            model.save(&out).with_context(|| format!("writing the checkpoint to {}", out.display()))?;
            train_bpe_tokenizer(DEFAULT_CORPUS, tokenizer_vocab, &out.join("tokenizer.json"))?;
            std::fs::write(out.join("tokenizer_config.json"), tokenizer_config_json())
                .with_context(|| format!("writing {}", out.join("tokenizer_config.json").display()))?;
            println!("created a {preset:?} model (seed {seed}) in {}", out.display());
        }
        Command::Export { from, out, name, version, external_data, attention, overwrite } => {
            let name = name
                .or_else(|| from.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "model".into());
            let options = ExportOptions {
                external_data: match external_data {
                    ExternalDataArg::Auto => ExternalData::Auto,
                    ExternalDataArg::Always => ExternalData::Always,
                    ExternalDataArg::Never => ExternalData::Never,
                },
                attention: match attention {
                    AttentionArg::Standard => AttentionKind::Standard,
                    AttentionArg::Gqa => AttentionKind::GroupQueryAttention,
                },
                overwrite,
                ..ExportOptions::new(name, version)
            };
            let manifest = export_bundle(&from, &out, &options)
                .with_context(|| format!("exporting {} to {}", from.display(), out.display()))?;
            let bytes: u64 = manifest.files.values().map(|f| f.size).sum();
            println!(
                "exported {} v{} ({} layers, vocab {}) to {}: {} files, {:.1} MB",
                manifest.name,
                manifest.version,
                manifest.architecture.num_hidden_layers,
                manifest.architecture.vocab_size,
                out.display(),
                manifest.files.len(),
                bytes as f64 / 1e6
            );
        }
    }
    Ok(())
}
