//! The source's side of a move on disk, and what a restarted source does with it
//! (docs/reliability.md, "The source's journal").
//!
//! A staged container move stops the workload at its checkpoint; from then until the
//! commit's answer the workload runs nowhere but (perhaps) as the target's prepared copy.
//! A source killed in that window used to leave its stopped container and checkpoint for
//! nobody. Now the move's engine writes each step to a [`MoveJournal`] (the agent keeps it
//! in its SQLite store, `synchronous=FULL`) before it acts on it:
//!
//! `checkpointing` → `sent` → `committing` → `done` | `aborted`
//!
//! and [`recover`] finishes a move a previous run left unended: it asks the target what
//! became of the move (the idempotent commit and `GET /v1/transfers/{id}`), resumes the
//! workload from its checkpoint when the target aborted the move (or never restored it,
//! or its lease ran out with no commit delivered), removes its own copy when the target
//! committed, and while the target cannot be reached after a commit that may have
//! arrived, keeps the checkpoint and asks again: it never starts a second copy.

use std::path::PathBuf;
use std::time::Duration;

use away_model::{ErrorChain, WorkloadState};
use away_runtime::{CheckpointArchive, LocalNode};
use serde::{Deserialize, Serialize};

use crate::archive::ArchiveStore;
use crate::target::{CommitOutcome, CommitPolicy, MoveState, TargetNode};

/// Where an outgoing move stands on its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutgoingState {
    /// Announced to the target; the checkpoint is being taken (the workload may be stopped
    /// already), the payload may be on its way. The target has no answer for it yet.
    Checkpointing,
    /// The target answered "restored, prepared" (at `at_ms`, lease `lease_ms`); no commit
    /// has left yet.
    Sent,
    /// A commit has left (it may have arrived): only the target's word ends the move now.
    Committing,
    /// Committed, the source's copy removed.
    Done,
    /// The source runs its workload again (or never stopped it).
    Aborted,
}

impl OutgoingState {
    pub fn as_str(self) -> &'static str {
        match self {
            OutgoingState::Checkpointing => "checkpointing",
            OutgoingState::Sent => "sent",
            OutgoingState::Committing => "committing",
            OutgoingState::Done => "done",
            OutgoingState::Aborted => "aborted",
        }
    }

    /// Done or aborted: nothing is left to finish.
    pub fn ended(self) -> bool {
        matches!(self, OutgoingState::Done | OutgoingState::Aborted)
    }
}

/// What moves: a container (its checkpoint), or a VM by QEMU live migration (QEMU to
/// QEMU: the source's QEMU goes on migrating when the process driving it dies).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MoveKind {
    #[default]
    Container,
    /// Pre-copy: the destination is held paused until the commit, so the source may go back.
    VmPrecopy,
    /// Post-copy enabled: the destination runs from the switchover, the source never goes back.
    VmPostcopy,
}

/// One outgoing move as the source records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutgoingMove {
    pub transfer_id: String,
    pub workload: String,
    /// Older journals have no kind: their moves were containers'.
    #[serde(default)]
    pub kind: MoveKind,
    /// The target's node name.
    pub target_node: String,
    pub state: OutgoingState,
    /// The move's payload directory (the checkpoint under it).
    pub payload: PathBuf,
    /// The checkpoint, once taken (what a resume restores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<CheckpointArchive>,
    /// The stopped source container's temporary name, if it stepped aside.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_aside: Option<String>,
    /// The lease the target gave in its "restored" answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
    /// When this state was written (Unix ms).
    pub at_ms: u64,
    /// A lazy or streamed move: the memory goes through CRIU's page server, so the
    /// checkpoint on disk is not complete and cannot be resumed from; CRIU resumes the
    /// source itself when its page stream breaks ([`recover`] asks the target and looks
    /// at the source's process instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_server: Option<PageServer>,
}

/// Where a lazy dump's CRIU serves pages: its address inside the workload's network
/// namespace (`netns`, a path). A restarted source ends a dump whose page server still
/// waits for its first connection (the source died before the target asked for a page)
/// with a request cut short: CRIU then resumes the frozen workload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PageServer {
    pub netns: PathBuf,
    pub addr: std::net::SocketAddr,
}

