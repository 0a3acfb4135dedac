//! Every malformed request gets the right status and an OpenAI-style error body, and the server
//! keeps serving afterwards. Backend errors map to statuses the same way.

use std::time::Duration;

use serde_json::json;
use tandemd::api::ApiSettings;
use tandemd::chat::ChatError;

use crate::support::{Behaviour, FakeBackend, TestServer, error_body, hello, settings, sse_data};

async fn post_raw(
    server: &TestServer,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    let mut request = server.client.post(server.url("/v1/chat/completions")).body(body);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    request.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_400() {
    let server = TestServer::start(FakeBackend::echo()).await;
    let body = error_body(post_raw(&server, Some("application/json"), "{\"messages\": [").await, 400).await;
    assert_eq!(body["error"]["code"], "invalid_json");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    server.assert_still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_not_json_content_is_415() {
    let server = TestServer::start(FakeBackend::echo()).await;
    let json = serde_json::to_vec(&hello()).unwrap();
    let body = error_body(post_raw(&server, Some("text/plain"), json.clone()).await, 415).await;
    assert_eq!(body["error"]["code"], "unsupported_media_type");
    error_body(post_raw(&server, None, json.clone()).await, 415).await;
    let ok = post_raw(&server, Some("application/json; charset=utf-8"), json).await;
    assert_eq!(ok.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_field_is_400_naming_the_field() {
    let server = TestServer::start(FakeBackend::echo()).await;
    let mut request = hello();
    request["logit_bias"] = json!({});
    let body = error_body(server.chat(&request).await, 400).await;
    assert_eq!(body["error"]["code"], "unknown_parameter");
    assert_eq!(body["error"]["param"], "logit_bias");
    assert!(body["error"]["message"].as_str().unwrap().contains("logit_bias"));
    server.assert_still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_messages_and_empty_content_are_400() {
    let server = TestServer::start(FakeBackend::echo()).await;
    let body = error_body(server.chat(&json!({"messages": []})).await, 400).await;
    assert_eq!(body["error"]["param"], "messages");
    let body =
        error_body(server.chat(&json!({"messages": [{"role": "user", "content": ""}]})).await, 400).await;
    assert_eq!(body["error"]["param"], "messages[0].content");
    let body = error_body(server.chat(&json!({"model": "m"})).await, 400).await;
    assert_eq!(body["error"]["code"], "missing_required_parameter");
    assert_eq!(server.backend.request_count(), 0, "invalid requests never reach the backend");
    server.assert_still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_one_choice_is_400() {
    let server = TestServer::start(FakeBackend::echo()).await;
    let mut request = hello();
    request["n"] = json!(2);
    let body = error_body(server.chat(&request).await, 400).await;
    assert_eq!(body["error"]["param"], "n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_is_413() {
    let server =
        TestServer::start_with(FakeBackend::echo(), ApiSettings { max_body_bytes: 2048, ..settings() }).await;
    let big = json!({"messages": [{"role": "user", "content": "x".repeat(4096)}]});
    let body = error_body(server.chat(&big).await, 413).await;
    assert_eq!(body["error"]["code"], "request_too_large");
    // Also when the client streams the body without announcing its length.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
        Ok(b"{\"messages\":[{\"role\":\"user\",\"content\":\"".to_vec()),
        Ok(vec![b'y'; 4096]),
        Ok(b"\"}]}".to_vec()),
    ];
    let streamed = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    error_body(post_raw(&server, Some("application/json"), streamed).await, 413).await;
    server.assert_still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_is_400() {
    let server = TestServer::start(FakeBackend::echo()).await;
    let mut bytes = br#"{"messages":[{"role":"user","content":""#.to_vec();
    bytes.extend_from_slice(&[0xff, 0xfe]);
    bytes.extend_from_slice(br#""}]}"#);
    let body = error_body(post_raw(&server, Some("application/json"), bytes).await, 400).await;
    assert_eq!(body["error"]["code"], "invalid_utf8");
    server.assert_still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_methods_get_openai_style_errors() {
    let server = TestServer::start(FakeBackend::echo()).await;
    let body = error_body(server.get("/v1/completions").await, 404).await;
    assert_eq!(body["error"]["code"], "unknown_url");
    let body = error_body(server.get("/v1/chat/completions").await, 405).await;
    assert_eq!(body["error"]["code"], "method_not_allowed");
}

async fn status_for_backend_error(error: ChatError, stream: bool) -> reqwest::Response {
    let server = TestServer::start(FakeBackend::echo().with_behaviour(Behaviour::Fail(error))).await;
    let mut request = hello();
    request["stream"] = json!(stream);
    server.chat(&request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_errors_map_to_http_statuses() {
    for stream in [false, true] {
        let body = error_body(
            status_for_backend_error(ChatError::Invalid("prompt too long".into()), stream).await,
            400,
        )
        .await;
        assert_eq!(body["error"]["message"], "prompt too long");
        let busy = status_for_backend_error(ChatError::Busy { retry_after_secs: 7 }, stream).await;
        assert_eq!(busy.headers()["retry-after"], "7");
        error_body(busy, 429).await;
        error_body(status_for_backend_error(ChatError::ShuttingDown, stream).await, 503).await;
        let body =
            error_body(status_for_backend_error(ChatError::Internal("boom".into()), stream).await, 500).await;
        assert_eq!(body["error"]["type"], "server_error");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_fails_after_text_ends_with_an_error_event_and_done() {
    let backend = FakeBackend::echo()
        .with_behaviour(Behaviour::FailAfterText(ChatError::Internal("engine died".into())));
    let server = TestServer::start(backend).await;
    let mut request = hello();
    request["stream"] = json!(true);
    let response = server.chat(&request).await;
    assert_eq!(response.status(), 200);
    let data = sse_data(response).await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let error: serde_json::Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], "internal_error");
    assert_eq!(error["error"]["message"], "engine died");
    assert!(data.iter().any(|d| d.contains("partial")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_time_limit_is_cancelled_with_504() {
    let backend = FakeBackend::echo().with_behaviour(Behaviour::Hang);
    let settings = ApiSettings { request_timeout: Duration::from_millis(200), ..settings() };
    let server = TestServer::start_with(backend, settings).await;
    let body = error_body(server.chat(&hello()).await, 504).await;
    assert_eq!(body["error"]["code"], "request_timeout");
    assert!(server.backend.all_cancelled(), "the generation was cancelled");
}
