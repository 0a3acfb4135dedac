//! `Logits`: a `[batch, positions, vocab]` block of f32 next-token scores.

/// Logits of a forward pass as f32, row-major `[batch, positions, vocab]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Logits {
    batch: usize,
    positions: usize,
    vocab: usize,
    data: Vec<f32>,
}

impl Logits {
    /// Wraps `data`, which must hold `batch * positions * vocab` values.
    pub(crate) fn new(batch: usize, positions: usize, vocab: usize, data: Vec<f32>) -> Self {
        assert_eq!(data.len(), batch * positions * vocab, "logits data does not match its shape");
        Self { batch, positions, vocab, data }
    }

    /// `[batch, positions, vocab]`.
    pub fn shape(&self) -> [usize; 3] {
        [self.batch, self.positions, self.vocab]
    }

    /// Size of the vocabulary (last dimension).
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// The scores at `position` of `row`.
    pub fn at(&self, row: usize, position: usize) -> &[f32] {
        let start = (row * self.positions + position) * self.vocab;
        &self.data[start..start + self.vocab]
    }

    /// The scores at the last position of `row`.
    pub fn last(&self, row: usize) -> &[f32] {
        self.at(row, self.positions - 1)
    }

    /// All values, row-major.
    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    /// All values, row-major, without copying.
    pub fn into_vec(self) -> Vec<f32> {
        self.data
    }
}
