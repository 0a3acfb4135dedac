//! Where the registry keeps bundle files: a folder on the fleet host (the default) or an
//! S3-compatible bucket (`[registry_s3]`), both through `object_store`, so registration writes and
//! ranged downloads are the same code for either. Keys are `[PREFIX/]NAME/VERSION/FILE`.

use std::ops::Range;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};
use tandemd::offload::read_secret;
use tokio::io::AsyncReadExt;

use crate::config::{RegistryConfig, S3StoreConfig};

/// Files up to this size are stored with one request; larger ones in parts of this size (S3
/// needs at least 5 MiB per part but the last).
const PART_BYTES: usize = 8 << 20;

/// Why the store could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("registry_s3: {0}")]
    Setup(String),
    #[error("cannot create the registry folder {path}: {source}")]
    Folder { path: PathBuf, source: std::io::Error },
    #[error("cannot read {path}: {source}")]
    Source { path: PathBuf, source: std::io::Error },
    #[error("the registry's store ({store}) failed to {action} {key}: {source}")]
    Object { store: String, action: &'static str, key: String, source: Box<object_store::Error> },
}

/// What a stored object holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDigest {
    pub size: u64,
    pub sha256: String,
    /// The store's version tag of the object (ETag), when it gives one.
    pub e_tag: Option<String>,
}

/// A read of an object, or why it could not be made.
#[derive(Debug)]
pub enum ReadFailure {
    /// The object is gone.
    Missing,
    /// It is no longer the object with the expected ETag.
    Changed,
    /// The store failed.
    Store(StorageError),
}

/// The registry's object store.
#[derive(Debug, Clone)]
pub struct BundleStore {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    /// `folder /x` or `s3://bucket/prefix`, for messages.
    describe: String,
}

