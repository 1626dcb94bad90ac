//! `training_loss.png`: train loss (raw and smoothed) and eval loss against the step, and a stage's metric curves
//! (`training_rewards_accuracies.png`, …), drawn with
//! plotters, as LLaMA-Factory's `plot_loss` does after a run. The font ships inside the binary
//! (Hack, via `epaint_default_fonts`), so servers without fonts draw it too.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use super::runlog::LogLine;

/// LLaMA-Factory's `smooth`: TensorBoard's EMA with a weight that grows with the series length.
pub fn smooth(values: &[f64]) -> Vec<f64> {
    let Some(&first) = values.first() else {
        return Vec::new();
    };
    #[allow(clippy::cast_precision_loss)]
    let weight = 1.8 * (1.0 / (1.0 + (-0.05 * values.len() as f64).exp()) - 0.5);
    let mut last = first;
    values
        .iter()
        .map(|&v| {
            last = last * weight + (1.0 - weight) * v;
            last
        })
        .collect()
}

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            epaint_default_fonts::HACK_REGULAR,
        );
    });
}

/// Draws the loss curves of `log` into `path` (PNG). Returns `Ok(false)` without writing when
/// there are fewer than two loss points (nothing to plot, as LLaMA-Factory skips it too).
pub fn plot_loss(log: &[LogLine], path: &Path) -> Result<bool, String> {
    #[allow(clippy::cast_precision_loss)]
    let train: Vec<(f64, f64)> = log
        .iter()
        .filter_map(|l| l.loss.map(|v| (l.current_steps as f64, v)))
        .collect();
    #[allow(clippy::cast_precision_loss)]
    let eval: Vec<(f64, f64)> = log
        .iter()
        .filter_map(|l| l.eval_loss.map(|v| (l.current_steps as f64, v)))
        .collect();
    draw(path, "loss", &train, &eval)
}

/// One logged metric of `log` (a key of its stage metrics, e.g. `rewards/accuracies`), raw and smoothed, as
/// LLaMA-Factory's `plot_loss(keys=[...])` draws `training_rewards_accuracies.png`. `Ok(false)` below two points.
pub fn plot_metric(log: &[LogLine], key: &str, path: &Path) -> Result<bool, String> {
    #[allow(clippy::cast_precision_loss)]
    let points: Vec<(f64, f64)> = log
        .iter()
        .filter_map(|l| {
            l.metrics
                .get(key)
                .and_then(serde_json::Value::as_f64)
                .map(|v| (l.current_steps as f64, v))
        })
        .collect();
    draw(path, key, &points, &[])
}

/// A raw + smoothed series and, optionally, evaluation points.
fn draw(path: &Path, key: &str, train: &[(f64, f64)], eval: &[(f64, f64)]) -> Result<bool, String> {
    if train.len() < 2 {
        return Ok(false);
    }
    register_font();
    let smoothed: Vec<(f64, f64)> = train
        .iter()
        .map(|p| p.0)
        .zip(smooth(&train.iter().map(|p| p.1).collect::<Vec<_>>()))
        .collect();
    let all = train.iter().chain(eval).map(|p| p.1);
    let (lo, hi) = all.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let x_max = train.iter().chain(eval).map(|p| p.0).fold(1.0, f64::max);

    let e = |e: &dyn std::fmt::Display| format!("drawing {}: {e}", path.display());
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("training {key}"), ("sans-serif", 28))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, (lo - pad)..(hi + pad))
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(key)
        .label_style(("sans-serif", 16))
        .draw()
        .map_err(|x| e(&x))?;
    let raw_color = RGBColor(31, 119, 180).mix(0.4);
    chart
        .draw_series(LineSeries::new(
            train.iter().copied(),
            raw_color.stroke_width(2),
        ))
        .map_err(|x| e(&x))?
        .label("original")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], raw_color));
    let smooth_color = RGBColor(31, 119, 180);
    chart
        .draw_series(LineSeries::new(smoothed, smooth_color.stroke_width(3)))
        .map_err(|x| e(&x))?
        .label("smoothed")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], smooth_color));
    if !eval.is_empty() {
        let eval_color = RGBColor(214, 39, 40);
        chart
            .draw_series(LineSeries::new(
                eval.iter().copied(),
                eval_color.stroke_width(2),
            ))
            .map_err(|x| e(&x))?;
        chart
            .draw_series(eval.iter().map(|&p| Circle::new(p, 5, eval_color.filled())))
            .map_err(|x| e(&x))?
            .label("eval")
            .legend(move |(x, y)| Circle::new((x + 10, y), 5, eval_color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn smoothing_follows_llamafactory() {
        // weight for 3 points: 1.8 * (1 / (1 + e^-0.15) - 0.5) = 0.06737...
        let w = 1.8 * (1.0 / (1.0 + (-0.15f64).exp()) - 0.5);
        let s = smooth(&[1.0, 0.0, 0.0]);
        assert!((s[0] - 1.0).abs() < 1e-12);
        assert!((s[1] - w).abs() < 1e-12);
        assert!((s[2] - w * w).abs() < 1e-12);
    }

    #[test]
    fn plots_a_png_and_skips_a_single_point() {
        let dir = tempfile::tempdir().unwrap();
        let line = |step: u64, loss: Option<f64>, eval: Option<f64>| LogLine {
            current_steps: step,
            total_steps: 10,
            loss,
            eval_loss: eval,
            ..LogLine::default()
        };
        let path = dir.path().join("training_loss.png");
        assert!(!plot_loss(&[line(1, Some(2.0), None)], &path).unwrap());
        assert!(!path.exists());
        let log: Vec<LogLine> = (1..=10)
            .map(|s| {
                line(
                    s,
                    Some(3.0 / f64::from(s as u32)),
                    (s % 5 == 0).then_some(1.0),
                )
            })
            .collect();
        assert!(plot_loss(&log, &path).unwrap());
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    }
}
