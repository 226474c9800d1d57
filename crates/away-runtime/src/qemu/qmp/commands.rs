//! The QMP commands away sends and the replies it reads, as serde types named as in
//! QEMU's QAPI schema (`qapi/migration.json`, `qapi/run-state.json`, `qapi/block.json`).
//!
//! Written by hand rather than taken from the `qapi` crate (see the parent module): only
//! the fields away reads are declared, unknown fields are ignored, so a newer QEMU that
//! adds fields (or statuses, see [`MigrationStatus::Other`]) still parses.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A QMP command: its name on the wire, its arguments (the fields of the type,
/// serialized as QEMU's `arguments` object; a unit struct sends none) and the type of
/// its `return` value.
pub trait Command: Serialize {
    const NAME: &'static str;
    type Reply: serde::de::DeserializeOwned;
}

/// The `{}` most commands return.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Empty {}

macro_rules! command {
    ($(#[$doc:meta])* $ty:ident = $name:literal -> $reply:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
        pub struct $ty;
        impl Command for $ty {
            const NAME: &'static str = $name;
            type Reply = $reply;
        }
    };
}
pub(crate) use command;

command!(
    /// Leave capabilities negotiation mode (the first command of a session).
    QmpCapabilities = "qmp_capabilities" -> Empty
);
command!(
    /// The VM's run state.
    QueryStatus = "query-status" -> StatusInfo
);
command!(
    /// The state of the current (or last) migration.
    QueryMigrate = "query-migrate" -> MigrationInfo
);
/// Start measuring the guest's dirty-page rate (`calc-dirty-rate`, page sampling)
/// over `calc_time` seconds; [`QueryDirtyRate`] reads the result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CalcDirtyRate {
    #[serde(rename = "calc-time")]
    pub calc_time: i64,
    /// Pages sampled per GiB of guest memory (QEMU's default 512, at most 10,000).
    #[serde(rename = "sample-pages")]
    pub sample_pages: i64,
}

impl Command for CalcDirtyRate {
    const NAME: &'static str = "calc-dirty-rate";
    type Reply = Empty;
}

/// Send the NICs' self-announcements (RARP from each NIC's MAC, and a virtio-net guest's
/// own gratuitous ARP) `rounds` times: the first after `initial` ms, then `step` ms
/// longer each time up to `max` ms. What QEMU does by itself after an incoming
/// migration, asked again when a guest resumes where it was not announced last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AnnounceSelf {
    pub initial: i64,
    pub max: i64,
    pub rounds: i64,
    pub step: i64,
}

impl Default for AnnounceSelf {
    /// QEMU's defaults for the announcements after a migration.
    fn default() -> Self {
        AnnounceSelf { initial: 50, max: 550, rounds: 5, step: 100 }
    }
}

impl Command for AnnounceSelf {
    const NAME: &'static str = "announce-self";
    type Reply = Empty;
}

command!(
    /// The last dirty-rate measurement.
    QueryDirtyRate = "query-dirty-rate" -> DirtyRateInfo
);

/// `query-dirty-rate`'s answer (the fields away reads).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DirtyRateInfo {
    /// `unstarted`, `measuring` or `measured`.
    pub status: String,
    /// MB/s, once measured.
    #[serde(rename = "dirty-rate", default)]
    pub dirty_rate: Option<i64>,
}

command!(
    /// The block devices, to find writable disks.
    QueryBlock = "query-block" -> Vec<BlockInfo>
);
command!(
    /// Pause the guest's vCPUs.
    Stop = "stop" -> Empty
);
command!(
    /// Resume the guest's vCPUs.
    Cont = "cont" -> Empty
);
command!(
    /// Exit QEMU at once.
    Quit = "quit" -> Empty
);
command!(
    /// Press the ACPI power button.
    SystemPowerdown = "system_powerdown" -> Empty
);
command!(
    /// Switch a running migration to post-copy.
    MigrateStartPostcopy = "migrate-start-postcopy" -> Empty
);
command!(
    /// Cancel the outgoing migration.
    MigrateCancel = "migrate_cancel" -> Empty
);