impl OutgoingMove {
    /// A container move about to stop its workload (`checkpointing`, nothing taken yet),
    /// stamped now.
    pub fn checkpointing(transfer_id: &str, workload: &str, target_node: &str, payload: PathBuf) -> OutgoingMove {
        OutgoingMove {
            transfer_id: transfer_id.into(),
            workload: workload.into(),
            kind: MoveKind::Container,
            target_node: target_node.into(),
            state: OutgoingState::Checkpointing,
            payload,
            archive: None,
            set_aside: None,
            lease_ms: None,
            at_ms: now_ms(),
            page_server: None,
        }
    }

    /// The same move in `state`, stamped now.
    pub fn with_state(&self, state: OutgoingState) -> OutgoingMove {
        OutgoingMove { state, at_ms: now_ms(), ..self.clone() }
    }
}

/// Where a move's steps are written before they are taken. A failed write before the
/// workload stops fails the move; later ones are logged (the move goes on: stopping in
/// the middle would leave the workload stopped).
pub trait MoveJournal: Send + Sync + std::fmt::Debug {
    fn record(&self, m: &OutgoingMove) -> Result<(), String>;
}

/// Write `m`, logging a failure (after the workload stopped, nothing better is left).
pub fn record_logged(journal: Option<&dyn MoveJournal>, m: &OutgoingMove) {
    if let Some(j) = journal {
        if let Err(e) = j.record(m) {
            tracing::error!(transfer = %m.transfer_id, state = m.state.as_str(), "cannot journal the move (a restart would not finish it): {e}");
        }
    }
}

/// Now, in Unix milliseconds (what journal entries are stamped with).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The lease assumed when the target gave none (the move was cut before its answer):
/// the agent's default lease and removal grace. Counted from the restart, it ends after
/// the target's own, which was armed before the source died.
pub const ASSUMED_LEASE: Duration = Duration::from_secs(35);

/// How a recovered move ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovered {
    /// The target committed: the source's copy and checkpoint are gone.
    Committed,
    /// The workload runs on the source again (why).
    Resumed(String),
    /// The workload never stopped (killed before its checkpoint): nothing to undo.
    NeverStopped,
    /// The source's copy is gone and the target does not hold the workload (why): a VM
    /// removed by hand while its move was open.
    Gone(String),
}

/// What the restarted source does once the target answered, a pure decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextStep {
    /// Commit (again): the target holds its copy as prepared.
    Commit,
    /// Resume from the checkpoint (why).
    Resume(String),
    /// Have the target remove whatever it made of the move, then resume.
    WithdrawThenResume,
    /// Remove the source's copy: the target committed.
    CleanUp,
}

/// The first step for a move left in `state`, given the target's answer to "what became
/// of it?" (`Ok(None)`: the target does not know it; `Err`: no answer).
pub fn first_step(state: OutgoingState, answer: Result<Option<MoveState>, ()>) -> NextStep {
    match answer {
        Ok(Some(MoveState::Committed)) => NextStep::CleanUp,
        Ok(Some(MoveState::Aborted)) => NextStep::Resume("the target aborted the move".into()),
        Ok(Some(MoveState::Prepared)) => NextStep::Commit,
        // unknown before any answer: the payload never arrived whole (or arrives in this
        // instant): take it back first; unknown after an answer: the target lost the move,
        // it cannot have committed it
        Ok(None) if state == OutgoingState::Checkpointing => NextStep::WithdrawThenResume,
        Ok(None) => NextStep::Resume("the target does not know the move".into()),
        // no answer: the commit protocol decides (commit while the lease may run, resume
        // only once it ran out with no commit delivered, never after a commit that may
        // have arrived)
        Err(()) => NextStep::Commit,
    }
}

