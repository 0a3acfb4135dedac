//! TLS for the embedded broker (rustls with ring, see [`crate::tls`]): the server certificate, and
//! device certificates verified against the configured CA when asked for.

use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use sha2::{Digest, Sha256};
use tokio_rustls::TlsAcceptor;

use crate::config::{BrokerTlsConfig, ClientAuth};
pub use crate::tls::TlsError;
use crate::tls::{certificates, provider, server_builder, with_certificate};

/// The acceptor for `config`.
pub fn acceptor(config: &BrokerTlsConfig) -> Result<TlsAcceptor, TlsError> {
    let provider = provider();
    let builder = server_builder(provider.clone())?;
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
    let server = with_certificate(
        builder,
        ("mqtt.embedded.tls.cert_file", "mqtt.embedded.tls.key_file"),
        &config.cert_file,
        &config.key_file,
    )?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// SHA-256 of the verified client certificate of an accepted connection, if it presented one.
pub fn client_fingerprint<IO>(stream: &tokio_rustls::server::TlsStream<IO>) -> Option<[u8; 32]> {
    let (_, connection) = stream.get_ref();
    let certificate = connection.peer_certificates()?.first()?;
    Some(Sha256::digest(certificate.as_ref()).into())
}
