//! What one heartbeat does to the broker's state, as a pure function: [`reconcile`]
//! reads a [`Snapshot`] of the state, the node's record and its heartbeat, and returns
//! a [`Plan`]: the records to write, the answer for the agent and the events to
//! announce. It touches no database, clock or channel (it only logs the cases it
//! leaves alone); `Broker::heartbeat` authenticates, writes the plan's changes in one
//! transaction, then updates memory, announces the events and answers.
//!
//! # Reconciliation rules (offline first)
//!
//! Agents keep running what they have when the broker is unreachable, and a heartbeat
//! reports the node's *complete* workload list. On each heartbeat from node N:
//!
//! 1. **Events first, exactly once.** Events with `seq` above N's `acked_seq` are
//!    applied in order and `acked_seq` moves up in the same transaction, so a retried
//!    heartbeat (answer lost) or a broker restart never applies an event twice, and the
//!    agent drops only what the broker has stored. `migration-finished` marks the
//!    migration succeeded and moves the workload's home to the target;
//!    `migration-failed` marks it failed and the home stays the source;
//!    `migration-in-doubt` (the source got no answer after a commit that may have
//!    arrived: docs/reliability.md) ends nothing, the migration stays in flight (rule 5)
//!    and the workload's last event says why.
//! 2. **Home copies.** A reported workload whose home is N updates its status.
//!    A home workload N does not report gets a `Running` assignment again (the agent
//!    restarts it); one whose desired state is `Removed` is forgotten once N reports it
//!    gone.
//! 3. **Copies elsewhere** (home H ≠ N):
//!    * N is the target of the workload's active migration: left alone, the agent's
//!      commit lease decides (a provisional copy must not be killed mid-move);
//!    * N was a source of a *succeeded* migration of it: the target confirmed a healthy
//!      restore, so N's copy is stale and gets `desired: Removed`;
//!    * H's last heartbeat reported it running: N's copy is a duplicate and is removed;
//!    * otherwise it is left alone and logged: a copy is never removed unless another
//!      copy is known to be live, so an unclear case can duplicate for a while but
//!      never lose the workload.
//! 4. **Unknown workloads** (started on the node by hand, or left from a deleted one) are
//!    shown as `unmanaged` on the node and left alone.
//! 5. **In-flight migrations are the source agent's business.** While a migration of a
//!    workload is pending or running, neither node gets an assignment for it (an absent
//!    workload is one the agent keeps as it is): a `Running` sent to the source after it
//!    handed the workload over, but before its `migration-finished` event arrived, would
//!    start a duplicate. Orders are repeated in every heartbeat answer until the outcome
//!    event arrives; agents deduplicate them by id.
//! 6. **Offline nodes keep their work.** A node that misses heartbeats
//!    (`node_timeout`) is shown offline and gets nothing new, but its workloads are not
//!    placed elsewhere: a client with a cut link keeps running them, and rescheduling
//!    would make a duplicate when it returns (Nomad's "keep original" policy). Moving
//!    them is an explicit migration, carried out when the source is back.
//! 7. **Migrations end.** Every migration has a deadline. [`resolve_deadlines`] (each
//!    broker tick) fails a `pending` one past it ("not delivered before its deadline") and
//!    a `running` one past it whose source node is offline (the workload is kept where the
//!    source last reported it); a `running` one on an online source is told to cancel
//!    (as `DELETE` does: its order carries `cancel`, the source aborts before its commit
//!    point; past it, its commit protocol ends the move). [`cancel`] does the same on
//!    request. Such a
//!    migration is `resolved_by_broker`: the broker ended it without the source's word,
//!    so what the source says when it is back wins:
//!    * a late `migration-finished` still moves the workload's home to the target (the
//!      move committed while the broker could not hear of it); a late `migration-failed`
//!      changes nothing (the workload is already at home on the source);
//!    * until the source reports again, a copy on the target is left alone (the source's
//!      last report predates the resolution, so it proves no other copy runs);
//!    * a source that reports again without the workload and without a
//!      `migration-finished` (its event was lost) while the target reports it running:
//!      the home moves to the target, instead of a second copy being started on the source.
//! 8. **Restarts.** Nodes, token hashes, workloads, migrations, removals and acked seqs
//!    are all in SQLite and written before the answer: after a restart the agents'
//!    tokens still work, pending orders are delivered again, and reports reconcile by
//!    the rules above.

use std::collections::{BTreeMap, BTreeSet};

use away_model::{
    AgentEvent, Assignment, Desired, ErrorCode, Heartbeat, HeartbeatResponse, MigrationOrder, WorkloadState,
};

use crate::error::Problem;
use crate::events::Pending;
use crate::records::{MigrationRecord, MigrationState, NodeRecord, Removal, WorkloadRecord};
use crate::store::Changes;

/// The broker's state as reconciliation reads it, before the heartbeat.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot<'a> {
    pub nodes: &'a BTreeMap<String, NodeRecord>,
    pub workloads: &'a BTreeMap<String, WorkloadRecord>,
    pub migrations: &'a BTreeMap<String, MigrationRecord>,
    /// Stale copies being removed, by (node, workload).
    pub removals: &'a BTreeMap<(String, String), Removal>,
    /// Nodes last announced online: a heartbeat from any other one announces it.
    pub announced_online: &'a BTreeSet<String>,
}

/// What a heartbeat does: apply `changes` (one transaction, then memory), announce
/// `events`, answer `response`.
#[derive(Debug)]
pub struct Plan {
    /// The node's new record (always: `last_seen_ms`, `acked_seq`, `reported`), the
    /// workloads and migrations that changed, workloads to forget, removals to start
    /// and to drop, and the agent events stored.
    pub changes: Changes,
    pub response: HeartbeatResponse,
    pub events: Vec<Pending>,
}

