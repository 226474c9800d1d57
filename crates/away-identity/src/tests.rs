use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use rustls::{ClientConnection, ServerConnection};

use super::*;

fn node(ca: &Ca, name: &str) -> Identity {
    let key = NodeKey::generate().unwrap();
    let csr = key.csr_pem(name).unwrap();
    let cert = ca.issue(&csr, name).unwrap();
    key.into_identity(&cert, ca.cert_pem()).unwrap()
}

/// Move what `from` has to send into `to`, and let `to` process it.
fn pump(from: &mut rustls::Connection, to: &mut rustls::Connection) -> std::result::Result<(), rustls::Error> {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).unwrap();
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).unwrap();
    }
    to.process_new_packets().map(|_| ())
}

/// Run a handshake between the two configs in memory, the client expecting the server
/// to be `expect`; the server's view of the client's certificates when it succeeds.
fn handshake_to(
    client: Arc<ClientConfig>,
    expect: ServerName<'static>,
    server: Arc<ServerConfig>,
) -> std::result::Result<Vec<CertificateDer<'static>>, rustls::Error> {
    let mut c = rustls::Connection::Client(ClientConnection::new(client, expect)?);
    let mut s = rustls::Connection::Server(ServerConnection::new(server)?);
    for _ in 0..20 {
        let server_result = pump(&mut c, &mut s);
        let client_result = pump(&mut s, &mut c);
        server_result?;
        client_result?;
        if !c.is_handshaking() && !s.is_handshaking() {
            return Ok(s.peer_certificates().map(|c| c.to_vec()).unwrap_or_default());
        }
    }
    panic!("the handshake did not finish");
}

/// [`handshake_to`] node `expect`.
fn handshake(
    client: Arc<ClientConfig>,
    expect: &str,
    server: Arc<ServerConfig>,
) -> std::result::Result<Vec<CertificateDer<'static>>, rustls::Error> {
    handshake_to(client, server_name(expect).unwrap(), server)
}

fn ca(dir: &tempfile::TempDir) -> Ca {
    Ca::load_or_create(dir.path()).unwrap()
}

#[test]
fn a_good_pair_connects_and_each_side_knows_the_other() {
    let d = tempfile::tempdir().unwrap();
    let ca = ca(&d);
    let a = node(&ca, "laptop");
    let b = node(&ca, "cloud");
    let peer = handshake(a.client_config().unwrap(), "cloud", b.server_config().unwrap()).unwrap();
    assert_eq!(peer_node(&peer).unwrap(), "laptop");
    check_peer(&peer, "laptop").unwrap();
}

#[test]
fn a_client_without_a_certificate_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let ca = ca(&d);
    let b = node(&ca, "cloud");
    let anonymous = trusting_client_config(ca.cert_pem()).unwrap();
    let err = handshake(anonymous.clone(), "cloud", b.server_config().unwrap()).unwrap_err();
    assert!(matches!(err, rustls::Error::NoCertificatesPresented), "{err:?}");
    // the broker's listener lets it in, with no node name to show
    let peer = handshake(anonymous, "cloud", b.server_config_client_optional().unwrap()).unwrap();
    assert!(matches!(peer_node(&peer), Err(IdentityError::NoPeerCertificate)));
}

#[test]
fn a_certificate_of_another_ca_is_refused_both_ways() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (ours, theirs) = (ca(&d1), ca(&d2));
    let good = node(&ours, "cloud");
    let stranger = node(&theirs, "laptop");
    let err = handshake(stranger.client_config().unwrap(), "cloud", good.server_config().unwrap()).unwrap_err();
    assert!(matches!(err, rustls::Error::InvalidCertificate(_)), "{err:?}");
    let other_server = node(&theirs, "cloud");
    let err = handshake(good.client_config().unwrap(), "cloud", other_server.server_config().unwrap()).unwrap_err();
    assert!(matches!(err, rustls::Error::InvalidCertificate(_)), "{err:?}");
}

