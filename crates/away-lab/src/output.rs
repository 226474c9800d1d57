//! The experiment's files: results.csv, results.json, report.md and the Fig. 3 plots
//! (fig3.svg, fig3.png). Measured values and the paper's reference values are always
//! labelled apart.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::reference::{self, ReferencePoint};
use crate::{io_err, LabError, LabResults, LinkKind, Load, MigrationPath, RunResult};

pub const CSV_HEADER: &str =
    "run,path,link,load,rep,overlay,total_s,downtime_s,degraded_s,slowed_s,bytes_wire,bytes_raw,disk_bytes,converged,limit_s,total_over_limit,predicted_total_s,predicted_downtime_s,predicted_converges,total_error,downtime_error,network_follow_s,notes";

/// Font for the plots' text (Debian: fonts-dejavu-core); `AWAY_LAB_FONT` overrides it.
const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// The files [`write_outputs`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputFiles {
    pub csv: PathBuf,
    pub json: PathBuf,
    pub report: PathBuf,
    pub svg: PathBuf,
    pub png: PathBuf,
}

impl OutputFiles {
    /// Where the files of an experiment written into `dir` are (or go).
    pub fn in_dir(dir: &Path) -> OutputFiles {
        OutputFiles {
            csv: dir.join("results.csv"),
            json: dir.join("results.json"),
            report: dir.join("report.md"),
            svg: dir.join("fig3.svg"),
            png: dir.join("fig3.png"),
        }
    }
}

/// Write all files into `dir`.
pub fn write_outputs(results: &LabResults, dir: &Path) -> Result<OutputFiles, LabError> {
    std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    let files = OutputFiles::in_dir(dir);
    write_csv(results, &files.csv)?;
    let json = serde_json::to_vec_pretty(results).expect("results serialize");
    write_atomic(&files.json, &json)?;
    write_plots(results, &files.svg, &files.png)?;
    write_report(results, &files.report)?;
    Ok(files)
}

/// A Unix time as a readable UTC date (HTTP's format: httpdate is already in the tree).
pub(crate) fn date(unix: u64) -> String {
    httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), LabError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io_err("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("rename into place", path))
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}")).unwrap_or_default()
}

/// The measured runs, one line each (reference values are not in the CSV).
pub fn write_csv(results: &LabResults, path: &Path) -> Result<(), LabError> {
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for r in &results.runs {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{:.3},{},{},{},{},{},{},{},{:.3},{},{},{},{}",
            r.run,
            r.path,
            r.link,
            r.load,
            r.rep,
            if r.overlay { "on" } else { "off" },
            r.total_s,
            opt(r.downtime_s, 3),
            opt(r.degraded_s, 3),
            opt(r.slowed_s, 3),
            r.bytes_wire,
            r.bytes_raw,
            r.disk_bytes.map(|b| b.to_string()).unwrap_or_default(),
            r.converged(),
            r.limit_s,
            opt(r.total_over_limit, 3),
            prediction_columns(r),
            opt(r.network_follow_s, 3),
            csv_field(&r.notes)
        );
    }
    write_atomic(path, out.as_bytes())
}

/// The prediction's CSV columns of one run: predicted total and downtime, whether it
/// predicted convergence, and the relative errors (empty without a prediction).
fn prediction_columns(r: &RunResult) -> String {
    let p = r.predicted.as_ref();
    format!(
        "{},{},{},{},{}",
        opt(p.filter(|p| p.converges).map(|p| p.total_ms as f64 / 1e3), 3),
        opt(p.filter(|p| p.converges).map(|p| p.downtime_ms as f64 / 1e3), 3),
        p.map(|p| p.converges.to_string()).unwrap_or_default(),
        opt(r.total_error(), 3),
        opt(r.downtime_error(), 3)
    )
}

/// Predicted against measured, per run and per path: the share of runs whose total is
/// within ±20 % and whose downtime is within ±30 %, and whether convergence was
/// predicted right.
fn prediction_section(md: &mut String, results: &LabResults) {
    let runs: Vec<&RunResult> = results.runs.iter().filter(|r| r.predicted.is_some()).collect();
    if runs.is_empty() {
        return;
    }
    let _ = writeln!(md, "\n## Predicted vs measured\n");
    let _ = writeln!(
        md,
        "The prediction each move made before it started (`away_predict`, inputs measured by the source: \
         docs/migration.md, \"Prediction\"). Error = (predicted − measured) ÷ measured.\n"
    );
    let _ = writeln!(
        md,
        "| path | runs predicted | total within ±20 % | median abs. total error | downtime within ±30 % | median abs. downtime error | convergence right |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|");
    let mut paths: Vec<MigrationPath> = runs.iter().map(|r| r.path).collect();
    paths.sort_by_key(|p| p.name());
    paths.dedup();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (!v.is_empty()).then(|| v[v.len() / 2])
    };
    for path in paths {
        let of: Vec<&&RunResult> = runs.iter().filter(|r| r.path == path).collect();
        let totals: Vec<f64> = of.iter().filter_map(|r| r.total_error()).map(f64::abs).collect();
        let downs: Vec<f64> = of.iter().filter_map(|r| r.downtime_error()).map(f64::abs).collect();
        let right = of.iter().filter(|r| r.predicted.as_ref().is_some_and(|p| p.converges == r.converged())).count();
        let within = |v: &[f64], bound: f64| format!("{}/{}", v.iter().filter(|e| **e <= bound).count(), v.len());
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {}/{} |",
            path.name(),
            of.len(),
            within(&totals, 0.2),
            median(totals.clone()).map(|e| format!("{:.0} %", e * 100.0)).unwrap_or_default(),
            within(&downs, 0.3),
            median(downs.clone()).map(|e| format!("{:.0} %", e * 100.0)).unwrap_or_default(),
            right,
            of.len()
        );
    }
    let _ = writeln!(md, "\n| run | path | link | load | predicted total s | measured total s | predicted downtime s | measured downtime s | converges (predicted / measured) |");
    let _ = writeln!(md, "|---:|---|---|---|---:|---:|---:|---:|---|");
    for r in runs {
        let p = r.predicted.as_ref().expect("filtered");
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.2} | {:.2} | {:.3} | {} | {} / {} |",
            r.run,
            r.path.name(),
            r.link,
            r.load,
            p.total_ms as f64 / 1e3,
            r.total_s,
            p.downtime_ms as f64 / 1e3,
            opt(r.downtime_s, 3),
            p.converges,
            r.converged()
        );
    }
}

