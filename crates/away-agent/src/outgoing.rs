//! This node's outgoing moves on disk (`away_migrate::journal`, table `outgoing` of
//! `agent.db`), and the agent's part in finishing the ones a previous run left open: at
//! start, before the first heartbeat (so that the broker's repeated order does not start
//! the move again), each open move is finished against its target in the background and
//! its end reported to the broker as the move itself would have (`migration-finished`,
//! `migration-failed`). A move in doubt while the agent runs is handed to the same task.

use std::sync::Arc;
use std::time::Duration;

use away_migrate::archive::ArchiveStore;
use away_migrate::journal::{MoveJournal, OutgoingMove, Recovered};
use away_model::ErrorChain;

use crate::client::AgentClient;
use crate::Agent;

/// How long an ended outgoing move is remembered (its migration id keeps a repeated order
/// of the broker from starting it again).
const ENDED_KEPT: Duration = Duration::from_secs(24 * 3600);

/// How often a move in doubt is asked about again.
const IN_DOUBT_RETRY: Duration = Duration::from_secs(30);

/// The agent's [`MoveJournal`]: steps go to its SQLite store with the broker's migration
/// id and the target's API address (what a restart needs to ask the target).
pub struct OutgoingJournal {
    pub agent: Arc<Agent>,
    pub migration_id: Option<String>,
    pub target_api: String,
}

impl std::fmt::Debug for OutgoingJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutgoingJournal").field("migration_id", &self.migration_id).finish_non_exhaustive()
    }
}

impl MoveJournal for OutgoingJournal {
    fn record(&self, m: &OutgoingMove) -> Result<(), String> {
        self.agent
            .state
            .save_outgoing(m, self.migration_id.as_deref(), &self.target_api)
            .map_err(|e| ErrorChain(&e).to_string())
    }
}

/// The journal of a move `away migrate` drives by hand: the node's `agent.db` (the same
/// table), where the node's agent finds it at its next start, or `away migrate
/// --recover` in the foreground.
pub struct LocalJournal {
    pub state: crate::state::AgentState,
    pub target_api: String,
}

impl std::fmt::Debug for LocalJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalJournal").field("target_api", &self.target_api).finish_non_exhaustive()
    }
}

impl MoveJournal for LocalJournal {
    fn record(&self, m: &OutgoingMove) -> Result<(), String> {
        self.state.save_outgoing(m, None, &self.target_api).map_err(|e| ErrorChain(&e).to_string())
    }
}

/// What a recovered move says to the broker (the event's kind) and to its user.
pub fn recovered_event(m: &OutgoingMove, recovered: Result<Recovered, String>) -> (&'static str, String) {
    match recovered {
        Ok(Recovered::Committed) => {
            ("migration-finished", format!("moved to {} (the source finished the move after a restart)", m.target_node))
        }
        Ok(Recovered::Resumed(why)) | Ok(Recovered::Gone(why)) => ("migration-failed", why),
        Ok(Recovered::NeverStopped) => {
            ("migration-failed", format!("the source restarted before it stopped {}", m.workload))
        }
        // the move stays open in the journal: the next start tries again
        Err(why) => ("migration-in-doubt", why),
    }
}

impl Agent {
    /// The node's checkpoint archives (its moves' payloads).
    pub fn archives(&self) -> ArchiveStore {
        ArchiveStore::new(self.config.node.paths.state_dir.join("checkpoints"))
    }

    /// At start: claim the broker's orders of every journaled move (a repeated order of
    /// one is not started again) and finish the open ones in the background. Returns how
    /// many were open.
    pub async fn finish_outgoing(self: &Arc<Self>) -> usize {
        match self.state.prune_outgoing(ENDED_KEPT.as_millis() as u64) {
            Ok(0) => {}
            Ok(n) => tracing::info!("forgot {n} outgoing moves that ended more than a day ago"),
            Err(e) => tracing::warn!("cannot prune the outgoing moves: {e}", e = ErrorChain(&e)),
        }
        let all = match self.state.outgoing(true) {
            Ok(all) => all,
            Err(e) => {
                tracing::error!("cannot read the outgoing moves of the last run: {e}", e = ErrorChain(&e));
                return 0;
            }
        };
        let mut open = 0;
        for (m, migration_id, target_api) in all {
            if let Some(id) = &migration_id {
                self.start_work(&format!("migrate:{id}")).await;
            }
            if !m.state.ended() {
                open += 1;
                self.clone().spawn_finish(m, migration_id, target_api);
            }
        }
        open
    }

    /// Finish move `transfer_id` from its journal in the background (a move in doubt).
    pub fn finish_outgoing_move(self: &Arc<Self>, transfer_id: &str) {
        let open = self.state.outgoing(false).unwrap_or_default();
        if let Some((m, id, api)) = open.into_iter().find(|(m, _, _)| m.transfer_id == transfer_id) {
            self.clone().spawn_finish(m, id, api);
        }
    }

    fn spawn_finish(self: Arc<Self>, m: OutgoingMove, migration_id: Option<String>, target_api: String) {
        tokio::spawn(async move {
            tracing::warn!(workload = %m.workload, transfer = %m.transfer_id, target = %m.target_node, state = m.state.as_str(), "finishing a move the source left open");
            let journal = OutgoingJournal {
                agent: self.clone(),
                migration_id: migration_id.clone(),
                target_api: target_api.clone(),
            };
            let (kind, message) = loop {
                let target = match AgentClient::from_agent(&self, Some(&m.target_node), &target_api).await {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::warn!(transfer = %m.transfer_id, "cannot call the target yet: {e}");
                        tokio::time::sleep(IN_DOUBT_RETRY).await;
                        continue;
                    }
                };
                let archives = self.archives();
                let recovered =
                    crate::client::recover_move(&self.node, &archives, &target, m.clone(), &journal, IN_DOUBT_RETRY)
                        .await;
                break recovered_event(&m, recovered);
            };
            tracing::warn!(workload = %m.workload, transfer = %m.transfer_id, kind, "{message}");
            let mut ev = crate::broker::event(kind, Some(&m.workload), message);
            ev.migration_id = migration_id;
            if let Err(e) = self.state.push_event(ev) {
                tracing::error!("cannot queue an event: {e}", e = ErrorChain(&e));
            }
        });
    }
}
