//! The HTTPS offload transport and the offload client against real HTTP servers on loopback:
//! answers, timeouts, retries with one idempotency key, invalid answers, unreachable endpoints,
//! failover, the circuit breaker, the total deadline, and TLS with a private CA (`openssl s_server`).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tandem_core::protocol::{ChatMessage, OffloadRequest, PROTOCOL_VERSION, Transport};
use tandemd::offload::{
    CircuitBreakerConfig, CloudClient, HttpsCloudConfig, HttpsOffload, HttpsSetupError, OffloadConfig,
    OffloadError, OffloadTransport, SecretSource,
};
use uuid::Uuid;

/// What the test server saw: headers and JSON body of each request.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(HeaderMap, Value)>>>);

impl Seen {
    fn push(&self, headers: HeaderMap, body: &Bytes) {
        let value = serde_json::from_slice(body).unwrap_or(Value::Null);
        self.0.lock().expect("seen").push((headers, value));
    }
    fn len(&self) -> usize {
        self.0.lock().expect("seen").len()
    }
    fn header(&self, index: usize, name: &str) -> Option<String> {
        let seen = self.0.lock().expect("seen");
        seen.get(index)?.0.get(name)?.to_str().ok().map(String::from)
    }
    fn body(&self, index: usize) -> Value {
        self.0.lock().expect("seen")[index].1.clone()
    }
}

fn completion(content: &str) -> Value {
    json!({
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "cloud-model-2025",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
    })
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// A server answering every POST with `answer(call number, headers, body)`.
async fn serve_with<F>(seen: Seen, answer: F) -> SocketAddr
where
    F: Fn(u32) -> Response + Clone + Send + Sync + 'static,
{
    let calls = Arc::new(AtomicU32::new(0));
    let app = Router::new().route(
        "/v1/chat/completions",
        post(move |headers: HeaderMap, body: Bytes| {
            let seen = seen.clone();
            let answer = answer.clone();
            let calls = Arc::clone(&calls);
            async move {
                seen.push(headers, &body);
                answer(calls.fetch_add(1, Ordering::SeqCst))
            }
        }),
    );
    serve(app).await
}

/// An address nothing listens on.
fn dead_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

fn https_config(addr: SocketAddr) -> HttpsCloudConfig {
    HttpsCloudConfig {
        url: format!("http://{addr}"),
        model: "cloud-model".into(),
        api_key: None,
        timeout_ms: 2000,
        connect_timeout_ms: 500,
        ca_file: None,
    }
}

fn offload_config(https: HttpsCloudConfig) -> OffloadConfig {
    OffloadConfig {
        https: Some(https),
        mqtt: false,
        order: Vec::new(),
        attempts_per_transport: 1,
        retry_backoff_ms: 20,
        deadline_ms: 5000,
        circuit_breaker: CircuitBreakerConfig { failure_threshold: 5, open_ms: 30_000 },
        send_local_attempt: false,
    }
}

fn client(config: &OffloadConfig, transports: &[HttpsCloudConfig]) -> CloudClient {
    let transports = transports
        .iter()
        .map(|c| Arc::new(HttpsOffload::new(c).expect("transport")) as Arc<dyn OffloadTransport>)
        .collect();
    CloudClient::new(config, transports)
}

fn request() -> OffloadRequest {
    OffloadRequest {
        v: PROTOCOL_VERSION,
        request_id: Uuid::now_v7(),
        device_id: "robot-7".into(),
        model_version: "1.2.0".into(),
        messages: vec![ChatMessage { role: "user".into(), content: "What is 6 x 7?".into() }],
        max_tokens: 64,
        temperature: Some(0.5),
        local_attempt: None,
        deadline_ms: 0,
    }
}

#[tokio::test]
async fn answers_from_an_openai_compatible_endpoint_with_key_and_idempotency_headers() {
    let seen = Seen::default();
    let addr = serve_with(seen.clone(), |_| axum::Json(completion("42")).into_response()).await;
    let key_dir = tempfile::tempdir().expect("tempdir");
    let key_file = key_dir.path().join("cloud.key");
    std::fs::write(&key_file, "sk-test-123\n").expect("write key");
    let mut https = https_config(addr);
    https.api_key = Some(SecretSource::File(key_file));
    let config = offload_config(https.clone());
    let request = request();
    let id = request.request_id.to_string();

    let answer = client(&config, &[https]).ask(request).await.expect("answer");

    assert_eq!(answer.content, "42");
    assert_eq!(answer.model, "cloud-model-2025");
    assert_eq!((answer.prompt_tokens, answer.completion_tokens), (12, 5));
    assert_eq!(answer.transport, Transport::Https);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen.header(0, "authorization").as_deref(), Some("Bearer sk-test-123"));
    assert_eq!(seen.header(0, "idempotency-key"), Some(id.clone()));
    assert_eq!(seen.header(0, "x-request-id"), Some(id));
    let body = seen.body(0);
    assert_eq!(body["model"], "cloud-model");
    assert_eq!(body["max_tokens"], 64);
    assert_eq!(body["temperature"], 0.5);
    assert_eq!(body["messages"], json!([{"role": "user", "content": "What is 6 x 7?"}]));
}

