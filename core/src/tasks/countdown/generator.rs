//! Seeded Countdown problems that are solvable by construction.
//!
//! A problem is made by drawing the numbers, combining them in a random order into a random expression
//! tree (pick two sub-expressions, pick an operation that is exact, repeat) and taking the tree's
//! value as the target. Draws whose value is outside the target range or not a whole number are
//! thrown away and drawn again, so every problem has at least the witness expression as a solution.
//! The same configuration and seed give the same problems on every platform (ChaCha8).

use std::collections::HashSet;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::expression::{Expr, Operator};
use super::problem::CountdownProblem;
use crate::tasks::rational::Rational;

/// Most numbers in one problem; the exhaustive solver stays fast up to here.
pub const MAX_NUMBERS_PER_PROBLEM: usize = 5;

/// The shape of generated problems.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeneratorConfig {
    /// Fewest numbers in a problem.
    pub min_count: usize,
    /// Most numbers in a problem (at most [`MAX_NUMBERS_PER_PROBLEM`]).
    pub max_count: usize,
    /// Smallest number drawn (inclusive).
    pub min_number: u32,
    /// Largest number drawn (inclusive).
    pub max_number: u32,
    /// Smallest target accepted (inclusive).
    pub min_target: i64,
    /// Largest target accepted (inclusive).
    pub max_target: i64,
    /// Whether the witness expression may pass through fractions (e.g. `8 / 3`) on its way to a
    /// whole-number target. Off by default, so every problem has a fraction-free solution.
    pub fractional_intermediates: bool,
    /// Draws tried for one problem before giving up (a sign the ranges cannot be satisfied).
    pub max_attempts: u32,
}

impl Default for GeneratorConfig {
    /// 3–4 numbers from 1–99 and a target from 1–100, like the TinyZero Countdown set the paper draws
    /// from (the paper does not state its ranges).
    fn default() -> Self {
        Self {
            min_count: 3,
            max_count: 4,
            min_number: 1,
            max_number: 99,
            min_target: 1,
            max_target: 100,
            fractional_intermediates: false,
            max_attempts: 10_000,
        }
    }
}

/// Why no problem could be generated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GeneratorError {
    #[error("invalid Countdown generator configuration: {0}")]
    InvalidConfig(String),
    #[error("no problem with a target in [{min_target}, {max_target}] after {attempts} draws")]
    Exhausted { min_target: i64, max_target: i64, attempts: u32 },
    #[error("only {found} distinct problems found, {wanted} wanted")]
    TooFewDistinct { found: usize, wanted: usize },
}

impl GeneratorConfig {
    /// Checks that the ranges make sense.
    pub fn validate(&self) -> Result<(), GeneratorError> {
        let invalid = |reason: String| Err(GeneratorError::InvalidConfig(reason));
        if self.min_count < 1 || self.min_count > self.max_count {
            return invalid(format!(
                "need 1 <= min_count <= max_count (got {}, {})",
                self.min_count, self.max_count
            ));
        }
        if self.max_count > MAX_NUMBERS_PER_PROBLEM {
            return invalid(format!("max_count {} exceeds {MAX_NUMBERS_PER_PROBLEM}", self.max_count));
        }
        if self.min_number > self.max_number {
            return invalid(format!("min_number {} > max_number {}", self.min_number, self.max_number));
        }
        if self.min_target > self.max_target {
            return invalid(format!("min_target {} > max_target {}", self.min_target, self.max_target));
        }
        if self.max_attempts == 0 {
            return invalid("max_attempts must be at least 1".into());
        }
        Ok(())
    }
}

/// A deterministic stream of solvable problems.
#[derive(Debug, Clone)]
pub struct CountdownGenerator {
    config: GeneratorConfig,
    rng: ChaCha8Rng,
}

impl CountdownGenerator {
    /// A generator for `config` whose stream is fixed by `seed`.
    pub fn new(config: GeneratorConfig, seed: u64) -> Result<Self, GeneratorError> {
        config.validate()?;
        Ok(Self { config, rng: ChaCha8Rng::seed_from_u64(seed) })
    }

