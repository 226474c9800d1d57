//! containerd backend, through containerd's own gRPC API (containerd-client over tonic).
//!
//! containerd 1.6 has no server-side image import, so this module does what `ctr images
//! import` does on the client side: writes the image tar's blobs into the content store
//! under a lease, records the image, and unpacks its layers into overlayfs snapshots
//! through the diff service. Containers live in their own namespace (`away` by default),
//! use the host's (or the agent's) network namespace, and log to a file the runc shim
//! writes (`file://` stdio URIs).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use away_model::{RuntimeInfo, RuntimeKind, WorkloadSpec, WorkloadState, WorkloadStatus};
use containerd_client::services::v1 as api;
use containerd_client::services::v1::snapshots as snap;
use containerd_client::tonic::{self, transport::Channel, Code, Request};
use containerd_client::types::Descriptor;
use prost_types::Any;
use sha2::{Digest, Sha256};

use crate::runtime::{
    CheckpointArchive, CheckpointOptions, LazyCheckpointOptions, LazyDump, LogStream, RestoreRequest, RunRequest,
    Runtime, RuntimeError,
};
use crate::store::ResolvedImage;

const KIND: RuntimeKind = RuntimeKind::Containerd;
const SNAPSHOTTER: &str = "overlayfs";
const RUNC_V2: &str = "io.containerd.runc.v2";
/// Longest a lazy dump may take before its page server is up (it writes everything
/// but memory: small).
const LAZY_DUMP_TIMEOUT: Duration = Duration::from_secs(120);
/// Where containerd's runc shim keeps runc's state, per namespace (its default root).
const RUNC_SHIM_ROOT: &str = "/run/containerd/runc";
const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
const LABEL_WORKLOAD: &str = "away.workload";
const LABEL_IMAGE: &str = "away.image";
const LABEL_SPEC: &str = "away.spec";

/// runc shim options, not among containerd-client's compiled protos
/// (containerd/api/types/runc/options/oci.proto); only the fields away sets.
#[derive(Clone, PartialEq, prost::Message)]
struct RuncOptions {
    #[prost(string, tag = "10")]
    criu_image_path: String,
    #[prost(string, tag = "11")]
    criu_work_path: String,
}

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
}

impl ContainerdRuntime {
    /// Connect to containerd at `socket`; workloads go in `namespace`, logs in `log_dir`.
    pub async fn connect(socket: &Path, namespace: &str, log_dir: PathBuf) -> Result<Self, RuntimeError> {
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
        let rt = ContainerdRuntime { channel, socket: socket.to_path_buf(), namespace: namespace.to_string(), log_dir };
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

    // ---------------------------------------------------------------- images

    /// Make `image` available: content, image record and unpacked snapshots. Returns the
    /// chain ID of the top layer (the parent of the container's snapshot).
    async fn ensure_image(&self, image: &ResolvedImage) -> Result<String, RuntimeError> {
        let img_err = |reason: String| RuntimeError::Image { reference: image.reference.clone(), reason };
        let blobs = read_blobs(&image.tar).map_err(|e| img_err(format!("cannot read {}: {e}", image.tar.display())))?;
        let manifest_bytes = blobs.get(&image.manifest_digest).ok_or_else(|| {
            img_err(format!("manifest {} missing from {}", image.manifest_digest, image.tar.display()))
        })?;
        let manifest: serde_json::Value =
            serde_json::from_slice(manifest_bytes).map_err(|e| img_err(format!("manifest is not JSON: {e}")))?;
        let config_digest =
            manifest["config"]["digest"].as_str().ok_or_else(|| img_err("manifest has no config".into()))?.to_string();
        let config: serde_json::Value = serde_json::from_slice(
            blobs.get(&config_digest).ok_or_else(|| img_err(format!("config {config_digest} missing")))?,
        )
        .map_err(|e| img_err(format!("config is not JSON: {e}")))?;
        let layers: Vec<Descriptor> = manifest["layers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|l| Descriptor {
                media_type: l["mediaType"].as_str().unwrap_or_default().to_string(),
                digest: l["digest"].as_str().unwrap_or_default().to_string(),
                size: l["size"].as_i64().unwrap_or_default(),
                annotations: Default::default(),
            })
            .collect();
        let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|d| d.as_str().map(str::to_string))
            .collect();
        if diff_ids.len() != layers.len() {
            return Err(img_err(format!("{} layers but {} diff_ids in the config", layers.len(), diff_ids.len())));
        }

