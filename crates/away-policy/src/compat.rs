//! May a workload move from one node to another, and how? Decided before anything
//! moves, with the reason in the answer.
//!
//! * VM live migration copies a running guest that keeps using the CPU it booted on, in
//!   the QEMU version it was started with. The research behind away found it needs the
//!   same CPU vendor, the CPU features the guest uses, and the same QEMU version: each
//!   difference refuses the move.
//! * Container migration (CRIU) restores processes, not a machine: it works across CPU
//!   vendors as long as the target offers every user-space ISA extension the source did
//!   (a process may have picked e.g. an AVX2 `memcpy` at start-up and will use it again
//!   after the restore). CRIU is asked to check the FPU/xsave layout itself
//!   (`--cpu-cap=fpu`, its default policy) and nothing stricter, deliberately: a full
//!   CPUID match (`cpu-cap=cpu`) would refuse every cross-vendor move.
//! * Across architectures no state can move: the workload restarts from its image on
//!   the target, labelled as a cold restart.

use std::collections::BTreeSet;

use away_model::{MigrationMode, NodeInfo, RuntimeKind};

/// CPU flags that change what user-space code may execute (from `/proc/cpuinfo`).
/// Kernel-only or informational flags (`hypervisor`, `pdcm`, `svm`/`vmx`, …) are left
/// out: they differ between vendors without affecting a restored process.
pub const USER_ISA_FLAGS: &[&str] = &[
    "mmx",
    "sse",
    "sse2",
    "pni",
    "ssse3",
    "sse4_1",
    "sse4_2",
    "sse4a",
    "popcnt",
    "aes",
    "pclmulqdq",
    "avx",
    "avx2",
    "f16c",
    "fma",
    "fma4",
    "bmi1",
    "bmi2",
    "adx",
    "movbe",
    "lzcnt",
    "abm",
    "rdrand",
    "rdseed",
    "sha_ni",
    "xsave",
    "xsaveopt",
    "xsavec",
    "xsaves",
    "avx512f",
    "avx512dq",
    "avx512cd",
    "avx512bw",
    "avx512vl",
    "avx512ifma",
    "avx512vbmi",
    "avx512_vbmi2",
    "avx512_vnni",
    "avx512_bitalg",
    "avx512_vpopcntdq",
    "avx512_bf16",
    "vaes",
    "vpclmulqdq",
    "gfni",
    "clflushopt",
    "clwb",
    "cx16",
    "erms",
    "fsrm",
    "rdpid",
];

// The answer's types are wire types (the broker's API returns them): away-model's.
pub use away_model::{Compatibility, Rule};

fn rule(name: &str, ok: bool, detail: impl Into<String>) -> Rule {
    Rule { name: name.into(), ok, detail: detail.into() }
}

fn verdict(mode: MigrationMode, checks: Vec<Rule>, ok_reason: String) -> Compatibility {
    let failed: Vec<&Rule> = checks.iter().filter(|r| !r.ok).collect();
    if failed.is_empty() {
        Compatibility { allowed: true, mode, reason: ok_reason, checks }
    } else {
        let reason = failed.iter().map(|r| r.detail.as_str()).collect::<Vec<_>>().join("; ");
        Compatibility { allowed: false, mode, reason: format!("refused: {reason}"), checks }
    }
}

/// ISA flags the source offers to user space that the target lacks.
pub fn missing_isa_flags(source: &BTreeSet<String>, target: &BTreeSet<String>) -> Vec<String> {
    USER_ISA_FLAGS.iter().filter(|f| source.contains(**f) && !target.contains(**f)).map(|f| f.to_string()).collect()
}

