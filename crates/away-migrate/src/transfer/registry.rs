//! What a receiver holds for its transfers, and the bounds on it: at most
//! [`ReceiveOptions::max_transfers`] unfinished transfers, at most
//! [`ReceiveOptions::max_spool_bytes`] reserved by their spools, and nothing kept longer
//! than [`ReceiveOptions::expire_after`] without a connection (spools an earlier run of the
//! receiver left included).
//!
//! A transfer is *unfinished* from the hello that admits it until its verdict, whether a
//! sender is connected or its spool only waits on disk for the sender to come back. Its
//! spool reserves twice the announced payload (the stream and its unpacked copy) from the
//! hello on, before a byte of it is accepted, so what the spools hold never exceeds the
//! bound, whatever the senders do afterwards.
//!
//! [`ReceiveOptions::max_transfers`]: super::ReceiveOptions::max_transfers
//! [`ReceiveOptions::max_spool_bytes`]: super::ReceiveOptions::max_spool_bytes
//! [`ReceiveOptions::expire_after`]: super::ReceiveOptions::expire_after

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tracing::{info, warn};

use super::receive::{Phase, ProgressFile, Slot};
use super::send::valid_transfer_id;
use super::wire::Hello;

/// Finished transfers whose verdicts are kept (for a sender that reconnects after its
/// verdict was lost) beyond this many go, oldest first, before they expire.
const MAX_FINISHED: usize = 1024;
/// Prefix of a spool being removed (renamed first, so that a new transfer of the same id
/// never meets half of it).
const EXPIRED_PREFIX: &str = ".expired-";

/// The limits the registry enforces (from `ReceiveOptions`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub max_transfers: usize,
    pub max_spool_bytes: u64,
}

/// Every transfer a receiver knows, with what it holds.
pub(super) struct Registry {
    root: PathBuf,
    limits: Limits,
    entries: Mutex<HashMap<String, Entry>>,
}

struct Entry {
    slot: Arc<Mutex<Slot>>,
    /// Connections admitted for it that have not ended.
    connections: u32,
    /// What its spool may grow to; counted while `on_disk`.
    reserved: u64,
    /// Its spool directory exists (or is about to).
    on_disk: bool,
    /// Its verdict is given (kept to answer a reconnecting sender).
    finished: bool,
    /// When its last connection ended (adopted spools: when they were last written).
    idle_since: Instant,
}

impl Entry {
    fn unfinished(&self) -> bool {
        !self.finished && (self.connections > 0 || self.on_disk)
    }
}

/// One admitted connection of a transfer: while it lives the transfer does not expire;
/// dropping it records when the transfer went idle.
pub(super) struct Admission {
    registry: Arc<Registry>,
    id: String,
    pub slot: Arc<Mutex<Slot>>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut entries = self.registry.entries.lock().expect("registry lock");
        let forget = match entries.get_mut(&self.id) {
            Some(e) if Arc::ptr_eq(&e.slot, &self.slot) => {
                e.connections = e.connections.saturating_sub(1);
                e.idle_since = Instant::now();
                // refused before it had a spool: nothing to keep
                e.connections == 0 && !e.on_disk && !e.finished
            }
            _ => false,
        };
        if forget {
            entries.remove(&self.id);
        }
    }
}

/// A spool removed by [`Registry::sweep`] or at start.
#[derive(Debug)]
pub(super) struct Removed {
    pub transfer_id: String,
    pub bytes: u64,
}

/// What the registry holds now (for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryStats {
    /// Transfers admitted and not finished (connected or waiting on disk).
    pub unfinished: usize,
    /// Bytes reserved by spools on disk.
    pub reserved_bytes: u64,
    /// Every transfer known, finished ones included.
    pub known: usize,
}

impl Registry {
    pub fn new(root: PathBuf, limits: Limits) -> Registry {
        Registry { root, limits, entries: Mutex::default() }
    }

    pub fn stats(&self) -> RegistryStats {
        let entries = self.entries.lock().expect("registry lock");
        RegistryStats {
            unfinished: entries.values().filter(|e| e.unfinished()).count(),
            reserved_bytes: entries.values().filter(|e| e.on_disk).map(|e| e.reserved).sum(),
            known: entries.len(),
        }
    }

