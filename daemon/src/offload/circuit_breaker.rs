//! The circuit breaker of one offload transport, as pure state: the caller passes the current
//! `Instant` in, so the logic is tested without sleeping.
//!
//! Closed: every attempt is allowed; `failure_threshold` consecutive failures open the circuit.
//! Open: attempts are refused until `open_ms` have passed. Half-open: exactly one trial attempt is
//! allowed; its success closes the circuit, its failure opens it again. A trial whose outcome is
//! never reported (its caller went away) is given up after another `open_ms`, so the breaker
//! cannot stay stuck half-open.

use std::time::{Duration, Instant};

use super::CircuitBreakerConfig;

/// The breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { consecutive_failures: u32 },
    Open { until: Instant },
    HalfOpen { trial_started: Instant },
}

/// Whether an attempt may go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The circuit is closed.
    Allowed,
    /// The circuit is half-open and this attempt is its single trial.
    Trial,
    /// The circuit is open (or half-open with a trial under way); try again after this long.
    Refused { retry_after: Duration },
}

/// One transport's circuit breaker.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    failure_threshold: u32,
    open_for: Duration,
    state: State,
}

impl CircuitBreaker {
    /// A closed breaker with these settings (a threshold of 0 is treated as 1).
    pub fn new(config: &CircuitBreakerConfig) -> Self {
        Self {
            failure_threshold: config.failure_threshold.max(1),
            open_for: Duration::from_millis(config.open_ms),
            state: State::Closed { consecutive_failures: 0 },
        }
    }

    /// Asks to make one attempt at `now`.
    pub fn admit(&mut self, now: Instant) -> Admission {
        match self.state {
            State::Closed { .. } => Admission::Allowed,
            State::Open { until } if now >= until => {
                self.state = State::HalfOpen { trial_started: now };
                Admission::Trial
            }
            State::Open { until } => Admission::Refused { retry_after: until - now },
            State::HalfOpen { trial_started } => {
                let stale_at = trial_started + self.open_for;
                if now >= stale_at {
                    self.state = State::HalfOpen { trial_started: now };
                    Admission::Trial
                } else {
                    Admission::Refused { retry_after: stale_at - now }
                }
            }
        }
    }

    /// Records a successful attempt: the circuit closes.
    pub fn record_success(&mut self) {
        self.state = State::Closed { consecutive_failures: 0 };
    }

    /// Records a failed attempt at `now`.
    pub fn record_failure(&mut self, now: Instant) {
        self.state = match self.state {
            State::Closed { consecutive_failures } => {
                let failures = consecutive_failures.saturating_add(1);
                if failures >= self.failure_threshold {
                    tracing::warn!(failures, open_for = ?self.open_for, "circuit breaker opened");
                    State::Open { until: now + self.open_for }
                } else {
                    State::Closed { consecutive_failures: failures }
                }
            }
            State::HalfOpen { .. } => {
                tracing::warn!(open_for = ?self.open_for, "circuit breaker trial failed; open again");
                State::Open { until: now + self.open_for }
            }
            // A late failure of an attempt admitted before the circuit opened changes nothing.
            open @ State::Open { .. } => open,
        };
    }

    /// `closed`, `open` or `half_open` at `now` (an open circuit whose wait is over is half-open:
    /// the next attempt is its trial).
    pub fn state_name(&self, now: Instant) -> &'static str {
        match self.state {
            State::Closed { .. } => "closed",
            State::Open { until } if now < until => "open",
            State::Open { .. } | State::HalfOpen { .. } => "half_open",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32, open_ms: u64) -> CircuitBreaker {
        CircuitBreaker::new(&CircuitBreakerConfig { failure_threshold: threshold, open_ms })
    }

    #[test]
    fn stays_closed_below_the_threshold() {
        let now = Instant::now();
        let mut b = breaker(3, 1000);
        b.record_failure(now);
        b.record_failure(now);
        assert_eq!(b.admit(now), Admission::Allowed);
        assert_eq!(b.state_name(now), "closed");
    }

    #[test]
    fn success_resets_the_consecutive_failure_count() {
        let now = Instant::now();
        let mut b = breaker(2, 1000);
        b.record_failure(now);
        b.record_success();
        b.record_failure(now);
        assert_eq!(b.admit(now), Admission::Allowed);
    }

    #[test]
    fn opens_after_threshold_consecutive_failures_and_refuses_until_open_ms() {
        let now = Instant::now();
        let mut b = breaker(2, 1000);
        b.record_failure(now);
        b.record_failure(now);
        assert_eq!(b.state_name(now), "open");
        let later = now + Duration::from_millis(400);
        assert_eq!(b.admit(later), Admission::Refused { retry_after: Duration::from_millis(600) });
    }

    #[test]
    fn half_open_allows_exactly_one_trial() {
        let now = Instant::now();
        let mut b = breaker(1, 1000);
        b.record_failure(now);
        let after = now + Duration::from_millis(1000);
        assert_eq!(b.state_name(after), "half_open");
        assert_eq!(b.admit(after), Admission::Trial);
        assert!(matches!(b.admit(after), Admission::Refused { .. }));
        assert!(matches!(b.admit(after + Duration::from_millis(10)), Admission::Refused { .. }));
    }

    #[test]
    fn successful_trial_closes_the_circuit() {
        let now = Instant::now();
        let mut b = breaker(1, 100);
        b.record_failure(now);
        let after = now + Duration::from_millis(100);
        assert_eq!(b.admit(after), Admission::Trial);
        b.record_success();
        assert_eq!(b.state_name(after), "closed");
        assert_eq!(b.admit(after), Admission::Allowed);
    }

    #[test]
    fn failed_trial_opens_the_circuit_again_for_open_ms() {
        let now = Instant::now();
        let mut b = breaker(5, 100);
        for _ in 0..5 {
            b.record_failure(now);
        }
        let trial_at = now + Duration::from_millis(150);
        assert_eq!(b.admit(trial_at), Admission::Trial);
        b.record_failure(trial_at);
        assert_eq!(b.state_name(trial_at), "open");
        assert_eq!(
            b.admit(trial_at + Duration::from_millis(50)),
            Admission::Refused { retry_after: Duration::from_millis(50) }
        );
        assert_eq!(b.admit(trial_at + Duration::from_millis(100)), Admission::Trial);
    }

    #[test]
    fn abandoned_trial_is_replaced_after_open_ms() {
        let now = Instant::now();
        let mut b = breaker(1, 100);
        b.record_failure(now);
        let first_trial = now + Duration::from_millis(100);
        assert_eq!(b.admit(first_trial), Admission::Trial);
        // The trial's caller never reports back.
        assert!(matches!(b.admit(first_trial + Duration::from_millis(99)), Admission::Refused { .. }));
        assert_eq!(b.admit(first_trial + Duration::from_millis(100)), Admission::Trial);
    }

    #[test]
    fn late_failure_while_open_does_not_extend_the_wait() {
        let now = Instant::now();
        let mut b = breaker(1, 100);
        b.record_failure(now);
        b.record_failure(now + Duration::from_millis(90));
        assert_eq!(b.admit(now + Duration::from_millis(100)), Admission::Trial);
    }
}
