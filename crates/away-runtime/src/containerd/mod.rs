//! containerd backend, through containerd's own gRPC API (containerd-client over tonic).
//!
//! containerd 1.6 has no server-side image import, so this module does what `ctr images
//! import` does on the client side: writes the image tar's blobs into the content store
//! under a lease, records the image, and unpacks its layers into overlayfs snapshots
//! through the diff service. Containers live in their own namespace (`away` by default),
//! use the host's (or the agent's) network namespace, and log to a file the runc shim
//! writes (`file://` stdio URIs).
//!
//! By concern: `import` (image tar into the content store), `spec` (the OCI runtime
//! spec, Docker's container contract), `seccomp` (Docker's default profile), `user`
//! (USER from the image's /etc/passwd), `task` (containers and their tasks),
//! `checkpoint` (CRIU, eager and lazy).

mod checkpoint;
mod import;
mod seccomp;
mod spec;
mod task;
mod user;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use away_model::{RuntimeInfo, RuntimeKind, WorkloadStatus};
use containerd_client::services::v1 as api;
use containerd_client::tonic::{self, transport::Channel, Code, Request};
use prost_types::Any;

use crate::runtime::{
    CheckpointArchive, CheckpointOptions, LazyCheckpointOptions, LazyDump, LogStream, RestoreRequest, RunRequest,
    Runtime, RuntimeError,
};

const KIND: RuntimeKind = RuntimeKind::Containerd;
const SNAPSHOTTER: &str = "overlayfs";

/// A port an overlay workload publishes on its node: `host` there goes to `to`, the
/// workload's overlay address (docs/network.md).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PublishedPort {
    pub workload: String,
    pub host: u16,
    pub to: std::net::SocketAddrV4,
}

const LABEL_WORKLOAD: &str = "away.workload";
const LABEL_IMAGE: &str = "away.image";
const LABEL_SPEC: &str = "away.spec";

fn any<T: prost::Message>(type_url: &str, msg: &T) -> Any {
    Any { type_url: type_url.to_string(), value: msg.encode_to_vec() }
}

/// The containerd runtime of one node.
#[derive(Clone)]
pub struct ContainerdRuntime {
    channel: Channel,
    socket: PathBuf,
    namespace: String,
    /// Workload logs (`<name>.log`), written by the shim.
    log_dir: PathBuf,
    /// The workloads' named volumes.
    volumes: crate::volume::VolumeRoot,
}

impl ContainerdRuntime {
    /// Connect to containerd at `socket`; workloads go in `namespace`, logs in
    /// `<state_dir>/logs`, volumes in `<state_dir>/volumes/<namespace>`.
    pub async fn connect(socket: &Path, namespace: &str, state_dir: &Path) -> Result<Self, RuntimeError> {
        let log_dir = state_dir.join("logs");
        let volumes = crate::volume::VolumeRoot::new(state_dir.join("volumes").join(namespace));
        let unavailable = |reason: String| RuntimeError::Unavailable { runtime: KIND, reason };
        if !socket.exists() {
            return Err(unavailable(format!(
                "no socket at {} (start it with deploy/services.sh start)",
                socket.display()
            )));
        }
        let channel = tokio::time::timeout(Duration::from_secs(5), containerd_client::connect(socket))
            .await
            .map_err(|_| unavailable(format!("no answer on {} within 5 s", socket.display())))?
            .map_err(|e| unavailable(format!("cannot connect to {}: {e}", socket.display())))?;
        let rt = ContainerdRuntime {
            channel,
            socket: socket.to_path_buf(),
            namespace: namespace.to_string(),
            log_dir,
            volumes,
        };
        // a socket that accepts but does not answer gRPC is not a containerd
        rt.version()
            .await
            .map_err(|e| unavailable(format!("{} does not answer the Version RPC: {e}", socket.display())))?;
        Ok(rt)
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        req.metadata_mut().insert("containerd-namespace", self.namespace.parse().expect("namespace is ascii"));
        req
    }

    fn leased<T>(&self, msg: T, lease: &str) -> Request<T> {
        let mut req = self.req(msg);
        req.metadata_mut().insert("containerd-lease", lease.parse().expect("lease id is ascii"));
        req
    }

    fn failed(op: &'static str, name: &str, status: tonic::Status) -> RuntimeError {
        RuntimeError::Failed { runtime: KIND, op, name: name.to_string(), message: status.message().to_string() }
    }

    async fn version(&self) -> Result<String, tonic::Status> {
        let v = api::version_client::VersionClient::new(self.channel.clone()).version(()).await?;
        Ok(v.into_inner().version)
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.log_dir.join(format!("{name}.log"))
    }

