//! Checkpoint and restore: through containerd's task API (CRIU via the runc shim), and
//! lazily (post-copy) with runc directly, which containerd's checkpoint cannot do.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use away_model::{WorkloadSpec, WorkloadState, WorkloadStatus};
use containerd_client::services::v1 as api;
use containerd_client::services::v1::snapshots as snap;

use super::{any, ContainerdRuntime, KIND, LABEL_SPEC, SNAPSHOTTER};
use crate::host::criu_args::RuncCheckpoint;
use crate::runtime::{
    CheckpointArchive, CheckpointOptions, LazyCheckpointOptions, LazyDump, RestoreRequest, RuntimeError,
};

/// Where containerd's runc shim keeps runc's state, per namespace (its default root).
const RUNC_SHIM_ROOT: &str = "/run/containerd/runc";
/// The CRIU configuration of an overlay workload's restore.
const CRIU_TCP_CONF: &str = "criu-tcp.conf";

#[derive(Clone, PartialEq, prost::Message)]
struct RuncCheckpointOptions {
    #[prost(bool, tag = "1")]
    exit: bool,
    #[prost(bool, tag = "2")]
    open_tcp: bool,
    #[prost(bool, tag = "3")]
    external_unix_sockets: bool,
    #[prost(bool, tag = "4")]
    terminal: bool,
    #[prost(bool, tag = "5")]
    file_locks: bool,
    #[prost(string, tag = "8")]
    image_path: String,
    #[prost(string, tag = "9")]
    work_path: String,
}

impl ContainerdRuntime {
    /// Before a checkpoint: the container, its workload spec, the (new, owner-only)
    /// checkpoint directory and CRIU's work directory in it.
    async fn prepare_checkpoint(
        &self,
        name: &str,
        dir: &Path,
        op: &'static str,
    ) -> Result<(api::Container, WorkloadSpec, PathBuf), RuntimeError> {
        let c = self
            .get_container(name)
            .await?
            .ok_or_else(|| RuntimeError::NotFound { runtime: KIND, name: name.into() })?;
        let spec = Self::spec_label(&c, op)?;
        crate::runtime::create_private_dir(dir)?;
        Ok((c, spec, dir.join(crate::runtime::CRIU_WORK_DIR)))
    }

    /// The workload spec a container was created from.
    pub(super) fn spec_label(c: &api::Container, op: &'static str) -> Result<WorkloadSpec, RuntimeError> {
        c.labels.get(LABEL_SPEC).and_then(|s| serde_json::from_str(s).ok()).ok_or_else(|| RuntimeError::Failed {
            runtime: KIND,
            op,
            name: c.id.clone(),
            message: "container carries no away.spec label".into(),
        })
    }

    /// The filesystem half of a checkpoint: what the workload wrote to its rootfs.
    async fn capture_rootfs(&self, name: &str, dir: &Path) -> Result<(), RuntimeError> {
        let mut snaps = snap::snapshots_client::SnapshotsClient::new(self.channel.clone());
        let mounts = snaps
            .mounts(self.req(snap::MountsRequest { snapshotter: SNAPSHOTTER.into(), key: name.into() }))
            .await
            .map_err(|s| Self::failed("read snapshot mounts", name, s))?
            .into_inner()
            .mounts;
        if let Some(upper) = mounts.iter().find_map(|m| crate::rootfs::upperdir(&m.options)) {
            crate::rootfs::capture(Path::new(upper), &dir.join(crate::rootfs::ROOTFS_DIFF))?;
        }
        Ok(())
    }

