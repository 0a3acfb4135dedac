//! ONNX export and bundle packaging, in pure Rust.
//!
//! [`export_bundle`] turns a Hugging Face checkpoint folder (config, safetensors, tokenizer) into a
//! Tandem model bundle: `model.onnx` (+ `model.onnx.data`), `tokenizer.json`, `genai_config.json`
//! and `manifest.json`. [`write_decoder_onnx`] writes just the graph from weights already opened
//! as a `VarBuilder`. [`AttentionKind`] chooses between the portable standard-op graph and the
//! onnxruntime-genai style graph with ONNX Runtime's fused `GroupQueryAttention`.
//!
//! Layout: `graph_builder` is a generic ONNX graph builder, `decoder_graph` emits the decoder with
//! it, `genai_config` describes the graph to onnxruntime-genai and `bundle_writer` assembles the
//! directory.

mod bundle_writer;
mod decoder_graph;
mod genai_config;
pub mod graph_builder;
pub mod onnx_proto;
pub mod run_record;

use std::path::{Path, PathBuf};

use candle_nn::VarBuilder;
use prost::Message;
use tandem_core::bundle::{BundleManifest, MODEL_DATA_FILE, MODEL_FILE};

use crate::model::checkpoint::CheckpointError;
use crate::model::config::{ConfigError, ModelConfig};

pub use decoder_graph::weight_bytes;
pub use genai_config::genai_config;
pub use graph_builder::{IR_VERSION, OPSET_VERSION};

/// Total weight size above which [`ExternalData::Auto`] moves the weights out of the protobuf,
/// comfortably below protobuf's hard 2 GiB message limit.
pub const AUTO_EXTERNAL_DATA_ABOVE: u64 = 3 << 29; // 1.5 GiB

/// Protobuf cannot encode or parse a message of 2 GiB or more.
const PROTOBUF_LIMIT: u64 = 1 << 31;

/// Errors exporting a model or writing a bundle.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("model config: {0}")]
    Config(#[from] ConfigError),
    #[error("the checkpoint has no tensor `{name}`, which this model config requires")]
    MissingWeight { name: String },
    #[error("tensor `{name}`: {source}")]
    Weight {
        name: String,
        #[source]
        source: candle_core::Error,
    },
    #[error(
        "{0}: no tokenizer.json; the checkpoint folder needs a Hugging Face tokenizer.json \
         (save it with tokenizer.save_pretrained)"
    )]
    MissingTokenizer(PathBuf),
    #[error("{path}: {message}")]
    TokenizerConfig { path: PathBuf, message: String },
    #[error("{0} already exists and is not empty; choose another directory or allow overwriting")]
    OutputExists(PathBuf),
    #[error(
        "the model protobuf would be {bytes} bytes, over protobuf's 2 GiB limit; \
         export with external data"
    )]
    TooLargeForProtobuf { bytes: u64 },
    #[error("graph value name `{0}` is used twice")]
    DuplicateName(String),
    #[error("initializer `{name}`: dims {dims:?} do not hold {len} elements")]
    InitializerShape { name: String, dims: Vec<i64>, len: usize },
    #[error("invalid export options: {0}")]
    InvalidOptions(String),
}

/// Whether the weights go into a separate `model.onnx.data` file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ExternalData {
    /// External when the weights exceed [`AUTO_EXTERNAL_DATA_ABOVE`] bytes.
    #[default]
    Auto,
    /// Always write `model.onnx.data` (every initializer of 1 KiB or more).
    Always,
    /// Keep every weight inside `model.onnx`; fails for models near 2 GiB.
    Never,
}

impl ExternalData {
    /// Whether a model with `weight_bytes` of weights gets external data.
    pub fn applies_to(self, weight_bytes: u64) -> bool {
        match self {
            ExternalData::Auto => weight_bytes > AUTO_EXTERNAL_DATA_ABOVE,
            ExternalData::Always => true,
            ExternalData::Never => false,
        }
    }
}

