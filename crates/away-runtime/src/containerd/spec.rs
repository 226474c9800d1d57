//! The OCI runtime spec containerd hands runc for a workload: the same container a
//! Docker workload gets (Docker's capabilities, seccomp profile, mounts, masked paths
//! and environment; its user resolution in `user.rs`), so an image that runs under
//! Docker runs here too. `tests/tests/contract.rs` compares the two from inside.

use std::path::{Path, PathBuf};

use away_model::{Seccomp, WorkloadSpec};
use oci_spec::runtime::{Capability, LinuxCpu, LinuxMemory, LinuxNamespaceType, Mount, Spec};

use super::seccomp;
use super::user::ExecUser;
use crate::store::ResolvedImage;

/// The environment of an image that sets none.
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// CFS period of the CPU limit, in microseconds (the kernel's default).
const CPU_PERIOD: u64 = 100_000;
/// Annotation whose file runc hands CRIU on restore; its options override the ones
/// runc sets (how a lazy restore gets through containerd's shim).
const CRIU_CONFIG_ANNOTATION: &str = "org.criu.config";
/// Docker's masked paths (moby's `oci.DefaultSpec`): runc's, and powercap and
/// interrupts, which leak host information.
const MASKED_PATHS: [&str; 12] = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// The OCI runtime spec of a workload: oci-spec's defaults made Docker's, the image's
/// process as `user`, the spec's env, limits, capabilities and seccomp choice, and the
/// node's network namespace. `criu_config` names a CRIU configuration file for a restore.
pub(super) fn oci_spec_for(
    spec: &WorkloadSpec,
    image: &ResolvedImage,
    user: &ExecUser,
    namespace: &str,
    criu_config: Option<&Path>,
) -> Spec {
    let mut oci = Spec::default();

    // Docker's order: PATH and HOSTNAME first, the image's and then the spec's
    // variables replace them by name; HOME from the passwd entry when still unset
    let mut env: Vec<String> = vec![DEFAULT_PATH.into(), format!("HOSTNAME={}", spec.name)];
    let set = |env: &mut Vec<String>, entry: String| {
        let key = entry.split_once('=').map_or(entry.as_str(), |(k, _)| k).to_string();
        match env.iter_mut().find(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) == key) {
            Some(old) => *old = entry,
            None => env.push(entry),
        }
    };
    for e in &image.summary.env {
        set(&mut env, e.clone());
    }
    for (k, val) in &spec.env {
        set(&mut env, format!("{k}={val}"));
    }
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", user.home.as_deref().filter(|h| !h.is_empty()).unwrap_or("/")));
    }
    let caps = spec.capabilities.effective_set();
    let process = oci.process_mut().get_or_insert_with(Default::default);
    process.set_args(Some(image.argv(spec.command.as_deref())));
    process.set_env(Some(env));
    process.set_cwd(PathBuf::from(if image.summary.working_dir.is_empty() { "/" } else { &image.summary.working_dir }));
    let u = process.user_mut();
    u.set_uid(user.uid);
    u.set_gid(user.gid);
    // the primary group leads the supplementary ones, as Docker has done since
    // CVE-2023-25173 (a process dropping its groups would otherwise keep gid 0's access)
    let mut groups = vec![user.gid];
    groups.extend(user.additional_gids.iter().filter(|g| **g != user.gid));
    u.set_additional_gids(Some(groups));
    // as Docker: setuid programs work (no_new_privileges off), and the limits are the
    // daemon's (Docker sets none; oci-spec's default would cap open files at 1024)
    process.set_no_new_privileges(None);
    process.set_rlimits(None);
    let set_of: oci_spec::runtime::Capabilities =
        caps.iter().filter_map(|c| c.trim_start_matches("CAP_").parse::<Capability>().ok()).collect();
    let mut capabilities = oci_spec::runtime::LinuxCapabilities::default();
    capabilities.set_bounding(Some(set_of.clone()));
    // as Docker (and execve): a non-root process starts with none in effect, only the
    // bounding set; nothing inheritable or ambient
    let root = user.uid == 0;
    capabilities.set_effective(root.then(|| set_of.clone()));
    capabilities.set_permitted(root.then(|| set_of.clone()));
    capabilities.set_inheritable(None);
    capabilities.set_ambient(None);
    process.set_capabilities(Some(capabilities));

    oci.set_hostname(Some(spec.name.clone()));
    // writable rootfs: apps may write, and the changes travel with a migration
    oci.root_mut().get_or_insert_with(Default::default).set_readonly(Some(false));
    oci.set_mounts(Some(docker_mounts(oci.mounts().clone().unwrap_or_default())));

    let linux = oci.linux_mut().get_or_insert_with(Default::default);
    // host (or agent) network: no CNI on these nodes; the workload's ports are the node's
    if let Some(namespaces) = linux.namespaces_mut() {
        namespaces.retain(|n| n.typ() != LinuxNamespaceType::Network);
    }
    linux.set_masked_paths(Some(MASKED_PATHS.iter().map(|p| p.to_string()).collect()));
    if spec.seccomp == Seccomp::Default {
        linux.set_seccomp(Some(seccomp::default_profile(&caps, std::env::consts::ARCH)));
    }
    let resources = linux.resources_mut().get_or_insert_with(Default::default);
    let mut memory = LinuxMemory::default();
    // the limit was checked against the host's memory: far below i64::MAX
    memory.set_limit(Some(i64::try_from(spec.resources.memory.bytes()).unwrap_or(i64::MAX)));
    resources.set_memory(Some(memory));
    let mut cpu = LinuxCpu::default();
    cpu.set_quota(Some((spec.resources.cpus * CPU_PERIOD as f64).round() as i64));
    cpu.set_period(Some(CPU_PERIOD));
    resources.set_cpu(Some(cpu));
    // per namespace: two containerd instances on one host (a local cluster) may both
    // hold a workload of this name during a move
    linux.set_cgroups_path(Some(PathBuf::from(format!("/away/{namespace}/{}", spec.name))));

    if let Some(conf) = criu_config {
        oci.annotations_mut()
            .get_or_insert_with(Default::default)
            .insert(CRIU_CONFIG_ANNOTATION.into(), conf.display().to_string());
    }
    oci
}

