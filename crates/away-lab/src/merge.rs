//! `away lab merge`: several `away lab compare` outputs as one experiment. Typical use:
//! the VM series of one run and the container series of a later one (after container
//! code changed) in one report, one CSV and one Fig. 3. Each path comes from exactly
//! one source, the sources must describe the same experiment (app memory, links, link
//! emulation, host), and the report names every source with the paths taken from it,
//! so no series is ever shown with another build's numbers mixed in.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{io_err, LabError, LabResults, LinkKind, Load, MigrationPath, RunResult};

/// One input of a merge: an output directory of `away lab compare` (or its
/// results.json), and the paths to take from it (`DIR=path,path`; none = all it has).
#[derive(Debug, Clone, PartialEq)]
pub struct MergeSource {
    pub path: PathBuf,
    pub paths: Vec<MigrationPath>,
}

impl FromStr for MergeSource {
    type Err = LabError;
    fn from_str(s: &str) -> Result<Self, LabError> {
        let (path, paths) = match s.rsplit_once('=') {
            Some((path, list)) => {
                let paths = list.split(',').map(str::parse).collect::<Result<Vec<MigrationPath>, _>>()?;
                (path, paths)
            }
            None => (s, Vec::new()),
        };
        if path.is_empty() {
            return Err(crate::invalid("source", format!("{s:?} names no directory")));
        }
        Ok(MergeSource { path: path.into(), paths })
    }
}

/// Where the runs of a merged experiment came from (empty for a single `compare`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceSummary {
    /// The source as given (its directory).
    pub name: String,
    pub started_unix: u64,
    pub wall_s: f64,
    pub paths: Vec<MigrationPath>,
    pub runs: usize,
}

impl fmt::Display for SourceSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let paths: Vec<&str> = self.paths.iter().map(|p| p.name()).collect();
        write!(
            f,
            "{}: {} ({} runs, started {}, wall time {:.0} s)",
            self.name,
            paths.join(", "),
            self.runs,
            crate::output::date(self.started_unix),
            self.wall_s
        )
    }
}

/// The results.json a source names: the one in its directory, or the file itself.
fn results_file(source: &Path) -> PathBuf {
    if source.is_dir() {
        crate::OutputFiles::in_dir(source).json
    } else {
        source.to_path_buf()
    }
}

/// Read an `away lab compare` output: a directory holding results.json, or the file.
pub fn load_results(path: &Path) -> Result<LabResults, LabError> {
    let file = results_file(path);
    let bytes = std::fs::read(&file).map_err(io_err("read", &file))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| LabError::Results { path: file, reason: format!("not the results.json of away lab compare: {e}") })
}

