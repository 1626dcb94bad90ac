//! The Dataset pane: the dataset keys' form and the preview of one example (raw record, rendered
//! text, tokens coloured trained/masked).

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Wrap};

use super::{Theme, form};
use crate::app::App;

pub(super) fn render(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let [left, right] = split(area);
    form::render(frame, left, app, theme, "Dataset · data, template, lengths");
    match app.focused_key() {
        Some(key @ ("dataset" | "eval_dataset")) => render_entries(frame, right, app, theme, key),
        _ => render_preview(frame, right, app, theme),
    }
}

/// The form (left or top) and the entries/preview (right or bottom); the mouse hit test uses it.
pub(super) fn split(area: Rect) -> [Rect; 2] {
    if area.width >= 120 {
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(area)
    } else {
        Layout::vertical([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(area)
    }
}

/// The entries of dataset_info.json as a checklist for the focused `dataset` field.
fn render_entries(frame: &mut Frame, area: Rect, app: &App, theme: &Theme, key: &str) {
    let dir = app.form.value("dataset_dir");
    let block = Block::default()
        .borders(Borders::ALL)
        .border_style(theme.border)
        .title(Span::styled(
            format!(" {dir}/dataset_info.json (←/→ move, Space ticks) "),
            theme.title,
        ));
    let chosen = crate::config::comma_list(&app.form.value(key));
    let lines: Vec<Line> = match &app.dataset_entries {
        None => vec![Line::styled("reading the dataset registry…", theme.muted)],
        Some(Err(e)) => vec![Line::styled(e.clone(), theme.danger)],
        Some(Ok(names)) if names.is_empty() => {
            vec![Line::styled("no entries in dataset_info.json", theme.muted)]
        }
        Some(Ok(names)) => names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let mark = if chosen.iter().any(|c| c == n) {
                    "x"
                } else {
                    " "
                };
                let style = if i == app.check_cursor {
                    theme.field_focused
                } else if mark == "x" {
                    theme.field_edited
                } else {
                    theme.field_value
                };
                Line::styled(format!("[{mark}] {n}"), style)
            })
            .collect(),
    };
    let height = usize::from(area.height.saturating_sub(2));
    let skip = (app.check_cursor + 1).saturating_sub(height);
    frame.render_widget(
        Paragraph::new(lines.into_iter().skip(skip).collect::<Vec<_>>()).block(block),
        area,
    );
}

fn render_preview(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let p = &app.preview;
    let title = format!(" preview · example {} (v loads, [ ] pages) ", p.index);
    let block = Block::default()
        .borders(Borders::ALL)
        .border_style(theme.border)
        .title(Span::styled(title, theme.title));
    let mut lines: Vec<Line> = Vec::new();
    if p.loading {
        lines.push(Line::styled(
            "loading the tokenizer and the dataset…",
            theme.muted,
        ));
    }
    if let Some(e) = &p.error {
        lines.push(Line::styled(e.clone(), theme.danger));
    }
    match &p.stats {
        Some(Ok(s)) => {
            lines.push(Line::styled(
                format!(
                    "rows {} kept, {} skipped · {} train / {} eval · {} steps/epoch, {} total",
                    s.rows_kept,
                    s.skipped_total(),
                    s.train_examples,
                    s.eval_examples,
                    s.steps_per_epoch,
                    s.total_steps
                ),
                theme.base,
            ));
            lines.push(Line::styled(
                format!(
                    "tokens/example mean {:.0}, p50 {}, p95 {}, max {} · truncated {}",
                    s.tokens_mean, s.tokens_p50, s.tokens_p95, s.tokens_max, s.truncated
                ),
                theme.base,
            ));
        }
        Some(Err(e)) => lines.push(Line::styled(format!("statistics: {e}"), theme.danger)),
        None if p.data.is_some() => {
            lines.push(Line::styled("computing statistics…", theme.muted));
        }
        None => {}
    }
    match &p.data {
        None if !p.loading && p.error.is_none() => {
            lines.push(Line::styled(
                "press v to preview an example as the model sees it",
                theme.muted,
            ));
        }
        None => {}
        Some(d) => {
            let trained: usize = d
                .spans
                .iter()
                .filter(|s| s.trained)
                .map(|s| s.end - s.start)
                .sum();
            lines.push(Line::from(vec![
                Span::styled(format!("{} · ", d.source), theme.muted),
                Span::styled(
                    format!("{} tokens, {trained} trained", d.input_ids.len()),
                    theme.base,
                ),
            ]));
            if let Some(why) = &d.skipped {
                lines.push(Line::styled(format!("skipped: {why}"), theme.warning));
            }
            let raw = serde_json::to_string(&d.raw).unwrap_or_default();
            lines.push(Line::styled(format!("raw: {raw}"), theme.muted));
            let mut spans = vec![Span::styled("tokens: ", theme.muted)];
            for s in &d.spans {
                let style = if s.trained {
                    theme.token_trained
                } else {
                    theme.token_masked
                };
                spans.push(Span::styled(s.text.replace('\n', "⏎"), style));
            }
            lines.push(Line::from(spans));
        }
    }
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(block),
        area,
    );
}
