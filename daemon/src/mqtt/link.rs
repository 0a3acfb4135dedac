//! [`MqttLink`]: the device's one connection to the fleet broker, shared by offload, telemetry and
//! model assignment.
//!
//! The connection lives on a background task ([`super::driver`]) that connects, reconnects with
//! backoff, restores the device's subscriptions on every CONNACK, keeps the retained status and
//! last will, and dispatches incoming messages by topic. Publishers call
//! [`MqttLink::publish_acked`], which resolves only once the broker acknowledged that very publish
//! (QoS 1 PUBACK), and fails fast while the link is disconnected: callers keep their data (the
//! telemetry spool, the offload request) and try again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tandem_core::protocol::{DeviceStatus, DeviceTopics, TopicKind, UpdateReport};
use tokio::sync::{broadcast, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::ack_tracker::PubAckTracker;
use super::backoff::Backoff;
use super::client::{Client, ConnectionPlan, OutgoingPublish};
use super::{MqttConfig, MqttLinkError, MqttProtocol, driver};

/// Topics of the device that the link subscribes to (fleet → device).
pub(crate) const INBOUND_KINDS: [TopicKind; 2] = [TopicKind::OffloadResponse, TopicKind::Assignment];

/// Messages a slow consumer may fall behind before it loses the oldest.
const INBOUND_CHANNEL_CAPACITY: usize = 256;

/// How long [`MqttLink::shutdown`] waits for the DISCONNECT to go out.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Extras of one publish. Every publish of the link is QoS 1.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishOptions {
    /// Ask the broker to keep the message for later subscribers.
    pub retain: bool,
    /// MQTT 5 only (ignored on 3.1.1): the topic the answer is expected on.
    pub response_topic: Option<String>,
    /// MQTT 5 only (ignored on 3.1.1): data the responder echoes with its answer.
    pub correlation_data: Option<Vec<u8>>,
    /// MQTT 5 only (ignored on 3.1.1): the broker discards the message if it could not deliver it
    /// within this time (rounded up to whole seconds).
    pub message_expiry: Option<Duration>,
}

/// A message the fleet sent to this device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundMessage {
    /// What the topic carries.
    pub kind: TopicKind,
    /// The full topic.
    pub topic: String,
    /// The payload as received.
    pub payload: Vec<u8>,
    /// Whether the broker delivered it from its retained store.
    pub retained: bool,
    /// MQTT 5 correlation data, when the sender set it.
    pub correlation_data: Option<Vec<u8>>,
}

/// The device's connection to the fleet broker. Cheap to clone; all clones share the connection,
/// which ends with [`MqttLink::shutdown`] or when the last clone is dropped (then abruptly, so the
/// broker publishes the last will).
#[derive(Clone)]
pub struct MqttLink {
    inner: Arc<LinkInner>,
}

impl std::fmt::Debug for MqttLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttLink")
            .field("url", &self.inner.shared.url)
            .field("device_id", &self.inner.shared.topics.device_id())
            .field("protocol", &self.inner.shared.protocol)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

struct LinkInner {
    shared: Arc<Shared>,
    stop: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for LinkInner {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
    }
}

/// What the handles and the event-loop task share.
pub(crate) struct Shared {
    pub topics: DeviceTopics,
    pub protocol: MqttProtocol,
    pub url: String,
    plan: ConnectionPlan,
    client: Client,
    connected: watch::Sender<bool>,
    closing: AtomicBool,
    acks: Mutex<PubAckTracker<AckWaiter>>,
    inbound: Mutex<HashMap<TopicKind, broadcast::Sender<InboundMessage>>>,
    latest: Mutex<HashMap<TopicKind, InboundMessage>>,
    /// What the retained status says besides `online`: the model version and the update report.
    status_details: Mutex<(Option<String>, Option<UpdateReport>)>,
    ack_timeout: Duration,
}

/// Resolved by the event-loop task when the broker acknowledged (or the connection dropped).
pub(crate) type AckWaiter = oneshot::Sender<Result<(), MqttLinkError>>;

