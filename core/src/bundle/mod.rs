//! The model bundle: the unit that is trained, signed, shipped and loaded.
//!
//! A bundle is a directory holding `model.onnx` (plus `model.onnx.data` for external weights),
//! `tokenizer.json` and `manifest.json`. This module owns the manifest's schema and file names;
//! `signature` owns signing and verifying bundles and the key file format.

mod manifest;
pub mod signature;

pub use manifest::{
    BUNDLE_FORMAT_VERSION, BundleManifest, BundleSignature, DecoderIo, FileDigest, ManifestError,
    ModelArchitecture, Provenance,
};

/// The manifest's file name inside a bundle.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The decoder graph's file name inside a bundle.
pub const MODEL_FILE: &str = "model.onnx";
/// The external weight data of the decoder graph, when the weights do not fit inside it.
pub const MODEL_DATA_FILE: &str = "model.onnx.data";
/// The Hugging Face `tokenizers` file inside a bundle.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The onnxruntime-genai configuration written next to the graph so that genai can run it too.
pub const GENAI_CONFIG_FILE: &str = "genai_config.json";
