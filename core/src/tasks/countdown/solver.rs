//! Exhaustive Countdown solver, for worked solutions in warm-start data and for checking problems.
//!
//! The search repeatedly replaces two remaining values by their combination under one of the four
//! operations (both orders for `-` and `/`), which visits every ordering, operator choice and
//! parenthesisation. Values are exact [`Rational`]s. A first pass keeps every intermediate value a
//! non-negative whole number, which yields the solutions a person would write; only if that fails does
//! a second pass allow negative and fractional intermediates (`8 / (3 - 8 / 3)`). Expression trees are
//! built only for the solution found; the search itself works on an index arena.

use super::expression::{Expr, Operator};
use super::problem::CountdownProblem;
use crate::tasks::rational::Rational;

/// Most numbers the solver accepts; the search grows factorially beyond this.
pub const MAX_SOLVER_NUMBERS: usize = 6;

/// One solution as a printable expression, e.g. `(75 / 3) * 6 + 2`; `None` when there is none (or the
/// problem has no numbers or more than [`MAX_SOLVER_NUMBERS`]).
pub fn solve(problem: &CountdownProblem) -> Option<String> {
    solve_expr(problem).map(|expr| expr.to_string())
}

/// One solution as a tree (its [`Expr::steps`] make a worked solution).
pub fn solve_expr(problem: &CountdownProblem) -> Option<Expr> {
    if problem.numbers.is_empty() || problem.numbers.len() > MAX_SOLVER_NUMBERS {
        return None;
    }
    let target = Rational::from(problem.target);
    [true, false].into_iter().find_map(|plain| {
        let mut search = Search { nodes: Vec::new(), target, plain };
        let leaves: Vec<(Rational, usize)> = problem
            .numbers
            .iter()
            .enumerate()
            .map(|(index, &n)| {
                search.nodes.push(Node::Leaf(n));
                (Rational::from(n), index)
            })
            .collect();
        let root = search.run(&leaves)?;
        Some(search.build(root))
    })
}

#[derive(Debug, Clone, Copy)]
enum Node {
    Leaf(u32),
    Apply(Operator, usize, usize),
}

struct Search {
    nodes: Vec<Node>,
    target: Rational,
    /// Only non-negative whole intermediate values.
    plain: bool,
}

impl Search {
    /// The arena index of an expression over all of `items` equal to the target.
    fn run(&mut self, items: &[(Rational, usize)]) -> Option<usize> {
        if let [(value, node)] = items {
            return (*value == self.target).then_some(*node);
        }
        let mut rest = Vec::with_capacity(items.len() - 1);
        for (i, &(a, a_node)) in items.iter().enumerate() {
            for (j, &(b, b_node)) in items.iter().enumerate() {
                if i == j {
                    continue;
                }
                for op in Operator::ALL {
                    if op.is_commutative() && i > j {
                        continue;
                    }
                    let Ok(value) = op.apply(a, b) else { continue };
                    if self.plain && (!value.is_integer() || value.is_negative()) {
                        continue;
                    }
                    rest.clear();
                    rest.extend(
                        items.iter().enumerate().filter(|&(k, _)| k != i && k != j).map(|(_, item)| *item),
                    );
                    self.nodes.push(Node::Apply(op, a_node, b_node));
                    rest.push((value, self.nodes.len() - 1));
                    if let Some(found) = self.run(&rest) {
                        return Some(found);
                    }
                    self.nodes.pop();
                }
            }
        }
        None
    }

    fn build(&self, node: usize) -> Expr {
        match self.nodes[node] {
            Node::Leaf(n) => Expr::Number(n),
            Node::Apply(op, lhs, rhs) => Expr::apply(op, self.build(lhs), self.build(rhs)),
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    fn problem(numbers: &[u32], target: i64) -> CountdownProblem {
        CountdownProblem { numbers: numbers.to_vec(), target }
    }

    fn assert_solves(problem: &CountdownProblem) -> Expr {
        let expr = solve_expr(problem).unwrap_or_else(|| panic!("no solution for {problem:?}"));
        let mut used = expr.numbers();
        used.sort_unstable();
        assert_eq!(used, problem.sorted_numbers(), "{expr}");
        assert_eq!(expr.value().unwrap(), Rational::from(problem.target), "{expr}");
        assert_eq!(solve(problem).unwrap(), expr.to_string());
        expr
    }

    #[test]
    fn the_papers_examples_are_solved_with_every_number_once() {
        assert_solves(&problem(&[75, 6, 2, 3], 152));
        assert_solves(&problem(&[74, 78, 36, 7], 33));
        assert_solves(&problem(&[12, 77, 4, 15], 100));
        assert_solves(&problem(&[3, 3, 8], 17));
    }

    #[test]
    fn fractional_intermediates_are_used_only_when_needed() {
        let expr = assert_solves(&problem(&[3, 3, 8, 8], 24));
        assert_eq!(expr.to_string(), "8 / (3 - 8 / 3)");
        let plain = assert_solves(&problem(&[2, 3, 4], 24));
        assert!(plain.steps().unwrap().iter().all(|step| !step.contains('/')), "{plain}");
    }

    #[test]
    fn unsolvable_problems_have_no_solution() {
        assert_eq!(solve(&problem(&[1, 1, 1, 1], 100)), None);
        assert_eq!(solve(&problem(&[2, 2], 5)), None);
    }

    #[test]
    fn degenerate_problems_are_handled() {
        assert_eq!(solve(&problem(&[7], 7)).as_deref(), Some("7"));
        assert_eq!(solve(&problem(&[], 0)), None);
        assert_eq!(solve(&problem(&[1; MAX_SOLVER_NUMBERS + 1], 7)), None);
    }

    #[test]
    fn an_unsolvable_problem_is_searched_exhaustively_and_reported_unsolvable() {
        // Both passes (whole numbers, then fractions) search everything before giving up.
        assert_eq!(solve(&problem(&[1, 1, 1, 1], 1000)), None);
    }
}
