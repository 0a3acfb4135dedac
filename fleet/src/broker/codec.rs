//! MQTT 3.1.1 and 5 packets as the broker sees them, over rumqttc's packet codecs: one set of
//! protocol-neutral packets in ([`Inbound`]) and out ([`Outbound`]), so the connection logic never
//! asks which protocol a client speaks. Pure: bytes in, packets out.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes as v4b;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes as v5b;
use rumqttc::v5::mqttbytes::v5;

/// The protocol a client speaks, from its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    V311,
    V5,
}

/// A client's last will.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
}

/// A CONNECT packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub protocol: Protocol,
    pub client_id: String,
    pub clean_start: bool,
    pub keep_alive_secs: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub will: Option<Will>,
    /// MQTT 5: the largest packet the client accepts.
    pub max_packet_size: Option<u32>,
}

/// A PUBLISH from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InPublish {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub pkid: u16,
    pub retain: bool,
    /// MQTT 5 response topic.
    pub response_topic: Option<String>,
    /// MQTT 5 correlation data.
    pub correlation_data: Option<Bytes>,
}

/// A packet from a connected client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    Publish(InPublish),
    PubAck {
        pkid: u16,
    },
    Subscribe {
        pkid: u16,
        filters: Vec<(String, u8)>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    /// `with_will`: MQTT 5 reason 0x04, "disconnect with will message".
    Disconnect {
        with_will: bool,
    },
    /// A packet or feature this broker does not serve.
    Unsupported(Unsupported),
}

/// What a client used that this broker does not serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsupported {
    /// The QoS 2 flow (PUBREC, PUBREL, PUBCOMP).
    Qos2,
    /// MQTT 5 topic aliases (the CONNACK allows none).
    TopicAlias,
    /// A second CONNECT on one connection.
    SecondConnect,
    /// MQTT 5 enhanced authentication (AUTH).
    Auth,
    /// A packet only a server sends.
    ServerPacket,
}

/// CONNACK result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectCode {
    Accepted,
    BadCredentials,
    NotAuthorized,
    BadClientId,
    Unavailable,
}

/// PUBACK result (MQTT 5 reason code; 3.1.1 has none and always acknowledges).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckReason {
    Success,
    NotAuthorized,
    PayloadFormatInvalid,
    QuotaExceeded,
}

/// Why the broker closes a connection (sent as DISCONNECT over MQTT 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    SessionTakenOver,
    KeepAliveTimeout,
    ProtocolError,
    PacketTooLarge,
    QosNotSupported,
    TopicAliasInvalid,
    ServerShuttingDown,
}

/// What the broker tells about itself in an MQTT 5 CONNACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    pub receive_maximum: u16,
    pub max_packet_size: u32,
}

/// A packet to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    ConnAck {
        code: ConnectCode,
        limits: ServerLimits,
    },
    PubAck {
        pkid: u16,
        reason: AckReason,
    },
    /// `granted[i]`: the QoS granted to filter i, or `None` when refused.
    SubAck {
        pkid: u16,
        granted: Vec<Option<u8>>,
        refused_as_not_authorized: bool,
    },
    UnsubAck {
        pkid: u16,
        count: usize,
    },
    PingResp,
    Publish {
        topic: String,
        payload: Bytes,
        pkid: u16,
        retain: bool,
        correlation_data: Option<Bytes>,
    },
    Disconnect(DisconnectReason),
}

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("packet larger than the {0}-byte limit")]
    TooLarge(u32),
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("unsupported protocol (only MQTT 3.1.1 and 5 are served)")]
    UnsupportedProtocol,
    #[error("the first packet is not CONNECT")]
    NotConnect,
}

/// The protocol level of a complete CONNECT at the start of `buf`, `Ok(None)` when more bytes are
/// needed.
fn connect_level(buf: &[u8], max: u32) -> Result<Option<u8>, CodecError> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] != 0x10 {
        return Err(CodecError::NotConnect);
    }
    let (mut remaining, mut shift, mut i) = (0usize, 0, 1);
    loop {
        let Some(byte) = buf.get(i) else { return Ok(None) };
        remaining |= usize::from(byte & 0x7f) << shift;
        i += 1;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return Err(CodecError::Malformed("remaining length".into()));
        }
    }
    if remaining > max as usize {
        return Err(CodecError::TooLarge(max));
    }
    if buf.len() < i + remaining {
        return Ok(None);
    }
    let header = &buf[i..];
    if header.len() < 7 || &header[..6] != b"\x00\x04MQTT" {
        return Err(CodecError::UnsupportedProtocol);
    }
    Ok(Some(header[6]))
}

