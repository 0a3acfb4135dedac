//! Training rows: each row is a prompt (left-padded) followed by a response (right-padded), the same
//! layout rollouts use, so positions are `cumsum(mask) − 1` and a row's numbers do not depend on its
//! neighbours. Only the hidden states that predict response tokens go through the output head.
//!
//! A group's G rows share their prompt, and a prompt's hidden states do not depend on what follows
//! it (causal attention). So consecutive rows with equal prompts are computed as a shared prefix:
//! every prompt token but the last runs once per group, its keys and values are repeated to the
//! group's rows (an `index_select`, whose backward sums the rows' gradients), and only the last
//! prompt token and the response run per row. The split is at column `prompt_width − 1` of the
//! packed layout, so both halves keep the packed rows' masks and positions, and the numbers are
//! those of the full rows up to float rounding.

use candle_core::{DType, Device, Tensor};

use crate::model::fused::target_logprobs;
use crate::model::{Decoder, KvCache, Mode};
use crate::rollout::padding::PAD_ID;
use crate::rollout::prompt_groups::PromptGroups;

/// Rows packed as tensors.
#[derive(Debug, Clone)]
pub struct PackedRows {
    /// `[rows, prompt_width + response_width]` token ids.
    pub ids: Tensor,
    /// 1 on real tokens, 0 on padding (same shape as `ids`).
    pub mask: Tensor,
    /// `cumsum(mask) − 1`, 0 on padding.
    pub positions: Tensor,
    /// `[rows, response_width]`: the response tokens (padding where a response is shorter).
    pub targets: Tensor,
    /// `[rows, response_width]` f32: 1 on response tokens, 0 on padding.
    pub response_mask: Tensor,
    /// Response lengths.
    pub response_lengths: Vec<usize>,
    /// Columns of the (left-padded) prompt part.
    pub prompt_width: usize,
    /// Columns of the (right-padded) response part.
    pub response_width: usize,
    /// Which rows share a prompt.
    pub prompt_groups: PromptGroups,
}

/// Packs `(prompt, response)` rows. Every response must have at least one token.
pub fn pack(rows: &[(&[u32], &[u32])], device: &Device) -> candle_core::Result<PackedRows> {
    if rows.is_empty() {
        candle_core::bail!("no rows to pack");
    }
    if rows.iter().any(|(prompt, response)| prompt.is_empty() || response.is_empty()) {
        candle_core::bail!("every training row needs a prompt token and a response token");
    }
    let prompt_width = rows.iter().map(|(p, _)| p.len()).max().unwrap_or(0);
    let response_width = rows.iter().map(|(_, r)| r.len()).max().unwrap_or(0);
    let width = prompt_width + response_width;
    let n = rows.len();
    let (mut ids, mut mask, mut positions) =
        (Vec::with_capacity(n * width), Vec::with_capacity(n * width), Vec::with_capacity(n * width));
    let (mut targets, mut response_mask) =
        (Vec::with_capacity(n * response_width), Vec::with_capacity(n * response_width));
    for (prompt, response) in rows {
        let left = prompt_width - prompt.len();
        let right = response_width - response.len();
        let real = prompt.len() + response.len();
        ids.extend(
            std::iter::repeat_n(PAD_ID, left)
                .chain(prompt.iter().copied())
                .chain(response.iter().copied())
                .chain(std::iter::repeat_n(PAD_ID, right)),
        );
        mask.extend(
            std::iter::repeat_n(0u32, left)
                .chain(std::iter::repeat_n(1, real))
                .chain(std::iter::repeat_n(0, right)),
        );
        positions.extend(
            std::iter::repeat_n(0u32, left).chain(0..real as u32).chain(std::iter::repeat_n(0, right)),
        );
        targets.extend(response.iter().copied().chain(std::iter::repeat_n(PAD_ID, right)));
        response_mask
            .extend(std::iter::repeat_n(1f32, response.len()).chain(std::iter::repeat_n(0f32, right)));
    }
    Ok(PackedRows {
        ids: Tensor::from_vec(ids, (n, width), device)?,
        mask: Tensor::from_vec(mask, (n, width), device)?,
        positions: Tensor::from_vec(positions, (n, width), device)?,
        targets: Tensor::from_vec(targets, (n, response_width), device)?,
        response_mask: Tensor::from_vec(response_mask, (n, response_width), device)?,
        response_lengths: rows.iter().map(|(_, r)| r.len()).collect(),
        prompt_width,
        response_width,
        prompt_groups: PromptGroups::of(&rows.iter().map(|(prompt, _)| *prompt).collect::<Vec<_>>()),
    })
}

impl PackedRows {
    /// These rows with every row computed in full (the reference the shared prefix is tested against).
    pub fn without_prefix_sharing(mut self) -> Self {
        self.prompt_groups = PromptGroups::unshared(self.response_lengths.len());
        self
    }
}

/// `[rows, response_width]` log-probabilities of the response tokens under `decoder`, with the
/// logits divided by `temperature` (the sampling distribution). Differentiable in `Mode::Train`.
/// Rows in the same prompt group share the prompt's computation (see the module notes).
pub fn response_logprobs(
    decoder: &Decoder,
    rows: &PackedRows,
    mode: Mode,
    temperature: f64,
) -> candle_core::Result<Tensor> {
    // Columns 0 .. prompt_width − 1 hold every prompt token but the last; from there on, column
    // prompt_width − 1 + t predicts response token t. The last column is only ever a target.
    let split = rows.prompt_width - 1;
    let inputs = split + rows.response_width;
    let predicting = if split > 0 && rows.prompt_groups.shares() {
        let device = rows.ids.device();
        let first_rows = Tensor::new(rows.prompt_groups.first_row.as_slice(), device)?;
        let group_of_row = Tensor::new(rows.prompt_groups.group_of_row.as_slice(), device)?;
        let prefix = |t: &Tensor| t.index_select(&first_rows, 0)?.narrow(1, 0, split);
        let mut cache = KvCache::new(decoder.config().num_hidden_layers);
        decoder.forward(
            &prefix(&rows.ids)?,
            &prefix(&rows.mask)?,
            &prefix(&rows.positions)?,
            Some(&mut cache),
            mode,
        )?;
        let mut cache = cache.select_rows(&group_of_row)?;
        decoder.forward(
            &rows.ids.narrow(1, split, rows.response_width)?,
            &rows.mask.narrow(1, 0, inputs)?,
            &rows.positions.narrow(1, split, rows.response_width)?,
            Some(&mut cache),
            mode,
        )?
    } else {
        let hidden = decoder.forward(
            &rows.ids.narrow(1, 0, inputs)?,
            &rows.mask.narrow(1, 0, inputs)?,
            &rows.positions.narrow(1, 0, inputs)?,
            None,
            mode,
        )?;
        hidden.narrow(1, split, rows.response_width)?
    };
    let logits = decoder.logits(&predicting)?.to_dtype(DType::F32)?;
    target_logprobs(&logits, &rows.targets, temperature)
}
