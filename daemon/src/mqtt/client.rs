//! rumqttc's MQTT 3.1.1 API (the crate root) and its MQTT 5 API (`rumqttc::v5`) behind one
//! surface: options built from [`MqttConfig`], the requests the link makes, and the events it
//! reacts to, so that the rest of the link never asks which protocol it speaks.

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5 as mqtt5;
use rumqttc::{Outgoing, TlsConfiguration, Transport};

use super::broker_address::BrokerAddress;
use super::password::read_password;
use super::{MqttConfig, MqttLinkError, MqttProtocol, tls};

/// Requests that may wait in rumqttc's channel before its event loop takes them.
const REQUEST_CHANNEL_CAPACITY: usize = 256;
/// Publishes sent and not yet acknowledged, at most (MQTT 5 brokers may lower it).
const MAX_IN_FLIGHT: u16 = 100;
/// Room for the fixed header, packet id and properties next to topic and payload.
const PACKET_OVERHEAD_BYTES: usize = 512;

/// One QoS 1 publish the link asks rumqttc to send.
#[derive(Debug, Clone)]
pub(crate) struct OutgoingPublish {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    /// MQTT 5 only: where the answer is expected.
    pub response_topic: Option<String>,
    /// MQTT 5 only: echoed by the responder.
    pub correlation_data: Option<Vec<u8>>,
    /// MQTT 5 only: the broker drops the message when it could not be delivered in time.
    pub message_expiry: Option<Duration>,
}

/// rumqttc's request channel did not take the request (full, or the event loop is gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NotQueued;

/// A publish received from the broker.
#[derive(Debug, Clone)]
pub(crate) struct ReceivedPublish {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    pub correlation_data: Option<Vec<u8>>,
}

/// What the link reacts to, from either protocol's event loop.
#[derive(Debug)]
pub(crate) enum LinkEvent {
    /// The broker accepted the connection.
    Connected { session_present: bool },
    /// A QoS 1 publish went out with this packet id.
    PublishSent(u16),
    /// A publish is held back until this packet id is acknowledged.
    PublishHeldBack(u16),
    /// The broker acknowledged a publish; `refused` is the failure reason code (MQTT 5).
    PubAck { pkid: u16, refused: Option<String> },
    /// The broker answered a subscription; `refused` lists the filters' failure codes.
    SubAck { refused: Vec<String> },
    /// A message arrived.
    Message(ReceivedPublish),
    /// The DISCONNECT packet was sent (on shutdown).
    DisconnectSent,
    /// Anything else (pings, acks sent by rumqttc itself, ...).
    Other,
}

