//! One connection to the external broker: our own MQTT 5 client loop over rumqttc's packet codec.
//!
//! Why not rumqttc's event loop: it sends a manual acknowledgement only when it is polled, one per
//! poll, while each poll also reads up to ten packets; and the only way to stop it reading is to
//! stop polling it, which stops the acknowledgements too. Under a backlog the fleet then read far
//! faster than it acknowledged (24,000 messages committed but not yet acknowledged after two
//! seconds), and acknowledgements that did not fit rumqttc's request channel waited in tasks of
//! their own. Here reading and writing are separate: a packet is read only with a place in the
//! in-flight window, and that place is given back once the message's PUBACK is written, so the
//! messages received and not acknowledged on the wire never exceed the window, whatever the
//! broker sends; acknowledgements are written as soon as they come, many in one write.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Connect, ConnectProperties, ConnectReturnCode, Disconnect, DisconnectReasonCode, Filter, Login,
    Packet, PingReq, PubAck, Publish, PublishProperties, Subscribe, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::{Error as CodecError, QoS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How to reach and log in to the broker.
pub(super) struct SessionOptions {
    pub host: String,
    pub port: u16,
    /// TLS (`mqtts://`) with this configuration.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub client_id: String,
    pub login: Option<Login>,
    pub keep_alive: Duration,
    pub session_expiry_secs: u32,
    /// The in-flight window: messages received and not yet acknowledged, at most.
    pub receive_maximum: u16,
    pub max_packet_bytes: u32,
    /// The topic filters subscribed to (QoS 1) on every connection.
    pub filters: Vec<String>,
}

/// The spare room made in the read buffer when it runs low.
const READ_CHUNK: usize = 64 * 1024;

/// Longest wait for the TCP and TLS handshakes and the CONNACK.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A fleet → device publish (QoS 1).
#[derive(Debug, Clone)]
pub(super) struct OutPublish {
    pub topic: String,
    pub payload: Bytes,
    pub retain: bool,
    pub correlation_data: Option<Bytes>,
}

/// Fleet → device publishes: those waiting to be sent, and those sent and not yet acknowledged by
/// the broker, which every new connection sends again. Lives across connections.
pub(super) struct Outbox {
    queued: mpsc::Receiver<OutPublish>,
    unacked: BTreeMap<u16, OutPublish>,
    last_pkid: u16,
}

impl Outbox {
    pub(super) fn new(queued: mpsc::Receiver<OutPublish>) -> Self {
        Self { queued, unacked: BTreeMap::new(), last_pkid: 0 }
    }

    /// A packet id in use by no unacknowledged publish (1..=65535).
    fn next_pkid(&mut self) -> u16 {
        loop {
            self.last_pkid = self.last_pkid.checked_add(1).unwrap_or(1);
            if !self.unacked.contains_key(&self.last_pkid) {
                return self.last_pkid;
            }
        }
    }
}

/// A message received on the connection, with its place in the in-flight window.
pub(super) struct Received {
    pub publish: Publish,
    /// Call once the message is committed or refused (it is then acknowledged to the broker and
    /// its place given back), or drop it to leave it unacknowledged (the broker sends it again on
    /// the next connection).
    pub done: Box<dyn FnOnce() + Send>,
}

/// The in-flight window, shared across connections: messages received and not yet acknowledged,
/// bounded by their number and by their size.
pub(super) struct Window {
    messages: Arc<Semaphore>,
    kib: Arc<Semaphore>,
    kib_capacity: u32,
}

impl Window {
    /// At most `messages` messages taking at most `bytes` bytes (counted in KiB, each message at
    /// least one).
    pub(super) fn new(messages: u16, bytes: u64) -> Self {
        let kib_capacity =
            u32::try_from((bytes / 1024).max(1)).unwrap_or(u32::MAX).min(Semaphore::MAX_PERMITS as u32);
        Self {
            messages: Arc::new(Semaphore::new(usize::from(messages.max(1)))),
            kib: Arc::new(Semaphore::new(kib_capacity as usize)),
            kib_capacity,
        }
    }

    /// The KiB a message of `bytes` takes in the window (a message larger than the whole window
    /// takes all of it).
    fn kib_of(&self, bytes: usize) -> u32 {
        u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX).clamp(1, self.kib_capacity)
    }
}

