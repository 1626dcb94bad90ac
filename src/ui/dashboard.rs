//! The Run dashboard: progress, loss chart, lr / grad-norm sparklines, throughput, GPU and
//! CPU/RAM panels, and the event log.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::symbols::Marker;
use ratatui::text::{Line, Span};
use ratatui::widgets::{
    Axis, Block, Borders, Chart, Dataset, Gauge, GraphType, Paragraph, Sparkline, Wrap,
};

use super::{Theme, clip, gib};
use crate::app::run::{Point, Reward};
use crate::app::{App, Phase};
use crate::telemetry::GpuReading;
use crate::trainer::runlog::format_duration;

pub(super) fn render(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let run = &app.run;
    let [top, middle, bottom] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Min(8),
        Constraint::Length(if area.height >= 30 { 10 } else { 7 }),
    ])
    .areas(area);
    render_progress(frame, top, app, theme);
    if let Phase::Failed(msg) = &run.phase {
        let [chart, err] =
            Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)])
                .areas(middle);
        render_chart(frame, chart, app, theme);
        let mut lines = vec![
            Line::styled("the run failed", theme.danger),
            Line::styled(msg.clone(), theme.base),
        ];
        if let Some(log) = &app.log_path {
            lines.push(Line::styled(format!("log: {log}"), theme.muted));
        }
        frame.render_widget(
            Paragraph::new(lines).wrap(Wrap { trim: true }).block(
                Block::default()
                    .borders(Borders::ALL)
                    .border_style(theme.danger)
                    .title(Span::styled(" error ", theme.danger)),
            ),
            err,
        );
    } else {
        let [chart, side] =
            Layout::horizontal([Constraint::Min(40), Constraint::Length(30)]).areas(middle);
        render_chart(frame, chart, app, theme);
        render_side(frame, side, app, theme);
    }
    let [gpu, cpu, log] = Layout::horizontal([
        Constraint::Percentage(30),
        Constraint::Percentage(28),
        Constraint::Percentage(42),
    ])
    .areas(bottom);
    render_gpu(frame, gpu, app, theme);
    render_cpu(frame, cpu, app, theme);
    render_log(frame, log, app, theme);
}

fn panel(title: &str, theme: &Theme) -> Block<'static> {
    let block = Block::default()
        .borders(Borders::ALL)
        .border_style(theme.border);
    if title.is_empty() {
        block
    } else {
        block.title(Span::styled(format!(" {title} "), theme.title))
    }
}

#[allow(clippy::cast_precision_loss)]
fn render_progress(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let run = &app.run;
    let step = run.step();
    let total = run.total_steps;
    let ratio = if total == 0 {
        0.0
    } else {
        (step as f64 / total as f64).clamp(0.0, 1.0)
    };
    let mut label = format!("step {step}/{total}");
    if let Some(m) = &run.last {
        label.push_str(&format!(
            " · epoch {:.2} · {:.0} tok/s · {} < {}",
            m.epoch,
            m.tokens_per_sec,
            format_duration(m.elapsed.as_secs_f64()),
            format_duration(m.eta.as_secs_f64())
        ));
    }
    let title = match (&run.phase, &run.from_folder) {
        (Phase::Idle, Some(dir)) => format!(
            "run folder {} (read-only, follows trainer_log.jsonl)",
            dir.display()
        ),
        (Phase::Idle, None) => "no run yet: s starts, a lists runs, o opens output_dir".to_string(),
        (Phase::Loading(what), _) => format!("loading: {what}"),
        (p, _) => match (run.run_pid, &run.output_dir) {
            (Some(pid), Some(dir)) if p.is_active() => {
                format!("{} · run pid {pid} · {}", p.label(), dir.display())
            }
            _ => p.label(),
        },
    };
    let width = usize::from(area.width.saturating_sub(4));
    let gauge = Gauge::default()
        .block(panel("", theme).title(Span::styled(
            format!(" {} ", clip(&title, width)),
            match run.phase {
                Phase::Failed(_) => theme.danger,
                Phase::Finished => theme.ok,
                _ => theme.title,
            },
        )))
        .gauge_style(theme.gauge)
        .ratio(ratio)
        .label(label);
    frame.render_widget(gauge, area);
}