/// Finish move `m`, which a previous run of this source left unended, against its
/// target. Each step is journaled. Retries without end while the target cannot give a
/// definite answer after a commit that may have reached it (every `retry`).
pub async fn recover(
    node: &LocalNode,
    archives: &ArchiveStore,
    target: &dyn TargetNode,
    m: OutgoingMove,
    journal: &dyn MoveJournal,
    retry: Duration,
) -> Result<Recovered, String> {
    remove_send_spool(&m);
    if m.page_server.is_some() {
        return recover_paged(node, archives, target, m, journal, retry).await;
    }
    let name = m.workload.clone();
    let record = |s: OutgoingState| record_logged(Some(journal), &m.with_state(s));
    // killed before the checkpoint stopped it: the workload runs as it did
    if m.state == OutgoingState::Checkpointing && runs(node, &name).await {
        if let Err(e) = target.abort(&m.transfer_id).await {
            tracing::info!(transfer = %m.transfer_id, "the target had nothing of the move to remove: {e}");
        }
        if let Err(e) = archives.discard(&m.payload) {
            tracing::warn!("cannot remove the unused payload {}: {e}", m.payload.display());
        }
        record(OutgoingState::Aborted);
        return Ok(Recovered::NeverStopped);
    }
    let Some(archive) = m.archive.clone() else {
        return Err(format!(
            "{name} is stopped and move {} has no complete checkpoint in {}: nothing to resume from",
            m.transfer_id,
            m.payload.display()
        ));
    };
    let answer = target.move_state(&m.transfer_id).await;
    if let Err(e) = &answer {
        tracing::warn!(transfer = %m.transfer_id, "cannot ask the target what became of the move: {e}");
    }
    let step = first_step(m.state, answer.map(|r| r.map(|r| r.state)).map_err(|_| ()));
    tracing::info!(workload = %name, transfer = %m.transfer_id, state = m.state.as_str(), ?step, "finishing a move the source's last run left open");
    let why = match step {
        NextStep::CleanUp => return clean_up(node, archives, &m, &archive, journal).await,
        NextStep::Resume(why) => why,
        NextStep::WithdrawThenResume => {
            if let Err(e) = target.abort(&m.transfer_id).await {
                tracing::info!(transfer = %m.transfer_id, "nothing of the move to remove on the target: {e}");
            }
            "the target never restored the move".into()
        }
        NextStep::Commit => match commit_after_restart(target, &m, journal, retry).await {
            Ok(()) => return clean_up(node, archives, &m, &archive, journal).await,
            Err(why) => why,
        },
    };
    resume(node, archives, &m, &archive, journal, why).await
}

/// Commit move `m`, left open by a previous run of its source, by the commit protocol:
/// `Ok` once the target committed, `Err(why)` once it aborted (or its lease ran out with
/// no commit delivered). While the target gives no definite answer after a commit that
/// may have arrived, it asks again every `retry`, without end: never a second copy.
pub(crate) async fn commit_after_restart(
    target: &dyn TargetNode,
    m: &OutgoingMove,
    journal: &dyn MoveJournal,
    retry: Duration,
) -> Result<(), String> {
    // the lease: the one the target gave, from its answer; cut before the answer, an
    // assumed one from now (the target armed its own before this start)
    let (lease, from_ms) = match (m.state, m.lease_ms) {
        (OutgoingState::Checkpointing, _) | (_, None) => (ASSUMED_LEASE, now_ms()),
        (_, Some(l)) => (Duration::from_millis(l), m.at_ms),
    };
    let answered_at = tokio::time::Instant::now()
        .checked_sub(Duration::from_millis(now_ms().saturating_sub(from_ms)))
        .unwrap_or_else(tokio::time::Instant::now);
    let mut commit_sent = m.state == OutgoingState::Committing;
    loop {
        record_logged(Some(journal), &m.with_state(OutgoingState::Committing));
        let policy = CommitPolicy { lease, retry: Duration::from_secs(1), give_up: retry, commit_sent };
        match crate::target::commit_move(target, &m.transfer_id, answered_at, &policy).await {
            CommitOutcome::Committed => return Ok(()),
            CommitOutcome::Aborted(why) => return Err(why),
            CommitOutcome::InDoubt(why) => {
                // never resume on time alone after a commit that may have arrived: the
                // source's copy stays, the question goes on
                tracing::warn!(workload = %m.workload, transfer = %m.transfer_id, "move still in doubt, asking again: {why}");
                commit_sent = true;
            }
        }
    }
}

/// The tar the source's last run packed the move's payload into for sending, left behind
/// when it was killed while it sent (beside the payload, named after the move).
fn remove_send_spool(m: &OutgoingMove) {
    let prefix = crate::transfer::send_spool_prefix(&m.transfer_id);
    let Some(dir) = m.payload.parent() else { return };
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            match std::fs::remove_file(e.path()) {
                Ok(()) => {
                    tracing::info!(transfer = %m.transfer_id, "removed the send spool {} the last run left", e.path().display())
                }
                Err(err) => {
                    tracing::warn!(transfer = %m.transfer_id, "cannot remove the send spool {}: {err}", e.path().display())
                }
            }
        }
    }
}

