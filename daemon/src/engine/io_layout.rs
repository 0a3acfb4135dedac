//! Reading the KV-cache layout off a decoder graph's signature.
//!
//! Inputs and outputs are matched by name (`tandem_core::kv_io`), never by position: exporters order
//! the cache tensors differently. A graph that is not a KV-cache decoder is refused with the reason.

use std::collections::BTreeMap;

use ort::value::{TensorElementType, ValueType};
use tandem_core::kv_io::{
    ATTENTION_MASK, INPUT_IDS, KvKind, LOGITS, POSITION_IDS, parse_past_name, past_name, present_name,
};

/// Element type of the KV cache or the logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatType {
    F32,
    F16,
}

impl FloatType {
    fn from_element(element: TensorElementType) -> Option<FloatType> {
        match element {
            TensorElementType::Float32 => Some(FloatType::F32),
            TensorElementType::Float16 => Some(FloatType::F16),
            _ => None,
        }
    }

    /// ONNX spelling, as in the bundle manifest (`float32`, `float16`).
    pub fn onnx_name(self) -> &'static str {
        match self {
            FloatType::F32 => "float32",
            FloatType::F16 => "float16",
        }
    }
}

/// One graph input or output: name, element type (`None` for non-tensors) and shape (-1 = symbolic).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub element: Option<TensorElementType>,
    pub shape: Vec<i64>,
}

impl TensorSpec {
    /// Converts an ONNX Runtime input/output description.
    pub fn from_outlet(outlet: &ort::value::Outlet) -> TensorSpec {
        let (element, shape) = match outlet.dtype() {
            ValueType::Tensor { ty, shape, .. } => (Some(*ty), shape.iter().copied().collect()),
            _ => (None, Vec::new()),
        };
        TensorSpec { name: outlet.name().to_string(), element, shape }
    }
}

/// Dimensions the graph may leave symbolic, from the model directory's metadata.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayoutHints {
    pub head_dim: Option<usize>,
    pub kv_heads: Option<usize>,
}

/// The decoder's KV-cache layout.
#[derive(Debug, Clone, PartialEq)]
pub struct IoLayout {
    /// Decoder layers (pairs of key/value cache tensors).
    pub layers: usize,
    /// Key/value heads per layer (dimension 1 of a cache tensor).
    pub kv_heads: usize,
    /// Width of one head (dimension 3 of a cache tensor).
    pub head_dim: usize,
    /// Element type of the cache tensors.
    pub kv_type: FloatType,
    /// Element type of the logits (converted to f32 for sampling).
    pub logits_type: FloatType,
    /// Whether the graph takes `position_ids` (genai-builder graphs derive positions from the mask).
    pub has_position_ids: bool,
    /// Last dimension of the logits when the graph fixes it.
    pub vocab_size: Option<usize>,
    /// Cache input names: layer 0 key, layer 0 value, layer 1 key, ...
    pub past_names: Vec<String>,
    /// Cache output names, in the same order as `past_names`.
    pub present_names: Vec<String>,
}

