//! The progress of a run: steps done, then the latest reward, call ratio, |D¹|, |D²| and
//! throughput (or the loss for supervised runs). A bar on stderr when it is a terminal; otherwise
//! (a log, a scheduler job) a plain line at most every few seconds; or nothing.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::metrics::StepMetrics;

/// How a run shows its progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// A bar redrawn in place (stderr is a terminal).
    Bar,
    /// A line per step on stderr, at most one per [`LINE_INTERVAL`], and always the last step.
    Lines,
    /// Nothing but evaluations.
    Quiet,
}

/// Shortest time between two progress lines in [`ProgressMode::Lines`].
pub const LINE_INTERVAL: Duration = Duration::from_secs(5);

/// A run's progress.
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
    mode: ProgressMode,
    total: u64,
    last_line: Mutex<Option<Instant>>,
}

impl Progress {
    /// Progress over `total` steps, `done` of them already done.
    pub fn new(total: u64, done: u64, mode: ProgressMode) -> Self {
        let bar = ProgressBar::with_draw_target(
            Some(total),
            if mode == ProgressMode::Bar {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::hidden()
            },
        );
        let style = ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .expect("the template is valid")
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_position(done);
        Self { bar, mode, total, last_line: Mutex::new(None) }
    }

    /// Shows a finished step.
    pub fn step(&self, metrics: &StepMetrics) {
        self.bar.set_position(metrics.step);
        self.bar.set_message(describe(metrics));
        if self.mode == ProgressMode::Lines {
            let mut last = self.last_line.lock().expect("not poisoned");
            if line_due(*last, Instant::now(), metrics.step, self.total) {
                eprintln!("step {}/{}: {}", metrics.step, self.total, describe(metrics));
                *last = Some(Instant::now());
            }
        }
    }

    /// Prints a line above the bar.
    pub fn println(&self, line: impl AsRef<str>) {
        if self.bar.is_hidden() {
            eprintln!("{}", line.as_ref());
        } else {
            self.bar.println(line);
        }
    }

    /// Leaves the bar as it is.
    pub fn finish(&self) {
        self.bar.abandon();
    }
}

/// Whether a progress line is due at `now` for `step` of `total`, the previous one printed at
/// `last`: the first step, the last, and otherwise once per [`LINE_INTERVAL`].
fn line_due(last: Option<Instant>, now: Instant, step: u64, total: u64) -> bool {
    step >= total || last.is_none_or(|at| now.duration_since(at) >= LINE_INTERVAL)
}

/// One line summarising a step, as the bar shows it.
pub fn describe(m: &StepMetrics) -> String {
    match (m.reward, m.call_ratio) {
        (Some(reward), Some(call)) => format!(
            "reward {reward:.3} | local {:.0}% | call {:.0}% | |D¹| {} |D²| {} | {:.0} tok/s",
            100.0 * m.local_accuracy.unwrap_or(0.0),
            100.0 * call,
            m.d1.map_or("-".into(), |d| d.to_string()),
            m.d2.map_or("-".into(), |d| d.to_string()),
            m.tokens_per_second
        ),
        _ => format!("loss {:.4} | grad {:.3} | {:.0} tok/s", m.loss, m.grad_norm, m.tokens_per_second),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_progress_lines_come_at_the_first_and_last_step_and_every_few_seconds_between() {
        let start = Instant::now();
        assert!(line_due(None, start, 1, 20));
        assert!(!line_due(Some(start), start + Duration::from_secs(1), 2, 20));
        assert!(line_due(Some(start), start + LINE_INTERVAL, 3, 20));
        assert!(line_due(Some(start), start + Duration::from_millis(10), 20, 20));
    }
}
