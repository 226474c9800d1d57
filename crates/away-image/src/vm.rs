//! VM boot artifact from an image: a gzip'd newc cpio initramfs holding the
//! image's root filesystem plus a tiny init, next to the guest kernel and a JSON
//! file that says how to boot them.
//!
//! The init is a shell script run by the host's static busybox (copied to
//! `/.away/busybox`, so the image needs no shell of its own). It mounts /proc,
//! /sys and devtmpfs, loads the NIC driver modules (Debian's kernel builds
//! virtio-net as a module), configures `lo` and `eth0` from `away.ip=` /
//! `away.gw=` on the kernel command line, applies the image's ENV, WORKDIR and
//! USER, runs ENTRYPOINT+CMD and powers the VM off when the app exits.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::archive::{ArchiveError, Image};
use crate::tree::{FileTree, LayerError, Node};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(
        "kernel module {name} not found under {dir} (deploy/install.sh extracts the guest kernel's NIC modules there)"
    )]
    Module { name: String, dir: PathBuf },
    #[error("the image has no ENTRYPOINT or CMD: nothing to start in the VM")]
    NoCommand,
    #[error("disk image: {0}")]
    Disk(String),
}

/// Version of the init script and initramfs layout: caches of VM artifacts key on it
/// together with the image digest. Bump it whenever `init_script`, the modules or the
/// kernel command line change. 3: virtio_balloon loaded, `init_on_free=1`.
pub const VM_INIT_VERSION: u32 = 3;

/// The kernel command line's memory options. `init_on_free=1`: the guest zeroes every
/// page it frees (the unpacked initramfs archive, boot memory, an app's freed heap), so
/// a live migration sends its free memory as zero pages (QEMU detects and skips them)
/// instead of whatever the page held; with the balloon's free-page hints
/// (`virtio_balloon`, QEMU's `free-page-hint=on`) QEMU skips the pages the guest
/// reports free altogether.
pub const GUEST_MEMORY_CMDLINE: &str = "init_on_free=1";

/// Where the guest pieces come from, and the guest network.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Guest kernel (bzImage).
    pub kernel: PathBuf,
    /// Directory tree holding the kernel's `.ko` files (searched recursively).
    pub modules_dir: PathBuf,
    /// Modules to load (their dependencies are found and loaded first).
    pub modules: Vec<String>,
    /// A statically linked busybox for the init.
    pub busybox: PathBuf,
    /// Guest address on eth0 (QEMU user networking: 10.0.2.15/24, gateway 10.0.2.2).
    pub ip: String,
    pub gateway: String,
    pub memory_mib: u32,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            kernel: PathBuf::from("/opt/away-guest/vmlinuz"),
            modules_dir: PathBuf::from("/opt/away-guest/modules"),
            // virtio_balloon: free-page hints to QEMU during a live migration
            modules: vec!["virtio_pci".into(), "virtio_net".into(), "virtio_balloon".into()],
            busybox: PathBuf::from("/bin/busybox"),
            ip: "10.0.2.15/24".into(),
            gateway: "10.0.2.2".into(),
            memory_mib: 256,
        }
    }
}

/// What `<name>.vm.json` says: enough to boot the artifact by hand or from code.
/// File names are relative to the JSON file's directory.
#[derive(Debug, Clone, Serialize)]
pub struct BootSpec {
    pub kernel: String,
    pub initrd: String,
    pub cmdline: String,
    pub memory_mib: u32,
    /// QEMU NIC model whose driver the initramfs loads.
    pub nic: String,
    /// First TCP port the image exposes (forward a host port to it).
    pub guest_port: Option<u16>,
    pub modules: Vec<String>,
    pub initrd_bytes: u64,
    /// A complete QEMU command line (TCG; host port 8080 forwarded).
    pub qemu_example: String,
}

/// Paths of a written VM artifact.
#[derive(Debug, Clone, Serialize)]
pub struct VmArtifact {
    pub initrd: PathBuf,
    pub kernel: PathBuf,
    pub spec_file: PathBuf,
    pub spec: BootSpec,
}

/// Flatten the image's layers into one tree.
pub fn rootfs(image: &Image) -> Result<FileTree, LayerError> {
    let mut tree = FileTree::default();
    for (i, l) in image.layers.iter().enumerate() {
        tree.apply_layer(&l.data, &format!("layer {i} ({})", l.digest))?;
    }
    Ok(tree)
}

