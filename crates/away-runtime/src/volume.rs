//! A container's named volumes: directories of the node, one per workload and volume
//! (`<root>/<workload>/<volume>`, owner-only), bind-mounted read-write into the
//! container. A checkpoint carries them (`volumes/<volume>` beside CRIU's images, hard
//! links of the frozen files, so nothing is copied on the source), and a restore puts
//! them back from there: the transfer protocol then moves them compressed and
//! checksummed like every other file of the checkpoint (docs/migration.md, "Volumes").
//!
//! A move first **pre-copies** them while the workload runs ([`VolumeRoot::precopy`]: a
//! copy of every file that is not being written, with its stamp); the checkpoint then
//! carries only the files whose stamp changed since, and the list of the unchanged and
//! deleted ones (`volumes/<volume>.delta.json`); the target completes the checkpoint
//! from the pre-copy it received ([`complete_delta`]) before it puts it in place.
//!
//! Hand-written: the tree walk is a hard link per file, a copy only across file
//! systems; no crate links trees.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::host::beneath::Beneath;

use away_model::WorkloadSpec;

use crate::runtime::RuntimeError;

/// The directory of a checkpoint that holds its volumes, one sub-directory each, and
/// beside each one `<volume>.owners.json`: the mode and owner of every entry (the
/// transfer protocol unpacks everything owner-only and root's; CRIU refuses to reopen a
/// file whose mode changed).
pub const CHECKPOINT_VOLUMES: &str = "volumes";
/// The largest owners or delta file a restore reads (about 10 million entries).
const OWNERS_MAX: u64 = 1 << 30;
/// Beside a volume of a checkpoint whose files were pre-copied: the files it does not
/// carry because the pre-copy sent them as they still are, and the ones deleted since.
const DELTA_SUFFIX: &str = "delta.json";

/// What a file was when the pre-copy read it (its `stat`): a file whose stamp is the same
/// at the freeze holds the bytes the pre-copy sent. A write changes the size or the
/// modification time; a rename over it, the inode; a `touch -d` back in time or a chmod,
/// the change time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    fn of(md: &fs::Metadata) -> FileStamp {
        FileStamp {
            dev: md.dev(),
            ino: md.ino(),
            size: md.len(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
        }
    }

    /// Changed so shortly before `read_at` that a write in the same tick of the kernel's
    /// coarse clock would leave the stamp as it is (git's "racy" files): such a file is
    /// not trusted and goes with the checkpoint. The margin covers a clock tick on file
    /// systems with nanosecond times, two seconds where they have whole seconds only.
    fn racy(&self, read_at: SystemTime) -> bool {
        let whole_seconds = self.mtime.1 == 0 && self.ctime.1 == 0;
        let margin = if whole_seconds { Duration::from_secs(2) } else { Duration::from_millis(50) };
        let latest = self.mtime.max(self.ctime);
        let at = SystemTime::UNIX_EPOCH + Duration::new(latest.0.max(0) as u64, latest.1.clamp(0, 999_999_999) as u32);
        at + margin >= read_at
    }
}

/// The files of a workload's volumes that a move's pre-copy sent, by volume and path in
/// the volume, with the stamp each had when it was read.
#[derive(Debug, Clone, Default)]
pub struct VolumesSent {
    pub files: BTreeMap<String, BTreeMap<PathBuf, FileStamp>>,
    /// Their bytes.
    pub bytes: u64,
}

/// A volume's delta file: which files of the pre-copy stand as they are, which are gone.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Delta {
    unchanged: Vec<PathBuf>,
    deleted: Vec<PathBuf>,
}

