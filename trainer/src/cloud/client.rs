//! An OpenAI-compatible chat-completions client for the cloud during training and evaluation.
//!
//! The request is the one the daemon's HTTPS offload sends (`daemon/src/offload/https.rs`): the
//! original question as the only user turn (no system prompt, no local attempt, as in the paper),
//! `max_tokens`, an optional temperature, `stream: false`; the answer is the first choice's message
//! content (a string or text parts). The wire format (endpoint path, reading an answer) is core's
//! [`tandem_core::protocol::openai`], shared with the daemon; the transport is the trainer's own,
//! because depending on `tandemd` would pull the whole daemon (ONNX Runtime bindings, MQTT, the API
//! server) into the trainer.
//! Requests to one batch run concurrently (bounded) on a private Tokio runtime; timeouts, HTTP 429
//! and 5xx are retried with backoff.

use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tandem_core::protocol::{ChatMessage, openai};
use tandem_core::tasks::templates::cloud_messages;

use super::{CloudError, CloudTransport};

/// Characters of an error body kept in messages.
const ERROR_BODY_CHARS: usize = 200;

/// How to reach the cloud.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpCloudConfig {
    /// Base URL of an OpenAI-compatible API; `/v1/chat/completions` is appended when missing.
    pub url: String,
    /// Model name sent in each request (and the cache key's model).
    pub model: String,
    /// Environment variable holding the API key (sent as `Authorization: Bearer …`); none for
    /// endpoints without authentication.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Most tokens in one cloud answer.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    /// Sampling temperature sent to the cloud; omitted when unset (the endpoint's default).
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Largest wait for one request, ms.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Attempts per question (timeouts, 429 and 5xx are retried).
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Requests in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
}

fn default_max_tokens() -> u32 {
    2048
}
fn default_timeout_ms() -> u64 {
    120_000
}
fn default_attempts() -> u32 {
    3
}
fn default_concurrency() -> usize {
    8
}

impl HttpCloudConfig {
    /// A configuration with defaults for everything but the endpoint and model.
    pub fn new(url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            model: model.into(),
            api_key_env: None,
            max_tokens: default_max_tokens(),
            temperature: None,
            timeout_ms: default_timeout_ms(),
            attempts: default_attempts(),
            concurrency: default_concurrency(),
        }
    }
}

/// The request body (non-streaming), as the daemon sends it.
#[derive(Debug, Serialize)]
struct ChatCompletionRequest<'a> {
    model: &'a str,
    messages: Vec<ChatMessage>,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    stream: bool,
}

/// The OpenAI-compatible client.
pub struct HttpCloud {
    config: HttpCloudConfig,
    endpoint: reqwest::Url,
    authorization: Option<String>,
    client: reqwest::Client,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for HttpCloud {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpCloud")
            .field("endpoint", &self.endpoint.as_str())
            .field("model", &self.config.model)
            .finish()
    }
}

impl HttpCloud {
    /// A client for `config`; reads the API key, sends nothing.
    pub fn new(config: HttpCloudConfig) -> Result<Self, CloudError> {
        let endpoint = completions_url(&config.url)?;
        let authorization = match &config.api_key_env {
            Some(var) => {
                let key = std::env::var(var)
                    .map_err(|_| CloudError::Setup(format!("the API key variable {var} is not set")))?;
                Some(format!("Bearer {}", key.trim()))
            }
            None => None,
        };
        // Err means a provider is already installed, which is all that is needed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .user_agent(concat!("tandem-train/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CloudError::Setup(e.to_string()))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CloudError::Setup(e.to_string()))?;
        Ok(Self { config, endpoint, authorization, client, runtime })
    }

    /// The URL requests go to.
    pub fn endpoint(&self) -> &str {
        self.endpoint.as_str()
    }

