//! `HttpsTelemetryPublisher`: delivers telemetry batches by POSTing their JSON to the fleet; a 2xx
//! answer is the acknowledgement.

use std::time::Duration;

use futures::future::BoxFuture;
use tandem_core::protocol::TelemetryBatch;

use super::{PublishError, TelemetryPublisher};
use crate::offload::{HttpsSetupError, error_chain, http_client};

/// Characters of a rejection body kept in the error.
const ERROR_BODY_CHARS: usize = 200;

/// POSTs batches to one URL.
#[derive(Debug)]
pub struct HttpsTelemetryPublisher {
    client: reqwest::Client,
    url: reqwest::Url,
    timeout: Duration,
}

impl HttpsTelemetryPublisher {
    /// A publisher for `url` (http or https) that waits at most `timeout` for each acknowledgement.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, HttpsSetupError> {
        let invalid = |reason: String| HttpsSetupError::InvalidUrl { url: url.to_string(), reason };
        let parsed = reqwest::Url::parse(url.trim()).map_err(|e| invalid(e.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(invalid("telemetry needs an http(s) URL with a host".into()));
        }
        let client = http_client(timeout.min(Duration::from_secs(10)), &[])
            .map_err(|e| HttpsSetupError::Client(error_chain(&e)))?;
        Ok(Self { client, url: parsed, timeout })
    }

    async fn post(&self, batch: &TelemetryBatch) -> Result<(), PublishError> {
        let exchange = async {
            let response = self.client.post(self.url.clone()).json(batch).send().await.map_err(|e| {
                if e.is_timeout() && !e.is_connect() {
                    PublishError::Timeout(self.timeout)
                } else {
                    PublishError::Disconnected(error_chain(&e))
                }
            })?;
            let status = response.status();
            if status.is_success() {
                return Ok(());
            }
            let body = response.text().await.unwrap_or_default();
            let body: String = body.chars().take(ERROR_BODY_CHARS).collect();
            Err(PublishError::Rejected(format!("HTTP {}: {body}", status.as_u16())))
        };
        tokio::time::timeout(self.timeout, exchange).await.map_err(|_| PublishError::Timeout(self.timeout))?
    }
}

impl TelemetryPublisher for HttpsTelemetryPublisher {
    fn publish<'a>(&'a self, batch: &'a TelemetryBatch) -> BoxFuture<'a, Result<(), PublishError>> {
        Box::pin(self.post(batch))
    }
}
