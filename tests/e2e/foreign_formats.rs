//! The engine on model folders laid out the way other exporters write them, built from Tandem
//! exports with the Tandem-only files removed: an onnxruntime-genai model-builder folder
//! (`genai_config.json`, a `GroupQueryAttention` graph without `position_ids`, keys before values,
//! symbolic cache head size) and an optimum/torch folder (`model.onnx` with the Hugging Face
//! `config.json`). Each must be recognised, read from its own metadata and give candle's tokens.

use std::fs;
use std::path::Path;

use tandem_core::bundle::{GENAI_CONFIG_FILE, MANIFEST_FILE};
use tandem_core::kv_io::{self, KvKind};
use tandem_train::export::{AttentionKind, ExportOptions, ExternalData};
use tandem_train::model::ModelConfig;
use tandem_train::model::presets::Preset;
use tandemd::engine::{Engine, EngineError, GenerationParams, ModelFormat, TensorSpec};

use crate::fixtures::{ExportedModel, candle_greedy, cpu_config, load_engine};
use crate::parity::assert_lockstep_parity;

const NEW_TOKENS: usize = 24;
const PROMPT: [u32; 7] = [5, 17, 42, 99, 123, 7, 300];

/// Random weights never reliably hit an end-of-sequence token: compare the full length.
fn config_without_eos(preset: Preset) -> ModelConfig {
    let mut config = preset.config();
    config.eos_token_ids.clear();
    config
}

fn export_with_group_query_attention(config: &ModelConfig, seed: u64) -> ExportedModel {
    let options = ExportOptions {
        attention: AttentionKind::GroupQueryAttention,
        external_data: ExternalData::Never,
        ..ExportOptions::new("genai-style", "1")
    };
    ExportedModel::with_options(config, seed, options)
}