/// Single-quote for sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Resolve `names` and their `depends=` (read from each module's .modinfo
/// strings) into load order, dependencies first.
fn resolve_modules(dir: &Path, names: &[String]) -> Result<Vec<(String, PathBuf)>, VmError> {
    let mut found: HashMap<String, PathBuf> = HashMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(stem) = p.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".ko")) {
                found.insert(stem.replace('-', "_"), p);
            }
        }
    }
    let mut order = Vec::new();
    fn visit(
        name: &str,
        dir: &Path,
        found: &HashMap<String, PathBuf>,
        order: &mut Vec<(String, PathBuf)>,
        depth: usize,
    ) -> Result<(), VmError> {
        let key = name.replace('-', "_");
        if order.iter().any(|(n, _)| *n == key) || depth > 32 {
            return Ok(());
        }
        let path = found.get(&key).ok_or_else(|| VmError::Module { name: key.clone(), dir: dir.to_path_buf() })?;
        let data = std::fs::read(path).map_err(|source| VmError::Io { action: "read", path: path.clone(), source })?;
        if let Some(pos) = data.windows(8).position(|w| w == b"depends=") {
            let rest = &data[pos + 8..];
            let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
            for dep in String::from_utf8_lossy(&rest[..end]).split(',').filter(|d| !d.is_empty()) {
                visit(dep, dir, found, order, depth + 1)?;
            }
        }
        order.push((key, path.clone()));
        Ok(())
    }
    for n in names {
        visit(n, dir, &found, &mut order, 0)?;
    }
    Ok(order)
}

/// The init script: everything the VM does before and after the app.
fn init_script(image: &Image, modules: &[String]) -> Result<String, VmError> {
    let run = image.config.config().clone().unwrap_or_default();
    let mut argv: Vec<String> = run.entrypoint().clone().unwrap_or_default();
    argv.extend(run.cmd().clone().unwrap_or_default());
    if argv.is_empty() {
        return Err(VmError::NoCommand);
    }
    let mut s = String::from(
        r#"#!/.away/busybox sh
# away VM init (generated by `away image vm`): mount, load NIC and balloon modules, set up
# the network from away.ip= / away.gw= on the kernel command line, then run the
# image's ENTRYPOINT+CMD with its ENV, WORKDIR and USER. Powers off when it exits.
B=/.away/busybox
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
$B mkdir -p /proc /sys /dev /tmp /run
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev
"#,
    );
    for m in modules {
        s.push_str(&format!("$B insmod /.away/modules/{m}.ko || echo \"away-init: insmod {m} failed\"\n"));
    }
    s.push_str(
        r#"ip=; gw=
for arg in $($B cat /proc/cmdline); do
  case "$arg" in
    away.ip=*) ip=${arg#away.ip=} ;;
    away.gw=*) gw=${arg#away.gw=} ;;
  esac
done
$B ip link set lo up
if [ -n "$ip" ]; then
  # Driver probing is asynchronous: wait up to 5 s for eth0.
  i=0
  while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do $B sleep 0.1; i=$((i+1)); done
  $B ip addr add "$ip" dev eth0 && $B ip link set eth0 up || echo "away-init: eth0 setup failed"
  [ -n "$gw" ] && $B ip route add default via "$gw"
  echo "away-init: eth0 $ip gw $gw"
fi
"#,
    );
    for e in run.env().clone().unwrap_or_default() {
        if let Some((k, v)) = e.split_once('=') {
            if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                s.push_str(&format!("export {k}={}\n", sh_quote(v)));
            }
        }
    }
    let workdir = run.working_dir().clone().unwrap_or_else(|| "/".into());
    let cmd: Vec<String> = argv.iter().map(|a| sh_quote(a)).collect();
    // A workload's own env and command come in a second cpio appended to this
    // initramfs (see `overrides_cpio`): it may export variables and `set --` argv.
    s.push_str(&format!("set -- {}\n", cmd.join(" ")));
    s.push_str("[ -f /.away/overrides.sh ] && . /.away/overrides.sh\n");
    s.push_str(&format!("cd {} || exit 1\n", sh_quote(&workdir)));
    let prefix = match run.user().as_deref() {
        None | Some("") | Some("0") | Some("root") | Some("0:0") => String::new(),
        Some(u) => {
            let (uid, gid) = u.split_once(':').unwrap_or((u, u));
            format!("$B setpriv --reuid={} --regid={} --clear-groups ", sh_quote(uid), sh_quote(gid))
        }
    };
    s.push_str("echo \"away-init: starting $*\"\n");
    s.push_str(&format!("{prefix}\"$@\"\n"));
    s.push_str("echo \"away-init: app exited with status $?\"\n$B sync\n$B poweroff -f\n");
    Ok(s)
}

