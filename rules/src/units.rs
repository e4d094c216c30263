//! Value types of the rules language: rates, durations, currencies.

use std::fmt;
use std::str::FromStr;

use chrono::TimeDelta;
use rust_decimal::Decimal;

/// A commission rate written `"12.5%"`, held as the exact fraction (`0.125`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Rate(Decimal);

impl Rate {
    /// The rate as a fraction of the basis (`"12.5%"` is `0.125`).
    pub fn fraction(self) -> Decimal {
        self.0
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let Some(num) = t.strip_suffix('%') else {
            return Err(format!("rate {s:?} must be a percentage such as \"12.5%\""));
        };
        let pct = Decimal::from_str_exact(num.trim())
            .map_err(|_| format!("rate {s:?} is not a decimal percentage such as \"12.5%\""))?;
        if pct.is_sign_negative() || pct > Decimal::ONE_HUNDRED {
            return Err(format!("rate {s:?} must lie between 0% and 100%"));
        }
        Ok(Rate((pct / Decimal::ONE_HUNDRED).normalize()))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", (self.0 * Decimal::ONE_HUNDRED).normalize())
    }
}

/// Parses a duration written `Ns`, `Nm`, `Nh` or `Nd` (N a whole number).
pub fn parse_duration(s: &str) -> Result<TimeDelta, String> {
    let bad = || format!("duration {s:?} must be a whole number followed by s, m, h or d (e.g. \"30d\")");
    let t = s.trim();
    if t.len() < 2 {
        return Err(bad());
    }
    let (num, unit) = t.split_at(t.len() - 1);
    if !num.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: i64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3_600),
        "d" => n.checked_mul(86_400),
        _ => None,
    }
    .ok_or_else(bad)?;
    // Ten years is far beyond any return window or retention; it also keeps
    // every `ts + duration` far inside chrono's range.
    if secs > 3_650 * 86_400 {
        return Err(format!("duration {s:?} is longer than the 3650d limit"));
    }
    Ok(TimeDelta::seconds(secs))
}

/// Formats a duration the way the rules language writes it.
pub fn format_duration(d: TimeDelta) -> String {
    let s = d.num_seconds();
    if s % 86_400 == 0 {
        format!("{}d", s / 86_400)
    } else if s % 3_600 == 0 {
        format!("{}h", s / 3_600)
    } else if s % 60 == 0 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// An ISO 4217 currency with its minor units.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Currency {
    code: [u8; 3],
    minor_units: u8,
}

impl Currency {
    /// Looks a code up in the ISO 4217 table (upper case, exact).
    pub fn from_code(code: &str) -> Option<Currency> {
        let b = code.as_bytes();
        if b.len() != 3 {
            return None;
        }
        let minor_units = minor_units(code)?;
        Some(Currency { code: [b[0], b[1], b[2]], minor_units })
    }

    /// The three-letter code.
    pub fn code(&self) -> &str {
        // The bytes come from a `&str` checked against an ASCII table.
        std::str::from_utf8(&self.code).unwrap_or("???")
    }

    /// Digits after the decimal point (2 for USD, 0 for JPY, 3 for KWD).
    pub fn minor_units(&self) -> u32 {
        u32::from(self.minor_units)
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// ISO 4217 active codes and their minor units.
fn minor_units(code: &str) -> Option<u8> {
    const ZERO: &[&str] = &[
        "BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI", "VND", "VUV", "XAF", "XOF",
        "XPF",
    ];
    const THREE: &[&str] = &["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"];
    const FOUR: &[&str] = &["CLF", "UYW"];
    const TWO: &[&str] = &[
        "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT", "BGN", "BMD", "BND",
        "BOB", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD", "CDF", "CHF", "CNY", "COP", "CRC", "CUP", "CVE", "CZK",
        "DKK", "DOP", "DZD", "EGP", "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GTQ", "GYD",
        "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR", "IRR", "JMD", "KES", "KGS", "KHR", "KPW", "KYD", "KZT", "LAK",
        "LBP", "LKR", "LRD", "LSL", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT", "MOP", "MRU", "MUR", "MVR", "MWK", "MXN",
        "MYR", "MZN", "NAD", "NGN", "NIO", "NOK", "NPR", "NZD", "PAB", "PEN", "PGK", "PHP", "PKR", "PLN", "QAR", "RON",
        "RSD", "RUB", "SAR", "SBD", "SCR", "SDG", "SEK", "SGD", "SHP", "SLE", "SOS", "SRD", "SSP", "STN", "SVC", "SYP",
        "SZL", "THB", "TJS", "TMT", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "USD", "UYU", "UZS", "VES", "WST", "XCD",
        "YER", "ZAR", "ZMW", "ZWG",
    ];
    if ZERO.contains(&code) {
        Some(0)
    } else if THREE.contains(&code) {
        Some(3)
    } else if FOUR.contains(&code) {
        Some(4)
    } else if TWO.contains(&code) {
        Some(2)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_exactly() {
        let check = |s: &str, expect: Result<&str, ()>| {
            let got = s.parse::<Rate>().map(|r| r.fraction().to_string()).map_err(|_| ());
            assert_eq!(got.as_deref().map_err(|_| ()), expect, "rate {s}");
        };
        check("12.5%", Ok("0.125"));
        check("10%", Ok("0.1"));
        check(" 0% ", Ok("0"));
        check("100%", Ok("1"));
        check("33.333%", Ok("0.33333"));
        check("12.5", Err(()));
        check("-1%", Err(()));
        check("100.01%", Err(()));
        check("abc%", Err(()));
        check("1e2%", Err(()));
    }

    #[test]
    fn durations_parse_in_units() {
        assert_eq!(parse_duration("30d").unwrap(), TimeDelta::days(30));
        assert_eq!(parse_duration("90s").unwrap(), TimeDelta::seconds(90));
        assert_eq!(parse_duration("15m").unwrap(), TimeDelta::minutes(15));
        assert_eq!(parse_duration("0h").unwrap(), TimeDelta::zero());
        for bad in ["", "d", "30", "-3d", "3w", "1.5h", "3 d", "99999999999999999d", "3651d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} must be refused");
        }
        assert_eq!(format_duration(TimeDelta::days(30)), "30d");
        assert_eq!(format_duration(TimeDelta::seconds(90)), "90s");
    }

    #[test]
    fn currencies_know_their_minor_units() {
        let mu = |c: &str| Currency::from_code(c).map(|c| c.minor_units());
        assert_eq!(mu("USD"), Some(2));
        assert_eq!(mu("INR"), Some(2));
        assert_eq!(mu("JPY"), Some(0));
        assert_eq!(mu("KRW"), Some(0));
        assert_eq!(mu("BHD"), Some(3));
        assert_eq!(mu("KWD"), Some(3));
        assert_eq!(mu("OMR"), Some(3));
        assert_eq!(mu("usd"), None);
        assert_eq!(mu("XXX"), None);
        assert_eq!(Currency::from_code("EUR").unwrap().to_string(), "EUR");
    }
}
