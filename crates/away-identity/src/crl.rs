//! Revocation of node certificates: the CA's certificate revocation list (CRL) and the
//! TLS verifiers that consult it.
//!
//! Every configuration an [`Identity`](crate::Identity) builds (its API server, the
//! migration channels, its clients of other nodes) checks peers with a verifier that
//! reads the identity's [`Revocations`] at each handshake: a new CRL set there (the
//! broker revoked a node; an agent heard of it with its heartbeat) takes effect from the
//! next handshake on, in every configuration built before or after, without a restart.
//! The verifiers are rustls's own WebPKI verifiers (`with_crls`), rebuilt when the CRL
//! changes; the wrappers here only swap them (rustls has no swappable verifier).

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::{files, provider, Ca, IdentityError, Result};

/// The file of a node's CRL in its identity directory (0600, replaced whole).
pub const CRL_FILE: &str = "crl.pem";

/// A revoked certificate as the CA lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The certificate's serial number, hex (as [`serial_hex`] gives it).
    pub serial_hex: String,
    pub revoked_at: SystemTime,
}

/// What a CRL says, in short (`away doctor`, logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlSummary {
    /// The CRL number: the CA raises it with each new list.
    pub number: u64,
    /// How many certificates it revokes.
    pub revoked: usize,
}

/// The serial number of a PEM certificate (its first), hex: what the broker records of
/// each certificate it issues, to revoke it later.
pub fn serial_hex(cert_pem: &str) -> Result<String> {
    let der = crate::cert_from_pem(cert_pem, "certificate")?;
    Ok(hex::encode(crate::parse_cert(&der)?.raw_serial()))
}

fn parse_crl_pem(pem: &str) -> Result<(CertificateRevocationListDer<'static>, CrlSummary)> {
    let der = CertificateRevocationListDer::from_pem_slice(pem.as_bytes())
        .map_err(|source| IdentityError::Pem { what: "certificate revocation list", source })?;
    let summary = summarize(&der)?;
    Ok((der, summary))
}

fn listed_serials(der: &CertificateRevocationListDer<'_>) -> std::collections::HashSet<String> {
    x509_parser::parse_x509_crl(der)
        .map(|(_, crl)| crl.iter_revoked_certificates().map(|r| hex::encode(r.raw_serial())).collect())
        .unwrap_or_default()
}

fn summarize(der: &CertificateRevocationListDer<'_>) -> Result<CrlSummary> {
    let (_, crl) = x509_parser::parse_x509_crl(der).map_err(|e| IdentityError::Crl(e.to_string()))?;
    let number = crl
        .crl_number()
        .and_then(|n| {
            let digits = n.to_u64_digits();
            match digits.len() {
                0 => Some(0),
                1 => Some(digits[0]),
                _ => None,
            }
        })
        .ok_or_else(|| IdentityError::Crl("no CRL number (or one beyond 64 bits)".into()))?;
    Ok(CrlSummary { number, revoked: crl.iter_revoked_certificates().count() })
}

impl Ca {
    /// A CRL of this CA, PEM, numbered `number`, listing `revoked`. Valid as long as the
    /// CA (verifiers here do not enforce a CRL's next update: a node that has not heard
    /// of a newer list keeps the one it has rather than refusing everyone).
    pub fn crl_pem(&self, number: u64, revoked: &[Revoked]) -> Result<String> {
        let now = time::OffsetDateTime::now_utc();
        let revoked_certs = revoked
            .iter()
            .map(|r| {
                let serial = hex::decode(&r.serial_hex)
                    .map_err(|_| IdentityError::Crl(format!("serial {:?} is not hex", r.serial_hex)))?;
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&serial),
                    revocation_time: time::OffsetDateTime::from(r.revoked_at),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let params = CertificateRevocationListParams {
            this_update: now - Duration::from_secs(300),
            next_update: now + crate::CA_VALIDITY,
            crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer).map_err(IdentityError::Rcgen)?;
        crl.pem().map_err(IdentityError::Rcgen)
    }
}

#[derive(Default)]
struct State {
    /// Raised at each change, so verifiers know to rebuild.
    generation: u64,
    crl: Option<(CertificateRevocationListDer<'static>, CrlSummary, String)>,
    /// The serials it lists, hex.
    serials: std::collections::HashSet<String>,
}

/// The CRL an identity's verifiers consult; clones share it (an identity's clones and
/// every configuration built from them see one list).
#[derive(Clone, Default)]
pub struct Revocations {
    state: Arc<RwLock<State>>,
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocations").field("crl", &self.summary()).finish()
    }
}

impl Revocations {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The CRL in force, in short.
    pub fn summary(&self) -> Option<CrlSummary> {
        self.read().crl.as_ref().map(|(_, s, _)| s.clone())
    }

