//! The Qwen2/Llama decoder as an ONNX graph with the standard KV-cache I/O, in two attention
//! variants ([`AttentionKind`]).
//!
//! In the standard variant, inputs are `input_ids` and `position_ids` `[batch, sequence]`,
//! `attention_mask` `[batch, total_sequence]` (all int64) and, interleaved per layer,
//! `past_key_values.{i}.key` / `.value` `[batch, kv_heads, past_sequence, head_dim]` (f32). Outputs
//! are `logits` `[batch, sequence, vocab]` and `present.{i}.key` / `.value` `[batch, kv_heads,
//! total_sequence, head_dim]`. The names come from [`tandem_core::kv_io`].
//!
//! The standard variant uses only opset-17 ops, so every execution provider and old edge runtimes
//! can run it: RMSNorm, RoPE (from `position_ids`, Hugging Face's rotate-half convention),
//! grouped-query attention and SiLU are composed from elementary ops. The attention mask is causal
//! on absolute slots and combined with `attention_mask`; masked scores get `f32::MIN` rather than
//! `-inf`, so a fully padded row softmaxes to a uniform distribution instead of NaN.
//!
//! The `GroupQueryAttention` variant mirrors onnxruntime-genai's model builder: no `position_ids`
//! input, one `com.microsoft` `GroupQueryAttention` per layer (rotary embedding inside, from
//! `cos_cache`/`sin_cache` initializers), `seqlens_k = sum(attention_mask) - 1` and
//! `total_sequence_length` computed from the mask, all key caches before all value caches and a
//! symbolic cache head size (`kv_cache_dim`).
//!
//! In both, linear weights are stored pre-transposed (`[in, out]`, named `<hf name>.T`); a tied
//! output head reuses the embedding initializer through `Gemm(transB = 1)`, so the embedding is
//! stored once.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use tandem_core::kv_io::{self, KvKind};

use super::graph_builder::{Dim, ElemType, GraphBuilder, MICROSOFT_OPSET, attr_float, attr_int, attr_ints};
use super::{AttentionKind, ExportError};
use crate::model::config::ModelConfig;

const BATCH: Dim = Dim::Symbolic("batch_size");
const SEQUENCE: Dim = Dim::Symbolic("sequence_length");
const PAST_SEQUENCE: Dim = Dim::Symbolic("past_sequence_length");
const TOTAL_SEQUENCE: Dim = Dim::Symbolic("total_sequence_length");
/// The cache head size as onnxruntime-genai's builder leaves it: symbolic, read from `head_size`.
const KV_CACHE_DIM: Dim = Dim::Symbolic("kv_cache_dim");

/// Name of the graph inside the model.
pub const GRAPH_NAME: &str = "tandem_decoder";

/// `TensorProto.DataType` codes used by `Cast`.
const CAST_TO_FLOAT: i64 = 1;
const CAST_TO_INT32: i64 = 6;
const CAST_TO_BOOL: i64 = 9;

/// Initializer names of the rotary tables `GroupQueryAttention` reads (as the genai builder names them).
const COS_CACHE: &str = "cos_cache";
const SIN_CACHE: &str = "sin_cache";

/// Bytes of f32 checkpoint weights the graph will hold for `config` (used to choose external
/// data). The `GroupQueryAttention` variant adds its two rotary tables of
/// `max_position_embeddings * head_dim / 2` floats each.
pub fn weight_bytes(config: &ModelConfig) -> u64 {
    let h = config.hidden_size as u64;
    let q = (config.num_attention_heads * config.head_dim) as u64;
    let kv = (config.num_key_value_heads * config.head_dim) as u64;
    let inter = config.intermediate_size as u64;
    let vocab = config.vocab_size as u64;
    let mut per_layer = 2 * h + h * q + 2 * h * kv + q * h + 3 * h * inter;
    if config.qkv_bias() {
        per_layer += q + 2 * kv;
    }
    if config.o_bias() {
        per_layer += h;
    }
    let head = if config.tie_word_embeddings { 0 } else { vocab * h };
    let params = vocab * h + (config.num_hidden_layers as u64) * per_layer + h + head;
    params.saturating_mul(4)
}

