//! Seeded randomness for sampling on the device: Gumbel noise, so that
//! `argmax(logits / T + g)` is a draw from `softmax(logits / T)` without leaving the device.
//!
//! On the CPU the uniforms come from a ChaCha8 stream (bit-identical across runs and resumes); on a
//! GPU the device's own generator is reseeded from that stream before each draw, so only one `u64`
//! crosses the bus per step.

use candle_core::{DType, Device, Tensor};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Smallest uniform drawn: keeps `-log(-log(u))` finite.
const MIN_UNIFORM: f32 = 1e-10;

/// A seeded source of Gumbel noise.
#[derive(Debug, Clone)]
pub struct GumbelNoise {
    rng: ChaCha8Rng,
}

impl GumbelNoise {
    /// A source whose stream is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        Self { rng: ChaCha8Rng::seed_from_u64(seed) }
    }

    /// Standard Gumbel noise of `shape` on `device` (f32).
    pub fn sample(&mut self, rows: usize, vocab: usize, device: &Device) -> candle_core::Result<Tensor> {
        let uniform = if device.is_cpu() {
            let values: Vec<f32> =
                (0..rows * vocab).map(|_| self.rng.random::<f32>().max(MIN_UNIFORM)).collect();
            Tensor::from_vec(values, (rows, vocab), device)?
        } else {
            device.set_seed(self.rng.next_u64())?;
            Tensor::rand(MIN_UNIFORM, 1.0f32, (rows, vocab), device)?
        };
        uniform.to_dtype(DType::F32)?.log()?.neg()?.log()?.neg()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gumbel_max_draws_follow_the_softmax() {
        // Three tokens with probabilities 0.5, 0.3, 0.2.
        let probs = [0.5f32, 0.3, 0.2];
        let logits = Tensor::new(&probs.map(f32::ln), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let mut noise = GumbelNoise::new(9);
        let mut counts = [0usize; 3];
        let draws = 4000;
        let g = noise.sample(draws, 3, &Device::Cpu).unwrap();
        let choices = g.broadcast_add(&logits).unwrap().argmax(1).unwrap().to_vec1::<u32>().unwrap();
        for c in choices {
            counts[c as usize] += 1;
        }
        for (count, p) in counts.iter().zip(probs) {
            let frequency = *count as f32 / draws as f32;
            assert!((frequency - p).abs() < 0.03, "{counts:?}");
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_noise() {
        let a = GumbelNoise::new(5).sample(2, 7, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        let b = GumbelNoise::new(5).sample(2, 7, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(a, b);
    }
}