/// How often a restarted source asks again about a lazy or streamed move whose target
/// still holds its copy as prepared (its page daemon ends it once the source is gone).
const PAGED_POLL: Duration = Duration::from_secs(2);

/// Finish a lazy or streamed move a previous run left open. Its memory went through
/// CRIU's page server and the relay in the source's process: that process's death reset
/// the relay's connection, and CRIU resumed the source, unless the target already had
/// every page (its copy is then final, committed on the target, and CRIU ended the
/// source process). There is no complete checkpoint to resume from: the target's word
/// and the source's own process decide.
async fn recover_paged(
    node: &LocalNode,
    archives: &ArchiveStore,
    target: &dyn TargetNode,
    m: OutgoingMove,
    journal: &dyn MoveJournal,
    retry: Duration,
) -> Result<Recovered, String> {
    let name = m.workload.clone();
    if let Some(ps) = &m.page_server {
        // killed before the target's first page request: CRIU still waits, the
        // workload frozen; a request cut short makes it resume the workload
        if poke_page_server(ps).await {
            tracing::warn!(workload = %name, transfer = %m.transfer_id, "CRIU's page server still waited for the target: told it the move failed (the workload resumes)");
        }
    }
    let Some(archive) = m.archive.clone() else {
        // killed before CRIU's dump was done: it resumes the workload when it fails
        if !runs(node, &name).await {
            return Err(format!(
                "{name} does not run and move {} has no checkpoint: its dump may still be under way",
                m.transfer_id
            ));
        }
        if let Err(e) = target.abort(&m.transfer_id).await {
            tracing::info!(transfer = %m.transfer_id, "the target had nothing of the move to remove: {e}");
        }
        archives.keep_failed(&m.payload);
        record_logged(Some(journal), &m.with_state(OutgoingState::Aborted));
        return Ok(Recovered::NeverStopped);
    };
    let here = m.set_aside.clone().unwrap_or_else(|| name.clone());
    loop {
        let answer = target.move_state(&m.transfer_id).await;
        let state = match answer {
            Ok(r) => r.map(|r| r.state),
            Err(e) => {
                tracing::warn!(transfer = %m.transfer_id, "cannot ask the target what became of the move: {e}");
                tokio::time::sleep(retry).await;
                continue;
            }
        };
        tracing::info!(workload = %name, transfer = %m.transfer_id, state = m.state.as_str(), target_says = ?state, "finishing a lazy or streamed move the source's last run left open");
        match state {
            // every page arrived: the target's copy is the workload; the source's
            // container goes (stopped by CRIU; or resumed by it in the instant after the
            // last page, a second instance the target's word ends)
            Some(MoveState::Committed) => {
                if runs(node, &here).await {
                    tracing::warn!(workload = %name, transfer = %m.transfer_id, "CRIU resumed the source after the target had every page (the source died in that instant): the target's copy stays, the source's goes");
                }
                return clean_up(node, archives, &m, &archive, journal).await;
            }
            // a copy still held while its pages come: without the source its page
            // daemon fails and the copy goes
            Some(MoveState::Prepared) => tokio::time::sleep(PAGED_POLL).await,
            Some(MoveState::Aborted) | None => {
                if !runs(node, &here).await {
                    // CRIU takes a moment to resume after the reset
                    tokio::time::sleep(PAGED_POLL).await;
                }
                if !runs(node, &here).await {
                    return Err(format!(
                        "{name} does not run on the source and target {} has no copy of move {}: \
                         CRIU neither resumed it nor handed it over",
                        m.target_node, m.transfer_id
                    ));
                }
                if let Some(aside) = &m.set_aside {
                    let runtime = node.runtime(archive.runtime).map_err(|e| ErrorChain(&e).to_string())?;
                    if let Err(e) = runtime.step_back(aside, &name).await {
                        tracing::warn!(workload = %name, "the source keeps its temporary name {aside}: {e}", e = ErrorChain(&e));
                    }
                }
                archives.keep_failed(&m.payload);
                record_logged(Some(journal), &m.with_state(OutgoingState::Aborted));
                return Ok(Recovered::Resumed(format!(
                    "the page stream to {} broke with the source's last run: CRIU resumed {name} on the source, the target has no copy",
                    m.target_node
                )));
            }
        }
    }
}

