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
use std::io::Write;
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
    #[error("cannot read {path}: truncated, or not a tar")]
    Truncated {
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

/// An image read from a tar, its blobs verified against their digests.
#[derive(Debug, Clone)]
pub struct ReadImage {
    pub image: Image,
    pub format: ArchiveFormat,
    /// The manifest exactly as the tar has it; for a docker-archive, which has none, the
    /// OCI manifest away synthesizes for its config and layer files.
    pub manifest: Vec<u8>,
    pub manifest_media_type: String,
    /// Digest of `manifest`.
    pub manifest_digest: String,
    /// The config exactly as the tar has it: Docker's image ID is its digest.
    pub config_bytes: Vec<u8>,
    pub config_digest: String,
}

/// One entry of a docker-archive `manifest.json`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct DockerManifestEntry {
    pub(crate) config: String,
    #[serde(default)]
    pub(crate) repo_tags: Option<Vec<String>>,
    pub(crate) layers: Vec<String>,
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

pub(crate) fn blob_path(d: &str) -> String {
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

/// An OCI manifest for `config` and `layers`, deterministic (sorted keys): away's own
/// images, and the one synthesized for a docker-archive, which carries none.
pub(crate) fn manifest_for(config: &[u8], config_digest: &str, layers: &[LayerBlob]) -> Vec<u8> {
    let layers = layers
        .iter()
        .map(|l| descriptor(MediaType::from(l.media_type.as_str()), &l.digest, l.data.len()))
        .collect::<Vec<_>>();
    let manifest: ImageManifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(descriptor(MediaType::ImageConfig, config_digest, config.len()))
        .layers(layers)
        .build()
        .expect("manifest fields set");
    canonical_json(&manifest)
}

impl Image {
    /// Serialise config and manifest (deterministically).
    pub fn encode(&self) -> Encoded {
        let config = canonical_json(&self.config);
        let config_digest = sha256_digest(&config);
        let manifest = manifest_for(&config, &config_digest, &self.layers);
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

pub use crate::read::read_image_tar;

impl ReadImage {
    /// This image as a docker-archive for `docker load`, in memory: `manifest.json`, the
    /// config exactly as read (so Docker's image ID is `config_digest`) and the layers.
    /// Every Docker since 1.10 loads this, where Docker 20.10 reads no OCI layout. zstd
    /// layers go in decompressed: whether `docker load` unpacks zstd depends on its
    /// version, and a plain tar is what the config's diff_ids name anyway.
    pub fn docker_archive(&self) -> std::io::Result<Vec<u8>> {
        let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        files.insert(blob_path(&self.config_digest), self.config_bytes.clone());
        let mut layers = Vec::new();
        for l in &self.image.layers {
            let (name, data) = match l.compression {
                crate::tree::Compression::Zstd => (blob_path(&l.diff_id), l.compression.decompress(&l.data)?),
                _ => (blob_path(&l.digest), l.data.clone()),
            };
            layers.push(name.clone());
            files.insert(name, data);
        }
        let entry = vec![DockerManifestEntry {
            config: blob_path(&self.config_digest),
            repo_tags: Some(self.image.tags.clone()),
            layers,
        }];
        files.insert("manifest.json".into(), canonical_json(&entry));
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in &files {
            let mut h = tar_header(tar::EntryType::Regular, 0o644, data.len() as u64);
            b.append_data(&mut h, name, data.as_slice())?;
        }
        b.into_inner()
    }
}

/// An error and its causes as one line, for the tests' assertions.
#[cfg(test)]
pub(crate) fn tests_error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
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
