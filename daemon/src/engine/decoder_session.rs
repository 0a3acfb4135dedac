//! One forward pass of the decoder graph: token ids, mask, positions and the past KV cache in;
//! logits and the new KV cache out.
//!
//! The cache never leaves ONNX Runtime's memory: each `present.*` output is taken out of the run's
//! outputs as an owned value and fed back as the next step's `past_key_values.*` input, without a copy.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use half::f16;
use ort::session::{Session, SessionInputValue, SessionOutputs};
use ort::value::{DynValue, Tensor};
use tandem_core::kv_io::{ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS};

use super::error::EngineError;
use super::io_layout::{FloatType, IoLayout};
use super::logits::Logits;

/// The KV cache of a batch: one tensor per `past_key_values.*` input, `[batch, kv_heads, len, head_dim]`.
pub struct KvCache {
    tensors: Vec<DynValue>,
    batch: usize,
    len: usize,
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("tensors", &self.tensors.len())
            .field("batch", &self.batch)
            .field("len", &self.len)
            .finish()
    }
}

impl KvCache {
    /// Rows of the batch.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Positions held (past sequence length, padding included).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Which positions' logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsScope {
    /// Only the last position of each row (all that generation needs).
    LastPosition,
    /// Every position of each row, `[batch, sequence, vocab]` (for comparing models through prefill).
    AllPositions,
}

/// Inputs of one forward pass, row-major.
#[derive(Debug, Clone, Copy)]
pub struct ForwardInput<'a> {
    /// Rows in the batch, `B`.
    pub batch: usize,
    /// `[B, S]` token ids.
    pub input_ids: &'a [i64],
    /// `[B, past + S]`: 1 for real tokens, 0 for padding.
    pub attention_mask: &'a [i64],
    /// `[B, S]` absolute positions; ignored by graphs without a `position_ids` input.
    pub position_ids: &'a [i64],
}

/// A decoder graph loaded in ONNX Runtime, with its KV-cache layout.
pub struct DecoderSession {
    session: Session,
    layout: IoLayout,
    model_file: PathBuf,
}

impl std::fmt::Debug for DecoderSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecoderSession")
            .field("model_file", &self.model_file)
            .field("layout", &self.layout)
            .finish()
    }
}

impl DecoderSession {
    pub(crate) fn new(session: Session, layout: IoLayout, model_file: PathBuf) -> Self {
        Self { session, layout, model_file }
    }

    /// The graph's KV-cache layout.
    pub fn layout(&self) -> &IoLayout {
        &self.layout
    }

    /// The graph file.
    pub fn model_file(&self) -> &Path {
        &self.model_file
    }

