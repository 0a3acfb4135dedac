//! PNG plots of a run, drawn with plotters' bitmap backend: reward, accuracy and call ratio over
//! steps (the loss for supervised runs).
//!
//! Text needs a TrueType font, loaded from a file (plotters' `ab_glyph` feature, no system font
//! lookup): `$TANDEM_PLOT_FONT`, else DejaVu Sans from Debian's `fonts-dejavu-core`. Without a font
//! the plots are drawn without any text (curves and grid only) and a warning says so.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;

use super::metrics::MetricsRecord;

/// Where a font is looked for, after `$TANDEM_PLOT_FONT`.
const FONT_CANDIDATES: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Errors drawing plots.
#[derive(Debug, thiserror::Error)]
#[error("plot {path}: {message}")]
pub struct PlotError {
    path: PathBuf,
    message: String,
}

/// Registers a font for plot text once per process; whether one was found.
pub fn text_available() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        let env = std::env::var("TANDEM_PLOT_FONT").ok();
        for path in env.iter().map(String::as_str).chain(FONT_CANDIDATES) {
            if let Ok(bytes) = std::fs::read(path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        tracing::warn!(
            "no TrueType font found (install fonts-dejavu-core or set TANDEM_PLOT_FONT): plots have no text"
        );
        false
    })
}

struct Series {
    name: &'static str,
    color: RGBColor,
    points: Vec<(f64, f64)>,
}

/// Writes the run's plots into `dir`; returns their paths. `budget` draws the call-ratio budget line.
pub fn write_plots(
    records: &[MetricsRecord],
    dir: &Path,
    budget: Option<f64>,
) -> Result<Vec<PathBuf>, PlotError> {
    std::fs::create_dir_all(dir).map_err(|e| PlotError { path: dir.into(), message: e.to_string() })?;
    let train: Vec<_> =
        records.iter().filter_map(|r| if let MetricsRecord::Train(m) = r { Some(m) } else { None }).collect();
    let eval: Vec<_> =
        records.iter().filter_map(|r| if let MetricsRecord::Eval(m) = r { Some(m) } else { None }).collect();
    let points = |f: &dyn Fn(&super::metrics::StepMetrics) -> Option<f64>| -> Vec<(f64, f64)> {
        train.iter().filter_map(|m| f(m).map(|v| (m.step as f64, v))).collect()
    };
    let eval_points = |f: &dyn Fn(&super::metrics::EvalMetrics) -> Option<f64>| -> Vec<(f64, f64)> {
        eval.iter().filter_map(|m| f(m).map(|v| (m.step as f64, v))).collect()
    };
    let mut written = Vec::new();
    let rewards = points(&|m| m.reward);
    if rewards.is_empty() {
        let path = dir.join("loss.png");
        let loss = vec![Series { name: "loss", color: BLUE, points: points(&|m| Some(m.loss)) }];
        line_chart(&path, "Training loss", "loss", &loss, None)?;
        written.push(path);
    } else {
        let path = dir.join("reward.png");
        let series = vec![
            Series { name: "mean reward", color: RGBColor(180, 200, 230), points: rewards.clone() },
            Series { name: "moving average (10)", color: BLUE, points: moving_average(&rewards, 10) },
        ];
        line_chart(&path, "Training reward", "reward", &series, None)?;
        written.push(path);
    }
    let path = dir.join("accuracy.png");
    let mut accuracy = vec![
        Series {
            name: "train: local accuracy (moving avg 10)",
            color: BLUE,
            points: moving_average(&points(&|m| m.local_accuracy), 10),
        },
        Series {
            name: "eval: overall accuracy",
            color: RED,
            points: eval_points(&|m| Some(m.overall_accuracy)),
        },
        Series {
            name: "eval: local accuracy",
            color: GREEN,
            points: eval_points(&|m| Some(m.local_accuracy)),
        },
        Series {
            name: "eval: random offloading",
            color: RGBColor(150, 150, 150),
            points: eval_points(&|m| m.random_offloading_accuracy),
        },
    ];
    accuracy.retain(|s| !s.points.is_empty());
    if !accuracy.is_empty() {
        line_chart(&path, "Accuracy", "accuracy", &accuracy, None)?;
        written.push(path);
    }
    let path = dir.join("call_ratio.png");
    let mut calls = vec![
        Series { name: "train: help requests / samples", color: BLUE, points: points(&|m| m.call_ratio) },
        Series {
            name: "eval: help requests / problems",
            color: RED,
            points: eval_points(&|m| Some(m.help_request_ratio)),
        },
    ];
    calls.retain(|s| !s.points.is_empty());
    if !calls.is_empty() {
        line_chart(&path, "Call-for-cloud ratio", "ratio", &calls, budget.map(|b| (b, "budget")))?;
        written.push(path);
    }
    Ok(written)
}

