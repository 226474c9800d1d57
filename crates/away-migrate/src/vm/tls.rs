//! QEMU's migration stream over TLS, with the node identities (docs/security.md,
//! "Migration channels").
//!
//! QEMU speaks TLS itself (GnuTLS): a `tls-creds-x509` object made from a directory of
//! PEM files, named in the `tls-creds` migration parameter on both ends. The source
//! (the TLS client) presents its node certificate and checks the destination's against
//! `tls-hostname` = `<target>.node.away` (the certificate's one DNS name; the URI's
//! host is an address). The destination (the TLS server) demands a client certificate
//! from the CA and takes only the one whose distinguished name its `authz-simple`
//! object names (`tls-authz`): `CN=<source>`, the node the move came from. Multifd's
//! channels and post-copy's return path ride on the same credentials.
//!
//! QEMU reads the files when the object is made, so they exist only for that moment:
//! written 0600 into a fresh 0700 directory beside the VM's state and removed as soon
//! as `object-add` answers (or fails).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use away_identity::Identity;
use away_runtime::qemu::qmp::commands::{Command, MigrateSetParameters, ObjectAdd, ObjectDel, TlsEndpoint};
use away_runtime::qemu::Qmp;

use super::{Side, VmMigrateError};

/// The ids of the objects a move adds (one move at a time per QEMU: an earlier move's
/// objects are removed before the next adds its own).
const CREDS_ID: &str = "away-migration-tls";
const AUTHZ_ID: &str = "away-migration-authz";

/// The finite-field Diffie-Hellman group ffdhe2048 of RFC 7919 (a published constant,
/// PKCS#3 PEM), given to a server's credentials as `dh-params.pem`. Without the file
/// QEMU 10.0 and earlier generate 2048-bit parameters on every server `object-add`:
/// 0.09-0.77 s measured here, the destination's start's largest and most variable part.
/// TLS 1.3 agrees its keys over the named groups anyway; these serve a TLS 1.2 DHE peer.
const FFDHE2048_PEM: &str = "-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
";

/// The TLS of one end of a VM move: this node's identity, and the node at the other end.
#[derive(Clone)]
pub struct VmTls {
    identity: Arc<Identity>,
    peer: String,
}

impl std::fmt::Debug for VmTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmTls").field("node", &self.identity.name()).field("peer", &self.peer).finish()
    }
}

impl VmTls {
    /// TLS as node `identity`, with node `peer` at the other end (the destination for a
    /// source, the source for a destination).
    pub fn new(identity: Arc<Identity>, peer: &str) -> Result<VmTls, VmMigrateError> {
        away_identity::check_node_name(peer)
            .map_err(|e| VmMigrateError::Invalid { field: "peer node".into(), reason: away_model::error_chain(&e) })?;
        Ok(VmTls { identity, peer: peer.to_string() })
    }

    /// TLS with the identity of mutual TLS `channels`; None for plaintext channels.
    pub fn from_channels(channels: &crate::channel::Channels, peer: &str) -> Result<Option<VmTls>, VmMigrateError> {
        channels.identity().map(|id| VmTls::new(id.clone(), peer)).transpose()
    }

    /// The node at the other end.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The name the peer's server certificate carries (`<peer>.node.away`), what a
    /// client checks it against.
    pub(super) fn peer_server_name(&self) -> Result<String, VmMigrateError> {
        away_identity::server_name(&self.peer)
            .map(|n| n.to_str().to_string())
            .map_err(|e| VmMigrateError::Invalid { field: "peer node".into(), reason: away_model::error_chain(&e) })
    }

    /// The distinguished name QEMU reads from the peer's certificate (GnuTLS's form).
    fn peer_dn(&self) -> String {
        format!("CN={}", self.peer)
    }
}

/// Set (or clear) the TLS of `side`'s QEMU behind `q` for the next migration: with
/// `tls`, its credentials (written under `dir` for the moment QEMU reads them), and on
/// the destination the peer check; without, `tls-creds` "" (plain TCP), so nothing of an
/// earlier move carries over.
pub(super) async fn apply(
    q: &mut Qmp,
    workload: &str,
    side: Side,
    dir: &Path,
    tls: Option<&VmTls>,
) -> Result<(), VmMigrateError> {
    let qmp_err = |command: &str, source| VmMigrateError::Qmp {
        workload: workload.into(),
        side,
        command: command.into(),
        source,
    };
    // an earlier move's objects (a source that stayed after a failed move): the
    // parameters let go of them first, then they go (absent ones: nothing to do)
    let off = MigrateSetParameters {
        tls_creds: Some(String::new()),
        tls_hostname: Some(String::new()),
        tls_authz: Some(String::new()),
        ..Default::default()
    };
    q.execute(&off).await.map_err(|e| qmp_err(MigrateSetParameters::NAME, e))?;
    for id in [CREDS_ID, AUTHZ_ID] {
        let _ = q.execute(&ObjectDel { id: id.into() }).await;
    }
    let Some(tls) = tls else { return Ok(()) };

    add_credentials(q, workload, side, dir, tls, CREDS_ID).await?;
    let params = match side {
        Side::Source => MigrateSetParameters {
            tls_creds: Some(CREDS_ID.into()),
            tls_hostname: Some(tls.peer_server_name()?),
            ..Default::default()
        },
        Side::Destination => {
            add_peer_check(q, workload, side, tls, AUTHZ_ID).await?;
            MigrateSetParameters {
                tls_creds: Some(CREDS_ID.into()),
                tls_authz: Some(AUTHZ_ID.into()),
                ..Default::default()
            }
        }
    };
    q.execute(&params).await.map_err(|e| qmp_err(MigrateSetParameters::NAME, e))?;
    Ok(())
}