#[test]
fn node_a_presented_where_b_is_expected_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let ca = ca(&d);
    let a = node(&ca, "laptop");
    let b = node(&ca, "cloud");
    // a client expecting the server "laptop" reaches "cloud"
    let err = handshake(a.client_config().unwrap(), "laptop", b.server_config().unwrap()).unwrap_err();
    assert!(matches!(err, rustls::Error::InvalidCertificate(_)), "{err:?}");
    // a server expecting its peer to be "edge" gets "laptop"
    let peer = handshake(a.client_config().unwrap(), "cloud", b.server_config().unwrap()).unwrap();
    let err = check_peer(&peer, "edge").unwrap_err();
    assert!(matches!(err, IdentityError::WrongPeer { ref found, .. } if found == "laptop"), "{err}");
}

#[test]
fn a_csr_for_another_name_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let ca = ca(&d);
    let csr = NodeKey::generate().unwrap().csr_pem("laptop").unwrap();
    let err = ca.issue(&csr, "cloud").unwrap_err();
    assert!(matches!(err, IdentityError::CsrName { .. }), "{err}");
    assert!(err.to_string().contains("\"laptop\""), "{err}");
    // nobody gets the broker's name, and garbage is no CSR
    let csr = NodeKey::generate().unwrap().csr_pem(BROKER_NAME).unwrap();
    assert!(matches!(ca.issue(&csr, BROKER_NAME), Err(IdentityError::Reserved(_))));
    assert!(matches!(ca.issue("not a csr", "cloud"), Err(IdentityError::Csr(_))));
    assert!(matches!(ca.issue(&csr, "../x"), Err(IdentityError::NodeName(_))));
}

#[test]
fn a_csr_with_an_extra_name_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let ca = ca(&d);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["cloud.node.away".to_string(), "broker.node.away".into()]).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, "cloud");
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    assert!(matches!(ca.issue(&csr, "cloud"), Err(IdentityError::CsrName { .. })));
}

#[test]
fn a_csr_asking_to_be_a_ca_gets_a_leaf() {
    let d = tempfile::tempdir().unwrap();
    let ca = ca(&d);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["cloud.node.away".to_string()]).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, "cloud");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let pem = ca.issue(&csr, "cloud").unwrap();
    let der = cert_from_pem(&pem, "certificate").unwrap();
    let cert = parse_cert(&der).unwrap();
    assert!(!cert.is_ca());
    let days = (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp()) / 86400;
    assert_eq!(days, 90);
}

#[test]
fn the_broker_identity_serves_its_ip_and_is_a_client_too() {
    let d = tempfile::tempdir().unwrap();
    let ca = ca(&d);
    let broker = ca.issue_self(BROKER_NAME, &["127.0.0.1".to_string()]).unwrap();
    let user = trusting_client_config(ca.cert_pem()).unwrap();
    let peer =
        handshake_to(user, ServerName::try_from("127.0.0.1").unwrap(), broker.server_config_client_optional().unwrap())
            .unwrap();
    assert!(peer.is_empty(), "a user presents no certificate");
    // the broker calls an agent with the same identity
    let agent = node(&ca, "cloud");
    let peer = handshake(broker.client_config().unwrap(), "cloud", agent.server_config().unwrap()).unwrap();
    assert_eq!(peer_node(&peer).unwrap(), BROKER_NAME);
}

