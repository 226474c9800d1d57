//! Migration settings: the options a caller chooses, checked, and turned into QEMU's
//! capabilities and parameters for each end.

use std::collections::BTreeMap;
use std::time::Duration;

use away_runtime::qemu::qmp::commands::{
    MigrateSetCapabilities, MigrateSetParameters, MigrationCapability, MigrationCapabilityStatus, MultifdCompression,
};
use serde::{Deserialize, Serialize};

use super::VmMigrateError;
use crate::transfer::Compression;

/// QEMU's upper bound for `downtime-limit` (2000 s).
const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;

/// How a VM moves. `Default` is plain pre-copy, QEMU's default downtime limit and
/// bandwidth, cancelled after 10 minutes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VmMigrationOptions {
    /// Throttle the guest's vCPUs when pre-copy does not converge (`auto-converge`).
    pub auto_converge: bool,
    /// Send only the changed bytes of pages sent before (`xbzrle`; not with multifd).
    pub xbzrle: bool,
    /// xbzrle cache size in bytes; None keeps QEMU's default (64 MiB).
    pub xbzrle_cache_bytes: Option<u64>,
    /// Send RAM over this many parallel TCP connections (`multifd`).
    pub multifd: Option<u32>,
    /// Compress multifd's page batches (`multifd-compression`, with `multifd-zstd-level`
    /// or `multifd-zlib-level`): zstd, or gzip as QEMU's zlib. Needs `multifd`: QEMU's
    /// only other compression (the `compress` capability) was removed in 9.1.
    pub multifd_compression: Option<Compression>,
    /// Switch to post-copy (`postcopy-ram`): the guest runs on the destination and
    /// pulls the remaining pages on demand.
    pub postcopy: bool,
    /// Full pre-copy passes before post-copy starts: 1 = right after the first pass
    /// (the usual choice), higher values give pre-copy that many passes to converge
    /// first, 0 = at once (pure post-copy: every page moves after the switch). A
    /// pre-copy that converges before then completes without post-copy.
    pub postcopy_after_passes: u64,
    /// Longest pause QEMU may take for the final copy (`downtime-limit`, ms).
    pub max_downtime_ms: Option<u64>,
    /// Cap on migration bandwidth (`max-bandwidth`, bytes/s).
    pub bandwidth_limit_bytes_per_s: Option<u64>,
    /// A migration still in pre-copy after this long is cancelled; the VM keeps running
    /// on the source.
    pub timeout: Duration,
    /// How long the source keeps confirming a destination that gives no definite answer
    /// before the move is reported in doubt (the source VM stays paused).
    pub commit_wait: Duration,
    /// Address the destination listens on.
    pub listen_host: String,
    /// Address the source connects to (used by [`migrate_vm`]; the destination node's
    /// address on a real network).
    pub target_host: String,
    /// Guest port -> host port on the destination, for forwarded ports that must differ
    /// from the source's (two QEMUs on one host). Port forwards are netdev
    /// configuration, not migrated state: the destination's own command line decides.
    pub target_ports: BTreeMap<u16, u16>,
    /// How often `query-migrate` is polled (and progress reported).
    pub poll_interval: Duration,
    /// Port the destination exports a VM's disk on over NBD (0: the migration port + 1).
    #[serde(default)]
    pub disk_port: u16,
    /// Cap on the disk mirror's copy rate (bytes/s; `blockdev-mirror`'s `speed`).
    #[serde(default)]
    pub disk_mirror_bytes_per_s: Option<u64>,
    /// Measure and predict the move before it starts (`away_migrate::estimate::plan_vm`,
    /// about 1-2 s before the move's clock starts); the report carries the prediction
    /// as `predicted`. Moves between agents only.
    #[serde(default)]
    pub predict: bool,
}

/// How long a VM source keeps confirming a silent destination by default.
pub const DEFAULT_VM_COMMIT_WAIT: Duration = Duration::from_secs(120);

impl Default for VmMigrationOptions {
    fn default() -> Self {
        VmMigrationOptions {
            auto_converge: false,
            xbzrle: false,
            xbzrle_cache_bytes: None,
            multifd: None,
            multifd_compression: None,
            postcopy: false,
            postcopy_after_passes: 1,
            max_downtime_ms: None,
            bandwidth_limit_bytes_per_s: None,
            timeout: Duration::from_secs(600),
            commit_wait: DEFAULT_VM_COMMIT_WAIT,
            listen_host: "0.0.0.0".into(),
            target_host: "127.0.0.1".into(),
            target_ports: BTreeMap::new(),
            poll_interval: Duration::from_millis(100),
            disk_port: 0,
            disk_mirror_bytes_per_s: None,
            predict: false,
        }
    }
}

