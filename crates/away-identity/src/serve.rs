//! axum over TLS. [`Listener`] accepts TCP connections and does each TLS handshake in
//! a task of its own (a slow or silent client holds up nobody else), then hands axum
//! the connection with who is on the other end ([`TlsPeer`]: the node name of a
//! verified client certificate). Handlers read it with
//! `Option<Extension<ConnectInfo<TlsPeer>>>` when the router is served with
//! `into_make_service_with_connect_info::<TlsPeer>()`.
//!
//! The server configuration is watched: an agent that has no identity yet serves plain
//! HTTP (and refuses every call that changes anything), and TLS from the moment its
//! identity arrives.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::server::TlsStream;

/// How long a client may take for its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes under way at once; more connections wait for their turn.
const MAX_HANDSHAKES: usize = 256;

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct TlsPeer {
    pub addr: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The node name in the client's certificate, verified against the CA (None: no
    /// certificate, or plain HTTP).
    pub node: Option<String>,
    /// The serial number of that certificate (hex), so a server can refuse, request by
    /// request, a connection opened before its certificate was revoked
    /// ([`crate::Revocations::is_revoked`]).
    pub serial: Option<String>,
}

/// A connection, plain or TLS.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// A TCP listener whose connections are TLS while the watched configuration is set,
/// plain while it is not.
pub struct Listener {
    conns: mpsc::Receiver<(Conn, TlsPeer)>,
    local: SocketAddr,
    accept_loop: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

impl Listener {
    /// Always TLS with `config`.
    pub fn tls(tcp: TcpListener, config: Arc<ServerConfig>) -> io::Result<Listener> {
        let (tx, rx) = watch::channel(Some(config));
        // the sender may go: the receiver keeps the last value
        drop(tx);
        Listener::watching(tcp, rx)
    }

    /// TLS with the watched configuration once there is one, plain before.
    pub fn watching(tcp: TcpListener, config: watch::Receiver<Option<Arc<ServerConfig>>>) -> io::Result<Listener> {
        let local = tcp.local_addr()?;
        let (tx, conns) = mpsc::channel(64);
        let accept_loop = tokio::spawn(accept_loop(tcp, config, tx));
        Ok(Listener { conns, local, accept_loop })
    }
}

async fn accept_loop(
    tcp: TcpListener,
    config: watch::Receiver<Option<Arc<ServerConfig>>>,
    tx: mpsc::Sender<(Conn, TlsPeer)>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let (stream, addr) = tokio::select! {
            accepted = tcp.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and the like: wait rather than spin
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = tx.closed() => return,
        };
        let current = config.borrow().clone();
        let Some(server) = current else {
            if tx.send((Conn::Plain(stream), TlsPeer { addr, tls: false, node: None, serial: None })).await.is_err() {
                return;
            }
            continue;
        };
        let Ok(permit) = handshakes.clone().acquire_owned().await else { return };
        let tx = tx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let acceptor = tokio_rustls::TlsAcceptor::from(server);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let certs = tls.get_ref().1.peer_certificates();
                    let node = certs.and_then(|c| crate::peer_node(c).ok());
                    let serial = certs
                        .and_then(|c| c.first())
                        .and_then(|c| crate::parse_cert(c).ok())
                        .map(|c| hex::encode(c.raw_serial()));
                    let _ = tx.send((Conn::Tls(Box::new(tls)), TlsPeer { addr, tls: true, node, serial })).await;
                }
                Ok(Err(e)) => tracing::debug!(%addr, "TLS handshake refused: {e}"),
                Err(_) => tracing::debug!(%addr, "no TLS handshake within {HANDSHAKE_TIMEOUT:?}"),
            }
        });
    }
}

impl axum::serve::Listener for Listener {
    type Io = Conn;
    type Addr = TlsPeer;

    async fn accept(&mut self) -> (Conn, TlsPeer) {
        match self.conns.recv().await {
            Some(c) => c,
            // the accept loop ended (it only does when this listener goes)
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<TlsPeer> {
        Ok(TlsPeer { addr: self.local, tls: false, node: None, serial: None })
    }
}

impl Connected<IncomingStream<'_, Listener>> for TlsPeer {
    fn connect_info(stream: IncomingStream<'_, Listener>) -> Self {
        stream.remote_addr().clone()
    }
}
