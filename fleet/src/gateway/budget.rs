//! The gateway's budgets: one `BudgetGate` per device and one for the whole fleet, fed with the
//! local answers the devices report in their telemetry. A cloud call needs both gates; a device
//! refused by the fleet gate gets its own gate back as it was, and an upstream call that fails
//! still counts (with no tokens) so a device cannot earn budget by sending requests that fail.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::Serialize;
use tandem_core::budget::{BudgetGate, BudgetPolicy, BudgetSnapshot, BudgetState, Refusal, Reservation};
use tandem_core::protocol::{Route, TelemetryEvent};

use crate::ingest::StoredEvents;
use crate::store::now_ms;

/// Scope name of the fleet-wide gate in persisted state.
const FLEET_SCOPE: &str = "fleet";
const DEVICE_SCOPE_PREFIX: &str = "device:";

/// Why the gateway refused a cloud call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BudgetRefusal {
    #[error("device budget: {0}")]
    Device(Refusal),
    #[error("fleet budget: {0}")]
    Fleet(Refusal),
}

/// A granted call: settle it with [`BudgetBook::settle`].
#[derive(Debug)]
#[must_use = "a grant holds budget until it is settled"]
pub struct Grant {
    device: String,
    device_reservation: Reservation,
    fleet_reservation: Reservation,
}

/// Both budgets' numbers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BudgetReport {
    pub fleet: BudgetSnapshot,
    pub devices: Vec<(String, BudgetSnapshot)>,
}

struct Book {
    device_policy: BudgetPolicy,
    fleet: BudgetGate,
    devices: HashMap<String, BudgetGate>,
    dirty: HashSet<String>,
}

/// Every gate of the gateway.
pub struct BudgetBook {
    book: Mutex<Book>,
}

impl std::fmt::Debug for BudgetBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BudgetBook").finish_non_exhaustive()
    }
}

impl BudgetBook {
    /// Gates with the given policies (already validated), continuing from persisted `states`
    /// (`(scope, JSON)` pairs; unreadable ones are logged and started empty).
    pub fn new(device_policy: BudgetPolicy, fleet_policy: BudgetPolicy, states: &[(String, String)]) -> Self {
        let restore = |policy: &BudgetPolicy, scope: &str, json: Option<&String>| {
            let state = json
                .and_then(|json| match serde_json::from_str::<BudgetState>(json) {
                    Ok(state) => Some(state),
                    Err(error) => {
                        tracing::warn!(scope, %error, "ignoring unreadable saved budget state");
                        None
                    }
                })
                .unwrap_or_default();
            BudgetGate::restore(policy.clone(), state).expect("the policy was validated")
        };
        let fleet_json = states.iter().find(|(scope, _)| scope == FLEET_SCOPE).map(|(_, json)| json);
        let fleet = restore(&fleet_policy, FLEET_SCOPE, fleet_json);
        let devices = states
            .iter()
            .filter_map(|(scope, json)| {
                let device = scope.strip_prefix(DEVICE_SCOPE_PREFIX)?;
                Some((device.to_string(), restore(&device_policy, scope, Some(json))))
            })
            .collect();
        Self { book: Mutex::new(Book { device_policy, fleet, devices, dirty: HashSet::new() }) }
    }

    fn lock(&self) -> MutexGuard<'_, Book> {
        // Gates are plain data changed in single calls; a panic elsewhere cannot tear them.
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks both gates for one call of about `estimated_tokens`.
    pub fn reserve(&self, device: &str, estimated_tokens: u64) -> Result<Grant, BudgetRefusal> {
        let now = now_u64();
        let mut book = self.lock();
        let book = &mut *book;
        let policy = book.device_policy.clone();
        let gate = book
            .devices
            .entry(device.to_string())
            .or_insert_with(|| BudgetGate::new(policy).expect("the policy was validated"));
        let before = gate.clone();
        let device_reservation = gate.reserve(now, estimated_tokens).map_err(BudgetRefusal::Device)?;
        match book.fleet.reserve(now, estimated_tokens) {
            Ok(fleet_reservation) => {
                book.dirty.insert(device.to_string());
                book.dirty.insert(String::new());
                Ok(Grant { device: device.to_string(), device_reservation, fleet_reservation })
            }
            Err(refusal) => {
                // Not the device's doing: its gate goes back to how it was.
                let _undone = device_reservation;
                *gate = before;
                Err(BudgetRefusal::Fleet(refusal))
            }
        }
    }

    /// Settles a grant: `tokens` the cloud counted (0 when the call failed; it still counts).
    pub fn settle(&self, grant: Grant, tokens: u64) {
        let now = now_u64();
        let mut book = self.lock();
        if let Some(gate) = book.devices.get_mut(&grant.device) {
            gate.commit(grant.device_reservation, now, tokens);
        }
        book.fleet.commit(grant.fleet_reservation, now, tokens);
        book.dirty.insert(grant.device);
        book.dirty.insert(String::new());
    }