#[test]
fn files_are_private_and_identities_come_back() {
    let d = tempfile::tempdir().unwrap();
    let ca_dir = d.path().join("ca");
    let ca = Ca::load_or_create(&ca_dir).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&ca_dir), 0o700);
    assert_eq!(mode(&ca_dir.join(Ca::KEY_FILE)), 0o600);
    // the same CA on the next start
    assert_eq!(Ca::load_or_create(&ca_dir).unwrap().fingerprint(), ca.fingerprint());

    let id_dir = d.path().join("state/identity");
    assert!(Identity::load(&id_dir).unwrap().is_none());
    let id = node(&ca, "laptop");
    id.save(&id_dir).unwrap();
    assert_eq!(mode(&id_dir), 0o700);
    assert_eq!(mode(&id_dir.join(Identity::KEY_FILE)), 0o600);
    let back = Identity::load(&id_dir).unwrap().unwrap();
    assert_eq!(back.name(), "laptop");
    assert_eq!(back.subject(), "CN=laptop");
    assert_eq!(back.fingerprint(), id.fingerprint());
    assert_eq!(back.ca_fingerprint(), ca.fingerprint());
    let left = back.not_after().duration_since(SystemTime::now()).unwrap();
    assert!(left > Duration::from_secs(89 * 86400) && left <= NODE_CERT_VALIDITY, "{left:?}");

    // a key others can read is refused
    std::fs::set_permissions(id_dir.join(Identity::KEY_FILE), std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(matches!(Identity::load(&id_dir), Err(IdentityError::OpenMode { .. })));
}

#[test]
fn a_certificate_for_another_key_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let ca = ca(&d);
    let csr = NodeKey::generate().unwrap().csr_pem("laptop").unwrap();
    let cert = ca.issue(&csr, "laptop").unwrap();
    let other = NodeKey::generate().unwrap();
    assert!(matches!(other.into_identity(&cert, ca.cert_pem()), Err(IdentityError::KeyMismatch)));
    assert_ne!(
        Ca::csr_key_id(&csr).unwrap(),
        Ca::csr_key_id(&NodeKey::generate().unwrap().csr_pem("laptop").unwrap()).unwrap()
    );
}