    async fn ask_with_retries(&self, question: &str) -> Result<String, CloudError> {
        let mut backoff = Duration::from_millis(250);
        let mut attempt = 1;
        loop {
            match self.ask(question).await {
                Ok(answer) => return Ok(answer),
                Err(error) if attempt < self.config.attempts.max(1) && is_retryable(&error) => {
                    tracing::warn!(%error, attempt, "cloud request failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn ask(&self, question: &str) -> Result<String, CloudError> {
        let body = ChatCompletionRequest {
            model: &self.config.model,
            messages: cloud_messages(question),
            max_tokens: self.config.max_tokens,
            temperature: self.config.temperature,
            stream: false,
        };
        let mut request = self.client.post(self.endpoint.clone()).json(&body);
        if let Some(authorization) = &self.authorization {
            request = request.header(reqwest::header::AUTHORIZATION, authorization);
        }
        let response = request.send().await.map_err(|e| CloudError::Request(error_chain(&e)))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| CloudError::Request(error_chain(&e)))?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&bytes);
            return Err(CloudError::HttpStatus {
                status: status.as_u16(),
                body: text.chars().take(ERROR_BODY_CHARS).collect(),
            });
        }
        completion_content(&bytes)
    }
}

impl CloudTransport for HttpCloud {
    fn ask_all(&self, questions: &[String]) -> Result<Vec<String>, CloudError> {
        self.runtime.block_on(async {
            let answers: Vec<Result<String, CloudError>> = futures::stream::iter(questions)
                .map(|question| self.ask_with_retries(question))
                .buffered(self.config.concurrency.max(1))
                .collect()
                .await;
            answers.into_iter().collect()
        })
    }

    fn model(&self) -> &str {
        &self.config.model
    }
}

fn is_retryable(error: &CloudError) -> bool {
    match error {
        CloudError::Request(_) => true,
        CloudError::HttpStatus { status, .. } => *status == 429 || *status >= 500,
        _ => false,
    }
}

/// The chat-completions URL of a base URL ([`openai::completions_path`], the daemon's rule).
pub fn completions_url(base: &str) -> Result<reqwest::Url, CloudError> {
    let invalid = |reason: String| CloudError::Setup(format!("cloud url `{base}`: {reason}"));
    let mut url = reqwest::Url::parse(base.trim()).map_err(|e| invalid(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(format!("scheme `{}` is not http or https", url.scheme())));
    }
    let path = openai::completions_path(url.path());
    url.set_path(&path);
    Ok(url)
}

/// The first choice's message content of a chat completion ([`openai::parse_completion`]).
pub fn completion_content(body: &[u8]) -> Result<String, CloudError> {
    openai::parse_completion(body)
        .map(|completion| completion.content)
        .map_err(|invalid| CloudError::InvalidResponse(invalid.0))
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_get_the_chat_completions_path() {
        assert_eq!(
            completions_url("http://127.0.0.1:9/").unwrap().as_str(),
            "http://127.0.0.1:9/v1/chat/completions"
        );
        assert_eq!(completions_url("https://x/v1").unwrap().as_str(), "https://x/v1/chat/completions");
        assert!(completions_url("ftp://x").is_err());
    }

    #[test]
    fn completion_content_is_read_from_strings_and_parts() {
        let body = br#"{"choices":[{"message":{"role":"assistant","content":"42"}}]}"#;
        assert_eq!(completion_content(body).unwrap(), "42");
        let parts = br#"{"choices":[{"message":{"content":[{"type":"text","text":"a"},{"text":"b"}]}}]}"#;
        assert_eq!(completion_content(parts).unwrap(), "ab");
        for bad in [&b"nope"[..], br#"{"choices":[]}"#, br#"{"error":{"message":"x"}}"#] {
            assert!(completion_content(bad).is_err());
        }
    }

    #[test]
    fn the_request_is_the_bare_question_as_the_only_user_turn() {
        let body = ChatCompletionRequest {
            model: "m",
            messages: cloud_messages("Make 24."),
            max_tokens: 16,
            temperature: None,
            stream: false,
        };
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(json["messages"], serde_json::json!([{"role": "user", "content": "Make 24."}]));
        assert!(json.get("temperature").is_none());
        assert_eq!(json["stream"], false);
    }
}
