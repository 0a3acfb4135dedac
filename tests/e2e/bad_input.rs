//! Bad input gets a clear error that says what to do, never a panic.

use tandem_train::export::ExternalData;
use tandem_train::model::presets::Preset;
use tandem_train::tokenizer_training::{DEFAULT_CORPUS, train_bpe_tokenizer};
use tandemd::engine::{Engine, EngineConfig, GenerationParams, ProviderConfig};

use crate::fixtures::{ExportedModel, cpu_config};

fn load_error(dir: &std::path::Path, config: &EngineConfig) -> String {
    match Engine::load(dir, config) {
        Ok(_) => panic!("{} loaded but should have been refused", dir.display()),
        Err(e) => format!("{e}"),
    }
}

#[test]
fn a_missing_model_onnx_is_refused_naming_the_file() {
    let exported = ExportedModel::preset(Preset::TinyQwen2, 21);
    std::fs::remove_file(exported.bundle.join("model.onnx")).unwrap();
    let err = load_error(&exported.bundle, &cpu_config());
    assert!(err.contains("model.onnx"), "{err}");
}

#[test]
fn a_truncated_model_onnx_is_refused_with_advice() {
    let exported = ExportedModel::preset(Preset::TinyLlama, 22);
    let path = exported.bundle.join("model.onnx");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
    let err = load_error(&exported.bundle, &cpu_config());
    assert!(err.contains("model.onnx"), "{err}");
    assert!(err.contains("export") || err.contains("download"), "the error must say what to do: {err}");
}

#[test]
fn truncated_external_weights_are_refused() {
    let exported = ExportedModel::new(&Preset::TinyQwen2.config(), 23, ExternalData::Always);
    let path = exported.bundle.join("model.onnx.data");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_error(&exported.bundle, &cpu_config());
    assert!(err.contains("model.onnx"), "{err}");
}

#[test]
fn a_tokenizer_from_another_model_is_refused() {
    let mut config = Preset::TinyQwen2.config();
    config.vocab_size = 300;
    let exported = ExportedModel::new(&config, 24, ExternalData::Never);
    train_bpe_tokenizer(DEFAULT_CORPUS, 512, &exported.bundle.join("tokenizer.json")).unwrap();
    let err = load_error(&exported.bundle, &cpu_config());
    assert!(err.contains("300") && err.contains("tokenizer"), "{err}");
}

#[test]
fn a_prompt_longer_than_the_context_is_refused_before_running() {
    let exported = ExportedModel::preset(Preset::TinyQwen2, 25);
    let context = Preset::TinyQwen2.config().max_position_embeddings;
    let mut engine = crate::fixtures::load_engine(&exported.bundle);
    let prompt: Vec<u32> = (0..context as u32 + 10).map(|i| i % 500 + 3).collect();
    let err = engine.generate(&[prompt], &GenerationParams::greedy(4), |_| {}).unwrap_err().to_string();
    assert!(err.contains(&context.to_string()), "the error must state the limit: {err}");
    // Within the context together with max_new_tokens: fits exactly.
    let prompt: Vec<u32> = (0..context as u32 - 4).map(|i| i % 500 + 3).collect();
    let generation = engine.generate(&[prompt], &GenerationParams::greedy(4), |_| {}).unwrap();
    assert!(!generation[0].ids.is_empty());
}

#[test]
fn an_unknown_execution_provider_is_refused_listing_the_known_ones() {
    let err = ProviderConfig::parse_list("tensorrt,npu,cpu").unwrap_err().to_string();
    assert!(err.contains("npu") && err.contains("cuda") && err.contains("cpu"), "{err}");
    let toml_err = serde_json::from_str::<EngineConfig>(r#"{"execution_providers": [{"kind": "openvino"}]}"#)
        .unwrap_err()
        .to_string();
    assert!(toml_err.contains("openvino"), "{toml_err}");
}

#[test]
fn a_gpu_provider_in_strict_mode_fails_instead_of_running_on_the_cpu() {
    let exported = ExportedModel::preset(Preset::TinyQwen2, 26);
    let config = EngineConfig {
        execution_providers: ProviderConfig::parse_list("cuda").unwrap(),
        strict_providers: true,
        ..cpu_config()
    };
    let err = load_error(&exported.bundle, &config);
    assert!(err.to_lowercase().contains("cuda"), "{err}");
}
