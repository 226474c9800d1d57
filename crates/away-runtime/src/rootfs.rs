//! A container's root filesystem changes (its overlayfs upper directory) travel with a
//! migration: captured at checkpoint as `rootfs-diff.tar` inside the checkpoint, laid
//! into the new container's upper directory before the restore.
//!
//! GNU tar does the copying: an upper directory holds overlayfs whiteouts (0:0
//! character devices) and `trusted.overlay.*` xattrs (opaque directories), which it
//! carries faithfully and the tar crate does not (no mknod, no xattrs).

use std::path::Path;
use std::process::Command;

use crate::runtime::RuntimeError;

/// File name of the rootfs changes inside a checkpoint directory.
pub const ROOTFS_DIFF: &str = "rootfs-diff.tar";

const TAR_FLAGS: &[&str] = &["--numeric-owner", "--xattrs", "--xattrs-include=trusted.overlay.*", "--acls"];

/// The `upperdir=` of overlay mount options.
pub fn upperdir(options: &[String]) -> Option<&str> {
    options.iter().find_map(|o| o.strip_prefix("upperdir="))
}

/// Write the changes under `upper` to `out` (a tar).
pub fn capture(upper: &Path, out: &Path) -> Result<(), RuntimeError> {
    run_tar(
        &[TAR_FLAGS, &["-cf", &out.to_string_lossy(), "-C", &upper.to_string_lossy(), "."]].concat(),
        "capture the rootfs changes of",
        upper,
    )
}

/// Lay the changes of `tar` into `upper`.
pub fn apply(tar: &Path, upper: &Path) -> Result<(), RuntimeError> {
    run_tar(
        &[TAR_FLAGS, &["-xpf", &tar.to_string_lossy(), "-C", &upper.to_string_lossy()]].concat(),
        "apply the rootfs changes to",
        upper,
    )
}

fn run_tar(args: &[&str], what: &str, dir: &Path) -> Result<(), RuntimeError> {
    let out = Command::new("tar").args(args).output().map_err(|e| RuntimeError::io("run tar", e))?;
    if !out.status.success() {
        return Err(RuntimeError::io(
            format!("{what} {}", dir.display()),
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_files_and_modes() {
        use std::os::unix::fs::PermissionsExt;
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("data/sub")).unwrap();
        std::fs::write(src.path().join("data/sub/notes.txt"), b"hello").unwrap();
        std::fs::set_permissions(src.path().join("data/sub/notes.txt"), std::fs::Permissions::from_mode(0o640))
            .unwrap();
        let out = tempfile::tempdir().unwrap();
        let tar = out.path().join("diff.tar");
        capture(src.path(), &tar).unwrap();
        let dst = tempfile::tempdir().unwrap();
        apply(&tar, dst.path()).unwrap();
        let f = dst.path().join("data/sub/notes.txt");
        assert_eq!(std::fs::read(&f).unwrap(), b"hello");
        assert_eq!(std::fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o640);
        assert_eq!(upperdir(&["lowerdir=/a".into(), "upperdir=/u".into(), "workdir=/w".into()]), Some("/u"));
    }
}
