//! Assembles a bundle directory from a checkpoint folder: the graph, the tokenizer files,
//! `genai_config.json` and finally `manifest.json` with the digest of every other file.
//!
//! Everything is written into a temporary sibling of the destination, which is renamed into place
//! only once complete, so a failed or interrupted export never leaves a half bundle at `out_dir`.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device};
use tandem_core::bundle::{
    BUNDLE_FORMAT_VERSION, BundleManifest, DecoderIo, FileDigest, GENAI_CONFIG_FILE, MANIFEST_FILE,
    ModelArchitecture, Provenance, TOKENIZER_FILE,
};
use tandem_core::help_marker::HELP_MARKER;

use super::{
    AttentionKind, ExportError, ExportOptions, OPSET_VERSION, genai_config, write_decoder_onnx, write_synced,
};
use crate::model::checkpoint::HfCheckpoint;
use crate::model::config::ModelConfig;

/// Copied next to `tokenizer.json` when the checkpoint has it: onnxruntime-genai's tokenizer
/// reads it, and it holds the chat template.
const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// Where newer transformers versions save the chat template instead of `tokenizer_config.json`.
const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
    move |source| ExportError::Io { path: path.to_path_buf(), source }
}

/// A directory removed on drop unless [`ScratchDir::keep`] was called.
struct ScratchDir {
    path: PathBuf,
    keep: bool,
}

impl ScratchDir {
    fn create(path: PathBuf) -> Result<Self, ExportError> {
        if path.exists() {
            // Left over from an export that was killed; it never became a bundle.
            fs::remove_dir_all(&path).map_err(io_error(&path))?;
        }
        fs::create_dir_all(&path).map_err(io_error(&path))?;
        Ok(Self { path, keep: false })
    }

    fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// See [`super::export_bundle`].
pub fn write_bundle(
    checkpoint_dir: &Path,
    out_dir: &Path,
    opts: &ExportOptions,
) -> Result<BundleManifest, ExportError> {
    check_options(opts)?;
    let checkpoint = HfCheckpoint::open(checkpoint_dir)?;
    let tokenizer =
        checkpoint.tokenizer_file().ok_or_else(|| ExportError::MissingTokenizer(checkpoint_dir.into()))?;
    let tokenizer_config = checkpoint.tokenizer_config_file();
    let chat_template = read_chat_template(checkpoint_dir, tokenizer_config.as_deref())?;
    check_destination(out_dir, opts.overwrite)?;

    let (parent, dir_name) = split_destination(out_dir)?;
    let tag = unique_tag();
    let scratch = ScratchDir::create(parent.join(format!(".{dir_name}.partial-{tag}")))?;
    let staging = scratch.path.clone();

    let vb = checkpoint.weights(DType::F32, &Device::Cpu)?;
    let written = write_decoder_onnx(&checkpoint.config, &vb, &staging, opts.external_data, opts.attention)?;
    drop(vb);
    tracing::info!(
        nodes = written.nodes,
        weight_bytes = written.weight_bytes,
        external = written.data_path.is_some(),
        attention = ?opts.attention,
        "decoder graph written"
    );
    copy_file(&tokenizer, &staging.join(TOKENIZER_FILE))?;
    if let Some(tokenizer_config) = &tokenizer_config {
        copy_file(tokenizer_config, &staging.join(TOKENIZER_CONFIG_FILE))?;
    }
    let genai = serde_json::to_string_pretty(&genai_config(&checkpoint.config, opts.attention))
        .map_err(|e| ExportError::InvalidOptions(format!("genai_config.json: {e}")))?;
    write_synced(&staging.join(GENAI_CONFIG_FILE), genai.as_bytes())?;

    let manifest = BundleManifest {
        format: BUNDLE_FORMAT_VERSION,
        name: opts.name.clone(),
        version: opts.version.clone(),
        architecture: architecture(&checkpoint.config),
        chat_template,
        help_marker: opts.help_marker.clone().unwrap_or_else(|| HELP_MARKER.to_string()),
        eos_token_ids: checkpoint.config.eos_token_ids.clone(),
        io: DecoderIo {
            position_ids: opts.attention == AttentionKind::Standard,
            kv_dtype: "float32".to_string(),
            opset: OPSET_VERSION,
        },
        files: digest_files(&staging)?,
        provenance: Provenance {
            parent_version: opts.parent_version.clone(),
            source: Some(source_name(checkpoint_dir)),
            training_config_sha256: opts.run.as_ref().map(|run| run.config_sha256.clone()),
            data_sha256: opts.run.as_ref().map(|run| run.data_sha256.clone()).unwrap_or_default(),
        },
        evaluation: opts.run.as_ref().map(|run| run.evaluation.clone()).unwrap_or_default(),
        signature: None,
    };
    if manifest.eos_token_ids.is_empty() {
        tracing::warn!("config.json names no eos_token_id; the bundle has no stop token");
    }
    write_synced(&staging.join(MANIFEST_FILE), manifest.to_json_pretty().as_bytes())?;

    move_into_place(&staging, out_dir, parent, dir_name, &tag)?;
    scratch.keep();
    Ok(manifest)
}

/// Distinguishes the scratch directories of concurrent exports (other processes or threads).
fn unique_tag() -> String {
    static EXPORTS: AtomicUsize = AtomicUsize::new(0);
    format!("{}-{}", std::process::id(), EXPORTS.fetch_add(1, Ordering::Relaxed))
}

fn check_options(opts: &ExportOptions) -> Result<(), ExportError> {
    if opts.name.trim().is_empty() {
        return Err(ExportError::InvalidOptions("the bundle needs a name".into()));
    }
    if opts.version.trim().is_empty() {
        return Err(ExportError::InvalidOptions("the bundle needs a version".into()));
    }
    Ok(())
}

/// Refuses to replace a file, or a non-empty directory unless `overwrite`.
fn check_destination(out_dir: &Path, overwrite: bool) -> Result<(), ExportError> {
    let Ok(meta) = fs::symlink_metadata(out_dir) else { return Ok(()) };
    if !meta.is_dir() {
        return Err(ExportError::OutputExists(out_dir.to_path_buf()));
    }
    let empty = fs::read_dir(out_dir).map_err(io_error(out_dir))?.next().is_none();
    if empty || overwrite { Ok(()) } else { Err(ExportError::OutputExists(out_dir.to_path_buf())) }
}

/// The parent directory (created if needed) and the final component of `out_dir`.
fn split_destination(out_dir: &Path) -> Result<(&Path, &str), ExportError> {
    let name = out_dir.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        ExportError::InvalidOptions(format!("{}: the output must be a named directory", out_dir.display()))
    })?;
    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::create_dir_all(parent).map_err(io_error(parent))?;
    Ok((parent, name))
}

