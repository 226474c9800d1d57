//! What `query-migrate` reports: progress samples while the migration runs and the
//! measurements of a finished one.

use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::Value;

/// One `query-migrate` sample, as the migration goes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmProgress {
    pub workload: String,
    /// QEMU's migration status: setup, active, postcopy-active, device, completed, ...
    pub status: String,
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
}

/// A migration status that means "still going".
pub(super) fn is_migrating(status: &str) -> bool {
    matches!(status, "setup" | "active" | "pre-switchover" | "device" | "wait-unplug" | "cancelling" | "colo")
        || status.starts_with("postcopy")
}

fn u64_at(v: &Value, path: &[&str]) -> Option<u64> {
    let mut cur = v;
    for k in path {
        cur = cur.get(*k)?;
    }
    cur.as_u64()
}

pub(super) fn sample(name: &str, info: &Value, elapsed: Duration, postcopy: bool) -> VmProgress {
    let ram = |k: &str| u64_at(info, &["ram", k]).unwrap_or(0);
    VmProgress {
        workload: name.into(),
        status: info.get("status").and_then(Value::as_str).unwrap_or("none").to_string(),
        elapsed,
        pass: ram("dirty-sync-count"),
        ram_total: ram("total"),
        transferred: ram("transferred"),
        remaining: ram("remaining"),
        dirty_pages_rate: ram("dirty-pages-rate"),
        mbps: info.get("ram").and_then(|r| r.get("mbps")).and_then(Value::as_f64).unwrap_or(0.0),
        expected_downtime_ms: u64_at(info, &["expected-downtime"]),
        cpu_throttle_percent: u64_at(info, &["cpu-throttle-percentage"]),
        postcopy,
    }
}

pub(super) fn outcome(
    name: &str,
    info: &Value,
    stopped_at: Option<SystemTime>,
    postcopy: bool,
    max_throttle: u64,
    wall: Duration,
) -> VmMigrationOutcome {
    let ram = |k: &str| u64_at(info, &["ram", k]).unwrap_or(0);
    let ms = |k: &str| Duration::from_millis(u64_at(info, &[k]).unwrap_or(0));
    VmMigrationOutcome {
        workload: name.into(),
        total: ms("total-time"),
        setup: ms("setup-time"),
        qemu_downtime: ms("downtime"),
        bytes_wire: ram("transferred"),
        ram_total: ram("total"),
        normal_bytes: ram("normal-bytes"),
        zero_pages: ram("duplicate"),
        passes: ram("dirty-sync-count"),
        converged: !postcopy,
        postcopy,
        postcopy_requests: ram("postcopy-requests"),
        max_cpu_throttle_percent: max_throttle,
        xbzrle_bytes: u64_at(info, &["xbzrle-cache", "bytes"]),
        xbzrle_cache_misses: u64_at(info, &["xbzrle-cache", "cache-miss"]),
        source_stopped_at: stopped_at,
        wall,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sample_and_outcome_read_query_migrate() {
        let info = json!({
            "status": "completed", "total-time": 512, "downtime": 8, "setup-time": 3,
            "ram": {"transferred": 1000, "total": 134217728, "remaining": 0, "dirty-sync-count": 3,
                    "normal-bytes": 900, "duplicate": 30000, "mbps": 800.5, "dirty-pages-rate": 12}
        });
        let p = sample("w", &info, Duration::from_millis(5), false);
        assert_eq!((p.pass, p.transferred, p.ram_total, p.dirty_pages_rate), (3, 1000, 134217728, 12));
        let o = outcome("w", &info, None, false, 0, Duration::from_millis(600));
        assert_eq!(o.qemu_downtime, Duration::from_millis(8));
        assert_eq!((o.bytes_wire, o.ram_total, o.passes, o.converged), (1000, 134217728, 3, true));
        assert_eq!(super::super::millis_ceil(Duration::from_micros(400)), 1);
    }
}
