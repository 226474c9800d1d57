//! The workload spec: what a user asks away to run. Loaded from YAML or JSON; every
//! error names the field (dotted path) and, when it can be found, the line.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::node::{Arch, CpuVendor, Tier};
use crate::size::ByteSize;

/// How a workload may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum WorkloadKind {
    /// A container when the node has a healthy container runtime for the image's
    /// architecture, a VM otherwise.
    #[default]
    Auto,
    /// A container or nothing.
    Container,
    /// Always a VM (legacy apps that need their own kernel).
    Vm,
}

/// The runtimes away drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    Containerd,
    Docker,
    Qemu,
}

impl RuntimeKind {
    pub const ALL: [RuntimeKind; 3] = [RuntimeKind::Containerd, RuntimeKind::Docker, RuntimeKind::Qemu];
    pub fn is_container(self) -> bool {
        !matches!(self, RuntimeKind::Qemu)
    }
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RuntimeKind::Containerd => "containerd",
            RuntimeKind::Docker => "docker",
            RuntimeKind::Qemu => "qemu",
        })
    }
}

/// CPU and memory the workload gets (container limits, or the VM's size).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// At least 4Mi.
    #[serde(default = "Resources::default_memory")]
    #[cfg_attr(feature = "openapi", schema(default = "256Mi"))]
    pub memory: ByteSize,
    /// CPUs in (0, 1024], fractions allowed.
    #[serde(default = "Resources::default_cpus")]
    #[cfg_attr(feature = "openapi", schema(exclusive_minimum = 0.0, maximum = 1024.0, default = 1.0, example = 0.5))]
    pub cpus: f64,
}

impl Resources {
    fn default_memory() -> ByteSize {
        ByteSize::mib(256)
    }
    fn default_cpus() -> f64 {
        1.0
    }
}

impl Default for Resources {
    fn default() -> Self {
        Resources { memory: Self::default_memory(), cpus: Self::default_cpus() }
    }
}

/// A port the workload listens on, published on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PortMapping {
    /// Port inside the container or VM.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 65535))]
    #[serde(deserialize_with = "crate::whole::de")]
    pub container: u16,
    /// Port on the node; omitted means "the same as `container`".
    #[serde(default, deserialize_with = "crate::whole::opt", skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 65535))]
    pub host: Option<u16>,
}

impl PortMapping {
    pub fn host_port(&self) -> u16 {
        self.host.unwrap_or(self.container)
    }
}

/// Where the workload may run: the feasibility filters of placement.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PlacementConstraints {
    /// Allowed tiers; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tiers: Vec<Tier>,
    /// Required architecture; default: the image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<Arch>,
    /// Required CPU vendor (rarely needed; containers move across vendors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_vendor: Option<CpuVendor>,
    /// CPU flags the workload needs (e.g. `avx2`).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub cpu_flags: BTreeSet<String>,
    /// Insist on one runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimeKind>,
    /// Prefer running on the user's own client machine when it can take the load.
    #[serde(default)]
    pub prefer_client: bool,
}

/// A lab workload: what to run, with what resources, where it may go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Unique name: lower-case letters, digits and '-', at most 63 characters.
    #[cfg_attr(feature = "openapi", schema(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", example = "counter"))]
    pub name: String,
    /// Image reference (`away/counter:latest`) or path to an image tar built by `away image build`.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, pattern = r"\S", example = "away/counter:latest"))]
    pub image: String,
    #[serde(default)]
    pub kind: WorkloadKind,
    /// Replaces the image's CMD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(min_items = 1))]
    pub command: Option<Vec<String>>,
    /// Added to the image's environment. Names are non-empty, without '=' or NUL.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::openapi::env_schema))]
    pub env: BTreeMap<String, String>,
    /// Each host port at most once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::openapi::ports_schema))]
    pub ports: Vec<PortMapping>,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub placement: PlacementConstraints,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Replaces the image's USER: `name`, `uid`, `name:group` or `uid:gid`; names are
    /// looked up in the image's /etc/passwd and /etc/group (containers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(pattern = r"^[!-9;-~]+(:[!-9;-~]+)?$", example = "nobody:nogroup"))]
    pub user: Option<String>,
    /// Changes to Docker's default capability set (containers only).
    #[serde(default, skip_serializing_if = "Capabilities::is_empty")]
    pub capabilities: Capabilities,
    /// The system call filter of a container.
    #[serde(default, skip_serializing_if = "Seccomp::is_default")]
    pub seccomp: Seccomp,
    /// The lab network (VXLAN overlay) the workload joins when the broker runs one
    /// (`default` when unset): lower-case letters, digits and '-'. docs/network.md.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(pattern = r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$", example = "lab-1"))]
    pub network: Option<String>,
    /// The workload's address on its network, written by the broker's address
    /// management when it accepts the workload: it travels with the workload on every
    /// move. A submitted spec must not set it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(read_only))]
    pub overlay: Option<crate::OverlayAddress>,
    /// A writable disk (VMs only): a copy-on-write overlay on a base image of the
    /// node's disk store. What the guest writes lives in the overlay, and moves with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskSpec>,
    /// Named volumes of a container (containerd only): directories of the node, mounted
    /// read-write at their paths, that move with the workload (docs/migration.md,
    /// "Volumes").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::openapi::volumes_schema))]
    pub volumes: Vec<VolumeSpec>,
}

