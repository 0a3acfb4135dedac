//! Resumable, bandwidth-bounded HTTP(S) downloads of bundle files. A file is written to
//! `NAME.part` next to its final place; an interrupted download (a dropped connection, or the whole
//! process killed) continues from the part's length with `Range: bytes=N-`. Every file is checked
//! against its manifest size and sha256 before it is renamed into place, and failures that may pass
//! (connection errors, 5xx, a stalled body) are retried with exponential backoff.

use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::{StatusCode, Url};
use sha2::{Digest, Sha256};
use tandem_core::bundle::FileDigest;
use tokio::io::AsyncWriteExt;

use super::bandwidth::BandwidthLimit;
use super::fleet_link::FleetCredentials;
use crate::offload::http_client;

/// Suffix of a file being downloaded; a manifest may not list a name ending with it.
pub const PART_SUFFIX: &str = ".part";

/// The largest manifest accepted, so a wrong URL cannot make the daemon buffer a model file.
const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// How downloads behave.
#[derive(Debug, Clone)]
pub struct DownloadOptions {
    /// Bytes per second for all downloads together; `None` is unlimited.
    pub bandwidth_limit: Option<NonZeroU64>,
    /// Attempts in a row that make no progress before a download gives up.
    pub max_retries: u32,
    /// Wait after the first failed attempt; doubled after each further one.
    pub initial_backoff: Duration,
    /// The longest wait between attempts.
    pub max_backoff: Duration,
    /// A response body that sends nothing for this long is abandoned and retried.
    pub stall_timeout: Duration,
    /// Limit on establishing a connection.
    pub connect_timeout: Duration,
    /// Certificate authorities trusted on top of the system roots (a private registry's CA).
    pub extra_ca: Vec<reqwest::Certificate>,
    /// Sent with every request: the fleet serves bundles only to its devices (and its operator).
    pub credentials: Option<FleetCredentials>,
}

impl Default for DownloadOptions {
    fn default() -> Self {
        Self {
            bandwidth_limit: None,
            max_retries: 8,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            extra_ca: Vec::new(),
            credentials: None,
        }
    }
}

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client for downloads: {0}")]
    Client(String),
    /// The server refused the request in a way retrying will not fix.
    #[error(
        "{url} answered HTTP {status}; check that the assignment's URL points at a published bundle \
         and that this device may read it (401/403: the fleet refused its credentials, the [mqtt] \
         password_file password, which must match the fleet's devices file, or updater.poll_token)"
    )]
    Status {
        /// The URL.
        url: String,
        /// The status.
        status: StatusCode,
    },
    /// Every retry failed.
    #[error(
        "gave up downloading {url} after {attempts} attempts without progress: {cause}; the download \
         resumes from where it stopped on the next try"
    )]
    GaveUp {
        /// The URL.
        url: String,
        /// Attempts in a row without progress.
        attempts: u32,
        /// The last failure.
        cause: String,
    },
    /// The server sent more bytes than the manifest lists.
    #[error(
        "{url} is longer than the {expected} bytes its manifest lists: the published files do not \
         match the manifest; publish the bundle again"
    )]
    TooLarge {
        /// The URL.
        url: String,
        /// The manifest's size.
        expected: u64,
    },
    /// The downloaded bytes do not hash to the manifest's digest, twice from scratch.
    #[error(
        "{url} has sha256 {found} but its manifest says {expected}, also when downloaded again from \
         the start: the published file is corrupt or was altered; publish the bundle again"
    )]
    DigestMismatch {
        /// The URL.
        url: String,
        /// The manifest's digest.
        expected: String,
        /// The digest of what was downloaded.
        found: String,
    },
    /// The manifest is larger than any manifest should be.
    #[error("{url} is over {MAX_MANIFEST_BYTES} bytes, too large for a manifest; check the assignment's URL")]
    ManifestTooLarge {
        /// The URL.
        url: String,
    },
    /// A local file could not be written.
    #[error("cannot {action} {path}: {cause}; check free disk space and permissions", path = .path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        cause: std::io::Error,
    },
}

/// How one attempt ended, when it did not succeed.
enum Failure {
    /// Worth another attempt after a pause.
    Retry(String),
    /// The complete file does not hash to the manifest's digest.
    Digest(String),
    /// Retrying will not help.
    Fatal(DownloadError),
}

/// Downloads bundle files over HTTP(S).
#[derive(Debug)]
pub struct Downloader {
    client: reqwest::Client,
    options: DownloadOptions,
    limit: Option<BandwidthLimit>,
}

