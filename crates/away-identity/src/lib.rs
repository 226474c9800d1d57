//! Node identities: the broker's certificate authority, each node's key and
//! certificate, and the rustls configurations of mutual TLS between them.
//!
//! A node's certificate carries its node name twice: as the subject's common name and
//! as the DNS name `<node>.node.away` (its only SAN), so a TLS client that expects node
//! `laptop` verifies the server against [`server_name`]`("laptop")`, and a server reads
//! who called it with [`peer_node`]. Every certificate is issued by one CA (the
//! broker's, [`Ca`]); nodes trust only that CA, never the system roots.
//!
//! Keys never leave the node that made them: a node sends a CSR ([`NodeKey::csr_pem`])
//! and gets a certificate back ([`Ca::issue`]). Key files are created 0600 in 0700
//! directories and refused when group or others can read them.

mod crl;
mod files;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "serve")]
pub mod serve;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};

pub use crl::{serial_hex, CrlSummary, Revocations, Revoked, CRL_FILE};
pub use rustls;

/// The DNS suffix of node names in certificates: node `laptop` is `laptop.node.away`.
pub const NODE_DOMAIN: &str = "node.away";

/// The name in the broker's own certificate (server and client); no node may take it.
pub const BROKER_NAME: &str = "broker";

/// How long a node certificate is valid; a node renews it by joining again.
pub const NODE_CERT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);

/// How long the CA's own certificate is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Certificates start this much in the past, for clocks a little behind the CA's.
const CLOCK_SKEW: Duration = Duration::from_secs(300);