        // one import at a time on this node (other `away` processes too): two writers of
        // one blob or one snapshot chain would trip over containerd's ref locks
        let _import_lock = self.import_lock().await?;
        let lease = self.create_lease().await?;
        let result = async {
            // blobs: layers first, then config, then the manifest with GC references to both
            for l in &layers {
                self.write_blob(&lease, &l.digest, blob(&blobs, &l.digest).map_err(img_err)?, HashMap::new()).await?;
            }
            self.write_blob(&lease, &config_digest, blob(&blobs, &config_digest).map_err(img_err)?, HashMap::new())
                .await?;
            let mut refs = HashMap::from([("containerd.io/gc.ref.content.config".to_string(), config_digest.clone())]);
            for (i, l) in layers.iter().enumerate() {
                refs.insert(format!("containerd.io/gc.ref.content.l.{i}"), l.digest.clone());
            }
            self.write_blob(&lease, &image.manifest_digest, manifest_bytes, refs).await?;
            self.put_image_record(image, manifest_bytes.len() as i64).await?;
            let top = self.unpack(&lease, &layers, &diff_ids).await?;
            // Keep the unpacked snapshots as long as the image: without this GC reference
            // (the one containerd's own unpacker sets) they go once the lease is gone.
            let keep = HashMap::from([(format!("containerd.io/gc.ref.snapshot.{SNAPSHOTTER}"), top.clone())]);
            self.write_blob(&lease, &config_digest, blob(&blobs, &config_digest).map_err(img_err)?, keep).await?;
            Ok(top)
        }
        .await;
        self.delete_lease(&lease).await;
        result
    }

    async fn import_lock(&self) -> Result<std::fs::File, RuntimeError> {
        let dir = self.log_dir.parent().unwrap_or(Path::new("/tmp")).join("locks");
        let path = dir.join(format!("containerd-import-{}.lock", self.namespace));
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)?;
            let f = std::fs::File::create(&path)?;
            f.lock()?;
            Ok::<_, std::io::Error>(f)
        })
        .await
        .expect("lock thread")
        .map_err(|e| RuntimeError::io("lock the containerd image import", e))
    }

    async fn create_lease(&self) -> Result<String, RuntimeError> {
        let mut l = api::leases_client::LeasesClient::new(self.channel.clone());
        let id = format!("away-import-{}-{}", std::process::id(), rand_suffix());
        // expire on its own if we die mid-import
        let labels = HashMap::from([("containerd.io/gc.expire".to_string(), rfc3339_in(Duration::from_secs(3600)))]);
        l.create(self.req(api::CreateRequest { id: id.clone(), labels }))
            .await
            .map_err(|s| Self::failed("create lease", &id, s))?;
        Ok(id)
    }

    async fn delete_lease(&self, id: &str) {
        let mut l = api::leases_client::LeasesClient::new(self.channel.clone());
        if let Err(s) = l.delete(self.req(api::DeleteRequest { id: id.to_string(), sync: false })).await {
            tracing::warn!("cannot delete lease {id}: {}", s.message());
        }
    }

    /// Write one blob unless the content store has it.
    async fn write_blob(
        &self,
        lease: &str,
        digest: &str,
        data: &[u8],
        labels: HashMap<String, String>,
    ) -> Result<(), RuntimeError> {
        let mut c = api::content_client::ContentClient::new(self.channel.clone());
        match c.info(self.req(api::InfoRequest { digest: digest.to_string() })).await {
            Ok(_) if labels.is_empty() => return Ok(()),
            Ok(info) => {
                // present: only make sure its GC references are set
                let mut info = info.into_inner().info.unwrap_or_default();
                info.labels.extend(labels);
                let mask =
                    prost_types::FieldMask { paths: info.labels.keys().map(|k| format!("labels.{k}")).collect() };
                c.update(self.req(api::UpdateRequest { info: Some(info), update_mask: Some(mask) }))
                    .await
                    .map_err(|s| Self::failed("label content", digest, s))?;
                return Ok(());
            }
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(Self::failed("stat content", digest, s)),
        }
        const CHUNK: usize = 1 << 20;
        let total = data.len() as i64;
        let write_ref = format!("away-{digest}");
        let mut msgs: Vec<api::WriteContentRequest> = data
            .chunks(CHUNK)
            .enumerate()
            .map(|(i, chunk)| api::WriteContentRequest {
                action: api::WriteAction::Write as i32,
                r#ref: write_ref.clone(),
                total,
                expected: digest.to_string(),
                offset: (i * CHUNK) as i64,
                data: chunk.to_vec(),
                labels: HashMap::new(),
            })
            .collect();
        msgs.push(api::WriteContentRequest {
            action: api::WriteAction::Commit as i32,
            r#ref: write_ref,
            total,
            expected: digest.to_string(),
            offset: total,
            data: vec![],
            labels,
        });
        let resp = c
            .write(self.leased(futures_util::stream::iter(msgs), lease))
            .await
            .map_err(|s| Self::failed("write content", digest, s))?;
        let mut stream = resp.into_inner();
        loop {
            match stream.message().await {
                Ok(Some(msg)) if msg.action == api::WriteAction::Commit as i32 => return Ok(()),
                Ok(Some(_)) => {}
                Ok(None) => return Ok(()),
                // committed meanwhile by another writer: the content is there
                Err(s) if s.code() == Code::AlreadyExists => return Ok(()),
                Err(s) => return Err(Self::failed("write content", digest, s)),
            }
        }
    }

    async fn put_image_record(&self, image: &ResolvedImage, manifest_size: i64) -> Result<(), RuntimeError> {
        let mut imgs = api::images_client::ImagesClient::new(self.channel.clone());
        let record = api::Image {
            name: image.reference.clone(),
            labels: HashMap::new(),
            target: Some(Descriptor {
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                digest: image.manifest_digest.clone(),
                size: manifest_size,
                annotations: Default::default(),
            }),
            created_at: None,
            updated_at: None,
        };
        match imgs.get(self.req(api::GetImageRequest { name: image.reference.clone() })).await {
            Ok(existing)
                if existing.get_ref().image.as_ref().and_then(|i| i.target.as_ref()).map(|t| t.digest.as_str())
                    == Some(image.manifest_digest.as_str()) =>
            {
                Ok(())
            }
            Ok(_) => {
                let mask = prost_types::FieldMask { paths: vec!["target".into()] };
                imgs.update(self.req(api::UpdateImageRequest {
                    image: Some(record),
                    update_mask: Some(mask),
                    source_date_epoch: None,
                }))
                .await
                .map(|_| ())
                .map_err(|s| Self::failed("update image", &image.reference, s))
            }
            Err(s) if s.code() == Code::NotFound => imgs
                .create(self.req(api::CreateImageRequest { image: Some(record), source_date_epoch: None }))
                .await
                .map(|_| ())
                .map_err(|s| Self::failed("create image", &image.reference, s)),
            Err(s) => Err(Self::failed("get image", &image.reference, s)),
        }
    }

    /// Apply each layer onto a snapshot chain named by OCI chain IDs (as containerd's own
    /// unpacker does), skipping layers already unpacked.
    async fn unpack(&self, lease: &str, layers: &[Descriptor], diff_ids: &[String]) -> Result<String, RuntimeError> {
        let mut snaps = snap::snapshots_client::SnapshotsClient::new(self.channel.clone());
        let mut diff = api::diff_client::DiffClient::new(self.channel.clone());
        let mut parent = String::new();
        for (layer, diff_id) in layers.iter().zip(diff_ids) {
            let chain = if parent.is_empty() {
                diff_id.clone()
            } else {
                format!("sha256:{:x}", Sha256::digest(format!("{parent} {diff_id}").as_bytes()))
            };
            let exists = snaps
                .stat(self.req(snap::StatSnapshotRequest { snapshotter: SNAPSHOTTER.into(), key: chain.clone() }))
                .await
                .is_ok();
            if !exists {
                let key = format!("away-extract-{}-{chain}", rand_suffix());
                let mounts = snaps
                    .prepare(self.leased(
                        snap::PrepareSnapshotRequest {
                            snapshotter: SNAPSHOTTER.into(),
                            key: key.clone(),
                            parent: parent.clone(),
                            labels: HashMap::new(),
                        },
                        lease,
                    ))
                    .await
                    .map_err(|s| Self::failed("prepare snapshot", &key, s))?
                    .into_inner()
                    .mounts;
                let applied = diff
                    .apply(self.leased(
                        api::ApplyRequest {
                            diff: Some(layer.clone()),
                            mounts,
                            payloads: HashMap::new(),
                            sync_fs: false,
                        },
                        lease,
                    ))
                    .await;
                let outcome = match applied {
                    Ok(r) => {
                        let got = r.into_inner().applied.map(|d| d.digest).unwrap_or_default();
                        if &got == diff_id {
                            snaps
                                .commit(self.leased(
                                    snap::CommitSnapshotRequest {
                                        snapshotter: SNAPSHOTTER.into(),
                                        name: chain.clone(),
                                        key: key.clone(),
                                        labels: HashMap::new(),
                                    },
                                    lease,
                                ))
                                .await
                                .map(|_| ())
                                .map_err(|s| Self::failed("commit snapshot", &chain, s))
                        } else {
                            Err(RuntimeError::Image {
                                reference: layer.digest.clone(),
                                reason: format!("layer unpacks to {got}, but the config says {diff_id}"),
                            })
                        }
                    }
                    Err(s) => Err(Self::failed("apply layer", &layer.digest, s)),
                };
                if outcome.is_err() {
                    let _ = snaps
                        .remove(self.req(snap::RemoveSnapshotRequest { snapshotter: SNAPSHOTTER.into(), key }))
                        .await;
                }
                outcome?;
            }
            parent = chain;
        }
        Ok(parent)
    }

    // ---------------------------------------------------------------- containers

    /// Create container + task from a spec; `restore_from` restores CRIU images instead
    /// of starting fresh. Rolls everything back on failure.
    async fn create_and_start(
        &self,
        spec: &WorkloadSpec,
        image: &ResolvedImage,
        restore_from: Option<&Path>,
        criu_config: Option<&Path>,
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
        let top = self.ensure_image(image).await?;
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
            }
            let mut oci = oci_spec_for(spec, image, &self.namespace);
            if let Some(conf) = criu_config {
                // runc hands CRIU the file named by this annotation; its options override
                // the ones runc sets (how a lazy restore gets through containerd's shim)
                let mut v: serde_json::Value = serde_json::from_str(&oci).expect("own OCI spec is JSON");
                v["annotations"]["org.criu.config"] = conf.display().to_string().into();
                oci = v.to_string();
            }
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
                spec: Some(Any { type_url: SPEC_TYPE_URL.into(), value: oci.into_bytes() }),
                snapshotter: SNAPSHOTTER.into(),
                snapshot_key: name.into(),
                ..Default::default()
            };
            let mut cs = api::containers_client::ContainersClient::new(self.channel.clone());
            cs.create(self.req(api::CreateContainerRequest { container: Some(container) }))
                .await
                .map_err(|s| Self::failed("create container", name, s))?;
            rollback.container = true;
            tracing::debug!(workload = name, ms = clock.elapsed().as_millis() as u64, "snapshot and container ready");
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
            tracing::debug!(workload = name, ms = clock.elapsed().as_millis() as u64, "task created (shim up)");
            ts.start(self.req(api::StartRequest { container_id: name.into(), exec_id: String::new() }))
                .await
                .map_err(|s| Self::failed("start task", name, s))?;
            tracing::info!(
                workload = name,
                pid = created.pid,
                ms = clock.elapsed().as_millis() as u64,
                "containerd task started"
            );
            self.status(name).await
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
    }

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
    fn spec_label(c: &api::Container, op: &'static str) -> Result<WorkloadSpec, RuntimeError> {
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

    /// SIGTERM, wait up to `grace`, SIGKILL, then delete the task (reaps the shim).
    /// A zero `grace` kills at once.
    async fn kill_and_delete_task(&self, name: &str, grace: Duration) -> Result<(), RuntimeError> {
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
                    && (process.pid == 0 || !Path::new(&format!("/proc/{}", process.pid)).exists())
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
        let shim = std::fs::read_dir("/proc").ok().and_then(|procs| {
            procs.flatten().find_map(|p| {
                let shim_pid = p.file_name().to_str()?.parse::<i32>().ok()?;
                let cmdline = std::fs::read(p.path().join("cmdline")).ok()?;
                let argv: Vec<String> =
                    cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
                (argv.first()?.ends_with("containerd-shim-runc-v2") && argv.windows(6).any(|w| w == args))
                    .then_some(shim_pid)
            })
        });
        let Some(shim) = shim else {
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
        // SAFETY: kill(2) on a pid identified above; no memory is shared.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(shim, libc::SIGKILL);
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

    fn to_status(&self, c: &api::Container, task: Option<&containerd_client::types::v1::Process>) -> WorkloadStatus {
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
                .map(|s| s.ports.iter().map(|p| format!("{}:{}", p.host_port(), p.container)).collect())
                .unwrap_or_default(),
            detail: format!("namespace {}, host network", self.namespace),
        }
    }
}

#[derive(Default)]
struct Rollback {
    snapshot: bool,
    container: bool,
    task: bool,
}

/// All `blobs/sha256/*` of an image tar, by digest. Lab images are a few MiB; reading
/// them whole keeps the import simple.
fn read_blobs(tar_path: &Path) -> std::io::Result<HashMap<String, Vec<u8>>> {
    let mut archive = tar::Archive::new(std::fs::File::open(tar_path)?);
    let mut blobs = HashMap::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().trim_start_matches("./").to_string();
        if let Some(hex) = path.strip_prefix("blobs/sha256/") {
            let mut data = Vec::with_capacity(entry.size() as usize);
            entry.read_to_end(&mut data)?;
            blobs.insert(format!("sha256:{hex}"), data);
        }
    }
    Ok(blobs)
}

