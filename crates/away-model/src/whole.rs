//! Integers as JSON Schema reads them: `80.0` is the integer 80 (JSON Schema draft 6 and
//! later, so OpenAPI 3.1), while serde refuses a float for an integer field. Request
//! fields use these so that every body valid by the broker's OpenAPI document is read.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserializer, Error, Visitor};

/// An integer type read from any JSON/YAML number without a fractional part.
pub fn de<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i128>,
{
    d.deserialize_any(Whole(PhantomData))
}

/// [`de`] for optional fields (`null` is `None`); pair with `#[serde(default)]`.
pub fn opt<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i128>,
{
    d.deserialize_option(OptWhole(PhantomData))
}

struct Whole<T>(PhantomData<T>);

impl<T: TryFrom<i128>> Whole<T> {
    fn fit<E: Error>(n: i128) -> Result<T, E> {
        T::try_from(n).map_err(|_| E::custom(format!("{n} is out of range for {}", short_name::<T>())))
    }
}

fn short_name<T>() -> &'static str {
    std::any::type_name::<T>().rsplit("::").next().unwrap_or("an integer")
}

impl<'de, T: TryFrom<i128>> Visitor<'de> for Whole<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "an integer ({})", short_name::<T>())
    }
    fn visit_i64<E: Error>(self, v: i64) -> Result<T, E> {
        Self::fit(v.into())
    }
    fn visit_u64<E: Error>(self, v: u64) -> Result<T, E> {
        Self::fit(v.into())
    }
    fn visit_f64<E: Error>(self, v: f64) -> Result<T, E> {
        // serde_json (without its float_roundtrip feature) reads a long decimal to within
        // one unit in the last place: `2238506130589409.0` arrives as 2238506130589408.75.
        // So a float that close to an integer is that integer; beyond 2^63 no integer
        // field of ours fits anyway
        let whole = v.round();
        if (v - whole).abs() <= whole.abs() * f64::EPSILON && whole.abs() < 9.3e18 {
            Self::fit(whole as i128)
        } else {
            Err(E::invalid_type(serde::de::Unexpected::Float(v), &self))
        }
    }
}

struct OptWhole<T>(PhantomData<T>);

impl<'de, T: TryFrom<i128>> Visitor<'de> for OptWhole<T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "an integer ({}) or null", short_name::<T>())
    }
    fn visit_none<E: Error>(self) -> Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_unit<E: Error>(self) -> Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
        de(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Port {
        #[serde(deserialize_with = "super::de")]
        port: u16,
        #[serde(default, deserialize_with = "super::opt")]
        host: Option<u16>,
    }

    #[test]
    fn whole_floats_are_integers_and_fractions_are_not() {
        let p: Port = serde_json::from_str(r#"{"port": 80.0, "host": null}"#).unwrap();
        assert_eq!(p, Port { port: 80, host: None });
        let p: Port = serde_json::from_str(r#"{"port": 80, "host": 8080.0}"#).unwrap();
        assert_eq!(p, Port { port: 80, host: Some(8080) });
        let p: Port = serde_yaml_ng::from_str("port: 80.0\n").unwrap();
        assert_eq!(p, Port { port: 80, host: None });
        let e = serde_json::from_str::<Port>(r#"{"port": 80.5}"#).unwrap_err().to_string();
        assert!(e.contains("invalid type: floating point `80.5`, expected an integer (u16)"), "{e}");
        let e = serde_json::from_str::<Port>(r#"{"port": 70000}"#).unwrap_err().to_string();
        assert!(e.contains("70000 is out of range for u16"), "{e}");
        assert!(serde_json::from_str::<Port>(r#"{"port": "80"}"#).is_err());
    }

    #[test]
    fn long_whole_floats_survive_serde_jsons_rounding() {
        #[derive(serde::Deserialize)]
        struct Seq {
            #[serde(deserialize_with = "super::de")]
            seq: u64,
        }
        // schemathesis sent this heartbeat event seq; serde_json reads it one ULP low
        let s: Seq = serde_json::from_str(r#"{"seq": 2238506130589409.0}"#).unwrap();
        assert_eq!(s.seq, 2_238_506_130_589_409);
        assert!(serde_json::from_str::<Seq>(r#"{"seq": 2238506130589409.5}"#).is_err());
        assert!(serde_json::from_str::<Seq>(r#"{"seq": 1.5}"#).is_err());
    }
}