    /// Admit a connection whose (valid) hello announced `hello`, or say why not: too many
    /// unfinished transfers, or not enough spool left for twice the announced payload. A
    /// refused hello leaves nothing behind.
    pub fn admit(self: &Arc<Self>, hello: &Hello) -> Result<Admission, String> {
        let id = &hello.transfer_id;
        let need = hello.total_bytes.saturating_mul(2);
        let mut entries = self.entries.lock().expect("registry lock");
        let others = entries.iter().filter(|(k, _)| *k != id).map(|(_, e)| e);
        let (busy, reserved) = others.fold((0usize, 0u64), |(n, bytes), e| {
            (n + usize::from(e.unfinished()), bytes + if e.on_disk { e.reserved } else { 0 })
        });
        let now = Instant::now();
        let entry = entries.get(id);
        let finished = entry.is_some_and(|e| e.finished);
        if !finished {
            if !entry.is_some_and(Entry::unfinished) && busy >= self.limits.max_transfers {
                return Err(format!(
                    "receiver busy: {busy} transfers unfinished, the limit is {} (agent --max-transfers); \
                     an unfinished one without a sender expires",
                    self.limits.max_transfers
                ));
            }
            if reserved.saturating_add(need) > self.limits.max_spool_bytes {
                return Err(format!(
                    "receiver spool full: transfer {id} needs {need} bytes (twice its payload of {}), \
                     {reserved} of {} are reserved by other transfers (agent --max-spool)",
                    hello.total_bytes, self.limits.max_spool_bytes
                ));
            }
        }
        let e = entries.entry(id.clone()).or_insert_with(|| Entry {
            slot: Arc::default(),
            connections: 0,
            reserved: 0,
            on_disk: false,
            finished: false,
            idle_since: now,
        });
        if !e.finished {
            e.reserved = need;
            e.on_disk = true;
        }
        e.connections += 1;
        Ok(Admission { registry: self.clone(), id: id.clone(), slot: e.slot.clone() })
    }

    /// The spool of `id` is gone from disk (its payload was used or refused, or it could
    /// not be made).
    pub fn spool_gone(&self, id: &str) {
        if let Some(e) = self.entries.lock().expect("registry lock").get_mut(id) {
            e.on_disk = false;
            e.reserved = 0;
        }
    }

    /// `id` has its verdict; `spool_kept`: its spool stays on disk (a failed verdict keeps
    /// it for inspection until the transfer expires).
    pub fn finished(&self, id: &str, spool_kept: bool) {
        if let Some(e) = self.entries.lock().expect("registry lock").get_mut(id) {
            e.finished = true;
            if !spool_kept {
                e.on_disk = false;
                e.reserved = 0;
            }
        }
    }

