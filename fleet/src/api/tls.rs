//! HTTPS for the API (`[api.tls]`): a [`Listener`] for `axum::serve` that hands it only connections
//! whose TLS handshake completed. Handshakes run in their own tasks, so a slow or broken client
//! never holds up the others; a failed one is logged and its connection dropped, and the listener
//! keeps accepting. Dropping the listener (when `axum::serve` ends, after graceful shutdown) stops
//! accepting.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::Listener;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::ApiTlsConfig;
use crate::tls::{TlsError, provider, server_builder, with_certificate};

/// Longest a client may take to complete its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for `axum::serve` to take them.
const READY_QUEUE: usize = 64;
/// Pause after a failed `accept` (e.g. out of file descriptors) before the next one.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The acceptor for `config`: the certificate and key from its PEM files, HTTP/1.1 over TLS 1.2
/// or 1.3, no client certificates (devices authenticate with their passwords, operators with the
/// token).
pub fn acceptor(config: &ApiTlsConfig) -> Result<TlsAcceptor, TlsError> {
    let builder = server_builder(provider())?.with_no_client_auth();
    let mut server = with_certificate(
        builder,
        ("api.tls.cert_file", "api.tls.key_file"),
        &config.cert_file,
        &config.key_file,
    )?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// TCP connections that completed a TLS handshake.
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl TlsListener {
    /// Starts accepting on `listener` with `acceptor`.
    pub fn new(listener: TcpListener, acceptor: TlsAcceptor) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (sender, ready) = mpsc::channel(READY_QUEUE);
        tokio::spawn(accept(listener, acceptor, sender));
        Ok(Self { local, ready })
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accepting task holds a sender until this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Accepts connections and hands each to a handshake task, until the listener is dropped.
async fn accept(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    loop {
        let accepted = tokio::select! {
            () = ready.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "cannot accept an API connection");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (acceptor, ready) = (acceptor.clone(), ready.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    let _stopped = ready.send((stream, peer)).await;
                }
                Ok(Err(error)) => tracing::warn!(
                    %peer, %error,
                    "TLS handshake with an API client failed (a client speaking plain HTTP, or one that does not trust api.tls.cert_file)"
                ),
                Err(_) => tracing::warn!(%peer, "TLS handshake with an API client timed out"),
            }
        });
    }
}