impl Downloader {
    /// A downloader with `options`.
    pub fn new(options: DownloadOptions) -> Result<Self, DownloadError> {
        let client = http_client(options.connect_timeout, &options.extra_ca)
            .map_err(|e| DownloadError::Client(error_chain(&e)))?;
        let limit = options.bandwidth_limit.map(BandwidthLimit::new);
        Ok(Self { client, options, limit })
    }

    /// Fetches a small document (a manifest) in full, with retries.
    pub async fn fetch_small(&self, url: &Url) -> Result<Vec<u8>, DownloadError> {
        let mut failures = 0;
        loop {
            match self.fetch_small_once(url).await {
                Ok(bytes) => return Ok(bytes),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(cause) | Failure::Digest(cause)) => {
                    failures += 1;
                    self.pause_or_give_up(url, failures, cause).await?;
                }
            }
        }
    }

    async fn fetch_small_once(&self, url: &Url) -> Result<Vec<u8>, Failure> {
        let mut response = self.request(url).send().await.map_err(|e| Failure::Retry(error_chain(&e)))?;
        check_status(url, response.status())?;
        let mut bytes = Vec::new();
        while let Some(chunk) = self.next_chunk(&mut response).await? {
            bytes.extend_from_slice(&chunk);
            if bytes.len() > MAX_MANIFEST_BYTES {
                return Err(Failure::Fatal(DownloadError::ManifestTooLarge { url: url.to_string() }));
            }
        }
        Ok(bytes)
    }

    /// Downloads `url` to `dest`, resuming a `dest.part` left by an earlier attempt, and checks it
    /// against `expected` before renaming it into place. A `dest` that already matches is kept.
    /// `progress` is called with the bytes of the file on disk so far.
    pub async fn fetch_file(
        &self,
        url: &Url,
        dest: &Path,
        expected: &FileDigest,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(), DownloadError> {
        if digest_of(dest).await.is_some_and(|found| found == *expected) {
            progress(expected.size);
            return Ok(());
        }
        remove_if_present(dest).await?;
        let mut part = dest.as_os_str().to_os_string();
        part.push(PART_SUFFIX);
        let part = PathBuf::from(part);
        let (mut failures, mut digest_failures) = (0, 0);
        loop {
            let before = file_len(&part).await;
            match self.attempt(url, &part, expected, progress).await {
                Ok(()) => break,
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Digest(found)) => {
                    remove_if_present(&part).await?;
                    digest_failures += 1;
                    if digest_failures >= 2 {
                        return Err(DownloadError::DigestMismatch {
                            url: url.to_string(),
                            expected: expected.sha256.clone(),
                            found,
                        });
                    }
                    tracing::warn!(%url, %found, "downloaded file does not match its digest; downloading it again from the start");
                }
                Err(Failure::Retry(cause)) => {
                    if file_len(&part).await > before {
                        failures = 0;
                    }
                    failures += 1;
                    self.pause_or_give_up(url, failures, cause).await?;
                }
            }
        }
        let io = |action| {
            let path = part.clone();
            move |cause| DownloadError::Io { action, path, cause }
        };
        tokio::fs::File::open(&part).await.map_err(io("open"))?.sync_all().await.map_err(io("sync"))?;
        tokio::fs::rename(&part, dest).await.map_err(io("rename"))?;
        Ok(())
    }

    async fn pause_or_give_up(&self, url: &Url, failures: u32, cause: String) -> Result<(), DownloadError> {
        if failures > self.options.max_retries {
            return Err(DownloadError::GaveUp { url: url.to_string(), attempts: failures, cause });
        }
        let backoff = self
            .options
            .initial_backoff
            .saturating_mul(1 << (failures - 1).min(16))
            .min(self.options.max_backoff);
        tracing::warn!(%url, attempt = failures, backoff_ms = backoff.as_millis() as u64, %cause, "download failed; retrying");
        tokio::time::sleep(backoff).await;
        Ok(())
    }

    /// One request, continuing `part` from its length.
    async fn attempt(
        &self,
        url: &Url,
        part: &Path,
        expected: &FileDigest,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(), Failure> {
        let io = |action| {
            move |cause| Failure::Fatal(DownloadError::Io { action, path: part.to_path_buf(), cause })
        };
        let mut offset = file_len(part).await;
        if offset > expected.size {
            remove_if_present(part).await.map_err(Failure::Fatal)?;
            offset = 0;
        }
        let mut hasher =
            if offset > 0 { hash_prefix(part).await.map_err(io("read"))? } else { Sha256::new() };
        if offset < expected.size {
            let mut request = self.request(url);
            if offset > 0 {
                request = request.header(RANGE, format!("bytes={offset}-"));
            }
            let mut response = request.send().await.map_err(|e| Failure::Retry(error_chain(&e)))?;
            let status = response.status();
            let resumed = status == StatusCode::PARTIAL_CONTENT && offset > 0;
            if status == StatusCode::RANGE_NOT_SATISFIABLE {
                remove_if_present(part).await.map_err(Failure::Fatal)?;
                return Err(Failure::Retry(format!("{url} refused to resume at byte {offset}")));
            }
            check_status(url, status)?;
            if resumed && content_range_start(&response) != Some(offset) {
                remove_if_present(part).await.map_err(Failure::Fatal)?;
                return Err(Failure::Retry(format!("{url} answered another range than bytes={offset}-")));
            }
            if !resumed && offset > 0 {
                tracing::info!(%url, offset, "the server does not resume downloads; starting the file again");
                offset = 0;
                hasher = Sha256::new();
            }
            let mut file = tokio::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(resumed)
                .truncate(!resumed)
                .open(part)
                .await
                .map_err(io("open"))?;
            let streamed = async {
                while let Some(chunk) = self.next_chunk(&mut response).await? {
                    if offset + chunk.len() as u64 > expected.size {
                        return Err(Failure::Fatal(DownloadError::TooLarge {
                            url: url.to_string(),
                            expected: expected.size,
                        }));
                    }
                    if let Some(limit) = &self.limit {
                        limit.acquire(chunk.len() as u64).await;
                    }
                    // Flushed before it is reported, so reported progress is on disk (or in the
                    // kernel's cache): a killed process resumes from at least there.
                    file.write_all(&chunk).await.map_err(io("write"))?;
                    file.flush().await.map_err(io("write"))?;
                    hasher.update(&chunk);
                    offset += chunk.len() as u64;
                    progress(offset);
                }
                Ok(())
            }
            .await;
            // Whatever arrived stays on disk for the next attempt to resume from.
            file.flush().await.map_err(io("write"))?;
            if let Err(failure) = streamed {
                if matches!(failure, Failure::Fatal(DownloadError::TooLarge { .. })) {
                    remove_if_present(part).await.map_err(Failure::Fatal)?;
                }
                return Err(failure);
            }
            if offset < expected.size {
                return Err(Failure::Retry(format!("{url} ended after {offset} of {} bytes", expected.size)));
            }
        }
        let found = hex::encode(hasher.finalize());
        if found.eq_ignore_ascii_case(&expected.sha256) { Ok(()) } else { Err(Failure::Digest(found)) }
    }

    /// A GET of `url` with the credentials.
    fn request(&self, url: &Url) -> reqwest::RequestBuilder {
        let request = self.client.get(url.clone());
        match &self.options.credentials {
            Some(credentials) => credentials.apply(request),
            None => request,
        }
    }

    async fn next_chunk(&self, response: &mut reqwest::Response) -> Result<Option<bytes::Bytes>, Failure> {
        match tokio::time::timeout(self.options.stall_timeout, response.chunk()).await {
            Err(_) => Err(Failure::Retry(format!("no data for {:?}", self.options.stall_timeout))),
            Ok(Err(e)) => Err(Failure::Retry(error_chain(&e))),
            Ok(Ok(chunk)) => Ok(chunk),
        }
    }
}