/// What a checkpoint's volumes carry ([`carried`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Carried {
    /// Bytes of the volume files in the checkpoint.
    pub bytes: u64,
    pub files: u64,
    /// Files left to the pre-copy (unchanged since it), and files deleted since it.
    pub unchanged: u64,
    pub deleted: u64,
}

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
            if fs::symlink_metadata(from.with_extension(DELTA_SUFFIX)).is_ok() {
                // a delta left as it was made: the source's own checkpoint (a target
                // completes it first, `complete_delta`), restored after a failed move;
                // its files are the node's volume's, which nothing wrote since the freeze
                self.keep_frozen(&dir, &from)
                    .map_err(|e| RuntimeError::io(format!("keep volume {} for its checkpoint", v.name), e))?;
                out.push(PreparedVolume { host: dir, path: v.path.clone(), created: false });
                continue;
            }
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
    /// change). With `sent` (the move's pre-copy), only the files whose stamp changed
    /// since are linked, every directory is, and `<volume>.delta.json` names the files
    /// the pre-copy holds as they are and those deleted since.
    pub fn capture(
        &self,
        spec: &WorkloadSpec,
        checkpoint: &Path,
        sent: Option<&VolumesSent>,
    ) -> Result<(), RuntimeError> {
        for v in &spec.volumes {
            let dir = self.dir(&spec.name, &v.name);
            let to = checkpoint.join(CHECKPOINT_VOLUMES).join(&v.name);
            if let Some(parent) = to.parent() {
                private_dirs(parent)?;
            }
            let owners = to.with_extension("owners.json");
            let linked = match sent.and_then(|s| s.files.get(&v.name)) {
                None => link_tree(&dir, &to),
                Some(base) => link_delta(&dir, &to, base)
                    .and_then(|delta| fs::write(to.with_extension(DELTA_SUFFIX), serde_json::to_vec(&delta)?)),
            };
            linked
                .and_then(|()| fs::write(&owners, serde_json::to_vec(&owners_of(&dir)?)?))
                .map_err(|e| RuntimeError::io(format!("capture volume {} from {}", v.name, dir.display()), e))?;
        }
        Ok(())
    }

    /// A move's pre-copy, while the workload runs: every file of `spec`'s volumes that is
    /// not being written, copied under `out/volumes/<volume>/` as a checkpoint has them,
    /// with its stamp before and after the read (a file whose stamp moved meanwhile, or
    /// that changed just before, is left to the checkpoint). Files are opened beneath the
    /// volume, never through a link the workload may put in place of a directory; a link,
    /// socket, FIFO or device is an error naming it (the checkpoint would refuse it).
    pub fn precopy(&self, spec: &WorkloadSpec, out: &Path) -> Result<VolumesSent, RuntimeError> {
        let mut sent = VolumesSent::default();
        for v in &spec.volumes {
            let dir = self.dir(&spec.name, &v.name);
            let to = out.join(CHECKPOINT_VOLUMES).join(&v.name);
            let files = private_dirs(&to).and_then(|()| {
                copy_unchanging(&dir, &to, &mut sent.bytes)
                    .map_err(|e| RuntimeError::io(format!("pre-copy volume {} from {}", v.name, dir.display()), e))
            })?;
            sent.files.insert(v.name.clone(), files);
        }
        Ok(sent)
    }

    /// The node's volume `dir` as the source's own delta checkpoint `from` found it: every
    /// file the delta says the pre-copy held must be there (else the checkpoint is not
    /// this node's), and the recorded modes and owners are put back.
    fn keep_frozen(&self, dir: &Path, from: &Path) -> io::Result<()> {
        let delta = read_delta(&from.with_extension(DELTA_SUFFIX))?;
        for rel in &delta.unchanged {
            check_beneath(rel)?;
            if !fs::symlink_metadata(dir.join(rel)).is_ok_and(|m| m.is_file()) {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "{} is not in {} (the checkpoint's volume was pre-copied from it)",
                        rel.display(),
                        dir.display()
                    ),
                ));
            }
        }
        set_owners(&from.with_extension("owners.json"), dir)
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

fn check_beneath(rel: &Path) -> io::Result<()> {
    if rel.as_os_str().is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{rel:?} is not beneath the volume")));
    }
    Ok(())
}

fn read_delta(path: &Path) -> io::Result<Delta> {
    let md = fs::symlink_metadata(path)?;
    if !md.is_file() || md.len() > OWNERS_MAX {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{} is not a file", path.display())));
    }
    Ok(serde_json::from_slice(&fs::read(path)?)?)
}

