//! The one `Runtime` trait every backend implements (containerd, Docker, QEMU), and the
//! requests and errors it speaks. Migration drives `checkpoint` and `restore`.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use away_model::{RuntimeInfo, RuntimeKind, WorkloadSpec, WorkloadStatus};
use futures_util::Stream;
use serde::{Deserialize, Serialize};

use crate::store::ResolvedImage;

/// Everything needed to start a workload.
#[derive(Debug, Clone)]
pub struct RunRequest {
    pub spec: WorkloadSpec,
    pub image: ResolvedImage,
}

/// Options of a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct CheckpointOptions {
    /// Directory the checkpoint is written into (created, owner-only).
    pub dir: PathBuf,
    /// Keep the workload running after the checkpoint (default: it stops, as in a move).
    pub leave_running: bool,
    /// The move's volume pre-copy ([`Runtime::precopy_volumes`]): the checkpoint carries
    /// only the volume files changed since (`crate::volume`); None: whole volumes.
    pub volumes_sent: Option<std::sync::Arc<crate::volume::VolumesSent>>,
    /// With `leave_running` false: keep the stopped task's record for
    /// [`Runtime::release_stopped`], which a move runs while the checkpoint travels
    /// (deleting it took 80-170 ms of a staged move's pause).
    pub release_later: bool,
}

/// A checkpoint on disk: CRIU images (containers) or a QEMU migration stream (VMs),
/// plus what is needed to restore it elsewhere.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointArchive {
    pub workload: String,
    pub runtime: RuntimeKind,
    pub dir: PathBuf,
    /// Bytes on disk under `dir`.
    pub bytes: u64,
    pub spec: WorkloadSpec,
    /// Image reference the workload runs from (the target needs the same image).
    pub image: String,
}

/// What ends a lazy dump as failed: a request cut short on CRIU's page server. CRIU
/// then resumes the frozen process (a plain close would read as "every page moved" and
/// end it).
pub const CRIU_PAGE_SERVER_ABORT: [u8; 3] = [0xff; 3];

/// Options of a lazy (post-copy) checkpoint.
#[derive(Debug, Clone)]
pub struct LazyCheckpointOptions {
    /// Directory the non-memory images are written into (created, owner-only).
    pub dir: PathBuf,
    /// Port CRIU's page server listens on, in the container's network namespace (on
    /// all its addresses: runc's CRIU ignores the address), until every page moved.
    pub page_server_port: u16,
    /// As [`CheckpointOptions::volumes_sent`].
    pub volumes_sent: Option<std::sync::Arc<crate::volume::VolumesSent>>,
}

/// A lazy checkpoint in progress: the process is frozen, its non-memory state is in
/// `archive.dir`, and CRIU serves its memory on the page server port until the
/// restored copy has fetched every page.
pub struct LazyDump {
    pub archive: CheckpointArchive,
    /// The process driving the dump (exits when the last page has moved).
    pub child: tokio::process::Child,
    /// CRIU's log of the dump.
    pub log: PathBuf,
    /// Where CRIU's page server listens, inside `netns`.
    pub page_server: std::net::SocketAddr,
    /// The network namespace CRIU runs in (the container's: CRIU must not see the
    /// container's network as foreign, or it dumps and locks that whole namespace).
    pub netns: PathBuf,
}

impl LazyDump {
    /// Connect to CRIU's page server from any network namespace (a socket belongs to
    /// the namespace it was made in, so it is made on a thread that entered `netns`).
    pub fn page_server_connector(&self) -> impl FnOnce() -> std::io::Result<std::net::TcpStream> + Send + 'static {
        let (netns, addr) = (self.netns.clone(), self.page_server);
        move || {
            std::thread::spawn(move || {
                // setns only moves this thread, which ends right after making the socket
                crate::host::process::enter_network_namespace(&std::fs::File::open(&netns)?)?;
                std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
            })
            .join()
            .map_err(|_| std::io::Error::other("page server connector thread panicked"))?
        }
    }

    /// Give up before any page moved: CRIU takes a truncated request on its page server
    /// as a failed transfer and resumes the process (a plain close would read as
    /// success and end it). Returns once runc has exited.
    pub async fn abort(self) {
        let connect = self.page_server_connector();
        let poisoned = tokio::task::spawn_blocking(move || {
            let s = connect()?;
            std::io::Write::write_all(&mut &s, &CRIU_PAGE_SERVER_ABORT)?;
            s.shutdown(std::net::Shutdown::Write)
        })
        .await;
        if let Ok(Err(e)) | Err(e) = poisoned.map_err(|e| std::io::Error::other(e.to_string())) {
            tracing::warn!(workload = %self.archive.workload, "cannot reach CRIU's page server to end the dump: {e}");
        }
        // the dump fails, as asked
        let _ = self.finish().await;
    }

    /// Wait for the end of the lazy phase. Ok: every page moved and the source process
    /// is gone. Err: the transfer failed and CRIU resumed the source process.
    pub async fn finish(mut self) -> Result<(), RuntimeError> {
        let status = self.child.wait().await.map_err(|e| RuntimeError::io("wait for the lazy checkpoint (runc)", e))?;
        if status.success() {
            return Ok(());
        }
        Err(RuntimeError::Failed {
            runtime: self.archive.runtime,
            op: "serve lazy pages",
            name: self.archive.workload.clone(),
            message: format!("runc checkpoint exited with {status}{}", criu_log_errors(&self.log)),
        })
    }
}