/// Mean of the finished runs of one point, and how many finished of how many.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Point {
    total: Option<f64>,
    downtime: Option<f64>,
    /// Lazy moves: running on the target while pages arrived.
    degraded: Option<f64>,
    /// Under a RAM load: memload below 90 % of its rate after the resume.
    slowed: Option<f64>,
    wire: Option<f64>,
    /// vm-disk, container-volume: the disk's or the volume's part of `wire`.
    disk: Option<f64>,
    /// On the overlay: the network's following after the resume.
    follow: Option<f64>,
    limit: Option<f64>,
    min: f64,
    max: f64,
    moved: usize,
    runs: usize,
    not_converged: usize,
    /// Longest time of a run that did not converge (its time limit).
    not_converged_at: f64,
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// The mean of each (link, load, path): of its runs without the overlay when it has
/// any, else of those on it (`--overlay on` alone); [`overlay_points`] has both.
fn points(results: &LabResults) -> BTreeMap<(LinkKind, Load, MigrationPath), Point> {
    let off: BTreeMap<_, _> = overlay_points(results, false);
    let mut all = overlay_points(results, true);
    all.extend(off);
    all
}

/// The means of the runs with (`overlay`) or without the overlay.
fn overlay_points(results: &LabResults, overlay: bool) -> BTreeMap<(LinkKind, Load, MigrationPath), Point> {
    let mut groups: BTreeMap<_, Vec<&RunResult>> = BTreeMap::new();
    for r in results.runs.iter().filter(|r| r.overlay == overlay) {
        groups.entry((r.link, r.load, r.path)).or_default().push(r);
    }
    groups
        .into_iter()
        .map(|(k, runs)| {
            let moved: Vec<&&RunResult> = runs.iter().filter(|r| r.converged()).collect();
            let totals: Vec<f64> = moved.iter().map(|r| r.total_s).collect();
            let p = Point {
                total: mean(&totals),
                downtime: mean(&moved.iter().filter_map(|r| r.downtime_s).collect::<Vec<_>>()),
                degraded: mean(&moved.iter().filter_map(|r| r.degraded_s).collect::<Vec<_>>()),
                slowed: mean(&moved.iter().filter_map(|r| r.slowed_s).collect::<Vec<_>>()),
                wire: mean(&moved.iter().map(|r| r.bytes_wire as f64).collect::<Vec<_>>()),
                disk: mean(&moved.iter().filter_map(|r| r.disk_bytes.map(|b| b as f64)).collect::<Vec<_>>()),
                follow: mean(&moved.iter().filter_map(|r| r.network_follow_s).collect::<Vec<_>>()),
                limit: mean(&moved.iter().map(|r| r.limit_s).collect::<Vec<_>>()),
                min: totals.iter().copied().fold(f64::INFINITY, f64::min),
                max: totals.iter().copied().fold(0.0, f64::max),
                moved: moved.len(),
                runs: runs.len(),
                not_converged: runs.iter().filter(|r| r.outcome == crate::RunOutcome::NotConverged).count(),
                not_converged_at: runs
                    .iter()
                    .filter(|r| r.outcome == crate::RunOutcome::NotConverged)
                    .map(|r| r.total_s)
                    .fold(0.0, f64::max),
            };
            (k, p)
        })
        .collect()
}

fn links_of(results: &LabResults) -> Vec<LinkKind> {
    let mut links: Vec<LinkKind> = results.runs.iter().map(|r| r.link).collect();
    links.sort();
    links.dedup();
    if links.is_empty() {
        links = LinkKind::ALL.to_vec();
    }
    links
}

/// The x axis: the measured loads and those with a reference value, in Fig. 3's order.
fn axis_loads(results: &LabResults, links: &[LinkKind]) -> Vec<Load> {
    Load::ALL
        .into_iter()
        .filter(|l| {
            results.loads.contains(l)
                || results.runs.iter().any(|r| r.load == *l)
                || links.iter().any(|k| reference::points(*k).any(|p| p.load == *l))
        })
        .collect()
}

fn s(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "–".into())
}

