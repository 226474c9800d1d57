//! What a node is: its place in the topology (tier), its CPU (what decides whether a
//! VM or a CRIU image can move to it), its runtimes and hypervisor. Agents report it;
//! the broker places and checks migrations with it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::spec::RuntimeKind;

/// Where a node stands between the data centre and the student's machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Cloud,
    Edge,
    Client,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Cloud => "cloud",
            Tier::Edge => "edge",
            Tier::Client => "client",
        })
    }
}

/// CPU architecture in OCI/Go naming (`amd64`, `arm64`, …): the names images carry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(transparent)]
pub struct Arch(pub String);

impl Arch {
    /// Translate Rust/kernel names (`x86_64`, `aarch64`) to OCI names.
    pub fn from_kernel_name(name: &str) -> Arch {
        Arch(
            match name {
                "x86_64" => "amd64",
                "aarch64" => "arm64",
                "x86" | "i686" | "i386" => "386",
                "arm" | "armv7l" => "arm",
                "powerpc64" | "ppc64le" => "ppc64le",
                "s390x" => "s390x",
                "riscv64" => "riscv64",
                other => other,
            }
            .to_string(),
        )
    }
    /// The architecture this binary was built for.
    pub fn host() -> Arch {
        Arch::from_kernel_name(std::env::consts::ARCH)
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// CPU vendor as the CPUID vendor string reports it. VM live migration needs the same
/// vendor on both sides; CRIU restores across vendors when the features match.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuVendor {
    Intel,
    Amd,
    Hygon,
    Arm,
    #[serde(untagged)]
    Other(String),
}

impl CpuVendor {
    /// From `/proc/cpuinfo`'s `vendor_id` (x86) or `CPU implementer` (arm).
    pub fn from_vendor_id(id: &str) -> CpuVendor {
        match id.trim() {
            "GenuineIntel" => CpuVendor::Intel,
            "AuthenticAMD" => CpuVendor::Amd,
            "HygonGenuine" => CpuVendor::Hygon,
            "0x41" => CpuVendor::Arm,
            other => CpuVendor::Other(other.to_string()),
        }
    }
}

impl fmt::Display for CpuVendor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CpuVendor::Intel => f.write_str("intel"),
            CpuVendor::Amd => f.write_str("amd"),
            CpuVendor::Hygon => f.write_str("hygon"),
            CpuVendor::Arm => f.write_str("arm"),
            CpuVendor::Other(s) => f.write_str(s),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CpuInfo {
    pub vendor: CpuVendor,
    /// Marketing name, e.g. "AMD EPYC 7B13".
    pub model: String,
    /// CPUID family/model/stepping as `/proc/cpuinfo` reports them, when known.
    #[serde(default, deserialize_with = "crate::whole::opt", skip_serializing_if = "Option::is_none")]
    pub family: Option<u32>,
    #[serde(default, deserialize_with = "crate::whole::opt", skip_serializing_if = "Option::is_none")]
    pub model_number: Option<u32>,
    /// Logical CPUs online.
    #[serde(deserialize_with = "crate::whole::de")]
    pub cores: u32,
    /// Feature flags (`sse4_2`, `avx2`, …): what a guest or a restored process may use.
    pub flags: BTreeSet<String>,
}

/// A container runtime or hypervisor as a node has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RuntimeInfo {
    pub kind: RuntimeKind,
    /// Version reported by the daemon or binary; empty when unreachable.
    pub version: String,
    /// It answers and can run workloads now.
    pub healthy: bool,
    /// It can checkpoint and restore (CRIU reachable, Docker experimental, QMP migration).
    pub checkpoint: bool,
    /// Why it is unhealthy or cannot checkpoint, for people.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// How QEMU runs guests on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation, only when a probe guest really booted with it.
    Kvm,
    /// Software emulation: always works, much slower.
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HypervisorInfo {
    /// `qemu-system-x86_64 --version`, e.g. "10.0.2". VM migration needs equal versions.
    pub qemu_version: String,
    pub accel: Accel,
    /// Why this accelerator (e.g. "kvm probe guest printed nothing within 15 s").
    pub reason: String,
}

/// The node's link towards its users, as measured or configured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LinkInfo {
    pub rate_mbit: f64,
    pub latency_ms: f64,
}

/// Everything the broker knows about a node's capabilities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeInfo {
    /// 1-63 letters, digits, '-', '_' or '.': it travels in URLs and logs.
    #[cfg_attr(feature = "openapi", schema(pattern = r"^[A-Za-z0-9._-]{1,63}$"))]
    pub name: String,
    pub tier: Tier,
    pub arch: Arch,
    pub cpu: CpuInfo,
    #[serde(deserialize_with = "crate::whole::de")]
    pub memory_bytes: u64,
    pub kernel: String,
    pub runtimes: Vec<RuntimeInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor: Option<HypervisorInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<LinkInfo>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The VM disk base images in the node's disk store (`sha256:<hex>` each): a
    /// workload with a disk is placed only where its base is; a move copies it
    /// (docs/vm.md). Sent with every heartbeat.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub disk_bases: BTreeSet<String>,
}

impl NodeInfo {
    /// The runtime of this kind, if the node has it.
    pub fn runtime(&self, kind: RuntimeKind) -> Option<&RuntimeInfo> {
        self.runtimes.iter().find(|r| r.kind == kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendor_ids_map_to_vendors() {
        assert_eq!(CpuVendor::from_vendor_id("GenuineIntel"), CpuVendor::Intel);
        assert_eq!(CpuVendor::from_vendor_id("AuthenticAMD"), CpuVendor::Amd);
        assert_eq!(CpuVendor::from_vendor_id("Zhaoxin"), CpuVendor::Other("Zhaoxin".into()));
        assert_eq!(serde_json::to_string(&CpuVendor::Amd).unwrap(), "\"amd\"");
        assert_eq!(serde_json::from_str::<CpuVendor>("\"Zhaoxin\"").unwrap(), CpuVendor::Other("Zhaoxin".into()));
    }

    #[test]
    fn arch_uses_oci_names() {
        assert_eq!(Arch::from_kernel_name("x86_64").0, "amd64");
        assert_eq!(Arch::from_kernel_name("aarch64").0, "arm64");
    }
}
