//! The device's MQTT connection to the fleet broker, shared by offload and telemetry.
//!
//! [`MqttLink`] is the connection; the rest of this folder are its parts: the broker URL,
//! credentials and TLS, the 3.1.1/5 adapter over rumqttc, the reconnect backoff, the PUBACK
//! tracker that tells publishers when the broker acknowledged them, and the event-loop task.

mod ack_tracker;
mod backoff;
mod broker_address;
mod client;
mod config;
mod driver;
mod error;
mod link;
mod password;
mod tls;

pub use config::{MqttConfig, MqttProtocol};
pub use error::{MqttLinkError, PublishFailure};
pub use link::{InboundMessage, MqttLink, PublishOptions};
/// The broker password, also sent to the fleet's HTTP API by the updater.
pub(crate) use password::read_password;
