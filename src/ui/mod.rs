//! Pure rendering of [`App`]: `render(frame, &app, &theme)` never blocks and never mutates.
//!
//! Layout: a tab line, the pane, a status bar (preset, run state, device, message) and a help bar
//! built from the keymap. Below 80×24 a "terminal too small" message replaces everything.

pub mod chat;
mod dashboard;
mod dataset;
mod evaluate;
mod export;
mod form;
pub mod mouse;
pub mod theme;

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph, Wrap};

use crate::app::keymap::key_label;
use crate::app::{App, Context, Overlay, Phase, Question, Tab};
pub use theme::Theme;

/// The smallest terminal the full UI is laid out for.
pub const MIN_WIDTH: u16 = 80;
pub const MIN_HEIGHT: u16 = 24;

/// Draws the whole UI.
pub fn render(frame: &mut Frame, app: &App, theme: &Theme) {
    let area = frame.area();
    if area.width == 0 || area.height == 0 {
        return;
    }
    frame.render_widget(Block::default().style(theme.base), area);
    let Some([tabs, body, status, help]) = screen_areas(area) else {
        too_small(frame, area, theme);
        return;
    };
    render_tabs(frame, tabs, app, theme);
    match app.tab {
        Tab::Run => dashboard::render(frame, body, app, theme),
        Tab::Dataset => dataset::render(frame, body, app, theme),
        Tab::Chat => chat::render(frame, body, app, theme),
        Tab::Export => export::render(frame, body, app, theme),
        Tab::Evaluate => evaluate::render(frame, body, app, theme),
        _ => form::render(frame, body, app, theme, pane_title(app.tab)),
    }
    render_status(frame, status, app, theme);
    render_help_bar(frame, help, app, theme);
    render_overlay(frame, body, app, theme);
}

/// The tab line, the pane, the status bar and the help bar; `None` below the minimum size.
/// Rendering and the mouse hit test both lay the screen out with this.
pub(crate) fn screen_areas(area: Rect) -> Option<[Rect; 4]> {
    if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
        return None;
    }
    Some(
        Layout::vertical([
            Constraint::Length(1),
            Constraint::Min(1),
            Constraint::Length(1),
            Constraint::Length(1),
        ])
        .areas(area),
    )
}

/// A text field as drawn: in the theme's colours (ratatui-textarea's own placeholder is dark grey,
/// also in light and no-colour themes). A copy of a few lines per frame keeps rendering pure.
pub(crate) fn themed_field(
    field: &ratatui_textarea::TextArea<'static>,
    theme: &Theme,
) -> ratatui_textarea::TextArea<'static> {
    let mut field = field.clone();
    field.set_placeholder_style(theme.muted);
    field
}

fn pane_title(tab: Tab) -> &'static str {
    match tab {
        Tab::Model => "Model · base model, adapters, tokenizer",
        Tab::Dataset => "Dataset",
        Tab::Method => "LoRA / Method · stage, fine-tuning type, LoRA",
        Tab::Training => "Training · output, optimisation, evaluation",
        Tab::Chat => "Chat · generation settings (termtune chat PRESET opens a chat)",
        Tab::Export => "Export · merged model or GGUF",
        Tab::Run => "Run",
        Tab::Evaluate => "Evaluate & Predict",
    }
}

fn too_small(frame: &mut Frame, area: Rect, theme: &Theme) {
    let text = vec![
        Line::styled("terminal too small", theme.danger),
        Line::styled(
            format!(
                "{}×{} here; termtune needs {MIN_WIDTH}×{MIN_HEIGHT}",
                area.width, area.height
            ),
            theme.base,
        ),
        Line::styled("enlarge the window, or press q to quit", theme.muted),
    ];
    let h = u16::try_from(text.len()).unwrap_or(3).min(area.height);
    let y = area.y + (area.height - h) / 2;
    frame.render_widget(
        Paragraph::new(text)
            .wrap(Wrap { trim: true })
            .alignment(ratatui::layout::Alignment::Center),
        Rect::new(area.x, y, area.width, area.height - (y - area.y)),
    );
}

fn render_tabs(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let spans: Vec<Span> = tab_spans(app, area.width, theme)
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    frame.render_widget(Line::from(spans), area);
}