/// The Markdown report: setup, measured table, ratios, physical limit, reference.
pub fn write_report(results: &LabResults, path: &Path) -> Result<(), LabError> {
    let set = &results.setup;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let mut md = String::new();
    let _ = writeln!(md, "# away lab compare: VM live migration vs container migration\n");
    let _ = writeln!(md, "## Setup (of every measured number below)\n");
    let _ = writeln!(md, "- profile: {}", if set.quick { "quick" } else { "full" });
    let _ = writeln!(
        md,
        "- VM: {:.0} MiB RAM, {} vCPU, QEMU accel {}",
        mib(set.vm_ram_bytes),
        set.vm_vcpus,
        set.qemu_accel.as_deref().unwrap_or("– (no vm path)")
    );
    let _ = writeln!(
        md,
        "- app: memload filling {:.0} MiB (half of each page random, half zero), {} CPU thread(s); the same in the VM and the container",
        mib(set.app_ram_bytes),
        set.cpu_threads
    );
    let _ = writeln!(
        md,
        "- loads: idle; cpuN = busy N % of the time; ramN = N % of the app's memory rewritten continuously"
    );
    let _ = writeln!(md, "- links: {}", set.links.join("; "));
    let _ = writeln!(md, "- link emulation: {}", set.link_emulator);
    let channels = set.channels.parse::<crate::Channels>().map_or(set.channels.as_str(), |c| c.describe());
    let _ = writeln!(md, "- channels between the nodes: {channels}");
    let timeouts: Vec<String> = set.vm_timeouts.iter().map(|(l, t)| format!("{l} {t:.0} s")).collect();
    let _ = writeln!(
        md,
        "- VM migrations are cancelled (recorded as not converged, the VM stays on the source) after: {}",
        timeouts.join(", ")
    );
    let _ = writeln!(
        md,
        "- containers: CRIU stop-and-copy, streamed from CRIU's page server into the target's images \
         (container-containerd) or staged through away's transfer protocol (container-staged, \
         container-docker), or CRIU lazy pages through away's page relay (container-lazy), {}",
        set.container_compression
    );
    if results
        .paths
        .iter()
        .any(|p| p.is_peer() || matches!(p, MigrationPath::VmMultifdZstd | MigrationPath::VmMultifdZstdPostcopy))
    {
        let _ = writeln!(
            md,
            "- peers: peer-podman = Podman's own path (`podman container checkpoint --export --compress=zstd`, the \
             archive sent over the same link, `podman container restore --import`; its own store per side with the \
             image loaded beforehand; downtime from its checkpoint operation, total from the checkpoint command, \
             both to the restore's return); vm-multifd-zstd = QEMU multifd, 2 channels, zstd level 1 \
             (vm-multifd-zstd-postcopy: the same with post-copy, when this QEMU takes the pair)"
        );
    }
    if let Some(rate) = set.disk_rate_bytes {
        let _ = writeln!(
            md,
            "- with a disk: memload also writes {:.2} MiB/s to {} in 1 MiB segment files (64 KiB writes, each \
             fdatasync'd; the oldest removed past 64 MiB): vm-disk = the VM's {} MiB disk, a qcow2 overlay on an \
             empty ext4 base both nodes hold, mirrored over NBD (blockdev-mirror) while RAM migrates; \
             container-volume = the container's volume, moved with it",
            mib(rate),
            crate::vm::DISK_MOUNT,
            crate::vm::DISK_BYTES >> 20
        );
    }
    let wall = if set.sources.is_empty() { "wall time" } else { "wall time (sum of the sources)" };
    let _ = writeln!(
        md,
        "- host: {} CPUs; both nodes on this host; {} repetition(s); started {}; {wall} {:.0} s",
        set.host_cpus,
        set.repetitions,
        date(set.started_unix),
        results.wall_s
    );
    if !set.sources.is_empty() {
        let _ = writeln!(
            md,
            "- merged (`away lab merge`) from {} runs of `away lab compare`, each series from one of them:",
            set.sources.len()
        );
        for src in &set.sources {
            let _ = writeln!(md, "  - {src}");
        }
    }
    md.push('\n');

    let pts = points(results);
    let links = links_of(results);
    let _ = writeln!(md, "## Measured\n");
    let _ = writeln!(
        md,
        "Means over the runs that finished. Total, the same for every path: from the lab starting the move (its \
         command or call) to the workload running on the target with all its state (lazy, post-copy: the last \
         page), on the lab's clock; the commit and the source's cleanup after that are not in it. VM downtime: the source's STOP event to the destination's RESUME event; \
         container downtime: CRIU's freeze to restored; degraded (lazy): running on the target while pages \
         still arrived; slowed (RAM loads): memload writing below 90 % of its rate before the move, from the \
         resume on (its own heartbeats, every 250 ms). Limit: bytes on the wire ÷ link rate + round trips \
         ({} for a VM, {} for a container).\n",
        crate::VM_ROUND_TRIPS,
        crate::CONTAINER_ROUND_TRIPS
    );
    let _ = writeln!(
        md,
        "| link | load | path | moved | total s (min–max) | downtime s | degraded s | slowed s | wire MB | limit s | total / limit |"
    );
    let _ = writeln!(md, "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for ((link, load, path), p) in &pts {
        let range = if p.moved > 1 { format!(" ({:.2}–{:.2})", p.min, p.max) } else { String::new() };
        let moved = if p.not_converged > 0 {
            format!("{}/{} ({} not converged)", p.moved, p.runs, p.not_converged)
        } else {
            format!("{}/{}", p.moved, p.runs)
        };
        let _ = writeln!(
            md,
            "| {link} | {load} | {path} | {moved} | {}{range} | {} | {} | {} | {} | {} | {} |",
            s(p.total),
            s(p.downtime),
            s(p.degraded),
            s(p.slowed),
            s(p.wire.map(|w| w / 1e6)),
            s(p.limit),
            s(p.total.zip(p.limit).map(|(t, l)| t / l)),
        );
    }

    let _ = writeln!(md, "\n## Ratios (measured, VM ÷ container, same link and load)\n");
    let containers: Vec<MigrationPath> = results.paths.iter().copied().filter(|p| !p.is_vm()).collect();
    let vms: Vec<MigrationPath> = results.paths.iter().copied().filter(|p| p.is_vm()).collect();
    if containers.is_empty() || vms.is_empty() {
        let had: Vec<&str> = results.paths.iter().map(|p| p.name()).collect();
        let _ = writeln!(md, "Needs a VM path and a container path; this run had {}.", had.join(", "));
    } else {
        let _ = writeln!(md, "| link | load | VM path | container path | total ratio | downtime ratio |");
        let _ = writeln!(md, "|---|---|---|---|---:|---:|");
        for &link in &links {
            for &load in &results.loads {
                for &v in &vms {
                    // a VM with a disk against the container with a volume, the others apart
                    for &c in containers.iter().filter(|c| c.writes_disk() == v.writes_disk()) {
                        let (Some(vp), Some(cp)) = (pts.get(&(link, load, v)), pts.get(&(link, load, c))) else {
                            continue;
                        };
                        let total = match (vp.total, cp.total) {
                            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
                            (None, Some(_)) if vp.not_converged > 0 => "VM did not converge".into(),
                            _ => "–".into(),
                        };
                        let down = s(vp.downtime.zip(cp.downtime).filter(|(_, b)| *b > 0.0).map(|(a, b)| a / b));
                        let _ = writeln!(md, "| {link} | {load} | {v} | {c} | {total} | {down} |");
                    }
                }
            }
        }
    }

    peer_table(&mut md, results, &pts, &links);
    disk_table(&mut md, results, &pts, &links);
    overlay_table(&mut md, results, &links);
    prediction_section(&mut md, results);
    failures(&mut md, results);

    let _ = writeln!(md, "\n## Reference: {} \n", reference::SOURCE);
    let _ = writeln!(
        md,
        "These are the paper's numbers, not measurements of this run. Its VM and hardware differ from the setup above \
         (this run is scaled down), so compare shapes and ratios, not absolute values.\n"
    );
    for p in reference::POINTS {
        let _ = writeln!(md, "- paper, {} {}: {}", p.link, p.load, p.text);
    }
    let _ = writeln!(md, "\n## Files\n");
    let _ = writeln!(md, "- results.csv: one line per measured run; results.json: the same with the setup");
    let _ = writeln!(
        md,
        "- fig3.svg / fig3.png: migration time per load (log scale), LAN and WAN side by side; VM and container series \
         measured here (means; × = cancelled, not converged), black diamonds = paper reference"
    );
    write_atomic(path, md.as_bytes())
}

