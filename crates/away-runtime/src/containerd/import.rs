//! Image import into containerd's content store: blobs under a lease, the image
//! record, and the layers unpacked into snapshots through the diff service.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use away_image::ReadImage;
use containerd_client::services::v1 as api;
use containerd_client::services::v1::snapshots as snap;
use containerd_client::tonic::Code;
use containerd_client::types::Descriptor;
use sha2::{Digest, Sha256};

use super::{ContainerdRuntime, SNAPSHOTTER};
use crate::runtime::RuntimeError;
use crate::store::ResolvedImage;

/// The image record's label naming the chain ID of its unpacked top layer: a later
/// [`ContainerdRuntime::ensure_image`] of the same manifest finds it without the tar.
const LABEL_TOP_SNAPSHOT: &str = "away.top-snapshot";

impl ContainerdRuntime {
    /// Make `image` available: content, unpacked snapshots and the image record. Returns
    /// the chain ID of the top layer (the parent of the container's snapshot).
    ///
    /// Whatever format the tar is in (away's own, an OCI layout from podman or skopeo,
    /// `docker save` output of any Docker version), away-image reads it into one manifest,
    /// config and layers, every blob checked against its digest, and for a docker-archive
    /// synthesizes the manifest; containerd gets those. Everything is written under a
    /// lease and the image record comes last, so a failed import leaves nothing behind.
    pub(super) async fn ensure_image(&self, image: &ResolvedImage) -> Result<String, RuntimeError> {
        // imported before: the record names this manifest and its unpacked top snapshot,
        // which is still there. Reading the tar again (every blob hashed, every layer
        // decompressed) took 0.3-1 s for a real server's image, in a move's downtime.
        if let Some(top) = self.imported_top(image).await {
            return Ok(top);
        }
        // one import at a time on this node (other `away` processes too): two writers of
        // one blob or one snapshot chain would trip over containerd's ref locks. Asked
        // again under the lock: the import this one waited for (a move's announcement
        // starts one) may have been of this very image.
        let _import_lock = self.import_lock().await?;
        if let Some(top) = self.imported_top(image).await {
            return Ok(top);
        }
        let img_err = |reason: String| RuntimeError::Image { reference: image.reference.clone(), reason };
        let tar = image.tar.clone();
        let read = tokio::task::spawn_blocking(move || away_image::read_image_tar(&tar))
            .await
            .map_err(|e| img_err(format!("reading {} panicked: {e}", image.tar.display())))?
            .map_err(|e| img_err(away_model::error_chain(&e)))?;
        let content = image_content(image, &read)?;
        let lease = self.create_lease().await?;
        let result = async {
            // blobs: layers first, then config, then the manifest with GC references to both
            for (l, data) in content.layers.iter().zip(&content.layer_data) {
                self.write_blob(&lease, &l.digest, data, HashMap::new()).await?;
            }
            self.write_blob(&lease, &content.config_digest, content.config, HashMap::new()).await?;
            let mut refs =
                HashMap::from([("containerd.io/gc.ref.content.config".to_string(), content.config_digest.clone())]);
            for (i, l) in content.layers.iter().enumerate() {
                refs.insert(format!("containerd.io/gc.ref.content.l.{i}"), l.digest.clone());
            }
            self.write_blob(&lease, &image.manifest_digest, content.manifest, refs).await?;
            let top = self.unpack(&lease, &content.layers, &content.diff_ids).await?;
            // Keep the unpacked snapshots as long as the image: without this GC reference
            // (the one containerd's own unpacker sets) they go once the lease is gone.
            let keep = HashMap::from([(format!("containerd.io/gc.ref.snapshot.{SNAPSHOTTER}"), top.clone())]);
            self.write_blob(&lease, &content.config_digest, content.config, keep).await?;
            // last: until the record exists, the lease alone holds what was written
            self.put_image_record(image, &content.manifest_media_type, content.manifest.len() as i64, &top).await?;
            Ok(top)
        }
        .await;
        // a failed import's blobs and snapshots go at once (a synchronous GC), not at
        // containerd's next collection
        self.delete_lease_with(&lease, result.is_err()).await;
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

    pub(super) async fn create_lease(&self) -> Result<String, RuntimeError> {
        let mut l = api::leases_client::LeasesClient::new(self.channel.clone());
        let id = format!("away-import-{}-{}", std::process::id(), rand_suffix());
        // expire on its own if we die mid-import
        let labels = HashMap::from([("containerd.io/gc.expire".to_string(), rfc3339_in(Duration::from_secs(3600)))]);
        l.create(self.req(api::CreateRequest { id: id.clone(), labels }))
            .await
            .map_err(|s| Self::failed("create lease", &id, s))?;
        Ok(id)
    }

    pub(super) async fn delete_lease(&self, id: &str) {
        self.delete_lease_with(id, false).await
    }

    async fn delete_lease_with(&self, id: &str, sync: bool) {
        let mut l = api::leases_client::LeasesClient::new(self.channel.clone());
        if let Err(s) = l.delete(self.req(api::DeleteRequest { id: id.to_string(), sync })).await {
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

    /// The top snapshot of `image` as an earlier import left it: its record names this
    /// manifest and the snapshot ([`LABEL_TOP_SNAPSHOT`]), which exists. None: import it.
    async fn imported_top(&self, image: &ResolvedImage) -> Option<String> {
        let mut imgs = api::images_client::ImagesClient::new(self.channel.clone());
        let record = imgs.get(self.req(api::GetImageRequest { name: image.reference.clone() })).await.ok()?;
        let record = record.into_inner().image?;
        if record.target.as_ref().map(|t| t.digest.as_str()) != Some(image.manifest_digest.as_str()) {
            return None;
        }
        let top = record.labels.get(LABEL_TOP_SNAPSHOT)?.clone();
        let mut snaps = snap::snapshots_client::SnapshotsClient::new(self.channel.clone());
        snaps
            .stat(self.req(snap::StatSnapshotRequest { snapshotter: SNAPSHOTTER.into(), key: top.clone() }))
            .await
            .ok()?;
        Some(top)
    }

    async fn put_image_record(
        &self,
        image: &ResolvedImage,
        media_type: &str,
        manifest_size: i64,
        top: &str,
    ) -> Result<(), RuntimeError> {
        let mut imgs = api::images_client::ImagesClient::new(self.channel.clone());
        let labels = HashMap::from([(LABEL_TOP_SNAPSHOT.to_string(), top.to_string())]);
        let record = api::Image {
            name: image.reference.clone(),
            labels: labels.clone(),
            target: Some(Descriptor {
                media_type: media_type.to_string(),
                digest: image.manifest_digest.clone(),
                size: manifest_size,
                annotations: Default::default(),
            }),
            created_at: None,
            updated_at: None,
        };
        match imgs.get(self.req(api::GetImageRequest { name: image.reference.clone() })).await {
            Ok(existing)
                if existing.get_ref().image.as_ref().is_some_and(|i| {
                    i.target.as_ref().map(|t| t.digest.as_str()) == Some(image.manifest_digest.as_str())
                        && i.labels == labels
                }) =>
            {
                Ok(())
            }
            Ok(_) => {
                let mask = prost_types::FieldMask { paths: vec!["target".into(), "labels".into()] };
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
}

/// What an import writes, from the image as away-image read (and verified) it.
struct ImageContent<'a> {
    manifest: &'a [u8],
    manifest_media_type: String,
    config: &'a [u8],
    config_digest: String,
    /// Bottom first, as containerd's diff service takes them. The media type is the OCI
    /// one of the layer's compression, which containerd's differ knows for every layer
    /// the reader accepts (a Docker manifest's own types included).
    layers: Vec<Descriptor>,
    layer_data: Vec<&'a [u8]>,
    /// One per layer: the digest of its uncompressed tar.
    diff_ids: Vec<String>,
}

fn image_content<'a>(image: &ResolvedImage, read: &'a ReadImage) -> Result<ImageContent<'a>, RuntimeError> {
    let img_err = |reason: String| RuntimeError::Image { reference: image.reference.clone(), reason };
    if read.manifest_digest != image.manifest_digest {
        return Err(img_err(format!(
            "{} changed since it was resolved: its manifest is now {}, not {}",
            image.tar.display(),
            read.manifest_digest,
            image.manifest_digest
        )));
    }
    let layers = read
        .image
        .layers
        .iter()
        .map(|l| {
            Ok(Descriptor {
                media_type: l.compression.oci_media_type().to_string(),
                digest: l.digest.clone(),
                size: i64::try_from(l.data.len()).map_err(|_| {
                    img_err(format!("layer {} is {} bytes, more than containerd takes", l.digest, l.data.len()))
                })?,
                annotations: Default::default(),
            })
        })
        .collect::<Result<Vec<_>, RuntimeError>>()?;
    Ok(ImageContent {
        manifest: &read.manifest,
        manifest_media_type: read.manifest_media_type.clone(),
        config: &read.config_bytes,
        config_digest: read.config_digest.clone(),
        layers,
        layer_data: read.image.layers.iter().map(|l| l.data.as_slice()).collect(),
        diff_ids: read.image.layers.iter().map(|l| l.diff_id.clone()).collect(),
    })
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use away_image::archive::Image;
    use away_image::tree::{FileTree, LayerBlob, Node};
    use away_model::Arch;

    use super::*;
    use crate::store::ImageSummary;

    fn resolved(read: &ReadImage) -> ResolvedImage {
        ResolvedImage {
            reference: "docker.io/away/counter:latest".into(),
            tar: PathBuf::from("/images/counter.tar"),
            manifest_digest: read.manifest_digest.clone(),
            summary: ImageSummary {
                arch: Arch("amd64".into()),
                entrypoint: vec![],
                cmd: vec![],
                env: vec![],
                working_dir: String::new(),
                user: String::new(),
                exposed_ports: vec![],
            },
        }
    }

    /// A one-layer image written by away and read back.
    fn read_back() -> ReadImage {
        let mut tree = FileTree::default();
        tree.insert("app", Node::File { data: b"hi".to_vec(), mode: 0o755, uid: 0, gid: 0 });
        let layer = LayerBlob::from_tar(&tree.to_tar());
        let config = serde_json::from_value(serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
        }))
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let tar = dir.path().join("one.tar");
        Image { config, layers: vec![layer], tags: vec!["away/one:latest".into()] }.write_tar(&tar).unwrap();
        away_image::read_image_tar(&tar).unwrap()
    }

    #[test]
    fn containerd_gets_the_blobs_and_digests_the_reader_verified() {
        let read = read_back();
        let content = image_content(&resolved(&read), &read).unwrap();
        assert_eq!(format!("sha256:{:x}", Sha256::digest(content.manifest)), read.manifest_digest);
        assert_eq!(format!("sha256:{:x}", Sha256::digest(content.config)), content.config_digest);
        assert_eq!(content.manifest_media_type, "application/vnd.oci.image.manifest.v1+json");
        assert_eq!(content.layers.len(), 1);
        let layer = &content.layers[0];
        assert_eq!(layer.media_type, "application/vnd.oci.image.layer.v1.tar+gzip");
        assert_eq!(layer.digest, format!("sha256:{:x}", Sha256::digest(content.layer_data[0])));
        assert_eq!(layer.size, content.layer_data[0].len() as i64);
        assert_eq!(content.diff_ids, [read.image.layers[0].diff_id.clone()]);
    }

    #[test]
    fn a_tar_changed_since_it_was_resolved_is_refused() {
        let read = read_back();
        let mut image = resolved(&read);
        image.manifest_digest = format!("sha256:{}", "0".repeat(64));
        let err = image_content(&image, &read).err().expect("a changed tar is refused").to_string();
        assert!(
            err.contains("docker.io/away/counter:latest") && err.contains("changed since it was resolved"),
            "{err}"
        );
    }

    #[test]
    fn lease_expiry_is_rfc3339() {
        let s = rfc3339_in(Duration::ZERO);
        assert_eq!(s.len(), 20, "{s}");
        assert!(s.ends_with('Z') && s.as_bytes()[10] == b'T', "{s}");
    }
}