fn blob<'a>(blobs: &'a HashMap<String, Vec<u8>>, digest: &str) -> Result<&'a [u8], String> {
    let data = blobs.get(digest).ok_or_else(|| format!("blob {digest} missing from the image tar"))?;
    let actual = format!("sha256:{:x}", Sha256::digest(data));
    if actual != digest {
        return Err(format!("blob {digest} is corrupt (its content hashes to {actual})"));
    }
    Ok(data)
}

fn rand_suffix() -> String {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{nanos:08x}")
}

/// RFC 3339 UTC time `after` from now (for containerd's lease expiry label).
fn rfc3339_in(after: Duration) -> String {
    let t = std::time::SystemTime::now() + after;
    let secs = t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // civil-from-days (Howard Hinnant's algorithm): no date crate needed for one label
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
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

/// The OCI runtime spec of a workload: runc's defaults (via oci-spec), the image's
/// process, the spec's env and limits, and the node's network namespace.
fn oci_spec_for(spec: &WorkloadSpec, image: &ResolvedImage, namespace: &str) -> String {
    let mut v = serde_json::to_value(oci_spec::runtime::Spec::default()).expect("default OCI spec");
    let mut env: Vec<String> = if image.summary.env.is_empty() {
        vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()]
    } else {
        image.summary.env.clone()
    };
    for (k, val) in &spec.env {
        env.retain(|e| !e.starts_with(&format!("{k}=")));
        env.push(format!("{k}={val}"));
    }
    let (uid, gid) = parse_user(&image.summary.user);
    v["process"]["args"] = serde_json::json!(image.argv(spec.command.as_deref()));
    v["process"]["env"] = serde_json::json!(env);
    v["process"]["cwd"] =
        serde_json::json!(if image.summary.working_dir.is_empty() { "/" } else { &image.summary.working_dir });
    v["process"]["user"] = serde_json::json!({"uid": uid, "gid": gid});
    v["hostname"] = serde_json::json!(spec.name);
    // writable rootfs: apps may write, and the changes travel with a migration
    v["root"]["readonly"] = serde_json::json!(false);
    // host (or agent) network: no CNI on these nodes; the workload's ports are the node's
    if let Some(ns) = v["linux"]["namespaces"].as_array_mut() {
        ns.retain(|n| n["type"] != "network");
    }
    let period: u64 = 100_000;
    v["linux"]["resources"]["memory"] = serde_json::json!({"limit": spec.resources.memory.bytes()});
    v["linux"]["resources"]["cpu"] =
        serde_json::json!({"quota": (spec.resources.cpus * period as f64).round() as i64, "period": period});
    // per namespace: two containerd instances on one host (a local cluster) may both
    // hold a workload of this name during a move
    v["linux"]["cgroupsPath"] = serde_json::json!(format!("/away/{namespace}/{}", spec.name));
    v.to_string()
}

