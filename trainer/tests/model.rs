//! The candle decoder: parity with candle-transformers' inference path on the same weights,
//! padding, the KV cache, both modes, gradients, and checkpoint formats.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use tandem_train::model::presets::Preset;
use tandem_train::model::{
    Decoder, HfCheckpoint, KvCache, Mode, ModelConfig, TrainableModel, token_logprobs,
};

/// Peaked logits (std 0.2) so greedy decoding never sits on a near-tie.
const PARITY_INIT_STD: f64 = 0.2;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn ids(rows: &[&[u32]]) -> Tensor {
    let width = rows[0].len();
    Tensor::from_vec(rows.concat(), (rows.len(), width), &Device::Cpu).unwrap()
}

fn argmax_last(logits: &Tensor) -> u32 {
    logits.flatten_all().unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap()
}

fn saved(preset: Preset, dir: &Path) -> TrainableModel {
    let model = TrainableModel::random(&preset.config(), PARITY_INIT_STD, 1, &Device::Cpu).unwrap();
    model.save(dir).unwrap();
    model
}

fn constant_weights(dir: &Path) -> VarBuilder<'static> {
    HfCheckpoint::open(dir).unwrap().weights(DType::F32, &Device::Cpu).unwrap()
}

fn qwen2_reference_config(c: &ModelConfig) -> candle_transformers::models::qwen2::Config {
    serde_json::from_value(serde_json::json!({
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "max_position_embeddings": c.max_position_embeddings,
        "sliding_window": c.max_position_embeddings, "max_window_layers": c.num_hidden_layers,
        "tie_word_embeddings": c.tie_word_embeddings, "rope_theta": c.rope_theta, "rms_norm_eps": c.rms_norm_eps,
        "use_sliding_window": false, "hidden_act": "silu"
    }))
    .unwrap()
}

fn decode_step(model: &Decoder, cache: &mut KvCache, token: u32, position: u32, mask_len: usize) -> Tensor {
    let mask = Tensor::ones((1, mask_len), DType::U32, &Device::Cpu).unwrap();
    let pos = Tensor::new(&[[position]], &Device::Cpu).unwrap();
    let hidden = model.forward(&ids(&[&[token]]), &mask, &pos, Some(cache), Mode::Infer).unwrap();
    model.logits(&hidden).unwrap().i((0, 0)).unwrap()
}

