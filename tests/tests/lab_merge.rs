//! `away lab merge` through the binary, on runs committed under docs/results: the VM
//! series of the morning's full run with today's container run. Needs no daemon (it only
//! reads results); kept apart from lab.rs, whose quick profile wants a release binary.

use away_e2e::{away, workspace_root};

#[test]
fn merges_committed_runs_and_refuses_overwriting_a_source() {
    let results = workspace_root().join("docs/results");
    let vm = format!("{}=vm-precopy,vm-postcopy", results.join("2026-11-26-full").display());
    let containers = results.join("2026-11-26-comparison/containers").display().to_string();
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("merged");
    let dir_arg = dir.display().to_string();

    let run = away(&["lab", "merge", "--out", &dir_arg, &vm, &containers]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "away lab merge failed: {stderr}");
    // 2 VM paths × 36 runs of the full run, 4 container paths × 36 of today's
    let csv = std::fs::read_to_string(dir.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 2 * 36 + 4 * 36, "{csv}");
    assert!(!csv.contains(",vm-autoconverge,"), "a series not asked for came along");
    let report = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(report.contains("merged (`away lab merge`) from 2 runs"), "{report}");
    assert!(report.contains("2026-11-26-full: vm-precopy, vm-postcopy (72 runs"), "{report}");
    assert_eq!(&std::fs::read(dir.join("fig3.png")).unwrap()[..4], b"\x89PNG");

    // the same series from two runs, and an output that is a source: refused, named
    let twice = away(&["lab", "merge", "--out", &dir_arg, &containers, &containers]);
    let msg = String::from_utf8_lossy(&twice.stderr);
    assert!(!twice.status.success() && msg.contains("is also taken from"), "{msg}");
    // on a copy: were the check gone, the committed run must not be what gets overwritten
    let copy = out.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    std::fs::copy(results.join("2026-11-26-comparison/containers/results.json"), copy.join("results.json")).unwrap();
    let copy = copy.display().to_string();
    let onto = away(&["lab", "merge", "--out", &copy, &copy]);
    let msg = String::from_utf8_lossy(&onto.stderr);
    assert!(!onto.status.success() && msg.contains("would overwrite"), "{msg}");
}