/// Reads the CONNECT at the start of `buf` (consuming it), `Ok(None)` when more bytes are needed.
pub fn read_connect(buf: &mut BytesMut, max: u32) -> Result<Option<Connect>, CodecError> {
    let Some(level) = connect_level(buf, max)? else { return Ok(None) };
    match level {
        4 => match v4::Packet::read(buf, max as usize) {
            Ok(v4::Packet::Connect(c)) => Ok(Some(Connect {
                protocol: Protocol::V311,
                client_id: c.client_id,
                clean_start: c.clean_session,
                keep_alive_secs: c.keep_alive,
                username: c.login.as_ref().map(|l| l.username.clone()).filter(|u| !u.is_empty()),
                password: c.login.map(|l| l.password).filter(|p| !p.is_empty()),
                will: c.last_will.map(|w| Will {
                    topic: w.topic,
                    payload: w.message,
                    qos: w.qos as u8,
                    retain: w.retain,
                }),
                max_packet_size: None,
            })),
            Ok(_) => Err(CodecError::NotConnect),
            Err(e) => Err(CodecError::Malformed(e.to_string())),
        },
        5 => match v5::Packet::read(buf, Some(max)) {
            Ok(v5::Packet::Connect(c, will, login)) => {
                let will = match will {
                    Some(w) => Some(Will {
                        topic: String::from_utf8(w.topic.to_vec())
                            .map_err(|_| CodecError::Malformed("will topic is not UTF-8".into()))?,
                        payload: w.message,
                        qos: w.qos as u8,
                        retain: w.retain,
                    }),
                    None => None,
                };
                Ok(Some(Connect {
                    protocol: Protocol::V5,
                    client_id: c.client_id,
                    clean_start: c.clean_start,
                    keep_alive_secs: c.keep_alive,
                    username: login.as_ref().map(|l| l.username.clone()).filter(|u| !u.is_empty()),
                    password: login.map(|l| l.password).filter(|p| !p.is_empty()),
                    will,
                    max_packet_size: c.properties.and_then(|p| p.max_packet_size),
                }))
            }
            Ok(_) => Err(CodecError::NotConnect),
            Err(e) => Err(CodecError::Malformed(e.to_string())),
        },
        _ => Err(CodecError::UnsupportedProtocol),
    }
}

/// Reads the next packet from `buf` (consuming it), `Ok(None)` when more bytes are needed.
pub fn read(protocol: Protocol, buf: &mut BytesMut, max: u32) -> Result<Option<Inbound>, CodecError> {
    match protocol {
        Protocol::V311 => match v4::Packet::read(buf, max as usize) {
            Ok(packet) => Ok(Some(from_v4(packet))),
            Err(v4b::Error::InsufficientBytes(_)) => Ok(None),
            Err(v4b::Error::PayloadSizeLimitExceeded(_)) => Err(CodecError::TooLarge(max)),
            Err(e) => Err(CodecError::Malformed(e.to_string())),
        },
        Protocol::V5 => {
            // rumqttc refuses the two-byte DISCONNECT (no reason code) MQTT 5 allows.
            if buf.len() >= 2 && buf[0] == 0xE0 && buf[1] == 0 {
                let _ = buf.split_to(2);
                return Ok(Some(Inbound::Disconnect { with_will: false }));
            }
            match v5::Packet::read(buf, Some(max)) {
                Ok(packet) => from_v5(packet).map(Some),
                Err(v5b::Error::InsufficientBytes(_)) => Ok(None),
                Err(v5b::Error::PayloadSizeLimitExceeded { .. }) => Err(CodecError::TooLarge(max)),
                Err(e) => Err(CodecError::Malformed(e.to_string())),
            }
        }
    }
}

fn from_v4(packet: v4::Packet) -> Inbound {
    match packet {
        v4::Packet::Publish(p) => Inbound::Publish(InPublish {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos as u8,
            pkid: p.pkid,
            retain: p.retain,
            response_topic: None,
            correlation_data: None,
        }),
        v4::Packet::PubAck(a) => Inbound::PubAck { pkid: a.pkid },
        v4::Packet::Subscribe(s) => Inbound::Subscribe {
            pkid: s.pkid,
            filters: s.filters.into_iter().map(|f| (f.path, f.qos as u8)).collect(),
        },
        v4::Packet::Unsubscribe(u) => Inbound::Unsubscribe { pkid: u.pkid, filters: u.topics },
        v4::Packet::PingReq => Inbound::PingReq,
        v4::Packet::Disconnect => Inbound::Disconnect { with_will: false },
        v4::Packet::Connect(_) => Inbound::Unsupported(Unsupported::SecondConnect),
        v4::Packet::PubRec(_) | v4::Packet::PubRel(_) | v4::Packet::PubComp(_) => {
            Inbound::Unsupported(Unsupported::Qos2)
        }
        _ => Inbound::Unsupported(Unsupported::ServerPacket),
    }
}

