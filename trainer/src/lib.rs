//! `tandem-train`: the model in candle, ONNX export and bundle packaging (GAPG lands here too).

pub mod export;
pub mod model;
pub mod tokenizer_training;
