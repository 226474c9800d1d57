//! The QEMU command line of a VM workload. One builder for every start: `run`,
//! `restore` (`-incoming defer`) and, later, a live-migration destination
//! (`-incoming tcp:...`), because a migration only works between identically
//! configured machines.

use std::path::{Path, PathBuf};

use away_model::{Accel, WorkloadSpec};

/// Files of a VM workload's state directory.
#[derive(Debug, Clone)]
pub struct VmFiles {
    pub dir: PathBuf,
}

impl VmFiles {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        VmFiles { dir: dir.into() }
    }
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    pub fn serial_log(&self) -> PathBuf {
        self.dir.join("serial.log")
    }
    /// QEMU's own stderr, before and after daemonizing: its `-D` file too, since a
    /// daemonized QEMU without `-D` sends its later errors (e.g. why an incoming
    /// migration's TLS peer was refused) to /dev/null.
    pub fn qemu_log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }
    pub fn record(&self) -> PathBuf {
        self.dir.join("spec.json")
    }
}

/// A VM's NIC on its lab network: the node's tap device and the guest's MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmTap {
    pub ifname: String,
    pub mac: String,
    /// The guest NIC's MTU (the overlay's), given to virtio-net as `host_mtu`.
    pub mtu: u32,
}

/// `cmdline` with the guest's address (`away.ip=`, `away.gw=`) replaced by `ip/prefix`
/// and no gateway: a lab network is one flat subnet.
pub fn cmdline_with_address(cmdline: &str, ip: std::net::Ipv4Addr, prefix_len: u8) -> String {
    let mut out: Vec<String> = cmdline
        .split_whitespace()
        .filter(|a| !a.starts_with("away.ip=") && !a.starts_with("away.gw="))
        .map(str::to_string)
        .collect();
    out.push(format!("away.ip={ip}/{prefix_len}"));
    out.join(" ")
}

/// Everything the command line depends on.
#[derive(Debug, Clone)]
pub struct VmLaunch {
    pub qemu: PathBuf,
    pub name: String,
    pub accel: Accel,
    pub memory_mib: u64,
    pub cpus: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    /// QEMU NIC model whose driver the initramfs loads (e.g. `virtio-net-pci`).
    pub nic: String,
    /// (host port, guest port) pairs forwarded by QEMU's user networking (none on a lab
    /// network: the agent relays published ports to the overlay address).
    pub ports: Vec<(u16, u16)>,
    /// On a lab network: the NIC is tap device `tap` on the network's bridge, with the
    /// workload's MAC (docs/network.md); QEMU's user networking otherwise.
    pub tap: Option<VmTap>,
    pub files: VmFiles,
    /// `-incoming` value: `defer` (restore from a file), `tcp:0.0.0.0:PORT` (live migration).
    pub incoming: Option<String>,
    /// `-S`: the guest does not run by itself, not even after an incoming migration
    /// (a live-migration destination held until its source commits; `cont` starts it).
    pub paused: bool,
    /// When the workload overrides env or command: the shared artifact initrd and the
    /// overrides cpio that `initrd` (in the workload's dir) is made of, at start.
    pub initrd_overrides: Option<(PathBuf, Vec<u8>)>,
    /// The workload's disk and its overlay (in `files.dir`): a virtio-blk device on
    /// the overlay's qcow2 node [`super::DISK_NODE`] (its backing base opened read-only).
    pub disk: Option<(away_model::DiskSpec, PathBuf)>,
}

impl VmLaunch {
    /// The launch of `spec` booting `kernel`/`initrd` with `files` as state directory.
    #[allow(clippy::too_many_arguments)]
    pub fn for_spec(
        qemu: &Path,
        spec: &WorkloadSpec,
        accel: Accel,
        kernel: &Path,
        initrd: &Path,
        cmdline: &str,
        nic: &str,
        files: VmFiles,
    ) -> VmLaunch {
        VmLaunch {
            qemu: qemu.to_path_buf(),
            name: spec.name.clone(),
            accel,
            memory_mib: memory_mib(spec.resources.memory.bytes()),
            cpus: vcpus(spec.resources.cpus),
            kernel: kernel.to_path_buf(),
            initrd: initrd.to_path_buf(),
            cmdline: cmdline.to_string(),
            nic: nic.to_string(),
            ports: spec.ports.iter().map(|p| (p.host_port(), p.container)).collect(),
            tap: None,
            files,
            incoming: None,
            paused: false,
            initrd_overrides: None,
            disk: None,
        }
    }

