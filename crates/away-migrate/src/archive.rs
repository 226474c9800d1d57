//! Checkpoint archives on disk. They hold process memory, so they are owner-only, gone
//! from both sides after a successful move, and kept after a failed one for
//! inspection, within a size cap (oldest kept archives go first).

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;

use crate::MigrateError;

/// Default cap on the archives kept after failed moves.
pub const DEFAULT_KEEP_BYTES: u64 = 2 << 30;

/// Where a node keeps checkpoint archives: `<root>/active` while a move runs,
/// `<root>/failed` after a failed one.
#[derive(Debug, Clone)]
pub struct ArchiveStore {
    pub root: PathBuf,
    /// Total size of failed archives kept.
    pub keep_bytes: u64,
}

/// One archive, as `away archives list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ArchiveEntry {
    pub path: PathBuf,
    pub workload: String,
    /// `active` (a move in progress) or `failed` (kept for inspection).
    pub state: String,
    pub bytes: u64,
    pub age_seconds: u64,
}

fn io(path: &Path, e: std::io::Error) -> MigrateError {
    MigrateError::Io { path: path.to_path_buf(), source: e }
}

fn private_dir(path: &Path) -> Result<(), MigrateError> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path).map_err(|e| io(path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(|e| io(path, e))
}

impl ArchiveStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ArchiveStore { root: root.into(), keep_bytes: DEFAULT_KEEP_BYTES }
    }

    /// A fresh owner-only payload directory for a move of `workload`.
    pub fn create(&self, workload: &str) -> Result<PathBuf, MigrateError> {
        let active = self.root.join("active");
        private_dir(&self.root)?;
        private_dir(&active)?;
        let stamp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        let dir = active.join(format!("{workload}-{stamp}"));
        private_dir(&dir)?;
        Ok(dir)
    }

    /// Delete an archive (after a successful move).
    pub fn discard(&self, dir: &Path) -> Result<(), MigrateError> {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(dir, e)),
        }
    }

    /// Keep an archive of a failed move under `failed/`, then prune to the cap. Returns
    /// where it is now (None: it could not be moved and stays where it was).
    pub fn keep_failed(&self, dir: &Path) -> Option<PathBuf> {
        let failed = self.root.join("failed");
        let dest = failed.join(dir.file_name().unwrap_or_default());
        let moved = private_dir(&failed).and_then(|_| std::fs::rename(dir, &dest).map_err(|e| io(dir, e)));
        if let Err(e) = &moved {
            tracing::warn!("cannot keep the failed archive {}: {e}", dir.display());
        }
        if let Err(e) = self.prune(self.keep_bytes) {
            tracing::warn!("cannot prune {}: {e}", self.root.display());
        }
        moved.ok().map(|_| dest)
    }

    /// Every archive, newest first.
    pub fn list(&self) -> Result<Vec<ArchiveEntry>, MigrateError> {
        let mut out = Vec::new();
        for state in ["active", "failed"] {
            let dir = self.root.join(state);
            let Ok(rd) = std::fs::read_dir(&dir) else { continue };
            for e in rd.flatten() {
                let path = e.path();
                let name = e.file_name().to_string_lossy().to_string();
                let workload = name.rsplit_once('-').map(|(w, _)| w.to_string()).unwrap_or(name);
                let age = e
                    .metadata()
                    .ok()
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.elapsed().ok())
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                out.push(ArchiveEntry {
                    bytes: away_runtime::runtime::dir_bytes(&path),
                    path,
                    workload,
                    state: state.into(),
                    age_seconds: age,
                });
            }
        }
        out.sort_by_key(|a| a.age_seconds);
        Ok(out)
    }

    /// Delete failed archives, oldest first, until they total at most `keep_bytes`.
    /// Returns what was deleted. Archives of moves in progress are never touched.
    pub fn prune(&self, keep_bytes: u64) -> Result<Vec<ArchiveEntry>, MigrateError> {
        let mut failed: Vec<ArchiveEntry> = self.list()?.into_iter().filter(|a| a.state == "failed").collect();
        let mut total: u64 = failed.iter().map(|a| a.bytes).sum();
        let mut deleted = Vec::new();
        // oldest last in the list: pop from the end
        while total > keep_bytes {
            let Some(oldest) = failed.pop() else { break };
            self.discard(&oldest.path)?;
            total -= oldest.bytes;
            deleted.push(oldest);
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archives_are_private_kept_on_failure_and_pruned_oldest_first() {
        let root = tempfile::tempdir().unwrap();
        let store = ArchiveStore { root: root.path().join("ck"), keep_bytes: 1500 };
        let a = store.create("counter").unwrap();
        assert_eq!(std::fs::metadata(&a).unwrap().permissions().mode() & 0o777, 0o700);
        std::fs::write(a.join("pages.img"), vec![0u8; 1000]).unwrap();
        store.keep_failed(&a);
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let b = store.create("labdesk").unwrap();
        std::fs::write(b.join("pages.img"), vec![0u8; 1000]).unwrap();
        store.keep_failed(&b);
        // 2000 bytes > 1500: the older (counter) went
        let left = store.list().unwrap();
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(left[0].workload, "labdesk");
        assert_eq!(left[0].state, "failed");
        let c = store.create("memload").unwrap();
        store.discard(&c).unwrap();
        assert!(!c.exists());
        assert_eq!(store.prune(0).unwrap().len(), 1);
        assert!(store.list().unwrap().is_empty());
    }
}
