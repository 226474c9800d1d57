//! `away image build|inspect|vm`: package lab apps as images and VM boot artifacts.
//! The work happens in `away-image`; this module parses arguments and prints.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use away_image::{build_to_dir, read_image_tar, write_vm_artifact, BuildOptions, Image, VmOptions};
use serde::Serialize;

use crate::output::print_json;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Build an image from a directory with a Containerfile
    ///
    /// Writes OUT/<app>.tar, one file that is both an OCI image layout (for
    /// `ctr images import`) and a docker-archive (for `docker load`). The
    /// Containerfile subset: FROM scratch | FROM <image.tar>, COPY, ADD, ENV,
    /// WORKDIR, USER, EXPOSE, LABEL, ENTRYPOINT, CMD (no RUN: nothing runs at
    /// build time). `COPY --from=cargo NAME /dest` builds the context's Cargo.toml
    /// with `cargo build --release` as a static binary and copies binary NAME.
    /// The same context always gives the same image digest.
    ///
    /// Examples:
    ///   away image build images/counter -o out/
    ///   away image build images/memload -o out/ --vm        # also the VM boot artifact
    ///   away image build examples/diskcounter -o out/ --disk 64Mi   # also a VM disk (docs/vm.md)
    ///   docker load -i out/counter.tar
    ///   ctr -n default images import out/counter.tar
    #[command(verbatim_doc_comment)]
    Build(BuildArgs),
    /// Show an image tar's config, layers and sizes
    ///
    /// Reads away's image tars, OCI layout tars and docker-archives (including
    /// the output of `docker save`).
    ///
    /// Examples:
    ///   away image inspect out/counter.tar
    ///   away image inspect --json saved-by-docker.tar
    #[command(verbatim_doc_comment)]
    Inspect(InspectArgs),
    /// Make a VM boot artifact (initramfs + kernel + boot spec) from an image
    ///
    /// Takes an image tar or a build context (built first). Writes
    /// OUT/<app>.initrd.gz (the image's root filesystem plus a busybox init that
    /// mounts /proc, /sys, /dev, loads the virtio-net driver, configures eth0 from
    /// `away.ip=`/`away.gw=` on the kernel command line and starts the image's
    /// ENTRYPOINT+CMD with its ENV, WORKDIR and USER), OUT/<app>.vmlinuz (a copy
    /// of the guest kernel) and OUT/<app>.vm.json (command line, memory, NIC and
    /// a complete QEMU example).
    ///
    /// Examples:
    ///   away image vm images/counter -o out/
    ///   away image vm out/counter.tar -o out/
    ///   qemu-system-x86_64 -accel tcg -m 256 -nographic -no-reboot \
    ///     -kernel out/counter.vmlinuz -initrd out/counter.initrd.gz \
    ///     -append 'console=ttyS0 quiet panic=-1 init_on_free=1 away.ip=10.0.2.15/24 away.gw=10.0.2.2' \
    ///     -netdev user,id=n0,hostfwd=tcp:127.0.0.1:18080-:8080 -device virtio-net-pci,netdev=n0
    ///   curl http://127.0.0.1:18080/
    #[command(verbatim_doc_comment)]
    Vm(VmArgs),
}

#[derive(clap::Args)]
pub struct BuildArgs {
    /// Build context: a directory with a Containerfile (e.g. images/counter)
    context: PathBuf,
    /// Output directory (created if missing)
    #[arg(short, long, default_value = "out")]
    out: PathBuf,
    /// Image reference to tag the image with [default: away/<context dir>:latest]
    #[arg(short, long)]
    tag: Option<String>,
    /// Also write the VM boot artifact (as `away image vm` does)
    #[arg(long)]
    vm: bool,
    /// Also write OUT/<app>.disk.qcow2, a VM disk of SIZE (e.g. 64Mi): ext4 holding the
    /// image's root filesystem. Stored as a base image in the disk store
    /// ($AWAY_STATE_DIR/disks) unless --no-store; a spec names it by the digest printed
    /// (`disk: {base: sha256:..., size: 256Mi, mount: /data}`)
    #[arg(long, value_name = "SIZE")]
    disk: Option<away_model::ByteSize>,
    /// Do not add the image to the local image store ($AWAY_STATE_DIR/images), where
    /// `away run` and specs find it by reference
    #[arg(long)]
    no_store: bool,
    #[command(flatten)]
    guest: GuestArgs,
    /// Print one JSON document instead of text
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct InspectArgs {
    /// Image tar (away's, an OCI layout tar, or a docker-archive / `docker save` tar)
    image: PathBuf,
    /// Print one JSON document instead of a table
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct VmArgs {
    /// An image tar, or a build context directory (built first)
    source: PathBuf,
    /// Output directory (created if missing)
    #[arg(short, long, default_value = "out")]
    out: PathBuf,
    #[command(flatten)]
    guest: GuestArgs,
    /// Print one JSON document instead of text
    #[arg(long)]
    json: bool,
}

/// Where the guest's kernel, modules and init shell come from.
#[derive(clap::Args)]
struct GuestArgs {
    /// Guest kernel (installed by deploy/install.sh)
    #[arg(long, default_value = "/opt/away-guest/vmlinuz", env = "AWAY_GUEST_KERNEL")]
    kernel: PathBuf,
    /// Directory holding the guest kernel's NIC driver modules (*.ko, searched recursively)
    #[arg(long, default_value = "/opt/away-guest/modules", env = "AWAY_GUEST_MODULES")]
    modules_dir: PathBuf,
    /// Static busybox that runs the VM's init script
    #[arg(long, default_value = "/bin/busybox")]
    busybox: PathBuf,
    /// Guest IPv4 address/prefix on eth0 (QEMU user networking uses 10.0.2.15/24)
    #[arg(long, default_value = "10.0.2.15/24")]
    ip: String,
    /// Guest default gateway
    #[arg(long, default_value = "10.0.2.2")]
    gateway: String,
    /// Guest memory in MiB, written to the boot spec
    #[arg(long, default_value_t = 256)]
    memory_mib: u32,
}

impl GuestArgs {
    fn options(&self) -> VmOptions {
        VmOptions {
            kernel: self.kernel.clone(),
            modules_dir: self.modules_dir.clone(),
            busybox: self.busybox.clone(),
            ip: self.ip.clone(),
            gateway: self.gateway.clone(),
            memory_mib: self.memory_mib,
            ..VmOptions::default()
        }
    }
}

fn progress(line: &str) {
    eprintln!("away image: {line}");
}

pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Build(a) => build(a),
        Command::Inspect(a) => inspect(a),
        Command::Vm(a) => vm(a),
    }
}

