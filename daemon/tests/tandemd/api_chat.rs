//! Happy paths of `POST /v1/chat/completions`: JSON and server-sent events, with the route in a
//! header and in the `tandem` object.

use serde_json::{Value, json};
use tandem_core::protocol::Route;

use crate::support::{FakeBackend, MODEL_ID, TestServer, hello, sse_data};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_answer_is_an_openai_chat_completion_with_the_route_in_header_and_body() {
    let server = TestServer::start(FakeBackend::echo()).await;
    let response = server.chat(&hello()).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-tandem-route"], "local");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(body["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(body["model"], MODEL_ID);
    assert_eq!(body["choices"][0]["index"], 0);
    assert_eq!(body["choices"][0]["message"], json!({"role": "assistant", "content": "echo: hello there"}));
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"], json!({"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}));
    assert_eq!(
        body["tandem"],
        json!({"route": "local", "help_probability": 0.25, "cloud_model": null, "fallback_reason": null,
               "local_ms": 12, "cloud_ms": 0})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_answer_names_the_cloud_route_and_model() {
    let server = TestServer::start(FakeBackend::echo().with_route(Route::Cloud)).await;
    let response = server.chat(&hello()).await;
    assert_eq!(response.headers()["x-tandem-route"], "cloud");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["tandem"]["route"], "cloud");
    assert_eq!(body["tandem"]["cloud_model"], "big-cloud-model");
    assert_eq!(body["tandem"]["cloud_ms"], 34);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_fallback_says_why() {
    let server = TestServer::start(FakeBackend::echo().with_route(Route::LocalFallback)).await;
    let response = server.chat(&hello()).await;
    assert_eq!(response.headers()["x-tandem-route"], "local_fallback");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["tandem"]["fallback_reason"], "budget_ratio");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_parameters_reach_the_backend_and_defaults_fill_the_rest() {
    let server = TestServer::start(FakeBackend::echo()).await;
    let response = server
        .chat(&json!({
            "model": "any-name-is-accepted",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]}
            ],
            "max_tokens": 9, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "seed": 42, "stop": "END",
            "n": 1, "user": "u-1"
        }))
        .await;
    assert_eq!(response.status(), 200);
    let request = server.backend.last_request();
    assert_eq!(request.messages.len(), 2);
    assert_eq!(request.messages[1].content, "part one\npart two");
    assert_eq!(request.max_tokens, Some(9));
    assert_eq!(
        (request.temperature, request.top_p, request.top_k, request.seed),
        (Some(0.7), Some(0.9), Some(5), Some(42))
    );
    assert_eq!(request.stop, ["END"]);

    server.chat(&hello()).await;
    let request = server.backend.last_request();
    assert_eq!(request.max_tokens, Some(256), "generation.max_tokens is the default");
    assert_eq!(request.temperature, None, "greedy by default");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_answer_is_sse_chunks_ending_with_the_route_and_done() {
    let server = TestServer::start(FakeBackend::echo().with_route(Route::Cloud)).await;
    let mut request = hello();
    request["stream"] = json!(true);
    request["stream_options"] = json!({"include_usage": true});
    let response = server.chat(&request).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-tandem-route"], "pending");
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let data = sse_data(response).await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> =
        data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["id"], id, "every chunk has the completion's id");
        assert_eq!(chunk["model"], MODEL_ID);
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect::<Vec<_>>()
        .concat();
    assert_eq!(text, "echo: hello there");

    // The chunk with finish_reason carries the route; only it does.
    let finish =
        chunks.iter().position(|c| !c["choices"][0]["finish_reason"].is_null()).expect("a finish chunk");
    assert_eq!(chunks[finish]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[finish]["tandem"]["route"], "cloud");
    assert_eq!(chunks[finish]["tandem"]["cloud_model"], "big-cloud-model");
    assert_eq!(chunks.iter().filter(|c| c.get("tandem").is_some()).count(), 1);

    // include_usage: one more chunk with no choices and the usage.
    let usage = &chunks[finish + 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["total_tokens"], 14);
    assert_eq!(chunks.len(), finish + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_include_usage_has_no_usage_chunk() {
    let server = TestServer::start(FakeBackend::echo()).await;
    let mut request = hello();
    request["stream"] = json!(true);
    let data = sse_data(server.chat(&request).await).await;
    let chunks: Vec<Value> =
        data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["tandem"]["route"], "local");
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
}
