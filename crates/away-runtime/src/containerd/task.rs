//! Containers and their tasks: create (or restore) and start, stop, remove, status,
//! logs.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use away_model::{WorkloadSpec, WorkloadState, WorkloadStatus};
use containerd_client::services::v1 as api;
use containerd_client::services::v1::snapshots as snap;
use containerd_client::tonic::Code;
use prost_types::Any;

use super::spec::oci_spec_for;
use super::{any, ContainerdRuntime, KIND, LABEL_IMAGE, LABEL_SPEC, LABEL_WORKLOAD, SNAPSHOTTER};
use crate::host::process::{self, ProcessEntry, Signal};
use crate::runtime::{LogStream, Runtime, RuntimeError};
use crate::store::ResolvedImage;

const RUNC_V2: &str = "io.containerd.runc.v2";
const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";

/// runc shim options, not among containerd-client's compiled protos
/// (containerd/api/types/runc/options/oci.proto); only the fields away sets.
#[derive(Clone, PartialEq, prost::Message)]
struct RuncOptions {
    #[prost(string, tag = "10")]
    criu_image_path: String,
    #[prost(string, tag = "11")]
    criu_work_path: String,
}

impl ContainerdRuntime {
    /// Create container + task from a spec; `restore_from` restores CRIU images instead
    /// of starting fresh; a lazy restore's task waits for `pages_up` (the lazy-pages
    /// daemon, started meanwhile). Rolls everything back on failure.
    pub(super) async fn create_and_start(
        &self,
        spec: &WorkloadSpec,
        image: &ResolvedImage,
        restore_from: Option<&Path>,
        criu_config: Option<&Path>,
        mut pages_up: Option<crate::runtime::LazyPagesUp>,
    ) -> Result<WorkloadStatus, RuntimeError> {
        let name = spec.name.as_str();
        if self.get_container(name).await?.is_some() {
            return Err(RuntimeError::AlreadyExists { runtime: KIND, name: name.into() });
        }
        crate::runtime::check_fits_host(spec)?;
        if spec.ports.iter().any(|p| p.host_port() != p.container) {
            return Err(RuntimeError::Invalid {
                field: "ports".into(),
                reason: "containerd workloads share the node's network: a port cannot be remapped (make host equal container, or use docker)".into(),
            });
        }
        let clock = std::time::Instant::now();
        let netns = spec.overlay.as_ref().map(|_| self.netns_name(name));
        let top = self.ensure_image(image).await?;
        // the steps a move's report shows as its restore's parts
        let mut lap = crate::steps::lap("image", clock);
        let mut rollback = Rollback::default();
        // Until the container references its snapshot, only a lease keeps containerd's GC
        // (which runs after any deletion, in any namespace) from taking it.
        let lease = self.create_lease().await?;
        let result = async {
            let mut snaps = snap::snapshots_client::SnapshotsClient::new(self.channel.clone());
            let mounts = snaps
                .prepare(self.leased(
                    snap::PrepareSnapshotRequest {
                        snapshotter: SNAPSHOTTER.into(),
                        key: name.into(),
                        parent: top,
                        labels: HashMap::new(),
                    },
                    &lease,
                ))
                .await
                .map_err(|s| Self::failed("prepare snapshot", name, s))?
                .into_inner()
                .mounts;
            rollback.snapshot = true;
            lap = crate::steps::lap("snapshot", lap);
            if let Some(diff) = restore_from.map(|d| d.join(crate::rootfs::ROOTFS_DIFF)).filter(|p| p.is_file()) {
                let upper = mounts.iter().find_map(|m| crate::rootfs::upperdir(&m.options)).ok_or_else(|| {
                    RuntimeError::Failed {
                        runtime: KIND,
                        op: "restore",
                        name: name.into(),
                        message: "the new snapshot has no overlay upper directory for the rootfs changes".into(),
                    }
                })?;
                crate::rootfs::apply(&diff, Path::new(upper))?;
                lap = crate::steps::lap("rootfs-diff", lap);
            }
            // USER as Docker resolves it: from the container's own rootfs
            let user_spec = spec.user.as_deref().unwrap_or(&image.summary.user);
            let user = super::user::resolve(
                user_spec,
                super::user::rootfs_file(&mounts, "etc/passwd").as_deref(),
                super::user::rootfs_file(&mounts, "etc/group").as_deref(),
            )
            .map_err(|reason| RuntimeError::Invalid {
                field: "user".into(),
                reason: format!("{reason} (image {})", image.reference),
            })?;
            let mut oci = oci_spec_for(spec, image, &user, &self.namespace, criu_config);
            // the volumes: a restore's from its checkpoint, else the node's (made if new)
            let volumes = match restore_from {
                Some(dir) => self.volumes.place(spec, dir),
                None => self.volumes.prepare(spec),
            };
            let volumes = volumes?;
            rollback.volumes = volumes.iter().filter(|v| v.created).map(|v| v.host.clone()).collect();
            super::spec::mount_volumes(&mut oci, &volumes);
            if let Some(netns) = &netns {
                rollback.netns = true;
                let path = self.attach_overlay(spec, netns).await?;
                super::spec::join_network_namespace(&mut oci, &path);
            }
            let oci = serde_json::to_vec(&oci).expect("an OCI spec serializes (string map keys only)");
            let labels = HashMap::from([
                (LABEL_WORKLOAD.to_string(), name.to_string()),
                (LABEL_IMAGE.to_string(), image.reference.clone()),
                (LABEL_SPEC.to_string(), serde_json::to_string(spec).unwrap_or_default()),
            ]);
            let container = api::Container {
                id: name.into(),
                labels,
                image: image.reference.clone(),
                runtime: Some(api::container::Runtime { name: RUNC_V2.into(), options: None }),
                spec: Some(Any { type_url: SPEC_TYPE_URL.into(), value: oci }),
                snapshotter: SNAPSHOTTER.into(),
                snapshot_key: name.into(),
                ..Default::default()
            };
            let mut cs = api::containers_client::ContainersClient::new(self.channel.clone());
            cs.create(self.req(api::CreateContainerRequest { container: Some(container) }))
                .await
                .map_err(|s| Self::failed("create container", name, s))?;
            rollback.container = true;
            lap = crate::steps::lap("container", lap);
            std::fs::create_dir_all(&self.log_dir)
                .map_err(|e| RuntimeError::io(format!("create {}", self.log_dir.display()), e))?;
            let log = format!("file://{}", self.log_path(name).display());
            let options = restore_from.map(|dir| {
                any(
                    "containerd.runc.v1.Options",
                    &RuncOptions {
                        criu_image_path: dir.display().to_string(),
                        criu_work_path: dir.join(crate::runtime::CRIU_WORK_DIR).display().to_string(),
                    },
                )
            });
            if let Some(up) = pages_up.take() {
                // CRIU's restore connects to the daemon as it starts
                up.await.map_err(|why| RuntimeError::Failed {
                    runtime: KIND,
                    op: "restore task",
                    name: name.into(),
                    message: format!("the lazy-pages daemon did not start: {why}"),
                })?;
                lap = crate::steps::lap("page-daemon", lap);
            }
            let mut ts = api::tasks_client::TasksClient::new(self.channel.clone());
            let created = ts
                .create(self.req(api::CreateTaskRequest {
                    container_id: name.into(),
                    rootfs: mounts,
                    stdout: log.clone(),
                    stderr: log,
                    options,
                    ..Default::default()
                }))
                .await
                .map_err(|s| RuntimeError::Failed {
                    runtime: KIND,
                    op: if restore_from.is_some() { "restore task" } else { "create task" },
                    name: name.into(),
                    message: format!(
                        "{}{}",
                        s.message(),
                        restore_from
                            .map(|d| crate::runtime::criu_log_errors(
                                &d.join(crate::runtime::CRIU_WORK_DIR).join("restore.log")
                            ))
                            .unwrap_or_default()
                    ),
                })?
                .into_inner();
            rollback.task = true;
            lap = crate::steps::lap("task-create", lap);
            ts.start(self.req(api::StartRequest { container_id: name.into(), exec_id: String::new() }))
                .await
                .map_err(|s| Self::failed("start task", name, s))?;
            match restore_from {
                // the shim restores at the start: runc runs CRIU (its own time from its log)
                Some(dir) => {
                    let log = dir.join(crate::runtime::CRIU_WORK_DIR).join("restore.log");
                    crate::runtime::record_criu_call(lap.elapsed(), &log, "criu-restore");
                    lap = std::time::Instant::now();
                }
                None => lap = crate::steps::lap("task-start", lap),
            }
            tracing::info!(
                workload = name,
                pid = created.pid,
                ms = clock.elapsed().as_millis() as u64,
                "containerd task started"
            );
            if restore_from.is_some() {
                if let (Some(netns), Some(addr)) = (&netns, &spec.overlay) {
                    self.announce_overlay(netns, addr).await;
                }
            }
            let status = self.status(name).await;
            crate::steps::lap("status", lap);
            status
        }
        .await;
        if result.is_err() {
            self.undo(name, &rollback).await;
        }
        self.delete_lease(&lease).await;
        result
    }