/// The workload's named volumes, bind-mounted read-write. runc declares every bind
/// mount external to CRIU on a checkpoint and maps it to the new spec's source on a
/// restore, so a restored container gets the target's directory.
pub(super) fn mount_volumes(oci: &mut Spec, volumes: &[crate::volume::PreparedVolume]) {
    let mut mounts = oci.mounts().clone().unwrap_or_default();
    for v in volumes {
        let mut m = Mount::default();
        m.set_destination(PathBuf::from(&v.path));
        m.set_typ(Some("bind".into()));
        m.set_source(Some(v.host.clone()));
        m.set_options(Some(vec!["rbind".into(), "rw".into()]));
        mounts.push(m);
    }
    oci.set_mounts(Some(mounts));
}

/// A workload on an overlay network lives in the network namespace away made for it
/// (`netns`, its path under /run/netns): runc joins it instead of the node's. runc
/// also marks it external on a checkpoint and hands it to CRIU on a restore (CRIU's
/// `--external net[…]:extRootNetNS` / `--inherit-fd`), so a restore goes into the
/// namespace the target prepared, with the same address.
pub(super) fn join_network_namespace(oci: &mut Spec, netns: &Path) {
    let linux = oci.linux_mut().get_or_insert_with(Default::default);
    let mut namespaces = linux.namespaces().clone().unwrap_or_default();
    namespaces.retain(|n| n.typ() != LinuxNamespaceType::Network);
    let mut net = oci_spec::runtime::LinuxNamespace::default();
    net.set_typ(LinuxNamespaceType::Network);
    net.set_path(Some(netns.to_path_buf()));
    namespaces.push(net);
    linux.set_namespaces(Some(namespaces));
}

