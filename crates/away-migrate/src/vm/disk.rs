//! The disk of a VM move, without shared storage (docs/vm.md), as libvirt's
//! copy-storage does it:
//!
//! 1. the destination QEMU starts on an empty overlay over the same base image (the
//!    base copied to its node first when missing, checked by digest), and exports that
//!    overlay writable over NBD (`nbd-server-start` + `block-export-add`; exporting an
//!    incoming VM's node activates it);
//! 2. the source adds an `nbd` block node on that export and mirrors its overlay onto it
//!    (`blockdev-mirror`, `sync: top`: only the overlay's allocated clusters, not the
//!    base) until the job is ready (in sync; QEMU keeps it so while the guest writes);
//! 3. RAM migrates with `pause-before-switchover`: once the source is paused for the
//!    last RAM copy (or for post-copy's switch), the migration waits in `pre-switchover`; the mirror is completed
//!    there (`block-job-cancel` of a ready mirror leaves the target in sync with the
//!    paused source and the source on its own disk), the nbd node removed, and only then
//!    `migrate-continue` lets the destination take over;
//! 4. the destination stops exporting before its guest runs (held: before the commit
//!    starts it; post-copy: as soon as it sees it run, the mirror being complete).
//!
//! A failure anywhere before the switchover leaves the source running on its own disk:
//! the mirror is cancelled (forced), its nbd node removed, and the destination, with
//! its overlay and export, removed with its state directory.
//!
//! With the move's [`super::VmTls`] (the nodes' identities, the same the migration
//! stream uses) both NBD ends speak TLS: x509 from the broker's CA, `verify-peer` and an
//! `authz-simple` of the source node's `CN` on the server, the server's name
//! (`<target>.node.away`) checked by the client. Without identities the export listens
//! only on a loopback address.

use std::path::Path;
use std::time::{Duration, Instant};

use away_model::error_chain;
use away_runtime::qemu::qmp::block::{
    BlockExportAddNbd, BlockExportDel, BlockJobCancel, BlockJobChange, BlockdevAddNbd, BlockdevDel, BlockdevMirror,
    Inet, InetAddress, LegacyAddress, NbdServerStart, NbdServerStop, QueryBlockJobs,
};
use away_runtime::qemu::qmp::commands::{Command, ObjectDel};
use away_runtime::qemu::{QemuRuntime, Qmp, QmpError, DISK_NODE};

use super::{Side, VmMigrateError, VmTls, QMP_TIMEOUT};

/// The destination's export of its overlay (id and NBD export name).
const EXPORT_ID: &str = "away-mig-disk";
/// The source's NBD client node and its mirror job.
const NBD_NODE: &str = "away-mig-nbd";
const MIRROR_JOB: &str = "away-mig-disk";
/// The TLS credentials object on either end, and the export's client check.
const TLS_ID: &str = "away-disk-tls";
const AUTHZ_ID: &str = "away-disk-authz";

/// What the mirror did (for the report).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiskMirror {
    /// Bytes the mirror copied until it was ready.
    pub ready_bytes: u64,
    pub ready_after: Duration,
    /// Bytes it had copied when completed at the switchover.
    pub total_bytes: u64,
    /// When background copying had not caught up the guest's writes after
    /// [`ACTIVE_AFTER`], the mirror switched to write-blocking then.
    pub active_after: Option<Duration>,
}

/// A mirror not in sync after this long copies actively from then on (every guest write
/// waits for the target: slower writes, but it converges), as auto-converge does for
/// RAM. A disk that is written faster than the link carries would otherwise never get
/// in sync (the lab's vm-disk path over the WAN at 1 MiB/s stayed 0.4 MB behind for
/// 174 s).
pub const ACTIVE_AFTER: Duration = Duration::from_secs(10);