/// Longest a lazy dump may take before its page server is up (it writes everything
/// but memory: small).
const LAZY_DUMP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// The descriptor runc's CRIU reports on (`--status-fd`) in the child of
/// [`spawn_lazy_dump`].
pub(crate) const LAZY_STATUS_FD: i32 = 3;

/// Run `runc` (a lazy checkpoint, `status_fd` [`LAZY_STATUS_FD`]) in network namespace
/// `netns` (the container's: CRIU must not see its network as foreign), its stderr in
/// `dir/runc.log`, and wait until CRIU says the dump is on disk and its page server
/// listens. Returns the runc process, which ends with the lazy phase. Containerd's and
/// Docker's containers alike: runc runs against the state their shim keeps.
pub(crate) async fn spawn_lazy_dump(
    kind: away_model::RuntimeKind,
    name: &str,
    runc: &crate::host::criu_args::RuncCheckpoint,
    netns: &std::path::Path,
    dir: &std::path::Path,
) -> Result<tokio::process::Child, RuntimeError> {
    use std::os::fd::AsFd;
    let failed =
        |message: String| RuntimeError::Failed { runtime: kind, op: "checkpoint lazily", name: name.into(), message };
    let dump_log = runc.work_path.as_deref().unwrap_or(dir).join("dump.log");
    let (status_read, status_write) =
        std::io::pipe().map_err(|e| RuntimeError::io("create the runc status pipe", e))?;
    let mut cmd = tokio::process::Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display()))
        .arg(crate::host::runtime_bin("runc"))
        .args(runc.args())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("runc.log")).map_err(|e| RuntimeError::io("create runc.log", e))?);
    crate::host::process::inherit_fd_as(cmd.as_std_mut(), status_write.as_fd(), LAZY_STATUS_FD);
    let mut child = cmd.spawn().map_err(|e| failed(format!("cannot run runc: {e}")))?;
    drop(status_write);
    // CRIU writes one byte to the status pipe when the dump is on disk and the page
    // server listens; EOF first means runc gave up.
    let reader = tokio::task::spawn_blocking(move || {
        let mut byte = [0u8; 1];
        std::io::Read::read(&mut { status_read }, &mut byte)
    });
    let ready = match tokio::time::timeout(LAZY_DUMP_TIMEOUT, reader).await {
        Ok(r) => r.map_err(|e| failed(format!("status reader: {e}")))?,
        Err(_) => {
            // the reader ends with runc (its end of the pipe closes)
            let _ = child.kill().await;
            return Err(failed(format!(
                "the dump did not finish within {} s{}",
                LAZY_DUMP_TIMEOUT.as_secs(),
                criu_log_errors(&dump_log)
            )));
        }
    };
    if !matches!(ready, Ok(1)) {
        let status = child.wait().await.map_err(|e| RuntimeError::io("wait for runc", e))?;
        let runc_log = std::fs::read_to_string(dir.join("runc.log")).unwrap_or_default();
        return Err(failed(format!(
            "runc checkpoint exited with {status} before the page server was up: {}{}",
            runc_log.trim(),
            criu_log_errors(&dump_log)
        )));
    }
    Ok(child)
}

/// Sub-directory of a checkpoint directory that CRIU uses as its work directory (logs,
/// and the lazy-pages daemon's socket on a lazy restore).
pub const CRIU_WORK_DIR: &str = "work";

/// Restore a checkpoint as a new workload (possibly on another node).
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    pub archive: CheckpointArchive,
    pub image: ResolvedImage,
    /// An overlay workload's TCP connections are restored closed (CRIU's `tcp-close`)
    /// instead of established; without an overlay this changes nothing.
    pub close_connections: bool,
}

