//! Reading image tars of every format users have, into one [`ReadImage`]:
//!
//! | tar | made by | what it holds |
//! | --- | --- | --- |
//! | OCI layout + docker-archive | `away image build`, `docker save` of Docker ≥ 25 | `index.json`, `blobs/sha256/…`, `manifest.json` pointing into `blobs/` |
//! | OCI layout | `podman save --format oci-archive`, skopeo, buildah | `index.json`, `blobs/sha256/…` |
//! | docker-archive | `docker save` of Docker ≤ 24, `podman save --format docker-archive` | `manifest.json`, `<id>.json` config, `<id>/layer.tar` (or `<sha>.tar`) layers; no manifest |
//!
//! Layers may be plain tars, gzip or zstd (told by their first bytes, and checked
//! against the media type the manifest gives them). Every blob is checked against its
//! digest and size, every layer's uncompressed tar against the config's `diff_ids`:
//! what reaches a runtime is whole, or the read fails naming the file and the part.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType};

use crate::archive::{
    blob_path, manifest_for, ArchiveError, ArchiveFormat, DockerManifestEntry, Image, ReadImage, CONTAINERD_NAME,
    OCI_REF_NAME,
};
use crate::tree::{sha256_digest, sha256_of_reader, Compression, LayerBlob};

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// Layer media types away unpacks, with the compression each one means. Anything else
/// (encrypted layers, artifacts that are not images) is refused by name.
const LAYER_MEDIA_TYPES: &[(&str, Compression)] = &[
    ("application/vnd.oci.image.layer.v1.tar", Compression::None),
    ("application/vnd.oci.image.layer.v1.tar+gzip", Compression::Gzip),
    ("application/vnd.oci.image.layer.v1.tar+zstd", Compression::Zstd),
    ("application/vnd.oci.image.layer.nondistributable.v1.tar", Compression::None),
    ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", Compression::Gzip),
    ("application/vnd.oci.image.layer.nondistributable.v1.tar+zstd", Compression::Zstd),
    ("application/vnd.docker.image.rootfs.diff.tar", Compression::None),
    ("application/vnd.docker.image.rootfs.diff.tar.gzip", Compression::Gzip),
    ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", Compression::Gzip),
];

/// Read an image tar of any of the formats above (the tar itself may be gzip'd or
/// zstd'd, as `docker save | gzip` gives). The first image in the tar (in an index of
/// several platforms, the one for this host's) is returned.
pub fn read_image_tar(path: &Path) -> Result<ReadImage, ArchiveError> {
    let tar = Tar { path, files: read_files(path)? };
    let has_index = tar.files.contains_key("index.json");
    let has_docker = tar.files.contains_key("manifest.json");
    match (has_index, has_docker) {
        (true, true) => tar.read_oci(ArchiveFormat::OciAndDocker),
        (true, false) => tar.read_oci(ArchiveFormat::Oci),
        (false, true) => tar.read_docker_archive(),
        (false, false) => Err(tar.format(
            "neither index.json (OCI layout) nor manifest.json (docker-archive) found: not an image tar".into(),
        )),
    }
}

/// Every regular file of the tar, by normalised path. Image tars of lab apps are small;
/// holding them in memory keeps this simple.
fn read_files(path: &Path) -> Result<HashMap<String, Vec<u8>>, ArchiveError> {
    let io = |action, source| ArchiveError::Io { action, path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(|e| io("open", e))?;
    let mut buf = std::io::BufReader::new(file);
    let head = std::io::BufRead::fill_buf(&mut buf).map_err(|e| io("read", e))?;
    let reader: Box<dyn Read> = match Compression::detect(head) {
        Compression::None => Box::new(buf),
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(buf)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(buf).map_err(|e| io("decompress", e))?),
    };
    let truncated = "read (truncated, or not a tar?)";
    let mut files = HashMap::new();
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(|e| io(truncated, e))? {
        let mut entry = entry.map_err(|e| io(truncated, e))?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let name = crate::tree::normalize(&String::from_utf8_lossy(&entry.path_bytes()));
        let mut data = Vec::new();
        entry.read_to_end(&mut data).map_err(|e| io(truncated, e))?;
        files.insert(name, data);
    }
    Ok(files)
}

struct Tar<'a> {
    path: &'a Path,
    files: HashMap<String, Vec<u8>>,
}

