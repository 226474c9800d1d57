//! `away lab compare`: the VM vs container migration experiment (see the away-lab crate);
//! `away lab merge`: several of its outputs as one.

use std::path::PathBuf;
use std::process::ExitCode;

use away_lab::{CompareOptions, LinkKind, Load, MergeSource, MigrationPath};
use away_model::ByteSize;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Migrate memload as a QEMU VM and as a container over emulated LAN and WAN links,
    /// under idle, CPU and RAM load, and compare: CSV, JSON, a Markdown report and the
    /// paper's Fig. 3 as SVG and PNG, with the paper's values as a labelled reference.
    ///
    /// The peers: peer-podman (Podman's checkpoint export / restore import over the same
    /// link) and vm-multifd-zstd (QEMU multifd with zstd; -postcopy where QEMU allows it).
    ///
    /// The quick profile (`--quick`: 128 MiB VM, 32 MiB app, 2 loads, 6 paths, 2 links)
    /// takes about 6-7 minutes on 2 cores; the full profile (256 MiB VM, 128 MiB app,
    /// 9 loads, 10 paths, 2 repetitions) takes about three hours (`--dry-run`
    /// prints an upper bound). Runs of a few paths can be combined afterwards with
    /// `away lab merge`.
    ///
    /// Examples:
    ///   away lab compare --quick --out docs/results/quick
    ///   away lab compare --links wan --loads idle,ram50 --paths vm-precopy,container-containerd --repetitions 3
    ///   away lab compare --links wan --loads idle --paths container-lazy --channels plaintext   # what TLS costs
    #[command(verbatim_doc_comment)]
    Compare(CompareArgs),
    /// Combine several `away lab compare` outputs into one experiment: one CSV, JSON,
    /// report and Fig. 3. Each series (path) comes from exactly one source, and the
    /// report lists every source with the paths taken from it and when it ran. The
    /// sources must share the app's memory, links, link emulation and host.
    ///
    /// Example: the VM series of a full run and the container series measured later:
    ///   away lab merge --out docs/results/full \
    ///     docs/results/vm-run=vm-precopy,vm-autoconverge,vm-postcopy lab-results
    #[command(verbatim_doc_comment)]
    Merge(MergeArgs),
}

#[derive(clap::Args)]
pub struct MergeArgs {
    /// Output directory
    #[arg(long)]
    out: PathBuf,
    /// An output directory of `away lab compare` (or its results.json), optionally with
    /// the paths to take from it: DIR=path,path
    #[arg(required = true, value_name = "SOURCE")]
    sources: Vec<MergeSource>,
}

#[derive(clap::Args)]
pub struct CompareArgs {
    /// The quick profile (for CI)
    #[arg(long)]
    quick: bool,
    /// Output directory
    #[arg(long, default_value = "lab-results")]
    out: PathBuf,
    /// The lab app's build context (memload)
    #[arg(long, default_value = "images/memload")]
    app: PathBuf,
    /// Links, comma separated: lan, wan
    #[arg(long, value_delimiter = ',')]
    links: Vec<LinkKind>,
    /// Loads, comma separated: idle, cpu25, cpu50, cpu80, cpu100, ram25, ram50, ram80, ram100
    #[arg(long, value_delimiter = ',')]
    loads: Vec<Load>,
    /// Paths, comma separated: vm-precopy, vm-autoconverge, vm-postcopy, vm-multifd-zstd,
    /// vm-multifd-zstd-postcopy, vm-disk (a VM with a disk it writes to, mirrored live),
    /// container-containerd (streamed stop-and-copy), container-staged, container-docker,
    /// container-lazy, container-volume (streamed, with a volume it writes to), peer-podman
    #[arg(long, value_delimiter = ',')]
    paths: Vec<MigrationPath>,
    /// Run away's container paths without (off) and/or with (on) the workload on a VXLAN
    /// overlay between the two nodes, its address moving with it; comma separated, e.g.
    /// off,on to see what the overlay costs. Needs the packet link
    #[arg(long, value_delimiter = ',', value_parser = ["off", "on"])]
    overlay: Vec<String>,
    /// What memload writes per second to its disk (vm-disk) or volume (container-volume),
    /// e.g. 1Mi
    #[arg(long)]
    disk_rate: Option<ByteSize>,
    /// Repetitions per point
    #[arg(long)]
    repetitions: Option<u32>,
    /// VM memory
    #[arg(long)]
    vm_ram: Option<ByteSize>,
    /// Memory memload fills (in the VM and the container alike)
    #[arg(long)]
    app_ram: Option<ByteSize>,
    /// How the link is emulated: packet (TUN between two network namespaces; the
    /// endpoints' TCP sees the real round trip) or proxy (split-TCP relay)
    #[arg(long, default_value = "packet", value_parser = ["packet", "proxy"])]
    link_emulator: String,
    /// What carries the moves between the two nodes: tls (node identities from a CA the
    /// lab makes; away's mutual TLS channels for containers, QEMU's TLS for VMs: what
    /// away does) or plaintext (to measure what TLS costs). Podman's runs are the same
    /// in both.
    #[arg(long, default_value = "tls")]
    channels: away_lab::Channels,
    /// Print the plan and its estimated run time, run nothing
    #[arg(long)]
    dry_run: bool,
}

pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Compare(a) => compare(a),
        Command::Merge(a) => merge(a),
    }
}

fn merge(a: MergeArgs) -> anyhow::Result<ExitCode> {
    away_lab::check_out_dir(&a.sources, &a.out)?;
    let results = away_lab::merge_dirs(&a.sources)?;
    let files = away_lab::write_outputs(&results, &a.out)?;
    println!("{} runs from {} sources", results.runs.len(), a.sources.len());
    print_files(&files);
    Ok(ExitCode::SUCCESS)
}

fn print_files(files: &away_lab::OutputFiles) {
    for f in [&files.report, &files.csv, &files.json, &files.svg, &files.png] {
        println!("  {}", f.display());
    }
}

fn compare(a: CompareArgs) -> anyhow::Result<ExitCode> {
    let images = std::env::temp_dir().join("away-lab-images");
    let (_, tar, _) = away_image::build_to_dir(&a.app, &images, &away_image::BuildOptions::default(), &|_| {})?;
    let away = std::env::current_exe()?;
    let mut opts = if a.quick {
        CompareOptions::quick(tar, away, a.out.clone())
    } else {
        CompareOptions::full(tar, away, a.out.clone())
    };
    if !a.links.is_empty() {
        opts.links = a.links;
    }
    if !a.loads.is_empty() {
        opts.loads = a.loads;
    }
    if !a.paths.is_empty() {
        opts.paths = a.paths;
    }
    if let Some(r) = a.repetitions {
        opts.repetitions = r;
    }
    if let Some(m) = a.vm_ram {
        opts.vm_ram = m;
    }
    if let Some(m) = a.app_ram {
        opts.app_ram = m;
    }
    if let Some(r) = a.disk_rate {
        opts.disk_rate = r;
    }
    if !a.overlay.is_empty() {
        opts.overlays = a.overlay.iter().map(|o| o == "on").collect();
        opts.overlays.dedup();
    }
    opts.channels = a.channels;
    opts.link_emulator = match a.link_emulator.as_str() {
        "proxy" => away_lab::link::LinkEmulator::SplitTcpProxy,
        _ => away_lab::link::LinkEmulator::Packet,
    };
    opts.validate()?;
    let runs = opts.plan().len();
    eprintln!("{runs} runs, estimated at most {:.0} min", opts.estimate().as_secs_f64() / 60.0);
    if a.dry_run {
        return Ok(ExitCode::SUCCESS);
    }
    let bar = indicatif::ProgressBar::new(runs as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {pos}/{len} {bar:30} {msg}")
            .expect("template"),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let pb = bar.clone();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // Ctrl-C or SIGTERM: finish and clean up the current run, write what was measured;
    // a second one ends the process at once
    let notice = bar.clone();
    let mut stops = crate::signal::StopSignals::register_in(&rt)?;
    rt.spawn(async move {
        let why = stops.next().await;
        notice
            .println(format!("{why}: stopping after the current run (it cleans up); interrupt again to quit at once"));
        away_lab::stop_after_current_run();
        stops.next().await;
        std::process::exit(130);
    });
    let results = rt.block_on(away_lab::compare(opts, move |p| {
        pb.set_position(p.done as u64);
        pb.set_message(format!("{}: {}", p.current, p.status));
    }))?;
    bar.finish_and_clear();
    let files = away_lab::write_outputs(&results, &a.out)?;
    println!("{} runs in {:.0} s", results.runs.len(), results.wall_s);
    print_files(&files);
    Ok(ExitCode::SUCCESS)
}