    /// The next problem.
    pub fn next_problem(&mut self) -> Result<CountdownProblem, GeneratorError> {
        self.next_with_witness().map(|(problem, _)| problem)
    }

    /// The next problem and the expression its target was taken from.
    pub fn next_with_witness(&mut self) -> Result<(CountdownProblem, Expr), GeneratorError> {
        let config = &self.config;
        let rng = &mut self.rng;
        for _ in 0..config.max_attempts {
            let count = rng.random_range(config.min_count..=config.max_count);
            let numbers: Vec<u32> =
                (0..count).map(|_| rng.random_range(config.min_number..=config.max_number)).collect();
            let Some((witness, value)) = random_tree(rng, &numbers, config.fractional_intermediates) else {
                continue;
            };
            let Some(target) = value.to_integer().and_then(|t| i64::try_from(t).ok()) else { continue };
            if (config.min_target..=config.max_target).contains(&target) {
                return Ok((CountdownProblem { numbers, target }, witness));
            }
        }
        Err(GeneratorError::Exhausted {
            min_target: config.min_target,
            max_target: config.max_target,
            attempts: config.max_attempts,
        })
    }

    /// `count` problems, no two with the same numbers (as a multiset) and target; for train/test
    /// splits that must not overlap.
    pub fn distinct(&mut self, count: usize) -> Result<Vec<CountdownProblem>, GeneratorError> {
        let mut seen = HashSet::new();
        let mut problems = Vec::with_capacity(count);
        let budget = count.saturating_mul(20).max(100);
        for _ in 0..budget {
            if problems.len() == count {
                break;
            }
            let problem = self.next_problem()?;
            if seen.insert((problem.sorted_numbers(), problem.target)) {
                problems.push(problem);
            }
        }
        if problems.len() < count {
            return Err(GeneratorError::TooFewDistinct { found: problems.len(), wanted: count });
        }
        Ok(problems)
    }
}