/// The handle that queues requests for the event loop.
#[derive(Clone)]
pub(crate) enum Client {
    V311(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// The event loop: connects, reconnects when polled again after an error, and yields events.
pub(crate) enum EventLoop {
    V311(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// Everything needed to start a connection, checked, without touching the network.
pub(crate) struct ConnectionPlan {
    pub address: BrokerAddress,
    pub protocol: MqttProtocol,
    client_id: String,
    keep_alive: Duration,
    credentials: Option<(String, String)>,
    tls: Option<TlsConfiguration>,
    session_expiry_secs: u32,
    max_packet_bytes: u32,
}

impl ConnectionPlan {
    /// Validates `config` for `device_id` and reads the password and TLS material it names.
    pub fn new(config: &MqttConfig, device_id: &str) -> Result<Self, MqttLinkError> {
        let address = BrokerAddress::parse(&config.url)?;
        let client_id = config.client_id.clone().unwrap_or_else(|| device_id.to_string());
        if client_id.is_empty() || client_id.len() > 65_535 {
            return Err(MqttLinkError::Config("client_id must be 1 to 65535 bytes long".into()));
        }
        let keep_alive = u16::try_from(config.keep_alive_secs).ok().filter(|k| *k > 0).ok_or_else(|| {
            MqttLinkError::Config(format!(
                "keep_alive_secs = {} must be between 1 and 65535",
                config.keep_alive_secs
            ))
        })?;
        if config.max_packet_bytes < 1024 {
            return Err(MqttLinkError::Config("max_packet_bytes must be at least 1024".into()));
        }
        if config.reconnect_min_ms == 0 || config.reconnect_max_ms < config.reconnect_min_ms {
            return Err(MqttLinkError::Config(
                "reconnect_min_ms must be positive and at most reconnect_max_ms".into(),
            ));
        }
        if config.ack_timeout_ms == 0 {
            return Err(MqttLinkError::Config("ack_timeout_ms must be positive".into()));
        }
        let credentials_dir = std::env::var_os("CREDENTIALS_DIRECTORY").map(std::path::PathBuf::from);
        let password = config
            .password_file
            .as_deref()
            .map(|spec| read_password(spec, credentials_dir.as_deref()))
            .transpose()?;
        let credentials = match (&config.username, password) {
            (Some(user), password) => Some((user.clone(), password.unwrap_or_default())),
            (None, Some(password)) => Some((device_id.to_string(), password)),
            (None, None) => None,
        };
        let tls = if address.tls {
            Some(TlsConfiguration::Rustls(tls::client_config(config)?))
        } else {
            if config.ca_file.is_some() || config.client_cert_file.is_some() {
                return Err(MqttLinkError::Config(format!(
                    "TLS files are configured but {:?} is not an mqtts:// url",
                    config.url
                )));
            }
            None
        };
        Ok(Self {
            address,
            protocol: config.protocol,
            client_id,
            keep_alive: Duration::from_secs(u64::from(keep_alive)),
            credentials,
            tls,
            session_expiry_secs: config.session_expiry_secs,
            max_packet_bytes: config.max_packet_bytes,
        })
    }

    /// The client and its event loop, with a persistent session and `will` as the last will (a
    /// retained QoS 1 message). Nothing connects until the event loop is polled.
    pub fn build(&self, will_topic: &str, will_payload: Vec<u8>) -> (Client, EventLoop) {
        let host = self.address.host.clone();
        let port = self.address.port;
        let transport = match &self.tls {
            Some(tls) => Transport::tls_with_config(tls.clone()),
            None => Transport::tcp(),
        };
        let max_packet = self.max_packet_bytes as usize;
        match self.protocol {
            MqttProtocol::V311 => {
                let mut options = rumqttc::MqttOptions::new(&self.client_id, host, port);
                options
                    .set_transport(transport)
                    .set_keep_alive(self.keep_alive)
                    .set_clean_session(false)
                    .set_max_packet_size(max_packet, max_packet)
                    .set_inflight(MAX_IN_FLIGHT)
                    .set_last_will(rumqttc::LastWill::new(
                        will_topic,
                        will_payload,
                        rumqttc::QoS::AtLeastOnce,
                        true,
                    ));
                if let Some((user, password)) = &self.credentials {
                    options.set_credentials(user, password);
                }
                let (client, events) = rumqttc::AsyncClient::new(options, REQUEST_CHANNEL_CAPACITY);
                (Client::V311(client), EventLoop::V311(Box::new(events)))
            }
            MqttProtocol::V5 => {
                let mut options = rumqttc::v5::MqttOptions::new(&self.client_id, host, port);
                options
                    .set_transport(transport)
                    .set_keep_alive(self.keep_alive)
                    .set_clean_start(false)
                    .set_session_expiry_interval(Some(self.session_expiry_secs))
                    .set_max_packet_size(Some(self.max_packet_bytes))
                    .set_outgoing_inflight_upper_limit(MAX_IN_FLIGHT)
                    .set_last_will(mqtt5::LastWill::new(
                        will_topic,
                        will_payload,
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                        true,
                        None,
                    ));
                if let Some((user, password)) = &self.credentials {
                    options.set_credentials(user, password);
                }
                let (client, events) = rumqttc::v5::AsyncClient::new(options, REQUEST_CHANNEL_CAPACITY);
                (Client::V5(client), EventLoop::V5(Box::new(events)))
            }
        }
    }

    /// Whether `publish` fits in one packet of the configured size.
    pub fn check_size(&self, publish: &OutgoingPublish) -> Result<(), MqttLinkError> {
        let size = publish.payload.len()
            + publish.topic.len()
            + publish.response_topic.as_ref().map_or(0, String::len)
            + publish.correlation_data.as_ref().map_or(0, Vec::len)
            + PACKET_OVERHEAD_BYTES;
        if size > self.max_packet_bytes as usize {
            return Err(MqttLinkError::PayloadTooLarge {
                size: publish.payload.len(),
                max: self.max_packet_bytes,
            });
        }
        Ok(())
    }
}

impl Client {
    /// Queues a QoS 1 publish without waiting; fails when the channel is full or closed.
    pub fn try_publish(&self, publish: OutgoingPublish) -> Result<(), NotQueued> {
        match self {
            Client::V311(client) => client
                .try_publish(publish.topic, rumqttc::QoS::AtLeastOnce, publish.retain, publish.payload)
                .map_err(|_| NotQueued),
            Client::V5(client) => {
                let qos = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
                let properties = mqtt5::PublishProperties {
                    response_topic: publish.response_topic,
                    correlation_data: publish.correlation_data.map(Into::into),
                    message_expiry_interval: publish.message_expiry.map(whole_seconds_up),
                    ..Default::default()
                };
                client
                    .try_publish_with_properties(
                        publish.topic,
                        qos,
                        publish.retain,
                        publish.payload,
                        properties,
                    )
                    .map_err(|_| NotQueued)
            }
        }
    }

    /// Queues a QoS 1 subscription to each filter.
    pub fn try_subscribe(&self, filters: &[String]) -> Result<(), NotQueued> {
        match self {
            Client::V311(client) => client
                .try_subscribe_many(
                    filters
                        .iter()
                        .map(|f| rumqttc::SubscribeFilter::new(f.clone(), rumqttc::QoS::AtLeastOnce)),
                )
                .map_err(|_| NotQueued),
            Client::V5(client) => client
                .try_subscribe_many(
                    filters
                        .iter()
                        .map(|f| mqtt5::Filter::new(f.clone(), rumqttc::v5::mqttbytes::QoS::AtLeastOnce)),
                )
                .map_err(|_| NotQueued),
        }
    }

    /// Queues a DISCONNECT (the broker then does not send the last will).
    pub fn try_disconnect(&self) -> Result<(), NotQueued> {
        match self {
            Client::V311(client) => client.try_disconnect().map_err(|_| NotQueued),
            Client::V5(client) => client.try_disconnect().map_err(|_| NotQueued),
        }
    }
}

impl EventLoop {
    /// The next event; connects first when not connected. An error means the connection is gone
    /// (or could not be made); polling again reconnects.
    pub async fn poll(&mut self) -> Result<LinkEvent, String> {
        match self {
            EventLoop::V311(events) => events.poll().await.map(v311_event).map_err(|e| e.to_string()),
            EventLoop::V5(events) => events.poll().await.map(v5_event).map_err(|e| e.to_string()),
        }
    }

    /// After a connection error: drops every request not yet acknowledged, so that nothing is
    /// retransmitted behind the PUBACK tracker's back, and clears a held-back publish. Received
    /// messages not yet yielded are kept.
    pub fn drop_unsent(&mut self) {
        match self {
            EventLoop::V311(events) => {
                events.clean();
                events.pending.clear();
                events.state.collision = None;
                events
                    .state
                    .events
                    .retain(|e| matches!(e, rumqttc::Event::Incoming(rumqttc::Packet::Publish(_))));
            }
            EventLoop::V5(events) => {
                events.clean();
                events.pending.clear();
                events.state.collision = None;
                events
                    .state
                    .events
                    .retain(|e| matches!(e, rumqttc::v5::Event::Incoming(mqtt5::Packet::Publish(_))));
            }
        }
    }
}

/// `duration` in whole seconds, rounded up, at least one (zero would mean "never expires").
fn whole_seconds_up(duration: Duration) -> u32 {
    let seconds = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    u32::try_from(seconds.max(1)).unwrap_or(u32::MAX)
}

fn v311_event(event: rumqttc::Event) -> LinkEvent {
    use rumqttc::{Event, Packet, SubscribeReasonCode};
    match event {
        Event::Incoming(Packet::ConnAck(ack)) => {
            LinkEvent::Connected { session_present: ack.session_present }
        }
        Event::Incoming(Packet::PubAck(ack)) => LinkEvent::PubAck { pkid: ack.pkid, refused: None },
        Event::Incoming(Packet::SubAck(ack)) => LinkEvent::SubAck {
            refused: ack
                .return_codes
                .iter()
                .filter(|code| matches!(code, SubscribeReasonCode::Failure))
                .map(|code| format!("{code:?}"))
                .collect(),
        },
        Event::Incoming(Packet::Publish(publish)) => LinkEvent::Message(ReceivedPublish {
            topic: publish.topic,
            payload: publish.payload.to_vec(),
            retain: publish.retain,
            correlation_data: None,
        }),
        Event::Outgoing(outgoing) => outgoing_event(outgoing),
        Event::Incoming(_) => LinkEvent::Other,
    }
}

fn v5_event(event: rumqttc::v5::Event) -> LinkEvent {
    use mqtt5::{Packet, PubAckReason, SubscribeReasonCode};
    use rumqttc::v5::Event;
    match event {
        Event::Incoming(Packet::ConnAck(ack)) => {
            LinkEvent::Connected { session_present: ack.session_present }
        }
        Event::Incoming(Packet::PubAck(ack)) => {
            let refused = match ack.reason {
                PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                reason => {
                    let detail = ack.properties.and_then(|p| p.reason_string);
                    Some(match detail {
                        Some(detail) => format!("{reason:?} ({detail})"),
                        None => format!("{reason:?}"),
                    })
                }
            };
            LinkEvent::PubAck { pkid: ack.pkid, refused }
        }
        Event::Incoming(Packet::SubAck(ack)) => LinkEvent::SubAck {
            refused: ack
                .return_codes
                .iter()
                .filter(|code| !matches!(code, SubscribeReasonCode::Success(_)))
                .map(|code| format!("{code:?}"))
                .collect(),
        },
        Event::Incoming(Packet::Publish(publish)) => LinkEvent::Message(ReceivedPublish {
            topic: String::from_utf8_lossy(&publish.topic).into_owned(),
            payload: publish.payload.to_vec(),
            retain: publish.retain,
            correlation_data: publish.properties.and_then(|p| p.correlation_data).map(|c| c.to_vec()),
        }),
        Event::Outgoing(outgoing) => outgoing_event(outgoing),
        Event::Incoming(_) => LinkEvent::Other,
    }
}

fn outgoing_event(outgoing: Outgoing) -> LinkEvent {
    match outgoing {
        Outgoing::Publish(pkid) if pkid != 0 => LinkEvent::PublishSent(pkid),
        Outgoing::AwaitAck(pkid) => LinkEvent::PublishHeldBack(pkid),
        Outgoing::Disconnect => LinkEvent::DisconnectSent,
        _ => LinkEvent::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(config: MqttConfig) -> Result<ConnectionPlan, MqttLinkError> {
        ConnectionPlan::new(&config, "robot-1")
    }

    #[test]
    fn the_device_id_is_the_default_client_id_and_user_name() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "secret\n").unwrap();
        let config = MqttConfig {
            password_file: Some(pw.to_str().unwrap().into()),
            ..MqttConfig::new("mqtt://127.0.0.1:1883")
        };
        let plan = plan(config).unwrap();
        assert_eq!(plan.client_id, "robot-1");
        assert_eq!(plan.credentials, Some(("robot-1".into(), "secret".into())));
    }

    #[test]
    fn configurations_that_cannot_work_are_refused_before_connecting() {
        let cases = [
            (MqttConfig { keep_alive_secs: 70_000, ..MqttConfig::new("mqtt://b") }, "keep_alive_secs"),
            (MqttConfig { keep_alive_secs: 0, ..MqttConfig::new("mqtt://b") }, "keep_alive_secs"),
            (MqttConfig { client_id: Some(String::new()), ..MqttConfig::new("mqtt://b") }, "client_id"),
            (MqttConfig { ca_file: Some("/ca.pem".into()), ..MqttConfig::new("mqtt://b") }, "not an mqtts"),
            (MqttConfig { reconnect_min_ms: 0, ..MqttConfig::new("mqtt://b") }, "reconnect_min_ms"),
            (MqttConfig { max_packet_bytes: 10, ..MqttConfig::new("mqtt://b") }, "max_packet_bytes"),
            (MqttConfig::new("http://b"), "mqtt://"),
        ];
        for (config, why) in cases {
            let err = plan(config).err().expect("refused").to_string();
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn message_expiry_is_rounded_up_to_whole_seconds() {
        assert_eq!(whole_seconds_up(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds_up(Duration::from_millis(1500)), 2);
        assert_eq!(whole_seconds_up(Duration::from_secs(30)), 30);
        assert_eq!(whole_seconds_up(Duration::ZERO), 1);
    }

    #[test]
    fn oversized_publishes_are_refused_before_sending() {
        let plan = plan(MqttConfig { max_packet_bytes: 2048, ..MqttConfig::new("mqtt://b") }).unwrap();
        let publish = |n| OutgoingPublish {
            topic: "t".into(),
            payload: vec![0; n],
            retain: false,
            response_topic: None,
            correlation_data: None,
            message_expiry: None,
        };
        assert!(plan.check_size(&publish(1000)).is_ok());
        let err = plan.check_size(&publish(4000)).unwrap_err();
        assert!(matches!(err, MqttLinkError::PayloadTooLarge { size: 4000, max: 2048 }), "{err}");
    }
}