pub type Result<T> = std::result::Result<T, IdentityError>;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is readable by group or others (mode {mode:o}): a key must be 0600")]
    OpenMode { path: PathBuf, mode: u32 },
    #[error("invalid node name {0:?}: 1-63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit, no '..'")]
    NodeName(String),
    #[error("node name {0:?} is reserved for the broker")]
    Reserved(String),
    #[error("the certificate signing request is for {found}, not for node {expected:?}")]
    CsrName { expected: String, found: String },
    #[error("not a valid certificate signing request")]
    Csr(#[source] rcgen::Error),
    #[error("cannot make a certificate or key")]
    Rcgen(#[source] rcgen::Error),
    #[error("no {what} in the PEM text")]
    Pem {
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("cannot read the certificate")]
    Certificate(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    #[error("the certificate has no common name")]
    NoCommonName,
    #[error("the certificate is not valid for node {node:?}")]
    NotForNode {
        node: String,
        #[source]
        source: webpki::Error,
    },
    #[error("the certificate does not chain to this CA")]
    Untrusted(#[source] webpki::Error),
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    #[error("the peer is node {found:?}, expected {expected:?}")]
    WrongPeer { expected: String, found: String },
    #[error("the certificate does not belong to this key")]
    KeyMismatch,
    #[error("{0:?} is not a host:port address")]
    Address(String),
    #[error("cannot build the TLS configuration")]
    Tls(#[source] rustls::Error),
    #[error("certificate revocation list: {0}")]
    Crl(String),
    #[error("cannot build the client certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

/// The crypto provider every configuration here uses: ring, never aws-lc-rs.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Node names go in URLs, logs and DNS names: letters, digits, '-', '_' and '.', 1-63,
/// starting and ending with a letter or digit, no empty label.
pub fn check_node_name(name: &str) -> Result<()> {
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && edge_ok(name.chars().next())
        && edge_ok(name.chars().last())
        && !name.contains("..")
        && !name.contains(".-")
        && !name.contains("-.");
    if ok {
        Ok(())
    } else {
        Err(IdentityError::NodeName(name.to_string()))
    }
}

/// The TLS server name of node `node`: `<node>.node.away`.
pub fn server_name(node: &str) -> Result<ServerName<'static>> {
    check_node_name(node)?;
    ServerName::try_from(format!("{node}.{NODE_DOMAIN}")).map_err(|_| IdentityError::NodeName(node.to_string()))
}

fn dns_name(node: &str) -> String {
    format!("{node}.{NODE_DOMAIN}")
}

/// SHA-256 of a DER certificate, hex: what `away doctor` shows and users compare.
pub fn fingerprint_der(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The node name of a peer whose certificate chain rustls has already verified against
/// the CA: its common name, checked against its DNS SAN.
pub fn peer_node(certs: &[CertificateDer<'_>]) -> Result<String> {
    let leaf = certs.first().ok_or(IdentityError::NoPeerCertificate)?;
    let name = common_name(leaf)?;
    check_node_name(&name)?;
    let ee = webpki::EndEntityCert::try_from(leaf)
        .map_err(|source| IdentityError::NotForNode { node: name.clone(), source })?;
    ee.verify_is_valid_for_subject_name(&server_name(&name)?)
        .map_err(|source| IdentityError::NotForNode { node: name.clone(), source })?;
    Ok(name)
}

/// Ok when the verified peer is node `expected`.
pub fn check_peer(certs: &[CertificateDer<'_>], expected: &str) -> Result<()> {
    let found = peer_node(certs)?;
    if found == expected {
        Ok(())
    } else {
        Err(IdentityError::WrongPeer { expected: expected.to_string(), found })
    }
}

fn parse_cert<'a>(der: &'a CertificateDer<'_>) -> Result<x509_parser::certificate::X509Certificate<'a>> {
    x509_parser::parse_x509_certificate(der).map(|(_, c)| c).map_err(IdentityError::Certificate)
}

fn common_name(der: &CertificateDer<'_>) -> Result<String> {
    let cert = parse_cert(der)?;
    let cn = cert.subject().iter_common_name().next().ok_or(IdentityError::NoCommonName)?;
    cn.as_str().map(str::to_string).map_err(|_| IdentityError::NoCommonName)
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the OS random source");
    // positive, as X.509 wants
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

fn validity(params: &mut CertificateParams, for_how_long: Duration) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + for_how_long;
}

fn cert_from_pem(pem: &str, what: &'static str) -> Result<CertificateDer<'static>> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|source| IdentityError::Pem { what, source })
}

fn certs_from_pem(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|source| IdentityError::Pem { what, source })?;
    if certs.is_empty() {
        return Err(IdentityError::Pem { what, source: rustls::pki_types::pem::Error::NoItemsFound });
    }
    Ok(certs)
}

fn to_pem(tag: &str, der: &[u8]) -> String {
    // rcgen's pem dependency writes the same format rustls reads
    pem::encode_config(&pem::Pem::new(tag, der.to_vec()), pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF))
}

/// The broker's certificate authority: it signs every node certificate.
pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    pub const CERT_FILE: &'static str = "ca.pem";
    pub const KEY_FILE: &'static str = "ca.key";

    /// The CA in `dir` (`ca.pem`, `ca.key`), made there when absent: the directory 0700,
    /// the key created 0600 (never readable by others, not even for a moment).
    pub fn load_or_create(dir: &Path) -> Result<Ca> {
        files::private_dir(dir)?;
        let key_path = dir.join(Self::KEY_FILE);
        let cert_path = dir.join(Self::CERT_FILE);
        if key_path.exists() {
            let key_pem = files::read_secret(&key_path)?;
            let key = KeyPair::from_pem(&key_pem).map_err(IdentityError::Rcgen)?;
            let cert_pem = files::read(&cert_path)?;
            return Ca::from_pem(&cert_pem, key);
        }
        let key = KeyPair::generate().map_err(IdentityError::Rcgen)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "away cluster CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(random_serial());
        validity(&mut params, CA_VALIDITY);
        let cert = params.self_signed(&key).map_err(IdentityError::Rcgen)?;
        // the key first (create_new, 0600), then the certificate: a crash in between
        // leaves a key without a certificate, which the next start refuses loudly
        files::write_new_secret(&key_path, key.serialize_pem().as_bytes())?;
        files::write_public(&cert_path, cert.pem().as_bytes())?;
        Ca::from_pem(&cert.pem(), key)
    }

    fn from_pem(cert_pem: &str, key: KeyPair) -> Result<Ca> {
        let cert_der = cert_from_pem(cert_pem, "CA certificate")?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(IdentityError::Rcgen)?;
        Ok(Ca { cert_pem: cert_pem.to_string(), cert_der, issuer })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn fingerprint(&self) -> String {
        fingerprint_der(&self.cert_der)
    }

    /// A certificate for node `node_name` from its CSR, PEM. The CSR must name that node
    /// (common name, and DNS SANs only `<node>.node.away`); everything else in it (CA
    /// flags, key usages, other names) is ignored: the certificate is made from our own
    /// parameters with only the CSR's public key.
    pub fn issue(&self, csr_pem: &str, node_name: &str) -> Result<String> {
        check_node_name(node_name)?;
        if node_name == BROKER_NAME {
            return Err(IdentityError::Reserved(node_name.to_string()));
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(IdentityError::Csr)?;
        check_csr_names(&csr.params, node_name)?;
        let params = node_params(node_name, &[])?;
        let cert = params.signed_by(&csr.public_key, &self.issuer).map_err(IdentityError::Rcgen)?;
        Ok(cert.pem())
    }

    /// The broker's own identity (server and client certificate, name `name`), with
    /// `extra_sans` (IP addresses or DNS names it is reached at, e.g. `127.0.0.1`) beside
    /// `<name>.node.away`.
    pub fn issue_self(&self, name: &str, extra_sans: &[String]) -> Result<Identity> {
        check_node_name(name)?;
        let key = NodeKey::generate()?;
        let params = node_params(name, extra_sans)?;
        let cert = params.signed_by(&key.key, &self.issuer).map_err(IdentityError::Rcgen)?;
        Ok(Identity {
            name: name.to_string(),
            ca: self.cert_der.clone(),
            chain: vec![cert.der().clone()],
            key: key.private_key_der(),
            revocations: Revocations::default(),
        })
    }

    /// The SHA-256 of a CSR's public key: what the broker remembers of a node's key, so
    /// a second join of the same name with another key is refused.
    pub fn csr_key_id(csr_pem: &str) -> Result<String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(IdentityError::Csr)?;
        Ok(hex::encode(Sha256::digest(rcgen::PublicKeyData::der_bytes(&csr.public_key))))
    }
}

fn dn_text(v: &DnValue) -> String {
    match v {
        DnValue::Utf8String(s) => s.clone(),
        DnValue::PrintableString(s) => s.as_str().to_string(),
        DnValue::Ia5String(s) => s.as_str().to_string(),
        other => format!("{other:?}"),
    }
}

fn check_csr_names(params: &CertificateParams, node: &str) -> Result<()> {
    let refuse = |found: String| Err(IdentityError::CsrName { expected: node.to_string(), found });
    match params.distinguished_name.get(&DnType::CommonName).map(dn_text) {
        Some(cn) if cn == node => {}
        Some(cn) => return refuse(format!("common name {cn:?}")),
        None => return refuse("no common name".to_string()),
    }
    let want = dns_name(node);
    for san in &params.subject_alt_names {
        match san {
            SanType::DnsName(d) if d.as_str() == want => {}
            other => return refuse(format!("subject alternative name {other:?}")),
        }
    }
    Ok(())
}

fn node_params(name: &str, extra_sans: &[String]) -> Result<CertificateParams> {
    let mut sans = vec![dns_name(name)];
    sans.extend(extra_sans.iter().cloned());
    let mut params = CertificateParams::new(sans).map_err(IdentityError::Rcgen)?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::ExplicitNoCa;
    // keyEncipherment beside digitalSignature: rustls ignores key usage, but QEMU's
    // GnuTLS credentials (the VM migration stream's TLS) refuse a certificate whose
    // critical key usage lacks it, whatever the key type
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, NODE_CERT_VALIDITY);
    Ok(params)
}

/// A node's private key (ECDSA P-256), made on the node and never sent anywhere.
pub struct NodeKey {
    key: KeyPair,
}

impl NodeKey {
    pub fn generate() -> Result<NodeKey> {
        Ok(NodeKey { key: KeyPair::generate().map_err(IdentityError::Rcgen)? })
    }

    /// The key in `dir/key.pem`, made there (0600, in a 0700 `dir`) when absent. A node
    /// keeps its key before it sends the CSR, so that a join retried after a crash asks
    /// for the same key (the broker refuses a known name with another key).
    pub fn load_or_create(dir: &Path) -> Result<NodeKey> {
        files::private_dir(dir)?;
        let path = dir.join(Identity::KEY_FILE);
        if path.exists() {
            let pem = files::read_secret(&path)?;
            return Ok(NodeKey { key: KeyPair::from_pem(&pem).map_err(IdentityError::Rcgen)? });
        }
        let key = NodeKey::generate()?;
        files::write_new_secret(&path, key.key.serialize_pem().as_bytes())?;
        Ok(key)
    }

    /// A CSR for `node_name`: common name the node name, one DNS SAN `<node>.node.away`.
    pub fn csr_pem(&self, node_name: &str) -> Result<String> {
        check_node_name(node_name)?;
        let mut params = CertificateParams::new(vec![dns_name(node_name)]).map_err(IdentityError::Rcgen)?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, node_name);
        let csr = params.serialize_request(&self.key).map_err(IdentityError::Rcgen)?;
        csr.pem().map_err(IdentityError::Rcgen)
    }

    fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.serialize_der().into())
    }

    /// The identity this key makes with `cert_pem` (issued for it) and the CA that
    /// issued it: the certificate must chain to that CA and hold this key.
    pub fn into_identity(self, cert_pem: &str, ca_pem: &str) -> Result<Identity> {
        let ca = cert_from_pem(ca_pem, "CA certificate")?;
        let chain = certs_from_pem(cert_pem, "certificate")?;
        let leaf = parse_cert(&chain[0])?;
        if leaf.public_key().subject_public_key.data.as_ref() != self.key.public_key_raw() {
            return Err(IdentityError::KeyMismatch);
        }
        let name = common_name(&chain[0])?;
        let identity = Identity { name, ca, chain, key: self.private_key_der(), revocations: Revocations::default() };
        identity.verify_own_chain()?;
        Ok(identity)
    }
}