/// Merge already loaded results (see the module doc); `sources` pairs each with the
/// paths to take (empty = all it measured).
pub fn merge(sources: Vec<(MergeSource, LabResults)>) -> Result<LabResults, LabError> {
    let Some(first) = sources.first().map(|(_, r)| r.setup.clone()) else {
        return Err(crate::invalid("sources", "at least one is needed"));
    };
    let mut owner: BTreeMap<MigrationPath, PathBuf> = BTreeMap::new();
    let mut taken = Vec::new();
    for (src, results) in sources {
        let measured: BTreeSet<MigrationPath> = results.runs.iter().map(|r| r.path).collect();
        let keep: BTreeSet<MigrationPath> =
            if src.paths.is_empty() { measured.clone() } else { src.paths.iter().copied().collect() };
        let fail = |reason: String| LabError::Results { path: src.path.clone(), reason };
        if let Some(p) = keep.iter().find(|p| !measured.contains(p)) {
            let had: Vec<&str> = measured.iter().map(|p| p.name()).collect();
            return Err(fail(format!("has no {p} runs (it measured {})", had.join(", "))));
        }
        for &p in &keep {
            if let Some(prev) = owner.insert(p, src.path.clone()) {
                return Err(fail(format!(
                    "{p} is also taken from {}: a series comes from one source; name the paths to take \
                     from each as DIR=path,path",
                    prev.display()
                )));
            }
        }
        let s = &results.setup;
        for (what, same) in [
            ("the app's memory", s.app_ram_bytes == first.app_ram_bytes),
            ("the links", s.links == first.links),
            ("the link emulation", s.link_emulator == first.link_emulator),
            ("the profile (quick or full)", s.quick == first.quick),
            ("memload's CPU threads", s.cpu_threads == first.cpu_threads),
            ("the host's CPU count", s.host_cpus == first.host_cpus),
        ] {
            if !same {
                return Err(fail(format!("differs from the first source in {what}: not the same experiment")));
            }
        }
        taken.push((src, results, keep));
    }
    let vm_setups: Vec<_> =
        taken.iter().filter(|(_, _, k)| k.iter().any(|p| p.is_vm())).map(|(_, r, _)| &r.setup).collect();
    if let Some(other) = vm_setups.iter().find(|s| s.vm_ram_bytes != vm_setups[0].vm_ram_bytes) {
        return Err(crate::invalid(
            "sources",
            format!(
                "their VM series were measured with different VM memory ({} and {} bytes)",
                vm_setups[0].vm_ram_bytes, other.vm_ram_bytes
            ),
        ));
    }

    let mut setup = first;
    if let Some(vm) = vm_setups.first() {
        setup.vm_ram_bytes = vm.vm_ram_bytes;
        setup.vm_vcpus = vm.vm_vcpus;
        setup.qemu_accel = vm.qemu_accel.clone();
        setup.vm_timeouts = vm.vm_timeouts.clone();
    }
    if let Some((_, r, _)) = taken.iter().find(|(_, _, k)| k.iter().any(|p| !p.is_vm())) {
        setup.container_compression = r.setup.container_compression.clone();
    }
    setup.repetitions = taken.iter().map(|(_, r, _)| r.setup.repetitions).max().unwrap_or(1);
    setup.started_unix = taken.iter().map(|(_, r, _)| r.setup.started_unix).min().unwrap_or(0);
    setup.sources = Vec::new();

    let mut runs: Vec<RunResult> = Vec::new();
    let mut wall_s = 0.0;
    for (src, results, keep) in taken {
        let name = src.path.display().to_string();
        let mine: Vec<RunResult> = results.runs.into_iter().filter(|r| keep.contains(&r.path)).collect();
        setup.sources.push(SourceSummary {
            name: name.clone(),
            started_unix: results.setup.started_unix,
            wall_s: results.wall_s,
            paths: keep.iter().copied().collect(),
            runs: mine.len(),
        });
        wall_s += results.wall_s;
        for mut r in mine {
            // the source's run number names its logs; keep it with the run
            r.notes = if r.notes.is_empty() {
                format!("{name} run {}", r.run)
            } else {
                format!("{name} run {}; {}", r.run, r.notes)
            };
            runs.push(r);
        }
    }
    // the plan's order: link, load, repetition, path
    let index = |r: &RunResult| {
        (
            LinkKind::ALL.iter().position(|l| *l == r.link),
            Load::ALL.iter().position(|l| *l == r.load),
            r.rep,
            MigrationPath::ALL.iter().position(|p| *p == r.path),
        )
    };
    runs.sort_by_key(index);
    for (i, r) in runs.iter_mut().enumerate() {
        r.run = i as u32 + 1;
    }
    let loads = Load::ALL.into_iter().filter(|l| runs.iter().any(|r| r.load == *l)).collect();
    let paths = MigrationPath::ALL.into_iter().filter(|p| owner.contains_key(p)).collect();
    Ok(LabResults { setup, loads, paths, runs, wall_s })
}

/// Refuse an output directory that is one of the sources: writing the merge there
/// would overwrite that source's own results.
pub fn check_out_dir(sources: &[MergeSource], out: &Path) -> Result<(), LabError> {
    let Ok(out_dir) = out.canonicalize() else { return Ok(()) }; // not there yet: no source
    for src in sources {
        let file = results_file(&src.path);
        // a bare file name's parent is "", which is this directory
        let dir = file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if dir.canonicalize().is_ok_and(|d| d == out_dir) {
            return Err(LabError::Results {
                path: out.to_path_buf(),
                reason: format!(
                    "is the source {}: the merge would overwrite its results; choose another --out",
                    src.path.display()
                ),
            });
        }
    }
    Ok(())
}

