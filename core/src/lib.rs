//! `tandem-core`: the sans-IO domain every Tandem part shares.
//!
//! Facts that more than one part relies on live here once: the names of the decoder's KV-cache
//! inputs and outputs, the model-bundle manifest, and the decoding rules (sampling, stop strings).
//! Nothing in this crate opens a socket, spawns a runtime or loads ONNX Runtime or candle.
#![forbid(unsafe_code)]

pub mod budget;
pub mod bundle;
pub mod generation;
pub mod help_marker;
pub mod kv_io;
pub mod protocol;
pub mod tasks;
