//! What `query-migrate` reports: progress samples while the migration runs and the
//! measurements of a finished one.

use std::time::{Duration, SystemTime};

use away_runtime::qemu::qmp::commands::{MigrationInfo, MigrationStatus};
use serde::Serialize;

/// One `query-migrate` sample, as the migration goes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmProgress {
    pub workload: String,
    /// QEMU's migration status: setup, active, postcopy-active, device, completed, ...
    /// (serialized by its QEMU name).
    pub status: MigrationStatus,
    /// Since `migrate` was sent.
    pub elapsed: Duration,
    /// Pre-copy pass: QEMU's `dirty-sync-count` (1 during the first full pass).
    pub pass: u64,
    /// Guest RAM (bytes).
    pub ram_total: u64,
    /// Bytes sent so far (on the wire).
    pub transferred: u64,
    /// Dirty bytes still to send.
    pub remaining: u64,
    /// Pages the guest dirties per second.
    pub dirty_pages_rate: u64,
    /// Current throughput (Mbit/s).
    pub mbps: f64,
    pub expected_downtime_ms: Option<u64>,
    /// auto-converge's current vCPU throttle (percent).
    pub cpu_throttle_percent: Option<u64>,
    /// Post-copy has started.
    pub postcopy: bool,
}

/// What a finished live migration measured on the source.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmMigrationOutcome {
    pub workload: String,
    /// QEMU's `total-time`: from `migrate` to completion.
    pub total: Duration,
    /// QEMU's `setup-time`.
    pub setup: Duration,
    /// QEMU's own `downtime`: the source's stop until the last bytes entered the
    /// socket (the destination has not loaded them yet).
    pub qemu_downtime: Duration,
    /// Bytes on the wire (`ram.transferred`: RAM pages, xbzrle deltas, zero-page
    /// markers and device state).
    pub bytes_wire: u64,
    /// Guest RAM size (`ram.total`): the raw state that moved.
    pub ram_total: u64,
    /// Bytes of full pages sent (`ram.normal-bytes`).
    pub normal_bytes: u64,
    /// Zero pages sent as markers only (`ram.duplicate`).
    pub zero_pages: u64,
    /// Pre-copy passes (`ram.dirty-sync-count`).
    pub passes: u64,
    /// Pre-copy alone finished the move (no post-copy, no forced stop).
    pub converged: bool,
    /// Post-copy was started.
    pub postcopy: bool,
    /// Pages the destination asked for during post-copy.
    pub postcopy_requests: u64,
    /// Highest vCPU throttle auto-converge applied (percent).
    pub max_cpu_throttle_percent: u64,
    /// xbzrle: bytes of deltas sent, and cache misses (pages sent whole).
    pub xbzrle_bytes: Option<u64>,
    pub xbzrle_cache_misses: Option<u64>,
    /// The source's `STOP` event (QEMU's timestamp, host wall clock).
    pub source_stopped_at: Option<SystemTime>,
    /// Our own clock from `migrate` to completion seen by polling.
    pub wall: Duration,
    /// A VM with a disk: bytes of its overlay the mirror copied over NBD (0 without a
    /// disk). Not in `bytes_wire`, which is QEMU's migration stream alone.
    pub disk_bytes: u64,
}

/// One progress sample from a `query-migrate` reply.
pub(super) fn sample(name: &str, info: &MigrationInfo, elapsed: Duration, postcopy: bool) -> VmProgress {
    let ram = info.ram.clone().unwrap_or_default();
    VmProgress {
        workload: name.into(),
        status: info.status.clone(),
        elapsed,
        pass: ram.dirty_sync_count,
        ram_total: ram.total,
        transferred: ram.transferred,
        remaining: ram.remaining,
        dirty_pages_rate: ram.dirty_pages_rate,
        mbps: ram.mbps,
        expected_downtime_ms: info.expected_downtime,
        cpu_throttle_percent: info.cpu_throttle_percentage,
        postcopy,
    }
}

/// The measurements of a finished migration from its last `query-migrate` reply.
pub(super) fn outcome(
    name: &str,
    info: &MigrationInfo,
    stopped_at: Option<SystemTime>,
    postcopy: bool,
    max_throttle: u64,
    wall: Duration,
) -> VmMigrationOutcome {
    let ram = info.ram.clone().unwrap_or_default();
    let ms = |v: Option<u64>| Duration::from_millis(v.unwrap_or(0));
    VmMigrationOutcome {
        workload: name.into(),
        total: ms(info.total_time),
        setup: ms(info.setup_time),
        qemu_downtime: ms(info.downtime),
        bytes_wire: ram.transferred,
        ram_total: ram.total,
        normal_bytes: ram.normal_bytes,
        zero_pages: ram.duplicate,
        passes: ram.dirty_sync_count,
        converged: !postcopy,
        postcopy,
        postcopy_requests: ram.postcopy_requests,
        max_cpu_throttle_percent: max_throttle,
        xbzrle_bytes: info.xbzrle_cache.as_ref().map(|x| x.bytes),
        xbzrle_cache_misses: info.xbzrle_cache.as_ref().map(|x| x.cache_miss),
        source_stopped_at: stopped_at,
        wall,
        disk_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_and_outcome_read_query_migrate() {
        let info: MigrationInfo = serde_json::from_str(
            r#"{"status": "completed", "total-time": 512, "downtime": 8, "setup-time": 3,
                "ram": {"transferred": 1000, "total": 134217728, "remaining": 0, "dirty-sync-count": 3,
                        "normal-bytes": 900, "duplicate": 30000, "mbps": 800.5, "dirty-pages-rate": 12}}"#,
        )
        .unwrap();
        let p = sample("w", &info, Duration::from_millis(5), false);
        assert_eq!((p.pass, p.transferred, p.ram_total, p.dirty_pages_rate), (3, 1000, 134217728, 12));
        assert_eq!((p.status.as_str(), p.mbps, p.expected_downtime_ms), ("completed", 800.5, None));
        let o = outcome("w", &info, None, false, 0, Duration::from_millis(600));
        assert_eq!(o.qemu_downtime, Duration::from_millis(8));
        assert_eq!((o.bytes_wire, o.ram_total, o.passes, o.converged), (1000, 134217728, 3, true));
        assert_eq!(
            (o.total, o.setup, o.normal_bytes, o.zero_pages),
            (Duration::from_millis(512), Duration::from_millis(3), 900, 30000)
        );
        assert_eq!((o.xbzrle_bytes, o.xbzrle_cache_misses), (None, None));
        assert_eq!(super::super::millis_ceil(Duration::from_micros(400)), 1);
        // Before any migration QEMU answers `{}`: a sample of zeros, status none.
        let p = sample("w", &MigrationInfo::default(), Duration::ZERO, false);
        assert_eq!((p.status, p.transferred, p.pass), (MigrationStatus::None, 0, 0));
    }

    #[test]
    fn progress_serializes_the_status_by_its_qemu_name() {
        let info: MigrationInfo = serde_json::from_str(r#"{"status": "postcopy-active"}"#).unwrap();
        let v = serde_json::to_value(sample("w", &info, Duration::ZERO, true)).unwrap();
        assert_eq!(v["status"], "postcopy-active");
    }
}
