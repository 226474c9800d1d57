//! The destination end: a QEMU started with the source's command line and
//! `-incoming defer`, configured over QMP and listening for the stream.

use std::time::{Duration, Instant, SystemTime};

use away_model::{error_chain, WorkloadSpec};
use away_runtime::qemu::qmp::commands::{
    AnnounceSelf, Command, Cont, MigrateIncoming, MigrateSetCapabilities, MigrateSetParameters, MigrationStatus,
    QmpCapabilities, QueryMigrate,
};
use away_runtime::qemu::{BaseImage, QemuRuntime, Qmp, QmpError, VmFiles};
use away_runtime::{ResolvedImage, Runtime, RuntimeError};

use super::{log_tail, Side, VmMigrateError, VmMigrationOptions, QMP_TIMEOUT};

/// A destination QEMU waiting for (or having received) the VM. Call [`Destination::confirm`]
/// once it runs, or [`Destination::abort`]; dropping it leaves the QEMU as it is.
///
/// A *held* destination (every pre-copy move; started with `-S`) stays paused after the
/// incoming migration: the guest runs nowhere until its source commits the move, and
/// [`Destination::release`] starts it. A post-copy move is not held: its guest must run
/// on the destination from the switchover on (its pages are fetched as it faults).
pub struct Destination {
    runtime: QemuRuntime,
    name: String,
    files: VmFiles,
    listen: String,
    qmp: Option<Qmp>,
    held: bool,
    /// When [`Destination::wait_resumed`] first found the held guest complete (a lease
    /// counts from here: never later than the source hears it).
    ready_at: Option<Instant>,
    /// The port the VM's disk overlay is exported on over NBD, while it is.
    disk_port: Option<u16>,
}

impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Destination")
            .field("name", &self.name)
            .field("dir", &self.files.dir)
            .field("listen", &self.listen)
            .field("held", &self.held)
            .finish()
    }
}

impl Destination {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn files(&self) -> &VmFiles {
        &self.files
    }

    /// The URI the destination listens on (`tcp:HOST:PORT`).
    pub fn listen_uri(&self) -> &str {
        &self.listen
    }

    fn qmp_err(&self, command: &str, source: QmpError) -> VmMigrateError {
        VmMigrateError::Qmp { workload: self.name.clone(), side: Side::Destination, command: command.into(), source }
    }

    /// The port this destination exports its disk on (NBD), while it does.
    pub fn disk_port(&self) -> Option<u16> {
        self.disk_port
    }

    /// Whether the guest is held paused for its source's commit (not released yet).
    pub fn held(&self) -> bool {
        self.held
    }

    /// When the held guest was first found complete (None: not yet, or not held).
    pub fn ready_at(&self) -> Option<Instant> {
        self.ready_at
    }