/// How the exported decoder computes attention.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AttentionKind {
    /// Standard opset-17 ops only: rotary embedding from a `position_ids` input, a causal and
    /// padding mask, an explicit softmax; key and value caches interleaved per layer. Every
    /// execution provider and old edge runtimes run it, and it is exact on left-padded batches.
    #[default]
    Standard,
    /// The graph onnxruntime-genai's model builder writes for the CPU execution provider: one
    /// ONNX Runtime contrib `GroupQueryAttention` (`com.microsoft`) per layer, applying the rotary
    /// embedding itself from `cos_cache`/`sin_cache` tables (Hugging Face's non-interleaved
    /// convention); no `position_ids` input, as positions come from `attention_mask`; all key caches
    /// listed before all value caches; and the caches' head size left symbolic (`kv_cache_dim`), so
    /// a runtime must read it from `genai_config.json` (`head_size`).
    ///
    /// **For batch-1 daemons only.** The op derives each row's length as `sum(attention_mask) - 1`
    /// and treats padding as right padding, so a left-padded batch (what Tandem's engine builds for
    /// prompts of different lengths) gives wrong results for the padded rows. It needs an ONNX
    /// Runtime with the contrib operators (checked with 1.31); TensorRT cannot parse it.
    GroupQueryAttention,
}

/// How [`export_bundle`] packages a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportOptions {
    /// Where the weights go.
    pub external_data: ExternalData,
    /// Which attention graph to write; see [`AttentionKind`] before choosing the fused one.
    pub attention: AttentionKind,
    /// Model name recorded in the manifest, for example `countdown-policy`.
    pub name: String,
    /// Version of this build of the model, unique per name.
    pub version: String,
    /// Replace a non-empty `out_dir`; without it an existing bundle is never touched.
    pub overwrite: bool,
    /// The help marker recorded in the manifest; `None` records Tandem's default marker.
    pub help_marker: Option<String>,
    /// Version of the bundle these weights were trained from, for the manifest's provenance.
    pub parent_version: Option<String>,
    /// The training run that produced the weights: its configuration's and data's digests and its
    /// final evaluation go into the manifest.
    pub run: Option<run_record::RunRecord>,
}

impl ExportOptions {
    /// Options with defaults: automatic external data, standard attention, no overwriting, the
    /// default help marker.
    pub fn new(name: impl Into<String>, version: impl Into<String>) -> Self {
        Self {
            external_data: ExternalData::Auto,
            attention: AttentionKind::Standard,
            name: name.into(),
            version: version.into(),
            overwrite: false,
            help_marker: None,
            parent_version: None,
            run: None,
        }
    }
}

/// What [`write_decoder_onnx`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenGraph {
    /// `model.onnx`.
    pub model_path: PathBuf,
    /// `model.onnx.data`, when the weights went there.
    pub data_path: Option<PathBuf>,
    /// Bytes of f32 weights in the graph.
    pub weight_bytes: u64,
    /// Number of nodes in the graph.
    pub nodes: usize,
    /// Number of initializers (weights and constants).
    pub initializers: usize,
}

/// Writes the decoder for `config` with the weights in `vb` (Hugging Face names) and the
/// `attention` graph to `out_dir/model.onnx`, plus `out_dir/model.onnx.data` when `external`
/// applies; existing files of those names are replaced.
///
/// A missing or wrongly shaped tensor is an error naming the tensor. On error, the files this call
/// had started to write are removed again.
pub fn write_decoder_onnx(
    config: &ModelConfig,
    vb: &VarBuilder<'_>,
    out_dir: &Path,
    external: ExternalData,
    attention: AttentionKind,
) -> Result<WrittenGraph, ExportError> {
    config.validate()?;
    let model_path = out_dir.join(MODEL_FILE);
    let data_path = out_dir.join(MODEL_DATA_FILE);
    let weight_bytes = decoder_graph::weight_bytes(config);
    let external = external.applies_to(weight_bytes);
    let result =
        write_decoder_files(config, vb, attention, &model_path, external.then_some(data_path.as_path()));
    if result.is_err() {
        // Best effort: a failed export must not leave a graph that looks usable.
        if external {
            let _ = std::fs::remove_file(&data_path);
        }
        let _ = std::fs::remove_file(&model_path);
    }
    let (nodes, initializers) = result?;
    Ok(WrittenGraph {
        model_path,
        data_path: external.then_some(data_path),
        weight_bytes,
        nodes,
        initializers,
    })
}

