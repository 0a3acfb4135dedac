//! Deciding whether a model directory may be loaded, before the engine touches it.
//!
//! With trusted keys configured (`trusted_bundle_keys`, or `tandemd generate --trusted-key`), only a
//! Tandem bundle passes: signed by one of those keys, holding only the files its manifest lists, each
//! with the size and sha256 the manifest records. Anything else is refused with an error naming the
//! directory, the problem and the fix. Without trusted keys every model directory loads as before,
//! and `serve` warns once that nothing was verified. The checks themselves are
//! [`tandem_core::bundle::signature`]'s; this module reads the files for them.
//!
//! The check runs on the files as they are at startup; whoever can rewrite the model directory while
//! the daemon starts can still race it, so the directory itself belongs to root or the tandem user.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::Instant;

use tandem_core::bundle::signature::{self, BundleVerifyError, KeyFormatError, VerifyingKey};
use tandem_core::bundle::{BundleManifest, MANIFEST_FILE, ManifestError};

/// Why a model directory may not be loaded, or the trusted keys could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BundleTrustError {
    #[error(
        "cannot read the trusted bundle key {path}: {cause}; give the .pub file `tandem-train keygen` \
         wrote",
        path = .path.display()
    )]
    KeyUnreadable { path: PathBuf, cause: std::io::Error },
    #[error("the trusted bundle key {path} is not usable: {cause}", path = .path.display())]
    KeyMalformed { path: PathBuf, cause: KeyFormatError },
    #[error(
        "refusing to load {dir}: it is not a Tandem bundle (it has no manifest.json), and only signed \
         Tandem bundles can be loaded when trusted bundle keys are configured; export the model with \
         `tandem-train export`, sign it with `tandem-train sign`, or remove the trusted keys \
         (`trusted_bundle_keys`) to load unverified models",
        dir = .dir.display()
    )]
    NotABundle { dir: PathBuf },
    #[error("refusing to load {dir}: cannot read {file}: {cause}", dir = .dir.display())]
    Unreadable { dir: PathBuf, file: String, cause: std::io::Error },
    #[error("refusing to load {dir}: {cause}", dir = .dir.display())]
    Manifest { dir: PathBuf, cause: ManifestError },
    #[error("refusing to load bundle {name} v{version} from {dir}: {cause}", dir = .dir.display())]
    Refused { dir: PathBuf, name: String, version: String, cause: Box<BundleVerifyError> },
}

/// A bundle that passed [`verify_model_dir`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedBundle {
    /// The bundle's name.
    pub name: String,
    /// The bundle's version.
    pub version: String,
    /// The id of the trusted key that signed it.
    pub key_id: String,
}

/// Reads the public key files (`NAME.pub` from `tandem-train keygen`) to trust.
pub fn load_trusted_keys(paths: &[PathBuf]) -> Result<Vec<VerifyingKey>, BundleTrustError> {
    paths
        .iter()
        .map(|path| {
            let text = fs::read_to_string(path)
                .map_err(|cause| BundleTrustError::KeyUnreadable { path: path.clone(), cause })?;
            signature::parse_public_key(&text)
                .map_err(|cause| BundleTrustError::KeyMalformed { path: path.clone(), cause })
        })
        .collect()
}

/// Checks the model directory `dir` against `trusted`: it must be a Tandem bundle signed by one of
/// them, with no unlisted files and every file matching its manifest. Reads (and hashes) every file.
pub fn verify_model_dir(dir: &Path, trusted: &[VerifyingKey]) -> Result<VerifiedBundle, BundleTrustError> {
    let started = Instant::now();
    let manifest_path = dir.join(MANIFEST_FILE);
    if !manifest_path.is_file() {
        return Err(BundleTrustError::NotABundle { dir: dir.to_path_buf() });
    }
    let unreadable = |file: &'static str| {
        move |cause| BundleTrustError::Unreadable { dir: dir.to_path_buf(), file: file.into(), cause }
    };
    let text = fs::read_to_string(&manifest_path).map_err(unreadable(MANIFEST_FILE))?;
    let manifest = BundleManifest::from_json(&text)
        .map_err(|cause| BundleTrustError::Manifest { dir: dir.to_path_buf(), cause })?;
    let entries: Vec<String> = fs::read_dir(dir)
        .and_then(|entries| {
            entries.map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned())).collect()
        })
        .map_err(unreadable("the directory listing"))?;

    let key = signature::verify_bundle(&manifest, trusted, entries.iter().map(String::as_str), |name| {
        File::open(dir.join(name))
    })
    .map_err(|cause| BundleTrustError::Refused {
        dir: dir.to_path_buf(),
        name: manifest.name.clone(),
        version: manifest.version.clone(),
        cause: Box::new(cause),
    })?;
    let verified = VerifiedBundle {
        name: manifest.name.clone(),
        version: manifest.version.clone(),
        key_id: signature::key_id(key),
    };
    tracing::info!(
        dir = %dir.display(),
        bundle = %verified.name,
        version = %verified.version,
        key_id = %verified.key_id,
        files = manifest.files.len(),
        bytes = manifest.files.values().map(|f| f.size).sum::<u64>(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "bundle signature and files verified"
    );
    Ok(verified)
}

