//! One client connection of the embedded broker: CONNECT and authentication, then a reader that
//! applies the topic ACL and hands device messages to the fleet, and a writer that sends PUBACKs in
//! the order the publishes arrived — each only once the fleet is done with its message (for
//! telemetry: committed) — plus the fleet's messages to the device.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use tandem_core::protocol::{DeviceTopics, TopicKind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::acl::{may_publish, may_subscribe};
use super::codec::{
    self, AckReason, CodecError, Connect, ConnectCode, DisconnectReason, InPublish, Inbound, Outbound,
    Protocol, ServerLimits, Unsupported,
};
use super::router::{ClientHandle, Delivery, Router};
use crate::config::EmbeddedBrokerConfig;
use crate::device_messages::DeviceMessages;
use crate::devices_file::{AuthFailure, DeviceDirectory};
use crate::ingest::Acknowledge;
use crate::metrics::{ActionLabels, FleetMetrics, ResultLabels};

/// Messages to one device sent and not yet acknowledged, at most.
const MAX_OUTGOING_IN_FLIGHT: usize = 32;
/// Messages to one device waiting behind those, at most (the oldest is dropped beyond it).
const MAX_OUTGOING_QUEUED: usize = 1024;
/// Deliveries the router may queue for one connection.
const DELIVERY_CHANNEL: usize = 256;

static CONNECTIONS: AtomicU64 = AtomicU64::new(1);

/// What every connection shares.
pub(crate) struct Context {
    pub config: EmbeddedBrokerConfig,
    pub devices: Option<DeviceDirectory>,
    pub router: Arc<Router>,
    pub messages: Arc<DeviceMessages>,
    pub metrics: Arc<FleetMetrics>,
    pub shutdown: CancellationToken,
}

/// What the writer task is asked to do.
enum Command {
    Send(Outbound),
    /// Send a PUBACK for `pkid` once `done` says how; the permit is the receive-maximum slot.
    AckWhenDone {
        pkid: u16,
        done: oneshot::Receiver<AckReason>,
        permit: OwnedSemaphorePermit,
    },
    /// The device acknowledged our publish `pkid`.
    DeviceAcked(u16),
    /// A message for this client only (a retained message after its SUBACK).
    Deliver(Delivery),
    Close(Option<DisconnectReason>),
}

/// How the reader loop ended.
enum End {
    /// DISCONNECT received.
    Clean { with_will: bool },
    /// The connection broke or timed out: the will is published.
    Abnormal(Option<DisconnectReason>),
    /// Another connection took the client id over, or the fleet is stopping: no will.
    Quiet(DisconnectReason),
}

/// Serves one connection until it ends. `certificate`: SHA-256 of a verified TLS client
/// certificate.
pub(crate) async fn serve<S>(stream: S, peer: SocketAddr, certificate: Option<[u8; 32]>, ctx: Arc<Context>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let max = ctx.config.max_packet_bytes;
    let connect_timeout = Duration::from_millis(ctx.config.connect_timeout_ms);
    let connect = match tokio::time::timeout(connect_timeout, read_connect(&mut reader, &mut buf, max)).await
    {
        Ok(Ok(connect)) => connect,
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "refusing a connection");
            ctx.count_connect("protocol_error");
            return;
        }
        Err(_) => {
            ctx.count_connect("timeout");
            return;
        }
    };
    let protocol = connect.protocol;
    let limits = ServerLimits { receive_maximum: ctx.config.receive_maximum, max_packet_size: max };
    let device = match ctx.authenticate(&connect, certificate.as_ref()) {
        Ok(device) => device,
        Err((code, result)) => {
            tracing::info!(%peer, client_id = %connect.client_id, user = ?connect.username, result, "connection refused");
            ctx.count_connect(result);
            let mut out = BytesMut::new();
            if codec::write(protocol, &Outbound::ConnAck { code, limits }, &mut out).is_ok() {
                let _gone = writer.write_all(&out).await;
            }
            return;
        }
    };
    let client_id = if connect.client_id.is_empty() { device.clone() } else { connect.client_id.clone() };
    ctx.count_connect("accepted");
    ctx.metrics.broker_connections.inc();
    tracing::debug!(%peer, %client_id, %device, ?protocol, "client connected");

    let connection = CONNECTIONS.fetch_add(1, Ordering::Relaxed);
    let (deliveries, delivered) = mpsc::channel(DELIVERY_CHANNEL);
    let taken_over = CancellationToken::new();
    ctx.router.register(&client_id, ClientHandle { connection, deliveries, taken_over: taken_over.clone() });
    let (commands, queued) = mpsc::unbounded_channel();
    let writer_task = tokio::spawn(write_loop(writer, protocol, queued, delivered, connect.max_packet_size));
    let _open = commands.send(Command::Send(Outbound::ConnAck { code: ConnectCode::Accepted, limits }));

    let mut session = Session {
        ctx: &ctx,
        device: &device,
        client_id: &client_id,
        protocol,
        commands: &commands,
        window: Arc::new(Semaphore::new(usize::from(ctx.config.receive_maximum))),
    };
    let keep_alive = (connect.keep_alive_secs > 0)
        .then(|| Duration::from_millis(u64::from(connect.keep_alive_secs) * 1500));
    let end = session.run(&mut reader, &mut buf, keep_alive, &taken_over).await;

    ctx.router.unregister(&client_id, connection);
    let (will, reason) = match end {
        End::Clean { with_will } => (with_will, None),
        End::Abnormal(reason) => (true, reason),
        End::Quiet(reason) => (false, Some(reason)),
    };
    if will && let Some(will) = &connect.will {
        match may_publish(&device, &will.topic) {
            Some(TopicKind::Status) => ctx.messages.status(&device, &will.payload, None).await,
            _ => ctx.deny("will"),
        }
    }
    let _closing = commands.send(Command::Close(reason));
    drop(commands);
    let _finished = tokio::time::timeout(Duration::from_secs(5), writer_task).await;
    ctx.metrics.broker_connections.dec();
    tracing::debug!(%peer, %client_id, "client disconnected");
}

