//! VM disks: base images in the node's disk store, one qcow2 overlay per workload.
//!
//! The store is a directory (`<host state>/disks/`, or the runtime's own, see
//! [`super::QemuRuntime::with_disk_store`]) holding each base image under the hex of its
//! SHA-256 (`<hex>`) with what `qemu-img info` said about it (`<hex>.json`: format and
//! virtual size). A base is imported once ([`DiskStore::import`]) and never written:
//! each VM with a disk gets `disk.qcow2` in its state directory, a copy-on-write overlay
//! whose backing file is the base, so what the guest writes is only in the overlay.
//! A live migration creates an empty overlay on the same base at the destination and
//! mirrors the source overlay's allocated clusters into it (docs/vm.md).
//!
//! `qemu-img` does the image work: no crate reads and writes qcow2 headers, and the
//! overlay must be exactly what QEMU expects.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use away_model::{DiskSpec, RuntimeKind};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::runtime::RuntimeError;

const KIND: RuntimeKind = RuntimeKind::Qemu;
/// The overlay's file name in a VM's state directory.
pub const OVERLAY_FILE: &str = "disk.qcow2";
/// The QEMU block node of the overlay (the format node the guest's virtio-blk uses):
/// what a migration mirrors from and exports to.
pub const DISK_NODE: &str = "disk0";

/// A base image of the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseImage {
    /// `sha256:<hex>` of the file.
    pub digest: String,
    pub path: PathBuf,
    /// `qcow2` or `raw`.
    pub format: String,
    /// Bytes the guest sees.
    pub virtual_size: u64,
}

/// What `<hex>.json` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BaseInfo {
    format: String,
    virtual_size: u64,
}

/// The node's base disk images, by digest.
#[derive(Debug, Clone)]
pub struct DiskStore {
    pub dir: PathBuf,
    /// `qemu-img` (beside `qemu-system-x86_64`, else on PATH).
    pub qemu_img: PathBuf,
}

fn disk_err(reason: String) -> RuntimeError {
    RuntimeError::Invalid { field: "disk".into(), reason }
}

impl DiskStore {
    pub fn new(dir: PathBuf, qemu: &Path) -> DiskStore {
        let beside = qemu.with_file_name("qemu-img");
        let qemu_img = if beside.is_file() { beside } else { PathBuf::from("qemu-img") };
        DiskStore { dir, qemu_img }
    }

    fn hex(digest: &str) -> Result<&str, RuntimeError> {
        let probe = DiskSpec { base: digest.to_string(), size: away_model::ByteSize(0), mount: None };
        probe
            .base_hex()
            .map(|_| &digest["sha256:".len()..])
            .ok_or_else(|| disk_err(format!("{digest:?} is not a digest (sha256:<64 hex>)")))
    }

    /// Whether the store has the base `digest` (recorded and present).
    pub fn contains(&self, digest: &str) -> bool {
        self.find(digest).is_ok()
    }

