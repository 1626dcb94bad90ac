//! The Evaluate pane: the evaluation keys' form, then a box with the plan (before), progress (while
//! predicting), or the metrics and one example at a time — its prompt beside its label and prediction —
//! sorted by score (after). The focused field's help at the bottom until there are results.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Gauge, Paragraph, Wrap};

use super::{Theme, clip, form};
use crate::app::{App, EvalPhase};

/// Where the Evaluate pane draws; the mouse hit test uses the same rectangles.
pub(super) struct EvaluateAreas {
    pub form: Rect,
    pub fields: Rect,
    pub results: Rect,
    pub footer: Option<Rect>,
}

pub(super) fn areas(app: &App, area: Rect) -> EvaluateAreas {
    let n = u16::try_from(app.keys().len()).unwrap_or(8);
    let (form, results, footer) = if app.eval.outcome.is_some() {
        let [form, results] =
            Layout::vertical([Constraint::Length(n + 2), Constraint::Min(3)]).areas(area);
        (form, results, None)
    } else {
        let [form, results, footer] = Layout::vertical([
            Constraint::Length(n + 2),
            Constraint::Min(3),
            Constraint::Length(4),
        ])
        .areas(area);
        (form, results, Some(footer))
    };
    EvaluateAreas {
        form,
        fields: Block::default().borders(Borders::ALL).inner(form),
        results,
        footer,
    }
}

pub(super) fn render(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let a = areas(app, area);
    let block = Block::default()
        .borders(Borders::ALL)
        .border_style(theme.border_focused)
        .title(Span::styled(
            " Evaluate & Predict · eval_dataset, generation ",
            theme.title,
        ));
    frame.render_widget(block, a.form);
    form::render_fields(frame, a.fields, app, theme);
    render_results(frame, a.results, app, theme);
    if let Some(footer) = a.footer {
        form::render_footer(frame, footer, app, theme);
    }
}

fn title(app: &App) -> String {
    let state = &app.eval;
    match &state.phase {
        EvalPhase::Running { .. } if state.cancelling => " predict: cancelling… ".into(),
        EvalPhase::Running { done, total, .. } => {
            format!(" predicting {done}/{total} (x cancels) ")
        }
        EvalPhase::Failed(_) => " predict: failed ".into(),
        EvalPhase::Cancelled => " predict: cancelled ".into(),
        _ => match &state.outcome {
            Some(o) => {
                let m = |k: &str| o.metrics.get(k).copied().unwrap_or_default();
                format!(
                    " R-1 {:.2} · R-2 {:.2} · R-L {:.2} · BLEU-4 {:.2} ",
                    m("predict_rouge-1"),
                    m("predict_rouge-2"),
                    m("predict_rouge-l"),
                    m("predict_bleu-4")
                )
            }
            None => " predict · e starts ".into(),
        },
    }
}