/// Reconcile heartbeat `hb` from `node` (its stored record) at `now` (Unix ms) by the
/// rules of the module doc.
pub fn reconcile(snap: &Snapshot, node: &NodeRecord, hb: Heartbeat, now: u64) -> Plan {
    let name = node.name.as_str();
    let mut node = node.clone();
    let mut changes = Changes::default();
    let mut out: Vec<Pending> = Vec::new();
    let mut workloads: BTreeMap<String, WorkloadRecord> = BTreeMap::new();
    let mut migrations: BTreeMap<String, MigrationRecord> = BTreeMap::new();

    // rule 1: events, once each, in order
    let mut events = hb.events;
    events.sort_by_key(|e| e.seq);
    for e in events {
        if e.seq <= node.acked_seq {
            continue;
        }
        node.acked_seq = e.seq;
        apply_agent_event(snap, name, &e, now, &mut workloads, &mut migrations, &mut out);
        changes.events.push((name.to_string(), e));
    }

    node.info = hb.node;
    node.load = hb.load;
    node.last_seen_ms = now;
    node.reported = hb.workloads;
    let get = |workloads: &BTreeMap<String, WorkloadRecord>, n: &str| {
        workloads.get(n).cloned().or_else(|| snap.workloads.get(n).cloned())
    };
    let migration_of = |migrations: &BTreeMap<String, MigrationRecord>, w: &str| -> Option<MigrationRecord> {
        let mut all: BTreeMap<&String, &MigrationRecord> = snap.migrations.iter().collect();
        for (k, v) in migrations {
            all.insert(k, v);
        }
        all.into_values().find(|m| m.workload == w && m.state.is_active()).cloned()
    };
    let reported: BTreeSet<String> = node.reported.iter().map(|s| s.name.clone()).collect();

    // rules 2 and 3: what the node reports
    for status in &node.reported {
        let Some(mut w) = get(&workloads, &status.name) else { continue }; // rule 4
        if w.node == name {
            if w.status.as_ref().map(|s| s.state) != Some(status.state) {
                match status.state {
                    WorkloadState::Running => out.push(
                        Pending::new(
                            "workload-running",
                            format!("{} runs on {name} ({})", w.spec.name, status.runtime),
                        )
                        .node(name)
                        .workload(&w.spec.name),
                    ),
                    WorkloadState::Stopped => out.push(
                        Pending::new("workload-stopped", format!("{} stopped on {name}", w.spec.name))
                            .node(name)
                            .workload(&w.spec.name),
                    ),
                    _ => {}
                }
            }
            w.status = Some(status.clone());
            w.status_ms = Some(now);
            workloads.insert(w.spec.name.clone(), w);
            continue;
        }
        if snap.removals.contains_key(&(name.to_string(), status.name.clone())) {
            continue;
        }
        let active = migration_of(&migrations, &status.name);
        if active.as_ref().is_some_and(|m| m.target == name) {
            continue;
        }
        // rule 7: the source has not spoken since the broker ended the move
        if let Some(m) = resolved_unheard(snap, &status.name, |m| m.target == name) {
            tracing::warn!(workload = %status.name, node = name, migration = %m.id, source = %m.source, "copy on the target of a migration the broker ended left alone until its source reports");
            continue;
        }
        let moved_away = snap
            .migrations
            .values()
            .chain(migrations.values())
            .find(|m| m.workload == status.name && m.source == name && m.state == MigrationState::Succeeded);
        let home_runs_it = snap
            .nodes
            .get(&w.node)
            .is_some_and(|h| h.reported.iter().any(|s| s.name == status.name && s.state == WorkloadState::Running));
        let reason = match (moved_away, home_runs_it) {
            (Some(m), _) => format!("moved to {} by migration {}; this copy is stale", m.target, m.id),
            (None, true) => format!("it runs on its home {}; this copy is a duplicate", w.node),
            (None, false) => {
                tracing::warn!(workload = %status.name, node = name, home = %w.node, "copy outside its home left alone: no other copy is known to be live");
                continue;
            }
        };
        out.push(
            Pending::new("workload-stale-copy", format!("removing {} from {name}: {reason}", status.name))
                .node(name)
                .workload(&status.name),
        );
        changes.removals.push(Removal {
            node: name.to_string(),
            workload: status.name.clone(),
            spec: w.spec.clone(),
            reason,
            since_ms: now,
        });
    }
    // removals done: the stale copy is gone
    for (node_name, workload) in snap.removals.keys() {
        if node_name == name && !reported.contains(workload) {
            changes.drop_removals.push((node_name.clone(), workload.clone()));
        }
    }
    // rule 2: home workloads the node does not report
    let homed: Vec<String> = snap
        .workloads
        .values()
        .chain(workloads.values())
        .filter(|w| w.node == name)
        .map(|w| w.spec.name.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    for wname in &homed {
        if reported.contains(wname) {
            continue;
        }
        let Some(mut w) = get(&workloads, wname) else { continue };
        if w.node != name {
            continue;
        }
        if w.desired == Desired::Removed && migration_of(&migrations, wname).is_none() {
            changes.forget_workloads.push(wname.clone());
            workloads.remove(wname);
            out.push(
                Pending::new("workload-removed", format!("{wname} removed from {name}")).node(name).workload(wname),
            );
            continue;
        }
        // rule 7: the source is back without it, its move's target runs it
        if let Some((m, status)) = found_on_target(snap, &migrations, wname, name) {
            let mut m = m.clone();
            m.state = MigrationState::Succeeded;
            m.resolved_by_broker = false;
            m.error = None;
            m.finished_ms = Some(now);
            w.node = m.target.clone();
            w.status = Some(status.clone());
            w.status_ms = Some(now);
            w.updated_ms = now;
            out.push(
                Pending::new(
                    "migration-succeeded",
                    format!(
                        "{wname} moved from {name} to {}: {name} came back without it and {} runs it (the source's \
                         report of the move was lost)",
                        m.target, m.target
                    ),
                )
                .node(&m.target)
                .workload(wname)
                .migration(&m.id),
            );
            workloads.insert(wname.clone(), w);
            migrations.insert(m.id.clone(), m);
            continue;
        }
        if w.status.is_some() {
            w.status = None;
            w.status_ms = Some(now);
            workloads.insert(wname.clone(), w);
        }
    }

    // the answer: assignments (rule 5 withholds in-flight ones) and orders
    let mut assignments = Vec::new();
    for wname in &homed {
        if changes.forget_workloads.contains(wname) || migration_of(&migrations, wname).is_some() {
            continue;
        }
        if let Some(w) = get(&workloads, wname).filter(|w| w.node == name) {
            assignments.push(Assignment {
                runtime: Some(w.decision.runtime),
                decision: Some(w.decision.clone()),
                desired: w.desired,
                spec: w.spec,
            });
        }
    }
    let dropped: BTreeSet<&(String, String)> = changes.drop_removals.iter().collect();
    for r in snap.removals.values().chain(changes.removals.iter()) {
        if r.node == name && !dropped.contains(&(r.node.clone(), r.workload.clone())) {
            assignments.push(Assignment {
                spec: r.spec.clone(),
                desired: Desired::Removed,
                runtime: None,
                decision: None,
            });
        }
    }
    let mut orders = Vec::new();
    let active: Vec<MigrationRecord> = snap
        .migrations
        .values()
        .filter(|m| !migrations.contains_key(&m.id))
        .chain(migrations.values())
        .filter(|m| m.source == name && m.state.is_active())
        .cloned()
        .collect();
    for mut m in active {
        let Some(target) = snap.nodes.get(&m.target) else { continue };
        orders.push(MigrationOrder {
            id: m.id.clone(),
            workload: m.workload.clone(),
            target_node: m.target.clone(),
            target_api: target.api_addr.clone(),
            mode: m.mode.clone(),
            close_connections: m.close_connections,
            cancel: m.cancel_requested_ms.is_some(),
        });
        if m.state == MigrationState::Pending {
            m.state = MigrationState::Running;
            m.delivered_ms = Some(now);
            out.push(
                Pending::new("migration-started", format!("{} ordered to move {} to {}", name, m.workload, m.target))
                    .node(name)
                    .workload(&m.workload)
                    .migration(&m.id),
            );
            migrations.insert(m.id.clone(), m);
        }
    }

    // rule 6: a node back after missed heartbeats is announced, first
    if !snap.announced_online.contains(name) {
        out.insert(0, Pending::new("node-online", format!("node {name} is online")).node(name));
    }
    let response = HeartbeatResponse {
        acked_seq: node.acked_seq,
        assignments,
        migrations: orders,
        draining: node.draining,
        overlay: Vec::new(),
        crl: None,
    };
    changes.nodes.push(node);
    changes.workloads.extend(workloads.into_values());
    changes.migrations.extend(migrations.into_values());
    Plan { changes, response, events: out }
}

/// The latest migration of `workload` the broker ended without its source's word
/// (rule 7), if it passes `filter` and its source has not reported since.
fn resolved_unheard<'a>(
    snap: &Snapshot<'a>,
    workload: &str,
    filter: impl Fn(&MigrationRecord) -> bool,
) -> Option<&'a MigrationRecord> {
    let m = snap.migrations.values().filter(|m| m.workload == workload).max_by_key(|m| (m.requested_ms, &m.id))?;
    let source_seen = snap.nodes.get(&m.source).map(|n| n.last_seen_ms).unwrap_or(0);
    (m.resolved_by_broker && filter(m) && source_seen <= m.finished_ms.unwrap_or(0)).then_some(m)
}

