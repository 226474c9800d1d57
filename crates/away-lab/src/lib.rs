//! The comparison experiment behind `away lab compare`: the same app (`memload`) under
//! the same loads, moved as a QEMU VM (pre-copy, auto-converge, post-copy, multifd with
//! zstd) and as a container (containerd, Docker: stop-and-copy, the mode away offers for
//! them), beside a peer (Podman's checkpoint export / restore import), through an
//! emulated link (the research's LAN and WAN). It records total time,
//! downtime, bytes on the wire and whether the move finished, and writes a CSV, plots
//! in the layout of the paper's Fig. 3 and a Markdown report.
//!
//! Measured numbers and the paper's reference numbers are kept apart: the reference
//! values live in [`reference`] and are always printed with the label "paper".
//!
//! Run time on a 2-core TCG host: the quick profile without the peers (24 runs) took
//! 298-301 s, measured (`cargo test -p away-e2e --test lab`); the peers add 7 runs (see
//! docs/testing.md). The full profile (2 links × 9 loads × 10 paths × 2 repetitions =
//! 360 runs, 256 MiB VM, 128 MiB app; on QEMU 10.0 the 36 vm-multifd-zstd-postcopy runs
//! fail at once, QEMU refusing the pair): see docs/results; its upper
//! bound from [`CompareOptions::estimate`] is dominated by VM runs under RAM load
//! over the WAN that run into their time limit (3 × VM RAM / rate = 174 s each).

mod container;
pub mod link;
pub mod merge;
mod output;
mod overlay;
mod peer;
pub mod reference;
mod vm;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use away_link::LinkProfile;
use away_model::{ByteSize, RuntimeKind};
use serde::{Deserialize, Serialize};

pub use link::{LinkEmulator, LinkFront, PacketSides};
pub use merge::{check_out_dir, load_results, merge_dirs, MergeSource, SourceSummary};
pub use output::{write_csv, write_outputs, write_plots, write_report, OutputFiles, CSV_HEADER};
pub use vm::LinkedVmTarget;

/// Round trips a container move needs besides the data: TCP connect, hello/resume,
/// done/verdict.
pub const CONTAINER_ROUND_TRIPS: u32 = 3;
/// Round trips a VM move needs besides the data: TCP connect, and the destination's
/// answer at the end of the stream.
pub const VM_ROUND_TRIPS: u32 = 2;
/// Round trips of the Podman peer besides the data: the archive's TCP connect (the
/// restore starts on the target when the stream ends).
pub const PEER_ROUND_TRIPS: u32 = 1;

/// One of the research's links.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkKind {
    /// 938 Mbit/s net (1 Gbit/s Ethernet), negligible delay.
    Lan,
    /// 37 Mbit/s with 36.784 ms one-way delay.
    Wan,
}

impl LinkKind {
    pub const ALL: [LinkKind; 2] = [LinkKind::Lan, LinkKind::Wan];

    pub fn name(self) -> &'static str {
        match self {
            LinkKind::Lan => "lan",
            LinkKind::Wan => "wan",
        }
    }

    pub fn profile(self) -> LinkProfile {
        match self {
            LinkKind::Lan => LinkProfile::lan(),
            LinkKind::Wan => LinkProfile::wan(),
        }
    }

    /// e.g. `wan (37 Mbit/s, 36.784 ms one way)`.
    pub fn describe(self) -> String {
        let p = self.profile();
        format!("{} ({} Mbit/s, {} ms one way)", self.name(), p.rate_bits_per_sec / 1e6, p.delay.as_secs_f64() * 1000.0)
    }
}

impl fmt::Display for LinkKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LinkKind {
    type Err = LabError;
    fn from_str(s: &str) -> Result<Self, LabError> {
        match s {
            "lan" => Ok(LinkKind::Lan),
            "wan" => Ok(LinkKind::Wan),
            _ => Err(invalid("links", format!("unknown link {s:?} (lan, wan)"))),
        }
    }
}

/// The load the app puts on the workload: idle, CPU busy percent, or a share of its
/// memory rewritten continuously.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Load {
    Idle,
    Cpu(u8),
    Ram(u8),
}

impl Load {
    /// The paper's load levels, in the order of Fig. 3.
    pub const ALL: [Load; 9] = [
        Load::Idle,
        Load::Cpu(25),
        Load::Cpu(50),
        Load::Cpu(80),
        Load::Cpu(100),
        Load::Ram(25),
        Load::Ram(50),
        Load::Ram(80),
        Load::Ram(100),
    ];

    pub fn name(self) -> String {
        match self {
            Load::Idle => "idle".into(),
            Load::Cpu(p) => format!("cpu{p}"),
            Load::Ram(p) => format!("ram{p}"),
        }
    }

    /// `(MEMLOAD_CPU, MEMLOAD_RAM)`.
    pub fn memload_env(self) -> (u8, u8) {
        match self {
            Load::Idle => (0, 0),
            Load::Cpu(p) => (p, 0),
            Load::Ram(p) => (0, p),
        }
    }
}