    /// The CRL in force, PEM (for QEMU's `ca-crl.pem`, the broker's heartbeat answers).
    pub fn pem(&self) -> Option<String> {
        self.read().crl.as_ref().map(|(_, _, p)| p.clone())
    }

    /// Put a CRL in force from the next handshake on. Unchecked: the caller made it
    /// (the CA) or checked it ([`crate::Identity::set_crl_pem`]).
    fn set(&self, der: CertificateRevocationListDer<'static>, summary: CrlSummary, pem: String) {
        let serials = listed_serials(&der);
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        state.generation += 1;
        state.crl = Some((der, summary, pem));
        state.serials = serials;
    }

    /// Whether the list in force revokes the certificate of serial `serial_hex`: for
    /// connections whose handshake was made before the list came
    /// (`serve::TlsPeer::serial`); new handshakes are refused by the verifiers.
    pub fn is_revoked(&self, serial_hex: &str) -> bool {
        self.read().serials.contains(serial_hex)
    }

    /// The CA's own list (the broker: it made it, no check needed).
    pub fn set_from_ca(&self, pem: &str) -> Result<CrlSummary> {
        let (der, summary) = parse_crl_pem(pem)?;
        self.set(der, summary.clone(), pem.to_string());
        Ok(summary)
    }

    fn snapshot(&self) -> (u64, Vec<CertificateRevocationListDer<'static>>) {
        let state = self.read();
        (state.generation, state.crl.iter().map(|(d, _, _)| d.clone()).collect())
    }

