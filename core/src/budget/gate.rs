//! The gate: reserve before a cloud call, then commit (the cloud answered) or release (it did not,
//! and the query was answered locally).

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::change::BudgetChange;
use super::policy::{BudgetPolicy, PolicyError};

const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 24 * HOUR_MS;

/// One settled query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settled {
    at_ms: u64,
    cloud: bool,
    cloud_tokens: u64,
}

/// A granted, not yet settled cloud call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Pending {
    at_ms: u64,
    tokens: u64,
}

/// Proof that a cloud call was granted; settle it with [`BudgetGate::commit`] or
/// [`BudgetGate::release`].
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a reservation holds budget until it is committed or released"]
pub struct Reservation {
    id: u64,
    at_ms: u64,
    tokens: u64,
}

impl Reservation {
    /// Identifier of the reservation (stable across a persisted restart).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The change that granted this reservation (what a journal records before the call goes out).
    pub fn change(&self) -> BudgetChange {
        BudgetChange::Reserved { id: self.id, at_ms: self.at_ms, tokens: self.tokens }
    }
}

/// Why a cloud call was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "cloud budget spent: {cloud} cloud calls (incl. {pending} in flight) against {local} local answers \
         in the last {window_secs} s allows at most ρ·local + {burst} = {allowed:.1}"
    )]
    Ratio { cloud: u64, pending: u64, local: u64, window_secs: u64, burst: u32, allowed: f64 },
    #[error("hourly cap reached: {calls} cloud calls in the last hour (max {max})")]
    HourlyCap { calls: u64, max: u32 },
    #[error(
        "daily token cap reached: {tokens} cloud tokens in the last 24 h plus {requested} requested (max {max})"
    )]
    DailyTokenCap { tokens: u64, requested: u64, max: u64 },
    #[error("the cloud is disabled by the budget (cloud_fraction = 0)")]
    Disabled,
}

impl Refusal {
    /// A short machine-readable class, for telemetry and metrics.
    pub fn class(&self) -> &'static str {
        match self {
            Refusal::Ratio { .. } => "ratio",
            Refusal::HourlyCap { .. } => "hourly_cap",
            Refusal::DailyTokenCap { .. } => "daily_token_cap",
            Refusal::Disabled => "disabled",
        }
    }
}

/// The numbers behind the gate at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetSnapshot {
    /// Local answers in the window.
    pub local: u64,
    /// Settled cloud calls in the window.
    pub cloud: u64,
    /// Granted cloud calls not yet settled.
    pub pending: u64,
    /// Cloud share of settled queries in the window (0 when there are none).
    pub cloud_share: f64,
    /// Configured largest cloud share.
    pub cloud_fraction: f64,
    /// Cloud calls that would still be granted now.
    pub calls_available: u64,
    /// Cloud calls in the last hour, settled and pending.
    pub calls_last_hour: u64,
    /// Cloud tokens in the last 24 hours, settled and pending.
    pub tokens_last_day: u64,
    /// Window length in seconds.
    pub window_secs: u64,
}

/// Everything the gate must keep across a restart.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetState {
    settled: VecDeque<Settled>,
    pending: BTreeMap<u64, Pending>,
    next_id: u64,
}

/// The budget gate.
#[derive(Debug, Clone)]
pub struct BudgetGate {
    policy: BudgetPolicy,
    state: BudgetState,
}

impl BudgetGate {
    /// A gate with an empty history.
    pub fn new(policy: BudgetPolicy) -> Result<Self, PolicyError> {
        Self::restore(policy, BudgetState::default())
    }

    /// A gate continuing from persisted state. Calls that were in flight when the state was saved
    /// may have reached the cloud, so they are counted as cloud calls: a crash can never free budget.
    pub fn restore(policy: BudgetPolicy, state: BudgetState) -> Result<Self, PolicyError> {
        Self::replay(policy, state, [])
    }