/// Check a container move from `src` (running on `from`) to `dst` (restoring on `to`).
pub fn check_container(src: &NodeInfo, dst: &NodeInfo, from: RuntimeKind, to: RuntimeKind) -> Compatibility {
    let mut checks = Vec::new();
    let target_rt = dst.runtime(to);
    checks.push(rule(
        "target runtime",
        target_rt.is_some_and(|r| r.healthy),
        match target_rt {
            Some(r) if r.healthy => format!("{to} {} is healthy on {}", r.version, dst.name),
            Some(r) => format!("{to} on {} is unhealthy: {}", dst.name, r.detail),
            None => format!("{} has no {to}", dst.name),
        },
    ));
    if src.arch != dst.arch {
        // nothing else matters: the state cannot move, the workload restarts
        let reason = format!(
            "cold restart: {} is {} and {} is {}; CRIU images hold {}-specific process state, so the workload \
             starts fresh from its image on the target and its in-memory state is lost",
            src.name, src.arch, dst.name, dst.arch, src.arch
        );
        checks.push(rule("architecture", true, reason.clone()));
        return verdict(MigrationMode::ColdRestart, checks, reason);
    }
    checks.push(rule("architecture", true, format!("both {}", src.arch)));
    checks.push(rule(
        "same runtime",
        from == to,
        if from == to {
            format!("{from} to {to}")
        } else {
            format!(
                "{from} to {to}: the two set containers up differently (containerd workloads use the node's network \
                 namespace, Docker's a bridge; different mounts and cgroup paths), and CRIU restores a process only \
                 into the same setup; move between the same runtime"
            )
        },
    ));
    let checkpoint_ok = src.runtime(from).is_some_and(|r| r.checkpoint) && target_rt.is_some_and(|r| r.checkpoint);
    checks.push(rule(
        "checkpoint support",
        checkpoint_ok,
        if checkpoint_ok {
            "CRIU checkpoint/restore available on both nodes".to_string()
        } else {
            format!(
                "{from} on {} or {to} on {} cannot checkpoint/restore (CRIU missing or Docker not experimental)",
                src.name, dst.name
            )
        },
    ));
    let missing = missing_isa_flags(&src.cpu.flags, &dst.cpu.flags);
    let vendors = if src.cpu.vendor == dst.cpu.vendor {
        format!("same CPU vendor ({})", src.cpu.vendor)
    } else {
        format!("across CPU vendors ({} to {})", src.cpu.vendor, dst.cpu.vendor)
    };
    checks.push(rule(
        "cpu features",
        missing.is_empty(),
        if missing.is_empty() {
            format!("{vendors}: the target has every user-space ISA extension the source offers; CRIU checks the FPU/xsave layout (cpu-cap=fpu)")
        } else {
            format!("{vendors}: {} lacks {} that processes on {} may be using", dst.name, missing.join(", "), src.name)
        },
    ));
    let ok_reason = format!("CRIU checkpoint/restore, {vendors}");
    verdict(MigrationMode::StopAndCopy, checks, ok_reason)
}

/// Check a VM live migration from `src` to `dst`.
pub fn check_vm(src: &NodeInfo, dst: &NodeInfo) -> Compatibility {
    let mut checks = Vec::new();
    let (sq, dq) = (src.hypervisor.as_ref(), dst.hypervisor.as_ref());
    checks.push(rule(
        "qemu on both",
        sq.is_some() && dq.is_some() && dst.runtime(RuntimeKind::Qemu).is_some_and(|r| r.healthy),
        match (sq, dq) {
            (Some(_), Some(_)) => "QEMU on both nodes".to_string(),
            _ => format!("QEMU missing on {}", if sq.is_none() { &src.name } else { &dst.name }),
        },
    ));
    if let (Some(s), Some(d)) = (sq, dq) {
        checks.push(rule(
            "qemu version",
            s.qemu_version == d.qemu_version,
            if s.qemu_version == d.qemu_version {
                format!("QEMU {} on both", s.qemu_version)
            } else {
                format!(
                    "QEMU {} on {} but {} on {}: the migration stream and device state differ between versions",
                    s.qemu_version, src.name, d.qemu_version, dst.name
                )
            },
        ));
    }
    checks.push(rule("architecture", src.arch == dst.arch, format!("{} to {}", src.arch, dst.arch)));
    checks.push(rule(
        "cpu vendor",
        src.cpu.vendor == dst.cpu.vendor,
        if src.cpu.vendor == dst.cpu.vendor {
            format!("both {}", src.cpu.vendor)
        } else {
            format!(
                "CPU vendor {} on {} but {} on {}: a running guest keeps the CPU it booted on",
                src.cpu.vendor, src.name, dst.cpu.vendor, dst.name
            )
        },
    ));
    let missing: Vec<String> = src.cpu.flags.difference(&dst.cpu.flags).cloned().collect();
    let model_same = src.cpu.model == dst.cpu.model;
    checks.push(rule(
        "cpu model and flags",
        missing.is_empty(),
        if missing.is_empty() {
            format!(
                "{} offers every CPU flag of {}{}",
                dst.name,
                src.name,
                if model_same { " (same model)" } else { "" }
            )
        } else {
            let shown: Vec<&str> = missing.iter().take(8).map(String::as_str).collect();
            format!(
                "{} lacks CPU flags the guest may use: {}{}",
                dst.name,
                shown.join(", "),
                if missing.len() > 8 { ", …" } else { "" }
            )
        },
    ));
    verdict(
        MigrationMode::VmLive,
        checks,
        format!("QEMU live migration, same vendor, QEMU version and CPU features on {} and {}", src.name, dst.name),
    )
}