impl MqttLink {
    /// Validates `config`, reads the password and TLS files it names, and starts connecting in the
    /// background; the broker need not be up yet. Must be called inside a tokio runtime.
    pub fn connect(config: &MqttConfig, device_id: &str) -> Result<Self, MqttLinkError> {
        let topics = DeviceTopics::new(device_id).ok_or_else(|| {
            MqttLinkError::Config(format!(
                "device id {device_id:?} must be 1 to 128 letters, digits, `-`, `_` or `.`"
            ))
        })?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| MqttLinkError::Config("MqttLink::connect needs a tokio runtime".into()))?;
        let plan = ConnectionPlan::new(config, device_id)?;
        let will = DeviceStatus::new(device_id, false);
        let (client, events) = plan.build(&topics.topic(TopicKind::Status), will.to_payload());
        let shared = Arc::new(Shared {
            topics,
            protocol: config.protocol,
            url: config.url.clone(),
            plan,
            client,
            connected: watch::Sender::new(false),
            closing: AtomicBool::new(false),
            acks: Mutex::new(PubAckTracker::default()),
            inbound: Mutex::new(HashMap::new()),
            latest: Mutex::new(HashMap::new()),
            status_details: Mutex::new((None, None)),
            ack_timeout: config.ack_timeout(),
        });
        let stop = CancellationToken::new();
        let backoff = Backoff::new(
            Duration::from_millis(config.reconnect_min_ms),
            Duration::from_millis(config.reconnect_max_ms),
        );
        let task = runtime.spawn(driver::run(shared.clone(), events, backoff, stop.clone()));
        Ok(Self { inner: Arc::new(LinkInner { shared, stop, task: Mutex::new(Some(task)) }) })
    }

    /// The topics of this device.
    pub fn topics(&self) -> &DeviceTopics {
        &self.inner.shared.topics
    }

    /// The protocol version spoken.
    pub fn protocol(&self) -> MqttProtocol {
        self.inner.shared.protocol
    }

    /// Whether the broker accepted the connection and it has not dropped since.
    pub fn is_connected(&self) -> bool {
        *self.inner.shared.connected.borrow()
    }

    /// Waits until connected; `false` when `timeout` passed first.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut connected = self.inner.shared.connected.subscribe();
        tokio::time::timeout(timeout, connected.wait_for(|c| *c)).await.is_ok_and(|r| r.is_ok())
    }

    /// Publishes `payload` on `topic` with QoS 1 and returns once the broker acknowledged this
    /// publish (PUBACK), at most after the configured `ack_timeout_ms`.
    ///
    /// Fails at once with [`MqttLinkError::Disconnected`] while not connected; with
    /// [`MqttLinkError::ConnectionLost`] when the connection drops before the PUBACK; with
    /// [`MqttLinkError::Rejected`] when an MQTT 5 broker acknowledges with a failure reason code
    /// (for example "not authorized" from its ACL). In every failure case the caller still owns
    /// the data and may publish it again; receivers must tolerate duplicates.
    pub async fn publish_acked(
        &self,
        topic: &str,
        payload: Vec<u8>,
        options: PublishOptions,
    ) -> Result<(), MqttLinkError> {
        let shared = &self.inner.shared;
        if !rumqttc::valid_topic(topic) {
            return Err(MqttLinkError::Config(format!("{topic:?} is not a valid topic to publish on")));
        }
        let publish = OutgoingPublish {
            topic: topic.to_string(),
            payload,
            retain: options.retain,
            response_topic: options.response_topic,
            correlation_data: options.correlation_data,
            message_expiry: options.message_expiry,
        };
        shared.plan.check_size(&publish)?;
        let (waiter, acked) = oneshot::channel();
        shared.enqueue(publish, Some(waiter))?;
        match tokio::time::timeout(shared.ack_timeout, acked).await {
            Ok(Ok(result)) => result,
            Ok(Err(_dropped)) if shared.is_closing() => Err(MqttLinkError::Closed),
            Ok(Err(_dropped)) => Err(MqttLinkError::ConnectionLost),
            Err(_elapsed) => Err(MqttLinkError::AckTimeout(shared.ack_timeout)),
        }
    }

    /// Messages arriving on this device's `kind` topic from now on. Only the device's inbound
    /// topics ([`TopicKind::OffloadResponse`], [`TopicKind::Assignment`]) are subscribed; a receiver
    /// that falls more than 256 messages behind loses the oldest.
    pub fn messages(&self, kind: TopicKind) -> broadcast::Receiver<InboundMessage> {
        let mut inbound = lock(&self.inner.shared.inbound);
        inbound.entry(kind).or_insert_with(|| broadcast::channel(INBOUND_CHANNEL_CAPACITY).0).subscribe()
    }

    /// The last message received on this device's `kind` topic, so that a consumer that starts
    /// late still sees, for example, the assignment the broker delivered from its retained store
    /// right after subscribing.
    pub fn latest(&self, kind: TopicKind) -> Option<InboundMessage> {
        lock(&self.inner.shared.latest).get(&kind).cloned()
    }

    /// Sets what the retained status reports besides `online` — the model version served and the
    /// updater's latest report — and publishes it now when connected (every later connection
    /// publishes it too). A failed publish is only logged: the next connection repeats it.
    pub async fn publish_status(&self, model_version: Option<String>, update: Option<UpdateReport>) {
        let shared = &self.inner.shared;
        *lock(&shared.status_details) = (model_version, update);
        if !self.is_connected() {
            return;
        }
        let status_topic = shared.topics.topic(TopicKind::Status);
        let retain = PublishOptions { retain: true, ..PublishOptions::default() };
        if let Err(error) = self.publish_acked(&status_topic, shared.status(true).to_payload(), retain).await
        {
            tracing::debug!(%error, "could not publish the device status; the next connection does");
        }
    }

    /// Ends the connection cleanly: publishes the retained `online: false` status (when
    /// connected), sends DISCONNECT so that the broker discards the last will, and stops the
    /// background task. Publishing afterwards fails with [`MqttLinkError::Closed`].
    pub async fn shutdown(&self) {
        let shared = &self.inner.shared;
        if shared.closing.load(Ordering::SeqCst) {
            return;
        }
        if self.is_connected() {
            let offline = shared.status(false);
            let status_topic = shared.topics.topic(TopicKind::Status);
            let retain = PublishOptions { retain: true, ..PublishOptions::default() };
            if let Err(error) = self.publish_acked(&status_topic, offline.to_payload(), retain).await {
                tracing::debug!(%error, "could not publish the offline status; the last will reports it");
            }
        }
        shared.closing.store(true, Ordering::SeqCst);
        let task = lock(&self.inner.task).take();
        if let Some(mut task) = task {
            if self.is_connected() && shared.client.try_disconnect().is_ok() {
                if tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await.is_err() {
                    task.abort();
                }
            } else {
                task.abort();
            }
        }
        self.inner.stop.cancel();
        shared.close();
    }
}

