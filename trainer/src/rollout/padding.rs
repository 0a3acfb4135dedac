//! Left padding: prompts of different lengths end at the same column, so every row's next token is
//! the last column. Positions count real tokens only (`cumsum(mask) - 1`, 0 on padding), so a row's
//! positions do not depend on how much padding it got.

use candle_core::{Device, Tensor};

/// Id placed in padding slots (never attended to).
pub const PAD_ID: u32 = 0;

/// A left-padded batch of prompts, row-major `[rows, width]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeftPadded {
    /// Token ids, padding first.
    pub ids: Vec<u32>,
    /// 1 for prompt tokens, 0 for padding.
    pub mask: Vec<u32>,
    /// `cumsum(mask) - 1`, 0 on padding.
    pub positions: Vec<u32>,
    /// Columns (the longest prompt).
    pub width: usize,
    /// Rows.
    pub rows: usize,
}

impl LeftPadded {
    /// Pads `prompts` on the left to the longest one.
    pub fn new(prompts: &[Vec<u32>]) -> Self {
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let mut padded = Self {
            ids: Vec::with_capacity(prompts.len() * width),
            mask: Vec::with_capacity(prompts.len() * width),
            positions: Vec::with_capacity(prompts.len() * width),
            width,
            rows: prompts.len(),
        };
        for prompt in prompts {
            let pad = width - prompt.len();
            padded.ids.extend(std::iter::repeat_n(PAD_ID, pad).chain(prompt.iter().copied()));
            padded.mask.extend(std::iter::repeat_n(0, pad).chain(std::iter::repeat_n(1, prompt.len())));
            padded.positions.extend(std::iter::repeat_n(0, pad).chain(0..prompt.len() as u32));
        }
        padded
    }

    /// `(ids, mask, positions)` as `[rows, width]` u32 tensors.
    pub fn tensors(&self, device: &Device) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let shape = (self.rows, self.width);
        Ok((
            Tensor::from_slice(&self.ids, shape, device)?,
            Tensor::from_slice(&self.mask, shape, device)?,
            Tensor::from_slice(&self.positions, shape, device)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_cumsum_of_the_mask_minus_one() {
        let padded = LeftPadded::new(&[vec![7, 8, 9], vec![5]]);
        assert_eq!(padded.width, 3);
        assert_eq!(padded.ids, [7, 8, 9, PAD_ID, PAD_ID, 5]);
        assert_eq!(padded.mask, [1, 1, 1, 0, 0, 1]);
        assert_eq!(padded.positions, [0, 1, 2, 0, 0, 0]);
    }
}