#[allow(clippy::cast_precision_loss)]
fn render_chart(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let run = &app.run;
    let y_of = |v: f64| {
        if run.log_scale {
            v.max(1e-8).log10()
        } else {
            v
        }
    };
    // One value of every point, where it is finite.
    let series = |value: fn(&Point) -> f64| -> Vec<(f64, f64)> {
        run.points
            .iter()
            .filter(|p| value(p).is_finite())
            .map(|p| (p.step as f64, y_of(value(p))))
            .collect()
    };
    let raw = series(|p| p.loss);
    let smooth = series(|p| p.smoothed);
    let evals: Vec<(f64, f64)> = run
        .evals
        .iter()
        .map(|(s, l)| (*s as f64, y_of(*l)))
        .collect();
    // The latest loss leads the title: at 80×24 the throughput panel shows one line only.
    let last = run
        .points
        .back()
        .map(|p| format!("loss {:.4} ", p.loss))
        .unwrap_or_else(|| "loss ".to_string());
    let title = if run.log_scale {
        format!("{last}(log scale; g: linear)")
    } else {
        format!("{last}(g: log scale)")
    };
    let block = panel(&title, theme);
    if raw.is_empty() {
        frame.render_widget(
            Paragraph::new(Line::styled(
                "the loss curve appears after the first step",
                theme.muted,
            ))
            .block(block),
            area,
        );
        return;
    }
    let ys = raw.iter().chain(&evals).map(|p| p.1);
    let (mut lo, mut hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
        (a.min(y), b.max(y))
    });
    if (hi - lo).abs() < 1e-9 {
        lo -= 0.5;
        hi += 0.5;
    }
    let pad = (hi - lo) * 0.05;
    let floor = if lo >= 0.0 && !run.log_scale {
        0.0
    } else {
        f64::NEG_INFINITY
    };
    lo = (lo - pad).max(floor);
    hi += pad;
    // x runs to the last step seen (the gauge shows the total), so a long run stays readable.
    let x0 = raw.first().map_or(0.0, |p| p.0);
    let x1 = raw.last().map_or(1.0, |p| p.0).max(x0 + 1.0);
    let fmt_y = |y: f64| {
        if run.log_scale {
            format!("{:.3}", 10f64.powf(y))
        } else {
            format!("{y:.3}")
        }
    };
    let line = |name, style, data| {
        Dataset::default()
            .name(name)
            .marker(Marker::Braille)
            .graph_type(GraphType::Line)
            .style(style)
            .data(data)
    };
    let mut datasets = vec![
        line("raw", theme.loss_train, &raw),
        line("smoothed", theme.loss_smooth, &smooth),
    ];
    if !evals.is_empty() {
        datasets.push(
            Dataset::default()
                .name("eval")
                .marker(Marker::Dot)
                .graph_type(GraphType::Scatter)
                .style(theme.loss_eval)
                .data(&evals),
        );
    }
    let chart = Chart::new(datasets)
        .block(block)
        .x_axis(
            Axis::default()
                .style(theme.muted)
                .bounds([x0, x1])
                .labels([format!("{x0:.0}"), format!("step {x1:.0}")]),
        )
        .y_axis(
            Axis::default()
                .style(theme.muted)
                .bounds([lo, hi])
                .labels([fmt_y(lo), fmt_y(hi)]),
        );
    frame.render_widget(chart, area);
}

/// Scales a series into u64 bars for a sparkline (last `width` points).
#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]
fn bars(values: &[f64], width: usize) -> Vec<u64> {
    let tail = &values[values.len().saturating_sub(width)..];
    let max = tail.iter().copied().fold(0.0f64, f64::max);
    bars_of(values, max, width)
}

/// [`bars`] against a fixed top value `max` (e.g. 1 for an accuracy).
#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]
fn bars_of(values: &[f64], max: f64, width: usize) -> Vec<u64> {
    let tail = &values[values.len().saturating_sub(width)..];
    if max <= 0.0 {
        return vec![0; tail.len()];
    }
    tail.iter()
        .map(|v| ((v / max) * 1000.0).max(0.0) as u64)
        .collect()
}