/// A gzip'd newc cpio holding `/.away/overrides.sh`: the workload's env (exported after
/// the image's) and, when given, its full argv. Appended to an artifact's initramfs
/// (the kernel unpacks concatenated archives), it lets one cached artifact per image
/// serve every workload. Deterministic: the same overrides give the same bytes, which
/// a live migration's destination relies on (its initrd must match the source's).
pub fn overrides_cpio(env: &std::collections::BTreeMap<String, String>, argv: Option<&[String]>) -> Vec<u8> {
    overrides_cpio_with_disk(env, argv, None)
}

/// Modules a VM with a disk loads (dependencies resolved from the modules directory):
/// the virtio block driver, ext4, and crc32c for ext4's metadata checksums (the kernel
/// would ask modprobe for it, and the initramfs has none).
pub const DISK_MODULES: [&str; 3] = ["crc32c_generic", "virtio_blk", "ext4"];

/// The guest side of a VM's disk: the modules to load and where to mount it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestDisk {
    /// (name, `.ko` bytes) in load order, dependencies first.
    pub modules: Vec<(String, Vec<u8>)>,
    /// Mount point of the disk's ext4 file system; None: the device only (`/dev/vda`).
    pub mount: Option<String>,
}

impl GuestDisk {
    /// [`DISK_MODULES`] from `modules_dir` (the guest kernel's modules, see [`VmOptions`]).
    pub fn load(modules_dir: &Path, mount: Option<&str>) -> Result<GuestDisk, VmError> {
        let names: Vec<String> = DISK_MODULES.iter().map(|m| m.to_string()).collect();
        let mut modules = Vec::new();
        for (name, path) in resolve_modules(modules_dir, &names)? {
            let data = std::fs::read(&path).map_err(|source| VmError::Io { action: "read", path, source })?;
            modules.push((name, data));
        }
        Ok(GuestDisk { modules, mount: mount.map(str::to_string) })
    }

    /// The lines `overrides.sh` runs for the disk: load the modules (one the init loaded
    /// already fails quietly), wait for `/dev/vda`, mount it.
    fn script(&self) -> String {
        let mut s = String::from("# the workload's disk\n");
        for (m, _) in &self.modules {
            s.push_str(&format!("$B insmod /.away/disk/{m}.ko 2>/dev/null\n"));
        }
        s.push_str(
            "i=0\nwhile [ ! -b /dev/vda ] && [ $i -lt 100 ]; do $B sleep 0.1; i=$((i+1)); done\n\
             [ -b /dev/vda ] || echo \"away-init: no disk at /dev/vda\"\n",
        );
        if let Some(m) = &self.mount {
            let m = sh_quote(m);
            s.push_str(&format!(
                "$B mkdir -p {m} && $B mount -t ext4 /dev/vda {m} && echo \"away-init: disk mounted on \"{m} || \
                 echo \"away-init: mount /dev/vda on \"{m}\" failed\"\n"
            ));
        }
        s
    }
}