fn check_status(url: &Url, status: StatusCode) -> Result<(), Failure> {
    if status.is_success() {
        Ok(())
    } else if status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
    {
        Err(Failure::Retry(format!("{url} answered HTTP {status}")))
    } else {
        Err(Failure::Fatal(DownloadError::Status { url: url.to_string(), status }))
    }
}

/// The first byte of a `Content-Range: bytes START-END/TOTAL` header.
fn content_range_start(response: &reqwest::Response) -> Option<u64> {
    let value = response.headers().get(CONTENT_RANGE)?.to_str().ok()?;
    value.strip_prefix("bytes ")?.split('-').next()?.trim().parse().ok()
}

async fn file_len(path: &Path) -> u64 {
    tokio::fs::metadata(path).await.map_or(0, |m| m.len())
}

async fn remove_if_present(path: &Path) -> Result<(), DownloadError> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(cause) => Err(DownloadError::Io { action: "remove", path: path.to_path_buf(), cause }),
    }
}

/// The digest of a file, read on a blocking thread; `None` when it cannot be read.
async fn digest_of(path: &Path) -> Option<FileDigest> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::File::open(path).and_then(FileDigest::of_reader).ok())
        .await
        .ok()
        .flatten()
}

/// The hash state after the bytes already in `part`, read on a blocking thread.
async fn hash_prefix(part: &Path) -> std::io::Result<Sha256> {
    let part = part.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut hasher = Sha256::new();
        std::io::copy(&mut std::fs::File::open(part)?, &mut hasher)?;
        Ok(hasher)
    })
    .await
    .expect("hashing does not panic")
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
