//! The OCI runtime spec containerd hands runc for a workload.

use away_model::WorkloadSpec;

use crate::store::ResolvedImage;

/// The OCI runtime spec of a workload: runc's defaults (via oci-spec), the image's
/// process, the spec's env and limits, and the node's network namespace.
pub(super) fn oci_spec_for(spec: &WorkloadSpec, image: &ResolvedImage, namespace: &str) -> String {
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
    // writable rootfs: apps may write, and the changes travel with a migration
    v["root"]["readonly"] = serde_json::json!(false);
    // host (or agent) network: no CNI on these nodes; the workload's ports are the node's
    if let Some(ns) = v["linux"]["namespaces"].as_array_mut() {
        ns.retain(|n| n["type"] != "network");
    }
    let period: u64 = 100_000;
    v["linux"]["resources"]["memory"] = serde_json::json!({"limit": spec.resources.memory.bytes()});
    v["linux"]["resources"]["cpu"] =
        serde_json::json!({"quota": (spec.resources.cpus * period as f64).round() as i64, "period": period});
    // per namespace: two containerd instances on one host (a local cluster) may both
    // hold a workload of this name during a move
    v["linux"]["cgroupsPath"] = serde_json::json!(format!("/away/{namespace}/{}", spec.name));
    v.to_string()
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
    use super::*;

    #[test]
    fn users_parse() {
        assert_eq!(parse_user(""), (0, 0));
        assert_eq!(parse_user("1000"), (1000, 1000));
        assert_eq!(parse_user("1000:50"), (1000, 50));
    }
}
