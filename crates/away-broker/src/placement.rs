//! Where a workload goes, in two phases (as Nomad does it):
//!
//! 1. **Feasibility**: every node is checked against every filter, and each failed
//!    filter leaves a reason: offline, draining, tier not allowed, architecture, CPU
//!    vendor or flags, no usable runtime (the container→VM rule of
//!    `away_policy::choose_runtime`, which also says container or VM), memory or CPUs
//!    already promised to the workloads placed there, a VM disk's base image missing
//!    from the node's disk store (a move's target needs none: [`as_moved`]).
//! 2. **Ranking**: the feasible nodes are scored; each score lists its parts so the
//!    answer can say why the winner won:
//!    * `link` (0..30): rate and latency of the node's link toward its users;
//!    * `load` (0..30): CPUs and memory left after this workload, and the CPU busy now;
//!    * `runtime` (0 or 10): a container is lighter than a VM;
//!    * `prefer_client` (0 or 40): the spec prefers the user's own client and this is it
//!      (a client whose `user` label matches the spec's `user` label, or any client
//!      when the spec names no user);
//!    * `cost` (-10 cloud, -5 edge, 0 client): cloud machines cost money.
//!
//! Ties go to the node whose name sorts first, so a decision is reproducible.
//! Everything here is pure: the broker passes the nodes in and stores the answer.

use std::collections::BTreeMap;

use away_model::{Arch, ByteSize, NodeInfo, NodeLoad, RuntimeDecision, RuntimeInfo, Tier, WorkloadSpec};

/// Long explanations are cut to this many entries per list (a cluster of a thousand
/// nodes would otherwise store a thousand scores with every workload).
pub const MAX_LISTED: usize = 20;

/// Entries per list kept with each stored workload (the answer to the request has
/// [`MAX_LISTED`]).
pub const MAX_STORED: usize = 5;

/// The decision with its lists cut to `n` entries (counts and the sentence stay).
pub fn shortened(d: &PlacementDecision, n: usize) -> PlacementDecision {
    // field by field: `..d.clone()` would copy both long lists only to drop them
    PlacementDecision {
        workload: d.workload.clone(),
        chosen: d.chosen.clone(),
        runtime: d.runtime.clone(),
        scores: d.scores.iter().take(n).cloned().collect(),
        filtered: d.filtered.iter().take(n).cloned().collect(),
        feasible_count: d.feasible_count,
        filtered_count: d.filtered_count,
        why: d.why.clone(),
    }
}

/// A node as placement sees it: its fingerprint and what is already promised on it.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub info: &'a NodeInfo,
    pub online: bool,
    pub draining: bool,
    pub load: NodeLoad,
    /// Memory of the workloads the broker has placed there.
    pub reserved_memory: u64,
    pub reserved_cpus: f64,
    /// The node's [`RuntimeClasses`] number, when the caller keeps them: nodes of one
    /// class get the runtime rule's answer computed once per placement.
    pub runtime_class: Option<u32>,
}

// the API bodies live in away-model, shared with away-client
pub use away_model::{Filtered, NodeScore, PlacementDecision};

/// The spec a move's target is checked and chosen by: a VM's disk base need not be
/// on the target yet, the move copies it there (docs/vm.md).
pub fn as_moved(spec: &WorkloadSpec) -> std::borrow::Cow<'_, WorkloadSpec> {
    match spec.disk {
        Some(_) => std::borrow::Cow::Owned(WorkloadSpec { disk: None, ..spec.clone() }),
        None => std::borrow::Cow::Borrowed(spec),
    }
}

/// Phase 1 for one node: how the workload would run there, or every reason it cannot.
pub fn feasibility(spec: &WorkloadSpec, c: &Candidate) -> Result<RuntimeDecision, Vec<String>> {
    let runtime = runtime_for(spec, c.info);
    let mut reasons = Vec::new();
    check(spec, c, runtime.as_ref().map(|_| ()).map_err(|e| e.reason.as_str()), Some(&mut reasons));
    match runtime {
        Ok(d) if reasons.is_empty() => Ok(d),
        _ => Err(reasons),
    }
}

