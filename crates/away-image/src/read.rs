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
    let truncated = |source| ArchiveError::Truncated { path: path.to_path_buf(), source };
    let mut files = HashMap::new();
    let mut links = Vec::new();
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(truncated)? {
        let mut entry = entry.map_err(truncated)?;
        let name = crate::tree::normalize(&String::from_utf8_lossy(&entry.path_bytes()));
        match entry.header().entry_type() {
            tar::EntryType::Regular => {
                let mut data = Vec::new();
                entry.read_to_end(&mut data).map_err(truncated)?;
                files.insert(name, data);
            }
            // `docker save` and podman write a layer shared by two images once and link
            // the other `<id>/layer.tar` to it (`../<other>/layer.tar`)
            kind @ (tar::EntryType::Symlink | tar::EntryType::Link) => {
                let Some(target) = entry.link_name_bytes() else { continue };
                let target = String::from_utf8_lossy(&target).into_owned();
                let dir = name.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                let target = if kind == tar::EntryType::Symlink && !target.starts_with('/') {
                    crate::tree::normalize(&format!("{dir}/{target}"))
                } else {
                    crate::tree::normalize(&target)
                };
                links.push((name, target));
            }
            _ => {}
        }
    }
    for (name, target) in links {
        if let Some(data) = files.get(&target).cloned() {
            files.entry(name).or_insert(data);
        }
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
        serde_json::from_slice(bytes).map_err(|source| ArchiveError::Json {
            path: self.path.to_path_buf(),
            what,
            source,
        })
    }

    /// The blob a descriptor names, checked against its digest and size.
    fn blob(&self, d: &Descriptor, what: &str) -> Result<&[u8], ArchiveError> {
        let digest = d.digest().to_string();
        if !digest.starts_with("sha256:") {
            return Err(self.format(format!("{what} {digest}: only sha256 digests are supported")));
        }
        let data = self.get(&blob_path(&digest)).map_err(|_| ArchiveError::Missing {
            path: self.path.to_path_buf(),
            what: format!("{what} {}", blob_path(&digest)),
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
                return Err(self
                    .format(format!("layer {i} ({}) unpacks to {}, but the config says {want}", l.digest, l.diff_id)));
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
                let data = self.blob(d, &format!("layer {i}"))?;
                self.layer(data, Some(d.media_type().as_ref()), &format!("layer {i} ({})", d.digest()))
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
        if stem.len() == 64 && stem.bytes().all(|b| b.is_ascii_hexdigit()) && config_digest != format!("sha256:{stem}")
        {
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
            m.platform().as_ref().is_none_or(|p| p.os().to_string() == "linux" && p.architecture().to_string() == arch)
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

#[cfg(test)]
mod tests {
    use std::io::Write;

    use serde_json::json;

    use super::*;
    use crate::tree::{FileTree, Node};

    /// A layer tar holding `path` with `data`.
    fn layer_tar(path: &str, data: &str) -> Vec<u8> {
        let mut t = FileTree::default();
        t.insert(path, Node::File { data: data.as_bytes().to_vec(), mode: 0o755, uid: 0, gid: 0 });
        t.to_tar()
    }

    fn compress(c: Compression, tar: &[u8]) -> Vec<u8> {
        match c {
            Compression::None => tar.to_vec(),
            Compression::Gzip => {
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                gz.write_all(tar).unwrap();
                gz.finish().unwrap()
            }
            Compression::Zstd => zstd::encode_all(tar, 3).unwrap(),
        }
    }

    fn config(diff_ids: &[String]) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": ["/app"], "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "container_config": {"Hostname": "docker-only field"},
        }))
        .unwrap()
    }

    /// Entries of a tar file: (name, content) or (name, symlink target) when the target starts with `->`.
    fn write_tar(dir: &Path, name: &str, entries: &[(String, Vec<u8>)]) -> PathBuf {
        let path = dir.join(name);
        let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
        for (n, data) in entries {
            let mut h = tar::Header::new_gnu();
            if let Some(target) = data.strip_prefix(b"->") {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, n, std::str::from_utf8(target).unwrap()).unwrap();
            } else {
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
                b.append_data(&mut h, n, data.as_slice()).unwrap();
            }
        }
        b.finish().unwrap();
        path
    }

    fn hex(d: &str) -> &str {
        d.trim_start_matches("sha256:")
    }

    /// `docker save` of Docker 20.10: manifest.json, `<config hex>.json`, `<id>/layer.tar`.
    fn legacy(layers: &[Vec<u8>]) -> Vec<(String, Vec<u8>)> {
        let diff_ids: Vec<String> = layers.iter().map(|l| sha256_digest(l)).collect();
        let cfg = config(&diff_ids);
        let cfg_name = format!("{}.json", hex(&sha256_digest(&cfg)));
        let mut entries = vec![];
        let mut names = vec![];
        for (i, l) in layers.iter().enumerate() {
            let id = format!("{i:064x}");
            entries.push((format!("{id}/VERSION"), b"1.0".to_vec()));
            entries.push((format!("{id}/layer.tar"), l.clone()));
            names.push(format!("{id}/layer.tar"));
        }
        let manifest = json!([{"Config": cfg_name, "RepoTags": ["legacy:1"], "Layers": names}]);
        entries.push(("manifest.json".into(), serde_json::to_vec(&manifest).unwrap()));
        entries.push(("repositories".into(), br#"{"legacy":{"1":"x"}}"#.to_vec()));
        entries.push((cfg_name, cfg));
        entries
    }

    /// An OCI layout: index.json (with `annotations`), blobs; layers given compressed,
    /// each with its media type.
    fn oci(layers: &[(Vec<u8>, &str)], annotations: serde_json::Value) -> Vec<(String, Vec<u8>)> {
        let diff_ids: Vec<String> =
            layers.iter().map(|(l, _)| sha256_of_reader(Compression::detect(l).reader(l).unwrap()).unwrap()).collect();
        let cfg = config(&diff_ids);
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256_digest(&cfg), "size": cfg.len()},
            "layers": layers.iter().map(|(l, mt)| json!({"mediaType": mt, "digest": sha256_digest(l), "size": l.len()})).collect::<Vec<_>>(),
        }))
        .unwrap();
        let index = json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha256_digest(&manifest), "size": manifest.len(), "annotations": annotations,
        }]});
        let mut entries = vec![
            ("oci-layout".to_string(), br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()),
            ("index.json".to_string(), serde_json::to_vec(&index).unwrap()),
        ];
        for blob in layers.iter().map(|(l, _)| l.clone()).chain([cfg, manifest]) {
            entries.push((format!("blobs/sha256/{}", hex(&sha256_digest(&blob))), blob));
        }
        entries
    }

    fn file(tree: &FileTree, path: &str) -> String {
        match &tree.entries[path] {
            Node::File { data, .. } => String::from_utf8(data.clone()).unwrap(),
            n => panic!("{path}: {n:?}"),
        }
    }

    fn err_of(dir: &Path, name: &str, entries: &[(String, Vec<u8>)]) -> String {
        let path = write_tar(dir, name, entries);
        let err = read_image_tar(&path).expect_err("refused");
        let text = crate::archive::tests_error_chain(&err);
        assert!(text.contains(path.to_str().unwrap()), "the error names the file: {text}");
        text
    }

    #[test]
    fn docker_20_10_save_gets_a_synthesized_manifest_with_its_own_config() {
        let dir = tempfile::tempdir().unwrap();
        let layers = [layer_tar("app", "v1"), layer_tar("etc/motd", "hello")];
        let path = write_tar(dir.path(), "legacy.tar", &legacy(&layers));
        let read = read_image_tar(&path).unwrap();
        assert_eq!(read.format, ArchiveFormat::Docker);
        assert_eq!(read.image.tags, ["legacy:1"]);
        // the config as the tar has it: its digest is Docker's image ID
        assert_eq!(read.config_digest, sha256_digest(&read.config_bytes));
        let m: ImageManifest = serde_json::from_slice(&read.manifest).unwrap();
        assert_eq!(read.manifest_digest, sha256_digest(&read.manifest));
        assert_eq!(m.config().digest().to_string(), read.config_digest);
        assert_eq!(m.config().size(), read.config_bytes.len() as u64);
        for (d, l) in m.layers().iter().zip(&layers) {
            assert_eq!(d.media_type().to_string(), "application/vnd.oci.image.layer.v1.tar");
            assert_eq!(d.digest().to_string(), sha256_digest(l));
            assert_eq!(d.size(), l.len() as u64);
        }
        let diff_ids: Vec<String> = read.image.layers.iter().map(|l| l.diff_id.clone()).collect();
        assert_eq!(&diff_ids, read.image.config.rootfs().diff_ids());
        let tree = crate::vm::rootfs(&read.image).unwrap();
        assert_eq!(file(&tree, "app"), "v1");
        assert_eq!(file(&tree, "etc/motd"), "hello");
        // the same tar read twice gives the same manifest (a move finds the same image)
        assert_eq!(read_image_tar(&path).unwrap().manifest_digest, read.manifest_digest);
    }

    #[test]
    fn docker_28_save_keeps_its_manifest_and_takes_the_full_tag_from_manifest_json() {
        let dir = tempfile::tempdir().unwrap();
        let layer = layer_tar("app", "d28");
        let mut entries = oci(
            &[(layer.clone(), "application/vnd.oci.image.layer.v1.tar")],
            json!({"org.opencontainers.image.ref.name": "1"}),
        );
        let index: serde_json::Value = serde_json::from_slice(&entries[1].1).unwrap();
        let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap().to_string();
        let m: serde_json::Value =
            serde_json::from_slice(&entries.iter().find(|e| e.0.ends_with(hex(&manifest_digest))).unwrap().1).unwrap();
        let cfg = m["config"]["digest"].as_str().unwrap();
        entries.push((
            "manifest.json".into(),
            serde_json::to_vec(&json!([{"Config": format!("blobs/sha256/{}", hex(cfg)), "RepoTags": ["app:1"],
                "Layers": [format!("blobs/sha256/{}", hex(&sha256_digest(&layer)))]}]))
            .unwrap(),
        ));
        let read = read_image_tar(&write_tar(dir.path(), "d28.tar", &entries)).unwrap();
        assert_eq!(read.format, ArchiveFormat::OciAndDocker);
        assert_eq!(read.manifest_digest, manifest_digest, "the tar's own manifest is used, not a new one");
        assert_eq!(read.image.tags, ["app:1"]);
        assert_eq!(read.image.layers[0].compression, Compression::None);
    }

    #[test]
    fn podman_oci_archive_with_gzip_and_zstd_layers() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (layer_tar("a", "plain"), layer_tar("b", "gzip"), layer_tar("c", "zstd"));
        let entries = oci(
            &[
                (a.clone(), "application/vnd.oci.image.layer.v1.tar"),
                (compress(Compression::Gzip, &b), "application/vnd.oci.image.layer.v1.tar+gzip"),
                (compress(Compression::Zstd, &c), "application/vnd.oci.image.layer.v1.tar+zstd"),
            ],
            json!({"org.opencontainers.image.ref.name": "localhost/app:1"}),
        );
        let path = write_tar(dir.path(), "pod.tar", &entries);
        let read = read_image_tar(&path).unwrap();
        assert_eq!(read.format, ArchiveFormat::Oci);
        assert_eq!(read.image.tags, ["localhost/app:1"]);
        let kinds: Vec<Compression> = read.image.layers.iter().map(|l| l.compression).collect();
        assert_eq!(kinds, [Compression::None, Compression::Gzip, Compression::Zstd]);
        assert_eq!(read.image.layers[2].diff_id, sha256_digest(&c));
        let tree = crate::vm::rootfs(&read.image).unwrap();
        assert_eq!(
            (file(&tree, "a"), file(&tree, "b"), file(&tree, "c")),
            ("plain".into(), "gzip".into(), "zstd".into())
        );

        // docker gets a docker-archive: the same config (image ID), zstd layers as plain tars
        let docker = dir.path().join("for-docker.tar");
        std::fs::write(&docker, read.docker_archive().unwrap()).unwrap();
        let back = read_image_tar(&docker).unwrap();
        assert_eq!(back.format, ArchiveFormat::Docker);
        assert_eq!(back.config_digest, read.config_digest);
        assert_eq!(back.image.tags, read.image.tags);
        let kinds: Vec<Compression> = back.image.layers.iter().map(|l| l.compression).collect();
        assert_eq!(kinds, [Compression::None, Compression::Gzip, Compression::None]);
    }

    #[test]
    fn a_gzipd_save_and_a_symlinked_layer_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let layer = layer_tar("app", "linked");
        let mut entries = legacy(std::slice::from_ref(&layer));
        // podman's docker-archive: `<id>/layer.tar -> ../<sha>.tar`
        let id = format!("{:064x}", 0);
        let real = format!("{}.tar", hex(&sha256_digest(&layer)));
        entries.retain(|e| e.0 != format!("{id}/layer.tar"));
        entries.push((real.clone(), layer.clone()));
        entries.push((format!("{id}/layer.tar"), format!("->../{real}").into_bytes()));
        let path = write_tar(dir.path(), "linked.tar", &entries);
        assert_eq!(read_image_tar(&path).unwrap().image.layers[0].diff_id, sha256_digest(&layer));

        let gz = dir.path().join("linked.tar.gz");
        std::fs::write(&gz, compress(Compression::Gzip, &std::fs::read(&path).unwrap())).unwrap();
        assert_eq!(read_image_tar(&gz).unwrap().image.tags, ["legacy:1"]);
    }

    #[test]
    fn an_index_of_platforms_gives_this_hosts_image_and_skips_attestations() {
        let dir = tempfile::tempdir().unwrap();
        let mut entries = oci(&[(layer_tar("app", "x"), "application/vnd.oci.image.layer.v1.tar")], json!({}));
        let inner: serde_json::Value = serde_json::from_slice(&entries[1].1).unwrap();
        let ours = inner["manifests"][0].clone();
        let mut other = ours.clone();
        other["digest"] = json!(format!("sha256:{}", "1".repeat(64)));
        let mut arm = other.clone();
        arm["platform"] = json!({"os": "linux", "architecture": "arm64"});
        let mut attestation = other.clone();
        attestation["platform"] = json!({"os": "unknown", "architecture": "unknown"});
        attestation["annotations"] = json!({"vnd.docker.reference.type": "attestation-manifest"});
        let mut mine = ours.clone();
        mine["platform"] = json!({"os": "linux", "architecture": host_arch()});
        let nested = serde_json::to_vec(&json!({"schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [arm, attestation, mine]}))
        .unwrap();
        let top = json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json", "digest": sha256_digest(&nested), "size": nested.len(),
            "annotations": {"io.containerd.image.name": "docker.io/library/multi:1"}}]});
        entries[1].1 = serde_json::to_vec(&top).unwrap();
        entries.push((format!("blobs/sha256/{}", hex(&sha256_digest(&nested))), nested));
        let read = read_image_tar(&write_tar(dir.path(), "multi.tar", &entries)).unwrap();
        assert_eq!(read.manifest_digest, ours["digest"].as_str().unwrap());
        assert_eq!(read.image.tags, ["docker.io/library/multi:1"]);

        let index = serde_json::from_value(json!({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{}", "2".repeat(64)),
             "size": 1, "platform": {"os": "linux", "architecture": "s390x"}}]}))
        .unwrap();
        let err = choose_manifest(&index).unwrap_err();
        assert!(err.contains(&format!("no image for linux/{}", host_arch())) && err.contains("linux/s390x"), "{err}");
    }

    #[test]
    fn broken_archives_are_refused_naming_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let layer = layer_tar("app", "x");
        let good =
            oci(&[(compress(Compression::Gzip, &layer), "application/vnd.oci.image.layer.v1.tar+gzip")], json!({}));
        let layer_blob = format!("blobs/sha256/{}", hex(&sha256_digest(&compress(Compression::Gzip, &layer))));

        // truncated in the middle of a blob
        let path = write_tar(dir.path(), "full.tar", &good);
        let bytes = std::fs::read(&path).unwrap();
        let cut = dir.path().join("cut.tar");
        std::fs::write(&cut, &bytes[..bytes.len() / 2 + 100]).unwrap();
        let err = crate::archive::tests_error_chain(&read_image_tar(&cut).unwrap_err());
        assert!(err.contains("cut.tar") && err.contains("truncated"), "{err}");

        // a layer left out
        let missing: Vec<_> = good.iter().filter(|e| e.0 != layer_blob).cloned().collect();
        let err = err_of(dir.path(), "missing.tar", &missing);
        assert!(err.contains("layer 0") && err.contains("missing") && err.contains(&layer_blob), "{err}");

        // a layer whose bytes changed
        let mut corrupt = good.clone();
        let e = corrupt.iter_mut().find(|e| e.0 == layer_blob).unwrap();
        let last = e.1.len() - 1;
        e.1[last] ^= 0xff;
        let err = err_of(dir.path(), "corrupt.tar", &corrupt);
        assert!(err.contains("corrupt: its content hashes to"), "{err}");

        // an unknown layer media type
        let odd = oci(&[(layer.clone(), "application/vnd.example.layer.v1.tar+lz4")], json!({}));
        let err = err_of(dir.path(), "odd.tar", &odd);
        assert!(err.contains("application/vnd.example.layer.v1.tar+lz4") && err.contains("cannot unpack"), "{err}");

        // declared gzip, plain inside
        let mislabelled = oci(&[(layer.clone(), "application/vnd.oci.image.layer.v1.tar+gzip")], json!({}));
        let err = err_of(dir.path(), "mislabelled.tar", &mislabelled);
        assert!(
            err.contains("declared application/vnd.oci.image.layer.v1.tar+gzip") && err.contains("not compressed"),
            "{err}"
        );

        // a docker-archive whose config names other diff_ids than its layers have
        let mut wrong = legacy(std::slice::from_ref(&layer));
        let other = layer_tar("app", "y");
        wrong.iter_mut().find(|e| e.0.ends_with("/layer.tar")).unwrap().1 = other;
        let err = err_of(dir.path(), "wrong.tar", &wrong);
        assert!(err.contains("unpacks to") && err.contains("but the config says"), "{err}");

        // not an image at all
        let err = err_of(dir.path(), "plain.tar", &[("hello.txt".into(), b"hi".to_vec())]);
        assert!(err.contains("not an image tar"), "{err}");
    }
}