impl BundleStore {
    /// The bucket of `[registry_s3]` when given, else the folder `registry.dir`.
    pub fn open(config: &RegistryConfig, s3: Option<&S3StoreConfig>) -> Result<Self, StorageError> {
        match s3 {
            None => {
                let dir = &config.dir;
                std::fs::create_dir_all(dir)
                    .map_err(|source| StorageError::Folder { path: dir.clone(), source })?;
                let store = LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| StorageError::Setup(format!("the folder {}: {e}", dir.display())))?;
                Ok(Self {
                    store: Arc::new(store),
                    prefix: Path::default(),
                    describe: format!("folder {}", dir.display()),
                })
            }
            Some(s3) => Self::s3(s3),
        }
    }

    fn s3(config: &S3StoreConfig) -> Result<Self, StorageError> {
        // reqwest's rustls takes the process's provider; Err means one is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let secret = |source: &Option<tandemd::offload::SecretSource>, what: &str| {
            source
                .as_ref()
                .map(|s| read_secret(s).map_err(|e| StorageError::Setup(format!("{what}: {e}"))))
                .transpose()
        };
        // The standard AWS_* variables (and the instance's role) unless keys are configured.
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_virtual_hosted_style_request(!config.path_style)
            .with_allow_http(config.allow_http);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(key) = secret(&config.access_key_id, "access_key_id")? {
            builder = builder.with_access_key_id(key.expose());
        }
        if let Some(key) = secret(&config.secret_access_key, "secret_access_key")? {
            builder = builder.with_secret_access_key(key.expose());
        }
        if let Some(token) = secret(&config.session_token, "session_token")? {
            builder = builder.with_token(token.expose());
        }
        let store = builder.build().map_err(|e| StorageError::Setup(e.to_string()))?;
        let prefix = config.prefix.trim_matches('/');
        Ok(Self {
            store: Arc::new(store),
            prefix: Path::from(prefix),
            describe: format!("s3://{}/{prefix}", config.bucket),
        })
    }

    /// What the store is, for messages.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// The key of `file` of bundle `name` `version` (each a plain, checked name).
    pub fn key(&self, name: &str, version: &str, file: &str) -> Path {
        self.prefix.clone().join(name).join(version).join(file)
    }

    fn error(&self, action: &'static str, key: &Path) -> impl FnOnce(object_store::Error) -> StorageError {
        let (store, key) = (self.describe.clone(), key.to_string());
        move |source| StorageError::Object { store, action, key, source: Box::new(source) }
    }

    /// Stores the local file `source` as `key`, in parts when it is large.
    pub async fn put_file(&self, key: &Path, source: &FsPath) -> Result<(), StorageError> {
        let read_error =
            |source_error| StorageError::Source { path: source.to_path_buf(), source: source_error };
        let mut file = tokio::fs::File::open(source).await.map_err(read_error)?;
        let len = file.metadata().await.map_err(read_error)?.len();
        if len <= PART_BYTES as u64 {
            let mut bytes = Vec::with_capacity(len as usize);
            file.read_to_end(&mut bytes).await.map_err(read_error)?;
            self.store.put(key, PutPayload::from(bytes)).await.map_err(self.error("store", key))?;
            return Ok(());
        }
        let mut upload = self.store.put_multipart(key).await.map_err(self.error("start storing", key))?;
        let result: Result<(), StorageError> = async {
            loop {
                let mut part = Vec::with_capacity(PART_BYTES);
                (&mut file).take(PART_BYTES as u64).read_to_end(&mut part).await.map_err(read_error)?;
                if part.is_empty() {
                    return Ok(());
                }
                upload.put_part(PutPayload::from(part)).await.map_err(self.error("store a part of", key))?;
            }
        }
        .await;
        match result {
            Ok(()) => {
                upload.complete().await.map_err(self.error("finish storing", key))?;
                Ok(())
            }
            Err(error) => {
                let _ = upload.abort().await;
                Err(error)
            }
        }
    }

    /// Stores `bytes` as `key`.
    pub async fn put_bytes(&self, key: &Path, bytes: Vec<u8>) -> Result<(), StorageError> {
        self.store.put(key, PutPayload::from(bytes)).await.map_err(self.error("store", key))?;
        Ok(())
    }

    /// The whole object, or `None` when there is none.
    pub async fn read_all(&self, key: &Path) -> Result<Option<Bytes>, StorageError> {
        match self.store.get(key).await {
            Ok(result) => Ok(Some(result.bytes().await.map_err(self.error("read", key))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(error) => Err(self.error("read", key)(error)),
        }
    }

    /// Reads the whole object back and hashes it.
    pub async fn digest(&self, key: &Path) -> Result<StoredDigest, StorageError> {
        let result = self.store.get(key).await.map_err(self.error("read", key))?;
        let e_tag = result.meta.e_tag.clone();
        let mut stream = result.into_stream();
        let (mut hasher, mut size) = (Sha256::new(), 0u64);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(self.error("read", key))?;
            size += chunk.len() as u64;
            hasher.update(&chunk);
        }
        Ok(StoredDigest { size, sha256: hex::encode(hasher.finalize()), e_tag })
    }

    /// The object's size, or `None` when there is none.
    pub async fn size(&self, key: &Path) -> Result<Option<u64>, StorageError> {
        match self.store.head(key).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(error) => Err(self.error("look up", key)(error)),
        }
    }

    /// Streams bytes `range` (all of it when `None`) of `key`, provided it still has the ETag
    /// `if_match` (when given) and `len` bytes.
    pub async fn read(
        &self,
        key: &Path,
        range: Option<Range<u64>>,
        if_match: Option<String>,
        len: u64,
    ) -> Result<BoxStream<'static, std::io::Result<Bytes>>, ReadFailure> {
        let expected = if_match.clone();
        let options = GetOptions { if_match, range: range.map(GetRange::Bounded), ..GetOptions::default() };
        let result = match self.store.get_opts(key, options).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Err(ReadFailure::Missing),
            Err(object_store::Error::Precondition { .. } | object_store::Error::NotModified { .. }) => {
                return Err(ReadFailure::Changed);
            }
            Err(error) => return Err(ReadFailure::Store(self.error("read", key)(error))),
        };
        // Checked here too, for stores that ignore If-Match.
        if result.meta.size != len || expected.is_some_and(|e_tag| result.meta.e_tag.as_ref() != Some(&e_tag))
        {
            return Err(ReadFailure::Changed);
        }
        Ok(result.into_stream().map(|chunk| chunk.map_err(std::io::Error::other)).boxed())
    }

    /// Deletes `key`; a missing object is not an error.
    pub async fn delete(&self, key: &Path) -> Result<(), StorageError> {
        match self.store.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(error) => Err(self.error("delete", key)(error)),
        }
    }
}