/// A container's named volume: a directory the node keeps for the workload
/// (`<state>/volumes/<namespace>/<workload>/<name>`), mounted read-write at `path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    /// Lower-case letters, digits and '-', at most 63 characters; unique in the spec.
    #[cfg_attr(feature = "openapi", schema(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", example = "data"))]
    pub name: String,
    /// Where the container sees it: an absolute path, not `/`.
    #[cfg_attr(feature = "openapi", schema(example = "/data", pattern = r"^(/[A-Za-z0-9_-][A-Za-z0-9._-]*)+$"))]
    pub path: String,
}

/// A VM's disk: a base image named by digest (qcow2 or raw, in the node's disk store,
/// `away disk import`) and the size the guest sees. The VM writes only to its own
/// qcow2 overlay on that base (docs/vm.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// `sha256:<64 hex>` of the base image file.
    #[cfg_attr(feature = "openapi", schema(pattern = r"^sha256:[0-9a-f]{64}$"))]
    pub base: String,
    /// The disk's size as the guest sees it (at least the base image's size).
    #[cfg_attr(feature = "openapi", schema(example = "256Mi"))]
    pub size: ByteSize,
    /// Where the guest mounts the disk's ext4 file system; unset: the guest gets the
    /// block device (`/dev/vda`) and mounts nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(example = "/data", pattern = r"^(/[A-Za-z0-9_-][A-Za-z0-9._-]*)+$"))]
    pub mount: Option<String>,
}

impl DiskSpec {
    /// The hex part of [`DiskSpec::base`], when it is a well-formed digest.
    pub fn base_hex(&self) -> Option<&str> {
        let hex = self.base.strip_prefix("sha256:")?;
        (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))).then_some(hex)
    }
}

/// Capabilities added to or dropped from the default set (Docker's fourteen: CHOWN,
/// DAC_OVERRIDE, FSETID, FOWNER, MKNOD, NET_RAW, SETGID, SETUID, SETFCAP, SETPCAP,
/// NET_BIND_SERVICE, SYS_CHROOT, KILL, AUDIT_WRITE). Names with or without `CAP_`, any
/// case; `ALL` means every capability. Drops apply first, then adds (as Docker does).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::openapi::capability_list_schema))]
    pub add: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::openapi::capability_list_schema))]
    pub drop: Vec<String>,
}

impl Capabilities {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.drop.is_empty()
    }

    /// The default set with the drops and adds applied, as `CAP_` names, sorted.
    /// Unknown names are left out (`validate` refuses them).
    pub fn effective_set(&self) -> BTreeSet<&'static str> {
        let names = |list: &[String]| -> (bool, BTreeSet<&'static str>) {
            let all = list.iter().any(|c| c.eq_ignore_ascii_case("all"));
            (all, list.iter().filter_map(|c| capability_name(c)).collect())
        };
        let (drop_all, drop) = names(&self.drop);
        let (add_all, add) = names(&self.add);
        let mut set: BTreeSet<&'static str> =
            if drop_all { BTreeSet::new() } else { DEFAULT_CAPABILITIES.iter().copied().collect() };
        set.retain(|c| !drop.contains(c));
        if add_all {
            set.extend(ALL_CAPABILITIES);
        }
        set.extend(add);
        set
    }
}