    /// The underlying ONNX Runtime session.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// An empty cache for `batch` rows: `[batch, kv_heads, 0, head_dim]` per tensor.
    pub fn empty_cache(&self, batch: usize) -> Result<KvCache, EngineError> {
        let shape = [batch, self.layout.kv_heads, 0, self.layout.head_dim];
        let tensors = (0..self.layout.past_names.len())
            .map(|_| match self.layout.kv_type {
                FloatType::F32 => Tensor::<f32>::from_array((shape, Vec::new())).map(Tensor::into_dyn),
                FloatType::F16 => Tensor::<f16>::from_array((shape, Vec::new())).map(Tensor::into_dyn),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(EngineError::ort("create an empty KV cache"))?;
        Ok(KvCache { tensors, batch, len: 0 })
    }

    /// Runs the graph once. `past` is consumed and the extended cache returned.
    pub fn forward(
        &mut self,
        input: &ForwardInput<'_>,
        past: KvCache,
        scope: LogitsScope,
    ) -> Result<(Logits, KvCache), EngineError> {
        let (batch, seq) = check_input(input, &past, self.layout.has_position_ids)?;
        let total = past.len + seq;

        let int_tensor = |shape: [usize; 2], values: &[i64]| {
            Tensor::from_array((shape, values.to_vec())).map_err(EngineError::ort("create an input tensor"))
        };
        let mut feed: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::with_capacity(3 + past.tensors.len());
        feed.push((INPUT_IDS.into(), int_tensor([batch, seq], input.input_ids)?.into()));
        feed.push((ATTENTION_MASK.into(), int_tensor([batch, total], input.attention_mask)?.into()));
        if self.layout.has_position_ids {
            feed.push((POSITION_IDS.into(), int_tensor([batch, seq], input.position_ids)?.into()));
        }
        for (name, tensor) in self.layout.past_names.iter().zip(past.tensors) {
            feed.push((name.as_str().into(), tensor.into()));
        }

        let mut outputs = self.session.run(feed).map_err(EngineError::ort("run the model"))?;
        let logits = extract_logits(&outputs, self.layout.logits_type, batch, seq, scope)?;
        let mut tensors = Vec::with_capacity(self.layout.present_names.len());
        for name in &self.layout.present_names {
            let tensor = outputs
                .remove(name.as_str())
                .ok_or_else(|| EngineError::ModelOutput(format!("`{name}` is missing from the outputs")))?;
            check_present(&tensor, name, batch, total, &self.layout)?;
            tensors.push(tensor);
        }
        Ok((logits, KvCache { tensors, batch, len: total }))
    }
}

/// Checks the input lengths against each other and the cache; returns `(batch, sequence)`.
fn check_input(
    input: &ForwardInput<'_>,
    past: &KvCache,
    needs_positions: bool,
) -> Result<(usize, usize), EngineError> {
    let batch = input.batch;
    let bad = |what: String| Err(EngineError::ForwardInput(what));
    if batch == 0 || input.input_ids.is_empty() || !input.input_ids.len().is_multiple_of(batch) {
        return bad(format!("{} input ids do not make {batch} non-empty rows", input.input_ids.len()));
    }
    let seq = input.input_ids.len() / batch;
    if past.batch != batch {
        return bad(format!("the KV cache holds {} rows but the input has {batch}", past.batch));
    }
    let total = past.len + seq;
    if input.attention_mask.len() != batch * total {
        return bad(format!(
            "attention_mask has {} values; it must cover the {} cached and {seq} new positions of {batch} rows",
            input.attention_mask.len(),
            past.len
        ));
    }
    if needs_positions && input.position_ids.len() != batch * seq {
        return bad(format!(
            "position_ids has {} values, expected {batch} x {seq}",
            input.position_ids.len()
        ));
    }
    Ok((batch, seq))
}

fn extract_logits(
    outputs: &SessionOutputs<'_>,
    ty: FloatType,
    batch: usize,
    seq: usize,
    scope: LogitsScope,
) -> Result<Logits, EngineError> {
    let value =
        outputs.get(LOGITS).ok_or_else(|| EngineError::ModelOutput(format!("`{LOGITS}` is missing")))?;
    match ty {
        FloatType::F32 => {
            let (shape, data) =
                value.try_extract_tensor::<f32>().map_err(EngineError::ort("read the logits"))?;
            select_logits(shape, data, batch, seq, scope, |x| x)
        }
        FloatType::F16 => {
            let (shape, data) =
                value.try_extract_tensor::<f16>().map_err(EngineError::ort("read the logits"))?;
            select_logits(shape, data, batch, seq, scope, f16::to_f32)
        }
    }
}

/// Copies the wanted positions of `[batch, positions, vocab]` logits out as f32.
fn select_logits<T: Copy>(
    shape: &[i64],
    data: &[T],
    batch: usize,
    seq: usize,
    scope: LogitsScope,
    to_f32: impl Fn(T) -> f32,
) -> Result<Logits, EngineError> {
    let dims: Vec<usize> = shape.iter().map(|&d| usize::try_from(d).unwrap_or(0)).collect();
    let [rows, positions, vocab] = dims[..] else {
        return Err(EngineError::ModelOutput(format!(
            "`{LOGITS}` has shape {shape:?}, expected 3 dimensions"
        )));
    };
    if rows != batch || positions == 0 || vocab == 0 || data.len() != rows * positions * vocab {
        return Err(EngineError::ModelOutput(format!(
            "`{LOGITS}` has shape {shape:?} for a batch of {batch}"
        )));
    }
    match scope {
        LogitsScope::AllPositions => {
            if positions != seq {
                return Err(EngineError::ModelOutput(format!(
                    "`{LOGITS}` has {positions} positions for {seq} input tokens; this graph only returns the \
                     last position's logits"
                )));
            }
            Ok(Logits::new(batch, positions, vocab, data.iter().map(|&x| to_f32(x)).collect()))
        }
        LogitsScope::LastPosition => {
            let mut last = Vec::with_capacity(batch * vocab);
            for row in 0..batch {
                let start = (row * positions + positions - 1) * vocab;
                last.extend(data[start..start + vocab].iter().map(|&x| to_f32(x)));
            }
            Ok(Logits::new(batch, 1, vocab, last))
        }
    }
}

fn check_present(
    tensor: &DynValue,
    name: &str,
    batch: usize,
    total: usize,
    layout: &IoLayout,
) -> Result<(), EngineError> {
    let expected = [batch, layout.kv_heads, total, layout.head_dim].map(|d| d as i64);
    match tensor.dtype().tensor_shape() {
        Some(shape) if shape[..] == expected[..] => Ok(()),
        shape => Err(EngineError::ModelOutput(format!(
            "`{name}` has shape {shape:?}, expected {expected:?} (is head_dim / num_key_value_heads in the \
             model's config right?)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_position_logits_are_taken_per_row() {
        // batch 2, 3 positions, vocab 2: value = row * 10 + position + vocab index / 10
        let data: Vec<f32> = (0..2)
            .flat_map(|r| {
                (0..3).flat_map(move |p| (0..2).map(move |v| (r * 10 + p) as f32 + v as f32 / 10.0))
            })
            .collect();
        let logits = select_logits(&[2, 3, 2], &data, 2, 3, LogitsScope::LastPosition, |x| x).unwrap();
        assert_eq!(logits.shape(), [2, 1, 2]);
        assert_eq!(logits.last(0), [2.0, 2.1]);
        assert_eq!(logits.last(1), [12.0, 12.1]);
        let all = select_logits(&[2, 3, 2], &data, 2, 3, LogitsScope::AllPositions, |x| x).unwrap();
        assert_eq!(all.at(1, 1), [11.0, 11.1]);
    }

    #[test]
    fn f16_logits_are_converted_to_f32() {
        let data = [f16::from_f32(1.5), f16::from_f32(-2.0)];
        let logits = select_logits(&[1, 1, 2], &data, 1, 1, LogitsScope::LastPosition, f16::to_f32).unwrap();
        assert_eq!(logits.last(0), [1.5, -2.0]);
    }

    #[test]
    fn all_positions_from_a_last_position_graph_is_an_error() {
        let err =
            select_logits(&[1, 1, 2], &[0.0f32, 1.0], 1, 4, LogitsScope::AllPositions, |x| x).unwrap_err();
        assert!(err.to_string().contains("last position"), "{err}");
    }

    #[test]
    fn input_lengths_are_checked_against_the_cache() {
        let past = KvCache { tensors: Vec::new(), batch: 2, len: 3 };
        let ids = [1i64, 2];
        let ok_mask = [1i64; 8];
        let input =
            ForwardInput { batch: 2, input_ids: &ids, attention_mask: &ok_mask, position_ids: &[3, 3] };
        assert_eq!(check_input(&input, &past, true).unwrap(), (2, 1));
        let short_mask = [1i64; 6];
        let input = ForwardInput { attention_mask: &short_mask, ..input };
        assert!(matches!(check_input(&input, &past, true), Err(EngineError::ForwardInput(_))));
        let input = ForwardInput { batch: 3, attention_mask: &ok_mask, ..input };
        assert!(check_input(&input, &past, true).is_err());
    }
}
