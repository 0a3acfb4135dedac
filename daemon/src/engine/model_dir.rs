//! Recognising a model directory and reading the facts the engine needs from it.
//!
//! Three kinds are understood, tried in this order:
//! - a Tandem bundle: `manifest.json` next to `model.onnx` and `tokenizer.json`;
//! - an onnxruntime-genai folder: `genai_config.json` naming the decoder graph;
//! - a plain optimum/torch export: `model.onnx` with the Hugging Face `config.json`.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tandem_core::bundle::{BundleManifest, GENAI_CONFIG_FILE, MANIFEST_FILE, MODEL_FILE, TOKENIZER_FILE};

use super::error::EngineError;

/// Hugging Face model configuration of a plain export.
pub const HF_CONFIG_FILE: &str = "config.json";
/// Hugging Face generation defaults (may override `eos_token_id`).
pub const HF_GENERATION_CONFIG_FILE: &str = "generation_config.json";
/// Hugging Face tokenizer settings (may hold the chat template).
pub const HF_TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// Chat template as a separate file (newer transformers).
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// Which exporter produced a model directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    /// A Tandem bundle with `manifest.json`.
    Bundle,
    /// An onnxruntime-genai folder with `genai_config.json`.
    Genai,
    /// A plain optimum/torch export with `config.json` (or nothing but the graph).
    Plain,
}

impl ModelFormat {
    /// Short name for logs and reports.
    pub fn name(self) -> &'static str {
        match self {
            ModelFormat::Bundle => "tandem-bundle",
            ModelFormat::Genai => "onnxruntime-genai",
            ModelFormat::Plain => "plain-export",
        }
    }
}

/// What the engine knows about a model directory before loading the graph.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelDir {
    /// The directory itself.
    pub root: PathBuf,
    /// Which exporter produced it.
    pub format: ModelFormat,
    /// The decoder graph.
    pub model_file: PathBuf,
    /// `tokenizer.json`, when present. Without it only token ids can be used.
    pub tokenizer_file: Option<PathBuf>,
    /// Model name (the bundle's name, else the directory name).
    pub name: String,
    /// Bundle version, for bundles.
    pub version: Option<String>,
    /// Token ids that end generation; may be empty when the directory does not say.
    pub eos_token_ids: Vec<u32>,
    /// Longest prompt plus generation the model accepts, when known.
    pub context_length: Option<usize>,
    /// Rows of the logits, when the directory says.
    pub vocab_size: Option<usize>,
    /// Width of one attention head, when the directory says (needed when the graph leaves it symbolic).
    pub head_dim: Option<usize>,
    /// Key/value heads per layer, when the directory says.
    pub num_key_value_heads: Option<usize>,
    /// Jinja chat template, when the directory has one.
    pub chat_template: Option<String>,
    /// The full manifest of a Tandem bundle.
    pub manifest: Option<BundleManifest>,
}

impl ModelDir {
    /// Recognises `root` and reads its metadata. Fails when the graph is missing or a metadata file is
    /// unreadable; a missing tokenizer is not an error here (see [`ModelDir::require_tokenizer`]).
    pub fn inspect(root: &Path) -> Result<ModelDir, EngineError> {
        if !root.is_dir() {
            return Err(EngineError::ModelDirMissing { path: root.to_path_buf() });
        }
        let mut dir = if root.join(MANIFEST_FILE).is_file() {
            Self::from_bundle(root)?
        } else if root.join(GENAI_CONFIG_FILE).is_file() {
            Self::from_genai(root)?
        } else {
            Self::from_plain(root)?
        };
        if !dir.model_file.is_file() {
            return Err(EngineError::ModelFileMissing { path: dir.model_file });
        }
        if dir.chat_template.is_none() {
            dir.chat_template = read_chat_template(root)?;
        }
        Ok(dir)
    }

    /// The tokenizer file, or an error saying how to do without it.
    pub fn require_tokenizer(&self) -> Result<&Path, EngineError> {
        self.tokenizer_file.as_deref().ok_or_else(|| EngineError::TokenizerMissing { dir: self.root.clone() })
    }

