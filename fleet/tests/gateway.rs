//! The offload gateway over the embedded broker, against a fake OpenAI-compatible upstream:
//! answers with the request id (and the id's 16 bytes as MQTT 5 correlation data), idempotency,
//! per-device and fleet budgets, failover between upstreams, and requests past their deadline.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use serde_json::{Value, json};
use tandem_core::budget::BudgetPolicy;
use tandem_core::protocol::{
    ChatMessage, DeviceTopics, OffloadOutcome, OffloadRequest, OffloadResponse, PROTOCOL_VERSION, Route,
    TopicKind,
};
use tandemd::offload::HttpsCloudConfig;
use uuid::Uuid;

use support::fleet::TestFleet;
use support::mqtt::{Login, TestClient};
use support::telemetry::{event, now_ms, payload};

/// A fake upstream: answers "cloud says: QUESTION"; "fail" gets a 503; counts calls and keeps the
/// idempotency keys it saw.
#[derive(Clone, Default)]
struct Upstream {
    calls: Arc<AtomicU32>,
    keys: Arc<std::sync::Mutex<Vec<String>>>,
    broken: bool,
}

async fn complete(State(upstream): State<Upstream>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    upstream.calls.fetch_add(1, Ordering::SeqCst);
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    upstream.keys.lock().unwrap().push(key);
    let question =
        body["messages"].as_array().and_then(|m| m.last()).and_then(|m| m["content"].as_str()).unwrap_or("");
    if upstream.broken || question == "fail" {
        return (StatusCode::SERVICE_UNAVAILABLE, "overloaded").into_response();
    }
    if question == "slow" {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    Json(json!({
        "id": "chatcmpl-1",
        "model": "fake-cloud",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("cloud says: {question}")}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    }))
    .into_response()
}

