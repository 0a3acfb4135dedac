//! Cross-part tests: models created by `tandem-train`, exported to ONNX by its exporter, and run by
//! `tandemd`'s engine (ONNX Runtime itself) and binary. One test binary for all of them.

mod bad_input;
mod cli;
mod daemon_api;
mod daemon_process;
mod daemon_telemetry;
mod demo_models;
mod fixtures;
mod fleet_dashboard;
mod fleet_faults;
mod fleet_https;
mod fleet_ingest;
mod fleet_offload;
mod fleet_rollouts;
mod fleet_support;
mod foreign_formats;
mod mqtt;
mod parity;
mod signing;
mod support;