impl Shared {
    /// Hands `publish` to rumqttc and registers `waiter` for its PUBACK, both under the tracker's
    /// lock so that the tracker sees publishes in the order rumqttc sends them.
    pub(crate) fn enqueue(
        &self,
        publish: OutgoingPublish,
        waiter: Option<AckWaiter>,
    ) -> Result<(), MqttLinkError> {
        let mut acks = lock(&self.acks);
        if self.is_closing() {
            return Err(MqttLinkError::Closed);
        }
        if !*self.connected.borrow() {
            return Err(MqttLinkError::Disconnected);
        }
        self.client.try_publish(publish).map_err(|_| MqttLinkError::Busy)?;
        acks.queued(waiter);
        Ok(())
    }

    /// The device's status message, with the details last given to [`MqttLink::publish_status`].
    pub(crate) fn status(&self, online: bool) -> DeviceStatus {
        let (model_version, update) = lock(&self.status_details).clone();
        DeviceStatus { model_version, update, ..DeviceStatus::new(self.topics.device_id(), online) }
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    pub(crate) fn acks(&self) -> MutexGuard<'_, PubAckTracker<AckWaiter>> {
        lock(&self.acks)
    }

    pub(crate) fn set_connected(&self, connected: bool) {
        self.connected.send_replace(connected);
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Delivers a message to the receivers of its kind, and remembers it as the latest.
    pub(crate) fn dispatch(&self, message: InboundMessage) {
        lock(&self.latest).insert(message.kind, message.clone());
        if let Some(sender) = lock(&self.inbound).get(&message.kind) {
            // No receiver right now is fine: nobody asked for this kind yet.
            let _delivered = sender.send(message);
        }
    }

    /// The link is finished: not connected, every waiter failed, receivers see the end.
    pub(crate) fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.set_connected(false);
        for waiter in lock(&self.acks).drain() {
            let _gone = waiter.send(Err(MqttLinkError::Closed));
        }
        lock(&self.inbound).clear();
    }
}

/// Locks `mutex`, also after a panic elsewhere: every critical section here leaves consistent data.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