/// Start an outgoing migration to `uri` (`tcp:HOST:PORT`, `file:PATH`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Migrate {
    pub uri: String,
}

impl Command for Migrate {
    const NAME: &'static str = "migrate";
    type Reply = Empty;
}

/// Start receiving a migration on a QEMU started with `-incoming defer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrateIncoming {
    pub uri: String,
}

impl Command for MigrateIncoming {
    const NAME: &'static str = "migrate-incoming";
    type Reply = Empty;
}

/// Create a QOM object (`object-add`): the TLS credentials and the authorization list
/// of a migration stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "qom-type", rename_all = "kebab-case")]
pub enum ObjectAdd {
    /// X.509 credentials read from `dir` when the object is made (`ca-cert.pem`, and
    /// `server-cert.pem` + `server-key.pem` or `client-cert.pem` + `client-key.pem`).
    #[serde(rename = "tls-creds-x509", rename_all = "kebab-case")]
    TlsCredsX509 { id: String, dir: String, endpoint: TlsEndpoint, verify_peer: bool },
    /// Allows exactly `identity` (for TLS: the peer certificate's distinguished name,
    /// as GnuTLS prints it, e.g. `CN=laptop`).
    #[serde(rename = "authz-simple")]
    AuthzSimple { id: String, identity: String },
}

impl Command for ObjectAdd {
    const NAME: &'static str = "object-add";
    type Reply = Empty;
}

/// Which end of a TLS session a `tls-creds-x509` object is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsEndpoint {
    Server,
    Client,
}

/// Remove a QOM object (`object-del`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObjectDel {
    pub id: String,
}

impl Command for ObjectDel {
    const NAME: &'static str = "object-del";
    type Reply = Empty;
}

/// QAPI's `MigrationCapability`: the ones away sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationCapability {
    AutoConverge,
    Xbzrle,
    Multifd,
    PostcopyRam,
    /// Stop in `pre-switchover` once the source is paused, until `migrate-continue`
    /// (a disk mirror is completed there).
    PauseBeforeSwitchover,
}

/// QAPI's `MigrationCapabilityStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MigrationCapabilityStatus {
    pub capability: MigrationCapability,
    pub state: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MigrateSetCapabilities {
    pub capabilities: Vec<MigrationCapabilityStatus>,
}

impl Command for MigrateSetCapabilities {
    const NAME: &'static str = "migrate-set-capabilities";
    type Reply = Empty;
}

/// QAPI's `MigrateSetParameters`: the ones away sets; None leaves QEMU's value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrateSetParameters {
    /// Milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<u64>,
    /// Bytes per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_channels: Option<u32>,
    /// How multifd compresses each page batch (both ends must agree).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_compression: Option<MultifdCompression>,
    /// 0-9, with `zlib`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_zlib_level: Option<u8>,
    /// 0-20, with `zstd`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_zstd_level: Option<u8>,
    /// Bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xbzrle_cache_size: Option<u64>,
    /// The id of a `tls-creds-x509` object ([`ObjectAdd`]): the stream goes over TLS
    /// with it; `""` turns TLS off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
    /// The name the source checks the destination's certificate against (instead of
    /// the URI's host); `""` for the URI's host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_hostname: Option<String>,
    /// The id of an `authz-simple` object on the destination: only a client whose
    /// certificate's distinguished name it names is taken; `""` for none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_authz: Option<String>,
}

/// QAPI's `MultiFDCompression` (the methods every QEMU build has; qpl, uadk and qatzip
/// need accelerator hardware).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MultifdCompression {
    None,
    Zlib,
    Zstd,
}

impl MigrateSetParameters {
    /// Nothing to set (QEMU would accept it, but there is no need to send it).
    pub fn is_empty(&self) -> bool {
        *self == MigrateSetParameters::default()
    }
}

