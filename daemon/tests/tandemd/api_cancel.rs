//! A client that goes away mid-request cancels the generation (the backend sees its CancelToken
//! triggered), for JSON and for streaming answers.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;

use crate::support::{Behaviour, FakeBackend, TestServer, eventually, hello};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_before_the_answer_cancels_the_generation() {
    let server = TestServer::start(FakeBackend::echo().with_behaviour(Behaviour::Hang)).await;
    let result = server
        .client
        .post(server.url("/v1/chat/completions"))
        .json(&hello())
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(result.is_err(), "the client gave up");
    eventually(|| server.backend.all_cancelled(), "the backend to see the cancellation").await;
    eventually(|| server.backend.finished.load(Ordering::SeqCst) == 1, "the backend call to end").await;
    let metrics = server.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains(r#"tandem_requests_total{route="none",status="499"} 1"#), "{metrics}");
    eventually_queue_is_empty(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_drops_a_stream_cancels_the_generation() {
    let server = TestServer::start(FakeBackend::echo().with_behaviour(Behaviour::StreamThenHang)).await;
    let mut request = hello();
    request["stream"] = json!(true);
    let response = server.chat(&request).await;
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut received = String::new();
    while !received.contains("first") {
        let chunk = body.next().await.expect("more events").unwrap();
        received.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(!server.backend.all_cancelled());
    drop(body);
    eventually(|| server.backend.all_cancelled(), "the backend to see the cancellation").await;
    eventually_queue_is_empty(&server).await;
}

async fn eventually_queue_is_empty(server: &TestServer) {
    for _ in 0..500 {
        let status: serde_json::Value = server.get("/v1/status").await.json().await.unwrap();
        if status["queue"]["depth"] == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the admission permit was never released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_client_that_leaves_before_any_text_cancels_the_generation() {
    let server = TestServer::start(FakeBackend::echo().with_behaviour(Behaviour::Hang)).await;
    let mut request = hello();
    request["stream"] = json!(true);
    let result = server
        .client
        .post(server.url("/v1/chat/completions"))
        .json(&request)
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(result.is_err(), "no response starts before the first text");
    eventually(|| server.backend.all_cancelled(), "the backend to see the cancellation").await;
    eventually_queue_is_empty(&server).await;
}