/// Resolves when the CRIU lazy-pages daemon a lazy restore needs is up; Err (why): it
/// did not start, and the restore undoes what it made and fails. The restore prepares
/// the container meanwhile and waits for it only before CRIU runs.
pub type LazyPagesUp = Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;

/// Chunks of a workload's combined stdout/stderr.
pub type LogStream = Pin<Box<dyn Stream<Item = Result<Vec<u8>, RuntimeError>> + Send>>;

/// Errors of every backend. Messages are lower-case and name the workload, image or
/// daemon involved.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{runtime} is unavailable: {reason}")]
    Unavailable { runtime: RuntimeKind, reason: String },
    #[error("no workload named {name:?} on {runtime}")]
    NotFound { runtime: RuntimeKind, name: String },
    #[error("no workload named {name:?} on this node (see `away ps`)")]
    NoSuchWorkload { name: String },
    #[error("a workload named {name:?} already exists on {runtime}")]
    AlreadyExists { runtime: RuntimeKind, name: String },
    #[error("image {reference:?}: {reason}")]
    Image { reference: String, reason: String },
    /// The request cannot be satisfied here (e.g. more memory than the host has).
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("{runtime} cannot {op}: {reason}")]
    Unsupported { runtime: RuntimeKind, op: &'static str, reason: String },
    #[error("{runtime}: {op} {name:?} failed: {message}")]
    Failed { runtime: RuntimeKind, op: &'static str, name: String, message: String },
    #[error(transparent)]
    NoRuntime(#[from] crate::fallback::NoRuntime),
    /// A file of a received checkpoint that is not where it must be (a link, outside).
    #[error(transparent)]
    Beneath(Box<crate::host::beneath::BeneathError>),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<crate::host::beneath::BeneathError> for RuntimeError {
    fn from(e: crate::host::beneath::BeneathError) -> Self {
        // boxed: the variant would make every `Result<_, RuntimeError>` larger
        RuntimeError::Beneath(Box::new(e))
    }
}

impl RuntimeError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        RuntimeError::Io { context: context.into(), source }
    }
}

/// A place workloads run. Implementations must leave nothing behind when `run` or
/// `restore` fails (no stray container, task, snapshot or process).
#[async_trait]
pub trait Runtime: Send + Sync {
    fn kind(&self) -> RuntimeKind;

    /// Ask the daemon (or binary) whether it can run workloads now.
    async fn health(&self) -> RuntimeInfo;

    /// Create and start a workload from its spec and resolved image.
    async fn run(&self, req: &RunRequest) -> Result<WorkloadStatus, RuntimeError>;

    /// Stop the workload: SIGTERM (or ACPI powerdown), then kill after `grace`.
    async fn stop(&self, name: &str, grace: Duration) -> Result<(), RuntimeError>;

    /// Remove the workload and everything it holds; kills it first if it still runs.
    async fn remove(&self, name: &str) -> Result<(), RuntimeError>;

    async fn status(&self, name: &str) -> Result<WorkloadStatus, RuntimeError>;

    /// Every workload away created on this runtime.
    async fn list(&self) -> Result<Vec<WorkloadStatus>, RuntimeError>;

    /// The workload's output so far; with `follow`, then new output until it stops.
    async fn logs(&self, name: &str, follow: bool) -> Result<LogStream, RuntimeError>;

    /// Write a checkpoint of the running workload.
    async fn checkpoint(&self, name: &str, opts: &CheckpointOptions) -> Result<CheckpointArchive, RuntimeError>;

    /// Start a workload from a checkpoint; it continues where the checkpoint left it.
    async fn restore(&self, req: &RestoreRequest) -> Result<WorkloadStatus, RuntimeError>;

    /// Get `image` ready for a coming restore (a move announced to this node), so that
    /// the restore does not import it inside the move's pause. The default: nothing to
    /// prepare.
    async fn prepare_image(&self, _image: &ResolvedImage) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// After a checkpoint with [`CheckpointOptions::release_later`]: let go of what the
    /// stopped workload still holds in the runtime (containerd's exited task and its
    /// shim). The default has nothing to release.
    async fn release_stopped(&self, _name: &str) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// After a checkpoint for a move: let the stopped workload's record give up its name
    /// (so that a target sharing this runtime can restore under it) while it is kept
    /// until the move is confirmed. Returns the record's new name, if it got one.
    /// Runtimes whose names are per node need nothing: the default keeps the name.
    async fn step_aside(&self, _name: &str) -> Result<Option<String>, RuntimeError> {
        Ok(None)
    }

    /// Undo [`Runtime::step_aside`]: the record named `aside` takes `name` back (a
    /// streamed move that failed leaves the source running under its temporary name).
    async fn step_back(&self, _aside: &str, _name: &str) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// A move's volume pre-copy, while the workload runs: the files of its volumes that
    /// are not being written, copied into `out` (`volumes/<volume>/`), with what each was
    /// when read (`crate::volume::VolumeRoot::precopy`). None: the workload has no volumes
    /// (the default: runtimes without volumes).
    async fn precopy_volumes(
        &self,
        _name: &str,
        _out: &std::path::Path,
    ) -> Result<Option<crate::volume::VolumesSent>, RuntimeError> {
        Ok(None)
    }

    /// Freeze the workload and dump everything but its memory, which CRIU then serves
    /// from a page server (post-copy). Only runtimes that can drive runc and CRIU
    /// directly can do this.
    async fn checkpoint_lazy(&self, _name: &str, _opts: &LazyCheckpointOptions) -> Result<LazyDump, RuntimeError> {
        Err(RuntimeError::Unsupported {
            runtime: self.kind(),
            op: "checkpoint lazily",
            reason: "it exposes no CRIU page server; use stop-and-copy".into(),
        })
    }

    /// Restore a lazy checkpoint: the workload starts at once and its memory arrives
    /// through the CRIU lazy-pages daemon, which the caller starts on the checkpoint's
    /// work directory ([`CRIU_WORK_DIR`]) and reports up through `pages_up`.
    async fn restore_lazy(
        &self,
        _req: &RestoreRequest,
        _pages_up: LazyPagesUp,
    ) -> Result<WorkloadStatus, RuntimeError> {
        Err(RuntimeError::Unsupported {
            runtime: self.kind(),
            op: "restore lazily",
            reason: "it cannot hand CRIU a lazy-pages restore; use stop-and-copy".into(),
        })
    }
}

/// Refuse a workload that asks for more memory than the host has, before anything is
/// created.
pub fn check_fits_host(spec: &WorkloadSpec) -> Result<(), RuntimeError> {
    let host = crate::host::mem_total_bytes();
    if host > 0 && spec.resources.memory.bytes() > host {
        return Err(RuntimeError::Invalid {
            field: "resources.memory".into(),
            reason: format!("{} is more than this node's {} of RAM", spec.resources.memory, away_model::ByteSize(host)),
        });
    }
    Ok(())
}

/// Bytes of the regular files under `path` (recursively; a file's own size; 0 when
/// unreadable): the size of a checkpoint as the report and the archive list give it.
pub fn dir_bytes(path: &std::path::Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(path) else {
        return std::fs::metadata(path).map(|m| if m.is_file() { m.len() } else { 0 }).unwrap_or(0);
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

/// Create `dir` (and parents) readable by its owner only: checkpoints hold process memory.
pub fn create_private_dir(dir: &std::path::Path) -> Result<(), RuntimeError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| RuntimeError::io(format!("create {}", dir.display()), e))?;
    // an existing dir keeps its mode with create(): set it explicitly
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| RuntimeError::io(format!("chmod 0700 {}", dir.display()), e))
}

