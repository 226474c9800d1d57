//! The agent's own state, in SQLite (WAL): its registration with the broker, the
//! events the broker has not acknowledged yet, and the incoming copies not yet final. It survives agent restarts and broker
//! outages alike, which is what lets the agent work offline and reconcile later.

use std::path::Path;
use std::sync::Mutex;

use away_model::{AgentEvent, RegisterResponse};
use rusqlite::{params, Connection, OptionalExtension};

#[derive(Debug, thiserror::Error)]
#[error("agent state {path}")]
pub struct StateError {
    pub path: String,
    #[source]
    pub source: rusqlite::Error,
}

pub struct AgentState {
    db: Mutex<Connection>,
    path: String,
}

impl AgentState {
    pub fn open(path: &Path) -> Result<AgentState, StateError> {
        let p = path.display().to_string();
        let err = |source| StateError { path: p.clone(), source };
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let db = Connection::open(path).map_err(err)?;
        db.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=FULL;
             CREATE TABLE IF NOT EXISTS registration (broker TEXT PRIMARY KEY, response TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, event TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS provisional (transfer_id TEXT PRIMARY KEY, workload TEXT NOT NULL, runtime TEXT NOT NULL);",
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

    /// An incoming copy that is not final yet (its source may still resume its own).
    pub fn hold_provisional(&self, transfer_id: &str, workload: &str, runtime: &str) -> Result<(), StateError> {
        self.db()
            .execute(
                "INSERT OR REPLACE INTO provisional (transfer_id, workload, runtime) VALUES (?1, ?2, ?3)",
                params![transfer_id, workload, runtime],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// The copy became final or went.
    pub fn drop_provisional(&self, transfer_id: &str) -> Result<(), StateError> {
        self.db()
            .execute("DELETE FROM provisional WHERE transfer_id = ?1", [transfer_id])
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Copies a previous run of the agent held when it ended: (transfer id, workload, runtime).
    pub fn provisional_left(&self) -> Result<Vec<(String, String, String)>, StateError> {
        let db = self.db();
        let mut stmt = db
            .prepare("SELECT transfer_id, workload, runtime FROM provisional ORDER BY transfer_id")
            .map_err(|e| self.err(e))?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).map_err(|e| self.err(e))?;
        Ok(rows.flatten().collect())
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
                &RegisterResponse { agent_token: "t".into(), cluster_token: "c".into(), heartbeat_interval_ms: 1000 },
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
            st.drop_provisional("t2").unwrap();
        }
        let st = AgentState::open(&path).unwrap();
        assert_eq!(st.provisional_left().unwrap(), vec![("t1".into(), "counter".into(), "containerd".into())]);
    }
}