impl Tar<'_> {
    fn format(&self, message: String) -> ArchiveError {
        ArchiveError::Format { path: self.path.to_path_buf(), message }
    }

    fn get(&self, name: &str) -> Result<&[u8], ArchiveError> {
        self.files
            .get(name)
            .map(Vec::as_slice)
            .ok_or_else(|| ArchiveError::Missing { path: self.path.to_path_buf(), what: name.to_string() })
    }

    fn json<T: serde::de::DeserializeOwned>(&self, bytes: &[u8], what: String) -> Result<T, ArchiveError> {
        serde_json::from_slice(bytes).map_err(|source| ArchiveError::Json { path: self.path.to_path_buf(), what, source })
    }

    /// The blob a descriptor names, checked against its digest and size.
    fn blob(&self, d: &Descriptor, what: &str) -> Result<&[u8], ArchiveError> {
        let digest = d.digest().to_string();
        if !digest.starts_with("sha256:") {
            return Err(self.format(format!("{what} {digest}: only sha256 digests are supported")));
        }
        let data = self.get(&blob_path(&digest)).map_err(|_| ArchiveError::Missing {
            path: self.path.to_path_buf(),
            what: format!("{what} {digest} ({})", blob_path(&digest)),
        })?;
        let actual = sha256_digest(data);
        if actual != digest {
            return Err(self.format(format!("{what} {digest} is corrupt: its content hashes to {actual}")));
        }
        if data.len() as u64 != d.size() {
            return Err(self.format(format!(
                "{what} {digest} is {} bytes, but the descriptor says {}",
                data.len(),
                d.size()
            )));
        }
        Ok(data)
    }

    /// One layer: its compression (from its first bytes, which must agree with a media
    /// type when there is one) and its diff ID.
    fn layer(&self, data: &[u8], media_type: Option<&str>, what: &str) -> Result<LayerBlob, ArchiveError> {
        let found = Compression::detect(data);
        let media_type = match media_type {
            Some(mt) => {
                let Some((_, declared)) = LAYER_MEDIA_TYPES.iter().find(|(t, _)| *t == mt) else {
                    let known: Vec<&str> = LAYER_MEDIA_TYPES.iter().map(|(t, _)| *t).collect();
                    return Err(self.format(format!(
                        "{what} has media type {mt}, which away cannot unpack (it knows {})",
                        known.join(", ")
                    )));
                };
                if *declared != found {
                    return Err(self.format(format!(
                        "{what} is declared {mt} but its content is {} ({})",
                        match found {
                            Compression::None => "not compressed",
                            Compression::Gzip => "gzip",
                            Compression::Zstd => "zstd",
                        },
                        "corrupt, or written by a tool that mislabels layers"
                    )));
                }
                mt.to_string()
            }
            None => found.oci_media_type().to_string(),
        };
        let diff_id = found.reader(data).and_then(sha256_of_reader).map_err(|source| ArchiveError::Io {
            action: "decompress",
            path: PathBuf::from(format!("{what} in {}", self.path.display())),
            source,
        })?;
        Ok(LayerBlob { digest: sha256_digest(data), diff_id, data: data.to_vec(), compression: found, media_type })
    }

    /// The config's diff IDs must be the layers' uncompressed digests, one each, in order:
    /// containerd and Docker check the same when they unpack.
    fn check_diff_ids(&self, config: &ImageConfiguration, layers: &[LayerBlob]) -> Result<(), ArchiveError> {
        let diff_ids = config.rootfs().diff_ids();
        if diff_ids.len() != layers.len() {
            return Err(self.format(format!(
                "the image has {} layers but its config lists {} diff_ids",
                layers.len(),
                diff_ids.len()
            )));
        }
        for (i, (l, want)) in layers.iter().zip(diff_ids).enumerate() {
            if &l.diff_id != want {
                return Err(self.format(format!(
                    "layer {i} ({}) unpacks to {}, but the config says {want}",
                    l.digest, l.diff_id
                )));
            }
        }
        Ok(())
    }

    /// Follow index.json (through nested indexes) to this host's image manifest.
    fn read_oci(&self, format: ArchiveFormat) -> Result<ReadImage, ArchiveError> {
        let mut doc = self.get("index.json")?;
        let mut what = "index.json".to_string();
        let mut tags = Vec::new();
        let mut depth = 0;
        let chosen = loop {
            let index: ImageIndex = self.json(doc, what.clone())?;
            let chosen = choose_manifest(&index).map_err(|m| self.format(format!("{what}: {m}")))?;
            for m in index.manifests().iter().filter(|m| m.digest() == chosen.digest()) {
                tags.extend(reference_of(m));
            }
            let media_type = chosen.media_type().to_string();
            let bytes = self.blob(&chosen, "manifest")?;
            if media_type == MediaType::ImageIndex.to_string() || media_type == DOCKER_MANIFEST_LIST {
                depth += 1;
                if depth > 4 {
                    return Err(self.format("indexes nest more than 4 deep".into()));
                }
                what = format!("index {}", chosen.digest());
                doc = bytes;
                continue;
            }
            if media_type != MediaType::ImageManifest.to_string() && media_type != DOCKER_MANIFEST {
                return Err(self.format(format!(
                    "{what} points at {} of media type {media_type}, which is not an image manifest",
                    chosen.digest()
                )));
            }
            break chosen;
        };
        let manifest_bytes = self.blob(&chosen, "manifest")?.to_vec();
        let manifest: ImageManifest = self.json(&manifest_bytes, format!("manifest {}", chosen.digest()))?;
        let config_type = manifest.config().media_type().to_string();
        if config_type != MediaType::ImageConfig.to_string() && config_type != DOCKER_CONFIG {
            return Err(self.format(format!(
                "manifest {} is not a container image: its config has media type {config_type}",
                chosen.digest()
            )));
        }
        let config_bytes = self.blob(manifest.config(), "config")?.to_vec();
        let config: ImageConfiguration = self.json(&config_bytes, format!("config {}", manifest.config().digest()))?;
        let layers = manifest
            .layers()
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let what = format!("layer {i} ({})", d.digest());
                self.layer(self.blob(d, &what)?, Some(&d.media_type().to_string()), &what)
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.check_diff_ids(&config, &layers)?;
        if tags.is_empty() {
            // Docker ≥ 25 names the image in index.json only with a bare tag; its
            // manifest.json has the full one.
            tags = self.docker_entry().ok().and_then(|e| e.repo_tags).unwrap_or_default();
        }
        tags.dedup();
        Ok(ReadImage {
            manifest_digest: chosen.digest().to_string(),
            manifest_media_type: chosen.media_type().to_string(),
            manifest: manifest_bytes,
            config_digest: manifest.config().digest().to_string(),
            config_bytes,
            image: Image { config, layers, tags },
            format,
        })
    }

    fn docker_entry(&self) -> Result<DockerManifestEntry, ArchiveError> {
        let entries: Vec<DockerManifestEntry> = self.json(self.get("manifest.json")?, "manifest.json".into())?;
        entries.into_iter().next().ok_or_else(|| self.format("manifest.json lists no images".into()))
    }

    /// A docker-archive has no manifest, only `manifest.json` naming the config file and
    /// the layer files. The image containerd is given is the OCI manifest synthesized
    /// here, once for every runtime: the config exactly as the tar has it (its digest
    /// stays Docker's image ID), the layer files as blobs under their own digests, each
    /// with the OCI media type of its compression (`docker save` writes plain tars).
    fn read_docker_archive(&self) -> Result<ReadImage, ArchiveError> {
        let entry = self.docker_entry()?;
        let config_name = crate::tree::normalize(&entry.config);
        let config_bytes = self.get(&config_name)?.to_vec();
        let config_digest = sha256_digest(&config_bytes);
        // Docker names the config after its digest (`<hex>.json`, or `blobs/sha256/<hex>`).
        let stem = config_name.rsplit('/').next().unwrap_or_default().trim_end_matches(".json");
        if stem.len() == 64 && stem.bytes().all(|b| b.is_ascii_hexdigit()) && config_digest != format!("sha256:{stem}") {
            return Err(self.format(format!("config {config_name} is corrupt: its content hashes to {config_digest}")));
        }
        let config: ImageConfiguration = self.json(&config_bytes, format!("config {config_name}"))?;
        let layers = entry
            .layers
            .iter()
            .map(|l| {
                let name = crate::tree::normalize(l);
                self.layer(self.get(&name)?, None, &format!("layer {name}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.check_diff_ids(&config, &layers)?;
        let manifest = manifest_for(&config_bytes, &config_digest, &layers);
        Ok(ReadImage {
            manifest_digest: sha256_digest(&manifest),
            manifest_media_type: MediaType::ImageManifest.to_string(),
            manifest,
            config_digest,
            config_bytes,
            image: Image { config, layers, tags: entry.repo_tags.unwrap_or_default() },
            format: ArchiveFormat::Docker,
        })
    }
}

/// The name an index entry gives its image: containerd's annotation, or the OCI ref name
/// when it is a whole reference (podman writes `localhost/app:latest`), not a bare tag.
fn reference_of(d: &Descriptor) -> Option<String> {
    let a = d.annotations().as_ref()?;
    a.get(CONTAINERD_NAME).or_else(|| a.get(OCI_REF_NAME).filter(|r| r.contains('/'))).cloned()
}

/// The architecture name OCI uses for this host.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    }
}

/// The entry of an index to follow: skip Docker's attestation manifests; among entries
/// with a platform, this host's (linux/amd64 here); without platforms, the first.
fn choose_manifest(index: &ImageIndex) -> Result<Descriptor, String> {
    let images: Vec<&Descriptor> = index
        .manifests()
        .iter()
        .filter(|m| {
            m.annotations().as_ref().and_then(|a| a.get("vnd.docker.reference.type")).map(String::as_str)
                != Some("attestation-manifest")
        })
        .collect();
    if images.is_empty() {
        return Err("lists no image manifests".into());
    }
    if images.iter().all(|m| m.platform().is_none()) {
        return Ok(images[0].clone());
    }
    let arch = host_arch();
    images
        .iter()
        .find(|m| {
            m.platform()
                .as_ref()
                .is_none_or(|p| p.os().to_string() == "linux" && p.architecture().to_string() == arch)
        })
        .map(|m| (*m).clone())
        .ok_or_else(|| {
            let have: Vec<String> = images
                .iter()
                .filter_map(|m| m.platform().as_ref())
                .map(|p| format!("{}/{}", p.os(), p.architecture()))
                .collect();
            format!("has no image for linux/{arch} (it has {})", have.join(", "))
        })
}