/// The graph's inputs as ONNX Runtime lists them, in the graph's own order.
fn graph_inputs(engine: &mut Engine) -> Vec<TensorSpec> {
    engine.session().session().inputs().iter().map(TensorSpec::from_outlet).collect()
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn genai_builder_style_folder_without_position_ids_gives_candles_greedy_tokens() {
    let config = config_without_eos(Preset::TinyQwen2);
    let exported = export_with_group_query_attention(&config, 21);
    fs::remove_file(exported.bundle.join(MANIFEST_FILE)).unwrap();
    assert_eq!(file_names(&exported.bundle), [GENAI_CONFIG_FILE, "model.onnx", "tokenizer.json"]);

    let mut engine = load_engine(&exported.bundle);
    assert_eq!(engine.model().format, ModelFormat::Genai);
    assert!(engine.model().manifest.is_none());
    let inputs = graph_inputs(&mut engine);
    assert!(inputs.iter().all(|i| i.name != kv_io::POSITION_IDS), "the graph has no position_ids");
    let past_key = inputs.iter().find(|i| i.name == kv_io::past_name(0, KvKind::Key)).unwrap();
    assert_eq!(past_key.shape[3], -1, "the graph leaves the cache head size symbolic");
    let layout = engine.layout();
    assert!(!layout.has_position_ids);
    assert_eq!(engine.model().head_dim, Some(config.head_dim), "head_size of genai_config.json");
    assert_eq!(layout.head_dim, config.head_dim);
    assert_eq!(layout.kv_heads, config.num_key_value_heads);

    let generations =
        engine.generate(&[PROMPT.to_vec()], &GenerationParams::greedy(NEW_TOKENS), |_| {}).unwrap();
    assert_eq!(generations.len(), 1);
    assert_eq!(generations[0].ids.len(), NEW_TOKENS);
    assert_eq!(generations[0].ids, candle_greedy(&exported.model.decoder, &PROMPT, NEW_TOKENS));
}

#[test]
fn kv_inputs_are_matched_by_name_not_position() {
    let config = config_without_eos(Preset::TinyLlama);
    let exported = export_with_group_query_attention(&config, 22);
    let mut engine = load_engine(&exported.bundle);
    let layers = config.num_hidden_layers;

    // The graph lists every key before every value, as onnxruntime-genai's builder does ...
    let graph_order: Vec<String> = graph_inputs(&mut engine).into_iter().skip(2).map(|i| i.name).collect();
    let keys_then_values: Vec<String> = [KvKind::Key, KvKind::Value]
        .into_iter()
        .flat_map(|kind| (0..layers).map(move |layer| kv_io::past_name(layer, kind)))
        .collect();
    assert_eq!(graph_order, keys_then_values);
    // ... while the engine pairs each layer's key and value by name.
    let by_layer: Vec<String> = (0..layers)
        .flat_map(|layer| [kv_io::past_name(layer, KvKind::Key), kv_io::past_name(layer, KvKind::Value)])
        .collect();
    assert_eq!(engine.layout().past_names, by_layer);
    drop(engine);

    // Logits within 1e-4 of candle through prefill and every decode step: each cache went back in
    // under its own name.
    assert_lockstep_parity(&exported, &[PROMPT.to_vec()]);
}

#[test]
fn optimum_style_folder_with_config_json_is_loaded_by_name() {
    let config = Preset::TinyLlama.config();
    assert!(!config.eos_token_ids.is_empty(), "the test checks that config.json's EOS ids are used");
    let exported = ExportedModel::new(&config, 23, ExternalData::Never);
    fs::remove_file(exported.bundle.join(MANIFEST_FILE)).unwrap();
    fs::remove_file(exported.bundle.join(GENAI_CONFIG_FILE)).unwrap();
    fs::copy(exported.checkpoint.join("config.json"), exported.bundle.join("config.json")).unwrap();
    assert_eq!(file_names(&exported.bundle), ["config.json", "model.onnx", "tokenizer.json"]);

    let mut engine = load_engine(&exported.bundle);
    assert_eq!(engine.model().format, ModelFormat::Plain);
    assert!(engine.layout().has_position_ids);
    assert_eq!(engine.limits().eos_token_ids, config.eos_token_ids);
    assert_eq!(engine.limits().context_length, Some(config.max_position_embeddings));

    // Random weights may choose an EOS id early; generate through it to compare the full length.
    let params = GenerationParams { ignore_eos: true, ..GenerationParams::greedy(NEW_TOKENS) };
    let generations = engine.generate(&[PROMPT.to_vec()], &params, |_| {}).unwrap();
    assert_eq!(generations[0].ids.len(), NEW_TOKENS);
    assert_eq!(generations[0].ids, candle_greedy(&exported.model.decoder, &PROMPT, NEW_TOKENS));
}

#[test]
fn genai_config_naming_a_missing_decoder_file_is_an_error_naming_that_file() {
    let exported = export_with_group_query_attention(&config_without_eos(Preset::TinyQwen2), 24);
    fs::remove_file(exported.bundle.join(MANIFEST_FILE)).unwrap();
    let genai_path = exported.bundle.join(GENAI_CONFIG_FILE);
    let mut genai: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&genai_path).unwrap()).unwrap();
    genai["model"]["decoder"]["filename"] = "decoder_model_merged.onnx".into();
    fs::write(&genai_path, serde_json::to_string_pretty(&genai).unwrap()).unwrap();

    let err = Engine::load(&exported.bundle, &cpu_config()).unwrap_err();
    assert!(
        matches!(&err, EngineError::ModelFileMissing { path } if path.ends_with("decoder_model_merged.onnx")),
        "{err:?}"
    );
    assert!(err.to_string().contains("decoder_model_merged.onnx"), "{err}");
}

#[test]
fn uneven_prompts_on_a_graph_without_position_ids_still_give_each_prompt_its_own_tokens() {
    let config = config_without_eos(Preset::TinyLlama);
    let exported = export_with_group_query_attention(&config, 24);
    let mut engine = load_engine(&exported.bundle);
    let prompts = vec![PROMPT.to_vec(), vec![9, 8, 7], vec![100, 200, 300, 400, 500]];
    let generations = engine.generate(&prompts, &GenerationParams::greedy(NEW_TOKENS), |_| {}).unwrap();
    for (prompt, generation) in prompts.iter().zip(&generations) {
        assert_eq!(generation.ids, candle_greedy(&exported.model.decoder, prompt, NEW_TOKENS), "{prompt:?}");
    }
}