/// A message's place in the window; given back when dropped.
pub(super) struct Place {
    _message: OwnedSemaphorePermit,
    _size: OwnedSemaphorePermit,
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub(super) enum SessionEnd {
    #[error("shut down")]
    Shutdown,
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("the broker refused the connection: {0:?}")]
    Refused(ConnectReturnCode),
    #[error("the connection broke: {0}")]
    Io(#[from] std::io::Error),
    #[error("the broker sent a packet that is not MQTT 5: {0}")]
    Protocol(String),
    #[error("the broker closed the connection")]
    Closed,
    #[error("the broker disconnected this client: {0:?}")]
    Disconnected(DisconnectReasonCode),
    #[error("the broker neither answered nor took what was sent for {0:?}")]
    Silent(Duration),
}

impl From<CodecError> for SessionEnd {
    fn from(error: CodecError) -> Self {
        SessionEnd::Protocol(error.to_string())
    }
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// A PUBACK to write, and the window place it gives back once written.
type Ack = (u16, Place);

/// Connects, subscribes, sends the outbox's unacknowledged publishes again, then hands every
/// message received to `deliver` until the connection ends or `shutdown` fires. `window` is
/// shared across connections; `subscribed` turns true on the SUBACK.
pub(super) async fn run_session(
    options: &SessionOptions,
    outbox: &mut Outbox,
    window: &Window,
    subscribed: &AtomicBool,
    deliver: &mut (dyn FnMut(Received) + Send),
    shutdown: &CancellationToken,
) -> SessionEnd {
    let connected = tokio::select! {
        connected = tokio::time::timeout(CONNECT_TIMEOUT, connect(options)) => connected,
        () = shutdown.cancelled() => return SessionEnd::Shutdown,
    };
    let (stream, connack, mut buf) = match connected {
        Ok(Ok(connected)) => connected,
        Ok(Err(end)) => return end,
        Err(_) => return SessionEnd::Connect(format!("no CONNACK within {CONNECT_TIMEOUT:?}")),
    };
    let mut session = Session::new(options, stream, &connack, outbox);
    tracing::info!(session_present = connack.session_present, "connected to the external broker");
    match session.run(&mut buf, window, subscribed, deliver, shutdown).await {
        SessionEnd::Shutdown => {
            let _ = session
                .write(&Packet::Disconnect(Disconnect::new(DisconnectReasonCode::NormalDisconnection)))
                .await;
            SessionEnd::Shutdown
        }
        end => end,
    }
}

/// TCP (and TLS), CONNECT, CONNACK; returns the stream, the CONNACK and what was read past it.
async fn connect(options: &SessionOptions) -> Result<(Box<dyn Stream>, ConnAck, BytesMut), SessionEnd> {
    let tcp = TcpStream::connect((options.host.as_str(), options.port))
        .await
        .map_err(|e| SessionEnd::Connect(format!("{}:{}: {e}", options.host, options.port)))?;
    tcp.set_nodelay(true)?;
    let mut stream: Box<dyn Stream> = match &options.tls {
        None => Box::new(tcp),
        Some(config) => {
            let name = rustls::pki_types::ServerName::try_from(options.host.clone())
                .map_err(|e| SessionEnd::Connect(format!("{}: {e}", options.host)))?;
            let tls = tokio_rustls::TlsConnector::from(Arc::clone(config))
                .connect(name, tcp)
                .await
                .map_err(|e| SessionEnd::Connect(format!("TLS with {}: {e}", options.host)))?;
            Box::new(tls)
        }
    };
    let properties = ConnectProperties {
        session_expiry_interval: Some(options.session_expiry_secs),
        receive_maximum: Some(options.receive_maximum),
        max_packet_size: Some(options.max_packet_bytes),
        ..ConnectProperties::new()
    };
    let connect = Connect {
        keep_alive: u16::try_from(options.keep_alive.as_secs()).unwrap_or(u16::MAX),
        client_id: options.client_id.clone(),
        clean_start: false,
        properties: Some(properties),
    };
    let mut out = BytesMut::new();
    Packet::Connect(connect, None, options.login.clone()).write(&mut out, None)?;
    stream.write_all(&out).await?;
    stream.flush().await?;
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        match Packet::read(&mut buf, Some(options.max_packet_bytes)) {
            Ok(Packet::ConnAck(connack)) if connack.code == ConnectReturnCode::Success => {
                return Ok((stream, connack, buf));
            }
            Ok(Packet::ConnAck(connack)) => return Err(SessionEnd::Refused(connack.code)),
            Ok(other) => return Err(SessionEnd::Protocol(format!("expected CONNACK, got {other:?}"))),
            Err(CodecError::InsufficientBytes(_)) => {
                buf.reserve(READ_CHUNK);
                if stream.read_buf(&mut buf).await? == 0 {
                    return Err(SessionEnd::Closed);
                }
            }
            Err(error) => return Err(error.into()),
        }
    }
}

struct Session<'a> {
    stream: Box<dyn Stream>,
    outbox: &'a mut Outbox,
    /// Publishes the broker accepts unacknowledged at once (its receive maximum).
    broker_window: usize,
    /// The largest packet the broker accepts.
    broker_max_packet: Option<u32>,
    keep_alive: Duration,
    max_packet_bytes: u32,
    filters: Vec<String>,
    out: BytesMut,
}

