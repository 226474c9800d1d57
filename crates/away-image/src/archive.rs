//! Image tars: write one tar that is both an OCI image layout (`oci-layout`,
//! `index.json`, `blobs/sha256/...`) and a docker-archive (`manifest.json` whose
//! paths point into `blobs/`), and read OCI layouts, docker-archives and
//! `docker save` output back.
//!
//! Why one tar: containerd's `ctr images import` reads the OCI layout (it needs
//! the `io.containerd.image.name` annotation in index.json), Docker 20.10's
//! `docker load` only reads `manifest.json`. Both ignore the other's files, so a
//! single file serves both.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use oci_spec::image::{
    Descriptor, DescriptorBuilder, Digest, ImageConfiguration, ImageIndex, ImageIndexBuilder, ImageManifest,
    ImageManifestBuilder, MediaType,
};
use serde::{Deserialize, Serialize};

use crate::tree::{sha256_digest, LayerBlob, LayerError};

/// Annotation containerd uses for the image name on import.
pub const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// OCI annotation for the reference (the tag) of a manifest in an index.
pub const OCI_REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {what} is missing from the image tar")]
    Missing { path: PathBuf, what: String },
    #[error("{path}: bad {what}")]
    Json {
        path: PathBuf,
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{path}")]
    Layer {
        path: PathBuf,
        #[source]
        source: LayerError,
    },
}

/// An image in memory: its config, its layers (bottom first) and its names.
#[derive(Debug, Clone)]
pub struct Image {
    pub config: ImageConfiguration,
    pub layers: Vec<LayerBlob>,
    /// Docker-style references, e.g. `away/counter:latest`.
    pub tags: Vec<String>,
}

/// Which index files a tar carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ArchiveFormat {
    /// index.json and manifest.json (what away writes).
    OciAndDocker,
    /// index.json only.
    Oci,
    /// manifest.json only (`docker save`).
    Docker,
}

/// An image read from a tar.
#[derive(Debug, Clone)]
pub struct ReadImage {
    pub image: Image,
    pub format: ArchiveFormat,
    /// Digest of the OCI manifest (computed for docker-archives, which have none).
    pub manifest_digest: String,
    pub config_digest: String,
}

/// One entry of a docker-archive `manifest.json`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// JSON with sorted object keys: oci-spec keeps maps in HashMaps, whose order
/// changes from run to run, and digests must not.
pub(crate) fn canonical_json<T: Serialize>(value: &T) -> Vec<u8> {
    fn sort(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(map) => {
                let sorted: BTreeMap<String, serde_json::Value> = map.into_iter().map(|(k, v)| (k, sort(v))).collect();
                serde_json::Value::Object(sorted.into_iter().collect())
            }
            serde_json::Value::Array(a) => serde_json::Value::Array(a.into_iter().map(sort).collect()),
            v => v,
        }
    }
    serde_json::to_vec(&sort(serde_json::to_value(value).expect("image JSON"))).expect("image JSON")
}

/// `counter` -> `docker.io/library/counter:latest`, as Docker and containerd name it.
pub fn normalize_reference(tag: &str) -> String {
    let (name, tagged) = match tag.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n, format!("{n}:{t}")),
        _ => (tag, format!("{tag}:latest")),
    };
    let first = name.split('/').next().unwrap_or_default();
    let has_domain = name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    if has_domain {
        tagged
    } else if name.contains('/') {
        format!("docker.io/{tagged}")
    } else {
        format!("docker.io/library/{tagged}")
    }
}

fn digest(s: &str) -> Digest {
    Digest::from_str(s).expect("sha256 digest we computed")
}

fn blob_path(d: &str) -> String {
    format!("blobs/{}", d.replacen(':', "/", 1))
}

fn descriptor(media_type: MediaType, d: &str, size: usize) -> Descriptor {
    DescriptorBuilder::default()
        .media_type(media_type)
        .digest(digest(d))
        .size(size as u64)
        .build()
        .expect("descriptor fields set")
}

/// The encoded blobs of an image.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub config: Vec<u8>,
    pub config_digest: String,
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
}

impl Image {
    /// Serialise config and manifest (deterministically).
    pub fn encode(&self) -> Encoded {
        let config = canonical_json(&self.config);
        let config_digest = sha256_digest(&config);
        let layers = self
            .layers
            .iter()
            .map(|l| {
                descriptor(
                    if l.gzip { MediaType::ImageLayerGzip } else { MediaType::ImageLayer },
                    &l.digest,
                    l.data.len(),
                )
            })
            .collect::<Vec<_>>();
        let manifest: ImageManifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(descriptor(MediaType::ImageConfig, &config_digest, config.len()))
            .layers(layers)
            .build()
            .expect("manifest fields set");
        let manifest = canonical_json(&manifest);
        Encoded { manifest_digest: sha256_digest(&manifest), config, config_digest, manifest }
    }

