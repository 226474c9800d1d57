//! The paper's measurements (QEMU/KVM live migration, pre-copy): the reference series
//! of the plots. Only these points exist; every other point of the series is absent.
//! They were measured on the research's hardware with its VM, not here.

use crate::{LinkKind, Load};

/// One published number.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReferencePoint {
    pub link: LinkKind,
    pub load: Load,
    /// Migration time in seconds; None: the migration never converged.
    pub total_s: Option<f64>,
    /// As the paper puts it.
    pub text: &'static str,
}

/// Where the numbers come from, for labels.
pub const SOURCE: &str = "paper (QEMU/KVM pre-copy, its own VM and hardware; not measured here)";

pub const POINTS: [ReferencePoint; 4] = [
    ReferencePoint {
        link: LinkKind::Lan,
        load: Load::Idle,
        total_s: Some(12.547),
        text: "12.547 s idle at 1 Gbit/s (938 Mbit/s net)",
    },
    ReferencePoint {
        link: LinkKind::Wan,
        load: Load::Idle,
        total_s: Some(531.0),
        text: "≈531 s idle over 37 Mbit/s, 36.784 ms",
    },
    ReferencePoint {
        link: LinkKind::Wan,
        load: Load::Ram(80),
        total_s: Some(1992.0),
        text: "≈1992 s at 80 % RAM over 37 Mbit/s, 36.784 ms",
    },
    ReferencePoint { link: LinkKind::Wan, load: Load::Ram(100), total_s: None, text: "100 % RAM: never converged" },
];

/// The reference points of `link`.
pub fn points(link: LinkKind) -> impl Iterator<Item = &'static ReferencePoint> {
    POINTS.iter().filter(move |p| p.link == link)
}