impl<'a> Session<'a> {
    fn new(
        options: &SessionOptions,
        stream: Box<dyn Stream>,
        connack: &ConnAck,
        outbox: &'a mut Outbox,
    ) -> Self {
        let properties = connack.properties.as_ref();
        let keep_alive = properties
            .and_then(|p| p.server_keep_alive)
            .map_or(options.keep_alive, |secs| Duration::from_secs(u64::from(secs.max(1))));
        Self {
            stream,
            outbox,
            broker_window: usize::from(properties.and_then(|p| p.receive_max).unwrap_or(u16::MAX).max(1)),
            broker_max_packet: properties.and_then(|p| p.max_packet_size),
            keep_alive,
            max_packet_bytes: options.max_packet_bytes,
            filters: options.filters.clone(),
            out: BytesMut::new(),
        }
    }

    async fn run(
        &mut self,
        buf: &mut BytesMut,
        window: &Window,
        subscribed: &AtomicBool,
        deliver: &mut (dyn FnMut(Received) + Send),
        shutdown: &CancellationToken,
    ) -> SessionEnd {
        let (acks, mut ack_queue) = mpsc::unbounded_channel::<Ack>();
        if let Err(end) = self.start().await {
            return end;
        }
        let mut ping = tokio::time::interval_at(Instant::now() + self.keep_alive, self.keep_alive);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let silence_limit = self.keep_alive * 2;
        let mut last_heard = Instant::now();
        // A place for one more message: the next packet is read only with one.
        let mut slot: Option<OwnedSemaphorePermit> = None;
        // A message read, waiting for room for its size.
        let mut sizing: Option<(Publish, OwnedSemaphorePermit, u32)> = None;
        loop {
            // The packets already read, each with a place in the window.
            if let (Some(_), None) = (&slot, &sizing) {
                match Packet::read(buf, Some(self.max_packet_bytes)) {
                    Ok(Packet::Publish(publish)) => {
                        last_heard = Instant::now();
                        let message = slot.take().expect("checked");
                        let kib = window.kib_of(publish.payload.len() + publish.topic.len());
                        match Arc::clone(&window.kib).try_acquire_many_owned(kib) {
                            Ok(size) => {
                                let place = Place { _message: message, _size: size };
                                if let Err(end) = admit(publish, place, &acks, deliver) {
                                    return end;
                                }
                            }
                            Err(_) => sizing = Some((publish, message, kib)),
                        }
                        continue;
                    }
                    Ok(packet) => {
                        last_heard = Instant::now();
                        if let Err(end) = self.receive(packet, subscribed) {
                            return end;
                        }
                        continue;
                    }
                    Err(CodecError::InsufficientBytes(_)) => {}
                    Err(error) => return error.into(),
                }
            }
            if slot.is_none()
                && let Ok(permit) = Arc::clone(&window.messages).try_acquire_owned()
            {
                slot = Some(permit);
                // Time spent without a place in the window is not the broker's silence.
                last_heard = Instant::now();
                continue;
            }
            let sending = self.outbox.unacked.len() < self.broker_window;
            let reading = slot.is_some() && sizing.is_none();
            if reading && buf.capacity() - buf.len() < READ_CHUNK / 4 {
                // Room for a large read (tokio reads only into spare capacity).
                buf.reserve(READ_CHUNK);
            }
            let needed = sizing.as_ref().map_or(0, |(_, _, kib)| *kib);
            let result = tokio::select! {
                biased;
                () = shutdown.cancelled() => return SessionEnd::Shutdown,
                Some(ack) = ack_queue.recv() => self.write_acks(ack, &mut ack_queue).await,
                Some(publish) = self.outbox.queued.recv(), if sending => self.send(publish).await,
                _ = ping.tick() => self.write(&Packet::PingReq(PingReq)).await,
                size = Arc::clone(&window.kib).acquire_many_owned(needed), if sizing.is_some() => {
                    let (publish, message, _) = sizing.take().expect("checked");
                    let place = Place { _message: message, _size: size.expect("the window is never closed") };
                    last_heard = Instant::now();
                    admit(publish, place, &acks, deliver)
                }
                permit = Arc::clone(&window.messages).acquire_owned(), if slot.is_none() => {
                    slot = Some(permit.expect("the window is never closed"));
                    last_heard = Instant::now();
                    Ok(())
                }
                read = self.stream.read_buf(buf), if reading => match read {
                    Ok(0) => return SessionEnd::Closed,
                    Ok(_) => Ok(()),
                    Err(error) => return error.into(),
                },
                () = tokio::time::sleep_until(last_heard + silence_limit), if reading => {
                    return SessionEnd::Silent(silence_limit);
                }
            };
            if let Err(end) = result {
                return end;
            }
        }
    }

