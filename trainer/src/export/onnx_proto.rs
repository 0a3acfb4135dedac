//! The ONNX protobuf messages (`ModelProto`, `GraphProto`, ...), generated at build time by
//! `build.rs` from the vendored `proto/onnx.proto3`.
#![allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]

include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
