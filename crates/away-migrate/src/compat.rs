//! Migration compatibility lives in `away_policy::compat` (the broker checks moves
//! without linking the migration machinery); re-exported here for migrate's callers.

pub use away_policy::compat::*;

#[cfg(test)]
mod tests {
    use super::*;
    use away_model::{NodeInfo, RuntimeKind, Tier};

    #[test]
    fn this_host_may_move_containers_and_vms_to_itself() {
        let report =
            tokio::runtime::Runtime::new().unwrap().block_on(away_runtime::host::fingerprint(&Default::default()));
        let me = report.node_info("here", Tier::Cloud);
        let there = NodeInfo { name: "there".into(), ..me.clone() };
        if me.runtime(RuntimeKind::Containerd).is_some_and(|r| r.healthy && r.checkpoint) {
            let c = check_container(&me, &there, RuntimeKind::Containerd, RuntimeKind::Containerd);
            assert!(c.allowed, "{c:?}");
        }
        if me.hypervisor.is_some() {
            assert!(check_vm(&me, &there).allowed);
        }
    }
}
