//! The model registry through the API: signed bundles are verified, stored and recorded; tampered,
//! unsigned and foreign bundles are refused; a registered version never changes; devices download
//! files with their own credentials, resuming with range requests; a device reads only its own
//! assignment. The same over HTTPS (`[api.tls]`, a test CA): the daemon's downloader trusting the CA
//! resumes a download, `tandemd update --ca-file` stages a bundle, assignment polls trusting the CA
//! arrive, a client that does not trust it is refused, and plain HTTP to the HTTPS port fails while
//! the port keeps serving. The same against a real S3-compatible server (moto, on loopback): a
//! bundle registered into the bucket is downloaded whole, by ranges and resumed, and an object
//! altered in the bucket is refused.

mod support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tandem_core::protocol::ModelAssignment;
use tandem_fleet::config::{ApiTlsConfig, FleetConfig, RegistryConfig, S3StoreConfig};
use tandem_fleet::devices_file::hash_password;
use tandemd::offload::{Secret, SecretSource};
use tandemd::updater::command::{UpdateArgs, UpdateOutcome, run_update};
use tandemd::updater::download::{DownloadOptions, Downloader};
use tandemd::updater::fleet_link::{FleetCredentials, follow_polls};

use support::bundle::{key, public_key, registry_trusting, write_bundle};
use support::fleet::{TestFleet, http};
use support::pki::TestPki;

const TOKEN: &str = "operator-token-123";
const DEVICE: &str = "robot-1";
const PASSWORD: &str = "robot-one-password-0123";
const OTHER: &str = "robot-2";
const OTHER_PASSWORD: &str = "robot-two-password-0123";

/// The operator's token and a devices file with two devices.
fn secure(config: &mut FleetConfig, dir: &Path) {
    let token = dir.join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    config.api.token = Some(SecretSource::File(token));
    let devices = dir.join("devices.toml");
    let entry = |id: &str, password: &str| {
        format!("[[device]]\nid = \"{id}\"\npassword = \"{}\"\n", hash_password(password))
    };
    std::fs::write(&devices, entry(DEVICE, PASSWORD) + &entry(OTHER, OTHER_PASSWORD)).unwrap();
    config.devices_file = Some(devices);
}

async fn fleet_with_registry() -> TestFleet {
    TestFleet::start(with_registry).await
}

fn with_registry(config: &mut FleetConfig, dir: &Path) {
    secure(config, dir);
    config.registry = Some(registry_trusting(dir, vec![public_key(dir, &key(1))]));
}

/// GET `path` of the fleet as device `DEVICE`, with `range` when given.
async fn device_get(fleet: &TestFleet, path: &str, range: Option<&str>) -> reqwest::Response {
    let mut request = fleet.client().get(fleet.api_url(path)).basic_auth(DEVICE, Some(PASSWORD));
    if let Some(range) = range {
        request = request.header("range", range);
    }
    request.send().await.unwrap()
}