/// [`overrides_cpio`], and when `disk` is set the disk's modules (`/.away/disk/*.ko`)
/// with the lines that load them and mount the disk before the app starts.
pub fn overrides_cpio_with_disk(
    env: &std::collections::BTreeMap<String, String>,
    argv: Option<&[String]>,
    disk: Option<&GuestDisk>,
) -> Vec<u8> {
    let mut script = String::from("# workload overrides, written by away\n");
    if let Some(d) = disk {
        script.push_str(&d.script());
    }
    for (k, v) in env {
        if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            script.push_str(&format!("export {k}={}\n", sh_quote(v)));
        }
    }
    if let Some(argv) = argv {
        let quoted: Vec<String> = argv.iter().map(|a| sh_quote(a)).collect();
        script.push_str(&format!("set -- {}\n", quoted.join(" ")));
    }
    // (name, mode, data); overrides.sh keeps inode 1, as before disks (the same bytes
    // for a workload without one)
    let mut files: Vec<(String, u32, &[u8])> = Vec::new();
    if let Some(d) = disk {
        files.push((".away/disk".into(), 0o040755, &[]));
        files.extend(d.modules.iter().map(|(m, data)| (format!(".away/disk/{m}.ko"), 0o100644, data.as_slice())));
    }
    let mut gz = flate2::GzBuilder::new().mtime(0).write(Vec::new(), flate2::Compression::new(6));
    let write = |gz: &mut dyn Write| -> std::io::Result<()> {
        let mut put = |name: &str, ino: u32, mode: u32, data: &[u8]| -> std::io::Result<()> {
            let nlink = if mode & 0o040000 != 0 { 2 } else { 1 };
            let mut w = cpio::newc::Builder::new(name)
                .ino(ino)
                .mode(mode)
                .nlink(nlink)
                .mtime(0)
                .write(&mut *gz, data.len() as u32);
            w.write_all(data)?;
            w.finish()?;
            Ok(())
        };
        for (i, (name, mode, data)) in files.iter().enumerate() {
            put(name, i as u32 + 2, *mode, data)?;
        }
        put(".away/overrides.sh", 1, 0o100644, script.as_bytes())?;
        cpio::newc::trailer(gz)?;
        Ok(())
    };
    write(&mut gz).expect("writing to memory");
    gz.finish().expect("writing to memory")
}

/// Write the image's root filesystem plus init as a gzip'd newc cpio.
fn write_initramfs(tree: &FileTree, path: &Path) -> Result<u64, VmError> {
    let io = |action, source| VmError::Io { action, path: path.to_path_buf(), source };
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".away-initrd-")
        .tempfile_in(dir)
        .map_err(|e| io("create a temporary file for", e))?;
    let mut gz =
        flate2::GzBuilder::new().mtime(0).write(std::io::BufWriter::new(tmp.as_file()), flate2::Compression::new(6));
    let mut ino = 1u32;
    let mut put = |gz: &mut dyn Write,
                   name: &str,
                   mode: u32,
                   uid: u64,
                   gid: u64,
                   rdev: Option<(u32, u32)>,
                   data: &[u8]|
     -> std::io::Result<()> {
        let mut b = cpio::newc::Builder::new(name)
            .ino(ino)
            .mode(mode)
            .uid(uid as u32)
            .gid(gid as u32)
            .nlink(if mode & 0o170000 == 0o040000 { 2 } else { 1 })
            .mtime(0);
        if let Some((maj, min)) = rdev {
            b = b.rdev_major(maj).rdev_minor(min);
        }
        ino += 1;
        let mut w = b.write(gz, data.len() as u32);
        w.write_all(data)?;
        w.finish()?;
        Ok(())
    };
    (|| -> std::io::Result<()> {
        for (p, node) in &tree.entries {
            match node {
                Node::Dir { mode, uid, gid } => put(&mut gz, p, 0o040000 | mode, *uid, *gid, None, &[])?,
                Node::File { data, mode, uid, gid } => put(&mut gz, p, 0o100000 | mode, *uid, *gid, None, data)?,
                Node::Symlink { target, uid, gid } => {
                    put(&mut gz, p, 0o120000 | 0o777, *uid, *gid, None, target.as_bytes())?
                }
            }
            if p == "dev" {
                // The kernel opens /dev/console for init's stdio before init runs:
                // without this node, everything init prints is lost.
                put(&mut gz, "dev/console", 0o020000 | 0o600, 0, 0, Some((5, 1)), &[])?;
                put(&mut gz, "dev/null", 0o020000 | 0o666, 0, 0, Some((1, 3)), &[])?;
            }
        }
        cpio::newc::trailer(&mut gz)?;
        gz.finish()?.flush()?;
        Ok(())
    })()
    .map_err(|e| io("write", e))?;
    let size = tmp.as_file().metadata().map_err(|e| io("stat", e))?.len();
    tmp.as_file().set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644)).map_err(|e| io("chmod", e))?;
    tmp.persist(path).map_err(|e| io("rename a temporary file to", e.error))?;
    Ok(size)
}

