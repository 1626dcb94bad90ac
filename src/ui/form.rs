//! A form pane: one line per field (label, value, marker), its problem on the line below, and the
//! focused field's help in a footer.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Wrap};

use super::{Theme, clip};
use crate::app::{App, FieldKind};

const LABEL_WIDTH: usize = 30;

/// Renders the current tab's form in `area` with `title`.
pub(super) fn render(frame: &mut Frame, area: Rect, app: &App, theme: &Theme, title: &str) {
    let areas = areas(app, area);
    if let Some(info) = areas.info {
        render_model_info(frame, info, app, theme);
    }
    let block = Block::default()
        .borders(Borders::ALL)
        .border_style(theme.border_focused)
        .title(Span::styled(format!(" {title} "), theme.title));
    frame.render_widget(block, areas.list);
    render_fields(frame, areas.fields, app, theme);
    render_footer(frame, areas.footer, app, theme);
}

/// Where a form pane draws: the model line (Model tab), the field box, its inside, the footer.
/// The mouse hit test uses the same rectangles.
pub(super) struct FormAreas {
    pub info: Option<Rect>,
    pub list: Rect,
    pub fields: Rect,
    pub footer: Rect,
}

pub(super) fn areas(app: &App, area: Rect) -> FormAreas {
    let [list, footer] = Layout::vertical([Constraint::Min(3), Constraint::Length(4)]).areas(area);
    let (info, list) = if app.tab == crate::app::Tab::Model {
        let [info, rest] =
            Layout::vertical([Constraint::Length(2), Constraint::Min(1)]).areas(list);
        (Some(info), rest)
    } else {
        (None, list)
    };
    FormAreas {
        info,
        list,
        fields: Block::default().borders(Borders::ALL).inner(list),
        footer,
    }
}

/// The field index of each line of the field list (a field's line and its problem line), and
/// the line of the focused field.
fn rows(app: &App) -> (Vec<usize>, usize) {
    let keys = app.keys();
    let focused = app.cursors[app.tab.index()].min(keys.len().saturating_sub(1));
    let mut rows = Vec::new();
    let mut focus_row = 0;
    for (i, key) in keys.iter().enumerate() {
        if i == focused {
            focus_row = rows.len();
        }
        rows.push(i);
        if app.form.issue(key).is_some() {
            rows.push(i);
        }
    }
    (rows, focus_row)
}

/// Lines scrolled off the top so the focused field shows in `height` lines.
fn first_row(focus_row: usize, height: usize) -> usize {
    (focus_row + 2).saturating_sub(height)
}

/// The field drawn at terminal row `y` of the field list `inner` (as [`render_fields`] lays it).
pub(super) fn field_at(app: &App, inner: Rect, y: u16) -> Option<usize> {
    if y < inner.y || y >= inner.bottom() {
        return None;
    }
    let (rows, focus_row) = rows(app);
    let skip = first_row(focus_row, usize::from(inner.height));
    rows.get(skip + usize::from(y - inner.y)).copied()
}

/// The field lines of the current tab, scrolled so the focused field shows.
pub(super) fn render_fields(frame: &mut Frame, inner: Rect, app: &App, theme: &Theme) {
    let keys = app.keys();
    if keys.is_empty() || inner.height == 0 {
        return;
    }
    let focused = app.cursors[app.tab.index()].min(keys.len() - 1);
    let width = usize::from(inner.width);
    // Build (field index, line) pairs: each field one line, plus one for its problem.
    let mut lines: Vec<(usize, Line)> = Vec::new();
    let mut focus_row = 0;
    for (i, key) in keys.iter().enumerate() {
        let f = app.form.field(key);
        if i == focused {
            focus_row = lines.len();
        }
        let value_width = width.saturating_sub(LABEL_WIDTH + 3);
        let value = display_value(f.key, &f.kind, &f.value, i == focused, app.check_cursor);
        let value_style = if f.issue.is_some() {
            theme.danger
        } else if f.edited {
            theme.field_edited
        } else if f.is_default {
            theme.field_default
        } else {
            theme.field_value
        };
        let label_style = if i == focused {
            theme.field_focused
        } else {
            theme.field_label
        };
        let marker = if f.issue.is_some() {
            "✗"
        } else if f.edited {
            "•"
        } else {
            " "
        };
        lines.push((
            i,
            Line::from(vec![
                Span::styled(
                    format!("{:<LABEL_WIDTH$}", clip(f.key, LABEL_WIDTH)),
                    label_style,
                ),
                Span::styled(format!(" {marker} "), value_style),
                Span::styled(clip(&value, value_width), value_style),
            ]),
        ));
        if let Some(issue) = &f.issue {
            lines.push((
                i,
                Line::styled(clip(&format!("    ✗ {issue}"), width), theme.danger),
            ));
        }
    }
    let height = usize::from(inner.height);
    debug_assert_eq!(rows(app).1, focus_row);
    let skip = first_row(focus_row, height);
    let shown: Vec<Line> = lines
        .iter()
        .skip(skip)
        .take(height)
        .map(|(_, l)| l.clone())
        .collect();
    frame.render_widget(Paragraph::new(shown), inner);
    // The text field being edited sits over the value cell.
    if let Some(ed) = &app.editing
        && !ed.save_as
        && focus_row >= skip
        && focus_row - skip < height
    {
        let x = inner.x + u16::try_from(LABEL_WIDTH + 3).unwrap_or(0);
        let y = inner.y + u16::try_from(focus_row - skip).unwrap_or(0);
        if x < inner.right() {
            let r = Rect::new(x, y, inner.right() - x, 1);
            frame.render_widget(&super::themed_field(&ed.area, theme), r);
        }
    }
}