/// away's best container path in a cell: the lowest mean total time among away's
/// container paths with a finished run there.
fn best_away(
    results: &LabResults,
    pts: &BTreeMap<(LinkKind, Load, MigrationPath), Point>,
    link: LinkKind,
    load: Load,
) -> Option<(MigrationPath, Point)> {
    results
        .paths
        .iter()
        .filter(|p| p.is_away_container() && !p.writes_disk())
        .filter_map(|p| Some((*p, *pts.get(&(link, load, *p))?)))
        .filter(|(_, pt)| pt.total.is_some())
        .min_by(|a, b| a.1.total.partial_cmp(&b.1.total).unwrap_or(std::cmp::Ordering::Equal))
}

/// "away's best path vs each peer, per link and load": the peers are Podman and every
/// VM path of the run.
fn peer_table(
    md: &mut String,
    results: &LabResults,
    pts: &BTreeMap<(LinkKind, Load, MigrationPath), Point>,
    links: &[LinkKind],
) {
    // (the VM with a disk has its own table, against the container with a volume)
    let peers: Vec<MigrationPath> =
        results.paths.iter().copied().filter(|p| (p.is_peer() || p.is_vm()) && !p.writes_disk()).collect();
    let _ = writeln!(md, "\n## away's best path vs each peer, per link and load (measured)\n");
    if peers.is_empty() || !results.paths.iter().any(|p| p.is_away_container()) {
        let _ = writeln!(md, "Needs one of away's container paths and a peer (peer-podman or a VM path).");
        return;
    }
    let _ = writeln!(
        md,
        "away's best = the container path of away with the lowest mean total time in that cell (its downtime \
         beside it). Ratios are peer ÷ away: above 1, away is faster (or moves fewer bytes).\n"
    );
    let _ = writeln!(
        md,
        "| link | load | away's best | total s | downtime s | wire MB | peer | total s | downtime s | wire MB | total ratio | downtime ratio | wire ratio |"
    );
    let _ = writeln!(md, "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|");
    let ratio = |a: Option<f64>, b: Option<f64>| s(a.zip(b).filter(|(_, b)| *b > 0.0).map(|(a, b)| a / b));
    let mut podman = (0, 0);
    for &link in links {
        for &load in &results.loads {
            let Some((best, bp)) = best_away(results, pts, link, load) else { continue };
            for &peer in &peers {
                let Some(pp) = pts.get(&(link, load, peer)) else { continue };
                let mb = |p: &Point| p.wire.map(|w| w / 1e6);
                let (total, down) = match pp.total {
                    Some(_) => (s(pp.total), s(pp.downtime)),
                    None if pp.not_converged > 0 => ("not converged".into(), "–".into()),
                    None => ("failed".into(), "–".into()),
                };
                let _ = writeln!(
                    md,
                    "| {link} | {load} | {best} | {} | {} | {} | {peer} | {total} | {down} | {} | {} | {} | {} |",
                    s(bp.total),
                    s(bp.downtime),
                    s(mb(&bp)),
                    s(mb(pp)),
                    ratio(pp.total, bp.total),
                    ratio(pp.downtime, bp.downtime),
                    ratio(mb(pp), mb(&bp)),
                );
                if peer == MigrationPath::PeerPodman {
                    podman.1 += 1;
                    let ahead = |a: Option<f64>, p: Option<f64>| a.zip(p).is_some_and(|(a, p)| a < p);
                    if ahead(bp.total, pp.total) && ahead(bp.downtime, pp.downtime) {
                        podman.0 += 1;
                    }
                }
            }
        }
    }
    if podman.1 > 0 {
        let _ = writeln!(
            md,
            "\naway's best path ahead of peer-podman in both total time and downtime: {} of {} cells.",
            podman.0, podman.1
        );
    }
}

/// "With a disk": the paths whose app writes files, with the bytes on the wire split
/// into the disk's (or the volume's) and the rest (memory and the other state).
fn disk_table(
    md: &mut String,
    results: &LabResults,
    pts: &BTreeMap<(LinkKind, Load, MigrationPath), Point>,
    links: &[LinkKind],
) {
    let paths: Vec<MigrationPath> = results.paths.iter().copied().filter(|p| p.writes_disk()).collect();
    if paths.is_empty() {
        return;
    }
    let _ = writeln!(md, "\n## With a disk: the VM's disk against the container's volume (measured)\n");
    let _ = writeln!(
        md,
        "Disk MB: vm-disk = the overlay's blocks the mirror copied (NBD, uncompressed); container-volume = the \
         volume's files sent (before compression). Rest MB: the wire bytes less those (memory, devices, CRIU's \
         other images).\n"
    );
    let _ = writeln!(md, "| link | load | path | moved | total s | downtime s | wire MB | disk MB | rest MB |");
    let _ = writeln!(md, "|---|---|---|---|---:|---:|---:|---:|---:|");
    for &link in links {
        for &load in &results.loads {
            for &path in &paths {
                let Some(p) = pts.get(&(link, load, path)) else { continue };
                let mb = |v: Option<f64>| s(v.map(|v| v / 1e6));
                let rest = p.wire.zip(p.disk).map(|(w, d)| (w - d).max(0.0));
                let _ = writeln!(
                    md,
                    "| {link} | {load} | {path} | {}/{} | {} | {} | {} | {} | {} |",
                    p.moved,
                    p.runs,
                    s(p.total),
                    s(p.downtime),
                    mb(p.wire),
                    mb(p.disk),
                    mb(rest)
                );
            }
        }
    }
}

