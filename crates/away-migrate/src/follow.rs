//! The report's `network` for a workload on a lab network (docs/network.md): its
//! address before and after the move, and how long the overlay took to follow it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use away_model::{ErrorChain, WorkloadSpec};

/// How long past the end of the move the source node still asks before the report
/// says the workload did not answer.
const FOLLOW_PROBE: Duration = Duration::from_secs(3);

/// The network's following of a moved workload, asked from this (the source) node: ICMP
/// echo requests to its overlay address every 10 ms from the freeze on, beside the
/// transfer, the restore, the commit and the cleanup. The source's own copy of the
/// address cannot answer (CRIU locked its namespace for the dump, then it goes), so
/// the first answer comes from the target once it runs and the overlay knows where it
/// is: that answer, less the resume, is the follow time.
pub(crate) struct FollowProbe {
    addr: away_model::OverlayAddress,
    /// The freeze (Unix ms, this clock).
    frozen_unix_ms: u64,
    stop: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<Result<Option<SystemTime>, away_overlay::OverlayError>>>,
}

impl FollowProbe {
    /// Start asking, for a workload on a lab network (None otherwise).
    /// `frozen_unix_ms`: when the workload stopped answering on the source (CRIU's freeze,
    /// QEMU's STOP).
    pub(crate) fn start(spec: &WorkloadSpec, frozen_unix_ms: u64) -> Option<FollowProbe> {
        let addr = spec.overlay.clone()?;
        let (ip, stop) = (addr.ip, Arc::new(AtomicBool::new(false)));
        let flag = stop.clone();
        // through the network's bridge only: a node without it sends nothing
        let bridge = away_overlay::bridge_name(addr.vni);
        let task = tokio::task::spawn_blocking(move || {
            away_overlay::probe::first_answer(ip, &bridge, Duration::from_millis(10), &flag)
        });
        Some(FollowProbe { addr, frozen_unix_ms, stop, task: Some(task) })
    }

    /// The report's `network`: the follow time counted from `resumed` (Unix ms, this
    /// clock), waiting at most [`FOLLOW_PROBE`] more for the first answer.
    pub(crate) async fn finish(probe: Option<FollowProbe>, resumed: u64) -> Option<away_model::NetworkFollow> {
        let mut p = probe?;
        let mut task = p.task.take()?;
        let answered = match tokio::time::timeout(FOLLOW_PROBE, &mut task).await {
            Ok(done) => done,
            Err(_) => {
                p.stop.store(true, Ordering::SeqCst);
                task.await
            }
        };
        let answered = match answered {
            Ok(Ok(at)) => at,
            Ok(Err(e)) => {
                tracing::warn!(ip = %p.addr.ip, "cannot ask whether the moved workload answers: {}", ErrorChain(&e));
                None
            }
            Err(e) => {
                tracing::warn!(ip = %p.addr.ip, "the network probe task failed: {e}");
                None
            }
        };
        Some(away_model::NetworkFollow {
            network: p.addr.network.clone(),
            ip_before: p.addr.ip,
            ip_after: p.addr.ip,
            mac: p.addr.mac.clone(),
            follow_millis: answered.map(|at| unix_ms(at).saturating_sub(resumed)),
            unanswered_millis: answered.map(|at| unix_ms(at).saturating_sub(p.frozen_unix_ms)),
            probe_millis: FOLLOW_PROBE.as_millis() as u64,
        })
    }
}

impl Drop for FollowProbe {
    /// A move that ends without a report (failed, rolled back) stops asking.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

pub(crate) fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