fn from_v5(packet: v5::Packet) -> Result<Inbound, CodecError> {
    Ok(match packet {
        v5::Packet::Publish(p) => {
            let properties = p.properties.unwrap_or_default();
            if properties.topic_alias.is_some() {
                return Ok(Inbound::Unsupported(Unsupported::TopicAlias));
            }
            Inbound::Publish(InPublish {
                topic: String::from_utf8(p.topic.to_vec())
                    .map_err(|_| CodecError::Malformed("topic is not UTF-8".into()))?,
                payload: p.payload,
                qos: p.qos as u8,
                pkid: p.pkid,
                retain: p.retain,
                response_topic: properties.response_topic,
                correlation_data: properties.correlation_data,
            })
        }
        v5::Packet::PubAck(a) => Inbound::PubAck { pkid: a.pkid },
        v5::Packet::Subscribe(s) => Inbound::Subscribe {
            pkid: s.pkid,
            filters: s.filters.into_iter().map(|f| (f.path, f.qos as u8)).collect(),
        },
        v5::Packet::Unsubscribe(u) => Inbound::Unsubscribe { pkid: u.pkid, filters: u.filters },
        v5::Packet::PingReq(_) => Inbound::PingReq,
        v5::Packet::Disconnect(d) => Inbound::Disconnect {
            with_will: d.reason_code == v5::DisconnectReasonCode::DisconnectWithWillMessage,
        },
        v5::Packet::Connect(..) => Inbound::Unsupported(Unsupported::SecondConnect),
        v5::Packet::PubRec(_) | v5::Packet::PubRel(_) | v5::Packet::PubComp(_) => {
            Inbound::Unsupported(Unsupported::Qos2)
        }
        v5::Packet::Auth(_) => Inbound::Unsupported(Unsupported::Auth),
        _ => Inbound::Unsupported(Unsupported::ServerPacket),
    })
}