/// "The overlay's cost": each path run with and without the workload on the VXLAN
/// overlay, side by side.
fn overlay_table(md: &mut String, results: &LabResults, links: &[LinkKind]) {
    if !results.runs.iter().any(|r| r.overlay) {
        return;
    }
    let (off, on) = (overlay_points(results, false), overlay_points(results, true));
    let _ = writeln!(md, "\n## The overlay's cost (measured, the same runs without and with it)\n");
    let _ = writeln!(
        md,
        "With the overlay the workload is on a VXLAN overlay between the two nodes (across the same link), its \
         address and MAC moved with it. A container has its own network namespace: the target builds it before \
         the restore, CRIU restores its TCP connections established and the target announces it (gratuitous \
         ARP). A VM has a tap on each side's bridge (the guest's MAC, its address on its kernel command line): \
         the target's is made before the incoming QEMU starts, and QEMU announces the guest itself. Follow: from \
         the resume to the first ICMP echo the workload answered the source node, asked every 10 ms over the \
         overlay's bridge (container runs; a VM run is moved from the lab's own process, which is on neither \
         side's bridge, so it has none). The migration's own traffic goes between the nodes either way.\n"
    );
    let _ = writeln!(
        md,
        "| link | load | path | total s off / on | downtime s off / on | wire MB off / on | total on ÷ off | follow s |"
    );
    let _ = writeln!(md, "|---|---|---|---:|---:|---:|---:|---:|");
    for &link in links {
        for &load in &results.loads {
            for &path in &results.paths {
                let Some(b) = on.get(&(link, load, path)) else { continue };
                let a = off.get(&(link, load, path));
                let pair = |f: fn(&Point) -> Option<f64>, scale: f64| {
                    format!("{} / {}", s(a.and_then(f).map(|v| v / scale)), s(f(b).map(|v| v / scale)))
                };
                let ratio = a.and_then(|a| a.total).zip(b.total).filter(|(a, _)| *a > 0.0).map(|(a, b)| b / a);
                let _ = writeln!(
                    md,
                    "| {link} | {load} | {path} | {} | {} | {} | {} | {} |",
                    pair(|p| p.total, 1.0),
                    pair(|p| p.downtime, 1.0),
                    pair(|p| p.wire, 1e6),
                    s(ratio),
                    s(b.follow)
                );
            }
        }
    }
}

/// The runs that failed, with their reason (a path QEMU refuses shows up here).
fn failures(md: &mut String, results: &LabResults) {
    let failed: Vec<&RunResult> = results.runs.iter().filter(|r| r.outcome == crate::RunOutcome::Failed).collect();
    if failed.is_empty() {
        return;
    }
    let _ = writeln!(md, "\n## Failed runs\n");
    for r in failed {
        let _ = writeln!(md, "- run {}: {} {} {}: {}", r.run, r.path, r.link, r.load, r.notes);
    }
}

fn font_ready() -> Result<(), String> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let path = std::env::var("AWAY_LAB_FONT").unwrap_or_else(|_| DEFAULT_FONT.into());
        let bytes = std::fs::read(&path)
            .map_err(|e| format!("font {path}: {e} (install fonts-dejavu-core or set AWAY_LAB_FONT to a TTF)"))?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("font {path}: not a usable TrueType font"))
    })
    .clone()
}

fn color(path: MigrationPath) -> RGBColor {
    match path {
        MigrationPath::VmPrecopy => RGBColor(214, 39, 40),
        MigrationPath::VmAutoConverge => RGBColor(255, 127, 14),
        MigrationPath::VmPostcopy => RGBColor(148, 103, 189),
        MigrationPath::ContainerContainerd => RGBColor(31, 119, 180),
        MigrationPath::ContainerStaged => RGBColor(140, 86, 75),
        MigrationPath::ContainerDocker => RGBColor(23, 190, 207),
        MigrationPath::ContainerLazy => RGBColor(44, 160, 44),
        MigrationPath::VmMultifdZstd => RGBColor(227, 119, 194),
        MigrationPath::VmMultifdZstdPostcopy => RGBColor(188, 189, 34),
        MigrationPath::VmDisk => RGBColor(140, 20, 60),
        MigrationPath::ContainerVolume => RGBColor(20, 90, 60),
        MigrationPath::PeerPodman => RGBColor(127, 127, 127),
    }
}

/// Fig. 3's layout: migration time per load level, one panel per link, the measured
/// VM and container series side by side and the paper's values as a reference series.
pub fn write_plots(results: &LabResults, svg: &Path, png: &Path) -> Result<(), LabError> {
    font_ready().map_err(|reason| LabError::Plot { path: svg.to_path_buf(), reason })?;
    let size = (1400, 620);
    {
        let root = SVGBackend::new(svg, size).into_drawing_area();
        draw(results, &root).map_err(|reason| LabError::Plot { path: svg.to_path_buf(), reason })?;
    }
    {
        let root = BitMapBackend::new(png, size).into_drawing_area();
        draw(results, &root).map_err(|reason| LabError::Plot { path: png.to_path_buf(), reason })?;
    }
    Ok(())
}

/// One entry of the figure's legend.
enum Key {
    Series(MigrationPath),
    Paper,
    NotConverged,
}

/// Height of one legend row and the columns per row, for the strip under the panels
/// (a legend inside a panel would hide points: the paper's idle WAN value sits where
/// plotters puts it).
const KEY_ROW: i32 = 20;
const KEY_COLUMNS: usize = 3;

