//! The other end of a migration, as the source sees it. The agent's HTTP client
//! implements it (`away_agent::client`); tests may use any other.
//!
//! Every move has one answer (docs/reliability.md, "Commit protocol"): the target holds
//! its copy as `prepared` under a lease, and the source's commit makes it `committed`;
//! a lease that runs out (or an abort) makes it `aborted`. The target keeps that state
//! on disk and gives it again to anyone who asks, so a lost answer is asked again,
//! never guessed.

use std::time::Duration;

use async_trait::async_trait;
use away_model::NodeInfo;
use serde::{Deserialize, Serialize};

use crate::MigrateError;

/// What a target tells about itself before anything moves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetInfo {
    pub node: NodeInfo,
    /// `host:port` of its transfer receiver.
    pub transfer_addr: String,
}

/// What a target may get ready while the source still checkpoints: the image the
/// move's restore runs from, in the runtime it runs on (a node's first restore of an
/// image imported it inside the pause: 0.3-0.5 s for a real server's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareImage {
    /// An image reference the target's store holds (the source sent it before).
    pub reference: String,
    pub runtime: away_model::RuntimeKind,
    /// A streamed move's page relay on the source (`host:port`): the target opens the
    /// page link now, while the source still runs, and reads the pages the source
    /// pushes from the end of its dump ([`crate::lazy::pull`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_relay: Option<std::net::SocketAddr>,
}

/// A target's answer to an announcement.
#[derive(Debug)]
pub struct Announcement {
    /// The move's one-time secret, which the transfer's hello must carry.
    pub secret: crate::transfer::MoveSecret,
    /// The target opened the page link to the announced page relay: the source may push
    /// the pages unasked (an older target asks for them).
    pub page_link: bool,
}

/// Where one move stands on the target: the only states there are, and the last two
/// never change again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MoveState {
    /// The copy runs (or is being restored) on the target and waits for the commit; the
    /// target removes it when its lease runs out.
    Prepared,
    /// The copy is the workload now; the source's copy must go.
    Committed,
    /// The copy was removed (lease run out, abort, failed restore, agent restart): the
    /// source's copy is the workload.
    Aborted,
}

impl MoveState {
    pub fn as_str(self) -> &'static str {
        match self {
            MoveState::Prepared => "prepared",
            MoveState::Committed => "committed",
            MoveState::Aborted => "aborted",
        }
    }

    pub fn parse(s: &str) -> Option<MoveState> {
        [MoveState::Prepared, MoveState::Committed, MoveState::Aborted].into_iter().find(|m| m.as_str() == s)
    }
}

impl std::fmt::Display for MoveState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A target's answer about one move (`GET /v1/transfers/{id}`, and the commit's answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRecord {
    pub transfer_id: String,
    pub workload: String,
    pub state: MoveState,
    /// Why it is in that state (aborted: what removed the copy).
    #[serde(default)]
    pub reason: String,
}

/// A commit or a question that got no definite answer.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct NoAnswer {
    pub message: String,
    /// The request may have reached the target (the connection was open when it broke,
    /// or the answer timed out): the target may have acted on it. False only when the
    /// request provably never left (the connection could not be opened).
    pub maybe_delivered: bool,
}

#[async_trait]
pub trait TargetNode: Send + Sync {
    async fn info(&self) -> Result<TargetInfo, MigrateError>;
    /// Announce move `transfer_id` of `workload` from node `source` before any byte of
    /// it is sent; the answer carries the move's one-time secret, which the transfer's
    /// hello must carry (the target's receiver refuses an unannounced move, one from
    /// another node, or one without the secret). With `prepare`, the target starts
    /// getting that image ready in its runtime in the background, and opens the page
    /// link to its `page_relay`.
    async fn announce(
        &self,
        transfer_id: &str,
        workload: &str,
        source: &str,
        prepare: Option<&PrepareImage>,
    ) -> Result<Announcement, MigrateError>;
    /// Does the target's image store hold `reference`?
    async fn has_image(&self, reference: &str) -> Result<bool, MigrateError>;
    /// Put an image tar into the target's image store.
    async fn upload_image(&self, tar: &std::path::Path) -> Result<(), MigrateError>;
    /// Make a provisional incoming workload final. Idempotent: asked again, it gives the
    /// move's state (committed, or aborted when the lease ran out first). `Ok(None)`: the
    /// target does not know the move.
    async fn commit(&self, transfer_id: &str) -> Result<Option<MoveRecord>, NoAnswer>;
    /// What became of the move (`Ok(None)`: the target does not know it).
    async fn move_state(&self, transfer_id: &str) -> Result<Option<MoveRecord>, NoAnswer>;
    /// Remove a provisional incoming workload now (a lazy move whose lazy phase failed:
    /// the source runs again).
    async fn abort(&self, transfer_id: &str) -> Result<(), MigrateError>;
    /// Send `bytes` of filler to the target, which times their second half
    /// ([`crate::estimate::measure_link`]); `Ok(None)`: this target cannot be probed.
    async fn probe(&self, bytes: usize) -> Result<Option<crate::estimate::ProbeAnswer>, MigrateError> {
        let _ = bytes;
        Ok(None)
    }
}