impl fmt::Display for Load {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl FromStr for Load {
    type Err = LabError;
    fn from_str(s: &str) -> Result<Self, LabError> {
        let bad = || invalid("loads", format!("unknown load {s:?} (idle, cpuN, ramN with N in 1..=100)"));
        let pct = |p: &str| p.parse::<u8>().ok().filter(|p| (1..=100).contains(p));
        if s == "idle" {
            Ok(Load::Idle)
        } else if let Some(p) = s.strip_prefix("cpu") {
            pct(p).map(Load::Cpu).ok_or_else(bad)
        } else if let Some(p) = s.strip_prefix("ram") {
            pct(p).map(Load::Ram).ok_or_else(bad)
        } else {
            Err(bad())
        }
    }
}

/// How the app moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum MigrationPath {
    /// QEMU pre-copy live migration, QEMU's defaults.
    VmPrecopy,
    /// Pre-copy with `auto-converge` (vCPU throttling).
    VmAutoConverge,
    /// Pre-copy, switching to post-copy after the first pass.
    VmPostcopy,
    /// containerd → containerd, CRIU stop-and-copy, streamed: the pages go from CRIU's
    /// page server into the target's images while the rest travels (`--mode stop-copy`).
    ContainerContainerd,
    /// containerd → containerd, CRIU stop-and-copy staged: checkpoint on disk, then
    /// transfer, then restore (`--mode staged`).
    ContainerStaged,
    /// Docker → Docker, CRIU stop-and-copy through away's transfer protocol.
    ContainerDocker,
    /// containerd → containerd, lazy (post-copy): restored at once, CRIU lazy pages
    /// through away's compressing page relay (`away migrate --mode lazy`).
    ContainerLazy,
    /// QEMU pre-copy with multifd (2 channels) and zstd level 1 on each channel.
    VmMultifdZstd,
    /// The same, switching to post-copy after the first pass. QEMU 10.0 refuses
    /// multifd with post-copy ("Postcopy is not yet compatible with multifd"); the lab
    /// asks QEMU once and records its answer in each run of this path.
    VmMultifdZstdPostcopy,
    /// VM pre-copy with a writable disk (an empty ext4 on a qcow2 base both nodes hold)
    /// that memload writes to at `disk_rate`: the disk's overlay is mirrored over NBD
    /// (`blockdev-mirror`) while RAM migrates, no shared storage (docs/vm.md).
    VmDisk,
    /// containerd → containerd streamed, as `container-containerd`, with a volume that
    /// memload writes to at `disk_rate`: the volume moves with it.
    ContainerVolume,
    /// The peer: Podman (not away). `podman container checkpoint --export --compress=zstd`
    /// on the source, the archive sent over the link, `podman container restore --import`
    /// on the target.
    PeerPodman,
}

impl MigrationPath {
    pub const ALL: [MigrationPath; 12] = [
        MigrationPath::VmPrecopy,
        MigrationPath::VmAutoConverge,
        MigrationPath::VmPostcopy,
        MigrationPath::VmMultifdZstd,
        MigrationPath::VmMultifdZstdPostcopy,
        MigrationPath::ContainerContainerd,
        MigrationPath::ContainerStaged,
        MigrationPath::ContainerDocker,
        MigrationPath::ContainerLazy,
        MigrationPath::VmDisk,
        MigrationPath::ContainerVolume,
        MigrationPath::PeerPodman,
    ];

    pub fn name(self) -> &'static str {
        match self {
            MigrationPath::VmPrecopy => "vm-precopy",
            MigrationPath::VmAutoConverge => "vm-autoconverge",
            MigrationPath::VmPostcopy => "vm-postcopy",
            MigrationPath::ContainerContainerd => "container-containerd",
            MigrationPath::ContainerStaged => "container-staged",
            MigrationPath::ContainerDocker => "container-docker",
            MigrationPath::ContainerLazy => "container-lazy",
            MigrationPath::VmMultifdZstd => "vm-multifd-zstd",
            MigrationPath::VmMultifdZstdPostcopy => "vm-multifd-zstd-postcopy",
            MigrationPath::VmDisk => "vm-disk",
            MigrationPath::ContainerVolume => "container-volume",
            MigrationPath::PeerPodman => "peer-podman",
        }
    }

    pub fn is_vm(self) -> bool {
        matches!(
            self,
            MigrationPath::VmPrecopy
                | MigrationPath::VmAutoConverge
                | MigrationPath::VmPostcopy
                | MigrationPath::VmMultifdZstd
                | MigrationPath::VmMultifdZstdPostcopy
                | MigrationPath::VmDisk
        )
    }

    /// `--overlay on` runs it with the workload on the lab's VXLAN overlay: the VMs (a
    /// tap on the bridge) and away's containerd paths (Docker's containers are not on
    /// the overlay, nor is the peer).
    pub fn runs_on_overlay(self) -> bool {
        self.is_vm() || (self.is_away_container() && self != MigrationPath::ContainerDocker)
    }

    /// The app writes files at `disk_rate` (to the VM's disk or the container's volume).
    pub fn writes_disk(self) -> bool {
        matches!(self, MigrationPath::VmDisk | MigrationPath::ContainerVolume)
    }

    /// A tool other than away moves the app (the peers of the comparison).
    pub fn is_peer(self) -> bool {
        self == MigrationPath::PeerPodman
    }

    /// One of away's container paths.
    pub fn is_away_container(self) -> bool {
        !self.is_vm() && !self.is_peer()
    }

    /// The migration mode, for the report.
    pub fn mode(self) -> &'static str {
        match self {
            MigrationPath::VmPrecopy => "qemu pre-copy",
            MigrationPath::VmAutoConverge => "qemu pre-copy + auto-converge",
            MigrationPath::VmPostcopy => "qemu pre-copy, post-copy after pass 1",
            MigrationPath::ContainerContainerd => "criu stop-and-copy streamed (page server), zstd:1",
            MigrationPath::ContainerStaged | MigrationPath::ContainerDocker => "criu stop-and-copy staged, zstd:1",
            MigrationPath::ContainerLazy => "criu lazy pages (post-copy), zstd:1 page stream",
            MigrationPath::VmMultifdZstd => "qemu pre-copy, multifd 2 channels, zstd:1",
            MigrationPath::VmMultifdZstdPostcopy => "qemu pre-copy, multifd 2 channels, zstd:1, post-copy after pass 1",
            MigrationPath::VmDisk => "qemu pre-copy, disk overlay mirrored over nbd (blockdev-mirror)",
            MigrationPath::ContainerVolume => "criu stop-and-copy streamed (page server), zstd:1, with a volume",
            MigrationPath::PeerPodman => "podman checkpoint --export --compress=zstd, archive sent, restore --import",
        }
    }

    fn round_trips(self) -> u32 {
        if self.is_vm() {
            VM_ROUND_TRIPS
        } else if self.is_peer() {
            PEER_ROUND_TRIPS
        } else {
            CONTAINER_ROUND_TRIPS
        }
    }
}