    /// Best-effort removal of what a failed create left.
    async fn undo(&self, name: &str, r: &Rollback) {
        if r.task {
            self.kill_and_delete_task(name, Duration::ZERO).await.ok();
        }
        if r.container {
            let mut cs = api::containers_client::ContainersClient::new(self.channel.clone());
            let _ = cs.delete(self.req(api::DeleteContainerRequest { id: name.into() })).await;
        }
        if r.snapshot {
            let mut snaps = snap::snapshots_client::SnapshotsClient::new(self.channel.clone());
            let _ = snaps
                .remove(self.req(snap::RemoveSnapshotRequest { snapshotter: SNAPSHOTTER.into(), key: name.into() }))
                .await;
        }
        if r.netns {
            self.detach_overlay(name).await;
        }
        for dir in &r.volumes {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// The network namespace of workload `name` when it is on an overlay: per containerd
    /// namespace, since two nodes on one host (a local cluster) may both hold the
    /// workload during a move.
    pub(super) fn netns_name(&self, name: &str) -> String {
        format!("awo-{}-{name}", self.namespace)
    }

    /// The workload's own network namespace with its overlay address (docs/network.md).
    async fn attach_overlay(&self, spec: &WorkloadSpec, netns: &str) -> Result<std::path::PathBuf, RuntimeError> {
        let addr = spec.overlay.clone().expect("an overlay workload");
        let (ns, clock) = (netns.to_string(), std::time::Instant::now());
        let path = tokio::task::spawn_blocking(move || away_overlay::attach_workload(&ns, &addr))
            .await
            .map_err(|e| RuntimeError::Failed {
                runtime: KIND,
                op: "network",
                name: spec.name.clone(),
                message: e.to_string(),
            })?
            .map_err(|e| RuntimeError::Failed {
                runtime: KIND,
                op: "network",
                name: spec.name.clone(),
                message: away_model::error_chain(&e),
            })?;
        tracing::info!(
            workload = %spec.name,
            netns,
            ms = clock.elapsed().as_millis() as u64,
            "overlay namespace ready"
        );
        Ok(path)
    }

    /// After a restore: the workload's MAC is here now (a gratuitous ARP, which the
    /// other nodes' VXLAN devices learn from). A failure only delays the network's
    /// following until the workload sends something itself.
    async fn announce_overlay(&self, netns: &str, addr: &away_model::OverlayAddress) {
        let (ns, addr) = (netns.to_string(), addr.clone());
        match tokio::task::spawn_blocking(move || away_overlay::announce(&ns, &addr, 3)).await {
            Ok(Ok(())) => tracing::info!(netns, "gratuitous ARP sent"),
            Ok(Err(e)) => {
                tracing::warn!(netns, "cannot announce the workload's address: {}", away_model::ErrorChain(&e))
            }
            Err(e) => tracing::warn!(netns, "announce task: {e}"),
        }
    }

    /// Remove the workload's network namespace, if it has one.
    pub(super) async fn detach_overlay(&self, name: &str) {
        let ns = self.netns_name(name);
        if !std::path::Path::new(away_overlay::NETNS_DIR).join(&ns).exists() {
            return;
        }
        match tokio::task::spawn_blocking(move || away_overlay::detach_workload(&ns)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(workload = name, "cannot remove its network namespace: {}", away_model::ErrorChain(&e))
            }
            Err(e) => tracing::warn!(workload = name, "network namespace removal: {e}"),
        }
    }

    /// SIGTERM, wait up to `grace`, SIGKILL, then delete the task (reaps the shim).
    /// A zero `grace` kills at once.
    pub(super) async fn kill_and_delete_task(&self, name: &str, grace: Duration) -> Result<(), RuntimeError> {
        use containerd_client::types::v1::Status;
        let Some(process) = self.get_task(name).await? else { return Ok(()) };
        let mut ts = api::tasks_client::TasksClient::new(self.channel.clone());
        let kill = |signal: u32| api::KillRequest {
            container_id: name.into(),
            exec_id: String::new(),
            signal,
            all: signal == 9,
        };
        if process.status != Status::Stopped as i32 {
            let mut exited = false;
            if !grace.is_zero() {
                let _ = ts.kill(self.req(kill(15))).await;
                exited = self.wait_stopped(name, grace).await?;
            }
            if !exited {
                let _ = ts.kill(self.req(kill(9))).await;
                // the kill is asynchronous: wait for the exit before deleting
                // (pid 0: a restore killed before its process existed)
                if !self.wait_stopped(name, Duration::from_secs(2)).await?
                    && (process.pid == 0 || process::process(process.pid).is_none())
                {
                    return self.end_shim_that_lost_its_exit(name, process.pid).await;
                }
                self.wait_stopped(name, Duration::from_secs(8)).await?;
            }
        }
        self.delete_task(name).await
    }

    /// The task's process is gone (or never came: a restore killed mid-way) but its
    /// shim still reports it running: containerd 1.6's shim drops an exit that comes
    /// before it has registered the process (a lazily restored process whose page
    /// daemon died right after the restore exits that early). Only ending that shim,
    /// the one serving this container of this containerd, lets containerd clean up the
    /// task (it does for a dead shim).
    async fn end_shim_that_lost_its_exit(&self, name: &str, pid: u32) -> Result<(), RuntimeError> {
        let args = ["-namespace", self.namespace.as_str(), "-id", name, "-address", &self.socket.to_string_lossy()]
            .map(String::from);
        let is_the_shim = |p: &ProcessEntry| {
            p.argv.first().is_some_and(|a| a.ends_with("containerd-shim-runc-v2"))
                && p.argv.windows(6).any(|w| w == args)
        };
        let Some(shim) = process::processes().find(|p| is_the_shim(p)).map(|p| p.pid) else {
            return Err(RuntimeError::Failed {
                runtime: KIND,
                op: "kill task",
                name: name.into(),
                message: format!(
                    "process {pid} is gone but containerd still reports it running, and no shim was found"
                ),
            });
        };
        tracing::warn!(
            workload = name,
            pid,
            shim,
            "the task's process is gone but its shim says running: ending the shim"
        );
        // checked again once held: the pid may have gone to another process meanwhile
        if let Err(e) = process::signal_if(shim, Signal::KILL, is_the_shim) {
            tracing::warn!(workload = name, shim, "cannot kill the shim: {e}");
        }
        // containerd notices the dead shim and cleans up after it; until then a delete
        // fails ("ttrpc: closed")
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match self.delete_task(name).await {
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(workload = name, "task delete after the shim's end: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                done => return done,
            }
        }
    }

    async fn delete_task(&self, name: &str) -> Result<(), RuntimeError> {
        let mut ts = api::tasks_client::TasksClient::new(self.channel.clone());
        match ts.delete(self.req(api::DeleteTaskRequest { container_id: name.into() })).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(Self::failed("delete task", name, s)),
        }
    }