#[derive(Serialize)]
struct BuildReport {
    app: String,
    tag: String,
    path: PathBuf,
    manifest_digest: String,
    config_digest: String,
    size_bytes: u64,
    layers: Vec<LayerReport>,
    seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    vm: Option<away_image::VmArtifact>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disk: Option<DiskReport>,
}

#[derive(Serialize)]
struct DiskReport {
    #[serde(flatten)]
    image: away_image::DiskImage,
    /// What a spec's `disk.base` names.
    digest: String,
    stored: bool,
}

fn build(a: BuildArgs) -> anyhow::Result<ExitCode> {
    let start = Instant::now();
    let opts = BuildOptions { tag: a.tag.clone(), ..BuildOptions::default() };
    let (built, path, enc) = build_to_dir(&a.context, &a.out, &opts, &progress)?;
    if !a.no_store {
        for r in crate::workload::store_image(&path)? {
            progress(&format!("stored as {r}"));
        }
    }
    let vm = if a.vm {
        Some(write_vm_artifact(&built.image, &built.app, &a.out, &a.guest.options(), &progress)?)
    } else {
        None
    };
    let disk = match a.disk {
        Some(size) => {
            let out = a.out.join(format!("{}.disk.qcow2", built.app));
            progress(&format!("writing {} (ext4, {size})", out.display()));
            let image = away_image::write_disk_image(&built.image, &out, size.bytes())?;
            let digest = if a.no_store {
                away_runtime::qemu::disk::file_digest(&out)?
            } else {
                let paths = away_runtime::host::HostPaths::default();
                let store = away_runtime::qemu::DiskStore::new(paths.state_dir.join("disks"), &paths.qemu);
                let base = store.import(&out)?;
                progress(&format!("stored in {}", store.dir.display()));
                base.digest
            };
            Some(DiskReport { image, digest, stored: !a.no_store })
        }
        None => None,
    };
    let report = BuildReport {
        app: built.app.clone(),
        tag: built.image.tags.first().cloned().unwrap_or_default(),
        size_bytes: std::fs::metadata(&path).with_context(|| format!("stat {}", path.display()))?.len(),
        path,
        manifest_digest: enc.manifest_digest,
        config_digest: enc.config_digest,
        layers: layer_reports(&built.image)?,
        seconds: start.elapsed().as_secs_f64(),
        vm,
        disk,
    };
    if a.json {
        print_json(&report)?;
    } else {
        println!("built {} ({}) in {:.1} s", report.path.display(), report.tag, report.seconds);
        println!("  manifest {}", report.manifest_digest);
        println!("  size     {} in {} layer(s)", human(report.size_bytes), report.layers.len());
        if let Some(vm) = &report.vm {
            print_vm(vm);
        }
        if let Some(d) = &report.disk {
            println!(
                "VM disk {} ({} ext4, {} file)",
                d.image.path.display(),
                human(d.image.virtual_size),
                human(d.image.file_bytes)
            );
            println!("  digest   {}{}", d.digest, if d.stored { " (in the disk store)" } else { "" });
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct LayerReport {
    digest: String,
    diff_id: String,
    media_type: String,
    size_bytes: u64,
    uncompressed_bytes: u64,
    entries: usize,
}

fn layer_reports(image: &Image) -> anyhow::Result<Vec<LayerReport>> {
    image
        .layers
        .iter()
        .map(|l| {
            let (uncompressed_bytes, entries) = l.tar_stats().with_context(|| format!("read layer {}", l.digest))?;
            Ok(LayerReport {
                digest: l.digest.clone(),
                diff_id: l.diff_id.clone(),
                media_type: l.media_type.clone(),
                size_bytes: l.data.len() as u64,
                uncompressed_bytes,
                entries,
            })
        })
        .collect()
}

#[derive(Serialize)]
struct InspectReport {
    path: PathBuf,
    format: away_image::ArchiveFormat,
    tags: Vec<String>,
    manifest_digest: String,
    config_digest: String,
    size_bytes: u64,
    config: serde_json::Value,
    layers: Vec<LayerReport>,
}

fn inspect(a: InspectArgs) -> anyhow::Result<ExitCode> {
    let read = read_image_tar(&a.image)?;
    let report = InspectReport {
        path: a.image.clone(),
        format: read.format,
        tags: read.image.tags.clone(),
        manifest_digest: read.manifest_digest.clone(),
        config_digest: read.config_digest.clone(),
        size_bytes: std::fs::metadata(&a.image).with_context(|| format!("stat {}", a.image.display()))?.len(),
        config: serde_json::to_value(&read.image.config)?,
        layers: layer_reports(&read.image)?,
    };
    if a.json {
        print_json(&report)?;
        return Ok(ExitCode::SUCCESS);
    }
    let c = read.image.config.config().clone().unwrap_or_default();
    let join = |v: &Option<Vec<String>>| {
        v.as_ref().map(|v| serde_json::to_string(v).unwrap_or_default()).unwrap_or_else(|| "-".into())
    };
    let mut labels: Vec<String> =
        c.labels().clone().unwrap_or_default().into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    let rows = [
        ("image", a.image.display().to_string()),
        ("format", serde_json::to_value(read.format)?.as_str().unwrap_or_default().to_string()),
        ("size", human(report.size_bytes)),
        ("tags", if report.tags.is_empty() { "-".into() } else { report.tags.join(", ") }),
        ("manifest", report.manifest_digest.clone()),
        ("config", report.config_digest.clone()),
        ("platform", format!("{}/{}", read.image.config.os(), read.image.config.architecture())),
        ("entrypoint", join(c.entrypoint())),
        ("cmd", join(c.cmd())),
        ("env", c.env().clone().map(|e| e.join(" ")).unwrap_or_else(|| "-".into())),
        ("workdir", c.working_dir().clone().unwrap_or_else(|| "/".into())),
        ("user", c.user().clone().unwrap_or_else(|| "-".into())),
        ("ports", c.exposed_ports().clone().map(|p| p.join(" ")).unwrap_or_else(|| "-".into())),
        ("labels", if labels.is_empty() { "-".into() } else { labels.join(" ") }),
    ];
    for (k, v) in rows {
        println!("{k:<11} {v}");
    }
    println!();
    println!("{:<5} {:<20} {:>10} {:>13} {:>8}", "LAYER", "DIGEST", "SIZE", "UNCOMPRESSED", "ENTRIES");
    for (i, l) in report.layers.iter().enumerate() {
        let short = l.digest.strip_prefix("sha256:").unwrap_or(&l.digest);
        println!(
            "{i:<5} {:<20} {:>10} {:>13} {:>8}",
            &short[..short.len().min(19)],
            human(l.size_bytes),
            human(l.uncompressed_bytes),
            l.entries
        );
    }
    let total: u64 = report.layers.iter().map(|l| l.size_bytes).sum();
    let total_u: u64 = report.layers.iter().map(|l| l.uncompressed_bytes).sum();
    println!("{:<5} {:<20} {:>10} {:>13}", "total", "", human(total), human(total_u));
    Ok(ExitCode::SUCCESS)
}

fn vm(a: VmArgs) -> anyhow::Result<ExitCode> {
    let (image, name) = if a.source.is_dir() {
        let (built, path, _) = build_to_dir(&a.source, &a.out, &BuildOptions::default(), &progress)?;
        progress(&format!("built {}", path.display()));
        (built.image, built.app)
    } else {
        let read = read_image_tar(&a.source)?;
        let name = file_stem(&a.source);
        (read.image, name)
    };
    let artifact = write_vm_artifact(&image, &name, &a.out, &a.guest.options(), &progress)?;
    if a.json {
        print_json(&artifact)?;
    } else {
        print_vm(&artifact);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_vm(vm: &away_image::VmArtifact) {
    println!("VM boot artifact {}", vm.spec_file.display());
    println!("  initrd   {} ({})", vm.initrd.display(), human(vm.spec.initrd_bytes));
    println!("  kernel   {}", vm.kernel.display());
    println!("  cmdline  {}", vm.spec.cmdline);
    println!("  boot     {}", vm.spec.qemu_example);
}

/// `out/counter.tar` -> `counter`.
fn file_stem(p: &Path) -> String {
    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into());
    [".tar.gz", ".tgz", ".tar"].iter().find_map(|s| name.strip_suffix(s).map(str::to_string)).unwrap_or(name)
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
