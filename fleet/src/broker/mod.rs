//! The embedded MQTT broker: MQTT 3.1.1 and 5 on plain TCP and TLS, built for Tandem's topics
//! rather than as a general-purpose broker. Devices authenticate against the operator's devices
//! file (password or client certificate); the topic ACL lets each use only its own topics; what
//! devices publish goes straight to the fleet's handlers, and a telemetry PUBACK is sent only once
//! its events are committed to the database — so the broker holds nothing a crash could lose.
//! Why this and not rumqttd: docs/fleet.md.

pub mod acl;
pub mod codec;
mod connection;
mod router;
mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use router::{Delivery, Router};
pub use tls::TlsError;

use crate::config::EmbeddedBrokerConfig;
use crate::device_messages::DeviceMessages;
use crate::devices_file::DeviceDirectory;
use crate::metrics::FleetMetrics;

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen on {address}: {source}")]
    Bind { address: SocketAddr, source: std::io::Error },
    #[error("mqtt.embedded.tls: {0}")]
    Tls(#[from] TlsError),
}

/// A running embedded broker.
#[derive(Debug)]
pub struct EmbeddedBroker {
    /// Where the plain listener is bound.
    pub address: Option<SocketAddr>,
    /// Where the TLS listener is bound.
    pub tls_address: Option<SocketAddr>,
    /// The accept loops.
    pub tasks: Vec<JoinHandle<()>>,
}

impl EmbeddedBroker {
    /// Binds the configured listeners and starts accepting; `router` delivers the fleet's
    /// messages to devices, `messages` handles theirs.
    pub async fn start(
        config: &EmbeddedBrokerConfig,
        devices: Option<DeviceDirectory>,
        router: Arc<Router>,
        messages: Arc<DeviceMessages>,
        metrics: Arc<FleetMetrics>,
        shutdown: CancellationToken,
    ) -> Result<Self, BrokerError> {
        let context = Arc::new(connection::Context {
            config: config.clone(),
            devices,
            router,
            messages,
            metrics,
            shutdown: shutdown.clone(),
        });
        let mut broker = Self { address: None, tls_address: None, tasks: Vec::new() };
        if let Some(address) = config.listen {
            let listener = bind(address).await?;
            broker.address =
                Some(listener.local_addr().map_err(|source| BrokerError::Bind { address, source })?);
            broker.tasks.push(tokio::spawn(accept_plain(listener, context.clone())));
        }
        if let (Some(address), Some(tls)) = (config.tls_listen, &config.tls) {
            let acceptor = tls::acceptor(tls)?;
            let listener = bind(address).await?;
            broker.tls_address =
                Some(listener.local_addr().map_err(|source| BrokerError::Bind { address, source })?);
            broker.tasks.push(tokio::spawn(accept_tls(listener, acceptor, context)));
        }
        Ok(broker)
    }
}

async fn bind(address: SocketAddr) -> Result<TcpListener, BrokerError> {
    TcpListener::bind(address).await.map_err(|source| BrokerError::Bind { address, source })
}

async fn accept_plain(listener: TcpListener, context: Arc<connection::Context>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = context.shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(connection::serve(stream, peer, None, context.clone()));
            }
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn accept_tls(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    context: Arc<connection::Context>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = context.shutdown.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (acceptor, context) = (acceptor.clone(), context.clone());
        tokio::spawn(async move {
            let handshake = std::time::Duration::from_millis(context.config.connect_timeout_ms);
            match tokio::time::timeout(handshake, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    let fingerprint = tls::client_fingerprint(&stream);
                    connection::serve(stream, peer, fingerprint, context).await;
                }
                Ok(Err(error)) => {
                    tracing::info!(%peer, %error, "TLS handshake failed");
                    context
                        .metrics
                        .broker_connects
                        .get_or_create(&crate::metrics::ResultLabels { result: "tls_failed" })
                        .inc();
                }
                Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
            }
        });
    }
}