/// The name of the rule [`with_connections`] adds.
pub const CONNECTIONS_RULE: &str = "connections";

/// What a move does to the workload's open TCP connections, said before it starts: they
/// are kept only on a lab network (docs/network.md), where the workload's address moves
/// with it and CRIU restores its sockets established (a VM's are in the guest's memory,
/// which QEMU moves; its tap on the target's bridge takes the same MAC); anywhere else its address becomes
/// the target's and its peers see their connections end. It informs and never refuses
/// (a user who needs the connections reads it in the dry run), so the rule passes either
/// way and the verdict's reason ends with it.
pub fn with_connections(
    mut compat: Compatibility,
    overlay: Option<&away_model::OverlayAddress>,
    runtime: RuntimeKind,
    close_connections: bool,
    target: &str,
) -> Compatibility {
    let ends = format!("after the move it answers at {target}'s address and its open TCP connections end");
    let detail = match (compat.mode, runtime, overlay) {
        (MigrationMode::ColdRestart, ..) => "lost: a cold restart starts the workload afresh".to_string(),
        (_, RuntimeKind::Qemu, Some(a)) => format!(
            "kept: {} on network {} moves with it; QEMU migrates the guest's TCP state and {target} announces the \
             address (QEMU's self-announce){}",
            a.ip,
            a.network,
            if close_connections {
                " (close_connections is for containers: a VM's sockets are in its memory)"
            } else {
                ""
            }
        ),
        (_, RuntimeKind::Qemu, None) => {
            format!("lost: a VM's network is its node's (QEMU user networking, the broker runs no lab network): {ends}")
        }
        (_, RuntimeKind::Docker, _) => {
            format!("lost: Docker workloads stay on Docker's bridge (not on a lab network yet): {ends}")
        }
        (_, _, Some(a)) if close_connections => format!(
            "closed on request (close_connections): {} on network {} moves with it, its TCP connections are \
             restored closed and its peers see them end",
            a.ip, a.network
        ),
        (_, _, Some(a)) => format!(
            "kept: {} on network {} moves with it; CRIU restores its TCP connections established and {target} \
             announces the address (gratuitous ARP)",
            a.ip, a.network
        ),
        (_, _, None) => format!("lost: it shares its node's network (the broker runs no lab network): {ends}"),
    };
    if compat.allowed {
        let short = detail.split_once(':').map_or(detail.as_str(), |(s, _)| s);
        compat.reason = format!("{}; connections {short}", compat.reason);
    }
    compat.checks.push(rule(CONNECTIONS_RULE, true, detail));
    compat
}

#[cfg(test)]
mod tests {
    use super::*;
    use away_model::{Accel, Arch, CpuInfo, CpuVendor, HypervisorInfo, RuntimeInfo, Tier};