/// The container→VM rule for this workload on this node.
fn runtime_for(spec: &WorkloadSpec, node: &NodeInfo) -> Result<RuntimeDecision, away_policy::NoRuntime> {
    // the broker does not read images: the image is taken to be of the required
    // architecture, or else of the node's own
    let image_arch = spec.placement.arch.as_ref().unwrap_or(&node.arch);
    let remaps = spec.ports.iter().any(|p| p.host.is_some_and(|h| h != p.container));
    away_policy::choose_runtime(spec.kind, spec.placement.runtime, image_arch, &node.arch, remaps, &node.runtimes)
}

/// Every filter of phase 1 but the runtime rule, whose outcome is passed in. With
/// `reasons` each failed filter adds its sentence; without, the first failure ends the
/// check and nothing is formatted (the fast path over a thousand nodes). True if the
/// node passes.
fn check(spec: &WorkloadSpec, c: &Candidate, runtime: Result<(), &str>, mut reasons: Option<&mut Vec<String>>) -> bool {
    let node = c.info;
    let want = &spec.placement;
    let mut passed = true;
    // a failed filter: record why, or stop when nobody asked why
    macro_rules! fail {
        ($($why:tt)*) => {{
            passed = false;
            match reasons.as_deref_mut() {
                Some(r) => r.push(format!($($why)*)),
                None => return false,
            }
        }};
    }
    if !c.online {
        fail!("offline: its agent missed its heartbeats");
    }
    if c.draining {
        fail!("draining: nothing new is placed here");
    }
    if !want.tiers.is_empty() && !want.tiers.contains(&node.tier) {
        let allowed: Vec<String> = want.tiers.iter().map(Tier::to_string).collect();
        fail!("tier {} is not allowed (the spec allows {})", node.tier, allowed.join(", "));
    }
    if let Some(arch) = want.arch.as_ref().filter(|a| **a != node.arch) {
        fail!("architecture {} but the spec requires {arch}", node.arch);
    }
    if let Some(vendor) = want.cpu_vendor.as_ref().filter(|v| **v != node.cpu.vendor) {
        fail!("CPU vendor {} but the spec requires {vendor}", node.cpu.vendor);
    }
    if want.cpu_flags.iter().any(|f| !node.cpu.flags.contains(f)) {
        let missing: Vec<&str> =
            want.cpu_flags.iter().filter(|f| !node.cpu.flags.contains(*f)).map(String::as_str).collect();
        fail!("CPU lacks {}", missing.join(", "));
    }
    if let Err(reason) = runtime {
        fail!("no runtime: {reason}");
    }
    if let Some(disk) = spec.disk.as_ref().filter(|d| !node.disk_bases.contains(&d.base)) {
        fail!(
            "no disk base {} in its disk store (`away image build --disk` there, or move a VM with that disk there)",
            disk.base
        );
    }
    let free_memory = node.memory_bytes.saturating_sub(c.reserved_memory);
    if spec.resources.memory.bytes() > free_memory {
        fail!("needs {} memory, {} free of {}", spec.resources.memory, human(free_memory), human(node.memory_bytes));
    }
    let free_cpus = (f64::from(node.cpu.cores) - c.reserved_cpus).max(0.0);
    if spec.resources.cpus > free_cpus + 1e-9 {
        fail!("needs {} CPUs, {free_cpus:.2} free of {}", spec.resources.cpus, node.cpu.cores);
    }
    passed
}

/// Sizes in MiB-granular binary units, for reasons people read.
fn human(bytes: u64) -> String {
    ByteSize(bytes / (1 << 20) * (1 << 20)).to_string()
}

/// The parts of a node's score, in the order their names sort (the order of
/// [`NodeScore::parts`], so that the total is summed the same way on both paths).
struct Parts {
    cost: f64,
    link: f64,
    load: f64,
    prefer_client: f64,
    runtime: f64,
}

