//! The model registry through the API: signed bundles are verified, copied and recorded; tampered,
//! unsigned and foreign bundles are refused; a registered version never changes; devices download
//! files without the operator's token, resuming with range requests.

mod support;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tandem_fleet::config::RegistryConfig;
use tandemd::offload::SecretSource;

use support::bundle::{key, public_key, write_bundle};
use support::fleet::{TestFleet, http};

const TOKEN: &str = "operator-token-123";

async fn fleet_with_registry() -> TestFleet {
    TestFleet::start(|config, dir| {
        let token = dir.join("token");
        std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
        config.api.token = Some(SecretSource::File(token));
        config.registry = Some(RegistryConfig {
            dir: dir.join("registry"),
            trusted_keys: vec![public_key(dir, &key(1))],
            public_url: None,
        });
    })
    .await
}

async fn register(fleet: &TestFleet, bundle: &std::path::Path) -> (StatusCode, Value) {
    let response = http()
        .post(fleet.api_url("/v1/models"))
        .bearer_auth(TOKEN)
        .json(&json!({ "path": bundle }))
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_bundle_is_verified_copied_recorded_and_listed() {
    let fleet = fleet_with_registry().await;
    let bundle = write_bundle(fleet.dir.path(), "tiny", "1", b"graph-one", Some(&key(1)));
    let (status, body) = register(&fleet, &bundle).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["name"], "tiny");
    assert_eq!(body["version"], "1");
    assert_eq!(body["created"], true);
    assert_eq!(body["files"], 2);
    assert_eq!(body["evaluation"]["accuracy"], 0.75);
    assert_eq!(body["provenance"]["parent_version"], "0");
    let manifest = std::fs::read(bundle.join("manifest.json")).unwrap();
    assert_eq!(body["manifest_sha256"], tandem_core::bundle::FileDigest::of_bytes(&manifest).sha256);
    let copied = fleet.dir.path().join("registry/tiny/1");
    assert_eq!(std::fs::read(copied.join("model.onnx")).unwrap(), b"graph-one");
    assert_eq!(std::fs::read_dir(fleet.dir.path().join("registry/.staging")).unwrap().count(), 0);

    let (status, again) = register(&fleet, &bundle).await;
    assert_eq!(status, StatusCode::OK, "the same bundle again changes nothing");
    assert_eq!(again["created"], false);
    assert_eq!(again["registered_at_ms"], body["registered_at_ms"]);

    let listed = fleet.get("/v1/models", Some(TOKEN)).await;
    assert_eq!(listed["models"].as_array().unwrap().len(), 1);
    assert_eq!(listed["models"][0]["version"], "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_unsigned_and_foreign_bundles_are_refused() {
    let fleet = fleet_with_registry().await;
    let tampered = write_bundle(fleet.dir.path(), "tiny", "1", b"graph-one", Some(&key(1)));
    std::fs::write(tampered.join("model.onnx"), b"graph-two").unwrap();
    let unsigned = write_bundle(fleet.dir.path(), "tiny", "2", b"graph", None);
    let foreign = write_bundle(fleet.dir.path(), "tiny", "3", b"graph", Some(&key(9)));
    let extra = write_bundle(fleet.dir.path(), "tiny", "4", b"graph", Some(&key(1)));
    std::fs::write(extra.join("chat_template.jinja"), b"{{ evil }}").unwrap();
    for (bundle, needle) in [
        (&tampered, "model.onnx"),
        (&unsigned, "not signed"),
        (&foreign, "trusted"),
        (&extra, "chat_template.jinja"),
        (&fleet.dir.path().join("nothing-here"), "manifest.json"),
    ] {
        let (status, body) = register(&fleet, bundle).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.starts_with("the bundle is refused") && error.contains(needle), "{needle}: {error}");
    }
    assert_eq!(fleet.get("/v1/models", Some(TOKEN)).await["models"], json!([]));
    assert!(!fleet.dir.path().join("registry/tiny").exists(), "nothing refused was copied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_version_never_changes() {
    let fleet = fleet_with_registry().await;
    let first = write_bundle(fleet.dir.path(), "tiny", "1", b"graph-one", Some(&key(1)));
    let second = write_bundle(fleet.dir.path(), "tiny", "1", b"graph-two", Some(&key(1)));
    assert_eq!(register(&fleet, &first).await.0, StatusCode::CREATED);
    let (status, body) = register(&fleet, &second).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body["error"].as_str().unwrap().contains("new version"), "{body}");
    let served = http().get(fleet.api_url("/v1/registry/tiny/1/model.onnx")).send().await.unwrap();
    assert_eq!(served.bytes().await.unwrap().as_ref(), b"graph-one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_download_files_without_the_token_and_resume_with_ranges() {
    let fleet = fleet_with_registry().await;
    let graph: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let bundle = write_bundle(fleet.dir.path(), "tiny", "1", &graph, Some(&key(1)));
    assert_eq!(register(&fleet, &bundle).await.0, StatusCode::CREATED);
    let url = fleet.api_url("/v1/registry/tiny/1/model.onnx");

    let whole = http().get(&url).send().await.unwrap();
    assert_eq!(whole.status(), StatusCode::OK);
    assert_eq!(whole.headers()["accept-ranges"], "bytes");
    assert_eq!(whole.bytes().await.unwrap().as_ref(), &graph[..]);

    let rest = http().get(&url).header("range", "bytes=123457-").send().await.unwrap();
    assert_eq!(rest.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(rest.headers()["content-range"], "bytes 123457-199999/200000");
    assert_eq!(rest.bytes().await.unwrap().as_ref(), &graph[123_457..]);

    let middle = http().get(&url).header("range", "bytes=10-19").send().await.unwrap();
    assert_eq!(middle.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(middle.bytes().await.unwrap().as_ref(), &graph[10..20]);

    let past = http().get(&url).header("range", "bytes=200000-").send().await.unwrap();
    assert_eq!(past.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(past.headers()["content-range"], "bytes */200000");

    let manifest = http().get(fleet.api_url("/v1/registry/tiny/1/manifest.json")).send().await.unwrap();
    assert_eq!(manifest.status(), StatusCode::OK);
    assert_eq!(manifest.bytes().await.unwrap(), std::fs::read(bundle.join("manifest.json")).unwrap());

    for missing in
        ["/v1/registry/tiny/1/nothing", "/v1/registry/tiny/9/model.onnx", "/v1/registry/tiny/1/..%2Fx"]
    {
        let response = http().get(fleet.api_url(missing)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{missing}");
    }
    let listing = http().get(fleet.api_url("/v1/models")).send().await.unwrap();
    assert_eq!(listing.status(), StatusCode::UNAUTHORIZED, "the operator routes still need the token");
}
