//! Post-training: rollouts, the GAPG estimator on device tokens, LoRA, the evaluation protocol, the
//! cloud client, run configurations, checkpoint/resume and the run's guards. One test binary (one
//! link) with a module per subject.

mod support;

mod cloud_client;
mod configs;
mod estimator;
mod eval_protocol;
mod guards;
mod lora;
mod prefix_sharing;
mod resume;
mod rollouts;
