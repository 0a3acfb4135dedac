//! rustls client configuration for an `mqtts://` external broker: the configured CA (or the
//! system bundle) and an optional client certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use super::ExternalError;
use crate::config::ExternalBrokerConfig;

const SYSTEM_CA_BUNDLES: [&str; 3] =
    ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"];

/// The client TLS configuration for `config`.
pub fn client_config(config: &ExternalBrokerConfig) -> Result<Arc<ClientConfig>, ExternalError> {
    let _already_installed = rustls::crypto::ring::default_provider().install_default();
    let ca_file = match &config.ca_file {
        Some(path) => path.clone(),
        None => SYSTEM_CA_BUNDLES.iter().map(PathBuf::from).find(|p| p.is_file()).ok_or_else(|| {
            ExternalError::Tls("no ca_file is configured and no system CA bundle was found".into())
        })?,
    };
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certificates(&ca_file)?);
    if added == 0 {
        return Err(ExternalError::Tls(format!("{} holds no usable CA certificate", ca_file.display())));
    }
    let builder = ClientConfig::builder().with_root_certificates(roots);
    let tls = match (&config.client_cert_file, &config.client_key_file) {
        (Some(cert), Some(key)) => {
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| ExternalError::Tls(format!("cannot read {}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(certificates(cert)?, key)
                .map_err(|e| ExternalError::Tls(format!("client certificate and key: {e}")))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(ExternalError::Tls("client_cert_file and client_key_file go together".into())),
    };
    Ok(Arc::new(tls))
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, ExternalError> {
    let error =
        |e: &dyn std::fmt::Display| ExternalError::Tls(format!("cannot read {}: {e}", path.display()));
    CertificateDer::pem_file_iter(path)
        .map_err(|e| error(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(&e))
}
