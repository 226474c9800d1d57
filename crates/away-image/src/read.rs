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
//!
//! Image tars come from users and other nodes, so reading one is bounded ([`ReadLimits`]):
//! the tar is streamed, keeping only small files (the JSON documents) from a first pass and
//! reading again just the layers the chosen manifest names; a layer that unpacks to more
//! than the limit (a gzip bomb), a document too large to be one, and indexes nested too
//! deep or in a cycle each end the read with an error naming the part.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType};
use sha2::{Digest as _, Sha256};

use crate::archive::{
    blob_path, manifest_for, ArchiveError, ArchiveFormat, DockerManifestEntry, Image, ReadImage, CONTAINERD_NAME,
    OCI_REF_NAME,
};
use crate::tree::{sha256_digest, Compression, LayerBlob};

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

/// Bounds on what reading one image tar may cost. [`read_image_tar`] uses
/// [`DEFAULT_READ_LIMITS`]; [`read_image_tar_with`] takes others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimits {
    /// Bytes of tar read in one pass, after the tar's own decompression (`docker save | gzip`).
    pub max_tar_bytes: u64,
    /// One layer's tar once decompressed: a gzip or zstd bomb stops here, naming the layer.
    pub max_layer_bytes: u64,
    /// One JSON document (index, manifest, config, `manifest.json`). Files this small are
    /// kept from the first pass (up to 64 times this in all); the others are read
    /// only if a layer names them.
    pub max_json_bytes: u64,
    /// Indexes followed below `index.json` (an index of platforms is one).
    pub max_index_depth: usize,
}

/// The defaults: far above any lab or distribution image, far below what fills a node.
pub const DEFAULT_READ_LIMITS: ReadLimits =
    ReadLimits { max_tar_bytes: 64 << 30, max_layer_bytes: 32 << 30, max_json_bytes: 4 << 20, max_index_depth: 4 };

impl Default for ReadLimits {
    fn default() -> Self {
        DEFAULT_READ_LIMITS
    }
}

/// Small files kept from the first pass, in all: bounds memory when a compressed tar
/// unpacks to very many of them.
const KEPT_FILES_FACTOR: u64 = 64;

/// Read an image tar of any of the formats above (the tar itself may be gzip'd or
/// zstd'd, as `docker save | gzip` gives). The first image in the tar (in an index of
/// several platforms, the one for this host's) is returned.
pub fn read_image_tar(path: &Path) -> Result<ReadImage, ArchiveError> {
    read_image_tar_with(path, DEFAULT_READ_LIMITS)
}

/// [`read_image_tar`] within other limits.
pub fn read_image_tar_with(path: &Path, limits: ReadLimits) -> Result<ReadImage, ArchiveError> {
    read(path, Source::File(path), limits)
}

/// Entry points for the fuzz targets (`fuzz/`) and their corpus replay; not an API.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// An image tar in memory, read as [`read_image_tar_with`] reads a file.
    pub fn read_image_bytes(tar: &[u8], limits: ReadLimits) -> Result<ReadImage, ArchiveError> {
        read(Path::new("<image tar>"), Source::Bytes(tar), limits)
    }

    /// Limits small enough that a fuzzer finds a bomb in milliseconds.
    pub const LIMITS: ReadLimits =
        ReadLimits { max_tar_bytes: 64 << 20, max_layer_bytes: 16 << 20, max_json_bytes: 1 << 20, max_index_depth: 4 };

    /// What the fuzz target runs: read `tar`; an image that reads is whole (a layer per
    /// diff ID, each blob its digest) and, written for `docker load`, reads back the same.
    pub fn read_image(tar: &[u8]) -> Result<(), ArchiveError> {
        let read = read_image_bytes(tar, LIMITS)?;
        assert_eq!(read.image.layers.len(), read.image.config.rootfs().diff_ids().len());
        assert_eq!(read.manifest_digest, sha256_digest(&read.manifest));
        assert_eq!(read.config_digest, sha256_digest(&read.config_bytes));
        for l in &read.image.layers {
            assert_eq!(l.digest, sha256_digest(&l.data));
        }
        let docker = read.docker_archive().expect("an image that reads writes as a docker-archive");
        let back = read_image_bytes(&docker, ReadLimits { max_tar_bytes: u64::MAX, ..LIMITS })
            .unwrap_or_else(|e| panic!("its docker-archive does not read back: {e}"));
        assert_eq!(back.config_digest, read.config_digest);
        assert_eq!(back.image.tags, read.image.tags);
        Ok(())
    }
}