impl Parts {
    fn of(spec: &WorkloadSpec, c: &Candidate, container: bool) -> Parts {
        let node = c.info;
        let link = match node.link {
            Some(l) => {
                let rate = (l.rate_mbit / 1000.0).clamp(0.0, 1.0);
                let latency = 1.0 / (1.0 + l.latency_ms.max(0.0) / 10.0);
                30.0 * (0.5 * rate + 0.5 * latency)
            }
            // unknown link: neither rewarded nor punished
            None => 15.0,
        };
        let cores = f64::from(node.cpu.cores.max(1));
        let cpu_left = ((cores - c.reserved_cpus - spec.resources.cpus) / cores).clamp(0.0, 1.0);
        let mem_total = node.memory_bytes.max(1) as f64;
        let mem_left =
            ((mem_total - c.reserved_memory as f64 - spec.resources.memory.bytes() as f64) / mem_total).clamp(0.0, 1.0);
        let idle = (1.0 - c.load.cpu_percent / 100.0).clamp(0.0, 1.0);
        let users_client = node.tier == Tier::Client
            && match spec.labels.get("user") {
                Some(user) => node.labels.get("user") == Some(user),
                None => true,
            };
        Parts {
            cost: match node.tier {
                Tier::Cloud => -10.0,
                Tier::Edge => -5.0,
                Tier::Client => 0.0,
            },
            link: round(link),
            load: round(30.0 * (0.4 * cpu_left + 0.3 * mem_left + 0.3 * idle)),
            prefer_client: if spec.placement.prefer_client && users_client { 40.0 } else { 0.0 },
            runtime: if container { 10.0 } else { 0.0 },
        }
    }

    fn total(&self) -> f64 {
        round(self.cost + self.link + self.load + self.prefer_client + self.runtime)
    }
}

