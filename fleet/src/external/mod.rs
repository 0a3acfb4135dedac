//! The fleet as a client of an external broker (Mosquitto, EMQX, …), over MQTT 5: a persistent
//! session (clean start off, long session expiry) so the broker keeps what arrives while the fleet
//! is down; shared subscriptions (`$share/GROUP/…`) so several fleet instances split the devices'
//! messages; and manual acknowledgements: a telemetry message is acknowledged to the broker only
//! after its events are committed, so the broker delivers it again if the fleet dies first.

mod tls;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish, PublishProperties, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tandem_core::protocol::{DeviceTopics, TopicKind, parse_device_topic};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::ExternalBrokerConfig;
use crate::device_link::DeviceLink;
use crate::device_messages::DeviceMessages;
use crate::ingest::Acknowledge;

/// Why the external broker connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ExternalError {
    #[error("mqtt.external.url `{0}`: expected mqtt://HOST:PORT or mqtts://HOST:PORT")]
    Url(String),
    #[error("mqtt.external TLS: {0}")]
    Tls(String),
    #[error("mqtt.external.password: {0}")]
    Password(#[from] tandemd::offload::SecretError),
    #[error("mqtt.external.password needs a username")]
    PasswordWithoutUser,
}

/// The device → fleet topics the fleet subscribes to.
const SUBSCRIBED: [TopicKind; 3] = [TopicKind::Telemetry, TopicKind::OffloadRequest, TopicKind::Status];

/// The fleet's connection to the external broker, before it runs.
pub struct ExternalBroker {
    client: AsyncClient,
    events: EventLoop,
    filters: Vec<String>,
    /// Messages received and not yet acknowledged, at most (the receive maximum).
    in_flight: usize,
}

impl std::fmt::Debug for ExternalBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalBroker").field("filters", &self.filters).finish_non_exhaustive()
    }
}

/// Publishes to devices through the external broker.
#[derive(Clone)]
pub struct ExternalLink {
    client: AsyncClient,
}

impl DeviceLink for ExternalLink {
    fn publish(
        &self,
        device: &str,
        kind: TopicKind,
        payload: Bytes,
        retain: bool,
        correlation_data: Option<Bytes>,
    ) {
        let Some(topics) = DeviceTopics::new(device) else { return };
        let properties = PublishProperties { correlation_data, ..Default::default() };
        if let Err(error) = self.client.try_publish_with_properties(
            topics.topic(kind),
            QoS::AtLeastOnce,
            retain,
            payload,
            properties,
        ) {
            tracing::warn!(device, %error, "cannot queue a message to a device");
        }
    }
}

/// `(host, port, tls)` of an `mqtt://` or `mqtts://` URL.
fn parse_url(url: &str) -> Option<(String, u16, bool)> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else {
        (false, url.strip_prefix("mqtt://")?)
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) => (host, port.parse().ok()?),
        None => (rest, if tls { 8883 } else { 1883 }),
    };
    (!host.is_empty()).then(|| (host.trim_matches(['[', ']']).to_string(), port, tls))
}