    pub(super) async fn checkpoint_task(
        &self,
        name: &str,
        opts: &CheckpointOptions,
    ) -> Result<CheckpointArchive, RuntimeError> {
        let (c, spec, work) = self.prepare_checkpoint(name, &opts.dir, "checkpoint").await?;
        let options = RuncCheckpointOptions {
            exit: !opts.leave_running,
            open_tcp: true,
            external_unix_sockets: false,
            terminal: false,
            file_locks: true,
            image_path: opts.dir.display().to_string(),
            work_path: work.display().to_string(),
        };
        let mut ts = api::tasks_client::TasksClient::new(self.channel.clone());
        let clock = std::time::Instant::now();
        let checkpointed = ts
            .checkpoint(self.req(api::CheckpointTaskRequest {
                container_id: name.into(),
                parent_checkpoint: String::new(),
                options: Some(any("containerd.runc.v1.CheckpointOptions", &options)),
            }))
            .await
            .map_err(|s| RuntimeError::Failed {
                runtime: KIND,
                op: "checkpoint",
                name: name.into(),
                message: format!("{}{}", s.message(), crate::runtime::criu_log_errors(&work.join("dump.log"))),
            });
        checkpointed?;
        // the steps a move's report shows as its checkpoint's parts: the shim's call runs
        // runc, which runs CRIU (its own time from its log)
        crate::runtime::record_criu_call(clock.elapsed(), &work.join("dump.log"), "criu-dump");
        let lap = std::time::Instant::now();
        self.capture_rootfs(name, &opts.dir).await?;
        let mut lap = crate::steps::lap("rootfs-diff", lap);
        if !spec.volumes.is_empty() {
            self.volumes.capture(&spec, &opts.dir, opts.volumes_sent.as_deref())?;
            lap = crate::steps::lap("volumes", lap);
        }
        if !opts.leave_running && !opts.release_later {
            // the process exited with the dump; reap the task so the name can be reused
            self.kill_and_delete_task(name, Duration::ZERO).await?;
            crate::steps::lap("task-delete", lap);
        }
        Ok(archive_of(name, &opts.dir, spec, c.image))
    }

    /// Dump with runc directly (containerd's checkpoint has no lazy mode), against the
    /// state the shim keeps for the container; the shim sees the process exit once
    /// every page has moved.
    pub(super) async fn checkpoint_task_lazily(
        &self,
        name: &str,
        opts: &LazyCheckpointOptions,
    ) -> Result<LazyDump, RuntimeError> {
        let (c, spec, work) = self.prepare_checkpoint(name, &opts.dir, "checkpoint lazily").await?;
        let pid = match self.get_task(name).await? {
            Some(p) if p.pid > 0 => p.pid,
            _ => {
                return Err(RuntimeError::Failed {
                    runtime: KIND,
                    op: "checkpoint lazily",
                    name: name.into(),
                    message: "it has no running task".into(),
                })
            }
        };
        // CRIU runs in the container's network namespace, so that it neither dumps nor
        // locks the node's; an overlay workload's own namespace is external to CRIU
        // instead (runc declares it), so that the restore can be put into the one the
        // target prepared: CRIU then runs in the node's namespace (the agent's, which
        // is containerd's too) and locks only the workload's
        let netns = match spec.overlay {
            Some(_) => PathBuf::from(format!("/proc/{}/ns/net", std::process::id())),
            None => PathBuf::from(format!("/proc/{pid}/ns/net")),
        };
        let child = crate::runtime::spawn_lazy_dump(
            KIND,
            name,
            &runc_lazy_checkpoint(&self.namespace, name, opts, &work),
            &netns,
            &opts.dir,
        )
        .await?;
        let dump = LazyDump {
            archive: archive_of(name, &opts.dir, spec, c.image),
            child,
            log: work.join("dump.log"),
            page_server: std::net::SocketAddr::from(([127, 0, 0, 1], opts.page_server_port)),
            netns,
        };
        let captured = match self.capture_rootfs(name, &opts.dir).await {
            Ok(()) => self.volumes.capture(&dump.archive.spec, &opts.dir, opts.volumes_sent.as_deref()),
            Err(e) => Err(e),
        };
        if let Err(e) = captured {
            // the process is frozen and CRIU waits for a page client: let it go
            dump.abort().await;
            return Err(e);
        }
        Ok(dump)
    }