/// How the mirror job ended, by its end event on `q`'s session: Ok (completed: the
/// target has everything up to the end), Err(why) (failed, with QEMU's error, e.g. the
/// target's "No space left on device", or cancelled); None: no end event seen. The
/// other events stay in the session's buffer (the source's STOP among them).
fn mirror_end(q: &mut Qmp) -> Option<Result<(), String>> {
    let events = q.take_events_named(&["BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR"]);
    let mut end = None;
    let mut error = None;
    for ev in events.iter().filter(|e| e.data["device"] == MIRROR_JOB) {
        match ev.name.as_str() {
            "BLOCK_JOB_ERROR" => {
                error.get_or_insert_with(|| format!("{} error on the {}", ev.data["operation"], ev.data["action"]));
            }
            "BLOCK_JOB_CANCELLED" => end = Some(Err("the mirror was cancelled".to_string())),
            _ => {
                end = Some(match ev.data["error"].as_str() {
                    Some(e) => Err(e.to_string()),
                    None => Ok(()),
                })
            }
        }
    }
    match (end, error) {
        (Some(Err(e)), _) => Some(Err(e)),
        (Some(Ok(())), Some(e)) => Some(Err(e)),
        (end, _) => end,
    }
}

fn qmp_err(name: &str, side: Side, command: &str, source: QmpError) -> VmMigrateError {
    VmMigrateError::Qmp { workload: name.into(), side, command: command.into(), source }
}

/// Remove this module's TLS objects (an earlier move's, or this one's once done; absent
/// ones: nothing to do), so a VM that came with its disk can move on with it.
async fn remove_tls(q: &mut Qmp) {
    for id in [TLS_ID, AUTHZ_ID] {
        let _ = q.execute(&ObjectDel { id: id.into() }).await;
    }
}

