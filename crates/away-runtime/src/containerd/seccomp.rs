//! The default seccomp profile of containerd workloads: Docker's, so that what runs
//! under Docker runs here too. The rules are data (`seccomp.json`, embedded); which of
//! them apply depends on the container's capabilities and the host's architecture,
//! as in Docker.

use std::collections::BTreeSet;

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder, LinuxSeccompBuilder, LinuxSeccompOperator,
    LinuxSyscall, LinuxSyscallBuilder,
};
use serde::Deserialize;

const PROFILE: &str = include_str!("seccomp.json");
/// What clone3 answers without CAP_SYS_ADMIN: libc then falls back to clone, whose
/// flags the filter can read.
const ENOSYS: u32 = 38;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Profile {
    #[allow(dead_code)]
    about: String,
    errno: u32,
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    enosys: Vec<String>,
    /// `[index, op, value]`.
    #[serde(default)]
    args: Vec<(usize, String, u64)>,
    #[serde(default)]
    caps: Vec<String>,
    #[serde(default)]
    unless_caps: Vec<String>,
    #[serde(default)]
    arches: Vec<String>,
    #[serde(default)]
    arches_not: Vec<String>,
    #[serde(default)]
    #[allow(dead_code)]
    why: String,
}

impl Rule {
    fn applies(&self, caps: &BTreeSet<&str>, arch: &str) -> bool {
        self.caps.iter().all(|c| caps.contains(c.as_str()))
            && !self.unless_caps.iter().any(|c| caps.contains(c.as_str()))
            && (self.arches.is_empty() || self.arches.iter().any(|a| a == arch))
            && !self.arches_not.iter().any(|a| a == arch)
    }
}

/// The filter for a container whose bounding set is `caps` (`CAP_` names), on `arch`
/// (Rust's names, as `std::env::consts::ARCH`).
pub(super) fn default_profile(caps: &BTreeSet<&str>, arch: &str) -> LinuxSeccomp {
    let profile: Profile = serde_json::from_str(PROFILE).expect("the embedded seccomp.json is valid");
    let mut syscalls: Vec<LinuxSyscall> = Vec::new();
    for rule in profile.rules.iter().filter(|r| r.applies(caps, arch)) {
        let args: Vec<_> = rule
            .args
            .iter()
            .map(|(index, op, value)| {
                let (op, value, two) = match op.as_str() {
                    "==" => (LinuxSeccompOperator::ScmpCmpEq, *value, None),
                    "!=" => (LinuxSeccompOperator::ScmpCmpNe, *value, None),
                    "masked==" => (LinuxSeccompOperator::ScmpCmpMaskedEq, *value, Some(0u64)),
                    other => panic!("seccomp.json: unknown operator {other:?}"),
                };
                let arg = LinuxSeccompArgBuilder::default().index(*index).value(value).op(op);
                let arg = if let Some(two) = two { arg.value_two(two) } else { arg };
                arg.build().expect("index, value and op are set")
            })
            .collect();
        for (names, action, errno) in [
            (&rule.allow, LinuxSeccompAction::ScmpActAllow, None),
            (&rule.enosys, LinuxSeccompAction::ScmpActErrno, Some(ENOSYS)),
        ] {
            if names.is_empty() {
                continue;
            }
            let mut b = LinuxSyscallBuilder::default().names(names.clone()).action(action);
            if let Some(errno) = errno {
                b = b.errno_ret(errno);
            }
            if !args.is_empty() {
                b = b.args(args.clone());
            }
            syscalls.push(b.build().expect("names and action are set"));
        }
    }
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActErrno)
        .default_errno_ret(profile.errno)
        .architectures(architectures(arch))
        .syscalls(syscalls)
        .build()
        .expect("default action is set")
}

/// The ABIs a process of this architecture may use (as Docker's archMap).
fn architectures(arch: &str) -> Vec<Arch> {
    match arch {
        "x86_64" => vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32],
        "aarch64" => vec![Arch::ScmpArchAarch64, Arch::ScmpArchArm],
        "riscv64" => vec![Arch::ScmpArchRiscv64],
        "s390x" => vec![Arch::ScmpArchS390x, Arch::ScmpArchS390],
        _ => vec![Arch::ScmpArchNative],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(p: &LinuxSeccomp) -> BTreeSet<String> {
        p.syscalls()
            .as_ref()
            .unwrap()
            .iter()
            .filter(|s| s.action() == LinuxSeccompAction::ScmpActAllow && s.args().is_none())
            .flat_map(|s| s.names().clone())
            .collect()
    }

    #[test]
    fn the_default_set_allows_what_docker_allows_and_no_more() {
        let caps: BTreeSet<&str> = away_model::DEFAULT_CAPABILITIES.into_iter().collect();
        let p = default_profile(&caps, "x86_64");
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(p.default_errno_ret(), Some(1));
        let allowed = allowed(&p);
        for ok in ["read", "chown", "setuid", "arch_prctl", "ptrace", "chroot", "io_uring_setup"] {
            assert!(allowed.contains(ok), "{ok} should be allowed");
        }
        for refused in ["mount", "unshare", "reboot", "kexec_load", "init_module", "bpf"] {
            assert!(!allowed.contains(refused), "{refused} should be refused");
        }
        // clone only without namespace flags, clone3 answers ENOSYS
        let syscalls = p.syscalls().as_ref().unwrap();
        let clone = syscalls.iter().find(|s| s.names() == &["clone"]).unwrap();
        let arg = clone.args().as_ref().unwrap()[0];
        assert_eq!((arg.index(), arg.value(), arg.op()), (0, 0x7E02_0000, LinuxSeccompOperator::ScmpCmpMaskedEq));
        let clone3 = syscalls.iter().find(|s| s.names() == &["clone3"]).unwrap();
        assert_eq!((clone3.action(), clone3.errno_ret()), (LinuxSeccompAction::ScmpActErrno, Some(38)));
        assert_eq!(p.architectures().as_ref().unwrap().len(), 3);
    }

    #[test]
    fn capabilities_open_their_system_calls() {
        let mut caps: BTreeSet<&str> = away_model::DEFAULT_CAPABILITIES.into_iter().collect();
        caps.insert("CAP_SYS_ADMIN");
        caps.remove("CAP_SYS_CHROOT");
        let p = default_profile(&caps, "aarch64");
        let allowed = allowed(&p);
        assert!(allowed.contains("mount") && allowed.contains("clone") && allowed.contains("clone3"));
        assert!(!allowed.contains("chroot") && !allowed.contains("arch_prctl"));
        assert!(p.syscalls().as_ref().unwrap().iter().all(|s| s.action() == LinuxSeccompAction::ScmpActAllow));
    }
}
