//! The model registry: signed bundles verified (every file's size and sha256 against the
//! manifest, the manifest's signature against the fleet's trusted keys), copied into the registry's
//! store (a folder, or an S3-compatible bucket: `storage`), then recorded in the database. Devices
//! download the files over HTTP with range requests (`range`), read range by range from the store.
//!
//! A bundle's files are stored as `NAME/VERSION/FILE`, read back and checked again (the stored
//! copy is what is served), their ETags written to `NAME/VERSION/.verified.json`, and only then is
//! the version recorded. Nothing is served without the record, so a version is visible only once
//! all its files are stored and verified; a crash leaves at worst unrecorded objects, overwritten
//! by the next registration of that version. A download checks the object still has the ETag it
//! had when it was verified; one that changed is hashed again, and refused unless it still matches
//! the manifest.

pub mod range;
pub mod storage;

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tandem_core::bundle::signature::VerifyingKey;
use tandem_core::bundle::{BundleManifest, MANIFEST_FILE};
use tandemd::bundle_trust::{BundleTrustError, load_trusted_keys, verify_model_dir};

use crate::config::{RegistryConfig, S3StoreConfig};
use crate::store::{ModelRecord, Store, StoreError, now_ms};
use storage::{BundleStore, ReadFailure, StorageError};

/// Where registrations before the object store staged their copies (only ever a local folder).
const STAGING: &str = ".staging";
/// The ETags of a version's verified objects, next to them (bundle file names never start with a
/// dot, so it cannot be one of them, nor be downloaded).
const VERIFIED: &str = ".verified.json";

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
    #[error("{0}")]
    Storage(#[from] StorageError),
    #[error(
        "the registry's copy of {name} {version} {file} no longer matches its manifest ({detail}); it \
         is not served: register the bundle again under a new version"
    )]
    Tampered { name: String, version: String, file: String, detail: String },
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

/// The registry's store and the keys it trusts.
#[derive(Debug)]
pub struct Registry {
    storage: BundleStore,
    /// The folder, when the store is one (for what older registrations left in it).
    dir: Option<PathBuf>,
    trusted: Vec<VerifyingKey>,
    /// One registration at a time: two of the same version must not race on its objects.
    registering: tokio::sync::Mutex<()>,
    /// `.verified.json` of the versions served so far (a registered version never changes).
    verified: std::sync::Mutex<HashMap<(String, String), Arc<Verified>>>,
}

/// `NAME/VERSION/.verified.json`: what each stored object of a version was when it was verified.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Verified {
    /// The sha256 of the stored manifest.json (the database's record).
    manifest_sha256: String,
    /// Every stored file, manifest.json included.
    files: BTreeMap<String, VerifiedFile>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifiedFile {
    size: u64,
    sha256: String,
    /// The store's ETag of the object when it was verified.
    e_tag: Option<String>,
}