fn unsupported(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("{} is not a file or directory: a volume moves with files and directories only", path.display()),
    )
}

/// [`VolumeRoot::precopy`] of one volume `dir` into `to` (which exists); adds the bytes
/// copied to `bytes`.
fn copy_unchanging(dir: &Path, to: &Path, bytes: &mut u64) -> io::Result<BTreeMap<PathBuf, FileStamp>> {
    let from = Beneath::open(dir).map_err(io::Error::other)?;
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let entries = match fs::read_dir(dir.join(&rel)) {
            Ok(e) => e,
            // removed while the workload runs: its files go with the checkpoint, if any
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let rel = rel.join(entry.file_name());
            let Ok(ft) = entry.file_type() else { continue };
            if ft.is_dir() {
                fs::DirBuilder::new().mode(0o700).create(to.join(&rel))?;
                stack.push(rel);
            } else if ft.is_file() {
                let read_at = SystemTime::now();
                // gone, or a link in its place by now: left to the checkpoint
                let Ok(mut file) = from.open_file(&rel) else { continue };
                let before = FileStamp::of(&file.metadata()?);
                let dst = to.join(&rel);
                let mut copy = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&dst)?;
                io::copy(&mut file, &mut copy)?;
                let after = FileStamp::of(&file.metadata()?);
                if before != after || after.racy(read_at) {
                    drop(copy);
                    fs::remove_file(&dst)?;
                    continue;
                }
                *bytes += after.size;
                out.insert(rel, after);
            } else {
                return Err(unsupported(&dir.join(&rel)));
            }
        }
    }
    Ok(out)
}

/// [`link_tree`] for a volume that was pre-copied (`base`): directories as there, only the
/// files whose stamp is not the one in `base` linked; returns the delta (the files left to
/// the pre-copy, those of `base` no longer there).
fn link_delta(from: &Path, to: &Path, base: &BTreeMap<PathBuf, FileStamp>) -> io::Result<Delta> {
    let mut delta = Delta::default();
    let mut seen = BTreeSet::new();
    let meta = fs::symlink_metadata(from)?;
    fs::DirBuilder::new().mode(meta.permissions().mode() & 0o7777).create(to)?;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in fs::read_dir(from.join(&rel))? {
            let entry = entry?;
            let rel = rel.join(entry.file_name());
            // lstat: a link is not followed
            let md = entry.metadata()?;
            if md.is_dir() {
                fs::DirBuilder::new().mode(md.permissions().mode() & 0o7777).create(to.join(&rel))?;
                stack.push(rel);
            } else if md.is_file() {
                seen.insert(rel.clone());
                if base.get(&rel) == Some(&FileStamp::of(&md)) {
                    delta.unchanged.push(rel);
                } else {
                    link_file(&from.join(&rel), &to.join(&rel))?;
                }
            } else {
                return Err(unsupported(&from.join(&rel)));
            }
        }
    }
    delta.deleted = base.keys().filter(|p| !seen.contains(*p)).cloned().collect();
    Ok(delta)
}

fn link_file(src: &Path, dst: &Path) -> io::Result<()> {
    match fs::hard_link(src, dst) {
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error()) => fs::copy(src, dst).map(|_| ()),
        other => other,
    }
}

