//! Server TLS shared by the listeners that offer it (the embedded broker's `mqtts://` and the
//! API's `https://`): rustls with the ring provider, the certificate chain and private key read from
//! PEM files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ConfigBuilder;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WantsServerCert;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or held nothing usable.
    #[error("cannot read {what} {path}: {reason}")]
    Pem {
        /// The configuration key naming the file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// rustls refused the material (e.g. a key that does not match the certificate).
    #[error("{0}")]
    Rustls(String),
}

/// The ring crypto provider every fleet TLS listener uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates in the PEM file `path` (at least one), for the configuration key `what`.
pub fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |reason: String| TlsError::Pem { what, path: path.into(), reason };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem("no certificate in it".into()));
    }
    Ok(certs)
}

/// The private key in the PEM file `path`, for the configuration key `what`.
pub fn private_key(what: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        what,
        path: path.into(),
        reason: e.to_string(),
    })
}

/// A server builder with the provider's safe protocol versions, waiting for its client verifier.
pub fn server_builder(
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<ConfigBuilder<rustls::ServerConfig, rustls::WantsVerifier>, TlsError> {
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))
}

/// The server certificate from the PEM files: `cert_file` (the chain, leaf first) and `key_file`,
/// named in errors by the configuration keys `keys` (`(cert_key, key_key)`).
pub fn with_certificate(
    builder: ConfigBuilder<rustls::ServerConfig, WantsServerCert>,
    keys: (&'static str, &'static str),
    cert_file: &Path,
    key_file: &Path,
) -> Result<rustls::ServerConfig, TlsError> {
    let chain = certificates(keys.0, cert_file)?;
    let key = private_key(keys.1, key_file)?;
    builder.with_single_cert(chain, key).map_err(|e| {
        TlsError::Rustls(format!(
            "{} {} with {} {}: {e}",
            keys.0,
            cert_file.display(),
            keys.1,
            key_file.display()
        ))
    })
}