#[test]
fn qwen2_logits_match_candle_transformers_through_prefill_and_decode() {
    let dir = tempfile::tempdir().unwrap();
    let ours = saved(Preset::TinyQwen2, dir.path()).decoder;
    let config = ours.config().clone();
    let vb = constant_weights(dir.path());
    let mut reference =
        candle_transformers::models::qwen2::Model::new(&qwen2_reference_config(&config), vb.clone()).unwrap();
    let embed = vb.get((config.vocab_size, config.hidden_size), "model.embed_tokens.weight").unwrap();
    let reference_logits = |hidden: Tensor| {
        let (b, s, h) = hidden.dims3().unwrap();
        hidden.reshape((b * s, h)).unwrap().matmul(&embed.t().unwrap()).unwrap().reshape((b, s, ())).unwrap()
    };

    let prompt: &[u32] = &[5, 17, 42, 99, 123, 7];
    let full_ref = reference_logits(reference.forward(&ids(&[prompt]), 0, None).unwrap());
    let full_ours = ours.full_logits(&ids(&[prompt])).unwrap();
    assert!(
        max_abs_diff(&full_ref, &full_ours) < 1e-4,
        "prefill diff {}",
        max_abs_diff(&full_ref, &full_ours)
    );

    let mut cache = KvCache::new(config.num_hidden_layers);
    let mask = Tensor::ones((1, prompt.len()), DType::U32, &Device::Cpu).unwrap();
    let pos = Tensor::arange(0u32, prompt.len() as u32, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let prefill = ours.forward(&ids(&[prompt]), &mask, &pos, Some(&mut cache), Mode::Infer).unwrap();
    let mut next = argmax_last(&ours.logits(&prefill).unwrap().i((0, prompt.len() - 1)).unwrap());
    for step in 0..24 {
        let position = prompt.len() + step;
        let ref_logits =
            reference_logits(reference.forward(&ids(&[&[next]]), position, None).unwrap()).i((0, 0)).unwrap();
        let our_logits = decode_step(&ours, &mut cache, next, position as u32, position + 1);
        let diff = max_abs_diff(&ref_logits, &our_logits);
        assert!(diff < 1e-4, "decode step {step}: diff {diff}");
        assert_eq!(argmax_last(&ref_logits), argmax_last(&our_logits), "greedy token at step {step}");
        next = argmax_last(&our_logits);
    }
}

#[test]
fn llama_logits_match_candle_transformers_through_prefill_and_decode() {
    use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};
    let dir = tempfile::tempdir().unwrap();
    let ours = saved(Preset::TinyLlama, dir.path()).decoder;
    let config = ours.config().clone();
    let llama_config: LlamaConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    let llama_config = llama_config.into_config(false);
    let vb = constant_weights(dir.path());
    let reference = Llama::load(vb, &llama_config).unwrap();
    let mut ref_cache = Cache::new(true, DType::F32, &llama_config, &Device::Cpu).unwrap();

    let prompt: &[u32] = &[3, 200, 41, 9, 77];
    let ref_last = reference.forward(&ids(&[prompt]), 0, &mut ref_cache).unwrap().i(0).unwrap();
    let mut cache = KvCache::new(config.num_hidden_layers);
    let mask = Tensor::ones((1, prompt.len()), DType::U32, &Device::Cpu).unwrap();
    let pos = Tensor::arange(0u32, prompt.len() as u32, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let hidden = ours.forward(&ids(&[prompt]), &mask, &pos, Some(&mut cache), Mode::Infer).unwrap();
    let our_last = ours.logits(&hidden).unwrap().i((0, prompt.len() - 1)).unwrap();
    assert!(max_abs_diff(&ref_last, &our_last) < 1e-4);
    let mut next = argmax_last(&our_last);
    for step in 0..24 {
        let position = prompt.len() + step;
        let ref_logits = reference.forward(&ids(&[&[next]]), position, &mut ref_cache).unwrap().i(0).unwrap();
        let our_logits = decode_step(&ours, &mut cache, next, position as u32, position + 1);
        let diff = max_abs_diff(&ref_logits, &our_logits);
        assert!(diff < 1e-4, "decode step {step}: diff {diff}");
        next = argmax_last(&our_logits);
    }
}

#[test]
fn left_padded_batch_gives_each_row_its_unpadded_logits() {
    for preset in [Preset::TinyQwen2, Preset::TinyLlama] {
        let model =
            TrainableModel::random(&preset.config(), PARITY_INIT_STD, 2, &Device::Cpu).unwrap().decoder;
        let long: &[u32] = &[11, 12, 13, 14, 15, 16];
        let short: &[u32] = &[21, 22, 23];
        let pad = 0u32;
        let batch = ids(&[long, &[pad, pad, pad, 21, 22, 23]]);
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]], &Device::Cpu).unwrap();
        let pos = Tensor::new(&[[0u32, 1, 2, 3, 4, 5], [0, 0, 0, 0, 1, 2]], &Device::Cpu).unwrap();
        for mode in [Mode::Infer, Mode::Train] {
            let batched = model.logits(&model.forward(&batch, &mask, &pos, None, mode).unwrap()).unwrap();
            let long_alone = model.full_logits(&ids(&[long])).unwrap();
            let short_alone = model.full_logits(&ids(&[short])).unwrap();
            assert!(max_abs_diff(&batched.i(0).unwrap(), &long_alone.i(0).unwrap()) < 1e-4);
            let short_batched = batched.i((1, 3..)).unwrap();
            assert!(max_abs_diff(&short_batched, &short_alone.i(0).unwrap()) < 1e-4, "{preset:?} {mode:?}");
            let all_finite =
                batched.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite());
            assert!(all_finite, "fully masked pad rows must not produce NaN");
        }
    }
}

#[test]
fn decoding_with_the_cache_matches_the_full_forward() {
    let model = TrainableModel::random(&Preset::TinyQwen2.config(), PARITY_INIT_STD, 3, &Device::Cpu)
        .unwrap()
        .decoder;
    let sequence: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % 512).collect();
    let full = model.full_logits(&ids(&[&sequence])).unwrap();
    let mut cache = KvCache::new(2);
    let prefix = 7;
    let mask = Tensor::ones((1, prefix), DType::U32, &Device::Cpu).unwrap();
    let pos = Tensor::arange(0u32, prefix as u32, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    model.forward(&ids(&[&sequence[..prefix]]), &mask, &pos, Some(&mut cache), Mode::Infer).unwrap();
    for (i, &token) in sequence.iter().enumerate().skip(prefix) {
        let step = decode_step(&model, &mut cache, token, i as u32, i + 1);
        assert!(max_abs_diff(&step, &full.i((0, i)).unwrap()) < 1e-4, "position {i}");
    }
    assert_eq!(cache.seq_len(), sequence.len());
}

