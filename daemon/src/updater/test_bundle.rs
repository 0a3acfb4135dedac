//! Small synthetic bundles for the updater's unit tests: real manifests with real digests, optionally
//! signed, placed into slots the way staging would.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use tandem_core::bundle::signature::{SigningKey, sign_manifest};
use tandem_core::bundle::{
    BUNDLE_FORMAT_VERSION, BundleManifest, DecoderIo, FileDigest, MANIFEST_FILE, MODEL_FILE,
    ModelArchitecture, Provenance, TOKENIZER_FILE,
};

use super::slots::{Slots, StagedBundle, StagingStart};
use super::state::BundleId;

/// Writes bundle `version` (its files differ per version) into `dir`; returns its id.
pub(crate) fn write_bundle(dir: &Path, version: &str, key: Option<&SigningKey>) -> BundleId {
    fs::create_dir_all(dir).unwrap();
    let files: BTreeMap<&str, Vec<u8>> = BTreeMap::from([
        (MODEL_FILE, format!("graph of version {version}").into_bytes()),
        (TOKENIZER_FILE, b"{}".to_vec()),
    ]);
    for (name, bytes) in &files {
        fs::write(dir.join(name), bytes).unwrap();
    }
    let mut manifest = BundleManifest {
        format: BUNDLE_FORMAT_VERSION,
        name: "tiny".into(),
        version: version.into(),
        architecture: ModelArchitecture {
            model_type: "qwen2".into(),
            vocab_size: 512,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            context_length: 256,
            tie_word_embeddings: true,
        },
        chat_template: None,
        help_marker: tandem_core::help_marker::HELP_MARKER.into(),
        eos_token_ids: vec![2],
        io: DecoderIo { position_ids: true, kv_dtype: "float32".into(), opset: 17 },
        files: files.iter().map(|(name, bytes)| (name.to_string(), FileDigest::of_bytes(bytes))).collect(),
        provenance: Provenance::default(),
        evaluation: BTreeMap::new(),
        signature: None,
    };
    if let Some(key) = key {
        sign_manifest(&mut manifest, key);
    }
    let text = manifest.to_json_pretty();
    fs::write(dir.join(MANIFEST_FILE), &text).unwrap();
    BundleId {
        name: "tiny".into(),
        version: version.into(),
        manifest_sha256: FileDigest::of_bytes(text.as_bytes()).sha256,
    }
}

/// Stages bundle `version` into `slots` without a download: the state-file steps of staging, with
/// the files written directly.
pub(crate) fn stage_locally(slots: &mut Slots, version: &str, key: Option<&SigningKey>) -> StagedBundle {
    let scratch = tempfile::tempdir().unwrap();
    let bundle = write_bundle(scratch.path(), version, key);
    let (slot, dir, start) = slots.begin_staging(&bundle).unwrap();
    if start != StagingStart::AlreadyReady {
        for entry in fs::read_dir(scratch.path()).unwrap() {
            let entry = entry.unwrap();
            fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    slots.mark_ready(slot, &bundle).unwrap()
}