/// Add `side`'s `tls-creds-x509` object `id` (the client's on a source, the server's on
/// a destination) from `tls`'s identity; its files exist only while QEMU reads them
/// (written under `dir`). Shared by the migration stream and the disk's NBD connection.
pub(super) async fn add_credentials(
    q: &mut Qmp,
    workload: &str,
    side: Side,
    dir: &Path,
    tls: &VmTls,
    id: &str,
) -> Result<(), VmMigrateError> {
    let endpoint = match side {
        Side::Source => TlsEndpoint::Client,
        Side::Destination => TlsEndpoint::Server,
    };
    let creds = write_credentials(&tls.identity, endpoint, dir)
        .map_err(|e| VmMigrateError::Tls { workload: workload.into(), reason: e })?;
    let add =
        ObjectAdd::TlsCredsX509 { id: id.into(), dir: creds.path().display().to_string(), endpoint, verify_peer: true };
    let added = q.execute(&add).await;
    // QEMU has read the files (or failed to): the key leaves the disk now
    drop(creds);
    added.map(|_| ()).map_err(|e| VmMigrateError::Qmp {
        workload: workload.into(),
        side,
        command: ObjectAdd::NAME.into(),
        source: e,
    })
}

/// Add the `authz-simple` object `id` that lets in only `tls`'s peer node (its `CN`).
pub(super) async fn add_peer_check(
    q: &mut Qmp,
    workload: &str,
    side: Side,
    tls: &VmTls,
    id: &str,
) -> Result<(), VmMigrateError> {
    let authz = ObjectAdd::AuthzSimple { id: id.into(), identity: tls.peer_dn() };
    q.execute(&authz).await.map(|_| ()).map_err(|e| VmMigrateError::Qmp {
        workload: workload.into(),
        side,
        command: ObjectAdd::NAME.into(),
        source: e,
    })
}

/// QEMU's credentials directory for `endpoint`: `ca-cert.pem`, the CA's revocation list
/// as `ca-crl.pem` when the node holds one (QEMU's x509 credentials then refuse the
/// certificates it lists), the node's certificate and key as `server-*` or `client-*`,
/// and a server's `dh-params.pem` ([`FFDHE2048_PEM`]); 0700, the files 0600, removed
/// when the returned directory is dropped.
fn write_credentials(identity: &Identity, endpoint: TlsEndpoint, dir: &Path) -> Result<tempfile::TempDir, String> {
    // a random name, created 0700 (not umask's mode, not even for a moment)
    let creds = tempfile::Builder::new()
        .prefix(".tls-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(dir)
        .map_err(|e| format!("cannot make a credentials directory in {}: {e}", dir.display()))?;
    let prefix = match endpoint {
        TlsEndpoint::Server => "server",
        TlsEndpoint::Client => "client",
    };
    let mut files = vec![
        ("ca-cert.pem".to_string(), identity.ca_pem()),
        (format!("{prefix}-cert.pem"), identity.cert_pem()),
        (format!("{prefix}-key.pem"), identity.key_pem()),
    ];
    if let Some(crl) = identity.revocations().pem() {
        files.push(("ca-crl.pem".to_string(), crl));
    }
    if endpoint == TlsEndpoint::Server {
        files.push(("dh-params.pem".to_string(), FFDHE2048_PEM.to_string()));
    }
    for (name, text) in files {
        let path = creds.path().join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(creds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_private_and_gone_after_use() {
        let dir = tempfile::tempdir().unwrap();
        let ca = away_identity::Ca::load_or_create(&dir.path().join("ca")).unwrap();
        let id = ca.issue_self("cloud", &[]).unwrap();
        let creds = write_credentials(&id, TlsEndpoint::Server, dir.path()).unwrap();
        let path = creds.path().to_path_buf();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o700);
        let mut names: Vec<String> =
            std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["ca-cert.pem", "dh-params.pem", "server-cert.pem", "server-key.pem"]);
        for n in &names {
            assert_eq!(std::fs::metadata(path.join(n)).unwrap().permissions().mode() & 0o777, 0o600, "{n}");
        }
        assert_eq!(std::fs::read_to_string(path.join("server-key.pem")).unwrap(), id.key_pem());
        drop(creds);
        assert!(!path.exists());
        let client = write_credentials(&id, TlsEndpoint::Client, dir.path()).unwrap();
        assert!(client.path().join("client-key.pem").is_file() && !client.path().join("server-key.pem").exists());
        assert!(!client.path().join("ca-crl.pem").exists());
        // with a revocation list, QEMU gets it too
        let crl = ca.crl_pem(1, &[]).unwrap();
        id.revocations().set_from_ca(&crl).unwrap();
        let client = write_credentials(&id, TlsEndpoint::Client, dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(client.path().join("ca-crl.pem")).unwrap(), crl);
    }

    #[test]
    fn the_peer_is_a_node_name() {
        let dir = tempfile::tempdir().unwrap();
        let ca = away_identity::Ca::load_or_create(&dir.path().join("ca")).unwrap();
        let id = Arc::new(ca.issue_self("cloud", &[]).unwrap());
        let tls = VmTls::new(id.clone(), "laptop").unwrap();
        assert_eq!(tls.peer_dn(), "CN=laptop");
        assert!(VmTls::new(id, "CN=x,O=y").unwrap_err().to_string().contains("peer node"));
    }
}