    fn base(root: &Path, format: ModelFormat, model_file: PathBuf) -> ModelDir {
        let tokenizer = root.join(TOKENIZER_FILE);
        ModelDir {
            root: root.to_path_buf(),
            format,
            model_file,
            tokenizer_file: tokenizer.is_file().then_some(tokenizer),
            name: root
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| root.display().to_string()),
            version: None,
            eos_token_ids: Vec::new(),
            context_length: None,
            vocab_size: None,
            head_dim: None,
            num_key_value_heads: None,
            chat_template: None,
            manifest: None,
        }
    }

    fn from_bundle(root: &Path) -> Result<ModelDir, EngineError> {
        let path = root.join(MANIFEST_FILE);
        let text = read_text(&path)?;
        let manifest = BundleManifest::from_json(&text)
            .map_err(|cause| EngineError::Manifest { path: path.clone(), cause })?;
        let arch = &manifest.architecture;
        Ok(ModelDir {
            name: manifest.name.clone(),
            version: Some(manifest.version.clone()),
            eos_token_ids: manifest.eos_token_ids.clone(),
            context_length: Some(arch.context_length),
            vocab_size: Some(arch.vocab_size),
            head_dim: Some(arch.head_dim),
            num_key_value_heads: Some(arch.num_key_value_heads),
            chat_template: manifest.chat_template.clone(),
            manifest: Some(manifest),
            ..Self::base(root, ModelFormat::Bundle, root.join(MODEL_FILE))
        })
    }

    fn from_genai(root: &Path) -> Result<ModelDir, EngineError> {
        let path = root.join(GENAI_CONFIG_FILE);
        let config = read_json(&path)?;
        let model = config.get("model").ok_or_else(|| invalid(&path, "it has no `model` section"))?;
        let decoder = model.get("decoder");
        let filename = match decoder.and_then(|d| d.get("filename")) {
            None => MODEL_FILE.to_string(),
            Some(v) => v
                .as_str()
                .ok_or_else(|| invalid(&path, "model.decoder.filename is not a string"))?
                .to_string(),
        };
        let search_max_length = opt_usize(&path, config.get("search"), "max_length", "search.max_length")?;
        Ok(ModelDir {
            eos_token_ids: token_ids(&path, model.get("eos_token_id"), "model.eos_token_id")?,
            context_length: opt_usize(&path, Some(model), "context_length", "model.context_length")?
                .or(search_max_length),
            vocab_size: opt_usize(&path, Some(model), "vocab_size", "model.vocab_size")?,
            head_dim: opt_usize(&path, decoder, "head_size", "model.decoder.head_size")?,
            num_key_value_heads: opt_usize(
                &path,
                decoder,
                "num_key_value_heads",
                "model.decoder.num_key_value_heads",
            )?,
            ..Self::base(root, ModelFormat::Genai, root.join(filename))
        })
    }

    fn from_plain(root: &Path) -> Result<ModelDir, EngineError> {
        let mut dir = Self::base(root, ModelFormat::Plain, root.join(MODEL_FILE));
        let path = root.join(HF_CONFIG_FILE);
        if !path.is_file() {
            if dir.model_file.is_file() {
                tracing::warn!(
                    dir = %root.display(),
                    "no manifest.json, genai_config.json or config.json: no end-of-sequence tokens or context \
                     length are known, so generation stops only at max_new_tokens"
                );
            }
            return Ok(dir);
        }
        let config = read_json(&path)?;
        dir.eos_token_ids = token_ids(&path, config.get("eos_token_id"), "eos_token_id")?;
        dir.context_length =
            opt_usize(&path, Some(&config), "max_position_embeddings", "max_position_embeddings")?;
        dir.vocab_size = opt_usize(&path, Some(&config), "vocab_size", "vocab_size")?;
        dir.num_key_value_heads = opt_usize(
            &path,
            Some(&config),
            "num_key_value_heads",
            "num_key_value_heads",
        )?
        .or(opt_usize(&path, Some(&config), "num_attention_heads", "num_attention_heads")?);
        dir.head_dim = match opt_usize(&path, Some(&config), "head_dim", "head_dim")? {
            Some(d) => Some(d),
            None => {
                let hidden = opt_usize(&path, Some(&config), "hidden_size", "hidden_size")?;
                let heads = opt_usize(&path, Some(&config), "num_attention_heads", "num_attention_heads")?;
                hidden.zip(heads).filter(|(_, h)| *h > 0).map(|(d, h)| d / h)
            }
        };
        let generation = root.join(HF_GENERATION_CONFIG_FILE);
        if generation.is_file() {
            let ids = token_ids(&generation, read_json(&generation)?.get("eos_token_id"), "eos_token_id")?;
            if !ids.is_empty() {
                dir.eos_token_ids = ids;
            }
        }
        Ok(dir)
    }
}

