//! Staging an assigned bundle: fetch its manifest, check it (version, pinned digest, signature,
//! file names) before any large download, download every file it lists into the inactive slot
//! (resuming an interrupted download of the same build), verify the slot in full and mark it ready.
//! Activation is the caller's separate step ([`Slots::activate`]) so that a running daemon can load
//! and probe the staged model in a second session first.

use std::path::Path;
use std::sync::Arc;

use reqwest::Url;
use tandem_core::bundle::signature::{self, SignatureError};
use tandem_core::bundle::{BundleManifest, FileDigest, MANIFEST_FILE, ManifestError};

use super::download::{DownloadError, DownloadOptions, Downloader, PART_SUFFIX};
use super::slots::{SlotView, Slots, SlotsError, StagedBundle, StagingStart};
use super::state::{BundleId, SlotId};
use super::state_file;
use super::verify::{SlotVerifyError, verify_slot_dir};

/// What the fleet (or an operator) asks this device to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// Where the bundle is published: `manifest.json` and every file it lists are fetched from here.
    pub url: Url,
    /// The version the manifest must have; `None` takes whatever is published at `url`.
    pub version: Option<String>,
    /// The sha256 the manifest's bytes must have, pinning one exact build.
    pub manifest_sha256: Option<String>,
    /// Stage the bundle even if this device rolled it back before (an operator's override).
    pub retry_rejected: bool,
}

impl Assignment {
    /// The bundle published at `url`, whatever its version.
    pub fn from_url(url: Url) -> Self {
        Self { url, version: None, manifest_sha256: None, retry_rejected: false }
    }
}

/// Progress of [`Updater::stage`], for logs, status reports and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageEvent {
    /// The manifest was fetched and checked.
    ManifestChecked {
        /// The bundle it describes.
        bundle: BundleId,
        /// The bytes of all its files.
        bytes: u64,
    },
    /// The slot being staged into was chosen.
    SlotChosen {
        /// The slot.
        slot: SlotId,
        /// Whether an interrupted download of the same build is continued.
        resumed: bool,
    },
    /// Bytes of a file are on disk.
    Progress {
        /// The file.
        file: String,
        /// Its bytes on disk so far.
        file_bytes: u64,
        /// Its size.
        file_size: u64,
        /// The bundle's bytes on disk so far.
        bundle_bytes: u64,
        /// The bundle's size.
        bundle_size: u64,
    },
    /// The slot is being verified in full.
    Verifying {
        /// The slot.
        slot: SlotId,
    },
    /// The slot holds the bundle, verified.
    Staged {
        /// The slot.
        slot: SlotId,
    },
}

/// What [`Updater::stage`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Staged {
    /// The active slot already runs this bundle; nothing was downloaded.
    AlreadyActive(SlotView),
    /// The bundle is in the inactive slot, verified, ready for [`Slots::activate`].
    Ready(StagedBundle),
}

/// Why a bundle could not be staged.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// A download failed.
    #[error(transparent)]
    Download(#[from] DownloadError),
    /// The slot store failed.
    #[error(transparent)]
    Slots(#[from] SlotsError),
    /// A file name cannot be turned into a URL under the assignment's URL.
    #[error("the assignment's URL {url} cannot have file names appended; give the bundle's folder URL")]
    BadUrl {
        /// The URL.
        url: String,
    },
    /// The manifest does not parse.
    #[error("the manifest at {url} is not usable: {cause}")]
    Manifest {
        /// Where it came from.
        url: String,
        /// Why.
        cause: ManifestError,
    },
    /// The manifest is not the build that was assigned.
    #[error(
        "the manifest at {url} has sha256 {found}, but the assignment pins {expected}: the published \
         bundle is not the assigned build; publish it again or fix the assignment"
    )]
    ManifestDigest {
        /// Where it came from.
        url: String,
        /// The assignment's digest.
        expected: String,
        /// The digest of what was fetched.
        found: String,
    },
    /// The manifest has another version than the one assigned.
    #[error(
        "the bundle at {url} is version {found}, but version {expected} was assigned; fix the assignment's URL"
    )]
    WrongVersion {
        /// Where it came from.
        url: String,
        /// The assigned version.
        expected: String,
        /// The published version.
        found: String,
    },
    /// The manifest's signature is missing or not trusted; nothing large was downloaded.
    #[error("refusing bundle {bundle}: {cause}")]
    Untrusted {
        /// The bundle (`name vVERSION`).
        bundle: String,
        /// Why.
        cause: SignatureError,
    },
    /// The manifest lists a file this device will not write.
    #[error(
        "refusing bundle {bundle}: its manifest lists `{file}`, which is not a plain file name (or \
         ends in {PART_SUFFIX}); export the bundle again with tandem-train"
    )]
    UnsafeFileName {
        /// The bundle (`name vVERSION`).
        bundle: String,
        /// The file name.
        file: String,
    },
    /// The bundle was rolled back on this device before.
    #[error(
        "bundle {bundle} was rolled back on this device before{reason}; assign a newer build, or stage \
         it again on purpose (`tandemd update --force`)"
    )]
    Rejected {
        /// The bundle (`name vVERSION`).
        bundle: String,
        /// Why it was rolled back, when this was the latest rollback.
        reason: String,
    },
    /// The downloaded slot does not verify.
    #[error("the downloaded bundle does not verify: {0}")]
    Verify(#[from] SlotVerifyError),
    /// The manifest could not be written into the slot.
    #[error("cannot write {path}: {cause}; check free disk space and permissions", path = .path.display())]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        cause: std::io::Error,
    },
}