#[tokio::test]
async fn answer_without_usage_counts_zero_tokens_and_no_key_sends_no_authorization() {
    let seen = Seen::default();
    let addr = serve_with(seen.clone(), |_| {
        axum::Json(json!({"choices": [{"message": {"content": "hi"}}]})).into_response()
    })
    .await;
    let https = https_config(addr);
    let answer = client(&offload_config(https.clone()), &[https]).ask(request()).await.expect("answer");
    assert_eq!((answer.content.as_str(), answer.prompt_tokens, answer.completion_tokens), ("hi", 0, 0));
    assert_eq!(answer.model, "cloud-model");
    assert_eq!(seen.header(0, "authorization"), None);
}

#[tokio::test]
async fn slow_endpoint_times_out_within_the_attempt_timeout() {
    let app = Router::new().route(
        "/v1/chat/completions",
        post(|| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            axum::Json(completion("late"))
        }),
    );
    let addr = serve(app).await;
    let mut https = https_config(addr);
    https.timeout_ms = 300;
    let started = Instant::now();
    let result = client(&offload_config(https.clone()), &[https]).ask(request()).await;
    let took = started.elapsed();
    assert_eq!(result, Err(OffloadError::Timeout(Duration::from_millis(300))));
    assert!(took >= Duration::from_millis(290) && took < Duration::from_millis(1500), "took {took:?}");
}

#[tokio::test]
async fn server_error_is_retried_with_the_same_idempotency_key() {
    let seen = Seen::default();
    let addr = serve_with(seen.clone(), |call| {
        if call == 0 {
            (StatusCode::INTERNAL_SERVER_ERROR, "upstream exploded").into_response()
        } else {
            axum::Json(completion("second time lucky")).into_response()
        }
    })
    .await;
    let https = https_config(addr);
    let mut config = offload_config(https.clone());
    config.attempts_per_transport = 2;
    let request = request();
    let id = request.request_id.to_string();

    let answer = client(&config, &[https]).ask(request).await.expect("answer on retry");

    assert_eq!(answer.content, "second time lucky");
    assert_eq!(seen.len(), 2);
    assert_eq!(seen.header(0, "idempotency-key"), Some(id.clone()));
    assert_eq!(seen.header(1, "idempotency-key"), Some(id));
}

#[tokio::test]
async fn garbage_body_is_an_invalid_response_and_not_retried() {
    let seen = Seen::default();
    let addr = serve_with(seen.clone(), |_| "<html>definitely not json</html>".into_response()).await;
    let https = https_config(addr);
    let mut config = offload_config(https.clone());
    config.attempts_per_transport = 3;
    let error = client(&config, &[https]).ask(request()).await.expect_err("garbage");
    assert!(matches!(error, OffloadError::InvalidResponse(_)), "{error}");
    assert_eq!(seen.len(), 1);
}

#[tokio::test]
async fn json_without_choices_is_an_invalid_response() {
    let addr =
        serve_with(Seen::default(), |_| axum::Json(json!({"object": "list", "data": []})).into_response())
            .await;
    let https = https_config(addr);
    let error =
        client(&offload_config(https.clone()), &[https]).ask(request()).await.expect_err("no choices");
    assert!(matches!(&error, OffloadError::InvalidResponse(m) if m.contains("choices")), "{error}");
}

