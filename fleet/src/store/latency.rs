//! Latency distributions that can be merged across devices, hours and databases: every latency is
//! stored next to its value rounded down to two significant digits (`quantize_latency`), so a
//! distribution is a small histogram (`GROUP BY` that column) and percentiles read from it are
//! exact to two significant digits (1 % at worst) — and exact for values that have only two.

use std::collections::BTreeMap;

use serde::Serialize;

/// `ms` rounded down to two significant digits: 7 → 7, 57 → 57, 1234 → 1200, 98765 → 98000.
pub fn quantize_latency(ms: u32) -> i64 {
    let ms = i64::from(ms);
    if ms < 100 {
        return ms;
    }
    let mut scale = 1;
    while ms / scale >= 100 {
        scale *= 10;
    }
    ms / scale * scale
}

/// Counts by quantized latency.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LatencyHistogram {
    counts: BTreeMap<i64, u64>,
}

/// Percentiles of one distribution, ms.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    /// Values counted.
    pub count: u64,
    pub p50: i64,
    pub p90: i64,
    pub p99: i64,
    pub max: i64,
}

impl LatencyHistogram {
    /// Adds `n` observations of quantized latency `q`.
    pub fn add(&mut self, q: i64, n: u64) {
        *self.counts.entry(q).or_default() += n;
    }

    /// Adds every observation of `other`.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (q, n) in &other.counts {
            self.add(*q, *n);
        }
    }

    /// Observations counted.
    pub fn count(&self) -> u64 {
        self.counts.values().sum()
    }

    /// The nearest-rank percentile `p` (0 < p ≤ 100), or `None` when empty.
    pub fn percentile(&self, p: f64) -> Option<i64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((p / 100.0) * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (q, n) in &self.counts {
            seen += n;
            if seen >= rank {
                return Some(*q);
            }
        }
        self.counts.keys().next_back().copied()
    }

    /// p50, p90, p99 and the maximum, or `None` when empty.
    pub fn percentiles(&self) -> Option<Percentiles> {
        Some(Percentiles {
            count: self.count(),
            p50: self.percentile(50.0)?,
            p90: self.percentile(90.0)?,
            p99: self.percentile(99.0)?,
            max: self.counts.keys().next_back().copied()?,
        })
    }

    /// `(quantized latency, count)` pairs in increasing latency.
    pub fn buckets(&self) -> impl Iterator<Item = (i64, u64)> + '_ {
        self.counts.iter().map(|(q, n)| (*q, *n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_keep_two_significant_digits() {
        let cases = [(0, 0), (7, 7), (99, 99), (100, 100), (123, 120), (1234, 1200), (98_765, 98_000)];
        for (ms, q) in cases {
            assert_eq!(quantize_latency(ms), q, "{ms}");
        }
        assert_eq!(quantize_latency(u32::MAX), 4_200_000_000);
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let mut h = LatencyHistogram::default();
        for ms in 1..=100u32 {
            h.add(quantize_latency(ms * 10), 1);
        }
        let p = h.percentiles().unwrap();
        assert_eq!((p.count, p.p50, p.p90, p.p99, p.max), (100, 500, 900, 990, 1000));
        assert_eq!(LatencyHistogram::default().percentiles(), None);
    }

    #[test]
    fn merged_histograms_count_everything() {
        let (mut a, mut b) = (LatencyHistogram::default(), LatencyHistogram::default());
        a.add(10, 3);
        b.add(10, 1);
        b.add(20, 4);
        a.merge(&b);
        assert_eq!(a.buckets().collect::<Vec<_>>(), vec![(10, 4), (20, 4)]);
    }
}