impl fmt::Display for MigrationPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for MigrationPath {
    type Err = LabError;
    fn from_str(s: &str) -> Result<Self, LabError> {
        MigrationPath::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| {
            invalid("paths", format!("unknown path {s:?} ({})", MigrationPath::ALL.map(|p| p.name()).join(", ")))
        })
    }
}

/// What `away lab compare` runs. Build it with [`CompareOptions::quick`] or
/// [`CompareOptions::full`] and change fields as the flags say.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompareOptions {
    pub links: Vec<LinkKind>,
    pub loads: Vec<Load>,
    pub paths: Vec<MigrationPath>,
    /// Runs per (link, load, path).
    pub repetitions: u32,
    /// The VM's memory.
    pub vm_ram: ByteSize,
    /// The memory memload fills (in the VM and in the container alike).
    pub app_ram: ByteSize,
    /// Where results.csv, results.json, report.md and the plots go.
    pub out_dir: PathBuf,
    /// The quick profile (recorded in the report).
    pub quick: bool,
    /// The memload image tar (`away image build images/memload -o DIR`).
    pub image: PathBuf,
    /// The `away` binary: the target agents and the container runs are `away` processes.
    pub away_bin: PathBuf,
    /// Node state of the runs (two per run: source and target), removed after each run.
    /// Keep it short: QMP socket paths are limited to 108 bytes.
    pub work_dir: PathBuf,
    /// How the link is emulated.
    pub link_emulator: LinkEmulator,
    /// A VM migration still running after `factor × VM RAM / link rate` (at least
    /// `vm_timeout_min`) is cancelled and recorded as not converged.
    pub vm_timeout_factor: f64,
    pub vm_timeout_min: Duration,
    /// memload CPU threads (1: the VM has one vCPU, the container gets the same).
    pub cpu_threads: u32,
    /// Paths that run only in some cells: (path, its links, its loads). A path not
    /// listed runs in every cell. The quick profile keeps its slow VM peer to one cell.
    #[serde(default)]
    pub limited: Vec<(MigrationPath, Vec<LinkKind>, Vec<Load>)>,
    /// What carries away's moves between the two nodes: mutual TLS with node identities
    /// (what away does) or plaintext (for measuring what TLS costs).
    #[serde(default)]
    pub channels: Channels,
    /// Bytes per second memload writes to files in the `vm-disk` and
    /// `container-volume` paths (its disk or its volume).
    #[serde(default = "default_disk_rate")]
    pub disk_rate: ByteSize,
    /// Run each VM path and away's containerd paths without (`false`) and/or with
    /// (`true`) the workload on a VXLAN overlay between the two nodes (its own namespace
    /// or tap, address and MAC, moved with it; docs/network.md). The others run without.
    #[serde(default = "no_overlay")]
    pub overlays: Vec<bool>,
}

fn no_overlay() -> Vec<bool> {
    vec![false]
}

/// 1 MiB/s: a database's log under steady load; a fifth of the WAN's rate.
fn default_disk_rate() -> ByteSize {
    ByteSize::mib(1)
}

/// The channels between the lab's two nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Channels {
    /// Node identities from a CA the lab makes: container moves over away's mutual TLS
    /// channels, VM moves over QEMU's TLS (`tls-creds-x509`).
    #[default]
    Tls,
    /// `--insecure-plaintext-channels` on the target, plain TCP for QEMU.
    Plaintext,
}