    pub(super) async fn restore_task_lazily(
        &self,
        req: &RestoreRequest,
        pages_up: crate::runtime::LazyPagesUp,
    ) -> Result<WorkloadStatus, RuntimeError> {
        let spec = &req.archive.spec;
        if self.get_container(&spec.name).await?.is_some() {
            return Err(RuntimeError::AlreadyExists { runtime: KIND, name: spec.name.clone() });
        }
        // One CRIU option turns the shim's restore into a lazy one. The file only lives
        // during the restore: the container keeps the annotation, and a later checkpoint
        // of it must not find the file.
        // (written beneath the received directory: never through a link a peer put there)
        let conf = req.archive.dir.join("criu-lazy.conf");
        let options: &[u8] = match (&spec.overlay, req.close_connections) {
            (None, _) => b"lazy-pages\n",
            (Some(_), false) => b"lazy-pages\ntcp-established\n",
            (Some(_), true) => b"lazy-pages\ntcp-close\n",
        };
        crate::host::beneath::Beneath::open(&req.archive.dir)?.write("criu-lazy.conf", options)?;
        let result = self.create_and_start(spec, &req.image, Some(&req.archive.dir), Some(&conf), Some(pages_up)).await;
        let _ = std::fs::remove_file(&conf);
        if result.is_err() {
            // a restore killed mid-way (its page daemon gone) leaves CRIU's root mount
            // in runc's state directory, which would refuse the next restore of this name
            let state = Path::new(RUNC_SHIM_ROOT).join(&self.namespace).join(&spec.name);
            let criu_root = state.join("criu-root");
            if criu_root.exists() {
                let _ = std::process::Command::new("umount").arg("-l").arg(&criu_root).status();
            }
            if self.get_task(&spec.name).await.ok().flatten().is_none() {
                let _ = std::fs::remove_dir_all(&state);
            }
        }
        result
    }

    pub(super) async fn restore_task(&self, req: &RestoreRequest) -> Result<WorkloadStatus, RuntimeError> {
        let spec = &req.archive.spec;
        // restoring in place of a checkpointed (stopped) container: it gives way first
        if let Some(existing) = self.get_container(&spec.name).await? {
            let task = self.get_task(&spec.name).await?;
            if self.to_status(&existing, task.as_ref()).state == WorkloadState::Running {
                return Err(RuntimeError::AlreadyExists { runtime: KIND, name: spec.name.clone() });
            }
            self.remove_workload(&spec.name).await?;
        }
        if spec.overlay.is_none() {
            return self.create_and_start(spec, &req.image, Some(&req.archive.dir), None, None).await;
        }
        // the workload's own namespace was dumped with its TCP connections (containerd's
        // checkpoint asks runc for --tcp-established), but containerd's restore passes
        // runc no such option: CRIU gets it from a configuration file, as a lazy restore
        // gets lazy-pages (the file lives only during the restore)
        let conf = req.archive.dir.join(CRIU_TCP_CONF);
        let tcp: &[u8] = if req.close_connections { b"tcp-close\n" } else { b"tcp-established\n" };
        crate::host::beneath::Beneath::open(&req.archive.dir)?.write(CRIU_TCP_CONF, tcp)?;
        let result = self.create_and_start(spec, &req.image, Some(&req.archive.dir), Some(&conf), None).await;
        let _ = std::fs::remove_file(&conf);
        result
    }
}

/// runc's lazy checkpoint of container `name` of containerd namespace `namespace`: against
/// the state its shim keeps, with the page server on the container's loopback.
fn runc_lazy_checkpoint(namespace: &str, name: &str, opts: &LazyCheckpointOptions, work: &Path) -> RuncCheckpoint {
    RuncCheckpoint {
        root: Some(Path::new(RUNC_SHIM_ROOT).join(namespace)),
        lazy_pages: true,
        status_fd: Some(crate::runtime::LAZY_STATUS_FD),
        tcp_established: true,
        file_locks: true,
        page_server: Some(SocketAddr::from(([127, 0, 0, 1], opts.page_server_port))),
        image_path: opts.dir.clone(),
        work_path: Some(work.to_path_buf()),
        container: name.into(),
    }
}

/// A checkpoint of workload `name` written to `dir`.
fn archive_of(name: &str, dir: &Path, spec: WorkloadSpec, image: String) -> CheckpointArchive {
    CheckpointArchive {
        workload: name.into(),
        runtime: KIND,
        bytes: crate::runtime::dir_bytes(dir),
        dir: dir.to_path_buf(),
        spec,
        image,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lazy_checkpoint_runs_runc_as_before() {
        let opts =
            LazyCheckpointOptions { dir: "/var/lib/away/out/c1".into(), page_server_port: 27001, volumes_sent: None };
        let argv = runc_lazy_checkpoint("away-b", "c1", &opts, Path::new("/var/lib/away/out/c1/criu-work")).args();
        #[rustfmt::skip]
        assert_eq!(argv, ["--root", "/run/containerd/runc/away-b", "checkpoint", "--lazy-pages", "--status-fd", "3",
            "--tcp-established", "--file-locks", "--page-server", "127.0.0.1:27001",
            "--image-path", "/var/lib/away/out/c1", "--work-path", "/var/lib/away/out/c1/criu-work", "c1"]);
    }
}