    fn generation(&self) -> u64 {
        self.read().generation
    }
}

/// Check `pem` as a CRL of `ca`: well formed and signed by the CA. `leaf` (a certificate
/// of that CA) serves to have WebPKI check the signature; the CRL may revoke it.
pub(crate) fn check_crl(
    pem: &str,
    ca: &CertificateDer<'_>,
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Result<(CertificateRevocationListDer<'static>, CrlSummary)> {
    let (der, summary) = parse_crl_pem(pem)?;
    let owned = webpki::OwnedCertRevocationList::from_der(&der).map_err(|e| IdentityError::Crl(format!("{e:?}")))?;
    let list = webpki::CertRevocationList::from(owned);
    let lists = [&list];
    let options = webpki::RevocationOptionsBuilder::new(&lists)
        .map_err(|_| IdentityError::Crl("no list".into()))?
        .with_depth(webpki::RevocationCheckDepth::EndEntity)
        .with_status_policy(webpki::UnknownStatusPolicy::Deny)
        .build();
    let anchor = webpki::anchor_from_trusted_cert(ca).map_err(IdentityError::Untrusted)?;
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(IdentityError::Untrusted)?;
    let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
    match ee.verify_for_usage(
        algs.all,
        &[anchor],
        intermediates,
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        Some(options),
        None,
    ) {
        // the signature was checked before the serial was looked up
        Ok(_) | Err(webpki::Error::CertRevoked) => Ok((der, summary)),
        Err(e) => Err(IdentityError::Crl(format!("not a valid list of this CA: {e:?}"))),
    }
}

impl crate::Identity {
    /// The CRL this identity's verifiers consult (shared by its clones).
    pub fn revocations(&self) -> &Revocations {
        &self.revocations
    }

    /// Share `other`'s CRL from now on (a node that joined again keeps the list it had).
    pub fn share_revocations(&mut self, other: &Revocations) {
        self.revocations = other.clone();
    }

    /// Check `pem` (a CRL from the broker) against this identity's CA and put it in force
    /// for every configuration built from this identity, from the next handshake on.
    pub fn set_crl_pem(&self, pem: &str) -> Result<CrlSummary> {
        let (der, summary) = check_crl(pem, &self.ca, &self.chain[0], &self.chain[1..])?;
        self.revocations.set(der, summary.clone(), pem.to_string());
        Ok(summary)
    }

    /// Save the CRL in force to `dir/crl.pem` (0600, replaced whole); nothing without one.
    pub fn save_crl(&self, dir: &Path) -> Result<()> {
        match self.revocations.pem() {
            Some(pem) => files::replace_secret(&dir.join(CRL_FILE), pem.as_bytes()),
            None => Ok(()),
        }
    }

    /// Load `dir/crl.pem` when there is one (checked like [`Self::set_crl_pem`]).
    pub(crate) fn load_crl(&self, dir: &Path) -> Result<Option<CrlSummary>> {
        let path = dir.join(CRL_FILE);
        if !path.exists() {
            return Ok(None);
        }
        self.set_crl_pem(&files::read(&path)?).map(Some)
    }
}

/// A verifier built from the CRL in force, rebuilt when [`Revocations`] changes: the
/// swap both wrappers below make (rustls has no swappable verifier of its own).
struct Swappable<V: ?Sized> {
    revocations: Revocations,
    build: Box<dyn Fn(Vec<CertificateRevocationListDer<'static>>) -> Result<Arc<V>> + Send + Sync>,
    built: RwLock<(u64, Arc<V>)>,
}

impl<V: ?Sized> std::fmt::Debug for Swappable<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swappable").field("revocations", &self.revocations).finish_non_exhaustive()
    }
}

impl<V: ?Sized> Swappable<V> {
    fn new(
        revocations: Revocations,
        build: impl Fn(Vec<CertificateRevocationListDer<'static>>) -> Result<Arc<V>> + Send + Sync + 'static,
    ) -> Result<Swappable<V>> {
        let (generation, crls) = revocations.snapshot();
        let first = build(crls)?;
        Ok(Swappable { revocations, build: Box::new(build), built: RwLock::new((generation, first)) })
    }

    fn current(&self) -> std::result::Result<Arc<V>, rustls::Error> {
        let now = self.revocations.generation();
        {
            let built = self.built.read().unwrap_or_else(|e| e.into_inner());
            if built.0 == now {
                return Ok(built.1.clone());
            }
        }
        let (generation, crls) = self.revocations.snapshot();
        // a list that cannot be used refuses every peer (fail closed); lists are checked
        // before they are set, so this is not expected
        let inner = (self.build)(crls).map_err(|e| rustls::Error::General(format!("revocation list: {e}")))?;
        *self.built.write().unwrap_or_else(|e| e.into_inner()) = (generation, inner.clone());
        Ok(inner)
    }
}

/// A client-certificate verifier (TLS servers) over rustls's WebPKI one, rebuilt with the
/// CRL whenever [`Revocations`] changes.
#[derive(Debug)]
pub(crate) struct RevocableClientVerifier {
    optional: bool,
    hints: Vec<DistinguishedName>,
    inner: Swappable<dyn ClientCertVerifier>,
}

fn client_verifier(
    roots: &Arc<RootCertStore>,
    optional: bool,
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<Arc<dyn ClientCertVerifier>> {
    let mut builder = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider());
    if optional {
        builder = builder.allow_unauthenticated();
    }
    if !crls.is_empty() {
        // the CA is a trust anchor (never on a list); a certificate of another issuer
        // fails the chain anyway
        builder = builder.with_crls(crls).only_check_end_entity_revocation().allow_unknown_revocation_status();
    }
    builder.build().map_err(IdentityError::Verifier)
}

impl RevocableClientVerifier {
    pub(crate) fn new(
        roots: Arc<RootCertStore>,
        optional: bool,
        revocations: Revocations,
    ) -> Result<Arc<RevocableClientVerifier>> {
        let inner = Swappable::new(revocations, move |crls| client_verifier(&roots, optional, crls))?;
        let hints = inner.current().map(|v| v.root_hint_subjects().to_vec()).unwrap_or_default();
        Ok(Arc::new(RevocableClientVerifier { optional, hints, inner }))
    }

    fn inner(&self) -> std::result::Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        self.inner.current()
    }
}

impl ClientCertVerifier for RevocableClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        !self.optional
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        self.inner()?.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}

/// A server-certificate verifier (TLS clients) over rustls's WebPKI one, rebuilt with the
/// CRL whenever [`Revocations`] changes.
#[derive(Debug)]
pub(crate) struct RevocableServerVerifier {
    inner: Swappable<WebPkiServerVerifier>,
}

fn server_verifier(
    roots: &Arc<RootCertStore>,
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<Arc<WebPkiServerVerifier>> {
    let mut builder = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider());
    if !crls.is_empty() {
        builder = builder.with_crls(crls).only_check_end_entity_revocation().allow_unknown_revocation_status();
    }
    builder.build().map_err(IdentityError::Verifier)
}

impl RevocableServerVerifier {
    pub(crate) fn new(roots: Arc<RootCertStore>, revocations: Revocations) -> Result<Arc<RevocableServerVerifier>> {
        let inner = Swappable::new(revocations, move |crls| server_verifier(&roots, crls))?;
        Ok(Arc::new(RevocableServerVerifier { inner }))
    }

    fn inner(&self) -> std::result::Result<Arc<WebPkiServerVerifier>, rustls::Error> {
        self.inner.current()
    }
}

impl ServerCertVerifier for RevocableServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        self.inner()?.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}