#[tokio::test]
async fn client_error_status_reports_the_first_200_characters_and_is_not_retried() {
    let seen = Seen::default();
    let addr =
        serve_with(seen.clone(), |_| (StatusCode::BAD_REQUEST, "é".repeat(1000)).into_response()).await;
    let https = https_config(addr);
    let mut config = offload_config(https.clone());
    config.attempts_per_transport = 3;
    let error = client(&config, &[https]).ask(request()).await.expect_err("400");
    match error {
        OffloadError::HttpStatus { status, body } => {
            assert_eq!(status, 400);
            assert_eq!(body.chars().count(), 200);
        }
        other => panic!("expected HttpStatus, got {other}"),
    }
    assert_eq!(seen.len(), 1);
}

#[tokio::test]
async fn refused_connection_is_unreachable() {
    let https = https_config(dead_addr());
    let error = client(&offload_config(https.clone()), &[https]).ask(request()).await.expect_err("refused");
    assert!(matches!(error, OffloadError::Unreachable(_)), "{error}");
}

#[tokio::test]
async fn fails_over_from_a_dead_endpoint_to_a_working_one() {
    let seen = Seen::default();
    let working = https_config(
        serve_with(seen.clone(), |_| axum::Json(completion("from the backup")).into_response()).await,
    );
    let dead = https_config(dead_addr());
    let mut config = offload_config(dead.clone());
    config.attempts_per_transport = 2;
    let request = request();
    let id = request.request_id.to_string();

    let answer = client(&config, &[dead, working]).ask(request).await.expect("failover");

    assert_eq!(answer.content, "from the backup");
    assert_eq!(seen.header(0, "idempotency-key"), Some(id));
}

#[tokio::test]
async fn breaker_opens_after_threshold_failures_skips_the_transport_and_closes_after_a_good_trial() {
    let seen = Seen::default();
    let healthy = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&healthy);
    let addr = serve_with(seen.clone(), move |_| {
        if flag.load(Ordering::SeqCst) {
            axum::Json(completion("back")).into_response()
        } else {
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
    })
    .await;
    let https = https_config(addr);
    let mut config = offload_config(https.clone());
    config.circuit_breaker = CircuitBreakerConfig { failure_threshold: 2, open_ms: 300 };
    let client = client(&config, &[https]);

    for _ in 0..2 {
        let error = client.ask(request()).await.expect_err("503");
        assert!(matches!(error, OffloadError::HttpStatus { status: 503, .. }), "{error}");
    }
    assert_eq!(client.breaker_states(), vec![(Transport::Https, "open")]);
    let error = client.ask(request()).await.expect_err("open");
    assert!(matches!(error, OffloadError::CircuitOpen { transport: Transport::Https, .. }), "{error}");
    assert_eq!(seen.len(), 2, "an open circuit must not reach the server");

    healthy.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(client.breaker_states(), vec![(Transport::Https, "half_open")]);
    let answer = client.ask(request()).await.expect("trial succeeds");
    assert_eq!(answer.content, "back");
    assert_eq!(client.breaker_states(), vec![(Transport::Https, "closed")]);
    assert_eq!(seen.len(), 3);
}

#[tokio::test]
async fn total_deadline_bounds_every_attempt_and_transport() {
    let seen = Seen::default();
    let slow = {
        let seen = seen.clone();
        Router::new().route(
            "/v1/chat/completions",
            post(move |headers: HeaderMap, body: Bytes| {
                let seen = seen.clone();
                async move {
                    seen.push(headers, &body);
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    axum::Json(completion("late"))
                }
            }),
        )
    };
    let first = https_config(serve(slow.clone()).await);
    let second = https_config(serve(slow).await);
    let mut config = offload_config(first.clone());
    config.https.as_mut().expect("https").timeout_ms = 400;
    config.attempts_per_transport = 3;
    config.retry_backoff_ms = 50;
    config.deadline_ms = 700;

    let started = Instant::now();
    let error = client(&config, &[first, second]).ask(request()).await.expect_err("deadline");
    let took = started.elapsed();

    assert!(matches!(error, OffloadError::Timeout(_)), "{error}");
    assert!(took >= Duration::from_millis(650) && took < Duration::from_millis(1500), "took {took:?}");
    assert!(seen.len() >= 2, "the retry got the rest of the deadline ({} requests)", seen.len());
}

