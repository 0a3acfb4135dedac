//! Countdown expressions: a small recursive-descent parser, exact evaluation and printing.
//!
//! The language is deliberately tiny, because it reads text written by a model under training:
//! - whole numbers (at most [`MAX_NUMBER_DIGITS`] digits, at most `u32::MAX`), no decimals;
//! - the binary operators `+`, `-` (also `−`, `–`), `*` (also `×`, `x`, `X`), `/` (also `÷`), with the
//!   usual precedence and left associativity;
//! - parentheses, nested at most [`MAX_DEPTH`] deep;
//! - whitespace anywhere between tokens.
//!
//! Unary minus and plus are refused: Countdown combines the given numbers with the four binary
//! operations, and a leading sign would let a model negate a given number. Exponentiation (`**`, `^`)
//! is refused by name. Input longer than [`MAX_CHARS`] is refused before any parsing, recursion is
//! bounded by the depth cap, and evaluation is exact ([`Rational`]) with overflow reported, so no input
//! can make parsing or evaluation panic or run long.

use std::fmt;

use crate::tasks::rational::{ArithmeticError, Rational};

/// Longest expression accepted, in characters (surrounding whitespace excluded).
pub const MAX_CHARS: usize = 200;
/// Deepest parenthesis nesting accepted.
pub const MAX_DEPTH: usize = 16;
/// Most digits in one number.
pub const MAX_NUMBER_DIGITS: usize = 10;

/// Why a text is not a valid Countdown expression, or has no value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpressionError {
    #[error("the expression is empty")]
    Empty,
    #[error("the expression is {chars} characters long; at most {max} are accepted")]
    TooLong { chars: usize, max: usize },
    #[error("unexpected character {found:?} at position {position}")]
    UnexpectedCharacter { found: char, position: usize },
    #[error("exponentiation is not a Countdown operation")]
    Exponentiation,
    #[error("number at position {position} is too large")]
    NumberTooLarge { position: usize },
    #[error("unary {sign:?} at position {position}: only binary operators are allowed")]
    UnaryOperator { sign: char, position: usize },
    #[error("parentheses nest deeper than {max}")]
    TooDeep { max: usize },
    #[error("unbalanced parentheses")]
    UnbalancedParentheses,
    #[error("an operand is missing at position {position}")]
    MissingOperand { position: usize },
    #[error("an operator is missing at position {position}")]
    MissingOperator { position: usize },
    #[error("division by zero")]
    DivisionByZero,
    #[error("arithmetic overflow")]
    Overflow,
}

impl From<ArithmeticError> for ExpressionError {
    fn from(error: ArithmeticError) -> Self {
        match error {
            ArithmeticError::DivisionByZero => Self::DivisionByZero,
            ArithmeticError::Overflow => Self::Overflow,
        }
    }
}

/// One of the four Countdown operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operator {
    Add,
    Subtract,
    Multiply,
    Divide,
}

impl Operator {
    /// All four, in a fixed order.
    pub const ALL: [Operator; 4] = [Operator::Add, Operator::Subtract, Operator::Multiply, Operator::Divide];

    /// `lhs op rhs`, exactly.
    pub fn apply(self, lhs: Rational, rhs: Rational) -> Result<Rational, ArithmeticError> {
        match self {
            Operator::Add => lhs.checked_add(rhs),
            Operator::Subtract => lhs.checked_sub(rhs),
            Operator::Multiply => lhs.checked_mul(rhs),
            Operator::Divide => lhs.checked_div(rhs),
        }
    }

    /// The ASCII symbol used when printing.
    pub fn symbol(self) -> char {
        match self {
            Operator::Add => '+',
            Operator::Subtract => '-',
            Operator::Multiply => '*',
            Operator::Divide => '/',
        }
    }

    /// Whether `a op b == b op a`.
    pub fn is_commutative(self) -> bool {
        matches!(self, Operator::Add | Operator::Multiply)
    }

