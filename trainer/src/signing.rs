//! Signing bundles where they are made: key pairs and key files, signing a bundle in place, and the
//! same verification devices run before loading one.
//!
//! The signature, the key id and the key file format belong to [`tandem_core::bundle::signature`];
//! this module adds the file system. Signing refuses a bundle whose files do not match its manifest
//! (or that holds files the manifest does not list): a signature would otherwise vouch for a
//! corrupted bundle.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::TryRngCore;
use tandem_core::bundle::signature::{
    self, BundleVerifyError, FileCheckError, KeyFormatError, SigningKey, VerifyingKey,
};
use tandem_core::bundle::{BundleManifest, MANIFEST_FILE, ManifestError};

/// Extension of the secret key file `tandem-train keygen` writes.
pub const SECRET_KEY_EXTENSION: &str = "key";
/// Extension of the public key file `tandem-train keygen` writes.
pub const PUBLIC_KEY_EXTENSION: &str = "pub";

/// Where the signed manifest is written before it replaces `manifest.json`.
const STAGED_MANIFEST: &str = ".manifest.json.signing";

/// Errors generating keys, reading key files, signing or verifying a bundle.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("{path}: {cause}", path = .path.display())]
    Io { path: PathBuf, cause: std::io::Error },
    #[error(
        "{} already exists; choose another --name or --out (an existing key is never overwritten)",
        .0.display()
    )]
    KeyExists(PathBuf),
    #[error("`{0}` is not a usable key name: use a plain file name such as `release-2025`")]
    InvalidKeyName(String),
    #[error("the operating system's random generator failed: {0}")]
    Randomness(String),
    #[error("the key file {path} is not usable: {cause}", path = .path.display())]
    KeyFile { path: PathBuf, cause: KeyFormatError },
    #[error("{path}: {cause}", path = .path.display())]
    Manifest { path: PathBuf, cause: ManifestError },
    #[error(
        "refusing to sign {bundle}: a signature would vouch for files that do not match the manifest: \
         {cause}",
        bundle = .bundle.display()
    )]
    FilesDoNotMatch { bundle: PathBuf, cause: FileCheckError },
    #[error("bundle {bundle} does not verify: {cause}", bundle = .bundle.display())]
    Verification { bundle: PathBuf, cause: BundleVerifyError },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> SigningError + '_ {
    move |cause| SigningError::Io { path: path.to_path_buf(), cause }
}

/// The files [`generate_key_pair`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPairFiles {
    /// `NAME.key`, the secret key (mode 0600).
    pub secret: PathBuf,
    /// `NAME.pub`, the public key devices trust.
    pub public: PathBuf,
    /// The key id signatures made with it carry.
    pub key_id: String,
}

/// Generates an ed25519 key pair from the operating system's random generator and writes
/// `out_dir/NAME.key` (mode 0600) and `out_dir/NAME.pub`. Existing files are never overwritten.
pub fn generate_key_pair(out_dir: &Path, name: &str) -> Result<KeyPairFiles, SigningError> {
    if name.is_empty() || name.starts_with('.') || name.contains(['/', '\\', '\0']) {
        return Err(SigningError::InvalidKeyName(name.to_string()));
    }
    let secret_path = out_dir.join(format!("{name}.{SECRET_KEY_EXTENSION}"));
    let public_path = out_dir.join(format!("{name}.{PUBLIC_KEY_EXTENSION}"));
    for path in [&secret_path, &public_path] {
        if fs::symlink_metadata(path).is_ok() {
            return Err(SigningError::KeyExists(path.clone()));
        }
    }
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.try_fill_bytes(&mut seed).map_err(|e| SigningError::Randomness(e.to_string()))?;
    let key = SigningKey::from_bytes(&seed);
    seed.fill(0);

    fs::create_dir_all(out_dir).map_err(io_error(out_dir))?;
    write_new(&secret_path, signature::secret_key_file(&key).as_bytes(), 0o600)?;
    if let Err(e) =
        write_new(&public_path, signature::public_key_file(&key.verifying_key()).as_bytes(), 0o644)
    {
        // A secret key without its public half is of no use to anyone.
        let _ = fs::remove_file(&secret_path);
        return Err(e);
    }
    Ok(KeyPairFiles {
        secret: secret_path,
        public: public_path,
        key_id: signature::key_id(&key.verifying_key()),
    })
}

/// Creates `path` with `mode` (failing when it exists) and writes `bytes` durably.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), SigningError> {
    let mut file =
        OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|cause| {
            if cause.kind() == std::io::ErrorKind::AlreadyExists {
                SigningError::KeyExists(path.to_path_buf())
            } else {
                SigningError::Io { path: path.to_path_buf(), cause }
            }
        })?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(io_error(path))
}