    /// Wait until the destination has the whole VM: for a held destination, the incoming
    /// migration completed and the guest paused (Ok(now)); otherwise the guest runs
    /// (Ok(the time of its `RESUME` event)). An incoming migration that fails makes QEMU
    /// exit: that is reported with the tail of its log.
    pub async fn wait_resumed(&mut self, limit: Duration) -> Result<SystemTime, VmMigrateError> {
        let deadline = Instant::now() + limit;
        let not_resumed = |name: &str, reason: String| VmMigrateError::NotResumed { workload: name.into(), reason };
        let mut resumed_at = None;
        loop {
            let Some(q) = self.qmp.as_mut() else {
                return Err(not_resumed(&self.name, "the destination's qmp session is closed".into()));
            };
            let state = match q.run_state().await {
                Ok(s) => s,
                Err(e) => {
                    let log = log_tail(&self.files.qemu_log());
                    return Err(not_resumed(&self.name, format!("query-status: {}; qemu log: {log}", error_chain(&e))));
                }
            };
            for ev in q.take_events() {
                if ev.name == "RESUME" && resumed_at.is_none() {
                    resumed_at = Some(ev.at);
                }
            }
            if self.held && state == "paused" {
                // -S: "paused" comes only after the incoming migration completed
                if let Ok(info) = q.execute(&QueryMigrate).await {
                    if info.status == MigrationStatus::Completed {
                        self.ready_at.get_or_insert_with(Instant::now);
                        return Ok(SystemTime::now());
                    }
                }
            }
            if state == "running" {
                if self.disk_port.is_some() {
                    // post-copy: the guest runs here since the switchover, after the
                    // source completed the mirror; nothing but the guest writes now
                    super::disk::unexport(q, &self.name).await?;
                    self.disk_port = None;
                }
                return Ok(resumed_at.unwrap_or_else(|| {
                    tracing::warn!(workload = %self.name, "destination runs but sent no RESUME event; using now");
                    SystemTime::now()
                }));
            }
            if let Ok(info) = q.execute(&QueryMigrate).await {
                if info.status == MigrationStatus::Failed {
                    return Err(not_resumed(
                        &self.name,
                        format!("incoming migration failed: {}", info.error_desc.unwrap_or_default()),
                    ));
                }
            }
            if Instant::now() >= deadline {
                return Err(not_resumed(&self.name, format!("still {state} after {} s", limit.as_secs())));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Start a held guest (`cont`): its source committed the move. Ok(the time of its
    /// `RESUME` event); a destination not held runs already (Ok(None)).
    pub async fn release(&mut self) -> Result<Option<SystemTime>, VmMigrateError> {
        if !self.held {
            return Ok(None);
        }
        let name = self.name.clone();
        let Some(q) = self.qmp.as_mut() else {
            return Err(VmMigrateError::NotResumed { workload: name, reason: "the qmp session is closed".into() });
        };
        let err = |command: &str, source: QmpError| VmMigrateError::Qmp {
            workload: name.clone(),
            side: Side::Destination,
            command: command.into(),
            source,
        };
        q.take_events();
        if self.disk_port.is_some() {
            // the mirror completed before the switchover: nothing may write here but the guest
            super::disk::unexport(q, &name).await?;
            self.disk_port = None;
        }
        q.execute(&Cont).await.map_err(|e| err(Cont::NAME, e))?;
        let deadline = Instant::now() + QMP_TIMEOUT;
        loop {
            let state = q.run_state().await.map_err(|e| err("query-status", e))?;
            let resumed = q.take_events().into_iter().find(|ev| ev.name == "RESUME").map(|ev| ev.at);
            if state == "running" {
                self.held = false;
                // QEMU announced the NIC when the incoming migration completed, while the
                // guest was held; again now that it runs (a lab network's switches learn
                // its MAC here, docs/network.md). Best effort: the guest's traffic does too.
                if let Err(e) = q.execute(&AnnounceSelf::default()).await {
                    tracing::warn!(workload = %name, "announce-self: {}", error_chain(&e));
                }
                return Ok(Some(resumed.unwrap_or_else(SystemTime::now)));
            }
            if Instant::now() >= deadline {
                return Err(VmMigrateError::NotResumed {
                    workload: name,
                    reason: format!("still {state} {} s after cont", QMP_TIMEOUT.as_secs()),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The VM runs here now: release the QMP session (so others may talk to QEMU).
    pub fn confirm(mut self) -> VmFiles {
        self.qmp = None;
        self.files.clone()
    }

    /// Kill the destination QEMU and remove its state directory.
    pub async fn abort(mut self) -> Result<(), VmMigrateError> {
        // QEMU serves one QMP client at a time: ours must go before `remove` talks to it.
        self.qmp = None;
        match self.runtime.remove(&self.name).await {
            Ok(()) | Err(RuntimeError::NotFound { .. }) => Ok(()),
            Err(source) => {
                Err(VmMigrateError::Runtime { workload: self.name.clone(), op: "remove the destination vm", source })
            }
        }
    }
}

/// Start the destination of `spec` on `target`: QEMU with the source's command line
/// (so `image` must be the source's image, and `spec` its spec apart from host ports),
/// waiting for the stream on `listen_host:listen_port`, with the capabilities that
/// must match the source's set. With `tls` the port takes only a TLS client with the
/// certificate of `tls`'s peer node (the source); without, plain TCP from anyone. On
/// failure nothing is left behind.
pub async fn prepare_destination(
    target: &QemuRuntime,
    spec: &WorkloadSpec,
    image: &ResolvedImage,
    listen_port: u16,
    opts: &VmMigrationOptions,
    tls: Option<&super::VmTls>,
) -> Result<Destination, VmMigrateError> {
    opts.validate()?;
    let name = spec.name.clone();
    // held for the commit unless post-copy: that guest must run here from the switchover
    let held = !opts.postcopy;
    let (files, _record) = target
        .start_incoming_as(spec, image, "defer", None, held)
        .await
        .map_err(|source| VmMigrateError::Runtime { workload: name.clone(), op: "start the destination vm", source })?;
    let listen = format!("tcp:{}:{listen_port}", opts.listen_host);
    let mut dest = Destination {
        runtime: target.clone(),
        name: name.clone(),
        files,
        listen,
        qmp: None,
        held,
        ready_at: None,
        disk_port: None,
    };
    let configured = async {
        let socket = dest.files.qmp_socket();
        let mut q = Qmp::connect(&socket, QMP_TIMEOUT).await.map_err(|e| dest.qmp_err(QmpCapabilities::NAME, e))?;
        let caps = opts.destination_capabilities();
        q.execute(&caps).await.map_err(|e| dest.qmp_err(MigrateSetCapabilities::NAME, e))?;
        let params = opts.destination_parameters();
        if !params.is_empty() {
            q.execute(&params).await.map_err(|e| dest.qmp_err(MigrateSetParameters::NAME, e))?;
        }
        super::tls::apply(&mut q, &dest.name, Side::Destination, &dest.files.dir, tls).await?;
        let incoming = MigrateIncoming { uri: dest.listen.clone() };
        q.execute(&incoming).await.map_err(|e| dest.qmp_err(MigrateIncoming::NAME, e))?;
        // migrate-incoming reports a failed bind only in the migration status.
        let info = q.execute(&QueryMigrate).await.map_err(|e| dest.qmp_err(QueryMigrate::NAME, e))?;
        if info.status == MigrationStatus::Failed {
            return Err(VmMigrateError::Failed {
                workload: dest.name.clone(),
                status: info.status.to_string(),
                reason: format!("listen on {}: {}", dest.listen, info.error_desc.unwrap_or_default()),
            });
        }
        if spec.disk.is_some() {
            let port = disk_port(opts, listen_port);
            // the export has the stream's TLS: only the source node connects
            super::disk::export(&mut q, &dest.name, &dest.files.dir, &opts.listen_host, port, tls).await?;
            dest.disk_port = Some(port);
        }
        q.take_events();
        Ok(q)
    }
    .await;
    match configured {
        Ok(q) => {
            dest.qmp = Some(q);
            tracing::info!(workload = %name, dir = %dest.files.dir.display(), "migration destination listening on {}", dest.listen);
            Ok(dest)
        }
        Err(e) => {
            if let Err(cleanup) = dest.abort().await {
                tracing::warn!(workload = %name, "cannot remove the failed destination: {}", error_chain(&cleanup));
            }
            Err(e)
        }
    }
}

/// The port a destination migrating on `listen_port` exports a disk on.
fn disk_port(opts: &VmMigrationOptions, listen_port: u16) -> u16 {
    match opts.disk_port {
        0 => listen_port.wrapping_add(1),
        p => p,
    }
}

/// The destination side of a VM move, on this host ([`LocalVmTarget`]) or behind another
/// node's agent.
#[async_trait::async_trait]
pub trait VmTarget: Send {
    /// Where the destination is, for reports.
    fn describe(&self) -> String;
    /// Start the destination QEMU for `spec` (ports already remapped); returns where
    /// the source migrates to.
    async fn prepare(
        &mut self,
        spec: &WorkloadSpec,
        image: &ResolvedImage,
        opts: &VmMigrationOptions,
    ) -> Result<VmListen, VmMigrateError>;
    /// Wait until the destination has the whole VM (held paused for the commit, or
    /// running: then its RESUME event's QEMU timestamp).
    async fn wait_resumed(&mut self, limit: Duration) -> Result<SystemTime, VmMigrateError>;
    /// Commit the move: the destination keeps (and runs) the VM. The one answer of the
    /// commit protocol (docs/reliability.md): committed, aborted (the destination is
    /// gone: resume the source), or in doubt (neither).
    async fn confirm(&mut self) -> VmCommit;
    /// Remove the destination.
    async fn abort(&mut self) -> Result<(), VmMigrateError>;
    /// Make sure the target node has the base image of the VM's disk, copying it when
    /// missing (checked by digest). Ok(true): it was copied. A target that cannot take
    /// a disk says so (the move is refused before anything starts).
    async fn ensure_base(&mut self, base: &BaseImage) -> Result<bool, VmMigrateError> {
        Err(VmMigrateError::Invalid {
            field: "disk".into(),
            reason: format!(
                "{} cannot take a vm disk (base {}): moving a vm with a disk between agents is not implemented yet",
                self.describe(),
                base.digest
            ),
        })
    }
    /// Where the prepared destination exports the VM's disk over NBD (host, port).
    fn disk_export(&self, _opts: &VmMigrationOptions) -> Option<(String, u16)> {
        None
    }
}

/// Where a prepared destination takes the stream ([`VmTarget::prepare`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmListen {
    /// `tcp:HOST:PORT`.
    pub uri: String,
    /// Over QEMU's TLS (the source must come with its node certificate), or plain TCP.
    pub tls: bool,
}

/// A VM move's one answer ([`VmTarget::confirm`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmCommit {
    /// The destination runs the VM (`placed`: where); `resumed_at`: its RESUME event
    /// when the commit started it (None: it ran already, or the answer was asked again).
    Committed { placed: String, resumed_at: Option<SystemTime> },
    /// The destination is gone: the source's VM is the workload (why).
    Aborted(String),
    /// No definite answer: the source must neither resume nor remove its VM (why).
    InDoubt(String),
}

/// A destination QEMU on this host.
pub struct LocalVmTarget {
    pub runtime: QemuRuntime,
    /// TCP port the destination listens on.
    pub port: u16,
    pub dest: Option<Destination>,
    /// The destination's TLS (its peer: the source's node); None: plain TCP.
    pub tls: Option<super::VmTls>,
}

#[async_trait::async_trait]
impl VmTarget for LocalVmTarget {
    fn describe(&self) -> String {
        format!("qemu {}", self.runtime.state_dir().display())
    }

    async fn prepare(
        &mut self,
        spec: &WorkloadSpec,
        image: &ResolvedImage,
        opts: &VmMigrationOptions,
    ) -> Result<VmListen, VmMigrateError> {
        let dest = prepare_destination(&self.runtime, spec, image, self.port, opts, self.tls.as_ref()).await?;
        self.dest = Some(dest);
        Ok(VmListen { uri: format!("tcp:{}:{}", opts.target_host, self.port), tls: self.tls.is_some() })
    }

    async fn wait_resumed(&mut self, limit: Duration) -> Result<SystemTime, VmMigrateError> {
        match self.dest.as_mut() {
            Some(d) => d.wait_resumed(limit).await,
            None => Err(VmMigrateError::Invalid { field: "destination".into(), reason: "not prepared".into() }),
        }
    }

    async fn confirm(&mut self) -> VmCommit {
        let Some(mut d) = self.dest.take() else {
            return VmCommit::Aborted("no destination prepared".into());
        };
        match d.release().await {
            Ok(resumed_at) => VmCommit::Committed { placed: d.confirm().dir.display().to_string(), resumed_at },
            Err(e) => {
                let why = format!("the destination would not start: {}", error_chain(&e));
                if let Err(cleanup) = d.abort().await {
                    // not gone: the source must not run beside it
                    return VmCommit::InDoubt(format!("{why}; cannot remove it: {}", error_chain(&cleanup)));
                }
                VmCommit::Aborted(why)
            }
        }
    }

    async fn abort(&mut self) -> Result<(), VmMigrateError> {
        match self.dest.take() {
            Some(d) => d.abort().await,
            None => Ok(()),
        }
    }

    async fn ensure_base(&mut self, base: &BaseImage) -> Result<bool, VmMigrateError> {
        copy_base(&self.runtime, base)
    }

    fn disk_export(&self, opts: &VmMigrationOptions) -> Option<(String, u16)> {
        let port = self.dest.as_ref()?.disk_port()?;
        Some((opts.target_host.clone(), port))
    }
}

/// Put `base` (a file of this host) into `target`'s disk store unless it is there;
/// the copy is hashed on the way and must have the same digest. Ok(true): copied.
pub fn copy_base(target: &QemuRuntime, base: &BaseImage) -> Result<bool, VmMigrateError> {
    let store = target.disk_store();
    if store.contains(&base.digest) {
        return Ok(false);
    }
    // hashed on the way in: a file that changed is not stored under the digest
    store.import_expecting(&base.path, &base.digest).map_err(|source| VmMigrateError::Runtime {
        workload: String::new(),
        op: "copy the disk's base image",
        source,
    })?;
    tracing::info!("disk base {} copied to {}", base.digest, store.dir.display());
    Ok(true)
}