fn render_results(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let state = &app.eval;
    let style = match state.phase {
        EvalPhase::Running { .. } | EvalPhase::Cancelled => theme.warning,
        EvalPhase::Failed(_) => theme.danger,
        EvalPhase::Finished => theme.ok,
        EvalPhase::Idle => theme.title,
    };
    let block = Block::default()
        .borders(Borders::ALL)
        .border_style(theme.border)
        .title(Span::styled(title(app), style));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    if inner.height == 0 || inner.width == 0 {
        return;
    }
    let width = usize::from(inner.width);
    match &state.phase {
        EvalPhase::Running {
            done,
            total,
            tokens,
        } => {
            let [gauge, rest] =
                Layout::vertical([Constraint::Length(1), Constraint::Min(0)]).areas(inner);
            #[allow(clippy::cast_precision_loss)]
            let ratio = if *total == 0 {
                0.0
            } else {
                (*done as f64 / *total as f64).clamp(0.0, 1.0)
            };
            frame.render_widget(
                Gauge::default()
                    .gauge_style(theme.ok)
                    .ratio(ratio)
                    .label(format!("{done}/{total} examples · {tokens} tokens")),
                gauge,
            );
            render_notes(frame, rest, app, theme);
        }
        EvalPhase::Failed(message) => {
            frame.render_widget(
                Paragraph::new(Line::styled(message.clone(), theme.danger))
                    .wrap(Wrap { trim: false }),
                inner,
            );
        }
        _ if state.outcome.is_some() => render_example(frame, inner, app, theme),
        _ => {
            let entries = match &app.dataset_entries {
                Some(Ok(names)) if !names.is_empty() => format!(
                    "eval_dataset entries ({}/dataset_info.json; ←/→ move, Space ticks): {}",
                    app.form.value("dataset_dir"),
                    names.join(", ")
                ),
                Some(Ok(_)) => "dataset_info.json lists no datasets".into(),
                Some(Err(e)) => e.clone(),
                None => "reading dataset_info.json…".into(),
            };
            let lines = vec![
                Line::styled(
                    clip(
                        "e generates an answer for every eval_dataset example (max_samples of each) and scores it as LLaMA-Factory does: ROUGE-1/2/L, BLEU-4",
                        width * 3,
                    ),
                    theme.muted,
                ),
                Line::styled(clip(&entries, width * 2), theme.field_value),
                Line::styled(
                    format!(
                        "files: {}/eval_<time>/generated_predictions.jsonl, predict_results.json",
                        app.form.value("output_dir")
                    ),
                    theme.muted,
                ),
                Line::styled(
                    "adapter: adapter_name_or_path (L: the run's latest checkpoint)",
                    theme.muted,
                ),
            ];
            frame.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }), inner);
        }
    }
}

/// The newest progress notes, bottom-aligned.
fn render_notes(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let h = usize::from(area.height);
    let width = usize::from(area.width);
    let lines = &app.eval.lines;
    let start = lines.len().saturating_sub(h);
    let shown: Vec<Line> = lines
        .range(start..)
        .map(|l| Line::styled(clip(l, width), theme.muted))
        .collect();
    frame.render_widget(Paragraph::new(shown), area);
}

/// One example: a header line, then the prompt beside the label and the prediction.
fn render_example(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let state = &app.eval;
    let Some((index, row)) = state.current() else {
        return;
    };
    let [head, body] = Layout::vertical([Constraint::Length(1), Constraint::Min(0)]).areas(area);
    let header = format!(
        "#{} ({}/{}, {}) R-L {:.2} BLEU-4 {:.2}{} · o sorts · [ ] move",
        index + 1,
        state.selected + 1,
        state.order.len(),
        state.sort.label(),
        row.scores.rouge_l,
        row.scores.bleu4,
        if row.truncated {
            " · cut at max_new_tokens"
        } else {
            ""
        },
    );
    frame.render_widget(
        Line::styled(clip(&header, usize::from(head.width)), theme.title),
        head,
    );
    if body.height == 0 {
        return;
    }
    let [left, right] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(body);
    let [label, predict] =
        Layout::vertical([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(right);
    text_box(frame, left, " prompt ", &row.prompt, true, theme);
    text_box(frame, label, " label ", &row.label, false, theme);
    text_box(frame, predict, " prediction ", &row.predict, false, theme);
}

/// `text` wrapped in a titled box; `tail` shows its end when it does not fit (a prompt ends with the
/// question).
fn text_box(frame: &mut Frame, area: Rect, title: &str, text: &str, tail: bool, theme: &Theme) {
    let block = Block::default()
        .borders(Borders::ALL)
        .border_style(theme.border)
        .title(Span::styled(title.to_string(), theme.field_label));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    if inner.width == 0 || inner.height == 0 {
        return;
    }
    let width = usize::from(inner.width);
    let scroll = if tail {
        // Rows the wrapped text takes (each line at least one), at most off by a word wrap per line.
        let rows: usize = text
            .lines()
            .map(|l| l.chars().count().max(1).div_ceil(width))
            .sum();
        u16::try_from(rows.saturating_sub(usize::from(inner.height))).unwrap_or(u16::MAX)
    } else {
        0
    };
    let paragraph = Paragraph::new(text.to_string())
        .style(theme.field_value)
        .wrap(Wrap { trim: false });
    frame.render_widget(paragraph.scroll((scroll, 0)), inner);
}