    /// A gate continuing from persisted state plus the changes made since it was saved, applied in
    /// order; then, as in [`BudgetGate::restore`], calls still in flight count as cloud calls.
    pub fn replay(
        policy: BudgetPolicy,
        state: BudgetState,
        changes: impl IntoIterator<Item = BudgetChange>,
    ) -> Result<Self, PolicyError> {
        policy.validate()?;
        let mut gate = Self { policy, state };
        for change in changes {
            gate.apply(change);
        }
        let state = &mut gate.state;
        for (_, p) in std::mem::take(&mut state.pending) {
            state.settled.push_back(Settled { at_ms: p.at_ms, cloud: true, cloud_tokens: p.tokens });
        }
        state.settled.make_contiguous().sort_by_key(|s| s.at_ms);
        Ok(gate)
    }

    /// The state to persist.
    pub fn state(&self) -> &BudgetState {
        &self.state
    }

    /// The policy in force.
    pub fn policy(&self) -> &BudgetPolicy {
        &self.policy
    }

    /// Asks for one cloud call expected to use `estimated_tokens`; grants it only if every limit
    /// still holds with all in-flight calls counted.
    pub fn reserve(&mut self, now_ms: u64, estimated_tokens: u64) -> Result<Reservation, Refusal> {
        if self.policy.cloud_fraction == 0.0 {
            return Err(Refusal::Disabled);
        }
        let s = self.snapshot(now_ms);
        let allowed = self.policy.rho() * s.local as f64 + f64::from(self.policy.burst);
        if (s.cloud + s.pending + 1) as f64 > allowed + 1e-9 {
            return Err(Refusal::Ratio {
                cloud: s.cloud + s.pending,
                pending: s.pending,
                local: s.local,
                window_secs: self.policy.window_secs,
                burst: self.policy.burst,
                allowed,
            });
        }
        if let Some(max) = self.policy.max_calls_per_hour
            && s.calls_last_hour + 1 > u64::from(max)
        {
            return Err(Refusal::HourlyCap { calls: s.calls_last_hour, max });
        }
        if let Some(max) = self.policy.max_cloud_tokens_per_day
            && s.tokens_last_day + estimated_tokens > max
        {
            return Err(Refusal::DailyTokenCap {
                tokens: s.tokens_last_day,
                requested: estimated_tokens,
                max,
            });
        }
        let reservation = Reservation { id: self.state.next_id, at_ms: now_ms, tokens: estimated_tokens };
        self.apply(reservation.change());
        Ok(reservation)
    }

    /// The cloud answered using `actual_tokens`. Returns the change, for a journal.
    pub fn commit(&mut self, reservation: Reservation, now_ms: u64, actual_tokens: u64) -> BudgetChange {
        let change = BudgetChange::Committed { id: reservation.id, at_ms: now_ms, tokens: actual_tokens };
        self.apply(change);
        change
    }

    /// The cloud call did not happen or failed; the query was answered locally. Returns the change,
    /// for a journal.
    pub fn release(&mut self, reservation: Reservation, now_ms: u64) -> BudgetChange {
        let change = BudgetChange::Released { id: reservation.id, at_ms: now_ms };
        self.apply(change);
        change
    }

    /// A query answered on the device. Returns the change, for a journal.
    pub fn record_local(&mut self, now_ms: u64) -> BudgetChange {
        let change = BudgetChange::Local { at_ms: now_ms };
        self.apply(change);
        change
    }

    /// Applies one change without checking any limit: every method above goes through here, and
    /// replaying a journal does too, so the state is a function of the changes alone. Settling an
    /// unknown reservation still counts the query (a cloud call stays a cloud call).
    pub fn apply(&mut self, change: BudgetChange) {
        match change {
            BudgetChange::Reserved { id, at_ms, tokens } => {
                self.forget_old(at_ms);
                self.state.next_id = self.state.next_id.max(id.saturating_add(1));
                self.state.pending.insert(id, Pending { at_ms, tokens });
            }
            BudgetChange::Committed { id, at_ms, tokens } => {
                self.forget_old(at_ms);
                self.state.pending.remove(&id);
                self.push(Settled { at_ms, cloud: true, cloud_tokens: tokens });
            }
            BudgetChange::Released { id, at_ms } => {
                self.forget_old(at_ms);
                self.state.pending.remove(&id);
                self.push(Settled { at_ms, cloud: false, cloud_tokens: 0 });
            }
            BudgetChange::Local { at_ms } => {
                self.forget_old(at_ms);
                self.push(Settled { at_ms, cloud: false, cloud_tokens: 0 });
            }
        }
    }