impl Command for MigrateSetParameters {
    const NAME: &'static str = "migrate-set-parameters";
    type Reply = Empty;
}

/// `query-status`'s reply.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    /// QEMU's `RunState` ("running", "paused", "inmigrate", "postmigrate", ...), kept
    /// as text: away maps it onto its own workload states.
    pub status: String,
}

/// One entry of `query-block`'s reply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct BlockInfo {
    pub device: String,
    pub qdev: Option<String>,
    /// The medium, if any.
    pub inserted: Option<BlockDeviceInfo>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct BlockDeviceInfo {
    /// Read-only.
    pub ro: bool,
}

/// QAPI's `MigrationStatus`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum MigrationStatus {
    /// No migration has happened (also what a missing `status` means).
    #[default]
    None,
    Setup,
    Cancelling,
    Cancelled,
    Active,
    PostcopyActive,
    PostcopyPaused,
    PostcopyRecoverSetup,
    PostcopyRecover,
    Completed,
    Failed,
    Colo,
    PreSwitchover,
    Device,
    WaitUnplug,
    /// A status this list does not know (a newer QEMU), as QEMU named it.
    Other(String),
}

impl MigrationStatus {
    const NAMED: [(MigrationStatus, &'static str); 15] = [
        (MigrationStatus::None, "none"),
        (MigrationStatus::Setup, "setup"),
        (MigrationStatus::Cancelling, "cancelling"),
        (MigrationStatus::Cancelled, "cancelled"),
        (MigrationStatus::Active, "active"),
        (MigrationStatus::PostcopyActive, "postcopy-active"),
        (MigrationStatus::PostcopyPaused, "postcopy-paused"),
        (MigrationStatus::PostcopyRecoverSetup, "postcopy-recover-setup"),
        (MigrationStatus::PostcopyRecover, "postcopy-recover"),
        (MigrationStatus::Completed, "completed"),
        (MigrationStatus::Failed, "failed"),
        (MigrationStatus::Colo, "colo"),
        (MigrationStatus::PreSwitchover, "pre-switchover"),
        (MigrationStatus::Device, "device"),
        (MigrationStatus::WaitUnplug, "wait-unplug"),
    ];

    /// QEMU's name for it.
    pub fn as_str(&self) -> &str {
        match self {
            MigrationStatus::Other(s) => s,
            known => Self::NAMED.iter().find(|(s, _)| s == known).map(|(_, n)| *n).unwrap_or("none"),
        }
    }

    pub fn from_name(name: &str) -> MigrationStatus {
        Self::NAMED
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(s, _)| s.clone())
            .unwrap_or_else(|| MigrationStatus::Other(name.to_string()))
    }

    /// Any post-copy state: the guest's memory is split between both ends.
    pub fn is_postcopy(&self) -> bool {
        self.as_str().starts_with("postcopy")
    }

    /// Post-copy stopped half way (its stream broke): neither end has the whole guest,
    /// both wait for `migrate-recover`.
    pub fn is_postcopy_broken(&self) -> bool {
        use MigrationStatus::*;
        matches!(self, PostcopyPaused | PostcopyRecoverSetup | PostcopyRecover)
    }

    /// Still going (not none, completed, failed or cancelled).
    pub fn is_migrating(&self) -> bool {
        use MigrationStatus::*;
        matches!(self, Setup | Active | PreSwitchover | Device | WaitUnplug | Cancelling | Colo) || self.is_postcopy()
    }
}

impl std::fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `pad`, not `write_str`: progress lines align it with `{:<16}`.
        f.pad(self.as_str())
    }
}

impl<'de> Deserialize<'de> for MigrationStatus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Ok(MigrationStatus::from_name(&name))
    }
}