impl IoLayout {
    /// Checks the signature and reads the layout; the error text says what is wrong.
    pub fn from_signature(
        inputs: &[TensorSpec],
        outputs: &[TensorSpec],
        hints: LayoutHints,
    ) -> Result<IoLayout, String> {
        let input = |name: &str| inputs.iter().find(|s| s.name == name);
        let output = |name: &str| outputs.iter().find(|s| s.name == name);

        for name in [INPUT_IDS, ATTENTION_MASK] {
            let spec = input(name).ok_or_else(|| format!("it has no `{name}` input"))?;
            expect_int64(spec)?;
        }
        let has_position_ids = match input(POSITION_IDS) {
            Some(spec) => {
                expect_int64(spec)?;
                true
            }
            None => false,
        };

        let mut past: BTreeMap<(usize, u8), &TensorSpec> = BTreeMap::new();
        for spec in inputs {
            if [INPUT_IDS, ATTENTION_MASK, POSITION_IDS].contains(&spec.name.as_str()) {
                continue;
            }
            match parse_past_name(&spec.name) {
                Some((layer, kind)) => {
                    past.insert((layer, kind_order(kind)), spec);
                }
                None => {
                    return Err(format!(
                        "it has an input `{}` that is not part of the layout (merged decoders with \
                         `use_cache_branch` and similar are not supported)",
                        spec.name
                    ));
                }
            }
        }
        let layers = match past.keys().last() {
            Some((last, _)) => last + 1,
            None => return Err("it has no past_key_values.N.key/value inputs (no KV cache)".to_string()),
        };

        let logits = output(LOGITS).ok_or_else(|| format!("it has no `{LOGITS}` output"))?;
        let logits_type = logits.element.and_then(FloatType::from_element).ok_or_else(|| {
            format!("`{LOGITS}` must be float32 or float16, it is {}", element_name(logits.element))
        })?;
        if logits.shape.len() != 3 {
            return Err(format!(
                "`{LOGITS}` must be [batch, sequence, vocab], it has shape {:?}",
                logits.shape
            ));
        }
        let vocab_size = logits.shape.get(2).and_then(|&v| usize::try_from(v).ok()).filter(|&v| v > 0);

        let mut past_names = Vec::with_capacity(layers * 2);
        let mut present_names = Vec::with_capacity(layers * 2);
        let mut kv_type: Option<FloatType> = None;
        let mut kv_heads: Option<usize> = None;
        let mut head_dim: Option<usize> = None;
        for layer in 0..layers {
            for kind in [KvKind::Key, KvKind::Value] {
                let name = past_name(layer, kind);
                let spec = past
                    .get(&(layer, kind_order(kind)))
                    .ok_or_else(|| format!("it has no `{name}` input"))?;
                let out_name = present_name(layer, kind);
                let out =
                    output(&out_name).ok_or_else(|| format!("it has `{name}` but no `{out_name}` output"))?;

                let ty = spec.element.and_then(FloatType::from_element).ok_or_else(|| {
                    format!("`{name}` must be float32 or float16, it is {}", element_name(spec.element))
                })?;
                if *kv_type.get_or_insert(ty) != ty {
                    return Err(format!("`{name}` is {} unlike the other cache inputs", ty.onnx_name()));
                }
                if out.element != spec.element {
                    return Err(format!(
                        "`{out_name}` is {} but `{name}` is {}",
                        element_name(out.element),
                        element_name(spec.element)
                    ));
                }
                if spec.shape.len() != 4 {
                    return Err(format!(
                        "`{name}` must be [batch, kv_heads, past, head_dim], it has shape {:?}",
                        spec.shape
                    ));
                }
                merge_dim(&mut kv_heads, spec.shape[1], &name, "kv_heads")?;
                merge_dim(&mut head_dim, spec.shape[3], &name, "head_dim")?;
                past_names.push(name);
                present_names.push(out_name);
            }
        }

        let kv_heads = kv_heads.or(hints.kv_heads).ok_or(
            "the number of KV heads is symbolic in the graph and the model directory does not give it \
             (num_key_value_heads)",
        )?;
        let head_dim = head_dim.or(hints.head_dim).ok_or(
            "the head size is symbolic in the graph and the model directory does not give it \
             (head_size in genai_config.json, head_dim in config.json)",
        )?;
        Ok(IoLayout {
            layers,
            kv_heads,
            head_dim,
            kv_type: kv_type.unwrap_or(FloatType::F32),
            logits_type,
            has_position_ids,
            vocab_size,
            past_names,
            present_names,
        })
    }
}

fn kind_order(kind: KvKind) -> u8 {
    match kind {
        KvKind::Key => 0,
        KvKind::Value => 1,
    }
}

fn expect_int64(spec: &TensorSpec) -> Result<(), String> {
    if spec.element == Some(TensorElementType::Int64) {
        Ok(())
    } else {
        Err(format!("`{}` must be int64, it is {}", spec.name, element_name(spec.element)))
    }
}

fn element_name(element: Option<TensorElementType>) -> String {
    element.map_or_else(|| "not a tensor".to_string(), |e| format!("{e:?}"))
}