async fn start_upstream(upstream: Upstream) -> String {
    let app =
        axum::Router::new().route("/v1/chat/completions", axum::routing::post(complete)).with_state(upstream);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

fn upstream_config(url: &str) -> HttpsCloudConfig {
    HttpsCloudConfig {
        url: url.into(),
        model: "big".into(),
        api_key: None,
        timeout_ms: 5000,
        connect_timeout_ms: 1000,
        ca_file: None,
    }
}

fn request(device: &str, question: &str) -> OffloadRequest {
    OffloadRequest {
        v: PROTOCOL_VERSION,
        request_id: Uuid::now_v7(),
        device_id: device.into(),
        model_version: "m@1".into(),
        messages: vec![ChatMessage { role: "user".into(), content: question.into() }],
        max_tokens: 32,
        temperature: None,
        local_attempt: None,
        deadline_ms: now_ms() + 10_000,
    }
}

fn topic(device: &str, kind: TopicKind) -> String {
    DeviceTopics::new(device).unwrap().topic(kind)
}

/// A device connected over MQTT 5 and subscribed to its response topic.
async fn device(fleet: &TestFleet, id: &str) -> TestClient {
    let mut client = TestClient::connect(fleet.mqtt.unwrap(), Login::as_device(id, None)).await.unwrap();
    client.client.subscribe(topic(id, TopicKind::OffloadResponse), QoS::AtLeastOnce).await.unwrap();
    assert!(matches!(client.next_significant().await, Ok(Packet::SubAck(_))));
    client
}

/// Publishes `request` (with MQTT 5 correlation data) and returns the response and its
/// correlation data.
async fn ask(client: &mut TestClient, request: &OffloadRequest) -> (OffloadResponse, Option<Vec<u8>>) {
    let properties = PublishProperties {
        response_topic: Some(topic(&request.device_id, TopicKind::OffloadResponse)),
        correlation_data: Some(request.request_id.as_bytes().to_vec().into()),
        ..Default::default()
    };
    client
        .client
        .publish_with_properties(
            topic(&request.device_id, TopicKind::OffloadRequest),
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(request).unwrap(),
            properties,
        )
        .await
        .unwrap();
    // Both the request's PUBACK and the response, in either order: a PUBACK left unread would be
    // taken by the next `publish_acked` for its own.
    let (mut acked, mut answer) = (false, None);
    while !acked || answer.is_none() {
        match client.next_significant().await {
            Ok(Packet::PubAck(_)) if !acked => acked = true,
            Ok(Packet::Publish(publish)) if answer.is_none() => {
                let response: OffloadResponse = serde_json::from_slice(&publish.payload).unwrap();
                let correlation = publish.properties.and_then(|p| p.correlation_data).map(|c| c.to_vec());
                answer = Some((response, correlation));
            }
            other => panic!("{other:?}"),
        }
    }
    answer.expect("the loop ends with an answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offload_is_answered_once_and_a_repeated_request_id_from_the_record() {
    let upstream = Upstream::default();
    let url = start_upstream(upstream.clone()).await;
    let fleet = TestFleet::start(|config, _| config.gateway.upstream = vec![upstream_config(&url)]).await;
    let mut robot = device(&fleet, "robot-1").await;

    let question = request("robot-1", "what is 6 times 7?");
    let (response, correlation) = ask(&mut robot, &question).await;
    assert_eq!(response.request_id, question.request_id);
    assert_eq!(correlation.as_deref(), Some(&question.request_id.as_bytes()[..]), "the id's 16 raw bytes");
    assert_eq!(
        response.outcome,
        OffloadOutcome::Answer {
            content: "cloud says: what is 6 times 7?".into(),
            model: "fake-cloud".into(),
            prompt_tokens: 11,
            completion_tokens: 7
        }
    );
    let (again, _) = ask(&mut robot, &question).await;
    assert_eq!(again, response, "the retry gets the same answer");
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 1, "upstream was asked once");
    assert_eq!(upstream.keys.lock().unwrap().as_slice(), [question.request_id.to_string()]);
    assert_eq!(fleet.metric("tandem_fleet_gateway_requests_total{outcome=\"replayed\"}").await, 1.0);

    // The same id from another device is another request.
    let mut other = device(&fleet, "robot-2").await;
    let (response, _) =
        ask(&mut other, &OffloadRequest { device_id: "robot-2".into(), ..question.clone() }).await;
    assert!(matches!(response.outcome, OffloadOutcome::Answer { .. }));
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_refuse_a_device_that_asks_too_often_without_touching_others() {
    let upstream = Upstream::default();
    let url = start_upstream(upstream.clone()).await;
    let fleet = TestFleet::start(|config, _| {
        config.gateway.upstream = vec![upstream_config(&url)];
        config.gateway.device_budget =
            BudgetPolicy { cloud_fraction: 0.5, burst: 1, ..BudgetPolicy::default() };
        config.gateway.fleet_budget =
            BudgetPolicy { cloud_fraction: 0.5, burst: 1, ..BudgetPolicy::default() };
    })
    .await;
    let mut greedy = device(&fleet, "greedy").await;
    let (first, _) = ask(&mut greedy, &request("greedy", "one")).await;
    assert!(matches!(first.outcome, OffloadOutcome::Answer { .. }), "{first:?}");
    let (second, _) = ask(&mut greedy, &request("greedy", "two")).await;
    match &second.outcome {
        OffloadOutcome::Refused { reason } => assert!(reason.starts_with("device budget"), "{reason}"),
        other => panic!("{other:?}"),
    }

    // Local answers reported in telemetry earn cloud calls back (ρ = 1 at 50 %).
    let local = [event("greedy", "m@1", now_ms(), Route::Local, 50, 0)];
    greedy.publish_acked(&topic("greedy", TopicKind::Telemetry), payload("greedy", &local)).await;
    let (third, _) = ask(&mut greedy, &request("greedy", "three")).await;
    assert!(matches!(third.outcome, OffloadOutcome::Answer { .. }), "{third:?}");

    // The fleet gate (burst 1 + one local answer) is spent now, for everyone.
    let mut modest = device(&fleet, "modest").await;
    let (refused, _) = ask(&mut modest, &request("modest", "hello")).await;
    match &refused.outcome {
        OffloadOutcome::Refused { reason } => assert!(reason.starts_with("fleet budget"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 2);
    let budget = fleet.get("/v1/budget", None).await;
    assert_eq!(budget["fleet"]["cloud"], 2);
    assert_eq!(budget["devices"][0]["device"], "greedy");
    assert_eq!(budget["devices"][1]["budget"]["cloud"], 0, "the fleet's refusal cost `modest` nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_upstream_fails_over_to_the_next_and_errors_are_not_replayed() {
    let broken = Upstream { broken: true, ..Upstream::default() };
    let healthy = Upstream::default();
    let (broken_url, healthy_url) =
        (start_upstream(broken.clone()).await, start_upstream(healthy.clone()).await);
    let fleet = TestFleet::start(|config, _| {
        config.gateway.upstream = vec![upstream_config(&broken_url), upstream_config(&healthy_url)];
        config.gateway.attempts_per_upstream = 1;
    })
    .await;
    let mut robot = device(&fleet, "robot-1").await;
    let (response, _) = ask(&mut robot, &request("robot-1", "hi")).await;
    assert!(matches!(response.outcome, OffloadOutcome::Answer { .. }), "{response:?}");
    assert_eq!((broken.calls.load(Ordering::SeqCst), healthy.calls.load(Ordering::SeqCst)), (1, 1));

    let failing = request("robot-1", "fail");
    let (response, _) = ask(&mut robot, &failing).await;
    match response.outcome {
        OffloadOutcome::Error { retryable, .. } => assert!(retryable, "a 503 may pass on retry"),
        other => panic!("{other:?}"),
    }
    let before = healthy.calls.load(Ordering::SeqCst);
    let _ = ask(&mut robot, &failing).await;
    assert!(healthy.calls.load(Ordering::SeqCst) > before, "a retryable error is tried upstream again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_their_deadline_or_for_another_device_are_dropped() {
    let upstream = Upstream::default();
    let url = start_upstream(upstream.clone()).await;
    let fleet = TestFleet::start(|config, _| config.gateway.upstream = vec![upstream_config(&url)]).await;
    let mut robot = device(&fleet, "robot-1").await;
    let late = OffloadRequest { deadline_ms: now_ms() - 1, ..request("robot-1", "too late") };
    let ack = robot
        .publish_acked(&topic("robot-1", TopicKind::OffloadRequest), serde_json::to_vec(&late).unwrap())
        .await;
    assert_eq!(ack.reason, rumqttc::v5::mqttbytes::v5::PubAckReason::Success);
    let forged = request("robot-2", "on behalf of robot-2");
    robot
        .publish_acked(&topic("robot-1", TopicKind::OffloadRequest), serde_json::to_vec(&forged).unwrap())
        .await;
    let nothing = robot.next_within(Duration::from_millis(800)).await;
    assert!(!matches!(nothing, Some(Ok(Packet::Publish(_)))), "{nothing:?}");
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 0);
    assert_eq!(fleet.metric("tandem_fleet_gateway_requests_total{outcome=\"expired\"}").await, 1.0);
    assert_eq!(fleet.metric("tandem_fleet_gateway_requests_total{outcome=\"invalid\"}").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_upstream_devices_are_told_at_once() {
    let fleet = TestFleet::start(|_, _| {}).await;
    let mut robot = device(&fleet, "robot-1").await;
    let (response, _) = ask(&mut robot, &request("robot-1", "anyone?")).await;
    match response.outcome {
        OffloadOutcome::Error { retryable, message } => {
            assert!(!retryable);
            assert!(message.contains("no offload gateway"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}
