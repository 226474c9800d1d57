//! The broker's state in one SQLite file (WAL mode). Records are JSON in a `record`
//! column beside the columns queries use; every change of a request is written in one
//! transaction before the request is answered, so a broker killed at any point
//! restarts with what it acknowledged.

use std::path::{Path, PathBuf};

use away_model::AgentEvent;
use rusqlite::{params, Connection, OptionalExtension};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::records::{
    CertificateRecord, JoinTokenRecord, MigrationRecord, NodeRecord, Removal, UserTokenRecord, WorkloadRecord,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}")]
    Sql {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database {path}: cannot create its directory")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("database {path}: corrupt {what} record")]
    Corrupt {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS nodes (name TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (node TEXT PRIMARY KEY, sha256 TEXT NOT NULL, created_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS workloads (
    name TEXT PRIMARY KEY, node TEXT NOT NULL, desired TEXT NOT NULL,
    spec TEXT NOT NULL, status TEXT, decision TEXT NOT NULL, record TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS workloads_node ON workloads(node);
CREATE TABLE IF NOT EXISTS migrations (
    id TEXT PRIMARY KEY, workload TEXT NOT NULL, source TEXT NOT NULL, target TEXT NOT NULL,
    state TEXT NOT NULL, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS removals (node TEXT NOT NULL, workload TEXT NOT NULL, record TEXT NOT NULL,
    PRIMARY KEY (node, workload));
CREATE TABLE IF NOT EXISTS agent_events (node TEXT NOT NULL, seq INTEGER NOT NULL, at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL, workload TEXT, migration_id TEXT, record TEXT NOT NULL, PRIMARY KEY (node, seq));
CREATE TABLE IF NOT EXISTS join_tokens (id TEXT PRIMARY KEY, sha256 TEXT NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL, expires_ms INTEGER, revoked_ms INTEGER, label TEXT, used_by TEXT);
CREATE TABLE IF NOT EXISTS overlay_networks (name TEXT PRIMARY KEY, idx INTEGER NOT NULL UNIQUE, vni INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS overlay_leases (network TEXT NOT NULL, owner TEXT NOT NULL, ip TEXT NOT NULL,
    PRIMARY KEY (network, owner), UNIQUE (network, ip));
";

/// Node certificates the CA issued, by serial: revoking a node revokes its serials, and
/// the broker's revocation list is made from the revoked ones. Its own statement (a
/// migration of older databases: `CREATE TABLE IF NOT EXISTS`).
const CERTIFICATES_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS node_certificates (serial TEXT PRIMARY KEY, node TEXT NOT NULL,
    key_id TEXT NOT NULL, issued_ms INTEGER NOT NULL, revoked_ms INTEGER);
CREATE INDEX IF NOT EXISTS node_certificates_node ON node_certificates(node);
";

/// Per-user tokens (`POST /v1/user-tokens`), a statement of their own: added after the
/// tables above, created on any broker.db that lacks it.
const USER_TOKENS_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS user_tokens (id TEXT PRIMARY KEY, user TEXT NOT NULL, sha256 TEXT NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL, expires_ms INTEGER, revoked_ms INTEGER, label TEXT);
";

/// Every change one request makes, written in one transaction.
#[derive(Debug, Default)]
pub struct Changes {
    pub nodes: Vec<NodeRecord>,
    pub tokens: Vec<(String, String)>,
    pub workloads: Vec<WorkloadRecord>,
    pub forget_workloads: Vec<String>,
    pub migrations: Vec<MigrationRecord>,
    pub removals: Vec<Removal>,
    pub drop_removals: Vec<(String, String)>,
    pub events: Vec<(String, AgentEvent)>,
    /// Join tokens made or revoked.
    pub join_tokens: Vec<JoinTokenRecord>,
    /// Node certificates issued or revoked.
    pub certificates: Vec<CertificateRecord>,
    /// Nodes whose agent token is forgotten (revoked nodes).
    pub forget_tokens: Vec<String>,
    /// User tokens made or revoked.
    pub user_tokens: Vec<UserTokenRecord>,
}

/// Everything, as loaded at start.
#[derive(Debug, Default)]
pub struct Loaded {
    pub nodes: Vec<NodeRecord>,
    pub tokens: Vec<(String, String)>,
    pub workloads: Vec<WorkloadRecord>,
    pub migrations: Vec<MigrationRecord>,
    pub removals: Vec<Removal>,
    pub join_tokens: Vec<JoinTokenRecord>,
    pub certificates: Vec<CertificateRecord>,
    pub user_tokens: Vec<UserTokenRecord>,
}

pub struct Store {
    path: PathBuf,
    conn: Connection,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        // it holds token hashes and every workload's environment: the owner's only, from
        // its creation on (its directory 0700 when made here)
        away_identity::private_file(path)
            .map_err(|e| StoreError::Dir { path: path.to_path_buf(), source: std::io::Error::other(e) })?;
        let sql = |source| StoreError::Sql { path: path.to_path_buf(), source };
        let conn = Connection::open(path).map_err(sql)?;
        // WAL: readers never block the writer. FULL: a commit is on disk before the caller
        // hears of it (NORMAL may lose the last commits to a power cut), because agents delete
        // an event once the broker acknowledged it: an acknowledged `migration-finished` lost
        // here would leave its migration running forever
        conn.pragma_update(None, "journal_mode", "WAL").map_err(sql)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(sql)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(sql)?;
        conn.execute_batch(SCHEMA).map_err(sql)?;
        conn.execute_batch(CERTIFICATES_SCHEMA).map_err(sql)?;
        conn.execute_batch(USER_TOKENS_SCHEMA).map_err(sql)?;
        Ok(Store { path: path.to_path_buf(), conn })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sql(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sql { path: self.path.clone(), source }
    }

    pub fn load(&self) -> Result<Loaded, StoreError> {
        Ok(Loaded {
            nodes: self.records("SELECT record FROM nodes ORDER BY name", "node")?,
            tokens: self.pairs("SELECT node, sha256 FROM tokens")?,
            workloads: self.records("SELECT record FROM workloads ORDER BY name", "workload")?,
            migrations: self.records("SELECT record FROM migrations ORDER BY id", "migration")?,
            removals: self.records("SELECT record FROM removals", "removal")?,
            join_tokens: self.join_tokens()?,
            certificates: self.certificates()?,
            user_tokens: self.user_tokens()?,
        })
    }

    fn certificates(&self) -> Result<Vec<CertificateRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT serial, node, key_id, issued_ms, revoked_ms FROM node_certificates ORDER BY issued_ms, serial",
            )
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(CertificateRecord {
                    serial: r.get(0)?,
                    node: r.get(1)?,
                    key_id: r.get(2)?,
                    issued_ms: r.get::<_, i64>(3)? as u64,
                    revoked_ms: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
                })
            })
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.sql(e))
    }

    fn user_tokens(&self) -> Result<Vec<UserTokenRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, user, sha256, created_ms, expires_ms, revoked_ms, label FROM user_tokens \
                 ORDER BY created_ms, id",
            )
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(UserTokenRecord {
                    id: r.get(0)?,
                    user: r.get(1)?,
                    sha256: r.get(2)?,
                    created_ms: r.get::<_, i64>(3)? as u64,
                    expires_ms: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
                    revoked_ms: r.get::<_, Option<i64>>(5)?.map(|v| v as u64),
                    label: r.get(6)?,
                })
            })
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sql(e))
    }

    fn join_tokens(&self) -> Result<Vec<JoinTokenRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, sha256, created_ms, expires_ms, revoked_ms, label, used_by FROM join_tokens \
                 ORDER BY created_ms, id",
            )
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(JoinTokenRecord {
                    id: r.get(0)?,
                    sha256: r.get(1)?,
                    created_ms: r.get::<_, i64>(2)? as u64,
                    expires_ms: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
                    revoked_ms: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
                    label: r.get(5)?,
                    used_by: r.get(6)?,
                })
            })
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sql(e))
    }

    fn records<T: DeserializeOwned>(&self, query: &str, what: &'static str) -> Result<Vec<T>, StoreError> {
        let mut stmt = self.conn.prepare(query).map_err(|e| self.sql(e))?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(|e| self.sql(e))?;
        let mut out = Vec::new();
        for row in rows {
            let text = row.map_err(|e| self.sql(e))?;
            out.push(serde_json::from_str(&text).map_err(|source| StoreError::Corrupt {
                path: self.path.clone(),
                what,
                source,
            })?);
        }
        Ok(out)
    }

    fn pairs(&self, query: &str) -> Result<Vec<(String, String)>, StoreError> {
        let mut stmt = self.conn.prepare(query).map_err(|e| self.sql(e))?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(|e| self.sql(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sql(e))
    }

    /// The overlay's networks and addresses (crate::overlay).
    pub fn load_overlay(&self) -> Result<(Vec<crate::overlay::NetworkRow>, Vec<crate::overlay::LeaseRow>), StoreError> {
        let mut nets = Vec::new();
        let mut stmt = self.conn.prepare("SELECT name, idx, vni FROM overlay_networks").map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(crate::overlay::NetworkRow {
                    name: r.get(0)?,
                    index: r.get::<_, i64>(1)? as u32,
                    vni: r.get::<_, i64>(2)? as u32,
                })
            })
            .map_err(|e| self.sql(e))?;
        for r in rows {
            nets.push(r.map_err(|e| self.sql(e))?);
        }
        let mut leases = Vec::new();
        let mut stmt = self.conn.prepare("SELECT network, owner, ip FROM overlay_leases").map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))
            .map_err(|e| self.sql(e))?;
        for r in rows {
            let (network, owner, ip) = r.map_err(|e| self.sql(e))?;
            let ip = ip.parse().map_err(|_| {
                self.sql(rusqlite::Error::InvalidColumnType(2, format!("ip {ip:?}"), rusqlite::types::Type::Text))
            })?;
            leases.push(crate::overlay::LeaseRow { network, owner, ip });
        }
        Ok((nets, leases))
    }

    /// Store new networks and addresses, and forget `released` owners' addresses, at once.
    pub fn apply_overlay(&mut self, c: &crate::overlay::IpamChanges, released: &[String]) -> Result<(), StoreError> {
        let path = self.path.clone();
        let sql = |source| StoreError::Sql { path: path.clone(), source };
        let tx = self.conn.transaction().map_err(sql)?;
        for n in &c.networks {
            tx.execute(
                "INSERT INTO overlay_networks (name, idx, vni) VALUES (?1, ?2, ?3)",
                params![n.name, n.index as i64, n.vni as i64],
            )
            .map_err(sql)?;
        }
        for o in released {
            tx.execute("DELETE FROM overlay_leases WHERE owner = ?1", params![o]).map_err(sql)?;
        }
        for l in &c.leases {
            tx.execute(
                "INSERT INTO overlay_leases (network, owner, ip) VALUES (?1, ?2, ?3)",
                params![l.network, l.owner, l.ip.to_string()],
            )
            .map_err(sql)?;
        }
        tx.commit().map_err(sql)
    }

    /// Whether an agent event was already stored (a retried heartbeat carries it again).
    pub fn has_event(&self, node: &str, seq: u64) -> Result<bool, StoreError> {
        self.conn
            .query_row("SELECT 1 FROM agent_events WHERE node = ?1 AND seq = ?2", params![node, seq as i64], |_| Ok(()))
            .optional()
            .map(|r| r.is_some())
            .map_err(|e| self.sql(e))
    }

    /// Write all changes at once, or none.
    pub fn apply(&mut self, c: &Changes) -> Result<(), StoreError> {
        let path = self.path.clone();
        let sql = |source| StoreError::Sql { path: path.clone(), source };
        let tx = self.conn.transaction().map_err(sql)?;
        {
            let mut put_node =
                tx.prepare_cached("INSERT OR REPLACE INTO nodes (name, record) VALUES (?1, ?2)").map_err(sql)?;
            for n in &c.nodes {
                put_node.execute(params![n.name, json(n)]).map_err(sql)?;
            }
            let mut put_token = tx
                .prepare_cached("INSERT OR REPLACE INTO tokens (node, sha256, created_ms) VALUES (?1, ?2, ?3)")
                .map_err(sql)?;
            for (node, hash) in &c.tokens {
                put_token.execute(params![node, hash, crate::records::now_ms() as i64]).map_err(sql)?;
            }
            let mut put_workload = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO workloads (name, node, desired, spec, status, decision, record) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(sql)?;
            for w in &c.workloads {
                put_workload
                    .execute(params![
                        w.spec.name,
                        w.node,
                        json(&w.desired).trim_matches('"'),
                        json(&w.spec),
                        w.status.as_ref().map(json),
                        json(&w.decision),
                        json(w),
                    ])
                    .map_err(sql)?;
            }
            let mut forget = tx.prepare_cached("DELETE FROM workloads WHERE name = ?1").map_err(sql)?;
            for name in &c.forget_workloads {
                forget.execute(params![name]).map_err(sql)?;
            }
            let mut put_migration = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO migrations (id, workload, source, target, state, record) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(sql)?;
            for m in &c.migrations {
                put_migration
                    .execute(params![m.id, m.workload, m.source, m.target, m.state.as_str(), json(m)])
                    .map_err(sql)?;
            }
            let mut put_removal = tx
                .prepare_cached("INSERT OR REPLACE INTO removals (node, workload, record) VALUES (?1, ?2, ?3)")
                .map_err(sql)?;
            for r in &c.removals {
                put_removal.execute(params![r.node, r.workload, json(r)]).map_err(sql)?;
            }
            let mut drop_removal =
                tx.prepare_cached("DELETE FROM removals WHERE node = ?1 AND workload = ?2").map_err(sql)?;
            for (node, workload) in &c.drop_removals {
                drop_removal.execute(params![node, workload]).map_err(sql)?;
            }
            let mut put_event = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO agent_events (node, seq, at_ms, kind, workload, migration_id, record) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(sql)?;
            for (node, e) in &c.events {
                put_event
                    .execute(params![node, e.seq as i64, e.at_ms as i64, e.kind, e.workload, e.migration_id, json(e)])
                    .map_err(sql)?;
            }
            let mut put_join_token = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO join_tokens (id, sha256, created_ms, expires_ms, revoked_ms, label, used_by) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(sql)?;
            for t in &c.join_tokens {
                put_join_token
                    .execute(params![
                        t.id,
                        t.sha256,
                        t.created_ms as i64,
                        t.expires_ms.map(|v| v as i64),
                        t.revoked_ms.map(|v| v as i64),
                        t.label,
                        t.used_by,
                    ])
                    .map_err(sql)?;
            }
            let mut put_certificate = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO node_certificates (serial, node, key_id, issued_ms, revoked_ms) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(sql)?;
            let mut forget_token = tx.prepare_cached("DELETE FROM tokens WHERE node = ?1").map_err(sql)?;
            for node in &c.forget_tokens {
                forget_token.execute(params![node]).map_err(sql)?;
            }
            for c in &c.certificates {
                put_certificate
                    .execute(params![c.serial, c.node, c.key_id, c.issued_ms as i64, c.revoked_ms.map(|v| v as i64)])
                    .map_err(sql)?;
            }
            let mut put_user_token = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO user_tokens (id, user, sha256, created_ms, expires_ms, revoked_ms, label) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(sql)?;
            for t in &c.user_tokens {
                put_user_token
                    .execute(params![
                        t.id,
                        t.user,
                        t.sha256,
                        t.created_ms as i64,
                        t.expires_ms.map(|v| v as i64),
                        t.revoked_ms.map(|v| v as i64),
                        t.label,
                    ])
                    .map_err(sql)?;
            }
        }
        tx.commit().map_err(sql)
    }
}