#[test]
fn node_names_are_dns_labels() {
    for ok in ["cloud", "laptop-1", "a", "node_2", "edge.eu"] {
        check_node_name(ok).unwrap();
        server_name(ok).unwrap();
    }
    for bad in ["", "-a", "a-", ".a", "a..b", "a b", "a/b", &"x".repeat(64)] {
        assert!(check_node_name(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn a_node_certificate_suits_qemus_gnutls_credentials() {
    // QEMU (tls-creds-x509) refuses a certificate whose critical key usage lacks key
    // encipherment, and reads the key and chain from PEM files
    let d = tempfile::tempdir().unwrap();
    let ca = ca(&d);
    let id = node(&ca, "laptop");
    let cert = parse_cert(&id.chain[0]).unwrap();
    let usage = cert.key_usage().unwrap().expect("a key usage extension");
    assert!(usage.value.digital_signature() && usage.value.key_encipherment(), "{:?}", usage.value);
    assert!(id.suits_qemu());
    assert_eq!(id.subject(), "CN=laptop");
    assert_eq!(certs_from_pem(&id.cert_pem(), "certificate").unwrap(), id.chain);
    let key = PrivateKeyDer::from_pem_slice(id.key_pem().as_bytes()).unwrap();
    assert_eq!(key.secret_der(), id.key.secret_der());
}

#[test]
fn a_certificate_without_key_encipherment_does_not_suit_qemu() {
    // what nodes were issued before VM moves went over QEMU's TLS
    let d = tempfile::tempdir().unwrap();
    let ca = ca(&d);
    let key = NodeKey::generate().unwrap();
    let mut params = node_params("old", &[]).unwrap();
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = params.signed_by(&key.key, &ca.issuer).unwrap();
    let old = key.into_identity(&cert.pem(), ca.cert_pem()).unwrap();
    assert!(!old.suits_qemu());
}

fn revoked(identity: &Identity) -> Revoked {
    Revoked { serial_hex: serial_hex(&identity.cert_pem()).unwrap(), revoked_at: std::time::SystemTime::now() }
}

#[test]
fn a_revoked_client_is_refused_by_configurations_built_before_the_list() {
    let d = tempfile::tempdir().unwrap();
    let ca = ca(&d);
    let a = node(&ca, "laptop");
    let b = node(&ca, "cloud");
    let c = node(&ca, "third");
    // built before the list exists: the swap must reach it
    let server = a.server_config().unwrap();
    let optional = a.server_config_client_optional().unwrap();
    handshake(b.client_config().unwrap(), "laptop", server.clone()).unwrap();

    let crl = ca.crl_pem(1, &[revoked(&b)]).unwrap();
    let summary = a.set_crl_pem(&crl).unwrap();
    assert_eq!(summary, CrlSummary { number: 1, revoked: 1 });
    let err = handshake(b.client_config().unwrap(), "laptop", server.clone()).unwrap_err();
    assert!(matches!(err, rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)), "{err:?}");
    let err = handshake(b.client_config().unwrap(), "laptop", optional.clone()).unwrap_err();
    assert!(matches!(err, rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)), "{err:?}");
    // another node of the CA still gets in, and a client without a certificate still may
    // where that is optional
    let peer = handshake(c.client_config().unwrap(), "laptop", server.clone()).unwrap();
    assert_eq!(peer_node(&peer).unwrap(), "third");
    handshake(trusting_client_config(ca.cert_pem()).unwrap(), "laptop", optional).unwrap();

    // a clone shares the list; a newer list (nothing revoked) takes effect at once
    let clone = a.clone();
    assert_eq!(clone.revocations().summary().unwrap().number, 1);
    a.set_crl_pem(&ca.crl_pem(2, &[]).unwrap()).unwrap();
    handshake(b.client_config().unwrap(), "laptop", server).unwrap();
}

#[test]
fn a_client_refuses_a_revoked_server() {
    let d = tempfile::tempdir().unwrap();
    let ca = ca(&d);
    let a = node(&ca, "laptop");
    let b = node(&ca, "cloud");
    let client = a.client_config().unwrap();
    handshake(client.clone(), "cloud", b.server_config().unwrap()).unwrap();
    a.set_crl_pem(&ca.crl_pem(1, &[revoked(&b)]).unwrap()).unwrap();
    let err = handshake(client, "cloud", b.server_config().unwrap()).unwrap_err();
    assert!(matches!(err, rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)), "{err:?}");
}

#[test]
fn a_list_of_another_ca_or_garbage_is_not_taken() {
    let d = tempfile::tempdir().unwrap();
    let ca = ca(&d);
    let other_dir = tempfile::tempdir().unwrap();
    let other = Ca::load_or_create(other_dir.path()).unwrap();
    let a = node(&ca, "laptop");
    let err = a.set_crl_pem(&other.crl_pem(5, &[]).unwrap()).unwrap_err();
    assert!(matches!(err, IdentityError::Crl(_)), "{err:?}");
    assert!(a.set_crl_pem("not a CRL").is_err());
    assert!(a.revocations().summary().is_none());
    // a list that revokes this very node is still a valid list of its CA
    a.set_crl_pem(&ca.crl_pem(3, &[revoked(&a)]).unwrap()).unwrap();
}

#[test]
fn a_saved_list_is_in_force_when_the_identity_is_loaded() {
    let d = tempfile::tempdir().unwrap();
    let ca = ca(&d);
    let a = node(&ca, "laptop");
    let b = node(&ca, "cloud");
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().join("identity");
    a.save(&dir).unwrap();
    a.set_crl_pem(&ca.crl_pem(7, &[revoked(&b)]).unwrap()).unwrap();
    a.save_crl(&dir).unwrap();
    let mode = std::fs::metadata(dir.join(CRL_FILE)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let loaded = Identity::load(&dir).unwrap().unwrap();
    assert_eq!(loaded.revocations().summary(), Some(CrlSummary { number: 7, revoked: 1 }));
    let err = handshake(b.client_config().unwrap(), "laptop", loaded.server_config().unwrap()).unwrap_err();
    assert!(matches!(err, rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)), "{err:?}");
}