impl Serialize for MigrationStatus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// `query-migrate`'s reply (QAPI's `MigrationInfo`): the fields away reads. QEMU
/// leaves out what does not apply (no `ram` before a migration, `downtime` only
/// once it completed, ...): those are None.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// Missing before the first migration (QEMU then returns `{}`).
    #[serde(default)]
    pub status: MigrationStatus,
    pub ram: Option<MigrationStats>,
    pub xbzrle_cache: Option<XbzrleCacheStats>,
    /// Milliseconds since `migrate` (the whole migration once it ended).
    pub total_time: Option<u64>,
    /// Milliseconds: the guest's pause QEMU expects for the final copy.
    pub expected_downtime: Option<u64>,
    /// Milliseconds the guest was paused (once completed).
    pub downtime: Option<u64>,
    /// Milliseconds before the first pass.
    pub setup_time: Option<u64>,
    /// auto-converge's current vCPU throttle (percent).
    pub cpu_throttle_percentage: Option<u64>,
    pub error_desc: Option<String>,
}

/// QAPI's `MigrationStats` (the `ram` member): the fields away reads.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct MigrationStats {
    /// Bytes sent so far (on the wire).
    pub transferred: u64,
    /// Dirty bytes still to send.
    pub remaining: u64,
    /// Guest RAM (bytes).
    pub total: u64,
    /// Zero pages sent as markers only.
    pub duplicate: u64,
    /// Bytes of full pages sent.
    pub normal_bytes: u64,
    /// Pages the guest dirties per second.
    pub dirty_pages_rate: u64,
    /// Current throughput (Mbit/s).
    pub mbps: f64,
    /// Dirty-bitmap syncs: 1 during the first full pass.
    pub dirty_sync_count: u64,
    /// Pages the destination asked for during post-copy.
    pub postcopy_requests: u64,
}

