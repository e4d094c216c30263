//! Exact money arithmetic.

use afflio_rules::Currency;
use rust_decimal::{Decimal, RoundingStrategy};

/// Rounds once, half-to-even, to the currency's minor units.
pub fn round_money(d: Decimal, currency: Currency) -> Decimal {
    d.round_dp_with_strategy(currency.minor_units(), RoundingStrategy::MidpointNearestEven)
}

/// The largest amount the store can hold (`Decimal128(18, 4)`), exclusive.
pub(crate) fn max_amount() -> Decimal {
    Decimal::from(100_000_000_000_000i64)
}

/// Digits after the point the store keeps for amounts.
pub(crate) const AMOUNT_SCALE: u32 = 4;

/// Checks an amount from an event: `Err` says what is wrong with it.
pub(crate) fn check_amount(d: Decimal, allow_zero: bool) -> Result<(), String> {
    if d.is_sign_negative() && !d.is_zero() {
        return Err(format!("{d} is negative"));
    }
    if d.is_zero() && !allow_zero {
        return Err(format!("{d} is not greater than zero"));
    }
    if d.normalize().scale() > AMOUNT_SCALE {
        return Err(format!("{d} has more than {AMOUNT_SCALE} decimal places"));
    }
    if d >= max_amount() {
        return Err(format!("{d} is not below {}", max_amount()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(amount: &str, cur: &str, expect: &str) {
        let got = round_money(amount.parse().unwrap(), Currency::from_code(cur).unwrap());
        assert_eq!(got.to_string(), expect, "{amount} {cur}");
    }

    #[test]
    fn rounding_is_half_to_even_in_minor_units() {
        check("0.125", "USD", "0.12");
        check("0.135", "USD", "0.14");
        check("0.1251", "USD", "0.13");
        check("-0.125", "USD", "-0.12");
        check("2.5", "JPY", "2");
        check("3.5", "JPY", "4");
        check("1.0005", "KWD", "1.000");
        check("1.0015", "KWD", "1.002");
    }

    #[test]
    fn amounts_are_checked() {
        assert!(check_amount("10".parse().unwrap(), false).is_ok());
        assert!(check_amount("0.0001".parse().unwrap(), false).is_ok());
        assert!(check_amount("0".parse().unwrap(), false).is_err());
        assert!(check_amount("0".parse().unwrap(), true).is_ok());
        assert!(check_amount("-1".parse().unwrap(), true).is_err());
        assert!(check_amount("0.00001".parse().unwrap(), false).is_err());
        assert!(check_amount("1.50000".parse().unwrap(), false).is_ok());
        assert!(check_amount("100000000000000".parse().unwrap(), false).is_err());
    }
}