#[test]
fn every_weight_gets_a_gradient_after_one_backward_pass() {
    for preset in [Preset::TinyQwen2, Preset::TinyLlama] {
        let model = TrainableModel::random(&preset.config(), 0.02, 4, &Device::Cpu).unwrap();
        let decoder = &model.decoder;
        let batch = ids(&[&[0, 5, 9, 14, 3, 8, 2], &[0, 0, 7, 7, 1, 4, 6]]);
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]], &Device::Cpu).unwrap();
        let pos = Tensor::new(&[[0u32, 1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 2, 3, 4]], &Device::Cpu).unwrap();
        let hidden = decoder
            .forward(
                &batch.i((.., ..6)).unwrap(),
                &mask.i((.., ..6)).unwrap(),
                &pos.i((.., ..6)).unwrap(),
                None,
                Mode::Train,
            )
            .unwrap();
        let logprobs =
            token_logprobs(&decoder.logits(&hidden).unwrap(), &batch.i((.., 1..)).unwrap()).unwrap();
        let loss = logprobs.sum_all().unwrap().neg().unwrap();
        let grads = loss.backward().unwrap();
        for (name, var) in model.tensors() {
            let grad = grads.get(&var).unwrap_or_else(|| panic!("{preset:?}: {name} got no gradient"));
            let norm = grad.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0, "{preset:?}: {name} has an all-zero gradient");
        }
    }
}

#[test]
fn train_and_infer_modes_give_the_same_logits() {
    let model = TrainableModel::random(&Preset::TinyLlama.config(), PARITY_INIT_STD, 5, &Device::Cpu)
        .unwrap()
        .decoder;
    let batch = ids(&[&[1, 2, 3, 4, 5]]);
    let mask = Tensor::ones((1, 5), DType::U32, &Device::Cpu).unwrap();
    let pos = Tensor::arange(0u32, 5, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = |mode| model.logits(&model.forward(&batch, &mask, &pos, None, mode).unwrap()).unwrap();
    assert!(max_abs_diff(&logits(Mode::Train), &logits(Mode::Infer)) < 1e-4);
}

#[test]
fn the_same_seed_creates_the_same_weights() {
    let a = TrainableModel::random(&Preset::TinyQwen2.config(), 0.02, 9, &Device::Cpu).unwrap();
    let b = TrainableModel::random(&Preset::TinyQwen2.config(), 0.02, 9, &Device::Cpu).unwrap();
    let c = TrainableModel::random(&Preset::TinyQwen2.config(), 0.02, 10, &Device::Cpu).unwrap();
    let (ta, tb, tc) = (a.tensors(), b.tensors(), c.tensors());
    let name = "model.layers.0.self_attn.q_proj.weight";
    assert_eq!(max_abs_diff(&ta[name], &tb[name]), 0.0);
    assert!(max_abs_diff(&ta[name], &tc[name]) > 0.0);
}

/// Writes `tensors` as bf16 safetensors split over two shards with a transformers-style index.
fn write_sharded_bf16(dir: &Path, tensors: &HashMap<String, Tensor>) {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in
        [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)]
    {
        let shard_tensors: HashMap<String, Tensor> =
            part.iter().map(|n| ((*n).clone(), tensors[*n].to_dtype(DType::BF16).unwrap())).collect();
        candle_core::safetensors::save(&shard_tensors, dir.join(shard)).unwrap();
        for n in part.iter() {
            weight_map.insert((*n).clone(), shard.into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn sharded_bf16_checkpoint_in_transformers5_form_loads_like_the_original() {
    let model =
        TrainableModel::random(&Preset::TinyLlama.config(), PARITY_INIT_STD, 6, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_sharded_bf16(dir.path(), &model.tensors());
    let mut config: serde_json::Value = serde_json::from_str(&model.decoder.config().to_hf_json()).unwrap();
    let theta = config.as_object_mut().unwrap().remove("rope_theta").unwrap();
    config["rope_parameters"] = serde_json::json!({"rope_theta": theta, "rope_type": "default"});
    config["head_dim"] = serde_json::Value::Null;
    config["dtype"] = "bfloat16".into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();

    let loaded =
        TrainableModel::from_checkpoint(&HfCheckpoint::open(dir.path()).unwrap(), &Device::Cpu).unwrap();
    assert_eq!(loaded.decoder.config(), model.decoder.config());
    let rounded: HashMap<String, Tensor> = model
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap()))
        .collect();
    let reference = Decoder::load(
        model.decoder.config(),
        VarBuilder::from_tensors(rounded, DType::F32, &Device::Cpu),
        0.0,
    )
    .unwrap();
    let prompt = ids(&[&[4, 8, 15, 16, 23, 42]]);
    assert!(
        max_abs_diff(&loaded.decoder.full_logits(&prompt).unwrap(), &reference.full_logits(&prompt).unwrap())
            < 1e-5
    );
}

#[test]
fn saved_checkpoint_reloads_with_identical_logits() {
    let dir = tempfile::tempdir().unwrap();
    let model = saved(Preset::TinyQwen2, dir.path());
    let saved_names: Vec<String> =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_keys()
            .collect();
    assert!(
        !saved_names.contains(&"lm_head.weight".to_string()),
        "a tied head is saved once, as the embedding"
    );
    let reloaded = Decoder::load(model.decoder.config(), constant_weights(dir.path()), 0.0).unwrap();
    let prompt = ids(&[&[1, 2, 3]]);
    assert_eq!(
        max_abs_diff(&model.decoder.full_logits(&prompt).unwrap(), &reloaded.full_logits(&prompt).unwrap()),
        0.0
    );
}
