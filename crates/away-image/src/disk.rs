//! A VM disk image from an image's root filesystem: ext4 (`mkfs.ext4 -d`) in a qcow2
//! (`qemu-img convert`), for legacy apps that keep state on a disk. The VM still boots
//! its initramfs; the disk is a base image it mounts (see `DiskSpec` in away-model) and
//! writes to through its own copy-on-write overlay.
//!
//! e2fsprogs (mkfs.ext4, debugfs) and qemu-img do the work (deploy/install.sh installs both): no crate
//! writes ext4, and `mkfs.ext4 -d` keeps modes, owners and symlinks as they are.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::archive::Image;
use crate::tree::Node;
use crate::vm::{rootfs, VmError};

/// A written disk image.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DiskImage {
    pub path: PathBuf,
    /// Bytes the guest sees.
    pub virtual_size: u64,
    /// Bytes of the qcow2 file.
    pub file_bytes: u64,
}

/// Smallest disk: ext4 needs room for its journal and inode tables.
pub const MIN_DISK_BYTES: u64 = 8 << 20;

/// Write `out` (qcow2 holding an ext4 file system of `size` bytes with the image's root
/// filesystem in it). Nothing is left at `out` when it fails.
pub fn write_disk_image(image: &Image, out: &Path, size: u64) -> Result<DiskImage, VmError> {
    let io = |action, path: &Path, source| VmError::Io { action, path: path.to_path_buf(), source };
    if size < MIN_DISK_BYTES {
        return Err(VmError::Disk(format!("a disk of {size} bytes is too small for ext4; at least 8 MiB")));
    }
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io("create", dir, e))?;
    let work = tempfile::Builder::new()
        .prefix(".away-disk-")
        .tempdir_in(dir)
        .map_err(|e| io("create a temp dir in", dir, e))?;
    let root = work.path().join("root");
    std::fs::create_dir(&root).map_err(|e| io("create", &root, e))?;
    let tree = rootfs(image)?;
    for (p, node) in &tree.entries {
        if p.split('/').any(|c| c == ".." || c.is_empty()) {
            return Err(VmError::Disk(format!("image path {p:?} leaves the root")));
        }
        let path = root.join(p);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io("create", parent, e))?;
        }
        let (uid, gid) = match node {
            Node::Dir { mode, uid, gid } => {
                std::fs::create_dir_all(&path).map_err(|e| io("create", &path, e))?;
                std::fs::set_permissions(&path, PermissionsExt::from_mode(*mode)).map_err(|e| io("chmod", &path, e))?;
                (uid, gid)
            }
            Node::File { data, mode, uid, gid } => {
                std::fs::write(&path, data).map_err(|e| io("write", &path, e))?;
                std::fs::set_permissions(&path, PermissionsExt::from_mode(*mode)).map_err(|e| io("chmod", &path, e))?;
                (uid, gid)
            }
            Node::Symlink { target, uid, gid } => {
                symlink(target, &path).map_err(|e| io("symlink", &path, e))?;
                (uid, gid)
            }
        };
        // owners as in the image (root can; elsewhere mkfs.ext4 records the builder's)
        let _ = std::os::unix::fs::lchown(&path, u32::try_from(*uid).ok(), u32::try_from(*gid).ok());
    }
    // Reproducible: every time stamp 0 (mkfs.ext4 -d copies them), the file system's
    // UUID and directory hash seed from the layers and the size, and mke2fs's own clock
    // fixed (E2FSPROGS_FAKE_TIME): the same image and size give the same disk digest.
    for p in tree.entries.keys().map(|p| root.join(p)).chain([root.clone()]) {
        let zero = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec { tv_sec: 0, tv_nsec: 0 },
            last_modification: rustix::fs::Timespec { tv_sec: 0, tv_nsec: 0 },
        };
        rustix::fs::utimensat(rustix::fs::CWD, &p, &zero, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io("set the time stamps of", &p, e.into()))?;
    }
    let uuid = fs_uuid(image, size);
    let raw = work.path().join("disk.raw");
    std::fs::File::create(&raw).and_then(|f| f.set_len(size)).map_err(|e| io("create", &raw, e))?;
    tool(
        Command::new(which("mkfs.ext4"))
            .env("E2FSPROGS_FAKE_TIME", "1")
            .args(["-q", "-F", "-L", "away", "-U", &uuid, "-E", &format!("hash_seed={uuid}"), "-d"])
            .arg(&root)
            .arg(&raw),
        "mkfs.ext4",
    )?;
    // mkfs.ext4 -d copies change and access times it cannot be told to leave out (the
    // copy above made them now): set them to 0 as well
    let mut cmds = String::new();
    for p in std::iter::once("").chain(tree.entries.keys().map(String::as_str)) {
        if p.contains(['"', '\n', '\\']) {
            return Err(VmError::Disk(format!("image path {p:?} cannot be written to a disk image")));
        }
        cmds.push_str(&format!("sif \"/{p}\" ctime 0\nsif \"/{p}\" atime 0\n"));
    }
    let script = work.path().join("debugfs.cmds");
    std::fs::write(&script, cmds).map_err(|e| io("write", &script, e))?;
    tool(
        Command::new(which("debugfs")).env("E2FSPROGS_FAKE_TIME", "1").arg("-w").arg("-f").arg(&script).arg(&raw),
        "debugfs",
    )?;
    let tmp = work.path().join("disk.qcow2");
    tool(
        Command::new(which("qemu-img")).args(["convert", "-q", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&tmp),
        "qemu-img convert",
    )?;
    std::fs::rename(&tmp, out).map_err(|e| io("rename a temporary file to", out, e))?;
    let file_bytes = std::fs::metadata(out).map_err(|e| io("stat", out, e))?.len();
    Ok(DiskImage { path: out.to_path_buf(), virtual_size: size, file_bytes })
}

/// Write `out`: an empty ext4 file system of `size` bytes in a qcow2, for a VM that
/// only needs somewhere to write (the lab's `vm-disk` path).
pub fn write_blank_disk_image(out: &Path, size: u64) -> Result<DiskImage, VmError> {
    let empty = Image { config: Default::default(), layers: Vec::new(), tags: Vec::new() };
    write_disk_image(&empty, out, size)
}

/// A UUID (as text) from the image's layers and the disk size.
fn fs_uuid(image: &Image, size: u64) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for l in &image.layers {
        h.update(l.digest.as_bytes());
    }
    h.update(size.to_le_bytes());
    let b = h.finalize();
    let hex = format!("{:x}", b);
    // version 4 / variant bits, so tools take it for a well-formed UUID
    format!("{}-{}-4{}-8{}-{}", &hex[0..8], &hex[8..12], &hex[13..16], &hex[17..20], &hex[20..32])
}

/// `name` in the sbin directories (not always on a user's PATH) or on PATH.
fn which(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn tool(cmd: &mut Command, what: &str) -> Result<(), VmError> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| VmError::Disk(format!("cannot run {what} (deploy/install.sh installs it): {e}")))?;
    if !out.status.success() {
        return Err(VmError::Disk(format!("{what} failed: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(())
}
