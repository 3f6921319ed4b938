//! Units of measure. Quantities are stored in SI base units (bytes, bytes per second, FLOP
//! per second, seconds) together with the text the user wrote.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Dim {
    Bytes,
    Bandwidth,
    FlopRate,
    Time,
}

impl Dim {
    pub fn describe(self) -> &'static str {
        match self {
            Dim::Bytes => "size in bytes",
            Dim::Bandwidth => "bandwidth",
            Dim::FlopRate => "FLOP rate",
            Dim::Time => "duration",
        }
    }

    /// Units a user could have meant, for error messages.
    pub fn examples(self) -> &'static str {
        match self {
            Dim::Bytes => "`80GiB`, `512MB`",
            Dim::Bandwidth => "`600GB/s`, `200Gb/s`",
            Dim::FlopRate => "`312TFLOP/s`",
            Dim::Time => "`2us`, `10ms`",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Quantity {
    /// Value in the SI base unit of `dim`.
    pub si: f64,
    pub dim: Dim,
    /// As written, for messages: `80GiB`.
    pub written: String,
}

/// What a unit suffix means: a dimension and a factor to the base unit, or a plain ratio.
pub enum UnitMeaning {
    Quantity(Dim, f64),
    /// `%`: the number is divided by 100 and becomes a plain number.
    Percent,
}

const BYTE_PREFIXES: &[(&str, f64)] = &[
    ("", 1.0),
    ("K", 1e3),
    ("M", 1e6),
    ("G", 1e9),
    ("T", 1e12),
    ("P", 1e15),
    ("Ki", 1024.0),
    ("Mi", 1048576.0),
    ("Gi", 1073741824.0),
    ("Ti", 1099511627776.0),
];

const FLOP_PREFIXES: &[(&str, f64)] = &[
    ("", 1.0),
    ("K", 1e3),
    ("M", 1e6),
    ("G", 1e9),
    ("T", 1e12),
    ("P", 1e15),
    ("E", 1e18),
];

const TIME_UNITS: &[(&str, f64)] = &[
    ("ns", 1e-9),
    ("us", 1e-6),
    ("ms", 1e-3),
    ("s", 1.0),
    ("min", 60.0),
    ("h", 3600.0),
];

pub fn lookup(unit: &str) -> Option<UnitMeaning> {
    if unit == "%" {
        return Some(UnitMeaning::Percent);
    }
    if let Some(&(_, f)) = TIME_UNITS.iter().find(|(u, _)| *u == unit) {
        return Some(UnitMeaning::Quantity(Dim::Time, f));
    }
    let (stem, per_second) = match unit.strip_suffix("/s") {
        Some(stem) => (stem, true),
        None => (unit, false),
    };
    if let Some(prefix) = stem.strip_suffix("FLOP") {
        let &(_, f) = FLOP_PREFIXES.iter().find(|(p, _)| *p == prefix)?;
        return per_second.then_some(UnitMeaning::Quantity(Dim::FlopRate, f));
    }
    // `B` is bytes, `b` is bits (network line rates are quoted in bits).
    let (prefix, factor) = if let Some(p) = stem.strip_suffix('B') {
        (p, 1.0)
    } else if let Some(p) = stem.strip_suffix('b') {
        (p, 0.125)
    } else {
        return None;
    };
    let &(_, f) = BYTE_PREFIXES.iter().find(|(p, _)| *p == prefix)?;
    let dim = if per_second {
        Dim::Bandwidth
    } else {
        Dim::Bytes
    };
    Some(UnitMeaning::Quantity(dim, f * factor))
}

/// Every accepted unit, for "did you mean" suggestions.
pub fn all_units() -> Vec<String> {
    let mut out = vec!["%".to_string()];
    out.extend(TIME_UNITS.iter().map(|(u, _)| u.to_string()));
    for (p, _) in BYTE_PREFIXES {
        for suffix in ["B", "b", "B/s", "b/s"] {
            out.push(format!("{p}{suffix}"));
        }
    }
    for (p, _) in FLOP_PREFIXES {
        out.push(format!("{p}FLOP/s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn si(unit: &str) -> (Dim, f64) {
        match lookup(unit) {
            Some(UnitMeaning::Quantity(d, f)) => (d, f),
            _ => panic!("{unit} should be a quantity unit"),
        }
    }

    #[test]
    fn units_convert_to_si() {
        assert_eq!(si("GiB"), (Dim::Bytes, 1073741824.0));
        assert_eq!(si("GB/s"), (Dim::Bandwidth, 1e9));
        assert_eq!(si("Gb/s"), (Dim::Bandwidth, 1.25e8));
        assert_eq!(si("TFLOP/s"), (Dim::FlopRate, 1e12));
        assert_eq!(si("us"), (Dim::Time, 1e-6));
        assert!(matches!(lookup("%"), Some(UnitMeaning::Percent)));
        assert!(lookup("GiBs").is_none());
        assert!(lookup("TFLOP").is_none(), "a FLOP count is not a rate");
        assert!(all_units().iter().all(|u| lookup(u).is_some()));
    }
}