async fn read_connect<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    max: u32,
) -> Result<Connect, CodecError> {
    loop {
        if let Some(connect) = codec::read_connect(buf, max)? {
            return Ok(connect);
        }
        match reader.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(CodecError::Malformed("connection closed before CONNECT".into())),
            Ok(_) => {}
        }
    }
}

impl Context {
    fn count_connect(&self, result: &'static str) {
        self.metrics.broker_connects.get_or_create(&ResultLabels { result }).inc();
    }

    fn deny(&self, action: &'static str) {
        self.metrics.acl_denied.get_or_create(&ActionLabels { action }).inc();
    }

    /// The device id the client acts as, or the CONNACK code and the metric label to refuse it.
    fn authenticate(
        &self,
        connect: &Connect,
        certificate: Option<&[u8; 32]>,
    ) -> Result<String, (ConnectCode, &'static str)> {
        let claimed = connect.username.clone().unwrap_or_else(|| connect.client_id.clone());
        if DeviceTopics::new(&claimed).is_none() {
            return Err((ConnectCode::BadClientId, "invalid_device_id"));
        }
        if let Some(devices) = &self.devices {
            match devices.get().authenticate(&claimed, connect.password.as_deref(), certificate) {
                Ok(()) => return Ok(claimed),
                Err(AuthFailure::BadCredentials) => {
                    return Err((ConnectCode::BadCredentials, "bad_credentials"));
                }
                Err(AuthFailure::UnknownDevice) if !self.config.allow_anonymous => {
                    return Err((ConnectCode::NotAuthorized, "unknown_device"));
                }
                Err(AuthFailure::UnknownDevice) => {}
            }
        }
        if self.config.allow_anonymous {
            Ok(claimed)
        } else {
            Err((ConnectCode::NotAuthorized, "unknown_device"))
        }
    }
}

struct Session<'a> {
    ctx: &'a Context,
    device: &'a str,
    client_id: &'a str,
    protocol: Protocol,
    commands: &'a mpsc::UnboundedSender<Command>,
    /// Unacknowledged QoS 1 publishes from the client (its receive maximum).
    window: Arc<Semaphore>,
}