    /// The arguments after the program name. QEMU daemonizes itself (setsid, pidfile)
    /// so the VM outlives the process that started it.
    pub fn argv(&self) -> Vec<String> {
        let f = &self.files;
        let (netdev, nic) = match &self.tap {
            // the tap exists already, on its bridge: QEMU only attaches to it
            Some(t) => {
                let mut nic = format!("{},netdev=n0,mac={}", self.nic, t.mac);
                if self.nic.starts_with("virtio-net") {
                    nic.push_str(&format!(",host_mtu={}", t.mtu));
                }
                (format!("tap,id=n0,ifname={},script=no,downscript=no", t.ifname), nic)
            }
            None => {
                let mut netdev = "user,id=n0".to_string();
                for (host, guest) in &self.ports {
                    netdev.push_str(&format!(",hostfwd=tcp:0.0.0.0:{host}-:{guest}"));
                }
                (netdev, format!("{},netdev=n0", self.nic))
            }
        };
        let mut a: Vec<String> = vec![
            "-name".into(),
            format!("away-{},process=away-{}", self.name.replace(',', ",,"), self.name.replace(',', ",,")),
            // A fixed machine type: migration needs the same one on both ends.
            "-machine".into(),
            "pc".into(),
            "-accel".into(),
            self.accel.to_string(),
            "-m".into(),
            self.memory_mib.to_string(),
            "-smp".into(),
            self.cpus.to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            // A guest kernel panic (panic=-1 reboots) stops the VM instead of looping.
            "-no-reboot".into(),
            "-kernel".into(),
            path(&self.kernel),
            "-initrd".into(),
            path(&self.initrd),
            "-append".into(),
            self.cmdline.clone(),
            "-serial".into(),
            format!("file:{}", path(&f.serial_log())),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", path(&f.qmp_socket())),
            "-netdev".into(),
            netdev,
            "-device".into(),
            nic,
            // The guest's free pages: with free-page hints, a live migration skips the
            // pages the guest reports free (its virtio_balloon driver, loaded by away's
            // init); the balloon is never inflated. Part of the machine's configuration:
            // both ends of a migration have it.
            // (QEMU takes the hints on an I/O thread of their own)
            "-object".into(),
            "iothread,id=balloon-io".into(),
            "-device".into(),
            "virtio-balloon-pci,free-page-hint=on,iothread=balloon-io".into(),
            "-pidfile".into(),
            path(&f.pidfile()),
            // (QEMU opens it before it reports anything but a bad option, and makes it
            // its stderr from then on)
            "-D".into(),
            path(&f.qemu_log()),
            "-daemonize".into(),
        ];
        if let Some((_, overlay)) = &self.disk {
            // -blockdev names the qcow2 node, so a migration can mirror from it and
            // export it; part of the machine's configuration like every device
            a.extend([
                "-blockdev".into(),
                format!(
                    "driver=qcow2,node-name={},file.driver=file,file.filename={}",
                    super::DISK_NODE,
                    path(overlay).replace(',', ",,")
                ),
                "-device".into(),
                format!("virtio-blk-pci,drive={},id=vda", super::DISK_NODE),
            ]);
        }
        if let Some(i) = &self.incoming {
            a.extend(["-incoming".into(), i.clone()]);
        }
        if self.paused {
            a.push("-S".into());
        }
        a
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// Bytes to whole MiB, rounded up.
pub fn memory_mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

/// vCPUs for a CPU share: rounded up, at least one.
pub fn vcpus(cpus: f64) -> u32 {
    if cpus.is_finite() && cpus > 1.0 {
        cpus.ceil() as u32
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use away_model::PortMapping;

    #[test]
    fn argv_has_ports_accel_and_incoming() {
        let mut spec: WorkloadSpec =
            serde_json::from_value(serde_json::json!({"name": "c1", "image": "away/counter:latest"})).unwrap();
        spec.ports = vec![PortMapping { container: 8080, host: Some(18080) }];
        spec.resources.cpus = 1.5;
        let mut l = VmLaunch::for_spec(
            Path::new("/usr/bin/qemu-system-x86_64"),
            &spec,
            Accel::Tcg,
            Path::new("/k"),
            Path::new("/i"),
            "console=ttyS0",
            "virtio-net-pci",
            VmFiles::new("/run/away/qemu/c1"),
        );
        l.incoming = Some("defer".into());
        let a = l.argv().join(" ");
        assert!(a.contains("-accel tcg -m 256 -smp 2"), "{a}");
        assert!(a.contains("hostfwd=tcp:0.0.0.0:18080-:8080"), "{a}");
        assert!(a.contains("-qmp unix:/run/away/qemu/c1/qmp.sock,server=on,wait=off"), "{a}");
        assert!(a.contains("-device virtio-balloon-pci,free-page-hint=on,iothread=balloon-io"), "{a}");
        assert!(a.ends_with("-daemonize -incoming defer"), "{a}");
        assert!(a.contains("-device virtio-net-pci,netdev=n0 "), "{a}");

        // on a lab network: the tap, the workload's MAC, the overlay's MTU, no forwards
        l.tap = Some(VmTap { ifname: "awt0123".into(), mac: "02:aa:0a:fa:00:05".into(), mtu: 1450 });
        let a = l.argv().join(" ");
        assert!(a.contains("-netdev tap,id=n0,ifname=awt0123,script=no,downscript=no "), "{a}");
        assert!(a.contains("-device virtio-net-pci,netdev=n0,mac=02:aa:0a:fa:00:05,host_mtu=1450 "), "{a}");
        assert!(!a.contains("hostfwd"), "{a}");
    }

    #[test]
    fn the_cmdline_carries_the_overlay_address_and_no_gateway() {
        let c = cmdline_with_address(
            "console=ttyS0 quiet panic=-1 away.ip=10.0.2.15/24 away.gw=10.0.2.2",
            "10.250.0.5".parse().unwrap(),
            24,
        );
        assert_eq!(c, "console=ttyS0 quiet panic=-1 away.ip=10.250.0.5/24");
    }
}