/// Renames the finished `staging` directory to `out_dir`, replacing an existing one only after
/// it was moved aside, and putting it back if the final rename fails.
fn move_into_place(
    staging: &Path,
    out_dir: &Path,
    parent: &Path,
    dir_name: &str,
    tag: &str,
) -> Result<(), ExportError> {
    if fs::symlink_metadata(out_dir).is_err() {
        return fs::rename(staging, out_dir).map_err(io_error(out_dir));
    }
    let previous = parent.join(format!(".{dir_name}.previous-{tag}"));
    if previous.exists() {
        fs::remove_dir_all(&previous).map_err(io_error(&previous))?;
    }
    fs::rename(out_dir, &previous).map_err(io_error(out_dir))?;
    if let Err(source) = fs::rename(staging, out_dir) {
        let _ = fs::rename(&previous, out_dir);
        return Err(ExportError::Io { path: out_dir.to_path_buf(), source });
    }
    if let Err(e) = fs::remove_dir_all(&previous) {
        tracing::warn!(path = %previous.display(), error = %e, "could not remove the replaced bundle");
    }
    Ok(())
}

fn copy_file(from: &Path, to: &Path) -> Result<(), ExportError> {
    fs::copy(from, to).map_err(io_error(from))?;
    File::open(to).and_then(|f| f.sync_all()).map_err(io_error(to))
}

/// The chat template: `chat_template` of `tokenizer_config.json` (a string, or a list of named
/// templates of which `default` is used), else `chat_template.jinja`, else none.
fn read_chat_template(
    checkpoint_dir: &Path,
    tokenizer_config: Option<&Path>,
) -> Result<Option<String>, ExportError> {
    if let Some(path) = tokenizer_config {
        let text = fs::read_to_string(path).map_err(io_error(path))?;
        let bad = |message: String| ExportError::TokenizerConfig { path: path.to_path_buf(), message };
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        match value.get("chat_template") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::String(template)) => return Ok(Some(template.clone())),
            Some(serde_json::Value::Array(named)) => {
                let template_named = |wanted: &str| {
                    named.iter().find(|t| t.get("name").and_then(|n| n.as_str()) == Some(wanted))
                };
                let chosen = template_named("default").or_else(|| named.first());
                let template = chosen.and_then(|t| t.get("template")).and_then(|t| t.as_str());
                return match template {
                    Some(template) => Ok(Some(template.to_string())),
                    None => {
                        Err(bad("chat_template is a list without a usable {name, template} entry".into()))
                    }
                };
            }
            Some(_) => return Err(bad("chat_template must be a string or a list of named templates".into())),
        }
    }
    let jinja = checkpoint_dir.join(CHAT_TEMPLATE_FILE);
    if jinja.is_file() {
        return fs::read_to_string(&jinja).map(Some).map_err(io_error(&jinja));
    }
    Ok(None)
}

