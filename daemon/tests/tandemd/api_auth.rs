//! With `server.api_token` set, every route except `/healthz` needs the bearer token.

use tandemd::api::ApiSettings;
use tandemd::offload::Secret;

use crate::support::{FakeBackend, TestServer, error_body, hello, settings};

async fn server_with_token() -> TestServer {
    let settings = ApiSettings { api_token: Some(Secret::new("s3cret-token")), ..settings() };
    TestServer::start_with(FakeBackend::echo(), settings).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_the_token_are_401_except_healthz() {
    let server = server_with_token().await;
    assert_eq!(server.get("/healthz").await.status(), 200);
    for path in ["/v1/models", "/v1/status", "/metrics", "/nonexistent"] {
        let response = server.get(path).await;
        assert_eq!(response.headers()["www-authenticate"], "Bearer", "{path}");
        let body = error_body(response, 401).await;
        assert_eq!(body["error"]["code"], "invalid_api_key", "{path}");
    }
    error_body(server.chat(&hello()).await, 401).await;
    assert_eq!(server.backend.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_401_and_the_right_one_is_served() {
    let server = server_with_token().await;
    let wrong = server.client.get(server.url("/v1/models")).bearer_auth("s3cret-tokeN").send().await.unwrap();
    error_body(wrong, 401).await;
    let basic = server
        .client
        .get(server.url("/v1/models"))
        .basic_auth("s3cret-token", None::<&str>)
        .send()
        .await
        .unwrap();
    error_body(basic, 401).await;
    let right = server
        .client
        .post(server.url("/v1/chat/completions"))
        .bearer_auth("s3cret-token")
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 200);
    let metrics = server.client.get(server.url("/metrics")).bearer_auth("s3cret-token").send().await.unwrap();
    assert_eq!(metrics.status(), 200);
}
