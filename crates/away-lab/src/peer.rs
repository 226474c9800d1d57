//! The peer: Podman's own migration path, run the way its users run it. On the source,
//! `podman container checkpoint --export=FILE --compress=zstd` (CRIU dump, then a
//! zstd tar of the checkpoint and the container's changed files); the archive crosses
//! the same emulated link as away's moves (a TCP sender in namespace A, a receiver in
//! namespace B, both in this process); on the target, `podman container restore
//! --import=FILE`. Timed like away's moves: total from the checkpoint's start to the
//! container running on the target; downtime from Podman's checkpoint operation (its
//! CLI start left out) to the same end; bytes on the wire = the archive.
//!
//! Both "nodes" are Podman stores of their own (`--root`/`--runroot` under the lab's
//! work directory) on this host, each with the memload image loaded before the runs, as
//! away's targets have it too: the archive carries only the checkpoint and the
//! container's files, never the image. The podman commands run on the host; the
//! container has no network (`--network none`, as memload needs none), so only the
//! archive's transfer uses the link.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::Command;

use crate::container::{heartbeats, slowed_after, HEARTBEAT};
use crate::link::{LinkEmulator, PacketSides};
use crate::{CompareOptions, LabError, PlannedRun, RunOutcome, RunResult};

const FILL_TIMEOUT: Duration = Duration::from_secs(120);
/// Connect and copy limits of the archive's transfer (a WAN move of a large archive
/// takes minutes).
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(900);

/// Podman is there and answers.
pub async fn preflight() -> Result<(), LabError> {
    match Command::new("podman").arg("--version").output().await {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(LabError::Missing {
            what: format!("a working podman ({})", String::from_utf8_lossy(&o.stderr).trim()),
            hint: "apt-get install podman, or leave peer-podman out with --paths".into(),
        }),
        Err(e) => Err(LabError::Missing {
            what: format!("podman ({e})"),
            hint: "apt-get install podman (deploy/install.sh does), or leave peer-podman out with --paths".into(),
        }),
    }
}

/// The two Podman stores and the image loaded into both.
pub struct PodmanLab {
    dir: PathBuf,
    image: String,
    version: String,
}

impl PodmanLab {
    pub async fn new(opts: &CompareOptions, work: &Path) -> Result<PodmanLab, LabError> {
        let dir = work.join("podman");
        let missing = |what: String, hint: String| LabError::Missing { what, hint };
        let version = Command::new("podman")
            .arg("--version")
            .output()
            .await
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let mut lab = PodmanLab { dir, image: String::new(), version };
        for side in ["a", "b"] {
            // `podman load` takes the docker-archive half of away's image tar
            let out = lab
                .podman(side)
                .arg("load")
                .arg("-i")
                .arg(&opts.image)
                .output()
                .await
                .map_err(|e| missing(format!("podman ({e})"), "apt-get install podman".into()))?;
            let text = String::from_utf8_lossy(&out.stdout);
            let loaded =
                text.lines().find_map(|l| l.strip_prefix("Loaded image: ").or(l.strip_prefix("Loaded image(s): ")));
            match loaded {
                Some(image) if out.status.success() => lab.image = image.trim().to_string(),
                _ => {
                    return Err(missing(
                        format!("the memload image in podman's store ({side})"),
                        format!(
                            "podman load -i {}: {}",
                            opts.image.display(),
                            String::from_utf8_lossy(&out.stderr).trim()
                        ),
                    ))
                }
            }
        }
        Ok(lab)
    }

