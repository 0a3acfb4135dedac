//! What a simulated device does with a model assignment, the way `tandemd`'s updater reports it:
//! `downloading` (the manifest, then every file it lists, over HTTP from the URL the assignment
//! names, resuming an interrupted file with a `Range` request), `verifying` (the manifest's sha256
//! against the assignment, its signature when keys are given, every file's size and sha256 against
//! the manifest), then `active`, or `failed` with the reason. Nothing is written to disk: each file
//! is hashed as it arrives and dropped. Downloads share one HTTP client and a cap on how many run
//! at once, so a thousand devices assigned together do not open a thousand sockets.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tandem_core::bundle::signature::{VerifyingKey, verify_manifest};
use tandem_core::bundle::{BundleManifest, FileDigest};
use tandem_core::protocol::{ModelAssignment, UpdateReport, UpdateState};
use tokio::sync::{Semaphore, mpsc};

use super::Counters;
use crate::store::now_ms;

/// Attempts per file before the update is reported failed.
const ATTEMPTS: u32 = 5;

/// How simulated devices treat their assignments.
#[derive(Debug, Clone)]
pub struct FollowOptions {
    /// Download and verify the bundle; `false`: report `downloading`, `verifying` and `active`
    /// without fetching anything (the fleet's side of a rollout only).
    pub download: bool,
    /// Downloads in progress at once over all devices, at most.
    pub download_concurrency: usize,
    /// Keys the manifest's signature must verify against; empty: the signature is not checked
    /// (the manifest's sha256 still is, against the assignment).
    pub trusted_keys: Vec<VerifyingKey>,
}

/// What every device's installs share.
pub(crate) struct Installer {
    pub options: FollowOptions,
    /// The devices' password (user name = device id), sent as HTTP Basic with each download as
    /// `tandemd` does; none: no credentials.
    pub password: Option<String>,
    pub http: reqwest::Client,
    pub permits: Semaphore,
    pub counters: Arc<Counters>,
}