/// Graph dimensions are int64 in ONNX; refuse configs whose sizes do not fit comfortably.
fn check_dims(config: &ModelConfig) -> Result<(), ExportError> {
    let dims = [
        ("vocab_size", config.vocab_size),
        ("hidden_size", config.hidden_size),
        ("intermediate_size", config.intermediate_size),
        ("num_attention_heads * head_dim", config.num_attention_heads.saturating_mul(config.head_dim)),
        ("num_hidden_layers", config.num_hidden_layers),
    ];
    for (what, value) in dims {
        if value > i32::MAX as usize {
            return Err(ExportError::Config(crate::model::config::ConfigError::Invalid(format!(
                "{what} = {value} is too large to export"
            ))));
        }
    }
    Ok(())
}

/// Emits the decoder for `config` with the weights of `vb` and the `attention` variant into `b`.
pub fn build_decoder(
    config: &ModelConfig,
    vb: &VarBuilder<'_>,
    attention: AttentionKind,
    b: &mut GraphBuilder,
) -> Result<(), ExportError> {
    config.validate()?;
    check_dims(config)?;
    DecoderEmitter { config, vb, b, attention }.emit()
}

struct DecoderEmitter<'a, 'v> {
    config: &'a ModelConfig,
    vb: &'a VarBuilder<'v>,
    b: &'a mut GraphBuilder,
    attention: AttentionKind,
}

/// Per-graph values every layer's attention uses.
enum Shared {
    /// Rotary tables `[batch, 1, sequence, head_dim]` and the additive mask.
    Standard { cos: String, sin: String, mask: String },
    /// `GroupQueryAttention`'s per-row `seqlens_k` and scalar `total_sequence_length` (int32),
    /// and the rotary tables `[max_position_embeddings, head_dim / 2]`.
    Fused { seqlens_k: String, total_length: String, cos_cache: String, sin_cache: String },
}

/// The order of the cache inputs and outputs: torch/optimum interleave them per layer, genai lists
/// every key before every value.
fn cache_order(attention: AttentionKind, layers: usize) -> Vec<(usize, KvKind)> {
    match attention {
        AttentionKind::Standard => {
            (0..layers).flat_map(|layer| [(layer, KvKind::Key), (layer, KvKind::Value)]).collect()
        }
        AttentionKind::GroupQueryAttention => [KvKind::Key, KvKind::Value]
            .into_iter()
            .flat_map(|kind| (0..layers).map(move |layer| (layer, kind)))
            .collect(),
    }
}

