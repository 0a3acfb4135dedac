//! TLS for the embedded broker (rustls with ring): the server certificate, and device
//! certificates verified against the configured CA when asked for.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use sha2::{Digest, Sha256};
use tokio_rustls::TlsAcceptor;

use crate::config::{BrokerTlsConfig, ClientAuth};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {reason}")]
    Pem { what: &'static str, path: PathBuf, reason: String },
    #[error("{0}")]
    Rustls(String),
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
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

/// The acceptor for `config`.
pub fn acceptor(config: &BrokerTlsConfig) -> Result<TlsAcceptor, TlsError> {
    let chain = certificates("mqtt.embedded.tls.cert_file", &config.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&config.key_file).map_err(|e| TlsError::Pem {
        what: "mqtt.embedded.tls.key_file",
        path: config.key_file.clone(),
        reason: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = match (&config.client_ca_file, config.client_auth) {
        (_, ClientAuth::None) | (None, _) => builder.with_no_client_auth(),
        (Some(ca), auth) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates("mqtt.embedded.tls.client_ca_file", ca)? {
                roots.add(cert).map_err(|e| TlsError::Rustls(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier =
                if auth == ClientAuth::Optional { verifier.allow_unauthenticated() } else { verifier };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| TlsError::Rustls(e.to_string()))?)
        }
    };
    let server = builder.with_single_cert(chain, key).map_err(|e| TlsError::Rustls(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// SHA-256 of the verified client certificate of an accepted connection, if it presented one.
pub fn client_fingerprint<IO>(stream: &tokio_rustls::server::TlsStream<IO>) -> Option<[u8; 32]> {
    let (_, connection) = stream.get_ref();
    let certificate = connection.peer_certificates()?.first()?;
    Some(Sha256::digest(certificate.as_ref()).into())
}