fn json<T: Serialize>(value: &T) -> String {
    // the records are plain data (strings, numbers, maps with string keys): they always serialize
    serde_json::to_string(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::tests::{all_runtimes, node};
    use crate::records::MigrationState;
    use away_model::{CpuVendor, Desired, RuntimeKind, SpecFormat, Tier, WorkloadSpec};

    #[test]
    fn state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/broker.db");
        let info = node("n1", Tier::Edge, CpuVendor::Amd, &all_runtimes());
        let spec = WorkloadSpec::parse("name: w\nimage: x\n", SpecFormat::Yaml, "t").unwrap();
        let decision =
            away_policy::choose_runtime(spec.kind, None, &info.arch, &info.arch, false, &info.runtimes).unwrap();
        let placement = crate::placement::place(
            &spec,
            &[crate::placement::Candidate {
                info: &info,
                online: true,
                draining: false,
                load: Default::default(),
                reserved_memory: 0,
                reserved_cpus: 0.0,
                runtime_class: None,
            }],
        );
        let n = NodeRecord {
            name: "n1".into(),
            info: info.clone(),
            api_addr: "127.0.0.1:1".into(),
            transfer_addr: "127.0.0.1:2".into(),
            draining: true,
            load: Default::default(),
            reported: vec![],
            acked_seq: 7,
            registered_ms: 1,
            last_seen_ms: 2,
            key_id: None,
            revoked_ms: None,
        };
        let w = WorkloadRecord {
            spec: spec.clone(),
            node: "n1".into(),
            desired: Desired::Running,
            status: None,
            status_ms: None,
            decision,
            placement,
            created_ms: 1,
            updated_ms: 1,
            last_event: None,
        };
        let m = MigrationRecord {
            id: "m-1".into(),
            workload: "w".into(),
            source: "n1".into(),
            target: "n2".into(),
            state: MigrationState::Pending,
            chosen_by: "user".into(),
            why: "asked".into(),
            mode: None,
            close_connections: false,
            compatibility: away_policy::check_container(&info, &info, RuntimeKind::Containerd, RuntimeKind::Containerd),
            requested_ms: 3,
            delivered_ms: None,
            finished_ms: None,
            report: None,
            error: None,
            deadline_ms: None,
            resolved_by_broker: false,
            cancel_requested_ms: None,
            predicted: None,
        };
        let event = AgentEvent {
            seq: 7,
            at_ms: 5,
            kind: "workload-started".into(),
            workload: Some("w".into()),
            message: "ok".into(),
            migration_id: None,
            report: None,
        };
        {
            let mut store = Store::open(&path).unwrap();
            let changes = Changes {
                nodes: vec![n.clone()],
                tokens: vec![("n1".into(), crate::tokens::sha256_hex("secret"))],
                workloads: vec![w.clone()],
                migrations: vec![m.clone()],
                events: vec![("n1".into(), event)],
                ..Default::default()
            };
            store.apply(&changes).unwrap();
        }
        // a record stored before deadlines (no deadline_ms, no resolved_by_broker) loads
        let mut old = serde_json::to_value(&m).unwrap();
        for gone in ["deadline_ms", "resolved_by_broker"] {
            assert!(old.as_object_mut().unwrap().remove(gone).is_none(), "{gone} is skipped when unset");
        }
        let old: MigrationRecord = serde_json::from_value(old).unwrap();
        assert_eq!((old.deadline_ms, old.resolved_by_broker), (None, false));
        let store = Store::open(&path).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.nodes, vec![n]);
        assert_eq!(loaded.workloads, vec![w]);
        assert_eq!(loaded.migrations, vec![m]);
        assert!(store.has_event("n1", 7).unwrap());
        assert!(!store.has_event("n1", 8).unwrap());
        // the token is stored only as its hash
        assert_eq!(loaded.tokens[0].1, crate::tokens::sha256_hex("secret"));
        for file in [path.clone(), path.with_extension("db-wal")] {
            let raw = std::fs::read(&file).unwrap_or_default();
            assert!(!String::from_utf8_lossy(&raw).contains("secret"), "{}", file.display());
        }
        let mode: String = store.conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        // 2 = FULL: an acknowledged commit survives a power cut
        let sync: i64 = store.conn.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
        assert_eq!(sync, 2);
    }

    #[test]
    fn user_tokens_survive_reopen_and_revocation() {
        use crate::records::UserTokenRecord;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.db");
        let made = UserTokenRecord {
            id: "ut-1".into(),
            user: "anna".into(),
            sha256: crate::tokens::sha256_hex("anna-secret"),
            created_ms: 1,
            expires_ms: Some(9),
            revoked_ms: None,
            label: Some("laptop".into()),
        };
        let mut store = Store::open(&path).unwrap();
        store.apply(&Changes { user_tokens: vec![made.clone()], ..Default::default() }).unwrap();
        let revoked = UserTokenRecord { revoked_ms: Some(5), ..made.clone() };
        store.apply(&Changes { user_tokens: vec![revoked.clone()], ..Default::default() }).unwrap();
        drop(store);
        assert_eq!(Store::open(&path).unwrap().load().unwrap().user_tokens, vec![revoked]);
    }

    #[test]
    fn overlay_addresses_survive_reopen_and_release() {
        use crate::overlay::{Ipam, IpamChanges, OverlayConfig};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.db");
        let (pool, pool_prefix) = OverlayConfig::parse_pool("10.250.0.0/16").unwrap();
        let config = OverlayConfig { pool, pool_prefix, port: 4799, first_vni: 4200 };
        let mut store = Store::open(&path).unwrap();
        let mut ipam = Ipam::new(config.clone(), vec![], vec![]);
        let mut made = IpamChanges::default();
        let w = ipam.address("lab", "workload/w", &mut made).unwrap();
        let n = ipam.address("lab", "node/n1", &mut made).unwrap();
        store.apply_overlay(&made, &[]).unwrap();
        drop(store);
        let mut store = Store::open(&path).unwrap();
        let (networks, leases) = store.load_overlay().unwrap();
        let mut again = Ipam::new(config.clone(), networks, leases);
        let mut none = IpamChanges::default();
        assert_eq!(again.address("lab", "workload/w", &mut none).unwrap(), w);
        assert_eq!(again.address("lab", "node/n1", &mut none).unwrap(), n);
        assert!(none.is_empty(), "nothing new after a reopen: {none:?}");
        // released, the address goes to the next owner, also after a reopen
        assert!(again.release("workload/w"));
        store.apply_overlay(&IpamChanges::default(), &["workload/w".into()]).unwrap();
        let (networks, leases) = store.load_overlay().unwrap();
        let mut third = Ipam::new(config, networks, leases);
        let mut made = IpamChanges::default();
        assert_eq!(third.address("lab", "workload/v", &mut made).unwrap().ip, w.ip);
        store.apply_overlay(&made, &[]).unwrap();
    }
}