impl Channels {
    pub fn name(self) -> &'static str {
        match self {
            Channels::Tls => "tls",
            Channels::Plaintext => "plaintext",
        }
    }

    /// How the report names it.
    pub fn describe(self) -> &'static str {
        match self {
            Channels::Tls => "mutual TLS (node identities from the lab's CA; QEMU tls-creds-x509 for VMs)",
            Channels::Plaintext => "plaintext (--insecure-plaintext-channels; plain TCP for QEMU)",
        }
    }
}

impl FromStr for Channels {
    type Err = LabError;
    fn from_str(s: &str) -> Result<Self, LabError> {
        match s {
            "tls" => Ok(Channels::Tls),
            "plaintext" => Ok(Channels::Plaintext),
            _ => Err(invalid("channels", format!("unknown channels {s:?} (tls, plaintext)"))),
        }
    }
}

/// The lab's two node identities (source and target), from a CA made for this run in
/// its work directory (0700, key 0600), removed with it.
pub struct LabIdentities {
    pub source: std::sync::Arc<away_identity::Identity>,
    pub target: std::sync::Arc<away_identity::Identity>,
}

impl LabIdentities {
    pub const SOURCE: &'static str = "lab-source";
    pub const TARGET: &'static str = "lab-target";

    fn create(work: &std::path::Path) -> Result<LabIdentities, LabError> {
        let fail = |source| LabError::Identity { dir: work.join("ca"), source };
        let ca = away_identity::Ca::load_or_create(&work.join("ca")).map_err(fail)?;
        Ok(LabIdentities {
            source: std::sync::Arc::new(ca.issue_self(Self::SOURCE, &[]).map_err(fail)?),
            target: std::sync::Arc::new(ca.issue_self(Self::TARGET, &[]).map_err(fail)?),
        })
    }
}

impl CompareOptions {
    /// Everything: 2 links × 9 loads × 12 paths × 2 repetitions = 432 runs, 256 MiB VM,
    /// 128 MiB app; a VM run that has not finished after 3 × VM RAM / rate counts as not
    /// converged. A 2-core TCG host took about 2 h 25 min for the 7 paths before the peers
    /// (docs/results/README.md).
    pub fn full(image: PathBuf, away_bin: PathBuf, out_dir: PathBuf) -> Self {
        CompareOptions {
            links: LinkKind::ALL.to_vec(),
            loads: Load::ALL.to_vec(),
            paths: MigrationPath::ALL.to_vec(),
            repetitions: 2,
            vm_ram: ByteSize::mib(256),
            app_ram: ByteSize::mib(128),
            out_dir,
            quick: false,
            image,
            away_bin,
            work_dir: PathBuf::from("/var/tmp/away-lab"),
            link_emulator: LinkEmulator::Packet,
            vm_timeout_factor: 3.0,
            vm_timeout_min: Duration::from_secs(60),
            cpu_threads: 1,
            limited: Vec::new(),
            channels: Channels::Tls,
            disk_rate: default_disk_rate(),
            overlays: no_overlay(),
        }
    }

    /// For CI: 128 MiB VM, 32 MiB app, idle / ram50, LAN and WAN, VM pre-copy,
    /// containerd (stop-and-copy and lazy), Docker and the Podman peer, one repetition;
    /// VM multifd + zstd, the VM with a disk and the container with a volume only on
    /// the LAN, idle (a VM boot per run is what costs).
    pub fn quick(image: PathBuf, away_bin: PathBuf, out_dir: PathBuf) -> Self {
        CompareOptions {
            // (cpu50 left out: a busy CPU dirties little memory, and CI's time is short)
            loads: vec![Load::Idle, Load::Ram(50)],
            paths: vec![
                MigrationPath::VmPrecopy,
                MigrationPath::VmMultifdZstd,
                MigrationPath::ContainerContainerd,
                MigrationPath::ContainerDocker,
                MigrationPath::ContainerLazy,
                MigrationPath::VmDisk,
                MigrationPath::ContainerVolume,
                MigrationPath::PeerPodman,
            ],
            limited: [MigrationPath::VmMultifdZstd, MigrationPath::VmDisk, MigrationPath::ContainerVolume]
                .map(|p| (p, vec![LinkKind::Lan], vec![Load::Idle]))
                .to_vec(),
            repetitions: 1,
            vm_ram: ByteSize::mib(128),
            app_ram: ByteSize::mib(32),
            quick: true,
            vm_timeout_factor: 2.0,
            vm_timeout_min: Duration::from_secs(30),
            ..CompareOptions::full(image, away_bin, out_dir)
        }
    }