impl Installer {
    pub fn new(
        options: FollowOptions,
        password: Option<String>,
        counters: Arc<Counters>,
    ) -> std::io::Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(options.download_concurrency.max(1))
            .build()
            .map_err(std::io::Error::other)?;
        let permits = Semaphore::new(options.download_concurrency.max(1));
        Ok(Self { options, password, http, permits, counters })
    }

    /// Installs `assignment` on `device`, sending each state to `reports` as it is reached.
    pub async fn install(
        &self,
        device: &str,
        assignment: ModelAssignment,
        reports: mpsc::UnboundedSender<UpdateReport>,
    ) {
        let report = |state, detail: Option<String>| {
            let _ = reports.send(UpdateReport {
                version: assignment.version.clone(),
                state,
                detail,
                at_ms: u64::try_from(now_ms()).unwrap_or(0),
            });
        };
        report(UpdateState::Downloading, None);
        let outcome = if self.options.download {
            self.download_and_verify(device, &assignment, &|| report(UpdateState::Verifying, None)).await
        } else {
            report(UpdateState::Verifying, None);
            Ok(())
        };
        match outcome {
            Ok(()) => report(UpdateState::Active, None),
            Err(reason) => {
                self.counters.update_failures.fetch_add(1, Ordering::Relaxed);
                report(UpdateState::Failed, Some(reason));
            }
        }
    }

    async fn download_and_verify(
        &self,
        device: &str,
        assignment: &ModelAssignment,
        verifying: &(dyn Fn() + Sync),
    ) -> Result<(), String> {
        let permit = self.permits.acquire().await.map_err(|e| e.to_string())?;
        let started = Instant::now();
        let base = if assignment.url.ends_with('/') {
            assignment.url.clone()
        } else {
            format!("{}/", assignment.url)
        };
        let (manifest_bytes, manifest_digest) =
            self.fetch(device, &format!("{base}manifest.json"), true).await?;
        let mut files = Vec::new();
        let manifest = std::str::from_utf8(&manifest_bytes)
            .map_err(|e| e.to_string())
            .and_then(|text| BundleManifest::from_json(text).map_err(|e| e.to_string()));
        if let Ok(manifest) = &manifest {
            for file in manifest.files.keys() {
                let (_, digest) = self.fetch(device, &format!("{base}{file}"), false).await?;
                files.push((file.clone(), digest));
            }
        }
        Counters::observe(&self.counters.download_latency, started.elapsed());
        drop(permit);
        verifying();
        if !manifest_digest.sha256.eq_ignore_ascii_case(&assignment.manifest_sha256) {
            return Err(format!(
                "manifest.json has sha256 {}, the assignment says {}",
                manifest_digest.sha256, assignment.manifest_sha256
            ));
        }
        let manifest = manifest.map_err(|e| format!("manifest.json: {e}"))?;
        if manifest.name != assignment.bundle_name || manifest.version != assignment.version {
            return Err(format!(
                "the manifest is {} {}, the assignment {} {}",
                manifest.name, manifest.version, assignment.bundle_name, assignment.version
            ));
        }
        if !self.options.trusted_keys.is_empty() {
            verify_manifest(&manifest, &self.options.trusted_keys).map_err(|e| e.to_string())?;
        }
        for (file, found) in files {
            let expected = &manifest.files[&file];
            if found.size != expected.size || !found.sha256.eq_ignore_ascii_case(&expected.sha256) {
                return Err(format!(
                    "{file}: {} bytes with sha256 {}, the manifest says {} bytes with sha256 {}",
                    found.size, found.sha256, expected.size, expected.sha256
                ));
            }
        }
        self.counters.downloads.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// GETs `url`, hashing the bytes as they arrive (and keeping them when `keep`); a broken
    /// transfer resumes where it stopped with `Range: bytes=N-`.
    async fn fetch(&self, device: &str, url: &str, keep: bool) -> Result<(Vec<u8>, FileDigest), String> {
        let mut hasher = Sha256::new();
        let mut kept = Vec::new();
        let mut size = 0u64;
        let mut last_error = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 << attempt.min(4))).await;
            }
            let mut request = self.http.get(url);
            if let Some(password) = &self.password {
                request = request.basic_auth(device, Some(password));
            }
            if size > 0 {
                request = request.header(reqwest::header::RANGE, format!("bytes={size}-"));
            }
            let mut response = match request.send().await {
                Ok(response) => response,
                Err(e) => {
                    last_error = e.to_string();
                    continue;
                }
            };
            match response.status().as_u16() {
                200 if size > 0 => {
                    // The server ignored the range: start over.
                    hasher = Sha256::new();
                    kept.clear();
                    size = 0;
                }
                200 | 206 => {}
                code @ 400..=499 => return Err(format!("GET {url}: HTTP {code}")),
                code => {
                    last_error = format!("HTTP {code}");
                    continue;
                }
            }
            loop {
                match response.chunk().await {
                    Ok(Some(chunk)) => {
                        hasher.update(&chunk);
                        size += chunk.len() as u64;
                        self.counters.bytes_downloaded.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                        if keep {
                            kept.extend_from_slice(&chunk);
                        }
                    }
                    Ok(None) => {
                        let digest = FileDigest { sha256: hex::encode(hasher.finalize()), size };
                        return Ok((kept, digest));
                    }
                    Err(e) => {
                        last_error = e.to_string();
                        self.counters.download_resumes.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        }
        Err(format!("GET {url}: {last_error} (after {ATTEMPTS} attempts)"))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::PathBuf;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicBool;

    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::response::{IntoResponse, Response};
    use bytes::Bytes;
    use tandem_core::bundle::signature::parse_public_key;

    use super::*;

    /// The committed bundle `models/countdown-tiny-v2`, by file name.
    fn bundle() -> HashMap<String, Vec<u8>> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/countdown-tiny-v2");
        std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| {
                let entry = entry.unwrap();
                (entry.file_name().into_string().unwrap(), std::fs::read(entry.path()).unwrap())
            })
            .collect()
    }

    struct Server {
        files: HashMap<String, Vec<u8>>,
        /// Break the first transfer of `model.onnx` after 1 MiB.
        cut_once: AtomicBool,
        ranges: Mutex<Vec<String>>,
    }

    async fn file(
        State(server): State<Arc<Server>>,
        Path(name): Path<String>,
        headers: HeaderMap,
    ) -> Response {
        let Some(bytes) = server.files.get(&name) else { return StatusCode::NOT_FOUND.into_response() };
        if let Some(range) = headers.get(header::RANGE).and_then(|r| r.to_str().ok()) {
            server.ranges.lock().unwrap().push(format!("{name} {range}"));
            let from: usize = range.trim_start_matches("bytes=").trim_end_matches('-').parse().unwrap();
            let content_range = format!("bytes {from}-{}/{}", bytes.len() - 1, bytes.len());
            return (
                StatusCode::PARTIAL_CONTENT,
                [(header::CONTENT_RANGE, content_range)],
                bytes[from..].to_vec(),
            )
                .into_response();
        }
        if name == "model.onnx" && server.cut_once.swap(false, Ordering::SeqCst) {
            let head = Bytes::copy_from_slice(&bytes[..1 << 20]);
            let chunks: Vec<std::io::Result<Bytes>> = vec![Ok(head), Err(std::io::Error::other("cut"))];
            let body = axum::body::Body::from_stream(futures::stream::iter(chunks));
            return ([(header::CONTENT_LENGTH, bytes.len().to_string())], body).into_response();
        }
        bytes.clone().into_response()
    }

    /// Serves `files` under `/b/`; returns the installer's reports for an assignment of them.
    async fn install(
        files: HashMap<String, Vec<u8>>,
        manifest_sha256: String,
        cut: bool,
    ) -> (Vec<UpdateReport>, Arc<Counters>, Vec<String>) {
        let server = Arc::new(Server { files, cut_once: AtomicBool::new(cut), ranges: Mutex::default() });
        let app = axum::Router::new().route("/b/{file}", axum::routing::get(file)).with_state(server.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let key = std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/keys/demo.pub"),
        )
        .unwrap();
        let counters = Arc::new(Counters::default());
        let options = FollowOptions {
            download: true,
            download_concurrency: 1,
            trusted_keys: vec![parse_public_key(&key).unwrap()],
        };
        let installer = Installer::new(options, None, counters.clone()).unwrap();
        let assignment = ModelAssignment {
            v: tandem_core::protocol::PROTOCOL_VERSION,
            rollout_id: Some("r".into()),
            bundle_name: "countdown-tiny".into(),
            version: "2".into(),
            manifest_sha256,
            url: format!("http://{address}/b/"),
            assigned_at_ms: 0,
        };
        let (reports, mut received) = mpsc::unbounded_channel();
        installer.install("robot-1", assignment, reports).await;
        let mut all = Vec::new();
        while let Ok(report) = received.try_recv() {
            all.push(report);
        }
        let ranges = server.ranges.lock().unwrap().clone();
        (all, counters, ranges)
    }

    fn states(reports: &[UpdateReport]) -> Vec<UpdateState> {
        reports.iter().map(|r| r.state).collect()
    }

    #[tokio::test]
    async fn a_broken_transfer_resumes_with_a_range_request_and_the_bundle_becomes_active() {
        let files = bundle();
        let manifest_sha256 = FileDigest::of_bytes(&files["manifest.json"]).sha256;
        let total: u64 = files.values().map(|f| f.len() as u64).sum();
        let (reports, counters, ranges) = install(files, manifest_sha256, true).await;
        assert_eq!(states(&reports), [UpdateState::Downloading, UpdateState::Verifying, UpdateState::Active]);
        assert!(ranges.len() == 1 && ranges[0].starts_with("model.onnx bytes="), "{ranges:?}");
        assert_eq!(counters.download_resumes.load(Ordering::Relaxed), 1);
        assert_eq!(counters.downloads.load(Ordering::Relaxed), 1);
        assert_eq!(counters.bytes_downloaded.load(Ordering::Relaxed), total, "nothing fetched twice");
    }

    #[tokio::test]
    async fn a_file_that_differs_from_the_manifest_is_reported_failed() {
        let mut files = bundle();
        let manifest_sha256 = FileDigest::of_bytes(&files["manifest.json"]).sha256;
        files.get_mut("tokenizer_config.json").unwrap()[0] ^= 0x20;
        let (reports, counters, _) = install(files, manifest_sha256, false).await;
        assert_eq!(states(&reports), [UpdateState::Downloading, UpdateState::Verifying, UpdateState::Failed]);
        let detail = reports[2].detail.as_deref().unwrap();
        assert!(detail.starts_with("tokenizer_config.json: ") && detail.contains("sha256"), "{detail}");
        assert_eq!(counters.update_failures.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_manifest_other_than_the_assigned_one_is_reported_failed() {
        let files = bundle();
        let (reports, _, _) = install(files, "0".repeat(64), false).await;
        assert_eq!(reports.last().unwrap().state, UpdateState::Failed);
        assert!(reports.last().unwrap().detail.as_deref().unwrap().contains("the assignment says"));
    }
}
