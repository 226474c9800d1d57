//! The OCI runtime spec containerd hands runc for a workload.

use std::path::{Path, PathBuf};

use away_model::WorkloadSpec;
use oci_spec::runtime::{LinuxCpu, LinuxMemory, LinuxNamespaceType, Spec};

use crate::store::ResolvedImage;

/// The environment of an image that sets none.
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// CFS period of the CPU limit, in microseconds (the kernel's default).
const CPU_PERIOD: u64 = 100_000;
/// Annotation whose file runc hands CRIU on restore; its options override the ones
/// runc sets (how a lazy restore gets through containerd's shim).
const CRIU_CONFIG_ANNOTATION: &str = "org.criu.config";

/// The OCI runtime spec of a workload: runc's defaults (via oci-spec), the image's
/// process, the spec's env and limits, and the node's network namespace.
/// `criu_config` names a CRIU configuration file for a restore.
pub(super) fn oci_spec_for(
    spec: &WorkloadSpec,
    image: &ResolvedImage,
    namespace: &str,
    criu_config: Option<&Path>,
) -> Spec {
    let mut oci = Spec::default();

    let mut env: Vec<String> =
        if image.summary.env.is_empty() { vec![DEFAULT_PATH.into()] } else { image.summary.env.clone() };
    for (k, val) in &spec.env {
        env.retain(|e| !e.starts_with(&format!("{k}=")));
        env.push(format!("{k}={val}"));
    }
    let (uid, gid) = parse_user(&image.summary.user);
    let process = oci.process_mut().get_or_insert_with(Default::default);
    process.set_args(Some(image.argv(spec.command.as_deref())));
    process.set_env(Some(env));
    process.set_cwd(PathBuf::from(if image.summary.working_dir.is_empty() { "/" } else { &image.summary.working_dir }));
    let user = process.user_mut();
    user.set_uid(uid);
    user.set_gid(gid);

    oci.set_hostname(Some(spec.name.clone()));
    // writable rootfs: apps may write, and the changes travel with a migration
    oci.root_mut().get_or_insert_with(Default::default).set_readonly(Some(false));

    let linux = oci.linux_mut().get_or_insert_with(Default::default);
    // host (or agent) network: no CNI on these nodes; the workload's ports are the node's
    if let Some(namespaces) = linux.namespaces_mut() {
        namespaces.retain(|n| n.typ() != LinuxNamespaceType::Network);
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

/// `USER` as uid:gid; names other than root are not resolvable in scratch images.
fn parse_user(user: &str) -> (u32, u32) {
    let (u, g) = user.split_once(':').unwrap_or((user, ""));
    let uid = u.parse().unwrap_or(0);
    let gid = g.parse().unwrap_or(uid);
    (uid, gid)
}

#[cfg(test)]
mod tests {
    use away_model::Arch;
    use oci_spec::runtime::LinuxNamespaceType;

    use super::*;
    use crate::store::ImageSummary;

    #[test]
    fn users_parse() {
        assert_eq!(parse_user(""), (0, 0));
        assert_eq!(parse_user("1000"), (1000, 1000));
        assert_eq!(parse_user("1000:50"), (1000, 50));
    }

    fn workload(extra: serde_json::Value) -> WorkloadSpec {
        let mut v = serde_json::json!({"name": "counter", "image": "away/counter:latest"});
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::from_value(v).expect("test workload spec")
    }

    fn image(env: &[&str], user: &str, working_dir: &str) -> ResolvedImage {
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
                user: user.into(),
                exposed_ports: vec![8080],
            },
        }
    }

    #[test]
    fn the_spec_carries_the_workload() {
        let spec = workload(serde_json::json!({
            "command": ["--every", "5s"],
            "env": {"MODE": "fast", "PATH": "/app/bin"},
            "resources": {"memory": "64Mi", "cpus": 0.5},
        }));
        let img = image(&["PATH=/usr/bin", "LANG=C"], "1000:50", "/app");
        let oci = oci_spec_for(&spec, &img, "away", None);

        let process = oci.process().as_ref().unwrap();
        assert_eq!(process.args().as_deref().unwrap(), ["/bin/counter", "--every", "5s"]);
        // the spec's env replaces the image's variable of that name, the rest stays
        assert_eq!(process.env().as_deref().unwrap(), ["LANG=C", "MODE=fast", "PATH=/app/bin"]);
        assert_eq!(process.cwd(), Path::new("/app"));
        assert_eq!((process.user().uid(), process.user().gid()), (1000, 50));
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
        // runc's default mounts stay
        let mounts: Vec<_> = oci.mounts().as_ref().unwrap().iter().map(|m| m.destination().clone()).collect();
        assert!(mounts.contains(&PathBuf::from("/proc")) && mounts.contains(&PathBuf::from("/dev")), "{mounts:?}");
    }

    #[test]
    fn an_image_without_env_user_or_workdir_gets_the_defaults() {
        let oci = oci_spec_for(&workload(serde_json::json!({})), &image(&[], "", ""), "ns", None);
        let process = oci.process().as_ref().unwrap();
        assert_eq!(process.args().as_deref().unwrap(), ["/bin/counter", "--every", "1s"]);
        assert_eq!(process.env().as_deref().unwrap(), [DEFAULT_PATH]);
        assert_eq!(process.cwd(), Path::new("/"));
        assert_eq!((process.user().uid(), process.user().gid()), (0, 0));
        let resources = oci.linux().as_ref().unwrap().resources().as_ref().unwrap();
        assert_eq!(resources.memory().unwrap().limit(), Some(256 << 20));
        assert_eq!(resources.cpu().as_ref().unwrap().quota(), Some(100_000));
    }

    #[test]
    fn a_restore_names_its_criu_config() {
        let conf = Path::new("/ckpt/criu-lazy.conf");
        let oci = oci_spec_for(&workload(serde_json::json!({})), &image(&[], "", ""), "away", Some(conf));
        assert_eq!(oci.annotations().as_ref().unwrap()[CRIU_CONFIG_ANNOTATION], "/ckpt/criu-lazy.conf");
    }

    /// The spec as it was built before it was typed: JSON patches over oci-spec's
    /// default (and, for a restore, the annotation create_and_start added).
    fn patched_json(spec: &WorkloadSpec, image: &ResolvedImage, namespace: &str, conf: Option<&Path>) -> String {
        let mut v = serde_json::to_value(oci_spec::runtime::Spec::default()).expect("default OCI spec");
        let mut env: Vec<String> = if image.summary.env.is_empty() {
            vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()]
        } else {
            image.summary.env.clone()
        };
        for (k, val) in &spec.env {
            env.retain(|e| !e.starts_with(&format!("{k}=")));
            env.push(format!("{k}={val}"));
        }
        let (uid, gid) = parse_user(&image.summary.user);
        v["process"]["args"] = serde_json::json!(image.argv(spec.command.as_deref()));
        v["process"]["env"] = serde_json::json!(env);
        v["process"]["cwd"] =
            serde_json::json!(if image.summary.working_dir.is_empty() { "/" } else { &image.summary.working_dir });
        v["process"]["user"] = serde_json::json!({"uid": uid, "gid": gid});
        v["hostname"] = serde_json::json!(spec.name);
        v["root"]["readonly"] = serde_json::json!(false);
        if let Some(ns) = v["linux"]["namespaces"].as_array_mut() {
            ns.retain(|n| n["type"] != "network");
        }
        let period: u64 = 100_000;
        v["linux"]["resources"]["memory"] = serde_json::json!({"limit": spec.resources.memory.bytes()});
        v["linux"]["resources"]["cpu"] =
            serde_json::json!({"quota": (spec.resources.cpus * period as f64).round() as i64, "period": period});
        v["linux"]["cgroupsPath"] = serde_json::json!(format!("/away/{namespace}/{}", spec.name));
        if let Some(conf) = conf {
            v["annotations"]["org.criu.config"] = conf.display().to_string().into();
        }
        v.to_string()
    }

    #[test]
    fn containerd_gets_the_same_json_as_before_the_spec_was_typed() {
        let cases = [
            (workload(serde_json::json!({})), image(&[], "", ""), None),
            (
                workload(serde_json::json!({
                    "command": ["sleep", "1"],
                    "env": {"A": "1", "LANG": "de"},
                    "resources": {"memory": "1Gi", "cpus": 2.25},
                })),
                image(&["LANG=C", "HOME=/root"], "65534", "/srv"),
                Some(Path::new("/var/lib/away/ckpt/criu-lazy.conf")),
            ),
        ];
        // capabilities are sets (oci-spec holds them in a HashSet): their order varies
        let sorted_caps = |mut v: serde_json::Value| {
            for set in v["process"]["capabilities"].as_object_mut().unwrap().values_mut() {
                set.as_array_mut().unwrap().sort_by_key(|c| c.as_str().unwrap().to_string());
            }
            v
        };
        for (spec, img, conf) in cases {
            let typed = serde_json::to_vec(&oci_spec_for(&spec, &img, "away-b", conf)).unwrap();
            let typed: serde_json::Value = serde_json::from_slice(&typed).unwrap();
            let patched: serde_json::Value = serde_json::from_str(&patched_json(&spec, &img, "away-b", conf)).unwrap();
            assert_eq!(sorted_caps(typed), sorted_caps(patched));
        }
    }
}