    fn node(name: &str, vendor: CpuVendor, flags: &[&str], qemu: &str, arch: &str) -> NodeInfo {
        let rt =
            |kind| RuntimeInfo { kind, version: "1".into(), healthy: true, checkpoint: true, detail: String::new() };
        NodeInfo {
            name: name.into(),
            tier: Tier::Cloud,
            arch: Arch(arch.into()),
            cpu: CpuInfo {
                vendor,
                model: "model".into(),
                family: None,
                model_number: None,
                cores: 2,
                flags: flags.iter().map(|f| f.to_string()).collect(),
            },
            memory_bytes: 1 << 30,
            kernel: "6.1".into(),
            runtimes: vec![rt(RuntimeKind::Containerd), rt(RuntimeKind::Docker), rt(RuntimeKind::Qemu)],
            hypervisor: Some(HypervisorInfo { qemu_version: qemu.into(), accel: Accel::Tcg, reason: String::new() }),
            link: None,
            labels: Default::default(),
            disk_bases: Default::default(),
        }
    }

    const INTEL: &[&str] = &["sse2", "sse4_2", "avx", "avx2", "aes", "vmx", "pdcm"];
    const AMD: &[&str] = &["sse2", "sse4_2", "avx", "avx2", "aes", "svm", "sse4a"];
    const OLD_AMD: &[&str] = &["sse2", "sse4_2", "aes", "svm"];

    #[test]
    fn containers_move_across_vendors_when_the_isa_matches() {
        let c = check_container(
            &node("intel", CpuVendor::Intel, INTEL, "10.0.2", "amd64"),
            &node("amd", CpuVendor::Amd, AMD, "10.0.2", "amd64"),
            RuntimeKind::Containerd,
            RuntimeKind::Containerd,
        );
        assert!(c.allowed, "{c:?}");
        assert_eq!(c.mode, MigrationMode::StopAndCopy);
        assert!(c.reason.contains("across CPU vendors (intel to amd)"), "{}", c.reason);
    }

    #[test]
    fn containers_refuse_a_target_without_features_the_source_offered() {
        let c = check_container(
            &node("intel", CpuVendor::Intel, INTEL, "10.0.2", "amd64"),
            &node("old", CpuVendor::Amd, OLD_AMD, "10.0.2", "amd64"),
            RuntimeKind::Docker,
            RuntimeKind::Docker,
        );
        assert!(!c.allowed);
        assert!(c.reason.contains("old lacks avx, avx2"), "{}", c.reason);
    }

    #[test]
    fn containers_across_architectures_restart_cold_with_a_label() {
        let c = check_container(
            &node("x86", CpuVendor::Intel, INTEL, "10.0.2", "amd64"),
            &node("pi", CpuVendor::Arm, &["fp", "asimd"], "10.0.2", "arm64"),
            RuntimeKind::Containerd,
            RuntimeKind::Containerd,
        );
        assert!(c.allowed);
        assert_eq!(c.mode, MigrationMode::ColdRestart);
        assert!(c.reason.starts_with("cold restart") && c.reason.contains("state is lost"), "{}", c.reason);
    }

    #[test]
    fn containers_between_runtimes_are_refused_with_the_reason() {
        let n = node("a", CpuVendor::Amd, AMD, "10.0.2", "amd64");
        let c = check_container(&n, &n, RuntimeKind::Containerd, RuntimeKind::Docker);
        assert!(!c.allowed);
        assert!(c.reason.contains("CRIU restores a process only into the same setup"), "{}", c.reason);
    }

    #[test]
    fn vms_refuse_another_vendor_another_qemu_or_missing_flags() {
        let intel = node("intel", CpuVendor::Intel, INTEL, "10.0.2", "amd64");
        let amd = node("amd", CpuVendor::Amd, AMD, "10.0.2", "amd64");
        let c = check_vm(&intel, &amd);
        assert!(!c.allowed);
        assert!(c.reason.contains("CPU vendor intel on intel but amd on amd"), "{}", c.reason);
        let c = check_vm(&intel, &node("intel8", CpuVendor::Intel, INTEL, "8.2.0", "amd64"));
        assert!(!c.allowed && c.reason.contains("QEMU 10.0.2 on intel but 8.2.0 on intel8"), "{}", c.reason);
        let c = check_vm(&intel, &node("intel-old", CpuVendor::Intel, &["sse2", "sse4_2", "vmx"], "10.0.2", "amd64"));
        assert!(!c.allowed && c.reason.contains("lacks CPU flags the guest may use"), "{}", c.reason);
        let c = check_vm(&intel, &node("twin", CpuVendor::Intel, INTEL, "10.0.2", "amd64"));
        assert!(c.allowed && c.mode == MigrationMode::VmLive, "{c:?}");
    }

