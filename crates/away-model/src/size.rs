//! Byte sizes written the way people write them in specs: `256Mi`, `1Gi`, `512MB`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A size in bytes. Parses `<number><unit>` with binary (`Ki`, `Mi`, `Gi`, `Ti`, also
/// `KiB`…) or decimal (`k`, `M`, `G`, `T`, also `kB`…) units, or `B`. A bare number is
/// refused: "memory: 256" is ambiguous (bytes? MiB?) and a wrong guess is costly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ByteSizeError {
    #[error("empty size")]
    Empty,
    #[error("size {0:?} has no unit; write e.g. \"256Mi\" or \"1Gi\"")]
    NoUnit(String),
    #[error("size {input:?} has an unknown unit {unit:?}; use B, Ki, Mi, Gi, Ti (binary) or k, M, G, T (decimal)")]
    UnknownUnit { input: String, unit: String },
    #[error("size {0:?} is not a number followed by a unit")]
    NotANumber(String),
    #[error("size {0:?} is too large")]
    Overflow(String),
}

impl ByteSize {
    pub const fn mib(n: u64) -> Self {
        ByteSize(n * 1024 * 1024)
    }
    pub fn bytes(self) -> u64 {
        self.0
    }
    pub fn as_mib(self) -> u64 {
        self.0 / (1024 * 1024)
    }
}

impl FromStr for ByteSize {
    type Err = ByteSizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(ByteSizeError::Empty);
        }
        let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
        let (num, unit) = (&s[..split], s[split..].trim());
        if unit.is_empty() {
            return Err(ByteSizeError::NoUnit(s.to_string()));
        }
        let number: f64 = num.parse().map_err(|_| ByteSizeError::NotANumber(s.to_string()))?;
        let multiplier: u64 = match unit {
            "B" | "b" => 1,
            "Ki" | "KiB" => 1 << 10,
            "Mi" | "MiB" => 1 << 20,
            "Gi" | "GiB" => 1 << 30,
            "Ti" | "TiB" => 1 << 40,
            "k" | "K" | "kB" | "KB" => 1_000,
            "M" | "MB" => 1_000_000,
            "G" | "GB" => 1_000_000_000,
            "T" | "TB" => 1_000_000_000_000,
            _ => return Err(ByteSizeError::UnknownUnit { input: s.to_string(), unit: unit.to_string() }),
        };
        let bytes = number * multiplier as f64;
        if !bytes.is_finite() || bytes > u64::MAX as f64 {
            return Err(ByteSizeError::Overflow(s.to_string()));
        }
        Ok(ByteSize(bytes.round() as u64))
    }
}

impl ByteSize {
    /// For people: the largest binary unit it reaches, one decimal ("32.2 MiB"); the
    /// `Display` form stays exact so that it parses back.
    pub fn human(&self) -> String {
        const UNITS: [(&str, u64); 4] = [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
        UNITS
            .iter()
            .find(|(_, m)| self.0 >= *m)
            .map(|(unit, m)| format!("{:.1} {unit}", self.0 as f64 / *m as f64))
            .unwrap_or_else(|| format!("{} B", self.0))
    }
}

impl fmt::Display for ByteSize {
    /// The largest binary unit that divides the size exactly, so that parse(display(x)) == x.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)];
        for (unit, m) in UNITS {
            if self.0 >= m && self.0.is_multiple_of(m) {
                return write!(f, "{}{unit}", self.0 / m);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Accept numbers too, only to refuse them with the helpful "no unit" message.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Number(f64),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Text(t) => t,
            Raw::Number(n) => n.to_string(),
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_and_decimal_units() {
        assert_eq!("256Mi".parse::<ByteSize>().unwrap(), ByteSize(256 << 20));
        assert_eq!("1GiB".parse::<ByteSize>().unwrap(), ByteSize(1 << 30));
        assert_eq!("1.5Gi".parse::<ByteSize>().unwrap(), ByteSize(3 << 29));
        assert_eq!("512MB".parse::<ByteSize>().unwrap(), ByteSize(512_000_000));
        assert_eq!("4096B".parse::<ByteSize>().unwrap(), ByteSize(4096));
    }

    #[test]
    fn refuses_bare_numbers_and_unknown_units() {
        assert_eq!("256".parse::<ByteSize>(), Err(ByteSizeError::NoUnit("256".into())));
        assert!(matches!("3 parsecs".parse::<ByteSize>(), Err(ByteSizeError::UnknownUnit { .. })));
        assert!(matches!("Mi".parse::<ByteSize>(), Err(ByteSizeError::NotANumber(_))));
    }

    #[test]
    fn display_round_trips() {
        for s in ["256Mi", "1Gi", "3Ki", "1000B", "12Ti"] {
            assert_eq!(s.parse::<ByteSize>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(ByteSize(33_762_340).human(), "32.2 MiB");
        assert_eq!(ByteSize(512).human(), "512 B");
        assert_eq!(ByteSize(3 << 30).human(), "3.0 GiB");
    }
}
