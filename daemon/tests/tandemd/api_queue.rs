//! The admission queue is bounded: one request more than `server.max_queue` is refused with 429 and
//! `Retry-After` instead of waiting without bound.

use std::time::Duration;

use tandemd::api::ApiSettings;

use crate::support::{FakeBackend, TestServer, error_body, hello, settings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after_and_frees_up_afterwards() {
    let backend = FakeBackend::echo().with_delay(Duration::from_millis(600));
    let server = TestServer::start_with(backend, ApiSettings { max_queue: 2, ..settings() }).await;
    let slow = |server: &TestServer| {
        let (client, url) = (server.client.clone(), server.url("/v1/chat/completions"));
        tokio::spawn(async move { client.post(url).json(&hello()).send().await.unwrap().status() })
    };
    let first = slow(&server);
    let second = slow(&server);
    server.wait_for_requests(2).await;

    let refused = server.chat(&hello()).await;
    assert_eq!(refused.headers()["retry-after"], "1");
    let body = error_body(refused, 429).await;
    assert_eq!(body["error"]["code"], "queue_full");
    assert_eq!(server.backend.request_count(), 2, "the refused request never reached the backend");

    let status: serde_json::Value = server.get("/v1/status").await.json().await.unwrap();
    assert_eq!(status["queue"], serde_json::json!({"depth": 2, "max": 2}));

    assert_eq!(first.await.unwrap(), 200);
    assert_eq!(second.await.unwrap(), 200);
    server.assert_still_serving().await;
}
