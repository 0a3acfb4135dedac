//! Offload over HTTPS to any OpenAI-compatible chat-completions endpoint (vLLM, a hosted API,
//! another `tandemd`), non-streaming, with rustls. Each attempt carries the request id as
//! `Idempotency-Key` and `X-Request-Id`, so a retried request can be recognised by the server.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use reqwest::header::{HeaderMap, HeaderValue};
use serde::Serialize;
use tandem_core::protocol::openai;
use tandem_core::protocol::{ChatMessage, OffloadRequest, Transport};

use super::secret::{SecretError, read_secret};
use super::{CloudAnswer, HttpsCloudConfig, OffloadError, OffloadTransport};

/// Largest response body read; anything longer is not a plausible chat completion.
const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;
/// Characters of a non-2xx body kept in the error.
const ERROR_BODY_CHARS: usize = 200;
/// Follow-up turn sent after the device's own attempt, when the operator enabled sending it.
const LOCAL_ATTEMPT_FOLLOW_UP: &str = "The answer above is a draft from a smaller model that asked for help. \
     Answer my original question correctly and completely.";

/// Why the HTTPS transport could not be set up from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum HttpsSetupError {
    #[error("offload.https.url `{url}` is not a valid http(s) URL: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("offload.https.api_key: {0}")]
    ApiKey(#[from] SecretError),
    #[error("offload.https.api_key contains characters that cannot be sent in an HTTP header")]
    ApiKeyNotHeaderSafe,
    #[error("cannot read offload.https.ca_file {path}: {source}")]
    CaFile { path: PathBuf, source: std::io::Error },
    #[error("offload.https.ca_file {path} holds no usable PEM certificate: {reason}")]
    InvalidCa { path: PathBuf, reason: String },
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// Installs rustls' ring crypto provider for the process, once; a provider already installed (by
/// `main` or another part) is kept.
pub(crate) fn install_crypto_provider() {
    // Err means a provider is already installed, which is what we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// An HTTP client with rustls, the given connect timeout, and `extra_ca` trusted on top of the
/// system roots.
pub(crate) fn http_client(
    connect_timeout: Duration,
    extra_ca: &[reqwest::Certificate],
) -> Result<reqwest::Client, reqwest::Error> {
    install_crypto_provider();
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .tls_certs_merge(extra_ca.iter().cloned())
        .user_agent(concat!("tandemd/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Why a file of CA certificates could not be used (the caller names the setting).
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file holds no usable PEM certificate.
    #[error("{path} holds no usable PEM certificate: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl From<CaFileError> for HttpsSetupError {
    fn from(error: CaFileError) -> Self {
        match error {
            CaFileError::Read { path, source } => Self::CaFile { path, source },
            CaFileError::Invalid { path, reason } => Self::InvalidCa { path, reason },
        }
    }
}

/// Reads a PEM bundle of CA certificates (at least one), to trust on top of the system roots.
pub fn read_ca_file(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, CaFileError> {
    let pem = std::fs::read(path).map_err(|source| CaFileError::Read { path: path.into(), source })?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| CaFileError::Invalid { path: path.into(), reason: error_chain(&e) })?;
    if certs.is_empty() {
        return Err(CaFileError::Invalid { path: path.into(), reason: "no certificate found".into() });
    }
    Ok(certs)
}

/// The chat-completions URL for a configured base URL: kept when it already ends with
/// `/chat/completions`, `/chat/completions` appended to a URL ending in `/v1`, otherwise
/// `/v1/chat/completions` appended.
pub fn completions_url(base: &str) -> Result<reqwest::Url, HttpsSetupError> {
    let invalid = |reason: String| HttpsSetupError::InvalidUrl { url: base.to_string(), reason };
    let mut url = reqwest::Url::parse(base.trim()).map_err(|e| invalid(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(format!("scheme `{}` is not http or https", url.scheme())));
    }
    if url.host_str().is_none() {
        return Err(invalid("no host".into()));
    }
    let path = openai::completions_path(url.path());
    url.set_path(&path);
    Ok(url)
}

/// The HTTPS offload transport.
pub struct HttpsOffload {
    client: reqwest::Client,
    endpoint: reqwest::Url,
    model: String,
    authorization: Option<HeaderValue>,
    timeout: Duration,
}

impl std::fmt::Debug for HttpsOffload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsOffload")
            .field("endpoint", &self.endpoint.as_str())
            .field("model", &self.model)
            .field("authenticated", &self.authorization.is_some())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl HttpsOffload {
    /// Builds the transport: resolves the endpoint URL, reads the API key and the extra CA file.
    /// Binds nothing and sends nothing.
    pub fn new(config: &HttpsCloudConfig) -> Result<Self, HttpsSetupError> {
        let endpoint = completions_url(&config.url)?;
        let authorization = match &config.api_key {
            Some(source) => {
                let key = read_secret(source)?;
                let mut value = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
                    .map_err(|_| HttpsSetupError::ApiKeyNotHeaderSafe)?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        if endpoint.scheme() == "http" && authorization.is_some() && !is_loopback(&endpoint) {
            tracing::warn!(
                endpoint = %endpoint,
                "the cloud API key is sent over plain HTTP to a non-loopback host; use https"
            );
        }
        let extra_ca = match &config.ca_file {
            Some(path) => read_ca_file(path)?,
            None => Vec::new(),
        };
        let client = http_client(Duration::from_millis(config.connect_timeout_ms), &extra_ca)
            .map_err(|e| HttpsSetupError::Client(error_chain(&e)))?;
        Ok(Self {
            client,
            endpoint,
            model: config.model.clone(),
            authorization,
            timeout: Duration::from_millis(config.timeout_ms),
        })
    }

    /// The URL requests are POSTed to.
    pub fn endpoint(&self) -> &str {
        self.endpoint.as_str()
    }

    /// The configured per-attempt timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    async fn attempt(
        &self,
        request: &OffloadRequest,
        timeout: Duration,
    ) -> Result<CloudAnswer, OffloadError> {
        let timeout = timeout.min(self.timeout);
        let started = Instant::now();
        let body = ChatCompletionRequest::for_offload(&self.model, request);
        let mut headers = HeaderMap::new();
        let request_id = HeaderValue::from_str(&request.request_id.to_string())
            .map_err(|e| OffloadError::InvalidResponse(format!("request id is not header-safe: {e}")))?;
        headers.insert("idempotency-key", request_id.clone());
        headers.insert("x-request-id", request_id);
        headers.insert(reqwest::header::ACCEPT, HeaderValue::from_static("application/json"));
        if let Some(authorization) = &self.authorization {
            headers.insert(reqwest::header::AUTHORIZATION, authorization.clone());
        }
        let exchange = async {
            let response = self
                .client
                .post(self.endpoint.clone())
                .headers(headers)
                .json(&body)
                .send()
                .await
                .map_err(|e| transport_error(&e, timeout))?;
            let status = response.status();
            let body = read_capped(response, MAX_RESPONSE_BYTES).await.map_err(|e| match e {
                ReadError::Transport(e) => transport_error(&e, timeout),
                ReadError::TooLarge => OffloadError::InvalidResponse(format!(
                    "the response is larger than {MAX_RESPONSE_BYTES} bytes"
                )),
            })?;
            if !status.is_success() {
                let text = String::from_utf8_lossy(&body);
                return Err(OffloadError::HttpStatus {
                    status: status.as_u16(),
                    body: text.chars().take(ERROR_BODY_CHARS).collect(),
                });
            }
            parse_completion(&body, &self.model)
        };
        let parsed =
            tokio::time::timeout(timeout, exchange).await.map_err(|_| OffloadError::Timeout(timeout))??;
        Ok(CloudAnswer {
            content: parsed.content,
            model: parsed.model,
            prompt_tokens: parsed.prompt_tokens,
            completion_tokens: parsed.completion_tokens,
            transport: Transport::Https,
            latency: started.elapsed(),
        })
    }
}

impl OffloadTransport for HttpsOffload {
    fn kind(&self) -> Transport {
        Transport::Https
    }

    fn ask<'a>(
        &'a self,
        request: &'a OffloadRequest,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<CloudAnswer, OffloadError>> {
        Box::pin(self.attempt(request, timeout))
    }
}

/// The request body of an OpenAI chat completion (non-streaming).
#[derive(Debug, Serialize)]
struct ChatCompletionRequest<'a> {
    model: &'a str,
    messages: Vec<ChatMessage>,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    stream: bool,
}

impl<'a> ChatCompletionRequest<'a> {
    fn for_offload(model: &'a str, request: &OffloadRequest) -> Self {
        let mut messages = request.messages.clone();
        if let Some(attempt) = &request.local_attempt {
            messages.push(ChatMessage { role: "assistant".into(), content: attempt.clone() });
            messages.push(ChatMessage { role: "user".into(), content: LOCAL_ATTEMPT_FOLLOW_UP.into() });
        }
        Self {
            model,
            messages,
            max_tokens: request.max_tokens,
            temperature: request.temperature,
            stream: false,
        }
    }
}

/// What is taken from a chat-completion response.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ParsedCompletion {
    pub content: String,
    pub model: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// Parses an OpenAI chat-completion body ([`openai::parse_completion`]); the model is the
/// configured one when the body names none.
pub(crate) fn parse_completion(
    body: &[u8],
    configured_model: &str,
) -> Result<ParsedCompletion, OffloadError> {
    let completion =
        openai::parse_completion(body).map_err(|invalid| OffloadError::InvalidResponse(invalid.0))?;
    Ok(ParsedCompletion {
        content: completion.content,
        model: completion.model.unwrap_or_else(|| configured_model.to_string()),
        prompt_tokens: completion.prompt_tokens,
        completion_tokens: completion.completion_tokens,
    })
}

enum ReadError {
    Transport(reqwest::Error),
    TooLarge,
}

/// Reads a response body, refusing more than `limit` bytes.
async fn read_capped(mut response: reqwest::Response, limit: usize) -> Result<Vec<u8>, ReadError> {
    if response.content_length().is_some_and(|len| len > limit as u64) {
        return Err(ReadError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(ReadError::Transport)? {
        if body.len() + chunk.len() > limit {
            return Err(ReadError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Maps a client error: a timeout is `Timeout`, everything else (refused connection, DNS, TLS,
/// reset) means the endpoint could not be reached.
fn transport_error(error: &reqwest::Error, timeout: Duration) -> OffloadError {
    if error.is_timeout() && !error.is_connect() {
        OffloadError::Timeout(timeout)
    } else {
        OffloadError::Unreachable(error_chain(error))
    }
}

/// An error with its sources, `a: b: c` (reqwest's own message alone hides the cause).
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn is_loopback(url: &reqwest::Url) -> bool {
    match url.host_str() {
        Some("localhost") => true,
        Some(host) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_path_is_appended_to_a_base_url() {
        let url = completions_url("https://api.example.com").expect("url");
        assert_eq!(url.as_str(), "https://api.example.com/v1/chat/completions");
        let url = completions_url("http://127.0.0.1:8000/").expect("url");
        assert_eq!(url.as_str(), "http://127.0.0.1:8000/v1/chat/completions");
    }

    #[test]
    fn completions_url_is_kept_when_already_complete() {
        let url = completions_url("https://api.example.com/v1/chat/completions").expect("url");
        assert_eq!(url.as_str(), "https://api.example.com/v1/chat/completions");
    }

    #[test]
    fn v1_base_url_gets_only_the_chat_path() {
        let url = completions_url("https://api.example.com/openai/v1").expect("url");
        assert_eq!(url.as_str(), "https://api.example.com/openai/v1/chat/completions");
    }

    #[test]
    fn non_http_url_is_refused() {
        assert!(matches!(completions_url("ftp://x"), Err(HttpsSetupError::InvalidUrl { .. })));
        assert!(matches!(completions_url("not a url"), Err(HttpsSetupError::InvalidUrl { .. })));
    }

    #[test]
    fn completion_with_usage_is_parsed() {
        let body = br#"{"id":"x","model":"big","choices":[{"index":0,"message":{"role":"assistant","content":"42"},"finish_reason":"stop"}],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}"#;
        let parsed = parse_completion(body, "configured").expect("parsed");
        assert_eq!(
            parsed,
            ParsedCompletion {
                content: "42".into(),
                model: "big".into(),
                prompt_tokens: 7,
                completion_tokens: 3
            }
        );
    }

    #[test]
    fn completion_without_usage_or_model_counts_zero_and_names_the_configured_model() {
        let body = br#"{"choices":[{"message":{"content":"hi"}}]}"#;
        let parsed = parse_completion(body, "configured").expect("parsed");
        assert_eq!(parsed.model, "configured");
        assert_eq!((parsed.prompt_tokens, parsed.completion_tokens), (0, 0));
    }

    #[test]
    fn content_parts_are_concatenated() {
        let body = br#"{"choices":[{"message":{"content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}}]}"#;
        assert_eq!(parse_completion(body, "m").expect("parsed").content, "ab");
    }

    #[test]
    fn malformed_completions_are_invalid_responses() {
        for body in [
            &b"<html>oops</html>"[..],
            br#"{"object":"list"}"#,
            br#"{"choices":[]}"#,
            br#"{"choices":[{"text":"legacy"}]}"#,
            br#"{"choices":[{"message":{"content":null}}]}"#,
            br#"{"error":{"message":"overloaded"}}"#,
            b"",
        ] {
            let error = parse_completion(body, "m").expect_err("invalid");
            assert!(matches!(error, OffloadError::InvalidResponse(_)), "{error}");
        }
    }

    #[test]
    fn local_attempt_is_sent_as_a_draft_with_a_follow_up_turn() {
        let request = OffloadRequest {
            v: 1,
            request_id: uuid::Uuid::now_v7(),
            device_id: "d".into(),
            model_version: "m".into(),
            messages: vec![ChatMessage { role: "user".into(), content: "q".into() }],
            max_tokens: 10,
            temperature: None,
            local_attempt: Some("draft".into()),
            deadline_ms: 0,
        };
        let body = serde_json::to_value(ChatCompletionRequest::for_offload("big", &request)).expect("json");
        let roles: Vec<&str> = body["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .filter_map(|m| m["role"].as_str())
            .collect();
        assert_eq!(roles, ["user", "assistant", "user"]);
        assert!(body.get("temperature").is_none());
        assert_eq!(body["stream"], false);
    }
}