/// Builds the graph and writes the model (and external data) files; returns the node and
/// initializer counts. The model file is written last, so it exists only on success.
fn write_decoder_files(
    config: &ModelConfig,
    vb: &VarBuilder<'_>,
    attention: AttentionKind,
    model_path: &Path,
    data_path: Option<&Path>,
) -> Result<(usize, usize), ExportError> {
    let mut builder = match data_path {
        Some(data_path) => graph_builder::GraphBuilder::with_external_data(data_path)?,
        None => graph_builder::GraphBuilder::new(),
    };
    decoder_graph::build_decoder(config, vb, attention, &mut builder)?;
    let doc = format!("{} decoder exported by tandem-train", config.model_type.as_str());
    let model = builder.finish(decoder_graph::GRAPH_NAME, &doc)?.model;
    let counts = model.graph.as_ref().map_or((0, 0), |g| (g.node.len(), g.initializer.len()));
    let encoded_len = model.encoded_len() as u64;
    if encoded_len >= PROTOBUF_LIMIT {
        return Err(ExportError::TooLargeForProtobuf { bytes: encoded_len });
    }
    let bytes = model.encode_to_vec();
    drop(model);
    write_synced(model_path, &bytes)?;
    Ok(counts)
}

/// Writes `bytes` to `path` and flushes them to disk.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), ExportError> {
    use std::io::Write;
    let io = |source| ExportError::Io { path: path.to_path_buf(), source };
    let mut file = std::fs::File::create(path).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)
}

