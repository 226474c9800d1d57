//! A container's named volumes: directories of the node, one per workload and volume
//! (`<root>/<workload>/<volume>`, owner-only), bind-mounted read-write into the
//! container. A checkpoint carries them (`volumes/<volume>` beside CRIU's images, hard
//! links of the frozen files, so nothing is copied on the source), and a restore puts
//! them back from there: the transfer protocol then moves them compressed and
//! checksummed like every other file of the checkpoint (docs/migration.md, "Volumes").
//!
//! Hand-written: the tree walk is a hard link per file, a copy only across file
//! systems; no crate links trees.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use away_model::WorkloadSpec;

use crate::runtime::RuntimeError;

/// The directory of a checkpoint that holds its volumes, one sub-directory each, and
/// beside each one `<volume>.owners.json`: the mode and owner of every entry (the
/// transfer protocol unpacks everything owner-only and root's; CRIU refuses to reopen a
/// file whose mode changed).
pub const CHECKPOINT_VOLUMES: &str = "volumes";
/// The largest owners file a restore reads (about 10 million entries).
const OWNERS_MAX: u64 = 1 << 30;

/// The mode and owner of one entry of a volume, by its path in the volume.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Owner {
    path: PathBuf,
    mode: u32,
    uid: u32,
    gid: u32,
}

/// Where a node keeps the volumes of the workloads of one containerd namespace.
#[derive(Debug, Clone)]
pub struct VolumeRoot(PathBuf);

impl VolumeRoot {
    /// Volumes under `dir` (e.g. `<state>/volumes/<namespace>`).
    pub fn new(dir: PathBuf) -> Self {
        VolumeRoot(dir)
    }

    /// The directory of `workload`'s volume `volume`.
    pub fn dir(&self, workload: &str, volume: &str) -> PathBuf {
        self.0.join(workload).join(volume)
    }

    /// The directory holding every volume of `workload`.
    pub fn workload_dir(&self, workload: &str) -> PathBuf {
        self.0.join(workload)
    }

    /// Every volume of `spec` as a directory, created (owner-only) if missing, with its
    /// path in the container. `created` tells which of them this call made.
    pub fn prepare(&self, spec: &WorkloadSpec) -> Result<Vec<PreparedVolume>, RuntimeError> {
        spec.volumes.iter().map(|v| self.prepare_one(&spec.name, v)).collect()
    }

    /// One volume's directory, created (owner-only) if missing.
    fn prepare_one(&self, workload: &str, v: &away_model::VolumeSpec) -> Result<PreparedVolume, RuntimeError> {
        let dir = self.dir(workload, &v.name);
        let created = !dir.is_dir();
        if created {
            private_dirs(&dir)?;
        }
        Ok(PreparedVolume { host: dir, path: v.path.clone(), created })
    }

    /// A restore's volumes: each one the checkpoint carries replaces the node's directory
    /// of that name (the checkpoint's is the state the process was frozen with); the
    /// others are prepared as for a run.
    pub fn place(&self, spec: &WorkloadSpec, checkpoint: &Path) -> Result<Vec<PreparedVolume>, RuntimeError> {
        let mut out = Vec::new();
        for v in &spec.volumes {
            let from = checkpoint.join(CHECKPOINT_VOLUMES).join(&v.name);
            // a real directory, not a link a peer put in the payload
            let carried = fs::symlink_metadata(&from).map(|m| m.is_dir()).unwrap_or(false);
            if !carried {
                out.push(self.prepare_one(&spec.name, v)?);
                continue;
            }
            let dir = self.dir(&spec.name, &v.name);
            if dir.exists() {
                fs::remove_dir_all(&dir).map_err(|e| RuntimeError::io(format!("remove {}", dir.display()), e))?;
            }
            if let Some(parent) = dir.parent() {
                private_dirs(parent)?;
            }
            let owners = from.with_extension("owners.json");
            link_tree(&from, &dir).and_then(|()| set_owners(&owners, &dir)).map_err(|e| {
                let _ = fs::remove_dir_all(&dir);
                RuntimeError::io(format!("place volume {} from {}", v.name, from.display()), e)
            })?;
            out.push(PreparedVolume { host: dir, path: v.path.clone(), created: true });
        }
        Ok(out)
    }

