//! `tandem-fleet`: the fleet side of Tandem. Devices (`tandemd`) publish telemetry and offload
//! requests over MQTT; the fleet stores the telemetry (SQLite or PostgreSQL), answers offload
//! requests through its gateway under per-device and fleet-wide budgets, and shows it all in an
//! operator API and a dashboard. It keeps a registry of signed model bundles and rolls them out to
//! devices in stages.
//!
//! Parts, each in its folder: `config` (plain data), `store` (the database), `ingest` (validate,
//! batch, write, then acknowledge), `broker` (the embedded MQTT broker), `external` (the client of
//! an external broker), `gateway` (offload), `registry` (signed bundles), `rollout` (staged
//! rollouts), `scheduler` (retraining jobs), `api` (HTTP(S) + dashboard), `tls` (server TLS for the broker and the API), `loadgen` (simulated devices), `serve` (wiring it all
//! together).

pub mod api;
pub mod broker;
pub mod config;
pub mod device_link;
pub mod device_messages;
pub mod devices_file;
pub mod external;
pub mod gateway;
pub mod ingest;
pub mod loadgen;
pub mod metrics;
pub mod registry;
pub mod rollout;
pub mod scheduler;
pub mod serve;
pub mod store;
pub mod tls;