/// Asked by a following log reader: is the workload still running?
pub type StillRunning = Box<dyn Fn() -> Pin<Box<dyn std::future::Future<Output = bool> + Send>> + Send + Sync>;

/// Stream a log file: its content so far, then (while `still_running` says so) what is
/// appended, polling every 200 ms. Used by backends whose logs are plain files.
pub fn tail_file(path: PathBuf, still_running: StillRunning) -> LogStream {
    use tokio::io::AsyncReadExt;
    let stream = futures_util::stream::unfold(
        (None::<tokio::fs::File>, path, still_running, false),
        |(file, path, still_running, done)| async move {
            if done {
                return None;
            }
            let mut file = match file {
                Some(f) => f,
                None => match tokio::fs::File::open(&path).await {
                    Ok(f) => f,
                    // no output yet
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        if still_running().await {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            return Some((Ok(Vec::new()), (None, path, still_running, false)));
                        }
                        return None;
                    }
                    Err(e) => {
                        return Some((
                            Err(RuntimeError::io(format!("open {}", path.display()), e)),
                            (None, path, still_running, true),
                        ))
                    }
                },
            };
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match file.read(&mut buf).await {
                    Ok(0) => {
                        if !still_running().await {
                            return None;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Ok(n) => {
                        buf.truncate(n);
                        return Some((Ok(buf), (Some(file), path, still_running, false)));
                    }
                    Err(e) => {
                        return Some((
                            Err(RuntimeError::io(format!("read {}", path.display()), e)),
                            (Some(file), path, still_running, true),
                        ))
                    }
                }
            }
        },
    );
    Box::pin(stream)
}