impl VmMigrationOptions {
    /// Refuse combinations QEMU rejects or that make no sense, naming the field.
    pub fn validate(&self) -> Result<(), VmMigrateError> {
        let invalid = |field: &str, reason: &str| {
            Err(VmMigrateError::Invalid { field: field.to_string(), reason: reason.to_string() })
        };
        if let Some(n) = self.multifd {
            if n == 0 || n > 255 {
                return invalid("multifd", "channels must be between 1 and 255");
            }
            if self.xbzrle {
                return invalid("xbzrle", "qemu does not combine xbzrle with multifd");
            }
        }
        match self.multifd_compression {
            Some(Compression::None) | None => {}
            Some(_) if self.multifd.is_none() => {
                return invalid("multifd_compression", "qemu compresses only multifd's channels: set multifd too");
            }
            Some(Compression::Zstd { level }) if !(1..=20).contains(&level) => {
                return invalid("multifd_compression", "qemu's zstd levels are 1 to 20");
            }
            Some(_) => {}
        }
        if self.max_downtime_ms.is_some_and(|ms| ms > MAX_DOWNTIME_LIMIT_MS) {
            return invalid("max_downtime_ms", "qemu accepts at most 2000000 ms");
        }
        if self.bandwidth_limit_bytes_per_s == Some(0) {
            return invalid("bandwidth_limit_bytes_per_s", "must be more than 0 (leave it unset for no limit)");
        }
        if self.xbzrle_cache_bytes.is_some_and(|b| b < 4096) {
            return invalid("xbzrle_cache_bytes", "must hold at least one page (4096 bytes)");
        }
        if self.timeout.is_zero() {
            return invalid("timeout", "must be more than 0");
        }
        if self.poll_interval.is_zero() {
            return invalid("poll_interval", "must be more than 0");
        }
        Ok(())
    }

    /// Capabilities the source sets. Every one is set explicitly, on or off, so a
    /// reused QEMU does not carry over an earlier choice.
    pub(super) fn source_capabilities(&self) -> MigrateSetCapabilities {
        capabilities(&[
            (MigrationCapability::AutoConverge, self.auto_converge),
            (MigrationCapability::Xbzrle, self.xbzrle),
            (MigrationCapability::Multifd, self.multifd.is_some()),
            (MigrationCapability::PostcopyRam, self.postcopy),
        ])
    }

    /// Capabilities that must match on the destination.
    pub(super) fn destination_capabilities(&self) -> MigrateSetCapabilities {
        capabilities(&[
            (MigrationCapability::Multifd, self.multifd.is_some()),
            (MigrationCapability::PostcopyRam, self.postcopy),
        ])
    }

    /// Parameters the source sets; empty when every one keeps QEMU's value.
    pub(super) fn source_parameters(&self) -> MigrateSetParameters {
        MigrateSetParameters {
            downtime_limit: self.max_downtime_ms,
            max_bandwidth: self.bandwidth_limit_bytes_per_s,
            xbzrle_cache_size: self.xbzrle_cache_bytes.filter(|_| self.xbzrle),
            ..self.destination_parameters()
        }
    }

    /// Parameters that must match on the destination (multifd's channels and
    /// compression: the destination decompresses what the source compressed).
    pub(super) fn destination_parameters(&self) -> MigrateSetParameters {
        let multifd = self.multifd.is_some();
        let (method, zlib, zstd) = match self.multifd_compression.filter(|_| multifd) {
            None => (None, None, None),
            Some(Compression::None) => (Some(MultifdCompression::None), None, None),
            Some(Compression::Zstd { level }) => (Some(MultifdCompression::Zstd), None, Some(level.clamp(0, 20) as u8)),
            Some(Compression::Gzip { level }) => (Some(MultifdCompression::Zlib), Some(level.min(9) as u8), None),
        };
        MigrateSetParameters {
            multifd_channels: self.multifd,
            multifd_compression: method,
            multifd_zlib_level: zlib,
            multifd_zstd_level: zstd,
            ..Default::default()
        }
    }

    /// One line for reports: what was switched on.
    /// The options in words, for reports and plans.
    pub fn describe(&self) -> String {
        let mut on: Vec<String> = Vec::new();
        if self.auto_converge {
            on.push("auto-converge".into());
        }
        if self.xbzrle {
            on.push("xbzrle".into());
        }
        if let Some(n) = self.multifd {
            match self.multifd_compression {
                Some(c) if c != Compression::None => on.push(format!("multifd ({n} channels, {c})")),
                _ => on.push(format!("multifd ({n} channels)")),
            }
        }
        if self.postcopy {
            on.push(format!("postcopy-ram (after {} pass(es))", self.postcopy_after_passes));
        }
        if let Some(ms) = self.max_downtime_ms {
            on.push(format!("downtime-limit {ms} ms"));
        }
        if let Some(b) = self.bandwidth_limit_bytes_per_s {
            on.push(format!("max-bandwidth {b} B/s"));
        }
        if on.is_empty() {
            "plain pre-copy".into()
        } else {
            on.join(", ")
        }
    }
}

