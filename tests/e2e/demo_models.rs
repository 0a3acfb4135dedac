//! The committed demo bundles under models/ (made by `make models`): signed by the demo key, every
//! file intact, under the 6 MB the demo allows, with their provenance and evaluation recorded, and
//! served by tandemd's engine; v1's committed trainer checkpoint (what `make demo`'s retraining job
//! starts from) is the model v1 serves.

use std::path::{Path, PathBuf};
use std::process::Command;

use tandemd::bundle_trust::{load_trusted_keys, verify_model_dir};

use tandem_train::export::{ExportOptions, export_bundle};

use crate::fixtures::tandemd_binary;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

#[test]
fn the_committed_demo_bundles_verify_stay_small_record_their_run_and_generate() {
    let key = repo().join("models/keys/demo.pub");
    let trusted = load_trusted_keys(std::slice::from_ref(&key)).unwrap();
    for version in ["1", "2"] {
        let dir = repo().join(format!("models/countdown-tiny-v{version}"));
        let verified = verify_model_dir(&dir, &trusted).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        assert_eq!((verified.name.as_str(), verified.version.as_str()), ("countdown-tiny", version));

        let bytes: u64 = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
        assert!(bytes < 6_000_000, "{}: {bytes} bytes, over the demo's 6 MB", dir.display());

        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        assert!(manifest["evaluation"]["overall_accuracy"].is_f64(), "{manifest}");
        assert!(manifest["provenance"]["training_config_sha256"].is_string(), "{manifest}");
        let data = manifest["provenance"]["data_sha256"].as_object().expect("data digests");
        assert!(data.contains_key("test.jsonl") && data.len() == 2, "{manifest}");

        let output = Command::new(tandemd_binary())
            .args(["generate", "--model"])
            .arg(&dir)
            .arg("--trusted-key")
            .arg(&key)
            .args(["--prompt", "Using the numbers [8, 4, 3], reach 5.", "--max-new-tokens", "8"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stderr}");
        assert!(
            stderr.contains("prompt tokens")
                || String::from_utf8_lossy(&output.stdout).contains("prompt tokens")
        );
    }
}

#[test]
fn the_committed_v1_checkpoint_exports_to_the_committed_v1_model_byte_for_byte() {
    let out = tempfile::tempdir().unwrap();
    let bundle = out.path().join("v1");
    let checkpoint = repo().join("models/checkpoints/countdown-tiny-v1");
    let written = export_bundle(&checkpoint, &bundle, &ExportOptions::new("countdown-tiny", "1")).unwrap();
    let committed: serde_json::Value = serde_json::from_slice(
        &std::fs::read(repo().join("models/countdown-tiny-v1/manifest.json")).unwrap(),
    )
    .unwrap();
    let model = &written.files["model.onnx"];
    assert_eq!(
        (model.sha256.as_str(), model.size),
        (
            committed["files"]["model.onnx"]["sha256"].as_str().unwrap(),
            committed["files"]["model.onnx"]["size"].as_u64().unwrap()
        )
    );
}
