//! `genai_config.json` for onnxruntime-genai, so that genai runs the exported `model.onnx` as is.
//!
//! The keys follow what onnxruntime-genai's model builder writes (genai 0.18 schema); genai
//! rejects unknown keys, so nothing else is added. The standard graph concatenates past and new
//! keys into `present`, so `past_present_share_buffer` must be false for it. The
//! `GroupQueryAttention` variant gets what the builder writes for it: no `position_ids` input and
//! `past_present_share_buffer` true (genai then keeps one max-length cache buffer, which the op
//! writes in place; fed a growing cache instead, as Tandem's engine does, it works the same).

use serde_json::{Value, json};
use tandem_core::bundle::MODEL_FILE;
use tandem_core::kv_io::{self, KvKind};

use super::AttentionKind;
use crate::model::config::ModelConfig;

/// `past_key_values.%d.key`-style name templates genai formats with the layer index.
fn layer_template(name_of_layer_0: String) -> String {
    // The layer index is the only number in the name, so `0` marks where `%d` goes.
    name_of_layer_0.replacen(".0.", ".%d.", 1)
}

/// The genai configuration for a decoder exported from `config` with `attention`.
pub fn genai_config(config: &ModelConfig, attention: AttentionKind) -> Value {
    let context_length = config.max_position_embeddings;
    let mut model = json!({
        "type": config.model_type.as_str(),
        "context_length": context_length,
        "vocab_size": config.vocab_size,
        "decoder": {
            "session_options": { "log_id": "onnxruntime-genai", "provider_options": [] },
            "filename": MODEL_FILE,
            "head_size": config.head_dim,
            "hidden_size": config.hidden_size,
            "num_attention_heads": config.num_attention_heads,
            "num_hidden_layers": config.num_hidden_layers,
            "num_key_value_heads": config.num_key_value_heads,
            "inputs": {
                "input_ids": kv_io::INPUT_IDS,
                "attention_mask": kv_io::ATTENTION_MASK,
                "position_ids": kv_io::POSITION_IDS,
                "past_key_names": layer_template(kv_io::past_name(0, KvKind::Key)),
                "past_value_names": layer_template(kv_io::past_name(0, KvKind::Value)),
            },
            "outputs": {
                "logits": kv_io::LOGITS,
                "present_key_names": layer_template(kv_io::present_name(0, KvKind::Key)),
                "present_value_names": layer_template(kv_io::present_name(0, KvKind::Value)),
            },
        },
    });
    if attention == AttentionKind::GroupQueryAttention {
        // genai feeds every input named here; the fused graph derives positions from the mask.
        if let Some(inputs) = model["decoder"]["inputs"].as_object_mut() {
            inputs.remove("position_ids");
        }
    }
    if let Some(bos) = config.bos_token_id {
        model["bos_token_id"] = bos.into();
    }
    match config.eos_token_ids.as_slice() {
        [] => {}
        [one] => model["eos_token_id"] = (*one).into(),
        many => model["eos_token_id"] = many.into(),
    }
    // Like the model builder: without a dedicated pad token, pad with the first end-of-sequence id.
    if let Some(&pad) = config.eos_token_ids.first() {
        model["pad_token_id"] = pad.into();
    }
    json!({
        "model": model,
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": false,
            "early_stopping": true,
            "length_penalty": 1.0,
            "max_length": context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": attention == AttentionKind::GroupQueryAttention,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::tests::tiny_config;

    #[test]
    fn cache_name_templates_expand_to_the_graph_names() {
        let v = genai_config(&tiny_config(true), AttentionKind::Standard);
        let inputs = &v["model"]["decoder"]["inputs"];
        let outputs = &v["model"]["decoder"]["outputs"];
        let expand = |t: &Value, layer: usize| t.as_str().unwrap().replace("%d", &layer.to_string());
        for layer in [0, 1, 10] {
            assert_eq!(expand(&inputs["past_key_names"], layer), kv_io::past_name(layer, KvKind::Key));
            assert_eq!(expand(&inputs["past_value_names"], layer), kv_io::past_name(layer, KvKind::Value));
            assert_eq!(expand(&outputs["present_key_names"], layer), kv_io::present_name(layer, KvKind::Key));
            assert_eq!(
                expand(&outputs["present_value_names"], layer),
                kv_io::present_name(layer, KvKind::Value)
            );
        }
    }

    #[test]
    fn genai_config_carries_the_model_dimensions_and_stop_tokens() {
        let config = tiny_config(true);
        let v = genai_config(&config, AttentionKind::Standard);
        assert_eq!(v["model"]["type"], "qwen2");
        assert_eq!(v["model"]["context_length"], config.max_position_embeddings);
        assert_eq!(v["model"]["decoder"]["head_size"], config.head_dim);
        assert_eq!(v["model"]["decoder"]["num_key_value_heads"], config.num_key_value_heads);
        assert_eq!(v["model"]["eos_token_id"], 2);
        assert_eq!(v["model"]["pad_token_id"], 2);
        assert_eq!(v["search"]["max_length"], config.max_position_embeddings);
        assert_eq!(v["search"]["past_present_share_buffer"], false);
    }

    #[test]
    fn group_query_attention_config_names_no_position_ids() {
        let standard = genai_config(&tiny_config(true), AttentionKind::Standard);
        assert_eq!(standard["model"]["decoder"]["inputs"]["position_ids"], kv_io::POSITION_IDS);
        let fused = genai_config(&tiny_config(true), AttentionKind::GroupQueryAttention);
        let inputs = fused["model"]["decoder"]["inputs"].as_object().unwrap();
        assert!(!inputs.contains_key("position_ids"), "{inputs:?}");
        assert_eq!(inputs["attention_mask"], kv_io::ATTENTION_MASK);
        assert_eq!(fused["model"]["decoder"]["head_size"], 8);
        assert_eq!(fused["search"]["past_present_share_buffer"], true);
    }
}
