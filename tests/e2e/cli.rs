//! `tandemd generate` as a user runs it.

use std::process::Command;

use tandem_train::model::presets::Preset;

use crate::fixtures::{ExportedModel, tandemd_binary};

fn generate(args: &[&str]) -> std::process::Output {
    Command::new(tandemd_binary()).arg("generate").args(args).output().unwrap()
}

#[test]
fn generate_json_reports_text_ids_timings_and_provider() {
    let exported = ExportedModel::preset(Preset::TinyQwen2, 31);
    let model = exported.bundle.to_str().unwrap();
    let out =
        generate(&["--model", model, "--prompt", "Using the numbers", "--max-new-tokens", "8", "--json"]);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.trim().lines().count(), 1, "exactly one JSON object: {stdout}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let ids = v["ids"].as_array().unwrap();
    assert!(!ids.is_empty() && ids.len() <= 8);
    assert!(v["text"].is_string());
    assert!(v["ttft_ms"].as_f64().unwrap() > 0.0);
    assert!(v["decode_tok_s"].is_number() || ids.len() < 2);
    assert_eq!(v["provider"], "cpu");
}

#[test]
fn generate_with_the_same_seed_is_reproducible_and_prompt_ids_need_no_tokenizer() {
    let exported = ExportedModel::preset(Preset::TinyLlama, 32);
    std::fs::remove_file(exported.bundle.join("tokenizer.json")).unwrap();
    let model = exported.bundle.to_str().unwrap();
    let run = |seed: &str| {
        let out = generate(&[
            "--model",
            model,
            "--prompt-ids",
            "1,2,3,4",
            "--max-new-tokens",
            "12",
            "--temperature",
            "0.9",
            "--top-p",
            "0.95",
            "--seed",
            seed,
            "--ignore-eos",
            "--json",
        ]);
        assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["ids"].clone()
    };
    assert_eq!(run("7"), run("7"));
    assert_eq!(run("7").as_array().unwrap().len(), 12);
}

#[test]
fn generate_explains_what_to_do_when_onnx_runtime_is_missing() {
    let exported = ExportedModel::preset(Preset::TinyQwen2, 33);
    let out = Command::new(tandemd_binary())
        .args([
            "generate",
            "--model",
            exported.bundle.to_str().unwrap(),
            "--prompt-ids",
            "1,2",
            "--max-new-tokens",
            "2",
        ])
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("make ort"), "stderr must say how to get ONNX Runtime: {stderr}");
}

#[test]
fn generate_rejects_a_missing_model_directory_with_a_clear_message() {
    let out = generate(&["--model", "/nonexistent/bundle", "--prompt", "hi", "--max-new-tokens", "2"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/bundle"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
