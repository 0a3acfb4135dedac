//! Helpers shared by the fleet's integration tests.

pub mod postgres;