/// The spans of the tab line, each with the tab it belongs to (the mouse hit test reads their
/// widths).
pub(crate) fn tab_spans<'a>(app: &App, width: u16, theme: &Theme) -> Vec<(Span<'a>, Option<Tab>)> {
    let mut spans = Vec::new();
    if width >= 100 {
        spans.push((Span::styled(" termtune ", theme.title), None));
    }
    for (i, tab) in Tab::ALL.iter().enumerate() {
        let style = if *tab == app.tab {
            theme.tab_active
        } else {
            theme.tab_inactive
        };
        // Below 100 columns the eight titles fit only with the short ones.
        let title = if width < 100 {
            tab.short_title()
        } else {
            tab.title()
        };
        let mut label = format!(" {} {title} ", i + 1);
        if *tab == Tab::Run && app.run.phase.is_active() {
            label = format!(" {} {title} ● ", i + 1);
        }
        let problems = app
            .keys_of(*tab)
            .iter()
            .filter(|k| app.form.issue(k).is_some())
            .count();
        spans.push((Span::styled(label, style), Some(*tab)));
        if problems > 0 {
            spans.push((
                Span::styled(format!("!{problems}"), theme.danger),
                Some(*tab),
            ));
        }
    }
    spans
}

fn render_status(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    if let Some(s) = &app.status {
        let style = if s.error {
            theme.status_error
        } else {
            theme.status_bar
        };
        frame.render_widget(Paragraph::new(format!(" {}", s.text)).style(style), area);
        return;
    }
    let run = &app.run;
    let state = match &run.phase {
        Phase::Running | Phase::Paused | Phase::Stopping { .. } => format!(
            "{} · step {}/{}",
            run.phase.label(),
            run.step(),
            run.total_steps
        ),
        p => p.label(),
    };
    let problems = app.form.issues.len();
    let text = format!(
        " {}{} │ {} │ {} │ {}{}",
        app.form.name(),
        if app.form.is_dirty() { " [+]" } else { "" },
        state,
        app.device,
        app.theme_names
            .get(app.theme_index)
            .map_or("default", String::as_str),
        if problems > 0 {
            format!(
                " │ {problems} problem{}",
                if problems == 1 { "" } else { "s" }
            )
        } else {
            String::new()
        }
    );
    frame.render_widget(Paragraph::new(text).style(theme.status_bar), area);
}

fn render_help_bar(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let contexts = app.contexts();
    let bar = app.keymap.fit_bar(&contexts, usize::from(area.width));
    let mut spans = Vec::new();
    let more = bar.more.map(|m| (m, crate::app::keymap::MORE_LABEL));
    for (b, desc) in bar.hints.iter().map(|b| (*b, b.desc)).chain(more) {
        spans.push(Span::styled(
            format!(" {}", key_label(b.code, b.modifiers)),
            theme.help_key,
        ));
        spans.push(Span::styled(format!(" {desc} "), theme.help_desc));
    }
    frame.render_widget(Line::from(spans), area);
}

/// A rectangle of `w`×`h` centred in `area` (clamped to it).
pub(crate) fn centered(area: Rect, w: u16, h: u16) -> Rect {
    let w = w.min(area.width);
    let h = h.min(area.height);
    Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    )
}

fn boxed<'a>(title: &'a str, theme: &Theme) -> Block<'a> {
    Block::default()
        .borders(Borders::ALL)
        .border_style(theme.border_focused)
        .title(Span::styled(format!(" {title} "), theme.title))
        .style(theme.base)
}

