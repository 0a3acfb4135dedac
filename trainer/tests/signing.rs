//! Signing real exported bundles: key files, signing in place, refusing to sign a bundle that does not
//! match its manifest, and verifying as a device does.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::Device;
use tandem_core::bundle::signature::{
    self, BundleVerifyError, FileCheckError, KeyFormatError, SignatureError, SigningKey,
};
use tandem_core::bundle::{BundleManifest, MANIFEST_FILE, MODEL_FILE};
use tandem_train::export::{ExportOptions, export_bundle};
use tandem_train::model::TrainableModel;
use tandem_train::model::presets::Preset;
use tandem_train::signing::{
    SigningError, generate_key_pair, read_public_key, read_secret_key, sign_bundle, verify_bundle,
};
use tandem_train::tokenizer_training::{DEFAULT_CORPUS, train_bpe_tokenizer};

/// One tiny bundle exported once; every test signs its own copy.
fn template_bundle() -> &'static Path {
    static TEMPLATE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, bundle) = TEMPLATE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let checkpoint = dir.path().join("checkpoint");
        let config = Preset::TinyQwen2.config();
        TrainableModel::random(&config, 0.02, 5, &Device::Cpu).unwrap().save(&checkpoint).unwrap();
        train_bpe_tokenizer(DEFAULT_CORPUS, 300, &checkpoint.join("tokenizer.json")).unwrap();
        let bundle = dir.path().join("bundle");
        export_bundle(&checkpoint, &bundle, &ExportOptions::new("signed-tiny", "4")).unwrap();
        (dir, bundle)
    });
    bundle
}

/// A fresh copy of the template bundle in `dir`.
fn bundle_in(dir: &Path) -> PathBuf {
    let bundle = dir.join("bundle");
    fs::create_dir(&bundle).unwrap();
    for entry in fs::read_dir(template_bundle()).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), bundle.join(entry.file_name())).unwrap();
    }
    bundle
}

fn manifest_of(bundle: &Path) -> BundleManifest {
    BundleManifest::from_json(&fs::read_to_string(bundle.join(MANIFEST_FILE)).unwrap()).unwrap()
}

fn flip_a_byte(path: &Path) {
    let mut bytes = fs::read(path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    fs::write(path, bytes).unwrap();
}

fn keys(dir: &Path, name: &str) -> (SigningKey, PathBuf) {
    let files = generate_key_pair(&dir.join("keys"), name).unwrap();
    (read_secret_key(&files.secret).unwrap(), files.public)
}

#[test]
fn keygen_writes_an_owner_only_secret_key_and_its_public_key() {
    let dir = tempfile::tempdir().unwrap();
    let files = generate_key_pair(&dir.path().join("keys"), "release").unwrap();
    assert_eq!(files.secret, dir.path().join("keys/release.key"));
    assert_eq!(files.public, dir.path().join("keys/release.pub"));
    assert_eq!(fs::metadata(&files.secret).unwrap().permissions().mode() & 0o777, 0o600);

    let secret = read_secret_key(&files.secret).unwrap();
    let public = read_public_key(&files.public).unwrap();
    assert_eq!(secret.verifying_key(), public);
    assert_eq!(files.key_id, signature::key_id(&public));
    assert!(fs::read_to_string(&files.public).unwrap().contains(&files.key_id));

    let other = generate_key_pair(&dir.path().join("keys"), "other").unwrap();
    assert_ne!(other.key_id, files.key_id, "every key pair is freshly random");
}

#[test]
fn keygen_never_overwrites_an_existing_key() {
    let dir = tempfile::tempdir().unwrap();
    let first = generate_key_pair(dir.path(), "release").unwrap();
    let before = fs::read(&first.secret).unwrap();
    let err = generate_key_pair(dir.path(), "release").unwrap_err();
    assert!(matches!(&err, SigningError::KeyExists(path) if *path == first.secret), "{err}");
    assert_eq!(fs::read(&first.secret).unwrap(), before);
    assert!(matches!(generate_key_pair(dir.path(), "../up"), Err(SigningError::InvalidKeyName(_))));
}

#[test]
fn a_signed_bundle_verifies_with_the_public_key_and_only_its_manifest_changed() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle_in(dir.path());
    let (secret, public_path) = keys(dir.path(), "release");
    let unsigned = manifest_of(&bundle);

    let signed = sign_bundle(&bundle, &secret).unwrap();
    assert_eq!(signed.replaced_key_id, None);
    let on_disk = manifest_of(&bundle);
    assert_eq!(on_disk, signed.manifest);
    assert_eq!(BundleManifest { signature: None, ..on_disk.clone() }, unsigned);
    assert_eq!(
        fs::read_dir(&bundle).unwrap().count(),
        unsigned.files.len() + 1,
        "no staging file is left behind"
    );

    let (manifest, key_id) = verify_bundle(&bundle, &[read_public_key(&public_path).unwrap()]).unwrap();
    assert_eq!(key_id, signature::key_id(&secret.verifying_key()));
    assert_eq!(manifest.version, "4");
}

