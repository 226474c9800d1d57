//! The container migration mode a user asks for (`away migrate --mode`, the broker's
//! `POST /v1/migrations`). What `auto` picks, by measuring the workload, is
//! `away_migrate::mode`'s business.

use std::fmt;
use std::str::FromStr;

/// The mode a user asks for (`away migrate --mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ContainerMode {
    /// Stop-and-copy, streamed where the runtime allows it.
    StopCopy,
    /// Stop-and-copy through a checkpoint on disk, then the transfer, then the restore.
    Staged,
    Lazy,
    #[default]
    Auto,
}

impl fmt::Display for ContainerMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ContainerMode::StopCopy => "stop-copy",
            ContainerMode::Staged => "staged",
            ContainerMode::Lazy => "lazy",
            ContainerMode::Auto => "auto",
        })
    }
}

impl FromStr for ContainerMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stop-copy" | "stop-and-copy" => Ok(ContainerMode::StopCopy),
            "staged" | "stop-copy-staged" => Ok(ContainerMode::Staged),
            "lazy" | "post-copy" => Ok(ContainerMode::Lazy),
            "auto" => Ok(ContainerMode::Auto),
            _ => Err(format!("{s:?}: expected stop-copy, staged, lazy or auto")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for m in [ContainerMode::StopCopy, ContainerMode::Lazy, ContainerMode::Auto] {
            assert_eq!(m.to_string().parse::<ContainerMode>().unwrap(), m);
        }
        assert!("fast".parse::<ContainerMode>().unwrap_err().contains("stop-copy, staged, lazy or auto"));
    }
}