/// A file about to be served.
#[derive(Debug, Clone)]
pub struct ServedFile {
    /// Its size, bytes.
    pub len: u64,
    sha256: Option<String>,
    e_tag: Option<String>,
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
    /// Loads the trusted keys and opens the store: the bucket of `[registry_s3]` when given, else
    /// the folder `registry.dir` (created when missing).
    pub fn open(config: &RegistryConfig, s3: Option<&S3StoreConfig>) -> Result<Self, RegistryError> {
        let trusted = load_trusted_keys(&config.trusted_keys).map_err(RegistryError::Keys)?;
        let storage = BundleStore::open(config, s3)?;
        let dir = s3.is_none().then(|| config.dir.clone());
        Ok(Self {
            storage,
            dir,
            trusted,
            registering: tokio::sync::Mutex::new(()),
            verified: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Deletes the staging folder that registrations of earlier fleet versions left in a local
    /// registry folder (at `serve` start).
    pub fn clear_staging(&self) -> Result<(), RegistryError> {
        let Some(staging) = self.dir.as_ref().map(|dir| dir.join(STAGING)) else { return Ok(()) };
        match std::fs::remove_dir_all(&staging) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                Err(io(format!("cannot clear {}", staging.display()))(error))
            }
            _ => Ok(()),
        }
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
        let verified = self.install(&checked.source, &model, &checked.files).await?;
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
        self.remember(&model.name, &model.version, verified);
        tracing::info!(
            bundle = %model.name,
            version = %model.version,
            manifest_sha256 = %model.manifest_sha256,
            bytes = model.size_bytes,
            store = self.storage.describe(),
            "bundle registered"
        );
        Ok(Registered { model, created: true })
    }

    /// Stores the bundle's files and manifest, reads them back and checks them against the
    /// manifest, and writes `.verified.json`. Deletes what it stored when the check fails.
    async fn install(
        &self,
        source: &Path,
        model: &ModelRecord,
        files: &BTreeMap<String, (u64, String)>,
    ) -> Result<Verified, RegistryError> {
        let (name, version) = (&model.name, &model.version);
        let manifest_path = source.join(MANIFEST_FILE);
        let manifest_size = std::fs::metadata(&manifest_path)
            .map_err(io(format!("cannot read {}", manifest_path.display())))?
            .len();
        let mut expected = files.clone();
        expected.insert(MANIFEST_FILE.to_string(), (manifest_size, model.manifest_sha256.clone()));
        let result = async {
            for file in expected.keys() {
                self.storage.put_file(&self.storage.key(name, version, file), &source.join(file)).await?;
            }
            // What is served is the stored copy: check it, manifest included.
            let mut verified =
                Verified { manifest_sha256: model.manifest_sha256.clone(), files: BTreeMap::new() };
            for (file, (size, sha256)) in &expected {
                let stored = self.storage.digest(&self.storage.key(name, version, file)).await?;
                if stored.size != *size || !stored.sha256.eq_ignore_ascii_case(sha256) {
                    return Err(RegistryError::Invalid(format!(
                        "the stored copy of {file} ({} bytes, sha256 {}) differs from the bundle's ({size} \
                         bytes, sha256 {sha256}); it changed while it was being registered, or the store \
                         altered it",
                        stored.size, stored.sha256
                    )));
                }
                verified.files.insert(
                    file.clone(),
                    VerifiedFile { size: *size, sha256: sha256.clone(), e_tag: stored.e_tag },
                );
            }
            let text = serde_json::to_vec_pretty(&verified).expect("the index serialises");
            self.storage.put_bytes(&self.storage.key(name, version, VERIFIED), text).await?;
            Ok(verified)
        }
        .await;
        if result.is_err() {
            for file in expected.keys().map(String::as_str).chain([VERIFIED]) {
                let _ = self.storage.delete(&self.storage.key(name, version, file)).await;
            }
        }
        result
    }

    fn remember(&self, name: &str, version: &str, verified: Verified) -> Arc<Verified> {
        let verified = Arc::new(verified);
        self.verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((name.to_string(), version.to_string()), verified.clone());
        verified
    }

    /// `file` (`manifest.json` or a file the manifest lists) of the registered version whose
    /// manifest has sha256 `manifest_sha256`; `None` when there is no such file.
    pub async fn served_file(
        &self,
        name: &str,
        version: &str,
        file: &str,
        manifest_sha256: &str,
    ) -> Result<Option<ServedFile>, RegistryError> {
        for part in [name, version, file] {
            if check_component("name", part).is_err() {
                return Ok(None);
            }
        }
        let cached = self
            .verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(name.to_string(), version.to_string()))
            .cloned();
        let verified = match cached {
            Some(verified) => Some(verified),
            None => match self.storage.read_all(&self.storage.key(name, version, VERIFIED)).await? {
                Some(bytes) => {
                    let verified: Verified =
                        serde_json::from_slice(&bytes).map_err(|e| RegistryError::Tampered {
                            name: name.into(),
                            version: version.into(),
                            file: VERIFIED.into(),
                            detail: format!("it does not parse: {e}"),
                        })?;
                    Some(self.remember(name, version, verified))
                }
                None => None,
            },
        };
        let Some(verified) = verified else {
            // Registered before `.verified.json` existed: served as stored.
            let key = self.storage.key(name, version, file);
            return Ok(self.storage.size(&key).await?.map(|len| ServedFile {
                len,
                sha256: None,
                e_tag: None,
            }));
        };
        if verified.manifest_sha256 != manifest_sha256 {
            return Err(RegistryError::Tampered {
                name: name.into(),
                version: version.into(),
                file: VERIFIED.into(),
                detail: format!(
                    "it lists manifest sha256 {}, the database {manifest_sha256}",
                    verified.manifest_sha256
                ),
            });
        }
        Ok(verified.files.get(file).map(|f| ServedFile {
            len: f.size,
            sha256: Some(f.sha256.clone()),
            e_tag: f.e_tag.clone(),
        }))
    }

