//! Evaluation through the daemon's ONNX Runtime engine agrees with evaluation in candle: a tiny model
//! exported as a bundle gives identical predictions (every token, every help decision, every
//! fallback answer) and identical metrics under the paper's protocol. The help tag's output row is
//! scaled up so the model asks for help often enough to exercise both the admitted and the refused
//! path. Needs ONNX Runtime (`make ort`, or `ORT_DYLIB_PATH`).

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use tandem_core::help_marker::HELP_OPEN_TAG;
use tandem_core::tasks::dataset::TaskRecord;
use tandem_core::tasks::templates::PromptTemplate;
use tandem_train::chat_format::ChatFormat;
use tandem_train::cloud::CachedCloud;
use tandem_train::cloud::cache::CloudCache;
use tandem_train::cloud::solver::SolverCloud;
use tandem_train::eval::{CandleGenerator, EvalError, EvalReport, EvalSettings, GreedyGenerator, evaluate};
use tandem_train::export::{ExportOptions, export_bundle};
use tandem_train::model::presets::Preset;
use tandem_train::model::{HfCheckpoint, TrainableModel};
use tandem_train::task::{Problem, TaskKind};
use tandem_train::tokenizer_training::{DEFAULT_CORPUS, tokenizer_config_json, train_bpe_tokenizer};
use tandemd::engine::{Engine, EngineConfig, GenerationParams};

/// Greedy decoding with the daemon's engine, stopping at the help tag as the daemon's router does.
struct EngineGenerator {
    engine: Engine,
}

impl GreedyGenerator for EngineGenerator {
    fn generate(
        &mut self,
        prompts: &[Vec<u32>],
        max_new_tokens: usize,
        banned: &[u32],
    ) -> Result<Vec<Vec<u32>>, EvalError> {
        let params = GenerationParams {
            stop_strings: vec![HELP_OPEN_TAG.to_string()],
            banned_token_ids: banned.to_vec(),
            ..GenerationParams::greedy(max_new_tokens)
        };
        let generations =
            self.engine.generate(prompts, &params, |_| {}).map_err(|e| EvalError::Generate(e.to_string()))?;
        Ok(generations.into_iter().map(|g| g.ids).collect())
    }
}

fn ort_library() -> PathBuf {
    let path = std::env::var_os("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.ort/libonnxruntime.so"));
    assert!(
        path.exists(),
        "ONNX Runtime not found at {}: run `make ort` or set ORT_DYLIB_PATH",
        path.display()
    );
    path
}

fn problems() -> Vec<Problem> {
    let config = tandem_core::tasks::countdown::GeneratorConfig {
        min_count: 3,
        max_count: 3,
        max_number: 20,
        max_target: 50,
        ..Default::default()
    };
    tandem_core::tasks::countdown::CountdownGenerator::new(config, 17)
        .unwrap()
        .distinct(16)
        .unwrap()
        .into_iter()
        .map(|p| Problem { record: TaskRecord::from_countdown(&p, None), countdown: Some(p) })
        .collect()
}

fn run(generator: &mut dyn GreedyGenerator, format: &ChatFormat, cache: PathBuf) -> EvalReport {
    let mut cloud = CachedCloud::new(SolverCloud::default(), CloudCache::open(&cache).unwrap());
    let settings =
        EvalSettings { call_cap: 0.3, max_new_tokens: 20, batch_size: 6, baselines: true, seed: 3 };
    evaluate(
        generator,
        format,
        TaskKind::Countdown,
        PromptTemplate::COUNTDOWN,
        &problems(),
        &mut cloud,
        &settings,
    )
    .unwrap()
}

#[test]
fn the_exported_bundle_on_the_daemon_engine_makes_the_same_predictions_as_candle() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("checkpoint");
    let model = TrainableModel::random(&Preset::TinyLlama.config(), 0.2, 61, &Device::Cpu).unwrap();
    let mut tensors = model.tensors();
    let head = tensors["lm_head.weight"].clone();
    let help_row = (head.narrow(0, 3, 1).unwrap() * 6.0).unwrap();
    let boosted = Tensor::cat(
        &[head.narrow(0, 0, 3).unwrap(), help_row, head.narrow(0, 4, head.dim(0).unwrap() - 4).unwrap()],
        0,
    )
    .unwrap();
    tensors.insert("lm_head.weight".into(), boosted);
    tandem_train::model::checkpoint::save_checkpoint(&checkpoint, model.decoder.config(), &tensors).unwrap();
    train_bpe_tokenizer(DEFAULT_CORPUS, 400, &checkpoint.join("tokenizer.json")).unwrap();
    std::fs::write(checkpoint.join("tokenizer_config.json"), tokenizer_config_json()).unwrap();
    let bundle = dir.path().join("bundle");
    export_bundle(&checkpoint, &bundle, &ExportOptions::new("agreement", "1")).unwrap();

    let source = HfCheckpoint::open(&checkpoint).unwrap();
    let candle_model = TrainableModel::from_checkpoint(&source, &Device::Cpu).unwrap();
    let format = ChatFormat::load(&checkpoint, &source.config.eos_token_ids).unwrap();
    let from_candle =
        run(&mut CandleGenerator::new(&candle_model.decoder, &format), &format, dir.path().join("a.jsonl"));

    let config = EngineConfig { ort_library: Some(ort_library()), ..EngineConfig::default() };
    let engine = Engine::load(&bundle, &config).unwrap();
    let from_engine = run(&mut EngineGenerator { engine }, &format, dir.path().join("b.jsonl"));

    let admitted = from_candle.predictions.iter().filter(|p| p.admitted).count();
    let refused = from_candle.predictions.iter().filter(|p| p.asked_for_help && !p.admitted).count();
    assert!(admitted > 0 && refused > 0, "both paths exercised: {admitted} admitted, {refused} refused");
    for (i, (a, b)) in from_candle.predictions.iter().zip(&from_engine.predictions).enumerate() {
        assert_eq!(a, b, "problem {i}: candle and the engine disagree");
    }
    assert_eq!(from_candle, from_engine);
}
