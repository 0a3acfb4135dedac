//! A token bucket bounding download bandwidth in bytes per second. The bucket is plain arithmetic on
//! instants given by the caller; [`BandwidthLimit`] wraps it for async code and sleeps.

use std::num::NonZeroU64;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token bucket: `rate` bytes per second, bursts up to `burst` bytes. Taking more than is there
/// leaves a debt that the caller waits out, so chunks larger than the burst still work.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(rate: NonZeroU64, burst: NonZeroU64, now: Instant) -> Self {
        let burst = burst.get() as f64;
        Self { rate: rate.get() as f64, burst, tokens: burst, last: now }
    }

    /// Takes `bytes` at `now` and returns how long to wait before using them.
    pub fn take(&mut self, bytes: u64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst) - bytes as f64;
        if self.tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-self.tokens / self.rate) }
    }
}

/// A shared bandwidth limit for async downloads.
#[derive(Debug)]
pub struct BandwidthLimit {
    bucket: Mutex<TokenBucket>,
}

impl BandwidthLimit {
    /// `bytes_per_second`, with a burst of a quarter second (at least 16 KiB).
    pub fn new(bytes_per_second: NonZeroU64) -> Self {
        let burst = NonZeroU64::new((bytes_per_second.get() / 4).max(16 * 1024)).expect("positive");
        Self { bucket: Mutex::new(TokenBucket::new(bytes_per_second, burst, Instant::now())) }
    }

    /// Waits until `bytes` may be passed on.
    pub async fn acquire(&self, bytes: u64) {
        let wait = self.bucket.lock().expect("bandwidth bucket lock").take(bytes, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: u64) -> NonZeroU64 {
        NonZeroU64::new(n).unwrap()
    }

    #[test]
    fn a_full_bucket_passes_a_burst_without_waiting() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(nz(1000), nz(500), t0);
        assert_eq!(bucket.take(500, t0), Duration::ZERO);
        assert_eq!(bucket.take(100, t0), Duration::from_millis(100));
    }

    #[test]
    fn sustained_transfer_is_paced_at_the_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(nz(1000), nz(100), t0);
        // The caller sleeps for every wait, so its clock is the sum of the waits.
        let mut now = t0;
        for _ in 0..50 {
            now += bucket.take(100, now);
        }
        // 5000 bytes, the first 100 free: 4.9 s at 1000 B/s.
        let spent = now - t0;
        assert!((spent.as_secs_f64() - 4.9).abs() < 1e-6, "{spent:?}");
    }

    #[test]
    fn an_idle_bucket_refills_only_up_to_its_burst() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(nz(1000), nz(200), t0);
        bucket.take(200, t0);
        let later = t0 + Duration::from_secs(60);
        assert_eq!(bucket.take(200, later), Duration::ZERO);
        assert_eq!(bucket.take(100, later), Duration::from_millis(100));
    }

    #[test]
    fn a_chunk_larger_than_the_burst_waits_out_its_debt() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(nz(1000), nz(100), t0);
        assert_eq!(bucket.take(1100, t0), Duration::from_secs(1));
    }
}
