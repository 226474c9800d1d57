//! The container→VM fallback rule: which runtime a workload gets on this node, and why.
//!
//! * `kind: auto`: a container when a container runtime on the node is healthy and the
//!   image's architecture matches the node's; otherwise a VM.
//! * `kind: container`: a container or an error saying why not.
//! * `kind: vm`: always a VM (legacy apps that need their own kernel).
//!
//! A runtime the user insists on (`--runtime`, `placement.runtime`) is used or refused,
//! never silently replaced. Containerd is preferred over Docker when both are healthy.

use away_model::{Arch, RuntimeDecision, RuntimeInfo, RuntimeKind, RuntimeVerdict, WorkloadKind};

/// The architecture QEMU guests run here: away boots x86-64 guest kernels only.
pub const VM_GUEST_ARCH: &str = "amd64";

/// Why no runtime fits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no runtime can run this workload here: {reason}")]
pub struct NoRuntime {
    pub reason: String,
    pub considered: Vec<RuntimeVerdict>,
}

/// Decide the runtime. `runtimes` is the node's health report; `requested` is a runtime
/// the user insists on.
pub fn choose_runtime(
    kind: WorkloadKind,
    requested: Option<RuntimeKind>,
    image_arch: &Arch,
    node_arch: &Arch,
    remaps_ports: bool,
    runtimes: &[RuntimeInfo],
) -> Result<RuntimeDecision, NoRuntime> {
    let verdict = |rt: RuntimeKind| -> RuntimeVerdict {
        let info = runtimes.iter().find(|r| r.kind == rt);
        let (usable, why) = match info {
            None => (false, format!("{rt} is not available on this node")),
            Some(i) if !i.healthy => {
                (false, format!("{rt} is unhealthy: {}", if i.detail.is_empty() { "no answer" } else { &i.detail }))
            }
            Some(_) if rt.is_container() && image_arch != node_arch => {
                (false, format!("image is {image_arch} but this node is {node_arch}: a container cannot run it"))
            }
            Some(_) if rt == RuntimeKind::Containerd && remaps_ports => (
                false,
                "containerd workloads share the node's network, and the spec remaps a port (host != container)"
                    .to_string(),
            ),
            Some(_) if !rt.is_container() && image_arch.0 != VM_GUEST_ARCH => {
                (false, format!("image is {image_arch}; away's VMs boot {VM_GUEST_ARCH} guests only"))
            }
            Some(i) => (true, format!("{rt} {} is healthy", i.version)),
        };
        RuntimeVerdict { runtime: rt, usable, why }
    };
    let allowed: Vec<RuntimeKind> = match (kind, requested) {
        (WorkloadKind::Vm, Some(r)) if r.is_container() => {
            return Err(NoRuntime {
                reason: format!("kind vm cannot run on {r}; use --runtime qemu or kind auto"),
                considered: vec![],
            })
        }
        (WorkloadKind::Container, Some(RuntimeKind::Qemu)) => {
            return Err(NoRuntime {
                reason: "kind container cannot run on qemu; use kind vm or auto".into(),
                considered: vec![],
            })
        }
        (_, Some(r)) => vec![r],
        (WorkloadKind::Vm, None) => vec![RuntimeKind::Qemu],
        (WorkloadKind::Container, None) => vec![RuntimeKind::Containerd, RuntimeKind::Docker],
        (WorkloadKind::Auto, None) => vec![RuntimeKind::Containerd, RuntimeKind::Docker, RuntimeKind::Qemu],
    };
    let considered: Vec<RuntimeVerdict> = allowed.iter().map(|rt| verdict(*rt)).collect();
    let Some(chosen) = considered.iter().find(|v| v.usable) else {
        let why: Vec<String> = considered.iter().map(|v| v.why.clone()).collect();
        return Err(NoRuntime { reason: why.join("; "), considered });
    };
    let runtime = chosen.runtime;
    let reason = match (kind, requested, runtime.is_container()) {
        (_, Some(r), _) => format!("{r} as requested: {}", chosen.why),
        (WorkloadKind::Vm, _, _) => format!("VM on qemu because the spec says kind vm: {}", chosen.why),
        (_, _, true) => format!(
            "container on {runtime}: {} and the image's architecture ({image_arch}) matches the node",
            chosen.why
        ),
        (_, _, false) => {
            let why_not: Vec<&str> =
                considered.iter().filter(|v| v.runtime.is_container()).map(|v| v.why.as_str()).collect();
            format!("VM on qemu because no container runtime can run it ({}); {}", why_not.join("; "), chosen.why)
        }
    };
    Ok(RuntimeDecision { runtime, reason, considered })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(kind: RuntimeKind, healthy: bool) -> RuntimeInfo {
        RuntimeInfo {
            kind,
            version: "1.0".into(),
            healthy,
            checkpoint: healthy,
            detail: if healthy { String::new() } else { "socket refused".into() },
        }
    }
    fn all(containerd: bool, docker: bool, qemu: bool) -> Vec<RuntimeInfo> {
        vec![
            info(RuntimeKind::Containerd, containerd),
            info(RuntimeKind::Docker, docker),
            info(RuntimeKind::Qemu, qemu),
        ]
    }
    fn amd64() -> Arch {
        Arch("amd64".into())
    }

    #[test]
    fn auto_prefers_containerd_then_docker() {
        let d = choose_runtime(WorkloadKind::Auto, None, &amd64(), &amd64(), false, &all(true, true, true)).unwrap();
        assert_eq!(d.runtime, RuntimeKind::Containerd);
        assert!(d.reason.starts_with("container on containerd"), "{}", d.reason);
        let d = choose_runtime(WorkloadKind::Auto, None, &amd64(), &amd64(), false, &all(false, true, true)).unwrap();
        assert_eq!(d.runtime, RuntimeKind::Docker);
    }

    #[test]
    fn auto_falls_back_to_vm_and_says_why() {
        let d = choose_runtime(WorkloadKind::Auto, None, &amd64(), &amd64(), false, &all(false, false, true)).unwrap();
        assert_eq!(d.runtime, RuntimeKind::Qemu);
        assert!(
            d.reason.contains("no container runtime") && d.reason.contains("containerd is unhealthy: socket refused"),
            "{}",
            d.reason
        );
        assert_eq!(d.considered.len(), 3);
    }

    #[test]
    fn arch_mismatch_rules_out_containers() {
        let arm = Arch("arm64".into());
        let err = choose_runtime(WorkloadKind::Auto, None, &arm, &amd64(), false, &all(true, true, true)).unwrap_err();
        assert!(err.reason.contains("image is arm64 but this node is amd64"), "{}", err.reason);
        assert!(err.reason.contains("VMs boot amd64 guests only"), "{}", err.reason);
        // an amd64 image on an arm64 node: no container, but a (TCG) VM
        let d = choose_runtime(WorkloadKind::Auto, None, &amd64(), &arm, false, &all(true, true, true)).unwrap();
        assert_eq!(d.runtime, RuntimeKind::Qemu);
    }

    #[test]
    fn remapped_ports_skip_containerd() {
        let d = choose_runtime(WorkloadKind::Auto, None, &amd64(), &amd64(), true, &all(true, true, true)).unwrap();
        assert_eq!(d.runtime, RuntimeKind::Docker);
        assert!(d.considered[0].why.contains("remaps a port"));
    }

    #[test]
    fn kind_vm_always_takes_qemu() {
        let d = choose_runtime(WorkloadKind::Vm, None, &amd64(), &amd64(), false, &all(true, true, true)).unwrap();
        assert_eq!(d.runtime, RuntimeKind::Qemu);
        assert!(d.reason.contains("kind vm"));
        assert!(choose_runtime(WorkloadKind::Vm, None, &amd64(), &amd64(), false, &all(true, true, false)).is_err());
    }

    #[test]
    fn kind_container_never_falls_back() {
        let err = choose_runtime(WorkloadKind::Container, None, &amd64(), &amd64(), false, &all(false, false, true))
            .unwrap_err();
        assert_eq!(err.considered.len(), 2);
        assert!(err.reason.contains("containerd is unhealthy") && err.reason.contains("docker is unhealthy"));
    }

    #[test]
    fn a_requested_runtime_is_used_or_refused() {
        let d = choose_runtime(
            WorkloadKind::Auto,
            Some(RuntimeKind::Docker),
            &amd64(),
            &amd64(),
            false,
            &all(true, true, true),
        )
        .unwrap();
        assert_eq!(d.runtime, RuntimeKind::Docker);
        assert!(d.reason.starts_with("docker as requested"));
        let err = choose_runtime(
            WorkloadKind::Auto,
            Some(RuntimeKind::Docker),
            &amd64(),
            &amd64(),
            false,
            &all(true, false, true),
        )
        .unwrap_err();
        assert!(err.reason.contains("docker is unhealthy"));
        assert!(choose_runtime(
            WorkloadKind::Vm,
            Some(RuntimeKind::Containerd),
            &amd64(),
            &amd64(),
            false,
            &all(true, true, true)
        )
        .is_err());
        assert!(choose_runtime(
            WorkloadKind::Container,
            Some(RuntimeKind::Qemu),
            &amd64(),
            &amd64(),
            false,
            &all(true, true, true)
        )
        .is_err());
    }
}
