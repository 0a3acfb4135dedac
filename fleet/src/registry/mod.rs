//! The model registry: signed bundles verified (every file's size and sha256 against the
//! manifest, the manifest's signature against the fleet's trusted keys) and copied into the
//! registry directory, then recorded in the database. Devices download the files over HTTP with
//! range requests (`range`).
//!
//! A bundle is copied into `DIR/.staging/UUID/`, verified again there (the copy is what is served),
//! renamed to `DIR/NAME/VERSION/` and only then recorded, so a crash never leaves a half bundle
//! registered: at worst an unrecorded folder, replaced by the next registration of that version.

pub mod range;

use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tandem_core::bundle::signature::VerifyingKey;
use tandem_core::bundle::{BundleManifest, MANIFEST_FILE};
use tandemd::bundle_trust::{BundleTrustError, load_trusted_keys, verify_model_dir};

use crate::config::RegistryConfig;
use crate::store::{ModelRecord, Store, StoreError, now_ms};

const STAGING: &str = ".staging";

/// Why a bundle was not registered.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry.trusted_keys: {0}")]
    Keys(BundleTrustError),
    #[error("the bundle is refused: {0}")]
    Refused(BundleTrustError),
    #[error("the bundle is refused: {0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error(
        "{name} version {version} is already registered with another manifest (sha256 {registered}, this one \
         {offered}); a version's content never changes: give the new bundle a new version"
    )]
    Conflict { name: String, version: String, registered: String, offered: String },
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// The outcome of a registration.
#[derive(Debug, Clone, PartialEq)]
pub struct Registered {
    pub model: ModelRecord,
    /// False when the same bundle was registered already (nothing changed).
    pub created: bool,
}

/// The registry directory and the keys it trusts.
#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    trusted: Vec<VerifyingKey>,
    /// One registration at a time: two of the same version must not race on its folder.
    registering: tokio::sync::Mutex<()>,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RegistryError {
    let what = what.into();
    move |source| RegistryError::Io { what, source }
}

/// A name or version usable as one path component and in a URL.
fn check_component(kind: &str, value: &str) -> Result<(), RegistryError> {
    let ok = !value.is_empty()
        && !value.starts_with('.')
        && value.len() <= 128
        && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+' | '@'));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::Invalid(format!(
            "its {kind} `{value}` must be 1 to 128 of A-Z a-z 0-9 . _ - + @, not starting with a dot"
        )))
    }
}

impl Registry {
    /// Loads the trusted keys and creates the directory.
    pub fn open(config: &RegistryConfig) -> Result<Self, RegistryError> {
        let trusted = load_trusted_keys(&config.trusted_keys).map_err(RegistryError::Keys)?;
        let staging = config.dir.join(STAGING);
        fs::create_dir_all(&staging).map_err(io(format!("cannot create {}", staging.display())))?;
        Ok(Self { dir: config.dir.clone(), trusted, registering: tokio::sync::Mutex::new(()) })
    }

    /// Deletes what interrupted registrations left in the staging area (at `serve` start; a
    /// `registry add` running at that moment fails and can be run again).
    pub fn clear_staging(&self) -> Result<(), RegistryError> {
        let staging = self.dir.join(STAGING);
        fs::remove_dir_all(&staging).map_err(io(format!("cannot clear {}", staging.display())))?;
        fs::create_dir_all(&staging).map_err(io(format!("cannot create {}", staging.display())))
    }

    /// Verifies the bundle folder `source` (on this host), copies it into the registry and records
    /// it. Registering the same bundle again changes nothing; another bundle under a registered
    /// version is refused.
    pub async fn register(&self, store: &Store, source: &Path) -> Result<Registered, RegistryError> {
        let _one_at_a_time = self.registering.lock().await;
        let (source, trusted) = (source.to_path_buf(), self.trusted.clone());
        let checked = tokio::task::spawn_blocking(move || check_source(&source, &trusted))
            .await
            .expect("the check does not panic")?;
        let model = checked.record;
        if let Some(existing) = store.model(&model.name, &model.version).await? {
            return if existing.manifest_sha256 == model.manifest_sha256 {
                Ok(Registered { model: existing, created: false })
            } else {
                Err(RegistryError::Conflict {
                    name: model.name,
                    version: model.version,
                    registered: existing.manifest_sha256,
                    offered: model.manifest_sha256,
                })
            };
        }
        let (dir, trusted, source, files) =
            (self.dir.clone(), self.trusted.clone(), checked.source, checked.files);
        let (name, version, sha) = (model.name.clone(), model.version.clone(), model.manifest_sha256.clone());
        tokio::task::spawn_blocking(move || install(&dir, &source, &files, &trusted, &name, &version, &sha))
            .await
            .expect("the copy does not panic")?;
        if !store.insert_model(&model).await? {
            // Recorded meanwhile by another fleet instance sharing the database.
            let existing = store.model(&model.name, &model.version).await?.ok_or_else(|| {
                RegistryError::Store(StoreError::Corrupt("a model vanished while registering".into()))
            })?;
            if existing.manifest_sha256 != model.manifest_sha256 {
                return Err(RegistryError::Conflict {
                    name: model.name,
                    version: model.version,
                    registered: existing.manifest_sha256,
                    offered: model.manifest_sha256,
                });
            }
            return Ok(Registered { model: existing, created: false });
        }
        tracing::info!(
            bundle = %model.name,
            version = %model.version,
            manifest_sha256 = %model.manifest_sha256,
            bytes = model.size_bytes,
            "bundle registered"
        );
        Ok(Registered { model, created: true })
    }

