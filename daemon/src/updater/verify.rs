//! Whether a slot directory holds exactly the bundle the state file says: `manifest.json` with the
//! recorded sha256, no file the manifest does not list, every listed file with its size and sha256,
//! and, when trusted keys are configured, a signature by one of them. Reads every byte.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use tandem_core::bundle::signature::{self, BundleVerifyError, VerifyingKey};
use tandem_core::bundle::{BundleManifest, FileDigest, MANIFEST_FILE, ManifestError};

use super::state::BundleId;

/// Why a slot directory does not hold a complete, verified bundle.
#[derive(Debug, thiserror::Error)]
pub enum SlotVerifyError {
    /// The manifest cannot be read.
    #[error("cannot read {path}: {cause}; the slot is incomplete and will be staged again", path = .path.display())]
    Unreadable {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        cause: std::io::Error,
    },
    /// The manifest does not parse.
    #[error("{path} is not a valid manifest: {cause}", path = .path.display())]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// The parse error.
        cause: ManifestError,
    },
    /// The manifest is not the one the state file recorded.
    #[error(
        "{path} has sha256 {found}, but the slot state records {expected}: the slot holds another \
         build than the one staged; stage the bundle again",
        path = .path.display()
    )]
    ManifestChanged {
        /// The manifest file.
        path: PathBuf,
        /// The digest in the state file.
        expected: String,
        /// The digest on disk.
        found: String,
    },
    /// The files or the signature do not check out.
    #[error("{dir}: {cause}", dir = .dir.display())]
    Bundle {
        /// The slot directory.
        dir: PathBuf,
        /// What failed.
        cause: Box<BundleVerifyError>,
    },
}

/// Reads and parses `dir/manifest.json`, returning its bytes' digest too.
pub(crate) fn read_manifest(dir: &Path) -> Result<(BundleManifest, FileDigest), SlotVerifyError> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = fs::read(&path).map_err(|cause| SlotVerifyError::Unreadable { path: path.clone(), cause })?;
    let text = String::from_utf8_lossy(&bytes);
    let manifest =
        BundleManifest::from_json(&text).map_err(|cause| SlotVerifyError::Manifest { path, cause })?;
    Ok((manifest, FileDigest::of_bytes(&bytes)))
}

/// Checks that `dir` holds exactly `expected`, signed by one of `trusted` when any are given.
pub fn verify_slot_dir(
    dir: &Path,
    expected: &BundleId,
    trusted: &[VerifyingKey],
) -> Result<(), SlotVerifyError> {
    let (manifest, digest) = read_manifest(dir)?;
    if !digest.sha256.eq_ignore_ascii_case(&expected.manifest_sha256) {
        return Err(SlotVerifyError::ManifestChanged {
            path: dir.join(MANIFEST_FILE),
            expected: expected.manifest_sha256.clone(),
            found: digest.sha256,
        });
    }
    let entries: Vec<String> = fs::read_dir(dir)
        .and_then(|entries| {
            entries.map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned())).collect()
        })
        .map_err(|cause| SlotVerifyError::Unreadable { path: dir.to_path_buf(), cause })?;
    let present = entries.iter().map(String::as_str);
    let open = |name: &str| File::open(dir.join(name));
    let checked = if trusted.is_empty() {
        signature::check_listed(&manifest, present)
            .and_then(|()| signature::verify_files(&manifest, open))
            .map_err(BundleVerifyError::from)
    } else {
        signature::verify_bundle(&manifest, trusted, present, open).map(|_| ())
    };
    checked.map_err(|cause| SlotVerifyError::Bundle { dir: dir.to_path_buf(), cause: Box::new(cause) })
}