/// The target's side of a pre-copy: each volume of `checkpoint` (a received checkpoint
/// directory) that carries only what changed since its pre-copy gets the files its delta
/// leaves to the pre-copy from `base` (the pre-copy as received: `base/volumes/<volume>/`),
/// hard-linked, and loses its delta file: it is whole again, and [`VolumeRoot::place`]
/// puts it in place as any other. Paths are a peer's: each is opened beneath its
/// directory, never through a link. Returns how many files came from the pre-copy.
pub fn complete_delta(checkpoint: &Path, base: Option<&Path>) -> Result<u64, RuntimeError> {
    let volumes = checkpoint.join(CHECKPOINT_VOLUMES);
    let Ok(entries) = fs::read_dir(&volumes) else { return Ok(0) };
    let mut linked = 0;
    for entry in entries {
        let entry = entry.map_err(|e| RuntimeError::io(format!("read {}", volumes.display()), e))?;
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(&format!(".{DELTA_SUFFIX}"))) else {
            continue;
        };
        let Some(base) = base else {
            return Err(RuntimeError::Invalid {
                field: format!("volumes.{name}"),
                reason: "the checkpoint carries only what changed since the volume's pre-copy, and no pre-copy of \
                         this move is here (removed by an abort, its expiry or an agent restart)"
                    .into(),
            });
        };
        let fail = |e: io::Error| RuntimeError::io(format!("complete volume {name} from its pre-copy"), e);
        let delta = read_delta(&entry.path()).map_err(fail)?;
        let from = Beneath::open(&base.join(CHECKPOINT_VOLUMES).join(name)).map_err(|e| fail(io::Error::other(e)))?;
        let to = Beneath::open(&volumes.join(name)).map_err(|e| fail(io::Error::other(e)))?;
        for rel in &delta.unchanged {
            check_beneath(rel).map_err(fail)?;
            if let Some(parent) = rel.parent().filter(|p| !p.as_os_str().is_empty()) {
                to.create_dir_all(parent, 0o700).map_err(|e| fail(io::Error::other(e)))?;
            }
            from.link_into(rel, &to, rel).map_err(|e| fail(io::Error::other(e)))?;
            linked += 1;
        }
        fs::remove_file(entry.path()).map_err(fail)?;
    }
    Ok(linked)
}