fn read(path: &Path, source: Source<'_>, limits: ReadLimits) -> Result<ReadImage, ArchiveError> {
    let tar = Tar::scan(path, source, limits)?;
    let has_index = tar.names.contains_key("index.json");
    let has_docker = tar.names.contains_key("manifest.json");
    match (has_index, has_docker) {
        (true, true) => tar.read_oci(ArchiveFormat::OciAndDocker),
        (true, false) => tar.read_oci(ArchiveFormat::Oci),
        (false, true) => tar.read_docker_archive(),
        (false, false) => Err(tar.format(
            "neither index.json (OCI layout) nor manifest.json (docker-archive) found: not an image tar".into(),
        )),
    }
}

/// Where the tar's bytes come from; read once, and again for the large layers.
#[derive(Clone, Copy)]
enum Source<'a> {
    File(&'a Path),
    Bytes(&'a [u8]),
}

/// A reader that fails once more than `left` bytes went through, and says so in `over`.
struct Capped<R> {
    inner: R,
    left: u64,
    over: Rc<Cell<bool>>,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            self.over.set(true);
            return Err(std::io::Error::other("size limit reached"));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// One regular file of the tar, in the order the tar has them.
struct Entry {
    size: u64,
    /// Its bytes when small enough to keep from the first pass.
    data: Option<Vec<u8>>,
}

struct Tar<'a> {
    path: &'a Path,
    source: Source<'a>,
    limits: ReadLimits,
    entries: Vec<Entry>,
    /// Normalised path (or link to a file) -> index in `entries`.
    names: HashMap<String, usize>,
}

impl<'a> Tar<'a> {
    fn io(&self, action: &'static str, source: std::io::Error) -> ArchiveError {
        ArchiveError::Io { action, path: self.path.to_path_buf(), source }
    }

    fn format(&self, message: String) -> ArchiveError {
        ArchiveError::Format { path: self.path.to_path_buf(), message }
    }

    /// The decompressed tar stream, capped at `max_tar_bytes`; `over` turns true at the cap.
    fn open(&self, over: &Rc<Cell<bool>>) -> Result<tar::Archive<Box<dyn Read + 'a>>, ArchiveError> {
        let raw: Box<dyn Read + 'a> = match self.source {
            Source::File(p) => {
                let file = std::fs::File::open(p).map_err(|e| self.io("open", e))?;
                Box::new(std::io::BufReader::with_capacity(1 << 20, file))
            }
            Source::Bytes(b) => Box::new(b),
        };
        let mut raw = std::io::BufReader::new(raw);
        let head = std::io::BufRead::fill_buf(&mut raw).map_err(|e| self.io("read", e))?;
        let reader: Box<dyn Read + 'a> = match Compression::detect(head) {
            Compression::None => Box::new(raw),
            Compression::Gzip => Box::new(flate2::read::GzDecoder::new(raw)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(raw).map_err(|e| self.io("decompress", e))?),
        };
        let capped = Capped { inner: reader, left: self.limits.max_tar_bytes, over: over.clone() };
        Ok(tar::Archive::new(Box::new(capped)))
    }

    /// An error of reading the tar: the size limit when it was reached, else truncation.
    fn read_error(&self, over: &Cell<bool>, source: std::io::Error) -> ArchiveError {
        if over.get() {
            self.format(format!(
                "the tar unpacks to more than {} bytes, the limit (ReadLimits::max_tar_bytes)",
                self.limits.max_tar_bytes
            ))
        } else {
            ArchiveError::Truncated { path: self.path.to_path_buf(), source }
        }
    }

    /// The first pass: every regular file's size, the small ones' bytes, and the links
    /// between names.
    fn scan(path: &'a Path, source: Source<'a>, limits: ReadLimits) -> Result<Tar<'a>, ArchiveError> {
        let mut tar = Tar { path, source, limits, entries: Vec::new(), names: HashMap::new() };
        let over = Rc::new(Cell::new(false));
        let mut archive = tar.open(&over)?;
        let mut kept = 0u64;
        let mut links = Vec::new();
        let entries = archive.entries().map_err(|e| tar.read_error(&over, e))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| tar.read_error(&over, e))?;
            let name = crate::tree::normalize(&String::from_utf8_lossy(&entry.path_bytes()));
            match entry.header().entry_type() {
                tar::EntryType::Regular => {
                    let size = entry.size();
                    let keep = size <= limits.max_json_bytes
                        && kept + size <= limits.max_json_bytes.saturating_mul(KEPT_FILES_FACTOR);
                    let data = if keep {
                        kept += size;
                        // `size` is at most max_json_bytes: a bounded allocation.
                        let mut data = Vec::with_capacity(size as usize);
                        entry.read_to_end(&mut data).map_err(|e| tar.read_error(&over, e))?;
                        Some(data)
                    } else {
                        None // skipped, streamed past by the tar reader
                    };
                    tar.names.insert(name, tar.entries.len());
                    tar.entries.push(Entry { size, data });
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
            if let Some(&i) = tar.names.get(&target) {
                tar.names.entry(name).or_insert(i);
            }
        }
        Ok(tar)
    }

    /// The second pass: the bytes of the large files `wanted` (indexes into `entries`).
    fn load(&self, wanted: &HashSet<usize>) -> Result<HashMap<usize, Vec<u8>>, ArchiveError> {
        let mut out = HashMap::new();
        let wanted: HashSet<usize> = wanted.iter().copied().filter(|&i| self.entries[i].data.is_none()).collect();
        if wanted.is_empty() {
            return Ok(out);
        }
        let over = Rc::new(Cell::new(false));
        let mut archive = self.open(&over)?;
        let mut i = 0;
        for entry in archive.entries().map_err(|e| self.read_error(&over, e))? {
            let entry = entry.map_err(|e| self.read_error(&over, e))?;
            if entry.header().entry_type() != tar::EntryType::Regular {
                continue;
            }
            if wanted.contains(&i) {
                let size = self.entries[i].size;
                if entry.size() != size {
                    return Err(self.format("the tar changed while it was read".into()));
                }
                // Grows as the bytes arrive: `size` is not trusted for an allocation.
                let mut data = Vec::new();
                entry.take(size).read_to_end(&mut data).map_err(|e| self.read_error(&over, e))?;
                out.insert(i, data);
                if out.len() == wanted.len() {
                    break;
                }
            }
            i += 1;
        }
        if out.len() != wanted.len() {
            return Err(self.format("the tar changed while it was read".into()));
        }
        Ok(out)
    }

    fn index_of(&self, name: &str) -> Result<usize, ArchiveError> {
        self.names
            .get(name)
            .copied()
            .ok_or_else(|| ArchiveError::Missing { path: self.path.to_path_buf(), what: name.to_string() })
    }

    /// A small file (a JSON document), read in the first pass.
    fn small(&self, i: usize, what: &str) -> Result<&[u8], ArchiveError> {
        let e = &self.entries[i];
        e.data.as_deref().ok_or_else(|| {
            self.format(format!(
                "{what} is {} bytes, more than the {} a JSON document may have (ReadLimits::max_json_bytes)",
                e.size, self.limits.max_json_bytes
            ))
        })
    }

    fn get(&self, name: &str) -> Result<&[u8], ArchiveError> {
        self.small(self.index_of(name)?, name)
    }

    fn json<T: serde::de::DeserializeOwned>(&self, bytes: &[u8], what: String) -> Result<T, ArchiveError> {
        serde_json::from_slice(bytes).map_err(|source| ArchiveError::Json {
            path: self.path.to_path_buf(),
            what,
            source,
        })
    }

    /// The file of the blob a descriptor names, its size checked (the content is checked
    /// by [`Tar::check_digest`] once read).
    fn blob_entry(&self, d: &Descriptor, what: &str) -> Result<usize, ArchiveError> {
        let digest = d.digest().to_string();
        let hex = digest
            .strip_prefix("sha256:")
            .ok_or_else(|| self.format(format!("{what} {digest}: only sha256 digests are supported")))?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(self.format(format!("{what} {digest}: not a sha256 digest (64 lowercase hex digits)")));
        }
        let i = self.names.get(&blob_path(&digest)).copied().ok_or_else(|| ArchiveError::Missing {
            path: self.path.to_path_buf(),
            what: format!("{what} {}", blob_path(&digest)),
        })?;
        if self.entries[i].size != d.size() {
            return Err(self.format(format!(
                "{what} {digest} is {} bytes, but the descriptor says {}",
                self.entries[i].size,
                d.size()
            )));
        }
        Ok(i)
    }

    fn check_digest(&self, data: &[u8], digest: &str, what: &str) -> Result<(), ArchiveError> {
        let actual = sha256_digest(data);
        if actual != digest {
            return Err(self.format(format!("{what} {digest} is corrupt: its content hashes to {actual}")));
        }
        Ok(())
    }

    /// A small blob (index, manifest, config) a descriptor names, checked against its
    /// digest and size.
    fn small_blob(&self, d: &Descriptor, what: &str) -> Result<&[u8], ArchiveError> {
        let i = self.blob_entry(d, what)?;
        let data = self.small(i, &format!("{what} {}", d.digest()))?;
        self.check_digest(data, d.digest().as_ref(), what)?;
        Ok(data)
    }

    /// Layers' bytes, one per entry of `files` (indexes into `entries`), each read once
    /// even when the tar links two names to it.
    fn layer_bytes(&self, files: &[usize]) -> Result<Vec<Vec<u8>>, ArchiveError> {
        let mut large = self.load(&files.iter().copied().collect())?;
        let mut uses: HashMap<usize, usize> = HashMap::new();
        for &i in files {
            *uses.entry(i).or_default() += 1;
        }
        Ok(files
            .iter()
            .map(|&i| {
                let left = uses.get_mut(&i).expect("counted");
                *left -= 1;
                match (&self.entries[i].data, *left) {
                    (Some(small), _) => small.clone(),
                    (None, 0) => large.remove(&i).expect("loaded"),
                    (None, _) => large[&i].clone(),
                }
            })
            .collect())
    }

    /// One layer: its compression (from its first bytes, which must agree with a media
    /// type when there is one) and its diff ID, unpacked at most to `max_layer_bytes`.
    fn layer(&self, data: Vec<u8>, media_type: Option<&str>, what: &str) -> Result<LayerBlob, ArchiveError> {
        let found = Compression::detect(&data);
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
        let decompress_error = |source| ArchiveError::Io {
            action: "decompress",
            path: PathBuf::from(format!("{what} in {}", self.path.display())),
            source,
        };
        let max = self.limits.max_layer_bytes;
        let mut unpacked = found.reader(&data).map_err(decompress_error)?.take(max.saturating_add(1));
        let mut hasher = Sha256::new();
        let n = std::io::copy(&mut unpacked, &mut hasher).map_err(decompress_error)?;
        if n > max {
            return Err(self
                .format(format!("{what} unpacks to more than {max} bytes, the limit (ReadLimits::max_layer_bytes)")));
        }
        drop(unpacked);
        let diff_id = format!("sha256:{:x}", hasher.finalize());
        Ok(LayerBlob { digest: sha256_digest(&data), diff_id, data, compression: found, media_type })
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
        let mut seen = HashSet::new();
        let chosen = loop {
            let index: ImageIndex = self.json(doc, what.clone())?;
            let chosen = choose_manifest(&index).map_err(|m| self.format(format!("{what}: {m}")))?;
            for m in index.manifests().iter().filter(|m| m.digest() == chosen.digest()) {
                tags.extend(reference_of(m));
            }
            let media_type = chosen.media_type().to_string();
            let bytes = self.small_blob(&chosen, "manifest")?;
            if media_type == MediaType::ImageIndex.to_string() || media_type == DOCKER_MANIFEST_LIST {
                if !seen.insert(chosen.digest().to_string()) {
                    return Err(self.format(format!(
                        "{what} points to index {}, which contains it: indexes in a cycle",
                        chosen.digest()
                    )));
                }
                if seen.len() > self.limits.max_index_depth {
                    return Err(self.format(format!(
                        "indexes nest more than {} deep (ReadLimits::max_index_depth)",
                        self.limits.max_index_depth
                    )));
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
        let manifest_bytes = self.small_blob(&chosen, "manifest")?.to_vec();
        let manifest: ImageManifest = self.json(&manifest_bytes, format!("manifest {}", chosen.digest()))?;
        let config_type = manifest.config().media_type().to_string();
        if config_type != MediaType::ImageConfig.to_string() && config_type != DOCKER_CONFIG {
            return Err(self.format(format!(
                "manifest {} is not a container image: its config has media type {config_type}",
                chosen.digest()
            )));
        }
        let config_bytes = self.small_blob(manifest.config(), "config")?.to_vec();
        let config: ImageConfiguration = self.json(&config_bytes, format!("config {}", manifest.config().digest()))?;
        // Sizes and names first, from the first pass: nothing large is read for a
        // manifest that is wrong anyway.
        let files = manifest
            .layers()
            .iter()
            .enumerate()
            .map(|(i, d)| self.blob_entry(d, &format!("layer {i}")))
            .collect::<Result<Vec<_>, _>>()?;
        let layers = self
            .layer_bytes(&files)?
            .into_iter()
            .zip(manifest.layers())
            .enumerate()
            .map(|(i, (data, d))| {
                self.check_digest(&data, d.digest().as_ref(), &format!("layer {i}"))?;
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
        if let Some(hex) = digest_named(&config_name, ".json") {
            self.check_digest(&config_bytes, &format!("sha256:{hex}"), &format!("config {config_name}"))?;
        }
        let config: ImageConfiguration = self.json(&config_bytes, format!("config {config_name}"))?;
        let names: Vec<String> = entry.layers.iter().map(|l| crate::tree::normalize(l)).collect();
        let files = names.iter().map(|n| self.index_of(n)).collect::<Result<Vec<_>, _>>()?;
        let layers = self
            .layer_bytes(&files)?
            .into_iter()
            .zip(&names)
            .map(|(data, name)| {
                // Docker ≥ 25 and podman name layer files after their digest: it must hold.
                if let Some(hex) = digest_named(name, ".tar") {
                    self.check_digest(&data, &format!("sha256:{hex}"), &format!("layer {name}"))?;
                }
                self.layer(data, None, &format!("layer {name}"))
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

/// The hex digest a file is named after: `blobs/sha256/<hex>` or `<hex><ext>`.
fn digest_named<'n>(name: &'n str, ext: &str) -> Option<&'n str> {
    let stem = name.strip_prefix("blobs/sha256/").or_else(|| name.strip_suffix(ext))?;
    let stem = stem.rsplit('/').next().unwrap_or_default();
    (stem.len() == 64 && stem.bytes().all(|b| b.is_ascii_hexdigit())).then_some(stem)
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
    use crate::tree::{sha256_of_reader, FileTree, Node};

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

    fn err_with(dir: &Path, name: &str, entries: &[(String, Vec<u8>)], limits: ReadLimits) -> String {
        let path = write_tar(dir, name, entries);
        let err = read_image_tar_with(&path, limits).expect_err("refused");
        let text = crate::archive::tests_error_chain(&err);
        assert!(text.contains(path.to_str().unwrap()), "the error names the file: {text}");
        text
    }

    /// `entries` with index.json pointing through `levels` nested indexes to its image.
    fn nested(mut entries: Vec<(String, Vec<u8>)>, levels: usize) -> Vec<(String, Vec<u8>)> {
        for _ in 0..levels {
            let index = entries[1].1.clone();
            entries.push((format!("blobs/sha256/{}", hex(&sha256_digest(&index))), index.clone()));
            entries[1].1 = serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [{
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": sha256_digest(&index), "size": index.len()}]}))
            .unwrap();
        }
        entries
    }

    #[test]
    fn an_index_pointing_to_itself_or_nesting_too_deep_ends_with_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let good = oci(&[(layer_tar("app", "x"), "application/vnd.oci.image.layer.v1.tar")], json!({}));
        // A blob cannot hold its own digest, so an index "pointing to itself" claims a
        // digest its content does not have: refused as corrupt, not followed.
        let mut cyclic = good.clone();
        let name = format!("blobs/sha256/{}", "ab".repeat(32));
        let mut size = 0;
        let selfref = loop {
            let doc = serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [{
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": format!("sha256:{}", "ab".repeat(32)), "size": size}]}))
            .unwrap();
            if doc.len() == size {
                break doc;
            }
            size = doc.len();
        };
        cyclic[1].1 = selfref.clone();
        cyclic.push((name, selfref));
        let err = err_of(dir.path(), "cyclic.tar", &cyclic);
        assert!(err.contains(&"ab".repeat(32)) && err.contains("is corrupt"), "{err}");

        // nested indexes read up to the limit, and refused past it
        let path = write_tar(dir.path(), "deep4.tar", &nested(good.clone(), 4));
        read_image_tar(&path).expect("4 nested indexes are read");
        let err = err_of(dir.path(), "deep5.tar", &nested(good.clone(), 5));
        assert!(err.contains("indexes nest more than 4 deep"), "{err}");
        let limits = ReadLimits { max_index_depth: 1, ..DEFAULT_READ_LIMITS };
        let err = err_with(dir.path(), "deep2.tar", &nested(good, 2), limits);
        assert!(err.contains("indexes nest more than 1 deep"), "{err}");
    }

    #[test]
    fn a_gzip_bomb_layer_is_refused_at_the_limit_naming_the_layer() {
        let dir = tempfile::tempdir().unwrap();
        // 2 MiB of zeros in one file: about 2 KiB as gzip, less as zstd (debug builds
        // compress slowly: the real bombs are the fuzz targets' business)
        let mut t = FileTree::default();
        t.insert("zeros", Node::File { data: vec![0; 2 << 20], mode: 0o644, uid: 0, gid: 0 });
        let bomb = t.to_tar();
        let limits = ReadLimits { max_layer_bytes: 512 << 10, ..DEFAULT_READ_LIMITS };
        for (c, mt) in [
            (Compression::Gzip, "application/vnd.oci.image.layer.v1.tar+gzip"),
            (Compression::Zstd, "application/vnd.oci.image.layer.v1.tar+zstd"),
        ] {
            let blob = compress(c, &bomb);
            assert!(blob.len() < 16 << 10, "small on disk: {}", blob.len());
            let entries = oci(&[(blob.clone(), mt)], json!({}));
            let err = err_with(dir.path(), "bomb.tar", &entries, limits);
            assert!(
                err.contains(&format!("layer 0 ({})", sha256_digest(&blob)))
                    && err.contains("unpacks to more than 524288 bytes"),
                "{err}"
            );
            // within a limit that allows it, the same image reads
            let path = write_tar(dir.path(), "bomb.tar", &entries);
            let read = read_image_tar_with(&path, ReadLimits { max_layer_bytes: 3 << 20, ..limits }).unwrap();
            assert_eq!(read.image.layers[0].diff_id, sha256_digest(&bomb));
        }

        // the image tar itself gzip'd: capped as it is read
        let path = write_tar(dir.path(), "plain.tar", &legacy(std::slice::from_ref(&bomb)));
        let gz = dir.path().join("tar-bomb.tar.gz");
        std::fs::write(&gz, compress(Compression::Gzip, &std::fs::read(&path).unwrap())).unwrap();
        let limits = ReadLimits { max_tar_bytes: 1 << 20, ..DEFAULT_READ_LIMITS };
        let err = crate::archive::tests_error_chain(&read_image_tar_with(&gz, limits).unwrap_err());
        assert!(err.contains("tar-bomb.tar.gz") && err.contains("the tar unpacks to more than 1048576 bytes"), "{err}");
        assert_eq!(read_image_tar(&gz).unwrap().image.layers[0].diff_id, sha256_digest(&bomb));
    }

    #[test]
    fn every_blob_is_checked_against_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let layer = layer_tar("app", "x");
        let good = oci(&[(layer.clone(), "application/vnd.oci.image.layer.v1.tar")], json!({}));
        let index: serde_json::Value = serde_json::from_slice(&good[1].1).unwrap();
        let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap().to_string();
        let manifest_name = format!("blobs/sha256/{}", hex(&manifest_digest));
        let manifest: serde_json::Value =
            serde_json::from_slice(&good.iter().find(|e| e.0 == manifest_name).unwrap().1).unwrap();
        let config_name = format!("blobs/sha256/{}", hex(manifest["config"]["digest"].as_str().unwrap()));

        // one byte of the manifest, then of the config, changed (same size): refused by name
        for (name, what) in [(&manifest_name, "manifest"), (&config_name, "config")] {
            let mut bad = good.clone();
            let e = bad.iter_mut().find(|e| &e.0 == name).unwrap();
            let i = e.1.iter().position(|&b| b == b'{').unwrap();
            e.1[i] = b'[';
            let err = err_of(dir.path(), "bad.tar", &bad);
            assert!(err.contains(&format!("{what} sha256:{}", hex(name.trim_start_matches("blobs/sha256/")))), "{err}");
            assert!(err.contains("is corrupt: its content hashes to"), "{err}");
        }

        // a layer of another size than its descriptor says: refused before it is read
        let mut longer = good.clone();
        let layer_name = format!("blobs/sha256/{}", hex(&sha256_digest(&layer)));
        longer.iter_mut().find(|e| e.0 == layer_name).unwrap().1.extend_from_slice(&[0; 512]);
        let err = err_of(dir.path(), "longer.tar", &longer);
        assert!(
            err.contains(&format!("is {} bytes, but the descriptor says {}", layer.len() + 512, layer.len())),
            "{err}"
        );

        // a docker-archive layer named after a digest it does not have, even when the config
        // agrees with its content
        let other = layer_tar("app", "y");
        let cfg = config(&[sha256_digest(&other)]);
        let cfg_name = format!("{}.json", hex(&sha256_digest(&cfg)));
        let named = format!("blobs/sha256/{}", hex(&sha256_digest(&layer)));
        let entries = vec![
            (
                "manifest.json".to_string(),
                serde_json::to_vec(&json!([{"Config": cfg_name, "Layers": [named]}])).unwrap(),
            ),
            (cfg_name.clone(), cfg),
            (named.clone(), other),
        ];
        let err = err_of(dir.path(), "misnamed.tar", &entries);
        assert!(err.contains(&format!("layer {named}")) && err.contains("is corrupt"), "{err}");
    }

    #[test]
    fn large_layers_are_read_in_a_second_pass_and_large_documents_refused() {
        let dir = tempfile::tempdir().unwrap();
        // every layer larger than what the first pass keeps
        let limits = ReadLimits { max_json_bytes: 4096, ..DEFAULT_READ_LIMITS };
        let layers = [layer_tar("a", &"a".repeat(10_000)), layer_tar("b", &"b".repeat(20_000))];
        let mut entries = legacy(&layers);
        // the second name links to the first layer's file, as `docker save` writes shared layers
        entries.push((
            "zz/layer.tar".into(),
            b"->../00000000000000000000000000000000000000000000000000000000000000000/layer.tar".to_vec(),
        ));
        let path = write_tar(dir.path(), "big.tar", &entries);
        let read = read_image_tar_with(&path, limits).unwrap();
        assert_eq!(
            read.image.layers.iter().map(|l| l.data.len()).collect::<Vec<_>>(),
            [layers[0].len(), layers[1].len()]
        );
        let gz = dir.path().join("big.tar.gz");
        std::fs::write(&gz, compress(Compression::Gzip, &std::fs::read(&path).unwrap())).unwrap();
        let again = read_image_tar_with(&gz, limits).unwrap();
        assert_eq!(again.manifest_digest, read.manifest_digest);

        // a config larger than a document may be
        let mut fat = oci(&[(layers[0].clone(), "application/vnd.oci.image.layer.v1.tar")], json!({}));
        fat[1].1.extend(std::iter::repeat_n(b' ', 5000));
        let err = err_with(dir.path(), "fat.tar", &fat, limits);
        assert!(err.contains("index.json is") && err.contains("ReadLimits::max_json_bytes"), "{err}");
    }
}