    #[test]
    fn connections_are_kept_only_on_a_lab_network_and_never_refuse() {
        let amd = node("amd", CpuVendor::Amd, AMD, "10.0.2", "amd64");
        let ok = || check_container(&amd, &amd, RuntimeKind::Containerd, RuntimeKind::Containerd);
        let addr = away_model::OverlayAddress {
            network: "lab".into(),
            vni: 7,
            port: 4799,
            ip: "10.250.0.5".parse().unwrap(),
            prefix_len: 24,
            mac: "02:aa:0a:fa:00:05".into(),
        };
        let said = |c: &Compatibility| c.checks.iter().find(|r| r.name == CONNECTIONS_RULE).unwrap().clone();
        let c = with_connections(ok(), Some(&addr), RuntimeKind::Containerd, false, "laptop");
        assert!(c.allowed && c.reason.ends_with("; connections kept"), "{}", c.reason);
        assert!(said(&c).ok && said(&c).detail.starts_with("kept: 10.250.0.5 on network lab"), "{:?}", said(&c));
        let c = with_connections(ok(), Some(&addr), RuntimeKind::Containerd, true, "laptop");
        assert!(c.reason.ends_with("; connections closed on request (close_connections)"), "{}", c.reason);
        let c = with_connections(ok(), None, RuntimeKind::Containerd, false, "laptop");
        assert!(c.allowed && c.reason.ends_with("; connections lost"), "{}", c.reason);
        assert!(said(&c).detail.contains("answers at laptop's address"), "{:?}", said(&c));
        // Docker is not on the lab network, whatever address the broker holds
        let c = with_connections(ok(), Some(&addr), RuntimeKind::Docker, false, "laptop");
        assert!(said(&c).detail.starts_with("lost: Docker workloads stay on Docker's bridge"), "{:?}", said(&c));
        // a VM on a lab network keeps them (its tap takes the same MAC), without one not
        let c = with_connections(check_vm(&amd, &amd), Some(&addr), RuntimeKind::Qemu, false, "laptop");
        assert!(c.allowed && c.reason.ends_with("; connections kept"), "{}", c.reason);
        assert!(
            said(&c).detail.starts_with("kept: 10.250.0.5 on network lab moves with it; QEMU migrates the guest's TCP"),
            "{:?}",
            said(&c)
        );
        let c = with_connections(check_vm(&amd, &amd), Some(&addr), RuntimeKind::Qemu, true, "laptop");
        assert!(
            said(&c).detail.starts_with("kept:") && said(&c).detail.contains("close_connections is for containers")
        );
        let c = with_connections(check_vm(&amd, &amd), None, RuntimeKind::Qemu, false, "laptop");
        assert!(c.allowed && said(&c).detail.starts_with("lost: a VM's network is its node's"), "{:?}", said(&c));
        assert!(c.reason.ends_with("; connections lost"), "{}", c.reason);
        let mut cold = check_vm(&amd, &amd);
        cold.mode = MigrationMode::ColdRestart;
        let c = with_connections(cold, Some(&addr), RuntimeKind::Qemu, false, "laptop");
        assert!(said(&c).detail.starts_with("lost: a cold restart"), "{:?}", said(&c));
        // a refused move stays refused for its own reasons
        let refused = check_container(&amd, &amd, RuntimeKind::Containerd, RuntimeKind::Docker);
        let c = with_connections(refused.clone(), Some(&addr), RuntimeKind::Containerd, false, "laptop");
        assert!(!c.allowed && c.reason == refused.reason, "{}", c.reason);
    }
}
