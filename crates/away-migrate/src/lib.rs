//! Moving running workloads between nodes.
//!
//! * [`compat`]: may this workload move from this node to that one, and how (with why)?
//! * [`transfer`]: the one transfer protocol every migration path uses: a chunked,
//!   compressed, checksummed, resumable stream over TCP.
//! * [`container`]: container stop-and-copy through the runtimes' CRIU checkpoints.
//! * [`mode`]: stop-and-copy or lazy, per workload (`--mode auto`).
//! * [`lazy`]: the relay pair and target daemon of lazy (post-copy) container moves.
//! * [`vm`]: QEMU live migration between two QEMU processes.
//! * [`channel`]: mutual TLS between nodes' migration engines, peer names checked.
//! * [`journal`]: the source's record of its outgoing moves, and how a restarted source
//!   finishes them.
//! * [`archive`]: checkpoint archives on disk (private, pruned, kept after failures).

pub mod archive;
pub mod channel;
pub mod compat;
pub mod container;
pub mod estimate;
mod follow;
pub mod journal;
pub mod lazy;
pub mod mode;
pub mod target;
pub mod transfer;
pub mod vm;

/// Built with the `fault-injection` feature: the end-to-end tests' `AWAY_FAULT_*`
/// variables are read (never in a build users run).
pub const FAULT_INJECTION: bool = cfg!(feature = "fault-injection");

use std::path::PathBuf;

use away_model::{NodeInfo, Tier};
use away_runtime::{LocalNode, RuntimeError};

/// A request to abort a move under way (a broker's cancel): the move checks it at its
/// steps up to its commit point and, when set, undoes what it did (the source resumes,
/// the target's prepared copy is removed). Past the commit point it changes nothing.
#[derive(Debug, Clone, Default)]
pub struct Cancel(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Cancel {
    /// Ask for the abort (from any thread).
    pub fn cancel(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Errors of a migration. Messages name the workload, node or path involved.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("migration refused: {0}")]
    Incompatible(String),
    /// Cancelled before anything was stopped: the workload runs on the source as before.
    #[error("migration of {0} cancelled before it stopped the workload; it runs on the source as before")]
    Cancelled(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Transfer(#[from] transfer::TransferError),
    #[error("target {target}: {message}")]
    Target { target: String, message: String },
    /// The move failed and the source was (or could not be) resumed.
    #[error("migration failed: {why}; {detail}")]
    RolledBack { why: String, resumed: bool, detail: String },
    /// No definite answer from the target (silent after a commit that may have reached
    /// it, or still holding the move as prepared) within the commit wait: the source
    /// neither resumed nor removed its copy. Its checkpoint is kept; the target's agent
    /// answers `GET /v1/transfers/{transfer_id}` when it can be reached again.
    #[error("migration in doubt: {why}; the source stays stopped (resuming could make two instances), its checkpoint is kept in {}; ask the target about transfer {transfer_id} on {target}", checkpoint.display())]
    InDoubt { transfer_id: String, target: String, why: String, checkpoint: PathBuf },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// This node's fingerprint as a migration source reports it, with the host report it
/// came from (CRIU's features are there).
pub async fn local_node_info(node: &LocalNode, name: &str) -> (NodeInfo, away_runtime::host::HostReport) {
    let fp = away_runtime::host::fingerprint(&away_runtime::host::FingerprintOptions {
        paths: node.options.paths.clone(),
        ..Default::default()
    })
    .await;
    let mut info = fp.node_info(name, Tier::Cloud);
    info.runtimes = node.health().await;
    (info, fp)
}

/// Why a container moves by stop-and-copy and not by pre-copy rounds.
pub fn precopy_note(host: &away_runtime::host::HostReport) -> String {
    if host.criu.dirty_tracking {
        "pre-copy (CRIU pre-dump rounds) is not offered through containerd or Docker, so stop-and-copy".into()
    } else {
        "no pre-copy: this kernel has no soft-dirty page tracking (criu check --feature mem_dirty_track fails), so \
         CRIU cannot dump memory in rounds while the workload runs; stop-and-copy"
            .into()
    }
}
