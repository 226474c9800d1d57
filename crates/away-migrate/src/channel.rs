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
}

impl Channels {
    /// Mutual TLS: `server` must demand a client certificate from the nodes' CA, `client`
    /// must present this node's certificate and trust the same CA.
    pub fn tls(server: Arc<rustls::ServerConfig>, client: Arc<rustls::ClientConfig>) -> Channels {
        Channels { tls: Some(Tls { server, client }) }
    }

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
    ServerName::try_from(format!("{node}.node.away"))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("node name {node:?} is no DNS label: {e}")))
}

/// Is `certs` (a peer's chain, already verified against the CA by the TLS handshake)
/// the certificate of node `node`? False for an empty chain.
pub fn peer_is(certs: &[CertificateDer<'_>], node: &str) -> bool {
    let (Some(leaf), Ok(name)) = (certs.first(), server_name(node)) else { return false };
    webpki::EndEntityCert::try_from(leaf).is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
}

#[cfg(test)]
pub(crate) mod testing {
    //! A CA and node certificates made with rcgen, for the channels' tests.
    use super::*;
    use rustls::pki_types::PrivateKeyDer;

    pub struct TestCa {
        ca: rcgen::Issuer<'static, rcgen::KeyPair>,
        pub ca_der: CertificateDer<'static>,
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    impl TestCa {
        pub fn new() -> TestCa {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.distinguished_name.push(rcgen::DnType::CommonName, "away test CA");
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            let ca_der = cert.der().clone();
            TestCa { ca: rcgen::Issuer::new(params, key), ca_der }
        }

        /// Node `node`'s certificate chain and key.
        pub fn node(&self, node: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
            let params = rcgen::CertificateParams::new(vec![format!("{node}.node.away")]).unwrap();
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.ca).unwrap();
            (vec![cert.der().clone()], PrivateKeyDer::try_from(key.serialize_der()).unwrap())
        }

        fn roots(&self) -> Arc<rustls::RootCertStore> {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.ca_der.clone()).unwrap();
            Arc::new(roots)
        }

        /// Node `node`'s channels, trusting this CA.
        pub fn channels(&self, node: &str) -> Channels {
            let (chain, key) = self.node(node);
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots(), provider()).build().unwrap();
            let server = rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain.clone(), key.clone_key())
                .unwrap();
            let client = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(self.roots())
                .with_client_auth_cert(chain, key)
                .unwrap();
            Channels::tls(Arc::new(server), Arc::new(client))
        }

        /// A client that trusts this CA but has no certificate of its own.
        pub fn anonymous_client(&self) -> Arc<rustls::ClientConfig> {
            Arc::new(
                rustls::ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_root_certificates(self.roots())
                    .with_no_client_auth(),
            )
        }
    }

    #[test]
    fn a_peer_is_the_node_its_certificate_names() {
        let ca = TestCa::new();
        let (chain, _) = ca.node("laptop");
        assert!(peer_is(&chain, "laptop"));
        assert!(!peer_is(&chain, "cloud"));
        assert!(!peer_is(&chain, "laptop.node.away"));
        assert!(!peer_is(&[], "laptop"));
    }
}
