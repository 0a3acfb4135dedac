//! `tandem-train`: create models, make task data, train them (GAPG, baselines, warm start), evaluate
//! them with the paper's protocol, export them as Tandem bundles, serve a solver cloud, time a step.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use candle_core::Device;
use clap::{Parser, Subcommand, ValueEnum};
use rand::SeedableRng;
use tandem_core::tasks::countdown::{CountdownGenerator, GeneratorConfig};
use tandem_core::tasks::dataset::{TaskRecord, write_records};
use tandem_core::tasks::templates::PromptTemplate;
use tandem_train::chat_format::ChatFormat;
use tandem_train::cloud::solver::{SolverOptions, SolverServer};
use tandem_train::eval::{CandleGenerator, evaluate};
use tandem_train::export::{AttentionKind, ExportOptions, ExternalData, export_bundle};
use tandem_train::model::HfCheckpoint;
use tandem_train::model::presets::Preset;
use tandem_train::model::{DEFAULT_INIT_STD, TrainableModel};
use tandem_train::run::bench::{BenchSettings, bench_gapg_step};
use tandem_train::run::trainer::{CLOUD_CACHE_FILE, FINAL_DIR, describe_eval, device_from_name, open_cloud};
use tandem_train::run::{ProgressMode, RunConfig, Trainer};
use tandem_train::signing;
use tandem_train::task::TaskKind;
use tandem_train::task::sft_data::{countdown_examples, write_examples};
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
        /// More text to train the tokenizer on, on top of the built-in corpus (for example the prompt
        /// templates a run uses, so they take few tokens).
        #[arg(long, value_name = "FILE")]
        extra_corpus: Option<PathBuf>,
    },
    /// Write Countdown data: train.jsonl and test.jsonl (task records, disjoint), sft.jsonl
    /// (solver-written worked solutions of the training problems, some ending with the help marker)
    /// and corpus.txt (prompts and responses, for `init --extra-corpus`).
    MakeData {
        /// Output folder.
        #[arg(long)]
        out_dir: PathBuf,
        /// Training problems.
        #[arg(long, default_value_t = 5000)]
        train: usize,
        /// Test problems.
        #[arg(long, default_value_t = 1000)]
        test: usize,
        /// Seed of the generator.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Fewest numbers per problem.
        #[arg(long, default_value_t = 3)]
        min_count: usize,
        /// Most numbers per problem.
        #[arg(long, default_value_t = 4)]
        max_count: usize,
        /// Largest number drawn.
        #[arg(long, default_value_t = 99)]
        max_number: u32,
        /// Largest target.
        #[arg(long, default_value_t = 100)]
        max_target: i64,
        /// Share of warm-start examples that ask for help instead of solving (random problems).
        #[arg(long, default_value_t = 0.1)]
        sft_help_fraction: f64,
    },
    /// Train as a run configuration says (see configs/train-countdown.toml).
    Train {
        /// The run configuration (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Continue the run in run.out_dir from its latest checkpoint.
        #[arg(long)]
        resume: bool,
        /// No progress bar (it is also off when stderr is not a terminal).
        #[arg(long)]
        quiet: bool,
    },
    /// Evaluate a checkpoint with the paper's protocol (greedy, capped help calls in arrival order),
    /// using the task, cloud and [eval] settings of a run configuration.
    Eval {
        /// The run configuration (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Checkpoint folder to evaluate (default: the run's final model).
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Write the full report (with per-problem predictions) here as JSON.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Serve the exact Countdown solver as an OpenAI-compatible cloud (POST /v1/chat/completions).
    SolverCloud {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8900")]
        listen: SocketAddr,
        /// Share of questions answered with no solution (fixed by hash).
        #[arg(long, default_value_t = 0.0)]
        error_rate: f64,
    },
    /// Time GAPG steps (rollouts + update) of a checkpoint on fixed prompts; prints JSON.
    BenchStep {
        /// Checkpoint folder.
        #[arg(long)]
        checkpoint: PathBuf,
        /// File with one prompt per line (cycled).
        #[arg(long)]
        prompts_file: PathBuf,
        /// Prompts per step.
        #[arg(long, default_value_t = 8)]
        prompts: usize,
        /// Samples per prompt.
        #[arg(long, default_value_t = 8)]
        group_size: usize,
        /// Tokens generated per sample (exactly).
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        /// Timed steps.
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Untimed steps first.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
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
        /// The training run that produced the checkpoint (its out_dir): the sha256 of its
        /// configuration and data files and its final evaluation are recorded in the manifest.
        #[arg(long, value_name = "RUN_DIR")]
        run: Option<PathBuf>,
        /// Version of the bundle the checkpoint was trained from, recorded in the manifest.
        #[arg(long)]
        parent_version: Option<String>,
    },
    /// Create an ed25519 key pair for signing bundles: NAME.key (secret, mode 0600) and NAME.pub
    /// (for the devices' `trusted_bundle_keys`).
    Keygen {
        /// Folder to write the key files into (created if needed).
        #[arg(long)]
        out: PathBuf,
        /// File name of the keys, without extension.
        #[arg(long, default_value = "tandem-signing")]
        name: String,
    },
    /// Sign a bundle in place, after checking that its files match its manifest.
    Sign {
        /// The secret key file (NAME.key from `keygen`).
        #[arg(long)]
        key: PathBuf,
        /// The bundle folder.
        #[arg(long)]
        bundle: PathBuf,
    },
    /// Check a bundle's signature and files as a device does before loading it.
    Verify {
        /// A trusted public key file (NAME.pub); repeat to trust several.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// The bundle folder.
        #[arg(long)]
        bundle: PathBuf,
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
    tandem_train::allocator::keep_freed_memory();
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
        Command::Init { preset, out, seed, init_std, tokenizer_vocab, extra_corpus } => {
            let config = preset.config();
            anyhow::ensure!(
                tokenizer_vocab <= config.vocab_size,
                "--tokenizer-vocab {tokenizer_vocab} exceeds the model's vocabulary of {}",
                config.vocab_size
            );
            let model = TrainableModel::random(&config, init_std, seed, &Device::Cpu)
                .context("creating random weights")?;
            model.save(&out).with_context(|| format!("writing the checkpoint to {}", out.display()))?;
            let corpus = match &extra_corpus {
                Some(path) => {
                    let extra = std::fs::read_to_string(path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    format!("{DEFAULT_CORPUS}\n{extra}")
                }
                None => DEFAULT_CORPUS.to_string(),
            };
            train_bpe_tokenizer(&corpus, tokenizer_vocab, &out.join("tokenizer.json"))?;
            std::fs::write(out.join("tokenizer_config.json"), tokenizer_config_json())
                .with_context(|| format!("writing {}", out.join("tokenizer_config.json").display()))?;
            println!("created a {preset:?} model (seed {seed}) in {}", out.display());
        }
        Command::Export {
            from,
            out,
            name,
            version,
            external_data,
            attention,
            overwrite,
            run,
            parent_version,
        } => {
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
                parent_version,
                run: run
                    .as_deref()
                    .map(tandem_train::export::run_record::read_run_record)
                    .transpose()
                    .context("reading the training run for the manifest")?,
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
        Command::Keygen { out, name } => {
            let keys = signing::generate_key_pair(&out, &name)?;
            println!("key id {}", keys.key_id);
            println!("secret key: {} (keep it secret)", keys.secret.display());
            println!("public key: {} (give it to the devices)", keys.public.display());
        }
        Command::Sign { key, bundle } => {
            let signed = signing::sign_bundle(&bundle, &signing::read_secret_key(&key)?)?;
            let manifest = &signed.manifest;
            let key_id = manifest.signature.as_ref().map_or("", |s| s.key_id.as_str());
            println!(
                "signed {} v{} in {} with key {key_id}",
                manifest.name,
                manifest.version,
                bundle.display()
            );
            if let Some(previous) = signed.replaced_key_id {
                println!("(replaced the signature by key {previous})");
            }
        }
        Command::Verify { keys, bundle } => {
            let trusted = keys.iter().map(|k| signing::read_public_key(k)).collect::<Result<Vec<_>, _>>()?;
            let (manifest, key_id) = signing::verify_bundle(&bundle, &trusted)?;
            println!(
                "OK: {} v{} in {} is signed by key {key_id} and its {} files match the manifest",
                manifest.name,
                manifest.version,
                bundle.display(),
                manifest.files.len()
            );
        }
        Command::MakeData {
            out_dir,
            train,
            test,
            seed,
            min_count,
            max_count,
            max_number,
            max_target,
            sft_help_fraction,
        } => {
            anyhow::ensure!(
                (0.0..=1.0).contains(&sft_help_fraction),
                "--sft-help-fraction must be in [0, 1]"
            );
            let config = GeneratorConfig {
                min_count,
                max_count,
                max_number,
                max_target,
                ..GeneratorConfig::default()
            };
            let mut generator = CountdownGenerator::new(config, seed)?;
            let problems = generator.distinct(train + test).context("generating distinct problems")?;
            let (train_set, test_set) = problems.split_at(train);
            std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
            for (name, set) in [("train", train_set), ("test", test_set)] {
                let records: Vec<TaskRecord> = set
                    .iter()
                    .enumerate()
                    .map(|(i, p)| TaskRecord::from_countdown(p, Some(format!("countdown-{name}-{i}"))))
                    .collect();
                let path = out_dir.join(format!("{name}.jsonl"));
                let file =
                    std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
                write_records(std::io::BufWriter::new(file), &records)?;
            }
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5f7);
            let examples = countdown_examples(train_set, sft_help_fraction, &mut rng);
            let path = out_dir.join("sft.jsonl");
            let file =
                std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            write_examples(std::io::BufWriter::new(file), &examples)?;
            // Text for `init --extra-corpus`: the prompts and responses a run will see, as often as it
            // will see them, so a tokenizer trained with it encodes them in few tokens.
            let mut corpus = TaskKind::Countdown.template(false).system_prompt();
            corpus.push('\n');
            for example in &examples {
                corpus.push_str(&PromptTemplate::COUNTDOWN.system_prompt());
                corpus.push('\n');
                corpus.push_str(&PromptTemplate::COUNTDOWN.user_prompt(&example.prompt));
                corpus.push('\n');
                corpus.push_str(&example.completion);
                corpus.push('\n');
            }
            let path = out_dir.join("corpus.txt");
            std::fs::write(&path, corpus).with_context(|| format!("writing {}", path.display()))?;
            println!(
                "wrote {} training, {} test and {} warm-start examples to {}",
                train_set.len(),
                test_set.len(),
                examples.len(),
                out_dir.display()
            );
        }
        Command::Train { config, resume, quiet } => {
            let run = RunConfig::load(&config)?;
            let trainer = Trainer::prepare(run, resume)?;
            let progress = match (quiet, std::io::stderr().is_terminal()) {
                (true, _) => ProgressMode::Quiet,
                (false, true) => ProgressMode::Bar,
                (false, false) => ProgressMode::Lines,
            };
            let summary = trainer.run(progress)?;
            println!("finished {} steps in {}", summary.steps, summary.out_dir.display());
            println!("final model: {}", summary.final_model.display());
            if let Some(report) = &summary.eval {
                println!("{}", describe_eval(report));
            }
            for plot in &summary.plots {
                println!("plot: {}", plot.display());
            }
        }
        Command::Eval { config, checkpoint, out } => {
            let run = RunConfig::load(&config)?;
            let eval = run.eval.clone().context("the configuration has no [eval] section")?;
            let test_path = run.task.test.clone().context("the configuration has no task.test")?;
            let cloud_section = run.cloud.clone().context("the configuration has no [cloud] section")?;
            let dir = checkpoint.unwrap_or_else(|| run.run.out_dir.join(FINAL_DIR));
            let device = device_from_name(&run.run.device)?;
            let source = HfCheckpoint::open(&dir)?;
            let model = TrainableModel::from_checkpoint(&source, &device)?;
            let format = ChatFormat::load(&source.dir, &source.config.eos_token_ids)?;
            let mut problems = run.task.kind.load(&test_path)?;
            if eval.problems > 0 {
                problems.truncate(eval.problems);
            }
            std::fs::create_dir_all(&run.run.out_dir)?;
            let (mut cloud, _server) = open_cloud(&cloud_section, &run.run.out_dir.join(CLOUD_CACHE_FILE))?;
            let mut generator = CandleGenerator::new(&model.decoder, &format);
            let template = run.task.kind.template(run.task.offers_help);
            let report = evaluate(
                &mut generator,
                &format,
                run.task.kind,
                template,
                &problems,
                cloud.as_mut(),
                &eval.settings(run.run.seed),
            )?;
            println!("{}", describe_eval(&report));
            if let Some(path) = out {
                std::fs::write(&path, serde_json::to_string_pretty(&report)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
        Command::SolverCloud { listen, error_rate } => {
            anyhow::ensure!((0.0..=1.0).contains(&error_rate), "--error-rate must be in [0, 1]");
            let server = SolverServer::spawn(listen, SolverOptions { error_rate })?;
            println!("solver cloud listening on {} (POST /v1/chat/completions)", server.url());
            // Serves until the process is stopped.
            loop {
                std::thread::park();
            }
        }
        Command::BenchStep {
            checkpoint,
            prompts_file,
            prompts,
            group_size,
            max_new_tokens,
            steps,
            warmup,
        } => {
            let text = std::fs::read_to_string(&prompts_file)
                .with_context(|| format!("reading {}", prompts_file.display()))?;
            let lines: Vec<String> =
                text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect();
            let settings =
                BenchSettings { prompts, group_size, max_new_tokens, steps, warmup, lr: 1e-4, seed: 0 };
            let report = bench_gapg_step(&checkpoint, &lines, &settings)?;
            println!("{}", serde_json::to_string(&report)?);
        }
    }
    Ok(())
}