/// Reads a secret key file (`NAME.key`); warns when others may read it.
pub fn read_secret_key(path: &Path) -> Result<SigningKey, SigningError> {
    let text = fs::read_to_string(path).map_err(io_error(path))?;
    let key = signature::parse_secret_key(&text)
        .map_err(|cause| SigningError::KeyFile { path: path.into(), cause })?;
    if let Ok(meta) = fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            mode = format_args!("{:o}", meta.permissions().mode() & 0o777),
            "the secret signing key is readable by group or others; chmod 600 it"
        );
    }
    Ok(key)
}

/// Reads a public key file (`NAME.pub`).
pub fn read_public_key(path: &Path) -> Result<VerifyingKey, SigningError> {
    let text = fs::read_to_string(path).map_err(io_error(path))?;
    signature::parse_public_key(&text).map_err(|cause| SigningError::KeyFile { path: path.into(), cause })
}

/// What [`sign_bundle`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct SignedBundle {
    /// The manifest as written, with its new signature.
    pub manifest: BundleManifest,
    /// The key id of the signature that was replaced, when the bundle was signed before.
    pub replaced_key_id: Option<String>,
}

/// Signs the bundle in `bundle_dir` with `key`, in place: checks that the directory holds exactly
/// the files its manifest lists with their recorded sizes and digests, then replaces
/// `manifest.json` atomically with the signed manifest. A previous signature is replaced.
pub fn sign_bundle(bundle_dir: &Path, key: &SigningKey) -> Result<SignedBundle, SigningError> {
    let mut manifest = read_manifest(bundle_dir)?;
    let mismatch = |cause| SigningError::FilesDoNotMatch { bundle: bundle_dir.to_path_buf(), cause };
    let entries = bundle_entries(bundle_dir)?;
    signature::check_listed(&manifest, entries.iter().map(String::as_str)).map_err(mismatch)?;
    signature::verify_files(&manifest, |name| File::open(bundle_dir.join(name))).map_err(mismatch)?;

    let replaced_key_id = manifest.signature.take().map(|s| s.key_id);
    signature::sign_manifest(&mut manifest, key);
    replace_manifest(bundle_dir, &manifest)?;
    Ok(SignedBundle { manifest, replaced_key_id })
}

/// Runs the checks a device runs before loading the bundle in `bundle_dir`: signed by one of
/// `trusted`, no unlisted files, every file's size and sha256 as recorded. Returns the manifest and
/// the id of the key that signed it.
pub fn verify_bundle(
    bundle_dir: &Path,
    trusted: &[VerifyingKey],
) -> Result<(BundleManifest, String), SigningError> {
    let manifest = read_manifest(bundle_dir)?;
    let entries = bundle_entries(bundle_dir)?;
    let key = signature::verify_bundle(&manifest, trusted, entries.iter().map(String::as_str), |name| {
        File::open(bundle_dir.join(name))
    })
    .map_err(|cause| SigningError::Verification { bundle: bundle_dir.to_path_buf(), cause })?;
    let key_id = signature::key_id(key);
    Ok((manifest, key_id))
}

fn read_manifest(bundle_dir: &Path) -> Result<BundleManifest, SigningError> {
    let path = bundle_dir.join(MANIFEST_FILE);
    let text = fs::read_to_string(&path).map_err(io_error(&path))?;
    BundleManifest::from_json(&text).map_err(|cause| SigningError::Manifest { path, cause })
}

/// The names of everything in the bundle directory.
fn bundle_entries(bundle_dir: &Path) -> Result<Vec<String>, SigningError> {
    fs::read_dir(bundle_dir)
        .and_then(|entries| {
            entries.map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned())).collect()
        })
        .map_err(io_error(bundle_dir))
}

/// Writes `manifest` next to `manifest.json`, then renames it over it and syncs the directory, so
/// the bundle holds either the old manifest or the new one, never half of one.
fn replace_manifest(bundle_dir: &Path, manifest: &BundleManifest) -> Result<(), SigningError> {
    let staged = bundle_dir.join(STAGED_MANIFEST);
    let target = bundle_dir.join(MANIFEST_FILE);
    let write = || -> Result<(), SigningError> {
        let mut file = File::create(&staged).map_err(io_error(&staged))?;
        file.write_all(manifest.to_json_pretty().as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io_error(&staged))?;
        fs::rename(&staged, &target).map_err(io_error(&target))
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&staged);
        return Err(e);
    }
    File::open(bundle_dir).and_then(|dir| dir.sync_all()).map_err(io_error(bundle_dir))
}
