//! Which problems a step sees, and the per-step random streams.
//!
//! Everything random in a step is derived from the run's seed, a stream name and the step number, so
//! a resumed run replays exactly what an uninterrupted one would have done without storing generator
//! states: that derivation *is* the checkpoint's RNG state.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

/// A seed for stream `stream` at step `step` of a run seeded with `seed`.
pub fn derive_seed(seed: u64, stream: &str, step: u64) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update(seed.to_le_bytes());
    hasher.update(stream.as_bytes());
    hasher.update(step.to_le_bytes());
    let digest = hasher.finalize();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(bytes)
}

/// Walks a dataset in epochs, each a fresh seeded permutation, so batch `s` of size `b` holds items
/// `s·b … s·b + b − 1` of the concatenated epochs.
#[derive(Debug, Clone)]
pub struct EpochSampler {
    len: usize,
    seed: u64,
    epoch: Option<(u64, Vec<usize>)>,
}

impl EpochSampler {
    /// A sampler over `len` items.
    pub fn new(len: usize, seed: u64) -> Self {
        assert!(len > 0, "cannot sample from an empty dataset");
        Self { len, seed, epoch: None }
    }

    /// The items of batch `step`.
    pub fn batch(&mut self, step: u64, size: usize) -> Vec<usize> {
        (0..size as u64).map(|j| self.item(step * size as u64 + j)).collect()
    }

    fn item(&mut self, k: u64) -> usize {
        let epoch = k / self.len as u64;
        if self.epoch.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut order: Vec<usize> = (0..self.len).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(derive_seed(self.seed, "data", epoch)));
            self.epoch = Some((epoch, order));
        }
        let (_, order) = self.epoch.as_ref().expect("set above");
        order[(k % self.len as u64) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_epoch_visits_each_item_once_and_batches_are_reproducible() {
        let mut sampler = EpochSampler::new(10, 3);
        let mut seen: Vec<usize> = (0..5).flat_map(|s| sampler.batch(s, 2)).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        let mut again = EpochSampler::new(10, 3);
        assert_eq!(again.batch(7, 3), sampler.batch(7, 3));
        assert_ne!(derive_seed(1, "rollout", 5), derive_seed(1, "filter", 5));
    }
}
