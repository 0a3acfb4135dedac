//! The fleet as a client of an external broker (Mosquitto, EMQX, …), over MQTT 5: a persistent
//! session (clean start off, long session expiry) so the broker keeps what arrives while the fleet
//! is down; shared subscriptions (`$share/GROUP/…`) so several fleet instances split the devices'
//! messages; and manual acknowledgements: a telemetry message is acknowledged to the broker only
//! after its events are committed, so the broker delivers it again if the fleet dies first. At most
//! `receive_maximum` messages are received and not yet acknowledged at a time, whether or not the
//! broker keeps to the receive maximum it is given (`session.rs`).

mod session;
mod tls;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Login, Publish};
use tandem_core::protocol::{DeviceTopics, TopicKind, parse_device_topic};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use self::session::{OutPublish, Outbox, Received, SessionEnd, SessionOptions, Window, run_session};
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

/// Fleet → device messages waiting for the connection, at most (a rollout assigns a version to
/// every device of a stage at once).
const OUTBOX_CAPACITY: usize = 65_536;

/// The fleet's connection to the external broker, before it runs.
pub struct ExternalBroker {
    options: SessionOptions,
    window_bytes: u64,
    outbox: Outbox,
    link: ExternalLink,
}

impl std::fmt::Debug for ExternalBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalBroker").field("filters", &self.options.filters).finish_non_exhaustive()
    }
}

/// Publishes to devices through the external broker.
#[derive(Clone)]
pub struct ExternalLink {
    queue: mpsc::Sender<OutPublish>,
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
        let publish = OutPublish { topic: topics.topic(kind), payload, retain, correlation_data };
        if let Err(error) = self.queue.try_send(publish) {
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
        let login = match (&config.username, &config.password) {
            (Some(user), password) => {
                let password = match password {
                    Some(source) => tandemd::offload::read_secret(source)?.expose().to_string(),
                    None => String::new(),
                };
                Some(Login { username: user.clone(), password })
            }
            (None, Some(_)) => return Err(ExternalError::PasswordWithoutUser),
            (None, None) => None,
        };
        let tls = if tls { Some(tls::client_config(config)?) } else { None };
        let prefix = if config.shared_group.is_empty() {
            String::new()
        } else {
            format!("$share/{}/", config.shared_group)
        };
        let filters =
            SUBSCRIBED.iter().map(|kind| format!("{prefix}{}", DeviceTopics::all_devices(*kind))).collect();
        let options = SessionOptions {
            host,
            port,
            tls,
            client_id: config.client_id.clone(),
            login,
            keep_alive: Duration::from_secs(u64::from(config.keep_alive_secs.max(5))),
            session_expiry_secs: config.session_expiry_secs,
            receive_maximum: config.receive_maximum.max(1),
            max_packet_bytes: config.max_packet_bytes,
            filters,
        };
        let (queue, queued) = mpsc::channel(OUTBOX_CAPACITY);
        Ok(Self {
            options,
            window_bytes: config.receive_window_bytes,
            outbox: Outbox::new(queued),
            link: ExternalLink { queue },
        })
    }

    /// The link the gateway and rollouts publish through.
    pub fn link(&self) -> ExternalLink {
        self.link.clone()
    }

    /// Runs the connection until `shutdown`: reconnects with backoff, subscribes on every
    /// connection, hands every message to `messages` and acknowledges it when they are done.
    /// `connected` says whether the broker connection is up and subscribed (for `/healthz`).
    pub async fn run(
        self,
        messages: Arc<DeviceMessages>,
        connected: Arc<AtomicBool>,
        shutdown: CancellationToken,
    ) {
        let Self { options, window_bytes, mut outbox, link } = self;
        // Publishes queued from here on still reach the outbox; this copy only keeps it open.
        drop(link);
        let window = Window::new(options.receive_maximum, window_bytes);
        let mut deliver = |received: Received| {
            tokio::spawn(handle(Arc::clone(&messages), received.publish, received.done));
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = std::time::Instant::now();
            let end = run_session(&options, &mut outbox, &window, &connected, &mut deliver, &shutdown).await;
            connected.store(false, Ordering::Relaxed);
            if matches!(end, SessionEnd::Shutdown) {
                break;
            }
            if started.elapsed() > Duration::from_secs(30) {
                backoff = Duration::from_millis(100);
            }
            match end {
                SessionEnd::Connect(_) | SessionEnd::Refused(_) => {
                    tracing::warn!(error = %end, retry_in = ?backoff, "cannot connect to the external broker");
                }
                _ => tracing::warn!(error = %end, retry_in = ?backoff, "external broker connection lost"),
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = shutdown.cancelled() => break,
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
}

async fn handle(messages: Arc<DeviceMessages>, publish: Publish, ack: Box<dyn FnOnce() + Send>) {
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