async fn register(fleet: &TestFleet, bundle: &std::path::Path) -> (StatusCode, Value) {
    let response = fleet
        .client()
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
    assert_eq!(std::fs::read(copied.join("manifest.json")).unwrap(), manifest);
    assert!(copied.join(".verified.json").exists(), "the stored copy's check is recorded");

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
    let served = device_get(&fleet, "/v1/registry/tiny/1/model.onnx", None).await;
    assert_eq!(served.bytes().await.unwrap().as_ref(), b"graph-one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_download_files_with_their_credentials_and_resume_with_ranges() {
    let fleet = fleet_with_registry().await;
    let graph: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let bundle = write_bundle(fleet.dir.path(), "tiny", "1", &graph, Some(&key(1)));
    assert_eq!(register(&fleet, &bundle).await.0, StatusCode::CREATED);
    downloads_whole_by_ranges_and_resumed(&fleet, &bundle, &graph).await;

    for missing in [
        "/v1/registry/tiny/1/nothing",
        "/v1/registry/tiny/9/model.onnx",
        "/v1/registry/tiny/1/..%2Fx",
        "/v1/registry/tiny/1/.verified.json",
    ] {
        let response = device_get(&fleet, missing, None).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{missing}");
    }
    let listing =
        http().get(fleet.api_url("/v1/models")).basic_auth(DEVICE, Some(PASSWORD)).send().await.unwrap();
    assert_eq!(listing.status(), StatusCode::UNAUTHORIZED, "the operator routes still need the token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_https_devices_trusting_the_ca_download_by_ranges_and_resume_and_other_clients_are_refused() {
    let pki = TestPki::generate();
    let fleet = https_fleet_with_registry(&pki).await;
    let file = fleet.api_url("/v1/registry/tiny/1/model.onnx");
    assert!(file.starts_with("https://127.0.0.1:"), "{file}");
    let graph: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let bundle = write_bundle(fleet.dir.path(), "tiny", "1", &graph, Some(&key(1)));
    assert_eq!(register(&fleet, &bundle).await.0, StatusCode::CREATED);
    downloads_whole_by_ranges_and_resumed(&fleet, &bundle, &graph).await;

    // Trusting only the system roots: the handshake fails, for a plain client and the downloader.
    let error = http().get(&file).basic_auth(DEVICE, Some(PASSWORD)).send().await.unwrap_err();
    assert!(format!("{error:?}").contains("UnknownIssuer"), "{error:?}");
    let options = DownloadOptions { max_retries: 0, ..DownloadOptions::default() };
    let dest = tempfile::tempdir().unwrap();
    let refused = Downloader::new(options)
        .unwrap()
        .fetch_file(
            &reqwest::Url::parse(&file).unwrap(),
            &dest.path().join("model.onnx"),
            &tandem_core::bundle::FileDigest::of_bytes(&graph),
            &|_| {},
        )
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("certificate"), "{refused}");
    assert!(!dest.path().join("model.onnx").exists());

    // Plain HTTP to the HTTPS port fails, and the port keeps serving HTTPS afterwards.
    for _ in 0..3 {
        let plain = http().get(format!("http://{}/v1/registry/tiny/1/model.onnx", fleet.api)).send().await;
        assert!(plain.is_err(), "plain HTTP got an answer: {:?}", plain.map(|r| r.status()));
        let garbage = async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = tokio::net::TcpStream::connect(fleet.api).await.unwrap();
            stream.write_all(b"\x16\x03\x01\x00\x05hello").await.unwrap();
            let mut sink = Vec::new();
            let _ = stream.read_to_end(&mut sink).await;
        };
        tokio::time::timeout(Duration::from_secs(15), garbage).await.expect("a broken handshake is dropped");
    }
    let healthy = fleet.client().get(fleet.api_url("/healthz")).send().await.expect("still serving");
    assert_eq!(healthy.status(), StatusCode::OK);
    let served = device_get(&fleet, "/v1/registry/tiny/1/model.onnx", Some("bytes=0-9")).await;
    assert_eq!(served.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(served.bytes().await.unwrap().as_ref(), &graph[..10]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tandemd_update_with_a_ca_file_stages_a_bundle_from_the_https_registry() {
    let pki = TestPki::generate();
    let fleet = https_fleet_with_registry(&pki).await;
    let bundle = write_bundle(fleet.dir.path(), "tiny", "1", b"graph-one", Some(&key(1)));
    assert_eq!(register(&fleet, &bundle).await.0, StatusCode::CREATED);
    let password = fleet.dir.path().join("device-password");
    std::fs::write(&password, format!("{PASSWORD}\n")).unwrap();
    let (state, trusted) = (tempfile::tempdir().unwrap(), public_key(fleet.dir.path(), &key(1)));
    let update = |ca_file: &Path| {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            update: UpdateArgs,
        }
        let from = fleet.api_url("/v1/registry/tiny/1/");
        let args = [
            "tandemd-update",
            "--from",
            &from,
            "--state-dir",
            state.path().to_str().unwrap(),
            "--trusted-key",
            trusted.to_str().unwrap(),
            "--stage-only",
            "--device-id",
            DEVICE,
            "--password-file",
            password.to_str().unwrap(),
            "--ca-file",
            ca_file.to_str().unwrap(),
        ];
        <Cli as clap::Parser>::parse_from(args).update
    };

    let missing = run_update(&update(Path::new("/nonexistent/ca.pem")), &|_| {}).await.unwrap_err();
    assert!(missing.to_string().starts_with("--ca-file: cannot read /nonexistent/ca.pem"), "{missing}");
    let outcome = run_update(&update(&pki.ca), &|_| {}).await.expect("staged over HTTPS");
    let UpdateOutcome::Staged(staged) = outcome else { panic!("{outcome:?}") };
    assert_eq!(staged.bundle().version, "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assignment_polls_over_https_arrive_only_when_the_device_trusts_the_ca() {
    let pki = TestPki::generate();
    let fleet = https_fleet_with_registry(&pki).await;
    let assigned = ModelAssignment {
        v: tandem_core::protocol::PROTOCOL_VERSION,
        rollout_id: None,
        bundle_name: "tiny".into(),
        version: "1".into(),
        manifest_sha256: "ab".repeat(32),
        url: fleet.api_url("/v1/registry/tiny/1/"),
        assigned_at_ms: 1,
    };
    // Written as the rollout service writes it, without a rollout and its MQTT devices.
    let db = sqlx::SqlitePool::connect(&format!("sqlite://{}", fleet.db_path().display())).await.unwrap();
    sqlx::query(
        "INSERT INTO device_assignments (device_id, rollout_id, bundle_name, version, assigned_at_ms, payload) \
         VALUES ($1, NULL, 'tiny', '1', 1, $2)",
    )
    .bind(DEVICE)
    .bind(String::from_utf8(assigned.to_payload()).unwrap())
    .execute(&db)
    .await
    .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let poll = |extra_ca: &[reqwest::Certificate]| {
        let (sender, received) = tokio::sync::mpsc::channel(8);
        let credentials = FleetCredentials::Device { id: DEVICE.into(), password: Secret::new(PASSWORD) };
        let base = fleet.api_url("");
        let interval = Duration::from_secs(1);
        follow_polls(&base, DEVICE, Some(credentials), extra_ca, interval, sender, stop.clone()).unwrap();
        received
    };
    let (mut trusting, mut untrusting) = (poll(&fleet.extra_ca), poll(&[]));
    let polled = tokio::time::timeout(Duration::from_secs(10), trusting.recv()).await.expect("polled");
    assert_eq!(polled, Some(assigned));
    let refused = tokio::time::timeout(Duration::from_millis(2500), untrusting.recv()).await;
    assert!(refused.is_err(), "a device without the CA gets nothing: {refused:?}");
    stop.cancel();
}

async fn https_fleet_with_registry(pki: &TestPki) -> TestFleet {
    TestFleet::start(|config, dir| {
        with_registry(config, dir);
        config.api.tls =
            Some(ApiTlsConfig { cert_file: pki.server_cert.clone(), key_file: pki.server_key.clone() });
    })
    .await
    .trusting(&pki.ca)
}

/// Downloads `model.onnx` (`graph`) and the manifest of `tiny` 1 as `DEVICE`: whole, by ranges, an
/// interrupted download resumed, and with the daemon's downloader resuming a `.part` file.
async fn downloads_whole_by_ranges_and_resumed(fleet: &TestFleet, bundle: &Path, graph: &[u8]) {
    let path = "/v1/registry/tiny/1/model.onnx";
    let whole = device_get(fleet, path, None).await;
    assert_eq!(whole.status(), StatusCode::OK);
    assert_eq!(whole.headers()["accept-ranges"], "bytes");
    assert_eq!(whole.bytes().await.unwrap().as_ref(), graph);

    let len = graph.len();
    let rest = device_get(fleet, path, Some("bytes=123457-")).await;
    assert_eq!(rest.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(rest.headers()["content-range"], format!("bytes 123457-{}/{len}", len - 1));
    assert_eq!(rest.bytes().await.unwrap().as_ref(), &graph[123_457..]);

    let middle = device_get(fleet, path, Some("bytes=10-19")).await;
    assert_eq!(middle.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(middle.bytes().await.unwrap().as_ref(), &graph[10..20]);

    let tail = device_get(fleet, path, Some("bytes=-7")).await;
    assert_eq!(tail.bytes().await.unwrap().as_ref(), &graph[len - 7..]);

    let past = device_get(fleet, path, Some(&format!("bytes={len}-"))).await;
    assert_eq!(past.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(past.headers()["content-range"], format!("bytes */{len}"));

    // A connection dropped after the first chunk: the rest is asked for from where it stopped.
    let mut interrupted = device_get(fleet, path, None).await;
    let mut received = interrupted.chunk().await.unwrap().expect("a first chunk").to_vec();
    drop(interrupted);
    received.truncate(len / 3);
    let resumed = device_get(fleet, path, Some(&format!("bytes={}-", received.len()))).await;
    assert_eq!(resumed.status(), StatusCode::PARTIAL_CONTENT);
    received.extend_from_slice(&resumed.bytes().await.unwrap());
    assert_eq!(received, graph);

    // The daemon's downloader, with the device's credentials, finishing a half-written part file.
    let dest = tempfile::tempdir().unwrap();
    let file = dest.path().join("model.onnx");
    std::fs::write(dest.path().join("model.onnx.part"), &graph[..len / 2]).unwrap();
    let options = DownloadOptions {
        credentials: Some(FleetCredentials::Device { id: DEVICE.into(), password: Secret::new(PASSWORD) }),
        max_retries: 0,
        extra_ca: fleet.extra_ca.clone(),
        ..DownloadOptions::default()
    };
    let url = reqwest::Url::parse(&fleet.api_url(path)).unwrap();
    let expected = tandem_core::bundle::FileDigest::of_bytes(graph);
    Downloader::new(options).unwrap().fetch_file(&url, &file, &expected, &|_| {}).await.expect("downloaded");
    assert_eq!(std::fs::read(&file).unwrap(), graph);

    let manifest = device_get(fleet, "/v1/registry/tiny/1/manifest.json", None).await;
    assert_eq!(manifest.status(), StatusCode::OK);
    assert_eq!(manifest.bytes().await.unwrap(), std::fs::read(bundle.join("manifest.json")).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_and_assignments_need_a_devices_own_credentials() {
    let fleet = fleet_with_registry().await;
    let bundle = write_bundle(fleet.dir.path(), "tiny", "1", b"graph-one", Some(&key(1)));
    assert_eq!(register(&fleet, &bundle).await.0, StatusCode::CREATED);
    let file = fleet.api_url("/v1/registry/tiny/1/model.onnx");
    let own = fleet.api_url(&format!("/v1/devices/{DEVICE}/assignment"));

    for (who, request) in [
        ("nobody", http().get(&file)),
        ("a wrong password", http().get(&file).basic_auth(DEVICE, Some(OTHER_PASSWORD))),
        ("an unknown device", http().get(&file).basic_auth("robot-9", Some(PASSWORD))),
        ("a wrong token", http().get(&file).bearer_auth("not-the-token")),
        ("nobody, for an assignment", http().get(&own)),
        ("a wrong password, for an assignment", http().get(&own).basic_auth(DEVICE, Some("x"))),
    ] {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{who}");
        assert!(response.headers()["www-authenticate"].to_str().unwrap().starts_with("Basic"), "{who}");
    }

    for (who, request) in [
        ("the device", http().get(&file).basic_auth(DEVICE, Some(PASSWORD))),
        ("another device", http().get(&file).basic_auth(OTHER, Some(OTHER_PASSWORD))),
        ("the operator", http().get(&file).bearer_auth(TOKEN)),
    ] {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{who} downloads");
        assert_eq!(response.bytes().await.unwrap().as_ref(), b"graph-one");
    }

    // Nothing is assigned yet: the device and the operator are told so, another device is refused.
    let mine = http().get(&own).basic_auth(DEVICE, Some(PASSWORD)).send().await.unwrap();
    assert_eq!(mine.status(), StatusCode::NOT_FOUND);
    let operator = http().get(&own).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(operator.status(), StatusCode::NOT_FOUND);
    let theirs = http().get(&own).basic_auth(OTHER, Some(OTHER_PASSWORD)).send().await.unwrap();
    assert_eq!(theirs.status(), StatusCode::FORBIDDEN);
    let body: Value = theirs.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("its own assignment"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_without_a_devices_file_serves_devices_with_the_operators_token() {
    let fleet = TestFleet::start(|config, dir| {
        let token = dir.join("token");
        std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
        config.api.token = Some(SecretSource::File(token));
        config.registry = Some(registry_trusting(dir, vec![public_key(dir, &key(1))]));
    })
    .await;
    let bundle = write_bundle(fleet.dir.path(), "tiny", "1", b"graph-one", Some(&key(1)));
    assert_eq!(register(&fleet, &bundle).await.0, StatusCode::CREATED);
    let file = fleet.api_url("/v1/registry/tiny/1/model.onnx");
    assert_eq!(http().get(&file).send().await.unwrap().status(), StatusCode::UNAUTHORIZED);
    let basic = http().get(&file).basic_auth(DEVICE, Some(PASSWORD)).send().await.unwrap();
    assert_eq!(basic.status(), StatusCode::UNAUTHORIZED, "no devices file: no device passwords");
    assert_eq!(http().get(&file).bearer_auth(TOKEN).send().await.unwrap().status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_without_devices_file_or_token_serves_devices_whatever_they_send() {
    let fleet = TestFleet::start(|config, dir| {
        config.registry = Some(registry_trusting(dir, vec![public_key(dir, &key(1))]));
    })
    .await;
    let bundle = write_bundle(fleet.dir.path(), "tiny", "1", b"graph-one", Some(&key(1)));
    let response =
        http().post(fleet.api_url("/v1/models")).json(&json!({ "path": bundle })).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let file = fleet.api_url("/v1/registry/tiny/1/model.onnx");
    for request in [
        http().get(&file),
        http().get(&file).basic_auth(DEVICE, Some(PASSWORD)),
        http().get(&file).bearer_auth("x"),
    ] {
        assert_eq!(request.send().await.unwrap().status(), StatusCode::OK);
    }
    let theirs = http()
        .get(fleet.api_url(&format!("/v1/devices/{OTHER}/assignment")))
        .basic_auth(DEVICE, Some(PASSWORD));
    assert_eq!(
        theirs.send().await.unwrap().status(),
        StatusCode::NOT_FOUND,
        "nobody is known, nothing is checked"
    );
}

/// moto's S3-compatible server on a free loopback port, stopped when dropped.
struct S3Server {
    child: Child,
    endpoint: String,
}

impl S3Server {
    /// Starts `.venv-s3/bin/python -m moto.server` (installed by scripts/test-deps.sh).
    fn start() -> Self {
        let python = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv-s3/bin/python"));
        let installed = Command::new(&python)
            .args(["-c", "import moto.server"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            installed,
            "the S3 registry test needs moto's S3 server in .venv-s3 ({} -c 'import moto.server' failed): \
             run scripts/test-deps.sh (or `make test`), which installs it from PyPI",
            python.display()
        );
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(&python)
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto's server starts");
        let mut server = Self { child, endpoint: format!("http://127.0.0.1:{port}") };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!(
                    "moto's server exited at start ({status}); run it by hand to see why: {} -m moto.server",
                    python.display()
                );
            }
            assert!(started.elapsed() < Duration::from_secs(60), "moto's server did not listen on {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    /// Creates `bucket` (moto takes an unsigned request for that) and returns a client of it,
    /// outside the fleet.
    async fn bucket(&self, bucket: &str) -> AmazonS3 {
        let response = http().put(format!("{}/{bucket}", self.endpoint)).send().await.unwrap();
        assert!(response.status().is_success(), "creating the bucket: {}", response.status());
        AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_bucket_name(bucket)
            .with_region("us-east-1")
            .with_access_key_id("testing")
            .with_secret_access_key("testing")
            .build()
            .unwrap()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_in_an_s3_bucket_are_registered_downloaded_by_ranges_and_refused_once_altered() {
    let s3 = S3Server::start();
    let bucket = s3.bucket("models").await;
    let endpoint = s3.endpoint.clone();
    let mut fleet = TestFleet::start(|config, dir| {
        secure(config, dir);
        let (access, secret) = (dir.join("s3-access"), dir.join("s3-secret"));
        std::fs::write(&access, "testing\n").unwrap();
        std::fs::write(&secret, "testing\n").unwrap();
        config.registry = Some(RegistryConfig {
            dir: PathBuf::new(),
            trusted_keys: vec![public_key(dir, &key(1))],
            public_url: None,
        });
        config.registry_s3 = Some(S3StoreConfig {
            bucket: "models".into(),
            prefix: "fleet-a".into(),
            region: "us-east-1".into(),
            endpoint: Some(endpoint),
            access_key_id: Some(SecretSource::File(access)),
            secret_access_key: Some(SecretSource::File(secret)),
            session_token: None,
            path_style: true,
            allow_http: true,
        });
    })
    .await;
    // Over one S3 part, so it is stored in several.
    let graph: Vec<u8> = (0..9_500_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let bundle = write_bundle(fleet.dir.path(), "tiny", "1", &graph, Some(&key(1)));
    let (status, body) = register(&fleet, &bundle).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let stored = bucket.get(&ObjectPath::from("fleet-a/tiny/1/model.onnx")).await.unwrap();
    assert_eq!(stored.bytes().await.unwrap().as_ref(), &graph[..], "the bundle is in the bucket");
    bucket.head(&ObjectPath::from("fleet-a/tiny/1/.verified.json")).await.expect("its check is recorded");
    assert!(!fleet.dir.path().join("registry").exists(), "nothing is kept on the fleet host");

    downloads_whole_by_ranges_and_resumed(&fleet, &bundle, &graph).await;

    // Registered bundles are found in the bucket after a restart too.
    fleet.restart().await;
    let path = "/v1/registry/tiny/1/model.onnx";
    let again = device_get(&fleet, path, Some("bytes=5000000-5000009")).await;
    assert_eq!(again.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(again.bytes().await.unwrap().as_ref(), &graph[5_000_000..5_000_010]);

    // Someone with access to the bucket alters the graph (same size): it is no longer served.
    let mut altered = graph.clone();
    altered[1234] ^= 0xff;
    bucket.put(&ObjectPath::from("fleet-a/tiny/1/model.onnx"), PutPayload::from(altered)).await.unwrap();
    for range in [None, Some("bytes=0-99"), Some("bytes=1000-")] {
        let refused = device_get(&fleet, path, range).await;
        assert_eq!(refused.status(), StatusCode::CONFLICT, "{range:?}");
        let body: Value = refused.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains("no longer matches its manifest"), "{body}");
    }
    // The untouched files are still served.
    let manifest = device_get(&fleet, "/v1/registry/tiny/1/manifest.json", None).await;
    assert_eq!(manifest.status(), StatusCode::OK);
}