/// Docker's default capabilities (moby's `caps.DefaultCapabilities`).
pub const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every capability Linux knows (capability.h, up to CAP_CHECKPOINT_RESTORE).
pub const ALL_CAPABILITIES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The canonical `CAP_` name of `name` (with or without `CAP_`, any case), None when
/// Linux has no such capability (`ALL` included: it is not one capability).
pub fn capability_name(name: &str) -> Option<&'static str> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    ALL_CAPABILITIES.iter().copied().find(|c| &c[4..] == bare)
}

/// How a container's system calls are filtered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Seccomp {
    /// Docker's default profile (on Docker its own; on containerd away's copy of it).
    #[default]
    Default,
    /// No filter (Docker's `--security-opt seccomp=unconfined`).
    Unconfined,
}

impl Seccomp {
    pub fn is_default(&self) -> bool {
        *self == Seccomp::Default
    }
}

/// The text format of a spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecFormat {
    Yaml,
    Json,
}

impl SpecFormat {
    /// By file extension, else by content (JSON starts with `{`). YAML is the default.
    pub fn detect(path: Option<&Path>, text: &str) -> SpecFormat {
        match path.and_then(|p| p.extension()).and_then(|e| e.to_str()) {
            Some("json") => SpecFormat::Json,
            Some("yaml" | "yml") => SpecFormat::Yaml,
            _ if text.trim_start().starts_with('{') => SpecFormat::Json,
            _ => SpecFormat::Yaml,
        }
    }
}

/// One problem in a spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    /// Dotted path (`resources.memory`, `ports[1].host`); empty for the whole document.
    pub field: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.field.is_empty(), self.line) {
            (false, Some(l)) => write!(f, "{} (line {l}): {}", self.field, self.message),
            (false, None) => write!(f, "{}: {}", self.field, self.message),
            (true, Some(l)) => write!(f, "line {l}: {}", self.message),
            (true, None) => f.write_str(&self.message),
        }
    }
}