/// A node's identity: its name, its certificate chain, its key, and the CA it trusts.
pub struct Identity {
    pub name: String,
    pub ca: CertificateDer<'static>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// The CA's revocation list as this node knows it: every TLS configuration built
    /// from this identity (or a clone) consults it at each handshake.
    revocations: Revocations,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            name: self.name.clone(),
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            revocations: self.revocations.clone(),
        }
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("name", &self.name).field("subject", &self.subject()).finish_non_exhaustive()
    }
}

impl Identity {
    pub const CA_FILE: &'static str = "ca.pem";
    pub const CERT_FILE: &'static str = "cert.pem";
    pub const KEY_FILE: &'static str = "key.pem";

    /// The identity saved in `dir`, None when there is none (no `cert.pem`), with the
    /// revocation list saved beside it (`crl.pem`) in force.
    pub fn load(dir: &Path) -> Result<Option<Identity>> {
        let cert_path = dir.join(Self::CERT_FILE);
        if !cert_path.exists() {
            return Ok(None);
        }
        let chain = certs_from_pem(&files::read(&cert_path)?, "certificate")?;
        let ca = cert_from_pem(&files::read(&dir.join(Self::CA_FILE))?, "CA certificate")?;
        let key_pem = files::read_secret(&dir.join(Self::KEY_FILE))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|source| IdentityError::Pem { what: "private key", source })?;
        let name = common_name(&chain[0])?;
        let identity = Identity { name, ca, chain, key, revocations: Revocations::default() };
        identity.verify_own_chain()?;
        identity.load_crl(dir)?;
        Ok(Some(identity))
    }

    /// Save to `dir` (made 0700): `ca.pem`, `cert.pem`, `key.pem` (0600). Each file is
    /// replaced whole (written beside, then renamed).
    pub fn save(&self, dir: &Path) -> Result<()> {
        files::private_dir(dir)?;
        files::replace_secret(&dir.join(Self::KEY_FILE), self.key_pem().as_bytes())?;
        files::replace_public(&dir.join(Self::CA_FILE), self.ca_pem().as_bytes())?;
        files::replace_public(&dir.join(Self::CERT_FILE), self.cert_pem().as_bytes())?;
        Ok(())
    }

    /// The node's certificate chain, PEM.
    pub fn cert_pem(&self) -> String {
        self.chain.iter().map(|c| to_pem("CERTIFICATE", c)).collect()
    }

    /// The node's private key, PEM (PKCS#8): only for files created 0600 (e.g. QEMU's
    /// credentials directory), never for a log or a command line.
    pub fn key_pem(&self) -> String {
        to_pem("PRIVATE KEY", self.key.secret_der())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ca_pem(&self) -> String {
        to_pem("CERTIFICATE", &self.ca)
    }

    /// When the node certificate expires.
    pub fn not_after(&self) -> SystemTime {
        parse_cert(&self.chain[0])
            .map(|c| {
                let secs = c.validity().not_after.timestamp();
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)
            })
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }

    /// The certificate's subject, e.g. `CN=laptop`.
    pub fn subject(&self) -> String {
        parse_cert(&self.chain[0]).map(|c| c.subject().to_string()).unwrap_or_default()
    }

    /// Whether QEMU's TLS (GnuTLS) takes the node certificate: a critical key usage must
    /// allow key encipherment (certificates issued before VM moves went over TLS lack it).
    pub fn suits_qemu(&self) -> bool {
        parse_cert(&self.chain[0]).is_ok_and(|c| match c.key_usage() {
            Ok(Some(ku)) => !ku.critical || ku.value.key_encipherment(),
            Ok(None) => true,
            Err(_) => false,
        })
    }

    /// SHA-256 of the node certificate.
    pub fn fingerprint(&self) -> String {
        fingerprint_der(&self.chain[0])
    }

    /// SHA-256 of the CA certificate this identity trusts.
    pub fn ca_fingerprint(&self) -> String {
        fingerprint_der(&self.ca)
    }

    fn roots(&self) -> Result<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone()).map_err(IdentityError::Tls)?;
        Ok(roots)
    }

    fn verify_own_chain(&self) -> Result<()> {
        let anchor = webpki::anchor_from_trusted_cert(&self.ca).map_err(IdentityError::Untrusted)?;
        let ee = webpki::EndEntityCert::try_from(&self.chain[0]).map_err(IdentityError::Untrusted)?;
        let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        ee.verify_for_usage(
            algs.all,
            &[anchor],
            &self.chain[1..],
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(IdentityError::Untrusted)?;
        Ok(())
    }

    /// A TLS server that requires a client certificate chaining to the CA (the caller
    /// then reads who it is with [`peer_node`]).
    /// Certificates on the identity's revocation list are refused.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>> {
        let verifier = crl::RevocableClientVerifier::new(Arc::new(self.roots()?), false, self.revocations.clone())?;
        self.server_with(verifier)
    }

    /// A TLS server where a client certificate is optional (the broker: users come with
    /// bearer tokens, agents with their certificates); one that is presented must chain
    /// to the CA.
    pub fn server_config_client_optional(&self) -> Result<Arc<ServerConfig>> {
        let verifier = crl::RevocableClientVerifier::new(Arc::new(self.roots()?), true, self.revocations.clone())?;
        self.server_with(verifier)
    }

    fn server_with(&self, verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>) -> Result<Arc<ServerConfig>> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(IdentityError::Tls)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(IdentityError::Tls)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// A TLS client that presents this identity and trusts only the CA; a server whose
    /// certificate is on the identity's revocation list is refused.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>> {
        let verifier = crl::RevocableServerVerifier::new(Arc::new(self.roots()?), self.revocations.clone())?;
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(IdentityError::Tls)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(IdentityError::Tls)?;
        Ok(Arc::new(config))
    }
}

/// A TLS client with no certificate of its own that trusts only the CA in `ca_pem`
/// (users' clients of the broker: `--ca FILE`).
pub fn trusting_client_config(ca_pem: &str) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(ca_pem, "CA certificate")? {
        roots.add(cert).map_err(IdentityError::Tls)?;
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(IdentityError::Tls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A TLS client that trusts nothing: for plain-HTTP clients, so that an `https://` URL
/// given by mistake fails instead of reaching whoever holds a public certificate.
pub fn trust_nothing_client_config() -> Arc<ClientConfig> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    Arc::new(config)
}

/// Make ring the process's default rustls provider (for code that builds TLS clients
/// without a configuration of its own, e.g. tests using reqwest directly). Idempotent.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The DER certificates in a PEM text (to compare two CA files whatever their layout).
pub fn read_ca_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    certs_from_pem(pem, "CA certificate")
}

/// Read a CA certificate file (`--ca FILE`).
pub fn read_ca_file(path: &Path) -> Result<String> {
    let pem = files::read(path)?;
    certs_from_pem(&pem, "CA certificate")?;
    Ok(pem)
}

pub use files::{private_dir, private_file, write_new_secret};

#[cfg(test)]
mod tests;