    /// Streams bytes `range` (the whole file when `None`) of `served`. An object whose ETag changed
    /// since it was verified is hashed again: served (and its new ETag remembered) when it still
    /// matches the manifest, refused otherwise.
    pub async fn read(
        &self,
        name: &str,
        version: &str,
        file: &str,
        served: &ServedFile,
        range: Option<Range<u64>>,
    ) -> Result<BoxStream<'static, std::io::Result<Bytes>>, RegistryError> {
        let key = self.storage.key(name, version, file);
        let tampered = |detail: String| RegistryError::Tampered {
            name: name.into(),
            version: version.into(),
            file: file.into(),
            detail,
        };
        match self.storage.read(&key, range.clone(), served.e_tag.clone(), served.len).await {
            Ok(stream) => return Ok(stream),
            Err(ReadFailure::Missing) => return Err(tampered("the stored object is gone".into())),
            Err(ReadFailure::Store(error)) => return Err(error.into()),
            Err(ReadFailure::Changed) => {}
        }
        let Some(sha256) = &served.sha256 else {
            return Err(tampered(format!("the stored object is no longer {} bytes", served.len)));
        };
        let stored = self.storage.digest(&key).await?;
        if stored.size != served.len || !stored.sha256.eq_ignore_ascii_case(sha256) {
            tracing::error!(bundle = %name, %version, %file, found = %stored.sha256, expected = %sha256, "a stored bundle file was altered");
            return Err(tampered(format!(
                "it has {} bytes and sha256 {}, the manifest says {} bytes and {sha256}",
                stored.size, stored.sha256, served.len
            )));
        }
        // The same bytes under a new ETag (the folder was copied or restored, say).
        tracing::info!(bundle = %name, %version, %file, "a stored bundle file has a new ETag but the same content");
        self.update_e_tag(name, version, file, stored.e_tag.clone());
        match self.storage.read(&key, range, stored.e_tag, served.len).await {
            Ok(stream) => Ok(stream),
            Err(ReadFailure::Store(error)) => Err(error.into()),
            Err(ReadFailure::Missing | ReadFailure::Changed) => {
                Err(tampered("the stored object changed while it was being read".into()))
            }
        }
    }

    fn update_e_tag(&self, name: &str, version: &str, file: &str, e_tag: Option<String>) {
        let mut cache = self.verified.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(verified) = cache.get_mut(&(name.to_string(), version.to_string()))
            && let Some(entry) = Arc::make_mut(verified).files.get_mut(file)
        {
            entry.e_tag = e_tag;
        }
    }
}

/// A verified source folder.
struct Checked {
    source: PathBuf,
    record: ModelRecord,
    /// Every file the manifest lists, with its size and sha256.
    files: BTreeMap<String, (u64, String)>,
}

fn check_source(source: &Path, trusted: &[VerifyingKey]) -> Result<Checked, RegistryError> {
    let verified = verify_model_dir(source, trusted).map_err(RegistryError::Refused)?;
    let manifest_path = source.join(MANIFEST_FILE);
    let bytes =
        std::fs::read(&manifest_path).map_err(io(format!("cannot read {}", manifest_path.display())))?;
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
    let files = manifest
        .files
        .iter()
        .map(|(file, digest)| (file.clone(), (digest.size, digest.sha256.clone())))
        .collect();
    Ok(Checked { source: source.to_path_buf(), record, files })
}