/// A spec that cannot be used, with every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecError {
    /// Where the spec came from (a path, or "<request body>").
    pub source_name: String,
    pub errors: Vec<FieldError>,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid workload spec {}: ", self.source_name)?;
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl WorkloadSpec {
    /// Read and parse a spec file (YAML or JSON by extension or content).
    pub fn load(path: &Path) -> Result<WorkloadSpec, SpecError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| SpecError {
            source_name: name.clone(),
            errors: vec![FieldError { field: String::new(), line: None, message: format!("cannot read: {e}") }],
        })?;
        Self::parse(&text, SpecFormat::detect(Some(path), &text), &name)
    }

    /// Parse and validate a spec. `source_name` only labels errors.
    pub fn parse(text: &str, format: SpecFormat, source_name: &str) -> Result<WorkloadSpec, SpecError> {
        let fail = |errors| SpecError { source_name: source_name.to_string(), errors };
        let spec: WorkloadSpec = match format {
            SpecFormat::Json => {
                let mut de = serde_json::Deserializer::from_str(text);
                serde_path_to_error::deserialize(&mut de).map_err(|e| {
                    let line = Some(e.inner().line()).filter(|l| *l > 0);
                    fail(vec![syntax_error(text, format, e.path().to_string(), line, e.inner().to_string())])
                })?
            }
            SpecFormat::Yaml => {
                let de = serde_yaml_ng::Deserializer::from_str(text);
                serde_path_to_error::deserialize(de).map_err(|e| {
                    let line = e.inner().location().map(|l| l.line());
                    fail(vec![syntax_error(text, format, e.path().to_string(), line, e.inner().to_string())])
                })?
            }
        };
        let mut errors = spec.validate();
        if errors.is_empty() {
            return Ok(spec);
        }
        for e in &mut errors {
            e.line = locate_field(text, format, &e.field);
        }
        Err(fail(errors))
    }

    /// Semantic checks that serde cannot express. Lines are filled in by the caller.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let mut bad =
            |field: &str, message: String| errors.push(FieldError { field: field.to_string(), line: None, message });
        if let Err(why) = check_name(&self.name) {
            bad("name", why);
        }
        if self.image.trim().is_empty() {
            bad("image", "must name an image (e.g. away/counter:latest) or an image tar".into());
        }
        if let Some(cmd) = &self.command {
            if cmd.is_empty() {
                bad("command", "must not be empty; omit it to use the image's CMD".into());
            }
        }
        for key in self.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                bad(&format!("env.{key}"), "environment variable names must be non-empty without '=' or NUL".into());
            }
        }
        let min_memory = ByteSize::mib(4);
        if self.resources.memory < min_memory {
            bad("resources.memory", format!("{} is too small; at least {min_memory}", self.resources.memory));
        }
        if !(self.resources.cpus > 0.0 && self.resources.cpus <= 1024.0) {
            bad(
                "resources.cpus",
                format!("{} is out of range; use a number of CPUs in (0, 1024], e.g. 0.5", self.resources.cpus),
            );
        }
        if let Some(net) = &self.network {
            let ok = (1..=32).contains(&net.len())
                && net.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !net.starts_with('-')
                && !net.ends_with('-');
            if !ok {
                bad("network", format!("{net:?}: 1-32 lower-case letters, digits and '-', not at either end"));
            }
        }
        let mut host_ports = BTreeSet::new();
        for (i, p) in self.ports.iter().enumerate() {
            if p.container == 0 {
                bad(&format!("ports[{i}].container"), "port 0 is not a port; use 1-65535".into());
            }
            if p.host == Some(0) {
                bad(&format!("ports[{i}].host"), "port 0 is not a port; use 1-65535".into());
            }
            if !host_ports.insert(p.host_port()) {
                bad(&format!("ports[{i}].host"), format!("host port {} is published twice", p.host_port()));
            }
        }
        for (field, list) in
            [("capabilities.add", &self.capabilities.add), ("capabilities.drop", &self.capabilities.drop)]
        {
            for c in list.iter().filter(|c| !c.eq_ignore_ascii_case("all") && capability_name(c).is_none()) {
                bad(field, format!("{c:?} is not a Linux capability; write e.g. NET_ADMIN or CAP_NET_ADMIN, or ALL"));
            }
        }
        if let Some(user) = &self.user {
            // printable ASCII but ':' in each part: the schema's pattern says the same
            // (a Unicode "whitespace" rule differs between Rust and the schema's regex)
            let parts: Vec<&str> = user.split(':').collect();
            let plain = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_graphic());
            if parts.len() > 2 || !parts.iter().all(|p| plain(p)) {
                bad("user", format!("{user:?} is not a user; write name, uid, name:group or uid:gid"));
            }
        }
        if self.kind == WorkloadKind::Vm && self.placement.runtime.is_some_and(RuntimeKind::is_container) {
            bad("placement.runtime", "kind vm needs runtime qemu".into());
        }
        if self.kind == WorkloadKind::Container && self.placement.runtime == Some(RuntimeKind::Qemu) {
            bad("placement.runtime", "kind container cannot run on qemu; use kind vm or auto".into());
        }
        if let Some(disk) = &self.disk {
            if self.kind != WorkloadKind::Vm {
                bad("kind", "a workload with a disk is a vm: set kind: vm".into());
            }
            if disk.base_hex().is_none() {
                bad("disk.base", format!("{:?} is not a digest; write sha256:<64 lower-case hex>", disk.base));
            }
            if disk.size < ByteSize::mib(1) {
                bad("disk.size", format!("{} is too small; at least 1Mi", disk.size));
            }
            if let Some(m) = &disk.mount {
                if !is_mount_point(m) {
                    bad("disk.mount", format!("{m:?} is not a mount point; write an absolute path such as /data"));
                }
            }
        }
        if !self.volumes.is_empty() && self.kind == WorkloadKind::Vm {
            bad("volumes", "volumes are for containers; a vm keeps its data on its disk (disk.mount)".into());
        }
        let (mut names, mut paths) = (BTreeSet::new(), BTreeSet::new());
        for (i, v) in self.volumes.iter().enumerate() {
            if let Err(why) = check_name(&v.name) {
                bad(&format!("volumes[{i}].name"), why);
            } else if !names.insert(v.name.as_str()) {
                bad(&format!("volumes[{i}].name"), format!("volume {:?} is listed twice", v.name));
            }
            if !is_mount_point(&v.path) {
                bad(
                    &format!("volumes[{i}].path"),
                    format!("{:?} is not a mount point; write an absolute path such as /data", v.path),
                );
            } else if !paths.insert(v.path.as_str()) {
                bad(&format!("volumes[{i}].path"), format!("{:?} is mounted twice", v.path));
            }
        }
        errors
    }
}

