//! CPU identity from `/proc/cpuinfo`: what decides whether a VM or a CRIU image can
//! move to another node.

use std::collections::BTreeSet;

use away_model::{CpuInfo, CpuVendor};

/// Parse `/proc/cpuinfo` text. Uses the first processor block for identity (all cores
/// of one machine share vendor, model and flags) and counts the blocks for `cores`.
pub fn parse_cpuinfo(text: &str) -> CpuInfo {
    let mut vendor = None;
    let mut model = None;
    let mut family = None;
    let mut model_number = None;
    let mut flags = BTreeSet::new();
    let mut cores = 0u32;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else { continue };
        let (key, value) = (key.trim(), value.trim());
        match key {
            "processor" => cores += 1,
            "vendor_id" | "CPU implementer" if vendor.is_none() => vendor = Some(CpuVendor::from_vendor_id(value)),
            "model name" if model.is_none() => model = Some(value.to_string()),
            "cpu family" if family.is_none() => family = value.parse().ok(),
            "model" if model_number.is_none() => model_number = value.parse().ok(),
            // x86 says "flags", arm64 says "Features"
            "flags" | "Features" if flags.is_empty() => flags = value.split_whitespace().map(str::to_string).collect(),
            _ => {}
        }
    }
    CpuInfo {
        vendor: vendor.unwrap_or_else(|| CpuVendor::Other("unknown".into())),
        model: model.unwrap_or_else(|| "unknown".into()),
        family,
        model_number,
        cores: cores.max(1),
        flags,
    }
}

/// The host's CPU.
pub fn host_cpu() -> std::io::Result<CpuInfo> {
    Ok(parse_cpuinfo(&std::fs::read_to_string("/proc/cpuinfo")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const AMD: &str = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu vme sse4_2 avx2\n\nprocessor\t: 1\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu vme sse4_2 avx2\n";

    #[test]
    fn parses_x86_cpuinfo() {
        let cpu = parse_cpuinfo(AMD);
        assert_eq!(cpu.vendor, CpuVendor::Amd);
        assert_eq!(cpu.model, "AMD EPYC 7B13");
        assert_eq!(cpu.family, Some(25));
        assert_eq!(cpu.model_number, Some(1));
        assert_eq!(cpu.cores, 2);
        assert!(cpu.flags.contains("avx2") && cpu.flags.contains("sse4_2"));
    }

    #[test]
    fn host_cpu_is_readable() {
        let cpu = host_cpu().unwrap();
        assert!(cpu.cores >= 1);
        assert!(!cpu.flags.is_empty());
    }
}
