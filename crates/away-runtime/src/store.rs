//! Where workloads' images come from. There is no registry: images are tars built by
//! `away image build` (OCI layout + docker-archive in one file). A spec names either a
//! path to such a tar or a reference (`away/counter:latest`) kept in the local image
//! store, `$AWAY_STATE_DIR/images`.

use std::path::{Path, PathBuf};

use away_image::archive::normalize_reference;
use away_model::{error_chain, Arch};
use serde::{Deserialize, Serialize};

use crate::runtime::RuntimeError;

/// The parts of an image's config that runtimes need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSummary {
    pub arch: Arch,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
    /// Ports the image declares (EXPOSE), TCP only.
    pub exposed_ports: Vec<u16>,
}

/// An image found on disk, ready for a runtime to import.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedImage {
    /// Full reference as Docker and containerd name it (`docker.io/away/counter:latest`).
    pub reference: String,
    /// The image tar (OCI layout and docker-archive).
    pub tar: PathBuf,
    pub manifest_digest: String,
    pub summary: ImageSummary,
}

impl ResolvedImage {
    /// The command the image runs: spec `command` replaces CMD, as in Docker.
    pub fn argv(&self, command_override: Option<&[String]>) -> Vec<String> {
        let mut argv = self.summary.entrypoint.clone();
        argv.extend(command_override.map(<[String]>::to_vec).unwrap_or_else(|| self.summary.cmd.clone()));
        argv
    }
}

/// The local image store: one tar per reference.
#[derive(Debug, Clone)]
pub struct ImageStore {
    pub dir: PathBuf,
}

impl ImageStore {
    pub fn new(state_dir: &Path) -> Self {
        ImageStore { dir: state_dir.join("images") }
    }

    /// File name for a reference: `docker.io/away/counter:latest` -> `docker.io_away_counter_latest.tar`.
    fn file_for(&self, reference: &str) -> PathBuf {
        let name: String = normalize_reference(reference)
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' })
            .collect();
        self.dir.join(format!("{name}.tar"))
    }

    /// Add an image tar to the store under every tag it carries (and `extra_tag`).
    /// Returns the references stored.
    pub fn add(&self, tar: &Path, extra_tag: Option<&str>) -> Result<Vec<String>, RuntimeError> {
        let read = away_image::read_image_tar(tar)
            .map_err(|e| RuntimeError::Image { reference: tar.display().to_string(), reason: error_chain(&e) })?;
        let mut refs: Vec<String> = read.image.tags.iter().map(|t| normalize_reference(t)).collect();
        refs.extend(extra_tag.map(normalize_reference));
        if refs.is_empty() {
            // an untagged tar (skopeo, `podman push` to a bare oci-archive) is stored under
            // the name `resolve` gives it
            refs.push(untagged_reference(&read.manifest_digest));
        }
        refs.sort();
        refs.dedup();
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| RuntimeError::io(format!("create {}", self.dir.display()), e))?;
        for r in &refs {
            let dest = self.file_for(r);
            // copy to a temp name, then rename: a reader never sees half a tar. The name is
            // this copy's own: two imports of one reference at once (two `away image build
            // -t` of one tag) must not rename each other's file away
            static COPIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = COPIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let tmp = dest.with_extension(format!("tar.part-{}-{n}", std::process::id()));
            let copied = std::fs::copy(tar, &tmp)
                .map_err(|e| RuntimeError::io(format!("copy {} to {}", tar.display(), tmp.display()), e))
                .and_then(|_| {
                    std::fs::rename(&tmp, &dest).map_err(|e| RuntimeError::io(format!("rename {}", tmp.display()), e))
                });
            if copied.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            copied?;
        }
        Ok(refs)
    }

    /// Resolve a reference a peer sent (a move's announcement or manifest, an image
    /// query): the store's own tar for it, never a path on this host, which
    /// [`ImageStore::resolve`] would take for a user's `away run ./app.tar`.
    pub fn resolve_stored(&self, reference: &str) -> Result<ResolvedImage, RuntimeError> {
        self.in_store(reference, || format!("not in the image store {}", self.dir.display()))
    }

    /// A path to an image tar, or a reference in the store.
    pub fn resolve(&self, image: &str) -> Result<ResolvedImage, RuntimeError> {
        let as_path = Path::new(image);
        if as_path.is_file() {
            return read_resolved(as_path, None);
        }
        self.in_store(image, || {
            format!(
                "not found: it is neither an image tar nor in the image store {} (build it with `away image build images/<app>`, or name a tar)",
                self.dir.display()
            )
        })
    }

    /// The store's tar for `reference`; `missing` says why when there is none.
    fn in_store(&self, reference: &str, missing: impl FnOnce() -> String) -> Result<ResolvedImage, RuntimeError> {
        let file = self.file_for(reference);
        if !file.is_file() {
            return Err(RuntimeError::Image { reference: reference.to_string(), reason: missing() });
        }
        read_resolved(&file, Some(normalize_reference(reference)))
    }
}