fn architecture(config: &ModelConfig) -> ModelArchitecture {
    ModelArchitecture {
        model_type: config.model_type.as_str().to_string(),
        vocab_size: config.vocab_size,
        hidden_size: config.hidden_size,
        intermediate_size: config.intermediate_size,
        num_hidden_layers: config.num_hidden_layers,
        num_attention_heads: config.num_attention_heads,
        num_key_value_heads: config.num_key_value_heads,
        head_dim: config.head_dim,
        context_length: config.max_position_embeddings,
        tie_word_embeddings: config.tie_word_embeddings,
    }
}

/// sha256 and size of every file in `dir` (the manifest is written afterwards).
fn digest_files(dir: &Path) -> Result<BTreeMap<String, tandem_core::bundle::FileDigest>, ExportError> {
    let mut files = BTreeMap::new();
    for entry in fs::read_dir(dir).map_err(io_error(dir))? {
        let path = entry.map_err(io_error(dir))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_string) else { continue };
        if name == MANIFEST_FILE || !path.is_file() {
            continue;
        }
        let digest = File::open(&path).and_then(FileDigest::of_reader).map_err(io_error(&path))?;
        files.insert(name, digest);
    }
    Ok(files)
}

/// The checkpoint folder's own name, for the manifest's provenance.
fn source_name(checkpoint_dir: &Path) -> String {
    let resolved = checkpoint_dir.canonicalize().unwrap_or_else(|_| checkpoint_dir.to_path_buf());
    resolved.file_name().map_or_else(|| resolved.display().to_string(), |n| n.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use tandem_core::bundle::{MODEL_DATA_FILE, MODEL_FILE};

    use super::*;
    use crate::export::ExternalData;
    use crate::export::tests::{random_weights, tiny_config, varmap_tensors};
    use crate::model::checkpoint::save_checkpoint;

    const TOKENIZER_JSON: &str = r#"{"version": "1.0", "model": {"type": "WordLevel", "vocab": {}}}"#;

    fn tiny_checkpoint(dir: &Path, tokenizer: bool) {
        let config = tiny_config(true);
        save_checkpoint(dir, &config, &varmap_tensors(&random_weights(&config, &[]))).unwrap();
        if tokenizer {
            fs::write(dir.join(TOKENIZER_FILE), TOKENIZER_JSON).unwrap();
            fs::write(dir.join(TOKENIZER_CONFIG_FILE), r#"{"chat_template": "{{ messages }}"}"#).unwrap();
        }
    }

    fn files_in(dir: &Path) -> BTreeSet<String> {
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn bundle_holds_graph_tokenizer_genai_config_and_a_manifest_with_digests() {
        let root = tempfile::tempdir().unwrap();
        let checkpoint = root.path().join("tiny-qwen");
        tiny_checkpoint(&checkpoint, true);
        let out = root.path().join("bundle");
        let opts = ExportOptions { external_data: ExternalData::Always, ..ExportOptions::new("tiny", "1") };
        let manifest = write_bundle(&checkpoint, &out, &opts).unwrap();

        let expected: BTreeSet<String> = [
            MODEL_FILE,
            MODEL_DATA_FILE,
            TOKENIZER_FILE,
            TOKENIZER_CONFIG_FILE,
            GENAI_CONFIG_FILE,
            MANIFEST_FILE,
        ]
        .into_iter()
        .map(String::from)
        .collect();
        assert_eq!(files_in(&out), expected);
        let on_disk =
            BundleManifest::from_json(&fs::read_to_string(out.join(MANIFEST_FILE)).unwrap()).unwrap();
        assert_eq!(on_disk, manifest);
        assert_eq!(manifest.files.len(), expected.len() - 1, "every file but the manifest");
        for (name, digest) in &manifest.files {
            assert_eq!(
                &FileDigest::of_reader(File::open(out.join(name)).unwrap()).unwrap(),
                digest,
                "{name}"
            );
        }
        assert_eq!(manifest.chat_template.as_deref(), Some("{{ messages }}"));
        assert_eq!(manifest.help_marker, HELP_MARKER);
        assert_eq!(manifest.eos_token_ids, vec![2]);
        assert_eq!(manifest.architecture.context_length, 128);
        assert_eq!(manifest.io, DecoderIo { position_ids: true, kv_dtype: "float32".into(), opset: 17 });
        assert_eq!(manifest.provenance.source.as_deref(), Some("tiny-qwen"));
        assert!(files_in(root.path()).iter().all(|n| !n.starts_with('.')), "no scratch directory left");
    }

    #[test]
    fn group_query_attention_bundle_records_that_the_graph_takes_no_position_ids() {
        let root = tempfile::tempdir().unwrap();
        let checkpoint = root.path().join("tiny-qwen");
        tiny_checkpoint(&checkpoint, true);
        let out = root.path().join("bundle");
        let opts = ExportOptions {
            attention: AttentionKind::GroupQueryAttention,
            ..ExportOptions::new("tiny", "1")
        };
        let manifest = write_bundle(&checkpoint, &out, &opts).unwrap();
        assert!(!manifest.io.position_ids);
        let genai: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(out.join(GENAI_CONFIG_FILE)).unwrap()).unwrap();
        assert!(genai["model"]["decoder"]["inputs"].get("position_ids").is_none());
    }

    #[test]
    fn checkpoint_without_tokenizer_is_refused_and_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let checkpoint = root.path().join("ckpt");
        tiny_checkpoint(&checkpoint, false);
        let out = root.path().join("bundle");
        let err = write_bundle(&checkpoint, &out, &ExportOptions::new("tiny", "1")).unwrap_err();
        assert!(matches!(err, ExportError::MissingTokenizer(_)), "{err}");
        assert!(err.to_string().contains("tokenizer.json"));
        assert_eq!(files_in(root.path()), BTreeSet::from(["ckpt".to_string()]));
    }

    #[test]
    fn existing_bundle_is_kept_unless_overwrite_is_set() {
        let root = tempfile::tempdir().unwrap();
        let checkpoint = root.path().join("ckpt");
        tiny_checkpoint(&checkpoint, true);
        let out = root.path().join("bundle");
        fs::create_dir(&out).unwrap();
        fs::write(out.join("keep.txt"), "old").unwrap();

        let err = write_bundle(&checkpoint, &out, &ExportOptions::new("tiny", "1")).unwrap_err();
        assert!(matches!(err, ExportError::OutputExists(_)), "{err}");
        assert_eq!(files_in(&out), BTreeSet::from(["keep.txt".to_string()]));

        let opts = ExportOptions { overwrite: true, ..ExportOptions::new("tiny", "2") };
        write_bundle(&checkpoint, &out, &opts).unwrap();
        assert!(!out.join("keep.txt").exists());
        assert!(out.join(MODEL_FILE).is_file());
        assert_eq!(files_in(root.path()), BTreeSet::from(["bundle".to_string(), "ckpt".to_string()]));
    }

    #[test]
    fn failed_export_leaves_no_bundle_behind() {
        let root = tempfile::tempdir().unwrap();
        let checkpoint = root.path().join("ckpt");
        let config = tiny_config(true);
        let weights = random_weights(&config, &["model.norm.weight"]);
        save_checkpoint(&checkpoint, &config, &varmap_tensors(&weights)).unwrap();
        fs::write(checkpoint.join(TOKENIZER_FILE), TOKENIZER_JSON).unwrap();
        let out = root.path().join("bundle");
        let err = write_bundle(&checkpoint, &out, &ExportOptions::new("tiny", "1")).unwrap_err();
        assert!(err.to_string().contains("model.norm.weight"), "{err}");
        assert_eq!(files_in(root.path()), BTreeSet::from(["ckpt".to_string()]));
    }

    #[test]
    fn chat_template_lists_use_the_default_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TOKENIZER_CONFIG_FILE);
        let config = r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#;
        fs::write(&path, config).unwrap();
        assert_eq!(read_chat_template(dir.path(), Some(&path)).unwrap().as_deref(), Some("D"));
    }

    #[test]
    fn chat_template_falls_back_to_the_jinja_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TOKENIZER_CONFIG_FILE);
        fs::write(&path, r#"{"eos_token": "</s>"}"#).unwrap();
        fs::write(dir.path().join(CHAT_TEMPLATE_FILE), "J").unwrap();
        assert_eq!(read_chat_template(dir.path(), Some(&path)).unwrap().as_deref(), Some("J"));
    }
}