/// QAPI's `XBZRLECacheStats`: the fields away reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct XbzrleCacheStats {
    /// Bytes of deltas sent.
    pub bytes: u64,
    /// Pages sent whole (not in the cache).
    pub cache_miss: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn info(reply: &str) -> MigrationInfo {
        serde_json::from_str(reply).unwrap()
    }

    // The replies below are QEMU's own examples for query-migrate (qapi/migration.json),
    // one line each as QEMU sends them.

    #[test]
    fn before_the_first_migration_there_is_no_status() {
        let i = info("{}");
        assert_eq!(i, MigrationInfo::default());
        assert_eq!(i.status, MigrationStatus::None);
        assert!(!i.status.is_migrating());
    }

    #[test]
    fn a_completed_migration() {
        let i = info(
            r#"{"status": "completed", "total-time":12345, "setup-time":12345, "downtime":12345,
                "ram":{"transferred":123, "remaining":123, "total":246, "duplicate":123, "normal":123,
                       "normal-bytes":123456, "dirty-sync-count":15}}"#,
        );
        assert_eq!(i.status, MigrationStatus::Completed);
        assert_eq!(
            (i.total_time, i.setup_time, i.downtime, i.expected_downtime),
            (Some(12345), Some(12345), Some(12345), None)
        );
        let ram = i.ram.unwrap();
        assert_eq!((ram.transferred, ram.remaining, ram.total), (123, 123, 246));
        assert_eq!((ram.duplicate, ram.normal_bytes, ram.dirty_sync_count), (123, 123456, 15));
        assert_eq!((ram.mbps, ram.dirty_pages_rate, ram.postcopy_requests), (0.0, 0, 0));
    }

    #[test]
    fn a_failed_migration() {
        let i = info(r#"{"status": "failed"}"#);
        assert_eq!((i.status, i.ram, i.error_desc), (MigrationStatus::Failed, None, None));
        let i = info(r#"{"status": "failed", "error-desc": "Unable to write to socket: Broken pipe"}"#);
        assert_eq!(i.error_desc.as_deref(), Some("Unable to write to socket: Broken pipe"));
    }

    #[test]
    fn an_active_migration_with_xbzrle() {
        let i = info(
            r#"{"status":"active", "total-time":12345, "setup-time":12345, "expected-downtime":12345,
                "ram":{"total":1057024, "remaining":1053304, "transferred":3720, "duplicate":10, "normal":3333,
                       "normal-bytes":3412992, "dirty-sync-count":15},
                "xbzrle-cache":{"cache-size":67108864, "bytes":20971520, "pages":2444343, "cache-miss":2244,
                                "cache-miss-rate":0.123, "encoding-rate":80.1, "overflow":34434}}"#,
        );
        assert_eq!(i.status, MigrationStatus::Active);
        assert!(i.status.is_migrating() && !i.status.is_postcopy());
        assert_eq!(i.expected_downtime, Some(12345));
        assert_eq!(i.ram.unwrap().remaining, 1053304);
        assert_eq!(i.xbzrle_cache, Some(XbzrleCacheStats { bytes: 20971520, cache_miss: 2244 }));
    }

    #[test]
    fn fields_away_does_not_read_and_statuses_it_does_not_know_pass() {
        // A QEMU 10 post-copy sample: throughput as a float, members away ignores.
        let i = info(
            r#"{"status":"postcopy-active","total-time":900,"setup-time":2,"expected-downtime":300,
                "cpu-throttle-percentage":20,"socket-address":[{"type":"inet","host":"10.0.0.2","port":"4444"}],
                "blocked-reasons":[],"dirty-limit-ring-full-time":0,
                "ram":{"transferred":5000,"remaining":100,"total":134217728,"duplicate":30000,"normal":1,
                       "normal-bytes":4096,"dirty-pages-rate":12,"mbps":800.5,"dirty-sync-count":3,
                       "postcopy-requests":7,"page-size":4096,"multifd-bytes":0,"pages-per-second":2000,
                       "precopy-bytes":4000,"downtime-bytes":0,"postcopy-bytes":1000,
                       "dirty-sync-missed-zero-copy":0}}"#,
        );
        assert!(i.status.is_postcopy() && i.status.is_migrating());
        assert_eq!(i.cpu_throttle_percentage, Some(20));
        let ram = i.ram.unwrap();
        assert_eq!((ram.mbps, ram.dirty_pages_rate, ram.postcopy_requests), (800.5, 12, 7));

        let i = info(r#"{"status":"postcopy-exploded"}"#);
        assert_eq!(i.status, MigrationStatus::Other("postcopy-exploded".into()));
        assert!(i.status.is_postcopy() && i.status.is_migrating());
        assert_eq!(i.status.to_string(), "postcopy-exploded");
        assert_eq!(format!("[{:<8}]", MigrationStatus::Active), "[active  ]");
        assert!(!info(r#"{"status":"teleported"}"#).status.is_migrating());
    }

    #[test]
    fn every_status_round_trips_by_its_qapi_name() {
        for (status, name) in MigrationStatus::NAMED {
            assert_eq!(MigrationStatus::from_name(name), status);
            assert_eq!(serde_json::to_value(&status).unwrap(), json!(name));
        }
        let migrating: Vec<&str> =
            MigrationStatus::NAMED.iter().filter(|(s, _)| s.is_migrating()).map(|(_, n)| *n).collect();
        assert_eq!(
            migrating,
            [
                "setup",
                "cancelling",
                "active",
                "postcopy-active",
                "postcopy-paused",
                "postcopy-recover-setup",
                "postcopy-recover",
                "colo",
                "pre-switchover",
                "device",
                "wait-unplug"
            ]
        );
    }

    #[test]
    fn commands_serialize_as_qemu_expects() {
        let caps = MigrateSetCapabilities {
            capabilities: vec![
                MigrationCapabilityStatus { capability: MigrationCapability::AutoConverge, state: true },
                MigrationCapabilityStatus { capability: MigrationCapability::PostcopyRam, state: false },
            ],
        };
        assert_eq!(
            serde_json::to_value(&caps).unwrap(),
            json!({"capabilities": [{"capability": "auto-converge", "state": true},
                                    {"capability": "postcopy-ram", "state": false}]})
        );
        let params = MigrateSetParameters { downtime_limit: Some(50), multifd_channels: Some(4), ..Default::default() };
        assert_eq!(serde_json::to_value(&params).unwrap(), json!({"downtime-limit": 50, "multifd-channels": 4}));
        let params = MigrateSetParameters {
            multifd_compression: Some(MultifdCompression::Zstd),
            multifd_zstd_level: Some(1),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&params).unwrap(),
            json!({"multifd-compression": "zstd", "multifd-zstd-level": 1})
        );
        assert!(MigrateSetParameters::default().is_empty() && !params.is_empty());
        assert_eq!(serde_json::to_value(Stop).unwrap(), serde_json::Value::Null);
        assert_eq!(serde_json::to_value(Migrate { uri: "tcp:h:1".into() }).unwrap(), json!({"uri": "tcp:h:1"}));
    }

    #[test]
    fn query_status_and_query_block_replies() {
        let s: StatusInfo = serde_json::from_str(r#"{"status":"running","singlestep":false,"running":true}"#).unwrap();
        assert_eq!(s.status, "running");
        let blocks: Vec<BlockInfo> = serde_json::from_str(
            r#"[{"device":"","qdev":"/machine/peripheral/disk0/virtio-backend","locked":false,"removable":false,
                 "inserted":{"ro":false,"drv":"qcow2","file":"/d.qcow2"},"type":"unknown"},
                {"device":"ide1-cd0","locked":false,"removable":true,"type":"unknown"}]"#,
        )
        .unwrap();
        assert_eq!(blocks[0].inserted, Some(BlockDeviceInfo { ro: false }));
        assert_eq!(blocks[0].qdev.as_deref(), Some("/machine/peripheral/disk0/virtio-backend"));
        assert_eq!((blocks[1].device.as_str(), &blocks[1].inserted), ("ide1-cd0", &None));
    }

    #[test]
    fn dirty_rate_reads_as_qemu_writes_it() {
        let m: DirtyRateInfo = serde_json::from_str(
            r#"{"status":"measured","sample-pages":512,"dirty-rate":108,"mode":"page-sampling",
               "start-time":1,"calc-time":1,"calc-time-unit":"second"}"#,
        )
        .unwrap();
        assert_eq!((m.status.as_str(), m.dirty_rate), ("measured", Some(108)));
        let busy: DirtyRateInfo = serde_json::from_str(r#"{"status":"measuring","calc-time":1}"#).unwrap();
        assert_eq!(busy.dirty_rate, None);
        let args = serde_json::to_value(CalcDirtyRate { calc_time: 1, sample_pages: 4096 }).unwrap();
        assert_eq!(args, serde_json::json!({"calc-time": 1, "sample-pages": 4096}));
    }

    #[test]
    fn tls_objects_and_parameters_are_named_as_in_qemus_schema() {
        let creds = ObjectAdd::TlsCredsX509 {
            id: "t".into(),
            dir: "/d".into(),
            endpoint: TlsEndpoint::Server,
            verify_peer: true,
        };
        assert_eq!(
            serde_json::to_value(&creds).unwrap(),
            json!({"qom-type": "tls-creds-x509", "id": "t", "dir": "/d", "endpoint": "server", "verify-peer": true})
        );
        let authz = ObjectAdd::AuthzSimple { id: "a".into(), identity: "CN=laptop".into() };
        assert_eq!(
            serde_json::to_value(&authz).unwrap(),
            json!({"qom-type": "authz-simple", "id": "a", "identity": "CN=laptop"})
        );
        let p = MigrateSetParameters {
            tls_creds: Some("t".into()),
            tls_hostname: Some("cloud.node.away".into()),
            tls_authz: Some(String::new()),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            json!({"tls-creds": "t", "tls-hostname": "cloud.node.away", "tls-authz": ""})
        );
    }
}