fn render_overlay(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    if let Some(ed) = &app.editing
        && ed.save_as
    {
        let r = centered(area, 70, 3);
        frame.render_widget(Clear, r);
        let block = boxed("save preset as (Enter saves, Esc cancels)", theme);
        let inner = block.inner(r);
        frame.render_widget(block, r);
        frame.render_widget(&themed_field(&ed.area, theme), inner);
        return;
    }
    match &app.overlay {
        Overlay::None => {}
        Overlay::Help { scroll } => {
            let r = centered(area, 76, area.height.saturating_sub(2));
            frame.render_widget(Clear, r);
            let mut lines = Vec::new();
            let groups = [
                (Context::Global, "everywhere"),
                (Context::Form, "forms"),
                (Context::Dataset, "dataset"),
                (Context::Run, "run dashboard"),
                (Context::ChatInput, "chat: typing a message"),
                (Context::Chat, "chat: outside the input (Esc)"),
                (Context::ChatSettings, "chat: generation settings (g)"),
                (Context::Export, "export pane"),
                (Context::Editing, "editing a field"),
                (Context::Confirm, "questions"),
                (Context::Overlay, "pop-ups"),
            ];
            for (ctx, name) in groups {
                lines.push(Line::styled(name, theme.title));
                for b in app.keymap.bindings.iter().filter(|b| b.context == ctx) {
                    lines.push(Line::from(vec![
                        Span::styled(
                            format!("  {:<12}", key_label(b.code, b.modifiers)),
                            theme.help_key,
                        ),
                        Span::styled(b.desc, theme.help_desc),
                    ]));
                }
            }
            let scroll = u16::try_from(*scroll).unwrap_or(u16::MAX);
            frame.render_widget(
                Paragraph::new(lines)
                    .block(boxed("keys (↑↓ scroll, Esc closes)", theme))
                    .scroll((scroll, 0)),
                r,
            );
        }
        Overlay::Command => {
            let export = app.tab == Tab::Export;
            let r = centered(
                area,
                area.width.saturating_sub(4),
                if export { 13 } else { 10 },
            );
            frame.render_widget(Clear, r);
            let mut lines = Vec::new();
            let commands = if export {
                app.form.export_commands(app.export.adapter_only)
            } else {
                app.form.commands()
            };
            for c in commands {
                lines.push(Line::styled(c, theme.field_value));
                lines.push(Line::raw(""));
            }
            if app.form.is_dirty() {
                lines.push(Line::styled(
                    "the KEY=VALUE arguments are this preset's unsaved edits",
                    theme.muted,
                ));
            }
            if export {
                lines.push(Line::styled(
                    "llamafactory-cli export writes a merged safetensors folder only: export_format: gguf and --adapter-only are termtune's",
                    theme.muted,
                ));
            }
            frame.render_widget(
                Paragraph::new(lines)
                    .wrap(Wrap { trim: false })
                    .block(boxed("show as command (Esc closes)", theme)),
                r,
            );
        }
        Overlay::Picker { items, selected } => {
            let items: Vec<String> = items.iter().map(|p| p.display().to_string()).collect();
            render_list(
                frame,
                (area, 70),
                &items,
                *selected,
                "load preset (Enter loads, Esc closes)",
                theme,
            );
        }
        Overlay::Runs { items, selected } => {
            let now = crate::runs::now_unix();
            let items: Vec<String> = items.iter().map(|r| run_line(r, now)).collect();
            render_list(
                frame,
                (area, area.width.saturating_sub(4).min(110)),
                &items,
                *selected,
                "runs of this machine (Enter follows one, Esc closes)",
                theme,
            );
        }
        Overlay::Confirm(q) => {
            let h = if *q == Question::StartExport { 9 } else { 6 };
            let r = centered(area, 64, h);
            frame.render_widget(Clear, r);
            frame.render_widget(
                Paragraph::new(if *q == Question::StartExport {
                    app.export_question()
                } else {
                    q.text().to_string()
                })
                .wrap(Wrap { trim: true })
                .style(theme.base)
                .block(boxed("confirm", theme)),
                r,
            );
        }
    }
}

/// A list to pick from, `width` columns wide, the `selected` line highlighted and in view.
fn render_list(
    frame: &mut Frame,
    (area, width): (Rect, u16),
    items: &[String],
    selected: usize,
    title: &str,
    theme: &Theme,
) {
    let h = u16::try_from(items.len() + 2).unwrap_or(u16::MAX);
    let r = centered(area, width, h);
    frame.render_widget(Clear, r);
    let lines: Vec<Line> = items
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let style = if i == selected {
                theme.field_focused
            } else {
                theme.field_value
            };
            Line::styled(format!(" {text}"), style)
        })
        .collect();
    let skip = selected.saturating_sub(usize::from(r.height.saturating_sub(3)));
    frame.render_widget(
        Paragraph::new(lines.into_iter().skip(skip).collect::<Vec<_>>()).block(boxed(title, theme)),
        r,
    );
}

/// One run in the list of runs: state, step, loss, age and folder.
fn run_line(r: &crate::runs::RunView, now: u64) -> String {
    let steps = match r.total_steps {
        Some(t) => format!("{}/{t}", r.step),
        None => r.step.to_string(),
    };
    #[allow(clippy::cast_precision_loss)]
    let age = crate::trainer::runlog::format_duration(now.saturating_sub(r.started) as f64);
    format!(
        "{:<8} step {:<11} loss {:<7} {} ago  {}",
        r.state.as_str(),
        steps,
        r.loss.map_or_else(|| "-".into(), |l| format!("{l:.4}")),
        age,
        r.output_dir.display()
    )
}

/// Bytes as GiB with one decimal.
#[allow(clippy::cast_precision_loss)]
pub(crate) fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

/// Text cut to `width` characters with an ellipsis.
pub(crate) fn clip(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_string()
    } else if width == 0 {
        String::new()
    } else {
        let mut out: String = s.chars().take(width - 1).collect();
        out.push('…');
        out
    }
}
