//! A VM move whose source process died in the middle (docs/reliability.md, "The source's
//! journal"). The migration itself is QEMU to QEMU: the source's QEMU goes on without
//! the process that started it, completes, and waits paused (`postmigrate`) beside a
//! destination held paused for a commit nobody sends; the target's lease then removes
//! the destination, and before this the VM ran nowhere until resumed by hand.
//!
//! [`recover_source`] finishes such a move from the source's journal, on the same rules
//! as the move itself: it waits for QEMU's migration to end (a pre-copy still going after
//! the move's time limit, or one held before its switchover by a disk mirror nobody
//! completes, is cancelled and the source resumed), then asks the target what became of
//! the move: committed → the source's QEMU goes; held as prepared → commit (the
//! protocol's lease rule); aborted or unknown → the source's VM runs again (pre-copy
//! only: a post-copy source never goes back). A migration that did not complete left the
//! source running: the destination is withdrawn.

use std::time::{Duration, Instant};

use away_model::error_chain;
use away_runtime::qemu::qmp::commands::{Command, MigrationStatus, QmpCapabilities, QueryMigrate};
use away_runtime::qemu::{QemuRuntime, Qmp, QmpError};

use super::source::{cancel_and_resume, quit_source, resume_source};
use super::{VmMigrationOptions, QMP_TIMEOUT};
use crate::journal::{
    commit_after_restart, first_step, record_logged, MoveJournal, MoveKind, NextStep, OutgoingMove, OutgoingState,
    Recovered,
};
use crate::target::{MoveState, TargetNode};

/// How often QEMU's migration is looked at while it goes on.
const POLL: Duration = Duration::from_millis(200);

/// Finish VM move `m` (journaled by its source, left unended) against its target.
pub async fn recover_source(
    source: &QemuRuntime,
    target: &dyn TargetNode,
    m: OutgoingMove,
    journal: &dyn MoveJournal,
    retry: Duration,
) -> Result<Recovered, String> {
    let name = m.workload.as_str();
    let postcopy = m.kind == MoveKind::VmPostcopy;
    let record = |s: OutgoingState| record_logged(Some(journal), &m.with_state(s));
    if !source.files(name).record().is_file() {
        // removed here: only the target can hold it (a source killed after its commit,
        // between removing its VM and writing `done`)
        return match target.move_state(&m.transfer_id).await {
            Ok(Some(r)) if r.state == MoveState::Committed => {
                record(OutgoingState::Done);
                Ok(Recovered::Committed)
            }
            answer => {
                record(OutgoingState::Aborted);
                let said = match answer {
                    Ok(Some(r)) => format!("says {}", r.state.as_str()),
                    Ok(None) => "does not know the move".into(),
                    Err(e) => format!("cannot be asked ({})", e.message),
                };
                Ok(Recovered::Gone(format!("the source vm {name} is gone and the target {said}")))
            }
        };
    }
    let status = migration_end(source, &m).await?;
    tracing::info!(workload = name, transfer = %m.transfer_id, %status, state = m.state.as_str(), "finishing a vm move the source's last run left open");
    if status != MigrationStatus::Completed {
        // QEMU runs a source whose migration failed or was cancelled again; `cont` covers
        // a source stopped in between
        resume_source(source, name).await.map_err(|e| error_chain(&e))?;
        if let Err(e) = target.abort(&m.transfer_id).await {
            tracing::info!(transfer = %m.transfer_id, "no destination to remove on the target: {e}");
        }
        record(OutgoingState::Aborted);
        if status == MigrationStatus::None {
            return Ok(Recovered::NeverStopped);
        }
        return Ok(Recovered::Resumed(format!(
            "the migration did not complete ({status}); the vm runs on the source, the destination was withdrawn"
        )));
    }
    let answer = target.move_state(&m.transfer_id).await;
    if let Err(e) = &answer {
        tracing::warn!(transfer = %m.transfer_id, "cannot ask the target what became of the move: {e}");
    }
    let why = match first_step(m.state, answer.map(|r| r.map(|r| r.state)).map_err(|_| ())) {
        NextStep::CleanUp => {
            // committed without the source's confirm (post-copy commits at its switchover):
            // confirm it anyway, as the source would have, so the target lets go of its
            // destination now rather than after its lease (a confirm of a committed move
            // is answered the same way again)
            if let Err(e) = target.commit(&m.transfer_id).await {
                tracing::info!(transfer = %m.transfer_id, "the confirm of a committed move went unanswered: {e}");
            }
            return finish(source, &m, journal).await;
        }
        NextStep::Commit => match commit_after_restart(target, &m, journal, retry).await {
            Ok(()) => return finish(source, &m, journal).await,
            Err(why) => why,
        },
        NextStep::Resume(why) => why,
        NextStep::WithdrawThenResume => {
            if let Err(e) = target.abort(&m.transfer_id).await {
                tracing::info!(transfer = %m.transfer_id, "no destination to remove on the target: {e}");
            }
            "the target never confirmed it held the vm".into()
        }
    };
    if postcopy {
        // the destination ran from the switchover: this copy is out of date
        return Err(format!(
            "{why}; post-copy: the source's vm stays paused (the destination ran the guest since the switchover)"
        ));
    }
    resume_source(source, name).await.map_err(|e| format!("{why}; {}", error_chain(&e)))?;
    record(OutgoingState::Aborted);
    Ok(Recovered::Resumed(format!("{why}; the vm runs on the source again")))
}

