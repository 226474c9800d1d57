//! Named network namespaces as iproute2 keeps them: a bind mount of a thread's
//! `/proc/thread-self/ns/net` on `/run/netns/NAME`, so that runc can be given the path
//! and the namespace outlives every process in it.

use std::path::{Path, PathBuf};

use super::{io, OverlayError};

/// Where named network namespaces live (iproute2's place: `ip netns` lists them).
pub const NETNS_DIR: &str = "/run/netns";

/// The path of named namespace `name`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Move the calling thread into the namespace at `path`.
pub(crate) fn enter(path: &Path) -> Result<(), OverlayError> {
    let f = std::fs::File::open(path).map_err(io(format!("open {}", path.display())))?;
    rustix::thread::move_into_link_name_space(
        std::os::fd::AsFd::as_fd(&f),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .map_err(|e| OverlayError::Io { op: format!("enter {}", path.display()), source: e.into() })
}

/// A new, empty network namespace named `name` (one of that name is removed first).
pub(crate) fn create(name: &str) -> Result<PathBuf, OverlayError> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(OverlayError::Invalid { network: String::new(), reason: format!("namespace name {name:?}") });
    }
    std::fs::create_dir_all(NETNS_DIR).map_err(io(format!("create {NETNS_DIR}")))?;
    let path = netns_path(name);
    if path.exists() {
        remove(name)?;
    }
    std::fs::File::create(&path).map_err(io(format!("create {}", path.display())))?;
    let target = path.clone();
    let made = std::thread::spawn(move || -> std::io::Result<()> {
        // SAFETY: only CLONE_NEWNET, on a thread of our own that ends right after the
        // bind mount below: no file table or filesystem context is unshared, so no
        // other thread can see a descriptor of an unshared table.
        #[allow(unsafe_code)]
        unsafe {
            rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET)?
        };
        rustix::mount::mount_bind("/proc/thread-self/ns/net", &target)?;
        Ok(())
    })
    .join()
    .map_err(|_| OverlayError::Io { op: "netns thread".into(), source: std::io::Error::other("it panicked") })?;
    if let Err(e) = made {
        let _ = std::fs::remove_file(&path);
        return Err(OverlayError::Io { op: format!("make network namespace {}", path.display()), source: e });
    }
    Ok(path)
}

/// Unmount and remove named namespace `name`; absent is fine.
pub(crate) fn remove(name: &str) -> Result<(), OverlayError> {
    let path = netns_path(name);
    if !path.exists() {
        return Ok(());
    }
    // not mounted (a create that failed half-way): EINVAL, and the file still goes
    let _ = rustix::mount::unmount(&path, rustix::mount::UnmountFlags::DETACH);
    std::fs::remove_file(&path).map_err(io(format!("remove {}", path.display())))
}
