//! The channels between two nodes' migration engines (transfer connections, page relays):
//! mutual TLS with the nodes' certificates when the node has an identity, each side
//! checking that the other is the node it expects for this move.
//!
//! A node's certificate carries the DNS name `<node>.node.away` ([`server_name`]); the
//! CA check is rustls's (the configs come from the node's identity), the name check is
//! [`peer_is`]. Without an identity a channel is plain TCP ([`Channels::plaintext`]),
//! which only an agent started with its loudly named flag uses (docs/security.md,
//! "Migration channels").

use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A byte stream between two nodes: plain TCP or TLS over it.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An open channel (its TLS handshake done, if any).
pub type Stream = Box<dyn Io>;

/// How a node's migration channels are secured.
#[derive(Clone)]
pub struct Channels {
    tls: Option<Tls>,
}

#[derive(Clone)]
struct Tls {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    /// The node identity the configs come from (QEMU's own TLS is made from it too).
    identity: Arc<away_identity::Identity>,
}

impl Channels {
    /// Plain TCP: anyone on the path reads and changes what crosses. Only for an agent
    /// started with `--insecure-plaintext-channels`.
    pub fn plaintext() -> Channels {
        Channels { tls: None }
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Open the client end on `tcp`, which must lead to node `peer_node` (its certificate
    /// is checked for that name). Plain TCP is returned as it is.
    pub async fn connect(&self, tcp: TcpStream, peer_node: &str) -> io::Result<Stream> {
        let Some(tls) = &self.tls else { return Ok(Box::new(tcp)) };
        let name = server_name(peer_node)?;
        let stream = tokio_rustls::TlsConnector::from(tls.client.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake with node {peer_node:?} failed: {e}")))?;
        Ok(Box::new(stream))
    }

    /// Open the server end on an accepted `tcp` within `limit`; returns the stream and
    /// the peer's certificate chain (empty on plain TCP: the peer is unknown).
    pub async fn accept(&self, tcp: TcpStream, limit: Duration) -> io::Result<(Stream, Vec<CertificateDer<'static>>)> {
        let Some(tls) = &self.tls else { return Ok((Box::new(tcp), Vec::new())) };
        let accept = tokio_rustls::TlsAcceptor::from(tls.server.clone()).accept(tcp);
        let stream = tokio::time::timeout(limit, accept)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("no TLS handshake within {limit:?}")))?
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("TLS handshake failed: {e}")))?;
        let certs = stream.get_ref().1.peer_certificates().map(<[_]>::to_vec).unwrap_or_default();
        Ok((Box::new(stream), certs))
    }
}

impl std::fmt::Debug for Channels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_tls() { "Channels(mutual TLS)" } else { "Channels(PLAINTEXT)" })
    }
}

/// The name node `node`'s certificate is issued for: `<node>.node.away`.
pub fn server_name(node: &str) -> io::Result<ServerName<'static>> {
    away_identity::server_name(node).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Is `certs` (a peer's chain, already verified against the CA by the TLS handshake)
/// the certificate of node `node`? False for an empty chain.
pub fn peer_is(certs: &[CertificateDer<'_>], node: &str) -> bool {
    away_identity::check_peer(certs, node).is_ok()
}

impl Channels {
    /// Mutual TLS with node `identity`'s certificate, trusting its CA: the server end
    /// demands a client certificate from the CA, the client end presents the node's.
    pub fn from_identity(identity: &away_identity::Identity) -> Result<Channels, away_identity::IdentityError> {
        let (server, client) = (identity.server_config()?, identity.client_config()?);
        Ok(Channels { tls: Some(Tls { server, client, identity: Arc::new(identity.clone()) }) })
    }

    /// The node identity of mutual TLS channels (None: plaintext).
    pub fn identity(&self) -> Option<&Arc<away_identity::Identity>> {
        self.tls.as_ref().map(|t| &t.identity)
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A CA in a temporary directory and its nodes' channels, for the channels' tests.
    use super::*;

    pub struct TestCa {
        _dir: tempfile::TempDir,
        ca: away_identity::Ca,
    }

    impl TestCa {
        pub fn new() -> TestCa {
            let dir = tempfile::tempdir().unwrap();
            let ca = away_identity::Ca::load_or_create(&dir.path().join("ca")).unwrap();
            TestCa { _dir: dir, ca }
        }

        pub fn identity(&self, node: &str) -> away_identity::Identity {
            self.ca.issue_self(node, &[]).unwrap()
        }

        /// Node `node`'s channels, trusting this CA.
        pub fn channels(&self, node: &str) -> Channels {
            Channels::from_identity(&self.identity(node)).unwrap()
        }

        /// A client that trusts this CA but has no certificate of its own.
        pub fn anonymous_client(&self) -> Arc<rustls::ClientConfig> {
            away_identity::trusting_client_config(self.ca.cert_pem()).unwrap()
        }
    }

    #[test]
    fn a_peer_is_the_node_its_certificate_names() {
        let ca = TestCa::new();
        let id = ca.identity("laptop");
        assert!(peer_is(&id.chain, "laptop"));
        assert!(!peer_is(&id.chain, "cloud"));
        assert!(!peer_is(&id.chain, "laptop.node.away"));
        assert!(!peer_is(&[], "laptop"));
    }
}