/// How a value shows: toggles as [x]/[ ], selects with arrows (an empty choice as what it means for `key`),
/// checklists with every option.
fn display_value(
    key: &str,
    kind: &FieldKind,
    value: &str,
    focused: bool,
    check_cursor: usize,
) -> String {
    match kind {
        FieldKind::Toggle => {
            if value == "true" {
                "[x]".into()
            } else {
                "[ ]".into()
            }
        }
        FieldKind::Select(_) => {
            let v = match (value.is_empty(), key) {
                (false, _) => value,
                (true, "rope_scaling") => "(off)",
                (true, _) => "(auto)",
            };
            if focused {
                format!("◀ {v} ▶")
            } else {
                v.to_string()
            }
        }
        FieldKind::Checklist(options) => {
            let chosen = crate::config::comma_list(value);
            options
                .iter()
                .enumerate()
                .map(|(i, o)| {
                    let mark = if chosen.iter().any(|c| c == o) {
                        "x"
                    } else {
                        " "
                    };
                    if focused && i == check_cursor {
                        format!(">[{mark}]{o}")
                    } else {
                        format!("[{mark}]{o}")
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        }
        FieldKind::Text | FieldKind::Number | FieldKind::Datasets => {
            if value.is_empty() {
                "(unset)".into()
            } else {
                value.to_string()
            }
        }
    }
}

/// The focused field's help, default and problem.
pub(super) fn render_footer(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let Some(key) = app.focused_key() else {
        return;
    };
    let f = app.form.field(key);
    let how = match f.kind {
        FieldKind::Text | FieldKind::Number => "Enter edits",
        FieldKind::Toggle => "Space toggles",
        FieldKind::Select(_) => "←/→ choose",
        FieldKind::Checklist(_) => "←/→ move, Space ticks",
        FieldKind::Datasets => "←/→ move, Space ticks an entry, Enter types names",
    };
    let saved = app.form.saved_value(key);
    let mut lines = vec![Line::from(vec![
        Span::styled(format!("{key}: "), theme.title),
        Span::styled(f.help, theme.base),
    ])];
    match &f.issue {
        Some(issue) => lines.push(Line::styled(format!("✗ {issue}"), theme.danger)),
        None => lines.push(Line::from(vec![
            Span::styled(
                format!(
                    "{}: {} · ",
                    if f.is_default { "default" } else { "saved" },
                    if saved.is_empty() { "(unset)" } else { &saved }
                ),
                theme.muted,
            ),
            Span::styled(how, theme.muted),
        ])),
    }
    let block = Block::default()
        .borders(Borders::TOP)
        .border_style(theme.border);
    frame.render_widget(
        Paragraph::new(lines).wrap(Wrap { trim: true }).block(block),
        area,
    );
}

/// What `model_name_or_path` resolved to (architecture, size, context, chat template), and below it the memory
/// a training run of the preset as it stands would take.
fn render_model_info(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let current = app.form.value("model_name_or_path");
    let probed = matches!(&app.model_info, Some((name, _)) if *name == current);
    let (text, style) = match &app.model_info {
        Some((_, Ok(info))) if probed => (format!("→ {info}"), theme.ok),
        Some((_, Err(e))) if probed => (format!("✗ {e}"), theme.danger),
        _ => ("→ resolving the model…".to_string(), theme.muted),
    };
    let memory = match (&app.memory_basis, &app.form.loaded) {
        (Some(basis), Some(loaded)) if probed => basis
            .line(&loaded.preset)
            .unwrap_or_else(|e| format!("memory: {e}")),
        (Some(_), None) if probed => "memory: fix the problems below to see the estimate".into(),
        _ => String::new(),
    };
    let width = usize::from(area.width);
    let lines = vec![
        Line::styled(clip(&text, width), style),
        Line::styled(clip(&memory, width), theme.muted),
    ];
    frame.render_widget(Paragraph::new(lines), area);
}