/// Send CRIU's page server `ps` a request cut short, if it still takes a connection:
/// true when it did (CRIU then fails the dump and resumes the workload).
async fn poke_page_server(ps: &PageServer) -> bool {
    let (netns, addr) = (ps.netns.clone(), ps.addr);
    let poked = tokio::task::spawn_blocking(move || {
        std::thread::spawn(move || -> std::io::Result<()> {
            // setns moves only this thread, which ends right after. A namespace named
            // by a process that is gone (the dead agent's own, for overlay workloads) is
            // this node's: the one this process runs in
            if let Ok(ns) = std::fs::File::open(&netns) {
                away_runtime::host::process::enter_network_namespace(&ns)?;
            }
            let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            std::io::Write::write_all(&mut &s, &away_runtime::CRIU_PAGE_SERVER_ABORT)?;
            s.shutdown(std::net::Shutdown::Write)
        })
        .join()
        .map_err(|_| std::io::Error::other("page server poke panicked"))?
    })
    .await;
    matches!(poked, Ok(Ok(())))
}

async fn runs(node: &LocalNode, name: &str) -> bool {
    matches!(node.get(name).await, Ok((_, s)) if s.state == WorkloadState::Running)
}

async fn clean_up(
    node: &LocalNode,
    archives: &ArchiveStore,
    m: &OutgoingMove,
    archive: &CheckpointArchive,
    journal: &dyn MoveJournal,
) -> Result<Recovered, String> {
    let runtime = node.runtime(archive.runtime).map_err(|e| ErrorChain(&e).to_string())?;
    let leftover = m.set_aside.as_deref().unwrap_or(&m.workload);
    match runtime.remove(leftover).await {
        Ok(()) | Err(away_runtime::RuntimeError::NotFound { .. }) => {}
        Err(e) => {
            tracing::warn!(workload = %m.workload, "the source's stopped container {leftover} could not be removed: {e}", e = ErrorChain(&e))
        }
    }
    archives.discard(&m.payload).map_err(|e| ErrorChain(&e).to_string())?;
    record_logged(Some(journal), &m.with_state(OutgoingState::Done));
    Ok(Recovered::Committed)
}

async fn resume(
    node: &LocalNode,
    archives: &ArchiveStore,
    m: &OutgoingMove,
    archive: &CheckpointArchive,
    journal: &dyn MoveJournal,
    why: String,
) -> Result<Recovered, String> {
    let image = node.store.resolve(&archive.image).map_err(|e| ErrorChain(&e).to_string())?;
    let resumed = crate::container::resume_from(node, archive, &image, m.set_aside.as_deref()).await;
    archives.keep_failed(&m.payload);
    match resumed {
        Ok(st) => {
            record_logged(Some(journal), &m.with_state(OutgoingState::Aborted));
            Ok(Recovered::Resumed(format!("{why}; {} resumed on {} from its checkpoint", st.name, st.runtime)))
        }
        // the journal keeps the move open: the next start tries again
        Err(e) => Err(format!("{why}; {} could not be resumed: {e}", m.workload, e = ErrorChain(&e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restarted_source_resumes_only_on_the_targets_word_or_the_protocols() {
        use OutgoingState::*;
        for s in [Checkpointing, Sent, Committing] {
            assert_eq!(first_step(s, Ok(Some(MoveState::Committed))), NextStep::CleanUp);
            assert!(matches!(first_step(s, Ok(Some(MoveState::Aborted))), NextStep::Resume(_)));
            assert_eq!(first_step(s, Ok(Some(MoveState::Prepared))), NextStep::Commit);
            // no answer: never a resume from here (the commit protocol waits the lease
            // out, or for good after a commit that may have arrived)
            assert_eq!(first_step(s, Err(())), NextStep::Commit);
        }
        // unknown: before the target's answer, its copy may be about to start: take it back
        assert_eq!(first_step(Checkpointing, Ok(None)), NextStep::WithdrawThenResume);
        assert!(matches!(first_step(Sent, Ok(None)), NextStep::Resume(_)));
        assert!(matches!(first_step(Committing, Ok(None)), NextStep::Resume(_)));
        assert!(Done.ended() && Aborted.ended() && !Sent.ended());
    }
}
