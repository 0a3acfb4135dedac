//! `BudgetChange`: one step of the gate's state machine, as a value. The gate applies every change
//! through [`BudgetGate::apply`](super::BudgetGate::apply), so a journal of the changes a gate
//! made, replayed in order onto the state it started from, rebuilds its state exactly.

use serde::{Deserialize, Serialize};

/// One change to the budget state. Times are milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum BudgetChange {
    /// A cloud call expected to use `tokens` was granted as reservation `id`.
    Reserved { id: u64, at_ms: u64, tokens: u64 },
    /// Reservation `id` was settled: the cloud answered using `tokens`.
    Committed { id: u64, at_ms: u64, tokens: u64 },
    /// Reservation `id` was settled: the cloud call did not happen, the query was answered locally.
    Released { id: u64, at_ms: u64 },
    /// A query was answered on the device.
    Local { at_ms: u64 },
}