    /// The numbers of the fleet gate and of every device gate.
    pub fn report(&self) -> BudgetReport {
        let now = now_u64();
        let book = self.lock();
        let mut devices: Vec<_> = book.devices.iter().map(|(d, g)| (d.clone(), g.snapshot(now))).collect();
        devices.sort_by(|a, b| a.0.cmp(&b.0));
        BudgetReport { fleet: book.fleet.snapshot(now), devices }
    }

    /// The configured device and fleet cloud fractions.
    pub fn fractions(&self) -> (f64, f64) {
        let book = self.lock();
        (book.device_policy.cloud_fraction, book.fleet.policy().cloud_fraction)
    }

    /// States changed since the last call, as `(scope, JSON)` pairs to persist.
    pub fn take_dirty(&self) -> Vec<(String, String)> {
        let mut book = self.lock();
        let dirty: Vec<String> = book.dirty.drain().collect();
        dirty
            .into_iter()
            .filter_map(|device| {
                let (scope, gate) = if device.is_empty() {
                    (FLEET_SCOPE.to_string(), &book.fleet)
                } else {
                    (format!("{DEVICE_SCOPE_PREFIX}{device}"), book.devices.get(&device)?)
                };
                Some((scope, serde_json::to_string(gate.state()).expect("budget state serialises")))
            })
            .collect()
    }
}

impl StoredEvents for BudgetBook {
    /// Local answers (and local fallbacks) the devices reported count for both gates.
    fn stored(&self, events: &[TelemetryEvent]) {
        let now = now_u64();
        let mut book = self.lock();
        let book = &mut *book;
        for event in events.iter().filter(|e| matches!(e.route, Route::Local | Route::LocalFallback)) {
            let at = event.at_ms.min(now);
            let policy = book.device_policy.clone();
            book.devices
                .entry(event.device_id.clone())
                .or_insert_with(|| BudgetGate::new(policy).expect("the policy was validated"))
                .record_local(at);
            book.fleet.record_local(at);
            book.dirty.insert(event.device_id.clone());
        }
        book.dirty.insert(String::new());
    }
}

fn now_u64() -> u64 {
    u64::try_from(now_ms()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use tandem_core::protocol::{TelemetryBudget, TokenCounts};
    use uuid::Uuid;

    use super::*;

    fn policy(fraction: f64, burst: u32) -> BudgetPolicy {
        BudgetPolicy { cloud_fraction: fraction, burst, ..BudgetPolicy::default() }
    }

    fn local_answer(device: &str) -> TelemetryEvent {
        TelemetryEvent {
            id: Uuid::now_v7(),
            device_id: device.into(),
            model_version: "m".into(),
            at_ms: now_u64(),
            route: Route::Local,
            help_requested: false,
            help_probability: None,
            local_tokens: TokenCounts::default(),
            local_latency_ms: 1,
            cloud_tokens: TokenCounts::default(),
            cloud_latency_ms: 0,
            transport: None,
            budget: TelemetryBudget::default(),
            error_class: None,
            prompt: None,
            local_answer: None,
            cloud_answer: None,
        }
    }

    #[test]
    fn a_device_gets_cloud_calls_only_for_its_reported_local_answers() {
        let book = BudgetBook::new(policy(0.5, 1), policy(0.9, 100), &[]);
        let first = book.reserve("a", 10).expect("the burst");
        book.settle(first, 10);
        assert!(matches!(book.reserve("a", 10), Err(BudgetRefusal::Device(_))));
        book.stored(&[local_answer("a"), local_answer("b")]);
        let second = book.reserve("a", 10).expect("one local answer earns one call at ρ = 1");
        book.settle(second, 10);
        assert!(matches!(book.reserve("a", 10), Err(BudgetRefusal::Device(_))));
    }

    #[test]
    fn a_fleet_refusal_leaves_the_device_gate_untouched() {
        let book = BudgetBook::new(policy(0.5, 3), policy(0.5, 1), &[]);
        book.settle(book.reserve("a", 0).unwrap(), 0);
        let before = book.report().devices[0].1.clone();
        assert!(matches!(book.reserve("a", 0), Err(BudgetRefusal::Fleet(_))));
        assert_eq!(book.report().devices[0].1, before);
    }

    #[test]
    fn a_failed_call_still_counts() {
        let book = BudgetBook::new(policy(0.5, 1), policy(0.9, 100), &[]);
        book.settle(book.reserve("a", 100).unwrap(), 0);
        assert!(book.reserve("a", 0).is_err(), "the failure used the device's only call");
    }

    #[test]
    fn saved_states_restore_the_gates() {
        let book = BudgetBook::new(policy(0.5, 1), policy(0.9, 100), &[]);
        book.settle(book.reserve("a", 5).unwrap(), 5);
        let saved = book.take_dirty();
        assert_eq!(saved.len(), 2, "the device and the fleet");
        assert!(book.take_dirty().is_empty());
        let restored = BudgetBook::new(policy(0.5, 1), policy(0.9, 100), &saved);
        assert!(restored.reserve("a", 0).is_err(), "the spent call is remembered");
        assert_eq!(restored.report().fleet.cloud, 1);
    }
}