/// runc's default mounts with Docker's options: /proc without suid, exec or devices,
/// the cgroup tree without `relatime`.
fn docker_mounts(mut mounts: Vec<Mount>) -> Vec<Mount> {
    let opts = |o: &[&str]| Some(o.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    for m in &mut mounts {
        match m.destination().to_str() {
            Some("/proc") => {
                m.set_options(opts(&["nosuid", "noexec", "nodev"]));
            }
            Some("/sys/fs/cgroup") => {
                m.set_options(opts(&["ro", "nosuid", "noexec", "nodev"]));
            }
            _ => {}
        }
    }
    mounts
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use away_model::Arch;
    use oci_spec::runtime::LinuxNamespaceType;

    use super::*;
    use crate::store::ImageSummary;

    fn workload(extra: serde_json::Value) -> WorkloadSpec {
        let mut v = serde_json::json!({"name": "counter", "image": "away/counter:latest"});
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::from_value(v).expect("test workload spec")
    }

    fn image(env: &[&str], working_dir: &str) -> ResolvedImage {
        ResolvedImage {
            reference: "docker.io/away/counter:latest".into(),
            tar: PathBuf::from("/images/counter.tar"),
            manifest_digest: format!("sha256:{}", "a".repeat(64)),
            summary: ImageSummary {
                arch: Arch("amd64".into()),
                entrypoint: vec!["/bin/counter".into()],
                cmd: vec!["--every".into(), "1s".into()],
                env: env.iter().map(|e| e.to_string()).collect(),
                working_dir: working_dir.into(),
                user: String::new(),
                exposed_ports: vec![8080],
            },
        }
    }

    fn root() -> ExecUser {
        ExecUser { home: Some("/root".into()), ..Default::default() }
    }

    fn caps_of(set: &Option<oci_spec::runtime::Capabilities>) -> BTreeSet<String> {
        set.iter().flatten().map(|c| format!("CAP_{c}")).collect()
    }

    #[test]
    fn the_spec_carries_the_workload() {
        let spec = workload(serde_json::json!({
            "command": ["--every", "5s"],
            "env": {"MODE": "fast", "PATH": "/app/bin"},
            "resources": {"memory": "64Mi", "cpus": 0.5},
        }));
        let img = image(&["PATH=/usr/bin", "LANG=C"], "/app");
        let user = ExecUser { uid: 1000, gid: 50, additional_gids: vec![4, 27], home: Some("/home/u".into()) };
        let oci = oci_spec_for(&spec, &img, &user, "away", None);

        let process = oci.process().as_ref().unwrap();
        assert_eq!(process.args().as_deref().unwrap(), ["/bin/counter", "--every", "5s"]);
        // Docker's order: PATH and HOSTNAME first, replaced by name, then HOME from passwd
        assert_eq!(
            process.env().as_deref().unwrap(),
            ["PATH=/app/bin", "HOSTNAME=counter", "LANG=C", "MODE=fast", "HOME=/home/u"]
        );
        assert_eq!(process.cwd(), Path::new("/app"));
        assert_eq!((process.user().uid(), process.user().gid()), (1000, 50));
        assert_eq!(process.user().additional_gids().as_deref(), Some(&[50, 4, 27][..]));
        assert_eq!(process.no_new_privileges(), None);
        assert_eq!(process.rlimits(), &None);
        // a non-root user gets the default set as its bounding set only, like Docker
        let caps = process.capabilities().as_ref().unwrap();
        assert_eq!(caps_of(caps.bounding()).len(), 14);
        assert!(caps.effective().is_none() && caps.permitted().is_none());
        assert!(caps.inheritable().is_none() && caps.ambient().is_none());
        assert_eq!(oci.hostname().as_deref(), Some("counter"));
        assert_eq!(oci.root().as_ref().unwrap().readonly(), Some(false));

        let linux = oci.linux().as_ref().unwrap();
        let namespaces: Vec<_> = linux.namespaces().as_ref().unwrap().iter().map(|n| n.typ()).collect();
        assert!(!namespaces.contains(&LinuxNamespaceType::Network), "{namespaces:?}");
        for kept in [LinuxNamespaceType::Pid, LinuxNamespaceType::Mount, LinuxNamespaceType::Uts] {
            assert!(namespaces.contains(&kept), "{kept:?} missing from {namespaces:?}");
        }
        let resources = linux.resources().as_ref().unwrap();
        assert_eq!(resources.memory().unwrap().limit(), Some(64 << 20));
        let cpu = resources.cpu().as_ref().unwrap();
        assert_eq!((cpu.quota(), cpu.period()), (Some(50_000), Some(100_000)));
        assert_eq!(linux.cgroups_path().as_deref(), Some(Path::new("/away/away/counter")));
        assert!(!oci.annotations().as_ref().is_some_and(|a| a.contains_key(CRIU_CONFIG_ANNOTATION)));
        assert!(linux.masked_paths().as_ref().unwrap().contains(&"/proc/interrupts".to_string()));
        assert!(linux.seccomp().is_some());
        let mounts = oci.mounts().as_ref().unwrap();
        let dests: Vec<_> = mounts.iter().map(|m| m.destination().to_str().unwrap()).collect();
        assert_eq!(dests, ["/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/sys/fs/cgroup"]);
        assert_eq!(mounts[0].options().as_deref().unwrap(), ["nosuid", "noexec", "nodev"]);
    }

    #[test]
    fn root_gets_dockers_fourteen_capabilities_in_effect() {
        let oci = oci_spec_for(&workload(serde_json::json!({})), &image(&[], ""), &root(), "ns", None);
        let process = oci.process().as_ref().unwrap();
        let caps = process.capabilities().as_ref().unwrap();
        let want: BTreeSet<String> = away_model::DEFAULT_CAPABILITIES.iter().map(|c| c.to_string()).collect();
        assert_eq!(caps_of(caps.bounding()), want);
        assert_eq!(caps_of(caps.effective()), want);
        assert_eq!(caps_of(caps.permitted()), want);
        assert!(caps.inheritable().is_none() && caps.ambient().is_none());
        assert_eq!(process.env().as_deref().unwrap(), [DEFAULT_PATH, "HOSTNAME=counter", "HOME=/root"]);
        assert_eq!(process.cwd(), Path::new("/"));
        assert_eq!((process.user().uid(), process.user().gid()), (0, 0));
        assert_eq!(process.user().additional_gids().as_deref(), Some(&[0][..]));
        let resources = oci.linux().as_ref().unwrap().resources().as_ref().unwrap();
        assert_eq!(resources.memory().unwrap().limit(), Some(256 << 20));
        assert_eq!(resources.cpu().as_ref().unwrap().quota(), Some(100_000));
    }

    #[test]
    fn the_spec_changes_capabilities_and_seccomp() {
        let spec = workload(serde_json::json!({
            "capabilities": {"add": ["sys_ptrace"], "drop": ["CAP_NET_RAW", "chown"]},
            "seccomp": "unconfined",
        }));
        let oci = oci_spec_for(&spec, &image(&[], ""), &root(), "ns", None);
        let caps = oci.process().as_ref().unwrap().capabilities().as_ref().unwrap();
        let effective = caps_of(caps.effective());
        assert!(effective.contains("CAP_SYS_PTRACE") && !effective.contains("CAP_NET_RAW"), "{effective:?}");
        assert!(!effective.contains("CAP_CHOWN") && effective.len() == 13, "{effective:?}");
        assert!(oci.linux().as_ref().unwrap().seccomp().is_none());
    }

    #[test]
    fn an_overlay_workload_joins_its_own_network_namespace() {
        let mut oci = oci_spec_for(&workload(serde_json::json!({})), &image(&[], ""), &root(), "ns", None);
        join_network_namespace(&mut oci, Path::new("/run/netns/awo-ns-c1"));
        let namespaces = oci.linux().as_ref().unwrap().namespaces().clone().unwrap();
        let nets: Vec<_> = namespaces.iter().filter(|n| n.typ() == LinuxNamespaceType::Network).collect();
        assert_eq!(nets.len(), 1);
        assert_eq!(nets[0].path().as_deref(), Some(Path::new("/run/netns/awo-ns-c1")));
    }

    #[test]
    fn a_restore_names_its_criu_config() {
        let conf = Path::new("/ckpt/criu-lazy.conf");
        let oci = oci_spec_for(&workload(serde_json::json!({})), &image(&[], ""), &root(), "away", Some(conf));
        assert_eq!(oci.annotations().as_ref().unwrap()[CRIU_CONFIG_ANNOTATION], "/ckpt/criu-lazy.conf");
    }

    #[test]
    fn a_volume_is_a_read_write_bind_mount_of_its_directory() {
        let mut oci = oci_spec_for(&workload(serde_json::json!({})), &image(&[], ""), &root(), "ns", None);
        let before = oci.mounts().as_ref().unwrap().len();
        let v = crate::volume::PreparedVolume {
            host: "/var/lib/away/volumes/ns/w/data".into(),
            path: "/data".into(),
            created: true,
        };
        mount_volumes(&mut oci, &[v]);
        let mounts = oci.mounts().as_ref().unwrap();
        assert_eq!(mounts.len(), before + 1);
        let m = mounts.last().unwrap();
        assert_eq!((m.destination().as_path(), m.typ().as_deref()), (Path::new("/data"), Some("bind")));
        assert_eq!(m.source().as_deref(), Some(Path::new("/var/lib/away/volumes/ns/w/data")));
        assert_eq!(m.options().as_deref().unwrap(), ["rbind", "rw"]);
    }
}