impl DecoderEmitter<'_, '_> {
    fn emit(mut self) -> Result<(), ExportError> {
        let c = self.config;
        let (layers, kv_heads, head_dim) =
            (c.num_hidden_layers, c.num_key_value_heads as i64, c.head_dim as i64);
        let vocab = c.vocab_size as i64;

        let input_ids = self.b.input(kv_io::INPUT_IDS, ElemType::I64, &[BATCH, SEQUENCE])?;
        let attention_mask = self.b.input(kv_io::ATTENTION_MASK, ElemType::I64, &[BATCH, TOTAL_SEQUENCE])?;
        let shared = match self.attention {
            AttentionKind::Standard => {
                let position_ids = self.b.input(kv_io::POSITION_IDS, ElemType::I64, &[BATCH, SEQUENCE])?;
                let (cos, sin) = self.rotary_tables(&position_ids)?;
                let mask = self.attention_bias(&input_ids, &attention_mask)?;
                Shared::Standard { cos, sin, mask }
            }
            AttentionKind::GroupQueryAttention => self.fused_attention_inputs(&attention_mask)?,
        };
        let head_dim_dim = match self.attention {
            AttentionKind::Standard => Dim::Fixed(head_dim),
            AttentionKind::GroupQueryAttention => KV_CACHE_DIM,
        };
        let cache_dims = |len| [BATCH, Dim::Fixed(kv_heads), len, head_dim_dim];
        let order = cache_order(self.attention, layers);
        for &(layer, kind) in &order {
            self.b.input(&kv_io::past_name(layer, kind), ElemType::F32, &cache_dims(PAST_SEQUENCE))?;
        }
        self.b.output(kv_io::LOGITS, ElemType::F32, &[BATCH, SEQUENCE, Dim::Fixed(vocab)]);
        for &(layer, kind) in &order {
            self.b.output(&kv_io::present_name(layer, kind), ElemType::F32, &cache_dims(TOTAL_SEQUENCE));
        }

        self.b.set_scope("embed");
        let embed_name = "model.embed_tokens.weight";
        let embed = self.weight(embed_name, &[c.vocab_size, c.hidden_size])?;
        let mut hidden = self.b.op("Gather", &[&embed, &input_ids], vec![attr_int("axis", 0)]);

        for layer in 0..layers {
            hidden = self.layer(layer, &hidden, &shared)?;
        }

        self.b.set_scope("head");
        let normed = self.rms_norm(&hidden, "model.norm.weight")?;
        if c.tie_word_embeddings {
            // Gemm needs 2-D operands; the embedding [vocab, hidden] is reused as is (transB).
            let flat_shape = self.b.ints(&[-1, c.hidden_size as i64])?;
            let flat = self.b.op("Reshape", &[&normed, &flat_shape], vec![]);
            let logits_2d = self.b.op("Gemm", &[&flat, &embed], vec![attr_int("transB", 1)]);
            let ids_shape = self.b.op("Shape", &[&input_ids], vec![]);
            let vocab_dim = self.b.ints(&[vocab])?;
            let out_shape = self.b.op("Concat", &[&ids_shape, &vocab_dim], vec![attr_int("axis", 0)]);
            self.b.op_into("Reshape", &[&logits_2d, &out_shape], vec![], kv_io::LOGITS)?;
        } else {
            let head = self.weight_transposed("lm_head.weight", c.vocab_size, c.hidden_size)?;
            self.b.op_into("MatMul", &[&normed, &head], vec![], kv_io::LOGITS)?;
        }
        Ok(())
    }

    /// `cos`/`sin` of the rotary angles, `[batch, 1, sequence, head_dim]`, from `position_ids`.
    fn rotary_tables(&mut self, position_ids: &str) -> Result<(String, String), ExportError> {
        self.b.set_scope("rotary");
        let half = self.config.head_dim / 2;
        let inv_freq = self.inv_freq();
        let inv_freq = self.b.const_f32(&[1, 1, half as i64], &inv_freq)?;
        let positions = self.b.op("Cast", &[position_ids], vec![attr_int("to", CAST_TO_FLOAT)]);
        let last_axis = self.b.ints(&[-1])?;
        let positions = self.b.op("Unsqueeze", &[&positions, &last_axis], vec![]);
        let freqs = self.b.op("Mul", &[&positions, &inv_freq], vec![]);
        let angles = self.b.op("Concat", &[&freqs, &freqs], vec![attr_int("axis", -1)]);
        let head_axis = self.b.ints(&[1])?;
        let angles = self.b.op("Unsqueeze", &[&angles, &head_axis], vec![]);
        let cos = self.b.op("Cos", &[&angles], vec![]);
        let sin = self.b.op("Sin", &[&angles], vec![]);
        Ok((cos, sin))
    }