    /// Poll until the task has stopped (true) or `limit` passed (false).
    async fn wait_stopped(&self, name: &str, limit: Duration) -> Result<bool, RuntimeError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match self.get_task(name).await? {
                None => return Ok(true),
                Some(p) if p.status == containerd_client::types::v1::Status::Stopped as i32 => return Ok(true),
                _ if tokio::time::Instant::now() >= deadline => return Ok(false),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    pub(super) fn to_status(
        &self,
        c: &api::Container,
        task: Option<&containerd_client::types::v1::Process>,
    ) -> WorkloadStatus {
        use containerd_client::types::v1::Status as S;
        let (state, pid, exit_code) = match task {
            None => (WorkloadState::Stopped, None, None),
            Some(p) => {
                let state = match S::try_from(p.status).unwrap_or(S::Unknown) {
                    S::Created => WorkloadState::Created,
                    S::Running => WorkloadState::Running,
                    S::Paused | S::Pausing => WorkloadState::Paused,
                    S::Stopped => WorkloadState::Stopped,
                    S::Unknown => WorkloadState::Unknown,
                };
                let exit = (state == WorkloadState::Stopped).then_some(p.exit_status as i64);
                (state, (p.pid > 0 && state != WorkloadState::Stopped).then_some(p.pid), exit)
            }
        };
        let spec: Option<WorkloadSpec> = c.labels.get(LABEL_SPEC).and_then(|s| serde_json::from_str(s).ok());
        WorkloadStatus {
            name: c.id.clone(),
            runtime: KIND,
            state,
            image: c.image.clone(),
            pid,
            exit_code,
            ports: spec
                .as_ref()
                .map(|s| s.ports.iter().map(|p| format!("{}:{}", p.host_port(), p.container)).collect())
                .unwrap_or_default(),
            detail: match spec.as_ref().and_then(|s| s.overlay.as_ref()) {
                Some(o) => format!("namespace {}, overlay {} {} ({})", self.namespace, o.network, o.ip, o.mac),
                None => format!("namespace {}, host network", self.namespace),
            },
        }
    }

    pub(super) async fn remove_workload(&self, name: &str) -> Result<(), RuntimeError> {
        if self.get_container(name).await?.is_none() {
            return Err(RuntimeError::NotFound { runtime: KIND, name: name.into() });
        }
        self.kill_and_delete_task(name, Duration::ZERO).await?;
        let mut cs = api::containers_client::ContainersClient::new(self.channel.clone());
        cs.delete(self.req(api::DeleteContainerRequest { id: name.into() }))
            .await
            .map_err(|s| Self::failed("delete container", name, s))?;
        let mut snaps = snap::snapshots_client::SnapshotsClient::new(self.channel.clone());
        match snaps
            .remove(self.req(snap::RemoveSnapshotRequest { snapshotter: SNAPSHOTTER.into(), key: name.into() }))
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(Self::failed("remove snapshot", name, s)),
        }
        let _ = std::fs::remove_file(self.log_path(name));
        self.detach_overlay(name).await;
        Ok(())
    }