/// Load every source and merge them.
pub fn merge_dirs(sources: &[MergeSource]) -> Result<LabResults, LabError> {
    let loaded =
        sources.iter().map(|s| load_results(&s.path).map(|r| (s.clone(), r))).collect::<Result<Vec<_>, _>>()?;
    merge(loaded)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{CompareOptions, RunOutcome};

    fn results(paths: &[MigrationPath], started: u64) -> LabResults {
        let mut o = CompareOptions::quick("m.tar".into(), "away".into(), "out".into());
        o.paths = paths.to_vec();
        // three loads, as the quick profile had when these numbers were written
        o.loads = vec![crate::Load::Idle, crate::Load::Cpu(50), crate::Load::Ram(50)];
        let runs = o
            .plan()
            .iter()
            .map(|p| {
                RunResult::new(p, RunOutcome::Moved, Duration::from_secs(p.run as u64), None).with_bytes(1000, 2000)
            })
            .collect();
        let mut setup = crate::output::tests::synthetic().setup;
        setup.started_unix = started;
        LabResults { setup, loads: o.loads.clone(), paths: o.paths.clone(), runs, wall_s: 100.0 }
    }

    fn src(s: &str) -> MergeSource {
        s.parse().unwrap()
    }

    #[test]
    fn sources_parse() {
        assert_eq!(src("a/b"), MergeSource { path: "a/b".into(), paths: vec![] });
        let s = src("docs/x=vm-precopy,container-lazy");
        assert_eq!(s.path, PathBuf::from("docs/x"));
        assert_eq!(s.paths, vec![MigrationPath::VmPrecopy, MigrationPath::ContainerLazy]);
        assert!("x=vm".parse::<MergeSource>().is_err());
        assert!("=vm-precopy".parse::<MergeSource>().is_err());
    }

    #[test]
    fn series_from_one_source_each_in_plan_order() {
        use MigrationPath::*;
        let old = results(&[VmPrecopy, ContainerContainerd], 100);
        let new = results(&[ContainerContainerd, ContainerLazy], 200);
        let merged = merge(vec![(src("old=vm-precopy"), old.clone()), (src("new"), new.clone())]).expect("merge");
        assert_eq!(merged.paths, vec![VmPrecopy, ContainerContainerd, ContainerLazy]);
        assert_eq!(merged.runs.len(), 3 * 2 * 3);
        let sources: Vec<(&str, usize)> = merged.setup.sources.iter().map(|s| (s.name.as_str(), s.runs)).collect();
        assert_eq!(sources, vec![("old", 6), ("new", 12)]);
        assert_eq!(merged.setup.started_unix, 100);
        assert_eq!(merged.wall_s, 200.0);
        // the old run's containerd numbers are not in it: every containerd run is new's
        let from_new: Vec<f64> = new.runs.iter().filter(|r| r.path == ContainerContainerd).map(|r| r.total_s).collect();
        let merged_cd: Vec<f64> =
            merged.runs.iter().filter(|r| r.path == ContainerContainerd).map(|r| r.total_s).collect();
        assert_eq!(merged_cd, from_new);
        assert!(merged.runs.iter().all(|r| r.notes.starts_with("old run ") || r.notes.starts_with("new run ")));
        assert!(merged.runs.windows(2).all(|w| w[0].run + 1 == w[1].run));
        assert_eq!(
            (merged.runs[0].path, merged.runs[1].path, merged.runs[2].path),
            (VmPrecopy, ContainerContainerd, ContainerLazy)
        );

        let both = merge(vec![(src("old"), old.clone()), (src("new"), new.clone())]).unwrap_err();
        assert!(both.to_string().contains("container-containerd is also taken from old"), "{both}");
        let missing = merge(vec![(src("old=container-lazy"), old.clone())]).unwrap_err();
        assert!(missing.to_string().contains("has no container-lazy runs"), "{missing}");
        let mut other = new.clone();
        other.setup.app_ram_bytes *= 2;
        let differs = merge(vec![(src("old=vm-precopy"), old), (src("other"), other)]).unwrap_err();
        assert!(differs.to_string().contains("the app's memory"), "{differs}");
    }

    #[test]
    fn reads_what_compare_wrote_and_refuses_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let r = results(&[MigrationPath::VmPrecopy], 1);
        std::fs::write(dir.path().join("results.json"), serde_json::to_vec(&r).unwrap()).unwrap();
        let back = load_results(dir.path()).unwrap();
        assert_eq!((back.setup, back.paths, back.runs.len()), (r.setup, r.paths, r.runs.len()));
        std::fs::write(dir.path().join("other.json"), b"{\"runs\": 3}").unwrap();
        let err = load_results(&dir.path().join("other.json")).unwrap_err().to_string();
        assert!(err.contains("other.json") && err.contains("not the results.json"), "{err}");
        let err = load_results(&dir.path().join("none")).unwrap_err().to_string();
        assert!(err.contains("read") && err.contains("none"), "{err}");
    }

    #[test]
    fn the_output_is_never_a_source() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::create_dir(&a).unwrap();
        let sources = [src(&format!("{}=vm-precopy", a.display()))];
        let err = check_out_dir(&sources, &dir.path().join("a/.")).unwrap_err().to_string();
        assert!(err.contains("would overwrite"), "{err}");
        let by_file = [src(&a.join("results.json").display().to_string())];
        assert!(check_out_dir(&by_file, &a).is_err());
        check_out_dir(&sources, &dir.path().join("b")).unwrap();
        check_out_dir(&sources, dir.path()).unwrap();
    }

    #[test]
    fn results_committed_by_earlier_versions_still_load() {
        // written before degraded_s, slowed_s and sources existed
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/results/2026-11-26-full");
        let r = load_results(&dir).unwrap();
        assert_eq!(r.runs.len(), 180);
        assert!(r.setup.sources.is_empty());
        let vm = merge(vec![(src("full=vm-precopy,vm-autoconverge,vm-postcopy"), r)]).unwrap();
        assert_eq!(vm.runs.len(), 108);
        assert_eq!(vm.setup.qemu_accel.as_deref(), Some("tcg"));
    }
}
