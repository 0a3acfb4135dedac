//! The rustls client configuration for `mqtts://`: the configured CA (or the system's CA bundle)
//! and, for mutual TLS, a client certificate and key. Crypto is `ring`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use super::{MqttConfig, MqttLinkError};

/// Where Linux distributions keep the system CA bundle, checked in order after `$SSL_CERT_FILE`.
const SYSTEM_CA_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Builds the TLS client configuration described by `config`.
pub(crate) fn client_config(config: &MqttConfig) -> Result<Arc<ClientConfig>, MqttLinkError> {
    // Several parts of the daemon share the process-wide provider; whoever comes first installs it.
    let _already_installed = rustls::crypto::ring::default_provider().install_default();

    if config.client_cert_file.is_some() != config.client_key_file.is_some() {
        return Err(MqttLinkError::Config(
            "client_cert_file and client_key_file must be set together".into(),
        ));
    }
    let ca_file = match &config.ca_file {
        Some(path) => path.clone(),
        None => system_ca_bundle()?,
    };
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(read_certificates(&ca_file, "CA certificate")?);
    if added == 0 {
        return Err(MqttLinkError::Tls(format!("{} holds no usable CA certificate", ca_file.display())));
    }
    let builder = ClientConfig::builder().with_root_certificates(roots);
    let tls = match (&config.client_cert_file, &config.client_key_file) {
        (Some(cert), Some(key)) => {
            let chain = read_certificates(cert, "client certificate")?;
            if chain.is_empty() {
                return Err(MqttLinkError::Tls(format!("{} holds no certificate", cert.display())));
            }
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                MqttLinkError::Tls(format!("cannot read the client key {}: {e}", key.display()))
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| MqttLinkError::Tls(format!("client certificate and key: {e}")))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(tls))
}

fn read_certificates(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, MqttLinkError> {
    let not_readable = |e: &dyn std::fmt::Display| {
        MqttLinkError::Tls(format!("cannot read the {what} {}: {e}", path.display()))
    };
    CertificateDer::pem_file_iter(path)
        .map_err(|e| not_readable(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| not_readable(&e))
}

fn system_ca_bundle() -> Result<PathBuf, MqttLinkError> {
    let from_env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    from_env.into_iter().chain(SYSTEM_CA_BUNDLES.iter().map(PathBuf::from)).find(|p| p.is_file()).ok_or_else(
        || {
            MqttLinkError::Tls(format!(
                "no ca_file is configured and no system CA bundle was found ($SSL_CERT_FILE, {})",
                SYSTEM_CA_BUNDLES.join(", ")
            ))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_with(ca: Option<PathBuf>, cert: Option<PathBuf>, key: Option<PathBuf>) -> MqttConfig {
        MqttConfig {
            ca_file: ca,
            client_cert_file: cert,
            client_key_file: key,
            ..MqttConfig::new("mqtts://broker")
        }
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate\n").unwrap();
        let err = client_config(&config_with(Some(ca), None, None)).unwrap_err().to_string();
        assert!(err.contains("no usable CA certificate"), "{err}");
    }

    #[test]
    fn a_missing_ca_file_names_the_file() {
        let err = client_config(&config_with(Some("/nonexistent/ca.pem".into()), None, None))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        let err = client_config(&config_with(None, Some("/c.pem".into()), None)).unwrap_err().to_string();
        assert!(err.contains("must be set together"), "{err}");
    }
}
