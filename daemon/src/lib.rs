//! `tandemd`: the Tandem edge daemon. This library holds the parts the binary and the end-to-end
//! tests share, starting with the ONNX Runtime inference engine.

pub mod api;
pub mod bundle_trust;
pub mod chat;
pub mod config;
pub mod engine;
pub mod mqtt;
pub mod offload;
pub mod ops;
mod record_frame;
pub mod router;
pub mod telemetry;
#[cfg(test)]
mod test_support;
pub mod updater;