    fn precedence(self) -> u8 {
        match self {
            Operator::Add | Operator::Subtract => 1,
            Operator::Multiply | Operator::Divide => 2,
        }
    }
}

/// A parsed expression tree.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Expr {
    /// A literal number.
    Number(u32),
    /// `lhs op rhs`.
    Apply { op: Operator, lhs: Box<Expr>, rhs: Box<Expr> },
}

impl Expr {
    /// `lhs op rhs`.
    pub fn apply(op: Operator, lhs: Expr, rhs: Expr) -> Self {
        Expr::Apply { op, lhs: Box::new(lhs), rhs: Box::new(rhs) }
    }

    /// Parses `text` under the rules in the module documentation.
    pub fn parse(text: &str) -> Result<Self, ExpressionError> {
        let text = text.trim();
        let chars = text.chars().count();
        if chars > MAX_CHARS {
            return Err(ExpressionError::TooLong { chars, max: MAX_CHARS });
        }
        let tokens = tokenize(text)?;
        if tokens.is_empty() {
            return Err(ExpressionError::Empty);
        }
        let mut parser = Parser { tokens: &tokens, next: 0, depth: 0, end: chars };
        let expr = parser.sum()?;
        match parser.peek() {
            None => Ok(expr),
            Some((Token::Close, _)) => Err(ExpressionError::UnbalancedParentheses),
            Some((_, position)) => Err(ExpressionError::MissingOperator { position }),
        }
    }

    /// The exact value.
    pub fn value(&self) -> Result<Rational, ExpressionError> {
        match self {
            Expr::Number(n) => Ok(Rational::from(*n)),
            Expr::Apply { op, lhs, rhs } => Ok(op.apply(lhs.value()?, rhs.value()?)?),
        }
    }

    /// The literal numbers, left to right.
    pub fn numbers(&self) -> Vec<u32> {
        let mut out = Vec::new();
        self.collect_numbers(&mut out);
        out
    }

    fn collect_numbers(&self, out: &mut Vec<u32>) {
        match self {
            Expr::Number(n) => out.push(*n),
            Expr::Apply { lhs, rhs, .. } => {
                lhs.collect_numbers(out);
                rhs.collect_numbers(out);
            }
        }
    }

    /// The operations in evaluation order, one per line of a worked solution, e.g. `75 / 3 = 25`.
    /// `None` when the expression has no value.
    pub fn steps(&self) -> Option<Vec<String>> {
        let mut steps = Vec::new();
        self.collect_steps(&mut steps).ok()?;
        Some(steps)
    }

    fn collect_steps(&self, steps: &mut Vec<String>) -> Result<Rational, ExpressionError> {
        match self {
            Expr::Number(n) => Ok(Rational::from(*n)),
            Expr::Apply { op, lhs, rhs } => {
                let (a, b) = (lhs.collect_steps(steps)?, rhs.collect_steps(steps)?);
                let value = op.apply(a, b)?;
                steps.push(format!("{a} {} {b} = {value}", op.symbol()));
                Ok(value)
            }
        }
    }

    fn precedence(&self) -> u8 {
        match self {
            Expr::Number(_) => u8::MAX,
            Expr::Apply { op, .. } => op.precedence(),
        }
    }
}

/// Prints with the fewest parentheses that parse back to the same tree.
impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Number(n) => write!(f, "{n}"),
            Expr::Apply { op, lhs, rhs } => {
                let wrap_left = lhs.precedence() < op.precedence();
                let wrap_right = rhs.precedence() <= op.precedence();
                write_operand(f, lhs, wrap_left)?;
                write!(f, " {} ", op.symbol())?;
                write_operand(f, rhs, wrap_right)
            }
        }
    }
}

fn write_operand(f: &mut fmt::Formatter<'_>, expr: &Expr, wrap: bool) -> fmt::Result {
    if wrap { write!(f, "({expr})") } else { write!(f, "{expr}") }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Number(u32),
    Op(Operator),
    /// `+` or `-`, which are also the refused unary signs.
    Sign(Operator, char),
    Open,
    Close,
}

