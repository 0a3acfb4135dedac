//! Helpers shared by the end-to-end tests that need more than the tandem binaries.

pub mod mosquitto;