/// How the source ends a move whose target answered "restored, prepared".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    /// The target's copy is the workload: remove the source's.
    Committed,
    /// The target's copy is gone: resume the source (`why`).
    Aborted(String),
    /// No definite answer and the commit may have arrived: the source must neither
    /// resume nor remove its copy (it keeps its checkpoint; the target answers when it
    /// can be reached again).
    InDoubt(String),
}

/// How long to keep asking and how often.
#[derive(Debug, Clone)]
pub struct CommitPolicy {
    /// The target's lease, as its prepare answer gave it; counted from when the source
    /// received that answer (the target armed it before it answered, so the source's
    /// deadline is never earlier than the target's).
    pub lease: Duration,
    /// Pause between two questions.
    pub retry: Duration,
    /// Give up asking after this long when the commit may have arrived (in doubt).
    pub give_up: Duration,
    /// A commit may have reached the target already (a source restarted in its commit,
    /// `crate::journal`): the lease alone never lets the source resume.
    pub commit_sent: bool,
}

/// Commit a prepared move and get its one answer: commit, and after a lost answer ask
/// again (the commit is idempotent) until the target says committed or aborted. The
/// source may resume without a definite answer only when no commit can have reached the
/// target, its lease has run out (`answered_at` + lease) and the target does not say it
/// still holds the move: the target has removed its copy by then (an agent that was down
/// removes it when it starts again, and says "prepared" until it is gone). Without a
/// definite answer after `give_up`, the move is in doubt.
pub async fn commit_move(
    target: &dyn TargetNode,
    transfer_id: &str,
    answered_at: tokio::time::Instant,
    policy: &CommitPolicy,
) -> CommitOutcome {
    let lease_end = answered_at + policy.lease;
    let started = tokio::time::Instant::now();
    let mut maybe_delivered = policy.commit_sent;
    loop {
        // once the lease is over, commits stop: a question cannot change anything
        let asked = if !maybe_delivered && tokio::time::Instant::now() >= lease_end {
            target.move_state(transfer_id).await
        } else {
            target.commit(transfer_id).await
        };
        // the target answered "prepared": its copy is still there, whatever the clock says
        let mut held = false;
        let last = match asked {
            Ok(Some(r)) if r.state == MoveState::Committed => return CommitOutcome::Committed,
            Ok(Some(r)) if r.state == MoveState::Aborted => {
                return CommitOutcome::Aborted(format!("the target aborted the move: {}", r.reason))
            }
            Ok(Some(_)) => {
                held = true;
                "the target still holds the move as prepared".to_string()
            }
            Ok(None) => {
                // a target that never heard of the move (its journal lost, or another
                // agent on that address) cannot have committed it
                return CommitOutcome::Aborted(format!("the target does not know move {transfer_id}"));
            }
            Err(e) => {
                maybe_delivered |= e.maybe_delivered;
                tracing::warn!(transfer = transfer_id, maybe_delivered, "no answer to the commit, asking again: {e}");
                e.message
            }
        };
        let now = tokio::time::Instant::now();
        if !maybe_delivered && !held && now >= lease_end {
            return CommitOutcome::Aborted(format!(
                "the target's lease of {} s ran out with no commit delivered (last: {last})",
                policy.lease.as_secs()
            ));
        }
        if (maybe_delivered || held) && now.duration_since(started) >= policy.give_up {
            return CommitOutcome::InDoubt(format!(
                "no definite answer from the target for {} s (last: {last})",
                policy.give_up.as_secs()
            ));
        }
        tokio::time::sleep(policy.retry).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A target answering from a script: each call takes the next answer.
    struct Scripted(Mutex<Vec<Result<Option<MoveState>, bool>>>, Mutex<Vec<&'static str>>);

    impl Scripted {
        fn new(answers: Vec<Result<Option<MoveState>, bool>>) -> Scripted {
            Scripted(Mutex::new(answers.into_iter().rev().collect()), Mutex::new(Vec::new()))
        }
        fn next(&self, call: &'static str) -> Result<Option<MoveRecord>, NoAnswer> {
            self.1.lock().unwrap().push(call);
            let a = self.0.lock().unwrap().pop().unwrap_or(Err(false));
            match a {
                Ok(s) => Ok(s.map(|state| MoveRecord {
                    transfer_id: "t".into(),
                    workload: "w".into(),
                    state,
                    reason: String::new(),
                })),
                Err(maybe_delivered) => Err(NoAnswer { message: "down".into(), maybe_delivered }),
            }
        }
    }

    #[async_trait]
    impl TargetNode for Scripted {
        async fn info(&self) -> Result<TargetInfo, MigrateError> {
            unimplemented!()
        }
        async fn announce(
            &self,
            _: &str,
            _: &str,
            _: &str,
            _: Option<&PrepareImage>,
        ) -> Result<Announcement, MigrateError> {
            unreachable!("commit tests announce nothing")
        }
        async fn has_image(&self, _: &str) -> Result<bool, MigrateError> {
            unimplemented!()
        }
        async fn upload_image(&self, _: &std::path::Path) -> Result<(), MigrateError> {
            unimplemented!()
        }
        async fn commit(&self, _: &str) -> Result<Option<MoveRecord>, NoAnswer> {
            self.next("commit")
        }
        async fn move_state(&self, _: &str) -> Result<Option<MoveRecord>, NoAnswer> {
            self.next("state")
        }
        async fn abort(&self, _: &str) -> Result<(), MigrateError> {
            unimplemented!()
        }
    }

    fn policy() -> CommitPolicy {
        // real time, short (tokio's paused clock needs its test-util feature, which would
        // rebuild the tree for this one test)
        CommitPolicy {
            lease: Duration::from_millis(300),
            retry: Duration::from_millis(20),
            give_up: Duration::from_millis(600),
            commit_sent: false,
        }
    }

    async fn run(answers: Vec<Result<Option<MoveState>, bool>>) -> (CommitOutcome, Vec<&'static str>) {
        let t = Scripted::new(answers);
        let out = commit_move(&t, "t", tokio::time::Instant::now(), &policy()).await;
        let calls = t.1.lock().unwrap().clone();
        (out, calls)
    }

    #[tokio::test]
    async fn a_lost_answer_is_asked_again_and_a_commit_is_never_undone() {
        // the commit arrived, its answer was lost; asked again, the target says committed
        let (out, calls) = run(vec![Err(true), Ok(Some(MoveState::Committed))]).await;
        assert_eq!(out, CommitOutcome::Committed);
        assert_eq!(calls, ["commit", "commit"]);
        // a commit that may have arrived: an unreachable target never lets the source
        // resume, however long the lease is over; it ends in doubt
        let (out, _) = run(vec![Err(true)]).await;
        assert!(matches!(out, CommitOutcome::InDoubt(_)), "{out:?}");
    }

    #[tokio::test]
    async fn the_source_resumes_only_on_a_definite_abort_or_a_lease_run_out_undelivered() {
        let (out, _) = run(vec![Ok(Some(MoveState::Aborted))]).await;
        assert!(matches!(out, CommitOutcome::Aborted(_)), "{out:?}");
        let (out, _) = run(vec![Ok(None)]).await;
        assert!(matches!(out, CommitOutcome::Aborted(_)), "{out:?}");
        // the target is down before any commit reached it: resume after the lease, not before
        let t0 = tokio::time::Instant::now();
        let (out, calls) = run(vec![]).await;
        assert!(matches!(out, CommitOutcome::Aborted(ref why) if why.contains("lease")), "{out:?}");
        assert!(t0.elapsed() >= Duration::from_millis(300), "{:?}", t0.elapsed());
        // after the lease no commit goes out any more: only the question
        assert_eq!(calls.last(), Some(&"state"));
        // a target that says "prepared" still has its copy: no resume on the clock, even
        // past the lease (in doubt after give_up)
        let t = Scripted::new((0..100).map(|_| Ok(Some(MoveState::Prepared))).collect());
        let out = commit_move(&t, "t", tokio::time::Instant::now(), &policy()).await;
        assert!(matches!(out, CommitOutcome::InDoubt(_)), "{out:?}");
        // prepared while the lease runs: commit again
        let (out, calls) = run(vec![Ok(Some(MoveState::Prepared)), Ok(Some(MoveState::Committed))]).await;
        assert_eq!((out, calls), (CommitOutcome::Committed, vec!["commit", "commit"]));
    }
}