/// An error serde raised while parsing. Its position can be the enclosing mapping's (for
/// errors raised by a field's own parser, such as a size without a unit), so the field's
/// own line wins when it can be found; the position is then dropped from the message.
fn syntax_error(
    text: &str,
    format: SpecFormat,
    path: String,
    parser_line: Option<usize>,
    message: String,
) -> FieldError {
    // serde_path_to_error renders the root as "."
    let field = if path == "." { String::new() } else { path };
    let mut message = message;
    if let Some(at) = message.rfind(" at line ") {
        message.truncate(at);
    }
    // serde_yaml_ng prefixes the parent's path ("resources: size ..."): the field says it better.
    if let Some((prefix, rest)) = message.split_once(": ") {
        if !field.is_empty() && field.starts_with(prefix) && !prefix.contains(' ') {
            message = rest.to_string();
        }
    }
    let line = locate_field(text, format, &field).or(parser_line);
    FieldError { field, line, message }
}

/// The schema's mount pattern: '/'-separated names of letters, digits, '.', '_' and
/// '-', none starting with '.' (so no "." or ".." parts), and not `/` itself.
fn is_mount_point(m: &str) -> bool {
    let name_ok = |p: &str| {
        p.bytes().next().is_some_and(|b| b != b'.')
            && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    m.strip_prefix('/').is_some_and(|rest| rest.split('/').all(name_ok))
}

/// Names become container IDs, Docker names and hostnames: keep them DNS labels.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!("{name:?} must be 1-63 characters"));
    }
    if !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
        return Err(format!("{name:?} may contain only lower-case letters, digits and '-'"));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(format!("{name:?} must not start or end with '-'"));
    }
    Ok(())
}

/// Best-effort line of a dotted field path in the source text, for errors found after
/// parsing (serde keeps no spans). Follows the path's keys in document order; written by
/// hand because neither serde_yaml_ng nor serde_json expose spans of parsed values.
fn locate_field(text: &str, format: SpecFormat, field: &str) -> Option<usize> {
    if field.is_empty() {
        return None;
    }
    let mut offset = 0;
    for seg in field.split('.') {
        let mut parts = seg.split('[');
        let key = parts.next().unwrap_or(seg);
        if !key.is_empty() {
            let found = match format {
                SpecFormat::Json => text[offset..].find(&format!("\"{key}\"")),
                SpecFormat::Yaml => find_yaml_key(&text[offset..], key),
            }?;
            // past the key's first character, which may take more than one byte
            let at = offset + found;
            offset = at + text[at..].chars().next().map_or(0, char::len_utf8);
        }
        // `ports[1]`: step to the second item of the sequence (YAML block sequences only)
        for index in parts.filter_map(|p| p.trim_end_matches(']').parse::<usize>().ok()) {
            if format == SpecFormat::Yaml {
                offset += nth_yaml_item(&text[offset..], index)?;
            }
        }
    }
    Some(text[..offset].matches('\n').count() + 1)
}

/// Offset of the `index`-th block sequence item ("- ...") of the first sequence in `text`.
fn nth_yaml_item(text: &str, index: usize) -> Option<usize> {
    let mut pos = 0;
    let mut seen = 0;
    let mut indent = None;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        let this_indent = line.len() - trimmed.len();
        let is_item = trimmed.starts_with("- ") || trimmed.trim_end() == "-";
        if is_item && indent.is_none_or(|i| i == this_indent) {
            indent = Some(this_indent);
            if seen == index {
                return Some(pos + this_indent);
            }
            seen += 1;
        }
        pos += line.len();
    }
    None
}