    /// The digests of every base in the store (recorded and present); none when the
    /// store does not exist yet.
    pub fn digests(&self) -> std::collections::BTreeSet<String> {
        let Ok(dir) = std::fs::read_dir(&self.dir) else { return Default::default() };
        dir.filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let digest = format!("sha256:{}", name.strip_suffix(".json")?);
            self.contains(&digest).then_some(digest)
        })
        .collect()
    }

    /// Remove the temporary files of copies into the store that never finished (a
    /// process killed while it imported or received a base: `.import-*`, `.receive-*`).
    /// Call it when no copy runs (an agent's start). Ok(how many).
    pub fn remove_partial(&self) -> Result<usize, RuntimeError> {
        let dir = match std::fs::read_dir(&self.dir) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(RuntimeError::io(format!("read {}", self.dir.display()), e)),
        };
        let mut n = 0;
        for e in dir.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".import-") || name.starts_with(".receive-") {
                std::fs::remove_file(e.path())
                    .map_err(|err| RuntimeError::io(format!("remove {}", e.path().display()), err))?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// The base image `digest`, or a clear error naming it and the store.
    pub fn find(&self, digest: &str) -> Result<BaseImage, RuntimeError> {
        let hex = Self::hex(digest)?;
        let path = self.dir.join(hex);
        let info: BaseInfo = std::fs::read(self.dir.join(format!("{hex}.json")))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .filter(|_| path.is_file())
            .ok_or_else(|| {
                disk_err(format!(
                    "base image {digest} is not in the disk store {} (`away image build --disk` puts one there)",
                    self.dir.display()
                ))
            })?;
        Ok(BaseImage { digest: digest.to_string(), path, format: info.format, virtual_size: info.virtual_size })
    }

    /// Copy `file` (qcow2 without a backing file, or raw) into the store; returns it
    /// with its digest. Importing the same bytes again is a no-op.
    pub fn import(&self, file: &Path) -> Result<BaseImage, RuntimeError> {
        self.import_checked(file, None)
    }

    /// [`DiskStore::import`] of a file that must be base `digest` (one a peer sent, or a
    /// copy of one): the copy into the store is hashed, and a different digest is refused
    /// with nothing stored.
    pub fn import_expecting(&self, file: &Path, digest: &str) -> Result<BaseImage, RuntimeError> {
        Self::hex(digest)?;
        self.import_checked(file, Some(digest))
    }

    fn import_checked(&self, file: &Path, expected: Option<&str>) -> Result<BaseImage, RuntimeError> {
        let info = qemu_img_info(&self.qemu_img, file)?;
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| RuntimeError::io(format!("create {}", self.dir.display()), e))?;
        // Copy while hashing, beside the final place, then rename: the store never holds
        // half a file under a digest.
        let tmp = tempfile::Builder::new()
            .prefix(".import-")
            .tempfile_in(&self.dir)
            .map_err(|e| RuntimeError::io(format!("create a temp file in {}", self.dir.display()), e))?;
        let digest = copy_hashing(file, Some(tmp.as_file()))?;
        if let Some(expected) = expected.filter(|e| *e != digest) {
            return Err(RuntimeError::Invalid {
                field: "disk.base".into(),
                reason: format!("{} has digest {digest}, not {expected}: not stored", file.display()),
            });
        }
        let hex = digest["sha256:".len()..].to_string();
        if let Ok(found) = self.find(&digest) {
            return Ok(found);
        }
        tmp.as_file().sync_all().map_err(|e| RuntimeError::io(format!("sync {}", tmp.path().display()), e))?;
        let path = self.dir.join(&hex);
        // read-only: a base is shared by every overlay on it and never written
        let _ = std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o444));
        tmp.persist(&path).map_err(|e| RuntimeError::io(format!("store {}", path.display()), e.error))?;
        let json = serde_json::to_vec_pretty(&info).expect("base info json");
        let meta = self.dir.join(format!("{hex}.json"));
        std::fs::write(&meta, json).map_err(|e| RuntimeError::io(format!("write {}", meta.display()), e))?;
        Ok(BaseImage { digest, path, format: info.format, virtual_size: info.virtual_size })
    }

    /// The overlay of `disk` at `dest`: an empty qcow2 on the base, `disk.size` big.
    pub fn create_overlay(&self, disk: &DiskSpec, dest: &Path) -> Result<BaseImage, RuntimeError> {
        let base = self.find(&disk.base)?;
        if disk.size.bytes() < base.virtual_size {
            return Err(RuntimeError::Invalid {
                field: "disk.size".into(),
                reason: format!("{} is smaller than base image {} ({} bytes)", disk.size, disk.base, base.virtual_size),
            });
        }
        let out = std::process::Command::new(&self.qemu_img)
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", "-b"])
            .arg(&base.path)
            .args(["-F", &base.format])
            .arg(dest)
            .arg(disk.size.bytes().to_string())
            .output()
            .map_err(|e| RuntimeError::io(format!("run {}", self.qemu_img.display()), e))?;
        if !out.status.success() {
            return Err(RuntimeError::Failed {
                runtime: KIND,
                op: "create the disk overlay",
                name: dest.display().to_string(),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(base)
    }
}

/// `sha256:<hex>` of `file`, the digest a disk spec names it by.
pub fn file_digest(file: &Path) -> Result<String, RuntimeError> {
    copy_hashing(file, None)
}

/// Hash `file`, copying it to `out` on the way when given.
fn copy_hashing(file: &Path, mut out: Option<&std::fs::File>) -> Result<String, RuntimeError> {
    let mut src = std::fs::File::open(file).map_err(|e| RuntimeError::io(format!("open {}", file.display()), e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = src.read(&mut buf).map_err(|e| RuntimeError::io(format!("read {}", file.display()), e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        if let Some(out) = out.as_mut() {
            std::io::Write::write_all(out, &buf[..n]).map_err(|e| RuntimeError::io("write a disk copy", e))?;
        }
    }
    Ok(format!("sha256:{:x}", hasher.finalize()))
}

/// `qemu-img info` of a file a user or a peer hands in: qcow2 or raw, and never with a
/// backing file (it would name any file of this host).
fn qemu_img_info(qemu_img: &Path, file: &Path) -> Result<BaseInfo, RuntimeError> {
    #[derive(Deserialize)]
    struct Info {
        format: String,
        #[serde(rename = "virtual-size")]
        virtual_size: u64,
        #[serde(rename = "backing-filename")]
        backing: Option<String>,
    }
    if !file.is_file() {
        return Err(disk_err(format!("{} is not a file", file.display())));
    }
    let mut child = std::process::Command::new(qemu_img);
    child.args(["info", "--output=json", "-U"]).arg(file);
    let out = run_bounded(child, Duration::from_secs(60))
        .map_err(|e| RuntimeError::io(format!("run {} info", qemu_img.display()), e))?;
    if !out.status.success() {
        return Err(disk_err(format!(
            "{} is not a disk image qemu-img reads: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let info: Info = serde_json::from_slice(&out.stdout)
        .map_err(|e| disk_err(format!("qemu-img info of {}: {e}", file.display())))?;
    if let Some(b) = info.backing {
        return Err(disk_err(format!("{} has a backing file ({b}); a base image must stand alone", file.display())));
    }
    if info.format != "qcow2" && info.format != "raw" {
        return Err(disk_err(format!("{} is {}, not qcow2 or raw", file.display(), info.format)));
    }
    Ok(BaseInfo { format: info.format, virtual_size: info.virtual_size })
}

fn run_bounded(mut cmd: std::process::Command, limit: Duration) -> std::io::Result<std::process::Output> {
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("pid {pid} still running after {} s", limit.as_secs()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_img() -> Option<PathBuf> {
        std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join("qemu-img")).find(|p| p.is_file())
    }

    #[test]
    fn import_finds_by_digest_and_overlays_refuse_a_smaller_size() {
        let Some(img) = qemu_img() else {
            eprintln!("no qemu-img: skipped");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![7u8; 2 << 20]).unwrap();
        let store = DiskStore { dir: dir.path().join("store"), qemu_img: img };
        let b = store.import(&base).unwrap();
        assert_eq!(b.format, "raw");
        assert_eq!(b.virtual_size, 2 << 20);
        assert!(store.contains(&b.digest));
        assert!(store.digests().into_iter().eq([b.digest.clone()]));
        // a copy that never finished goes at the next start, the bases stay
        std::fs::write(store.dir.join(".receive-x1"), b"half").unwrap();
        assert_eq!(store.remove_partial().unwrap(), 1);
        assert!(!store.dir.join(".receive-x1").exists() && store.contains(&b.digest));
        // a file that is not the base it claims to be is not stored
        std::fs::write(dir.path().join("other.raw"), vec![8u8; 1 << 20]).unwrap();
        let e = store.import_expecting(&dir.path().join("other.raw"), &b.digest).unwrap_err();
        assert!(e.to_string().contains(&format!("not {}", b.digest)), "{e}");
        let names: Vec<_> = std::fs::read_dir(&store.dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "only the first base and its json: {names:?}");
        assert_eq!(store.import_expecting(&base, &b.digest).unwrap(), b);
        assert_eq!(store.import(&base).unwrap(), b, "a second import is the same base");
        let small = DiskSpec { base: b.digest.clone(), size: away_model::ByteSize(1 << 20), mount: None };
        let e = store.create_overlay(&small, &dir.path().join("o.qcow2")).unwrap_err();
        assert!(e.to_string().contains("smaller than base image"), "{e}");
        let spec = DiskSpec { base: b.digest.clone(), size: away_model::ByteSize(4 << 20), mount: None };
        store.create_overlay(&spec, &dir.path().join("o.qcow2")).unwrap();
        // an overlay has a backing file: never a base
        let e = store.import(&dir.path().join("o.qcow2")).unwrap_err();
        assert!(e.to_string().contains("backing file"), "{e}");
        let missing = format!("sha256:{}", "0".repeat(64));
        assert!(store.find(&missing).unwrap_err().to_string().contains("not in the disk store"));
    }
}
