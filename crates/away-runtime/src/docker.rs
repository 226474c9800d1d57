//! Docker engine backend: workloads are Docker containers, driven through bollard over
//! dockerd's unix socket. Checkpoint and restore are Docker's experimental CRIU
//! checkpoints (dockerd needs `--experimental` and CRIU on its PATH).
//!
//! A workload is the container named exactly like it and labelled `away.workload`;
//! containers without that label are never touched. Each workload has a second
//! container, its network-namespace holder (labelled `away.netns-of`, see
//! [`DockerRuntime::create_netns_holder`]), which publishes its ports.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use away_model::{RuntimeInfo, RuntimeKind, Seccomp, WorkloadSpec, WorkloadState, WorkloadStatus};
use bollard::container::{CreateCheckpointOptions, DeleteCheckpointOptions, ListCheckpointsOptions};
use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, HostConfig, PortBinding, SystemInfo,
};
use bollard::query_parameters::{
    CreateContainerOptions, ImportImageOptions, ListContainersOptions, LogsOptions, RemoveContainerOptions,
    RenameContainerOptions, StopContainerOptions, TagImageOptions,
};
use bollard::Docker;
use futures_util::{StreamExt, TryStreamExt};
use tracing::{debug, info, warn};

use crate::host::criu_args::RuncCheckpoint;
use crate::runtime::{
    CheckpointArchive, CheckpointOptions, LazyCheckpointOptions, LazyDump, LogStream, RestoreRequest, RunRequest,
    Runtime, RuntimeError,
};
use crate::steps;
use crate::store::ResolvedImage;

const KIND: RuntimeKind = RuntimeKind::Docker;
const LABEL_WORKLOAD: &str = "away.workload";
const LABEL_IMAGE: &str = "away.image";
const LABEL_SPEC: &str = "away.spec";
/// On a workload's network-namespace holder: the workload's name.
const LABEL_NETNS_OF: &str = "away.netns-of";
/// A holder is named `<workload><NETNS_HOLDER><ms>`: unique, so that a workload set
/// aside during a move and its restored copy on the same engine each have their own.
const NETNS_HOLDER: &str = ".away-net-";
/// Where a holder sees the host's static busybox, its only program (named `busybox`:
/// busybox picks its applet from its own name, and takes `busybox APPLET ARGS`).
const HOLDER_PROGRAM: &str = "/.away-netns/busybox";
/// Per-request limit until dockerd answers (image loads and CRIU dumps can take a while;
/// streamed bodies such as followed logs are not limited).
const REQUEST_TIMEOUT_SECS: u64 = 120;
/// dockerd refuses memory limits below 6 MB.
const DOCKER_MIN_MEMORY: u64 = 6 * 1024 * 1024;

/// The Docker engine on one unix socket.
#[derive(Debug, Clone)]
pub struct DockerRuntime {
    docker: Docker,
    socket: PathBuf,
}