/// Downloads and verifies assigned bundles into the slot store it owns.
#[derive(Debug)]
pub struct Updater {
    slots: Slots,
    downloader: Downloader,
}

impl Updater {
    /// An updater over `slots`, downloading with `options`.
    pub fn new(slots: Slots, options: DownloadOptions) -> Result<Self, DownloadError> {
        Ok(Self { slots, downloader: Downloader::new(options)? })
    }

    /// The slot store.
    pub fn slots(&self) -> &Slots {
        &self.slots
    }

    /// The slot store, to activate a staged bundle or record probation events.
    pub fn slots_mut(&mut self) -> &mut Slots {
        &mut self.slots
    }

    /// Stages `assignment` into the inactive slot; see the module documentation. `on_event` hears
    /// about progress. Safe to interrupt at any point (the process killed included): the slot stays
    /// marked as staging, and the next call for the same build continues where this one stopped.
    pub async fn stage(
        &mut self,
        assignment: &Assignment,
        on_event: &(dyn Fn(&StageEvent) + Send + Sync),
    ) -> Result<Staged, StageError> {
        let base = folder_url(&assignment.url);
        let manifest_url = file_url(&base, MANIFEST_FILE)?;
        let manifest_bytes = self.downloader.fetch_small(&manifest_url).await?;
        let (manifest, bundle) = self.check_manifest(assignment, &manifest_url, &manifest_bytes)?;
        let bundle_size: u64 = manifest.files.values().map(|f| f.size).sum();
        on_event(&StageEvent::ManifestChecked { bundle: bundle.clone(), bytes: bundle_size });

        if let Some(current) = self.slots.current().filter(|c| c.bundle == bundle) {
            return Ok(Staged::AlreadyActive(current));
        }
        if self.slots.is_rejected(&bundle) {
            if !assignment.retry_rejected {
                let reason = match self.slots.last_rollback() {
                    Some(r) if r.from == bundle => format!(" ({})", r.reason),
                    _ => String::new(),
                };
                return Err(StageError::Rejected { bundle: bundle.to_string(), reason });
            }
            self.slots.forget_rejection(&bundle)?;
        }

        let (slot, dir, start) = self.slots.begin_staging(&bundle)?;
        on_event(&StageEvent::SlotChosen { slot, resumed: start != StagingStart::Fresh });
        if start == StagingStart::AlreadyReady {
            on_event(&StageEvent::Verifying { slot });
            match self.verify(&dir, &bundle).await {
                Ok(()) => {
                    on_event(&StageEvent::Staged { slot });
                    return Ok(Staged::Ready(self.slots.mark_ready(slot, &bundle)?));
                }
                Err(error) => {
                    tracing::warn!(%slot, %error, "a ready slot no longer verifies; repairing it");
                    self.slots.mark_staging(slot, &bundle)?;
                }
            }
        }

        write_manifest(&dir, &manifest_bytes)?;
        prune_unlisted(&dir, &manifest)?;
        let mut done = 0u64;
        for (name, digest) in &manifest.files {
            let url = file_url(&base, name)?;
            let progress = |file_bytes: u64| {
                on_event(&StageEvent::Progress {
                    file: name.clone(),
                    file_bytes,
                    file_size: digest.size,
                    bundle_bytes: done + file_bytes,
                    bundle_size,
                });
            };
            self.downloader.fetch_file(&url, &dir.join(name), digest, &progress).await?;
            tracing::debug!(%slot, file = %name, bytes = digest.size, "bundle file downloaded and checked");
            done += digest.size;
        }
        on_event(&StageEvent::Verifying { slot });
        self.verify(&dir, &bundle).await?;
        let staged = self.slots.mark_ready(slot, &bundle)?;
        on_event(&StageEvent::Staged { slot });
        tracing::info!(%slot, %bundle, bytes = bundle_size, "bundle staged and verified");
        Ok(Staged::Ready(staged))
    }