    /// Refuse options that cannot run, naming the field.
    pub fn validate(&self) -> Result<(), LabError> {
        if self.links.is_empty() {
            return Err(invalid("links", "at least one link is needed"));
        }
        if self.loads.is_empty() {
            return Err(invalid("loads", "at least one load is needed"));
        }
        if self.paths.is_empty() {
            return Err(invalid("paths", "at least one path is needed"));
        }
        if self.repetitions == 0 {
            return Err(invalid("repetitions", "must be at least 1"));
        }
        if self.overlays.is_empty() {
            return Err(invalid("overlay", "say off, on or both"));
        }
        if self.overlays.contains(&true) && self.link_emulator != LinkEmulator::Packet {
            return Err(invalid(
                "overlay",
                "the overlay needs the packet link (its VXLAN crosses it between the nodes)",
            ));
        }
        if self.app_ram.bytes() == 0 {
            return Err(invalid("app_ram", "must be more than 0"));
        }
        if self.paths.iter().any(|p| p.is_vm()) && self.app_ram.bytes() + 64 * 1024 * 1024 > self.vm_ram.bytes() {
            return Err(invalid(
                "vm_ram",
                format!(
                    "{} MiB leaves less than 64 MiB beside the app's {} MiB for the guest kernel",
                    self.vm_ram.as_mib(),
                    self.app_ram.as_mib()
                ),
            ));
        }
        if self.vm_timeout_factor.is_nan() || self.vm_timeout_factor < 1.0 {
            return Err(invalid("vm_timeout_factor", "must be at least 1"));
        }
        for l in &self.loads {
            let (cpu, ram) = l.memload_env();
            if cpu > 100 || ram > 100 {
                return Err(invalid("loads", format!("{l}: percent above 100")));
            }
        }
        Ok(())
    }

    /// The runs in order: link, load, repetition, path (so the paths of one point run
    /// close together in time).
    pub fn plan(&self) -> Vec<PlannedRun> {
        let mut runs = Vec::new();
        for &link in &self.links {
            for &load in &self.loads {
                for rep in 1..=self.repetitions {
                    for &path in self.paths.iter().filter(|p| self.runs_in(**p, link, load)) {
                        for &overlay in self.overlays.iter().filter(|o| !**o || path.runs_on_overlay()) {
                            runs.push(PlannedRun { run: runs.len() as u32 + 1, path, link, load, rep, overlay });
                        }
                    }
                }
            }
        }
        runs
    }

    /// Whether `path` runs at `link` and `load` (see `limited`).
    pub fn runs_in(&self, path: MigrationPath, link: LinkKind, load: Load) -> bool {
        self.limited
            .iter()
            .filter(|(p, _, _)| *p == path)
            .all(|(_, links, loads)| links.contains(&link) && loads.contains(&load))
    }

    /// The time limit of one VM migration over `link`.
    pub fn vm_timeout(&self, link: LinkKind) -> Duration {
        let wire = link.profile().wire_time(self.vm_ram.bytes()).mul_f64(self.vm_timeout_factor);
        wire.max(self.vm_timeout_min)
    }

    /// A rough upper bound of the run time on a 2-core TCG host: VM boot and fill, the
    /// time limit for VM runs that may not converge (RAM load over the WAN), and the
    /// container runs' start, fill and transfer. Not a measurement.
    pub fn estimate(&self) -> Duration {
        let mut total = Duration::ZERO;
        for r in self.plan() {
            let p = r.link.profile();
            total += if r.path.is_vm() {
                let boot = Duration::from_secs(20);
                let copy = p.wire_time(self.vm_ram.bytes());
                let ram_load = matches!(r.load, Load::Ram(_));
                boot + if ram_load { self.vm_timeout(r.link) } else { copy.mul_f64(1.5) + Duration::from_secs(5) }
            } else {
                Duration::from_secs(12) + p.wire_time(self.app_ram.bytes() / 2).mul_f64(1.3)
            };
        }
        total
    }
}

/// One run of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedRun {
    /// 1-based sequence number.
    pub run: u32,
    pub path: MigrationPath,
    pub link: LinkKind,
    pub load: Load,
    /// 1-based repetition.
    pub rep: u32,
    /// The workload on the lab's VXLAN overlay.
    #[serde(default)]
    pub overlay: bool,
}

impl PlannedRun {
    pub fn label(&self) -> String {
        let overlay = if self.overlay { " overlay" } else { "" };
        format!("{} {} {}{overlay} #{}", self.path, self.link, self.load, self.rep)
    }
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A run's total time, the same for every path: from `start_ms` (the lab's clock just
/// before it starts the move: the command spawned, the call made) to `end_ms`, when the
/// workload runs on the target with all its state there (a lazy or post-copy move: when
/// its last page arrived). The commit and the source's cleanup that follow are not
/// part of it. None when the path did not say when it ended.
pub(crate) fn timed_total(start_ms: u64, end_ms: Option<u64>) -> Option<Duration> {
    end_ms.map(|end| Duration::from_millis(end.saturating_sub(start_ms)))
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunOutcome {
    /// The workload runs on the target.
    Moved,
    /// The migration hit its time limit and was cancelled; the workload runs on the source.
    NotConverged,
    /// Something else failed (see notes); the numbers may be partial or zero.
    Failed,
}

/// What one run measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub run: u32,
    pub path: MigrationPath,
    pub link: LinkKind,
    pub load: Load,
    pub rep: u32,
    /// The workload was on the lab's VXLAN overlay.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub overlay: bool,
    pub outcome: RunOutcome,
    /// From the lab starting the move (its command or call) to the workload running on
    /// the target with all its state (lazy, post-copy: its last page), timed the same
    /// way for every path ([`timed_total`]); the commit and the source's cleanup after
    /// it are not included. When it did not converge: to the cancel.
    pub total_s: f64,
    /// VM: source STOP → destination RESUME; container: CRIU's freeze → restored (the verdict's trip back excluded).
    pub downtime_s: Option<f64>,
    /// Lazy moves: running on the target while pages still arrived.
    #[serde(default)]
    pub degraded_s: Option<f64>,
    /// Under a RAM load: how long after the resume memload wrote below 90 % of its
    /// rate before the move (the app's own view of "degraded").
    #[serde(default)]
    pub slowed_s: Option<f64>,
    pub bytes_wire: u64,
    pub bytes_raw: u64,
    /// Lazy and streamed container moves: the part of `bytes_raw` that went over CRIU's
    /// page link (a lazy move whose dump left nothing lazy has none). JSON only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paged_bytes_raw: Option<u64>,
    /// bytes on the wire / link rate + round trips.
    pub limit_s: f64,
    /// total / limit, when the move finished.
    pub total_over_limit: Option<f64>,
    /// What the prediction model said before the move (the report's `predicted`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted: Option<away_model::MovePrediction>,
    /// `vm-disk` and `container-volume`: the part of `bytes_wire` that was the disk's
    /// blocks (mirrored over NBD) or the volume's files (before compression); the rest
    /// is memory and the other state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
    /// On the overlay: from the resume to the first ICMP echo the moved workload
    /// answered the source node (the report's `network.follow_millis`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_follow_s: Option<f64>,
    pub notes: String,
}

impl RunResult {
    pub fn converged(&self) -> bool {
        self.outcome == RunOutcome::Moved
    }