/// Phase 2 for one feasible node.
pub fn score(spec: &WorkloadSpec, c: &Candidate, runtime: RuntimeDecision) -> NodeScore {
    let p = Parts::of(spec, c, runtime.runtime.is_container());
    let total = p.total();
    let parts = BTreeMap::from([
        ("cost".to_string(), p.cost),
        ("link".to_string(), p.link),
        ("load".to_string(), p.load),
        ("prefer_client".to_string(), p.prefer_client),
        ("runtime".to_string(), p.runtime),
    ]);
    NodeScore { node: c.info.name.clone(), total, parts, runtime }
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Nodes that answer the runtime rule alike: the same architecture and the same
/// runtimes report. A cluster has a handful of these however many nodes it has; the
/// broker numbers each node's class when its report arrives, so that placement runs
/// the rule (which formats a sentence per runtime) once per class, not once per node,
/// and compares no strings per node.
#[derive(Debug, Default)]
pub struct RuntimeClasses {
    keys: Vec<(Arch, Vec<RuntimeInfo>)>,
}

impl RuntimeClasses {
    /// The class of a node's report, numbered on first sight.
    pub fn of(&mut self, info: &NodeInfo) -> u32 {
        let found = self.keys.iter().position(|(arch, runtimes)| *arch == info.arch && *runtimes == info.runtimes);
        let i = found.unwrap_or_else(|| {
            self.keys.push((info.arch.clone(), info.runtimes.clone()));
            self.keys.len() - 1
        });
        i as u32
    }

    /// How many classes were numbered (reports that changed leave theirs behind).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The runtime rule's answer per class during one placement (a node without a class
/// is asked on its own each time).
struct Verdicts {
    by_class: Vec<Option<Result<RuntimeDecision, String>>>,
    unclassed: Option<Result<RuntimeDecision, String>>,
}

impl Verdicts {
    fn of(&mut self, spec: &WorkloadSpec, c: &Candidate) -> Result<&RuntimeDecision, &str> {
        let ask = || runtime_for(spec, c.info).map_err(|e| e.reason);
        let slot = match c.runtime_class.map(|k| k as usize) {
            Some(class) => {
                if class >= self.by_class.len() {
                    self.by_class.resize(class + 1, None);
                }
                self.by_class[class].get_or_insert_with(ask)
            }
            None => self.unclassed.insert(ask()),
        };
        slot.as_ref().map_err(String::as_str)
    }
}

/// Both phases over all candidates. Only the nodes the answer lists (the best
/// [`MAX_LISTED`] and the first [`MAX_LISTED`] filtered by name) get their sentences
/// and score parts; the others are checked and scored without formatting anything, so
/// a placement over a thousand nodes costs microseconds per node, not allocations.
pub fn place(spec: &WorkloadSpec, candidates: &[Candidate]) -> PlacementDecision {
    place_at(spec, candidates).0
}

/// [`place`], with the chosen node's index in `candidates` (so that a caller placing a
/// batch finds it without comparing a thousand names).
pub fn place_at(spec: &WorkloadSpec, candidates: &[Candidate]) -> (PlacementDecision, Option<usize>) {
    let mut verdicts = Verdicts { by_class: Vec::new(), unclassed: None };
    let mut feasible: Vec<(f64, usize)> = Vec::new();
    let mut infeasible: Vec<usize> = Vec::new();
    for (i, c) in candidates.iter().enumerate() {
        let verdict = verdicts.of(spec, c).map(|d| d.runtime.is_container());
        if check(spec, c, verdict.map(|_| ()).map_err(|_| ""), None) {
            feasible.push((Parts::of(spec, c, verdict.unwrap_or(false)).total(), i));
        } else {
            infeasible.push(i);
        }
    }
    let by_rank = |a: &(f64, usize), b: &(f64, usize)| {
        b.0.total_cmp(&a.0).then_with(|| candidates[a.1].info.name.cmp(&candidates[b.1].info.name))
    };
    let by_name = |a: &usize, b: &usize| candidates[*a].info.name.cmp(&candidates[*b].info.name);
    first_sorted(&mut feasible, MAX_LISTED, by_rank);
    first_sorted(&mut infeasible, MAX_LISTED, by_name);
    let (feasible_count, filtered_count) = (feasible.len(), infeasible.len());
    let scores: Vec<NodeScore> = feasible
        .iter()
        .take(MAX_LISTED)
        .map(|&(_, i)| {
            let c = &candidates[i];
            let runtime = verdicts.of(spec, c).expect("a feasible node has a runtime").clone();
            score(spec, c, runtime)
        })
        .collect();
    let filtered: Vec<Filtered> = infeasible
        .iter()
        .take(MAX_LISTED)
        .map(|&i| {
            let c = &candidates[i];
            let mut reasons = Vec::new();
            let runtime = verdicts.of(spec, c).map(|_| ());
            check(spec, c, runtime, Some(&mut reasons));
            Filtered { node: c.info.name.clone(), reasons }
        })
        .collect();
    let why = match scores.first() {
        Some(best) => {
            let parts: Vec<String> = best.parts.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let runner_up = scores.get(1).map(|s| format!(", ahead of {} ({})", s.node, s.total)).unwrap_or_default();
            format!(
                "{} on {}: best score {} ({}) of {feasible_count} feasible node(s){runner_up}; {filtered_count} filtered out; {}",
                spec.name,
                best.node,
                best.total,
                parts.join(", "),
                best.runtime.reason
            )
        }
        None if candidates.is_empty() => format!("no node can run {}: no node has registered", spec.name),
        None => {
            let shown: Vec<String> =
                filtered.iter().take(5).map(|f| format!("{}: {}", f.node, f.reasons.join(", "))).collect();
            let more = if filtered_count > 5 { format!("; and {} more", filtered_count - 5) } else { String::new() };
            format!("no node can run {}: {}{more}", spec.name, shown.join("; "))
        }
    };
    let decision = PlacementDecision {
        workload: spec.name.clone(),
        chosen: scores.first().map(|s| s.node.clone()),
        runtime: scores.first().map(|s| s.runtime.clone()),
        scores,
        filtered,
        feasible_count,
        filtered_count,
        why,
    };
    (decision, feasible.first().map(|&(_, i)| i))
}

/// Puts the `n` first elements of `v` in `order` at its front, sorted; the rest stay
/// behind in no order (a full sort of a thousand entries is not needed for twenty).
fn first_sorted<T>(v: &mut [T], n: usize, mut order: impl FnMut(&T, &T) -> std::cmp::Ordering) {
    if v.len() > n {
        v.select_nth_unstable_by(n, &mut order);
    }
    let n = n.min(v.len());
    v[..n].sort_by(order);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use away_model::{Arch, CpuInfo, CpuVendor, LinkInfo, RuntimeInfo, RuntimeKind, SpecFormat};

    pub fn node(name: &str, tier: Tier, vendor: CpuVendor, runtimes: &[(RuntimeKind, bool)]) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            tier,
            arch: Arch("amd64".into()),
            cpu: CpuInfo {
                vendor,
                model: "test cpu".into(),
                family: None,
                model_number: None,
                cores: 4,
                flags: ["sse4_2", "avx", "avx2"].iter().map(|s| s.to_string()).collect(),
            },
            memory_bytes: 8 << 30,
            kernel: "6.1".into(),
            runtimes: runtimes
                .iter()
                .map(|(kind, healthy)| RuntimeInfo {
                    kind: *kind,
                    version: "1".into(),
                    healthy: *healthy,
                    checkpoint: *healthy,
                    detail: if *healthy { String::new() } else { "socket refused".into() },
                })
                .collect(),
            hypervisor: None,
            link: None,
            labels: Default::default(),
            disk_bases: Default::default(),
        }
    }

    pub fn all_runtimes() -> Vec<(RuntimeKind, bool)> {
        vec![(RuntimeKind::Containerd, true), (RuntimeKind::Docker, true), (RuntimeKind::Qemu, true)]
    }

    fn spec(yaml: &str) -> WorkloadSpec {
        WorkloadSpec::parse(yaml, SpecFormat::Yaml, "test").unwrap()
    }

    fn cand(info: &NodeInfo) -> Candidate<'_> {
        Candidate {
            info,
            online: true,
            draining: false,
            load: NodeLoad::default(),
            reserved_memory: 0,
            reserved_cpus: 0.0,
            runtime_class: None,
        }
    }

    #[test]
    fn every_failed_filter_is_named() {
        let n = node("c1", Tier::Cloud, CpuVendor::Intel, &[(RuntimeKind::Containerd, false)]);
        let mut c = cand(&n);
        c.online = false;
        c.draining = true;
        c.reserved_memory = 8 << 30;
        let s = spec(
            "name: w\nimage: x\nkind: container\nplacement:\n  tiers: [client]\n  cpu_vendor: amd\n  cpu_flags: [avx512f]\n  arch: arm64\n",
        );
        let reasons = feasibility(&s, &c).unwrap_err();
        let text = reasons.join(" | ");
        for needle in [
            "offline",
            "draining",
            "tier cloud is not allowed (the spec allows client)",
            "architecture amd64 but the spec requires arm64",
            "CPU vendor intel but the spec requires amd",
            "CPU lacks avx512f",
            "no runtime",
            "needs 256Mi memory, 0B free of 8Gi",
        ] {
            assert!(text.contains(needle), "{needle:?} missing in {text}");
        }
    }

    #[test]
    fn a_vm_with_a_disk_goes_only_where_its_base_is_but_moves_anywhere() {
        let base = format!("sha256:{}", "ab".repeat(32));
        let s = spec(&format!("name: w\nimage: x\nkind: vm\ndisk:\n  base: {base}\n  size: 64Mi\n"));
        let (without, mut with) = (
            node("a", Tier::Cloud, CpuVendor::Amd, &all_runtimes()),
            node("b", Tier::Cloud, CpuVendor::Amd, &all_runtimes()),
        );
        with.disk_bases.insert(base.clone());
        let reasons = feasibility(&s, &cand(&without)).unwrap_err();
        assert_eq!(reasons.len(), 1, "{reasons:?}");
        assert!(reasons[0].contains(&format!("no disk base {base}")), "{reasons:?}");
        let d = place(&s, &[cand(&without), cand(&with)]);
        assert_eq!(d.chosen.as_deref(), Some("b"), "{}", d.why);
        assert_eq!(d.filtered.len(), 1);
        assert!(d.filtered[0].node == "a" && d.filtered[0].reasons[0].contains("no disk base"), "{:?}", d.filtered);
        // a move's target gets the base with the move
        assert!(feasibility(&as_moved(&s), &cand(&without)).is_ok());
        assert!(matches!(as_moved(&spec("name: w\nimage: x\n")), std::borrow::Cow::Borrowed(_)));
    }

    #[test]
    fn resources_already_promised_count() {
        let n = node("e1", Tier::Edge, CpuVendor::Amd, &all_runtimes());
        let mut c = cand(&n);
        c.reserved_cpus = 3.5;
        let reasons = feasibility(&spec("name: w\nimage: x\n"), &c).unwrap_err();
        assert_eq!(reasons, vec!["needs 1 CPUs, 0.50 free of 4".to_string()]);
        c.reserved_cpus = 3.0;
        assert!(feasibility(&spec("name: w\nimage: x\n"), &c).is_ok());
    }

    #[test]
    fn runtime_falls_back_to_vm_and_the_score_says_so() {
        let vm_only =
            node("v", Tier::Edge, CpuVendor::Intel, &[(RuntimeKind::Containerd, false), (RuntimeKind::Qemu, true)]);
        let both = node("w", Tier::Edge, CpuVendor::Intel, &all_runtimes());
        let d = place(&spec("name: w\nimage: x\n"), &[cand(&vm_only), cand(&both)]);
        assert_eq!(d.chosen.as_deref(), Some("w"), "{}", d.why);
        let v = d.scores.iter().find(|s| s.node == "v").unwrap();
        assert_eq!(v.runtime.runtime, RuntimeKind::Qemu);
        assert_eq!(v.parts["runtime"], 0.0);
        assert_eq!(d.scores[0].parts["runtime"], 10.0);
    }

    #[test]
    fn prefer_client_wins_when_the_client_can_take_it() {
        let cloud = node("cloud-1", Tier::Cloud, CpuVendor::Amd, &all_runtimes());
        let client = node("laptop", Tier::Client, CpuVendor::Intel, &all_runtimes());
        let plain = place(&spec("name: w\nimage: x\n"), &[cand(&cloud), cand(&client)]);
        let preferring =
            place(&spec("name: w\nimage: x\nplacement:\n  prefer_client: true\n"), &[cand(&cloud), cand(&client)]);
        assert_eq!(preferring.chosen.as_deref(), Some("laptop"));
        assert_eq!(preferring.scores[0].parts["prefer_client"], 40.0);
        assert!(plain.scores.iter().all(|s| s.parts["prefer_client"] == 0.0));
        // a full client cannot take it: the cloud gets it, and the client says why
        let mut full = cand(&client);
        full.reserved_memory = 8 << 30;
        let d = place(&spec("name: w\nimage: x\nplacement:\n  prefer_client: true\n"), &[cand(&cloud), full]);
        assert_eq!(d.chosen.as_deref(), Some("cloud-1"));
        assert!(d.filtered[0].reasons[0].contains("memory"), "{:?}", d.filtered);
    }

    #[test]
    fn prefer_client_means_the_users_own_client() {
        let mut mine = node("alice-laptop", Tier::Client, CpuVendor::Intel, &all_runtimes());
        mine.labels.insert("user".into(), "alice".into());
        let mut theirs = node("bob-laptop", Tier::Client, CpuVendor::Intel, &all_runtimes());
        theirs.labels.insert("user".into(), "bob".into());
        let s = spec("name: w\nimage: x\nlabels:\n  user: alice\nplacement:\n  prefer_client: true\n");
        let d = place(&s, &[cand(&theirs), cand(&mine)]);
        assert_eq!(d.chosen.as_deref(), Some("alice-laptop"));
        assert_eq!(d.scores[1].parts["prefer_client"], 0.0);
    }

    #[test]
    fn tier_constraints_never_client_and_client_only() {
        let cloud = node("cloud-1", Tier::Cloud, CpuVendor::Amd, &all_runtimes());
        let edge = node("edge-1", Tier::Edge, CpuVendor::Amd, &all_runtimes());
        let client = node("laptop", Tier::Client, CpuVendor::Intel, &all_runtimes());
        let nodes = [cand(&cloud), cand(&edge), cand(&client)];
        let never_client =
            place(&spec("name: w\nimage: x\nplacement:\n  tiers: [cloud, edge]\n  prefer_client: true\n"), &nodes);
        assert_eq!(never_client.chosen.as_deref(), Some("edge-1"), "edge costs less than cloud: {}", never_client.why);
        assert_eq!(never_client.filtered[0].node, "laptop");
        let client_only = place(&spec("name: w\nimage: x\nplacement:\n  tiers: [client]\n"), &nodes);
        assert_eq!(client_only.chosen.as_deref(), Some("laptop"));
        assert_eq!(client_only.filtered_count, 2);
    }

    #[test]
    fn link_and_load_are_scored() {
        let mut near = node("near", Tier::Edge, CpuVendor::Amd, &all_runtimes());
        near.link = Some(LinkInfo { rate_mbit: 1000.0, latency_ms: 1.0 });
        let mut far = node("far", Tier::Edge, CpuVendor::Amd, &all_runtimes());
        far.link = Some(LinkInfo { rate_mbit: 37.0, latency_ms: 36.784 });
        let d = place(&spec("name: w\nimage: x\n"), &[cand(&far), cand(&near)]);
        assert_eq!(d.chosen.as_deref(), Some("near"));
        assert!(d.scores[0].parts["link"] > d.scores[1].parts["link"] + 10.0, "{:?}", d.scores);
        let mut busy = cand(&near);
        busy.load.cpu_percent = 100.0;
        busy.reserved_cpus = 3.0;
        let d = place(&spec("name: w\nimage: x\n"), &[busy, cand(&near)]);
        let gap = d.scores[0].parts["load"] - d.scores[1].parts["load"];
        assert!((gap - 30.0 * (0.4 * 0.75 + 0.3)).abs() < 0.02, "{gap}");
    }

    #[test]
    fn explanation_names_winner_parts_and_losers() {
        let a = node("a", Tier::Cloud, CpuVendor::Amd, &all_runtimes());
        let b = node("b", Tier::Edge, CpuVendor::Amd, &all_runtimes());
        let mut off = cand(&b);
        off.online = false;
        let d = place(&spec("name: web\nimage: x\n"), &[cand(&a), off.clone()]);
        assert!(d.why.starts_with("web on a: best score"), "{}", d.why);
        assert!(
            d.why.contains("cost -10") && d.why.contains("1 filtered out") && d.why.contains("container on containerd"),
            "{}",
            d.why
        );
        let none = place(&spec("name: web\nimage: x\nplacement:\n  tiers: [client]\n"), &[cand(&a), off]);
        assert_eq!(none.chosen, None);
        assert!(none.why.starts_with("no node can run web: a: tier cloud is not allowed"), "{}", none.why);
        assert!(none.why.contains("b: offline"), "{}", none.why);
        assert!(place(&spec("name: web\nimage: x\n"), &[]).why.contains("no node has registered"));
    }

    /// The fast path (no sentences for unlisted nodes, runtime rule per class, partial
    /// sort) answers exactly what checking and scoring every node in full answers.
    #[test]
    fn fast_path_agrees_with_the_full_explanation() {
        let mut nodes = Vec::new();
        for i in 0..200usize {
            let tier = [Tier::Cloud, Tier::Edge, Tier::Client][i % 3];
            let vendor = if i % 2 == 0 { CpuVendor::Intel } else { CpuVendor::Amd };
            let runtimes = [
                (RuntimeKind::Containerd, i % 7 != 0),
                (RuntimeKind::Docker, i % 3 != 0),
                (RuntimeKind::Qemu, i % 11 != 0),
            ];
            let mut n = node(&format!("n{:03}", (i * 37) % 200), tier, vendor, &runtimes);
            n.cpu.cores = [2, 4, 8][i % 3];
            n.link = (i % 4 != 0).then(|| LinkInfo { rate_mbit: [37.0, 100.0, 1000.0][i % 3], latency_ms: 1.0 });
            if i % 5 == 0 {
                n.cpu.flags.retain(|f| f != "avx2");
            }
            nodes.push(n);
        }
        let cands: Vec<Candidate> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| Candidate {
                online: i % 13 != 0,
                draining: i % 17 == 0,
                load: NodeLoad { cpu_percent: (i % 10) as f64 * 10.0, ..Default::default() },
                reserved_memory: ((i % 9) as u64) << 30,
                reserved_cpus: (i % 4) as f64 * 0.5,
                ..cand(n)
            })
            .collect();
        // the same nodes numbered into classes, as the broker does: the same answers
        let mut classes = RuntimeClasses::default();
        let classed: Vec<Candidate> =
            cands.iter().map(|c| Candidate { runtime_class: Some(classes.of(c.info)), ..c.clone() }).collect();
        assert!(classes.len() > 3 && classes.len() < 20, "{} classes", classes.len());
        for yaml in [
            "name: w\nimage: x\n",
            "name: w\nimage: x\nkind: vm\n",
            "name: w\nimage: x\nplacement:\n  prefer_client: true\n",
            "name: w\nimage: x\nplacement:\n  tiers: [cloud, edge]\n  cpu_flags: [avx2]\n",
            "name: w\nimage: x\nresources:\n  memory: 7Gi\n  cpus: 3\n",
            "name: w\nimage: x\nplacement:\n  arch: arm64\n",
        ] {
            let s = spec(yaml);
            let mut scores = Vec::new();
            let mut filtered = Vec::new();
            for c in &cands {
                match feasibility(&s, c) {
                    Ok(runtime) => scores.push(score(&s, c, runtime)),
                    Err(reasons) => filtered.push(Filtered { node: c.info.name.clone(), reasons }),
                }
            }
            scores.sort_by(|a, b| b.total.total_cmp(&a.total).then_with(|| a.node.cmp(&b.node)));
            filtered.sort_by(|a, b| a.node.cmp(&b.node));
            let d = place(&s, &cands);
            assert_eq!(d, place(&s, &classed), "{yaml}");
            assert_eq!((d.feasible_count, d.filtered_count), (scores.len(), filtered.len()), "{yaml}");
            scores.truncate(MAX_LISTED);
            filtered.truncate(MAX_LISTED);
            assert_eq!(d.scores, scores, "{yaml}");
            assert_eq!(d.filtered, filtered, "{yaml}");
            assert_eq!(d.chosen, scores.first().map(|s| s.node.clone()), "{yaml}");
        }
    }

    #[test]
    fn ties_break_by_name_and_long_lists_are_cut() {
        let nodes: Vec<NodeInfo> =
            (0..30).map(|i| node(&format!("n{i:02}"), Tier::Edge, CpuVendor::Amd, &all_runtimes())).collect();
        let cands: Vec<Candidate> = nodes.iter().map(cand).collect();
        let d = place(&spec("name: w\nimage: x\n"), &cands);
        assert_eq!(d.chosen.as_deref(), Some("n00"));
        assert_eq!(d.scores.len(), MAX_LISTED);
        assert_eq!(d.feasible_count, 30);
    }
}
