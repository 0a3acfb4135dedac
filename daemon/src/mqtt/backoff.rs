//! Pauses between reconnection attempts: exponential, capped, and randomised so that a fleet of
//! devices does not reconnect in lockstep after a broker restart.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// The pause before each next reconnection attempt.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// Starts at `min`, doubles after every failed attempt, never exceeds `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { min, max: max.max(min), current: min }
    }

    /// The next pause, between half and all of the current step; the step then doubles.
    pub fn next_pause(&mut self) -> Duration {
        self.next_pause_with(random_fraction())
    }

    fn next_pause_with(&mut self, fraction: f64) -> Duration {
        let step = self.current;
        self.current = (self.current * 2).min(self.max);
        step.mul_f64(0.5 + 0.5 * fraction.clamp(0.0, 1.0))
    }

    /// A connection succeeded: the next outage starts from `min` again.
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

/// A number in [0, 1), different per call and per process (std's randomly keyed hasher).
fn random_fraction() -> f64 {
    let bits = std::collections::hash_map::RandomState::new().build_hasher().finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_cap_and_reset_after_a_connection() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let steps: Vec<_> = (0..4).map(|_| b.next_pause_with(1.0).as_millis()).collect();
        assert_eq!(steps, [100, 200, 350, 350]);
        b.reset();
        assert_eq!(b.next_pause_with(0.0), Duration::from_millis(50));
    }

    #[test]
    fn random_pauses_stay_between_half_and_all_of_the_step() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        for _ in 0..100 {
            let pause = b.next_pause();
            assert!(pause >= Duration::from_millis(500) && pause <= Duration::from_secs(1), "{pause:?}");
        }
    }
}