impl Session<'_> {
    async fn run<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
        buf: &mut BytesMut,
        keep_alive: Option<Duration>,
        taken_over: &CancellationToken,
    ) -> End {
        let max = self.ctx.config.max_packet_bytes;
        loop {
            loop {
                match codec::read(self.protocol, buf, max) {
                    Ok(Some(packet)) => {
                        if let Some(end) = self.handle(packet).await {
                            return end;
                        }
                    }
                    Ok(None) => break,
                    Err(CodecError::TooLarge(_)) => {
                        self.ctx.metrics.bad("packet_too_large");
                        return End::Abnormal(Some(DisconnectReason::PacketTooLarge));
                    }
                    Err(error) => {
                        tracing::info!(client_id = self.client_id, %error, "closing a connection");
                        self.ctx.metrics.bad("malformed_packet");
                        return End::Abnormal(Some(DisconnectReason::ProtocolError));
                    }
                }
            }
            let read = async {
                match keep_alive {
                    Some(limit) => tokio::time::timeout(limit, reader.read_buf(buf)).await.ok(),
                    None => Some(reader.read_buf(buf).await),
                }
            };
            tokio::select! {
                result = read => match result {
                    None => return End::Abnormal(Some(DisconnectReason::KeepAliveTimeout)),
                    Some(Ok(0) | Err(_)) => return End::Abnormal(None),
                    Some(Ok(_)) => {}
                },
                () = taken_over.cancelled() => return End::Quiet(DisconnectReason::SessionTakenOver),
                () = self.ctx.shutdown.cancelled() => return End::Quiet(DisconnectReason::ServerShuttingDown),
            }
        }
    }

    fn send(&self, packet: Outbound) {
        let _writer_gone = self.commands.send(Command::Send(packet));
    }

    /// Handles one packet; `Some` ends the connection.
    async fn handle(&mut self, packet: Inbound) -> Option<End> {
        match packet {
            Inbound::Publish(publish) => return self.publish(publish).await,
            Inbound::PubAck { pkid } => {
                let _writer_gone = self.commands.send(Command::DeviceAcked(pkid));
            }
            Inbound::Subscribe { pkid, filters } => {
                let mut granted = Vec::with_capacity(filters.len());
                let mut retained = Vec::new();
                for (filter, qos) in filters {
                    if may_subscribe(self.device, &filter) {
                        granted.push(Some(qos.min(1)));
                        retained.extend(self.ctx.router.subscribe(self.client_id, &filter));
                    } else {
                        tracing::info!(device = self.device, %filter, "subscription refused by the ACL");
                        self.ctx.deny("subscribe");
                        granted.push(None);
                    }
                }
                self.send(Outbound::SubAck { pkid, granted, refused_as_not_authorized: true });
                // Retained messages follow the SUBACK, to this client only.
                for message in retained {
                    let _writer_gone = self.commands.send(Command::Deliver(message));
                }
            }
            Inbound::Unsubscribe { pkid, filters } => {
                for filter in &filters {
                    self.ctx.router.unsubscribe(self.client_id, filter);
                }
                self.send(Outbound::UnsubAck { pkid, count: filters.len() });
            }
            Inbound::PingReq => self.send(Outbound::PingResp),
            Inbound::Disconnect { with_will } => return Some(End::Clean { with_will }),
            Inbound::Unsupported(what) => {
                tracing::info!(
                    client_id = self.client_id,
                    ?what,
                    "closing a connection that used an unsupported feature"
                );
                let reason = match what {
                    Unsupported::Qos2 => DisconnectReason::QosNotSupported,
                    Unsupported::TopicAlias => DisconnectReason::TopicAliasInvalid,
                    Unsupported::SecondConnect | Unsupported::Auth | Unsupported::ServerPacket => {
                        DisconnectReason::ProtocolError
                    }
                };
                return Some(End::Abnormal(Some(reason)));
            }
        }
        None
    }

    async fn publish(&mut self, publish: InPublish) -> Option<End> {
        if publish.qos > 1 {
            return Some(End::Abnormal(Some(DisconnectReason::QosNotSupported)));
        }
        // The receive-maximum window: when the fleet is behind, stop reading from this client.
        let permit = self.window.clone().acquire_owned().await.expect("the window is never closed");
        let (done, pending) = oneshot::channel();
        if publish.qos == 1 {
            let _writer_gone =
                self.commands.send(Command::AckWhenDone { pkid: publish.pkid, done: pending, permit });
        }
        let Some(kind) = may_publish(self.device, &publish.topic) else {
            tracing::warn!(device = self.device, topic = %publish.topic, "publish refused by the ACL");
            self.ctx.deny("publish");
            // MQTT 3.1.1 has no negative PUBACK: there the message is acknowledged and dropped.
            let _connection_gone = done.send(AckReason::NotAuthorized);
            return None;
        };
        match kind {
            TopicKind::Telemetry => {
                // A refused message is acknowledged too: sending it again cannot make it valid.
                let ack: Acknowledge = Box::new(move |_outcome| {
                    let _connection_gone = done.send(AckReason::Success);
                });
                self.ctx.messages.telemetry(self.device, &publish.payload, Some(ack)).await;
            }
            TopicKind::OffloadRequest => {
                self.ctx.messages.offload_request(self.device, publish.payload);
                let _connection_gone = done.send(AckReason::Success);
            }
            TopicKind::Status => {
                let ack: Acknowledge = Box::new(move |_outcome| {
                    let _connection_gone = done.send(AckReason::Success);
                });
                self.ctx.messages.status(self.device, &publish.payload, Some(ack)).await;
            }
            TopicKind::OffloadResponse | TopicKind::Assignment => {
                unreachable!("the ACL admits device → fleet topics only")
            }
        }
        None
    }
}

