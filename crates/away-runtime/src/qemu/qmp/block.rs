//! The QMP commands of a disk's live migration without shared storage (docs/vm.md):
//! the destination exports its empty overlay over NBD, the source mirrors its overlay
//! into it (`blockdev-mirror` onto an `nbd` block node) and completes the mirror while
//! the migration waits before its switchover. Typed from QEMU's QAPI schema
//! (`qapi/block-export.json`, `qapi/block-core.json`, `qapi/migration.json`,
//! `qapi/qom.json`); only the fields away sets or reads.

use serde::{Deserialize, Serialize};

use super::commands::{Command, Empty};

/// `InetSocketAddress`; `port` is text in QAPI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Inet {
    pub host: String,
    pub port: String,
}

/// `SocketAddressLegacy` (nbd-server-start's `addr`): `{"type": "inet", "data": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
pub enum LegacyAddress {
    Inet(Inet),
}

/// Start the NBD server (destination).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct NbdServerStart {
    pub addr: LegacyAddress,
    /// Id of a `tls-creds-x509` object: the server then speaks only TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
    /// Id of an authz object checking the client certificate's distinguished name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_authz: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}

impl Command for NbdServerStart {
    const NAME: &'static str = "nbd-server-start";
    type Reply = Empty;
}

/// `block-export-add` of type nbd: export `node_name` as `name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockExportAddNbd {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub id: String,
    pub node_name: String,
    pub writable: bool,
    pub name: String,
}

impl Command for BlockExportAddNbd {
    const NAME: &'static str = "block-export-add";
    type Reply = Empty;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockExportDel {
    pub id: String,
}

impl Command for BlockExportDel {
    const NAME: &'static str = "block-export-del";
    type Reply = Empty;
}

super::commands::command!(
    /// Stop the NBD server (its exports go with it).
    NbdServerStop = "nbd-server-stop" -> Empty
);

/// `blockdev-add` of an NBD client node (source): the destination's export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevAddNbd {
    pub driver: &'static str,
    pub node_name: String,
    pub server: InetAddress,
    pub export: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
    /// The name the server's certificate must carry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_hostname: Option<String>,
    /// Seconds a connection may take (an unreachable destination fails, not hangs).
    pub open_timeout: u32,
}

/// `SocketAddress` (flat) of type inet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InetAddress {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub host: String,
    pub port: String,
}

impl Command for BlockdevAddNbd {
    const NAME: &'static str = "blockdev-add";
    type Reply = Empty;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevDel {
    pub node_name: String,
}

impl Command for BlockdevDel {
    const NAME: &'static str = "blockdev-del";
    type Reply = Empty;
}

/// Mirror `device` (a node name) onto `target` (a node name). `sync: top` copies only
/// what the top image holds (the overlay's allocated clusters, not its base).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevMirror {
    pub job_id: String,
    pub device: String,
    pub target: String,
    pub sync: &'static str,
    /// `background` or `write-blocking` (guest writes wait for the target).
    pub copy_mode: &'static str,
    /// Bytes per second (none: as fast as it goes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speed: Option<u64>,
}

impl Command for BlockdevMirror {
    const NAME: &'static str = "blockdev-mirror";
    type Reply = Empty;
}

/// Change a running mirror job: `copy-mode: write-blocking` makes every guest write
/// wait until the target has it too (QEMU 8.2+; the only change QEMU takes), so a
/// mirror that background copying cannot bring in sync gets there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockJobChange {
    pub id: String,
    /// `mirror`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub copy_mode: &'static str,
}

impl Command for BlockJobChange {
    const NAME: &'static str = "block-job-change";
    type Reply = Empty;
}

super::commands::command!(
    /// The running block jobs.
    QueryBlockJobs = "query-block-jobs" -> Vec<BlockJobInfo>
);

/// One entry of `query-block-jobs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct BlockJobInfo {
    /// The job id.
    pub device: String,
    /// Bytes the job has to do (grows while the guest writes)...
    pub len: u64,
    /// ... and has done.
    pub offset: u64,
    /// A mirror: source and target in sync (it stays so until completed or cancelled).
    pub ready: bool,
    /// `running`, `ready`, `concluded`, ...
    pub status: String,
    /// Set when the job failed.
    pub error: Option<String>,
}

/// Cancel a block job. A mirror that is ready ends with its target in sync with the
/// source as of the cancel (the source keeps its own disk: no pivot).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockJobCancel {
    pub device: String,
    /// Without waiting for the target to be in sync (a failed move).
    pub force: bool,
}

impl Command for BlockJobCancel {
    const NAME: &'static str = "block-job-cancel";
    type Reply = Empty;
}

/// Go on with a migration paused in `state` (`pre-switchover`, with the
/// `pause-before-switchover` capability).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrateContinue {
    pub state: &'static str,
}

impl Command for MigrateContinue {
    const NAME: &'static str = "migrate-continue";
    type Reply = Empty;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args<C: Command>(c: &C) -> serde_json::Value {
        serde_json::to_value(c).unwrap()
    }

    #[test]
    fn arguments_are_qapi_shaped() {
        let start = NbdServerStart {
            addr: LegacyAddress::Inet(Inet { host: "0.0.0.0".into(), port: "10809".into() }),
            tls_creds: Some("t".into()),
            tls_authz: Some("a".into()),
            max_connections: Some(1),
        };
        assert_eq!(
            args(&start),
            json!({"addr": {"type": "inet", "data": {"host": "0.0.0.0", "port": "10809"}}, "tls-creds": "t",
                   "tls-authz": "a", "max-connections": 1})
        );
        let add = BlockdevAddNbd {
            driver: "nbd",
            node_name: "n".into(),
            server: InetAddress { kind: "inet", host: "h".into(), port: "1".into() },
            export: "disk0".into(),
            tls_creds: None,
            tls_hostname: None,
            open_timeout: 30,
        };
        assert_eq!(
            args(&add),
            json!({"driver": "nbd", "node-name": "n", "server": {"type": "inet", "host": "h", "port": "1"},
                   "export": "disk0", "open-timeout": 30})
        );
        let m = BlockdevMirror {
            job_id: "j".into(),
            device: "disk0".into(),
            target: "n".into(),
            sync: "top",
            copy_mode: "background",
            speed: None,
        };
        assert_eq!(
            args(&m),
            json!({"job-id": "j", "device": "disk0", "target": "n", "sync": "top", "copy-mode": "background"})
        );
        let e = BlockExportAddNbd {
            kind: "nbd",
            id: "e".into(),
            node_name: "disk0".into(),
            writable: true,
            name: "disk0".into(),
        };
        assert_eq!(
            args(&e),
            json!({"type": "nbd", "id": "e", "node-name": "disk0", "writable": true, "name": "disk0"})
        );
        let jobs: Vec<BlockJobInfo> = serde_json::from_value(json!([
            {"device": "j", "len": 10, "offset": 4, "ready": false, "status": "running", "type": "mirror",
             "busy": true, "paused": false, "speed": 0, "io-status": "ok", "auto-finalize": true, "auto-dismiss": true}
        ]))
        .unwrap();
        assert_eq!((jobs[0].offset, jobs[0].ready, jobs[0].error.as_deref()), (4, false, None));
    }
}