/// Write `<name>.initrd.gz`, `<name>.vmlinuz` and `<name>.vm.json` into `out_dir`.
pub fn write_vm_artifact(
    image: &Image,
    name: &str,
    out_dir: &Path,
    opts: &VmOptions,
    progress: &dyn Fn(&str),
) -> Result<VmArtifact, VmError> {
    let io = |action, path: &Path, source| VmError::Io { action, path: path.to_path_buf(), source };
    std::fs::create_dir_all(out_dir).map_err(|e| io("create", out_dir, e))?;
    let modules = resolve_modules(&opts.modules_dir, &opts.modules)?;
    progress(&format!("flattening {} layers", image.layers.len()));
    let mut tree = rootfs(image)?;
    let busybox = std::fs::read(&opts.busybox).map_err(|e| io("read busybox", &opts.busybox, e))?;
    tree.insert(".away/busybox", Node::File { data: busybox, mode: 0o755, uid: 0, gid: 0 });
    for (m, path) in &modules {
        let data = std::fs::read(path).map_err(|e| io("read", path, e))?;
        tree.insert(&format!(".away/modules/{m}.ko"), Node::File { data, mode: 0o644, uid: 0, gid: 0 });
    }
    let names: Vec<String> = modules.iter().map(|(n, _)| n.clone()).collect();
    let init = init_script(image, &names)?;
    tree.insert("init", Node::File { data: init.into_bytes(), mode: 0o755, uid: 0, gid: 0 });
    for d in ["proc", "sys", "dev", "run"] {
        tree.entries.entry(d.into()).or_insert(Node::Dir { mode: 0o755, uid: 0, gid: 0 });
    }
    tree.entries.entry("tmp".into()).or_insert(Node::Dir { mode: 0o1777, uid: 0, gid: 0 });

    let initrd = out_dir.join(format!("{name}.initrd.gz"));
    progress(&format!("writing {}", initrd.display()));
    let initrd_bytes = write_initramfs(&tree, &initrd)?;

    // A copy, not a link: the artifact directory can be moved to another node.
    let kernel = out_dir.join(format!("{name}.vmlinuz"));
    let tmp = out_dir.join(format!(".{name}.vmlinuz.tmp"));
    std::fs::copy(&opts.kernel, &tmp).map_err(|e| io("copy the kernel", &opts.kernel, e))?;
    std::fs::rename(&tmp, &kernel).map_err(|e| io("rename", &kernel, e))?;

    let guest_port = image
        .config
        .config()
        .as_ref()
        .and_then(|c| c.exposed_ports().clone())
        .unwrap_or_default()
        .iter()
        .filter_map(|p| p.strip_suffix("/tcp").unwrap_or(p).parse::<u16>().ok())
        .next();
    let cmdline =
        format!("console=ttyS0 quiet panic=-1 {GUEST_MEMORY_CMDLINE} away.ip={} away.gw={}", opts.ip, opts.gateway);
    let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()).display().to_string();
    let qemu_example = format!(
        "qemu-system-x86_64 -accel tcg -m {} -nographic -no-reboot -kernel {} -initrd {} -append '{}' -netdev user,id=n0,hostfwd=tcp:127.0.0.1:8080-:{} -device virtio-net-pci,netdev=n0",
        opts.memory_mib,
        abs(&kernel),
        abs(&initrd),
        cmdline,
        guest_port.unwrap_or(8080)
    );
    let spec = BootSpec {
        kernel: format!("{name}.vmlinuz"),
        initrd: format!("{name}.initrd.gz"),
        cmdline,
        memory_mib: opts.memory_mib,
        nic: "virtio-net-pci".into(),
        guest_port,
        modules: names,
        initrd_bytes,
        qemu_example,
    };
    let spec_file = out_dir.join(format!("{name}.vm.json"));
    let tmp = out_dir.join(format!(".{name}.vm.json.tmp"));
    let json = serde_json::to_vec_pretty(&spec).expect("spec JSON");
    std::fs::write(&tmp, json).map_err(|e| io("write", &tmp, e))?;
    std::fs::rename(&tmp, &spec_file).map_err(|e| io("rename", &spec_file, e))?;
    Ok(VmArtifact { initrd, kernel, spec_file, spec })
}
