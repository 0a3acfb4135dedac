//! The decoder: Qwen2 and Llama in one implementation, with Hugging Face tensor names.
//!
//! Two modes share the weights. `Mode::Train` uses only differentiable ops (composed RMSNorm, our
//! fused softmax with its backward) so gradients reach every weight; `Mode::Infer` uses candle's
//! fused kernels, which have no backward pass. RoPE is computed from `position_ids`, padding is an
//! explicit mask, and the KV cache is kept outside the model, so one `&Decoder` serves rollouts and
//! training alike.

use candle_core::{D, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::ModelConfig;
use super::fused::softmax_last_dim;
use super::kv_cache::KvCache;

/// Which ops the forward pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Differentiable ops only.
    Train,
    /// Fused kernels without backward.
    Infer,
}

/// Added to attention scores of masked slots. Finite, so fully masked pad rows stay NaN-free.
const MASKED_SCORE: f64 = -1e9;

/// A linear layer `y = x Wᵀ + b` that folds the batch before the matmul (a non-contiguous
/// batched matmul would materialise one copy of the weight per row). With a LoRA adapter it adds
/// `scale · (x Aᵀ) Bᵀ`, never forming `B A`.
#[derive(Debug, Clone)]
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<LoraAdapter>,
}

/// A low-rank update of one projection: `A` is `[rank, in]`, `B` is `[out, rank]`.
#[derive(Debug, Clone)]
struct LoraAdapter {
    a: Tensor,
    b: Tensor,
    scale: f64,
}

impl Linear {
    fn load(vb: &VarBuilder, out_dim: usize, in_dim: usize, bias: bool, init_std: f64) -> Result<Self> {
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", normal(init_std))?;
        let bias =
            if bias { Some(vb.get_with_hints(out_dim, "bias", candle_nn::Init::Const(0.0))?) } else { None };
        Ok(Self { weight, bias, lora: None })
    }

    /// This layer with an adapter read from (or created in) `vb`: `lora_A.weight` with PEFT's
    /// Kaiming-uniform initialisation, `lora_B.weight` zero, so the adapted layer starts equal.
    fn with_lora(&self, vb: &VarBuilder, rank: usize, alpha: f64) -> Result<Self> {
        let (out_dim, in_dim) = self.weight.dims2()?;
        let bound = 1.0 / (in_dim as f64).sqrt();
        let a = vb.get_with_hints(
            (rank, in_dim),
            "lora_A.weight",
            candle_nn::Init::Uniform { lo: -bound, up: bound },
        )?;
        let b = vb.get_with_hints((out_dim, rank), "lora_B.weight", candle_nn::Init::Const(0.0))?;
        Ok(Self { lora: Some(LoraAdapter { a, b, scale: alpha / rank as f64 }), ..self.clone() })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, s, d) = x.dims3()?;
        let x = x.contiguous()?.reshape((b * s, d))?;
        let y = x.matmul(&self.weight.t()?)?;
        let y = match &self.lora {
            Some(lora) => (y + (x.matmul(&lora.a.t()?)?.matmul(&lora.b.t()?)? * lora.scale)?)?,
            None => y,
        };
        let y = match &self.bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        };
        y.reshape((b, s, ()))
    }
}

fn normal(stdev: f64) -> candle_nn::Init {
    candle_nn::Init::Randn { mean: 0.0, stdev }
}

