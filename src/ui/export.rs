//! The Export pane: the export keys' form, then a box with what the export will write (before),
//! its progress lines (while running), and the report or the refusal (after); the focused
//! field's help at the bottom.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Wrap};

use super::{Theme, clip, form};
use crate::app::export::describe_output;
use crate::app::{App, ExportPhase};

/// Where the Export pane draws; the mouse hit test uses the same rectangles.
pub(super) struct ExportAreas {
    pub form: Rect,
    pub fields: Rect,
    pub log: Rect,
    pub footer: Rect,
}

pub(super) fn areas(app: &App, area: Rect) -> ExportAreas {
    let n = u16::try_from(app.keys().len()).unwrap_or(4);
    let [form, log, footer] = Layout::vertical([
        Constraint::Length(n + 2),
        Constraint::Min(3),
        Constraint::Length(4),
    ])
    .areas(area);
    ExportAreas {
        form,
        fields: Block::default().borders(Borders::ALL).inner(form),
        log,
        footer,
    }
}

pub(super) fn render(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let a = areas(app, area);
    let block = Block::default()
        .borders(Borders::ALL)
        .border_style(theme.border_focused)
        .title(Span::styled(
            " Export · merged model, GGUF or adapter ",
            theme.title,
        ));
    frame.render_widget(block, a.form);
    form::render_fields(frame, a.fields, app, theme);
    render_log(frame, a.log, app, theme);
    form::render_footer(frame, a.footer, app, theme);
}

/// A labelled line: `label` in a fixed column, then the value.
fn row<'a>(label: &'a str, value: String, theme: &Theme) -> Line<'a> {
    Line::from(vec![
        Span::styled(format!("{label:<9}"), theme.field_label),
        Span::styled(value, theme.field_value),
    ])
}

fn render_log(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let state = &app.export;
    let (title, title_style) = match &state.phase {
        ExportPhase::Idle => (
            " export · e starts · m merged/adapter · c shows the command ",
            theme.title,
        ),
        ExportPhase::Running if state.cancelling => (" export: cancelling… ", theme.warning),
        ExportPhase::Running => (" export: running… (x cancels) ", theme.warning),
        ExportPhase::Cancelled => (" export: cancelled ", theme.warning),
        ExportPhase::Finished(_) => (" export: done ", theme.ok),
        ExportPhase::Failed(_) => (" export: refused ", theme.danger),
    };
    let block = Block::default()
        .borders(Borders::ALL)
        .border_style(theme.border)
        .title(Span::styled(title, title_style));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    if inner.height == 0 || inner.width == 0 {
        return;
    }
    let head = head_lines(app, theme);
    let width = usize::from(inner.width);
    // Wrapped height of the head (each line at least one row).
    let head_rows: usize = head.iter().map(|l| l.width().max(1).div_ceil(width)).sum();
    let head_h = u16::try_from(head_rows)
        .unwrap_or(u16::MAX)
        .min(inner.height);
    let [top, rest] =
        Layout::vertical([Constraint::Length(head_h), Constraint::Min(0)]).areas(inner);
    frame.render_widget(Paragraph::new(head).wrap(Wrap { trim: false }), top);
    if rest.height == 0 || state.lines.is_empty() || state.phase == ExportPhase::Idle {
        return;
    }
    // Progress lines, newest at the bottom, scrolled up by `scroll`.
    let h = usize::from(rest.height);
    let end = state.lines.len().saturating_sub(state.scroll);
    let start = end.saturating_sub(h);
    let lines: Vec<Line> = state
        .lines
        .range(start..end)
        .map(|l| Line::styled(clip(l, width), theme.muted))
        .collect();
    frame.render_widget(Paragraph::new(lines), rest);
}

/// What the box says above the progress lines.
fn head_lines<'a>(app: &App, theme: &'a Theme) -> Vec<Line<'a>> {
    let state = &app.export;
    match &state.phase {
        ExportPhase::Idle => plan_lines(app, theme),
        ExportPhase::Running => {
            let mut out = vec![Line::styled(
                "writing into a hidden folder next to export_dir; it is renamed into place at the end",
                theme.muted,
            )];
            if state.scroll > 0 {
                out.push(Line::styled(
                    format!("(scrolled up {} lines; PgDn scrolls down)", state.scroll),
                    theme.muted,
                ));
            }
            out
        }
        ExportPhase::Finished(r) => {
            let mut out = vec![
                Line::styled(format!("✓ exported to {}", r.dir.display()), theme.ok),
                row("type", r.weights_type.clone(), theme),
                row("base", r.base_name.clone(), theme),
            ];
            if r.weights_type != "adapter" {
                out.push(row(
                    "merged",
                    if r.merged_adapters.is_empty() {
                        "no adapter (the base as it is)".into()
                    } else {
                        r.merged_adapters
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    },
                    theme,
                ));
            }
            if let Some(q) = &r.dequantized_base {
                out.push(Line::styled(
                    format!(
                        "note: the base is a {q} GGUF; the adapters were merged into its dequantized weights (the export carries the base's quantization error)"
                    ),
                    theme.warning,
                ));
            }
            out.push(row(
                "files",
                format!("{} ({})", r.files.join(" "), r.files.len()),
                theme,
            ));
            out
        }
        ExportPhase::Cancelled => vec![Line::styled(
            "cancelled: nothing was written to export_dir (what had been written was removed)",
            theme.warning,
        )],
        ExportPhase::Failed(msg) => vec![
            Line::styled(format!("✗ {msg}"), theme.danger),
            Line::styled(
                "nothing was written to export_dir; fix the cause and press e again",
                theme.muted,
            ),
        ],
    }
}

/// Before an export: what it would read and write, and what still stops it.
fn plan_lines<'a>(app: &App, theme: &'a Theme) -> Vec<Line<'a>> {
    let f = &app.form;
    let adapters = f.value("adapter_name_or_path");
    let dir = f.value("export_dir");
    let mut out = vec![
        row(
            "writes",
            describe_output(
                &f.value("export_format"),
                &f.value("export_gguf_type"),
                &f.value("infer_dtype"),
                app.export.adapter_only,
            ),
            theme,
        ),
        row(
            "to",
            if dir.is_empty() {
                "(export_dir unset)".into()
            } else {
                dir
            },
            theme,
        ),
        row("base", f.value("model_name_or_path"), theme),
        row(
            "adapters",
            if adapters.is_empty() {
                "none (adapter_name_or_path, Model tab): the base is exported as it is".into()
            } else {
                adapters
            },
            theme,
        ),
    ];
    if app.run.phase.is_active() {
        out.push(Line::styled(
            "a run is training: export one of its saved checkpoints (L uses the latest), not its output_dir",
            theme.warning,
        ));
    }
    if f.export_issues.is_empty() {
        out.push(Line::styled("ready: e exports (asks first)", theme.ok));
    }
    for i in &f.export_issues {
        out.push(Line::styled(format!("✗ {}", i.message), theme.danger));
    }
    out
}