/// Exports the Hugging Face checkpoint in `checkpoint_dir` as a Tandem bundle in `out_dir`.
///
/// The bundle is assembled in a temporary sibling directory and renamed into place at the end, so
/// a failed export never leaves a half-written bundle at `out_dir`. A non-empty `out_dir` is only
/// replaced when `opts.overwrite` is set. Returns the manifest that was written.
pub fn export_bundle(
    checkpoint_dir: &Path,
    out_dir: &Path,
    opts: &ExportOptions,
) -> Result<BundleManifest, ExportError> {
    bundle_writer::write_bundle(checkpoint_dir, out_dir, opts)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};
    use candle_nn::{Init, VarMap};

    use super::onnx_proto::{
        AttributeProto, ModelProto, NodeProto, ValueInfoProto, tensor_proto, tensor_shape_proto, type_proto,
    };
    use super::*;
    use crate::model::config::ModelFamily;
    use tandem_core::kv_io::{self, KvKind};

    /// vocab 64, hidden 32, 2 layers, 4 heads over 2 KV heads, intermediate 64.
    pub(crate) fn tiny_config(tied: bool) -> ModelConfig {
        ModelConfig {
            model_type: ModelFamily::Qwen2,
            vocab_size: 64,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 8,
            max_position_embeddings: 128,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: tied,
            attention_bias: false,
            bos_token_id: None,
            eos_token_ids: vec![2],
        }
    }

    /// Every tensor `config` needs, by Hugging Face name and shape.
    pub(crate) fn tensor_shapes(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let (q, kv) =
            (config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim);
        let mut shapes = vec![("model.embed_tokens.weight".to_string(), vec![config.vocab_size, h])];
        for layer in 0..config.num_hidden_layers {
            let p = format!("model.layers.{layer}");
            shapes.push((format!("{p}.input_layernorm.weight"), vec![h]));
            shapes.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            for (proj, out) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                shapes.push((format!("{p}.self_attn.{proj}.weight"), vec![out, h]));
                if config.qkv_bias() {
                    shapes.push((format!("{p}.self_attn.{proj}.bias"), vec![out]));
                }
            }
            shapes.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            if config.o_bias() {
                shapes.push((format!("{p}.self_attn.o_proj.bias"), vec![h]));
            }
            shapes.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            shapes.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            shapes.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        shapes.push(("model.norm.weight".to_string(), vec![h]));
        if !config.tie_word_embeddings {
            shapes.push(("lm_head.weight".to_string(), vec![config.vocab_size, h]));
        }
        shapes
    }

    /// Random weights for `config`, leaving out the tensors named in `skip`.
    pub(crate) fn random_weights(config: &ModelConfig, skip: &[&str]) -> VarMap {
        let varmap = VarMap::new();
        for (name, shape) in tensor_shapes(config) {
            if skip.contains(&name.as_str()) {
                continue;
            }
            let init = if name.ends_with("norm.weight") {
                Init::Randn { mean: 1.0, stdev: 0.1 }
            } else {
                Init::Randn { mean: 0.0, stdev: 0.2 }
            };
            varmap.get(shape, &name, init, DType::F32, &Device::Cpu).unwrap();
        }
        varmap
    }

    pub(crate) fn varmap_tensors(varmap: &VarMap) -> HashMap<String, Tensor> {
        varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect()
    }

    fn export_tiny(
        config: &ModelConfig,
        external: ExternalData,
    ) -> (tempfile::TempDir, WrittenGraph, ModelProto) {
        export_tiny_with(config, external, AttentionKind::Standard)
    }

    fn export_tiny_with(
        config: &ModelConfig,
        external: ExternalData,
        attention: AttentionKind,
    ) -> (tempfile::TempDir, WrittenGraph, ModelProto) {
        let varmap = random_weights(config, &[]);
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let dir = tempfile::tempdir().unwrap();
        let written = write_decoder_onnx(config, &vb, dir.path(), external, attention).unwrap();
        let model = ModelProto::decode(std::fs::read(&written.model_path).unwrap().as_slice()).unwrap();
        (dir, written, model)
    }

    fn expected_inputs(layers: usize) -> Vec<String> {
        let mut names =
            vec![kv_io::INPUT_IDS.to_string(), kv_io::ATTENTION_MASK.into(), kv_io::POSITION_IDS.into()];
        for layer in 0..layers {
            names.push(kv_io::past_name(layer, KvKind::Key));
            names.push(kv_io::past_name(layer, KvKind::Value));
        }
        names
    }

    fn expected_outputs(layers: usize) -> Vec<String> {
        let mut names = vec![kv_io::LOGITS.to_string()];
        for layer in 0..layers {
            names.push(kv_io::present_name(layer, KvKind::Key));
            names.push(kv_io::present_name(layer, KvKind::Value));
        }
        names
    }

    #[test]
    fn exported_model_decodes_with_the_kv_cache_io_in_interleaved_order() {
        let config = tiny_config(true);
        let (_dir, written, model) = export_tiny(&config, ExternalData::Never);
        assert_eq!(model.ir_version, IR_VERSION);
        assert_eq!(model.opset_import.len(), 1);
        assert_eq!(
            (model.opset_import[0].domain.as_str(), model.opset_import[0].version),
            ("", OPSET_VERSION)
        );
        let graph = model.graph.unwrap();
        let inputs: Vec<_> = graph.input.iter().map(|v| v.name.clone()).collect();
        let outputs: Vec<_> = graph.output.iter().map(|v| v.name.clone()).collect();
        assert_eq!(inputs, expected_inputs(2));
        assert_eq!(outputs, expected_outputs(2));
        assert!(written.data_path.is_none());
        assert_eq!(written.nodes, graph.node.len());
        // Every graph output is produced by exactly one node.
        for out in &outputs {
            assert_eq!(graph.node.iter().filter(|n| n.output.contains(out)).count(), 1, "{out}");
        }
    }

    #[test]
    fn every_node_input_is_defined_before_use() {
        for attention in [AttentionKind::Standard, AttentionKind::GroupQueryAttention] {
            let (_dir, _written, model) =
                export_tiny_with(&tiny_config(false), ExternalData::Never, attention);
            assert_topologically_sorted(&model);
        }
    }

    fn assert_topologically_sorted(model: &ModelProto) {
        let graph = model.graph.as_ref().unwrap();
        let mut known: std::collections::HashSet<String> = graph
            .input
            .iter()
            .map(|v| v.name.clone())
            .chain(graph.initializer.iter().map(|t| t.name.clone()))
            .collect();
        for node in &graph.node {
            for input in &node.input {
                assert!(known.contains(input), "{} reads undefined {input}", node.name);
            }
            for output in &node.output {
                assert!(known.insert(output.clone()), "{output} defined twice");
            }
        }
    }

    fn attribute<'a>(node: &'a NodeProto, name: &str) -> &'a AttributeProto {
        node.attribute.iter().find(|a| a.name == name).unwrap_or_else(|| panic!("no attribute {name}"))
    }

    fn last_dim(value: &ValueInfoProto) -> tensor_shape_proto::dimension::Value {
        let Some(type_proto::Value::TensorType(tensor)) = value.r#type.as_ref().unwrap().value.as_ref()
        else {
            panic!("{} is not a tensor", value.name)
        };
        tensor.shape.as_ref().unwrap().dim.last().unwrap().value.clone().unwrap()
    }

    #[test]
    fn group_query_attention_graph_has_genai_io_with_keys_before_values_and_a_symbolic_head_size() {
        let config = tiny_config(true);
        let (_dir, _written, model) =
            export_tiny_with(&config, ExternalData::Never, AttentionKind::GroupQueryAttention);
        let opsets: Vec<_> = model.opset_import.iter().map(|o| (o.domain.as_str(), o.version)).collect();
        assert_eq!(opsets, [("", OPSET_VERSION), ("com.microsoft", 1)]);
        let graph = model.graph.unwrap();
        let inputs: Vec<_> = graph.input.iter().map(|v| v.name.as_str()).collect();
        let outputs: Vec<_> = graph.output.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(
            inputs,
            [
                "input_ids",
                "attention_mask",
                "past_key_values.0.key",
                "past_key_values.1.key",
                "past_key_values.0.value",
                "past_key_values.1.value"
            ]
        );
        assert_eq!(
            outputs,
            ["logits", "present.0.key", "present.1.key", "present.0.value", "present.1.value"]
        );
        let symbolic = tensor_shape_proto::dimension::Value::DimParam("kv_cache_dim".into());
        for cache in graph.input.iter().skip(2).chain(graph.output.iter().skip(1)) {
            assert_eq!(last_dim(cache), symbolic, "{}", cache.name);
        }

        let attention: Vec<_> = graph.node.iter().filter(|n| n.op_type == "GroupQueryAttention").collect();
        assert_eq!(attention.len(), config.num_hidden_layers);
        for (layer, node) in attention.iter().enumerate() {
            assert_eq!(node.domain, "com.microsoft");
            assert_eq!(node.input.len(), 9, "q, k, v, past k/v, seqlens_k, total length, cos, sin");
            assert_eq!(node.input[3], kv_io::past_name(layer, KvKind::Key));
            assert_eq!(node.input[4], kv_io::past_name(layer, KvKind::Value));
            assert_eq!(node.input[7..], ["cos_cache", "sin_cache"]);
            assert_eq!(
                node.output[1..],
                [kv_io::present_name(layer, KvKind::Key), kv_io::present_name(layer, KvKind::Value)]
            );
            assert_eq!(attribute(node, "num_heads").i, 4);
            assert_eq!(attribute(node, "kv_num_heads").i, 2);
            assert_eq!(attribute(node, "do_rotary").i, 1);
            assert_eq!(attribute(node, "rotary_interleaved").i, 0);
            assert!((attribute(node, "scale").f - 8f32.sqrt().recip()).abs() < 1e-7);
        }
        let cos = graph.initializer.iter().find(|t| t.name == "cos_cache").unwrap();
        assert_eq!(cos.dims, [128, 4], "[max_position_embeddings, head_dim / 2]");
        let producer = graph.node.iter().find(|n| n.output.contains(&attention[0].input[5])).unwrap();
        assert_eq!((producer.op_type.as_str(), attribute(producer, "to").i), ("Cast", 6), "int32 seqlens_k");
        assert!(!graph.node.iter().any(|n| n.op_type == "Softmax"), "no attention left outside the op");
    }

    #[test]
    fn rotary_cache_rows_are_the_angles_of_each_position() {
        let config = tiny_config(true);
        let (_dir, _written, model) =
            export_tiny_with(&config, ExternalData::Never, AttentionKind::GroupQueryAttention);
        let graph = model.graph.unwrap();
        let table = |name: &str| -> Vec<f32> {
            let t = graph.initializer.iter().find(|t| t.name == name).unwrap();
            t.raw_data.chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
        };
        let (cos, sin) = (table("cos_cache"), table("sin_cache"));
        let half = config.head_dim / 2;
        for (position, j) in [(0, 0), (1, 0), (5, 3), (127, 1)] {
            let inv_freq = 1.0 / config.rope_theta.powf(2.0 * j as f64 / config.head_dim as f64);
            let angle = position as f64 * inv_freq;
            assert!((cos[position * half + j] as f64 - angle.cos()).abs() < 1e-5, "cos {position} {j}");
            assert!((sin[position * half + j] as f64 - angle.sin()).abs() < 1e-5, "sin {position} {j}");
        }
    }

    #[test]
    fn external_data_is_64_byte_aligned_and_accounts_for_every_byte() {
        let config = tiny_config(false);
        let (_dir, written, model) = export_tiny(&config, ExternalData::Always);
        let data_path = written.data_path.expect("external data file");
        let file_len = std::fs::metadata(&data_path).unwrap().len();
        let graph = model.graph.unwrap();
        let mut spans = Vec::new();
        for t in &graph.initializer {
            let raw_len = if t.data_location == tensor_proto::DataLocation::External as i32 {
                let field = |k: &str| t.external_data.iter().find(|e| e.key == k).map(|e| e.value.clone());
                assert_eq!(field("location").as_deref(), Some(MODEL_DATA_FILE));
                let offset: u64 = field("offset").unwrap().parse().unwrap();
                let length: u64 = field("length").unwrap().parse().unwrap();
                assert_eq!(offset % 64, 0, "{} at {offset}", t.name);
                assert!(t.raw_data.is_empty());
                spans.push((offset, length));
                length
            } else {
                t.raw_data.len() as u64
            };
            assert!(raw_len >= 1024 || t.data_location != tensor_proto::DataLocation::External as i32);
            let elem_size = if t.data_type == tensor_proto::DataType::Int64 as i32 { 8 } else { 4 };
            assert_eq!(raw_len, t.dims.iter().product::<i64>() as u64 * elem_size, "{}", t.name);
        }
        spans.sort();
        for pair in spans.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "overlapping tensors");
        }
        let (last_offset, last_len) = *spans.last().unwrap();
        assert_eq!(last_offset + last_len, file_len);
        let padding: u64 = spans.windows(2).map(|p| p[1].0 - (p[0].0 + p[0].1)).sum();
        assert_eq!(spans.iter().map(|s| s.1).sum::<u64>() + padding + spans[0].0, file_len);
    }

    #[test]
    fn tied_head_stores_the_embedding_once() {
        let config = tiny_config(true);
        let (_dir, _written, model) = export_tiny(&config, ExternalData::Never);
        let graph = model.graph.unwrap();
        let head_like: Vec<_> = graph
            .initializer
            .iter()
            .map(|t| t.name.as_str())
            .filter(|n| n.contains("embed_tokens") || n.contains("lm_head"))
            .collect();
        assert_eq!(head_like, ["model.embed_tokens.weight"]);
        // No anonymous copy either: the weights add up to exactly one embedding.
        let weight_bytes_stored: usize = graph
            .initializer
            .iter()
            .filter(|t| !t.name.starts_with("const_"))
            .map(|t| t.raw_data.len())
            .sum();
        assert_eq!(weight_bytes_stored as u64, weight_bytes(&config));
        let readers: Vec<_> = graph
            .node
            .iter()
            .filter(|n| n.input.iter().any(|i| i == "model.embed_tokens.weight"))
            .map(|n| n.op_type.as_str())
            .collect();
        assert_eq!(readers, ["Gather", "Gemm"]);
    }

    #[test]
    fn untied_head_reads_lm_head() {
        let (_dir, _written, model) = export_tiny(&tiny_config(false), ExternalData::Never);
        let graph = model.graph.unwrap();
        assert!(graph.initializer.iter().any(|t| t.name == "lm_head.weight.T"));
    }

    #[test]
    fn missing_weight_is_an_error_naming_it() {
        let config = tiny_config(true);
        let missing = "model.layers.1.mlp.up_proj.weight";
        let varmap = random_weights(&config, &[missing]);
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let dir = tempfile::tempdir().unwrap();
        let err = write_decoder_onnx(&config, &vb, dir.path(), ExternalData::Always, AttentionKind::Standard)
            .unwrap_err();
        assert!(matches!(&err, ExportError::MissingWeight { name } if name == missing), "{err}");
        assert!(err.to_string().contains(missing));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "no half-written files");
    }

    #[test]
    fn wrongly_shaped_weight_is_an_error_naming_it() {
        let config = tiny_config(true);
        let name = "model.layers.0.self_attn.k_proj.weight";
        let mut tensors = varmap_tensors(&random_weights(&config, &[]));
        tensors.insert(name.to_string(), Tensor::zeros((3, 5), DType::F32, &Device::Cpu).unwrap());
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let dir = tempfile::tempdir().unwrap();
        let err = write_decoder_onnx(&config, &vb, dir.path(), ExternalData::Never, AttentionKind::Standard)
            .unwrap_err();
        assert!(matches!(&err, ExportError::Weight { name: n, .. } if n == name), "{err}");
    }

    #[test]
    fn qwen2_biases_are_exported_and_llama_has_none() {
        let qwen = tiny_config(true);
        let (_d1, _w1, model) = export_tiny(&qwen, ExternalData::Never);
        let names: Vec<_> = model.graph.unwrap().initializer.into_iter().map(|t| t.name).collect();
        assert!(names.iter().any(|n| n == "model.layers.0.self_attn.q_proj.bias"));
        let llama = ModelConfig { model_type: ModelFamily::Llama, ..tiny_config(false) };
        let (_d2, _w2, model) = export_tiny(&llama, ExternalData::Never);
        assert!(!model.graph.unwrap().initializer.iter().any(|t| t.name.ends_with(".bias")));
    }

    #[test]
    fn auto_external_data_switches_above_one_and_a_half_gib() {
        assert!(!ExternalData::Auto.applies_to(AUTO_EXTERNAL_DATA_ABOVE));
        assert!(ExternalData::Auto.applies_to(AUTO_EXTERNAL_DATA_ABOVE + 1));
        assert!(ExternalData::Always.applies_to(0));
        assert!(!ExternalData::Never.applies_to(u64::MAX));
    }

    #[test]
    fn weight_bytes_counts_every_exported_tensor() {
        for config in [tiny_config(true), tiny_config(false)] {
            let expected: usize =
                tensor_shapes(&config).iter().map(|(_, s)| s.iter().product::<usize>()).sum();
            assert_eq!(weight_bytes(&config), expected as u64 * 4);
        }
    }
}