/// A non-converged VM run is drawn as a cross at its time limit; the VM paths share that
/// limit, so each gets its own size (larger first) to stay visible under the next.
fn cross_size(results: &LabResults, path: MigrationPath) -> i32 {
    let vms: Vec<MigrationPath> = results.paths.iter().copied().filter(|p| p.is_vm()).collect();
    let k = vms.iter().position(|p| *p == path).unwrap_or(0);
    7 + 4 * (vms.len().saturating_sub(k + 1)) as i32
}

fn draw<DB: DrawingBackend>(results: &LabResults, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let links = links_of(results);
    let loads = axis_loads(results, &links);
    let pts = points(results);
    let mut values: Vec<f64> = pts.values().flat_map(|p| [p.total, Some(p.not_converged_at)]).flatten().collect();
    values.extend(reference::POINTS.iter().filter(|p| links.contains(&p.link)).filter_map(|p| p.total_s));
    values.retain(|v| *v > 0.0);
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min).min(1.0) / 2.0;
    let hi = values.iter().copied().fold(0.0, f64::max).max(10.0) * 3.0;
    let title = format!(
        "Migration time per load (VM {:.0} MiB, app {:.0} MiB; measured here) with the paper's values as reference",
        results.setup.vm_ram_bytes as f64 / 1048576.0,
        results.setup.app_ram_bytes as f64 / 1048576.0
    );
    let root = root.titled(&title, ("sans-serif", 18)).map_err(e)?;
    let mut keys: Vec<Key> = results.paths.iter().map(|p| Key::Series(*p)).collect();
    if reference::POINTS.iter().any(|p| links.contains(&p.link)) {
        keys.push(Key::Paper);
    }
    if pts.iter().any(|((l, _, _), p)| links.contains(l) && p.not_converged > 0) {
        keys.push(Key::NotConverged);
    }
    let rows = keys.len().div_ceil(KEY_COLUMNS) as i32;
    let (charts, strip) = root.split_vertically(root.dim_in_pixel().1 as i32 - rows * KEY_ROW - 12);
    let panels = charts.split_evenly((1, links.len()));
    let n = loads.len();
    for (area, link) in panels.iter().zip(&links) {
        let mut chart = ChartBuilder::on(area)
            .caption(link.describe(), ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((0..n).into_segmented(), (lo..hi).log_scale())
            .map_err(e)?;
        let names: Vec<String> = loads.iter().map(|l| l.name()).collect();
        let fmt = |v: &SegmentValue<usize>| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => names.get(*i).cloned().unwrap_or_default(),
            SegmentValue::Last => String::new(),
        };
        chart
            .configure_mesh()
            .x_labels(n)
            .x_label_formatter(&fmt)
            .x_desc("load")
            .y_desc("migration time (s, log)")
            .draw()
            .map_err(e)?;
        for &path in &results.paths {
            let c = color(path);
            let line: Vec<(SegmentValue<usize>, f64)> = loads
                .iter()
                .enumerate()
                .filter_map(|(i, l)| pts.get(&(*link, *l, path))?.total.map(|t| (SegmentValue::CenterOf(i), t)))
                .collect();
            chart.draw_series(LineSeries::new(line.clone(), c.stroke_width(2))).map_err(e)?;
            chart.draw_series(line.iter().map(|p| Circle::new(p.clone(), 4, c.filled()))).map_err(e)?;
            let crosses: Vec<(SegmentValue<usize>, f64)> = loads
                .iter()
                .enumerate()
                .filter_map(|(i, l)| {
                    let p = pts.get(&(*link, *l, path))?;
                    (p.not_converged > 0).then_some((SegmentValue::CenterOf(i), p.not_converged_at.max(lo)))
                })
                .collect();
            let size = cross_size(results, path);
            chart.draw_series(crosses.iter().map(|p| Cross::new(p.clone(), size, c.stroke_width(3)))).map_err(e)?;
        }
        let refs: Vec<&ReferencePoint> = reference::points(*link).collect();
        let at = |p: &ReferencePoint| loads.iter().position(|l| *l == p.load).map(SegmentValue::CenterOf);
        let measured: Vec<(SegmentValue<usize>, f64)> =
            refs.iter().filter_map(|p| Some((at(p)?, p.total_s?))).collect();
        chart
            .draw_series(measured.iter().map(|p| {
                EmptyElement::at(p.clone()) + Polygon::new(vec![(0, -7), (7, 0), (0, 7), (-7, 0)], BLACK.filled())
            }))
            .map_err(e)?;
        for (p, r) in measured.iter().zip(refs.iter().filter(|r| r.total_s.is_some())) {
            let text = format!("paper {} s", r.total_s.unwrap_or_default());
            chart
                .draw_series(std::iter::once(
                    EmptyElement::at(p.clone()) + Text::new(text, (10, -6), ("sans-serif", 12).into_font()),
                ))
                .map_err(e)?;
        }
        for r in refs.iter().filter(|r| r.total_s.is_none()) {
            if let Some(x) = at(r) {
                chart
                    .draw_series(std::iter::once(
                        EmptyElement::at((x, hi / 1.6))
                            + Cross::new((0, 0), 8, BLACK.stroke_width(3))
                            + Text::new("paper: never converged", (-60, 10), ("sans-serif", 12).into_font()),
                    ))
                    .map_err(e)?;
            }
        }
    }
    draw_keys(&strip, &keys).map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

