//! Files of identities: keys 0600 from their creation on, directories 0700.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::{IdentityError, Result};

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError {
    let path = path.to_path_buf();
    move |source| IdentityError::Io { what, path, source }
}

/// Make `dir` (and its parents) when absent, and make it 0700 either way.
pub fn private_dir(dir: &Path) -> Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io("create directory", dir))?;
    std::fs::set_permissions(dir, Permissions::from_mode(0o700)).map_err(io("chmod 0700", dir))
}

/// Create `path` 0600 with `bytes`; fails when it exists (O_EXCL), so nothing else can
/// have opened it first.
pub fn write_new_secret(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io("create", path))?;
    f.write_all(bytes).map_err(io("write", path))?;
    f.sync_all().map_err(io("sync", path))
}

fn tmp_beside(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".new");
    path.with_file_name(name)
}

fn replace(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let tmp = tmp_beside(path);
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("remove", &tmp)(e)),
    }
    let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(io("create", &tmp))?;
    f.write_all(bytes).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename into place", path))
}

/// Replace `path` whole with `bytes`, 0600.
pub fn replace_secret(path: &Path, bytes: &[u8]) -> Result<()> {
    replace(path, bytes, 0o600)
}

/// Replace `path` whole with `bytes`, 0644 (certificates are public).
pub fn replace_public(path: &Path, bytes: &[u8]) -> Result<()> {
    replace(path, bytes, 0o644)
}

pub fn write_public(path: &Path, bytes: &[u8]) -> Result<()> {
    replace_public(path, bytes)
}

pub fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(io("read", path))
}

/// Read a key, refusing one that group or others may read.
pub fn read_secret(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(io("read", path))?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::OpenMode { path: path.to_path_buf(), mode });
    }
    read(path)
}