fn render_side(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let run = &app.run;
    let [lr, grad, speed] = Layout::vertical([
        Constraint::Length(4),
        Constraint::Length(4),
        Constraint::Min(3),
    ])
    .areas(area);
    let width = usize::from(area.width.saturating_sub(2));
    let rewards: Vec<Reward> = run.points.iter().filter_map(|p| p.reward).collect();
    if let Some(last) = rewards.last() {
        // A preference run: what shows it learns is the reward margin and how often chosen beats rejected.
        let margins: Vec<f64> = rewards.iter().map(|r| r.margin).collect();
        let floor = margins
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min)
            .min(0.0);
        let lifted: Vec<f64> = margins.iter().map(|m| m - floor).collect();
        frame.render_widget(
            Sparkline::default()
                .block(panel(&format!("reward margin {:.3}", last.margin), theme))
                .style(theme.lr)
                .data(bars(&lifted, width)),
            lr,
        );
        // dpo and rm: how often chosen beats rejected; kto (no pairs): the KL estimate.
        if let Some(acc) = last.accuracy {
            let accuracies: Vec<f64> = rewards.iter().filter_map(|r| r.accuracy).collect();
            frame.render_widget(
                Sparkline::default()
                    .block(panel(&format!("reward acc {acc:.2}"), theme))
                    .style(theme.grad_norm)
                    .max(1000)
                    .data(bars_of(&accuracies, 1.0, width)),
                grad,
            );
        } else {
            let kls: Vec<f64> = rewards.iter().filter_map(|r| r.kl).collect();
            let title = last
                .kl
                .map_or_else(|| "kl –".to_string(), |k| format!("kl {k:.4}"));
            frame.render_widget(
                Sparkline::default()
                    .block(panel(&title, theme))
                    .style(theme.grad_norm)
                    .data(bars(&kls, width)),
                grad,
            );
        }
        render_speed(frame, speed, app, theme);
        return;
    }
    let lrs: Vec<f64> = run.points.iter().map(|p| p.lr).collect();
    let grads: Vec<f64> = run.points.iter().filter_map(|p| p.grad_norm).collect();
    let last_lr = lrs
        .last()
        .map_or_else(|| "–".into(), |v| format!("{v:.2e}"));
    let last_grad = grads
        .last()
        .map_or_else(|| "–".into(), |v| format!("{v:.3}"));
    let spark = |title: String, style, values: &[f64]| {
        Sparkline::default()
            .block(panel(&title, theme))
            .style(style)
            .data(bars(values, width))
    };
    frame.render_widget(spark(format!("lr {last_lr}"), theme.lr, &lrs), lr);
    frame.render_widget(
        spark(format!("grad norm {last_grad}"), theme.grad_norm, &grads),
        grad,
    );
    render_speed(frame, speed, app, theme);
}

/// Throughput, the latest loss, tokens seen, the last checkpoint and evaluation.
fn render_speed(frame: &mut Frame, speed: Rect, app: &App, theme: &Theme) {
    let run = &app.run;
    let mut lines = Vec::new();
    if let Some(m) = &run.last {
        // Throughput first: at 80×24 the panel has room for one line.
        lines.push(Line::styled(
            format!(
                "{:.0} tok/s · {:.2} samples/s",
                m.tokens_per_sec, m.samples_per_sec
            ),
            theme.base,
        ));
        lines.push(Line::from(vec![
            Span::styled("loss ", theme.muted),
            Span::styled(format!("{:.4}", m.loss), theme.loss_smooth),
        ]));
        lines.push(Line::styled(
            format!("{} tokens seen", m.tokens_seen),
            theme.muted,
        ));
    } else if let Some(p) = run.points.back() {
        if let Some(t) = p.tokens_per_sec {
            lines.push(Line::styled(format!("{t:.0} tok/s"), theme.base));
        }
        lines.push(Line::styled(format!("loss {:.4}", p.loss), theme.base));
    } else {
        lines.push(Line::styled("no steps yet", theme.muted));
    }
    if let Some((step, _)) = &run.last_checkpoint {
        lines.push(Line::styled(format!("checkpoint @ step {step}"), theme.ok));
    }
    if let Some((_, eval)) = run.evals.last() {
        lines.push(Line::styled(
            format!("eval loss {eval:.4}"),
            theme.loss_eval,
        ));
    }
    frame.render_widget(
        Paragraph::new(lines).block(panel("throughput", theme)),
        speed,
    );
}