    /// A result for `planned` from the raw numbers; the limit is computed here.
    pub fn new(planned: &PlannedRun, outcome: RunOutcome, total: Duration, downtime: Option<Duration>) -> Self {
        RunResult {
            run: planned.run,
            path: planned.path,
            link: planned.link,
            load: planned.load,
            rep: planned.rep,
            overlay: planned.overlay,
            outcome,
            total_s: total.as_secs_f64(),
            downtime_s: downtime.map(|d| d.as_secs_f64()),
            degraded_s: None,
            slowed_s: None,
            bytes_wire: 0,
            bytes_raw: 0,
            paged_bytes_raw: None,
            limit_s: 0.0,
            total_over_limit: None,
            predicted: None,
            disk_bytes: None,
            network_follow_s: None,
            notes: String::new(),
        }
        .with_bytes(0, 0)
    }

    pub fn with_degraded(mut self, degraded: Option<Duration>) -> Self {
        self.degraded_s = degraded.map(|d| d.as_secs_f64());
        self
    }

    pub fn with_paged(mut self, paged: u64) -> Self {
        self.paged_bytes_raw = (paged > 0).then_some(paged);
        self
    }

    pub fn with_slowed(mut self, slowed: Option<Duration>) -> Self {
        self.slowed_s = slowed.map(|d| d.as_secs_f64());
        self
    }

    /// Set the byte counts and recompute the physical limit.
    pub fn with_bytes(mut self, wire: u64, raw: u64) -> Self {
        self.bytes_wire = wire;
        self.bytes_raw = raw;
        let p = self.link.profile();
        self.limit_s = (p.wire_time(wire) + p.rtt() * self.path.round_trips()).as_secs_f64();
        self.total_over_limit =
            (self.converged() && self.limit_s > 0.0 && wire > 0).then(|| self.total_s / self.limit_s);
        self
    }

    pub fn with_follow(mut self, follow_ms: Option<u64>) -> Self {
        self.network_follow_s = follow_ms.map(|ms| ms as f64 / 1e3);
        self
    }

    pub fn with_disk(mut self, disk: Option<u64>) -> Self {
        self.disk_bytes = disk;
        self
    }

    pub fn with_predicted(mut self, predicted: Option<away_model::MovePrediction>) -> Self {
        self.predicted = predicted;
        self
    }

    /// (predicted − measured) ÷ measured total time, when both are there and it moved.
    pub fn total_error(&self) -> Option<f64> {
        let p = self.predicted.as_ref().filter(|p| p.converges)?;
        (self.converged() && self.total_s > 0.0).then(|| (p.total_ms as f64 / 1e3 - self.total_s) / self.total_s)
    }

    /// (predicted − measured) ÷ measured downtime.
    pub fn downtime_error(&self) -> Option<f64> {
        let p = self.predicted.as_ref().filter(|p| p.converges)?;
        let d = self.downtime_s.filter(|d| *d > 0.0 && self.converged())?;
        Some((p.downtime_ms as f64 / 1e3 - d) / d)
    }

    pub fn with_notes(mut self, notes: impl Into<String>) -> Self {
        self.notes = notes.into();
        self
    }
}

/// The setup the numbers were measured with, printed beside them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabSetup {
    pub quick: bool,
    pub vm_ram_bytes: u64,
    pub app_ram_bytes: u64,
    pub vm_vcpus: u32,
    pub cpu_threads: u32,
    pub repetitions: u32,
    pub links: Vec<String>,
    pub link_emulator: String,
    pub qemu_accel: Option<String>,
    pub host_cpus: usize,
    pub vm_timeouts: Vec<(String, f64)>,
    pub container_compression: String,
    /// `tls` or `plaintext` (results from before the field: plaintext).
    #[serde(default = "plaintext_before_tls")]
    pub channels: String,
    pub started_unix: u64,
    /// Bytes per second memload wrote to its disk or volume, when a path had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_rate_bytes: Option<u64>,
    /// `away lab merge`: the runs each source gave (empty for one `compare`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceSummary>,
}