/// Rule 7: `workload`, at home on `source` and not reported by it, was last being moved
/// from `source` by a migration the broker ended, and that move's target reports it running.
fn found_on_target<'a>(
    snap: &Snapshot<'a>,
    changed: &BTreeMap<String, MigrationRecord>,
    workload: &str,
    source: &str,
) -> Option<(&'a MigrationRecord, &'a away_model::WorkloadStatus)> {
    let m = snap.migrations.values().filter(|m| m.workload == workload).max_by_key(|m| (m.requested_ms, &m.id))?;
    if !m.resolved_by_broker || m.source != source || changed.contains_key(&m.id) {
        return None;
    }
    let status =
        snap.nodes.get(&m.target)?.reported.iter().find(|s| s.name == workload && s.state == WorkloadState::Running)?;
    Some((m, status))
}

/// The reason a migration ended by the broker gives for a source that is offline.
fn kept_on_source(m: &MigrationRecord) -> String {
    format!(
        "source node {} is offline: {} is kept where {} last reported it, and no second copy is started; if the \
         move committed meanwhile, {}'s report when it is back moves it to {}",
        m.source, m.workload, m.source, m.source, m.target
    )
}

/// Rule 7, each tick: migrations past their deadline that the broker can end: `pending`
/// ones, and `running` ones whose source node is offline (`online` says which nodes are
/// not). Returns them ended (`failed`, `resolved_by_broker`) and the events to announce.
/// A `running` one on an online source is not ended: it is cancelled as `DELETE` would
/// (`cancel_requested_ms` set once, its order carries `cancel` from then on, and the
/// source's `migration-failed` ends it `cancelled`); returned with it set.
pub fn resolve_deadlines(
    snap: &Snapshot,
    now: u64,
    online: impl Fn(&NodeRecord) -> bool,
) -> (Vec<MigrationRecord>, Vec<Pending>) {
    let mut ended = Vec::new();
    let mut out = Vec::new();
    for m in snap.migrations.values() {
        if !m.state.is_active() || m.deadline_ms.is_none_or(|d| now < d) {
            continue;
        }
        let reason = match m.state {
            MigrationState::Pending => {
                format!("not delivered before its deadline: source node {} did not ask for it", m.source)
            }
            _ if snap.nodes.get(&m.source).is_some_and(&online) => {
                if m.cancel_requested_ms.is_none() {
                    let mut m = m.clone();
                    m.cancel_requested_ms = Some(now);
                    out.push(
                        Pending::new(
                            "migration-cancelling",
                            format!(
                                "{}: past its deadline, source node {} is told to abort the move before its commit point",
                                m.workload, m.source
                            ),
                        )
                        .node(&m.source)
                        .workload(&m.workload)
                        .migration(&m.id),
                    );
                    ended.push(m);
                }
                continue;
            }
            _ => format!("past its deadline: {}", kept_on_source(m)),
        };
        let mut m = m.clone();
        m.state = MigrationState::Failed;
        m.resolved_by_broker = true;
        m.finished_ms = Some(now);
        m.error = Some(reason.clone());
        out.push(
            Pending::new("migration-failed", format!("{} stays on {}: {reason}", m.workload, m.source))
                .node(&m.source)
                .workload(&m.workload)
                .migration(&m.id),
        );
        ended.push(m);
    }
    (ended, out)
}

/// Rule 7, `DELETE /v1/migrations/{id}`: a `pending` migration, or a `running` one whose
/// source node is offline (`source_online` false), ends `cancelled`. A `running` one on
/// an online source stays `running` with `cancel_requested_ms` set: its order carries
/// `cancel` from then on, the source aborts the move before its commit point, and its
/// `migration-failed` ends it `cancelled` (asked again: the same answer). An ended one is
/// a conflict.
pub fn cancel(m: &MigrationRecord, source_online: bool, now: u64) -> Result<(MigrationRecord, Pending), Problem> {
    let reason = match m.state {
        MigrationState::Pending => format!("cancelled before source node {} received the order", m.source),
        MigrationState::Running if !source_online => format!("cancelled while {}", kept_on_source(m)),
        MigrationState::Running => {
            let mut m = m.clone();
            m.cancel_requested_ms.get_or_insert(now);
            let event = Pending::new(
                "migration-cancelling",
                format!("{}: source node {} is told to abort the move before its commit point", m.workload, m.source),
            )
            .node(&m.source)
            .workload(&m.workload)
            .migration(&m.id);
            return Ok((m, event));
        }
        ended => {
            return Err(Problem::new(
                ErrorCode::Conflict,
                format!("migration {} has already ended: {}", m.id, ended.as_str()),
            )
            .detail("migration", m))
        }
    };
    let mut m = m.clone();
    m.state = MigrationState::Cancelled;
    m.resolved_by_broker = true;
    m.finished_ms = Some(now);
    m.error = Some(reason.clone());
    let event = Pending::new("migration-cancelled", format!("{} stays on {}: {reason}", m.workload, m.source))
        .node(&m.source)
        .workload(&m.workload)
        .migration(&m.id);
    Ok((m, event))
}