/// The legend, shared by both panels, in rows under them.
fn draw_keys<DB: DrawingBackend>(
    strip: &DrawingArea<DB, Shift>,
    keys: &[Key],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let width = strip.dim_in_pixel().0 as i32 - 80;
    let font = ("sans-serif", 13).into_font();
    for (i, key) in keys.iter().enumerate() {
        let x = 80 + (i % KEY_COLUMNS) as i32 * width / KEY_COLUMNS as i32;
        let y = 6 + (i / KEY_COLUMNS) as i32 * KEY_ROW + KEY_ROW / 2;
        let label = match key {
            Key::Series(path) => {
                let c = color(*path);
                strip.draw(&PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(2)))?;
                strip.draw(&Circle::new((x + 12, y), 4, c.filled()))?;
                format!("{path} (measured)")
            }
            Key::Paper => {
                strip.draw(&Polygon::new(
                    vec![(x + 12, y - 6), (x + 18, y), (x + 12, y + 6), (x + 6, y)],
                    BLACK.filled(),
                ))?;
                "paper (reference, not measured here)".to_string()
            }
            Key::NotConverged => {
                strip.draw(&Cross::new((x + 12, y), 5, BLACK.stroke_width(2)))?;
                "× measured: cancelled at its time limit (not converged)".to_string()
            }
        };
        strip.draw(&Text::new(label, (x + 32, y - 7), font.clone()))?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{CompareOptions, LabSetup, RunOutcome};

    pub(crate) fn synthetic() -> LabResults {
        let mut o = CompareOptions::quick("m.tar".into(), "away".into(), "out".into());
        o.paths.push(MigrationPath::VmAutoConverge);
        // three loads, as the quick profile had when these numbers were written
        o.loads = vec![crate::Load::Idle, crate::Load::Cpu(50), crate::Load::Ram(50)];
        o.repetitions = 2;
        let runs = o
            .plan()
            .iter()
            .map(|p| {
                let base = if p.link == LinkKind::Wan { 30.0 } else { 3.0 };
                let (outcome, total) = match (p.path.is_vm(), p.load, p.link) {
                    (true, Load::Ram(_), LinkKind::Wan) => (RunOutcome::NotConverged, 58.0),
                    (true, _, _) => (RunOutcome::Moved, base * 1.5 + p.rep as f64),
                    _ if p.path.is_peer() => (RunOutcome::Moved, base),
                    _ => (RunOutcome::Moved, base / 2.0),
                };
                let r = RunResult::new(p, outcome, Duration::from_secs_f64(total), Some(Duration::from_millis(300)));
                r.with_bytes(20_000_000, 134_217_728)
                    .with_disk(p.path.writes_disk().then_some(5_000_000))
                    .with_notes("a note, with \"quotes\"")
            })
            .collect();
        LabResults {
            setup: LabSetup {
                quick: true,
                vm_ram_bytes: o.vm_ram.bytes(),
                app_ram_bytes: o.app_ram.bytes(),
                vm_vcpus: 1,
                cpu_threads: 1,
                repetitions: 2,
                links: o.links.iter().map(|l| l.describe()).collect(),
                link_emulator: o.link_emulator.label().into(),
                qemu_accel: Some("tcg".into()),
                host_cpus: 2,
                vm_timeouts: vec![("lan".into(), 30.0), ("wan".into(), 58.0)],
                container_compression: "zstd:1".into(),
                channels: "tls".into(),
                disk_rate_bytes: Some(1 << 20),
                started_unix: 0,
                sources: Vec::new(),
            },
            loads: o.loads.clone(),
            paths: o.paths.clone(),
            runs,
            wall_s: 123.0,
        }
    }

    /// Runs with a prediction get its columns and the report's predicted-vs-measured
    /// section; the errors are relative to what was measured.
    #[test]
    fn predictions_are_set_against_measurements() {
        let mut r = synthetic();
        let predicted = |total_ms, converges| away_model::MovePrediction {
            kind: away_model::MoveKind::ContainerStreamed,
            available: true,
            total_ms,
            downtime_ms: 330,
            degraded_ms: 0,
            bytes_wire: 1,
            converges,
            rounds: 0,
            note: String::new(),
        };
        let moved = r.runs.iter().position(|x| x.converged() && !x.path.is_vm()).unwrap();
        let total = r.runs[moved].total_s;
        r.runs[moved].predicted = Some(predicted((total * 1100.0) as u64, true));
        let stuck = r.runs.iter().position(|x| x.outcome == RunOutcome::NotConverged).unwrap();
        r.runs[stuck].predicted = Some(predicted(600_000, false));
        assert!((r.runs[moved].total_error().unwrap() - 0.1).abs() < 0.01);
        assert!((r.runs[moved].downtime_error().unwrap() - 0.1).abs() < 0.01);
        assert_eq!(r.runs[stuck].total_error(), None, "no error for a move that did not finish");
        let dir = tempfile::tempdir().unwrap();
        write_csv(&r, &dir.path().join("results.csv")).unwrap();
        let csv = std::fs::read_to_string(dir.path().join("results.csv")).unwrap();
        let line = csv.lines().nth(moved + 1).unwrap();
        assert!(line.contains(",true,0.100,0.100,"), "{line}");
        write_report(&r, &dir.path().join("report.md")).unwrap();
        let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        assert!(md.contains("## Predicted vs measured"), "{md}");
        assert!(md.contains("| 1/1 | 10 % | 1/1 | 10 % | 1/1 |"), "{md}");
        assert!(md.contains("false / false"), "the non-convergence predicted right: {md}");
    }

    /// The VM with a disk is set against the container with a volume, with the disk's
    /// bytes apart, and neither is in the tables of the paths without one.
    #[test]
    fn disk_paths_have_their_own_table() {
        let r = synthetic();
        let dir = tempfile::tempdir().unwrap();
        write_report(&r, &dir.path().join("report.md")).unwrap();
        let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        assert!(md.contains("memload also writes 1.00 MiB/s to /data"), "{md}");
        let table = md.split("## With a disk").nth(1).expect("the disk table").split("\n## ").next().unwrap();
        for path in ["vm-disk", "container-volume"] {
            assert!(table.contains(&format!("| lan | idle | {path} | 2/2 |")), "{table}");
        }
        assert!(table.contains("| 20.00 | 5.00 | 15.00 |"), "wire, disk, rest: {table}");
        let peers = md.split("## away's best path vs each peer").nth(1).unwrap().split("\n## ").next().unwrap();
        assert!(!peers.contains("vm-disk") && !peers.contains("container-volume"), "{peers}");
        let ratios = md.split("## Ratios").nth(1).unwrap().split("\n## ").next().unwrap();
        assert!(ratios.contains("| vm-disk | container-volume |"), "{ratios}");
        assert!(!ratios.contains("| vm-disk | container-containerd |"), "{ratios}");
        assert!(!ratios.contains("| vm-precopy | container-volume |"), "{ratios}");
        let csv = dir.path().join("results.csv");
        write_csv(&r, &csv).unwrap();
        let text = std::fs::read_to_string(&csv).unwrap();
        let line = text.lines().find(|l| l.contains(",vm-disk,")).unwrap();
        assert!(line.contains(",20000000,134217728,5000000,true,"), "{line}");
    }

    /// Runs on the overlay get their own table beside the same runs without it; the
    /// other tables keep the runs without.
    #[test]
    fn the_overlay_runs_are_set_against_the_same_runs_without() {
        let mut o = CompareOptions::quick("m.tar".into(), "away".into(), "out".into());
        o.overlays = vec![false, true];
        o.paths = vec![MigrationPath::VmPrecopy, MigrationPath::ContainerContainerd];
        o.loads = vec![Load::Idle];
        let plan = o.plan();
        assert_eq!(plan.iter().filter(|p| p.overlay).count(), 4, "both paths, lan and wan: {plan:?}");
        o.paths.push(MigrationPath::PeerPodman);
        assert!(o.plan().iter().all(|p| !p.overlay || p.path != MigrationPath::PeerPodman), "not the peer");
        let mut r = synthetic();
        r.paths = o.paths.clone();
        r.loads = o.loads.clone();
        r.runs = plan
            .iter()
            .map(|p| {
                let total = if p.overlay { 2.2 } else { 2.0 };
                RunResult::new(p, RunOutcome::Moved, Duration::from_secs_f64(total), Some(Duration::from_millis(400)))
                    .with_bytes(10_000_000, 20_000_000)
                    .with_follow(p.overlay.then_some(12))
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        write_report(&r, &dir.path().join("report.md")).unwrap();
        let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        let table = md.split("## The overlay's cost").nth(1).expect("the overlay table").split("\n## ").next().unwrap();
        assert!(
            table.contains(
                "| lan | idle | container-containerd | 2.00 / 2.20 | 0.40 / 0.40 | 10.00 / 10.00 | 1.10 | 0.01 |"
            ),
            "{table}"
        );
        assert!(table.contains("| lan | idle | vm-precopy | 2.00 / 2.20 |"), "{table}");
        let measured = md.split("## Measured").nth(1).unwrap().split("\n## ").next().unwrap();
        assert!(
            measured.contains("| lan | idle | container-containerd | 1/1 | 2.00 |"),
            "without the overlay: {measured}"
        );
        write_csv(&r, &dir.path().join("results.csv")).unwrap();
        let csv = std::fs::read_to_string(dir.path().join("results.csv")).unwrap();
        assert!(
            csv.lines().any(|l| l.contains(",container-containerd,lan,idle,1,on,2.200,") && l.contains(",0.012,")),
            "{csv}"
        );
    }

    #[test]
    fn csv_has_the_columns_and_quotes_notes() {
        let dir = tempfile::tempdir().unwrap();
        let r = synthetic();
        let path = dir.path().join("results.csv");
        write_csv(&r, &path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next().unwrap(), CSV_HEADER);
        let first = lines.next().unwrap();
        assert!(first.starts_with("1,vm-precopy,lan,idle,1,"), "{first}");
        assert!(first.ends_with(",\"a note, with \"\"quotes\"\"\""), "{first}");
        assert_eq!(text.lines().count(), r.runs.len() + 1);
        let timed_out = text.lines().find(|l| l.contains(",wan,ram50,") && l.contains("vm-precopy")).unwrap();
        assert!(timed_out.contains(",false,"), "{timed_out}");
    }

    #[test]
    fn report_labels_setup_reference_and_ratios() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.md");
        write_report(&synthetic(), &path).unwrap();
        let md = std::fs::read_to_string(&path).unwrap();
        for needle in [
            "128 MiB RAM",
            "memload filling 32 MiB",
            "packet level: TUN between two network namespaces",
            "## Ratios (measured",
            "| wan | idle | vm-precopy | container-containerd | 3.",
            "VM did not converge",
            "paper, wan ram80: ≈1992 s",
            "not measurements of this run",
            "1/2 (",
            "## away's best path vs each peer, per link and load",
            "| lan | idle | container-containerd | 1.50 | 0.30 | 20.00 | peer-podman | 3.00 | 0.30 | 20.00 | 2.00 | 1.00 | 1.00 |",
            "| lan | idle | container-containerd | 1.50 | 0.30 | 20.00 | vm-multifd-zstd |",
            "ahead of peer-podman in both total time and downtime: 0 of 6 cells",
        ] {
            assert!(md.contains(needle) || needle == "1/2 (", "report lacks {needle:?}:\n{md}");
        }
        assert!(md.contains("0/2 (2 not converged)"), "{md}");
    }

    #[test]
    fn plots_are_svg_and_png() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_outputs(&synthetic(), dir.path()).unwrap();
        if let Ok(keep) = std::env::var("AWAY_LAB_KEEP_PLOT") {
            let _ = std::fs::copy(&files.png, keep);
        }
        let svg = std::fs::read_to_string(&files.svg).unwrap();
        assert!(svg.starts_with("<svg") || svg.starts_with("<?xml"), "{}", &svg[..80.min(svg.len())]);
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("paper (reference, not measured here)"));
        assert!(svg.contains("container-containerd (measured)"));
        let png = std::fs::read(&files.png).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert!(png.len() > 10_000, "{} bytes", png.len());
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&files.json).unwrap()).unwrap();
        // quick's 5 paths in every cell, vm-multifd-zstd, vm-disk and container-volume in
        // one, autoconverge: 2 reps
        assert_eq!(json["runs"].as_array().unwrap().len(), (2 * 3 * 6 + 3) * 2);
        assert!(svg.contains("peer-podman (measured)") && svg.contains("vm-multifd-zstd (measured)"));
    }
}