/// Appends `packet` to `buf`.
pub fn write(protocol: Protocol, packet: &Outbound, buf: &mut BytesMut) -> Result<(), CodecError> {
    let malformed = |e: String| CodecError::Malformed(e);
    match protocol {
        Protocol::V311 => {
            let packet = match packet {
                Outbound::ConnAck { code, .. } => v4::Packet::ConnAck(v4::ConnAck::new(
                    match code {
                        ConnectCode::Accepted => v4::ConnectReturnCode::Success,
                        ConnectCode::BadCredentials => v4::ConnectReturnCode::BadUserNamePassword,
                        ConnectCode::NotAuthorized => v4::ConnectReturnCode::NotAuthorized,
                        ConnectCode::BadClientId => v4::ConnectReturnCode::BadClientId,
                        ConnectCode::Unavailable => v4::ConnectReturnCode::ServiceUnavailable,
                    },
                    false,
                )),
                Outbound::PubAck { pkid, .. } => v4::Packet::PubAck(v4::PubAck::new(*pkid)),
                Outbound::SubAck { pkid, granted, .. } => v4::Packet::SubAck(v4::SubAck::new(
                    *pkid,
                    granted
                        .iter()
                        .map(|g| match g {
                            Some(qos) => v4::SubscribeReasonCode::Success(qos_of(*qos)),
                            None => v4::SubscribeReasonCode::Failure,
                        })
                        .collect(),
                )),
                Outbound::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(*pkid)),
                Outbound::PingResp => v4::Packet::PingResp,
                Outbound::Publish { topic, payload, pkid, retain, .. } => {
                    let mut publish =
                        v4::Publish::from_bytes(topic.clone(), v4b::QoS::AtLeastOnce, payload.clone());
                    publish.pkid = *pkid;
                    publish.retain = *retain;
                    v4::Packet::Publish(publish)
                }
                // 3.1.1 has no server DISCONNECT: the connection is just closed.
                Outbound::Disconnect(_) => return Ok(()),
            };
            packet.write(buf, usize::MAX).map_err(|e| malformed(e.to_string()))?;
        }
        Protocol::V5 => {
            let packet = match packet {
                Outbound::ConnAck { code, limits } => v5::Packet::ConnAck(v5::ConnAck {
                    session_present: false,
                    code: match code {
                        ConnectCode::Accepted => v5::ConnectReturnCode::Success,
                        ConnectCode::BadCredentials => v5::ConnectReturnCode::BadUserNamePassword,
                        ConnectCode::NotAuthorized => v5::ConnectReturnCode::NotAuthorized,
                        ConnectCode::BadClientId => v5::ConnectReturnCode::ClientIdentifierNotValid,
                        ConnectCode::Unavailable => v5::ConnectReturnCode::ServerUnavailable,
                    },
                    properties: (*code == ConnectCode::Accepted).then(|| v5::ConnAckProperties {
                        // Sessions end with the connection: devices subscribe again on every CONNACK.
                        session_expiry_interval: Some(0),
                        receive_max: Some(limits.receive_maximum),
                        max_qos: Some(1),
                        retain_available: Some(1),
                        max_packet_size: Some(limits.max_packet_size),
                        assigned_client_identifier: None,
                        topic_alias_max: Some(0),
                        reason_string: None,
                        user_properties: Vec::new(),
                        wildcard_subscription_available: Some(0),
                        subscription_identifiers_available: Some(0),
                        shared_subscription_available: Some(0),
                        server_keep_alive: None,
                        response_information: None,
                        server_reference: None,
                        authentication_method: None,
                        authentication_data: None,
                    }),
                }),
                Outbound::PubAck { pkid, reason } => {
                    let mut ack = v5::PubAck::new(*pkid, None);
                    ack.reason = match reason {
                        AckReason::Success => v5::PubAckReason::Success,
                        AckReason::NotAuthorized => v5::PubAckReason::NotAuthorized,
                        AckReason::PayloadFormatInvalid => v5::PubAckReason::PayloadFormatInvalid,
                        AckReason::QuotaExceeded => v5::PubAckReason::QuotaExceeded,
                    };
                    v5::Packet::PubAck(ack)
                }
                Outbound::SubAck { pkid, granted, refused_as_not_authorized } => {
                    v5::Packet::SubAck(v5::SubAck {
                        pkid: *pkid,
                        return_codes: granted
                            .iter()
                            .map(|g| match g {
                                Some(qos) => v5::SubscribeReasonCode::Success(qos_of5(*qos)),
                                None if *refused_as_not_authorized => v5::SubscribeReasonCode::NotAuthorized,
                                None => v5::SubscribeReasonCode::TopicFilterInvalid,
                            })
                            .collect(),
                        properties: None,
                    })
                }
                Outbound::UnsubAck { pkid, count } => v5::Packet::UnsubAck(v5::UnsubAck {
                    pkid: *pkid,
                    reasons: vec![v5::UnsubAckReason::Success; *count],
                    properties: None,
                }),
                Outbound::PingResp => v5::Packet::PingResp(v5::PingResp),
                Outbound::Publish { topic, payload, pkid, retain, correlation_data } => {
                    let properties = correlation_data.as_ref().map(|c| v5::PublishProperties {
                        correlation_data: Some(c.clone()),
                        ..Default::default()
                    });
                    let mut publish =
                        v5::Publish::new(topic.clone(), v5b::QoS::AtLeastOnce, payload.clone(), properties);
                    publish.pkid = *pkid;
                    publish.retain = *retain;
                    v5::Packet::Publish(publish)
                }
                Outbound::Disconnect(reason) => {
                    // Written by hand: rumqttc 0.25 counts one byte too few for a DISCONNECT with
                    // a reason code and no properties. This is reason code + empty properties.
                    let code = match reason {
                        DisconnectReason::SessionTakenOver => v5::DisconnectReasonCode::SessionTakenOver,
                        DisconnectReason::KeepAliveTimeout => v5::DisconnectReasonCode::KeepAliveTimeout,
                        DisconnectReason::ProtocolError => v5::DisconnectReasonCode::ProtocolError,
                        DisconnectReason::PacketTooLarge => v5::DisconnectReasonCode::PacketTooLarge,
                        DisconnectReason::QosNotSupported => v5::DisconnectReasonCode::QoSNotSupported,
                        DisconnectReason::TopicAliasInvalid => v5::DisconnectReasonCode::TopicAliasInvalid,
                        DisconnectReason::ServerShuttingDown => v5::DisconnectReasonCode::ServerShuttingDown,
                    };
                    buf.extend_from_slice(&[0xE0, 0x02, code as u8, 0x00]);
                    return Ok(());
                }
            };
            packet.write(buf, None).map_err(|e| malformed(e.to_string()))?;
        }
    }
    Ok(())
}

