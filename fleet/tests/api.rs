//! The operator API over HTTP: the bearer token, every documented path, parameter errors, and the
//! dashboard's data endpoint on a known workload.

mod support;

use reqwest::StatusCode;
use tandem_core::protocol::{DeviceTopics, Route, TopicKind};
use tandemd::offload::{HttpsCloudConfig, SecretSource};

use support::fleet::{TestFleet, http};
use support::mqtt::{Login, TestClient};
use support::telemetry::{event, now_ms, payload};

const TOKEN: &str = "operator-token-123";

async fn fleet_with_token() -> TestFleet {
    TestFleet::start(|config, dir| {
        let token = dir.join("token");
        std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
        config.api.token = Some(SecretSource::File(token));
        // An upstream nobody calls, so that the gateway (and /v1/budget) exists.
        config.gateway.upstream = vec![HttpsCloudConfig {
            url: "http://127.0.0.1:9".into(),
            model: "m".into(),
            api_key: None,
            timeout_ms: 100,
            connect_timeout_ms: 100,
            ca_file: None,
        }];
        config.registry = Some(support::bundle::registry_trusting(
            dir,
            vec![support::bundle::public_key(dir, &support::bundle::key(1))],
        ));
        let scheduler = format!("work_dir = {:?}", dir.join("jobs").display().to_string());
        config.scheduler = Some(toml::from_str(&scheduler).unwrap());
    })
    .await
}

async fn status(fleet: &TestFleet, path: &str, token: Option<&str>) -> StatusCode {
    let mut request = http().get(fleet.api_url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap().status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_routes_need_the_bearer_token_and_the_open_routes_do_not() {
    let fleet = fleet_with_token().await;
    assert_eq!(status(&fleet, "/v1/devices", None).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status(&fleet, "/v1/devices", Some("wrong")).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status(&fleet, "/v1/devices", Some(TOKEN)).await, StatusCode::OK);
    for open in
        ["/healthz", "/metrics", "/openapi.json", "/", "/assets/dashboard.js", "/assets/dashboard.css"]
    {
        assert_eq!(status(&fleet, open, None).await, StatusCode::OK, "{open}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_path_is_served() {
    let fleet = fleet_with_token().await;
    let document = fleet.get("/openapi.json", None).await;
    let paths = document["paths"].as_object().unwrap();
    assert!(paths.len() >= 19);
    // Paths with parameters are exercised by the registry and rollout tests.
    for (path, item) in paths.iter().filter(|(path, item)| !path.contains('{') && item.get("get").is_some()) {
        let code = status(&fleet, path, Some(TOKEN)).await;
        assert_eq!(code, StatusCode::OK, "{path} {item}");
    }
    assert_eq!(status(&fleet, "/v1/nothing-here", Some(TOKEN)).await, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_are_explained() {
    let fleet = fleet_with_token().await;
    for (path, needle) in [
        ("/v1/stats?from=10&to=5", "before"),
        ("/v1/stats?bucket=1w", "unit"),
        ("/v1/stats?from=0&to=100000000&bucket=1", "10000 buckets"),
        ("/v1/stats?group_by=colour", "group_by"),
        ("/v1/events?route=sideways", "route"),
        ("/v1/events?after=not-a-uuid", "after"),
        ("/v1/stats?color=red", "color"),
    ] {
        let response = http().get(fleet.api_url(path)).bearer_auth(TOKEN).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path}");
        let text = response.text().await.unwrap();
        assert!(text.contains(needle), "{path}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_data_reflects_what_was_ingested() {
    let fleet = fleet_with_token().await;
    let mut device =
        TestClient::connect(fleet.mqtt.unwrap(), Login::as_device("robot-1", None)).await.unwrap();
    let now = now_ms();
    let events: Vec<_> = (0..10)
        .map(|i| {
            let route = if i < 3 { Route::Cloud } else { Route::Local };
            event(
                "robot-1",
                if i % 2 == 0 { "m@1" } else { "m@2" },
                now - 60_000 + i,
                route,
                100 + i as u32,
                900,
            )
        })
        .collect();
    let telemetry = DeviceTopics::new("robot-1").unwrap().topic(TopicKind::Telemetry);
    device.publish_acked(&telemetry, payload("robot-1", &events)).await;

    let data = fleet.get("/v1/dashboard?window=1h", Some(TOKEN)).await;
    assert_eq!(data["totals"]["queries"], 10);
    assert_eq!(data["totals"]["cloud"], 3);
    assert!((data["totals"]["call_ratio"].as_f64().unwrap() - 0.3).abs() < 1e-9);
    assert_eq!(data["budget_fraction"], 0.3);
    let models: Vec<_> =
        data["series"].as_array().unwrap().iter().map(|s| s["model_version"].as_str().unwrap()).collect();
    assert_eq!(models, ["m@1", "m@2"]);
    let local: u64 = data["latency"]["local"]["histogram"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b[1].as_u64().unwrap())
        .sum();
    assert_eq!(local, 10);
    assert_eq!(data["latency"]["cloud"]["percentiles"]["p50"], 900);
    assert_eq!(data["devices"][0]["id"], "robot-1");
    assert_eq!(data["devices"][0]["queries"], 10);
    assert_eq!(data["gateway"]["cloud"], 0);
}