fn read_text(path: &Path) -> Result<String, EngineError> {
    std::fs::read_to_string(path).map_err(|cause| EngineError::Io { path: path.to_path_buf(), cause })
}

fn read_json(path: &Path) -> Result<Value, EngineError> {
    serde_json::from_str(&read_text(path)?).map_err(|e| invalid(path, &format!("not JSON: {e}")))
}

fn invalid(path: &Path, message: &str) -> EngineError {
    EngineError::ModelConfig { path: path.to_path_buf(), message: message.to_string() }
}

/// An optional non-negative integer field; present but of another type is an error.
fn opt_usize(
    path: &Path,
    section: Option<&Value>,
    key: &str,
    label: &str,
) -> Result<Option<usize>, EngineError> {
    match section.and_then(|s| s.get(key)) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| invalid(path, &format!("{label} must be a non-negative integer, got {v}"))),
    }
}

/// A token id or a list of them (both spellings appear in the wild); absent or null is empty.
fn token_ids(path: &Path, value: Option<&Value>, label: &str) -> Result<Vec<u32>, EngineError> {
    let one = |v: &Value| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| invalid(path, &format!("{label} must be a token id or a list of them, got {v}")))
    };
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

/// The chat template of a non-bundle directory: `chat_template.jinja`, else `tokenizer_config.json`.
fn read_chat_template(root: &Path) -> Result<Option<String>, EngineError> {
    let jinja = root.join(CHAT_TEMPLATE_FILE);
    if jinja.is_file() {
        return read_text(&jinja).map(Some);
    }
    let path = root.join(HF_TOKENIZER_CONFIG_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    Ok(match read_json(&path)?.get("chat_template") {
        Some(Value::String(template)) => Some(template.clone()),
        // A list of named templates: take the default one, else the first.
        Some(Value::Array(named)) => {
            let template_of = |t: &Value| t.get("template").and_then(Value::as_str).map(str::to_string);
            named
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(template_of)
                .or_else(|| named.first().and_then(template_of))
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    fn manifest_json(eos: &str) -> String {
        format!(
            r#"{{"format": 1, "name": "countdown-policy", "version": "7",
            "architecture": {{"model_type": "qwen2", "vocab_size": 512, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "context_length": 256, "tie_word_embeddings": true}},
            "chat_template": "{{{{ messages }}}}",
            "eos_token_ids": {eos},
            "io": {{"position_ids": true, "kv_dtype": "float32", "opset": 17}},
            "files": {{}}}}"#
        )
    }

    #[test]
    fn a_bundle_is_read_from_its_manifest() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), MANIFEST_FILE, &manifest_json("[2, 3]"));
        write(dir.path(), MODEL_FILE, "graph");
        write(dir.path(), TOKENIZER_FILE, "{}");
        write(dir.path(), GENAI_CONFIG_FILE, r#"{"model": {"context_length": 9}}"#);
        let m = ModelDir::inspect(dir.path()).unwrap();
        assert_eq!(m.format, ModelFormat::Bundle);
        assert_eq!(m.name, "countdown-policy");
        assert_eq!(m.version.as_deref(), Some("7"));
        assert_eq!(m.eos_token_ids, vec![2, 3]);
        assert_eq!(m.context_length, Some(256), "the manifest wins over genai_config.json");
        assert_eq!((m.head_dim, m.num_key_value_heads, m.vocab_size), (Some(16), Some(2), Some(512)));
        assert_eq!(m.chat_template.as_deref(), Some("{{ messages }}"));
        assert_eq!(m.tokenizer_file, Some(dir.path().join(TOKENIZER_FILE)));
    }

    #[test]
    fn a_broken_manifest_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), MANIFEST_FILE, "{ not json");
        write(dir.path(), MODEL_FILE, "graph");
        let err = ModelDir::inspect(dir.path()).unwrap_err().to_string();
        assert!(err.contains(MANIFEST_FILE), "{err}");
    }

    #[test]
    fn a_genai_folder_is_read_from_genai_config() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            GENAI_CONFIG_FILE,
            r#"{"model": {"context_length": 512, "eos_token_id": [2, 0], "vocab_size": 512,
                "decoder": {"filename": "decoder.onnx", "head_size": 16, "num_key_value_heads": 2,
                            "session_options": {}}},
               "search": {"max_length": 128, "do_sample": false}}"#,
        );
        write(dir.path(), "decoder.onnx", "graph");
        write(dir.path(), TOKENIZER_FILE, "{}");
        write(dir.path(), HF_TOKENIZER_CONFIG_FILE, r#"{"chat_template": "{{ bos }}"}"#);
        let m = ModelDir::inspect(dir.path()).unwrap();
        assert_eq!(m.format, ModelFormat::Genai);
        assert_eq!(m.model_file, dir.path().join("decoder.onnx"));
        assert_eq!(m.eos_token_ids, vec![2, 0]);
        assert_eq!(m.context_length, Some(512));
        assert_eq!((m.head_dim, m.num_key_value_heads), (Some(16), Some(2)));
        assert_eq!(m.chat_template.as_deref(), Some("{{ bos }}"));
    }

    #[test]
    fn a_single_eos_id_in_genai_config_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), GENAI_CONFIG_FILE, r#"{"model": {"eos_token_id": 151645, "decoder": {}}}"#);
        write(dir.path(), MODEL_FILE, "graph");
        let m = ModelDir::inspect(dir.path()).unwrap();
        assert_eq!(m.eos_token_ids, vec![151645]);
        assert_eq!(m.context_length, None);
    }

    #[test]
    fn a_plain_export_is_read_from_the_hugging_face_config() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            HF_CONFIG_FILE,
            r#"{"eos_token_id": 2, "max_position_embeddings": 64, "vocab_size": 320,
                "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}"#,
        );
        write(dir.path(), HF_GENERATION_CONFIG_FILE, r#"{"eos_token_id": [2, 7]}"#);
        write(dir.path(), MODEL_FILE, "graph");
        let m = ModelDir::inspect(dir.path()).unwrap();
        assert_eq!(m.format, ModelFormat::Plain);
        assert_eq!(m.eos_token_ids, vec![2, 7], "generation_config.json overrides config.json");
        assert_eq!(m.context_length, Some(64));
        assert_eq!((m.head_dim, m.num_key_value_heads, m.vocab_size), (Some(16), Some(2), Some(320)));
        assert_eq!(m.tokenizer_file, None);
        assert!(matches!(m.require_tokenizer(), Err(EngineError::TokenizerMissing { .. })));
    }

    #[test]
    fn a_directory_without_model_onnx_says_what_a_model_dir_needs() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), HF_CONFIG_FILE, "{}");
        let err = ModelDir::inspect(dir.path()).unwrap_err();
        assert!(matches!(&err, EngineError::ModelFileMissing { path } if path.ends_with(MODEL_FILE)));
        let text = err.to_string();
        assert!(text.contains("model.onnx") && text.contains("tokenizer.json"), "{text}");
    }

    #[test]
    fn a_missing_directory_is_reported_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let err = ModelDir::inspect(&dir.path().join("nope")).unwrap_err();
        assert!(matches!(err, EngineError::ModelDirMissing { .. }));
    }

    #[test]
    fn a_config_with_a_wrongly_typed_field_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), HF_CONFIG_FILE, r#"{"eos_token_id": "two"}"#);
        write(dir.path(), MODEL_FILE, "graph");
        let err = ModelDir::inspect(dir.path()).unwrap_err().to_string();
        assert!(err.contains("eos_token_id") && err.contains(HF_CONFIG_FILE), "{err}");
    }
}
