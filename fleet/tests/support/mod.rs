//! Helpers shared by the fleet's integration tests (each test file uses some of them).
#![allow(dead_code)]

pub mod bundle;
pub mod fleet;
pub mod mqtt;
pub mod pki;
pub mod postgres;
pub mod telemetry;
pub mod wait;