/// Tokens with the character position where each begins.
fn tokenize(text: &str) -> Result<Vec<(Token, usize)>, ExpressionError> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        i += 1;
        let token = match c {
            c if c.is_whitespace() => continue,
            '0'..='9' => {
                while i < chars.len() && chars[i].is_ascii_digit() {
                    i += 1;
                }
                let digits: String = chars[start..i].iter().collect();
                let too_large = ExpressionError::NumberTooLarge { position: start };
                if digits.len() > MAX_NUMBER_DIGITS {
                    return Err(too_large);
                }
                Token::Number(digits.parse().map_err(|_| too_large)?)
            }
            '+' => Token::Sign(Operator::Add, c),
            '-' | '−' | '–' => Token::Sign(Operator::Subtract, c),
            '*' if chars.get(i) == Some(&'*') => return Err(ExpressionError::Exponentiation),
            '^' => return Err(ExpressionError::Exponentiation),
            '*' | '×' | 'x' | 'X' => Token::Op(Operator::Multiply),
            '/' | '÷' => Token::Op(Operator::Divide),
            '(' => Token::Open,
            ')' => Token::Close,
            found => return Err(ExpressionError::UnexpectedCharacter { found, position: start }),
        };
        tokens.push((token, start));
    }
    Ok(tokens)
}