impl DockerRuntime {
    /// Connect to dockerd at `socket` and agree on an API version (dockerd 20.10 speaks 1.41,
    /// older than bollard's default).
    pub async fn connect(socket: &Path) -> Result<Self, RuntimeError> {
        let unavailable = |reason: String| RuntimeError::Unavailable { runtime: KIND, reason };
        if !socket.exists() {
            return Err(unavailable(format!(
                "no socket at {} (start dockerd, e.g. deploy/services.sh start)",
                socket.display()
            )));
        }
        let docker =
            Docker::connect_with_unix(&socket.to_string_lossy(), REQUEST_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
                .map_err(|e| unavailable(format!("cannot connect to {}: {e}", socket.display())))?;
        let docker = tokio::time::timeout(Duration::from_secs(10), docker.negotiate_version())
            .await
            .map_err(|_| unavailable(format!("no answer on {} within 10 s", socket.display())))?
            .map_err(|e| unavailable(format!("GET /version on {}: {}", socket.display(), describe(&e))))?;
        Ok(DockerRuntime { docker, socket: socket.to_path_buf() })
    }

    /// The socket this runtime talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Refuse resources the engine's host cannot give, before anything is created.
    /// Returns what the engine said about itself.
    async fn check_resources(&self, spec: &WorkloadSpec) -> Result<SystemInfo, RuntimeError> {
        let memory = spec.resources.memory.bytes();
        if memory < DOCKER_MIN_MEMORY {
            return Err(RuntimeError::Invalid {
                field: "resources.memory".into(),
                reason: format!("{} is below docker's minimum of 6 MiB", spec.resources.memory),
            });
        }
        let sys = self.docker.info().await.map_err(|e| self.api_error("inspect the engine of", &spec.name, e))?;
        if let Some(total) = sys.mem_total.filter(|t| *t > 0) {
            if memory > total as u64 {
                return Err(RuntimeError::Invalid {
                    field: "resources.memory".into(),
                    reason: format!(
                        "{} is more than the docker host has ({} MiB) for workload {:?}",
                        spec.resources.memory,
                        total as u64 / (1024 * 1024),
                        spec.name
                    ),
                });
            }
        }
        if let Some(ncpu) = sys.ncpu.filter(|n| *n > 0) {
            if spec.resources.cpus > ncpu as f64 {
                return Err(RuntimeError::Invalid {
                    field: "resources.cpus".into(),
                    reason: format!(
                        "{} is more than the docker host has ({ncpu}) for workload {:?}",
                        spec.resources.cpus, spec.name
                    ),
                });
            }
        }
        Ok(sys)
    }

    /// Make `image.reference` name the image of `image.tar` in the engine: load the tar
    /// (POST /images/load) unless the engine already has that reference with the same
    /// image ID (Docker's image ID is the config digest).
    async fn ensure_image(&self, image: &ResolvedImage) -> Result<(), RuntimeError> {
        let reference = image.reference.clone();
        let bad = |reason: String| RuntimeError::Image { reference: reference.clone(), reason };
        let tar = image.tar.clone();
        // Reading the tar first also refuses a missing or corrupt one before anything is created.
        let read = tokio::task::spawn_blocking(move || away_image::read_image_tar(&tar))
            .await
            .map_err(|e| bad(format!("reading {} panicked: {e}", image.tar.display())))?
            .map_err(|e| bad(away_model::error_chain(&e)))?;
        let id = read.config_digest.clone();
        if self.image_id(&image.reference).await?.as_deref() == Some(id.as_str()) {
            debug!(reference = %image.reference, %id, "image already in docker");
            return Ok(());
        }
        info!(reference = %image.reference, tar = %image.tar.display(), format = ?read.format, "loading image into docker");
        // Whatever the tar's format (a pure OCI layout, which Docker 20.10 cannot load,
        // or zstd layers), dockerd gets it as a docker-archive. Lab images are small: one
        // body in memory is fine.
        let bytes = read
            .docker_archive()
            .map_err(|e| bad(format!("cannot make a docker-archive of {}: {e}", image.tar.display())))?;
        let opts = ImportImageOptions { quiet: true, ..Default::default() };
        let mut load = self.docker.import_image(opts, bollard::body_full(bytes.into()), None);
        while let Some(progress) = load.next().await {
            progress.map_err(|e| bad(format!("docker load of {} failed: {}", image.tar.display(), describe(&e))))?;
        }
        // The tar may carry other tags than the reference (a store alias, or none at all).
        if self.image_id(&image.reference).await?.as_deref() != Some(id.as_str()) {
            let (repo, tag) = split_reference(&image.reference);
            let opts = TagImageOptions { repo: Some(repo.to_string()), tag: Some(tag.to_string()) };
            self.docker
                .tag_image(&id, Some(opts))
                .await
                .map_err(|e| bad(format!("loaded {} but cannot tag {id}: {}", image.tar.display(), describe(&e))))?;
        }
        Ok(())
    }

    /// The engine's image ID for a reference, None when it has no such image.
    async fn image_id(&self, reference: &str) -> Result<Option<String>, RuntimeError> {
        match self.docker.inspect_image(reference).await {
            Ok(found) => Ok(found.id),
            Err(e) if status_code(&e) == Some(404) => Ok(None),
            Err(e) => Err(RuntimeError::Image {
                reference: reference.into(),
                reason: format!("cannot inspect it: {}", describe(&e)),
            }),
        }
    }

    /// Create (not start) the container of `spec` and return its ID; a name conflict is
    /// AlreadyExists.
    ///
    /// With `netns_holder`, the container joins that container's network namespace
    /// (whose ports are published there) instead of getting its own.
    async fn create(
        &self,
        spec: &WorkloadSpec,
        image: &ResolvedImage,
        netns_holder: Option<&str>,
    ) -> Result<String, RuntimeError> {
        let spec_json = serde_json::to_string(spec).map_err(|e| RuntimeError::Failed {
            runtime: KIND,
            op: "create",
            name: spec.name.clone(),
            message: format!("cannot encode the spec: {e}"),
        })?;
        let labels = HashMap::from([
            (LABEL_WORKLOAD.to_string(), spec.name.clone()),
            (LABEL_IMAGE.to_string(), image.reference.clone()),
            (LABEL_SPEC.to_string(), spec_json),
        ]);
        let bindings = match netns_holder {
            None => port_bindings(spec),
            Some(_) => HashMap::new(),
        };
        let network_mode = match netns_holder {
            None => "bridge".to_string(),
            Some(holder) => format!("container:{holder}"),
        };
        // the spec's capabilities and seccomp choice, as containerd applies them
        let caps = |list: &[String]| -> Option<Vec<String>> {
            let names: Vec<String> =
                list.iter().map(|c| if c.eq_ignore_ascii_case("all") { "ALL".into() } else { cap_name(c) }).collect();
            (!names.is_empty()).then_some(names)
        };
        let body = ContainerCreateBody {
            image: Some(image.reference.clone()),
            // the workload's name, as on containerd (Docker's default is the ID's start);
            // in a holder's namespace Docker takes the holder's (and refuses another)
            hostname: netns_holder.is_none().then(|| spec.name.clone()),
            user: spec.user.clone(),
            // Docker adds these to the image's environment (same names win).
            env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            cmd: spec.command.clone(),
            labels: Some(labels),
            exposed_ports: Some(bindings.keys().cloned().collect()),
            // Detached, no TTY, no stdin: CRIU can then dump the container (its stdio are
            // the shim's pipes, which runc knows how to reconnect on restore).
            tty: Some(false),
            open_stdin: Some(false),
            attach_stdin: Some(false),
            attach_stdout: Some(false),
            attach_stderr: Some(false),
            host_config: Some(HostConfig {
                memory: Some(spec.resources.memory.bytes() as i64),
                nano_cpus: Some((spec.resources.cpus * 1e9).round() as i64),
                port_bindings: Some(bindings),
                network_mode: Some(network_mode),
                cap_add: caps(&spec.capabilities.add),
                cap_drop: caps(&spec.capabilities.drop),
                security_opt: (spec.seccomp == Seccomp::Unconfined).then(|| vec!["seccomp=unconfined".into()]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let opts = CreateContainerOptions { name: Some(spec.name.clone()), ..Default::default() };
        match self.docker.create_container(Some(opts), body).await {
            Ok(created) => {
                for w in created.warnings {
                    warn!(workload = %spec.name, "docker: {w}");
                }
                Ok(created.id)
            }
            Err(e) if status_code(&e) == Some(409) => {
                Err(RuntimeError::AlreadyExists { runtime: KIND, name: spec.name.clone() })
            }
            Err(e) if status_code(&e) == Some(404) => Err(RuntimeError::Image {
                reference: image.reference.clone(),
                reason: format!("docker does not have it: {}", describe(&e)),
            }),
            Err(e) => Err(self.api_error("create", &spec.name, e)),
        }
    }

    /// Create and start a workload; with `checkpoint`, start it from that checkpoint.
    /// Whatever fails after the create removes the container again.
    async fn create_and_start(
        &self,
        spec: &WorkloadSpec,
        image: &ResolvedImage,
        checkpoint: Option<&Path>,
    ) -> Result<WorkloadStatus, RuntimeError> {
        if !spec.volumes.is_empty() {
            // not built: the volume would have to join the holder's setup and Docker's
            // checkpoint directory; containerd carries volumes across moves
            return Err(RuntimeError::Invalid {
                field: "volumes".into(),
                reason: "docker workloads cannot have volumes yet; run it on containerd (--runtime containerd)".into(),
            });
        }
        // each step is timed for a migration's report (crate::steps)
        let t = Instant::now();
        let sys = self.check_resources(spec).await?;
        let t = steps::lap("engine-info", t);
        self.ensure_image(image).await?;
        let t = steps::lap("image", t);
        // a taken name is refused before a holder claims (or fails on) the ports
        if self.docker.inspect_container(&spec.name, None).await.is_ok() {
            return Err(RuntimeError::AlreadyExists { runtime: KIND, name: spec.name.clone() });
        }
        let holder = self.create_netns_holder(spec, image).await?;
        let t = steps::lap("netns-holder", t);
        let id = match self.create(spec, image, Some(&holder)).await {
            Ok(id) => id,
            Err(e) => {
                self.remove_netns_holder(&spec.name, Some(&holder)).await;
                return Err(e);
            }
        };
        steps::lap("docker-create", t);
        let name = spec.name.as_str();
        let started = async {
            match checkpoint {
                None => self.docker.start_container(name, None).await.map_err(|e| self.api_error("start", name, e))?,
                Some(dir) => self.start_from_checkpoint(&sys, name, &id, dir).await?,
            }
            let t = Instant::now();
            let status = self.status(name).await;
            steps::record("status", t.elapsed());
            status
        }
        .await;
        if started.is_err() {
            let opts = RemoveContainerOptions { force: true, v: true, ..Default::default() };
            if let Err(e) = self.docker.remove_container(name, Some(opts)).await {
                warn!(workload = name, "cannot remove the container after a failed start: {}", describe(&e));
            }
            self.remove_netns_holder(name, Some(&holder)).await;
        }
        started
    }

    /// Create and start the container that holds a workload's network namespace, with
    /// the workload's published ports; returns its ID.
    ///
    /// Docker 26 and later (moby's `initializeCreatedTask`, which replaced the
    /// `libnetwork-setkey` prestart hook) bind-mount `/proc/<task pid>/ns/net` right after
    /// the task is created, but a task created from a checkpoint has no process until it
    /// is started (pid 0), so `docker start --checkpoint` of a container with its own
    /// network fails: "bind-mount /proc/0/ns/net -> …: no such file or directory"
    /// (containerd#12141; Docker 28.5 on containerd 2.1 and 1.6 alike). A container that
    /// joins another's namespace (`container:<id>`) skips that step, so the restored
    /// workload joins this holder's. CRIU does not dump the network namespace of a Docker
    /// container (runc declares it external), so the restored process finds its listening
    /// sockets in the holder's namespace. Every workload gets one, not only restored ones:
    /// runc dumps a namespace that was given by path as external and one it created
    /// itself as empty, and restores each only into the same kind. Docker 20.10 would not
    /// need it; one path for all versions keeps runs and restores alike. The holder runs
    /// the host's static busybox, mounted read-only, so any image works: `sleep` and
    /// nothing else.
    async fn create_netns_holder(&self, spec: &WorkloadSpec, image: &ResolvedImage) -> Result<String, RuntimeError> {
        let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        let name = format!("{}{NETNS_HOLDER}{ms}", spec.name);
        let busybox = crate::host::HostPaths::default().busybox;
        let bindings = port_bindings(spec);
        let body = ContainerCreateBody {
            image: Some(image.reference.clone()),
            entrypoint: Some(vec![HOLDER_PROGRAM.into(), "sleep".into(), "2147483647".into()]),
            // the workload, in this namespace, gets this hostname: its own name
            hostname: Some(spec.name.clone()),
            cmd: Some(Vec::new()),
            user: Some("0".into()),
            labels: Some(HashMap::from([(LABEL_NETNS_OF.to_string(), spec.name.clone())])),
            exposed_ports: Some(bindings.keys().cloned().collect()),
            host_config: Some(HostConfig {
                memory: Some(DOCKER_MIN_MEMORY as i64 * 2),
                binds: Some(vec![format!("{}:{HOLDER_PROGRAM}:ro", busybox.display())]),
                port_bindings: Some(bindings),
                network_mode: Some("bridge".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let opts = CreateContainerOptions { name: Some(name.clone()), ..Default::default() };
        let created = self
            .docker
            .create_container(Some(opts), body)
            .await
            .map_err(|e| self.api_error("create the network holder of", &spec.name, e))?;
        if let Err(e) = self.docker.start_container(&created.id, None).await {
            self.remove_netns_holder(&spec.name, Some(&created.id)).await;
            return Err(self.api_error("start the network holder of", &spec.name, e));
        }
        debug!(workload = %spec.name, holder = %name, "network namespace holder started");
        Ok(created.id)
    }

    /// Remove a workload's network-namespace holder (if it has one); failures are logged.
    async fn remove_netns_holder(&self, workload: &str, holder: Option<&str>) {
        let Some(holder) = holder else { return };
        let opts = RemoveContainerOptions { force: true, v: true, ..Default::default() };
        if let Err(e) = self.docker.remove_container(holder, Some(opts)).await {
            if status_code(&e) != Some(404) {
                warn!(workload, holder, "cannot remove the network namespace holder: {}", describe(&e));
            }
        }
    }

    /// Start the created container `id` from the checkpoint in `dir`.
    ///
    /// dockerd (20.10 and later) refuses `checkpoint-dir` on start ("custom checkpointdir
    /// is not supported"): it restores only from the container's own checkpoint directory,
    /// `<DockerRootDir>/containers/<id>/checkpoints/<name>`. dockerd is on this host (unix
    /// socket), so the archive is placed there (hard links: no byte is copied when both
    /// are on one filesystem), and removed after the start (containerd has taken the
    /// images in by then).
    async fn start_from_checkpoint(
        &self,
        sys: &SystemInfo,
        name: &str,
        id: &str,
        dir: &Path,
    ) -> Result<(), RuntimeError> {
        let root = sys.docker_root_dir.as_deref().filter(|r| !r.is_empty()).ok_or_else(|| RuntimeError::Failed {
            runtime: KIND,
            op: "restore",
            name: name.into(),
            message: "dockerd does not report its root dir (DockerRootDir)".into(),
        })?;
        let t = Instant::now();
        let diff = dir.join(crate::rootfs::ROOTFS_DIFF);
        if diff.is_file() {
            let created =
                self.docker.inspect_container(id, None).await.map_err(|e| self.api_error("inspect", name, e))?;
            let upper = upper_dir(&created).ok_or_else(|| RuntimeError::Failed {
                runtime: KIND,
                op: "restore",
                name: name.into(),
                message: "the new container has no overlay2 UpperDir for the rootfs changes".into(),
            })?;
            crate::rootfs::apply(&diff, Path::new(&upper))?;
        }
        let t = steps::lap("rootfs-apply", t);
        let checkpoint = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "away".into());
        let target = Path::new(root).join("containers").join(id).join("checkpoints").join(&checkpoint);
        let (from, to) = (dir.to_path_buf(), target.clone());
        let copied = tokio::task::spawn_blocking(move || link_or_copy_dir(&from, &to)).await.map_err(|e| {
            RuntimeError::io(format!("copy {} to {}", dir.display(), target.display()), std::io::Error::other(e))
        })??;
        debug!(workload = name, from = %dir.display(), to = %target.display(), copied, "checkpoint placed for dockerd");
        let t = steps::lap("checkpoint-place", t);
        // dockerd tars the dir into containerd's content store, containerd unpacks it
        // again for the shim, and runc's CRIU restores from that copy
        let started = with_checkpoint_query(&self.docker, &checkpoint).start_container(id, None).await;
        let t = steps::lap("docker-start", t);
        if let Err(e) = self.docker.delete_checkpoint(id, &checkpoint, None::<DeleteCheckpointOptions>).await {
            debug!(workload = name, "cannot delete the placed checkpoint through dockerd: {}", describe(&e));
            let _ = std::fs::remove_dir_all(&target);
        }
        steps::lap("checkpoint-delete", t);
        started.map_err(|e| self.api_error("restore", name, e))
    }

    /// Inspect the workload's container; containers away did not create are NotFound.
    async fn inspect(&self, name: &str) -> Result<ContainerInspectResponse, RuntimeError> {
        let c = self.docker.inspect_container(name, None).await.map_err(|e| self.api_error("inspect", name, e))?;
        // Docker also resolves ID prefixes: insist on our label with this exact name.
        let ours =
            c.config.as_ref().and_then(|cfg| cfg.labels.as_ref()).and_then(|l| l.get(LABEL_WORKLOAD)).is_some_and(
                |w| w == name || name.strip_prefix(w.as_str()).is_some_and(|rest| rest.starts_with(SET_ASIDE)),
            );
        if !ours {
            return Err(RuntimeError::NotFound { runtime: KIND, name: name.into() });
        }
        Ok(c)
    }

    fn api_error(&self, op: &'static str, name: &str, e: BollardError) -> RuntimeError {
        match status_code(&e) {
            Some(404) => RuntimeError::NotFound { runtime: KIND, name: name.into() },
            Some(_) => RuntimeError::Failed { runtime: KIND, op, name: name.into(), message: describe(&e) },
            None if is_transport(&e) => RuntimeError::Unavailable {
                runtime: KIND,
                reason: format!("{op} {name:?} on {}: {}", self.socket.display(), describe(&e)),
            },
            None => RuntimeError::Failed { runtime: KIND, op, name: name.into(), message: describe(&e) },
        }
    }
}

#[async_trait]
impl Runtime for DockerRuntime {
    fn kind(&self) -> RuntimeKind {
        KIND
    }

    async fn health(&self) -> RuntimeInfo {
        let mut out = RuntimeInfo {
            kind: KIND,
            version: String::new(),
            healthy: false,
            checkpoint: false,
            detail: String::new(),
        };
        match tokio::join!(self.docker.version(), self.docker.info()) {
            (Ok(v), Ok(sys)) => {
                out.version = v.version.unwrap_or_default();
                out.healthy = true;
                out.checkpoint = sys.experimental_build == Some(true);
                if !out.checkpoint {
                    out.detail =
                        format!("dockerd on {} runs without --experimental: no checkpoints", self.socket.display());
                }
            }
            (Err(e), _) | (_, Err(e)) => out.detail = format!("dockerd on {}: {}", self.socket.display(), describe(&e)),
        }
        out
    }

    async fn run(&self, req: &RunRequest) -> Result<WorkloadStatus, RuntimeError> {
        info!(workload = %req.spec.name, image = %req.image.reference, "docker run");
        self.create_and_start(&req.spec, &req.image, None).await
    }

    async fn stop(&self, name: &str, grace: Duration) -> Result<(), RuntimeError> {
        // its holder keeps the ports until the workload is removed
        self.inspect(name).await?;
        info!(workload = name, ?grace, "docker stop");
        let t = grace.as_secs_f64().ceil() as i32;
        // The request lasts as long as the grace period: give it that much more time.
        let docker = self.docker.clone().with_timeout(grace + Duration::from_secs(REQUEST_TIMEOUT_SECS));
        let opts = StopContainerOptions { t: Some(t), ..Default::default() };
        docker.stop_container(name, Some(opts)).await.map_err(|e| self.api_error("stop", name, e))
    }

    async fn remove(&self, name: &str) -> Result<(), RuntimeError> {
        let c = self.inspect(name).await?;
        info!(workload = name, "docker remove");
        // Checkpoints in the container's own directory go with it; say so explicitly, as
        // dockerd keeps them only while experimental is on. Archives written to a
        // CheckpointOptions.dir belong to the caller and stay.
        match self.docker.list_checkpoints(name, None::<ListCheckpointsOptions>).await {
            Ok(list) => {
                for c in list {
                    if let Err(e) = self.docker.delete_checkpoint(name, &c.name, None::<DeleteCheckpointOptions>).await
                    {
                        debug!(workload = name, checkpoint = %c.name, "cannot delete checkpoint: {}", describe(&e));
                    }
                }
            }
            Err(e) => debug!(workload = name, "cannot list checkpoints: {}", describe(&e)),
        }
        let opts = RemoveContainerOptions { force: true, v: true, ..Default::default() };
        self.docker.remove_container(name, Some(opts)).await.map_err(|e| self.api_error("remove", name, e))?;
        self.remove_netns_holder(name, netns_holder(&c)).await;
        Ok(())
    }

    async fn status(&self, name: &str) -> Result<WorkloadStatus, RuntimeError> {
        let c = self.inspect(name).await?;
        let mut st = to_status(name, &c);
        // the workload's ports are published on its holder
        if let Some(holder) = netns_holder(&c) {
            if let Ok(h) = self.docker.inspect_container(holder, None).await {
                st.ports = published_ports(&h);
            }
        }
        Ok(st)
    }

    async fn list(&self) -> Result<Vec<WorkloadStatus>, RuntimeError> {
        let opts = ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([("label".to_string(), vec![LABEL_WORKLOAD.to_string()])])),
            ..Default::default()
        };
        let found = self.docker.list_containers(Some(opts)).await.map_err(|e| self.api_error("list", "*", e))?;
        let mut out = Vec::new();
        for c in found {
            let Some(name) = c.labels.as_ref().and_then(|l| l.get(LABEL_WORKLOAD)) else {
                continue;
            };
            match self.status(name).await {
                Ok(st) => out.push(st),
                // removed (or renamed) between the list and the inspect
                Err(RuntimeError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn logs(&self, name: &str, follow: bool) -> Result<LogStream, RuntimeError> {
        self.inspect(name).await?;
        let opts = LogsOptions { follow, stdout: true, stderr: true, tail: "all".into(), ..Default::default() };
        let owned = name.to_string();
        let socket = self.socket.clone();
        let stream = self.docker.logs(name, Some(opts)).map_ok(|out| out.into_bytes().to_vec()).map_err(move |e| {
            if is_transport(&e) {
                RuntimeError::Unavailable {
                    runtime: KIND,
                    reason: format!("logs of {owned:?} on {}: {}", socket.display(), describe(&e)),
                }
            } else {
                RuntimeError::Failed { runtime: KIND, op: "read logs of", name: owned.clone(), message: describe(&e) }
            }
        });
        Ok(Box::pin(stream))
    }

    async fn prepare_image(&self, image: &ResolvedImage) -> Result<(), RuntimeError> {
        // a load under way for the restore too is harmless: the engine keeps one image
        self.ensure_image(image).await
    }

    async fn checkpoint(&self, name: &str, opts: &CheckpointOptions) -> Result<CheckpointArchive, RuntimeError> {
        // each step is timed for a migration's report (crate::steps)
        let t = Instant::now();
        let c = self.inspect(name).await?;
        let st = to_status(name, &c);
        if st.state != WorkloadState::Running {
            return Err(RuntimeError::Failed {
                runtime: KIND,
                op: "checkpoint",
                name: name.into(),
                message: format!("it is {}, not running", st.state),
            });
        }
        let (spec, image) = spec_and_image(name, &c, "checkpoint")?;
        let (parent, id) = checkpoint_location(&opts.dir, true)?;
        let dir = parent.join(&id);
        info!(workload = name, dir = %dir.display(), leave_running = opts.leave_running, "docker checkpoint");
        let t = steps::lap("inspect", t);
        // Docker writes the CRIU images to <CheckpointDir>/<CheckpointID>: so the archive's
        // dir itself holds them, and restore needs nothing but that dir.
        let create = CreateCheckpointOptions {
            checkpoint_id: id.clone(),
            checkpoint_dir: Some(parent.to_string_lossy().into_owned()),
            exit: !opts.leave_running,
        };
        if let Err(e) = self.docker.create_checkpoint(name, create).await {
            // dockerd removes its own half-written dir; make sure nothing is left either way
            let _ = std::fs::remove_dir_all(&dir);
            return Err(self.api_error("checkpoint", name, e));
        }
        // containerd's shim dumps with CRIU into a temporary dir, containerd tars that
        // into its content store, and dockerd unpacks the tar into `dir`
        let t = steps::lap("docker-checkpoint", t);
        // The images hold the process's memory: owner only.
        set_owner_only(&dir)?;
        // the filesystem half of the state: what the workload wrote to its rootfs
        if let Some(upper) = upper_dir(&c) {
            crate::rootfs::capture(Path::new(&upper), &dir.join(crate::rootfs::ROOTFS_DIFF))?;
        }
        let bytes = crate::runtime::dir_bytes(&dir);
        steps::lap("rootfs-diff", t);
        Ok(CheckpointArchive { workload: name.into(), runtime: KIND, dir, bytes, spec, image })
    }

    /// Docker names are per engine: a target agent on the same engine needs the name,
    /// so the stopped source container is renamed `<name>.away-moving-<ms>` until the
    /// move is confirmed (then removed) or failed (then replaced by the restored source).
    async fn step_aside(&self, name: &str) -> Result<Option<String>, RuntimeError> {
        let c = self.inspect(name).await?;
        let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        let new_name = format!("{name}{SET_ASIDE}{ms}");
        self.docker
            .rename_container(name, RenameContainerOptions { name: new_name.clone() })
            .await
            .map_err(|e| self.api_error("rename", name, e))?;
        // The stopped source's holder still publishes its ports: the copy restored on this
        // engine (or the source, restored again after a failed move) gets its own holder.
        self.remove_netns_holder(name, netns_holder(&c)).await;
        Ok(Some(new_name))
    }

    async fn step_back(&self, aside: &str, name: &str) -> Result<(), RuntimeError> {
        self.docker
            .rename_container(aside, RenameContainerOptions { name: name.into() })
            .await
            .map_err(|e| self.api_error("rename", aside, e))
    }

    /// Docker's checkpoint API has no page server (and writes the images three times:
    /// CRIU's temporary dir, containerd's content store, the checkpoint dir), so a lazy
    /// dump runs runc directly against the state dockerd's shim keeps, as containerd's
    /// backend does. The images stay Docker's: [`Runtime::restore`] starts them through
    /// the engine. CRIU runs with the options Docker's own checkpoint gives it (no
    /// `--tcp-established`, no `--file-locks`), so that the engine's restore, which
    /// passes none either, takes what it wrote.
    async fn checkpoint_lazy(&self, name: &str, opts: &LazyCheckpointOptions) -> Result<LazyDump, RuntimeError> {
        let t = Instant::now();
        let c = self.inspect(name).await?;
        let failed = |message: String| RuntimeError::Failed {
            runtime: KIND,
            op: "checkpoint lazily",
            name: name.into(),
            message,
        };
        let (spec, image) = spec_and_image(name, &c, "checkpoint lazily")?;
        let id = c.id.clone().ok_or_else(|| failed("dockerd reports no container ID".into()))?;
        let pid = match c.state.as_ref().and_then(|s| s.pid) {
            Some(pid) if pid > 0 && c.state.as_ref().and_then(|s| s.running) == Some(true) => pid,
            _ => return Err(failed("it is not running".into())),
        };
        let root = Path::new(DOCKER_RUNC_ROOT);
        if !root.join(&id).join("state.json").is_file() {
            return Err(failed(format!(
                "runc keeps no state for it in {} (dockerd with a non-default --exec-root or runtime?)",
                root.display()
            )));
        }
        crate::runtime::create_private_dir(&opts.dir)?;
        let work = opts.dir.join(crate::runtime::CRIU_WORK_DIR);
        let runc = RuncCheckpoint {
            root: Some(root.to_path_buf()),
            lazy_pages: true,
            status_fd: Some(crate::runtime::LAZY_STATUS_FD),
            tcp_established: false,
            file_locks: false,
            page_server: Some(std::net::SocketAddr::from(([127, 0, 0, 1], opts.page_server_port))),
            image_path: opts.dir.clone(),
            work_path: Some(work.clone()),
            container: id,
        };
        let netns = PathBuf::from(format!("/proc/{pid}/ns/net"));
        info!(workload = name, dir = %opts.dir.display(), "docker checkpoint through runc, memory on a page server");
        let t = steps::lap("inspect", t);
        let child = crate::runtime::spawn_lazy_dump(KIND, name, &runc, &netns, &opts.dir).await?;
        let t = steps::lap("runc-dump", t);
        let dump = LazyDump {
            archive: CheckpointArchive {
                workload: name.into(),
                runtime: KIND,
                bytes: crate::runtime::dir_bytes(&opts.dir),
                dir: opts.dir.clone(),
                spec,
                image,
            },
            child,
            log: work.join("dump.log"),
            page_server: std::net::SocketAddr::from(([127, 0, 0, 1], opts.page_server_port)),
            netns,
        };
        if let Some(upper) = upper_dir(&c) {
            if let Err(e) = crate::rootfs::capture(Path::new(&upper), &opts.dir.join(crate::rootfs::ROOTFS_DIFF)) {
                // the process is frozen and CRIU waits for a page client: let it go
                dump.abort().await;
                return Err(e);
            }
        }
        steps::lap("rootfs-diff", t);
        Ok(dump)
    }

    async fn restore(&self, req: &RestoreRequest) -> Result<WorkloadStatus, RuntimeError> {
        let spec = &req.archive.spec;
        let dir = &req.archive.dir;
        if !dir.is_dir() {
            return Err(RuntimeError::Invalid {
                field: "dir".into(),
                reason: format!("checkpoint {} of {:?} is not a directory", dir.display(), spec.name),
            });
        }
        checkpoint_location(dir, false)?;
        info!(workload = %spec.name, dir = %dir.display(), image = %req.image.reference, "docker restore");
        self.create_and_start(spec, &req.image, Some(dir)).await
    }
}

/// bollard 0.21 covers checkpoint create/list/delete, but its StartContainerOptions has
/// no `checkpoint` parameter, and it has no generic request method. Its public request
/// modifier lets one call add `checkpoint=NAME` to the query of POST /containers/{id}/start,
/// so the request still goes over the same socket with bollard's API version, timeout and
/// error decoding: no second HTTP client, no docker CLI.
fn with_checkpoint_query(docker: &Docker, checkpoint: &str) -> Docker {
    let query = format!("checkpoint={}", percent_encode(checkpoint));
    docker.clone().with_request_modifier(move |mut req| {
        let uri = req.uri().to_string();
        let sep = if uri.contains('?') { '&' } else { '?' };
        // The query is percent-encoded, so parsing cannot fail; if it did, the default URI
        // ("/", naming no socket) fails the request instead of starting the container fresh.
        *req.uri_mut() = format!("{uri}{sep}{query}").parse().unwrap_or_default();
        req
    })
}

/// The workload spec and image a container was created from (its labels).
fn spec_and_image(
    name: &str,
    c: &ContainerInspectResponse,
    op: &'static str,
) -> Result<(WorkloadSpec, String), RuntimeError> {
    let labels = c.config.as_ref().and_then(|cfg| cfg.labels.as_ref());
    let spec = labels.and_then(|l| l.get(LABEL_SPEC)).and_then(|s| serde_json::from_str(s).ok()).ok_or_else(|| {
        RuntimeError::Failed {
            runtime: KIND,
            op,
            name: name.into(),
            message: format!("label {LABEL_SPEC} is missing or not a spec"),
        }
    })?;
    Ok((spec, labels.and_then(|l| l.get(LABEL_IMAGE)).cloned().unwrap_or_default()))
}

/// Where dockerd's runc keeps its containers' state: dockerd's default exec root
/// (`/run/docker`), its runtime's dir there, and the containerd namespace `moby`.
const DOCKER_RUNC_ROOT: &str = "/run/docker/runtime-runc/moby";

/// Suffix of a stopped source container set aside during a move.
const SET_ASIDE: &str = ".away-moving-";

/// The overlay2 upper directory of a container (its rootfs changes).
fn upper_dir(c: &ContainerInspectResponse) -> Option<String> {
    c.graph_driver.as_ref().and_then(|g| g.data.get("UpperDir")).cloned()
}

/// Place a checkpoint (a flat dir of CRIU images, but recursively all the same) at `to`:
/// hard links where `to` is on the same filesystem (dockerd and containerd only read
/// the files, and the caller's archive keeps its own names), else copies. Returns the
/// bytes copied. The checkpoint came from a peer: each file is first opened beneath
/// `from` (no symlink on the way), and anything but files and directories is refused.
fn link_or_copy_dir(from: &Path, to: &Path) -> Result<u64, RuntimeError> {
    let src = crate::host::beneath::Beneath::open(from)?;
    place_beneath(&src, Path::new(""), to)
}

fn place_beneath(src: &crate::host::beneath::Beneath, rel: &Path, to: &Path) -> Result<u64, RuntimeError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let io = |what: &str, path: &Path| {
        let context = format!("{what} {}", path.display());
        move |e| RuntimeError::io(context, e)
    };
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(to).map_err(io("create", to))?;
    let here = src.path().join(rel);
    let mut copied = 0;
    for entry in std::fs::read_dir(&here).map_err(io("read", &here))? {
        let entry = entry.map_err(io("read", &here))?;
        let (name, target) = (rel.join(entry.file_name()), to.join(entry.file_name()));
        // the entry's own type (lstat): a symlink is not followed
        let kind = entry.file_type().map_err(io("stat", &entry.path()))?;
        if kind.is_dir() {
            copied += place_beneath(src, &name, &target)?;
        } else if kind.is_file() {
            // beneath and not a link, checked on the file itself before it is linked or read
            let mut file = src.open_file(&name)?;
            if std::fs::hard_link(entry.path(), &target).is_err() {
                let mut out = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&target)
                    .map_err(io("create", &target))?;
                copied += std::io::copy(&mut file, &mut out).map_err(io("copy to", &target))?;
            }
        } else {
            return Err(RuntimeError::Invalid {
                field: "checkpoint".into(),
                reason: format!("{} is neither a file nor a directory", entry.path().display()),
            });
        }
    }
    Ok(copied)
}

/// Docker names checkpoints `<CheckpointDir>/<CheckpointID>`: split an archive dir into
/// the two, absolute (dockerd resolves relative paths against its own cwd). With
/// `create`, prepare for dockerd to create the dir (it refuses an existing one).
fn checkpoint_location(dir: &Path, create: bool) -> Result<(PathBuf, String), RuntimeError> {
    let invalid = |reason: String| RuntimeError::Invalid { field: "dir".into(), reason };
    let id = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // dockerd's rule for checkpoint IDs
    let valid_id = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !valid_id {
        return Err(invalid(format!("{}: the last component must match [a-zA-Z0-9][a-zA-Z0-9_.-]*", dir.display())));
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if create {
        std::fs::create_dir_all(&parent).map_err(|e| RuntimeError::io(format!("create {}", parent.display()), e))?;
        if dir.exists() {
            let empty = std::fs::read_dir(dir)
                .map_err(|e| RuntimeError::io(format!("read {}", dir.display()), e))?
                .next()
                .is_none();
            if !empty {
                return Err(invalid(format!("{} already exists and is not empty", dir.display())));
            }
            std::fs::remove_dir(dir).map_err(|e| RuntimeError::io(format!("remove empty {}", dir.display()), e))?;
        }
    }
    let parent = parent.canonicalize().map_err(|e| RuntimeError::io(format!("resolve {}", parent.display()), e))?;
    Ok((parent, id))
}

fn set_owner_only(dir: &Path) -> Result<(), RuntimeError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| RuntimeError::io(format!("chmod 0700 {}", dir.display()), e))
}

/// Docker's port bindings for a spec's ports, on every host address.
fn port_bindings(spec: &WorkloadSpec) -> HashMap<String, Option<Vec<PortBinding>>> {
    let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    for p in &spec.ports {
        let binding = PortBinding { host_ip: Some("0.0.0.0".into()), host_port: Some(p.host_port().to_string()) };
        bindings
            .entry(format!("{}/tcp", p.container))
            .or_insert_with(|| Some(Vec::new()))
            .get_or_insert_with(Vec::new)
            .push(binding);
    }
    bindings
}

/// `host:container` of each port a container publishes.
fn published_ports(c: &ContainerInspectResponse) -> Vec<String> {
    let mut ports: Vec<String> = c
        .host_config
        .as_ref()
        .and_then(|h| h.port_bindings.as_ref())
        .into_iter()
        .flatten()
        .flat_map(|(key, bindings)| {
            let container = key.split('/').next().unwrap_or(key).to_string();
            bindings.iter().flatten().map(move |b| format!("{}:{container}", b.host_port.as_deref().unwrap_or("")))
        })
        .collect();
    ports.sort();
    ports.dedup();
    ports
}

/// The ID of the holder whose network namespace a workload joined (none for workloads
/// created before holders existed).
fn netns_holder(c: &ContainerInspectResponse) -> Option<&str> {
    c.host_config.as_ref()?.network_mode.as_deref()?.strip_prefix("container:")
}

fn to_status(name: &str, c: &ContainerInspectResponse) -> WorkloadStatus {
    let state = c.state.as_ref();
    let status = state.and_then(|s| s.status);
    let mapped = match status {
        Some(ContainerStateStatusEnum::CREATED) => WorkloadState::Created,
        Some(ContainerStateStatusEnum::RUNNING | ContainerStateStatusEnum::RESTARTING) => WorkloadState::Running,
        Some(ContainerStateStatusEnum::PAUSED) => WorkloadState::Paused,
        Some(
            ContainerStateStatusEnum::EXITED
            | ContainerStateStatusEnum::DEAD
            | ContainerStateStatusEnum::REMOVING
            | ContainerStateStatusEnum::STOPPING,
        ) => WorkloadState::Stopped,
        Some(ContainerStateStatusEnum::EMPTY) | None => WorkloadState::Unknown,
    };
    let labels = c.config.as_ref().and_then(|cfg| cfg.labels.as_ref());
    let image = labels
        .and_then(|l| l.get(LABEL_IMAGE))
        .cloned()
        .or_else(|| c.config.as_ref().and_then(|cfg| cfg.image.clone()))
        .unwrap_or_default();
    let ports = published_ports(c);
    let mut detail = Vec::new();
    if state.and_then(|s| s.oom_killed) == Some(true) {
        detail.push("oom-killed".to_string());
    }
    if let Some(err) = state.and_then(|s| s.error.as_deref()).filter(|e| !e.is_empty()) {
        detail.push(err.to_string());
    }
    WorkloadStatus {
        name: name.to_string(),
        runtime: KIND,
        state: mapped,
        image,
        pid: state.and_then(|s| s.pid).filter(|p| *p > 0).map(|p| p as u32),
        exit_code: if mapped == WorkloadState::Stopped { state.and_then(|s| s.exit_code) } else { None },
        ports,
        detail: detail.join("; "),
    }
}

/// `docker.io/away/counter:latest` -> (`docker.io/away/counter`, `latest`); no tag means `latest`.
fn split_reference(reference: &str) -> (&str, &str) {
    match reference.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, tag),
        _ => (reference, "latest"),
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn status_code(e: &BollardError) -> Option<u16> {
    match e {
        BollardError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// The daemon could not be reached (as opposed to answering with an error).
fn is_transport(e: &BollardError) -> bool {
    matches!(
        e,
        BollardError::HyperLegacyError { .. }
            | BollardError::IOError { .. }
            | BollardError::RequestTimeoutError
            | BollardError::SocketNotFoundError(_)
            | BollardError::HyperResponseError { .. }
    )
}

/// dockerd's own message when it answered, else bollard's.
fn describe(e: &BollardError) -> String {
    match e {
        BollardError::DockerResponseServerError { status_code, message } => {
            format!("dockerd answered {status_code}: {}", message.trim())
        }
        other => other.to_string(),
    }
}

/// A capability as Docker's API takes it (`CAP_` name; the spec was validated).
fn cap_name(c: &str) -> String {
    away_model::capability_name(c).map_or_else(|| c.to_string(), str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_split_into_repo_and_tag() {
        assert_eq!(split_reference("docker.io/away/counter:latest"), ("docker.io/away/counter", "latest"));
        assert_eq!(split_reference("localhost:5000/away/counter"), ("localhost:5000/away/counter", "latest"));
        assert_eq!(split_reference("away.local/abc"), ("away.local/abc", "latest"));
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(percent_encode("/tmp/a b&c"), "%2Ftmp%2Fa%20b%26c");
        assert_eq!(percent_encode("ckpt-1.x_y"), "ckpt-1.x_y");
    }

    #[test]
    fn checkpoints_are_placed_as_links_on_one_filesystem() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let from = tmp.path().join("ckpt");
        std::fs::create_dir_all(from.join("work")).unwrap();
        std::fs::write(from.join("pages-1.img"), b"pages").unwrap();
        std::fs::write(from.join("work").join("dump.log"), b"log").unwrap();
        let to = tmp.path().join("docker").join("checkpoints").join("ckpt");
        assert_eq!(link_or_copy_dir(&from, &to).unwrap(), 0, "nothing copied within one filesystem");
        let (a, b) =
            (std::fs::metadata(from.join("pages-1.img")).unwrap(), std::fs::metadata(to.join("pages-1.img")).unwrap());
        assert_eq!(a.ino(), b.ino());
        assert_eq!(std::fs::read(to.join("work").join("dump.log")).unwrap(), b"log");
        // dockerd deletes its copy after the start: the archive keeps its files
        std::fs::remove_dir_all(&to).unwrap();
        assert_eq!(std::fs::read(from.join("pages-1.img")).unwrap(), b"pages");
    }

    #[test]
    fn placing_a_checkpoint_never_reads_through_a_link() {
        let tmp = tempfile::tempdir().unwrap();
        let secret = tmp.path().join("secret");
        std::fs::write(&secret, b"root only").unwrap();
        let from = tmp.path().join("archive");
        std::fs::create_dir_all(&from).unwrap();
        std::fs::write(from.join("pages-1.img"), b"pages").unwrap();
        std::os::unix::fs::symlink(&secret, from.join("core-1.img")).unwrap();
        let to = tmp.path().join("docker").join("checkpoints").join("ckpt");
        let err = link_or_copy_dir(&from, &to).unwrap_err().to_string();
        assert!(err.contains("core-1.img"), "the entry is named: {err}");
        assert!(!to.join("core-1.img").exists(), "the link's target was not copied");
    }

    #[test]
    fn checkpoint_dirs_split_into_docker_dir_and_id() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ckpt-1");
        std::fs::create_dir(&dir).unwrap();
        let (parent, id) = checkpoint_location(&dir, true).unwrap();
        assert_eq!((parent, id.as_str()), (tmp.path().canonicalize().unwrap(), "ckpt-1"));
        assert!(!dir.exists(), "an empty dir is removed so that dockerd can create it");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("x"), b"x").unwrap();
        assert!(matches!(checkpoint_location(&dir, true), Err(RuntimeError::Invalid { .. })));
        assert!(matches!(checkpoint_location(&tmp.path().join("bad name"), true), Err(RuntimeError::Invalid { .. })));
    }
}