    /// The path of `file` (`manifest.json` or a file the manifest lists) of a registered bundle's
    /// folder, when every part is a plain name.
    pub fn file_path(&self, name: &str, version: &str, file: &str) -> Option<PathBuf> {
        for part in [name, version, file] {
            check_component("name", part).ok()?;
        }
        Some(self.dir.join(name).join(version).join(file))
    }
}

/// A verified source folder.
struct Checked {
    source: PathBuf,
    record: ModelRecord,
    files: Vec<String>,
}

fn check_source(source: &Path, trusted: &[VerifyingKey]) -> Result<Checked, RegistryError> {
    let verified = verify_model_dir(source, trusted).map_err(RegistryError::Refused)?;
    let manifest_path = source.join(MANIFEST_FILE);
    let bytes = fs::read(&manifest_path).map_err(io(format!("cannot read {}", manifest_path.display())))?;
    let text = String::from_utf8_lossy(&bytes);
    let manifest = BundleManifest::from_json(&text).map_err(|e| RegistryError::Invalid(e.to_string()))?;
    check_component("name", &manifest.name)?;
    check_component("version", &manifest.version)?;
    let record = ModelRecord {
        name: verified.name,
        version: verified.version,
        manifest_sha256: hex::encode(Sha256::digest(&bytes)),
        size_bytes: manifest.files.values().map(|f| f.size as i64).sum(),
        files: manifest.files.len() as i64,
        key_id: verified.key_id,
        registered_at_ms: now_ms(),
        evaluation: serde_json::to_value(&manifest.evaluation).expect("evaluations serialise"),
        provenance: serde_json::to_value(&manifest.provenance).expect("provenance serialises"),
    };
    Ok(Checked { source: source.to_path_buf(), record, files: manifest.files.keys().cloned().collect() })
}

/// Copies the bundle into staging, verifies the copy, and renames it into place.
fn install(
    dir: &Path,
    source: &Path,
    files: &[String],
    trusted: &[VerifyingKey],
    name: &str,
    version: &str,
    manifest_sha256: &str,
) -> Result<(), RegistryError> {
    let staging = dir.join(STAGING).join(uuid::Uuid::now_v7().to_string());
    fs::create_dir_all(&staging).map_err(io(format!("cannot create {}", staging.display())))?;
    let result = (|| {
        for file in files.iter().map(String::as_str).chain([MANIFEST_FILE]) {
            let (from, to) = (source.join(file), staging.join(file));
            fs::copy(&from, &to).map_err(io(format!("cannot copy {} into the registry", from.display())))?;
            fs::File::open(&to)
                .and_then(|f| f.sync_all())
                .map_err(io(format!("cannot sync {}", to.display())))?;
        }
        // What is served is the copy: verify it, and that its manifest is the one checked.
        verify_model_dir(&staging, trusted).map_err(RegistryError::Refused)?;
        let copied = fs::read(staging.join(MANIFEST_FILE)).map_err(io("cannot read the copied manifest"))?;
        if hex::encode(Sha256::digest(&copied)) != manifest_sha256 {
            return Err(RegistryError::Invalid("its manifest changed while it was being registered".into()));
        }
        let parent = dir.join(name);
        fs::create_dir_all(&parent).map_err(io(format!("cannot create {}", parent.display())))?;
        let target = parent.join(version);
        if target.exists() {
            // Left by a registration that crashed before recording it: never served, replaced.
            fs::remove_dir_all(&target).map_err(io(format!("cannot replace {}", target.display())))?;
        }
        fs::rename(&staging, &target)
            .map_err(io(format!("cannot move the bundle to {}", target.display())))?;
        fs::File::open(&parent)
            .and_then(|d| d.sync_all())
            .map_err(io(format!("cannot sync {}", parent.display())))
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result
}