/// What `serve` does before loading `dir`: with `trusted_key_files`, [`verify_model_dir`] against
/// them; without, nothing, after warning (once per process) that the model is not verified.
pub fn check_before_loading(
    dir: &Path,
    trusted_key_files: &[PathBuf],
) -> Result<Option<VerifiedBundle>, BundleTrustError> {
    if trusted_key_files.is_empty() {
        static WARNED: Once = Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                dir = %dir.display(),
                "model bundles are not verified: no trusted_bundle_keys are configured, so whoever can \
                 write the model directory decides what this device runs"
            );
        });
        return Ok(None);
    }
    let trusted = load_trusted_keys(trusted_key_files)?;
    verify_model_dir(dir, &trusted).map(Some)
}

#[cfg(test)]
mod tests {
    use tandem_core::bundle::signature::{SignatureError, SigningKey, public_key_file, sign_manifest};
    use tandem_core::bundle::{MODEL_FILE, TOKENIZER_FILE};

    use super::*;
    use crate::test_support::tiny_manifest;

    /// A bundle directory with a small fake graph and tokenizer, signed by `key` when given.
    fn bundle(dir: &Path, key: Option<&SigningKey>) {
        fs::write(dir.join(MODEL_FILE), b"graph").unwrap();
        fs::write(dir.join(TOKENIZER_FILE), b"{}").unwrap();
        let mut manifest =
            tiny_manifest("tiny", "2", &[(MODEL_FILE, &b"graph"[..]), (TOKENIZER_FILE, &b"{}"[..])]);
        if let Some(key) = key {
            sign_manifest(&mut manifest, key);
        }
        fs::write(dir.join(MANIFEST_FILE), manifest.to_json_pretty()).unwrap();
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn a_signed_intact_bundle_is_verified_with_its_key_id() {
        let dir = tempfile::tempdir().unwrap();
        bundle(dir.path(), Some(&key(1)));
        let verified = verify_model_dir(dir.path(), &[key(1).verifying_key()]).unwrap();
        assert_eq!((verified.name.as_str(), verified.version.as_str()), ("tiny", "2"));
        assert_eq!(verified.key_id, signature::key_id(&key(1).verifying_key()));
    }

    #[test]
    fn an_unsigned_bundle_is_refused_naming_the_bundle_and_how_to_sign_it() {
        let dir = tempfile::tempdir().unwrap();
        bundle(dir.path(), None);
        let err = verify_model_dir(dir.path(), &[key(1).verifying_key()]).unwrap_err();
        assert!(
            matches!(&err, BundleTrustError::Refused { cause, .. }
                if matches!(**cause, BundleVerifyError::Signature(SignatureError::Unsigned))),
            "{err}"
        );
        let text = err.to_string();
        assert!(text.contains("tiny v2") && text.contains(&dir.path().display().to_string()), "{text}");
        assert!(text.contains("tandem-train sign"), "{text}");
    }

    #[test]
    fn a_directory_without_a_manifest_is_refused_when_keys_are_trusted() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(MODEL_FILE), b"graph").unwrap();
        fs::write(dir.path().join("config.json"), b"{}").unwrap();
        let err = verify_model_dir(dir.path(), &[key(1).verifying_key()]).unwrap_err();
        assert!(matches!(err, BundleTrustError::NotABundle { .. }), "{err}");
        assert!(err.to_string().contains("only signed Tandem bundles can be loaded"), "{err}");
    }

    #[test]
    fn without_trusted_keys_any_directory_passes_unverified() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(check_before_loading(dir.path(), &[]).unwrap(), None);
    }

    #[test]
    fn trusted_key_files_are_read_and_a_secret_key_among_them_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let public = dir.path().join("release.pub");
        fs::write(&public, public_key_file(&key(1).verifying_key())).unwrap();
        assert_eq!(load_trusted_keys(std::slice::from_ref(&public)).unwrap(), [key(1).verifying_key()]);

        let secret = dir.path().join("release.key");
        fs::write(&secret, signature::secret_key_file(&key(1))).unwrap();
        let err = load_trusted_keys(&[public, secret.clone()]).unwrap_err();
        assert!(
            matches!(&err, BundleTrustError::KeyMalformed {
                path, cause: KeyFormatError::SecretKeyInsteadOfPublic
            }
                if *path == secret),
            "{err}"
        );
        let missing = dir.path().join("missing.pub");
        let err = load_trusted_keys(&[missing]).unwrap_err();
        assert!(matches!(err, BundleTrustError::KeyUnreadable { .. }), "{err}");
    }

    #[test]
    fn a_configured_key_that_cannot_be_used_is_a_configuration_problem() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("release.key");
        fs::write(&secret, signature::secret_key_file(&key(1))).unwrap();
        let text = format!("model_dir = {:?}\ntrusted_bundle_keys = [{:?}]\n", dir.path(), secret);
        let config: crate::config::DaemonConfig = toml::from_str(&text).unwrap();
        assert_eq!(config.trusted_bundle_keys, [secret]);
        let err = config.validate().unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].key, "trusted_bundle_keys");
        assert!(err.problems[0].message.contains(".pub"), "{err}");
    }

    #[test]
    fn check_before_loading_verifies_against_the_configured_key_files() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        fs::create_dir(&model).unwrap();
        bundle(&model, Some(&key(1)));
        let other = dir.path().join("other.pub");
        fs::write(&other, public_key_file(&key(2).verifying_key())).unwrap();
        let err = check_before_loading(&model, &[other]).unwrap_err();
        assert!(
            matches!(&err, BundleTrustError::Refused { cause, .. }
                if matches!(**cause, BundleVerifyError::Signature(SignatureError::UntrustedKey { .. }))),
            "{err}"
        );
    }
}
