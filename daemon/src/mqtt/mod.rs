//! The device's MQTT connection to the fleet broker, shared by offload and telemetry.

mod config;

pub use config::{MqttConfig, MqttProtocol};
