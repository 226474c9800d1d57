//! An in-memory root filesystem and the deterministic tar layers made from it.
//!
//! Lab app images are a few MiB, so holding files in memory keeps the code simple
//! and lets the same tree become a tar layer or a cpio initramfs.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use sha2::{Digest, Sha256};

/// One file system object. Ownership is numeric; times are not kept (layers are
/// written with mtime 0 so that the same inputs give the same digest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir { mode: u32, uid: u64, gid: u64 },
    File { data: Vec<u8>, mode: u32, uid: u64, gid: u64 },
    Symlink { target: String, uid: u64, gid: u64 },
}

/// Paths are relative to `/`, without leading or trailing slash ("app", "etc/hosts").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileTree {
    pub entries: BTreeMap<String, Node>,
}

/// `/a/./b/` -> `a/b`; `..` is dropped at the root, as a kernel would.
pub fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for p in path.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

/// Layer tar error: the only failure is a malformed tar.
#[derive(Debug, thiserror::Error)]
#[error("bad layer tar {name}")]
pub struct LayerError {
    pub name: String,
    #[source]
    pub source: std::io::Error,
}

impl FileTree {
    /// Insert a node and any missing parent directories (0755, root).
    pub fn insert(&mut self, path: &str, node: Node) {
        let path = normalize(path);
        if path.is_empty() {
            return;
        }
        let mut parent = String::new();
        for part in path.split('/').collect::<Vec<_>>().split_last().map(|(_, p)| p.to_vec()).unwrap_or_default() {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            self.entries.entry(parent.clone()).or_insert(Node::Dir { mode: 0o755, uid: 0, gid: 0 });
        }
        self.entries.insert(path, node);
    }

    /// Remove a path and everything below it.
    pub fn remove(&mut self, path: &str) {
        let path = normalize(path);
        let prefix = format!("{path}/");
        self.entries.retain(|k, _| k != &path && !k.starts_with(&prefix));
    }

    /// Total bytes of regular files.
    pub fn file_bytes(&self) -> u64 {
        self.entries.values().map(|n| if let Node::File { data, .. } = n { data.len() as u64 } else { 0 }).sum()
    }

    /// Write the tree as a tar: sorted paths, mtime 0, numeric owners, no user names.
    pub fn to_tar(&self) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, node) in &self.entries {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(0);
            let (uid, gid) = match node {
                Node::Dir { uid, gid, .. } | Node::File { uid, gid, .. } | Node::Symlink { uid, gid, .. } => {
                    (*uid, *gid)
                }
            };
            h.set_uid(uid);
            h.set_gid(gid);
            // Writing to a Vec cannot fail; long names use GNU long-name entries.
            match node {
                Node::Dir { mode, .. } => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(*mode);
                    h.set_size(0);
                    b.append_data(&mut h, format!("{path}/"), std::io::empty()).expect("tar to memory");
                }
                Node::File { data, mode, .. } => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, path, data.as_slice()).expect("tar to memory");
                }
                Node::Symlink { target, .. } => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    b.append_link(&mut h, path, target).expect("tar to memory");
                }
            }
        }
        b.into_inner().expect("tar to memory")
    }

    /// Apply one layer tar (gzip, zstd or plain) on top of this tree, honouring OCI
    /// whiteouts (`.wh.NAME` deletes NAME, `.wh..wh..opq` empties the directory).
    pub fn apply_layer(&mut self, blob: &[u8], name: &str) -> Result<(), LayerError> {
        let err = |source| LayerError { name: name.to_string(), source };
        let mut archive = tar::Archive::new(Compression::detect(blob).reader(blob).map_err(err)?);
        for entry in archive.entries().map_err(err)? {
            let mut entry = entry.map_err(err)?;
            let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let path = normalize(&raw);
            if path.is_empty() {
                continue;
            }
            let (dir, file) = path.rsplit_once('/').unwrap_or(("", &path));
            if file == ".wh..wh..opq" {
                let prefix = if dir.is_empty() { String::new() } else { format!("{dir}/") };
                self.entries.retain(|k, _| !(k.starts_with(&prefix) && k.len() > prefix.len()));
                continue;
            }
            if let Some(gone) = file.strip_prefix(".wh.") {
                self.remove(&if dir.is_empty() { gone.to_string() } else { format!("{dir}/{gone}") });
                continue;
            }
            let h = entry.header();
            let mode = h.mode().map_err(err)? & 0o7777;
            let uid = h.uid().map_err(err)?;
            let gid = h.gid().map_err(err)?;
            let node = match h.entry_type() {
                tar::EntryType::Directory => Node::Dir { mode, uid, gid },
                tar::EntryType::Symlink => {
                    let target =
                        entry.link_name().map_err(err)?.map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
                    Node::Symlink { target, uid, gid }
                }
                tar::EntryType::Link => {
                    // Hard links become copies: neither the tree nor the initramfs needs sharing.
                    let target =
                        entry.link_name().map_err(err)?.map(|p| normalize(&p.to_string_lossy())).unwrap_or_default();
                    match self.entries.get(&target) {
                        Some(n) => n.clone(),
                        None => continue,
                    }
                }
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let mut data = Vec::with_capacity(h.size().unwrap_or(0) as usize);
                    entry.read_to_end(&mut data).map_err(err)?;
                    Node::File { data, mode, uid, gid }
                }
                // Device nodes, fifos: the VM gets devtmpfs, containers get their own /dev.
                _ => continue,
            };
            if matches!(node, Node::Dir { .. }) && matches!(self.entries.get(&path), Some(Node::Dir { .. })) {
                self.entries.insert(path, node); // keep children, update metadata
            } else {
                self.remove(&path);
                self.insert(&path, node);
            }
        }
        Ok(())
    }
}