/// Records a static dimension, and refuses one that disagrees with an earlier tensor.
fn merge_dim(known: &mut Option<usize>, dim: i64, name: &str, what: &str) -> Result<(), String> {
    let Ok(dim) = usize::try_from(dim) else { return Ok(()) };
    if dim == 0 {
        return Ok(());
    }
    match known {
        Some(k) if *k != dim => Err(format!("`{name}` has {what} {dim}, other cache tensors have {k}")),
        _ => {
            *known = Some(dim);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, element: TensorElementType, shape: &[i64]) -> TensorSpec {
        TensorSpec { name: name.to_string(), element: Some(element), shape: shape.to_vec() }
    }

    /// A decoder signature; `interleaved` orders the cache like torch exports, else like genai.
    fn signature(
        layers: usize,
        kv: TensorElementType,
        head_dim: i64,
        position_ids: bool,
        interleaved: bool,
    ) -> (Vec<TensorSpec>, Vec<TensorSpec>) {
        use TensorElementType::*;
        let mut inputs = vec![spec("input_ids", Int64, &[-1, -1]), spec("attention_mask", Int64, &[-1, -1])];
        if position_ids {
            inputs.push(spec("position_ids", Int64, &[-1, -1]));
        }
        let mut outputs = vec![spec("logits", Float32, &[-1, -1, 512])];
        let order: Vec<(usize, KvKind)> = if interleaved {
            (0..layers).flat_map(|l| [(l, KvKind::Key), (l, KvKind::Value)]).collect()
        } else {
            [KvKind::Key, KvKind::Value].into_iter().flat_map(|k| (0..layers).map(move |l| (l, k))).collect()
        };
        for (layer, kind) in order {
            inputs.push(spec(&past_name(layer, kind), kv, &[-1, 2, -1, head_dim]));
            outputs.push(spec(&present_name(layer, kind), kv, &[-1, 2, -1, head_dim]));
        }
        (inputs, outputs)
    }

    #[test]
    fn a_torch_export_layout_is_read_by_name() {
        let (inputs, outputs) = signature(3, TensorElementType::Float32, 16, true, true);
        let layout = IoLayout::from_signature(&inputs, &outputs, LayoutHints::default()).unwrap();
        assert_eq!((layout.layers, layout.kv_heads, layout.head_dim), (3, 2, 16));
        assert_eq!((layout.kv_type, layout.logits_type), (FloatType::F32, FloatType::F32));
        assert!(layout.has_position_ids);
        assert_eq!(layout.vocab_size, Some(512));
        assert_eq!(layout.past_names[..2], ["past_key_values.0.key", "past_key_values.0.value"]);
        assert_eq!(layout.present_names[5], "present.2.value");
    }

    #[test]
    fn genai_order_and_a_symbolic_head_dim_use_the_hint() {
        let (inputs, outputs) = signature(2, TensorElementType::Float16, -1, false, false);
        let hints = LayoutHints { head_dim: Some(64), kv_heads: None };
        let layout = IoLayout::from_signature(&inputs, &outputs, hints).unwrap();
        assert_eq!(
            layout.past_names,
            [
                "past_key_values.0.key",
                "past_key_values.0.value",
                "past_key_values.1.key",
                "past_key_values.1.value"
            ]
        );
        assert_eq!((layout.head_dim, layout.kv_type, layout.has_position_ids), (64, FloatType::F16, false));
    }

    #[test]
    fn a_symbolic_head_dim_without_a_hint_is_refused() {
        let (inputs, outputs) = signature(1, TensorElementType::Float32, -1, true, true);
        let err = IoLayout::from_signature(&inputs, &outputs, LayoutHints::default()).unwrap_err();
        assert!(err.contains("head size"), "{err}");
    }

    #[test]
    fn a_missing_present_output_is_named() {
        let (inputs, mut outputs) = signature(2, TensorElementType::Float32, 16, true, true);
        outputs.retain(|o| o.name != "present.1.value");
        let err = IoLayout::from_signature(&inputs, &outputs, LayoutHints::default()).unwrap_err();
        assert!(err.contains("present.1.value"), "{err}");
    }

    #[test]
    fn a_gap_in_the_layers_is_named() {
        let (mut inputs, outputs) = signature(3, TensorElementType::Float32, 16, true, true);
        inputs.retain(|i| i.name != "past_key_values.1.key");
        let err = IoLayout::from_signature(&inputs, &outputs, LayoutHints::default()).unwrap_err();
        assert!(err.contains("past_key_values.1.key"), "{err}");
    }

    #[test]
    fn a_graph_without_a_cache_is_not_a_decoder() {
        let inputs = vec![
            spec("input_ids", TensorElementType::Int64, &[-1, -1]),
            spec("attention_mask", TensorElementType::Int64, &[-1, -1]),
        ];
        let outputs = vec![spec("logits", TensorElementType::Float32, &[-1, -1, 10])];
        let err = IoLayout::from_signature(&inputs, &outputs, LayoutHints::default()).unwrap_err();
        assert!(err.contains("no KV cache"), "{err}");
    }

    #[test]
    fn an_image_model_is_not_a_decoder() {
        let inputs = vec![spec("pixel_values", TensorElementType::Float32, &[1, 3, 224, 224])];
        let outputs = vec![spec("logits", TensorElementType::Float32, &[1, 1000])];
        let err = IoLayout::from_signature(&inputs, &outputs, LayoutHints::default()).unwrap_err();
        assert!(err.contains("input_ids"), "{err}");
    }

    #[test]
    fn an_unknown_extra_input_is_refused() {
        let (mut inputs, outputs) = signature(1, TensorElementType::Float32, 16, true, true);
        inputs.push(spec("use_cache_branch", TensorElementType::Bool, &[1]));
        let err = IoLayout::from_signature(&inputs, &outputs, LayoutHints::default()).unwrap_err();
        assert!(err.contains("use_cache_branch"), "{err}");
    }

    #[test]
    fn int32_token_ids_are_refused() {
        let (mut inputs, outputs) = signature(1, TensorElementType::Float32, 16, true, true);
        inputs[0].element = Some(TensorElementType::Int32);
        let err = IoLayout::from_signature(&inputs, &outputs, LayoutHints::default()).unwrap_err();
        assert!(err.contains("input_ids") && err.contains("int64"), "{err}");
    }
}
