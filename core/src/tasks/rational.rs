//! Exact rational numbers on `i128`, for checking answers without floating-point error.
//!
//! Every operation is checked: a result that does not fit reports [`ArithmeticError::Overflow`] and a
//! zero divisor reports [`ArithmeticError::DivisionByZero`]; nothing here panics. Values are kept in
//! lowest terms with a positive denominator, so two equal numbers compare equal with `==`.

use std::fmt;

/// Why an exact operation has no result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ArithmeticError {
    #[error("division by zero")]
    DivisionByZero,
    #[error("the result does not fit in 128-bit integers")]
    Overflow,
}

/// A fraction in lowest terms; the denominator is positive and the numerator is never `i128::MIN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rational {
    numer: i128,
    denom: i128,
}

impl Rational {
    /// Zero.
    pub const ZERO: Self = Self { numer: 0, denom: 1 };

    /// `numer / denom` in lowest terms.
    pub fn new(numer: i128, denom: i128) -> Result<Self, ArithmeticError> {
        if denom == 0 {
            return Err(ArithmeticError::DivisionByZero);
        }
        Self::from_magnitudes((numer < 0) != (denom < 0), numer.unsigned_abs(), denom.unsigned_abs())
    }

    /// Builds `±(numer / denom)` from magnitudes; `denom` is not zero.
    fn from_magnitudes(negative: bool, numer: u128, denom: u128) -> Result<Self, ArithmeticError> {
        let common = gcd(numer, denom);
        let numer = i128::try_from(numer / common).map_err(|_| ArithmeticError::Overflow)?;
        let denom = i128::try_from(denom / common).map_err(|_| ArithmeticError::Overflow)?;
        Ok(Self { numer: if negative { -numer } else { numer }, denom })
    }

    /// The numerator (carries the sign).
    pub fn numer(&self) -> i128 {
        self.numer
    }

    /// The denominator (always positive).
    pub fn denom(&self) -> i128 {
        self.denom
    }

    /// Whether the value is a whole number.
    pub fn is_integer(&self) -> bool {
        self.denom == 1
    }

    /// The value as an integer, if it is one.
    pub fn to_integer(&self) -> Option<i128> {
        self.is_integer().then_some(self.numer)
    }

    /// Whether the value is below zero.
    pub fn is_negative(&self) -> bool {
        self.numer < 0
    }

    /// `self + rhs`.
    pub fn checked_add(self, rhs: Self) -> Result<Self, ArithmeticError> {
        let common = to_i128(gcd(self.denom.unsigned_abs(), rhs.denom.unsigned_abs()))?;
        let (left, right) = (self.denom / common, rhs.denom / common);
        let numer =
            mul(self.numer, right)?.checked_add(mul(rhs.numer, left)?).ok_or(ArithmeticError::Overflow)?;
        Self::new(numer, mul(self.denom, right)?)
    }

    /// `self - rhs`.
    pub fn checked_sub(self, rhs: Self) -> Result<Self, ArithmeticError> {
        self.checked_add(Self { numer: -rhs.numer, denom: rhs.denom })
    }

    /// `self × rhs`.
    pub fn checked_mul(self, rhs: Self) -> Result<Self, ArithmeticError> {
        // Cancelling across before multiplying keeps intermediate products as small as possible.
        let a = to_i128(gcd(self.numer.unsigned_abs(), rhs.denom.unsigned_abs()))?;
        let b = to_i128(gcd(rhs.numer.unsigned_abs(), self.denom.unsigned_abs()))?;
        let numer = mul(self.numer / a, rhs.numer / b)?;
        let denom = mul(self.denom / b, rhs.denom / a)?;
        Self::new(numer, denom)
    }

    /// `self ÷ rhs`.
    pub fn checked_div(self, rhs: Self) -> Result<Self, ArithmeticError> {
        if rhs.numer == 0 {
            return Err(ArithmeticError::DivisionByZero);
        }
        self.checked_mul(Self::new(rhs.denom, rhs.numer)?)
    }
}

impl From<i64> for Rational {
    fn from(value: i64) -> Self {
        Self { numer: i128::from(value), denom: 1 }
    }
}

impl From<u32> for Rational {
    fn from(value: u32) -> Self {
        Self { numer: i128::from(value), denom: 1 }
    }
}

impl fmt::Display for Rational {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.denom == 1 { write!(f, "{}", self.numer) } else { write!(f, "{}/{}", self.numer, self.denom) }
    }
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a.max(1)
}

fn to_i128(value: u128) -> Result<i128, ArithmeticError> {
    i128::try_from(value).map_err(|_| ArithmeticError::Overflow)
}

fn mul(a: i128, b: i128) -> Result<i128, ArithmeticError> {
    a.checked_mul(b).ok_or(ArithmeticError::Overflow)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(numer: i128, denom: i128) -> Rational {
        Rational::new(numer, denom).unwrap()
    }

    #[test]
    fn values_are_kept_in_lowest_terms_with_a_positive_denominator() {
        assert_eq!(r(6, -4), r(-3, 2));
        assert_eq!((r(6, -4).numer(), r(6, -4).denom()), (-3, 2));
        assert_eq!(r(0, -7), Rational::ZERO);
        assert_eq!(r(10, 5).to_integer(), Some(2));
    }

    #[test]
    fn arithmetic_is_exact() {
        let third = r(1, 3);
        assert_eq!(third.checked_add(third).unwrap().checked_add(third).unwrap(), r(1, 1));
        assert_eq!(r(8, 1).checked_div(r(3, 1).checked_sub(r(8, 3)).unwrap()).unwrap(), r(24, 1));
        assert_eq!(r(-2, 3).checked_mul(r(9, 4)).unwrap(), r(-3, 2));
        assert_eq!(r(1, 2).to_string(), "1/2");
        assert_eq!(r(-4, 2).to_string(), "-2");
    }

    #[test]
    fn division_by_zero_is_an_error() {
        assert_eq!(r(1, 1).checked_div(Rational::ZERO), Err(ArithmeticError::DivisionByZero));
        assert_eq!(Rational::new(1, 0), Err(ArithmeticError::DivisionByZero));
    }

    #[test]
    fn results_beyond_i128_report_overflow() {
        let big = r(i128::MAX, 1);
        assert_eq!(big.checked_add(r(1, 1)), Err(ArithmeticError::Overflow));
        assert_eq!(big.checked_mul(r(2, 1)), Err(ArithmeticError::Overflow));
        assert_eq!(r(-i128::MAX, 1).checked_sub(r(2, 1)), Err(ArithmeticError::Overflow));
        assert_eq!(Rational::new(i128::MIN, 1), Err(ArithmeticError::Overflow));
        assert_eq!(r(1, i128::MAX).checked_add(r(1, i128::MAX - 1)), Err(ArithmeticError::Overflow));
    }
}