fn moving_average(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    (0..points.len())
        .map(|i| {
            let from = (i + 1).saturating_sub(window);
            let slice = &points[from..=i];
            (points[i].0, slice.iter().map(|p| p.1).sum::<f64>() / slice.len() as f64)
        })
        .collect()
}

fn line_chart(
    path: &Path,
    title: &str,
    y_label: &str,
    series: &[Series],
    line: Option<(f64, &str)>,
) -> Result<(), PlotError> {
    let fail = |e: &dyn std::fmt::Display| PlotError { path: path.into(), message: e.to_string() };
    let text = text_available();
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all.filter(|p| p.1.is_finite()) {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if let Some((value, _)) = line {
        y0 = y0.min(value);
        y1 = y1.max(value);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1.0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.08).max(0.01);
    let (y0, y1) = (y0 - pad, y1 + pad);

    let root = BitMapBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20).x_label_area_size(if text { 45 } else { 5 }).y_label_area_size(if text {
        70
    } else {
        5
    });
    if text {
        builder.caption(title, ("sans-serif", 26));
    }
    let mut chart = builder.build_cartesian_2d(x0..x1, y0..y1).map_err(|e| fail(&e))?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("step").y_desc(y_label).label_style(("sans-serif", 16));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| fail(&e))?;
    for s in series {
        let color = s.color;
        let drawn = chart
            .draw_series(LineSeries::new(
                s.points.iter().copied().filter(|p| p.1.is_finite()),
                color.stroke_width(2),
            ))
            .map_err(|e| fail(&e))?;
        drawn
            .label(s.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        if s.points.len() <= 30 {
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| fail(&e))?;
        }
    }
    if let Some((value, name)) = line {
        let dashed = RGBColor(200, 120, 0);
        chart
            .draw_series(LineSeries::new(vec![(x0, value), (x1, value)], dashed.stroke_width(1)))
            .map_err(|e| fail(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], dashed));
    }
    if text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .draw()
            .map_err(|e| fail(&e))?;
    }
    root.present().map_err(|e| fail(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::metrics::{EvalMetrics, StepMetrics};

    #[test]
    fn plots_are_written_as_png_with_text() {
        assert!(text_available(), "DejaVu Sans (fonts-dejavu-core) is needed for plot text");
        let mut records: Vec<MetricsRecord> = (1..=40)
            .map(|step| {
                MetricsRecord::Train(StepMetrics {
                    step,
                    reward: Some(step as f64 / 40.0),
                    local_accuracy: Some(0.5),
                    call_ratio: Some(0.2),
                    ..StepMetrics::default()
                })
            })
            .collect();
        records.push(MetricsRecord::Eval(EvalMetrics {
            step: 40,
            problems: 10,
            overall_accuracy: 0.6,
            local_accuracy: 0.4,
            conditional_local_accuracy: 0.5,
            call_ratio: 0.2,
            help_request_ratio: 0.3,
            local_only_accuracy: None,
            cloud_only_accuracy: None,
            random_offloading_accuracy: Some(0.5),
        }));
        let dir = tempfile::tempdir().unwrap();
        let written = write_plots(&records, dir.path(), Some(0.3)).unwrap();
        assert_eq!(written.len(), 3);
        for path in written {
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", path.display());
            assert!(bytes.len() > 5_000, "{} is suspiciously small", path.display());
        }
    }
}