impl ExternalBroker {
    /// Prepares the connection (reads the password and TLS files; connects nothing yet).
    pub fn new(config: &ExternalBrokerConfig) -> Result<Self, ExternalError> {
        let (host, port, tls) =
            parse_url(&config.url).ok_or_else(|| ExternalError::Url(config.url.clone()))?;
        let mut options = MqttOptions::new(config.client_id.clone(), host, port);
        options
            .set_keep_alive(Duration::from_secs(u64::from(config.keep_alive_secs.max(5))))
            .set_clean_start(false)
            .set_session_expiry_interval(Some(config.session_expiry_secs))
            .set_receive_maximum(Some(config.receive_maximum))
            .set_max_packet_size(Some(config.max_packet_bytes))
            .set_manual_acks(true)
            // Room for an acknowledgement of every message the broker may have in flight to us.
            .set_request_channel_capacity(usize::from(config.receive_maximum) * 2 + 1024);
        match (&config.username, &config.password) {
            (Some(user), password) => {
                let password = match password {
                    Some(source) => tandemd::offload::read_secret(source)?.expose().to_string(),
                    None => String::new(),
                };
                options.set_credentials(user.clone(), password);
            }
            (None, Some(_)) => {
                return Err(ExternalError::Url("mqtt.external.password needs a username".into()));
            }
            (None, None) => {}
        }
        if tls {
            options.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
                tls::client_config(config)?,
            )));
        }
        let (client, events) = AsyncClient::new(options, usize::from(config.receive_maximum) * 2 + 1024);
        let prefix = if config.shared_group.is_empty() {
            String::new()
        } else {
            format!("$share/{}/", config.shared_group)
        };
        let filters =
            SUBSCRIBED.iter().map(|kind| format!("{prefix}{}", DeviceTopics::all_devices(*kind))).collect();
        Ok(Self { client, events, filters, in_flight: usize::from(config.receive_maximum.max(1)) })
    }

    /// The link the gateway publishes answers through.
    pub fn link(&self) -> ExternalLink {
        ExternalLink { client: self.client.clone() }
    }

    /// Runs the connection until `shutdown`: reconnects with backoff, subscribes on every
    /// CONNACK, hands every message to `messages` and acknowledges it when they are done.
    /// `connected` says whether the broker connection is up and subscribed (for `/healthz`).
    ///
    /// At most the receive maximum of messages are handled at once: with that many waiting for
    /// their commit, the connection is not read until one is acknowledged, so TCP holds the rest
    /// back in the broker. The broker is asked for the same limit (MQTT 5 receive maximum), but
    /// not every broker keeps to it (Mosquitto 2.0 sent a flat-out backlog all at once, and the
    /// fleet held it in memory: 1.4 GB after 5 s of 1,000 devices).
    pub async fn run(
        self,
        messages: Arc<DeviceMessages>,
        connected: Arc<AtomicBool>,
        shutdown: CancellationToken,
    ) {
        let Self { client, mut events, filters, in_flight } = self;
        let in_flight = Arc::new(Semaphore::new(in_flight));
        // Acknowledgements are only valid on the connection that received the message.
        let epoch = Arc::new(AtomicU64::new(0));
        let mut backoff = Duration::from_millis(100);
        loop {
            let event = tokio::select! {
                event = events.poll() => event,
                () = shutdown.cancelled() => break,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff = Duration::from_millis(100);
                    epoch.fetch_add(1, Ordering::SeqCst);
                    tracing::info!(session_present = ack.session_present, "connected to the external broker");
                    let filters = filters.iter().map(|f| Filter::new(f.clone(), QoS::AtLeastOnce));
                    if let Err(error) = client.try_subscribe_many(filters) {
                        tracing::error!(%error, "cannot subscribe");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let refused: Vec<_> = ack
                        .return_codes
                        .iter()
                        .filter(|code| !matches!(code, SubscribeReasonCode::Success(_)))
                        .collect();
                    if refused.is_empty() {
                        tracing::info!(filters = ?filters, "subscribed");
                        connected.store(true, Ordering::Relaxed);
                    } else {
                        tracing::error!(?refused, filters = ?filters, "the broker refused subscriptions; check its ACL");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    // Handled beside the event loop, which must keep answering the broker (pings,
                    // acknowledgements) while ingest is busy. The broker's receive maximum bounds
                    // how many messages can be outstanding here.
                    let permit = tokio::select! {
                        permit = Arc::clone(&in_flight).acquire_owned() => permit.expect("never closed"),
                        () = shutdown.cancelled() => break,
                    };
                    let ack = acknowledger(&client, &epoch, &publish, permit);
                    tokio::spawn(handle(messages.clone(), publish, ack));
                }
                Ok(_) => {}
                Err(error) => {
                    connected.store(false, Ordering::Relaxed);
                    tracing::warn!(%error, retry_in = ?backoff, "external broker connection lost");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
        let _ = client.try_disconnect();
    }
}

/// Acknowledges `publish` on the connection it came on, if that is still the current one, and
/// gives its place among the messages in flight back (also when it is dropped unacknowledged).
fn acknowledger(
    client: &AsyncClient,
    epoch: &Arc<AtomicU64>,
    publish: &Publish,
    in_flight: OwnedSemaphorePermit,
) -> impl FnOnce() + Send + 'static {
    let (client, epoch, received_on) = (client.clone(), epoch.clone(), epoch.load(Ordering::SeqCst));
    let mut stub = Publish::new("", publish.qos, Bytes::new(), None);
    stub.pkid = publish.pkid;
    move || {
        drop(in_flight);
        if publish_needs_no_ack(&stub) || epoch.load(Ordering::SeqCst) != received_on {
            // On a newer connection the broker sends the message again (it is dropped as a duplicate).
            return;
        }
        if client.try_ack(&stub).is_err() {
            tokio::spawn(async move {
                let _ = client.ack(&stub).await;
            });
        }
    }
}

fn publish_needs_no_ack(publish: &Publish) -> bool {
    publish.qos == QoS::AtMostOnce
}

async fn handle(messages: Arc<DeviceMessages>, publish: Publish, ack: impl FnOnce() + Send + 'static) {
    let topic = String::from_utf8_lossy(&publish.topic).into_owned();
    let Some((device, kind)) = parse_device_topic(&topic) else {
        tracing::warn!(%topic, "ignoring a message on an unknown topic");
        ack();
        return;
    };
    match kind {
        TopicKind::Telemetry => {
            let ack: Acknowledge = Box::new(move |_outcome| ack());
            messages.telemetry(&device, &publish.payload, Some(ack)).await;
        }
        TopicKind::OffloadRequest => {
            messages.offload_request(&device, publish.payload);
            ack();
        }
        TopicKind::Status => {
            let ack: Acknowledge = Box::new(move |_outcome| ack());
            messages.status(&device, &publish.payload, Some(ack)).await;
        }
        TopicKind::OffloadResponse | TopicKind::Assignment => ack(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_name_host_port_and_tls() {
        assert_eq!(parse_url("mqtt://broker:1884"), Some(("broker".into(), 1884, false)));
        assert_eq!(parse_url("mqtts://broker"), Some(("broker".into(), 8883, true)));
        assert_eq!(parse_url("mqtt://[::1]:1883/"), Some(("::1".into(), 1883, false)));
        assert_eq!(parse_url("http://broker"), None);
        assert_eq!(parse_url("mqtt://:1883"), None);
    }
}