    /// A checkpoint's copy of `spec`'s volumes: hard links of their files under
    /// `checkpoint/volumes/<volume>` (the process is frozen or gone: the files no longer
    /// change).
    pub fn capture(&self, spec: &WorkloadSpec, checkpoint: &Path) -> Result<(), RuntimeError> {
        for v in &spec.volumes {
            let dir = self.dir(&spec.name, &v.name);
            let to = checkpoint.join(CHECKPOINT_VOLUMES).join(&v.name);
            if let Some(parent) = to.parent() {
                private_dirs(parent)?;
            }
            let owners = to.with_extension("owners.json");
            link_tree(&dir, &to)
                .and_then(|()| fs::write(&owners, serde_json::to_vec(&owners_of(&dir)?)?))
                .map_err(|e| RuntimeError::io(format!("capture volume {} from {}", v.name, dir.display()), e))?;
        }
        Ok(())
    }

    /// Remove every volume of `workload` (its removal, or a copy that did not become it).
    pub fn remove(&self, workload: &str) -> Result<(), RuntimeError> {
        let dir = self.workload_dir(workload);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RuntimeError::io(format!("remove {}", dir.display()), e)),
        }
    }
}

/// A volume ready to be mounted.
#[derive(Debug, Clone)]
pub struct PreparedVolume {
    /// Its directory on the node.
    pub host: PathBuf,
    /// Where the container sees it.
    pub path: String,
    /// Made by this run or restore (a failed one removes it again).
    pub created: bool,
}

fn private_dirs(dir: &Path) -> Result<(), RuntimeError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| RuntimeError::io(format!("create {}", dir.display()), e))
}

/// The mode and owner of `dir` ("") and of everything beneath it.
fn owners_of(dir: &Path) -> io::Result<Vec<Owner>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let md = fs::symlink_metadata(dir.join(&rel))?;
        if md.is_dir() {
            for e in fs::read_dir(dir.join(&rel))? {
                stack.push(rel.join(e?.file_name()));
            }
        }
        out.push(Owner { path: rel, mode: md.mode() & 0o7777, uid: md.uid(), gid: md.gid() });
    }
    Ok(out)
}