#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(vb: &VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?, eps })
    }

    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        if mode == Mode::Infer && x.is_contiguous() {
            return candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32);
        }
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_div(&(mean_square + self.eps)?.sqrt()?)?.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// Rotary tables for one forward pass: `[batch, 1, seq, head_dim]`.
struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    fn new(inv_freq: &Tensor, position_ids: &Tensor) -> Result<Self> {
        let positions = position_ids.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
        let freqs = positions.broadcast_mul(&inv_freq.reshape((1, 1, ()))?)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?.unsqueeze(1)?;
        Ok(Self { cos: emb.cos()?, sin: emb.sin()? })
    }

    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let half = x.dim(D::Minus1)? / 2;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&self.cos)? + rotated.broadcast_mul(&self.sin)?
    }
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        mask: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let heads = |t: Tensor, n: usize| t.reshape((b, s, n, self.head_dim))?.transpose(1, 2);
        let q = rotary.apply(&heads(self.q_proj.forward(x)?, self.num_heads)?)?;
        let k = rotary.apply(&heads(self.k_proj.forward(x)?, self.num_kv_heads)?)?;
        let v = heads(self.v_proj.forward(x)?, self.num_kv_heads)?;
        let (k, v) = match cache {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((past_k, past_v)) => {
                        (Tensor::cat(&[&past_k, &k], 2)?, Tensor::cat(&[&past_v, &v], 2)?)
                    }
                    None => (k.contiguous()?, v.contiguous()?),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k, v),
        };
        // Grouped-query attention: query head `h` uses key/value head `h / rep`, so the `rep` query
        // heads of a key/value head are stacked as `rep · s` rows of one matmul against it (no
        // copy of the keys and values per query head).
        let (kv, t, hd) = (self.num_kv_heads, k.dim(2)?, self.head_dim);
        let rep = self.num_heads / kv;
        let q = q.contiguous()?.reshape((b, kv, rep * s, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&k.contiguous()?.t()?)? * scale)?
            .reshape((b, self.num_heads, s, t))?
            .broadcast_add(mask)?;
        let weights = match mode {
            Mode::Train => softmax_last_dim(&scores)?,
            Mode::Infer => candle_nn::ops::softmax_last_dim(&scores)?,
        };
        let out = weights.reshape((b, kv, rep * s, t))?.matmul(&v.contiguous()?)?;
        let out = out.reshape((b, self.num_heads, s, hd))?.transpose(1, 2)?.reshape((b, s, ()))?;
        self.o_proj.forward(&out)
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(x)?)?;
        self.down_proj.forward(&(gate * self.up_proj.forward(x)?)?)
    }
}

/// A Qwen2- or Llama-family decoder-only transformer.
#[derive(Debug, Clone)]
pub struct Decoder {
    config: ModelConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Tensor,
    inv_freq: Tensor,
}

/// Weights created for a fresh model are drawn from N(0, this) unless the caller says otherwise.
pub const DEFAULT_INIT_STD: f64 = 0.02;