fn capabilities(caps: &[(MigrationCapability, bool)]) -> MigrateSetCapabilities {
    MigrateSetCapabilities {
        capabilities: caps.iter().map(|&(capability, state)| MigrationCapabilityStatus { capability, state }).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn to_json(v: impl Serialize) -> serde_json::Value {
        serde_json::to_value(v).unwrap()
    }

    #[test]
    fn default_options_are_valid_plain_precopy() {
        let o = VmMigrationOptions::default();
        o.validate().unwrap();
        assert_eq!(o.describe(), "plain pre-copy");
        assert_eq!(to_json(o.source_parameters()), json!({}));
        assert!(o.source_parameters().is_empty() && o.destination_parameters().is_empty());
        assert!(o.source_capabilities().capabilities.iter().all(|c| !c.state));
    }

    #[test]
    fn bad_options_name_the_field() {
        let o = VmMigrationOptions { multifd: Some(4), xbzrle: true, ..Default::default() };
        let e = o.validate().unwrap_err().to_string();
        assert!(e.contains("xbzrle") && e.contains("multifd"), "{e}");
        let o = VmMigrationOptions { bandwidth_limit_bytes_per_s: Some(0), ..Default::default() };
        assert!(o.validate().unwrap_err().to_string().contains("bandwidth_limit_bytes_per_s"));
        let o = VmMigrationOptions { timeout: Duration::ZERO, ..Default::default() };
        assert!(o.validate().unwrap_err().to_string().contains("timeout"));
        let zstd = Some(Compression::Zstd { level: 1 });
        let o = VmMigrationOptions { multifd_compression: zstd, ..Default::default() };
        let e = o.validate().unwrap_err().to_string();
        assert!(e.contains("multifd_compression") && e.contains("set multifd"), "{e}");
        let o =
            VmMigrationOptions { multifd: Some(2), multifd_compression: Some(Compression::Zstd { level: 22 }), ..o };
        assert!(o.validate().unwrap_err().to_string().contains("1 to 20"));
    }

    #[test]
    fn multifd_compression_is_set_on_both_ends() {
        let o = VmMigrationOptions {
            multifd: Some(2),
            multifd_compression: Some(Compression::Zstd { level: 1 }),
            ..Default::default()
        };
        o.validate().unwrap();
        let both = json!({"multifd-channels": 2, "multifd-compression": "zstd", "multifd-zstd-level": 1});
        assert_eq!(to_json(o.source_parameters()), both);
        assert_eq!(to_json(o.destination_parameters()), both);
        assert_eq!(o.describe(), "multifd (2 channels, zstd:1)");
        let o = VmMigrationOptions { multifd_compression: Some(Compression::Gzip { level: 6 }), ..o };
        assert_eq!(
            to_json(o.destination_parameters()),
            json!({"multifd-channels": 2, "multifd-compression": "zlib", "multifd-zlib-level": 6})
        );
    }

    #[test]
    fn capabilities_and_parameters_match_the_options() {
        let o = VmMigrationOptions {
            multifd: Some(4),
            postcopy: true,
            auto_converge: true,
            max_downtime_ms: Some(50),
            bandwidth_limit_bytes_per_s: Some(1 << 20),
            ..Default::default()
        };
        let caps = to_json(o.source_capabilities());
        assert!(caps.to_string().contains(r#"{"capability":"multifd","state":true}"#), "{caps}");
        assert!(caps.to_string().contains(r#"{"capability":"xbzrle","state":false}"#), "{caps}");
        // the destination gets only what must match
        let dest = to_json(o.destination_capabilities()).to_string();
        assert!(dest.contains("postcopy-ram") && dest.contains("multifd") && !dest.contains("auto-converge"));
        assert_eq!(
            to_json(o.source_parameters()),
            json!({"downtime-limit": 50, "max-bandwidth": 1048576, "multifd-channels": 4})
        );
        assert_eq!(to_json(o.destination_parameters()), json!({"multifd-channels": 4}));
        // the xbzrle cache size goes only with xbzrle
        let o = VmMigrationOptions { xbzrle_cache_bytes: Some(1 << 20), ..Default::default() };
        assert!(o.source_parameters().is_empty());
        let o = VmMigrationOptions { xbzrle: true, ..o };
        assert_eq!(to_json(o.source_parameters()), json!({"xbzrle-cache-size": 1048576}));
    }
}