#[test]
fn signing_refuses_a_bundle_whose_model_does_not_match_its_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle_in(dir.path());
    let (secret, _) = keys(dir.path(), "release");
    flip_a_byte(&bundle.join(MODEL_FILE));
    let before = fs::read(bundle.join(MANIFEST_FILE)).unwrap();

    let err = sign_bundle(&bundle, &secret).unwrap_err();
    assert!(
        matches!(&err, SigningError::FilesDoNotMatch {
            cause: FileCheckError::DigestMismatch { file, .. }, ..
        }
            if file == MODEL_FILE),
        "{err}"
    );
    assert!(err.to_string().contains("refusing to sign"), "{err}");
    assert_eq!(fs::read(bundle.join(MANIFEST_FILE)).unwrap(), before, "the manifest is untouched");
}

#[test]
fn signing_refuses_a_bundle_holding_files_its_manifest_does_not_list() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle_in(dir.path());
    let (secret, _) = keys(dir.path(), "release");
    fs::write(bundle.join("chat_template.jinja"), "{{ messages }}").unwrap();
    let err = sign_bundle(&bundle, &secret).unwrap_err();
    assert!(
        matches!(&err, SigningError::FilesDoNotMatch { cause: FileCheckError::Unlisted { file }, .. }
            if file == "chat_template.jinja"),
        "{err}"
    );
}

#[test]
fn signing_again_replaces_the_signature_and_the_old_key_no_longer_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle_in(dir.path());
    let (old, _) = keys(dir.path(), "old");
    let (new, _) = keys(dir.path(), "new");
    sign_bundle(&bundle, &old).unwrap();
    let signed = sign_bundle(&bundle, &new).unwrap();
    assert_eq!(signed.replaced_key_id, Some(signature::key_id(&old.verifying_key())));

    verify_bundle(&bundle, &[new.verifying_key()]).unwrap();
    let err = verify_bundle(&bundle, &[old.verifying_key()]).unwrap_err();
    assert!(
        matches!(
            &err,
            SigningError::Verification {
                cause: BundleVerifyError::Signature(SignatureError::UntrustedKey { .. }),
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn verification_catches_a_model_changed_after_signing() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle_in(dir.path());
    let (secret, _) = keys(dir.path(), "release");
    sign_bundle(&bundle, &secret).unwrap();
    flip_a_byte(&bundle.join(MODEL_FILE));
    let err = verify_bundle(&bundle, &[secret.verifying_key()]).unwrap_err();
    assert!(
        matches!(
            &err,
            SigningError::Verification {
                cause: BundleVerifyError::Files(FileCheckError::DigestMismatch { .. }),
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains(&bundle.display().to_string()), "the error names the bundle: {err}");
}

#[test]
fn verification_catches_a_manifest_edited_after_signing() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle_in(dir.path());
    let (secret, _) = keys(dir.path(), "release");
    sign_bundle(&bundle, &secret).unwrap();
    let mut manifest = manifest_of(&bundle);
    manifest.version = "5".into();
    fs::write(bundle.join(MANIFEST_FILE), manifest.to_json_pretty()).unwrap();
    let err = verify_bundle(&bundle, &[secret.verifying_key()]).unwrap_err();
    assert!(
        matches!(
            &err,
            SigningError::Verification {
                cause: BundleVerifyError::Signature(SignatureError::BadSignature { .. }),
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn key_files_of_the_wrong_kind_or_shape_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let files = generate_key_pair(dir.path(), "release").unwrap();
    let err = read_public_key(&files.secret).unwrap_err();
    assert!(
        matches!(&err, SigningError::KeyFile { path, cause: KeyFormatError::SecretKeyInsteadOfPublic }
            if *path == files.secret),
        "{err}"
    );
    assert!(err.to_string().contains("release.key"), "{err}");
    let err = read_secret_key(&files.public).unwrap_err();
    assert!(matches!(&err, SigningError::KeyFile { cause: KeyFormatError::PublicKeyInsteadOfSecret, .. }));

    let garbled = dir.path().join("garbled.pub");
    fs::write(&garbled, "ed25519-public 12345\n").unwrap();
    let err = read_public_key(&garbled).unwrap_err();
    assert!(matches!(&err, SigningError::KeyFile { cause: KeyFormatError::NotHex { .. }, .. }), "{err}");
    assert!(matches!(read_public_key(&dir.path().join("missing.pub")), Err(SigningError::Io { .. })));
}