    /// What every layer's `GroupQueryAttention` reads besides q/k/v and its cache, computed as the
    /// genai builder does: `seqlens_k = ReduceSum(attention_mask, axis 1) - 1` and
    /// `total_sequence_length = Shape(attention_mask)[1]`, both int32, plus the rotary tables
    /// `cos/sin(position * inv_freq)` for every position up to `max_position_embeddings`.
    fn fused_attention_inputs(&mut self, attention_mask: &str) -> Result<Shared, ExportError> {
        self.b.set_scope("attn_mask_reformat");
        let one = self.b.scalar_i64(1)?;
        let row_axis = self.b.ints(&[1])?;
        let lengths = self.b.op("ReduceSum", &[attention_mask, &row_axis], vec![attr_int("keepdims", 0)]);
        let last_slots = self.b.op("Sub", &[&lengths, &one], vec![]);
        let seqlens_k = self.b.op("Cast", &[&last_slots], vec![attr_int("to", CAST_TO_INT32)]);
        let mask_shape = self.b.op("Shape", &[attention_mask], vec![]);
        let total = self.b.op("Gather", &[&mask_shape, &one], vec![attr_int("axis", 0)]);
        let total_length = self.b.op("Cast", &[&total], vec![attr_int("to", CAST_TO_INT32)]);

        let c = self.config;
        let (positions, half) = (c.max_position_embeddings, c.head_dim / 2);
        let inv_freq = self.inv_freq();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for position in 0..positions {
            for &freq in &inv_freq {
                // The same f32 product as the standard graph and the candle model.
                let angle = position as f32 * freq;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let dims = [positions as i64, half as i64];
        let cos_cache = self.b.weight_f32(COS_CACHE, &dims, &cos)?;
        let sin_cache = self.b.weight_f32(SIN_CACHE, &dims, &sin)?;
        Ok(Shared::Fused { seqlens_k, total_length, cos_cache, sin_cache })
    }

    /// Rotary inverse frequencies `1 / theta^(2j / head_dim)` for `j < head_dim / 2`.
    fn inv_freq(&self) -> Vec<f32> {
        let head_dim = self.config.head_dim as f64;
        (0..self.config.head_dim / 2)
            .map(|j| (1.0 / self.config.rope_theta.powf(2.0 * j as f64 / head_dim)) as f32)
            .collect()
    }

    /// The additive attention bias `[batch, 1, sequence, total_sequence]`: 0 where a query may
    /// attend (causal on absolute slots and not padding), `f32::MIN` elsewhere.
    fn attention_bias(&mut self, input_ids: &str, attention_mask: &str) -> Result<String, ExportError> {
        self.b.set_scope("mask");
        let zero = self.b.scalar_i64(0)?;
        let one = self.b.scalar_i64(1)?;
        let ids_shape = self.b.op("Shape", &[input_ids], vec![]);
        let mask_shape = self.b.op("Shape", &[attention_mask], vec![]);
        let seq = self.b.op("Gather", &[&ids_shape, &one], vec![attr_int("axis", 0)]);
        let total = self.b.op("Gather", &[&mask_shape, &one], vec![attr_int("axis", 0)]);
        let past = self.b.op("Sub", &[&total, &seq], vec![]);
        let key_slots = self.b.op("Range", &[&zero, &total, &one], vec![]);
        let query_slots = self.b.op("Range", &[&past, &total, &one], vec![]);
        let col_axis = self.b.ints(&[1])?;
        let query_slots = self.b.op("Unsqueeze", &[&query_slots, &col_axis], vec![]);
        let causal = self.b.op("LessOrEqual", &[&key_slots, &query_slots], vec![]);
        let not_padding = self.b.op("Cast", &[attention_mask], vec![attr_int("to", CAST_TO_BOOL)]);
        let head_and_query_axes = self.b.ints(&[1, 2])?;
        let not_padding = self.b.op("Unsqueeze", &[&not_padding, &head_and_query_axes], vec![]);
        let allowed = self.b.op("And", &[&causal, &not_padding], vec![]);
        let open = self.b.scalar_f32(0.0)?;
        let blocked = self.b.scalar_f32(f32::MIN)?;
        Ok(self.b.op("Where", &[&allowed, &open, &blocked], vec![]))
    }

    fn layer(&mut self, layer: usize, hidden: &str, shared: &Shared) -> Result<String, ExportError> {
        let c = self.config;
        let (heads, kv_heads, head_dim) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let p = format!("model.layers.{layer}");

        self.b.set_scope(format!("layers.{layer}/attn"));
        let normed = self.rms_norm(hidden, &format!("{p}.input_layernorm.weight"))?;
        let attn = format!("{p}.self_attn");
        let q =
            self.linear(&normed, &format!("{attn}.q_proj"), c.hidden_size, heads * head_dim, c.qkv_bias())?;
        let k = self.linear(
            &normed,
            &format!("{attn}.k_proj"),
            c.hidden_size,
            kv_heads * head_dim,
            c.qkv_bias(),
        )?;
        let v = self.linear(
            &normed,
            &format!("{attn}.v_proj"),
            c.hidden_size,
            kv_heads * head_dim,
            c.qkv_bias(),
        )?;
        let context = match shared {
            Shared::Standard { cos, sin, mask } => {
                self.standard_attention(layer, [&q, &k, &v], [cos, sin], mask)?
            }
            Shared::Fused { seqlens_k, total_length, cos_cache, sin_cache } => self.group_query_attention(
                layer,
                [&q, &k, &v],
                [seqlens_k, total_length, cos_cache, sin_cache],
            )?,
        };
        let out =
            self.linear(&context, &format!("{attn}.o_proj"), heads * head_dim, c.hidden_size, c.o_bias())?;
        let hidden = self.b.op("Add", &[hidden, &out], vec![]);

        self.b.set_scope(format!("layers.{layer}/mlp"));
        let normed = self.rms_norm(&hidden, &format!("{p}.post_attention_layernorm.weight"))?;
        let mlp = format!("{p}.mlp");
        let gate =
            self.linear(&normed, &format!("{mlp}.gate_proj"), c.hidden_size, c.intermediate_size, false)?;
        let up =
            self.linear(&normed, &format!("{mlp}.up_proj"), c.hidden_size, c.intermediate_size, false)?;
        let gate_sigmoid = self.b.op("Sigmoid", &[&gate], vec![]);
        let gate = self.b.op("Mul", &[&gate, &gate_sigmoid], vec![]);
        let gated = self.b.op("Mul", &[&gate, &up], vec![]);
        let down =
            self.linear(&gated, &format!("{mlp}.down_proj"), c.intermediate_size, c.hidden_size, false)?;
        Ok(self.b.op("Add", &[&hidden, &down], vec![]))
    }

    /// Attention from standard ops on `[batch, seq, heads * head_dim]` projections; writes the
    /// layer's `present` outputs and returns the context `[batch, seq, heads * head_dim]`.
    fn standard_attention(
        &mut self,
        layer: usize,
        [q, k, v]: [&str; 3],
        [cos, sin]: [&str; 2],
        mask: &str,
    ) -> Result<String, ExportError> {
        let c = self.config;
        let (heads, kv_heads, head_dim) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let q = self.split_heads(q, heads)?;
        let k = self.split_heads(k, kv_heads)?;
        let v = self.split_heads(v, kv_heads)?;
        let q = self.rotate(&q, cos, sin)?;
        let k = self.rotate(&k, cos, sin)?;

        let seq_axis = vec![attr_int("axis", 2)];
        let present_key = self.b.op_into(
            "Concat",
            &[&kv_io::past_name(layer, KvKind::Key), &k],
            seq_axis.clone(),
            &kv_io::present_name(layer, KvKind::Key),
        )?;
        let present_value = self.b.op_into(
            "Concat",
            &[&kv_io::past_name(layer, KvKind::Value), &v],
            seq_axis,
            &kv_io::present_name(layer, KvKind::Value),
        )?;
        let keys = self.repeat_kv(&present_key)?;
        let values = self.repeat_kv(&present_value)?;

        let keys_t = self.b.op("Transpose", &[&keys], vec![attr_ints("perm", &[0, 1, 3, 2])]);
        let scores = self.b.op("MatMul", &[&q, &keys_t], vec![]);
        let scale = self.b.scalar_f32((1.0 / (head_dim as f64).sqrt()) as f32)?;
        let scores = self.b.op("Mul", &[&scores, &scale], vec![]);
        let scores = self.b.op("Add", &[&scores, mask], vec![]);
        let probs = self.b.op("Softmax", &[&scores], vec![attr_int("axis", -1)]);
        let context = self.b.op("MatMul", &[&probs, &values], vec![]);
        let context = self.b.op("Transpose", &[&context], vec![attr_ints("perm", &[0, 2, 1, 3])]);
        let merged_shape = self.b.ints(&[0, 0, (heads * head_dim) as i64])?;
        Ok(self.b.op("Reshape", &[&context, &merged_shape], vec![]))
    }

    /// One `com.microsoft` `GroupQueryAttention` on the `[batch, seq, heads * head_dim]`
    /// projections, rotating q and k itself; writes the layer's `present` outputs and returns the
    /// context `[batch, seq, heads * head_dim]`.
    fn group_query_attention(
        &mut self,
        layer: usize,
        [q, k, v]: [&str; 3],
        [seqlens_k, total_length, cos_cache, sin_cache]: [&str; 4],
    ) -> Result<String, ExportError> {
        let c = self.config;
        let past_key = kv_io::past_name(layer, KvKind::Key);
        let past_value = kv_io::past_name(layer, KvKind::Value);
        // The contrib op's input order (ONNX Runtime 1.31 schema); later optional inputs are omitted.
        let inputs = [q, k, v, &past_key, &past_value, seqlens_k, total_length, cos_cache, sin_cache];
        let attrs = vec![
            attr_int("num_heads", c.num_attention_heads as i64),
            attr_int("kv_num_heads", c.num_key_value_heads as i64),
            attr_float("scale", (1.0 / (c.head_dim as f64).sqrt()) as f32),
            attr_int("do_rotary", 1),
            // Hugging Face's rotate-half convention: dimension j pairs with j + head_dim / 2.
            attr_int("rotary_interleaved", 0),
        ];
        let present_key = kv_io::present_name(layer, KvKind::Key);
        let present_value = kv_io::present_name(layer, KvKind::Value);
        let outputs = [None, Some(present_key.as_str()), Some(present_value.as_str())];
        let mut outputs = self.b.op_in(MICROSOFT_OPSET, "GroupQueryAttention", &inputs, attrs, &outputs)?;
        Ok(outputs.swap_remove(0))
    }

    /// `x * w / sqrt(mean(x²) + eps)` over the last axis.
    fn rms_norm(&mut self, x: &str, weight_name: &str) -> Result<String, ExportError> {
        let weight = self.weight(weight_name, &[self.config.hidden_size])?;
        let eps = self.b.scalar_f32(self.config.rms_norm_eps as f32)?;
        let squared = self.b.op("Mul", &[x, x], vec![]);
        // Opset 17: `axes` is still an attribute of ReduceMean (an input from opset 18).
        let mean =
            self.b.op("ReduceMean", &[&squared], vec![attr_ints("axes", &[-1]), attr_int("keepdims", 1)]);
        let mean = self.b.op("Add", &[&mean, &eps], vec![]);
        let rms = self.b.op("Sqrt", &[&mean], vec![]);
        let normed = self.b.op("Div", &[x, &rms], vec![]);
        Ok(self.b.op("Mul", &[&normed, &weight], vec![]))
    }

    /// `x @ Wᵀ (+ b)` with `W` `[out, in]` from the checkpoint, stored as `[in, out]`.
    fn linear(
        &mut self,
        x: &str,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<String, ExportError> {
        let weight = self.weight_transposed(&format!("{prefix}.weight"), out_features, in_features)?;
        let y = self.b.op("MatMul", &[x, &weight], vec![]);
        if !bias {
            return Ok(y);
        }
        let bias = self.weight(&format!("{prefix}.bias"), &[out_features])?;
        Ok(self.b.op("Add", &[&y, &bias], vec![]))
    }

    /// `[batch, seq, heads * head_dim]` → `[batch, heads, seq, head_dim]`.
    fn split_heads(&mut self, x: &str, heads: usize) -> Result<String, ExportError> {
        let shape = self.b.ints(&[0, 0, heads as i64, self.config.head_dim as i64])?;
        let x = self.b.op("Reshape", &[x, &shape], vec![]);
        Ok(self.b.op("Transpose", &[&x], vec![attr_ints("perm", &[0, 2, 1, 3])]))
    }

    /// RoPE with Hugging Face's convention: `x * cos + cat(-x2, x1) * sin`.
    fn rotate(&mut self, x: &str, cos: &str, sin: &str) -> Result<String, ExportError> {
        let half = (self.config.head_dim / 2) as i64;
        let starts_lo = self.b.ints(&[0])?;
        let mid = self.b.ints(&[half])?;
        let end = self.b.ints(&[2 * half])?;
        let axis = self.b.ints(&[3])?;
        let x1 = self.b.op("Slice", &[x, &starts_lo, &mid, &axis], vec![]);
        let x2 = self.b.op("Slice", &[x, &mid, &end, &axis], vec![]);
        let neg_x2 = self.b.op("Neg", &[&x2], vec![]);
        let rotated = self.b.op("Concat", &[&neg_x2, &x1], vec![attr_int("axis", -1)]);
        let x_cos = self.b.op("Mul", &[x, cos], vec![]);
        let rotated_sin = self.b.op("Mul", &[&rotated, sin], vec![]);
        Ok(self.b.op("Add", &[&x_cos, &rotated_sin], vec![]))
    }

    /// Grouped-query attention: repeats each KV head for its group of query heads,
    /// `[b, kv, t, d]` → `[b, heads, t, d]` (head `h` reads KV head `h / group`).
    fn repeat_kv(&mut self, x: &str) -> Result<String, ExportError> {
        let c = self.config;
        let group = c.num_attention_heads / c.num_key_value_heads;
        if group == 1 {
            return Ok(x.to_string());
        }
        let group_axis = self.b.ints(&[2])?;
        let x = self.b.op("Unsqueeze", &[x, &group_axis], vec![]);
        // Broadcasting expands the new axis; no dynamic shape is needed.
        let expand = self.b.ints(&[1, 1, group as i64, 1, 1])?;
        let x = self.b.op("Expand", &[&x, &expand], vec![]);
        let shape = self.b.ints(&[0, c.num_attention_heads as i64, -1, c.head_dim as i64])?;
        Ok(self.b.op("Reshape", &[&x, &shape], vec![]))
    }

    /// Stores checkpoint tensor `name` (shape `shape`) as an initializer of the same name.
    fn weight(&mut self, name: &str, shape: &[usize]) -> Result<String, ExportError> {
        let tensor = fetch(self.vb, name, shape)?;
        let data = to_f32_vec(name, &tensor)?;
        drop(tensor);
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        self.b.weight_f32(name, &dims, &data)
    }

    /// Stores the `[rows, cols]` checkpoint tensor `name` transposed, as `<name>.T` `[cols, rows]`.
    fn weight_transposed(&mut self, name: &str, rows: usize, cols: usize) -> Result<String, ExportError> {
        let tensor = fetch(self.vb, name, &[rows, cols])?;
        let transposed =
            tensor.t().map_err(|source| ExportError::Weight { name: name.to_string(), source })?;
        drop(tensor);
        let data = to_f32_vec(name, &transposed)?;
        drop(transposed);
        self.b.weight_f32(&format!("{name}.T"), &[cols as i64, rows as i64], &data)
    }
}

/// Reads one tensor, checking that it exists and has the expected shape.
fn fetch(vb: &VarBuilder<'_>, name: &str, shape: &[usize]) -> Result<Tensor, ExportError> {
    if !vb.contains_tensor(name) {
        return Err(ExportError::MissingWeight { name: name.to_string() });
    }
    vb.get(shape, name)
        .and_then(|t| t.to_dtype(DType::F32))
        .map_err(|source| ExportError::Weight { name: name.to_string(), source })
}

fn to_f32_vec(name: &str, tensor: &Tensor) -> Result<Vec<f32>, ExportError> {
    tensor
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|source| ExportError::Weight { name: name.to_string(), source })
}
