//! The runtimes of one node behind one door: which runtime a workload gets (the
//! fallback rule), and finding a workload by name whichever runtime holds it. The CLI
//! uses it for local work; the agent uses it for the broker's.

use std::path::PathBuf;
use std::time::Duration;

use away_model::{error_chain, Arch, RuntimeDecision, RuntimeInfo, RuntimeKind, WorkloadSpec, WorkloadStatus};

use crate::containerd::ContainerdRuntime;
use crate::docker::DockerRuntime;
use crate::host::HostPaths;
use crate::qemu::QemuRuntime;
use crate::runtime::{RunRequest, Runtime, RuntimeError};
use crate::store::ImageStore;

/// Where a node keeps its daemons' sockets and its own state.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub paths: HostPaths,
    /// containerd namespace of away's workloads.
    pub namespace: String,
    /// Per-boot state (QEMU pidfiles and sockets), e.g. /run/away.
    pub run_dir: PathBuf,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            paths: HostPaths::default(),
            namespace: std::env::var("AWAY_NAMESPACE").unwrap_or_else(|_| "away".into()),
            run_dir: PathBuf::from(std::env::var("AWAY_RUN_DIR").unwrap_or_else(|_| "/run/away".into())),
        }
    }
}

/// Why a runtime is unavailable, without the "X is unavailable" that `runtime()` adds.
fn unavailable_reason(e: RuntimeError) -> String {
    match e {
        RuntimeError::Unavailable { reason, .. } => reason,
        other => other.to_string(),
    }
}

/// The node's runtimes; a daemon that did not answer is kept as the reason why.
pub struct LocalNode {
    pub options: NodeOptions,
    pub store: ImageStore,
    containerd: Result<ContainerdRuntime, String>,
    docker: Result<DockerRuntime, String>,
    qemu: QemuRuntime,
}

/// A successful `run`: where it went and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Started {
    pub decision: RuntimeDecision,
    pub workload: WorkloadStatus,
}

impl LocalNode {
    /// Connect to every runtime (concurrently); none of them being up is not an error here.
    pub async fn open(options: NodeOptions) -> LocalNode {
        let p = &options.paths;
        let (containerd, docker, qemu) = tokio::join!(
            ContainerdRuntime::connect(&p.containerd_socket, &options.namespace, &p.state_dir),
            DockerRuntime::connect(&p.docker_socket),
            QemuRuntime::detect(options.run_dir.join("qemu"), p.clone()),
        );
        LocalNode {
            store: ImageStore::new(&p.state_dir),
            containerd: containerd.map_err(unavailable_reason),
            docker: docker.map_err(unavailable_reason),
            qemu,
            options,
        }
    }

    /// The containerd backend, when its daemon answered.
    pub fn containerd(&self) -> Option<&ContainerdRuntime> {
        self.containerd.as_ref().ok()
    }

    /// The runtime of this kind, or why it is unavailable.
    pub fn runtime(&self, kind: RuntimeKind) -> Result<&dyn Runtime, RuntimeError> {
        let unavailable = |reason: &String| RuntimeError::Unavailable { runtime: kind, reason: reason.clone() };
        match kind {
            RuntimeKind::Containerd => self.containerd.as_ref().map(|r| r as &dyn Runtime).map_err(unavailable),
            RuntimeKind::Docker => self.docker.as_ref().map(|r| r as &dyn Runtime).map_err(unavailable),
            RuntimeKind::Qemu => Ok(&self.qemu),
        }
    }

    /// The node's QEMU runtime (VM migrations need more than the `Runtime` trait).
    pub fn qemu(&self) -> &QemuRuntime {
        &self.qemu
    }

    /// Health of every runtime, as the fallback rule and the broker see it.
    pub async fn health(&self) -> Vec<RuntimeInfo> {
        let mut out = Vec::new();
        for kind in RuntimeKind::ALL {
            out.push(match self.runtime(kind) {
                Ok(rt) => rt.health().await,
                Err(e) => RuntimeInfo {
                    kind,
                    version: String::new(),
                    healthy: false,
                    checkpoint: false,
                    detail: unavailable_reason(e),
                },
            });
        }
        out
    }

    /// Run a workload: resolve its image, pick the runtime (or take the requested one),
    /// start it. Names are unique across the node's runtimes.
    pub async fn run(&self, spec: WorkloadSpec, requested: Option<RuntimeKind>) -> Result<Started, RuntimeError> {
        if let Some((rt, _)) = self.find(&spec.name).await? {
            return Err(RuntimeError::AlreadyExists { runtime: rt, name: spec.name.clone() });
        }
        // an image given as a tar joins the node's store, so that later steps (a move,
        // a restore elsewhere) find it by its reference
        if std::path::Path::new(&spec.image).is_file() {
            self.store.add(std::path::Path::new(&spec.image), None)?;
        }
        let image = self.store.resolve(&spec.image)?;
        let requested = requested.or(spec.placement.runtime);
        let health = self.health().await;
        let remaps_ports = spec.ports.iter().any(|p| p.host_port() != p.container);
        let decision = crate::fallback::choose_runtime(
            spec.kind,
            requested,
            &image.summary.arch,
            &Arch::host(),
            remaps_ports,
            &health,
        )?;
        tracing::info!(workload = %spec.name, runtime = %decision.runtime, reason = %decision.reason, "runtime chosen");
        let workload = self.runtime(decision.runtime)?.run(&RunRequest { spec, image }).await?;
        Ok(Started { decision, workload })
    }

    /// Every workload on every reachable runtime, and a note per unreachable one.
    pub async fn list(&self) -> (Vec<WorkloadStatus>, Vec<String>) {
        let mut all = Vec::new();
        let mut notes = Vec::new();
        for kind in RuntimeKind::ALL {
            match self.runtime(kind) {
                Ok(rt) => match rt.list().await {
                    Ok(list) => all.extend(list),
                    Err(e) => notes.push(error_chain(&e)),
                },
                Err(e) => notes.push(error_chain(&e)),
            }
        }
        all.sort_by(|a, b| a.name.cmp(&b.name));
        (all, notes)
    }

    /// Which runtime holds `name`, if any (searching the reachable ones).
    pub async fn find(&self, name: &str) -> Result<Option<(RuntimeKind, WorkloadStatus)>, RuntimeError> {
        for kind in RuntimeKind::ALL {
            let Ok(rt) = self.runtime(kind) else { continue };
            match rt.status(name).await {
                Ok(st) => return Ok(Some((kind, st))),
                Err(RuntimeError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Like `find`, but a missing workload is an error naming where we looked.
    pub async fn get(&self, name: &str) -> Result<(&dyn Runtime, WorkloadStatus), RuntimeError> {
        match self.find(name).await? {
            Some((kind, st)) => Ok((self.runtime(kind)?, st)),
            None => Err(RuntimeError::NoSuchWorkload { name: name.to_string() }),
        }
    }

    pub async fn stop(&self, name: &str, grace: Duration) -> Result<WorkloadStatus, RuntimeError> {
        let (rt, _) = self.get(name).await?;
        rt.stop(name, grace).await?;
        rt.status(name).await
    }
}
