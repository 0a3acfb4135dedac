//! The progress bar of a run: steps done, then the latest reward, call ratio, |D¹|, |D²| and
//! throughput (or the loss for supervised runs). Drawn on stderr only when it is a terminal.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::metrics::StepMetrics;

/// A run's progress bar.
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar over `total` steps, `done` of them already done; hidden unless `visible`.
    pub fn new(total: u64, done: u64, visible: bool) -> Self {
        let bar = ProgressBar::with_draw_target(
            Some(total),
            if visible { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() },
        );
        let style = ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .expect("the template is valid")
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_position(done);
        Self { bar }
    }

    /// Shows a finished step.
    pub fn step(&self, metrics: &StepMetrics) {
        self.bar.set_position(metrics.step);
        self.bar.set_message(describe(metrics));
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