/// `USER` as uid:gid; names other than root are not resolvable in scratch images.
fn parse_user(user: &str) -> (u32, u32) {
    let (u, g) = user.split_once(':').unwrap_or((user, ""));
    let uid = u.parse().unwrap_or(0);
    let gid = g.parse().unwrap_or(uid);
    (uid, gid)
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
        self.create_and_start(&req.spec, &req.image, None, None).await
    }

    async fn stop(&self, name: &str, grace: Duration) -> Result<(), RuntimeError> {
        if self.get_container(name).await?.is_none() {
            return Err(RuntimeError::NotFound { runtime: KIND, name: name.into() });
        }
        self.kill_and_delete_task(name, grace.max(Duration::from_millis(1))).await
    }

    async fn remove(&self, name: &str) -> Result<(), RuntimeError> {
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
        Ok(())
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
        let mut cs = api::containers_client::ContainersClient::new(self.channel.clone());
        let containers = cs
            .list(self.req(api::ListContainersRequest { filters: vec![format!("labels.\"{LABEL_WORKLOAD}\"")] }))
            .await
            .map_err(|s| Self::failed("list containers", &self.namespace, s))?
            .into_inner()
            .containers;
        let mut out = Vec::new();
        for c in containers {
            let task = self.get_task(&c.id).await?;
            out.push(self.to_status(&c, task.as_ref()));
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn logs(&self, name: &str, follow: bool) -> Result<LogStream, RuntimeError> {
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

    async fn checkpoint(&self, name: &str, opts: &CheckpointOptions) -> Result<CheckpointArchive, RuntimeError> {
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
        self.capture_rootfs(name, &opts.dir).await?;
        if !opts.leave_running {
            // the process exited with the dump; reap the task so the name can be reused
            self.kill_and_delete_task(name, Duration::ZERO).await?;
        }
        Ok(archive_of(name, &opts.dir, spec, c.image))
    }

    /// Dump with runc directly (containerd's checkpoint has no lazy mode), against the
    /// state the shim keeps for the container; the shim sees the process exit once
    /// every page has moved.
    async fn checkpoint_lazy(&self, name: &str, opts: &LazyCheckpointOptions) -> Result<LazyDump, RuntimeError> {
        let (c, spec, work) = self.prepare_checkpoint(name, &opts.dir, "checkpoint lazily").await?;
        let failed = |message: String| RuntimeError::Failed {
            runtime: KIND,
            op: "checkpoint lazily",
            name: name.into(),
            message,
        };
        let (status_read, status_write) =
            std::io::pipe().map_err(|e| RuntimeError::io("create the runc status pipe", e))?;
        let pid = match self.get_task(name).await? {
            Some(p) if p.pid > 0 => p.pid,
            _ => return Err(failed("it has no running task".into())),
        };
        // runc and CRIU run in the container's network namespace, whatever the caller's
        let netns = PathBuf::from(format!("/proc/{pid}/ns/net"));
        let mut cmd = tokio::process::Command::new("nsenter");
        cmd.arg(format!("--net={}", netns.display()))
            .arg("runc")
            .arg("--root")
            .arg(Path::new(RUNC_SHIM_ROOT).join(&self.namespace))
            .args(["checkpoint", "--lazy-pages", "--status-fd", "3", "--tcp-established", "--file-locks"])
            .arg("--page-server")
            .arg(format!("127.0.0.1:{}", opts.page_server_port))
            .arg("--image-path")
            .arg(&opts.dir)
            .arg("--work-path")
            .arg(&work)
            .arg(name)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(
                std::fs::File::create(opts.dir.join("runc.log")).map_err(|e| RuntimeError::io("create runc.log", e))?,
            );
        let fd = std::os::fd::AsRawFd::as_raw_fd(&status_write);
        // SAFETY: only async-signal-safe calls between fork and exec; dup2 gives the
        // child the pipe as fd 3 (without close-on-exec) for `--status-fd 3`.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(move || if libc::dup2(fd, 3) < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) });
        }
        let mut child = cmd.spawn().map_err(|e| failed(format!("cannot run runc: {e}")))?;
        drop(status_write);
        // CRIU writes one byte to the status pipe when the dump is on disk and the page
        // server listens; EOF first means runc gave up.
        let reader = tokio::task::spawn_blocking(move || {
            let mut byte = [0u8; 1];
            std::io::Read::read(&mut { status_read }, &mut byte)
        });
        let ready = match tokio::time::timeout(LAZY_DUMP_TIMEOUT, reader).await {
            Ok(r) => r.map_err(|e| failed(format!("status reader: {e}")))?,
            Err(_) => {
                // the reader ends with runc (its end of the pipe closes)
                let _ = child.kill().await;
                return Err(failed(format!(
                    "the dump did not finish within {} s{}",
                    LAZY_DUMP_TIMEOUT.as_secs(),
                    crate::runtime::criu_log_errors(&work.join("dump.log"))
                )));
            }
        };
        if !matches!(ready, Ok(1)) {
            let status = child.wait().await.map_err(|e| RuntimeError::io("wait for runc", e))?;
            let runc_log = std::fs::read_to_string(opts.dir.join("runc.log")).unwrap_or_default();
            return Err(failed(format!(
                "runc checkpoint exited with {status} before the page server was up: {}{}",
                runc_log.trim(),
                crate::runtime::criu_log_errors(&work.join("dump.log"))
            )));
        }
        let dump = LazyDump {
            archive: archive_of(name, &opts.dir, spec, c.image),
            child,
            log: work.join("dump.log"),
            page_server: std::net::SocketAddr::from(([127, 0, 0, 1], opts.page_server_port)),
            netns,
        };
        if let Err(e) = self.capture_rootfs(name, &opts.dir).await {
            // the process is frozen and CRIU waits for a page client: let it go
            dump.abort().await;
            return Err(e);
        }
        Ok(dump)
    }

    async fn restore_lazy(&self, req: &RestoreRequest) -> Result<WorkloadStatus, RuntimeError> {
        let spec = &req.archive.spec;
        if self.get_container(&spec.name).await?.is_some() {
            return Err(RuntimeError::AlreadyExists { runtime: KIND, name: spec.name.clone() });
        }
        // One CRIU option turns the shim's restore into a lazy one. The file only lives
        // during the restore: the container keeps the annotation, and a later checkpoint
        // of it must not find the file.
        let conf = req.archive.dir.join("criu-lazy.conf");
        std::fs::write(&conf, "lazy-pages\n").map_err(|e| RuntimeError::io(format!("write {}", conf.display()), e))?;
        let result = self.create_and_start(spec, &req.image, Some(&req.archive.dir), Some(&conf)).await;
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

    async fn restore(&self, req: &RestoreRequest) -> Result<WorkloadStatus, RuntimeError> {
        let spec = &req.archive.spec;
        // restoring in place of a checkpointed (stopped) container: it gives way first
        if let Some(existing) = self.get_container(&spec.name).await? {
            let task = self.get_task(&spec.name).await?;
            if self.to_status(&existing, task.as_ref()).state == WorkloadState::Running {
                return Err(RuntimeError::AlreadyExists { runtime: KIND, name: spec.name.clone() });
            }
            self.remove(&spec.name).await?;
        }
        self.create_and_start(spec, &req.image, Some(&req.archive.dir), None).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_expiry_is_rfc3339() {
        let s = rfc3339_in(Duration::ZERO);
        assert_eq!(s.len(), 20, "{s}");
        assert!(s.ends_with('Z') && s.as_bytes()[10] == b'T', "{s}");
    }

    #[test]
    fn users_parse() {
        assert_eq!(parse_user(""), (0, 0));
        assert_eq!(parse_user("1000"), (1000, 1000));
        assert_eq!(parse_user("1000:50"), (1000, 50));
    }
}