    /// Subscribes, then sends again what the previous connections left unacknowledged.
    async fn start(&mut self) -> Result<(), SessionEnd> {
        let filters = self.filters.iter().map(|f| Filter::new(f.clone(), QoS::AtLeastOnce));
        let mut subscribe = Subscribe::new_many(filters, None);
        subscribe.pkid = self.outbox.next_pkid();
        self.out.clear();
        Packet::Subscribe(subscribe).write(&mut self.out, self.broker_max_packet)?;
        for (pkid, publish) in &self.outbox.unacked {
            let mut packet = publish_packet(publish, *pkid);
            packet.dup = true;
            Packet::Publish(packet).write(&mut self.out, self.broker_max_packet)?;
        }
        self.flush().await
    }

    /// Handles a packet other than a message.
    fn receive(&mut self, packet: Packet, subscribed: &AtomicBool) -> Result<(), SessionEnd> {
        match packet {
            Packet::PubAck(ack) => {
                self.outbox.unacked.remove(&ack.pkid);
            }
            Packet::SubAck(ack) => {
                let refused: Vec<_> = ack
                    .return_codes
                    .iter()
                    .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                    .collect();
                if refused.is_empty() {
                    tracing::info!(filters = ?self.filters, "subscribed");
                    subscribed.store(true, Ordering::Relaxed);
                } else {
                    tracing::error!(?refused, filters = ?self.filters, "the broker refused subscriptions; check its ACL");
                }
            }
            Packet::Disconnect(disconnect) => return Err(SessionEnd::Disconnected(disconnect.reason_code)),
            Packet::PingResp(_) => {}
            other => tracing::debug!(packet = ?other, "ignoring a packet from the external broker"),
        }
        Ok(())
    }

    /// Writes `first` and every other acknowledgement already queued in one write, then gives
    /// their places in the window back.
    async fn write_acks(
        &mut self,
        first: Ack,
        queue: &mut mpsc::UnboundedReceiver<Ack>,
    ) -> Result<(), SessionEnd> {
        let mut places = Vec::new();
        self.out.clear();
        let mut next = Some(first);
        while let Some((pkid, place)) = next {
            Packet::PubAck(PubAck::new(pkid, None)).write(&mut self.out, self.broker_max_packet)?;
            places.push(place);
            next = queue.try_recv().ok();
        }
        self.flush().await?;
        drop(places);
        Ok(())
    }

