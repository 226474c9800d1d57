//! Files of a directory a peer filled (a received checkpoint), opened beneath it: never
//! through a symlink, never outside it (`openat2` with `RESOLVE_BENEATH` and
//! `RESOLVE_NO_SYMLINKS`, Linux 5.6+), and never written when the file has other names
//! (a hard link to a file elsewhere). The restore runs as root: a path it writes must not
//! be one a peer chose.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};

#[derive(Debug, thiserror::Error)]
#[error("cannot {op} {name} beneath {dir}: {reason}", name = name.display(), dir = dir.display())]
pub struct BeneathError {
    pub op: &'static str,
    pub dir: PathBuf,
    pub name: PathBuf,
    pub reason: String,
}

/// A directory whose files are only ever opened beneath it.
#[derive(Debug)]
pub struct Beneath {
    fd: OwnedFd,
    path: PathBuf,
}

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_SYMLINKS).union(ResolveFlags::NO_MAGICLINKS);

impl Beneath {
    /// Opens `dir` itself; its last component must not be a symlink either.
    pub fn open(dir: &Path) -> Result<Beneath, BeneathError> {
        let fd = rustix::fs::open(dir, OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| fail("open", dir, Path::new("."), e.into()))?;
        Ok(Beneath { fd, path: dir.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, op: &'static str, name: &Path) -> impl FnOnce(io::Error) -> BeneathError + '_ {
        let name = name.to_path_buf();
        move |e| fail(op, &self.path, &name, e)
    }

    fn open_at(&self, op: &'static str, name: &Path, flags: OFlags, mode: u32) -> Result<OwnedFd, BeneathError> {
        check_relative(name).map_err(self.err(op, name))?;
        rustix::fs::openat2(&self.fd, name, flags | OFlags::CLOEXEC, Mode::from_raw_mode(mode), RESOLVE)
            .map_err(|e| self.err(op, name)(e.into()))
    }

    /// A regular file for reading.
    pub fn open_file(&self, name: impl AsRef<Path>) -> Result<File, BeneathError> {
        let name = name.as_ref();
        let fd = self.open_at("open", name, OFlags::RDONLY, 0)?;
        self.regular(fd, "open", name, false)
    }

    pub fn read(&self, name: impl AsRef<Path>) -> Result<Vec<u8>, BeneathError> {
        let name = name.as_ref();
        let mut out = Vec::new();
        self.open_file(name)?.read_to_end(&mut out).map_err(self.err("read", name))?;
        Ok(out)
    }

    /// A regular file for reading and writing, created (`mode`) or truncated.
    pub fn create(&self, name: impl AsRef<Path>, mode: u32) -> Result<File, BeneathError> {
        let name = name.as_ref();
        // truncated only once known to be ours alone (O_TRUNC would cut a hard link's target)
        let fd = self.open_at("create", name, OFlags::RDWR | OFlags::CREATE, mode)?;
        let file = self.regular(fd, "create", name, true)?;
        file.set_len(0).map_err(self.err("truncate", name))?;
        Ok(file)
    }

    /// A new regular file (`mode`) for writing; an existing name is an error.
    pub fn create_new(&self, name: impl AsRef<Path>, mode: u32) -> Result<File, BeneathError> {
        let name = name.as_ref();
        let fd = self.open_at("create", name, OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL, mode)?;
        Ok(File::from(fd))
    }

    /// Creates or replaces `name` with `data`, owner-only.
    pub fn write(&self, name: impl AsRef<Path>, data: &[u8]) -> Result<(), BeneathError> {
        let name = name.as_ref();
        self.create(name, 0o600)?.write_all(data).map_err(self.err("write", name))
    }

    /// Renames within this directory (both names beneath it).
    pub fn rename(&self, from: impl AsRef<Path>, to: impl AsRef<Path>) -> Result<(), BeneathError> {
        let (from, to) = (from.as_ref(), to.as_ref());
        let (from_dir, from_name) = self.parent_of("rename", from)?;
        let (to_dir, to_name) = self.parent_of("rename", to)?;
        rustix::fs::renameat(&from_dir, from_name, &to_dir, to_name).map_err(|e| self.err("rename", from)(e.into()))
    }

    /// A new name `to` beneath `dest` for the regular file `name` beneath this directory
    /// (a hard link: both must be on one file system); an existing `to` is an error.
    pub fn link_into(&self, name: impl AsRef<Path>, dest: &Beneath, to: impl AsRef<Path>) -> Result<(), BeneathError> {
        let (name, to) = (name.as_ref(), to.as_ref());
        let (from_dir, from_name) = self.parent_of("link", name)?;
        let st = rustix::fs::statat(&from_dir, from_name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.err("link", name)(e.into()))?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(fail("link", &self.path, name, io::Error::other("not a regular file")));
        }
        let (to_dir, to_name) = dest.parent_of("link", to)?;
        rustix::fs::linkat(&from_dir, from_name, &to_dir, to_name, rustix::fs::AtFlags::empty())
            .map_err(|e| dest.err("link", to)(e.into()))
    }

    /// Creates `name` and its missing parents (`mode`), each beneath this directory.
    pub fn create_dir_all(&self, name: impl AsRef<Path>, mode: u32) -> Result<(), BeneathError> {
        let name = name.as_ref();
        check_relative(name).map_err(self.err("create", name))?;
        let mut dir = self.fd.try_clone().map_err(self.err("create", name))?;
        for part in name.components() {
            let Component::Normal(part) = part else { continue };
            match rustix::fs::mkdirat(&dir, part, Mode::from_raw_mode(mode)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(self.err("create", name)(e.into())),
            }
            dir = rustix::fs::openat2(&dir, part, OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty(), RESOLVE)
                .map_err(|e| self.err("create", name)(e.into()))?;
        }
        Ok(())
    }

    /// Bytes an unprivileged writer may still put on this directory's filesystem.
    pub fn free_bytes(&self) -> Result<u64, BeneathError> {
        let st = rustix::fs::fstatvfs(&self.fd).map_err(|e| self.err("stat", Path::new("."))(e.into()))?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// The directory holding `name` (opened beneath) and the last component.
    fn parent_of<'a>(&self, op: &'static str, name: &'a Path) -> Result<(OwnedFd, &'a std::ffi::OsStr), BeneathError> {
        check_relative(name).map_err(self.err(op, name))?;
        let last = name.file_name().ok_or_else(|| self.err(op, name)(io::ErrorKind::InvalidInput.into()))?;
        let parent = name.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let dir = rustix::fs::openat2(&self.fd, parent, OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty(), RESOLVE)
            .map_err(|e| self.err(op, name)(e.into()))?;
        Ok((dir, last))
    }

    /// `fd` as a file, if it is a regular one (and, for writing, has no other name).
    fn regular(&self, fd: OwnedFd, op: &'static str, name: &Path, writing: bool) -> Result<File, BeneathError> {
        let st = rustix::fs::fstat(fd.as_fd()).map_err(|e| self.err(op, name)(e.into()))?;
        let bad = |reason: &str| fail(op, &self.path, name, io::Error::other(reason.to_string()));
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(bad("not a regular file"));
        }
        if writing && st.st_nlink > 1 {
            return Err(bad("the file has other names (hard links); refusing to write it"));
        }
        Ok(File::from(fd))
    }
}

/// Relative and plain: no absolute path, no `..` (openat2 would refuse them too; this
/// says why in words).
fn check_relative(name: &Path) -> io::Result<()> {
    if name.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)) {
        Ok(())
    } else {
        Err(io::Error::new(io::ErrorKind::InvalidInput, "not a plain relative path"))
    }
}