fn find_yaml_key(text: &str, key: &str) -> Option<usize> {
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        let body = line.trim_start().trim_start_matches("- ").trim_start();
        for candidate in [key.to_string(), format!("\"{key}\""), format!("'{key}'")] {
            if let Some(rest) = body.strip_prefix(candidate.as_str()) {
                if rest.trim_start().starts_with(':') {
                    return Some(pos + line.len() - line.trim_start().len());
                }
            }
        }
        pos += line.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the fuzzer (fuzz/regressions/workload_spec/multibyte-key-line-lookup): a
    /// field whose name starts with a character of several bytes made the line lookup
    /// slice inside that character and panic.
    #[test]
    fn an_unknown_field_starting_with_a_multibyte_character_is_refused_with_its_line() {
        let text = "name: a\nimage: b\n  \u{7a0}x: 1\n";
        let err = WorkloadSpec::parse(text, SpecFormat::Yaml, "t").unwrap_err();
        assert_eq!(err.errors.len(), 1, "{err}");
        let text = "name: a\nimage: b\n\u{7a0}x: 1\n";
        let err = WorkloadSpec::parse(text, SpecFormat::Yaml, "t").unwrap_err();
        assert_eq!(err.errors[0].line, Some(3), "{err}");
        let err = WorkloadSpec::parse("{\"name\": \"a\", \"\u{7a0}x\": 1}", SpecFormat::Json, "t").unwrap_err();
        assert_eq!(err.errors[0].line, Some(1), "{err}");
    }

    const GOOD_YAML: &str = "\
name: counter
image: away/counter:latest
kind: auto
env:
  COUNTER_STEP_MS: \"100\"
ports:
  - container: 8080
    host: 18080
resources:
  memory: 64Mi
  cpus: 0.5
placement:
  tiers: [cloud, client]
  cpu_flags: [sse4_2]
  prefer_client: true
";

    fn parse_yaml(text: &str) -> Result<WorkloadSpec, SpecError> {
        WorkloadSpec::parse(text, SpecFormat::Yaml, "test.yaml")
    }

    #[test]
    fn a_disk_names_a_digest_a_size_and_a_mount_point_and_needs_kind_vm() {
        let hex = "ab".repeat(32);
        let s = parse_yaml(&format!(
            "name: a\nimage: x\nkind: vm\ndisk:\n  base: sha256:{hex}\n  size: 256Mi\n  mount: /data\n"
        ))
        .unwrap();
        let d = s.disk.unwrap();
        assert_eq!((d.base_hex(), d.size, d.mount.as_deref()), (Some(hex.as_str()), ByteSize::mib(256), Some("/data")));
        let e = parse_yaml(&format!("name: a\nimage: x\ndisk:\n  base: sha256:{hex}\n  size: 1Mi\n")).unwrap_err();
        assert!(e.to_string().contains("kind") && e.to_string().contains("set kind: vm"), "{e}");
        let e = parse_yaml("name: a\nimage: x\nkind: vm\ndisk:\n  base: latest\n  size: 64Ki\n  mount: data/../x\n")
            .unwrap_err()
            .to_string();
        for want in ["disk.base", "is not a digest", "disk.size", "too small", "disk.mount", "not a mount point"] {
            assert!(e.contains(want), "{want} missing from {e}");
        }
    }

    #[test]
    fn volumes_need_dns_label_names_and_absolute_paths_each_once() {
        let s = parse_yaml("name: a\nimage: x\nvolumes:\n  - name: data\n    path: /data\n").unwrap();
        assert_eq!(s.volumes, [VolumeSpec { name: "data".into(), path: "/data".into() }]);
        let e = parse_yaml(
            "name: a\nimage: x\nvolumes:\n  - name: Data_1\n    path: data\n  - name: b\n    path: /\n  \
             - name: b\n    path: /x\n  - name: c\n    path: /x\n",
        )
        .unwrap_err()
        .to_string();
        for want in [
            "volumes[0].name",
            "lower-case",
            "volumes[0].path",
            "not a mount point",
            "volumes[1].path",
            "volumes[2].name",
            "listed twice",
            "volumes[3].path",
            "mounted twice",
        ] {
            assert!(e.contains(want), "{want} missing from {e}");
        }
        let e = parse_yaml("name: a\nimage: x\nkind: vm\nvolumes:\n  - name: d\n    path: /d\n").unwrap_err();
        assert!(e.to_string().contains("volumes are for containers"), "{e}");
        let e = parse_yaml("name: a\nimage: x\nvolumes:\n  - name: d\n    path: /d\n    size: 1Gi\n").unwrap_err();
        assert!(e.to_string().contains("size"), "{e}");
    }

    #[test]
    fn the_volume_example_parses() {
        let text = include_str!("../../../examples/volume.yaml");
        let spec = WorkloadSpec::parse(text, SpecFormat::Yaml, "examples/volume.yaml").unwrap();
        assert_eq!(spec.volumes, [VolumeSpec { name: "data".into(), path: "/data".into() }]);
    }

    #[test]
    fn good_yaml_parses() {
        let spec = parse_yaml(GOOD_YAML).unwrap();
        assert_eq!(spec.name, "counter");
        assert_eq!(spec.resources.memory, ByteSize::mib(64));
        assert_eq!(spec.ports[0].host_port(), 18080);
        assert_eq!(spec.placement.tiers, vec![Tier::Cloud, Tier::Client]);
        assert!(spec.placement.prefer_client);
    }

    #[test]
    fn json_round_trip_parses_to_the_same_spec() {
        let spec = parse_yaml(GOOD_YAML).unwrap();
        let json = serde_json::to_string_pretty(&spec).unwrap();
        let again = WorkloadSpec::parse(&json, SpecFormat::detect(None, &json), "test.json").unwrap();
        assert_eq!(spec, again);
    }

    #[test]
    fn defaults_apply() {
        let spec = parse_yaml("name: a\nimage: x\n").unwrap();
        assert_eq!(spec.kind, WorkloadKind::Auto);
        assert_eq!(spec.resources, Resources::default());
    }

    #[test]
    fn unknown_field_is_named_with_its_line() {
        let err = parse_yaml("name: a\nimage: x\nresources:\n  memroy: 1Gi\n").unwrap_err();
        let e = &err.errors[0];
        assert_eq!(e.field, "resources.memroy");
        assert_eq!(e.line, Some(4), "{err}");
        assert!(e.message.contains("unknown field `memroy`"), "{err}");
    }

    #[test]
    fn bad_unit_is_named_with_its_line() {
        let err = parse_yaml("name: a\nimage: x\nresources:\n  cpus: 1\n  memory: 256\n").unwrap_err();
        let e = &err.errors[0];
        assert_eq!(e.field, "resources.memory");
        assert_eq!(e.line, Some(5), "{err}");
        assert_eq!(e.message, "size \"256\" has no unit; write e.g. \"256Mi\" or \"1Gi\"");
    }

    #[test]
    fn wrong_type_and_enum_values_are_named() {
        let err = parse_yaml("name: a\nimage: x\nkind: lxc\n").unwrap_err();
        assert_eq!(err.errors[0].field, "kind");
        assert_eq!(err.errors[0].line, Some(3));
        let err = parse_yaml("name: a\nimage: x\nports:\n  - container: http\n").unwrap_err();
        assert_eq!(err.errors[0].field, "ports[0].container");
        assert_eq!(err.errors[0].line, Some(4));
    }

    #[test]
    fn missing_required_field_is_named() {
        let err = parse_yaml("name: a\n").unwrap_err();
        assert!(err.to_string().contains("missing field `image`"), "{err}");
    }

    #[test]
    fn semantic_errors_are_all_reported_with_lines() {
        let text = "name: Bad_Name\nimage: x\nresources:\n  memory: 1Mi\n  cpus: 0\nports:\n  - container: 80\n  - container: 81\n    host: 80\n";
        let err = parse_yaml(text).unwrap_err();
        let fields: Vec<_> = err.errors.iter().map(|e| (e.field.as_str(), e.line)).collect();
        assert_eq!(
            fields,
            vec![
                ("name", Some(1)),
                ("resources.memory", Some(4)),
                ("resources.cpus", Some(5)),
                ("ports[1].host", Some(9))
            ]
        );
        assert!(err.to_string().starts_with("invalid workload spec test.yaml: name (line 1):"), "{err}");
    }

    #[test]
    fn json_errors_carry_lines() {
        let text = "{\n  \"name\": \"a\",\n  \"image\": \"x\",\n  \"resources\": {\"memory\": \"2Mi\"}\n}";
        let err = WorkloadSpec::parse(text, SpecFormat::Json, "t.json").unwrap_err();
        assert_eq!(err.errors[0].field, "resources.memory");
        assert_eq!(err.errors[0].line, Some(4));
        let err = WorkloadSpec::parse("{\"name\": \"a\",\n \"image\": 3}", SpecFormat::Json, "t.json").unwrap_err();
        assert_eq!(err.errors[0].field, "image");
        assert_eq!(err.errors[0].line, Some(2));
    }

    #[test]
    fn syntax_errors_carry_lines() {
        let err = parse_yaml("name: a\nimage: [unclosed\n").unwrap_err();
        assert!(err.errors[0].line.is_some(), "{err}");
    }

    #[test]
    fn sequence_items_are_located_by_index() {
        let text = "name: a\nimage: x\nports:\n  - container: 80\n    host: 8080\n  - container: 81\n    host: 8080\n";
        let err = parse_yaml(text).unwrap_err();
        assert_eq!((err.errors[0].field.as_str(), err.errors[0].line), ("ports[1].host", Some(7)));
    }

    #[test]
    fn capabilities_seccomp_and_user_parse() {
        let spec = parse_yaml(
            "name: a\nimage: x\nuser: nobody:nogroup\ncapabilities:\n  add: [net_admin, CAP_SYS_PTRACE]\n  drop: [NET_RAW, cap_mknod]\nseccomp: unconfined\n",
        )
        .unwrap();
        assert_eq!(spec.user.as_deref(), Some("nobody:nogroup"));
        assert_eq!(spec.seccomp, Seccomp::Unconfined);
        let set = spec.capabilities.effective_set();
        assert!(set.contains("CAP_NET_ADMIN") && set.contains("CAP_SYS_PTRACE"), "{set:?}");
        assert!(!set.contains("CAP_NET_RAW") && !set.contains("CAP_MKNOD"), "{set:?}");
        assert_eq!(set.len(), 14);
        let defaults = parse_yaml("name: a\nimage: x\n").unwrap();
        assert_eq!(defaults.seccomp, Seccomp::Default);
        assert_eq!(defaults.capabilities.effective_set(), DEFAULT_CAPABILITIES.into_iter().collect());
    }

    #[test]
    fn all_drops_and_adds_everything() {
        let caps = |add: &[&str], drop: &[&str]| Capabilities {
            add: add.iter().map(|s| s.to_string()).collect(),
            drop: drop.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(caps(&["CHOWN"], &["ALL"]).effective_set(), BTreeSet::from(["CAP_CHOWN"]));
        assert_eq!(caps(&["all"], &[]).effective_set().len(), ALL_CAPABILITIES.len());
    }

    #[test]
    fn unknown_capabilities_and_bad_users_are_named_with_their_lines() {
        let text =
            "name: a\nimage: x\nuser: \"a:b:c\"\ncapabilities:\n  add:\n    - NET_ADMIN\n  drop: [CAP_NET_RAWW]\n";
        let err = parse_yaml(text).unwrap_err();
        let fields: Vec<_> = err.errors.iter().map(|e| (e.field.as_str(), e.line)).collect();
        assert_eq!(fields, vec![("capabilities.drop", Some(7)), ("user", Some(3))], "{err}");
        assert!(err.to_string().contains("\"CAP_NET_RAWW\" is not a Linux capability"), "{err}");
        let err = parse_yaml("name: a\nimage: x\nseccomp: strict\n").unwrap_err();
        assert_eq!((err.errors[0].field.as_str(), err.errors[0].line), ("seccomp", Some(3)));
    }

    /// The API's schema gives `user` the pattern `^[!-9;-~]+(:[!-9;-~]+)?$`: what it
    /// admits parses, and what it refuses is refused (schemathesis found a Unicode space
    /// the two had once judged apart).
    #[test]
    fn user_accepts_what_its_schema_pattern_admits() {
        for good in ["nobody", "1000:1000", "www-data:www-data", "a.b_c~!"] {
            assert!(parse_yaml(&format!("name: a\nimage: x\nuser: \"{good}\"\n")).is_ok(), "{good:?}");
        }
        for bad in ["", ":", "a:", "a b", "a\u{85}b", "\u{feff}", "ü", "a:b:c"] {
            let err = parse_yaml(&format!("name: a\nimage: x\nuser: \"{bad}\"\n")).unwrap_err();
            assert_eq!(err.errors[0].field, "user", "{bad:?}: {err}");
        }
    }

    #[test]
    fn vm_kind_with_container_runtime_is_refused() {
        let err = parse_yaml("name: a\nimage: x\nkind: vm\nplacement:\n  runtime: docker\n").unwrap_err();
        assert_eq!(err.errors[0].field, "placement.runtime");
        assert_eq!(err.errors[0].line, Some(5));
    }
}
