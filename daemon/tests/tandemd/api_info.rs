//! `GET /v1/models`, `/healthz`, `/v1/status` and `/metrics`.

use serde_json::{Value, json};
use tandem_core::protocol::Route;

use crate::support::{FakeBackend, MODEL_ID, TestServer, hello};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_lists_the_served_model_in_openai_format() {
    let server = TestServer::start(FakeBackend::echo()).await;
    let body: Value = server.get("/v1/models").await.json().await.unwrap();
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
    assert_eq!(body["data"][0]["id"], MODEL_ID);
    assert_eq!(body["data"][0]["object"], "model");
    assert!(body["data"][0]["created"].is_u64() && body["data"][0]["owned_by"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_ok_until_shutdown_begins_and_then_503() {
    let server = TestServer::start(FakeBackend::echo()).await;
    // One connection for both requests: a new one is not accepted once shutdown began.
    let response = server.get("/healthz").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap(), json!({"status": "ok"}));
    server.shutdown.begin();
    if let Ok(response) = server.client.get(server.url("/healthz")).send().await {
        assert_eq!(response.status(), 503);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_model_provider_budget_spool_and_version() {
    let server = TestServer::start(FakeBackend::echo()).await;
    let body: Value = server.get("/v1/status").await.json().await.unwrap();
    assert_eq!(body["model"]["id"], MODEL_ID);
    assert_eq!(body["model"]["version"], "1.2.3");
    assert_eq!(body["provider"], "cpu");
    assert_eq!(body["budget"]["cloud_fraction"], 0.3);
    assert_eq!(body["budget"]["calls_available"], 2);
    assert_eq!(body["spool"], json!({"events": 7, "dropped": 2}));
    assert_eq!(body["offload_enabled"], true);
    assert_eq!(body["device_id"], "test-device");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    assert!(body["uptime_secs"].is_u64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_by_route_and_status_and_read_live_gauges() {
    let server = TestServer::start(FakeBackend::echo().with_route(Route::Cloud)).await;
    server.chat(&hello()).await;
    server.chat(&hello()).await;
    server.chat(&json!({"messages": []})).await;
    let response = server.get("/metrics").await;
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    let text = response.text().await.unwrap();
    for expected in [
        r#"tandem_requests_total{route="cloud",status="200"} 2"#,
        r#"tandem_requests_total{route="none",status="400"} 1"#,
        r#"tandem_tokens_total{kind="prompt",route="cloud"} 22"#,
        r#"tandem_tokens_total{kind="completion",route="cloud"} 6"#,
        r#"tandem_request_duration_seconds_count{route="cloud"} 2"#,
        "tandem_queue_depth 0",
        "tandem_budget_cloud_share 0.3",
        "tandem_budget_calls_available 2",
        "tandem_budget_cloud_fraction 0.3",
        "tandem_spool_events 7",
        "tandem_spool_dropped_total 2",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docs_api_md_names_every_metric_and_error_code() {
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.md")).unwrap();
    let server = TestServer::start(FakeBackend::echo()).await;
    server.chat(&hello()).await;
    let text = server.get("/metrics").await.text().await.unwrap();
    for line in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let mut parts = line.split_whitespace();
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        let documented = if kind == "counter" { format!("`{name}_total`") } else { format!("`{name}`") };
        assert!(docs.contains(&documented), "docs/api.md does not document {documented}");
    }
    for code in [
        "invalid_json",
        "invalid_utf8",
        "invalid_body",
        "unknown_parameter",
        "missing_required_parameter",
        "invalid_type",
        "invalid_value",
        "invalid_request",
        "invalid_api_key",
        "unknown_url",
        "method_not_allowed",
        "request_too_large",
        "unsupported_media_type",
        "queue_full",
        "busy",
        "internal_error",
        "shutting_down",
        "request_timeout",
    ] {
        assert!(docs.contains(&format!("| `{code}` |")), "docs/api.md does not document error code {code}");
    }
}