/// Destination: serve the overlay (node [`DISK_NODE`]) writable over NBD on
/// `host:port`; with `tls` (this node's identity, its peer the source node) over TLS to
/// the source node only. Without TLS only on a loopback address.
pub(super) async fn export(
    q: &mut Qmp,
    name: &str,
    vm_dir: &Path,
    host: &str,
    port: u16,
    tls: Option<&VmTls>,
) -> Result<(), VmMigrateError> {
    let side = Side::Destination;
    let (tls_creds, tls_authz) = match tls {
        Some(tls) => {
            remove_tls(q).await;
            super::tls::add_credentials(q, name, side, vm_dir, tls, TLS_ID).await?;
            // only the source node's certificate (its CN) may connect
            super::tls::add_peer_check(q, name, side, tls, AUTHZ_ID).await?;
            (Some(TLS_ID.to_string()), Some(AUTHZ_ID.to_string()))
        }
        None if is_loopback(host) => (None, None),
        None => {
            return Err(VmMigrateError::Invalid {
                field: "tls".into(),
                reason: format!(
                    "the disk export would listen on {host} without TLS: only loopback moves go without the nodes' \
                     identities (a move between nodes needs each node's identity, docs/security.md)"
                ),
            })
        }
    };
    let start = NbdServerStart {
        addr: LegacyAddress::Inet(Inet { host: host.into(), port: port.to_string() }),
        tls_creds,
        tls_authz,
        // the source's mirror is the one client
        max_connections: Some(1),
    };
    q.execute(&start).await.map_err(|e| qmp_err(name, side, NbdServerStart::NAME, e))?;
    let add = BlockExportAddNbd {
        kind: "nbd",
        id: EXPORT_ID.into(),
        node_name: DISK_NODE.into(),
        writable: true,
        name: DISK_NODE.into(),
    };
    q.execute(&add).await.map_err(|e| qmp_err(name, side, BlockExportAddNbd::NAME, e))?;
    tracing::info!(workload = name, "disk overlay exported over nbd on {host}:{port}");
    Ok(())
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Destination: stop exporting (the mirror is done; before the guest runs here).
pub(super) async fn unexport(q: &mut Qmp, name: &str) -> Result<(), VmMigrateError> {
    let side = Side::Destination;
    let del = BlockExportDel { id: EXPORT_ID.into() };
    if let Err(e) = q.execute(&del).await {
        tracing::warn!(workload = name, "block-export-del: {}", error_chain(&e));
    }
    q.execute(&NbdServerStop).await.map_err(|e| qmp_err(name, side, NbdServerStop::NAME, e))?;
    remove_tls(q).await;
    Ok(())
}

/// Source: mirror the overlay onto the destination's export at `host:port` until the
/// mirror is ready (or `limit` passes). On failure the mirror is undone (the source
/// runs on as before) and the error returned.
pub async fn start_mirror(
    source: &QemuRuntime,
    name: &str,
    host: &str,
    port: u16,
    tls: Option<&VmTls>,
    speed: Option<u64>,
    limit: Duration,
) -> Result<DiskMirror, VmMigrateError> {
    let files = source.files(name);
    let side = Side::Source;
    let started = Instant::now();
    let mut q = Qmp::connect(&files.qmp_socket(), QMP_TIMEOUT).await.map_err(|e| qmp_err(name, side, "connect", e))?;
    let result = async {
        let (tls_creds, tls_hostname) = match tls {
            Some(tls) => {
                remove_tls(&mut q).await;
                super::tls::add_credentials(&mut q, name, side, &files.dir, tls, TLS_ID).await?;
                (Some(TLS_ID.to_string()), Some(tls.peer_server_name()?))
            }
            None => (None, None),
        };
        let node = BlockdevAddNbd {
            driver: "nbd",
            node_name: NBD_NODE.into(),
            server: InetAddress { kind: "inet", host: host.into(), port: port.to_string() },
            export: DISK_NODE.into(),
            tls_creds,
            tls_hostname,
            open_timeout: 30,
        };
        q.execute(&node).await.map_err(|e| qmp_err(name, side, BlockdevAddNbd::NAME, e))?;
        let mirror = BlockdevMirror {
            job_id: MIRROR_JOB.into(),
            device: DISK_NODE.into(),
            target: NBD_NODE.into(),
            sync: "top",
            copy_mode: "background",
            speed,
        };
        q.execute(&mirror).await.map_err(|e| qmp_err(name, side, BlockdevMirror::NAME, e))?;
        let deadline = Instant::now() + limit;
        let mut active_after = None;
        loop {
            let jobs = q.execute(&QueryBlockJobs).await.map_err(|e| qmp_err(name, side, QueryBlockJobs::NAME, e))?;
            let Some(job) = jobs.into_iter().find(|j| j.device == MIRROR_JOB) else {
                let why = match mirror_end(&mut q) {
                    Some(Err(e)) => format!("on the destination's export: {e}"),
                    _ => "(the destination's export is gone?)".into(),
                };
                return Err(VmMigrateError::Failed {
                    workload: name.into(),
                    status: "disk mirror failed".into(),
                    reason: format!("the mirror job ended before it was in sync {why}"),
                });
            };
            if let Some(e) = job.error.filter(|_| job.status == "concluded" || job.status == "aborting") {
                return Err(VmMigrateError::Failed {
                    workload: name.into(),
                    status: "disk mirror failed".into(),
                    reason: e,
                });
            }
            if job.ready {
                return Ok(DiskMirror {
                    ready_bytes: job.offset,
                    ready_after: started.elapsed(),
                    total_bytes: 0,
                    active_after,
                });
            }
            if active_after.is_none() && started.elapsed() >= ACTIVE_AFTER {
                let change = BlockJobChange { id: MIRROR_JOB.into(), kind: "mirror", copy_mode: "write-blocking" };
                q.execute(&change).await.map_err(|e| qmp_err(name, side, BlockJobChange::NAME, e))?;
                active_after = Some(started.elapsed());
                tracing::info!(
                    workload = name,
                    "disk mirror not in sync after {} s ({} of {} bytes): copying actively (write-blocking)",
                    ACTIVE_AFTER.as_secs(),
                    job.offset,
                    job.len
                );
            }
            if Instant::now() >= deadline {
                return Err(VmMigrateError::Failed {
                    workload: name.into(),
                    status: "disk mirror timed out".into(),
                    reason: format!("not in sync after {} s ({} of {} bytes)", limit.as_secs(), job.offset, job.len),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    .await;
    match result {
        Ok(m) => {
            tracing::info!(
                workload = name,
                "disk mirror in sync after {} ms, {} bytes copied",
                m.ready_after.as_millis(),
                m.ready_bytes
            );
            Ok(m)
        }
        Err(e) => {
            undo_mirror(&mut q, name).await;
            Err(e)
        }
    }
}

/// Source, in `pre-switchover` (the guest paused): complete the ready mirror, so the
/// destination's overlay equals the source's, and remove the nbd node. Ok(bytes the
/// mirror copied in all).
pub(super) async fn complete_mirror(q: &mut Qmp, name: &str) -> Result<u64, VmMigrateError> {
    let side = Side::Source;
    let jobs = q.execute(&QueryBlockJobs).await.map_err(|e| qmp_err(name, side, QueryBlockJobs::NAME, e))?;
    let job = jobs.into_iter().find(|j| j.device == MIRROR_JOB).filter(|j| j.ready).ok_or_else(|| {
        VmMigrateError::Failed {
            workload: name.into(),
            status: "disk mirror lost".into(),
            reason: "at the switchover the disk mirror was gone or not in sync".into(),
        }
    })?;
    let total = job.offset;
    q.execute(&BlockJobCancel { device: MIRROR_JOB.into(), force: false })
        .await
        .map_err(|e| qmp_err(name, side, BlockJobCancel::NAME, e))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut total = total;
    loop {
        let jobs = q.execute(&QueryBlockJobs).await.map_err(|e| qmp_err(name, side, QueryBlockJobs::NAME, e))?;
        match jobs.into_iter().find(|j| j.device == MIRROR_JOB) {
            // gone: its end event says whether the last writes reached the target
            None => match mirror_end(q) {
                Some(Ok(())) => break,
                Some(Err(e)) => {
                    return Err(VmMigrateError::Failed {
                        workload: name.into(),
                        status: "disk mirror failed".into(),
                        reason: format!("completing the mirror: {e}"),
                    })
                }
                None => {
                    return Err(VmMigrateError::Failed {
                        workload: name.into(),
                        status: "disk mirror lost".into(),
                        reason: "the mirror ended without its completion event: the target may lack the last writes"
                            .into(),
                    })
                }
            },
            Some(j) if j.error.is_some() => {
                return Err(VmMigrateError::Failed {
                    workload: name.into(),
                    status: "disk mirror failed".into(),
                    reason: format!("completing the mirror: {}", j.error.unwrap_or_default()),
                })
            }
            Some(j) => total = j.offset,
        }
        if Instant::now() >= deadline {
            return Err(VmMigrateError::Failed {
                workload: name.into(),
                status: "disk mirror stuck".into(),
                reason: "the mirror did not complete within 30 s of block-job-cancel".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    q.execute(&BlockdevDel { node_name: NBD_NODE.into() })
        .await
        .map_err(|e| qmp_err(name, side, BlockdevDel::NAME, e))?;
    remove_tls(q).await;
    Ok(total)
}

/// Source: cancel the mirror at once (the move failed) and remove its nbd node; the
/// guest keeps running on its own disk. Best effort: what fails is logged.
pub async fn abort_mirror(source: &QemuRuntime, name: &str) {
    match Qmp::connect(&source.files(name).qmp_socket(), QMP_TIMEOUT).await {
        Ok(mut q) => undo_mirror(&mut q, name).await,
        Err(e) => tracing::warn!(workload = name, "cannot undo the disk mirror: {}", error_chain(&e)),
    }
}

async fn undo_mirror(q: &mut Qmp, name: &str) {
    let _ = q.execute(&BlockJobCancel { device: MIRROR_JOB.into(), force: true }).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Ok(jobs) = q.execute(&QueryBlockJobs).await {
        if !jobs.iter().any(|j| j.device == MIRROR_JOB) || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Err(e) = q.execute(&BlockdevDel { node_name: NBD_NODE.into() }).await {
        // none was added, or it is still busy: nothing of it touches the guest's disk
        tracing::debug!(workload = name, "blockdev-del {NBD_NODE}: {}", error_chain(&e));
    }
    remove_tls(q).await;
}
