//! Tiny models and data made on the spot: a random decoder with Tandem's own tokenizer saved as a
//! Hugging Face folder, and seeded Countdown problems with warm-start examples.

use std::path::{Path, PathBuf};

use candle_core::Device;
use rand::SeedableRng;
use tandem_core::tasks::countdown::{CountdownGenerator, CountdownProblem, GeneratorConfig};
use tandem_core::tasks::dataset::{TaskRecord, write_records};
use tandem_core::tasks::templates::PromptTemplate;
use tandem_train::chat_format::ChatFormat;
use tandem_train::model::TrainableModel;
use tandem_train::model::presets::Preset;
use tandem_train::task::sft_data::{countdown_examples, write_examples};
use tandem_train::tokenizer_training::{DEFAULT_CORPUS, tokenizer_config_json, train_bpe_tokenizer};

/// Peaked logits, so greedy decoding does not sit on near-ties.
pub const INIT_STD: f64 = 0.2;

/// Writes a random `preset` model with a trained tokenizer into `dir`.
pub fn tiny_model(dir: &Path, preset: Preset, seed: u64) -> TrainableModel {
    let model = TrainableModel::random(&preset.config(), INIT_STD, seed, &Device::Cpu).unwrap();
    model.save(dir).unwrap();
    // The prompts the tests use, as often as they see them, so they take few tokens (short tests).
    let mut corpus = DEFAULT_CORPUS.to_string();
    for problem in problems(200, 1) {
        corpus.push_str(&PromptTemplate::COUNTDOWN.system_prompt());
        corpus.push('\n');
        corpus.push_str(&PromptTemplate::COUNTDOWN.user_prompt(&problem.question()));
        corpus.push('\n');
    }
    train_bpe_tokenizer(&corpus, 512, &dir.join("tokenizer.json")).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), tokenizer_config_json()).unwrap();
    model
}

/// The chat format of a model folder.
pub fn format(dir: &Path, model: &TrainableModel) -> ChatFormat {
    ChatFormat::load(dir, &model.decoder.config().eos_token_ids).unwrap()
}

/// Small Countdown problems (3 numbers up to 20).
pub fn problems(count: usize, seed: u64) -> Vec<CountdownProblem> {
    let config = GeneratorConfig {
        min_count: 3,
        max_count: 3,
        max_number: 20,
        max_target: 50,
        ..GeneratorConfig::default()
    };
    CountdownGenerator::new(config, seed).unwrap().distinct(count).unwrap()
}

/// Writes train.jsonl, test.jsonl and sft.jsonl into `dir`; returns their paths.
pub fn countdown_data(dir: &Path, train: usize, test: usize) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let all = problems(train + test, 11);
    let (train_set, test_set) = all.split_at(train);
    let write = |name: &str, set: &[CountdownProblem]| {
        let path = dir.join(name);
        let records: Vec<_> = set.iter().map(|p| TaskRecord::from_countdown(p, None)).collect();
        write_records(std::fs::File::create(&path).unwrap(), &records).unwrap();
        path
    };
    let train_path = write("train.jsonl", train_set);
    let test_path = write("test.jsonl", test_set);
    let sft_path = dir.join("sft.jsonl");
    let examples = countdown_examples(train_set, 0.2, &mut rand_chacha::ChaCha8Rng::seed_from_u64(1));
    write_examples(std::fs::File::create(&sft_path).unwrap(), &examples).unwrap();
    (train_path, test_path, sft_path)
}

/// A TOML path string.
pub fn toml_path(path: &Path) -> String {
    path.display().to_string().replace('\\', "/")
}
