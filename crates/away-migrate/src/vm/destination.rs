//! The destination end: a QEMU started with the source's command line and
//! `-incoming defer`, configured over QMP and listening for the stream.

use std::time::{Duration, Instant, SystemTime};

use away_model::{error_chain, WorkloadSpec};
use away_runtime::qemu::qmp::commands::{
    Command, MigrateIncoming, MigrateSetCapabilities, MigrateSetParameters, MigrationStatus, QmpCapabilities,
    QueryMigrate,
};
use away_runtime::qemu::{QemuRuntime, Qmp, QmpError, VmFiles};
use away_runtime::{ResolvedImage, Runtime, RuntimeError};

use super::{log_tail, Side, VmMigrateError, VmMigrationOptions, QMP_TIMEOUT};

/// A destination QEMU waiting for (or having received) the VM. Call [`Destination::confirm`]
/// once it runs, or [`Destination::abort`]; dropping it leaves the QEMU as it is.
pub struct Destination {
    runtime: QemuRuntime,
    name: String,
    files: VmFiles,
    listen: String,
    qmp: Option<Qmp>,
}

impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Destination")
            .field("name", &self.name)
            .field("dir", &self.files.dir)
            .field("listen", &self.listen)
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

    /// Wait until the destination runs the VM; Ok(the time of its `RESUME` event).
    /// An incoming migration that fails makes QEMU exit: that is reported with the tail
    /// of its log.
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
            if state == "running" {
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
/// must match the source's set. On failure nothing is left behind.
pub async fn prepare_destination(
    target: &QemuRuntime,
    spec: &WorkloadSpec,
    image: &ResolvedImage,
    listen_port: u16,
    opts: &VmMigrationOptions,
) -> Result<Destination, VmMigrateError> {
    opts.validate()?;
    let name = spec.name.clone();
    let (files, _record) = target
        .start_incoming(spec, image, "defer", None)
        .await
        .map_err(|source| VmMigrateError::Runtime { workload: name.clone(), op: "start the destination vm", source })?;
    let listen = format!("tcp:{}:{listen_port}", opts.listen_host);
    let mut dest = Destination { runtime: target.clone(), name: name.clone(), files, listen, qmp: None };
    let configured = async {
        let socket = dest.files.qmp_socket();
        let mut q = Qmp::connect(&socket, QMP_TIMEOUT).await.map_err(|e| dest.qmp_err(QmpCapabilities::NAME, e))?;
        let caps = opts.destination_capabilities();
        q.execute(&caps).await.map_err(|e| dest.qmp_err(MigrateSetCapabilities::NAME, e))?;
        let params = opts.destination_parameters();
        if !params.is_empty() {
            q.execute(&params).await.map_err(|e| dest.qmp_err(MigrateSetParameters::NAME, e))?;
        }
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

/// The destination side of a VM move, on this host ([`LocalVmTarget`]) or behind another
/// node's agent.
#[async_trait::async_trait]
pub trait VmTarget: Send {
    /// Where the destination is, for reports.
    fn describe(&self) -> String;
    /// Start the destination QEMU for `spec` (ports already remapped); returns the URI
    /// the source migrates to.
    async fn prepare(
        &mut self,
        spec: &WorkloadSpec,
        image: &ResolvedImage,
        opts: &VmMigrationOptions,
    ) -> Result<String, VmMigrateError>;
    /// Wait for the destination's RESUME event; its QEMU timestamp.
    async fn wait_resumed(&mut self, limit: Duration) -> Result<SystemTime, VmMigrateError>;
    /// The destination runs: keep it. Returns where it lives.
    async fn confirm(&mut self) -> Result<String, VmMigrateError>;
    /// Remove the destination.
    async fn abort(&mut self) -> Result<(), VmMigrateError>;
}

/// A destination QEMU on this host.
pub struct LocalVmTarget {
    pub runtime: QemuRuntime,
    /// TCP port the destination listens on.
    pub port: u16,
    pub dest: Option<Destination>,
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
    ) -> Result<String, VmMigrateError> {
        let dest = prepare_destination(&self.runtime, spec, image, self.port, opts).await?;
        self.dest = Some(dest);
        Ok(format!("tcp:{}:{}", opts.target_host, self.port))
    }

    async fn wait_resumed(&mut self, limit: Duration) -> Result<SystemTime, VmMigrateError> {
        match self.dest.as_mut() {
            Some(d) => d.wait_resumed(limit).await,
            None => Err(VmMigrateError::Invalid { field: "destination".into(), reason: "not prepared".into() }),
        }
    }

    async fn confirm(&mut self) -> Result<String, VmMigrateError> {
        Ok(self.dest.take().map(|d| d.confirm().dir.display().to_string()).unwrap_or_default())
    }

    async fn abort(&mut self) -> Result<(), VmMigrateError> {
        match self.dest.take() {
            Some(d) => d.abort().await,
            None => Ok(()),
        }
    }
}