struct Parser<'t> {
    tokens: &'t [(Token, usize)],
    next: usize,
    depth: usize,
    /// Position reported for errors at the end of the input.
    end: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<(Token, usize)> {
        self.tokens.get(self.next).copied()
    }

    /// sum := product (('+' | '-') product)*
    fn sum(&mut self) -> Result<Expr, ExpressionError> {
        let mut lhs = self.product()?;
        while let Some((Token::Sign(op, _), _)) = self.peek() {
            self.next += 1;
            lhs = Expr::apply(op, lhs, self.product()?);
        }
        Ok(lhs)
    }

    /// product := operand (('*' | '/') operand)*
    fn product(&mut self) -> Result<Expr, ExpressionError> {
        let mut lhs = self.operand()?;
        while let Some((Token::Op(op), _)) = self.peek() {
            self.next += 1;
            lhs = Expr::apply(op, lhs, self.operand()?);
        }
        Ok(lhs)
    }

    /// operand := number | '(' sum ')'
    fn operand(&mut self) -> Result<Expr, ExpressionError> {
        let Some((token, position)) = self.peek() else {
            return Err(ExpressionError::MissingOperand { position: self.end });
        };
        self.next += 1;
        match token {
            Token::Number(n) => Ok(Expr::Number(n)),
            Token::Open => {
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    return Err(ExpressionError::TooDeep { max: MAX_DEPTH });
                }
                let inner = self.sum()?;
                match self.peek() {
                    Some((Token::Close, _)) => self.next += 1,
                    None => return Err(ExpressionError::UnbalancedParentheses),
                    Some((_, position)) => return Err(ExpressionError::MissingOperator { position }),
                }
                self.depth -= 1;
                Ok(inner)
            }
            Token::Sign(_, sign) => Err(ExpressionError::UnaryOperator { sign, position }),
            Token::Op(_) | Token::Close => Err(ExpressionError::MissingOperand { position }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str) -> Result<Rational, ExpressionError> {
        Expr::parse(text)?.value()
    }

    #[test]
    fn precedence_and_left_associativity_follow_arithmetic() {
        assert_eq!(value("2 + 3 * 4").unwrap(), Rational::from(14i64));
        assert_eq!(value("20 - 5 - 3").unwrap(), Rational::from(12i64));
        assert_eq!(value("48 / 4 / 2").unwrap(), Rational::from(6i64));
        assert_eq!(value("(75 / 3) * 6 + 2").unwrap(), Rational::from(152i64));
    }

    #[test]
    fn fractional_intermediates_are_exact() {
        assert_eq!(value("8 / (3 - 8 / 3)").unwrap(), Rational::from(24i64));
    }

    #[test]
    fn typographic_operators_are_read_as_their_ascii_forms() {
        for text in ["(75 ÷ 3) × 6 + 2", "(75/3)x6+2", "(75 / 3) X 6 + 2"] {
            assert_eq!(value(text).unwrap(), Rational::from(152i64), "{text}");
        }
        assert_eq!(value("36 − (7 – 4)").unwrap(), Rational::from(33i64));
    }

    #[test]
    fn printing_uses_the_fewest_parentheses_that_keep_the_tree() {
        for text in ["(1 + 2) * 3", "1 - (2 - 3)", "1 - 2 - 3", "8 / (4 / 2)", "(8 / 4) / 2", "1 + 2 * 3"] {
            let expr = Expr::parse(text).unwrap();
            assert_eq!(Expr::parse(&expr.to_string()).unwrap(), expr, "{text} printed as {expr}");
        }
        assert_eq!(Expr::parse("((1 + 2)) * (3)").unwrap().to_string(), "(1 + 2) * 3");
        assert_eq!(Expr::parse("(8 / 4) / 2").unwrap().to_string(), "8 / 4 / 2");
    }

    #[test]
    fn steps_list_each_operation_with_its_value() {
        let steps = Expr::parse("(75 / 3) * 6 + 2").unwrap().steps().unwrap();
        assert_eq!(steps, ["75 / 3 = 25", "25 * 6 = 150", "150 + 2 = 152"]);
        assert_eq!(Expr::parse("1 / (2 - 2)").unwrap().steps(), None);
    }

    #[test]
    fn malformed_expressions_are_refused_with_a_reason() {
        use ExpressionError::*;
        let cases: &[(&str, ExpressionError)] = &[
            ("", Empty),
            ("   ", Empty),
            ("2 ** 3", Exponentiation),
            ("2 ^ 3", Exponentiation),
            ("-3 + 5", UnaryOperator { sign: '-', position: 0 }),
            ("3 * -5", UnaryOperator { sign: '-', position: 4 }),
            ("+3", UnaryOperator { sign: '+', position: 0 }),
            ("(1 + 2", UnbalancedParentheses),
            ("1 + 2)", UnbalancedParentheses),
            ("1 +", MissingOperand { position: 3 }),
            ("3 4", MissingOperator { position: 2 }),
            ("(3)(4)", MissingOperator { position: 3 }),
            ("1.5 + 2", UnexpectedCharacter { found: '.', position: 1 }),
            ("a + 2", UnexpectedCharacter { found: 'a', position: 0 }),
            ("12345678901", NumberTooLarge { position: 0 }),
            ("4294967296", NumberTooLarge { position: 0 }),
        ];
        for (text, expected) in cases {
            assert_eq!(Expr::parse(text).as_ref(), Err(expected), "{text:?}");
        }
    }

    #[test]
    fn nesting_beyond_the_depth_cap_is_refused_without_recursing_further() {
        let deep = format!("{}1{}", "(".repeat(MAX_DEPTH + 1), ")".repeat(MAX_DEPTH + 1));
        assert_eq!(Expr::parse(&deep), Err(ExpressionError::TooDeep { max: MAX_DEPTH }));
        let ok = format!("{}1{}", "(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
        assert_eq!(Expr::parse(&ok), Ok(Expr::Number(1)));
    }

    #[test]
    fn long_input_is_refused_before_parsing() {
        let long = "1+".repeat(150) + "1";
        assert_eq!(Expr::parse(&long), Err(ExpressionError::TooLong { chars: 301, max: MAX_CHARS }));
    }

    #[test]
    fn evaluation_reports_division_by_zero_and_overflow() {
        assert_eq!(value("5 / (3 - 3)"), Err(ExpressionError::DivisionByZero));
        let huge = ["4294967295"; 5].join(" * ");
        assert_eq!(value(&huge), Err(ExpressionError::Overflow));
    }
}
