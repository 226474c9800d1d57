//! `away lab compare`'s quick profile end to end: the memload app moved as a QEMU VM
//! (pre-copy; multifd + zstd in one cell) and as a container (containerd, Docker, and
//! the peer: Podman's checkpoint export / restore import) over the emulated LAN and WAN,
//! with the CSV, plots and report (with its table of away's best path against each
//! peer) written; away's moves over mutual TLS with the lab's node identities. Needs root, containerd, dockerd, podman, CRIU and QEMU; takes several
//! minutes (release build of away, as the benchmarks use).

use std::path::Path;
use std::time::Instant;

use away_e2e::{away_bin, lab_image, require, require_root, require_socket};
use away_lab::{CompareOptions, LinkKind, Load, MigrationPath, RunOutcome};

#[test]
fn quick_profile_end_to_end() {
    let paths = away_runtime::host::HostPaths::default();
    if !(require_root()
        && require_socket("/run/containerd/containerd.sock", "containerd")
        && require_socket("/run/docker.sock", "dockerd")
        && require(paths.qemu.is_file(), &format!("qemu at {}", paths.qemu.display()))
        && require(paths.guest_kernel.exists(), &format!("guest kernel at {}", paths.guest_kernel.display()))
        && require(Path::new("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf").is_file(), "fonts-dejavu-core")
        && require(
            std::process::Command::new("podman").arg("--version").output().is_ok_and(|o| o.status.success()),
            "podman (apt-get install podman)",
        ))
    {
        return;
    }
    // transfer speed matters: a debug build compresses and hashes ten times slower
    std::env::set_var("AWAY_BENCH_RELEASE", "1");
    let image = lab_image("memload");
    let out = away_e2e::workspace_root().join("target").join("away-lab-quick");
    let _ = std::fs::remove_dir_all(&out);
    // the lab runs what a node carries: the binary README's node install put there
    let installed = install_node_as_readme_says();
    let opts = CompareOptions::quick(image, installed, out.clone());
    eprintln!("estimated upper bound: {:.0} s", opts.estimate().as_secs_f64());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let t0 = Instant::now();
    let results = rt
        .block_on(away_lab::compare(opts.clone(), |p| {
            eprintln!("[{}/{}] {}: {}", p.done, p.total, p.current, p.status);
        }))
        .expect("lab compare");
    eprintln!("quick profile took {:.0} s", t0.elapsed().as_secs_f64());
    eprintln!("{}", std::fs::read_to_string(out.join("results.csv")).unwrap());
    assert_eq!(results.runs.len(), opts.plan().len());
    let failed: Vec<_> = results.runs.iter().filter(|r| r.outcome == RunOutcome::Failed).collect();
    assert!(failed.is_empty(), "failed runs: {failed:#?}");
    for r in &results.runs {
        if !r.path.is_vm() {
            assert!(r.converged(), "a container move always finishes: {r:?}");
        }
        if r.path == away_lab::MigrationPath::ContainerLazy {
            let (down, degraded) = (r.downtime_s.unwrap(), r.degraded_s.unwrap_or(0.0));
            assert!(degraded > 0.0, "a lazy move has a lazy phase: {r:?}");
            // (a lazy dump that left nothing lazy also has a short one: the pages say)
            assert!(r.paged_bytes_raw.unwrap_or(0) > opts.app_ram.0 / 2, "the memory went over the page link: {r:?}");
            assert!(down < r.total_s, "{r:?}");
        }
        assert!(r.bytes_wire > 0, "{r:?}");
        if let Some(down) = r.downtime_s.filter(|_| r.converged()) {
            assert!(down > 0.0 && down <= r.total_s, "downtime within the total: {r:?}");
        }
    }
    // the peers: Podman in every cell, QEMU multifd + zstd in its one cell
    let of = |p: MigrationPath| results.runs.iter().filter(move |r| r.path == p);
    assert_eq!(of(MigrationPath::PeerPodman).count(), opts.links.len() * opts.loads.len());
    assert!(of(MigrationPath::PeerPodman).all(|r| r.converged() && r.downtime_s.is_some()), "podman moves finish");
    let multifd: Vec<_> = of(MigrationPath::VmMultifdZstd).collect();
    assert_eq!(multifd.len(), 1);
    assert!(multifd[0].converged() && multifd[0].notes.contains("passes"), "{:?}", multifd[0]);
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert!(csv.contains(",peer-podman,wan,ram50,") && csv.contains(",vm-multifd-zstd,lan,idle,"), "{csv}");
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    // the moves went over mutual TLS (the default), container and VM alike
    assert!(report.contains("- channels between the nodes: mutual TLS"), "{report}");
    let table = report.split("## away's best path vs each peer").nth(1).expect("the peer table in report.md");
    for cell in ["| lan | idle |", "| wan | ram50 |"] {
        let row = table.lines().find(|l| l.starts_with(cell) && l.contains("| peer-podman |"));
        let row = row.unwrap_or_else(|| panic!("no peer-podman row for {cell}:\n{table}"));
        // the three ratios are numbers
        let ratios: Vec<f64> =
            row.trim_end_matches('|').rsplit('|').take(3).filter_map(|c| c.trim().parse().ok()).collect();
        assert_eq!(ratios.len(), 3, "{row}");
        assert!(ratios.iter().all(|r| *r > 0.0), "{row}");
    }
    assert!(table.lines().any(|l| l.starts_with("| lan | idle |") && l.contains("| vm-multifd-zstd |")), "{table}");
    assert!(table.contains("ahead of peer-podman in both total time and downtime:"), "{table}");
    for f in ["results.csv", "results.json", "report.md", "fig3.svg", "fig3.png"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert_eq!(&std::fs::read(out.join("fig3.png")).unwrap()[..4], b"\x89PNG");
    // with a disk: the VM's mirrored blocks and the container's volume, apart
    let disk: Vec<_> = results.runs.iter().filter(|r| r.path.writes_disk()).collect();
    assert_eq!(disk.len(), 2, "vm-disk and container-volume on the LAN, idle");
    for r in disk {
        assert!(r.converged(), "{r:?}");
        let d = r.disk_bytes.unwrap_or_else(|| panic!("the disk's bytes: {r:?}"));
        assert!(d > 0 && d < r.bytes_wire, "{r:?}");
    }
    assert!(report.contains("## With a disk"), "{report}");

    // the overlay: the same container move without and with the workload on it
    let ov_out = away_e2e::workspace_root().join("target").join("away-lab-overlay");
    let _ = std::fs::remove_dir_all(&ov_out);
    let mut ov = CompareOptions::quick(lab_image("memload"), away_bin().to_path_buf(), ov_out.clone());
    (ov.links, ov.loads, ov.paths) = (vec![LinkKind::Lan], vec![Load::Idle], vec![MigrationPath::ContainerContainerd]);
    ov.overlays = vec![false, true];
    let moved =
        rt.block_on(away_lab::compare(ov, |p| eprintln!("[{}/{}] {}: {}", p.done, p.total, p.current, p.status)));
    let moved = moved.expect("lab compare --overlay off,on");
    assert_eq!(moved.runs.iter().map(|r| r.overlay).collect::<Vec<_>>(), [false, true]);
    assert!(moved.runs.iter().all(|r| r.converged()), "{:#?}", moved.runs);
    assert!(
        moved.runs[1].network_follow_s.is_some(),
        "the moved workload answered on the overlay: {:?}",
        moved.runs[1]
    );
    let report = std::fs::read_to_string(ov_out.join("report.md")).unwrap();
    assert!(report.contains("## The overlay's cost"), "{report}");
}

/// README's "On a node" line, run as written: it builds the release away (the same
/// artifact as the benchmarks' [`away_bin`]), installs it, checks that no DWARF is left
/// and prints the size. Returns the installed binary.
fn install_node_as_readme_says() -> std::path::PathBuf {
    let readme = std::fs::read_to_string(away_e2e::workspace_root().join("README.md")).expect("README.md");
    let section = readme.split_once("\n## On a node\n").expect("README has an \"## On a node\" section").1;
    let line = section.split_once("```sh\n").and_then(|(_, b)| b.lines().next()).expect("a ```sh line");
    let cmd = line.split_once(" #").map_or(line, |(c, _)| c).trim();
    assert_eq!(cmd, "./deploy/install-node.sh", "the line this test knows");
    let out = std::process::Command::new("bash")
        .args(["-c", cmd])
        .current_dir(away_e2e::workspace_root())
        .output()
        .expect("run deploy/install-node.sh");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{said}");
    assert!(out.status.success(), "{cmd} failed:\n{said}");
    let installed = std::path::PathBuf::from("/usr/local/bin/away");
    let size = std::fs::metadata(&installed).expect("installed away").len();
    // the size it printed is the installed file's
    let mb = format!("{:.1} MB ({size} bytes)", size as f64 / 1e6);
    assert!(said.contains(&format!("installed {}", installed.display())) && said.contains(&mb), "{said}");
    assert_eq!(std::fs::read(&installed).unwrap(), std::fs::read(away_bin()).unwrap(), "the build it installed");
    installed
}