    /// Forget every transfer without a connection for `expire_after` (and the oldest
    /// finished ones beyond [`MAX_FINISHED`]); their spools are removed. A transfer whose
    /// handler still runs stays.
    pub fn sweep(&self, expire_after: Duration) -> Vec<Removed> {
        let mut doomed = Vec::new();
        {
            let mut entries = self.entries.lock().expect("registry lock");
            let handler_runs = |e: &Entry| match e.slot.try_lock() {
                Ok(s) => matches!(s.phase, Phase::Finishing),
                // held right now: something works on it
                Err(_) => true,
            };
            let mut expired: Vec<String> = entries
                .iter()
                .filter(|(_, e)| e.connections == 0 && e.idle_since.elapsed() >= expire_after && !handler_runs(e))
                .map(|(id, _)| id.clone())
                .collect();
            let mut finished: Vec<(Instant, String)> = entries
                .iter()
                .filter(|(id, e)| e.finished && e.connections == 0 && !expired.contains(id))
                .map(|(id, e)| (e.idle_since, id.clone()))
                .collect();
            if finished.len() > MAX_FINISHED {
                finished.sort();
                let excess = finished.len() - MAX_FINISHED;
                expired.extend(finished.into_iter().take(excess).map(|(_, id)| id));
            }
            for id in expired {
                let Some(e) = entries.remove(&id) else { continue };
                if e.on_disk {
                    // renamed while the registry is locked: a new transfer of this id makes
                    // a fresh spool, never one half removed
                    let from = self.root.join(&id);
                    let to = self.root.join(format!("{EXPIRED_PREFIX}{id}"));
                    match fs::rename(&from, &to) {
                        Ok(()) => doomed.push((id, to)),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            warn!(transfer_id = %id, dir = %from.display(), error = %e, "cannot remove an expired spool")
                        }
                    }
                } else {
                    doomed.push((id, PathBuf::new()));
                }
            }
        }
        doomed
            .into_iter()
            .map(|(transfer_id, dir)| {
                let bytes = if dir.as_os_str().is_empty() { 0 } else { remove_tree(&dir) };
                Removed { transfer_id, bytes }
            })
            .collect()
    }

    /// At start: take over the spools an earlier run left (a sender may come back and
    /// resume them), counted against the limits and expiring `expire_after` after they
    /// were last written; remove the expired ones and anything else in the spool
    /// directory. Returns (adopted, removed).
    pub fn adopt_leftovers(&self, expire_after: Duration) -> (Vec<String>, Vec<Removed>) {
        let (mut adopted, mut removed) = (Vec::new(), Vec::new());
        let Ok(dir) = fs::read_dir(&self.root) else { return (adopted, removed) };
        let mut entries = self.entries.lock().expect("registry lock");
        for item in dir.flatten() {
            let path = item.path();
            let name = item.file_name().to_string_lossy().into_owned();
            let progress = item
                .file_type()
                .is_ok_and(|t| t.is_dir())
                .then(|| fs::read(path.join("progress.json")).ok())
                .flatten()
                .and_then(|b| serde_json::from_slice::<ProgressFile>(&b).ok())
                .filter(|p| valid_transfer_id(&name) && p.transfer_id == name);
            let age = last_written(&path).and_then(|t| SystemTime::now().duration_since(t).ok());
            let adopt = progress.filter(|_| age.is_some_and(|a| a < expire_after));
            match adopt {
                Some(p) if !entries.contains_key(&name) => {
                    let idle_since = Instant::now().checked_sub(age.unwrap_or_default()).unwrap_or_else(Instant::now);
                    entries.insert(
                        name.clone(),
                        Entry {
                            slot: Arc::default(),
                            connections: 0,
                            reserved: p.total_bytes.saturating_mul(2),
                            on_disk: true,
                            finished: false,
                            idle_since,
                        },
                    );
                    adopted.push(name);
                }
                _ => removed.push(Removed { bytes: remove_tree(&path), transfer_id: name }),
            }
        }
        (adopted, removed)
    }
}

/// The newest modification time of `path` and what is directly in it.
fn last_written(path: &Path) -> Option<SystemTime> {
    let own = fs::symlink_metadata(path).and_then(|m| m.modified()).ok();
    let children = fs::read_dir(path).into_iter().flatten().flatten();
    children.filter_map(|c| c.metadata().and_then(|m| m.modified()).ok()).chain(own).max()
}

/// Remove a file or a tree (never following a link out of it); returns the bytes its
/// files held.
fn remove_tree(path: &Path) -> u64 {
    let bytes = tree_bytes(path);
    let result = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(path = %path.display(), error = %e, "cannot remove a stale transfer spool");
        }
    }
    bytes
}

/// Bytes the files below `path` take on disk (allocated blocks: a sparse spool counts
/// what it really holds).
pub(super) fn tree_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = fs::symlink_metadata(path) else { return 0 };
    if !m.is_dir() {
        return m.blocks() * 512;
    }
    fs::read_dir(path).into_iter().flatten().flatten().map(|c| tree_bytes(&c.path())).sum::<u64>() + m.blocks() * 512
}