/// Packet ids and queue of the fleet's messages to one device.
struct Outgoing {
    next_pkid: u16,
    in_flight: std::collections::HashSet<u16>,
    queued: std::collections::VecDeque<Delivery>,
}

impl Outgoing {
    fn new() -> Self {
        Self { next_pkid: 1, in_flight: Default::default(), queued: Default::default() }
    }

    /// Queues `delivery`; returns the packets that can go out now.
    fn push(&mut self, delivery: Delivery) -> Option<Outbound> {
        if self.in_flight.len() < MAX_OUTGOING_IN_FLIGHT {
            return Some(self.send(delivery));
        }
        if self.queued.len() >= MAX_OUTGOING_QUEUED {
            let dropped = self.queued.pop_front();
            tracing::warn!(topic = ?dropped.map(|d| d.topic), "a device is not acknowledging; dropping its oldest queued message");
        }
        self.queued.push_back(delivery);
        None
    }

    fn acked(&mut self, pkid: u16) -> Option<Outbound> {
        self.in_flight.remove(&pkid);
        let next = self.queued.pop_front()?;
        Some(self.send(next))
    }

    fn send(&mut self, delivery: Delivery) -> Outbound {
        while self.in_flight.contains(&self.next_pkid) {
            self.advance();
        }
        let pkid = self.next_pkid;
        self.advance();
        self.in_flight.insert(pkid);
        Outbound::Publish {
            topic: delivery.topic,
            payload: delivery.payload,
            pkid,
            retain: delivery.retain,
            correlation_data: delivery.correlation_data,
        }
    }

    fn advance(&mut self) {
        self.next_pkid = if self.next_pkid == u16::MAX { 1 } else { self.next_pkid + 1 };
    }
}

type AckFuture = Pin<Box<dyn Future<Output = Option<(u16, AckReason)>> + Send>>;

async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    protocol: Protocol,
    mut commands: mpsc::UnboundedReceiver<Command>,
    mut deliveries: mpsc::Receiver<Delivery>,
    client_max_packet: Option<u32>,
) {
    let mut out = BytesMut::with_capacity(8 * 1024);
    let mut acks: FuturesOrdered<AckFuture> = FuturesOrdered::new();
    let mut outgoing = Outgoing::new();
    let encode = |packet: &Outbound, out: &mut BytesMut| {
        if let Outbound::Publish { payload, .. } = packet
            && client_max_packet.is_some_and(|max| payload.len() + 512 > max as usize)
        {
            tracing::warn!("dropping a message larger than the client accepts");
            return;
        }
        if let Err(error) = codec::write(protocol, packet, out) {
            tracing::error!(%error, "cannot encode a packet");
        }
    };
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                None => break,
                Some(Command::Send(packet)) => encode(&packet, &mut out),
                Some(Command::AckWhenDone { pkid, done, permit }) => acks.push_back(Box::pin(async move {
                    let reason = done.await.ok();
                    drop(permit);
                    reason.map(|reason| (pkid, reason))
                })),
                Some(Command::DeviceAcked(pkid)) => {
                    if let Some(packet) = outgoing.acked(pkid) {
                        encode(&packet, &mut out);
                    }
                }
                Some(Command::Deliver(delivery)) => {
                    if let Some(packet) = outgoing.push(delivery) {
                        encode(&packet, &mut out);
                    }
                }
                Some(Command::Close(reason)) => {
                    if let Some(reason) = reason {
                        encode(&Outbound::Disconnect(reason), &mut out);
                    }
                    let _gone = writer.write_all(&out).await;
                    let _gone = writer.shutdown().await;
                    return;
                }
            },
            Some(ack) = acks.next(), if !acks.is_empty() => {
                if let Some((pkid, reason)) = ack {
                    encode(&Outbound::PubAck { pkid, reason }, &mut out);
                }
            }
            Some(delivery) = deliveries.recv() => {
                if let Some(packet) = outgoing.push(delivery) {
                    encode(&packet, &mut out);
                }
            }
        }
        if !out.is_empty() {
            if writer.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
    }
}