    /// Write the combined OCI layout + docker-archive tar to `path`, via a
    /// temporary file in the same directory, so that a failure leaves nothing.
    /// Returns the encoded blobs (their digests name the image).
    pub fn write_tar(&self, path: &Path) -> Result<Encoded, ArchiveError> {
        let enc = self.encode();
        let mut manifests = Vec::new();
        for tag in &self.tags {
            let full = normalize_reference(tag);
            let ref_name = full.rsplit_once(':').map(|(_, t)| t.to_string()).unwrap_or_default();
            let mut d = descriptor(MediaType::ImageManifest, &enc.manifest_digest, enc.manifest.len());
            d.set_annotations(Some(HashMap::from([
                (CONTAINERD_NAME.to_string(), full),
                (OCI_REF_NAME.to_string(), ref_name),
            ])));
            manifests.push(d);
        }
        if manifests.is_empty() {
            manifests.push(descriptor(MediaType::ImageManifest, &enc.manifest_digest, enc.manifest.len()));
        }
        let index: ImageIndex = ImageIndexBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageIndex)
            .manifests(manifests)
            .build()
            .expect("index fields set");
        let docker = vec![DockerManifestEntry {
            config: blob_path(&enc.config_digest),
            repo_tags: Some(self.tags.clone()),
            layers: self.layers.iter().map(|l| blob_path(&l.digest)).collect(),
        }];

        // Sorted, de-duplicated entries; fixed metadata.
        let mut files: BTreeMap<String, &[u8]> = BTreeMap::new();
        let index_json = canonical_json(&index);
        let docker_json = canonical_json(&docker);
        let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
        files.insert("oci-layout".into(), layout);
        files.insert("index.json".into(), &index_json);
        files.insert("manifest.json".into(), &docker_json);
        files.insert(blob_path(&enc.config_digest), &enc.config);
        files.insert(blob_path(&enc.manifest_digest), &enc.manifest);
        for l in &self.layers {
            files.insert(blob_path(&l.digest), &l.data);
        }
        let io = |action, source| ArchiveError::Io { action, path: path.to_path_buf(), source };
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let tmp = tempfile::Builder::new()
            .prefix(".away-image-")
            .suffix(".tmp")
            .tempfile_in(dir)
            .map_err(|e| io("create a temporary file for", e))?;
        {
            let mut b = tar::Builder::new(std::io::BufWriter::new(tmp.as_file()));
            for d in ["blobs/", "blobs/sha256/"] {
                let mut h = tar_header(tar::EntryType::Directory, 0o755, 0);
                b.append_data(&mut h, d, std::io::empty()).map_err(|e| io("write", e))?;
            }
            for (name, data) in &files {
                let mut h = tar_header(tar::EntryType::Regular, 0o644, data.len() as u64);
                b.append_data(&mut h, name, *data).map_err(|e| io("write", e))?;
            }
            b.into_inner().map_err(|e| io("write", e))?.flush().map_err(|e| io("write", e))?;
        }
        // tempfile creates 0600; an image is not a secret.
        tmp.as_file()
            .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .map_err(|e| io("chmod", e))?;
        tmp.as_file().sync_all().map_err(|e| io("sync", e))?;
        tmp.persist(path).map_err(|e| io("rename a temporary file to", e.error))?;
        Ok(enc)
    }
}