/// How a layer blob is compressed. Told by its first bytes, which is also how
/// containerd's and Docker's unpackers decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn detect(blob: &[u8]) -> Compression {
        if blob.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if blob.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// The OCI layer media type of a blob compressed this way.
    pub fn oci_media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }

    /// A reader of the uncompressed tar in `blob`.
    pub fn reader(self, blob: &[u8]) -> std::io::Result<Box<dyn Read + '_>> {
        Ok(match self {
            Compression::None => Box::new(blob),
            Compression::Gzip => Box::new(flate2::read::GzDecoder::new(blob)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(blob)?),
        })
    }

    /// The uncompressed tar of `blob`, whole.
    pub fn decompress(self, blob: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut tar = Vec::new();
        self.reader(blob)?.read_to_end(&mut tar)?;
        Ok(tar)
    }
}

/// A layer blob ready to store: the (usually compressed) tar plus both digests.
#[derive(Debug, Clone)]
pub struct LayerBlob {
    /// Bytes as stored in the image (gzip for away's own layers; plain tar or zstd
    /// for some taken over from other tools' images).
    pub data: Vec<u8>,
    pub compression: Compression,
    /// The media type the image's manifest gives it (for images read from a
    /// docker-archive, which has none: the OCI type of its compression).
    pub media_type: String,
    /// sha256 of `data` ("sha256:...").
    pub digest: String,
    /// sha256 of the uncompressed tar ("sha256:...").
    pub diff_id: String,
}

pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// sha256 of what `reader` yields, streamed (a layer's diff ID without holding its tar).
pub fn sha256_of_reader(mut reader: impl Read) -> std::io::Result<String> {
    let mut h = Sha256::new();
    std::io::copy(&mut reader, &mut h)?;
    Ok(format!("sha256:{:x}", h.finalize()))
}

impl LayerBlob {
    /// Compress a tar deterministically: fixed level, no file name, mtime 0 in the gzip header.
    pub fn from_tar(tar: &[u8]) -> LayerBlob {
        let mut gz = flate2::GzBuilder::new().mtime(0).write(Vec::new(), flate2::Compression::new(6));
        gz.write_all(tar).expect("gzip to memory");
        let data = gz.finish().expect("gzip to memory");
        LayerBlob {
            digest: sha256_digest(&data),
            diff_id: sha256_digest(tar),
            data,
            compression: Compression::Gzip,
            media_type: Compression::Gzip.oci_media_type().to_string(),
        }
    }

    /// Uncompressed size and number of tar entries.
    pub fn tar_stats(&self) -> std::io::Result<(u64, usize)> {
        let tar = self.compression.decompress(&self.data)?;
        let entries = tar::Archive::new(tar.as_slice()).entries()?.count();
        Ok((tar.len() as u64, entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(data: &str) -> Node {
        Node::File { data: data.as_bytes().to_vec(), mode: 0o644, uid: 0, gid: 0 }
    }

    #[test]
    fn insert_creates_parents_and_tar_round_trips() {
        let mut t = FileTree::default();
        t.insert("/usr/bin/app", file("x"));
        t.insert("etc/link", Node::Symlink { target: "/usr/bin/app".into(), uid: 0, gid: 0 });
        assert!(matches!(t.entries.get("usr"), Some(Node::Dir { .. })));
        let mut back = FileTree::default();
        back.apply_layer(&LayerBlob::from_tar(&t.to_tar()).data, "t").unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn whiteouts_delete() {
        let mut t = FileTree::default();
        t.insert("a/one", file("1"));
        t.insert("a/two", file("2"));
        t.insert("b/three", file("3"));
        let mut upper = FileTree::default();
        upper.insert("a/.wh.one", file(""));
        upper.insert("b/.wh..wh..opq", file(""));
        t.apply_layer(&upper.to_tar(), "upper").unwrap();
        assert!(!t.entries.contains_key("a/one"));
        assert!(t.entries.contains_key("a/two"));
        assert!(t.entries.contains_key("b"));
        assert!(!t.entries.contains_key("b/three"));
    }
}