    /// `podman` on one side's own store. cgroupfs and file events: no systemd or
    /// journald needed. CRIU: the one away uses (runc finds it on PATH).
    fn podman(&self, side: &str) -> Command {
        let base = self.dir.join(side);
        let criu = away_runtime::host::HostPaths::default().criu;
        let mut path = criu.parent().map(|p| p.display().to_string()).unwrap_or_default();
        path.push(':');
        path.push_str(&std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into()));
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(base.join("root"))
            .arg("--runroot")
            .arg(base.join("run"))
            .args(["--cgroup-manager", "cgroupfs", "--events-backend", "file"])
            .env("PATH", path)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        c
    }

    async fn podman_ok(&self, side: &str, args: &[&str]) -> Result<String, String> {
        let out = self.podman(side).args(args).output().await.map_err(|e| format!("podman {args:?}: {e}"))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(format!("podman {} ({side}): {}", args.first().copied().unwrap_or(""), err.trim()));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Remove both stores (after the last run).
    pub async fn remove(self) {
        for side in ["a", "b"] {
            let _ = self.podman(side).args(["system", "reset", "--force"]).output().await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// One run; failures become a `Failed` result with the reason in its notes.
    pub async fn run(
        &self,
        opts: &CompareOptions,
        planned: &PlannedRun,
        status: &(dyn Fn(String) + Sync),
    ) -> RunResult {
        let name = format!("lab-podman-{}-{}", std::process::id(), planned.run);
        let files = self.dir.join(format!("r{}", planned.run));
        let mut link = None;
        let outcome = self.attempt(opts, planned, &name, &files, &mut link, status).await;
        status("cleaning up".into());
        for side in ["a", "b"] {
            let _ = self.podman(side).args(["rm", "--force", &name]).output().await;
        }
        if let Some(l) = link {
            l.down().await;
        }
        let _ = std::fs::remove_dir_all(&files);
        outcome.unwrap_or_else(|e| {
            RunResult::new(planned, RunOutcome::Failed, Duration::ZERO, None).with_notes(format!("failed: {e}"))
        })
    }

    async fn attempt(
        &self,
        opts: &CompareOptions,
        planned: &PlannedRun,
        name: &str,
        files: &Path,
        link_slot: &mut Option<PacketSides>,
        status: &(dyn Fn(String) + Sync),
    ) -> Result<RunResult, String> {
        std::fs::create_dir_all(files).map_err(|e| format!("create {}: {e}", files.display()))?;
        let (exported, imported) = (files.join("out.tar.zst"), files.join("in.tar.zst"));

        status(format!("starting memload on podman ({})", self.version));
        let (cpu, ram) = planned.load.memload_env();
        let app_mib = opts.app_ram.as_mib().max(1);
        let env = [
            format!("MEMLOAD_SIZE={}", opts.app_ram.bytes()),
            format!("MEMLOAD_CPU={cpu}"),
            format!("MEMLOAD_RAM={ram}"),
            format!("MEMLOAD_CPU_THREADS={}", opts.cpu_threads),
            "MEMLOAD_PORT=0".into(),
            format!("MEMLOAD_INTERVAL_MS={}", HEARTBEAT.as_millis()),
        ];
        let memory = format!("{}m", app_mib * 3 / 2 + 64);
        // root without CAP_SYS_RESOURCE cannot raise podman's default limits: set them
        let mut args = vec!["run", "-d", "--name", name, "--network", "none", "--memory", &memory];
        args.extend(["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]);
        for e in &env {
            args.extend(["-e", e.as_str()]);
        }
        args.push(&self.image);
        self.podman_ok("a", &args).await?;
        status("waiting for memload to fill its memory".into());
        let t = Instant::now();
        while !self.podman_ok("a", &["logs", name]).await?.contains("pages resident") {
            if t.elapsed() > FILL_TIMEOUT {
                return Err(format!("memload did not report its pages resident within {} s", FILL_TIMEOUT.as_secs()));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = heartbeats(&self.podman_ok("a", &["logs", name]).await?);
        let mut rates: Vec<u64> = before.iter().rev().take(4).map(|b| b.1).collect();
        rates.sort_unstable();
        let baseline = rates.get(rates.len() / 2).copied().filter(|r| *r > 0);

        // the receiver on the target's side of the link, before anything stops
        status("bringing up the link".into());
        let (listener, front) = match opts.link_emulator {
            LinkEmulator::Packet => {
                let sides = PacketSides::up(&PacketSides::name_for(planned.run), planned.link.profile()).await?;
                let (netns, addr) = (sides.b().netns.clone(), sides.b().addr);
                *link_slot = Some(sides);
                // a socket stays in the namespace it was made in
                let l = away_link::packet::run_in_netns(&netns, move || TcpListener::bind((addr, 0)))
                    .and_then(|r| r)
                    .map_err(|e| format!("listen in namespace {netns}: {e}"))?;
                (l, None)
            }
            LinkEmulator::SplitTcpProxy => {
                let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("listen on 127.0.0.1: {e}"))?;
                let upstream = l.local_addr().map_err(|e| e.to_string())?;
                let f = opts
                    .link_emulator
                    .start(upstream, planned.link.profile())
                    .await
                    .map_err(|e| format!("start the link: {e}"))?;
                (l, Some(f))
            }
        };
        let dest = match &front {
            Some(f) => f.addr,
            None => listener.local_addr().map_err(|e| e.to_string())?,
        };
        let into = imported.clone();
        let receiver = tokio::task::spawn_blocking(move || receive(listener, &into));

        status(format!("podman checkpoint, then the archive over {}", planned.link));
        let t0 = Instant::now();
        let start_ms = crate::unix_ms();
        let export = format!("--export={}", exported.display());
        let stats = self
            .podman_ok("a", &["container", "checkpoint", &export, "--compress=zstd", "--print-stats", name])
            .await?;
        let checkpointed = t0.elapsed();
        let stats: serde_json::Value =
            serde_json::from_str(&stats).map_err(|e| format!("podman checkpoint --print-stats: {e}"))?;
        let podman_us = stats["podman_checkpoint_duration"].as_u64().unwrap_or(0);
        let criu = &stats["container_statistics"][0]["criu_statistics"];
        let pages = criu["pages_written"].as_u64().unwrap_or(0);
        // the CLI's own start (before its checkpoint operation) is not downtime
        let cli_start = checkpointed.saturating_sub(Duration::from_micros(podman_us));

        let netns_a = link_slot.as_ref().map(|l| l.a().netns.clone());
        let from = exported.clone();
        let sent = tokio::task::spawn_blocking(move || send(netns_a, dest, &from))
            .await
            .map_err(|e| format!("sender: {e}"))??;
        let received = receiver.await.map_err(|e| format!("receiver: {e}"))??;
        let transferred = t0.elapsed() - checkpointed;
        drop(front);
        if received != sent {
            return Err(format!("the target received {received} of the archive's {sent} bytes"));
        }

        status("podman restore on the target".into());
        let import = format!("--import={}", imported.display());
        self.podman_ok("b", &["container", "restore", &import]).await?;
        // restored and running: timed like every path (crate::timed_total)
        let resumed_ms = crate::unix_ms();
        let total = crate::timed_total(start_ms, Some(resumed_ms)).unwrap_or_else(|| t0.elapsed());
        let restored = t0.elapsed().saturating_sub(checkpointed + transferred);
        let running = self.podman_ok("b", &["container", "inspect", "--format", "{{.State.Running}}", name]).await?;
        if running.trim() != "true" {
            return Err(format!("restored, but not running on the target (running: {})", running.trim()));
        }
        let mut slowed = None;
        if let Some(baseline) = baseline {
            tokio::time::sleep(HEARTBEAT * 4).await;
            let logs = self.podman_ok("b", &["logs", name]).await?;
            let _ = std::fs::create_dir_all(opts.out_dir.join("logs")).and_then(|_| {
                std::fs::write(opts.out_dir.join("logs").join(format!("run-{}-app.log", planned.run)), &logs)
            });
            slowed = slowed_after(baseline, &heartbeats(&logs), resumed_ms, HEARTBEAT);
        }
        Ok(RunResult::new(planned, RunOutcome::Moved, total, Some(total.saturating_sub(cli_start)))
            .with_slowed(slowed)
            .with_bytes(sent, pages * 4096)
            .with_notes(format!(
                "{}, runc, criu {}; checkpoint+export {:.2}s (podman's own {:.2}s), send {:.2}s, \
                 restore --import {:.2}s; raw = criu's {pages} pages",
                self.version,
                away_runtime::host::HostPaths::default().criu.display(),
                checkpointed.as_secs_f64(),
                podman_us as f64 / 1e6,
                transferred.as_secs_f64(),
                restored.as_secs_f64(),
            )))
    }
}

/// Take one connection on `listener` and write what it carries to `into`.
fn receive(listener: TcpListener, into: &Path) -> Result<u64, String> {
    let (mut conn, _) = listener.accept().map_err(|e| format!("accept the archive: {e}"))?;
    conn.set_read_timeout(Some(TRANSFER_TIMEOUT)).map_err(|e| e.to_string())?;
    let mut file = std::fs::File::create(into).map_err(|e| format!("create {}: {e}", into.display()))?;
    let n = std::io::copy(&mut conn, &mut file).map_err(|e| format!("receive the archive: {e}"))?;
    file.sync_all().map_err(|e| format!("write {}: {e}", into.display()))?;
    Ok(n)
}

/// Send `from` to `dest`, from namespace `netns` when given (the packet link's side A).
fn send(netns: Option<String>, dest: SocketAddr, from: &Path) -> Result<u64, String> {
    let connect = move || TcpStream::connect_timeout(&dest, Duration::from_secs(30));
    let conn = match netns {
        Some(ns) => away_link::packet::run_in_netns(&ns, connect).and_then(|r| r),
        None => connect(),
    };
    let mut conn = conn.map_err(|e| format!("connect to {dest}: {e}"))?;
    conn.set_write_timeout(Some(TRANSFER_TIMEOUT)).map_err(|e| e.to_string())?;
    let mut file = std::fs::File::open(from).map_err(|e| format!("open {}: {e}", from.display()))?;
    let n = std::io::copy(&mut file, &mut conn).map_err(|e| format!("send the archive: {e}"))?;
    conn.shutdown(std::net::Shutdown::Write).map_err(|e| format!("send the archive: {e}"))?;
    // the receiver closes after writing the file; its EOF ends the transfer here
    let _ = conn.read(&mut [0u8; 1]);
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_archive_arrives_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (from, into) = (dir.path().join("out"), dir.path().join("in"));
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&from, &data).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let target = into.clone();
        let rx = std::thread::spawn(move || receive(listener, &target));
        assert_eq!(send(None, addr, &from).unwrap(), data.len() as u64);
        assert_eq!(rx.join().unwrap().unwrap(), data.len() as u64);
        assert_eq!(std::fs::read(&into).unwrap(), data);
        let e = send(None, addr, &dir.path().join("missing")).unwrap_err();
        assert!(e.contains("connect to") || e.contains("missing"), "{e}");
    }
}