/// The name of an image whose tar carries no tag: `away.local/` and its manifest
/// digest's first 12 hex digits, `:latest`.
fn untagged_reference(manifest_digest: &str) -> String {
    let short: String = manifest_digest.trim_start_matches("sha256:").chars().take(12).collect();
    normalize_reference(&format!("away.local/{short}"))
}

/// Which file a path names right now: device, inode, size and modification time. The
/// store replaces a tar by renaming a new file over it, so a changed tar is another
/// identity.
type FileIdentity = (u64, u64, u64, i64, i64);

fn identity(tar: &Path) -> Option<FileIdentity> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(tar).ok()?;
    Some((m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

/// Images resolved in this process, by tar path, reference asked for and the file's
/// identity: reading a tar checks every blob against its digest (a real server's image
/// took 0.06-0.2 s, in a move's downtime on the target), and an unchanged file reads the
/// same. Bounded: emptied when full.
static RESOLVED: std::sync::Mutex<Vec<(ResolvedKey, ResolvedImage)>> = std::sync::Mutex::new(Vec::new());
/// A tar's path, the reference asked for, the file's identity.
type ResolvedKey = (PathBuf, Option<String>, FileIdentity);
const RESOLVED_KEEP: usize = 64;

/// Read an image tar's config into a ResolvedImage (from [`RESOLVED`] when this file was
/// read before).
pub fn read_resolved(tar: &Path, reference: Option<String>) -> Result<ResolvedImage, RuntimeError> {
    let Some(id) = identity(tar) else { return read_resolved_uncached(tar, reference) };
    let key = (tar.to_path_buf(), reference.clone(), id);
    let cached =
        RESOLVED.lock().unwrap_or_else(|p| p.into_inner()).iter().find(|(k, _)| *k == key).map(|e| e.1.clone());
    if let Some(image) = cached {
        return Ok(image);
    }
    let image = read_resolved_uncached(tar, reference)?;
    // the file read is the one identified before the read only if it is unchanged after
    if identity(tar) == Some(id) {
        let mut all = RESOLVED.lock().unwrap_or_else(|p| p.into_inner());
        if all.len() >= RESOLVED_KEEP {
            all.clear();
        }
        all.push((key, image.clone()));
    }
    Ok(image)
}

fn read_resolved_uncached(tar: &Path, reference: Option<String>) -> Result<ResolvedImage, RuntimeError> {
    let read = away_image::read_image_tar(tar)
        .map_err(|e| RuntimeError::Image { reference: tar.display().to_string(), reason: error_chain(&e) })?;
    let cfg = &read.image.config;
    let inner = cfg.config().clone().unwrap_or_default();
    let reference = reference
        .or_else(|| read.image.tags.first().map(|t| normalize_reference(t)))
        .unwrap_or_else(|| untagged_reference(&read.manifest_digest));
    let mut exposed: Vec<u16> = inner
        .exposed_ports()
        .clone()
        .unwrap_or_default()
        .iter()
        .filter_map(|p| {
            let (port, proto) = p.split_once('/').unwrap_or((p, "tcp"));
            (proto == "tcp").then(|| port.parse().ok()).flatten()
        })
        .collect();
    exposed.sort_unstable();
    Ok(ResolvedImage {
        reference,
        tar: tar.to_path_buf(),
        manifest_digest: read.manifest_digest.clone(),
        summary: ImageSummary {
            arch: Arch(cfg.architecture().to_string()),
            entrypoint: inner.entrypoint().clone().unwrap_or_default(),
            cmd: inner.cmd().clone().unwrap_or_default(),
            env: inner.env().clone().unwrap_or_default(),
            working_dir: inner.working_dir().clone().unwrap_or_default(),
            user: inner.user().clone().unwrap_or_default(),
            exposed_ports: exposed,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-layer image tar tagged `tag` in `dir`, built by away-image from a Containerfile.
    fn image(dir: &Path, tag: &str, file: &str) -> PathBuf {
        let ctx = dir.join(format!("ctx-{file}"));
        std::fs::create_dir_all(ctx.join("rootfs")).unwrap();
        std::fs::write(ctx.join("rootfs").join(file), file).unwrap();
        std::fs::write(ctx.join("Containerfile"), "FROM scratch\nCOPY rootfs/ /\nCMD [\"/x\"]\n").unwrap();
        let opts = away_image::BuildOptions { tag: Some(tag.into()), ..Default::default() };
        away_image::build_to_dir(&ctx, &dir.join(format!("out-{file}")), &opts, &|_| {}).unwrap().1
    }

    #[test]
    fn a_resolved_image_is_read_again_only_when_its_tar_changed() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::new(&dir.path().join("state"));
        store.add(&image(dir.path(), "away/t:1", "a"), None).unwrap();
        let first = store.resolve("away/t:1").unwrap();
        assert_eq!(store.resolve("away/t:1").unwrap(), first);
        // another tar under the same reference (renamed over the old one): read anew
        store.add(&image(dir.path(), "away/t:1", "b"), None).unwrap();
        let second = store.resolve("away/t:1").unwrap();
        assert_ne!(second.manifest_digest, first.manifest_digest);
        assert_eq!(second.reference, first.reference);
    }
}
