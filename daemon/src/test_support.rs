//! Fixtures shared by the daemon's unit tests.

use std::collections::BTreeMap;

use tandem_core::bundle::{
    BUNDLE_FORMAT_VERSION, BundleManifest, DecoderIo, FileDigest, ModelArchitecture, Provenance,
};

/// The manifest of a tiny Qwen2-shaped bundle `name` v`version` listing `files` (name, contents)
/// with their real digests, unsigned.
pub(crate) fn tiny_manifest(name: &str, version: &str, files: &[(&str, &[u8])]) -> BundleManifest {
    BundleManifest {
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
        files: files.iter().map(|(name, bytes)| (name.to_string(), FileDigest::of_bytes(bytes))).collect(),
        provenance: Provenance::default(),
        evaluation: BTreeMap::new(),
        signature: None,
    }
}