    fn push(&mut self, settled: Settled) {
        self.state.settled.push_back(settled);
        let mut i = self.state.settled.len() - 1;
        while i > 0 && self.state.settled[i - 1].at_ms > self.state.settled[i].at_ms {
            self.state.settled.swap(i - 1, i);
            i -= 1;
        }
    }

    fn retention_ms(&self) -> u64 {
        let mut keep = self.policy.window_secs * 1000;
        if self.policy.max_calls_per_hour.is_some() {
            keep = keep.max(HOUR_MS);
        }
        if self.policy.max_cloud_tokens_per_day.is_some() {
            keep = keep.max(DAY_MS);
        }
        keep
    }

    fn forget_old(&mut self, now_ms: u64) {
        let horizon = now_ms.saturating_sub(self.retention_ms());
        while self.state.settled.front().is_some_and(|s| s.at_ms < horizon) {
            self.state.settled.pop_front();
        }
    }

    /// The numbers behind the gate at `now_ms`.
    pub fn snapshot(&self, now_ms: u64) -> BudgetSnapshot {
        let since = |ms: u64| now_ms.saturating_sub(ms);
        let window_start = since(self.policy.window_secs * 1000);
        let in_window = self.state.settled.iter().filter(|s| s.at_ms >= window_start);
        let (mut local, mut cloud) = (0u64, 0u64);
        for s in in_window {
            if s.cloud {
                cloud += 1;
            } else {
                local += 1;
            }
        }
        let pending = self.state.pending.len() as u64;
        let hour_start = since(HOUR_MS);
        let day_start = since(DAY_MS);
        let calls_last_hour =
            self.state.settled.iter().filter(|s| s.cloud && s.at_ms >= hour_start).count() as u64 + pending;
        let tokens_last_day =
            self.state.settled.iter().filter(|s| s.at_ms >= day_start).map(|s| s.cloud_tokens).sum::<u64>()
                + self.state.pending.values().map(|p| p.tokens).sum::<u64>();
        let allowed = self.policy.rho() * local as f64 + f64::from(self.policy.burst);
        let mut calls_available = (allowed + 1e-9 - (cloud + pending) as f64).floor().max(0.0) as u64;
        if self.policy.cloud_fraction == 0.0 {
            calls_available = 0;
        }
        if let Some(max) = self.policy.max_calls_per_hour {
            calls_available = calls_available.min(u64::from(max).saturating_sub(calls_last_hour));
        }
        let settled = local + cloud;
        BudgetSnapshot {
            local,
            cloud,
            pending,
            cloud_share: if settled == 0 { 0.0 } else { cloud as f64 / settled as f64 },
            cloud_fraction: self.policy.cloud_fraction,
            calls_available,
            calls_last_hour,
            tokens_last_day,
            window_secs: self.policy.window_secs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(fraction: f64, burst: u32) -> BudgetGate {
        BudgetGate::new(BudgetPolicy { cloud_fraction: fraction, burst, ..BudgetPolicy::default() }).unwrap()
    }

    #[test]
    fn thirty_percent_allows_three_cloud_calls_per_seven_local_answers() {
        let mut g = gate(0.3, 0);
        for t in 0..7 {
            g.record_local(t);
        }
        for t in 0..3 {
            let r = g.reserve(10 + t, 100).expect("within ρ·local");
            g.commit(r, 20 + t, 100);
        }
        assert!(matches!(g.reserve(30, 100), Err(Refusal::Ratio { .. })));
    }

    #[test]
    fn in_flight_reservations_count_so_concurrent_requests_cannot_overrun() {
        let mut g = gate(0.5, 0);
        for t in 0..4 {
            g.record_local(t);
        }
        let granted: Vec<_> = (0..10).filter_map(|_| g.reserve(5, 0).ok()).collect();
        assert_eq!(granted.len(), 4, "ρ = 1 with 4 local answers");
        assert_eq!(g.snapshot(5).calls_available, 0);
    }

    #[test]
    fn a_released_call_counts_as_a_local_answer() {
        let mut g = gate(0.5, 1);
        let r = g.reserve(0, 0).unwrap();
        g.release(r, 1);
        let s = g.snapshot(2);
        assert_eq!((s.local, s.cloud, s.pending), (1, 0, 0));
    }

    #[test]
    fn the_window_slides() {
        let mut g = BudgetGate::new(BudgetPolicy {
            cloud_fraction: 0.5,
            burst: 0,
            window_secs: 10,
            ..Default::default()
        })
        .unwrap();
        g.record_local(0);
        let r = g.reserve(1, 0).unwrap();
        g.commit(r, 1, 0);
        assert!(g.reserve(2, 0).is_err());
        // 11 s later the old local answer and cloud call have left the window.
        g.record_local(12_000);
        assert!(g.reserve(12_001, 0).is_ok());
    }

    #[test]
    fn hourly_and_daily_token_caps_hold() {
        let mut g = BudgetGate::new(BudgetPolicy {
            cloud_fraction: 0.9,
            burst: 100,
            max_calls_per_hour: Some(2),
            max_cloud_tokens_per_day: Some(1000),
            ..Default::default()
        })
        .unwrap();
        let a = g.reserve(0, 400).unwrap();
        g.commit(a, 1, 400);
        let b = g.reserve(2, 500).unwrap();
        assert!(matches!(g.reserve(3, 10), Err(Refusal::HourlyCap { .. })));
        g.commit(b, 4, 500);
        assert!(matches!(g.reserve(HOUR_MS + 10, 200), Err(Refusal::DailyTokenCap { .. })));
        assert!(g.reserve(HOUR_MS + 10, 100).is_ok());
    }

    #[test]
    fn restored_state_keeps_the_window_and_counts_in_flight_calls_as_spent() {
        let mut g = gate(0.5, 0);
        for t in 0..2 {
            g.record_local(t);
        }
        let _in_flight = g.reserve(3, 0).unwrap();
        let saved = serde_json::to_string(g.state()).unwrap();
        let restored =
            BudgetGate::restore(g.policy().clone(), serde_json::from_str(&saved).unwrap()).unwrap();
        let s = restored.snapshot(4);
        assert_eq!((s.local, s.cloud, s.pending, s.calls_available), (2, 1, 0, 1));
    }

    #[test]
    fn replaying_the_changes_a_gate_made_rebuilds_its_state() {
        let policy = BudgetPolicy { cloud_fraction: 0.5, burst: 1, window_secs: 10, ..Default::default() };
        let mut live = BudgetGate::new(policy.clone()).unwrap();
        let start = live.state().clone();
        let mut journal = Vec::new();
        for t in 0..40u64 {
            let now = t * 700;
            journal.push(live.record_local(now));
            if let Ok(r) = live.reserve(now + 1, 50) {
                journal.push(r.change());
                journal.push(if t % 3 == 0 { live.release(r, now + 2) } else { live.commit(r, now + 2, 40) });
            }
        }
        let in_flight = live.reserve(40_000, 70).unwrap();
        journal.push(in_flight.change());

        let replayed = BudgetGate::replay(policy.clone(), start, journal).unwrap();
        let restored = BudgetGate::restore(policy, live.state().clone()).unwrap();
        assert_eq!(replayed.state(), restored.state());
        assert_eq!(
            replayed.snapshot(40_001).cloud,
            live.snapshot(40_001).cloud + 1,
            "in flight counts as spent"
        );
    }

    #[test]
    fn a_refused_reservation_changes_nothing() {
        let mut g = gate(0.5, 0);
        let before = g.state().clone();
        assert!(g.reserve(HOUR_MS * 5, 0).is_err());
        assert_eq!(g.state(), &before);
    }

    #[test]
    fn a_zero_fraction_disables_the_cloud_and_bad_fractions_are_refused() {
        assert_eq!(gate(0.0, 5).reserve(0, 0), Err(Refusal::Disabled));
        assert!(BudgetGate::new(BudgetPolicy { cloud_fraction: 1.0, ..Default::default() }).is_err());
    }
}
