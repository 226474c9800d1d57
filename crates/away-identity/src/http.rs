//! reqwest clients on this crate's TLS configurations (reqwest is built without a
//! crypto provider of its own: every client gets its configuration from here).

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::ClientConfig;

use crate::{Identity, Result, NODE_DOMAIN};

/// A client builder with `tls` (None: plain HTTP only, an `https://` URL fails).
pub fn client_builder(tls: Option<Arc<ClientConfig>>) -> reqwest::ClientBuilder {
    let config = tls.unwrap_or_else(crate::trust_nothing_client_config);
    reqwest::Client::builder().tls_backend_preconfigured((*config).clone())
}

/// The URL base and client builder for calling node `node` at `addr` (`host:port`) with
/// `identity`: `https://<node>.node.away:<port>`, resolved to `addr`, so the TLS
/// handshake checks that the peer is that node whatever address it was given.
pub async fn node_client(identity: &Identity, node: &str, addr: &str) -> Result<(String, reqwest::ClientBuilder)> {
    let host = crate::server_name(node)?.to_str().into_owned();
    let sock: SocketAddr = match addr.parse() {
        Ok(a) => a,
        Err(_) => tokio_lookup(addr).await.ok_or_else(|| crate::IdentityError::Address(addr.to_string()))?,
    };
    debug_assert!(host.ends_with(NODE_DOMAIN));
    let builder = client_builder(Some(identity.client_config()?)).resolve(&host, sock);
    Ok((format!("https://{host}:{}", sock.port()), builder))
}

async fn tokio_lookup(addr: &str) -> Option<SocketAddr> {
    tokio::net::lookup_host(addr).await.ok().and_then(|mut a| a.next())
}