/// Combines all of `numbers` into one random exact expression; `None` if a draw hit a dead end.
fn random_tree(rng: &mut ChaCha8Rng, numbers: &[u32], fractional: bool) -> Option<(Expr, Rational)> {
    let mut pool: Vec<(Expr, Rational)> =
        numbers.iter().map(|&n| (Expr::Number(n), Rational::from(n))).collect();
    pool.shuffle(rng);
    while pool.len() > 1 {
        let first = pool.swap_remove(rng.random_range(0..pool.len()));
        let second = pool.swap_remove(rng.random_range(0..pool.len()));
        let mut operators = Operator::ALL;
        operators.shuffle(rng);
        let (op, value) = operators.into_iter().find_map(|op| {
            let value = op.apply(first.1, second.1).ok()?;
            (value.is_integer() || fractional).then_some((op, value))
        })?;
        pool.push((Expr::apply(op, first.0, second.0), value));
    }
    pool.pop()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::countdown::solver::solve;
    use crate::tasks::countdown::verifier::{Verdict, verify_response};

    #[test]
    fn the_same_seed_gives_the_same_problems() {
        let config = GeneratorConfig::default();
        let a: Vec<_> = (0..20)
            .map(|seed| CountdownGenerator::new(config.clone(), seed).unwrap().next_problem())
            .collect();
        let b: Vec<_> = (0..20)
            .map(|seed| CountdownGenerator::new(config.clone(), seed).unwrap().next_problem())
            .collect();
        assert_eq!(a, b);
        let mut stream = CountdownGenerator::new(config.clone(), 7).unwrap();
        let mut again = CountdownGenerator::new(config, 7).unwrap();
        assert_eq!(stream.distinct(50).unwrap(), again.distinct(50).unwrap());
    }

    #[test]
    fn different_seeds_give_different_problems() {
        let config = GeneratorConfig::default();
        let problems: HashSet<_> = (0..100)
            .map(|seed| CountdownGenerator::new(config.clone(), seed).unwrap().next_problem().unwrap())
            .collect();
        assert!(problems.len() > 95, "only {} distinct problems from 100 seeds", problems.len());
    }

    #[test]
    fn every_problem_over_a_thousand_seeds_is_in_range_and_solvable() {
        let config = GeneratorConfig::default();
        for seed in 0..1000 {
            let (problem, witness) =
                CountdownGenerator::new(config.clone(), seed).unwrap().next_with_witness().unwrap();
            assert!((3..=4).contains(&problem.numbers.len()), "seed {seed}: {problem:?}");
            assert!(problem.numbers.iter().all(|n| (1..=99).contains(n)), "seed {seed}: {problem:?}");
            assert!((1..=100).contains(&problem.target), "seed {seed}: {problem:?}");
            let mut used = witness.numbers();
            used.sort_unstable();
            assert_eq!(used, problem.sorted_numbers(), "seed {seed}: witness {witness}");
            assert_eq!(
                witness.value().unwrap(),
                Rational::from(problem.target),
                "seed {seed}: witness {witness}"
            );

            let solution =
                solve(&problem).unwrap_or_else(|| panic!("seed {seed}: no solution for {problem:?}"));
            let response = format!("<think>found it</think>\n<answer>{solution}</answer>");
            let check = verify_response(&problem, &response);
            assert_eq!(check.verdict, Verdict::Correct, "seed {seed}: {problem:?} with {solution}");
            assert!(check.well_formatted);
        }
    }

    #[test]
    fn witnesses_avoid_fractions_unless_configured() {
        let mut generator = CountdownGenerator::new(GeneratorConfig::default(), 3).unwrap();
        for _ in 0..200 {
            let (_, witness) = generator.next_with_witness().unwrap();
            let steps = witness.steps().unwrap();
            assert!(steps.iter().all(|step| !step.split(" = ").nth(1).unwrap().contains('/')), "{steps:?}");
        }
    }

    #[test]
    fn configured_ranges_are_respected() {
        let config = GeneratorConfig {
            min_count: 4,
            max_count: 4,
            min_number: 10,
            max_number: 20,
            min_target: 200,
            max_target: 500,
            ..GeneratorConfig::default()
        };
        let problems = CountdownGenerator::new(config, 1).unwrap().distinct(100).unwrap();
        for problem in problems {
            assert_eq!(problem.numbers.len(), 4);
            assert!(problem.numbers.iter().all(|n| (10..=20).contains(n)), "{problem:?}");
            assert!((200..=500).contains(&problem.target), "{problem:?}");
        }
    }

    #[test]
    fn invalid_configurations_are_refused() {
        for config in [
            GeneratorConfig { min_count: 0, ..GeneratorConfig::default() },
            GeneratorConfig { min_count: 5, max_count: 4, ..GeneratorConfig::default() },
            GeneratorConfig { max_count: MAX_NUMBERS_PER_PROBLEM + 1, ..GeneratorConfig::default() },
            GeneratorConfig { min_number: 50, max_number: 10, ..GeneratorConfig::default() },
            GeneratorConfig { min_target: 5, max_target: 1, ..GeneratorConfig::default() },
            GeneratorConfig { max_attempts: 0, ..GeneratorConfig::default() },
        ] {
            assert!(matches!(CountdownGenerator::new(config, 0), Err(GeneratorError::InvalidConfig(_))));
        }
    }

    #[test]
    fn unreachable_targets_exhaust_the_attempts_instead_of_looping() {
        let config = GeneratorConfig {
            min_number: 1,
            max_number: 2,
            min_target: 1_000_000,
            max_target: 2_000_000,
            max_attempts: 50,
            ..GeneratorConfig::default()
        };
        let error = CountdownGenerator::new(config, 0).unwrap().next_problem().unwrap_err();
        assert!(matches!(error, GeneratorError::Exhausted { attempts: 50, .. }));
    }

    #[test]
    fn asking_for_more_distinct_problems_than_exist_fails() {
        let config = GeneratorConfig {
            min_count: 3,
            max_count: 3,
            min_number: 1,
            max_number: 1,
            min_target: 0,
            max_target: 10,
            ..GeneratorConfig::default()
        };
        let error = CountdownGenerator::new(config, 0).unwrap().distinct(50).unwrap_err();
        assert!(matches!(error, GeneratorError::TooFewDistinct { wanted: 50, .. }));
    }
}
