//! The cloud budget: cloud calls ≤ ρ · local answers over a sliding window, plus optional absolute
//! caps, enforced with reserve-before-dispatch and reconcile-after so that concurrent requests can
//! never overrun it. Time is passed in by the caller (milliseconds since the Unix epoch).

mod change;
mod gate;
mod policy;

pub use change::BudgetChange;
pub use gate::{BudgetGate, BudgetSnapshot, BudgetState, Refusal, Reservation};
pub use policy::{BudgetPolicy, PolicyError};