/// Rule 1: one agent event.
fn apply_agent_event(
    snap: &Snapshot,
    node: &str,
    e: &AgentEvent,
    now: u64,
    workloads: &mut BTreeMap<String, WorkloadRecord>,
    migrations: &mut BTreeMap<String, MigrationRecord>,
    out: &mut Vec<Pending>,
) {
    let get_w = |workloads: &BTreeMap<String, WorkloadRecord>, n: &str| {
        workloads.get(n).cloned().or_else(|| snap.workloads.get(n).cloned())
    };
    if let Some(wname) = &e.workload {
        if let Some(mut w) = get_w(workloads, wname) {
            w.last_event = Some(format!("{} on {node}: {}", e.kind, e.message));
            w.updated_ms = now;
            workloads.insert(wname.clone(), w);
        }
        if e.kind == "workload-failed" {
            out.push(
                Pending::new("workload-failed", format!("{wname} on {node}: {}", e.message)).node(node).workload(wname),
            );
        }
    }
    if !matches!(e.kind.as_str(), "migration-finished" | "migration-failed") {
        return;
    }
    // the order's id, or else the workload's active migration from this node
    let found = e
        .migration_id
        .as_ref()
        .and_then(|id| migrations.get(id).cloned().or_else(|| snap.migrations.get(id).cloned()))
        .or_else(|| {
            let wname = e.workload.as_ref()?;
            snap.migrations
                .values()
                .chain(migrations.values())
                .find(|m| &m.workload == wname && m.source == node && m.state.is_active())
                .cloned()
        });
    let Some(mut m) = found else {
        tracing::warn!(node, kind = %e.kind, migration = ?e.migration_id, "migration event for an unknown migration ignored");
        return;
    };
    if m.source != node {
        return;
    }
    let late = !m.state.is_active();
    if late {
        // rule 7: the broker ended it without the source's word; a committed move wins
        let finished = e.kind == "migration-finished" && e.report.as_ref().is_none_or(|r| r.ok);
        if !(m.resolved_by_broker && finished) {
            return;
        }
        m.resolved_by_broker = false;
        m.error = None;
    }
    m.finished_ms = Some(now);
    m.report = e.report.clone();
    if e.kind == "migration-finished" && e.report.as_ref().is_none_or(|r| r.ok) {
        m.state = MigrationState::Succeeded;
        if let Some(mut w) = get_w(workloads, &m.workload) {
            w.node = m.target.clone();
            // the target's own report, if it already sent one
            w.status =
                snap.nodes.get(&m.target).and_then(|t| t.reported.iter().find(|s| s.name == m.workload).cloned());
            w.status_ms = Some(now);
            w.updated_ms = now;
            workloads.insert(m.workload.clone(), w);
        }
        out.push(
            Pending::new(
                "migration-succeeded",
                format!(
                    "{} moved from {} to {}: {}{}",
                    m.workload,
                    m.source,
                    m.target,
                    e.message,
                    if late { " (reported by the source after the broker had ended the migration)" } else { "" }
                ),
            )
            .node(&m.target)
            .workload(&m.workload)
            .migration(&m.id),
        );
    } else if m.cancel_requested_ms.is_some() && e.kind == "migration-failed" {
        // the source aborted the move as asked (or it failed meanwhile): cancelled
        m.state = MigrationState::Cancelled;
        m.error = Some(format!("cancelled: {}", e.message));
        out.push(
            Pending::new("migration-cancelled", format!("{} stays on {}: {}", m.workload, m.source, e.message))
                .node(&m.source)
                .workload(&m.workload)
                .migration(&m.id),
        );
    } else {
        m.state = MigrationState::Failed;
        m.error = Some(e.report.as_ref().and_then(|r| r.error.clone()).unwrap_or_else(|| e.message.clone()));
        out.push(
            Pending::new("migration-failed", format!("{} stays on {}: {}", m.workload, m.source, e.message))
                .node(&m.source)
                .workload(&m.workload)
                .migration(&m.id),
        );
    }
    migrations.insert(m.id.clone(), m);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::tests::{all_runtimes, node as node_info};
    use crate::placement::PlacementDecision;
    use away_model::{
        CpuVendor, MigrationMode, NodeLoad, RuntimeDecision, RuntimeKind, SpecFormat, Tier, WorkloadSpec,
        WorkloadStatus,
    };
    use away_policy::Compatibility;

    use WorkloadState::{Running, Stopped};

    const NOW: u64 = 1_000_000_000;

    /// The broker's state as plain maps; `apply` replays a plan's changes on it the way
    /// the broker updates memory after the commit.
    #[derive(Default)]
    struct State {
        nodes: BTreeMap<String, NodeRecord>,
        workloads: BTreeMap<String, WorkloadRecord>,
        migrations: BTreeMap<String, MigrationRecord>,
        removals: BTreeMap<(String, String), Removal>,
        announced_online: BTreeSet<String>,
    }

    fn status(name: &str, state: WorkloadState) -> WorkloadStatus {
        WorkloadStatus {
            name: name.into(),
            runtime: RuntimeKind::Containerd,
            state,
            image: "x".into(),
            pid: None,
            exit_code: None,
            ports: vec![],
            detail: String::new(),
        }
    }

    fn event(seq: u64, kind: &str, workload: &str, migration: Option<&str>) -> AgentEvent {
        AgentEvent {
            seq,
            at_ms: NOW,
            kind: kind.into(),
            workload: Some(workload.into()),
            message: format!("event {seq}"),
            migration_id: migration.map(String::from),
            report: None,
        }
    }

    impl State {
        /// Nodes `names`, registered, online and announced.
        fn with_nodes(names: &[&str]) -> State {
            let mut s = State::default();
            for n in names {
                s.nodes.insert(
                    n.to_string(),
                    NodeRecord {
                        name: n.to_string(),
                        info: node_info(n, Tier::Edge, CpuVendor::Amd, &all_runtimes()),
                        api_addr: format!("{n}:7071"),
                        transfer_addr: format!("{n}:7072"),
                        draining: false,
                        load: NodeLoad::default(),
                        reported: vec![],
                        acked_seq: 0,
                        registered_ms: NOW - 60_000,
                        last_seen_ms: NOW - 1_000,
                        key_id: None,
                        revoked_ms: None,
                    },
                );
                s.announced_online.insert(n.to_string());
            }
            s
        }

        /// Nodes a and b; workload w at home on a, migration m1 moving it to b.
        fn moving_w_from_a_to_b(state: MigrationState) -> State {
            let mut s = State::with_nodes(&["a", "b"]);
            s.workload("w", "a", Desired::Running);
            s.migration("m1", "w", "a", "b", state);
            s
        }

        fn workload(&mut self, name: &str, home: &str, desired: Desired) {
            let spec = WorkloadSpec::parse(&format!("name: {name}\nimage: x\n"), SpecFormat::Yaml, "t").unwrap();
            let decision =
                RuntimeDecision { runtime: RuntimeKind::Containerd, reason: "test".into(), considered: vec![] };
            let placement = PlacementDecision {
                workload: name.into(),
                chosen: Some(home.into()),
                runtime: Some(decision.clone()),
                scores: vec![],
                filtered: vec![],
                feasible_count: 1,
                filtered_count: 0,
                why: String::new(),
            };
            let w = WorkloadRecord {
                spec,
                node: home.into(),
                desired,
                status: None,
                status_ms: None,
                decision,
                placement,
                created_ms: NOW - 10_000,
                updated_ms: NOW - 10_000,
                last_event: None,
            };
            self.workloads.insert(name.into(), w);
        }

        fn migration(&mut self, id: &str, workload: &str, source: &str, target: &str, state: MigrationState) {
            let compatibility =
                Compatibility { allowed: true, mode: MigrationMode::StopAndCopy, reason: "ok".into(), checks: vec![] };
            let m = MigrationRecord {
                id: id.into(),
                workload: workload.into(),
                source: source.into(),
                target: target.into(),
                state,
                chosen_by: "user".into(),
                why: "test".into(),
                compatibility,
                requested_ms: NOW - 5_000,
                delivered_ms: (state != MigrationState::Pending).then_some(NOW - 4_000),
                finished_ms: None,
                report: None,
                error: None,
                deadline_ms: None,
                resolved_by_broker: false,
                cancel_requested_ms: None,
                predicted: None,
                mode: None,
                close_connections: false,
            };
            self.migrations.insert(id.into(), m);
        }

        /// What `node` last reported (for copies elsewhere: does the home run it?).
        fn reported(&mut self, node: &str, workloads: &[(&str, WorkloadState)]) {
            self.nodes.get_mut(node).unwrap().reported = workloads.iter().map(|(w, s)| status(w, *s)).collect();
        }

        fn snap(&self) -> Snapshot<'_> {
            Snapshot {
                nodes: &self.nodes,
                workloads: &self.workloads,
                migrations: &self.migrations,
                removals: &self.removals,
                announced_online: &self.announced_online,
            }
        }

        fn heartbeat(&self, node: &str, workloads: &[(&str, WorkloadState)], events: Vec<AgentEvent>) -> Plan {
            let hb = Heartbeat {
                node: self.nodes[node].info.clone(),
                load: NodeLoad::default(),
                workloads: workloads.iter().map(|(w, s)| status(w, *s)).collect(),
                events,
                crl_number: None,
            };
            reconcile(&self.snap(), &self.nodes[node], hb, NOW)
        }

        fn apply(&mut self, plan: &Plan) {
            let c = &plan.changes;
            for n in &c.nodes {
                self.nodes.insert(n.name.clone(), n.clone());
                self.announced_online.insert(n.name.clone());
            }
            for w in &c.workloads {
                self.workloads.insert(w.spec.name.clone(), w.clone());
            }
            for f in &c.forget_workloads {
                self.workloads.remove(f);
            }
            for m in &c.migrations {
                self.migrations.insert(m.id.clone(), m.clone());
            }
            for r in &c.removals {
                self.removals.insert((r.node.clone(), r.workload.clone()), r.clone());
            }
            for k in &c.drop_removals {
                self.removals.remove(k);
            }
        }
    }

    impl State {
        /// Each broker tick's deadline check at `now`, with node_timeout 6 s, applied.
        fn tick(&mut self, now: u64) -> Vec<Pending> {
            let (ended, events) = resolve_deadlines(&self.snap(), now, |n| now.saturating_sub(n.last_seen_ms) <= 6_000);
            for m in ended {
                self.migrations.insert(m.id.clone(), m);
            }
            events
        }

        /// m1 running from a to b, past its deadline, with a offline and last reported running w.
        fn source_offline_past_deadline() -> State {
            let mut s = State::moving_w_from_a_to_b(MigrationState::Running);
            s.migrations.get_mut("m1").unwrap().deadline_ms = Some(NOW - 2_000);
            s.reported("a", &[("w", Running)]);
            s.nodes.get_mut("a").unwrap().last_seen_ms = NOW - 60_000;
            s.announced_online.remove("a");
            // resolved a second before the heartbeats below
            let events = s.tick(NOW - 1_000);
            assert_eq!(events.iter().map(|e| e.kind).collect::<Vec<_>>(), ["migration-failed"]);
            s
        }
    }

    #[test]
    fn rule7_a_pending_migration_past_its_deadline_fails_and_is_never_delivered() {
        let mut s = State::moving_w_from_a_to_b(MigrationState::Pending);
        s.migrations.get_mut("m1").unwrap().deadline_ms = Some(NOW);
        assert!(s.tick(NOW - 1).is_empty(), "not yet");
        let events = s.tick(NOW);
        assert_eq!(events.len(), 1);
        let m = &s.migrations["m1"];
        assert_eq!((m.state, m.resolved_by_broker, m.finished_ms), (MigrationState::Failed, true, Some(NOW)));
        assert!(m.error.as_deref().unwrap().starts_with("not delivered before its deadline"), "{:?}", m.error);
        let plan = s.heartbeat("a", &[("w", Running)], vec![]);
        assert!(plan.response.migrations.is_empty(), "an ended migration is never ordered");
        assert_eq!(assigned(&plan, "w").map(|a| a.desired), Some(Desired::Running), "w stays a's");
        assert!(s.tick(NOW + 1).is_empty(), "ended once");
    }

    #[test]
    fn rule7_a_running_migration_past_its_deadline_is_cancelled_through_its_online_source() {
        let mut s = State::moving_w_from_a_to_b(MigrationState::Running);
        s.migrations.get_mut("m1").unwrap().deadline_ms = Some(NOW - 1);
        let events = s.tick(NOW);
        assert_eq!(events.iter().map(|e| e.kind).collect::<Vec<_>>(), ["migration-cancelling"]);
        assert!(s.tick(NOW + 1).is_empty(), "asked once");
        let m = &s.migrations["m1"];
        // still the source's: running, with the cancel its order now carries
        assert_eq!((m.state, m.cancel_requested_ms, m.resolved_by_broker), (MigrationState::Running, Some(NOW), false));
        let plan = s.heartbeat("a", &[("w", Running)], vec![]);
        assert!(plan.response.migrations.iter().any(|o| o.id == "m1" && o.cancel), "the order carries the cancel");
        // the source aborted before its commit: cancelled, the workload stays on a
        let plan = s.heartbeat("a", &[("w", Running)], vec![event(1, "migration-failed", "w", Some("m1"))]);
        s.apply(&plan);
        assert_eq!(s.migrations["m1"].state, MigrationState::Cancelled);
        // records from before deadlines have none and are never ended by the broker
        let mut old = State::moving_w_from_a_to_b(MigrationState::Pending);
        assert!(old.tick(u64::MAX).is_empty());
    }

    #[test]
    fn rule7_an_offline_source_past_the_deadline_keeps_the_workload_and_the_targets_copy_stays() {
        let s = State::source_offline_past_deadline();
        let m = &s.migrations["m1"];
        assert_eq!((m.state, m.resolved_by_broker), (MigrationState::Failed, true));
        let why = m.error.as_deref().unwrap();
        assert!(why.contains("source node a is offline") && why.contains("no second copy"), "{why}");
        // the target reports a copy: a's last report (before it went away) says it runs w,
        // but that proves nothing since the resolution: b's copy is left alone
        let plan = s.heartbeat("b", &[("w", Running)], vec![]);
        assert!(plan.changes.removals.is_empty(), "{:?}", plan.changes.removals);
        assert!(plan.response.assignments.is_empty());
    }

    #[test]
    fn rule7_a_late_migration_finished_from_the_source_wins() {
        let mut s = State::source_offline_past_deadline();
        s.reported("b", &[("w", Running)]);
        let plan = s.heartbeat("a", &[], vec![event(1, "migration-finished", "w", Some("m1"))]);
        let m = &plan.changes.migrations[0];
        assert_eq!((m.state, m.resolved_by_broker, m.error.as_ref()), (MigrationState::Succeeded, false, None));
        assert_eq!(changed(&plan, "w").unwrap().node, "b", "the home follows the source's word");
        assert!(assigned(&plan, "w").is_none(), "nothing started again on a");
        assert!(plan.events.iter().any(|e| e.kind == "migration-succeeded" && e.message.contains("after the broker")));
        s.apply(&plan);
        let plan_b = s.heartbeat("b", &[("w", Running)], vec![]);
        assert!(plan_b.changes.removals.is_empty(), "b's copy is the home copy now");
    }

    #[test]
    fn rule7_a_source_back_with_the_workload_and_a_late_failure_keeps_it_and_removes_the_targets_copy() {
        let mut s = State::source_offline_past_deadline();
        let plan = s.heartbeat("a", &[("w", Running)], vec![event(1, "migration-failed", "w", Some("m1"))]);
        assert!(plan.changes.migrations.is_empty(), "ended already: a late failure changes nothing");
        assert_eq!(changed(&plan, "w").unwrap().node, "a");
        s.apply(&plan);
        // a has spoken since the resolution: a leftover on b is a duplicate of a live copy
        let plan_b = s.heartbeat("b", &[("w", Running)], vec![]);
        assert!(plan_b.changes.removals[0].reason.contains("runs on its home a"), "{:?}", plan_b.changes.removals);
    }

    #[test]
    fn rule7_a_source_back_without_the_workload_and_without_its_event_is_not_restarted_when_the_target_runs_it() {
        let mut s = State::source_offline_past_deadline();
        s.reported("b", &[("w", Running)]);
        // a's migration-finished was lost (a power cut on the broker before a sync)
        let plan = s.heartbeat("a", &[], vec![]);
        assert!(assigned(&plan, "w").is_none(), "a Running here would start a second copy");
        assert_eq!(changed(&plan, "w").unwrap().node, "b");
        let m = &plan.changes.migrations[0];
        assert_eq!((m.state, m.resolved_by_broker), (MigrationState::Succeeded, false));
        assert_eq!(kinds(&plan), ["node-online", "migration-succeeded"]);
        // b does not run it either: a restarts it (its home), as for any missing home copy
        let mut s = State::source_offline_past_deadline();
        s.reported("b", &[]);
        let plan = s.heartbeat("a", &[], vec![]);
        assert_eq!(assigned(&plan, "w").map(|a| a.desired), Some(Desired::Running));
    }

    #[test]
    fn rule7_cancel_ends_a_pending_or_offline_one_and_has_the_source_abort_one_under_way() {
        let s = State::moving_w_from_a_to_b(MigrationState::Pending);
        let (m, e) = cancel(&s.migrations["m1"], true, NOW).unwrap();
        assert_eq!((m.state, m.resolved_by_broker, m.finished_ms), (MigrationState::Cancelled, true, Some(NOW)));
        assert_eq!(e.kind, "migration-cancelled");
        let mut s2 = State::moving_w_from_a_to_b(MigrationState::Pending);
        s2.migrations.insert(m.id.clone(), m.clone());
        let plan = s2.heartbeat("a", &[("w", Running)], vec![]);
        assert!(plan.response.migrations.is_empty(), "a cancelled migration is never delivered");
        assert!(!m.state.is_active());
        // ended: 409
        let e = cancel(&m, true, NOW).unwrap_err();
        assert_eq!(e.error.code, ErrorCode::Conflict);
        assert!(e.error.message.contains("already ended: cancelled"), "{}", e.error.message);
        // running on an online source: still running, the order carries the cancel, and
        // the source's migration-failed ends it cancelled
        let s = State::moving_w_from_a_to_b(MigrationState::Running);
        let (asked, e) = cancel(&s.migrations["m1"], true, NOW).unwrap();
        assert_eq!(
            (asked.state, asked.cancel_requested_ms, e.kind),
            (MigrationState::Running, Some(NOW), "migration-cancelling")
        );
        let again = cancel(&asked, true, NOW + 5).unwrap().0;
        assert_eq!(again.cancel_requested_ms, Some(NOW), "asked again: the same request");
        let mut s2 = State::moving_w_from_a_to_b(MigrationState::Running);
        s2.migrations.insert(asked.id.clone(), asked.clone());
        let plan = s2.heartbeat("a", &[("w", Running)], vec![]);
        assert!(
            plan.response.migrations.len() == 1 && plan.response.migrations[0].cancel,
            "{:?}",
            plan.response.migrations
        );
        let plan = s2.heartbeat("a", &[("w", Running)], vec![event(1, "migration-failed", "w", Some("m1"))]);
        assert!(kinds(&plan).contains(&"migration-cancelled"), "{:?}", kinds(&plan));
        let ended = plan.changes.migrations.iter().find(|m| m.id == "m1").unwrap();
        assert_eq!(ended.state, MigrationState::Cancelled);
        // running on an offline source: cancelled, kept where the source reports it
        let (m, _) = cancel(&s.migrations["m1"], false, NOW).unwrap();
        assert_eq!(m.state, MigrationState::Cancelled);
        assert!(m.error.as_deref().unwrap().contains("kept where a last reported it"), "{:?}", m.error);
    }

    fn kinds(plan: &Plan) -> Vec<&str> {
        plan.events.iter().map(|e| e.kind).collect()
    }

    fn assigned<'a>(plan: &'a Plan, workload: &str) -> Option<&'a Assignment> {
        plan.response.assignments.iter().find(|a| a.spec.name == workload)
    }

    fn changed<'a>(plan: &'a Plan, workload: &str) -> Option<&'a WorkloadRecord> {
        plan.changes.workloads.iter().find(|w| w.spec.name == workload)
    }

    #[test]
    fn rule1_events_apply_once_in_order_and_a_finished_migration_moves_the_home() {
        let mut s = State::moving_w_from_a_to_b(MigrationState::Running);
        s.reported("b", &[("w", Running)]);
        // out of order, as a retrying agent might send them
        let plan = s.heartbeat(
            "a",
            &[],
            vec![event(2, "migration-finished", "w", Some("m1")), event(1, "workload-checkpointed", "w", None)],
        );
        assert_eq!(plan.response.acked_seq, 2);
        assert_eq!(plan.changes.nodes[0].acked_seq, 2, "acked_seq is written with the events");
        let stored: Vec<(&str, u64)> = plan.changes.events.iter().map(|(n, e)| (n.as_str(), e.seq)).collect();
        assert_eq!(stored, [("a", 1), ("a", 2)]);
        let m = &plan.changes.migrations[0];
        assert_eq!((m.state, m.finished_ms), (MigrationState::Succeeded, Some(NOW)));
        let w = changed(&plan, "w").unwrap();
        assert_eq!(w.node, "b", "the home moves to the target");
        assert_eq!(w.status.as_ref().map(|s| s.state), Some(Running), "the target's own report");
        assert_eq!(w.last_event.as_deref(), Some("migration-finished on a: event 2"), "the last event applied");
        assert_eq!(kinds(&plan), ["migration-succeeded"]);
        assert!(assigned(&plan, "w").is_none(), "w is no longer a's");
        assert!(plan.changes.forget_workloads.is_empty());
    }

    #[test]
    fn rule1_a_failed_migration_keeps_the_home() {
        let s = State::moving_w_from_a_to_b(MigrationState::Running);
        // no migration id: the workload's active migration from this node
        let plan = s.heartbeat("a", &[("w", Running)], vec![event(1, "migration-failed", "w", None)]);
        let m = &plan.changes.migrations[0];
        assert_eq!(m.state, MigrationState::Failed);
        assert_eq!(m.error.as_deref(), Some("event 1"));
        assert_eq!(changed(&plan, "w").unwrap().node, "a");
        assert!(kinds(&plan).contains(&"migration-failed"));
        assert_eq!(assigned(&plan, "w").map(|a| a.desired), Some(Desired::Running), "no longer in flight");
        assert!(plan.response.migrations.is_empty(), "the order is over");
    }

    /// A source that got no answer after a commit that may have arrived reports the move
    /// in doubt: it stays running (no Running assignment for the stopped source, which
    /// would start a second copy beside a committed one), and the workload says why.
    #[test]
    fn rule1_a_move_in_doubt_stays_open_and_starts_nothing() {
        let s = State::moving_w_from_a_to_b(MigrationState::Running);
        let plan = s.heartbeat("a", &[], vec![event(1, "migration-in-doubt", "w", Some("m1"))]);
        assert!(plan.changes.migrations.is_empty(), "the migration is not ended: {:?}", plan.changes.migrations);
        assert!(assigned(&plan, "w").is_none(), "a stopped source in doubt must not be started again");
        assert_eq!(changed(&plan, "w").unwrap().last_event.as_deref(), Some("migration-in-doubt on a: event 1"));
    }

    #[test]
    fn duplicate_events_at_or_below_acked_seq_are_ignored() {
        let mut s = State::with_nodes(&["a"]);
        s.workload("w", "a", Desired::Running);
        s.nodes.get_mut("a").unwrap().acked_seq = 5;
        let failed = |seq| event(seq, "workload-failed", "w", None);
        let plan = s.heartbeat("a", &[("w", Running)], vec![failed(4), failed(5)]);
        assert!(plan.changes.events.is_empty());
        assert_eq!(plan.response.acked_seq, 5);
        assert!(!kinds(&plan).contains(&"workload-failed"));
        assert!(changed(&plan, "w").unwrap().last_event.is_none());
        // a retried heartbeat carrying an old and a new one: the new one only, once
        let plan = s.heartbeat("a", &[("w", Running)], vec![failed(5), failed(6)]);
        assert_eq!(plan.changes.events.len(), 1);
        assert_eq!(plan.response.acked_seq, 6);
        assert_eq!(kinds(&plan).iter().filter(|k| **k == "workload-failed").count(), 1);
        s.apply(&plan);
        let again = s.heartbeat("a", &[("w", Running)], vec![failed(6)]);
        assert!(again.changes.events.is_empty() && !kinds(&again).contains(&"workload-failed"));
    }

    #[test]
    fn rule2_home_copies_update_their_status_and_missing_ones_are_assigned_again() {
        let mut s = State::with_nodes(&["a"]);
        s.workload("up", "a", Desired::Running);
        s.workload("down", "a", Desired::Running);
        s.workload("gone", "a", Desired::Running);
        s.workloads.get_mut("gone").unwrap().status = Some(status("gone", Running));
        let plan = s.heartbeat("a", &[("up", Running), ("down", Stopped)], vec![]);
        assert_eq!(changed(&plan, "up").unwrap().status.as_ref().map(|s| s.state), Some(Running));
        assert_eq!(changed(&plan, "up").unwrap().status_ms, Some(NOW));
        assert_eq!(kinds(&plan), ["workload-running", "workload-stopped"]);
        let gone = changed(&plan, "gone").unwrap();
        assert_eq!((gone.status.as_ref(), gone.status_ms), (None, Some(NOW)), "not there any more");
        for w in ["up", "down", "gone"] {
            let a = assigned(&plan, w).unwrap();
            assert_eq!((a.desired, a.runtime), (Desired::Running, Some(RuntimeKind::Containerd)), "{w}");
        }
        // the same report again: nothing to announce
        s.apply(&plan);
        let plan = s.heartbeat("a", &[("up", Running), ("down", Stopped)], vec![]);
        assert!(plan.events.is_empty(), "{:?}", plan.events);
        assert_eq!(plan.response.assignments.len(), 3);
    }

    #[test]
    fn rule2_a_removed_workload_is_forgotten_once_reported_gone() {
        let mut s = State::with_nodes(&["a"]);
        s.workload("w", "a", Desired::Removed);
        let plan = s.heartbeat("a", &[("w", Running)], vec![]);
        assert_eq!(assigned(&plan, "w").map(|a| a.desired), Some(Desired::Removed));
        assert!(plan.changes.forget_workloads.is_empty());
        s.apply(&plan);
        let plan = s.heartbeat("a", &[], vec![]);
        assert_eq!(plan.changes.forget_workloads, ["w"]);
        assert!(changed(&plan, "w").is_none(), "forgotten, not written back");
        assert!(assigned(&plan, "w").is_none());
        assert_eq!(kinds(&plan), ["workload-removed"]);
    }

    #[test]
    fn rule3_the_target_of_an_active_migration_keeps_its_provisional_copy() {
        let mut s = State::moving_w_from_a_to_b(MigrationState::Running);
        // even while the source still reports it running
        s.reported("a", &[("w", Running)]);
        let plan = s.heartbeat("b", &[("w", Running)], vec![]);
        assert!(plan.changes.removals.is_empty());
        assert!(plan.response.assignments.is_empty());
        assert!(plan.events.is_empty(), "{:?}", plan.events);
        assert!(plan.changes.workloads.is_empty(), "its status is the home's");
    }

    #[test]
    fn rule3_a_stale_copy_on_the_source_of_a_succeeded_migration_is_removed() {
        let mut s = State::with_nodes(&["a", "b"]);
        s.workload("w", "b", Desired::Running);
        s.migration("m1", "w", "a", "b", MigrationState::Succeeded);
        let plan = s.heartbeat("a", &[("w", Running)], vec![]);
        let r = &plan.changes.removals[0];
        assert_eq!((r.node.as_str(), r.workload.as_str(), r.since_ms), ("a", "w", NOW));
        assert!(r.reason.contains("moved to b by migration m1"), "{}", r.reason);
        let a = assigned(&plan, "w").unwrap();
        assert_eq!((a.desired, a.runtime.as_ref()), (Desired::Removed, None));
        assert_eq!(kinds(&plan), ["workload-stale-copy"]);
        // still there next time: the order stands, nothing new is recorded
        s.apply(&plan);
        let plan = s.heartbeat("a", &[("w", Stopped)], vec![]);
        assert!(plan.changes.removals.is_empty() && plan.events.is_empty());
        assert_eq!(assigned(&plan, "w").map(|a| a.desired), Some(Desired::Removed));
        // gone: the removal is done
        s.apply(&plan);
        let plan = s.heartbeat("a", &[], vec![]);
        assert_eq!(plan.changes.drop_removals, [("a".to_string(), "w".to_string())]);
        assert!(plan.response.assignments.is_empty());
        assert!(plan.changes.workloads.is_empty(), "the home's record is untouched");
    }

    #[test]
    fn rule3_a_copy_elsewhere_is_removed_only_while_its_home_runs_it() {
        let mut s = State::with_nodes(&["a", "b"]);
        s.workload("w", "a", Desired::Running);
        s.reported("a", &[("w", Running)]);
        let plan = s.heartbeat("b", &[("w", Running)], vec![]);
        assert!(plan.changes.removals[0].reason.contains("runs on its home a"), "{:?}", plan.changes.removals);
        assert_eq!(assigned(&plan, "w").map(|a| a.desired), Some(Desired::Removed));
        // the home reports it stopped: b's copy may be the only live one, it stays
        s.reported("a", &[("w", Stopped)]);
        let plan = s.heartbeat("b", &[("w", Running)], vec![]);
        assert!(plan.changes.removals.is_empty());
        assert!(plan.response.assignments.is_empty());
        assert!(plan.events.is_empty());
    }

    #[test]
    fn rule4_unknown_workloads_are_shown_as_unmanaged_and_left_alone() {
        let mut s = State::with_nodes(&["a"]);
        s.workload("w", "a", Desired::Running);
        let plan = s.heartbeat("a", &[("w", Running), ("by-hand", Running)], vec![]);
        // the node view lists what the node reports that the broker does not manage
        let reported: Vec<&str> = plan.changes.nodes[0].reported.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(reported, ["w", "by-hand"]);
        assert!(changed(&plan, "by-hand").is_none());
        assert!(assigned(&plan, "by-hand").is_none());
        assert!(plan.changes.removals.is_empty());
        assert_eq!(kinds(&plan), ["workload-running"], "nothing about by-hand");
    }

    #[test]
    fn rule5_an_in_flight_migration_withholds_assignments_and_its_order_repeats() {
        let mut s = State::moving_w_from_a_to_b(MigrationState::Pending);
        s.workload("other", "a", Desired::Running);
        let plan = s.heartbeat("a", &[("w", Running), ("other", Running)], vec![]);
        assert!(assigned(&plan, "w").is_none(), "the source agent decides");
        assert!(assigned(&plan, "other").is_some());
        let o = &plan.response.migrations[0];
        assert_eq!((o.id.as_str(), o.workload.as_str(), o.target_node.as_str()), ("m1", "w", "b"));
        assert_eq!(o.target_api, "b:7071");
        let m = &plan.changes.migrations[0];
        assert_eq!((m.state, m.delivered_ms), (MigrationState::Running, Some(NOW)));
        assert!(kinds(&plan).contains(&"migration-started"));
        s.apply(&plan);
        // the target gets nothing for it either
        let plan_b = s.heartbeat("b", &[], vec![]);
        assert!(plan_b.response.assignments.is_empty() && plan_b.response.migrations.is_empty());
        // repeated until the outcome arrives, announced once
        let again = s.heartbeat("a", &[("w", Running), ("other", Running)], vec![]);
        assert_eq!(again.response.migrations, plan.response.migrations);
        assert!(again.changes.migrations.is_empty());
        assert!(!kinds(&again).contains(&"migration-started"));
        assert!(assigned(&again, "w").is_none());
    }

    #[test]
    fn a_migration_whose_source_reports_the_workload_gone_is_not_restarted() {
        // the source handed w over; its migration-finished event has not arrived yet
        let mut s = State::moving_w_from_a_to_b(MigrationState::Running);
        s.workloads.get_mut("w").unwrap().status = Some(status("w", Running));
        let plan = s.heartbeat("a", &[], vec![]);
        assert!(assigned(&plan, "w").is_none(), "a Running here would start a duplicate");
        assert!(plan.changes.forget_workloads.is_empty());
        let w = changed(&plan, "w").unwrap();
        assert_eq!((w.node.as_str(), w.status.as_ref()), ("a", None), "home unchanged until the event");
        assert_eq!(plan.response.migrations.len(), 1, "the order stands");
        // the event arrives in the next heartbeat: the home moves, still no restart here
        s.apply(&plan);
        let plan = s.heartbeat("a", &[], vec![event(1, "migration-finished", "w", Some("m1"))]);
        assert_eq!(changed(&plan, "w").unwrap().node, "b");
        assert!(plan.response.assignments.is_empty() && plan.response.migrations.is_empty());
    }

    #[test]
    fn rule6_an_agent_back_after_a_long_absence_keeps_its_work() {
        let mut s = State::with_nodes(&["a", "b"]);
        s.workload("w", "a", Desired::Running);
        s.nodes.get_mut("a").unwrap().last_seen_ms = NOW - 86_400_000;
        s.announced_online.remove("a");
        // meanwhile the other node gets nothing of a's
        let plan_b = s.heartbeat("b", &[], vec![]);
        assert!(plan_b.response.assignments.is_empty());
        assert!(plan_b.events.is_empty(), "b was announced already");
        let plan = s.heartbeat("a", &[("w", Running)], vec![]);
        assert_eq!(kinds(&plan), ["node-online", "workload-running"], "announced first");
        assert_eq!(plan.changes.nodes[0].last_seen_ms, NOW);
        assert_eq!(changed(&plan, "w").unwrap().node, "a");
        assert_eq!(assigned(&plan, "w").map(|a| a.desired), Some(Desired::Running));
    }

    #[test]
    fn rule8_after_a_restart_orders_and_removals_are_delivered_again() {
        // the state as a restarted broker loads it: an order delivered, a removal pending
        let mut s = State::with_nodes(&["a", "b"]);
        s.workload("w", "a", Desired::Running);
        s.workload("old", "b", Desired::Running);
        s.migration("m1", "w", "a", "b", MigrationState::Running);
        s.migration("m0", "old", "a", "b", MigrationState::Succeeded);
        s.nodes.get_mut("a").unwrap().acked_seq = 3;
        let plan = s.heartbeat("a", &[("w", Running), ("old", Running)], vec![]);
        s.apply(&plan);
        let before = s.removals.clone();
        let plan = s.heartbeat("a", &[("w", Running), ("old", Running)], vec![]);
        assert_eq!(plan.response.migrations.len(), 1);
        assert!(plan.changes.migrations.is_empty(), "delivered before: no new state");
        assert_eq!(assigned(&plan, "old").map(|a| a.desired), Some(Desired::Removed));
        assert!(plan.changes.removals.is_empty() && s.removals == before);
        // every heartbeat writes the node (last seen, acked seq) before its answer
        assert_eq!(plan.changes.nodes.len(), 1);
        assert_eq!(plan.changes.nodes[0].acked_seq, 3);
        assert_eq!(plan.response.acked_seq, 3);
    }
}