/// Give the entries of a placed volume `dir` the modes and owners a checkpoint recorded
/// (`owners`, a peer's file: paths stay beneath `dir`, links are not followed, and no
/// set-user or set-group bit is taken). The volume's own directory stays owner-only.
fn set_owners(owners: &Path, dir: &Path) -> io::Result<()> {
    let md = fs::symlink_metadata(owners)?;
    if !md.is_file() || md.len() > OWNERS_MAX {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{} is not a file", owners.display())));
    }
    let list: Vec<Owner> = serde_json::from_slice(&fs::read(owners)?)?;
    for o in list {
        if !o.path.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{:?} is not beneath the volume", o.path)));
        }
        let path = dir.join(&o.path);
        let Ok(md) = fs::symlink_metadata(&path) else { continue };
        if md.is_symlink() {
            continue;
        }
        std::os::unix::fs::lchown(&path, Some(o.uid), Some(o.gid))?;
        let mode = if o.path.as_os_str().is_empty() { 0o700 } else { o.mode & 0o1777 };
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// `from`'s tree again at `to` (which must not exist): directories with their modes,
/// files hard-linked (copied across file systems). Anything else (a symbolic link, a
/// socket, a FIFO, a device) is an error naming it: the transfer protocol carries files
/// and directories only, and a volume is not moved without part of it.
pub fn link_tree(from: &Path, to: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(from)?;
    fs::DirBuilder::new().mode(meta.permissions().mode() & 0o7777).create(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let ft = entry.file_type()?;
        if ft.is_dir() {
            link_tree(&src, &dst)?;
        } else if ft.is_file() {
            match fs::hard_link(&src, &dst) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error()) => {
                    fs::copy(&src, &dst)?;
                }
                Err(e) => return Err(e),
            }
        } else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{} is not a file or directory: a volume moves with files and directories only", src.display()),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn spec() -> WorkloadSpec {
        WorkloadSpec::parse(
            "name: w\nimage: x\nvolumes:\n  - name: data\n    path: /data\n",
            away_model::SpecFormat::Yaml,
            "t",
        )
        .unwrap()
    }

    #[test]
    fn a_volume_is_captured_as_links_and_placed_again_replacing_what_was_there() {
        let t = tempfile::tempdir().unwrap();
        let (src, dst) = (VolumeRoot::new(t.path().join("a")), VolumeRoot::new(t.path().join("b")));
        let prepared = src.prepare(&spec()).unwrap();
        assert!(prepared[0].created);
        assert_eq!(fs::metadata(&prepared[0].host).unwrap().mode() & 0o777, 0o700);
        let dir = &prepared[0].host;
        fs::create_dir(dir.join("sub")).unwrap();
        fs::write(dir.join("sub/f"), b"hello").unwrap();
        assert!(!src.prepare(&spec()).unwrap()[0].created, "an existing volume is kept");

        let ckpt = t.path().join("ckpt");
        fs::create_dir(&ckpt).unwrap();
        fs::set_permissions(dir.join("sub/f"), fs::Permissions::from_mode(0o640)).unwrap();
        std::os::unix::fs::lchown(dir.join("sub/f"), Some(1234), Some(5678)).unwrap();
        src.capture(&spec(), &ckpt).unwrap();
        // as the transfer protocol unpacks it: owner-only, root's
        let copy = t.path().join("received");
        link_tree(&ckpt, &copy).unwrap();
        let received = copy.join("volumes/data/sub/f");
        fs::remove_file(&received).unwrap();
        fs::write(&received, b"hello").unwrap();
        fs::set_permissions(&received, fs::Permissions::from_mode(0o600)).unwrap();
        let linked = ckpt.join("volumes/data/sub/f");
        assert_eq!(fs::metadata(&linked).unwrap().ino(), fs::metadata(dir.join("sub/f")).unwrap().ino());

        // the target had a stale copy: the checkpoint's replaces it
        let stale = dst.dir("w", "data");
        fs::create_dir_all(&stale).unwrap();
        fs::write(stale.join("old"), b"x").unwrap();
        let placed = dst.place(&spec(), &copy).unwrap();
        assert_eq!(fs::read(placed[0].host.join("sub/f")).unwrap(), b"hello");
        let md = fs::metadata(placed[0].host.join("sub/f")).unwrap();
        assert_eq!((md.mode() & 0o7777, md.uid(), md.gid()), (0o640, 1234, 5678));
        assert!(!placed[0].host.join("old").exists());
        assert_eq!(fs::metadata(&placed[0].host).unwrap().mode() & 0o777, 0o700);

        dst.remove("w").unwrap();
        assert!(!dst.workload_dir("w").exists());
        dst.remove("w").unwrap();

        // a link in a volume is refused by name, not left behind silently
        std::os::unix::fs::symlink("/etc/passwd", dir.join("l")).unwrap();
        let again = t.path().join("ckpt2");
        fs::create_dir(&again).unwrap();
        let e = away_model::error_chain(&src.capture(&spec(), &again).unwrap_err());
        assert!(e.contains("capture volume data") && e.contains("not a file or directory"), "{e}");
    }

    #[test]
    fn a_link_in_place_of_a_carried_volume_is_not_followed() {
        let t = tempfile::tempdir().unwrap();
        let ckpt = t.path().join("ckpt");
        fs::create_dir_all(ckpt.join("volumes")).unwrap();
        fs::create_dir(t.path().join("elsewhere")).unwrap();
        fs::write(t.path().join("elsewhere/secret"), b"s").unwrap();
        std::os::unix::fs::symlink(t.path().join("elsewhere"), ckpt.join("volumes/data")).unwrap();
        let root = VolumeRoot::new(t.path().join("v"));
        let placed = root.place(&spec(), &ckpt).unwrap();
        assert!(!placed[0].host.join("secret").exists(), "a peer's link was followed");
    }
}