fn fail(op: &'static str, dir: &Path, name: &Path, e: io::Error) -> BeneathError {
    // what openat2 answers for a symlink on the way, or a path that leaves the directory
    let reason = match e.raw_os_error().map(rustix::io::Errno::from_raw_os_error) {
        Some(rustix::io::Errno::LOOP) => {
            "a symlink is on the way (refused: files are only opened beneath the directory)".to_string()
        }
        Some(rustix::io::Errno::XDEV) => "the path leads outside the directory (refused)".to_string(),
        _ => e.to_string(),
    };
    BeneathError { op, dir: dir.to_path_buf(), name: name.to_path_buf(), reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_reads_plain_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Beneath::open(tmp.path()).unwrap();
        dir.create_dir_all("a/b", 0o700).unwrap();
        dir.write("a/b/f", b"one").unwrap();
        dir.write("a/b/f", b"two").unwrap();
        assert_eq!(dir.read("a/b/f").unwrap(), b"two");
        dir.rename("a/b/f", "g").unwrap();
        dir.create_dir_all("c", 0o700).unwrap();
        dir.link_into("g", &dir, "c/g").unwrap();
        assert_eq!(std::fs::read(tmp.path().join("c/g")).unwrap(), b"two");
        assert!(dir.link_into("g", &dir, "c/g").is_err(), "an existing name is kept");
        assert_eq!(std::fs::read(tmp.path().join("g")).unwrap(), b"two");
        assert!(dir.create_new("g", 0o600).is_err());
        assert!(dir.free_bytes().unwrap() > 0);
    }

    #[test]
    fn never_through_a_link() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let root = tmp.path().join("recv");
        std::fs::create_dir(&root).unwrap();
        std::os::unix::fs::symlink(&victim, root.join("file-link")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("dir-link")).unwrap();
        std::fs::hard_link(&victim, root.join("hard")).unwrap();
        let dir = Beneath::open(&root).unwrap();
        for (what, result) in [
            ("symlink to a file", dir.write("file-link", b"x")),
            ("symlink to a dir", dir.write("dir-link/victim", b"x")),
            ("hard link", dir.write("hard", b"x")),
            ("dot-dot", dir.write("../recv/x", b"x")),
            ("absolute", dir.write(&victim, b"x")),
        ] {
            let err = result.expect_err(what);
            assert!(err.to_string().contains("beneath"), "{what}: {err}");
        }
        let err = dir.read("file-link").unwrap_err().to_string();
        assert!(err.contains("symlink"), "{err}");
        assert!(dir.create_dir_all("dir-link/sub", 0o700).is_err());
        assert!(dir.rename("hard", "dir-link/moved").is_err());
        assert!(dir.link_into("file-link", &dir, "x").is_err(), "a symlink is not linked");
        assert!(dir.link_into("hard", &dir, "dir-link/linked").is_err());
        assert!(!outside.path().join("linked").exists());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert!(!outside.path().join("sub").exists() && !outside.path().join("moved").exists());
        // the directory itself must not be a link either
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("root-link")).unwrap();
        assert!(Beneath::open(&tmp.path().join("root-link")).is_err());
    }
}
