//! Image import into containerd's content store: blobs under a lease, the image
//! record, and the layers unpacked into snapshots through the diff service.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use containerd_client::services::v1 as api;
use containerd_client::services::v1::snapshots as snap;
use containerd_client::tonic::Code;
use containerd_client::types::Descriptor;
use oci_spec::image::{ImageConfiguration, ImageManifest, MediaType};
use sha2::{Digest, Sha256};

use super::{ContainerdRuntime, SNAPSHOTTER};
use crate::runtime::RuntimeError;
use crate::store::ResolvedImage;

impl ContainerdRuntime {
    /// Make `image` available: content, image record and unpacked snapshots. Returns the
    /// chain ID of the top layer (the parent of the container's snapshot).
    pub(super) async fn ensure_image(&self, image: &ResolvedImage) -> Result<String, RuntimeError> {
        let img_err = |reason: String| RuntimeError::Image { reference: image.reference.clone(), reason };
        let blobs = read_blobs(&image.tar).map_err(|e| img_err(format!("cannot read {}: {e}", image.tar.display())))?;
        let ImageContent { manifest: manifest_bytes, config_digest, layers, diff_ids } = image_content(image, &blobs)?;

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
                media_type: MediaType::ImageManifest.to_string(),
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
}

/// What an import writes, read with oci-spec's types from the image tar's blobs.
struct ImageContent<'a> {
    manifest: &'a [u8],
    config_digest: String,
    /// Bottom first, as containerd's diff service takes them.
    layers: Vec<Descriptor>,
    /// One per layer: the digest of its uncompressed tar.
    diff_ids: Vec<String>,
}

/// The manifest of `image`, its config's digest, its layers and their diff IDs. A
/// manifest or config that lacks a required field is refused (serde names the field).
fn image_content<'a>(
    image: &ResolvedImage,
    blobs: &'a HashMap<String, Vec<u8>>,
) -> Result<ImageContent<'a>, RuntimeError> {
    let img_err = |reason: String| RuntimeError::Image { reference: image.reference.clone(), reason };
    let digest = &image.manifest_digest;
    let manifest_bytes =
        blobs.get(digest).ok_or_else(|| img_err(format!("manifest {digest} missing from {}", image.tar.display())))?;
    let manifest: ImageManifest = serde_json::from_slice(manifest_bytes)
        .map_err(|e| img_err(format!("manifest {digest} is not an OCI image manifest: {e}")))?;
    let config_digest = manifest.config().digest().to_string();
    let config: ImageConfiguration = serde_json::from_slice(
        blobs.get(&config_digest).ok_or_else(|| img_err(format!("config {config_digest} missing")))?,
    )
    .map_err(|e| img_err(format!("config {config_digest} is not an OCI image config: {e}")))?;
    let layers = manifest
        .layers()
        .iter()
        .map(|l| {
            Ok(Descriptor {
                media_type: l.media_type().to_string(),
                digest: l.digest().to_string(),
                size: i64::try_from(l.size()).map_err(|_| {
                    img_err(format!("layer {} is {} bytes, more than containerd takes", l.digest(), l.size()))
                })?,
                annotations: Default::default(),
            })
        })
        .collect::<Result<Vec<_>, RuntimeError>>()?;
    let diff_ids = config.rootfs().diff_ids().clone();
    if diff_ids.len() != layers.len() {
        return Err(img_err(format!("{} layers but {} diff_ids in the config", layers.len(), diff_ids.len())));
    }
    Ok(ImageContent { manifest: manifest_bytes, config_digest, layers, diff_ids })
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use away_model::Arch;
    use serde_json::json;

    use super::*;
    use crate::store::ImageSummary;

    fn sha256(data: &[u8]) -> String {
        format!("sha256:{:x}", Sha256::digest(data))
    }

    /// An image tar's blobs: one layer, its config and a manifest (`edit` changes the
    /// manifest before it is stored), and the image that names that manifest.
    fn image_with(edit: impl FnOnce(&mut serde_json::Value)) -> (ResolvedImage, HashMap<String, Vec<u8>>) {
        let layer = b"layer tar".to_vec();
        let layer_digest = sha256(&layer);
        let diff_id = sha256(b"uncompressed layer tar");
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }))
        .unwrap();
        let config_digest = sha256(&config);
        let mut manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": layer_digest,
                "size": layer.len(),
            }],
        });
        edit(&mut manifest);
        let manifest = serde_json::to_vec(&manifest).unwrap();
        let image = ResolvedImage {
            reference: "docker.io/away/counter:latest".into(),
            tar: PathBuf::from("/images/counter.tar"),
            manifest_digest: sha256(&manifest),
            summary: ImageSummary {
                arch: Arch("amd64".into()),
                entrypoint: vec![],
                cmd: vec![],
                env: vec![],
                working_dir: String::new(),
                user: String::new(),
                exposed_ports: vec![],
            },
        };
        let blobs =
            HashMap::from([(layer_digest, layer), (config_digest, config), (image.manifest_digest.clone(), manifest)]);
        (image, blobs)
    }

    #[test]
    fn the_content_of_an_image_is_read_typed() {
        let (image, blobs) = image_with(|_| {});
        let content = image_content(&image, &blobs).unwrap();
        assert_eq!(content.manifest, blobs[&image.manifest_digest].as_slice());
        assert_eq!(content.config_digest, sha256(&blobs[&content.config_digest]));
        assert_eq!(content.layers.len(), 1);
        let layer = &content.layers[0];
        assert_eq!(layer.media_type, "application/vnd.oci.image.layer.v1.tar+gzip");
        assert_eq!(layer.digest, sha256(b"layer tar"));
        assert_eq!(layer.size, 9);
        assert_eq!(content.diff_ids, [sha256(b"uncompressed layer tar")]);
    }

    #[test]
    fn a_layer_without_media_type_is_refused_naming_image_and_field() {
        let (image, blobs) = image_with(|m| {
            m["layers"][0].as_object_mut().unwrap().remove("mediaType");
        });
        let err = image_content(&image, &blobs).err().expect("a layer without mediaType is refused").to_string();
        assert!(err.contains("docker.io/away/counter:latest"), "{err}");
        assert!(err.contains("`mediaType`"), "{err}");
        assert!(err.contains(&image.manifest_digest), "{err}");
    }

    #[test]
    fn a_manifest_without_config_or_with_a_bad_digest_is_refused() {
        let (image, blobs) = image_with(|m| {
            m.as_object_mut().unwrap().remove("config");
        });
        let err = image_content(&image, &blobs).err().unwrap().to_string();
        assert!(err.contains("docker.io/away/counter:latest") && err.contains("`config`"), "{err}");

        let (image, blobs) = image_with(|m| m["layers"][0]["digest"] = json!("sha256:nothex"));
        let err = image_content(&image, &blobs).err().unwrap().to_string();
        assert!(err.contains("docker.io/away/counter:latest") && err.contains("Invalid digest"), "{err}");
    }

    #[test]
    fn layers_and_diff_ids_must_pair_up() {
        let (image, blobs) = image_with(|m| {
            let layer = m["layers"][0].clone();
            m["layers"].as_array_mut().unwrap().push(layer);
        });
        let err = image_content(&image, &blobs).err().unwrap().to_string();
        assert!(err.contains("2 layers but 1 diff_ids"), "{err}");
    }

    #[test]
    fn lease_expiry_is_rfc3339() {
        let s = rfc3339_in(Duration::ZERO);
        assert_eq!(s.len(), 20, "{s}");
        assert!(s.ends_with('Z') && s.as_bytes()[10] == b'T', "{s}");
    }
}