#[allow(clippy::cast_precision_loss)]
fn render_gpu(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let block = panel("GPU", theme);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let width = usize::from(inner.width);
    match &app.run.gpu {
        None => frame.render_widget(
            Paragraph::new(Line::styled("waiting for the first reading", theme.muted)),
            inner,
        ),
        Some(GpuReading::Unavailable(reason)) => frame.render_widget(
            Paragraph::new(vec![
                Line::styled("GPU: n/a", theme.warning),
                Line::styled(reason.clone(), theme.muted),
            ])
            .wrap(Wrap { trim: true }),
            inner,
        ),
        Some(GpuReading::Gpus(gpus)) => {
            let per = if gpus.len() <= 1 { inner.height } else { 3 };
            for (i, g) in gpus.iter().enumerate() {
                let y = inner.y + u16::try_from(i).unwrap_or(u16::MAX).saturating_mul(per);
                if y >= inner.bottom() {
                    break;
                }
                let h = per.min(inner.bottom() - y);
                let r = Rect::new(inner.x, y, inner.width, h);
                let mut facts = Vec::new();
                if let Some(u) = g.utilization_percent {
                    facts.push(format!("{u}%"));
                }
                if let Some(t) = g.temperature_c {
                    facts.push(format!("{t}°C"));
                }
                if let Some(w) = g.power_watts {
                    match g.power_limit_watts {
                        Some(l) => facts.push(format!("{w:.0}/{l:.0} W")),
                        None => facts.push(format!("{w:.0} W")),
                    }
                }
                // This process's share: beside the facts where the panel is wide enough, else on a line of its
                // own above the memory history (one GPU), else left out.
                let mut own_line = None;
                if let Some(b) = g.process_memory_bytes {
                    let ours = format!("termtune {}", gib(b));
                    if facts.join(" · ").chars().count() + ours.chars().count() + 3 <= width {
                        facts.push(ours);
                    } else {
                        own_line = Some(ours);
                    }
                }
                let rows = three_lines(r);
                let mut history = rows[3];
                if let Some(ours) = own_line
                    && history.height > 0
                {
                    frame.render_widget(
                        Line::styled(clip(&ours, width), theme.muted),
                        Rect::new(history.x, history.y, history.width, 1),
                    );
                    history =
                        Rect::new(history.x, history.y + 1, history.width, history.height - 1);
                }
                frame.render_widget(
                    Line::styled(clip(&format!("{} {}", g.index, g.name), width), theme.base),
                    rows[0],
                );
                frame.render_widget(
                    memory_gauge(g.memory_used_bytes, g.memory_total_bytes, theme),
                    rows[1],
                );
                frame.render_widget(
                    Line::styled(clip(&facts.join(" · "), width), theme.muted),
                    rows[2],
                );
                if let Some(hist) = app.run.gpu_memory_history.get(i) {
                    let data: Vec<u64> = hist.iter().copied().collect();
                    let tail = &data[data.len().saturating_sub(width)..];
                    frame.render_widget(
                        Sparkline::default()
                            .style(theme.lr)
                            .max(g.memory_total_bytes.max(1))
                            .data(tail),
                        history,
                    );
                }
            }
        }
    }
}

#[allow(clippy::cast_precision_loss)]
fn render_cpu(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let block = panel("CPU / RAM", theme);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let Some(s) = &app.run.system else {
        frame.render_widget(
            Paragraph::new(Line::styled("waiting for the first reading", theme.muted)),
            inner,
        );
        return;
    };
    let rows = three_lines(inner);
    let width = usize::from(inner.width);
    frame.render_widget(
        Line::styled(
            clip(
                &format!(
                    "CPU {:.0}% ({} cores) · us {:.0}%",
                    s.system_cpu_percent, s.cpu_count, s.process_cpu_percent
                ),
                width,
            ),
            theme.base,
        ),
        rows[0],
    );
    frame.render_widget(
        Line::styled(
            clip(&format!("RSS {}", gib(s.process_rss_bytes)), width),
            theme.base,
        ),
        rows[1],
    );
    frame.render_widget(
        memory_gauge(s.memory_used_bytes, s.memory_total_bytes, theme),
        rows[2],
    );
    let data: Vec<u64> = app.run.cpu_history.iter().copied().collect();
    let tail = &data[data.len().saturating_sub(width)..];
    frame.render_widget(
        Sparkline::default().style(theme.lr).max(100).data(tail),
        rows[3],
    );
}

fn render_log(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let block = panel("events", theme);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let h = usize::from(inner.height);
    let log = &app.run.log;
    let end = log.len().saturating_sub(app.run.log_scroll.min(log.len()));
    let start = end.saturating_sub(h);
    let width = usize::from(inner.width);
    let lines: Vec<Line> = log
        .iter()
        .skip(start)
        .take(end - start)
        .map(|l| {
            let style = if l.starts_with("failed") {
                theme.danger
            } else if l.starts_with("warning") {
                theme.warning
            } else if l.starts_with("checkpoint") {
                theme.ok
            } else {
                theme.base
            };
            Line::styled(clip(l, width), style)
        })
        .collect();
    frame.render_widget(Paragraph::new(lines), inner);
}

/// Three one-line rows at the top of `area` (a name and two gauges), and the rest.
fn three_lines(area: Rect) -> [Rect; 4] {
    Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(0),
    ])
    .areas(area)
}

/// Memory in use as a gauge labelled `used / total` (GiB).
#[allow(clippy::cast_precision_loss)]
fn memory_gauge(used_bytes: u64, total_bytes: u64, theme: &Theme) -> Gauge<'static> {
    let ratio = if total_bytes == 0 {
        0.0
    } else {
        (used_bytes as f64 / total_bytes as f64).clamp(0.0, 1.0)
    };
    Gauge::default()
        .gauge_style(theme.gauge)
        .ratio(ratio)
        .label(format!("{} / {}", gib(used_bytes), gib(total_bytes)))
}