    /// away's containers in this namespace.
    async fn workload_containers(&self) -> Result<Vec<api::Container>, RuntimeError> {
        let mut cs = api::containers_client::ContainersClient::new(self.channel.clone());
        Ok(cs
            .list(self.req(api::ListContainersRequest { filters: vec![format!("labels.\"{LABEL_WORKLOAD}\"")] }))
            .await
            .map_err(|s| Self::failed("list containers", &self.namespace, s))?
            .into_inner()
            .containers)
    }

    pub(super) async fn list_workloads(&self) -> Result<Vec<WorkloadStatus>, RuntimeError> {
        let mut out = Vec::new();
        for c in self.workload_containers().await? {
            let task = self.get_task(&c.id).await?;
            out.push(self.to_status(&c, task.as_ref()));
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The ports running overlay workloads publish: each of their `ports:` goes from the
    /// node's port to the workload's overlay address (the agent relays them,
    /// away_agent::published). A workload on the node's own network publishes by itself.
    pub async fn published_overlay_ports(&self) -> Result<Vec<super::PublishedPort>, RuntimeError> {
        let mut out = Vec::new();
        for c in self.workload_containers().await? {
            let spec: Option<WorkloadSpec> = c.labels.get(LABEL_SPEC).and_then(|s| serde_json::from_str(s).ok());
            let Some((spec, addr)) = spec.as_ref().and_then(|s| Some((s, s.overlay.as_ref()?))) else { continue };
            if spec.ports.is_empty() {
                continue;
            }
            let running = self
                .get_task(&c.id)
                .await?
                .is_some_and(|p| p.status == containerd_client::types::v1::Status::Running as i32);
            if running {
                out.extend(spec.ports.iter().map(|p| super::PublishedPort {
                    workload: c.id.clone(),
                    host: p.host_port(),
                    to: std::net::SocketAddrV4::new(addr.ip, p.container),
                }));
            }
        }
        Ok(out)
    }

    pub(super) async fn log_stream(&self, name: &str, follow: bool) -> Result<LogStream, RuntimeError> {
        if self.get_container(name).await?.is_none() {
            return Err(RuntimeError::NotFound { runtime: KIND, name: name.into() });
        }
        let path = self.log_path(name);
        let still_running: crate::runtime::StillRunning = if follow {
            let (rt, name) = (self.clone(), name.to_string());
            Box::new(move || {
                let (rt, name) = (rt.clone(), name.clone());
                Box::pin(async move {
                    matches!(rt.get_task(&name).await, Ok(Some(p)) if p.status != containerd_client::types::v1::Status::Stopped as i32)
                })
            })
        } else {
            Box::new(|| Box::pin(async { false }))
        };
        Ok(crate::runtime::tail_file(path, still_running))
    }
}

#[derive(Default)]
struct Rollback {
    snapshot: bool,
    container: bool,
    task: bool,
    netns: bool,
    /// Volume directories this create made or placed.
    volumes: Vec<std::path::PathBuf>,
}