    fn check_manifest(
        &self,
        assignment: &Assignment,
        url: &Url,
        bytes: &[u8],
    ) -> Result<(BundleManifest, BundleId), StageError> {
        let digest = FileDigest::of_bytes(bytes);
        if let Some(expected) = &assignment.manifest_sha256
            && !expected.eq_ignore_ascii_case(&digest.sha256)
        {
            return Err(StageError::ManifestDigest {
                url: url.to_string(),
                expected: expected.clone(),
                found: digest.sha256,
            });
        }
        let manifest = BundleManifest::from_json(&String::from_utf8_lossy(bytes))
            .map_err(|cause| StageError::Manifest { url: url.to_string(), cause })?;
        if let Some(expected) = &assignment.version
            && *expected != manifest.version
        {
            return Err(StageError::WrongVersion {
                url: url.to_string(),
                expected: expected.clone(),
                found: manifest.version,
            });
        }
        let bundle = BundleId {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            manifest_sha256: digest.sha256,
        };
        let trusted = self.slots.trusted_keys();
        if !trusted.is_empty() {
            signature::verify_manifest(&manifest, trusted)
                .map_err(|cause| StageError::Untrusted { bundle: bundle.to_string(), cause })?;
        }
        if let Some(file) = manifest.files.keys().find(|name| !is_plain_file_name(name)) {
            return Err(StageError::UnsafeFileName { bundle: bundle.to_string(), file: file.clone() });
        }
        Ok((manifest, bundle))
    }

    async fn verify(&self, dir: &Path, bundle: &BundleId) -> Result<(), SlotVerifyError> {
        let (dir, bundle) = (dir.to_path_buf(), bundle.clone());
        let trusted = Arc::new(self.slots.trusted_keys().to_vec());
        tokio::task::spawn_blocking(move || verify_slot_dir(&dir, &bundle, &trusted))
            .await
            .expect("verification does not panic")
    }
}

/// A name the updater may create inside a slot: no path separators, not the manifest, not a
/// download's temporary.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name != MANIFEST_FILE
        && !name.ends_with(PART_SUFFIX)
        && !name.contains(['/', '\\', '\0'])
}

/// `url` as a folder, so that file names resolve inside it.
fn folder_url(url: &Url) -> Url {
    let mut url = url.clone();
    if !url.path().ends_with('/') {
        url.set_path(&format!("{}/", url.path()));
    }
    url
}

/// `name` inside the folder `base`, percent-encoded as one path segment.
fn file_url(base: &Url, name: &str) -> Result<Url, StageError> {
    let mut url = base.clone();
    url.path_segments_mut()
        .map_err(|()| StageError::BadUrl { url: base.to_string() })?
        .pop_if_empty()
        .push(name);
    Ok(url)
}

fn write_manifest(dir: &Path, bytes: &[u8]) -> Result<(), StageError> {
    let path = dir.join(MANIFEST_FILE);
    if std::fs::read(&path).is_ok_and(|on_disk| on_disk == bytes) {
        return Ok(());
    }
    state_file::write_atomic(&path, bytes).map_err(|cause| StageError::Io { path, cause })
}

/// Removes what a slot may not hold: anything but the manifest, the files it lists and their
/// partial downloads.
fn prune_unlisted(dir: &Path, manifest: &BundleManifest) -> Result<(), StageError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |cause| StageError::Io { path, cause }
    };
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let listed = name == MANIFEST_FILE
            || manifest.files.contains_key(&name)
            || name.strip_suffix(PART_SUFFIX).is_some_and(|n| manifest.files.contains_key(n));
        if !listed {
            let path = entry.path();
            let removed = if entry.file_type().map_err(io(&path))?.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.map_err(io(&path))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_urls_resolve_inside_the_bundle_folder_and_are_encoded() {
        let base = folder_url(&Url::parse("https://fleet.example/bundles/tiny/2").unwrap());
        assert_eq!(
            file_url(&base, "model.onnx").unwrap().as_str(),
            "https://fleet.example/bundles/tiny/2/model.onnx"
        );
        assert_eq!(
            file_url(&base, "a b#c").unwrap().as_str(),
            "https://fleet.example/bundles/tiny/2/a%20b%23c"
        );
    }

    #[test]
    fn names_that_could_leave_the_slot_or_clash_with_temporaries_are_refused() {
        for bad in ["", ".", "..", "../x", "a/b", "a\\b", "manifest.json", "model.onnx.part"] {
            assert!(!is_plain_file_name(bad), "{bad}");
        }
        assert!(is_plain_file_name("model.onnx.data"));
    }
}
