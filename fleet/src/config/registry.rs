//! `[registry]`: where registered bundles are kept, whose signatures the registry accepts, and the
//! URL devices download from; `[registry_s3]`: an S3-compatible bucket keeping the bundles instead
//! of a folder on the fleet host.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tandemd::offload::SecretSource;

/// The model registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Folder of registered bundles on the fleet host (`NAME/VERSION/FILE`), created when
    /// missing; the default store. Leave it unset when `[registry_s3]` keeps the bundles.
    #[serde(default)]
    pub dir: PathBuf,
    /// Public keys (`NAME.pub` from `tandem-train keygen`) whose signatures the registry accepts;
    /// an unsigned bundle, or one signed by another key, is refused.
    pub trusted_keys: Vec<PathBuf>,
    /// The fleet's API as devices reach it, e.g. `https://fleet.example.com:8780` (with
    /// `[api.tls]`, or behind a TLS proxy); assignments point at
    /// `PUBLIC_URL/v1/registry/NAME/VERSION/`. Default: `http://` (`https://` with `[api.tls]`)
    /// and the address the API listens on.
    #[serde(default)]
    pub public_url: Option<String>,
}

/// An S3-compatible bucket (AWS S3, MinIO, Ceph RGW, Garage, …) holding the registry's bundles
/// instead of `registry.dir`. Devices still download them from the fleet's API, which reads them
/// from the bucket range by range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3StoreConfig {
    /// The bucket; it must exist.
    pub bucket: String,
    /// Key prefix inside the bucket (`PREFIX/NAME/VERSION/FILE`); empty: the bucket's root.
    #[serde(default)]
    pub prefix: String,
    /// The bucket's region.
    #[serde(default = "default_region")]
    pub region: String,
    /// The S3 endpoint, e.g. `https://minio.example.com:9000`; unset: AWS's endpoint for `region`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Access key id (file, environment variable or systemd credential). Unset, with
    /// `secret_access_key` unset too: the standard `AWS_*` environment variables, or the instance's
    /// role on AWS.
    #[serde(default)]
    pub access_key_id: Option<SecretSource>,
    /// Secret access key; set together with `access_key_id`.
    #[serde(default)]
    pub secret_access_key: Option<SecretSource>,
    /// Session token of temporary credentials, when they have one.
    #[serde(default)]
    pub session_token: Option<SecretSource>,
    /// Address the bucket as `ENDPOINT/BUCKET/KEY` (path style, what most S3-compatible servers
    /// expect) rather than `BUCKET.ENDPOINT/KEY` (virtual-hosted style, AWS's preference).
    #[serde(default = "default_true")]
    pub path_style: bool,
    /// Allow a plain `http://` endpoint. Only for a store on loopback or a trusted network: keys and
    /// bundles would cross it in clear.
    #[serde(default)]
    pub allow_http: bool,
}

fn default_region() -> String {
    "us-east-1".into()
}

const fn default_true() -> bool {
    true
}