fn tar_header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// Read an image tar: away's own, an OCI layout tar, or a docker-archive
/// (including `docker save` output with `<id>/layer.tar` layers).
/// The first image in the tar is returned.
pub fn read_image_tar(path: &Path) -> Result<ReadImage, ArchiveError> {
    let io = |action, source| ArchiveError::Io { action, path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(|e| io("open", e))?;
    let reader: Box<dyn Read> = {
        let mut buf = std::io::BufReader::new(file);
        let gz = std::io::BufRead::fill_buf(&mut buf).map_err(|e| io("read", e))?.starts_with(&[0x1f, 0x8b]);
        if gz {
            Box::new(flate2::read::GzDecoder::new(buf))
        } else {
            Box::new(buf)
        }
    };
    // Image tars of lab apps are small; reading them into memory keeps this simple.
    let mut files: HashMap<String, Vec<u8>> = HashMap::new();
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(|e| io("read", e))? {
        let mut entry = entry.map_err(|e| io("read", e))?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let name = crate::tree::normalize(&String::from_utf8_lossy(&entry.path_bytes()));
        let mut data = Vec::new();
        entry.read_to_end(&mut data).map_err(|e| io("read", e))?;
        files.insert(name, data);
    }
    let get = |name: &str| {
        files.get(name).ok_or_else(|| ArchiveError::Missing { path: path.to_path_buf(), what: name.to_string() })
    };
    let json_err = |what: String| move |source| ArchiveError::Json { path: path.to_path_buf(), what, source };

    let has_index = files.contains_key("index.json");
    let has_docker = files.contains_key("manifest.json");
    let format = match (has_index, has_docker) {
        (true, true) => ArchiveFormat::OciAndDocker,
        (true, false) => ArchiveFormat::Oci,
        (false, true) => ArchiveFormat::Docker,
        (false, false) => {
            return Err(ArchiveError::Format {
                path: path.to_path_buf(),
                message: "neither index.json (OCI layout) nor manifest.json (docker-archive) found: not an image tar"
                    .into(),
            })
        }
    };
    let layer_blob = |name: &str| -> Result<LayerBlob, ArchiveError> {
        let data = get(name)?.clone();
        let gzip = data.starts_with(&[0x1f, 0x8b]);
        let diff_id = if gzip {
            let mut tar = Vec::new();
            flate2::read::GzDecoder::new(data.as_slice())
                .read_to_end(&mut tar)
                .map_err(|e| io("decompress a layer of", e))?;
            sha256_digest(&tar)
        } else {
            sha256_digest(&data)
        };
        Ok(LayerBlob { digest: sha256_digest(&data), diff_id, data, gzip })
    };

    if has_index {
        // Follow index -> (nested index ->) manifest.
        let mut doc = get("index.json")?.clone();
        let mut tags = Vec::new();
        let (manifest, manifest_digest): (ImageManifest, String) = loop {
            let index: ImageIndex = serde_json::from_slice(&doc).map_err(json_err("index".into()))?;
            let first = index.manifests().first().ok_or_else(|| ArchiveError::Format {
                path: path.to_path_buf(),
                message: "index has no manifests".into(),
            })?;
            for m in index.manifests().iter().filter(|m| m.digest() == first.digest()) {
                if let Some(name) = m.annotations().as_ref().and_then(|a| a.get(CONTAINERD_NAME)) {
                    tags.push(name.clone());
                }
            }
            let blob = get(&blob_path(first.digest().as_ref()))?.clone();
            if *first.media_type() == MediaType::ImageIndex {
                doc = blob;
                continue;
            }
            break (
                serde_json::from_slice(&blob).map_err(json_err(format!("manifest {}", first.digest())))?,
                first.digest().to_string(),
            );
        };
        let config_name = blob_path(manifest.config().digest().as_ref());
        let config: ImageConfiguration =
            serde_json::from_slice(get(&config_name)?).map_err(json_err(format!("config {config_name}")))?;
        let layers = manifest
            .layers()
            .iter()
            .map(|l| layer_blob(&blob_path(l.digest().as_ref())))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(ReadImage {
            config_digest: manifest.config().digest().to_string(),
            image: Image { config, layers, tags },
            format,
            manifest_digest,
        });
    }

    let entries: Vec<DockerManifestEntry> =
        serde_json::from_slice(get("manifest.json")?).map_err(json_err("manifest.json".into()))?;
    let entry = entries.into_iter().next().ok_or_else(|| ArchiveError::Format {
        path: path.to_path_buf(),
        message: "manifest.json lists no images".into(),
    })?;
    let config_bytes = get(&crate::tree::normalize(&entry.config))?;
    let config: ImageConfiguration =
        serde_json::from_slice(config_bytes).map_err(json_err(format!("config {}", entry.config)))?;
    let layers = entry.layers.iter().map(|l| layer_blob(&crate::tree::normalize(l))).collect::<Result<Vec<_>, _>>()?;
    let image = Image { config, layers, tags: entry.repo_tags.unwrap_or_default() };
    let enc = image.encode();
    Ok(ReadImage { config_digest: sha256_digest(config_bytes), manifest_digest: enc.manifest_digest, image, format })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_normalised_like_docker() {
        assert_eq!(normalize_reference("counter"), "docker.io/library/counter:latest");
        assert_eq!(normalize_reference("away/counter:v1"), "docker.io/away/counter:v1");
        assert_eq!(normalize_reference("localhost:5000/x:1"), "localhost:5000/x:1");
        assert_eq!(normalize_reference("ghcr.io/a/b"), "ghcr.io/a/b:latest");
    }
}