    /// Sends a fleet → device publish, keeping it until the broker acknowledges it.
    async fn send(&mut self, publish: OutPublish) -> Result<(), SessionEnd> {
        let pkid = self.outbox.next_pkid();
        self.out.clear();
        match Packet::Publish(publish_packet(&publish, pkid)).write(&mut self.out, self.broker_max_packet) {
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(topic = publish.topic, %error, "cannot send a message to a device");
                return Ok(());
            }
        }
        self.outbox.unacked.insert(pkid, publish);
        self.flush().await
    }

    async fn write(&mut self, packet: &Packet) -> Result<(), SessionEnd> {
        self.out.clear();
        packet.write(&mut self.out, self.broker_max_packet)?;
        self.flush().await
    }

    /// Writes what `out` holds; a broker that takes none of it for twice the keep-alive is given
    /// up on, so that a stalled connection neither hangs the session nor the fleet's shutdown.
    async fn flush(&mut self) -> Result<(), SessionEnd> {
        let limit = self.keep_alive * 2;
        let write = async {
            self.stream.write_all(&self.out).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(limit, write).await {
            Ok(written) => Ok(written?),
            Err(_) => Err(SessionEnd::Silent(limit)),
        }
    }
}

/// Hands a message to `deliver` with its place in the window, which comes back once its PUBACK is
/// written (QoS 1) or once it is handled (QoS 0).
fn admit(
    publish: Publish,
    place: Place,
    acks: &mpsc::UnboundedSender<Ack>,
    deliver: &mut (dyn FnMut(Received) + Send),
) -> Result<(), SessionEnd> {
    let done: Box<dyn FnOnce() + Send> = match publish.qos {
        QoS::AtMostOnce => Box::new(move || drop(place)),
        QoS::AtLeastOnce => {
            let (acks, pkid) = (acks.clone(), publish.pkid);
            // A closed queue: the connection is gone, and the broker sends the message again.
            Box::new(move || drop(acks.send((pkid, place))))
        }
        QoS::ExactlyOnce => {
            return Err(SessionEnd::Protocol("a QoS 2 message on a QoS 1 subscription".into()));
        }
    };
    deliver(Received { publish, done });
    Ok(())
}

fn publish_packet(publish: &OutPublish, pkid: u16) -> Publish {
    let properties = publish.correlation_data.clone().map(|correlation_data| PublishProperties {
        correlation_data: Some(correlation_data),
        ..Default::default()
    });
    let mut packet =
        Publish::new(publish.topic.clone(), QoS::AtLeastOnce, publish.payload.clone(), properties);
    packet.retain = publish.retain;
    packet.pkid = pkid;
    packet
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_takes_its_size_in_kib_of_the_window_at_least_one_and_at_most_all() {
        let window = Window::new(10, 64 * 1024);
        assert_eq!(window.kib_of(0), 1);
        assert_eq!(window.kib_of(1024), 1);
        assert_eq!(window.kib_of(1025), 2);
        assert_eq!(window.kib_of(10 << 20), 64, "a message larger than the window takes all of it");
        assert_eq!(Window::new(10, 100).kib_capacity, 1, "the window holds at least one message");
    }

    #[test]
    fn packet_ids_skip_those_still_unacknowledged_and_zero() {
        let (_tx, rx) = mpsc::channel(1);
        let mut outbox = Outbox::new(rx);
        let publish =
            OutPublish { topic: "t".into(), payload: Bytes::new(), retain: false, correlation_data: None };
        outbox.unacked.insert(2, publish.clone());
        assert_eq!(outbox.next_pkid(), 1);
        assert_eq!(outbox.next_pkid(), 3, "2 is still in use");
        outbox.last_pkid = u16::MAX;
        outbox.unacked.insert(1, publish);
        assert_eq!(outbox.next_pkid(), 3, "after 65535 comes 1 (taken), never 0");
    }
}