fn plaintext_before_tls() -> String {
    Channels::Plaintext.name().into()
}

/// Everything `compare` measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabResults {
    pub setup: LabSetup,
    pub loads: Vec<Load>,
    pub paths: Vec<MigrationPath>,
    pub runs: Vec<RunResult>,
    pub wall_s: f64,
}

/// Where the experiment is, for a progress bar.
#[derive(Debug, Clone, PartialEq)]
pub struct LabProgress {
    /// Runs finished.
    pub done: usize,
    pub total: usize,
    /// The run in progress, e.g. `vm-precopy wan ram50 #1`.
    pub current: String,
    /// What it is doing (boot, fill, migrate: 40 %, ...).
    pub status: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("invalid lab options: {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("plot {path}: {reason}")]
    Plot { path: PathBuf, reason: String },
    #[error("{what} is missing: {hint}")]
    Missing { what: String, hint: String },
    #[error("{path}: {reason}")]
    Results { path: PathBuf, reason: String },
    #[error("make the lab's node identities in {dir}")]
    Identity {
        dir: PathBuf,
        #[source]
        source: away_identity::IdentityError,
    },
}

fn invalid(field: &str, reason: impl Into<String>) -> LabError {
    LabError::Invalid { field: field.into(), reason: reason.into() }
}

fn io_err(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> LabError {
    let path = path.into();
    move |source| LabError::Io { action, path, source }
}

/// Set by [`stop_after_current_run`]: the experiment ends after the run in progress
/// (cleaned up as usual) and writes its outputs for the runs it has.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Ask a running [`compare`] to stop after its current run (e.g. on Ctrl-C): killing it
/// mid-run would leave that run's VM, namespaces and containers behind.
pub fn stop_after_current_run() {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Container paths run on this host's containerd and Docker: refuse to start hours of
/// runs when one of them is down (each of its runs would only record the same failure).
async fn preflight_container_runtimes(paths: &[MigrationPath]) -> Result<(), LabError> {
    let kinds: Vec<RuntimeKind> = paths
        .iter()
        .filter_map(|p| match p {
            MigrationPath::ContainerContainerd | MigrationPath::ContainerStaged | MigrationPath::ContainerLazy => {
                Some(RuntimeKind::Containerd)
            }
            MigrationPath::ContainerDocker => Some(RuntimeKind::Docker),
            _ => None,
        })
        .collect();
    if paths.contains(&MigrationPath::PeerPodman) {
        peer::preflight().await?;
    }
    if kinds.is_empty() {
        return Ok(());
    }
    let node = away_runtime::LocalNode::open(away_runtime::NodeOptions::default()).await;
    for info in node.health().await.into_iter().filter(|i| kinds.contains(&i.kind)) {
        if !info.healthy || !info.checkpoint {
            return Err(LabError::Missing {
                what: format!("{} with checkpoint/restore ({})", info.kind, info.detail),
                hint: "start the daemons with `deploy/services.sh start`, check with `away doctor`, or leave \
                       its path out with --paths"
                    .into(),
            });
        }
    }
    Ok(())
}

/// Run the experiment: every planned run in turn, the CSV rewritten after each (so an
/// interrupted experiment keeps what it measured), then the plots and the report.
/// A run that fails is recorded as failed (with the reason in its notes) and the
/// experiment goes on.
pub async fn compare(
    opts: CompareOptions,
    progress: impl Fn(&LabProgress) + Send + Sync,
) -> Result<LabResults, LabError> {
    opts.validate()?;
    for (what, path, hint) in [
        ("memload image", &opts.image, "build it with `away image build images/memload -o DIR`"),
        ("away binary", &opts.away_bin, "build it with `cargo build -p away`"),
    ] {
        if !path.is_file() {
            return Err(LabError::Missing { what: format!("{what} {}", path.display()), hint: hint.into() });
        }
    }
    preflight_container_runtimes(&opts.paths).await?;
    std::fs::create_dir_all(&opts.out_dir).map_err(io_err("create", &opts.out_dir))?;
    let work = opts.work_dir.join(std::process::id().to_string());
    std::fs::create_dir_all(&work).map_err(io_err("create", &work))?;
    let t0 = Instant::now();
    let plan = opts.plan();
    let total = plan.len();
    let report = |done: usize, current: String, status: String| progress(&LabProgress { done, total, current, status });

    let identities = match opts.channels {
        Channels::Tls => Some(LabIdentities::create(&work)?),
        Channels::Plaintext => None,
    };
    let vm_lab = if plan.iter().any(|r| r.path.is_vm()) {
        report(0, "setup".into(), "probing qemu".into());
        Some(vm::VmLab::new(&opts, &work).await?)
    } else {
        None
    };
    let peer_lab = if plan.iter().any(|r| r.path == MigrationPath::PeerPodman) {
        report(0, "setup".into(), "loading the image into the podman stores".into());
        Some(peer::PodmanLab::new(&opts, &work).await?)
    } else {
        None
    };
    let mut results = LabResults {
        setup: LabSetup {
            quick: opts.quick,
            vm_ram_bytes: opts.vm_ram.bytes(),
            app_ram_bytes: opts.app_ram.bytes(),
            vm_vcpus: 1,
            cpu_threads: opts.cpu_threads,
            repetitions: opts.repetitions,
            links: opts.links.iter().map(|l| l.describe()).collect(),
            link_emulator: opts.link_emulator.label().into(),
            qemu_accel: vm_lab.as_ref().map(|v| v.accel_reason()),
            host_cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            vm_timeouts: opts.links.iter().map(|l| (l.name().to_string(), opts.vm_timeout(*l).as_secs_f64())).collect(),
            container_compression: container::COMPRESSION.into(),
            channels: opts.channels.name().into(),
            disk_rate_bytes: opts.paths.iter().any(|p| p.writes_disk()).then(|| opts.disk_rate.bytes()),
            started_unix: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            sources: Vec::new(),
        },
        loads: opts.loads.clone(),
        paths: opts.paths.clone(),
        runs: Vec::new(),
        wall_s: 0.0,
    };
    for planned in &plan {
        if STOP.load(std::sync::atomic::Ordering::SeqCst) {
            tracing::warn!("stopping early as asked: {} of {} runs done", results.runs.len(), plan.len());
            break;
        }
        let done = results.runs.len();
        let label = planned.label();
        let status = |s: String| report(done, label.clone(), s);
        status("starting".into());
        let result = if planned.path.is_vm() {
            match &vm_lab {
                Some(lab) => lab.run(&opts, planned, identities.as_ref(), &status).await,
                None => unreachable!("vm lab exists when a vm path is planned"),
            }
        } else if planned.path == MigrationPath::PeerPodman {
            match &peer_lab {
                Some(lab) => lab.run(&opts, planned, &status).await,
                None => unreachable!("podman lab exists when the podman path is planned"),
            }
        } else {
            container::run(&opts, &work, planned, identities.as_ref(), &status).await
        };
        tracing::info!(run = planned.run, "{label}: {:?} {:.2} s", result.outcome, result.total_s);
        status(format!("{:?} in {:.1} s", result.outcome, result.total_s));
        results.runs.push(result);
        results.wall_s = t0.elapsed().as_secs_f64();
        write_csv(&results, &OutputFiles::in_dir(&opts.out_dir).csv)?;
    }
    report(total, "outputs".into(), "writing csv, plots and report".into());
    if let Some(lab) = peer_lab {
        lab.remove().await;
    }
    let _ = std::fs::remove_dir_all(&work);
    results.wall_s = t0.elapsed().as_secs_f64();
    write_outputs(&results, &opts.out_dir)?;
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back() {
        for l in Load::ALL {
            assert_eq!(l.name().parse::<Load>().unwrap(), l);
        }
        for p in MigrationPath::ALL {
            assert_eq!(p.name().parse::<MigrationPath>().unwrap(), p);
        }
        for l in LinkKind::ALL {
            assert_eq!(l.name().parse::<LinkKind>().unwrap(), l);
        }
        assert!("ram0".parse::<Load>().is_err());
        assert!("cpu101".parse::<Load>().is_err());
        assert!("vm".parse::<MigrationPath>().is_err());
    }

    #[test]
    fn plan_and_limits() {
        let o = CompareOptions::quick("m.tar".into(), "away".into(), "out".into());
        o.validate().unwrap();
        let plan = o.plan();
        // 5 paths in every cell, vm-multifd-zstd, vm-disk and container-volume in one
        assert_eq!(plan.len(), 2 * 2 * 5 + 3);
        let multifd: Vec<_> = plan.iter().filter(|r| r.path == MigrationPath::VmMultifdZstd).collect();
        assert_eq!((multifd.len(), multifd[0].link, multifd[0].load), (1, LinkKind::Lan, Load::Idle));
        assert_eq!(plan[0].run, 1);
        // 128 MiB over 37 Mbit/s is 29 s on the wire; the quick limit is twice that.
        let t = o.vm_timeout(LinkKind::Wan).as_secs_f64();
        assert!((t - 2.0 * 134_217_728.0 * 8.0 / 37e6).abs() < 0.01, "{t}");
        assert_eq!(o.vm_timeout(LinkKind::Lan), Duration::from_secs(30));
        let wan_vm = plan.iter().find(|r| r.link == LinkKind::Wan && r.path == MigrationPath::VmPrecopy).unwrap();
        let r = RunResult::new(wan_vm, RunOutcome::Moved, Duration::from_secs(10), None).with_bytes(37_000_000 / 8, 0);
        assert_eq!(r.link, LinkKind::Wan);
        let expected = 1.0 + 2.0 * 0.073_568;
        assert!((r.limit_s - expected).abs() < 1e-6, "{}", r.limit_s);
        assert!((r.total_over_limit.unwrap() - 10.0 / expected).abs() < 1e-9);
        let timed_out =
            RunResult::new(wan_vm, RunOutcome::NotConverged, Duration::from_secs(60), None).with_bytes(1, 1);
        assert_eq!(timed_out.total_over_limit, None);
        let mut bad = o.clone();
        bad.vm_ram = ByteSize::mib(64);
        assert!(matches!(bad.validate(), Err(LabError::Invalid { field, .. }) if field == "vm_ram"));
    }
}
