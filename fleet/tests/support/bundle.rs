//! Small signed model bundles for registry and rollout tests (fake graph bytes: nothing loads them).

use std::path::{Path, PathBuf};

use tandem_core::bundle::signature::{SigningKey, public_key_file, sign_manifest};
use tandem_core::bundle::{
    BUNDLE_FORMAT_VERSION, BundleManifest, DecoderIo, FileDigest, MANIFEST_FILE, MODEL_FILE,
    ModelArchitecture, Provenance, TOKENIZER_FILE,
};

/// A registry in `dir/registry` trusting only `trusted_keys`.
pub fn registry_trusting(dir: &Path, trusted_keys: Vec<PathBuf>) -> tandem_fleet::config::RegistryConfig {
    tandem_fleet::config::RegistryConfig { dir: dir.join("registry"), trusted_keys, public_url: None }
}

/// A deterministic signing key.
pub fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// Writes `key`'s public key file into `dir` and returns its path.
pub fn public_key(dir: &Path, key: &SigningKey) -> PathBuf {
    let path = dir.join(format!("key-{}.pub", tandem_core::bundle::signature::key_id(&key.verifying_key())));
    std::fs::write(&path, public_key_file(&key.verifying_key())).unwrap();
    path
}

/// Writes a bundle `name` `version` whose graph is `graph` into a new folder under `parent`,
/// signed by `key` when given; returns the folder.
pub fn write_bundle(
    parent: &Path,
    name: &str,
    version: &str,
    graph: &[u8],
    key: Option<&SigningKey>,
) -> PathBuf {
    let dir = parent.join(format!("{name}-{version}-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let tokenizer = br#"{"model":"tiny"}"#;
    std::fs::write(dir.join(MODEL_FILE), graph).unwrap();
    std::fs::write(dir.join(TOKENIZER_FILE), tokenizer).unwrap();
    let mut manifest = BundleManifest {
        format: BUNDLE_FORMAT_VERSION,
        name: name.into(),
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
        files: [(MODEL_FILE, graph), (TOKENIZER_FILE, &tokenizer[..])]
            .into_iter()
            .map(|(file, bytes)| (file.to_string(), FileDigest::of_bytes(bytes)))
            .collect(),
        provenance: Provenance { parent_version: Some("0".into()), ..Provenance::default() },
        evaluation: [("accuracy".to_string(), 0.75)].into_iter().collect(),
        signature: None,
    };
    if let Some(key) = key {
        sign_manifest(&mut manifest, key);
    }
    std::fs::write(dir.join(MANIFEST_FILE), manifest.to_json_pretty()).unwrap();
    dir
}
