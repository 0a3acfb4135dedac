//! Training runs people can trust: a validated TOML configuration, checkpoints that resume
//! bit-identically, per-step metrics, a progress bar, plots at the end, and early stops that say why.
//!
//! - [`config`]: the run configuration;
//! - [`trainer`]: the loop (rollouts, cloud, rewards, filtering, update; or supervised steps);
//! - [`checkpoint`]: saving and restoring weights, optimiser moments and the step;
//! - [`data`]: which problems a step sees and the per-step random streams;
//! - [`metrics`], [`progress`], [`plots`]: what a run reports;
//! - [`bench`]: timing one GAPG step.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod metrics;
pub mod plots;
pub mod progress;
pub mod trainer;

pub use config::RunConfig;
pub use progress::ProgressMode;
pub use trainer::{RunError, RunSummary, Trainer};