/// Log what a sweep or the start removed.
pub(super) fn log_removed(removed: &[Removed], why: &str) {
    for r in removed {
        info!(transfer_id = %r.transfer_id, bytes = r.bytes, "transfer spool removed: {why}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(id: &str, total: u64) -> Hello {
        Hello {
            version: 1,
            transfer_id: id.into(),
            total_bytes: total,
            chunk_size: 1 << 20,
            chunk_count: total.div_ceil(1 << 20),
            compression: "none".into(),
            sha256: "0".repeat(64),
            meta: serde_json::Value::Null,
            secret: None,
        }
    }

    fn registry(dir: &Path, max_transfers: usize, max_spool_bytes: u64) -> Arc<Registry> {
        Arc::new(Registry::new(dir.to_path_buf(), Limits { max_transfers, max_spool_bytes }))
    }

    #[test]
    fn unfinished_transfers_are_bounded_while_connected_and_while_waiting() {
        let tmp = tempfile::tempdir().unwrap();
        let r = registry(tmp.path(), 2, 1 << 40);
        let a = r.admit(&hello("a", 10)).unwrap();
        let b = r.admit(&hello("b", 10)).unwrap();
        let err = r.admit(&hello("c", 10)).err().unwrap();
        assert!(err.contains("receiver busy: 2 transfers unfinished") && err.contains("--max-transfers"), "{err}");
        // a second connection of an admitted transfer (a sender reconnecting) is no new one
        let a2 = r.admit(&hello("a", 10)).unwrap();
        drop((a, a2, b));
        // their senders are gone, their spools wait: still unfinished
        assert!(r.admit(&hello("c", 10)).is_err());
        r.finished("a", false);
        let c = r.admit(&hello("c", 10)).unwrap();
        assert_eq!(r.stats(), RegistryStats { unfinished: 2, reserved_bytes: 40, known: 3 });
        drop(c);
        // a finished transfer's sender may ask again for its verdict at any time
        assert!(r.admit(&hello("a", 10)).is_ok());
    }

    #[test]
    fn spools_reserve_twice_their_payload_before_a_byte_comes() {
        let tmp = tempfile::tempdir().unwrap();
        let r = registry(tmp.path(), 10, 100);
        let a = r.admit(&hello("a", 30)).unwrap();
        let err = r.admit(&hello("b", 21)).err().unwrap();
        assert!(err.contains("needs 42 bytes") && err.contains("60 of 100 are reserved"), "{err}");
        assert_eq!(r.stats().known, 1, "a refused hello leaves nothing");
        let b = r.admit(&hello("b", 20)).unwrap();
        r.spool_gone("a");
        assert_eq!(r.stats().reserved_bytes, 40);
        drop((a, b));
    }

    #[test]
    fn idle_transfers_expire_with_their_spools() {
        let tmp = tempfile::tempdir().unwrap();
        let r = registry(tmp.path(), 1, 1 << 30);
        let a = r.admit(&hello("a", 10)).unwrap();
        fs::create_dir(tmp.path().join("a")).unwrap();
        fs::write(tmp.path().join("a/payload.tar"), vec![1u8; 8192]).unwrap();
        assert!(r.sweep(Duration::ZERO).is_empty(), "a connected transfer never expires");
        drop(a);
        let removed = r.sweep(Duration::ZERO);
        assert_eq!(removed.len(), 1);
        assert!(removed[0].bytes >= 8192, "{removed:?}");
        assert!(fs::read_dir(tmp.path()).unwrap().next().is_none(), "spool left");
        assert_eq!(r.stats(), RegistryStats { unfinished: 0, reserved_bytes: 0, known: 0 });
        assert!(r.admit(&hello("b", 10)).is_ok(), "its place is free again");
    }

    #[test]
    fn leftovers_of_an_earlier_run_are_adopted_or_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let progress = |id: &str, total: u64| {
            let p = ProgressFile {
                transfer_id: id.into(),
                total_bytes: total,
                chunk_size: 1 << 20,
                chunk_count: total.div_ceil(1 << 20),
                sha256: "0".repeat(64),
                have: 0,
            };
            fs::create_dir(tmp.path().join(id)).unwrap();
            fs::write(tmp.path().join(id).join("progress.json"), serde_json::to_vec(&p).unwrap()).unwrap();
        };
        progress("resumable", 100);
        // a spool killed before its first progress record, junk, a half-removed spool
        fs::create_dir(tmp.path().join("noprogress")).unwrap();
        fs::write(tmp.path().join("junk"), b"x").unwrap();
        fs::create_dir(tmp.path().join(".expired-old")).unwrap();
        let r = registry(tmp.path(), 4, 1 << 30);
        let (adopted, removed) = r.adopt_leftovers(Duration::from_secs(600));
        assert_eq!(adopted, vec!["resumable".to_string()]);
        let mut names: Vec<_> = removed.iter().map(|r| r.transfer_id.as_str()).collect();
        names.sort();
        assert_eq!(names, [".expired-old", "junk", "noprogress"]);
        assert_eq!(r.stats(), RegistryStats { unfinished: 1, reserved_bytes: 200, known: 1 });
        // with no time left, it goes as well
        let r = registry(tmp.path(), 4, 1 << 30);
        let (adopted, removed) = r.adopt_leftovers(Duration::ZERO);
        assert!(adopted.is_empty() && removed.len() == 1);
        assert!(fs::read_dir(tmp.path()).unwrap().next().is_none());
    }
}