#[tokio::test]
async fn request_deadline_earlier_than_the_configured_one_wins() {
    let app = Router::new().route(
        "/v1/chat/completions",
        post(|| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            axum::Json(completion("late"))
        }),
    );
    let https = https_config(serve(app).await);
    let mut request = request();
    let now_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis();
    request.deadline_ms = u64::try_from(now_ms).expect("ms") + 300;
    let started = Instant::now();
    let error = client(&offload_config(https.clone()), &[https]).ask(request).await.expect_err("deadline");
    assert!(matches!(error, OffloadError::Timeout(_)), "{error}");
    assert!(started.elapsed() < Duration::from_millis(1500), "took {:?}", started.elapsed());
}

#[test]
fn missing_api_key_is_a_setup_error_that_names_the_variable() {
    let mut https = https_config(dead_addr());
    https.api_key = Some(SecretSource::Env("TANDEM_TEST_SURELY_UNSET_KEY".into()));
    let error = HttpsOffload::new(&https).expect_err("no key");
    assert!(error.to_string().contains("TANDEM_TEST_SURELY_UNSET_KEY is not set"), "{error}");
}

#[test]
fn unreadable_or_empty_ca_file_is_a_setup_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut https = https_config(dead_addr());
    https.ca_file = Some(dir.path().join("missing.pem"));
    assert!(matches!(HttpsOffload::new(&https), Err(HttpsSetupError::CaFile { .. })));
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").expect("write");
    https.ca_file = Some(not_pem);
    assert!(matches!(HttpsOffload::new(&https), Err(HttpsSetupError::InvalidCa { .. })));
}

/// `openssl s_server` as a TLS endpoint with a certificate from a private CA. It prints what the
/// client sends to stdout and sends its stdin to the client, so the test answers by hand.
struct TlsServer {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl TlsServer {
    fn start(dir: &std::path::Path, port: u16) -> Self {
        let mut child = Command::new("openssl")
            .args([
                "s_server",
                "-accept",
                &format!("127.0.0.1:{port}"),
                "-cert",
                "leaf.pem",
                "-key",
                "leaf.key",
            ])
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn openssl s_server");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let server = Self { child, lines };
        server.wait_for_line(|l| l.contains("ACCEPT"));
        server
    }

    fn wait_for_line(&self, matches: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(100))
                && matches(&line)
            {
                return;
            }
        }
        panic!("openssl s_server did not print the expected line in time");
    }

    fn reply(&mut self, body: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        write!(
            stdin,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .expect("write reply");
        stdin.flush().expect("flush");
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn openssl(dir: &std::path::Path, args: &[&str]) -> bool {
    Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A CA and a `localhost`/127.0.0.1 leaf certificate signed by it; false when openssl is missing.
fn make_private_ca(dir: &std::path::Path) -> bool {
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write ext");
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let ca = [
        &["req", "-x509"][..],
        &ec,
        &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=Tandem Test CA"],
    ]
    .concat();
    let csr =
        [&["req"][..], &ec, &["-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=localhost"]].concat();
    let sign = [
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "leaf.pem",
        "-days",
        "2",
        "-extfile",
        "leaf.ext",
    ];
    openssl(dir, &ca) && openssl(dir, &csr) && openssl(dir, &sign)
}

#[tokio::test]
async fn tls_endpoint_is_trusted_only_with_its_ca_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(
        make_private_ca(dir.path()),
        "the openssl command could not make a private CA: run `make test` (scripts/test-deps.sh installs openssl)"
    );
    let port = dead_addr().port();
    let mut server = TlsServer::start(dir.path(), port);
    let mut https = https_config(dead_addr());
    https.url = format!("https://127.0.0.1:{port}");
    https.timeout_ms = 5000;
    let config = offload_config(https.clone());

    let untrusted =
        client(&config, std::slice::from_ref(&https)).ask(request()).await.expect_err("untrusted");
    assert!(
        matches!(&untrusted, OffloadError::Unreachable(m) if m.to_lowercase().contains("certificate")),
        "{untrusted}"
    );

    https.ca_file = Some(dir.path().join("ca.pem"));
    let trusted = client(&config, &[https]);
    let answering = tokio::task::spawn_blocking(move || {
        server.wait_for_line(|l| l.to_ascii_lowercase().starts_with("idempotency-key:"));
        server.reply(r#"{"choices":[{"message":{"content":"over tls"}}]}"#);
        server
    });
    let answer = trusted.ask(request()).await.expect("trusted TLS answer");
    assert_eq!(answer.content, "over tls");
    drop(answering.await.expect("server thread"));
}