impl Decoder {
    /// Builds the decoder from `vb` (HF names). With a `VarMap`-backed builder, missing weights are
    /// created (normal(0, `init_std`), norms 1, biases 0) and become trainable.
    pub fn load(config: &ModelConfig, vb: VarBuilder, init_std: f64) -> Result<Self> {
        config.validate().map_err(candle_core::Error::wrap)?;
        let c = config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let model = vb.pp("model");
        let embed_tokens =
            model.get_with_hints((c.vocab_size, h), "embed_tokens.weight", normal(init_std))?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let lvb = model.pp(format!("layers.{i}"));
            let attn = lvb.pp("self_attn");
            let mlp = lvb.pp("mlp");
            layers.push(DecoderLayer {
                input_layernorm: RmsNorm::load(&lvb.pp("input_layernorm"), h, c.rms_norm_eps)?,
                self_attn: Attention {
                    q_proj: Linear::load(
                        &attn.pp("q_proj"),
                        c.num_attention_heads * hd,
                        h,
                        c.qkv_bias(),
                        init_std,
                    )?,
                    k_proj: Linear::load(
                        &attn.pp("k_proj"),
                        c.num_key_value_heads * hd,
                        h,
                        c.qkv_bias(),
                        init_std,
                    )?,
                    v_proj: Linear::load(
                        &attn.pp("v_proj"),
                        c.num_key_value_heads * hd,
                        h,
                        c.qkv_bias(),
                        init_std,
                    )?,
                    o_proj: Linear::load(
                        &attn.pp("o_proj"),
                        h,
                        c.num_attention_heads * hd,
                        c.o_bias(),
                        init_std,
                    )?,
                    num_heads: c.num_attention_heads,
                    num_kv_heads: c.num_key_value_heads,
                    head_dim: hd,
                },
                post_attention_layernorm: RmsNorm::load(
                    &lvb.pp("post_attention_layernorm"),
                    h,
                    c.rms_norm_eps,
                )?,
                mlp: Mlp {
                    gate_proj: Linear::load(&mlp.pp("gate_proj"), c.intermediate_size, h, false, init_std)?,
                    up_proj: Linear::load(&mlp.pp("up_proj"), c.intermediate_size, h, false, init_std)?,
                    down_proj: Linear::load(&mlp.pp("down_proj"), h, c.intermediate_size, false, init_std)?,
                },
            });
        }
        let norm = RmsNorm::load(&model.pp("norm"), h, c.rms_norm_eps)?;
        let lm_head = if c.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            vb.get_with_hints((c.vocab_size, h), "lm_head.weight", normal(init_std))?
        };
        let inv_freq: Vec<f32> =
            (0..hd / 2).map(|i| (1.0 / c.rope_theta.powf(2.0 * i as f64 / hd as f64)) as f32).collect();
        let inv_freq = Tensor::from_vec(inv_freq, hd / 2, vb.device())?;
        Ok(Self { config: config.clone(), embed_tokens, layers, norm, lm_head, inv_freq })
    }

    /// A copy of this decoder with LoRA adapters on the `targets` projections of every layer. The
    /// adapters are read from `vb` (or created there, with a `VarMap`-backed builder) under the
    /// projection's name: `model.layers.{i}.self_attn.q_proj.lora_A.weight` (`[rank, in]`) and
    /// `….lora_B.weight` (`[out, rank]`), scaled by `alpha / rank`. The base weights are shared.
    pub fn with_lora(&self, targets: &[LoraTarget], rank: usize, alpha: f64, vb: VarBuilder) -> Result<Self> {
        if rank == 0 {
            candle_core::bail!("LoRA rank must be at least 1");
        }
        let mut adapted = self.clone();
        let model = vb.pp("model");
        for (i, layer) in adapted.layers.iter_mut().enumerate() {
            let lvb = model.pp(format!("layers.{i}"));
            for target in targets {
                let pvb = lvb.pp(target.module_path());
                let linear = match target {
                    LoraTarget::QProj => &mut layer.self_attn.q_proj,
                    LoraTarget::KProj => &mut layer.self_attn.k_proj,
                    LoraTarget::VProj => &mut layer.self_attn.v_proj,
                    LoraTarget::OProj => &mut layer.self_attn.o_proj,
                    LoraTarget::GateProj => &mut layer.mlp.gate_proj,
                    LoraTarget::UpProj => &mut layer.mlp.up_proj,
                    LoraTarget::DownProj => &mut layer.mlp.down_proj,
                };
                *linear = linear.with_lora(&pvb, rank, alpha)?;
            }
        }
        Ok(adapted)
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// Final hidden states `[batch, seq, hidden]`.
    ///
    /// * `input_ids`: `[batch, seq]` u32, the new tokens.
    /// * `attention_mask`: `[batch, past + seq]`, 1 for real tokens and 0 for padding (any dtype).
    /// * `position_ids`: `[batch, seq]`, absolute positions of the new tokens (any integer dtype).
    /// * `cache`: past keys and values; extended in place with this step's.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        position_ids: &Tensor,
        mut cache: Option<&mut KvCache>,
        mode: Mode,
    ) -> Result<Tensor> {
        let (_, seq) = input_ids.dims2()?;
        let past = cache.as_ref().map_or(0, |c| c.seq_len());
        let mask = self.attention_bias(attention_mask, past, seq)?;
        let rotary = Rotary::new(&self.inv_freq, position_ids)?;
        let mut x = self
            .embed_tokens
            .embedding(&input_ids.flatten_all()?)?
            .reshape(input_ids.dims2().map(|(b, s)| (b, s, self.config.hidden_size))?)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| c.layer_mut(i));
            let attn_in = layer.input_layernorm.forward(&x, mode)?;
            x = (&x + layer.self_attn.forward(&attn_in, &rotary, &mask, slot, mode)?)?;
            let mlp_in = layer.post_attention_layernorm.forward(&x, mode)?;
            x = (&x + layer.mlp.forward(&mlp_in)?)?;
        }
        self.norm.forward(&x, mode)
    }

    /// Logits `[batch, seq, vocab]` of every position of unpadded `input_ids` `[batch, seq]`,
    /// without a cache, with inference ops.
    pub fn full_logits(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let mask = Tensor::ones((b, s), DType::U32, input_ids.device())?;
        let positions = Tensor::arange(0u32, s as u32, input_ids.device())?.unsqueeze(0)?.repeat((b, 1))?;
        self.logits(&self.forward(input_ids, &mask, &positions, None, Mode::Infer)?)
    }

    /// Logits `[batch, seq, vocab]` for hidden states `[batch, seq, hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let (b, s, h) = hidden.dims3()?;
        hidden.contiguous()?.reshape((b * s, h))?.matmul(&self.lm_head.t()?)?.reshape((b, s, ()))
    }

    /// Additive attention bias `[batch, 1, seq, past + seq]`: 0 where query `i` may see slot `j`
    /// (causal on absolute slots and not padding), a large negative number elsewhere.
    fn attention_bias(&self, attention_mask: &Tensor, past: usize, seq: usize) -> Result<Tensor> {
        let device = attention_mask.device();
        let (batch, total) = attention_mask.dims2()?;
        if total != past + seq {
            candle_core::bail!(
                "attention_mask covers {total} positions but the cache holds {past} and the input {seq}"
            );
        }
        let query_slots = Tensor::arange(past as u32, total as u32, device)?.reshape((seq, 1))?;
        let key_slots = Tensor::arange(0u32, total as u32, device)?.reshape((1, total))?;
        let causal = key_slots.broadcast_le(&query_slots)?.to_dtype(DType::F32)?;
        let not_padding = attention_mask.to_dtype(DType::F32)?.reshape((batch, 1, 1, total))?;
        let allowed = causal.reshape((1, 1, seq, total))?.broadcast_mul(&not_padding)?;
        (allowed - 1.0)? * -MASKED_SCORE
    }
}

/// A projection that can carry a LoRA adapter, named as in PEFT's `target_modules`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraTarget {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl LoraTarget {
    /// Every projection of a layer.
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::QProj,
        LoraTarget::KProj,
        LoraTarget::VProj,
        LoraTarget::OProj,
        LoraTarget::GateProj,
        LoraTarget::UpProj,
        LoraTarget::DownProj,
    ];

    /// The projection's path inside a layer, e.g. `self_attn.q_proj`.
    pub fn module_path(self) -> &'static str {
        match self {
            LoraTarget::QProj => "self_attn.q_proj",
            LoraTarget::KProj => "self_attn.k_proj",
            LoraTarget::VProj => "self_attn.v_proj",
            LoraTarget::OProj => "self_attn.o_proj",
            LoraTarget::GateProj => "mlp.gate_proj",
            LoraTarget::UpProj => "mlp.up_proj",
            LoraTarget::DownProj => "mlp.down_proj",
        }
    }
}

/// Log-probabilities of `targets` `[batch, seq]` under `logits` `[batch, seq, vocab]`.
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let log_probs = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    log_probs
        .contiguous()?
        .gather(&targets.contiguous()?.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)
}
