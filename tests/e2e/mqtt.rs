//! The device's MQTT link against a real Mosquitto broker: offload round trips through a test
//! gateway (MQTT 5 and 3.1.1), timeouts, PUBACK-acknowledged telemetry, broker outages and
//! restarts, the retained status and last will, and the broker's per-device ACL.

use std::future::Future;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tandem_core::protocol::{
    ChatMessage, DeviceStatus, DeviceTopics, OffloadOutcome, OffloadRequest, OffloadResponse,
    PROTOCOL_VERSION, Route, TelemetryBatch, TelemetryBudget, TelemetryEvent, TokenCounts, TopicKind,
    Transport, parse_device_topic,
};
use tandemd::mqtt::{MqttConfig, MqttLink, MqttLinkError, MqttProtocol, PublishOptions};
use tandemd::offload::{MqttOffload, OffloadError, OffloadTransport};
use tandemd::telemetry::{MqttTelemetryPublisher, PublishError, TelemetryPublisher};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::support::mosquitto::{Access, Mosquitto, TestPki};

const DEVICE: &str = "robot-1";
/// No test may take longer than this.
const TEST_LIMIT: Duration = Duration::from_secs(60);
/// Longest wait for anything that should happen "soon" (a connection, a message).
const SOON: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Offload

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offload_round_trip_through_the_gateway_over_mqtt5() {
    bounded(offload_round_trip(MqttProtocol::V5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offload_round_trip_through_the_gateway_over_mqtt311() {
    bounded(offload_round_trip(MqttProtocol::V311)).await;
}

async fn offload_round_trip(protocol: MqttProtocol) {
    let broker = Mosquitto::start();
    let mut gateway = Gateway::start(&broker).await;
    let link = connected_link(&device_config(&broker, protocol)).await;
    let offload = MqttOffload::new(link.clone());
    assert_eq!(offload.kind(), Transport::Mqtt);

    let request = offload_request("what is 6 times 7?");
    let answer = offload.ask(&request, SOON).await.expect("the gateway answers");
    assert_eq!(answer.content, "cloud says: what is 6 times 7?");
    assert_eq!(
        (answer.model.as_str(), answer.prompt_tokens, answer.completion_tokens),
        ("test-cloud", 11, 7)
    );
    assert_eq!(answer.transport, Transport::Mqtt);

    let seen = gateway.next_request().await;
    assert_eq!(seen.request, request, "the request arrives as sent");
    let topics = link.topics();
    match protocol {
        MqttProtocol::V5 => {
            assert_eq!(seen.response_topic, Some(topics.topic(TopicKind::OffloadResponse)));
            assert_eq!(seen.correlation_data.as_deref(), Some(&request.request_id.as_bytes()[..]));
        }
        MqttProtocol::V311 => assert_eq!((seen.response_topic, seen.correlation_data), (None, None)),
    }

    // The gateway sent garbage, an answer to an unknown request and the answer twice: all ignored.
    let again = offload.ask(&offload_request("and 6 times 8?"), SOON).await.expect("still answered");
    assert_eq!(again.content, "cloud says: and 6 times 8?");

    let refused = offload.ask(&offload_request("refuse"), SOON).await.unwrap_err();
    assert_eq!(refused, OffloadError::Refused("fleet budget exhausted".into()));
    let failed = offload.ask(&offload_request("fail"), SOON).await.unwrap_err();
    assert_eq!(failed, OffloadError::Unreachable("upstream returned 503".into()));
    assert!(failed.is_retryable());
    let broken = offload.ask(&offload_request("break"), SOON).await.unwrap_err();
    assert_eq!(broken, OffloadError::InvalidResponse("upstream rejected the prompt".into()));
    link.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offload_times_out_when_no_gateway_answers() {
    bounded(async {
        let broker = Mosquitto::start();
        let link = connected_link(&device_config(&broker, MqttProtocol::V5)).await;
        let offload = MqttOffload::new(link);
        let timeout = Duration::from_millis(400);
        let started = Instant::now();
        let error = offload.ask(&offload_request("anyone there?"), timeout).await.unwrap_err();
        assert_eq!(error, OffloadError::Timeout(timeout));
        assert!(started.elapsed() < timeout + Duration::from_secs(1), "{:?}", started.elapsed());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offload_fails_fast_while_the_broker_is_unreachable() {
    bounded(async {
        let mut broker = Mosquitto::start();
        let config = device_config(&broker, MqttProtocol::V5);
        broker.stop();
        // The link starts although the broker is down, and keeps trying in the background.
        let link = MqttLink::connect(&config, DEVICE).expect("starts without a broker");
        let offload = MqttOffload::new(link.clone());
        let started = Instant::now();
        let error = offload.ask(&offload_request("hello?"), SOON).await.unwrap_err();
        assert!(matches!(error, OffloadError::Unreachable(_)), "{error:?}");
        assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
        broker.start_again();
        let _gateway = Gateway::start(&broker).await;
        assert!(link.wait_connected(SOON).await, "connects once the broker is up");
        offload.ask(&offload_request("hello?"), SOON).await.expect("answered after the broker came up");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offload_works_again_after_the_broker_restarts_and_forgot_every_subscription() {
    bounded(async {
        for protocol in [MqttProtocol::V5, MqttProtocol::V311] {
            let mut broker = Mosquitto::start();
            let mut gateway = Gateway::start(&broker).await;
            let link = connected_link(&device_config(&broker, protocol)).await;
            let offload = MqttOffload::new(link.clone());
            offload.ask(&offload_request("before"), SOON).await.expect("answered before the restart");

            broker.stop();
            eventually("the link notices the outage", || !link.is_connected()).await;
            broker.start_again();
            gateway.wait_subscribed(2).await;
            assert!(link.wait_connected(SOON).await, "{protocol:?}: reconnects");

            let answer = offload.ask(&offload_request("after"), SOON).await;
            assert_eq!(
                answer.expect("answered after the restart").content,
                "cloud says: after",
                "{protocol:?}"
            );
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Telemetry and acknowledged publishing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_batches_reach_the_fleet_and_resolve_on_the_brokers_puback() {
    bounded(async {
        let broker = Mosquitto::start();
        let mut fleet = FleetClient::connect(&broker, &DeviceTopics::all_devices(TopicKind::Telemetry)).await;
        let link = connected_link(&device_config(&broker, MqttProtocol::V311)).await;
        let publisher = MqttTelemetryPublisher::new(link.clone());

        let batch = telemetry_batch(3);
        publisher.publish(&batch).await.expect("acknowledged");
        let received = fleet.next_message().await;
        assert_eq!(received.topic, link.topics().topic(TopicKind::Telemetry));
        let sent: TelemetryBatch = serde_json::from_slice(&received.payload).expect("a TelemetryBatch");
        assert_eq!(sent, batch);

        // Frozen broker: the connection stays open but nothing is acknowledged, so nothing resolves.
        broker.pause();
        let waiting = tokio::spawn({
            let publisher = publisher.clone();
            let batch = telemetry_batch(1);
            async move { publisher.publish(&batch).await }
        });
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(!waiting.is_finished(), "resolved without a PUBACK");
        broker.resume();
        waiting.await.expect("task").expect("acknowledged once the broker runs again");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_publish_times_out() {
    bounded(async {
        let broker = Mosquitto::start();
        let config = MqttConfig { ack_timeout_ms: 300, ..device_config(&broker, MqttProtocol::V5) };
        let link = connected_link(&config).await;
        broker.pause();
        let topic = link.topics().topic(TopicKind::Telemetry);
        let error = link.publish_acked(&topic, b"{}".to_vec(), PublishOptions::default()).await.unwrap_err();
        assert!(
            matches!(error, MqttLinkError::AckTimeout(t) if t == Duration::from_millis(300)),
            "{error:?}"
        );
        broker.resume();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_fails_fast_during_a_broker_outage_and_works_after_it() {
    bounded(async {
        for protocol in [MqttProtocol::V5, MqttProtocol::V311] {
            let mut broker = Mosquitto::start();
            let link = connected_link(&device_config(&broker, protocol)).await;
            let publisher = MqttTelemetryPublisher::new(link.clone());
            publisher.publish(&telemetry_batch(1)).await.expect("acknowledged before the outage");

            broker.stop();
            eventually("the link notices the outage", || !link.is_connected()).await;
            let started = Instant::now();
            let error = publisher.publish(&telemetry_batch(2)).await.unwrap_err();
            assert!(matches!(error, PublishError::Disconnected(_)), "{protocol:?}: {error:?}");
            let topic = link.topics().topic(TopicKind::Telemetry);
            let error =
                link.publish_acked(&topic, b"{}".to_vec(), PublishOptions::default()).await.unwrap_err();
            assert!(matches!(error, MqttLinkError::Disconnected), "{protocol:?}: {error:?}");
            assert!(started.elapsed() < Duration::from_millis(500), "not fast: {:?}", started.elapsed());

            broker.start_again();
            let mut fleet =
                FleetClient::connect(&broker, &DeviceTopics::all_devices(TopicKind::Telemetry)).await;
            assert!(link.wait_connected(SOON).await, "{protocol:?}: reconnects");
            let batch = telemetry_batch(2);
            publisher.publish(&batch).await.expect("acknowledged after the outage");
            let received = fleet.next_message().await;
            assert_eq!(serde_json::from_slice::<TelemetryBatch>(&received.payload).expect("batch"), batch);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_another_device_is_not_published() {
    bounded(async {
        let broker = Mosquitto::start();
        let link = connected_link(&device_config(&broker, MqttProtocol::V5)).await;
        let mut batch = telemetry_batch(1);
        batch.device_id = "robot-2".into();
        let error = MqttTelemetryPublisher::new(link).publish(&batch).await.unwrap_err();
        assert!(matches!(error, PublishError::Rejected(_)), "{error:?}");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Status and last will

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retained_status_says_online_and_the_last_will_says_offline() {
    bounded(async {
        let broker = Mosquitto::start();
        let status_topic = DeviceTopics::new(DEVICE).expect("device id").topic(TopicKind::Status);
        let mut fleet = FleetClient::connect(&broker, &status_topic).await;
        let config = device_config(&broker, MqttProtocol::V5);

        let link = connected_link(&config).await;
        assert!(fleet.next_status().await.online);
        let mut late = FleetClient::connect(&broker, &status_topic).await;
        assert_eq!(late.next_retained_status().await, Some(true), "the online status is retained");

        drop(link); // abrupt: no DISCONNECT, so the broker publishes the will
        assert!(!fleet.next_status().await.online, "offline through the last will");
        let mut late = FleetClient::connect(&broker, &status_topic).await;
        assert_eq!(late.next_retained_status().await, Some(false), "the will is retained");

        let link = connected_link(&config).await;
        assert!(fleet.next_status().await.online);
        link.shutdown().await;
        assert!(!fleet.next_status().await.online, "offline on a clean shutdown");
        let mut late = FleetClient::connect(&broker, &status_topic).await;
        assert_eq!(late.next_retained_status().await, Some(false), "the offline status is retained");

        let error = link.publish_acked(&status_topic, b"{}".to_vec(), PublishOptions::default()).await;
        assert!(matches!(error, Err(MqttLinkError::Closed)), "{error:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_receives_its_retained_assignment_and_later_ones() {
    bounded(async {
        let broker = Mosquitto::start();
        let assignment_topic = DeviceTopics::new(DEVICE).expect("device id").topic(TopicKind::Assignment);
        let mut fleet = FleetClient::connect(&broker, &DeviceTopics::all_devices(TopicKind::Status)).await;
        fleet.publish(&assignment_topic, b"{\"version\":\"1\"}", true).await;

        let link = connected_link(&device_config(&broker, MqttProtocol::V311)).await;
        eventually("the retained assignment arrives", || link.latest(TopicKind::Assignment).is_some()).await;
        let mut assignments = link.messages(TopicKind::Assignment);
        let first = link.latest(TopicKind::Assignment).expect("latest assignment");
        assert_eq!((first.payload.as_slice(), first.retained), (&b"{\"version\":\"1\"}"[..], true));

        fleet.publish(&assignment_topic, b"{\"version\":\"2\"}", true).await;
        let second = tokio::time::timeout(SOON, assignments.recv()).await.expect("in time").expect("open");
        assert_eq!(
            (second.kind, second.payload.as_slice()),
            (TopicKind::Assignment, &b"{\"version\":\"2\"}"[..])
        );
        assert_eq!(link.latest(TopicKind::Assignment), Some(second));
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Broker ACL

const ACL: &str = "user fleet\ntopic readwrite tandem/v1/#\n\npattern readwrite tandem/v1/devices/%u/#\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_acl_refuses_publishing_on_another_devices_topic_over_mqtt5() {
    bounded(async {
        let users = [(DEVICE, "pw-robot-1"), ("robot-2", "pw-robot-2"), ("fleet", "pw-fleet")];
        let broker = Mosquitto::start_with(Access::Acl { users: &users, acl: ACL });
        let secrets = tempfile::tempdir().expect("temporary directory");
        let password_file = secrets.path().join("mqtt-password");
        std::fs::write(&password_file, "pw-robot-1\n").expect("password file");
        let config = MqttConfig {
            password_file: Some(password_file.to_string_lossy().into_owned()),
            ..device_config(&broker, MqttProtocol::V5)
        };
        let link = connected_link(&config).await;

        let own = link.topics().topic(TopicKind::Telemetry);
        let foreign = DeviceTopics::new("robot-2").expect("device id").topic(TopicKind::Telemetry);
        link.publish_acked(&own, b"{}".to_vec(), PublishOptions::default()).await.expect("own topic");
        let error =
            link.publish_acked(&foreign, b"{}".to_vec(), PublishOptions::default()).await.unwrap_err();
        match &error {
            MqttLinkError::Rejected(reason) => assert!(reason.contains("NotAuthorized"), "{reason}"),
            other => panic!("expected a refusal, got {other:?}\n{}", broker.log()),
        }
        assert!(link.is_connected(), "a refused publish does not cost the connection");

        // Many publishes at once, allowed and refused interleaved: each caller gets the broker's
        // answer to its own publish, so acknowledgements are matched by packet id, not by luck.
        let publishes: Vec<_> = (0..60)
            .map(|i| {
                let (link, topic) = (link.clone(), if i % 3 == 0 { foreign.clone() } else { own.clone() });
                tokio::spawn(async move {
                    let payload = format!("{{\"n\":{i}}}").into_bytes();
                    (i, link.publish_acked(&topic, payload, PublishOptions::default()).await)
                })
            })
            .collect();
        for publish in publishes {
            let (i, result) = publish.await.expect("publish task");
            match (i % 3 == 0, result) {
                (true, Err(MqttLinkError::Rejected(_))) | (false, Ok(())) => {}
                (foreign, result) => panic!("publish {i} (foreign topic: {foreign}) got {result:?}"),
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_with_a_wrong_password_is_not_let_in() {
    bounded(async {
        let users = [(DEVICE, "pw-robot-1")];
        let broker = Mosquitto::start_with(Access::Acl { users: &users, acl: ACL });
        let secrets = tempfile::tempdir().expect("temporary directory");
        let password_file = secrets.path().join("mqtt-password");
        std::fs::write(&password_file, "wrong\n").expect("password file");
        let config = MqttConfig {
            password_file: Some(password_file.to_string_lossy().into_owned()),
            ..device_config(&broker, MqttProtocol::V311)
        };
        let link = MqttLink::connect(&config, DEVICE).expect("starts");
        assert!(!link.wait_connected(Duration::from_secs(1)).await, "let in with a wrong password");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// TLS

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_with_a_private_ca_and_a_client_certificate() {
    bounded(async {
        let pki = TestPki::generate();
        let broker = Mosquitto::start_with(Access::MutualTls { pki: &pki });
        let config = MqttConfig {
            url: broker.tls_url(),
            ca_file: Some(pki.ca.clone()),
            client_cert_file: Some(pki.client_cert.clone()),
            client_key_file: Some(pki.client_key.clone()),
            ..device_config(&broker, MqttProtocol::V5)
        };
        let link = connected_link(&config).await;
        let topic = link.topics().topic(TopicKind::Telemetry);
        link.publish_acked(&topic, b"{}".to_vec(), PublishOptions::default())
            .await
            .expect("acknowledged over TLS");

        let anonymous = MqttConfig { client_cert_file: None, client_key_file: None, ..config.clone() };
        let link = MqttLink::connect(&anonymous, DEVICE).expect("starts");
        assert!(!link.wait_connected(Duration::from_secs(1)).await, "let in without a client certificate");

        let untrusting = MqttConfig { ca_file: Some(pki.client_cert.clone()), ..config };
        let link = MqttLink::connect(&untrusting, DEVICE).expect("starts");
        assert!(!link.wait_connected(Duration::from_secs(1)).await, "trusted a broker from an unknown CA");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Device side

fn device_config(broker: &Mosquitto, protocol: MqttProtocol) -> MqttConfig {
    MqttConfig {
        protocol,
        keep_alive_secs: 5,
        ack_timeout_ms: 5_000,
        reconnect_min_ms: 50,
        reconnect_max_ms: 400,
        ..MqttConfig::new(broker.url())
    }
}

async fn connected_link(config: &MqttConfig) -> MqttLink {
    let link = MqttLink::connect(config, DEVICE).expect("valid configuration");
    assert!(link.wait_connected(SOON).await, "the link did not connect to {}", config.url);
    link
}

fn offload_request(question: &str) -> OffloadRequest {
    OffloadRequest {
        v: PROTOCOL_VERSION,
        request_id: Uuid::now_v7(),
        device_id: DEVICE.into(),
        model_version: "test-model@1".into(),
        messages: vec![ChatMessage { role: "user".into(), content: question.into() }],
        max_tokens: 64,
        temperature: None,
        local_attempt: None,
        deadline_ms: 0,
    }
}

fn telemetry_batch(events: usize) -> TelemetryBatch {
    let event = |i: usize| TelemetryEvent {
        id: Uuid::now_v7(),
        device_id: DEVICE.into(),
        model_version: "test-model@1".into(),
        at_ms: 1_700_000_000_000 + i as u64,
        route: Route::Cloud,
        help_requested: true,
        help_probability: Some(0.75),
        local_tokens: TokenCounts { prompt: 12, completion: 30 },
        local_latency_ms: 250,
        cloud_tokens: TokenCounts { prompt: 12, completion: 40 },
        cloud_latency_ms: 900,
        transport: Some(Transport::Mqtt),
        budget: TelemetryBudget { cloud_share: 0.25, calls_available: 3 },
        error_class: None,
        prompt: None,
        local_answer: None,
        cloud_answer: None,
    };
    TelemetryBatch { v: PROTOCOL_VERSION, device_id: DEVICE.into(), events: (0..events).map(event).collect() }
}

// ---------------------------------------------------------------------------------------------
// Fleet side: an MQTT 5 client of the broker, and the offload gateway built on it

/// Subscribes to one filter on every connection (reconnecting after broker restarts) and hands
/// over what arrives.
pub(crate) struct FleetClient {
    client: AsyncClient,
    pub(crate) inbox: mpsc::UnboundedReceiver<Publish>,
    subscriptions: watch::Receiver<u32>,
    pubacks: watch::Receiver<u32>,
    _poller: AbortOnDrop,
}

impl FleetClient {
    pub(crate) async fn connect(broker: &Mosquitto, filter: &str) -> Self {
        let client_id = format!("fleet-{}", Uuid::now_v7().simple());
        let mut options = MqttOptions::new(client_id, "127.0.0.1", broker.port());
        options.set_keep_alive(Duration::from_secs(5)).set_credentials("fleet", "pw-fleet");
        let (client, mut events) = AsyncClient::new(options, 64);
        let (messages, inbox) = mpsc::unbounded_channel();
        let (subscribed, subscriptions) = watch::channel(0u32);
        let (acknowledged, pubacks) = watch::channel(0u32);
        let (poll_client, filter) = (client.clone(), filter.to_string());
        let poller = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _queued =
                            poll_client.try_subscribe_many([Filter::new(filter.clone(), QoS::AtLeastOnce)]);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => subscribed.send_modify(|n| *n += 1),
                    Ok(Event::Incoming(Packet::PubAck(_))) => acknowledged.send_modify(|n| *n += 1),
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        let _receiver_gone = messages.send(publish);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        let mut fleet = Self { client, inbox, subscriptions, pubacks, _poller: AbortOnDrop(poller) };
        fleet.wait_subscribed(1).await;
        fleet
    }

    async fn wait_subscribed(&mut self, times: u32) {
        let subscribed = tokio::time::timeout(SOON, self.subscriptions.wait_for(|n| *n >= times)).await;
        assert!(subscribed.is_ok_and(|r| r.is_ok()), "the fleet client did not subscribe {times} times");
    }

    async fn next_message(&mut self) -> Received {
        let publish = tokio::time::timeout(SOON, self.inbox.recv())
            .await
            .expect("a message within the time limit")
            .expect("the fleet client is running");
        Received {
            topic: String::from_utf8(publish.topic.to_vec()).expect("UTF-8 topic"),
            payload: publish.payload.to_vec(),
            retain: publish.retain,
        }
    }

    /// Publishes with QoS 1 and returns once the broker acknowledged it (one publish at a time).
    async fn publish(&mut self, topic: &str, payload: &[u8], retain: bool) {
        let before = *self.pubacks.borrow_and_update();
        self.client.publish(topic, QoS::AtLeastOnce, retain, payload.to_vec()).await.expect("queued");
        let acked = tokio::time::timeout(SOON, self.pubacks.wait_for(|n| *n > before)).await;
        assert!(acked.is_ok_and(|r| r.is_ok()), "the broker did not acknowledge the fleet's publish");
    }

    /// The next status message of the device.
    async fn next_status(&mut self) -> DeviceStatus {
        let message = self.next_message().await;
        let status: DeviceStatus = serde_json::from_slice(&message.payload).expect("a status payload");
        assert_eq!(status.device_id, DEVICE);
        status
    }

    /// `online` of the status the broker delivered from its retained store right after
    /// subscribing; `None` when the first message was not a retained one.
    async fn next_retained_status(&mut self) -> Option<bool> {
        let message = self.next_message().await;
        let status: DeviceStatus = serde_json::from_slice(&message.payload).expect("a status payload");
        message.retain.then_some(status.online)
    }
}

/// A message as the fleet received it.
struct Received {
    topic: String,
    payload: Vec<u8>,
    retain: bool,
}

/// An offload request as the gateway saw it.
pub(crate) struct SeenRequest {
    pub(crate) request: OffloadRequest,
    response_topic: Option<String>,
    correlation_data: Option<Vec<u8>>,
}

/// Answers offload requests the way docs/protocol.md says the fleet gateway does; the question
/// picks the outcome ("refuse", "fail", "break", anything else is answered). Before each real
/// answer it sends a malformed payload and an answer to an unknown request, and it sends the real
/// answer twice, so devices must ignore all of that.
pub(crate) struct Gateway {
    seen: mpsc::UnboundedReceiver<SeenRequest>,
    subscriptions: watch::Receiver<u32>,
    _fleet_poller: AbortOnDrop,
    _answerer: AbortOnDrop,
}

impl Gateway {
    pub(crate) async fn start(broker: &Mosquitto) -> Self {
        let fleet = FleetClient::connect(broker, &DeviceTopics::all_devices(TopicKind::OffloadRequest)).await;
        let FleetClient { client, mut inbox, subscriptions, _poller, .. } = fleet;
        let (record, seen) = mpsc::unbounded_channel();
        let answerer = tokio::spawn(async move {
            while let Some(publish) = inbox.recv().await {
                let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                let properties = publish.properties.clone().unwrap_or_default();
                let Ok(request) = serde_json::from_slice::<OffloadRequest>(&publish.payload) else {
                    continue;
                };
                let Some((device, _)) = parse_device_topic(&topic) else { continue };
                let response_topic = properties.response_topic.clone().unwrap_or_else(|| {
                    DeviceTopics::new(&device).expect("device id").topic(TopicKind::OffloadResponse)
                });
                let reply = |payload: Vec<u8>, correlation: Option<Vec<u8>>| {
                    let properties = PublishProperties {
                        correlation_data: correlation.map(Into::into),
                        ..Default::default()
                    };
                    let _queued = client.try_publish_with_properties(
                        response_topic.clone(),
                        QoS::AtLeastOnce,
                        false,
                        payload,
                        properties,
                    );
                };
                reply(b"{\"this is\": not json".to_vec(), None);
                let stranger = Uuid::now_v7();
                let unknown = response(stranger, OffloadOutcome::Refused { reason: "not yours".into() });
                reply(unknown, Some(stranger.as_bytes().to_vec()));
                let answer = response(request.request_id, outcome_for(&request));
                reply(answer.clone(), properties.correlation_data.as_ref().map(|c| c.to_vec()));
                reply(answer, properties.correlation_data.as_ref().map(|c| c.to_vec()));
                let _test_gone = record.send(SeenRequest {
                    request,
                    response_topic: properties.response_topic,
                    correlation_data: properties.correlation_data.map(|c| c.to_vec()),
                });
            }
        });
        Self { seen, subscriptions, _fleet_poller: _poller, _answerer: AbortOnDrop(answerer) }
    }

    pub(crate) async fn next_request(&mut self) -> SeenRequest {
        tokio::time::timeout(SOON, self.seen.recv())
            .await
            .expect("a request in time")
            .expect("gateway running")
    }

    async fn wait_subscribed(&mut self, times: u32) {
        let subscribed = tokio::time::timeout(SOON, self.subscriptions.wait_for(|n| *n >= times)).await;
        assert!(subscribed.is_ok_and(|r| r.is_ok()), "the gateway did not subscribe {times} times");
    }
}

fn outcome_for(request: &OffloadRequest) -> OffloadOutcome {
    let question = request.messages.last().map(|m| m.content.as_str()).unwrap_or_default();
    match question {
        "refuse" => OffloadOutcome::Refused { reason: "fleet budget exhausted".into() },
        "fail" => OffloadOutcome::Error { message: "upstream returned 503".into(), retryable: true },
        "break" => OffloadOutcome::Error { message: "upstream rejected the prompt".into(), retryable: false },
        _ => OffloadOutcome::Answer {
            content: format!("cloud says: {question}"),
            model: "test-cloud".into(),
            prompt_tokens: 11,
            completion_tokens: 7,
        },
    }
}

fn response(request_id: Uuid, outcome: OffloadOutcome) -> Vec<u8> {
    let response = OffloadResponse { v: PROTOCOL_VERSION, request_id, outcome };
    serde_json::to_vec(&response).expect("a response serialises")
}

// ---------------------------------------------------------------------------------------------
// Test plumbing

/// Aborts the task when dropped, so that a finished test leaves nothing running.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn bounded<F: Future<Output = ()>>(test: F) {
    tokio::time::timeout(TEST_LIMIT, test).await.expect("the test finished within its time limit");
}

async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + SOON;
    while !condition() {
        assert!(Instant::now() < deadline, "{what}: did not happen within {SOON:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
