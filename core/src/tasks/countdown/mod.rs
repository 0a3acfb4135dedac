//! Countdown: combine every given number exactly once with `+ - * /` to reach a target.
//!
//! - [`problem`]: the problem and the question asked about it;
//! - [`expression`]: the expression language, its parser and exact evaluation;
//! - [`generator`]: seeded problems that are solvable by construction;
//! - [`solver`]: exhaustive search for a solution (worked solutions, checks);
//! - [`verifier`]: grading the on-device model's Template I responses.

pub mod expression;
pub mod generator;
pub mod problem;
pub mod solver;
pub mod verifier;

pub use expression::{Expr, ExpressionError, Operator};
pub use generator::{CountdownGenerator, GeneratorConfig, GeneratorError};
pub use problem::CountdownProblem;
pub use solver::{solve, solve_expr};
pub use verifier::{CountdownCheck, InvalidAnswer, Verdict, verify_expression, verify_response};