fn qos_of(qos: u8) -> v4b::QoS {
    if qos == 0 { v4b::QoS::AtMostOnce } else { v4b::QoS::AtLeastOnce }
}

fn qos_of5(qos: u8) -> v5b::QoS {
    if qos == 0 { v5b::QoS::AtMostOnce } else { v5b::QoS::AtLeastOnce }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v5_connect() -> BytesMut {
        let connect =
            v5::Connect { keep_alive: 30, client_id: "robot-1".into(), clean_start: true, properties: None };
        let login = v5::Login { username: "robot-1".into(), password: "secret".into() };
        let mut buf = BytesMut::new();
        v5::Packet::Connect(connect, None, Some(login)).write(&mut buf, None).unwrap();
        buf
    }

    #[test]
    fn connect_is_read_in_either_protocol_once_complete() {
        let full = v5_connect();
        let mut partial = BytesMut::from(&full[..full.len() - 1]);
        assert_eq!(read_connect(&mut partial, 1024), Ok(None));
        let mut buf = full.clone();
        let connect = read_connect(&mut buf, 1024).unwrap().unwrap();
        assert_eq!((connect.protocol, connect.client_id.as_str()), (Protocol::V5, "robot-1"));
        assert_eq!(
            (connect.username.as_deref(), connect.password.as_deref()),
            (Some("robot-1"), Some("secret"))
        );
        assert!(buf.is_empty());

        let mut v311 = v4::Connect::new("robot-2");
        v311.set_login("robot-2", "pw");
        let mut buf = BytesMut::new();
        v4::Packet::Connect(v311).write(&mut buf, 1024).unwrap();
        let connect = read_connect(&mut buf, 1024).unwrap().unwrap();
        assert_eq!((connect.protocol, connect.client_id.as_str()), (Protocol::V311, "robot-2"));
    }

    #[test]
    fn garbage_and_oversized_first_packets_are_refused() {
        assert_eq!(read_connect(&mut BytesMut::from(&b"\x30\x02ab"[..]), 1024), Err(CodecError::NotConnect));
        assert_eq!(read_connect(&mut v5_connect(), 8), Err(CodecError::TooLarge(8)));
        let mut mqisdp = BytesMut::from(&b"\x10\x0c\x00\x06MQIsdp\x03\x02\x00\x3c"[..]);
        assert_eq!(read_connect(&mut mqisdp, 1024), Err(CodecError::UnsupportedProtocol));
    }

    #[test]
    fn a_v5_publish_keeps_its_response_topic_and_correlation_data() {
        let properties = v5::PublishProperties {
            response_topic: Some("r".into()),
            correlation_data: Some(Bytes::from_static(b"0123456789abcdef")),
            ..Default::default()
        };
        let mut publish = v5::Publish::new("t/x", v5b::QoS::AtLeastOnce, "{}", Some(properties));
        publish.pkid = 7;
        let mut buf = BytesMut::new();
        v5::Packet::Publish(publish).write(&mut buf, None).unwrap();
        match read(Protocol::V5, &mut buf, 1024).unwrap().unwrap() {
            Inbound::Publish(p) => {
                assert_eq!((p.topic.as_str(), p.pkid, p.qos), ("t/x", 7, 1));
                assert_eq!(p.response_topic.as_deref(), Some("r"));
                assert_eq!(p.correlation_data.as_deref(), Some(&b"0123456789abcdef"[..]));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_short_v5_disconnect_is_a_normal_disconnect() {
        let mut buf = BytesMut::from(&b"\xe0\x00"[..]);
        assert_eq!(read(Protocol::V5, &mut buf, 1024), Ok(Some(Inbound::Disconnect { with_will: false })));
    }

    #[test]
    fn outbound_publishes_carry_correlation_data_over_v5_only() {
        let packet = Outbound::Publish {
            topic: "t".into(),
            payload: Bytes::from_static(b"{}"),
            pkid: 3,
            retain: false,
            correlation_data: Some(Bytes::from_static(b"id")),
        };
        let mut buf = BytesMut::new();
        write(Protocol::V5, &packet, &mut buf).unwrap();
        match v5::Packet::read(&mut buf, None).unwrap() {
            v5::Packet::Publish(p) => {
                assert_eq!(p.properties.unwrap().correlation_data.as_deref(), Some(&b"id"[..]));
            }
            other => panic!("{other:?}"),
        }
        let mut buf = BytesMut::new();
        write(Protocol::V311, &packet, &mut buf).unwrap();
        assert!(matches!(v4::Packet::read(&mut buf, 1024).unwrap(), v4::Packet::Publish(p) if p.pkid == 3));
    }
}