    async fn get_container(&self, name: &str) -> Result<Option<api::Container>, RuntimeError> {
        let mut c = api::containers_client::ContainersClient::new(self.channel.clone());
        match c.get(self.req(api::GetContainerRequest { id: name.to_string() })).await {
            Ok(r) => Ok(r.into_inner().container),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(Self::failed("get container", name, s)),
        }
    }

    /// The task's process, if the container has a task.
    async fn get_task(&self, name: &str) -> Result<Option<containerd_client::types::v1::Process>, RuntimeError> {
        let mut t = api::tasks_client::TasksClient::new(self.channel.clone());
        match t.get(self.req(api::GetRequest { container_id: name.to_string(), exec_id: String::new() })).await {
            Ok(r) => Ok(r.into_inner().process),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(Self::failed("get task", name, s)),
        }
    }
}

#[async_trait]
impl Runtime for ContainerdRuntime {
    fn kind(&self) -> RuntimeKind {
        KIND
    }

    async fn health(&self) -> RuntimeInfo {
        match self.version().await {
            Ok(v) => RuntimeInfo {
                kind: KIND,
                version: v,
                healthy: true,
                checkpoint: crate::host::which("criu").is_some(),
                detail: String::new(),
            },
            Err(s) => RuntimeInfo {
                kind: KIND,
                version: String::new(),
                healthy: false,
                checkpoint: false,
                detail: format!("{}: {}", self.socket.display(), s.message()),
            },
        }
    }

    async fn run(&self, req: &RunRequest) -> Result<WorkloadStatus, RuntimeError> {
        self.create_and_start(&req.spec, &req.image, None, None, None).await
    }

    async fn stop(&self, name: &str, grace: Duration) -> Result<(), RuntimeError> {
        if self.get_container(name).await?.is_none() {
            return Err(RuntimeError::NotFound { runtime: KIND, name: name.into() });
        }
        self.kill_and_delete_task(name, grace.max(Duration::from_millis(1))).await
    }

    async fn remove(&self, name: &str) -> Result<(), RuntimeError> {
        self.remove_workload(name).await?;
        // its volumes go with it (a checkpoint's restore in place keeps them: it
        // removes the stopped container only)
        self.volumes.remove(name)
    }

    async fn status(&self, name: &str) -> Result<WorkloadStatus, RuntimeError> {
        let c = self
            .get_container(name)
            .await?
            .ok_or_else(|| RuntimeError::NotFound { runtime: KIND, name: name.into() })?;
        let task = self.get_task(name).await?;
        Ok(self.to_status(&c, task.as_ref()))
    }

    async fn list(&self) -> Result<Vec<WorkloadStatus>, RuntimeError> {
        self.list_workloads().await
    }

    async fn logs(&self, name: &str, follow: bool) -> Result<LogStream, RuntimeError> {
        self.log_stream(name, follow).await
    }

    async fn checkpoint(&self, name: &str, opts: &CheckpointOptions) -> Result<CheckpointArchive, RuntimeError> {
        self.checkpoint_task(name, opts).await
    }

    async fn prepare_image(&self, image: &crate::store::ResolvedImage) -> Result<(), RuntimeError> {
        self.ensure_image(image).await.map(drop)
    }

    async fn release_stopped(&self, name: &str) -> Result<(), RuntimeError> {
        // the process exited with the dump; reaping the task frees the name
        self.kill_and_delete_task(name, Duration::ZERO).await
    }

    async fn precopy_volumes(
        &self,
        name: &str,
        out: &Path,
    ) -> Result<Option<crate::volume::VolumesSent>, RuntimeError> {
        let c = self
            .get_container(name)
            .await?
            .ok_or_else(|| RuntimeError::NotFound { runtime: KIND, name: name.into() })?;
        let spec = Self::spec_label(&c, "pre-copy volumes")?;
        if spec.volumes.is_empty() {
            return Ok(None);
        }
        let (volumes, out) = (self.volumes.clone(), out.to_path_buf());
        let copied = tokio::task::spawn_blocking(move || volumes.precopy(&spec, &out)).await;
        copied.map_err(|e| RuntimeError::io("pre-copy volumes", std::io::Error::other(e)))?.map(Some)
    }

    async fn checkpoint_lazy(&self, name: &str, opts: &LazyCheckpointOptions) -> Result<LazyDump, RuntimeError> {
        self.checkpoint_task_lazily(name, opts).await
    }

    async fn restore_lazy(
        &self,
        req: &RestoreRequest,
        pages_up: crate::runtime::LazyPagesUp,
    ) -> Result<WorkloadStatus, RuntimeError> {
        self.restore_task_lazily(req, pages_up).await
    }

    async fn restore(&self, req: &RestoreRequest) -> Result<WorkloadStatus, RuntimeError> {
        self.restore_task(req).await
    }
}