/// The target committed: the source's (paused) QEMU goes.
async fn finish(source: &QemuRuntime, m: &OutgoingMove, journal: &dyn MoveJournal) -> Result<Recovered, String> {
    quit_source(source, &m.workload).await.map_err(|e| error_chain(&e))?;
    record_logged(Some(journal), &m.with_state(OutgoingState::Done));
    Ok(Recovered::Committed)
}

/// Wait for the source QEMU's migration to end and return how it ended. A pre-copy
/// still going after the move's time limit (counted from the journal's last step), or
/// waiting before its switchover for a disk mirror nobody completes now, is cancelled
/// (the source resumed); a post-copy goes on to its end (it cannot be cancelled).
async fn migration_end(source: &QemuRuntime, m: &OutgoingMove) -> Result<MigrationStatus, String> {
    let name = m.workload.as_str();
    let qmp = |cmd: &str, e: QmpError| format!("vm {name}: qmp {cmd}: {}", error_chain(&e));
    let mut q =
        Qmp::connect(&source.files(name).qmp_socket(), QMP_TIMEOUT).await.map_err(|e| qmp(QmpCapabilities::NAME, e))?;
    let limit = VmMigrationOptions::default().timeout;
    let since_journaled = Duration::from_millis(crate::journal::now_ms().saturating_sub(m.at_ms));
    let deadline = Instant::now() + limit.saturating_sub(since_journaled);
    loop {
        let status = q.execute(&QueryMigrate).await.map_err(|e| qmp(QueryMigrate::NAME, e))?.status;
        if status.is_postcopy_broken() {
            return Err(format!(
                "vm {name}: post-copy broke ({status}): the guest's memory is split between source and destination"
            ));
        }
        if !status.is_migrating() {
            return Ok(status);
        }
        let stuck = status == MigrationStatus::PreSwitchover || Instant::now() >= deadline;
        if stuck && !status.is_postcopy() {
            tracing::warn!(workload = name, %status, "cancelling the migration its dead source left going");
            return match cancel_and_resume(&mut q, name).await {
                Ok(Some(_)) => Ok(MigrationStatus::Completed),
                Ok(None) => Ok(MigrationStatus::Cancelled),
                Err(e) => Err(error_chain(&e)),
            };
        }
        tokio::time::sleep(POLL).await;
    }
}