/// What the volumes of `checkpoint` carry: the bytes and files of their trees, and from
/// their delta files (a move with a pre-copy) how many files the pre-copy holds and how
/// many were deleted since it.
pub fn carried(checkpoint: &Path) -> Carried {
    let mut c = Carried::default();
    let volumes = checkpoint.join(CHECKPOINT_VOLUMES);
    let Ok(entries) = fs::read_dir(&volumes) else { return c };
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(ft) if ft.is_dir() => {
                let mut stack = vec![path];
                while let Some(dir) = stack.pop() {
                    for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
                        match e.metadata() {
                            Ok(md) if md.is_dir() => stack.push(e.path()),
                            Ok(md) if md.is_file() => {
                                c.bytes += md.len();
                                c.files += 1;
                            }
                            _ => {}
                        }
                    }
                }
            }
            Ok(_) if path.to_string_lossy().ends_with(DELTA_SUFFIX) => {
                if let Ok(d) = read_delta(&path) {
                    c.unchanged += d.unchanged.len() as u64;
                    c.deleted += d.deleted.len() as u64;
                }
            }
            _ => {}
        }
    }
    c
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
            link_file(&src, &dst)?;
        } else {
            return Err(unsupported(&src));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
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
        src.capture(&spec(), &ckpt, None).unwrap();
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
        let e = away_model::error_chain(&src.capture(&spec(), &again, None).unwrap_err());
        assert!(e.contains("capture volume data") && e.contains("not a file or directory"), "{e}");
    }

    /// Pre-copy, then a checkpoint of what changed since: the target completes it from the
    /// pre-copy and places exactly the volume as it was at the freeze; the source's own
    /// delta checkpoint keeps its volume.
    #[test]
    fn a_precopied_volume_moves_its_changes_only() {
        let t = tempfile::tempdir().unwrap();
        let (src, dst) = (VolumeRoot::new(t.path().join("a")), VolumeRoot::new(t.path().join("b")));
        let dir = src.prepare(&spec()).unwrap()[0].host.clone();
        fs::create_dir(dir.join("sub")).unwrap();
        for f in ["same", "sub/same", "changed", "grown", "deleted", "touched"] {
            fs::write(dir.join(f), f.repeat(1000)).unwrap();
        }
        // older than the racy margin (the change time too, 100 ms back)
        let old = SystemTime::now() - Duration::from_secs(10);
        for f in ["same", "sub/same", "changed", "grown", "deleted", "touched"] {
            fs::File::options().write(true).open(dir.join(f)).unwrap().set_modified(old).unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
        fs::write(dir.join("fresh"), b"written just before").unwrap();
        let pre = t.path().join("pre");
        let sent = src.precopy(&spec(), &pre).unwrap();
        let files: Vec<_> = sent.files["data"].keys().map(|p| p.display().to_string()).collect();
        // the file written just before is left to the checkpoint (it may change in the same tick)
        assert_eq!(files, ["changed", "deleted", "grown", "same", "sub/same", "touched"]);
        assert_eq!(fs::read(pre.join("volumes/data/sub/same")).unwrap(), "sub/same".repeat(1000).as_bytes());

        // the workload writes on: same size new bytes, an append, a delete, a new file,
        // a chmod (the change time moves, not the modification time)
        fs::write(dir.join("changed"), "CHANGED".repeat(1000)).unwrap();
        fs::File::options().write(true).open(dir.join("changed")).unwrap().set_modified(old).unwrap();
        fs::OpenOptions::new().append(true).open(dir.join("grown")).unwrap().write_all(b"more").unwrap();
        fs::remove_file(dir.join("deleted")).unwrap();
        fs::write(dir.join("sub/new"), b"new").unwrap();
        fs::set_permissions(dir.join("touched"), fs::Permissions::from_mode(0o640)).unwrap();
        let ckpt = t.path().join("ckpt");
        fs::create_dir(&ckpt).unwrap();
        src.capture(&spec(), &ckpt, Some(&sent)).unwrap();
        let mut carried_files: Vec<_> = walk(&ckpt.join("volumes/data"));
        carried_files.sort();
        assert_eq!(carried_files, ["changed", "fresh", "grown", "sub/new", "touched"]);
        let c = carried(&ckpt);
        assert_eq!((c.files, c.unchanged, c.deleted), (5, 2, 1));

        // the target: the pre-copy and the checkpoint as received (owner-only copies)
        let (got_pre, got_ckpt) = (t.path().join("got-pre"), t.path().join("got-ckpt"));
        link_tree(&pre, &got_pre).unwrap();
        link_tree(&ckpt, &got_ckpt).unwrap();
        let e = away_model::error_chain(&complete_delta(&got_ckpt, None).unwrap_err());
        assert!(e.contains("no pre-copy"), "{e}");
        assert_eq!(complete_delta(&got_ckpt, Some(&got_pre)).unwrap(), 2);
        let placed = dst.place(&spec(), &got_ckpt).unwrap();
        let mut want: Vec<_> = walk(&dir);
        want.sort();
        let mut got: Vec<_> = walk(&placed[0].host);
        got.sort();
        assert_eq!(got, want);
        for f in &want {
            assert_eq!(fs::read(placed[0].host.join(f)).unwrap(), fs::read(dir.join(f)).unwrap(), "{f}");
        }
        assert_eq!(fs::metadata(placed[0].host.join("touched")).unwrap().mode() & 0o777, 0o640);

        // the source resumes from its own delta checkpoint: its volume stays as it is
        let kept = src.place(&spec(), &ckpt).unwrap();
        assert!(!kept[0].created && kept[0].host == dir);
        assert_eq!(fs::read(dir.join("same")).unwrap(), "same".repeat(1000).as_bytes());

        // a peer's delta naming a path outside the volume is refused
        let evil = t.path().join("evil");
        link_tree(&ckpt, &evil).unwrap();
        fs::write(evil.join("volumes/data.delta.json"), br#"{"unchanged":["../../x"],"deleted":[]}"#).unwrap();
        assert!(complete_delta(&evil, Some(&got_pre)).is_err());
    }

    fn walk(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                let name = e.file_name().to_string_lossy().to_string();
                out.extend(walk(&e.path()).into_iter().map(|f| format!("{name}/{f}")));
            } else {
                out.push(e.file_name().to_string_lossy().to_string());
            }
        }
        out
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
