//! The agent's own state, in SQLite (WAL): its registration with the broker, the
//! events the broker has not acknowledged yet, and the incoming copies not yet final. It survives agent restarts and broker
//! outages alike, which is what lets the agent work offline and reconcile later.

use std::path::Path;
use std::sync::Mutex;

use away_migrate::journal::OutgoingMove;
use away_migrate::target::{MoveRecord, MoveState};
use away_model::{AgentEvent, RegisterResponse};
use rusqlite::{params, Connection, OptionalExtension};

#[derive(Debug, thiserror::Error)]
#[error("agent state {path}")]
pub struct StateError {
    pub path: String,
    #[source]
    pub source: rusqlite::Error,
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

pub struct AgentState {
    db: Mutex<Connection>,
    path: String,
}

impl AgentState {
    pub fn open(path: &Path) -> Result<AgentState, StateError> {
        let p = path.display().to_string();
        let err = |source| StateError { path: p.clone(), source };
        // it holds the cluster's token: the owner's only, from its creation on
        away_identity::private_file(path).map_err(|e| StateError {
            path: p.clone(),
            source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
        })?;
        let db = Connection::open(path).map_err(err)?;
        db.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=FULL;
             CREATE TABLE IF NOT EXISTS registration (broker TEXT PRIMARY KEY, response TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, event TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS provisional (transfer_id TEXT PRIMARY KEY, workload TEXT NOT NULL, runtime TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS moves (transfer_id TEXT PRIMARY KEY, workload TEXT NOT NULL,
                 runtime TEXT NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', at_ms INTEGER NOT NULL);
             -- an older agent's provisional copies are prepared moves
             INSERT OR IGNORE INTO moves (transfer_id, workload, runtime, state, at_ms)
                 SELECT transfer_id, workload, runtime, 'prepared', 0 FROM provisional;
             DELETE FROM provisional;
             CREATE TABLE IF NOT EXISTS announced (transfer_id TEXT PRIMARY KEY, workload TEXT NOT NULL,
                 source TEXT NOT NULL, secret TEXT NOT NULL, at_ms INTEGER NOT NULL);
             -- this node's outgoing moves (away_migrate::journal), as the source sees them
             CREATE TABLE IF NOT EXISTS outgoing (transfer_id TEXT PRIMARY KEY, migration_id TEXT,
                 target_api TEXT NOT NULL, state TEXT NOT NULL, record TEXT NOT NULL, at_ms INTEGER NOT NULL);",
        )
        .map_err(err)?;
        Ok(AgentState { db: Mutex::new(db), path: p })
    }

    fn err(&self, source: rusqlite::Error) -> StateError {
        StateError { path: self.path.clone(), source }
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The registration with `broker`, if the agent has one.
    pub fn registration(&self, broker: &str) -> Result<Option<RegisterResponse>, StateError> {
        let json: Option<String> = self
            .db()
            .query_row("SELECT response FROM registration WHERE broker = ?1", [broker], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(json.and_then(|j| serde_json::from_str(&j).ok()))
    }

    pub fn save_registration(&self, broker: &str, r: &RegisterResponse) -> Result<(), StateError> {
        let json = serde_json::to_string(r).unwrap_or_default();
        self.db()
            .execute("INSERT OR REPLACE INTO registration (broker, response) VALUES (?1, ?2)", params![broker, json])
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    pub fn forget_registration(&self, broker: &str) -> Result<(), StateError> {
        self.db().execute("DELETE FROM registration WHERE broker = ?1", [broker]).map(|_| ()).map_err(|e| self.err(e))
    }

    /// Queue an event; its `seq` is assigned here (monotonic across restarts).
    pub fn push_event(&self, mut event: AgentEvent) -> Result<AgentEvent, StateError> {
        let db = self.db();
        db.execute("INSERT INTO events (event) VALUES ('{}')", []).map_err(|e| self.err(e))?;
        let seq = db.last_insert_rowid() as u64;
        event.seq = seq;
        db.execute(
            "UPDATE events SET event = ?1 WHERE seq = ?2",
            params![serde_json::to_string(&event).unwrap_or_default(), seq as i64],
        )
        .map_err(|e| self.err(e))?;
        Ok(event)
    }

    /// Events not yet acknowledged, oldest first (at most `limit`).
    pub fn pending_events(&self, limit: usize) -> Result<Vec<AgentEvent>, StateError> {
        let db = self.db();
        let mut stmt = db.prepare("SELECT event FROM events ORDER BY seq LIMIT ?1").map_err(|e| self.err(e))?;
        let rows = stmt.query_map([limit as i64], |r| r.get::<_, String>(0)).map_err(|e| self.err(e))?;
        Ok(rows.flatten().filter_map(|j| serde_json::from_str(&j).ok()).collect())
    }

    /// An incoming copy that is not final yet (its source may still resume its own):
    /// the move is `prepared`.
    pub fn hold_provisional(&self, transfer_id: &str, workload: &str, runtime: &str) -> Result<(), StateError> {
        self.db()
            .execute(
                "INSERT OR REPLACE INTO moves (transfer_id, workload, runtime, state, reason, at_ms)
                 VALUES (?1, ?2, ?3, 'prepared', '', ?4)",
                params![transfer_id, workload, runtime, now_ms()],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// The move ends: `committed` or `aborted` (with why), for good. A move that already
    /// ended keeps its first end (false then): a commit never follows an abort, nor the
    /// other way round.
    pub fn end_move(&self, transfer_id: &str, state: MoveState, reason: &str) -> Result<bool, StateError> {
        self.db()
            .execute(
                "UPDATE moves SET state = ?2, reason = ?3, at_ms = ?4 WHERE transfer_id = ?1 AND state = 'prepared'",
                params![transfer_id, state.as_str(), reason, now_ms()],
            )
            .map(|n| n == 1)
            .map_err(|e| self.err(e))
    }

    /// What became of move `transfer_id` (None: never heard of).
    pub fn move_record(&self, transfer_id: &str) -> Result<Option<MoveRecord>, StateError> {
        self.db()
            .query_row("SELECT workload, state, reason FROM moves WHERE transfer_id = ?1", [transfer_id], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
            })
            .optional()
            .map(|row| {
                row.map(|(workload, state, reason)| MoveRecord {
                    transfer_id: transfer_id.to_string(),
                    workload,
                    // written by this module only
                    state: MoveState::parse(&state).unwrap_or(MoveState::Aborted),
                    reason,
                })
            })
            .map_err(|e| self.err(e))
    }

    /// Moves a previous run of the agent left prepared: (transfer id, workload, runtime).
    pub fn provisional_left(&self) -> Result<Vec<(String, String, String)>, StateError> {
        let db = self.db();
        let mut stmt = db
            .prepare("SELECT transfer_id, workload, runtime FROM moves WHERE state = 'prepared' ORDER BY transfer_id")
            .map_err(|e| self.err(e))?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).map_err(|e| self.err(e))?;
        Ok(rows.flatten().collect())
    }

    /// Forget ended moves older than `keep_ms` (their sources have long had the answer).
    pub fn prune_moves(&self, keep_ms: u64) -> Result<usize, StateError> {
        self.db()
            .execute(
                "DELETE FROM moves WHERE state != 'prepared' AND at_ms <= ?1",
                [now_ms().saturating_sub(keep_ms as i64)],
            )
            .map_err(|e| self.err(e))
    }

    /// An announced incoming move (kept so that a transfer cut by an agent restart
    /// resumes with the secret its source holds).
    pub fn save_announced(&self, transfer_id: &str, a: &crate::Announced) -> Result<(), StateError> {
        self.db()
            .execute(
                "INSERT OR REPLACE INTO announced (transfer_id, workload, source, secret, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![transfer_id, a.workload, a.source, a.secret.expose(), a.at_ms],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Announcements made since `since_ms`; older ones are deleted.
    pub fn announced_since(&self, since_ms: i64) -> Result<Vec<(String, crate::Announced)>, StateError> {
        let db = self.db();
        db.execute("DELETE FROM announced WHERE at_ms < ?1", [since_ms]).map_err(|e| self.err(e))?;
        let mut stmt = db
            .prepare("SELECT transfer_id, workload, source, secret, at_ms FROM announced")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    crate::Announced {
                        workload: r.get(1)?,
                        source: r.get(2)?,
                        secret: away_migrate::transfer::MoveSecret::from_string(r.get(3)?),
                        at_ms: r.get(4)?,
                    },
                ))
            })
            .map_err(|e| self.err(e))?;
        Ok(rows.flatten().collect())
    }

    pub fn forget_announced(&self, transfer_id: &str) -> Result<(), StateError> {
        self.db()
            .execute("DELETE FROM announced WHERE transfer_id = ?1", [transfer_id])
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Write an outgoing move's step (the first write names the broker's migration and
    /// the target's API address; later ones keep them).
    pub fn save_outgoing(
        &self,
        m: &OutgoingMove,
        migration_id: Option<&str>,
        target_api: &str,
    ) -> Result<(), StateError> {
        let record = serde_json::to_string(m).unwrap_or_default();
        self.db()
            .execute(
                "INSERT INTO outgoing (transfer_id, migration_id, target_api, state, record, at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(transfer_id) DO UPDATE SET state = ?4, record = ?5, at_ms = ?6",
                params![m.transfer_id, migration_id, target_api, m.state.as_str(), record, now_ms()],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Outgoing moves: (the move, the broker's migration id, the target's API address),
    /// the open ones only (not done, not aborted) unless `all`, oldest first.
    pub fn outgoing(&self, all: bool) -> Result<Vec<(OutgoingMove, Option<String>, String)>, StateError> {
        let db = self.db();
        let mut stmt = db
            .prepare(
                "SELECT record, migration_id, target_api FROM outgoing
                 WHERE ?1 OR state NOT IN ('done', 'aborted') ORDER BY at_ms",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([all], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?, r.get::<_, String>(2)?)))
            .map_err(|e| self.err(e))?;
        Ok(rows
            .flatten()
            .filter_map(|(json, id, api)| serde_json::from_str(&json).ok().map(|m| (m, id, api)))
            .collect())
    }

    /// Forget outgoing moves that ended more than `keep_ms` ago.
    pub fn prune_outgoing(&self, keep_ms: u64) -> Result<usize, StateError> {
        self.db()
            .execute(
                "DELETE FROM outgoing WHERE state IN ('done', 'aborted') AND at_ms <= ?1",
                [now_ms().saturating_sub(keep_ms as i64)],
            )
            .map_err(|e| self.err(e))
    }

    /// The broker stored every event up to `seq`: drop them.
    pub fn ack(&self, seq: u64) -> Result<(), StateError> {
        self.db().execute("DELETE FROM events WHERE seq <= ?1", [seq as i64]).map(|_| ()).map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str) -> AgentEvent {
        AgentEvent {
            seq: 0,
            at_ms: 1,
            kind: kind.into(),
            workload: None,
            message: String::new(),
            migration_id: None,
            report: None,
        }
    }

    #[test]
    fn events_queue_survives_reopen_and_acks_drop_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        {
            let s = AgentState::open(&path).unwrap();
            assert_eq!(s.push_event(event("a")).unwrap().seq, 1);
            assert_eq!(s.push_event(event("b")).unwrap().seq, 2);
            s.save_registration(
                "http://b",
                &RegisterResponse {
                    agent_token: "t".into(),
                    cluster_token: "c".into(),
                    heartbeat_interval_ms: 1000,
                    certificate: None,
                    ca: None,
                },
            )
            .unwrap();
        }
        let s = AgentState::open(&path).unwrap();
        let pending = s.pending_events(10).unwrap();
        assert_eq!(pending.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        s.ack(1).unwrap();
        assert_eq!(s.pending_events(10).unwrap().len(), 1);
        // seq keeps growing after acks and reopen: the broker never sees a reused number
        assert_eq!(s.push_event(event("c")).unwrap().seq, 3);
        assert_eq!(s.registration("http://b").unwrap().unwrap().agent_token, "t");
    }

    #[test]
    fn provisional_copies_outlive_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        {
            let st = AgentState::open(&path).unwrap();
            st.hold_provisional("t1", "counter", "containerd").unwrap();
            st.hold_provisional("t2", "labdesk", "containerd").unwrap();
            assert!(st.end_move("t2", MoveState::Committed, "").unwrap());
        }
        let st = AgentState::open(&path).unwrap();
        assert_eq!(st.provisional_left().unwrap(), vec![("t1".into(), "counter".into(), "containerd".into())]);
        assert_eq!(st.move_record("t2").unwrap().unwrap().state, MoveState::Committed);
        assert_eq!(st.move_record("t1").unwrap().unwrap().state, MoveState::Prepared);
        assert!(st.move_record("t3").unwrap().is_none());
    }

    /// One answer per move: the first end sticks, whatever is asked later.
    #[test]
    fn a_move_ends_once() {
        let dir = tempfile::tempdir().unwrap();
        let st = AgentState::open(&dir.path().join("agent.db")).unwrap();
        st.hold_provisional("t1", "counter", "containerd").unwrap();
        assert!(st.end_move("t1", MoveState::Aborted, "lease ran out").unwrap());
        assert!(!st.end_move("t1", MoveState::Committed, "").unwrap());
        let r = st.move_record("t1").unwrap().unwrap();
        assert_eq!((r.state, r.reason.as_str()), (MoveState::Aborted, "lease ran out"));
        // ended moves are forgotten after a while, prepared ones never
        st.hold_provisional("t2", "other", "containerd").unwrap();
        assert_eq!(st.prune_moves(0).unwrap(), 1);
        assert!(st.move_record("t2").unwrap().is_some());
    }

    /// The source's journal: each step overwrites the last, ended moves are not open.
    #[test]
    fn outgoing_moves_outlive_the_agent_until_they_end() {
        use away_migrate::journal::OutgoingState;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let m = OutgoingMove {
            transfer_id: "t1".into(),
            workload: "counter".into(),
            kind: Default::default(),
            target_node: "b".into(),
            state: OutgoingState::Checkpointing,
            payload: "/x".into(),
            archive: None,
            set_aside: None,
            lease_ms: None,
            at_ms: 1,
            page_server: None,
        };
        {
            let st = AgentState::open(&path).unwrap();
            st.save_outgoing(&m, Some("m1"), "10.0.0.2:7800").unwrap();
            st.save_outgoing(&m.with_state(OutgoingState::Sent), None, "").unwrap();
            st.save_outgoing(
                &OutgoingMove { transfer_id: "t2".into(), ..m.with_state(OutgoingState::Done) },
                None,
                "a",
            )
            .unwrap();
        }
        let st = AgentState::open(&path).unwrap();
        let open = st.outgoing(false).unwrap();
        assert_eq!(open.len(), 1);
        let (got, id, api) = &open[0];
        assert_eq!((got.state, id.as_deref(), api.as_str()), (OutgoingState::Sent, Some("m1"), "10.0.0.2:7800"));
        assert_eq!(st.outgoing(true).unwrap().len(), 2);
        assert_eq!(st.prune_outgoing(0).unwrap(), 1);
        assert_eq!(st.outgoing(true).unwrap().len(), 1);
    }

    /// An older agent's provisional copies are read as prepared moves.
    #[test]
    fn an_older_journal_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        {
            let db = Connection::open(&path).unwrap();
            db.execute_batch(
                "CREATE TABLE provisional (transfer_id TEXT PRIMARY KEY, workload TEXT NOT NULL, runtime TEXT NOT NULL);
                 INSERT INTO provisional VALUES ('t1', 'counter', 'containerd');",
            )
            .unwrap();
        }
        let st = AgentState::open(&path).unwrap();
        assert_eq!(st.provisional_left().unwrap(), vec![("t1".into(), "counter".into(), "containerd".into())]);
    }
}
