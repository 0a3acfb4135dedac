//! `manifest.json`: what a bundle contains, where it came from, and the digests that prove it.

use std::collections::BTreeMap;
use std::io::Read;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::help_marker::HELP_MARKER;

/// The manifest layout this build writes and understands.
pub const BUNDLE_FORMAT_VERSION: u32 = 1;

/// Errors reading or checking a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest.json is not valid: {0}")]
    Parse(#[from] serde_json::Error),
    #[error(
        "manifest.json has format {found}, this build understands format {BUNDLE_FORMAT_VERSION}; \
         re-export the bundle with a matching tandem-train"
    )]
    UnsupportedFormat { found: u32 },
    #[error("could not read {file} to check its digest: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
}

/// The bundle manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleManifest {
    /// Manifest layout version ([`BUNDLE_FORMAT_VERSION`]).
    pub format: u32,
    /// Model name, for example `countdown-policy`.
    pub name: String,
    /// Version of this build of the model, unique per name.
    pub version: String,
    /// Architecture and dimensions of the decoder.
    pub architecture: ModelArchitecture,
    /// Jinja chat template (Hugging Face style), when the model has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    /// The text the model emits to ask the cloud for help.
    #[serde(default = "default_help_marker")]
    pub help_marker: String,
    /// Token ids that end generation.
    pub eos_token_ids: Vec<u32>,
    /// How the graph's inputs and outputs are laid out.
    pub io: DecoderIo,
    /// sha256 and size of every file of the bundle except the manifest itself, by file name.
    pub files: BTreeMap<String, FileDigest>,
    /// Where the weights came from.
    #[serde(default)]
    pub provenance: Provenance,
    /// Evaluation results recorded at packaging time, free-form by metric name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub evaluation: BTreeMap<String, f64>,
    /// ed25519 signature over the canonical manifest (this manifest without its signature).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<BundleSignature>,
}

fn default_help_marker() -> String {
    HELP_MARKER.to_string()
}

/// Architecture and dimensions of a decoder-only transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelArchitecture {
    /// Hugging Face `model_type`: `qwen2` or `llama`.
    pub model_type: String,
    /// Rows of the embedding and of the logits.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads per layer.
    pub num_attention_heads: usize,
    /// Key/value heads per layer (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Longest sequence (prompt plus generated tokens) the model accepts.
    pub context_length: usize,
    /// Whether the output head shares the embedding matrix.
    pub tie_word_embeddings: bool,
}

/// Input/output layout of the decoder graph; the names themselves are fixed by [`crate::kv_io`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderIo {
    /// Whether the graph takes `position_ids`.
    pub position_ids: bool,
    /// Element type of the KV cache and logits (`float32` or `float16`).
    pub kv_dtype: String,
    /// ONNX opset of the default domain.
    pub opset: i64,
}

/// Size and sha256 of one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDigest {
    /// Hex-encoded sha256 of the file's bytes.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

impl FileDigest {
    /// Digests everything `reader` yields.
    pub fn of_reader(mut reader: impl Read) -> std::io::Result<Self> {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        Ok(Self { sha256: hex::encode(hasher.finalize()), size })
    }

    /// Digests a byte slice.
    pub fn of_bytes(bytes: &[u8]) -> Self {
        Self { sha256: hex::encode(Sha256::digest(bytes)), size: bytes.len() as u64 }
    }
}

/// Where a model's weights came from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// Version of the bundle this one was trained from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_version: Option<String>,
    /// Free-text description of the source checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// sha256 of the training configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_config_sha256: Option<String>,
    /// sha256 of each training data file, by file name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub data_sha256: BTreeMap<String, String>,
}

/// An ed25519 signature over the canonical manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleSignature {
    /// Identifier of the signing key (hex of the first 8 bytes of the public key's sha256).
    pub key_id: String,
    /// Hex-encoded 64-byte signature.
    pub ed25519: String,
}

impl BundleManifest {
    /// Parses a manifest and rejects layouts this build does not understand.
    pub fn from_json(text: &str) -> Result<Self, ManifestError> {
        let manifest: Self = serde_json::from_str(text)?;
        if manifest.format != BUNDLE_FORMAT_VERSION {
            return Err(ManifestError::UnsupportedFormat { found: manifest.format });
        }
        Ok(manifest)
    }

    /// Pretty JSON as written to `manifest.json`.
    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).expect("a manifest always serialises")
    }

    /// The bytes a signature covers: the compact JSON of this manifest without its signature.
    /// Field order is the struct's and maps are sorted, so the bytes are stable.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let unsigned = Self { signature: None, ..self.clone() };
        serde_json::to_vec(&unsigned).expect("a manifest always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BundleManifest {
        BundleManifest {
            format: BUNDLE_FORMAT_VERSION,
            name: "tiny".into(),
            version: "1".into(),
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
            help_marker: HELP_MARKER.into(),
            eos_token_ids: vec![2],
            io: DecoderIo { position_ids: true, kv_dtype: "float32".into(), opset: 17 },
            files: BTreeMap::from([("model.onnx".into(), FileDigest::of_bytes(b"abc"))]),
            provenance: Provenance::default(),
            evaluation: BTreeMap::new(),
            signature: None,
        }
    }

    #[test]
    fn manifest_round_trips_through_json() {
        let m = sample();
        assert_eq!(BundleManifest::from_json(&m.to_json_pretty()).unwrap(), m);
    }

    #[test]
    fn unknown_manifest_fields_are_rejected() {
        let mut v: serde_json::Value = serde_json::from_str(&sample().to_json_pretty()).unwrap();
        v["surprise"] = 1.into();
        let err = BundleManifest::from_json(&v.to_string()).unwrap_err();
        assert!(err.to_string().contains("surprise"), "{err}");
    }

    #[test]
    fn newer_manifest_formats_are_refused_with_advice() {
        let m = BundleManifest { format: 99, ..sample() };
        let err = BundleManifest::from_json(&m.to_json_pretty()).unwrap_err();
        assert!(err.to_string().contains("re-export"), "{err}");
    }

    #[test]
    fn canonical_bytes_ignore_the_signature() {
        let m = sample();
        let signed = BundleManifest {
            signature: Some(BundleSignature { key_id: "k".into(), ed25519: "00".into() }),
            ..m.clone()
        };
        assert_eq!(m.canonical_bytes(), signed.canonical_bytes());
    }

    #[test]
    fn file_digest_matches_known_sha256() {
        let d = FileDigest::of_reader(&b"abc"[..]).unwrap();
        assert_eq!(d.sha256, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(d, FileDigest::of_bytes(b"abc"));
    }
}