/// When CRIU froze the workload, from the log of its dump: each line carries the
/// seconds since CRIU started and the file's modification time is when the last one
/// was written, so the freeze lies (last line - freeze line) before that. The pause
/// starts there, not when runc was started: runc's and CRIU's start-up (50-80 ms) pass
/// while the workload still runs. None when the log has no freeze (or seizing) line.
pub fn criu_frozen_at(log: &std::path::Path) -> Option<std::time::Instant> {
    let (now, wall_now) = (std::time::Instant::now(), std::time::SystemTime::now());
    let written = std::fs::metadata(log).and_then(|m| m.modified()).ok()?;
    let text = std::fs::read_to_string(log).ok()?;
    let frozen_before_last = frozen_before_last_line(&text)?;
    let since_written = wall_now.duration_since(written).unwrap_or_default();
    now.checked_sub(since_written + frozen_before_last)
}

/// How long before a CRIU log's last line its freeze began: the cgroup freezer's, or
/// without one the first task seized (CRIU stops the tasks as it seizes them).
fn frozen_before_last_line(log: &str) -> Option<std::time::Duration> {
    let stamp = |l: &str| l.strip_prefix('(')?.split_once(')')?.0.trim().parse::<f64>().ok();
    let frozen = log
        .lines()
        .find(|l| l.contains("freezing cgroup"))
        .or_else(|| log.lines().find(|l| l.contains("Seized task")))
        .and_then(stamp)?;
    let last = log.lines().rev().find_map(stamp)?;
    Some(std::time::Duration::from_secs_f64((last - frozen).max(0.0)))
}

/// How long a CRIU run took, from its log: the stamp of its last line (CRIU stamps each
/// line with the time since it started). None for a log without stamps.
pub fn criu_log_span(log: &str) -> Option<std::time::Duration> {
    let stamp = |l: &str| l.strip_prefix('(')?.split_once(')')?.0.trim().parse::<f64>().ok();
    log.lines().rev().find_map(stamp).map(|s| std::time::Duration::from_secs_f64(s.max(0.0)))
}

/// A call through containerd's shim that ran runc, which ran CRIU (a checkpoint, or a
/// restore's task start), as two steps of the move's report: runc's part (`shim-runc`)
/// and CRIU's own time from its log at `criu_log` (`criu_step`), within `call`.
pub(crate) fn record_criu_call(call: std::time::Duration, criu_log: &Path, criu_step: &str) {
    let criu = std::fs::read_to_string(criu_log).ok().and_then(|l| criu_log_span(&l)).unwrap_or_default().min(call);
    crate::steps::record("shim-runc", call - criu);
    crate::steps::record(criu_step, criu);
}

/// The error lines of a CRIU log, to append to a failure message: runc's own error
/// only says "criu failed", the reason is in the log.
pub fn criu_log_errors(log: &std::path::Path) -> String {
    let Ok(text) = std::fs::read_to_string(log) else { return String::new() };
    let errors: Vec<&str> = text.lines().filter(|l| l.contains("Error") || l.contains("error")).take(5).collect();
    if errors.is_empty() {
        return String::new();
    }
    format!(" (criu log {}: {})", log.display(), errors.join(" | "))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_freeze_is_read_from_criu_log() {
        let log = "(00.000000) CRIU run id = x\n\
                   (00.035336) freezing cgroup /sys/fs/cgroup/freezer/away/w: 100 x 100ms attempts\n\
                   (00.035757) Seized task 2069, state 1\n\
                   pie: 1: __sent ack msg: 2 2 0\n\
                   (00.114655) \tRPC\n";
        let d = super::frozen_before_last_line(log).unwrap();
        assert_eq!(d.as_micros(), 79_319);
        let seized_only = "(00.010000) Seized task 7, state 1\n(00.050000) Dumping finished successfully\n";
        assert_eq!(super::frozen_before_last_line(seized_only).unwrap().as_millis(), 40);
        assert!(super::frozen_before_last_line("(00.1) nothing here\n").is_none());
    }

    #[test]
    fn a_criu_run_lasts_until_its_last_stamp() {
        let log =
            "(00.000000) Version: 4.2\n(00.120500) Forking task\npie: 1: no stamp\n(00.350250) Restore finished\n";
        assert_eq!(super::criu_log_span(log).unwrap().as_micros(), 350_250);
        assert!(super::criu_log_span("no stamps\n").is_none());
    }
}
